"""Measure the speed/accuracy trade-off of the parameter-free families on the digits reference model.

    python tools/make_digits.py data/digits
    python tools/tradeoff.py --data-dir data/digits --json tools/results/tradeoff_digits.json \
        --finetuned work_dirs/digits_evit_warmup work_dirs/digits_mctf_consistency
    make model-zoo     # renders the committed run in model_zoo.md, with its plot

For the base and each family's knob sweep (EViT keep rate, ToMe r, MCTF r, MCTF-Fast r, Expedit clusters), all on
the committed reference weights and training-free: validation top-1 / top-5, GMACs, tokens per block, eager PyTorch
and onnxruntime latency (batch 1, 1 thread: the edge protocol of tools/benchmark.py), and the ONNX parity. Each
``--finetuned`` folder (a tools/train_cls.py output) adds its model, measured the same way, so a recipe's gain is
read off against the same family training-free. Then the training-step cost of each family at its paper default
against the base. A thin command line over ``tokenzoo.classification.tradeoff``; the JSON names the machine, data,
weights and settings, and ``tradeoff_section`` renders it for model_zoo.md.
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from tokenzoo.classification.reference import REFERENCE_WEIGHTS, repository_root
from tokenzoo.classification.tradeoff import SWEEPS, plot_tradeoff, run_tradeoff, tradeoff_section
from tokenzoo.cli import user_errors


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="the digits ImageFolder (tools/make_digits.py)")
    parser.add_argument("--checkpoint", type=Path, default=repository_root() / REFERENCE_WEIGHTS,
                        help=f"reference weights (default: {REFERENCE_WEIGHTS})")
    parser.add_argument("--families", nargs="+", default=list(SWEEPS), choices=list(SWEEPS),
                        help="families to sweep (default: all parameter-free ones)")
    parser.add_argument("--finetuned", nargs="+", default=[], type=Path, metavar="DIR",
                        help="tools/train_cls.py output folders of fine-tuned variants to measure beside the sweeps")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX export, parity and onnxruntime latency")
    parser.add_argument("--iters", type=int, default=50, help="timed runs per latency (default: 50)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs before each (default: 10)")
    parser.add_argument("--cost-batch-size", type=int, default=32,
                        help="batch of the training-step / inference timing (default: 32)")
    parser.add_argument("--cost-rounds", type=int, default=5, help="interleaved timing rounds (default: 5)")
    parser.add_argument("--json", type=Path, help="write the run here")
    parser.add_argument("--plot", type=Path, help="write the plot (PNG) here")
    parser.add_argument("--force", action="store_true", help="overwrite existing --json / --plot files")
    return parser


def _check_new_file(path: Optional[Path], force: bool) -> None:
    if path is None:
        return
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it first")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        for key in ("iters", "warmup", "cost_batch_size", "cost_rounds"):
            if getattr(args, key) < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
        _check_new_file(args.json, args.force)
        _check_new_file(args.plot, args.force)
        if not args.checkpoint.is_file():
            raise FileNotFoundError(f"--checkpoint {args.checkpoint} does not exist")
        for folder in args.finetuned:
            if not (folder / "run.json").is_file():
                raise FileNotFoundError(f"--finetuned {folder}: no run.json (a tools/train_cls.py output folder)")
    torch.set_num_threads(1)  # the edge protocol, for eager PyTorch and onnxruntime alike
    run = run_tradeoff(args.data_dir, args.checkpoint, args.families, finetuned=args.finetuned, onnx=not args.no_onnx,
                       warmup=args.warmup, iters=args.iters, cost_batch_size=args.cost_batch_size,
                       cost_rounds=args.cost_rounds)
    root = repository_root()
    run["command"] = ["tools/tradeoff.py", *(sys.argv[1:] if argv is None else argv)]
    for key, path in (("weights", args.checkpoint), ("plot", args.plot)):
        if path is not None:  # repository-relative paths in committed results
            relative = str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)
            if key == "weights":
                run["weights"]["path"] = relative
            else:
                run["plot"] = relative
    if args.plot is not None:
        plot_tradeoff(run, args.plot)
    print("\n".join(tradeoff_section(run)))
    if args.json is not None:
        args.json.write_text(json.dumps(run, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
