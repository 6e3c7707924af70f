"""onnxruntime latency measured the way an edge device (or a server) runs a model, with the protocol in every result.

Protocol: CPU execution provider, ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, sequential
execution, all graph optimizations (``ORT_ENABLE_ALL``), a fixed random input of the graph's precision, untimed
warm-up runs, then each run timed on its own; p50/p90/p99 over the timed runs. Two profiles:

* ``edge``: 1 thread, batch 1 (a phone core, a single-board computer);
* ``server``: every core this process may use, batch 32 (throughput on a CPU server).

A result records the profile, threads, batch, warm-up and timed runs, the percentiles, onnxruntime's version, the CPU
model and the graph variant (precision FP32/INT8/FP16, static or dynamic batch), so a row means something without the
file it came from.
"""
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from tokenzoo.profiling import ImgSize, machine_info, to_img_size

__all__ = ['PROFILES', 'edge_session', 'ort_latency', 'profile_settings']

PROFILES = ('edge', 'server')


def edge_session(onnx_path: str | os.PathLike, threads: int = 1) -> ort.InferenceSession:
    """Open an onnxruntime CPU session configured as the protocol says (see the module docstring).

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


def profile_settings(profile: str) -> dict[str, int]:
    """``threads`` and ``batch_size`` of a profile (see the module docstring).

    Raises:
        ValueError: On an unknown profile.
    """
    if profile == 'edge':
        return dict(threads=1, batch_size=1)
    if profile == 'server':
        usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
        return dict(threads=usable or 1, batch_size=32)
    raise ValueError(f"profile {profile!r} is not known; allowed: {', '.join(PROFILES)}")


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
        variant: str | None = None,
        profile: str | None = None,
) -> dict[str, Any]:
    """Time an ONNX model on onnxruntime's CPU execution provider (see the module docstring).

    Args:
        onnx_path: The ONNX file.
        batch_size: Images per run.
        img_size: Input size, one int or ``(height, width)``; must match the graph if it fixes the size.
        threads: Intra-op threads (inter-op is always 1).
        warmup: Untimed runs first (memory arena and kernel caches settle).
        runs: Timed runs.
        variant: What the graph is, e.g. 'FP32 dynamic' or 'INT8 static-QDQ static-shape' (recorded as given;
            default: the file name).
        profile: The profile name these settings stand for, if any (recorded).

    Returns:
        ``p50_ms``, ``p90_ms``, ``p99_ms``, ``mean_ms`` and the protocol: ``profile``, ``variant``, ``batch_size``,
        ``img_size``, ``threads``, ``runs``, ``warmup``, ``provider``, ``ort_version``, ``cpu``.

    Raises:
        ValueError: If a count is below 1 or the input size or batch does not fit the graph.
    """
    for key, value in dict(batch_size=batch_size, threads=threads, warmup=warmup, runs=runs).items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")
    img_size = to_img_size(img_size)
    session = edge_session(onnx_path, threads)
    shape = _input_shape(session, batch_size, img_size)
    inp = session.get_inputs()[0]
    dtype = np.float16 if inp.type == 'tensor(float16)' else np.float32
    feed = {inp.name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32).astype(dtype)}
    times_ms = []
    for i in range(warmup + runs):
        start = time.perf_counter()
        session.run(None, feed)
        if i >= warmup:
            times_ms.append((time.perf_counter() - start) * 1e3)
    return dict(
        p50_ms=float(np.percentile(times_ms, 50)),
        p90_ms=float(np.percentile(times_ms, 90)),
        p99_ms=float(np.percentile(times_ms, 99)),
        mean_ms=float(np.mean(times_ms)),
        profile=profile,
        variant=variant or Path(onnx_path).name,
        batch_size=batch_size,
        img_size=list(img_size),
        threads=threads,
        runs=runs,
        warmup=warmup,
        provider=session.get_providers()[0],
        ort_version=ort.__version__,
        cpu=machine_info()['cpu'],
    )
