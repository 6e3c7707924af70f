"""Verify exported files: run them on onnxruntime, and measure how far a quantized or FP16 file is from FP32.

``agreement`` is the figure every INT8 / FP16 file carries: on real images (``tokenzoo.export.images``), the share of
images whose top-1 class is the same as the reference's, and the mean cosine similarity of the two logit vectors. The
reference is the PyTorch model or its FP32 ONNX file; the result names the weights and the images it was measured on,
because with random weights or on noise the figure says nothing about a deployment (random logits are nearly flat,
so any perturbation flips their top-1).
"""
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from tokenzoo.export.images import ImageSet, images_from
from tokenzoo.profiling import eval_mode

__all__ = ['agreement', 'check_file', 'onnx_session', 'run_onnx']


def onnx_session(onnx_path: str | os.PathLike, threads: int | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session for ``onnx_path`` (all graph optimizations; ``threads`` intra-op threads)."""
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=['CPUExecutionProvider'])


def check_file(onnx_path: str | os.PathLike) -> None:
    """``onnx.checker`` on the file (full check, shape inference included); raises on an invalid model."""
    onnx.checker.check_model(str(onnx_path), full_check=True)


def run_onnx(session: ort.InferenceSession, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """The first output of ``session`` for a batch of images (B, 3, H, W), as float32.

    A static graph (fixed batch size) is run one image batch at a time and the outputs concatenated.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    inp = session.get_inputs()[0]
    x = x.astype(np.float16 if inp.type == 'tensor(float16)' else np.float32)
    fixed = inp.shape[0] if isinstance(inp.shape[0], int) else None
    if fixed is None or fixed == x.shape[0]:
        return np.asarray(session.run(None, {inp.name: x})[0], dtype=np.float32)
    if x.shape[0] % fixed:
        raise ValueError(f"the graph takes batches of exactly {fixed}; {x.shape[0]} images do not split into them")
    return np.concatenate([np.asarray(session.run(None, {inp.name: x[i:i + fixed]})[0], dtype=np.float32)
                           for i in range(0, x.shape[0], fixed)])


def _logits(source: nn.Module | str | os.PathLike, image_set: ImageSet, batch_size: int) -> np.ndarray:
    if isinstance(source, nn.Module):
        with eval_mode(source), torch.inference_mode():
            outputs = [source(batch) for batch in image_set.batches(batch_size)]
        if not all(isinstance(o, torch.Tensor) for o in outputs):
            raise ValueError("agreement needs a model with one output (class logits)")
        return torch.cat(outputs).float().numpy()
    session = onnx_session(source)
    return np.concatenate([run_onnx(session, batch) for batch in image_set.batches(batch_size)])


def agreement(
        reference: nn.Module | str | os.PathLike,
        candidate: nn.Module | str | os.PathLike,
        images: ImageSet | Sequence[torch.Tensor] | str | os.PathLike | None,
        weights: str,
        images_description: str | None = None,
        img_size: int | tuple[int, int] = 224,
        count: int = 60,
        batch_size: int = 15,
) -> dict[str, Any]:
    """Top-1 agreement and mean logit cosine similarity of ``candidate`` with ``reference`` on real images.

    Args:
        reference: The FP32 model (PyTorch) or ONNX file.
        candidate: The file (or model) to compare, e.g. an INT8 or FP16 ONNX file.
        images: An ``ImageSet``, a list of (3, H, W) tensors (then ``images_description`` is required), an image
            folder, or None for ``count`` crops of scikit-image's photographs normalized for ``reference`` (a model).
        weights: What the weights are, e.g. 'DeiT-S ImageNet-1k (deit_small_patch16_224-cd65a155.pth)' or 'random
            (init seed 0): agreement meaningless'. Recorded with the figure.
        images_description: What a list of image tensors is (recorded with the figure).
        img_size: Input size for photographs or a folder.
        count: Number of photographs (or the most images taken from a folder).
        batch_size: Images per run.

    Returns:
        ``top1_agreement`` (fraction in [0, 1]), ``mean_cosine``, ``min_cosine``, ``num_images``, ``weights``,
        ``images`` (their description), ``reference`` and ``candidate`` (file names, or 'PyTorch').

    Raises:
        ValueError: On an empty weights description, images without a description, or outputs of other shapes.
    """
    if not weights or not weights.strip():
        raise ValueError("weights must say which weights the figure is measured with (e.g. 'random (seed 0)')")
    image_set = images_from(images, img_size, count, reference if isinstance(reference, nn.Module) else None,
                            images_description)
    expected = _logits(reference, image_set, batch_size)
    actual = _logits(candidate, image_set, batch_size)
    if expected.shape != actual.shape:
        raise ValueError(f"outputs differ in shape: reference {expected.shape}, candidate {actual.shape}")
    cosine = (expected * actual).sum(-1) / (np.linalg.norm(expected, axis=-1) * np.linalg.norm(actual, axis=-1)
                                            + 1e-12)
    return dict(
        top1_agreement=float((expected.argmax(-1) == actual.argmax(-1)).mean()),
        mean_cosine=float(cosine.mean()),
        min_cosine=float(cosine.min()),
        num_images=int(expected.shape[0]),
        weights=weights,
        images=image_set.description,
        reference=_name(reference),
        candidate=_name(candidate),
    )


def _name(source: nn.Module | str | os.PathLike) -> str:
    return 'PyTorch' if isinstance(source, nn.Module) else Path(source).name
