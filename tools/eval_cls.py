"""Top-1 / top-5 and throughput of a classifier on an ImageFolder split: a timm/tokenzoo model or an ONNX file.

    python tools/eval_cls.py evit_small --checkpoint deit_small_patch16_224-cd65a155.pth --data-dir /data/imagenet
    python tools/eval_cls.py evit_tiny --checkpoint tools/results/digits/reference.pth --data-dir data/digits \
        --model-kwargs img_size=56 patch_size=4 embed_dim=96 depth=12 num_heads=3 init_values=1e-4 --crop-pct 1
    python tools/eval_cls.py evit_tiny_digits.onnx --data-dir data/digits --crop-pct 1 --interpolation bilinear

The preprocessing is timm's eval transform (resize to size / crop_pct, centre crop, normalize) with the model's
pretrained settings unless given; an ONNX file takes its input size from the graph and timm's ImageNet defaults
otherwise. Throughput is images per second of model time (data loading excluded), batch ``--batch-size``. Prints
the metrics as JSON (and writes them with ``--json``).
"""
import argparse
import datetime
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from tokenzoo.classification import check_image_folder, create_classifier, data_config_for, evaluate, load_split
from tokenzoo.classification.data import build_eval_loader
from tokenzoo.classification.engine import OnnxClassifier
from tokenzoo.cli import parse_model_kwargs, user_errors
from tokenzoo.profiling import machine_info


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="timm/tokenzoo model name, or an .onnx file")
    parser.add_argument("--data-dir", required=True, help="ImageFolder root")
    parser.add_argument("--split", default="val", help="subfolder to evaluate (default: val)")
    parser.add_argument("--checkpoint", metavar="FILE", help="weights of a model name (default: random, a warning)")
    parser.add_argument("--pretrained", action="store_true", help="the model's pretrained tag (downloads)")
    parser.add_argument("--model-kwargs", nargs="+", metavar="KWARGS",
                        help="constructor arguments: key=value pairs or one JSON object")
    parser.add_argument("--img-size", type=int, help="input size (default: the model's, or the ONNX graph's)")
    parser.add_argument("--crop-pct", type=float, help="centre crop fraction (default: the model's; ONNX: 0.875)")
    parser.add_argument("--interpolation", help="resize interpolation (default: the model's; ONNX: bicubic)")
    parser.add_argument("--mean", type=float, nargs=3, help="normalization mean (default: the model's / ImageNet)")
    parser.add_argument("--std", type=float, nargs=3, help="normalization std (default: the model's / ImageNet)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (default: 64)")
    parser.add_argument("--workers", type=int, default=2, help="data loader processes (default: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch / onnxruntime intra-op threads (default: 1, the edge protocol)")
    parser.add_argument("--json", type=Path, help="also write the metrics here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        for key in ("batch_size", "threads"):
            if getattr(args, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
        if args.json is not None:
            if args.json.exists() and not args.force:
                raise FileExistsError(f"{args.json} already exists; pass --force to overwrite it")
            if not args.json.parent.is_dir():
                raise FileNotFoundError(f"folder {args.json.parent} does not exist; create it first")
        folder = check_image_folder(args.data_dir, [args.split])[args.split]
        overrides = dict(crop_pct=args.crop_pct, interpolation=args.interpolation, mean=args.mean, std=args.std)
        torch.set_num_threads(args.threads)
        if args.model.endswith(".onnx"):
            if args.checkpoint or args.model_kwargs or args.pretrained:
                raise ValueError("an ONNX file carries its weights and settings: --checkpoint, --pretrained and "
                                 "--model-kwargs are for model names")
            model = OnnxClassifier(args.model, args.threads)
            size = args.img_size or (model.img_size[0] if model.img_size else 224)
            data_config = dict(input_size=(3, size, size), crop_pct=0.875, interpolation="bicubic",
                               mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD)
            data_config.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()
                                if v is not None})
        else:
            kwargs = parse_model_kwargs(args.model_kwargs)
            if args.img_size is not None:
                kwargs["img_size"] = args.img_size
            model = create_classifier(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, **kwargs)
            data_config = data_config_for(model, args.img_size, **overrides)
        dataset = load_split(folder, data_config, is_training=False)
    if not (args.checkpoint or args.pretrained or args.model.endswith(".onnx")):
        print("warning: no --checkpoint: random weights", file=sys.stderr)
    loader = build_eval_loader(dataset, args.batch_size, args.workers)
    metrics = evaluate(model, loader, progress=True)
    result = dict(model=args.model, checkpoint=args.checkpoint, split=str(folder), data_config=data_config,
                  batch_size=args.batch_size, threads=args.threads, **metrics,
                  created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  machine=machine_info())
    text = json.dumps(result, indent=1, default=list)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
