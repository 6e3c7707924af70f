"""Draw a trained detector's or segmentor's predictions on one image.

    python tools/infer.py CONFIG CHECKPOINT demo.jpg --out demo_pred.png [--device cuda:0] [--score-thr 0.5]

The task comes from the config's ``default_scope``. An existing output picture is kept unless ``--force``.
"""
import argparse
from typing import Optional, Sequence

from mmengine.config import DictAction

from tokenzoo.cli import user_errors
from tokenzoo.mm.inference import check_infer_args, infer_image


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="config file the checkpoint was trained with")
    parser.add_argument("checkpoint", help="checkpoint written by tools/train.py")
    parser.add_argument("image", help="input image")
    parser.add_argument("--out", required=True, help="output picture (.png/.jpg)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--score-thr", type=float, default=0.3, help="lowest detection score drawn (default: 0.3)")
    parser.add_argument("--force", action="store_true", help="overwrite the output picture if it exists")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, metavar="KEY=VALUE",
                        help="override config settings")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        check_infer_args(args.checkpoint, args.image, args.out, force=args.force)
    out = infer_image(args.config, args.checkpoint, args.image, args.out, device=args.device,
                      score_thr=args.score_thr, force=args.force, cfg_options=args.cfg_options)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
