"""tokenzoo: token-efficient Vision Transformers registered with timm.

``import tokenzoo`` registers every family with timm (``timm.create_model("evit_small")``). It imports neither
OpenMMLab (``tokenzoo.mm``) nor ONNX (``tokenzoo.export``), so it stays fast.
"""
from typing import List

import timm

from . import evit, expedit, layers, lookupvit, mctf, sparsifiner, tome
from .accelerate import accelerate, accelerate_families
from .token_vit import TokenVisionTransformer

__version__ = "0.1.0"
__all__ = ["TokenVisionTransformer", "accelerate", "accelerate_families", "evit", "expedit", "layers", "list_models",
           "lookupvit", "mctf", "sparsifiner", "tome"]


def list_models(pattern: str = "") -> List[str]:
    """Architecture names that tokenzoo registers with timm, optionally filtered by a wildcard pattern."""
    return [name for name in timm.list_models(pattern or "*")
            if timm.models.model_entrypoint(name).__module__.startswith(__name__ + ".")]
