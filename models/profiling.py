"""Measure models: parameters, GMACs, token counts, eager PyTorch speed and the machine it ran on.

Everything here is PyTorch-only (no onnx import) so that ``tokenzoo.profiling`` works without the ``export`` extra;
ONNX export and onnxruntime timing live in ``tokenzoo.export``. ``tools/benchmark.py`` is a thin CLI over both.

FLOPs are counted by running the model under ``torch.utils.flop_counter.FlopCounterMode`` (DESIGN contract 9).
torch ships no formula for the fused CPU attention kernel that ``F.scaled_dot_product_attention`` dispatches to, so
without one the attention matmuls count as zero (DeiT-S reads 4.24 instead of 4.6 GMACs). Nor does it count a
weighted ``embedding_bag`` (a gather and multiply-add, the value sum of Sparsifiner's gather path). Importing this
module registers those formulas once.
"""
import contextlib
import ctypes
import difflib
import importlib.metadata
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import timm
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

__all__ = [
    'ImgSize', 'build_model', 'check_img_size', 'count_gmacs', 'count_gmacs_exported', 'count_params',
    'eager_latency', 'eager_throughput', 'eval_mode', 'example_input', 'format_token_counts', 'machine_info',
    'peak_memory_mb', 'to_img_size', 'token_counts', 'validate_model_name',
]

ImgSize = int | tuple[int, int]


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the two attention matmuls, ``q @ k^T`` and ``softmax(.) @ v`` (2 FLOPs per multiply-add).

    Shapes are (B, H, L, E); keys/values may have fewer heads than queries (grouped-query attention), the kernel
    broadcasts them, so the query head count is the one that does the work. Masks, scaling and softmax are
    elementwise and not counted, as for every other op in FlopCounterMode.
    """
    batch, heads, len_q, dim_qk = query_shape
    len_k, dim_v = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * len_q * len_k * (dim_qk + dim_v)


def _sdpa_cpu_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                            **kwargs) -> int:
    """FLOPs of the backward of the fused CPU attention: four matmuls (dV, dP, dQ, dK), twice the forward."""
    return 2 * _sdpa_cpu_flop(query_shape, key_shape, value_shape)


def _embedding_bag_flop(weight_shape, indices_shape, offsets_shape=None, scale_grad_by_freq=False, mode=0,
                        sparse=False, per_sample_weights_shape=None, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of a weighted ``embedding_bag``: one multiply-add per index and channel (2 FLOPs).

    An unweighted bag is a plain sum, elementwise like every reduction FlopCounterMode leaves uncounted.
    """
    if per_sample_weights_shape is None:
        return 0
    return 2 * math.prod(indices_shape) * weight_shape[-1]


def _register_sdpa_flops() -> None:
    """Register FLOP formulas for the CPU fused attention kernels and the weighted embedding bag, keeping any
    registration that already exists.

    On CPU, SDPA runs ``_scaled_dot_product_flash_attention_for_cpu`` (with or without a float/bool mask, causal or
    not); the math fallback (dropout, mismatched head dims) decomposes into ``bmm`` which torch already counts.
    ``embedding_bag`` dispatches to one of three kernels depending on autograd.
    A formula registered before us (a newer torch, or another library) wins: ``register_flop_formula`` raises on a
    duplicate, and each target is registered on its own so one duplicate does not skip the others.
    """
    formulas: dict[str, Callable[..., int]] = {
        '_scaled_dot_product_flash_attention_for_cpu': _sdpa_cpu_flop,
        '_scaled_dot_product_flash_attention_for_cpu_backward': _sdpa_cpu_backward_flop,
        'embedding_bag': _embedding_bag_flop,
        '_embedding_bag': _embedding_bag_flop,
        '_embedding_bag_forward_only': _embedding_bag_flop,
    }
    for op_name, formula in formulas.items():
        op = getattr(torch.ops.aten, op_name, None)
        if op is None:  # a torch build without this kernel has nothing to count
            continue
        with contextlib.suppress(RuntimeError):  # "duplicate registrations": already counted
            register_flop_formula(op)(formula)


_register_sdpa_flops()


def to_img_size(img_size: ImgSize) -> tuple[int, int]:
    """Normalize an image size to ``(height, width)``.

    Args:
        img_size: One int (square) or a pair of ints.

    Returns:
        ``(height, width)``.

    Raises:
        ValueError: If the size is not one or two positive ints.
    """
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ValueError(f"img_size must be a positive int or a pair of positive ints (height, width), "
                         f"got {img_size!r}")
    return size


def validate_model_name(name: str) -> str:
    """Check that a timm model name (optionally with a ``.tag``) is registered, without building the model.

    Args:
        name: A timm model name such as ``deit_small_patch16_224`` or ``evit_small.deit_in1k``, or
            ``FAMILY@NAME`` for a parameter-free family applied to a timm ViT (``tokenzoo.accelerate``), e.g.
            ``tome@vit_base_patch16_clip_224``.

    Returns:
        The name unchanged.

    Raises:
        ValueError: If the architecture is not registered with timm (close matches are listed), the pretrained
            tag does not exist for it, or the family is unknown.
    """
    family, _, base = name.rpartition('@')
    if family:
        from tokenzoo.accelerate import accelerate_families  # the package's own module; no import cycle at load

        if family not in accelerate_families():
            raise ValueError(f"unknown family {family!r} in {name!r}: FAMILY@NAME takes {accelerate_families()}")
        validate_model_name(base)
        return name
    if not timm.is_model(name):
        arch = name.split('.', 1)[0]
        # prefix matches catch shorthands such as 'deit_small' that difflib ranks below unrelated names
        matches = timm.list_models(f'{arch}*')[:5]
        matches = matches or difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"close matches: {', '.join(matches)}; " if matches else ''
        raise ValueError(
            f"unknown model {name!r}: not a registered timm model name ({hint}list names with "
            f"`python -c \"import tokenzoo, timm; print(timm.list_models('*vit*'))\"`)")
    try:
        timm.get_pretrained_cfg(name)
    except RuntimeError as e:  # timm's error for an unknown tag on a known architecture
        tags = timm.list_pretrained(f"{name.split('.', 1)[0]}.*")
        raise ValueError(f"model {name!r}: {e} Known tags: {', '.join(tags) or 'none'}") from e
    return name


def check_img_size(model: nn.Module, img_size: ImgSize) -> tuple[int, int]:
    """Check that a model can take inputs of ``img_size``, before any heavy work.

    Models without a timm ``patch_embed`` are not checked beyond the size itself.

    Args:
        model: The model, typically a timm ``VisionTransformer`` or a tokenzoo family.
        img_size: Input size, one int or ``(height, width)``.

    Returns:
        ``(height, width)``.

    Raises:
        ValueError: If the size is not a multiple of the patch size, or the model was built for a fixed other size.
    """
    size = to_img_size(img_size)
    patch_embed = getattr(model, 'patch_embed', None)
    patch = getattr(patch_embed, 'patch_size', None)
    if patch is None:
        return size
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(
            f"img_size {size[0]}x{size[1]} is not a multiple of the patch size {patch[0]}x{patch[1]}; "
            f"allowed: multiples of it, e.g. {14 * patch[0]}x{14 * patch[1]}")
    built = getattr(patch_embed, 'img_size', None)
    if built is not None and getattr(patch_embed, 'strict_img_size', False) and tuple(built) != size:
        raise ValueError(
            f"the model was built for {built[0]}x{built[1]} inputs and only accepts that size; build it with "
            f"img_size={size} (--img-size on the command line) to use {size[0]}x{size[1]}")
    return size


def _default_img_size(name: str) -> tuple[int, int] | None:
    cfg = timm.get_pretrained_cfg(name)
    return tuple(cfg.input_size[-2:]) if cfg is not None and cfg.input_size else None


def build_model(
        name: str,
        img_size: ImgSize | None = None,
        checkpoint: str | os.PathLike | None = None,
        **kwargs: Any,
) -> nn.Module:
    """Build a timm model for measurement, in eval mode, with random weights unless a checkpoint is given.

    Args:
        name: A timm model name (``import tokenzoo`` has registered the tokenzoo families), or ``FAMILY@NAME``: the
            timm model ``NAME`` (with ``img_size`` and ``checkpoint``) accelerated by a parameter-free family, which
            then takes ``**kwargs`` (``tokenzoo.accelerate``).
        img_size: Input size; passed to the model only when it differs from the model's default, so models that
            take no ``img_size`` argument still build at their default size.
        checkpoint: A local weight file, loaded through timm's pretrained mechanism
            (``pretrained_cfg_overlay=dict(file=...)``) so checkpoint filters apply; None keeps random weights.
        **kwargs: Extra keyword arguments for ``timm.create_model``.

    Returns:
        The model in eval mode.

    Raises:
        ValueError: Unknown model name, bad image size, or keyword arguments the model does not accept.
        FileNotFoundError: If ``checkpoint`` does not exist.
    """
    validate_model_name(name)
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint {str(checkpoint)!r} does not exist or is not a file")
    family, _, base = name.rpartition('@')
    if family:  # the timm model with its weights, then the family (with the keyword arguments) applied to it
        from tokenzoo.accelerate import accelerate

        model = accelerate(build_model(base, img_size=img_size, checkpoint=checkpoint), family, **kwargs)
        return model.eval()
    if img_size is not None:
        img_size = to_img_size(img_size)
        if img_size != _default_img_size(name):
            kwargs = {'img_size': img_size, **kwargs}
    if checkpoint is not None:
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint)))
    try:
        model = timm.create_model(name, **kwargs)
    except TypeError as e:
        if 'unexpected keyword argument' not in str(e):  # a bug inside the constructor, not a user error
            raise
        raise ValueError(f"model {name!r} does not accept one of the arguments {sorted(kwargs)}: {e}") from e
    if img_size is not None:
        check_img_size(model, img_size)
    return model.eval()


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the duration of the block, restoring its train/eval flag afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def example_input(model: nn.Module, batch_size: int, img_size: ImgSize, seed: int = 0) -> torch.Tensor:
    """A seeded random image batch of shape (batch_size, 3, H, W) on the model's device and dtype.

    Seeded so that repeated measurements and parity checks see the same data.
    """
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device('cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, 3, *to_img_size(img_size), generator=generator)
    return x.to(device=device, dtype=dtype)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{key} must be an int >= 1, got {value!r}")


def count_params(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers are not parameters)."""
    return sum(p.numel() for p in model.parameters())


def count_gmacs(model: nn.Module, img_size: ImgSize = 224, batch: int = 1) -> float:
    """Count multiply-accumulates of one eval forward, in billions, by running the model under FlopCounterMode.

    Attention computed by ``F.scaled_dot_product_attention`` is counted (formula registered by this module).

    Args:
        model: The model.
        img_size: Input size, one int or ``(height, width)``.
        batch: Batch size of the counted forward; the result is for the whole batch.

    Returns:
        GMACs = FLOPs / 2 / 1e9.
    """
    _check_positive(batch=batch)
    img_size = check_img_size(model, img_size)
    x = example_input(model, batch, img_size)
    with eval_mode(model), torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / 1e9


def count_gmacs_exported(model: nn.Module, img_size: ImgSize = 224) -> float:
    """GMACs of one batch-1 forward of the program ``torch.export`` captures: what an ONNX export runs.

    A family may take another path in eager PyTorch than in an export (Sparsifiner's eval attention gathers each
    query's keys, its export computes masked dense attention); latency measured on onnxruntime compares with these.

    Args:
        model: The model.
        img_size: Input size, one int or ``(height, width)``.

    Returns:
        GMACs = FLOPs / 2 / 1e9 of the exported program at batch 1.
    """
    img_size = check_img_size(model, img_size)
    x = example_input(model, 1, img_size)
    with eval_mode(model):
        program = torch.export.export(model, (x,), strict=False)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        program.module()(x)
    return counter.get_total_flops() / 2 / 1e9


def token_counts(model: nn.Module, img_size: ImgSize = 224) -> list[int]:
    """Number of patch tokens in each block's output (prefix/CLS tokens not counted).

    tokenzoo models report it themselves (``model.token_counts(img_size)``, DESIGN contract 6). A plain timm ViT
    keeps every token, so it is the patch count repeated once per block.

    Args:
        model: A tokenzoo model or a timm ViT (a model with ``patch_embed`` and ``blocks``).
        img_size: Input size, one int or ``(height, width)``.

    Returns:
        One int per block.

    Raises:
        ValueError: If the model neither reports token counts nor looks like a ViT, or the size does not fit.
    """
    size = to_img_size(img_size)
    if hasattr(model, 'token_counts'):
        return [int(n) for n in model.token_counts(size)]
    patch_embed, blocks = getattr(model, 'patch_embed', None), getattr(model, 'blocks', None)
    if patch_embed is None or blocks is None or not hasattr(patch_embed, 'dynamic_feat_size'):
        raise ValueError(
            f"{type(model).__name__} has no token_counts() and is not a timm ViT (patch_embed + blocks); "
            f"token counts are defined for tokenzoo models and timm ViTs only")
    patch = patch_embed.patch_size
    if size[0] % patch[0] or size[1] % patch[1]:
        raise ValueError(f"img_size {size[0]}x{size[1]} is not a multiple of the patch size {patch[0]}x{patch[1]}")
    grid_h, grid_w = patch_embed.dynamic_feat_size(size)
    return [grid_h * grid_w] * len(blocks)


def format_token_counts(counts: Sequence[int] | None) -> str:
    """Run-length summary of tokens per block for tables, e.g. ``196x3 139x3 99x3 71x3``; ``n/a`` when unknown."""
    if not counts:
        return 'n/a'
    runs: list[list[int]] = []  # [count, number of consecutive blocks with it]
    for n in counts:
        if runs and runs[-1][0] == n:
            runs[-1][1] += 1
        else:
            runs.append([n, 1])
    return ' '.join(f'{n}x{k}' if k > 1 else str(n) for n, k in runs)


def dense_table(results: Sequence[dict]) -> list[str]:
    """Markdown table of ``tools/benchmark.py --dense`` results (one backbone per config), for reports and the zoo."""
    lines = ['| config | backbone | input | params (M) | GMACs | GMACs vs base | tokens per block | '
             'eager b1 p50 / p90 (ms) | latency vs base | peak memory (MB) |', '|' + '---|' * 10]
    for r in results:
        lat, peak = r['eager_latency_ms'], r.get('peak_memory_mb')
        lines.append(f"| {Path(r['name']).name} | `{r['model_name']}` | {r['img_size'][0]}x{r['img_size'][1]} | "
                     f"{r['params_m']:.2f} | {r['gmacs']:.1f} | {r['ratios']['gmacs']:.3f} | "
                     f"{format_token_counts(r['tokens_per_block'])} | {lat['p50_ms']:.0f} / {lat['p90_ms']:.0f} | "
                     f"{r['ratios']['eager_latency_p50']:.3f} | {'n/a' if peak is None else f'{peak:.0f}'} |")
    return lines


def _proc_status_kb(field: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith(field + ':'):
                return int(line.split()[1])
    return None


def peak_memory_mb(model: nn.Module, img_size: ImgSize, batch_size: int = 1) -> float | None:
    """Peak memory one eval forward adds to the process, in MB (activations and workspace, not the weights).

    Linux only (None elsewhere): the process's resident-set high-water mark (``VmHWM``) is reset to the current size
    through ``/proc/self/clear_refs`` before the forward and read after it. glibc is told to serve every allocation
    above 128 kB with mmap (its default threshold grows after large frees, and memory freed by an earlier model would
    then be reused unseen) and to return free heap memory first, so the difference is the forward's own peak.
    """
    x = example_input(model, batch_size, check_img_size(model, img_size))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL('libc.so.6')
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD; setting it also stops glibc from raising it
    with eval_mode(model), torch.inference_mode():
        model(x)  # first-call allocations (kernels, caches) out of the way
        with contextlib.suppress(NameError, AttributeError):
            libc.malloc_trim(0)
        try:
            Path('/proc/self/clear_refs').write_text('5')
        except OSError:
            return None
        before = _proc_status_kb('VmRSS')
        model(x)
        peak = _proc_status_kb('VmHWM')
    return None if before is None or peak is None else max(peak - before, 0) / 1024


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously; without a sync the timer would stop before the work is done
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _timed_runs(model: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    """Run ``model(x)`` warmup + iters times in eval/inference mode and return the timed iterations in seconds."""
    times = []
    with eval_mode(model), torch.inference_mode():
        for i in range(warmup + iters):
            _sync(x.device)
            start = time.perf_counter()
            model(x)
            _sync(x.device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def eager_throughput(
        model: nn.Module,
        batch_size: int = 32,
        img_size: ImgSize = 224,
        warmup: int = 5,
        iters: int = 20,
) -> float:
    """Eager PyTorch throughput in images per second (eval mode, ``torch.inference_mode``).

    Args:
        model: The model; runs on the device of its parameters with torch's current thread count.
        batch_size: Images per forward.
        img_size: Input size, one int or ``(height, width)``.
        warmup: Untimed forwards first (allocator and kernel selection settle).
        iters: Timed forwards.

    Returns:
        ``batch_size * iters / total time``.
    """
    _check_positive(batch_size=batch_size, warmup=warmup, iters=iters)
    x = example_input(model, batch_size, check_img_size(model, img_size))
    return batch_size * iters / sum(_timed_runs(model, x, warmup, iters))


def eager_latency(
        model: nn.Module,
        batch_size: int = 1,
        img_size: ImgSize = 224,
        warmup: int = 10,
        iters: int = 50,
) -> dict[str, float]:
    """Eager PyTorch latency per forward (eval mode, ``torch.inference_mode``).

    Args:
        model: The model; runs on the device of its parameters with torch's current thread count.
        batch_size: Images per forward.
        img_size: Input size, one int or ``(height, width)``.
        warmup: Untimed forwards first.
        iters: Timed forwards.

    Returns:
        ``dict(p50_ms=..., p90_ms=...)``.
    """
    _check_positive(batch_size=batch_size, warmup=warmup, iters=iters)
    x = example_input(model, batch_size, check_img_size(model, img_size))
    times_ms = np.array(_timed_runs(model, x, warmup, iters)) * 1e3
    return dict(p50_ms=float(np.percentile(times_ms, 50)), p90_ms=float(np.percentile(times_ms, 90)))


def _package_version(name: str) -> str | None:
    # metadata lookup instead of import: no onnxruntime import in this torch-only module, and it is cheap
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Describe the machine and software a measurement ran on, so results name their environment.

    Returns:
        CPU model, logical cores (and those this process may use), platform, Python, the versions of torch, timm,
        onnx and onnxruntime (None if not installed), torch's intra-op thread count and whether CUDA is available.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    return dict(
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        cpu_usable=usable,
        platform=platform.platform(),
        python=platform.python_version(),
        torch=torch.__version__,
        timm=timm.__version__,
        onnx=_package_version('onnx'),
        onnxruntime=_package_version('onnxruntime'),
        torch_num_threads=torch.get_num_threads(),
        cuda_available=torch.cuda.is_available(),
    )
