"""Train or fine-tune a classifier (any tokenzoo family or timm model) on an ImageFolder, with each paper's recipe.

A thin command line over ``tokenzoo.classification.Trainer`` (timm's loaders, transforms, Mixup/CutMix, label
smoothing, optimizers, schedulers, EMA and checkpoint saver). Defaults are DeiT's ImageNet recipe; ``--recipe``
adds a paper's training method with the paper's defaults (``tokenzoo.classification.recipes``). The data folder
holds ``train/<class>/<image>`` and ``val/<class>/<image>``. Examples::

    # the digits reference model (one process, 2 cores; tools/results/digits/README.md has the exact command)
    python tools/train_cls.py --data-dir data/digits --output work_dirs/digits_ref --model deit_tiny_patch16_224 \
        --model-kwargs img_size=56 patch_size=4 embed_dim=96 depth=12 num_heads=3 init_values=1e-4 --epochs 12 ...
    # EViT fine-tuned from DeiT-S with its keep-rate warm-up, 8 GPUs
    torchrun --nproc_per_node 8 tools/train_cls.py --data-dir /data/imagenet --output work_dirs/evit_s \
        --model evit_small --pretrained --recipe evit
    python tools/train_cls.py ... --resume              # continue the run in --output from its last checkpoint

Writes ``--output``: ``log.jsonl`` (JSON lines: settings, train steps, one validation per epoch), training
checkpoints, ``model.pth`` (final weights) and ``run.json``. An existing non-empty output folder is refused unless
``--resume`` or ``--force``.
"""
import argparse
from typing import Optional, Sequence

from tokenzoo.classification import DISTILL_TYPES, RECIPES, TrainConfig, Trainer
from tokenzoo.cli import parse_model_kwargs, user_errors

_DEFAULTS = TrainConfig(data_dir="", output="")


def build_parser() -> argparse.ArgumentParser:
    d = _DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data and output")
    data.add_argument("--data-dir", required=True, help="ImageFolder root with train/ and val/ class folders")
    data.add_argument("--output", required=True, help="folder for the log, checkpoints and final weights")
    data.add_argument("--train-split", default=d.train_split, help=f"training subfolder (default: {d.train_split})")
    data.add_argument("--val-split", default=d.val_split, help=f"validation subfolder (default: {d.val_split})")
    data.add_argument("--force", action="store_true", help="write into a non-empty --output folder")
    data.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                      help="continue a run: alone, from --output's last checkpoint; or from CHECKPOINT")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default=d.model, help=f"timm/tokenzoo model name (default: {d.model})")
    model.add_argument("--model-kwargs", nargs="+", metavar="KWARGS",
                       help="constructor arguments: key=value pairs or one JSON object, e.g. keep_rate=0.7")
    model.add_argument("--num-classes", type=int, help="classes (default: the number of class folders)")
    model.add_argument("--pretrained", action="store_true",
                       help="start from the model's pretrained tag (e.g. evit_small.deit_in1k: DeiT-S; downloads)")
    model.add_argument("--checkpoint", metavar="FILE",
                       help="start from these weights (DeiT, official or tokenzoo checkpoints; classifier dropped "
                            "when its class count differs)")
    model.add_argument("--img-size", type=int, help="input size (default: the model's)")
    model.add_argument("--drop-path", type=float, default=d.drop_path, help=f"(default: {d.drop_path})")
    model.add_argument("--drop", type=float, default=d.drop, help=f"dropout before the head (default: {d.drop})")

    aug = parser.add_argument_group("augmentation (timm)")
    aug.add_argument("--crop-pct", type=float, help="eval crop fraction (default: the model's, e.g. 0.875)")
    aug.add_argument("--interpolation", help="resize interpolation (default: the model's)")
    aug.add_argument("--mean", type=float, nargs=3, help="normalization mean (default: the model's)")
    aug.add_argument("--std", type=float, nargs=3, help="normalization std (default: the model's)")
    aug.add_argument("--scale", type=float, nargs=2, default=d.scale, help=f"random resized crop scale "
                     f"(default: {d.scale[0]} {d.scale[1]})")
    aug.add_argument("--ratio", type=float, nargs=2, default=d.ratio,
                     help="random resized crop aspect ratio (default: 3/4 4/3)")
    aug.add_argument("--hflip", type=float, default=d.hflip, help=f"horizontal flip probability (default: {d.hflip})")
    aug.add_argument("--color-jitter", type=float, default=d.color_jitter, help=f"(default: {d.color_jitter}; 0: off)")
    aug.add_argument("--aa", default=d.aa, help=f"timm auto-augment policy (default: {d.aa}; 'none': off)")
    aug.add_argument("--reprob", type=float, default=d.reprob, help=f"random erasing probability (default: {d.reprob})")
    aug.add_argument("--mixup", type=float, default=d.mixup, help=f"mixup alpha (default: {d.mixup}; 0: off)")
    aug.add_argument("--cutmix", type=float, default=d.cutmix, help=f"cutmix alpha (default: {d.cutmix}; 0: off)")
    aug.add_argument("--mixup-prob", type=float, default=d.mixup_prob, help=f"(default: {d.mixup_prob})")
    aug.add_argument("--mixup-switch-prob", type=float, default=d.mixup_switch_prob,
                     help=f"(default: {d.mixup_switch_prob})")
    aug.add_argument("--smoothing", type=float, default=d.smoothing, help=f"label smoothing (default: {d.smoothing})")

    opt = parser.add_argument_group("optimization")
    opt.add_argument("--epochs", type=int, default=d.epochs, help=f"(default: {d.epochs})")
    opt.add_argument("--batch-size", type=int, default=d.batch_size,
                     help=f"images per process and step (default: {d.batch_size})")
    opt.add_argument("--lr", type=float, help="peak learning rate (default: 5e-4 * global batch / 512, DeiT's)")
    opt.add_argument("--opt", default=d.opt, help=f"timm optimizer (default: {d.opt})")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help=f"(default: {d.weight_decay})")
    opt.add_argument("--momentum", type=float, default=d.momentum, help=f"(SGD; default: {d.momentum})")
    opt.add_argument("--clip-grad", type=float, help="gradient norm clipping (default: off)")
    opt.add_argument("--sched", default=d.sched, help=f"timm scheduler, stepped per update (default: {d.sched})")
    opt.add_argument("--min-lr", type=float, default=d.min_lr, help=f"(default: {d.min_lr})")
    opt.add_argument("--warmup-epochs", type=float, default=d.warmup_epochs, help=f"(default: {d.warmup_epochs})")
    opt.add_argument("--warmup-lr", type=float, default=d.warmup_lr, help=f"(default: {d.warmup_lr})")
    opt.add_argument("--model-ema", action="store_true", help="keep an EMA of the weights (timm ModelEmaV3)")
    opt.add_argument("--model-ema-decay", type=float, default=d.model_ema_decay,
                     help=f"(default: {d.model_ema_decay})")

    recipe = parser.add_argument_group("paper recipes and distillation")
    recipe.add_argument("--recipe", default=d.recipe, help=f"one of {', '.join(RECIPES)} (default: {d.recipe})")
    recipe.add_argument("--keep-rate", type=float,
                        help="evit: the keep rate the warm-up ends at, in (0, 1] (default: the model's)")
    recipe.add_argument("--keep-rate-start-epoch", type=float, default=d.keep_rate_start_epoch,
                        help=f"evit: epochs at keep rate 1 (default: {d.keep_rate_start_epoch}, official)")
    recipe.add_argument("--keep-rate-epochs", type=float, default=d.keep_rate_epochs,
                        help=f"evit: epochs of the cosine down to the keep rate (default: {d.keep_rate_epochs})")
    recipe.add_argument("--mctf-r-teacher-max", type=int, default=d.mctf_r_teacher_max,
                        help=f"mctf: the teacher's r' is drawn below this (default: {d.mctf_r_teacher_max})")
    recipe.add_argument("--mctf-weights", type=float, nargs=3, default=d.mctf_weights,
                        help="mctf: weights of student CE, teacher CE, consistency (default: 1 1 3)")
    recipe.add_argument("--mctf-confidence", type=float, default=d.mctf_confidence,
                        help=f"mctf: consistency only above this confidence (default: {d.mctf_confidence})")
    recipe.add_argument("--lookup-sizes", type=int, nargs="+", default=d.lookup_sizes,
                        help="lookupvit: compressed grid sides drawn per step (default: 3 5 7 10)")
    recipe.add_argument("--distill", default=d.distill, help=f"one of {', '.join(DISTILL_TYPES)}: DeiT's hard "
                        f"distillation through the classification head (default: {d.distill})")
    recipe.add_argument("--distill-alpha", type=float, default=d.distill_alpha,
                        help=f"weight of the distillation term (default: {d.distill_alpha})")
    recipe.add_argument("--teacher", help="teacher model (timm name) for --distill and the Sparsifiner recipes")
    recipe.add_argument("--teacher-checkpoint", metavar="FILE",
                        help="teacher weights (default: the teacher's pretrained tag)")
    recipe.add_argument("--teacher-kwargs", nargs="+", metavar="KWARGS",
                        help="teacher constructor arguments (default: the ViT shape arguments of --model-kwargs)")

    run = parser.add_argument_group("runtime")
    run.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    run.add_argument("--workers", type=int, default=d.workers, help=f"data loader processes (default: {d.workers})")
    run.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, all cores)")
    run.add_argument("--amp", action="store_true", help="float16 mixed precision (CUDA only)")
    run.add_argument("--log-interval", type=int, default=d.log_interval,
                     help=f"log a train step every N steps (default: {d.log_interval})")
    run.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                     help=f"epoch checkpoints kept beside last and best (default: {d.keep_checkpoints})")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of parsed arguments (ValueError for malformed --model-kwargs / --teacher-kwargs)."""
    values = {key: value for key, value in vars(args).items() if key != "no_progress"}
    values["model_kwargs"] = parse_model_kwargs(args.model_kwargs)
    values["teacher_kwargs"] = (parse_model_kwargs(args.teacher_kwargs, "--teacher-kwargs") if args.teacher_kwargs
                                else None)
    values["aa"] = None if args.aa in (None, "", "none") else args.aa
    for key in ("scale", "ratio", "mctf_weights", "lookup_sizes", "mean", "std"):
        if values[key] is not None:
            values[key] = tuple(values[key])
    return TrainConfig(progress=not args.no_progress, **values)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    with user_errors(parser):  # everything a user can get wrong is checked before the first step
        trainer = Trainer(config_from_args(args))
    summary = trainer.fit()
    if trainer.is_main:
        final = summary["final"]
        print(f"done: val top-1 {final.get('top1', float('nan')):.2f}% (best {summary['best_top1']}), "
              f"{summary['wall_seconds']:.0f} s; weights in {trainer.output}")


if __name__ == "__main__":
    main()
