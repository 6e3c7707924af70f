"""tokenzoo.export: ONNX export (dynamic or static), parity, INT8/FP16 variants and their agreement on real images,
onnxruntime latency with its protocol, the mobile usability check.

``import tokenzoo`` never imports this package; the names below load their module (and onnx/onnxruntime, the
``export`` extra) on first use, so ``from tokenzoo.export import export_onnx`` works and ``python -m
tokenzoo.export.onnx_export`` does not find its module half-imported by this file.
"""
import importlib
from typing import Any

_LAZY = {
    'export_onnx': 'onnx_export',
    'check_parity': 'onnx_export',
    'DEFAULT_OPSET': 'onnx_export',
    'PARITY_TOL': 'onnx_export',
    'ort_latency': 'latency',
    'profile_settings': 'latency',
    'export_deployment': 'deploy',
    'quantize_int8': 'quantize',
    'to_fp16': 'quantize',
    'agreement': 'verify',
    'photographs': 'images',
    'image_folder': 'images',
    'mobile_usability': 'mobile',
    'optimize_graph': 'graph',
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f'{__name__}.{_LAZY[name]}'), name)
