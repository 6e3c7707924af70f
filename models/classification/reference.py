"""The reference model: a DeiT-shaped ViT the project trains on the digits, so accuracy is measured, not borrowed.

It is timm's ``deit_tiny_patch16_224`` architecture reshaped by keyword arguments (no registry of its own):
``REFERENCE_KWARGS`` = 12 blocks (so the families' block schedules apply: EViT at 3/6/9, MCTF at 1-11, Expedit after
block 4), width 96 with 3 heads of 32 channels, patch 4 at 56 px (the 14 x 14 grid of a DeiT at 224), LayerScale
initialized at 1e-4 (DeiT III's and CaiT's residual scaling, timm's ``init_values``), 10 classes.

Why LayerScale: with DeiT's plain residual blocks this narrow 12-block model stayed at chance (val top-1 12-15%, loss
ln 10) for the first 3 epochs of the 12-epoch schedule the time budget allows, while with LayerScale, everything else
equal, it was at 45% after 3 epochs (the logs are in ``tools/results/digits/``). Every family's blocks are timm
blocks and apply the same scales, so nothing else changes.
Every parameter-free family takes the same arguments and loads the same file (``tools/results/digits/reference.pth``,
a float32 state dict) through timm's pretrained mechanism: ``build_reference("evit_tiny", checkpoint)``.
"""
from pathlib import Path
from typing import Any, Dict, Optional, Union

from torch import nn

from .engine import create_classifier

__all__ = ["PARAMETER_FREE", "REFERENCE_KWARGS", "REFERENCE_MODEL", "REFERENCE_WEIGHTS", "build_reference",
           "repository_root"]

REFERENCE_MODEL = "deit_tiny_patch16_224"
REFERENCE_KWARGS: Dict[str, Any] = dict(img_size=56, patch_size=4, embed_dim=96, depth=12, num_heads=3,
                                        init_values=1e-4, num_classes=10)
REFERENCE_WEIGHTS = Path("tools/results/digits/reference.pth")  # relative to the repository root
# The families that add no parameters, as the timm architectures that take the reference weights as they are.
PARAMETER_FREE = {"evit": "evit_tiny", "tome": "tome_tiny", "mctf": "mctf_tiny", "mctf_fast": "mctf_fast_tiny",
                  "expedit": "expedit_tiny"}


def repository_root() -> Path:
    """The checkout this package lives in (``models/classification`` is two levels below it)."""
    return Path(__file__).resolve().parents[2]


def build_reference(model: str = REFERENCE_MODEL, checkpoint: Optional[Union[str, Path]] = None,
                    **kwargs: Any) -> nn.Module:
    """The reference architecture as ``model`` (the base or a family), in eval mode.

    Args:
        model: A timm name: the base ``deit_tiny_patch16_224`` or a family (``PARAMETER_FREE``).
        checkpoint: Weights; None for the committed reference weights, loaded only if they exist (random weights
            otherwise would silently measure nothing, so a missing default file is an error).
        **kwargs: The family's knob (``keep_rate=0.5``, ``r=8``, ...) or other overrides of ``REFERENCE_KWARGS``.

    Raises:
        FileNotFoundError: The weights file does not exist.
    """
    path = Path(checkpoint) if checkpoint is not None else repository_root() / REFERENCE_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"reference weights {str(path)!r} do not exist (tools/train_cls.py makes them; see "
                                f"tools/results/digits/README.md)")
    return create_classifier(model, checkpoint=path, **dict(REFERENCE_KWARGS, **kwargs)).eval()
