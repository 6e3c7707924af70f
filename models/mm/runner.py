"""Configs to mmengine Runners, models and backbones: what ``tools/train.py``, ``tools/test.py`` and the tests share.

The task is read from the config's ``default_scope``: ``mmdet`` (detection) or ``mmseg`` (segmentation). mmengine
switches every registry to that scope, and the TokenZoo modules, registered in the root registries, are found from
either (a scope's registry falls back to its parent, the root).
"""
import copy
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from mmengine.config import Config
from mmengine.registry import MODELS, DefaultScope
from mmengine.runner import Runner
from torch import nn

from .backbone import TokenZooViT

__all__ = ["LAUNCHERS", "TASKS", "build_backbone", "build_model", "build_runner", "check_data", "load_config",
           "read_config", "set_data_root"]

TASKS = ("mmdet", "mmseg")  # default_scope of detection and segmentation configs
LOADERS = ("train_dataloader", "val_dataloader", "test_dataloader")
EVALUATORS = ("val_evaluator", "test_evaluator")
LAUNCHERS = ("none", "pytorch", "slurm", "mpi")
ConfigLike = Union[str, os.PathLike, Config]


def read_config(config: ConfigLike, cfg_options: Optional[Dict[str, Any]] = None) -> Config:
    """A config with ``cfg_options`` merged, checked to be a detection or segmentation config.

    Raises:
        FileNotFoundError: The config file does not exist.
        ValueError: Its ``default_scope`` is neither ``mmdet`` nor ``mmseg``.
    """
    if isinstance(config, Config):
        cfg = copy.deepcopy(config)
    else:
        if not Path(config).is_file():
            raise FileNotFoundError(f"config {str(config)!r} does not exist")
        cfg = Config.fromfile(str(config))
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    if cfg.get("default_scope") not in TASKS:
        raise ValueError(f"config {getattr(cfg, 'filename', None) or config!r} has default_scope "
                         f"{cfg.get('default_scope')!r}; tokenzoo runs {', '.join(map(repr, TASKS))}")
    return cfg


def load_config(
        config: ConfigLike,
        cfg_options: Optional[Dict[str, Any]] = None,
        work_dir: Optional[Union[str, os.PathLike]] = None,
        resume: Optional[str] = None,
        load_from: Optional[Union[str, os.PathLike]] = None,
        amp: bool = False,
        launcher: str = "none",
        data_root: Optional[Union[str, os.PathLike]] = None,
) -> Config:
    """Read a config and apply the command-line settings of train.py / test.py.

    Args:
        config: Path of a config file, or a Config (copied, not changed).
        cfg_options: ``key.sub=value`` overrides, merged first.
        work_dir: Output folder; the config's ``work_dir``, else ``work_dirs/<config name>``, when None.
        resume: None (start fresh), ``"auto"`` (the latest checkpoint in the work dir) or a checkpoint path.
        load_from: Checkpoint whose weights are loaded before training or testing (not the training state).
        amp: Mixed precision (AmpOptimWrapper; needs a GPU).
        launcher: ``none`` for one process, ``pytorch`` under torchrun, ``slurm`` or ``mpi``.
        data_root: Where the data set is, in place of the config's ``data_root`` (see ``set_data_root``).

    Returns:
        The config, ready for ``build_runner``.

    Raises:
        FileNotFoundError: The config, the resume checkpoint or ``load_from`` does not exist.
        ValueError: Unknown task scope or launcher, ``resume`` together with ``load_from``, ``amp`` without a GPU.
    """
    cfg = read_config(config, cfg_options)
    if data_root is not None:
        set_data_root(cfg, data_root)
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {LAUNCHERS}, got {launcher!r}")
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = str(work_dir)
    elif cfg.get("work_dir") is None:
        name = Path(cfg.filename).stem if cfg.filename else "tokenzoo"
        cfg.work_dir = str(Path("work_dirs") / name)

    if resume is not None and load_from is not None:
        raise ValueError("give either resume (continue a run: weights, optimizer, iteration) or load_from (weights "
                         "only), not both")
    for path in (load_from, None if resume in (None, "auto") else resume):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    if load_from is not None:
        cfg.load_from = str(load_from)
    if resume is not None:
        # mmengine: resume=True with load_from=None finds the last checkpoint of the work dir by itself.
        cfg.resume = True
        cfg.load_from = None if resume == "auto" else str(resume)

    if amp:
        if not torch.cuda.is_available():
            raise ValueError("--amp needs a GPU (mmengine's AmpOptimWrapper runs on CUDA/NPU/MLU only)")
        cfg.optim_wrapper.type = "AmpOptimWrapper"
        cfg.optim_wrapper.setdefault("loss_scale", "dynamic")
    return cfg


def _datasets(loader: Any) -> List[Any]:
    """The dataset configs of a dataloader, through wrappers (RepeatDataset, ConcatDataset, ...)."""
    found, stack = [], [loader.get("dataset")]
    while stack:
        dataset = stack.pop()
        if isinstance(dataset, (list, tuple)):
            stack.extend(dataset)
        elif isinstance(dataset, dict):
            inner = dataset.get("dataset", dataset.get("datasets"))
            if inner is not None:
                stack.append(inner)
            else:
                found.append(dataset)
    return found


def set_data_root(cfg: Config, data_root: Union[str, os.PathLike]) -> None:
    """Move a config's data set: the ``data_root`` of every dataloader's dataset and the evaluators' annotation files.

    Each dataset fragment in configs/_base_/datasets names its location once (``data_root``); the loaders and the
    COCO evaluators' ``ann_file`` (a path under it) are rewritten from that old root to the new one.
    """
    old_root = cfg.get("data_root")
    if old_root is None:
        raise ValueError(f"config {cfg.filename!r} names no data_root, so --data-root has nothing to replace")
    new_root = str(data_root)
    if old_root.endswith("/") and not new_root.endswith("/"):
        new_root += "/"  # the fragments join some paths by concatenation
    cfg.data_root = new_root
    for key in LOADERS:
        for dataset in _datasets(cfg.get(key) or {}):
            if dataset.get("data_root") == old_root:
                dataset["data_root"] = new_root
    for key in EVALUATORS:
        evaluator = cfg.get(key)
        if isinstance(evaluator, dict) and str(evaluator.get("ann_file", "")).startswith(old_root):
            evaluator["ann_file"] = new_root + evaluator["ann_file"][len(old_root):]


def check_data(cfg: Config, loaders: Sequence[str]) -> None:
    """Check, before a Runner is built, that the data of the given dataloaders are where the config says.

    Raises:
        FileNotFoundError: A dataset's root, annotation file or image folder is missing (with the fix).
    """
    def missing(kind: str, path: Path) -> FileNotFoundError:
        return FileNotFoundError(
            f"{kind} {str(path)!r} of {cfg.filename or 'the config'} does not exist: put the data set there (see the "
            f"README, 'Detection and segmentation'; tools/make_synthetic_data.py writes the synthetic sets) or pass "
            f"--data-root DIR")

    for key in loaders:
        for dataset in _datasets(cfg.get(key) or {}):
            root = Path(dataset.get("data_root") or ".")
            if not root.is_dir():
                raise missing(f"{key} data_root", root)
            ann_file = dataset.get("ann_file")
            if ann_file and not (root / ann_file).is_file():
                raise missing(f"{key} ann_file", root / ann_file)
            for folder in (dataset.get("data_prefix") or {}).values():
                if folder and not (root / folder).is_dir():
                    raise missing(f"{key} image/label folder", root / folder)


def build_runner(cfg: Config) -> Runner:
    """An mmengine Runner for a config from ``load_config``."""
    return Runner.from_cfg(cfg)


def build_model(config: ConfigLike, cfg_options: Optional[Dict[str, Any]] = None) -> nn.Module:
    """The detector or segmentor of a config, built in the config's scope, with random (unloaded) weights."""
    cfg = read_config(config, cfg_options)
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(cfg.model)


def build_backbone(config: ConfigLike, cfg_options: Optional[Dict[str, Any]] = None) -> TokenZooViT:
    """The backbone of a config alone, in eval mode with random weights, for dense-prediction benchmarks.

    The backbone's ``img_size`` is the size the config trains at (1024 for the Mask R-CNN configs, 512 for UperNet).
    The Pretrained init is dropped: timing needs no weights, and the file may not exist on the benchmark machine.

    Args:
        config: Path of a config file, or a Config.
        cfg_options: ``key.sub=value`` overrides (e.g. ``{"model.backbone.model_kwargs.keep_rate": 0.5}``).
    """
    cfg = read_config(config, cfg_options)
    backbone_cfg = dict(cfg.model.backbone, init_cfg=None)
    if backbone_cfg.get("type") != "TokenZooViT":
        raise ValueError(f"config backbone type is {backbone_cfg.get('type')!r}, not 'TokenZooViT'")
    return MODELS.build(backbone_cfg).eval()
