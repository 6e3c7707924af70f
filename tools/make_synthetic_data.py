"""Write the synthetic data sets the ``*_synthetic.py`` configs train on: shapes with polygon masks.

    python tools/make_synthetic_data.py data/synthetic

writes ``data/synthetic/coco`` (COCO-format instance segmentation: squares, circles, triangles) and
``data/synthetic/ade`` (ADE20K-format semantic segmentation of the same kind of images), the folders the synthetic
configs read. A non-empty output folder is refused unless ``--force`` (which replaces the data sets in it).
"""
import argparse
from typing import Optional, Sequence

from tokenzoo.cli import user_errors
from tokenzoo.mm.synthetic import check_output_dir, write_instance_set, write_segmentation_set


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="output folder (gets coco/ and ade/ subfolders)")
    parser.add_argument("--num-train", type=int, default=64, help="training images per set (default: 64)")
    parser.add_argument("--num-val", type=int, default=16, help="validation images per set (default: 16)")
    parser.add_argument("--img-size", type=int, default=128,
                        help="image height and width (default: 128, what the synthetic configs expect)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty folder, replacing the sets")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        root = check_output_dir(args.out_dir, args.force)
    sizes = dict(num_train=args.num_train, num_val=args.num_val, img_size=args.img_size, seed=args.seed)
    coco = write_instance_set(root / "coco", force=args.force, **sizes)
    ade = write_segmentation_set(root / "ade", force=args.force, **sizes)
    print(f"wrote {args.num_train} + {args.num_val} images ({args.img_size}x{args.img_size}) per set:\n"
          f"  COCO format: {coco['train'].parent.parent}\n  ADE format:  {ade['training'].parent.parent}")


if __name__ == "__main__":
    main()
