"""Evaluate a trained detector (mmdet) or segmentor (mmseg) checkpoint on a config's test set.

The task comes from the config's ``default_scope``; the metrics are the config's ``test_evaluator`` (COCO box/mask
AP, mIoU). Examples::

    python tools/test.py configs/evit/upernet_evit-small-kr0.7_mln_8xb2-160k_ade20k-512x512.py CHECKPOINT
    tools/dist_test.sh CONFIG CHECKPOINT 8
"""
import argparse
import json
from typing import Optional, Sequence

from mmengine.config import DictAction
from mmengine.dist import is_main_process

from tokenzoo.cli import user_errors
from tokenzoo.mm import LAUNCHERS, build_runner, check_data, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="config file")
    parser.add_argument("checkpoint", help="checkpoint to evaluate")
    parser.add_argument("--work-dir", help="folder for the logs (default: work_dirs/<config name>)")
    parser.add_argument("--data-root", metavar="DIR", help="where the data set is (replaces the config's data_root)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config settings, e.g. test_dataloader.batch_size=2")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help="job launcher (dist_test.sh passes pytorch)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):  # everything a user can get wrong is checked before the Runner starts
        cfg = load_config(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir,
                          load_from=args.checkpoint, launcher=args.launcher, data_root=args.data_root)
        check_data(cfg, ["test_dataloader"])
    metrics = build_runner(cfg).test()
    if is_main_process():
        print(json.dumps(metrics, indent=2, default=float))


if __name__ == "__main__":
    main()
