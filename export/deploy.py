"""Every deployable file of a model, each verified: FP32 (dynamic batch and/or static), INT8, FP16.

``export_deployment`` writes, beside ``out_path`` (``name.onnx``):

* ``name.onnx``: FP32, dynamic batch axis (or static ``[1, 3, H, W]`` with ``static=True``);
* ``name.int8.onnx``: INT8 in the default mode (``DEFAULT_INT8``), ``name.int8-static.onnx`` /
  ``name.int8-dynamic.onnx`` when both modes are asked for (``int8='both'``);
* ``name.fp16.onnx``: FP16 weights and compute, FP32 inputs and outputs.

Each file is checked with ``onnx.checker``; FP32 against PyTorch (max abs diff, DESIGN contract 7); INT8 and FP16
against FP32 on real images (``verify.agreement``: top-1 agreement and mean logit cosine, with the weights and images
named; not for a model with several outputs, such as an OpenMMLab backbone's maps). The manifest returned holds
every figure (``python -m tokenzoo.export`` prints them).

Progress is shown with tqdm; every file is written through ``atomic_output``, so an interrupted run leaves complete
files only.
"""
import os
from pathlib import Path
from typing import Any, Sequence

import onnx
import torch
from torch import nn
from tqdm import tqdm

from tokenzoo.export.graph import DEFAULT_OPTIMIZER
from tokenzoo.export.images import ImageSet, images_from
from tokenzoo.export.onnx_export import (DEFAULT_OPSET, PARITY_TOL, check_out_path, check_parity, export_onnx)
from tokenzoo.export.quantize import INT8_MODES, quantize_int8, to_fp16
from tokenzoo.export.verify import agreement
from tokenzoo.profiling import ImgSize, check_img_size

__all__ = ['CALIBRATION_IMAGES', 'DEFAULT_INT8', 'EVAL_IMAGES', 'deployment_paths', 'export_deployment']

# Dynamic INT8 agreed with FP32 better than static QDQ on every trained model measured (tests/photo_classifier.py:
# 4 blocks, width 96, 64 px, 60 held-out crops; top-1 agreement / mean logit cosine, dynamic vs static: ViT 100% /
# 0.99999 vs 91.7% / 0.963, EViT 100% / 0.9994 vs 100% / 0.9961, ToMe 100% / 0.99998 vs 100% / 0.9991, MCTF 100% /
# 0.99998 vs 100% / 0.99987, MCTF-Fast 100% / 0.9998 vs 100% / 0.9993, Expedit 100% / 0.99999 vs 100% / 0.9998,
# Sparsifiner 100% / 0.9998 vs 100% / 0.9994, LookupViT 100% / 0.99999 vs 100% / 0.99997; and on the digits
# reference model, tools/results/tradeoff_digits.json), needs no calibration data, and ran 1.4-2.2x faster than
# static QDQ for every small model at 224 on the edge profile (tools/results/edge_small_224.json).
DEFAULT_INT8 = 'dynamic'
CALIBRATION_IMAGES = 32  # photographs 100.. (crops disjoint from the evaluation images)
EVAL_IMAGES = 60  # photographs 0..59
_CALIBRATION_OFFSET = 100


def deployment_paths(out_path: str | os.PathLike, int8: str | None, fp16: bool) -> dict[str, Path]:
    """The files ``export_deployment`` writes, by variant name ('fp32', 'int8-static', 'int8-dynamic', 'fp16')."""
    out_path = Path(out_path)
    stem = out_path.name[:-5] if out_path.name.endswith('.onnx') else out_path.name
    paths = {'fp32': out_path}
    modes = INT8_MODES if int8 == 'both' else (int8,) if int8 else ()
    for mode in modes:
        suffix = 'int8' if int8 != 'both' else f'int8-{mode}'
        paths[f'int8-{mode}'] = out_path.with_name(f'{stem}.{suffix}.onnx')
    if fp16:
        paths['fp16'] = out_path.with_name(f'{stem}.fp16.onnx')
    return paths


def export_deployment(
        model: nn.Module,
        out_path: str | os.PathLike,
        img_size: ImgSize = 224,
        static: bool = False,
        optimize: str = DEFAULT_OPTIMIZER,
        int8: str | None = DEFAULT_INT8,
        fp16: bool = True,
        weights: str = 'random',
        calibration: ImageSet | Sequence[torch.Tensor] | str | os.PathLike | None = None,
        images: ImageSet | Sequence[torch.Tensor] | str | os.PathLike | None = None,
        images_description: str | None = None,
        opset: int = DEFAULT_OPSET,
        force: bool = False,
        progress: bool = True,
) -> dict[str, Any]:
    """Export, quantize and verify (see the module docstring).

    Args:
        model: The model, in the state to deploy (weights loaded).
        out_path: The FP32 file; the others go beside it (``deployment_paths``).
        img_size: Input size.
        static: Static ``[1, 3, H, W]`` graphs instead of a dynamic batch axis.
        optimize: Graph optimizer for the FP32 graph (see ``graph.optimize_graph``).
        int8: 'static', 'dynamic', 'both' or None (no INT8 file).
        fp16: Write the FP16 file.
        weights: What the weights are (recorded with every agreement figure).
        calibration: Images for static INT8 (default: crops 100.. of scikit-image's photographs).
        images: Images for the agreement figures (default: crops 0..59 of the photographs).
        images_description: Required when ``images`` or ``calibration`` is a list of tensors.
        opset: ONNX opset.
        force: Overwrite existing files.
        progress: Show a tqdm progress bar.

    Returns:
        The manifest: settings, files, ``parity`` (FP32 vs PyTorch per batch size), ``agreement`` per variant.

    Raises:
        ValueError: On a bad setting. FileExistsError: If a file exists and ``force`` is False (checked before any
        work).
    """
    if int8 not in (None, 'both', *INT8_MODES):
        raise ValueError(f"int8 must be one of {', '.join(INT8_MODES)}, 'both' or None, got {int8!r}")
    size = check_img_size(model, img_size)
    paths = deployment_paths(out_path, int8, fp16)
    for path in paths.values():
        check_out_path(path, force)
    eval_images = images_from(images, size, EVAL_IMAGES, model, images_description)
    steps = ['export'] + [name for name in paths if name != 'fp32']
    manifest: dict[str, Any] = dict(
        img_size=list(size), static=static, optimize=optimize, opset=opset, weights=weights,
        files={name: str(path) for name, path in paths.items()}, agreement={})
    with tqdm(steps, desc=Path(out_path).name, disable=not progress, leave=False) as bar:
        for step in bar:
            bar.set_postfix_str(step)
            if step == 'export':
                export_onnx(model, paths['fp32'], img_size=size, opset=opset, force=force, static=static,
                            optimize=optimize)
                diffs = check_parity(model, paths['fp32'], img_size=size)
                manifest['parity'] = {str(b): d for b, d in diffs.items()}
                manifest['parity_ok'] = max(diffs.values()) <= PARITY_TOL
                continue
            if step.startswith('int8-'):
                mode = step[len('int8-'):]
                cal = None
                if mode == 'static':
                    cal = images_from(calibration, size, CALIBRATION_IMAGES, model, images_description,
                                      offset=_CALIBRATION_OFFSET)
                    manifest['calibration'] = cal.description
                quantize_int8(paths['fp32'], paths[step], mode=mode, calibration=cal, force=force)
            else:
                to_fp16(paths['fp32'], paths[step], force=force)
            if len(onnx.load(str(paths['fp32']), load_external_data=False).graph.output) == 1:
                manifest['agreement'][step] = agreement(paths['fp32'], paths[step], eval_images, weights)
            else:  # an OpenMMLab backbone's maps: no class decision to agree on
                manifest['agreement'][step] = None
    return manifest
