"""Classification training and evaluation on timm's parts, for every tokenzoo family and any timm model.

``Trainer(config)`` checks everything a user can get wrong and builds the run (model, recipe, data, optimizer,
scheduler, EMA, checkpoint saver) before any training; ``Trainer.fit()`` trains. The pieces are timm's:
``ImageDataset`` + ``create_transform`` in a plain ``DataLoader``, ``Mixup`` / CutMix, ``LabelSmoothingCrossEntropy``
/ ``SoftTargetCrossEntropy``, ``create_optimizer_v2``, ``create_scheduler_v2`` (stepped per update),
``ModelEmaV3``, ``NativeScaler`` (AMP, only with CUDA) and ``CheckpointSaver``.

* Distributed: launched by ``torchrun`` (``WORLD_SIZE`` > 1 in the environment) the trainer joins the process group
  (NCCL on GPUs, Gloo on CPUs), wraps model + recipe (``recipes.TrainStep``) in DistributedDataParallel, gives each
  rank its share of the batches and of the validation images, and sums the validation counts, so top-1 is exact.
  ``batch_size`` is per process.
* Exact resume: every epoch reseeds torch, numpy and Python's random from (seed, epoch, rank) and the sampler's
  order depends only on (seed, epoch); the checkpoint holds model, optimizer, EMA and AMP scaler, and the scheduler is
  a function of the update count, so a run resumed from the checkpoint of epoch e computes exactly what the
  uninterrupted run computes from epoch e + 1 on. Checkpoints hold only tensors, numbers, strings and containers of
  them, plus the run settings as an ``argparse.Namespace`` of those (timm's format); they are read with
  ``torch.load(weights_only=True)`` with that one class allow-listed.
* Output folder: ``log.jsonl`` (one JSON object per line: the start settings, train steps every ``log_interval``,
  each epoch's validation, the end), ``last.pth.tar`` / ``checkpoint-<epoch>.pth.tar`` / ``model_best.pth.tar``
  (training checkpoints), ``model.pth`` (the final weights as a plain state dict, what ``--checkpoint`` and
  ``pretrained_cfg_overlay=dict(file=...)`` load; ``model_ema.pth`` beside it with EMA) and ``run.json`` (settings,
  data, machine, time, final metrics). An existing non-empty folder is refused unless resuming or ``force``.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np
import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.data import Mixup, resolve_model_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models import load_state_dict
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import CheckpointSaver, ModelEmaV3, NativeScaler, dispatch_clip_grad
from torch import nn
from tqdm import tqdm

from ..profiling import machine_info, validate_model_name
from .data import build_eval_loader, build_train_loader, check_image_folder, load_split, steps_per_epoch
from .recipes import DISTILL_TYPES, RECIPES, Recipe, RecipeSettings, TrainStep, build_recipe

__all__ = [
    "OnnxClassifier", "TrainConfig", "Trainer", "create_classifier", "data_config_for", "evaluate",
    "load_training_checkpoint", "vit_kwargs",
]

PathLike = Union[str, Path]
LOG_NAME, RUN_NAME, WEIGHTS_NAME, EMA_WEIGHTS_NAME = "log.jsonl", "run.json", "model.pth", "model_ema.pth"
LAST_CHECKPOINT = "last.pth.tar"


@dataclasses.dataclass
class TrainConfig:
    """Settings of a training run; defaults are DeiT's ImageNet recipe (timm's train.py names)."""

    data_dir: str
    output: str
    model: str = "deit_small_patch16_224"
    model_kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    num_classes: Optional[int] = None  # None: the number of class folders
    pretrained: bool = False
    checkpoint: Optional[str] = None  # initial weights (fine-tuning), loaded through the family's checkpoint filter
    resume: Optional[str] = None  # a training checkpoint, or "auto" for <output>/last.pth.tar
    force: bool = False
    train_split: str = "train"
    val_split: str = "val"
    # data and augmentation (timm's create_transform / Mixup)
    img_size: Optional[int] = None
    crop_pct: Optional[float] = None
    interpolation: Optional[str] = None
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    scale: Tuple[float, float] = (0.08, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    aa: Optional[str] = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    smoothing: float = 0.1
    # optimization
    epochs: int = 300
    batch_size: int = 128  # per process
    lr: Optional[float] = None  # None: 5e-4 * global batch / 512 (DeiT's rule)
    opt: str = "adamw"
    weight_decay: float = 0.05
    momentum: float = 0.9
    clip_grad: Optional[float] = None
    sched: str = "cosine"
    min_lr: float = 1e-5
    warmup_epochs: float = 5
    warmup_lr: float = 1e-6
    drop_path: float = 0.1
    drop: float = 0.0
    model_ema: bool = False
    model_ema_decay: float = 0.99996
    # recipe and distillation
    recipe: str = "none"
    keep_rate: Optional[float] = None
    keep_rate_start_epoch: float = 10.0
    keep_rate_epochs: float = 100.0
    mctf_r_teacher_max: int = 8
    mctf_weights: Tuple[float, float, float] = (1.0, 1.0, 3.0)
    mctf_confidence: float = 0.4
    lookup_sizes: Tuple[int, ...] = (3, 5, 7, 10)
    distill: str = "none"
    distill_alpha: float = 0.5
    teacher: Optional[str] = None
    teacher_checkpoint: Optional[str] = None
    teacher_kwargs: Optional[Dict[str, Any]] = None  # None: the student's ViT shape arguments (``vit_kwargs``)
    # runtime
    seed: int = 0
    workers: int = 4
    threads: Optional[int] = None  # torch intra-op threads; None: torch's default (all cores)
    amp: bool = False
    log_interval: int = 50
    keep_checkpoints: int = 2
    progress: bool = True

    def recipe_settings(self) -> RecipeSettings:
        return RecipeSettings(
            keep_rate=self.keep_rate, keep_rate_start_epoch=self.keep_rate_start_epoch,
            keep_rate_epochs=self.keep_rate_epochs, mctf_r_teacher_max=self.mctf_r_teacher_max,
            mctf_weights=tuple(self.mctf_weights), mctf_confidence=self.mctf_confidence,
            lookup_sizes=tuple(self.lookup_sizes), distill=self.distill, distill_alpha=self.distill_alpha,
            label_smoothing=self.smoothing, seed=self.seed)


def vit_kwargs(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The arguments of ``kwargs`` that shape a timm ``VisionTransformer`` (a family's own knobs dropped): what a dense
    teacher of a family model is built with by default."""
    import inspect

    from timm.models.vision_transformer import VisionTransformer

    allowed = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self", "block_fn"}
    return {key: value for key, value in kwargs.items() if key in allowed}


def _checkpoint_classes(path: PathLike) -> Optional[int]:
    state_dict = load_state_dict(str(path))  # timm's safe loader (weights_only); picks EMA weights when present
    head = state_dict.get("head.weight")
    return int(head.shape[0]) if head is not None and head.dim() == 2 else None


def create_classifier(name: str, num_classes: Optional[int] = None, pretrained: bool = False,
                      checkpoint: Optional[PathLike] = None, **kwargs: Any) -> nn.Module:
    """A timm/tokenzoo model, optionally with weights: a pretrained tag (``pretrained``, downloads) or a local file.

    A file goes through timm's pretrained mechanism (``pretrained_cfg_overlay=dict(file=...)``), so the family's
    checkpoint filter adapts it (DeiT / official checkpoints, position embeddings resampled to the model's grid).
    Its classifier is kept when its class count equals ``num_classes`` and dropped otherwise (fine-tuning on a new
    label set), as timm does for tags.

    Raises:
        ValueError: Unknown model name or arguments the model does not take.
        FileNotFoundError: A missing checkpoint.
    """
    validate_model_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist or is not a file")
        file_classes = _checkpoint_classes(checkpoint)
        overlay = dict(file=str(checkpoint), num_classes=file_classes if file_classes is not None else -1)
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    else:
        kwargs["pretrained"] = pretrained
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise ValueError(f"model {name!r} does not accept one of the arguments {sorted(kwargs)}: {e}") from e


def data_config_for(model: nn.Module, img_size: Optional[int] = None, **overrides: Any) -> Dict[str, Any]:
    """timm data config of a model at the size it was built for (timm's pretrained cfg keeps the tag's size), with
    the given non-None ``overrides`` (``crop_pct``, ``interpolation``, ``mean``, ``std``)."""
    config = resolve_model_data_config(model)
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if img_size is not None:
        config["input_size"] = (3, img_size, img_size)
    elif built is not None:
        config["input_size"] = (3, *built)
    config.update({key: tuple(value) if isinstance(value, list) else value
                   for key, value in overrides.items() if value is not None})
    return config


def load_training_checkpoint(path: PathLike) -> Dict[str, Any]:
    """A checkpoint written by the trainer, loaded safely: ``weights_only=True`` with only ``argparse.Namespace``
    (the run settings, primitives only) allow-listed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not {"state_dict", "optimizer", "epoch"} <= set(checkpoint):
        raise ValueError(f"{path} is not a training checkpoint of this trainer (state_dict, optimizer, epoch); "
                         f"to start from plain weights use --checkpoint")
    return checkpoint


class OnnxClassifier:
    """An ONNX classifier run by onnxruntime's CPU execution provider, called like the PyTorch model on batches."""

    def __init__(self, path: PathLike, threads: int = 1) -> None:
        """
        Args:
            path: The .onnx file (``tokenzoo.export`` writes them: one input (batch, 3, H, W), logits out).
            threads: onnxruntime intra-op threads (the edge session of ``tokenzoo.export.latency``).
        """
        from tokenzoo.export.latency import edge_session

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ONNX file {str(path)!r} does not exist")
        self.session = edge_session(path, threads)
        graph_input = self.session.get_inputs()[0]
        self.input_name = graph_input.name
        size = graph_input.shape[2:]
        self.img_size = tuple(size) if all(isinstance(s, int) for s in size) else None

    def eval(self) -> "OnnxClassifier":
        return self

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: images.numpy()})[0])


@torch.no_grad()
def evaluate(model: Any, loader: torch.utils.data.DataLoader, device: torch.device = torch.device("cpu"),
             amp: bool = False, distributed: bool = False, progress: bool = False) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (percent), mean cross-entropy and model throughput over a loader.

    Args:
        model: A classifier (put in eval mode here), or an ``OnnxClassifier``.
        loader: Batches of (images, class indices).
        device: Where the model runs.
        amp: float16 autocast (CUDA only).
        distributed: Sum the counts over the process group (each rank holds its share of the images).
        progress: Show a progress bar.

    Returns:
        ``top1``, ``top5`` (top-k with k = min(5, classes)), ``loss``, ``images`` and ``throughput`` (images per
        second of model time, data loading excluded).
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)  # correct@1, correct@5, images, summed loss
    seconds = 0.0
    autocast = torch.autocast("cuda", dtype=torch.float16) if amp else contextlib.nullcontext()
    for images, targets in tqdm(loader, desc="eval", leave=False, disable=not progress, dynamic_ncols=True):
        images, targets = images.to(device), targets.to(device)
        _sync(device)
        start = time.perf_counter()
        with autocast:
            logits = model(images)
        _sync(device)
        seconds += time.perf_counter() - start
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == targets[:, None]
        totals += torch.tensor([hits[:, 0].sum().item(), hits.any(dim=1).sum().item(), len(targets),
                                F.cross_entropy(logits, targets, reduction="sum").item()], dtype=torch.float64)
    if distributed:
        totals = totals.to(device)
        dist.all_reduce(totals)
        totals = totals.cpu()
    correct1, correct5, count, loss = totals.tolist()
    if count == 0:
        raise ValueError("the evaluation set is empty")
    return dict(top1=100.0 * correct1 / count, top5=100.0 * correct5 / count, loss=loss / count, images=int(count),
                throughput=count / seconds if seconds > 0 else float("nan"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seed_everything(seed: int, epoch: int, rank: int) -> None:
    """Reseed every generator a training epoch draws from (augmentation, mixup, dropout, MCTF's r'), from (seed,
    epoch, rank) only: what makes a resumed run exact."""
    value = (seed * 100_003 + epoch) * 1_009 + rank
    random.seed(value)
    np.random.seed(value % 2 ** 32)
    torch.manual_seed(value)


def _init_distributed() -> Tuple[int, int, int, torch.device]:
    """(rank, world size, local rank, device): joins the process group when launched by torchrun with several
    processes."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            device = torch.device("cuda", local_rank)
        else:
            device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size(), local_rank, device
    return 0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_positive(**values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{key.replace('_', '-')} must be a positive number, got {value!r}")


def _primitive(value: Any) -> Any:
    """Settings as JSON/weights_only-safe primitives (tuples become lists)."""
    if isinstance(value, dict):
        return {str(k): _primitive(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_primitive(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


class Trainer:
    """A checked, ready-to-run training run; see the module docstring."""

    def __init__(self, config: TrainConfig) -> None:
        """Check the settings and build the run; every user error is raised here, before any training.

        Raises:
            ValueError, FileNotFoundError, FileExistsError: What was wrong and what is allowed.
        """
        self.config = c = config
        self._check_settings()
        folders = check_image_folder(c.data_dir, [c.train_split, c.val_split])
        self.output = self._check_output()
        resume_path = self._resume_path()
        if c.threads is not None:
            _check_positive(threads=c.threads)
            torch.set_num_threads(c.threads)
        self.rank, self.world_size, self.local_rank, self.device = _init_distributed()
        self.is_main = self.rank == 0
        if c.amp and self.device.type != "cuda":
            raise ValueError("--amp (float16 mixed precision) needs a CUDA GPU; this machine has none")

        # the data first: the class count comes from the folders
        class_count = len([p for p in folders[c.train_split].iterdir() if p.is_dir()])
        num_classes = c.num_classes or class_count
        if num_classes != class_count:
            raise ValueError(f"--num-classes {num_classes} but {folders[c.train_split]} has {class_count} classes")
        model_kwargs = dict(c.model_kwargs)
        if c.img_size is not None:
            model_kwargs["img_size"] = c.img_size
        model_kwargs.setdefault("drop_path_rate", c.drop_path)
        model_kwargs.setdefault("drop_rate", c.drop)
        self.model = create_classifier(c.model, num_classes, c.pretrained, c.checkpoint, **model_kwargs)
        self.recipe: Recipe = build_recipe(c.recipe, self.model, c.recipe_settings())
        self.teacher = self._build_teacher(num_classes, model_kwargs)
        self.data_config = data_config_for(self.model, c.img_size, crop_pct=c.crop_pct,
                                           interpolation=c.interpolation, mean=c.mean, std=c.std)
        augment = dict(scale=tuple(c.scale), ratio=tuple(c.ratio), hflip=c.hflip,
                       color_jitter=c.color_jitter or None, auto_augment=c.aa or None, re_prob=c.reprob)
        self.train_set = load_split(folders[c.train_split], self.data_config, True, augment)
        self.val_set = load_split(folders[c.val_split], self.data_config, False)
        pin = self.device.type == "cuda"
        self.train_loader = build_train_loader(self.train_set, c.batch_size, c.seed, c.workers, self.world_size,
                                               self.rank, pin)
        self.val_loader = build_eval_loader(self.val_set, c.batch_size, c.workers, self.world_size, self.rank, pin)
        self.steps_per_epoch = steps_per_epoch(self.train_loader)
        self.mixup = None
        if c.mixup > 0 or c.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=c.mixup, cutmix_alpha=c.cutmix, prob=c.mixup_prob,
                               switch_prob=c.mixup_switch_prob, label_smoothing=c.smoothing, num_classes=num_classes)
            criterion: nn.Module = SoftTargetCrossEntropy()
        elif c.smoothing > 0:
            criterion = LabelSmoothingCrossEntropy(smoothing=c.smoothing)
        else:
            criterion = nn.CrossEntropyLoss()

        self.recipe.prepare(self.model)  # what trains (Sparsifiner's phases), before the optimizer takes it
        self.model.to(self.device)
        self.lr = c.lr if c.lr is not None else 5e-4 * c.batch_size * self.world_size / 512
        self.optimizer = create_optimizer_v2(self.model, opt=c.opt, lr=self.lr, weight_decay=c.weight_decay,
                                             momentum=c.momentum)
        self.scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=c.sched, num_epochs=c.epochs, warmup_epochs=c.warmup_epochs,
            warmup_lr=c.warmup_lr, min_lr=c.min_lr, step_on_epochs=False, updates_per_epoch=self.steps_per_epoch)
        self.loss_scaler = NativeScaler() if c.amp else None
        self.ema = ModelEmaV3(self.model, decay=c.model_ema_decay) if c.model_ema else None
        self.step_module: nn.Module = TrainStep(self.model, self.recipe, criterion)
        if self.world_size > 1:
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.local_rank] if self.device.type == "cuda" else None)
        self.settings = argparse.Namespace(**_primitive(dataclasses.asdict(c)))
        self.saver = CheckpointSaver(self.model, self.optimizer, args=self.settings, model_ema=self.ema,
                                     amp_scaler=self.loss_scaler, checkpoint_dir=str(self.output),
                                     recovery_dir=str(self.output), max_history=c.keep_checkpoints)
        self.start_epoch = 0
        if resume_path is not None:
            self._resume(resume_path)

    # ------------------------------------------------------------------------------------------------------ checks
    def _check_settings(self) -> None:
        c = self.config
        _check_positive(epochs=c.epochs, batch_size=c.batch_size, log_interval=c.log_interval,
                        keep_checkpoints=c.keep_checkpoints)
        for key in ("epochs", "batch_size", "log_interval", "keep_checkpoints", "workers", "seed"):
            value = getattr(c, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"--{key.replace('_', '-')} must be an int, got {value!r}")
        if c.lr is not None:
            _check_positive(lr=c.lr)
        if c.recipe not in RECIPES:
            raise ValueError(f"unknown recipe {c.recipe!r}; allowed: {', '.join(RECIPES)}")
        if c.distill not in DISTILL_TYPES:
            raise ValueError(f"--distill must be one of {DISTILL_TYPES}, got {c.distill!r}")
        if c.pretrained and c.checkpoint:
            raise ValueError("--pretrained (the tag's weights) and --checkpoint FILE both give initial weights: pass "
                             "one")
        validate_model_name(c.model)
        if c.teacher is not None:
            validate_model_name(c.teacher)
        for key in ("checkpoint", "teacher_checkpoint"):
            path = getattr(c, key)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"--{key.replace('_', '-')} {path!r} does not exist or is not a file")
        for key, value in (("scale", c.scale), ("ratio", c.ratio)):
            if len(value) != 2 or not 0 < value[0] <= value[1]:
                raise ValueError(f"--{key} takes two numbers 0 < low <= high, got {list(value)}")

    def _check_output(self) -> Path:
        c, out = self.config, Path(self.config.output)
        if out.exists() and not out.is_dir():
            raise NotADirectoryError(f"--output {str(out)!r} exists and is not a folder")
        if out.is_dir() and any(out.iterdir()) and not (c.resume or c.force):
            raise FileExistsError(f"output folder {str(out)!r} is not empty; choose a new one, resume the run in it "
                                  f"(--resume), or pass --force to overwrite it")
        return out

    def _resume_path(self) -> Optional[Path]:
        c = self.config
        if c.resume is None:
            return None
        path = Path(c.output) / LAST_CHECKPOINT if c.resume == "auto" else Path(c.resume)
        if not path.is_file():
            raise FileNotFoundError(f"--resume: checkpoint {str(path)!r} does not exist")
        return path

    def _build_teacher(self, num_classes: int, model_kwargs: Dict[str, Any]) -> Optional[nn.Module]:
        c = self.config
        if not self.recipe.uses_teacher:
            if c.teacher is not None:
                raise ValueError(f"--teacher is only used by --distill hard and the Sparsifiner recipes; recipe "
                                 f"{c.recipe!r} with --distill {c.distill} does not use it")
            return None
        if c.teacher is None:
            raise ValueError(f"recipe {c.recipe!r} with --distill {c.distill} needs a teacher: --teacher NAME "
                             f"(with --teacher-checkpoint FILE or a pretrained tag)")
        kwargs = dict(c.teacher_kwargs) if c.teacher_kwargs is not None else vit_kwargs(model_kwargs)
        kwargs.pop("drop_path_rate", None)
        teacher = create_classifier(c.teacher, num_classes, c.teacher_checkpoint is None, c.teacher_checkpoint,
                                    **kwargs)
        teacher.requires_grad_(False)
        return teacher.to(self.device).eval()

    # ------------------------------------------------------------------------------------------------------ resume
    def _resume(self, path: Path) -> None:
        checkpoint = load_training_checkpoint(path)
        arch = checkpoint.get("arch")
        if arch != self.config.model:
            raise ValueError(f"--resume {path}: the checkpoint was trained as {arch!r}, this run builds "
                             f"{self.config.model!r}")
        self.model.load_state_dict(checkpoint["state_dict"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        if self.ema is not None:
            if "state_dict_ema" not in checkpoint:
                raise ValueError(f"--resume {path}: the checkpoint has no EMA weights; resume without --model-ema")
            self.ema.module.load_state_dict(checkpoint["state_dict_ema"])
        if self.loss_scaler is not None and NativeScaler.state_dict_key in checkpoint:
            self.loss_scaler.load_state_dict(checkpoint[NativeScaler.state_dict_key])
        if "saver" in checkpoint and Path(path).parent.resolve() == self.output.resolve():
            self.saver.load_state_dict(checkpoint["saver"])
        self.start_epoch = int(checkpoint["epoch"]) + 1
        self.resumed_from = str(path)

    # ---------------------------------------------------------------------------------------------------- training
    def _log(self, event: str, **values: Any) -> None:
        if not self.is_main:
            return
        record = dict(event=event, time=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      **values)
        with open(self.output / LOG_NAME, "a") as f:
            f.write(json.dumps(_primitive(record)) + "\n")

    def _prepare_output(self) -> None:
        if not self.is_main:
            return
        self.output.mkdir(parents=True, exist_ok=True)
        if self.config.force and not self.config.resume:
            for name in (LOG_NAME, RUN_NAME, WEIGHTS_NAME, EMA_WEIGHTS_NAME):
                (self.output / name).unlink(missing_ok=True)

    def fit(self) -> Dict[str, Any]:
        """Train from ``start_epoch`` to ``epochs``, validating and checkpointing after each epoch.

        Returns:
            The run summary written to ``run.json`` (final and best validation metrics, time).
        """
        c = self.config
        self._prepare_output()
        if self.world_size > 1:
            dist.barrier()
        self._log("start", settings=vars(self.settings), start_epoch=self.start_epoch, world_size=self.world_size,
                  steps_per_epoch=self.steps_per_epoch, lr=self.lr, data_config=self.data_config,
                  train_images=len(self.train_set), val_images=len(self.val_set),
                  resumed_from=getattr(self, "resumed_from", None))
        # the scheduler is a function of the update count: put it where an uninterrupted run would be
        self.scheduler.step_update(num_updates=self.start_epoch * self.steps_per_epoch)
        wall_start, cpu_start = time.perf_counter(), time.process_time()
        metrics: Dict[str, Any] = {}
        for epoch in range(self.start_epoch, c.epochs):
            train_stats = self._train_epoch(epoch)
            self.scheduler.step(epoch + 1)
            metrics = self._validate()
            self._log("epoch", epoch=epoch, **train_stats, **metrics)
            if self.is_main:
                ranking = metrics["ema_top1"] if self.ema is not None else metrics["top1"]
                self.saver.save_checkpoint(epoch, metric=ranking)
        summary = dict(final=metrics, best_top1=self.saver.best_metric, best_epoch=self.saver.best_epoch,
                       wall_seconds=time.perf_counter() - wall_start, cpu_seconds=time.process_time() - cpu_start)
        if self.is_main:
            torch.save(self.model.state_dict(), self.output / WEIGHTS_NAME)
            if self.ema is not None:
                torch.save(self.ema.module.state_dict(), self.output / EMA_WEIGHTS_NAME)
            run = dict(command=list(sys.argv), settings=vars(self.settings), data_config=self.data_config,
                       train_images=len(self.train_set), val_images=len(self.val_set),
                       classes=self.train_set.reader.class_to_idx if hasattr(self.train_set, "reader") else None,
                       world_size=self.world_size, machine=machine_info(), **summary)
            (self.output / RUN_NAME).write_text(json.dumps(_primitive(run), indent=1) + "\n")
        self._log("end", **summary)
        if self.world_size > 1:
            dist.barrier()
        return summary

    def _train_epoch(self, epoch: int) -> Dict[str, float]:
        c, steps = self.config, self.steps_per_epoch
        _seed_everything(c.seed, epoch, self.rank)
        self.train_loader.sampler.set_epoch(epoch)
        self.model.train()
        autocast = torch.autocast("cuda", dtype=torch.float16) if c.amp else contextlib.nullcontext()
        wall, cpu = time.perf_counter(), time.process_time()
        loss_sum, count = 0.0, 0
        bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{c.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.is_main and c.progress))
        for i, (images, targets) in enumerate(bar):
            step = epoch * steps + i
            images, targets = images.to(self.device), targets.to(self.device)
            knobs = self.recipe.before_step(self.model, epoch + i / steps, step)
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            teacher = self.recipe.teacher_targets(self.teacher, images) if self.teacher is not None else None
            with autocast:
                loss, parts = self.step_module(images, targets, teacher)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step}; lower --lr")
            self._backward_step(loss)
            if self.ema is not None:
                self.ema.update(self.model, step=step + 1)
            self.scheduler.step_update(num_updates=step + 1)
            loss_sum, count = loss_sum + loss.item(), count + 1
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}")
            if (step + 1) % c.log_interval == 0 or i == 0:
                self._log("train", epoch=epoch, step=step, loss=loss.item(),
                          lr=self.optimizer.param_groups[0]["lr"], **knobs,
                          **{key: float(value) for key, value in parts.items()})
        return dict(train_loss=loss_sum / max(count, 1), lr=self.optimizer.param_groups[0]["lr"],
                    epoch_wall_seconds=time.perf_counter() - wall, epoch_cpu_seconds=time.process_time() - cpu)

    def _backward_step(self, loss: torch.Tensor) -> None:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer.zero_grad(set_to_none=True)
        if self.loss_scaler is not None:
            self.loss_scaler(loss, self.optimizer, clip_grad=c.clip_grad, parameters=params)
            return
        loss.backward()
        if c.clip_grad is not None:
            dispatch_clip_grad(params, c.clip_grad)
        self.optimizer.step()

    def _validate(self) -> Dict[str, float]:
        c = self.config
        self.recipe.for_eval(self.model)
        distributed = self.world_size > 1
        metrics = evaluate(self.model, self.val_loader, self.device, c.amp, distributed)
        out = dict(top1=metrics["top1"], top5=metrics["top5"], val_loss=metrics["loss"])
        if self.ema is not None:
            self.recipe.for_eval(self.ema.module)
            ema = evaluate(self.ema.module, self.val_loader, self.device, c.amp, distributed)
            out.update(ema_top1=ema["top1"], ema_top5=ema["top5"])
        return out
