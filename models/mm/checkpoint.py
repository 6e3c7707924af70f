"""Let torch's safe loader read mmengine Runner checkpoints, so ``resume`` and ``load_from`` work on torch >= 2.6.

mmengine 0.10.7 loads checkpoints with ``torch.load(path, map_location=...)``. Since torch 2.6 that means
``weights_only=True``: the restricted unpickler accepts tensors, containers and primitive types, plus the globals
allow-listed with ``torch.serialization.add_safe_globals``. A Runner checkpoint also holds the training state of
mmengine's ``MessageHub``, and its unpickling needs exactly these globals (found by saving Runner checkpoints of the
detection and segmentation configs and listing ``torch.serialization.get_unsafe_globals_in_checkpoint``):

* ``mmengine.logging.history_buffer.HistoryBuffer``: the logged scalars (loss, lr, time) of each iteration;
* ``numpy.ndarray``, ``numpy.dtype`` with the float64 and int64 dtype classes, ``numpy._core.multiarray._reconstruct``
  and ``numpy._core.multiarray.scalar``: the buffers' arrays and the numpy scalars of the runtime info (the two
  functions also under their numpy 1 names, ``numpy.core.multiarray.*``, for checkpoints written with numpy < 2);
* ``builtins.getattr``, used as ``getattr(HistoryBuffer, "min")`` for the buffer's statistic methods. A general
  ``getattr`` would let a crafted file reach any attribute of any allowed object, so it is allow-listed under that
  name as ``_history_buffer_statistic``, which resolves only ``HistoryBuffer``'s registered statistics and raises for
  anything else.

Safe loading stays on: any other global in a file is still refused, whoever wrote the file, and nothing sets
``weights_only=False`` or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``. ``import tokenzoo.mm`` (which the configs'
``custom_imports`` does) calls ``allow_runner_checkpoints()`` once.
"""
import pickle
from typing import Callable, List, Tuple, Union

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

__all__ = ["allow_runner_checkpoints", "runner_checkpoint_globals"]


# The statistics every HistoryBuffer registers on construction; custom ones (HistoryBuffer.register_statistics) are
# added to HistoryBuffer._statistics_methods.
_BUILTIN_STATISTICS = ("current", "max", "mean", "min")


def _history_buffer_statistic(obj: object, name: str) -> Callable:
    """``getattr`` restricted to what Runner checkpoints use it for: a statistic method of ``HistoryBuffer``."""
    allowed = set(_BUILTIN_STATISTICS) | set(HistoryBuffer._statistics_methods)
    if obj is HistoryBuffer and isinstance(name, str) and name in allowed:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"refusing getattr({obj!r}, {name!r}) while loading a checkpoint: tokenzoo allows "
                                 f"getattr only for the HistoryBuffer statistics {sorted(allowed)}")


def runner_checkpoint_globals() -> List[Union[Callable, Tuple[Callable, str]]]:
    """The globals an mmengine Runner checkpoint needs beyond torch's defaults, as ``add_safe_globals`` takes them."""
    # numpy >= 2 pickles name it numpy._core.multiarray, numpy 1 numpy.core.multiarray
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [
        HistoryBuffer,
        np.ndarray,
        np.dtype,
        type(np.dtype(np.float64)),  # numpy.dtypes.Float64DType: the logged values
        type(np.dtype(np.int64)),  # numpy.dtypes.Int64DType: the logged counts
        multiarray._reconstruct,
        multiarray.scalar,
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        (_history_buffer_statistic, "builtins.getattr"),
    ]


def allow_runner_checkpoints() -> None:
    """Allow-list the globals of mmengine Runner checkpoints in torch's safe loader (idempotent)."""
    torch.serialization.add_safe_globals(runner_checkpoint_globals())
