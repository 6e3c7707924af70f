"""``TokenZooLayerDecayOptimizerConstructor``: layer-wise learning-rate decay for models with a ``TokenZooViT``.

Layer-wise decay (BEiT, Sec. 3; used by ViTDet and the mmseg ViT/MAE configs) scales the learning rate of a
parameter by ``decay_rate ** (top - group)``: the closer to the input, the smaller the steps, so a pretrained
backbone is fine-tuned gently while the new neck and heads train at the base rate. Groups come from the backbone's
timm ``group_matcher`` (``TokenZooViT.layer_groups``), so every family is handled by the rule timm itself uses for
its ViTs: embeddings 0, block i -> i + 1, then the final norm if kept. Every parameter outside the backbone is at
``top`` (one above the backbone's last group) and keeps the base learning rate.

Weight decay is skipped for 1-d parameters (norms, biases, layer scale) and the position/prefix embeddings the model
lists in ``no_weight_decay()``, as timm and ViTDet do.

Config::

    optim_wrapper = dict(type="OptimWrapper", constructor="TokenZooLayerDecayOptimizerConstructor",
                         optimizer=dict(type="AdamW", lr=1e-4, weight_decay=0.1), paramwise_cfg=dict(decay_rate=0.7))
"""
from typing import Any, Dict, List, Optional, Tuple

from mmengine.logging import print_log
from mmengine.optim import DefaultOptimWrapperConstructor
from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS
from torch import nn

from .backbone import TokenZooViT

__all__ = ["TokenZooLayerDecayOptimizerConstructor"]


def _find_backbone(model: nn.Module) -> Tuple[str, TokenZooViT]:
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, TokenZooViT)]
    if len(found) != 1:
        raise ValueError(f"TokenZooLayerDecayOptimizerConstructor needs a model with exactly one TokenZooViT, found "
                         f"{len(found)} in {type(model).__name__}")
    return found[0]


@OPTIM_WRAPPER_CONSTRUCTORS.register_module()
class TokenZooLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
    """Parameter groups with layer-wise lr decay over a ``TokenZooViT`` backbone; see the module docstring.

    ``paramwise_cfg`` takes one key, ``decay_rate`` in (0, 1] (1 turns the decay off).
    """

    def __init__(self, optim_wrapper_cfg: dict, paramwise_cfg: Optional[Dict[str, Any]] = None) -> None:
        paramwise_cfg = dict(paramwise_cfg or {})
        unknown = set(paramwise_cfg) - {"decay_rate"}
        decay_rate = paramwise_cfg.get("decay_rate")
        if unknown or isinstance(decay_rate, bool) or not isinstance(decay_rate, (int, float)) \
                or not 0.0 < decay_rate <= 1.0:
            raise ValueError(f"TokenZooLayerDecayOptimizerConstructor takes paramwise_cfg=dict(decay_rate=<float in "
                             f"(0, 1]>), got {paramwise_cfg!r}")
        super().__init__(optim_wrapper_cfg, paramwise_cfg)
        if self.base_lr is None:
            raise ValueError("TokenZooLayerDecayOptimizerConstructor needs optimizer=dict(..., lr=...)")
        self.decay_rate = float(decay_rate)

    def add_params(self, params: List[dict], module: nn.Module, **kwargs) -> None:
        """Fill ``params`` with one group per (depth, weight decay or not), highest learning rate first.

        Args:
            params: The list of parameter groups handed to the optimizer; filled in place.
            module: The whole model (the constructor unwraps DDP before calling this).
        """
        prefix, backbone = _find_backbone(module)
        prefix = f"{prefix}." if prefix else ""
        backbone_groups = {prefix + name: group for name, group in backbone.layer_groups().items()}
        skip_decay = {prefix + name for name in backbone.no_weight_decay()}
        top = max(backbone_groups.values()) + 1

        groups: Dict[Tuple[int, bool], dict] = {}
        for name, param in module.named_parameters():
            if not param.requires_grad:
                continue
            group = backbone_groups.get(name, top)
            no_decay = param.ndim <= 1 or name in skip_decay
            key = (group, no_decay)
            if key not in groups:
                groups[key] = dict(params=[], lr=self.base_lr * self.decay_rate ** (top - group))
                if no_decay or self.base_wd is not None:
                    groups[key]["weight_decay"] = 0.0 if no_decay else self.base_wd
            groups[key]["params"].append(param)
        # Highest learning rate first: mmengine logs the first group's lr as the run's lr.
        params.extend(groups[key] for key in sorted(groups, key=lambda k: (-k[0], k[1])))
        print_log(f"layer-wise lr decay {self.decay_rate}: {top + 1} depth groups, lr scales "
                  f"{self.decay_rate ** top:.3g} (embeddings) to 1 (neck and heads)", logger="current")
