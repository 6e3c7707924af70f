"""onnxruntime latency measured the way an edge device runs a model.

Protocol: CPU execution provider, ``intra_op_num_threads=threads`` (1 by default, a single core),
``inter_op_num_threads=1``, sequential execution, all graph optimizations (``ORT_ENABLE_ALL``), float32, a fixed
random input, untimed warm-up runs, then each run timed on its own.
"""
import os
import time
from typing import Any

import numpy as np
import onnxruntime as ort

from tokenzoo.profiling import ImgSize, to_img_size

__all__ = ['edge_session', 'ort_latency']


def edge_session(onnx_path: str | os.PathLike, threads: int = 1) -> ort.InferenceSession:
    """Open an onnxruntime CPU session configured like an edge deployment (see the module docstring).

    Args:
        onnx_path: The ONNX file.
        threads: Intra-op threads.

    Returns:
        The session.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(onnx_path), sess_options=options, providers=['CPUExecutionProvider'])


def _input_shape(session: ort.InferenceSession, batch_size: int, img_size: tuple[int, int]) -> tuple[int, ...]:
    """The input shape to feed, checking ``img_size`` against the sizes fixed in the graph."""
    shape = session.get_inputs()[0].shape  # e.g. ['batch', 3, 224, 224]; symbolic dims are strings
    if len(shape) != 4:
        raise ValueError(f"expected an image input (batch, channels, height, width), the graph's input is {shape}")
    fixed = [d for d in shape[2:] if isinstance(d, int)]
    if len(fixed) == 2 and tuple(fixed) != img_size:
        raise ValueError(
            f"img_size {img_size[0]}x{img_size[1]} does not match the exported model's input {fixed[0]}x{fixed[1]}; "
            f"export it again at that size or pass img_size={tuple(fixed)}")
    if isinstance(shape[0], int) and shape[0] != batch_size:
        raise ValueError(f"the exported model has a fixed batch size {shape[0]}, got batch_size={batch_size}")
    channels = shape[1] if isinstance(shape[1], int) else 3
    return batch_size, channels, *img_size


def ort_latency(
        onnx_path: str | os.PathLike,
        batch_size: int = 1,
        img_size: ImgSize = (224, 224),
        threads: int = 1,
        warmup: int = 10,
        runs: int = 50,
) -> dict[str, Any]:
    """Time an ONNX model on onnxruntime's CPU execution provider, edge-style (see the module docstring).

    Args:
        onnx_path: The ONNX file.
        batch_size: Images per run.
        img_size: Input size, one int or ``(height, width)``; must match the graph if it fixes the size.
        threads: Intra-op threads (inter-op is always 1).
        warmup: Untimed runs first (memory arena and kernel caches settle).
        runs: Timed runs.

    Returns:
        ``p50_ms``, ``p90_ms``, ``mean_ms`` and the protocol: ``batch_size``, ``img_size``, ``threads``, ``runs``,
        ``warmup``, ``provider``, ``ort_version``.

    Raises:
        ValueError: If a count is below 1 or the input size does not fit the graph.
    """
    for key, value in dict(batch_size=batch_size, threads=threads, warmup=warmup, runs=runs).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    img_size = to_img_size(img_size)
    session = edge_session(onnx_path, threads)
    shape = _input_shape(session, batch_size, img_size)
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
    times_ms = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times_ms.append((time.perf_counter() - start) * 1e3)
    return dict(
        p50_ms=float(np.percentile(times_ms, 50)),
        p90_ms=float(np.percentile(times_ms, 90)),
        mean_ms=float(np.mean(times_ms)),
        batch_size=batch_size,
        img_size=list(img_size),
        threads=threads,
        runs=runs,
        warmup=warmup,
        provider=session.get_providers()[0],
        ort_version=ort.__version__,
    )
