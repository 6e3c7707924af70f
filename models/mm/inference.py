"""One image in, a picture of a detector's or segmentor's predictions out (``tools/infer.py`` is its command line)."""
import os
import time
from pathlib import Path
from typing import Any, Dict, Optional, Union

import mmcv
from mmengine.registry import VISUALIZERS, DefaultScope

from .runner import ConfigLike, read_config

__all__ = ["IMAGE_SUFFIXES", "check_infer_args", "infer_image"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
PathLike = Union[str, os.PathLike]


def check_infer_args(checkpoint: PathLike, image: PathLike, out_file: PathLike, force: bool = False) -> Path:
    """Check ``infer_image``'s files before any model is built; returns ``out_file`` as a Path.

    Raises:
        FileExistsError: ``out_file`` exists and ``force`` is False.
        FileNotFoundError: The image or the checkpoint does not exist.
        ValueError: Unsupported output suffix.
    """
    out_file = Path(out_file)
    if out_file.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"out_file {str(out_file)!r} must end with one of {', '.join(IMAGE_SUFFIXES)}")
    if out_file.exists() and not force:
        raise FileExistsError(f"{str(out_file)!r} exists; pass --force (force=True) to overwrite it")
    for kind, path in (("image", image), ("checkpoint", checkpoint)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{kind} {str(path)!r} does not exist")
    return out_file


def infer_image(
        config: ConfigLike,
        checkpoint: PathLike,
        image: PathLike,
        out_file: PathLike,
        device: str = "cpu",
        score_thr: float = 0.3,
        force: bool = False,
        cfg_options: Optional[Dict[str, Any]] = None,
) -> Path:
    """Run a trained model of a config on one image and draw its predictions.

    Detection configs draw boxes and masks scoring at least ``score_thr``; segmentation configs draw the label map.

    Args:
        config: Config file or Config the checkpoint was trained with.
        checkpoint: A checkpoint written by the Runner (tools/train.py).
        image: Input image file.
        out_file: Output picture (.png, .jpg, .jpeg or .bmp); its folder is created.
        device: Torch device, e.g. ``cpu`` or ``cuda:0``.
        score_thr: Lowest detection score drawn (detection only).
        force: Overwrite ``out_file`` if it exists.
        cfg_options: ``key.sub=value`` config overrides.

    Returns:
        The written picture's path.

    Raises:
        FileExistsError: ``out_file`` exists and ``force`` is False.
        FileNotFoundError: The image or the checkpoint does not exist.
        ValueError: Unsupported output suffix, or a config that is not mmdet/mmseg.
    """
    out_file = check_infer_args(checkpoint, image, out_file, force)
    cfg = read_config(config, cfg_options)
    cfg.model.backbone.init_cfg = None  # the checkpoint holds every weight; no pretrained file is needed

    if cfg.default_scope == "mmdet":
        from mmdet.apis import inference_detector, init_detector

        model = init_detector(cfg, str(checkpoint), device=device)
        result = inference_detector(model, str(image))
        draw_args = dict(pred_score_thr=score_thr)
    else:
        from mmseg.apis import inference_model, init_model

        cfg.test_pipeline = cfg.test_dataloader.dataset.pipeline  # where mmseg's inference looks for it
        model = init_model(cfg, str(checkpoint), device=device)
        result = inference_model(model, str(image))
        draw_args = {}

    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        # A fresh name: visualizers are process-wide singletons per name.
        visualizer = VISUALIZERS.build(dict(type=cfg.visualizer.type, name=f"tokenzoo-infer-{time.time_ns()}"))
    visualizer.dataset_meta = model.dataset_meta
    out_file.parent.mkdir(parents=True, exist_ok=True)
    visualizer.add_datasample("prediction", mmcv.imread(str(image), channel_order="rgb"), data_sample=result,
                              draw_gt=False, out_file=str(out_file), **draw_args)
    return out_file
