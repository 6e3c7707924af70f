"""Train a detector (mmdet) or segmentor (mmseg) from a tokenzoo config with mmengine's Runner.

The task comes from the config's ``default_scope``. Examples::

    python tools/train.py configs/evit/mask-rcnn_evit-small-kr0.7_sfp_8xb2-lsj-100e_coco.py
    python tools/train.py CONFIG --resume                       # continue from the work dir's last checkpoint
    python tools/train.py CONFIG --resume work_dirs/x/iter_4000.pth --cfg-options train_dataloader.batch_size=4
    tools/dist_train.sh CONFIG 8                                # 8 GPUs with torchrun
"""
import argparse
from typing import Optional, Sequence

from mmengine.config import DictAction

from tokenzoo.cli import user_errors
from tokenzoo.mm import LAUNCHERS, build_runner, check_data, load_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="config file")
    parser.add_argument("--work-dir", help="folder for logs and checkpoints (default: work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                        help="continue a run: alone, from the last checkpoint in the work dir; or from CHECKPOINT")
    parser.add_argument("--load-from", metavar="CHECKPOINT", help="start from these weights (not a resume)")
    parser.add_argument("--amp", action="store_true", help="mixed precision (GPU only; off by default)")
    parser.add_argument("--data-root", metavar="DIR", help="where the data set is (replaces the config's data_root)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config settings, e.g. train_dataloader.batch_size=4")
    parser.add_argument("--launcher", choices=LAUNCHERS, default="none",
                        help="job launcher (dist_train.sh passes pytorch)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):  # everything a user can get wrong is checked before the Runner starts
        cfg = load_config(args.config, cfg_options=args.cfg_options, work_dir=args.work_dir, resume=args.resume,
                          load_from=args.load_from, amp=args.amp, launcher=args.launcher, data_root=args.data_root)
        check_data(cfg, ["train_dataloader"] + (["val_dataloader"] if cfg.get("val_cfg") else []))
    build_runner(cfg).train()


if __name__ == "__main__":
    main()
