"""Write scikit-learn's handwritten digits as an ImageFolder with a fixed stratified train/val split.

    python tools/make_digits.py data/digits

writes ``data/digits/train/<digit>/<index>.png`` (1,437 images) and ``data/digits/val/<digit>/<index>.png`` (360),
56 x 56 greyscale (the 8 x 8 digits upsampled bilinearly: a 14 x 14 patch grid with patch 4, DeiT's grid at 224), and
``data/digits/digits.json`` (what was written). The data come from a file inside the scikit-learn wheel: no download.
A non-empty output folder is refused unless ``--force``.
"""
import argparse
from typing import Optional, Sequence

from tokenzoo.classification import DIGITS_IMG_SIZE, write_digits
from tokenzoo.classification.data import DIGITS_VAL_FRACTION
from tokenzoo.cli import user_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="output folder (gets train/, val/ and digits.json)")
    parser.add_argument("--img-size", type=int, default=DIGITS_IMG_SIZE,
                        help=f"side of the written images (default: {DIGITS_IMG_SIZE})")
    parser.add_argument("--val-fraction", type=float, default=DIGITS_VAL_FRACTION,
                        help=f"share of each class in val/ (default: {DIGITS_VAL_FRACTION})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: 0)")
    parser.add_argument("--force", action="store_true", help="replace the digits in a non-empty folder")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        meta = write_digits(args.out_dir, args.img_size, args.val_fraction, args.seed, args.force)
    counts = {split: sum(per_class.values()) for split, per_class in meta["counts"].items()}
    print(f"wrote {counts['train']} train + {counts['val']} val digits ({args.img_size}x{args.img_size}) to "
          f"{args.out_dir}")


if __name__ == "__main__":
    main()
