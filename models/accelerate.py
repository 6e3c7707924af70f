"""Apply a parameter-free family to the timm ViT a user already has, training-free: ``tokenzoo.accelerate``.

    model = tokenzoo.accelerate("vit_base_patch16_clip_224.openai", "tome", r=13, pretrained=True)
    model = tokenzoo.accelerate(my_finetuned_vit, "evit", keep_rate=0.7)

The families that add no parameters (EViT, ToMe, MCTF, MCTF-Fast, Expedit) keep timm's ``VisionTransformer`` state-dict
layout, so a model of any such family can carry the source model's weights as they are. timm keeps no record of the
arguments a model was built with, so they are read off the instance: widths, heads, MLP ratio, biases, norms (type and
eps), activation, layer scale, qk-norm, prefix tokens (CLS, registers), position embedding, pre-norm, final and fc
norms, pooling, patch size, input size and dropout / drop-path rates. The family model is built with them, the source's state dict is loaded
strictly (so anything misread fails loudly, never silently), and the source's pretrained cfg (mean/std, input size,
crop, interpolation) is carried over, so timm's data config keeps working. No table per architecture is kept.

What the family then does with the source's features: register tokens (DINOv2-reg) are protected like the CLS token
(never merged, dropped or clustered; left out of dense maps); a model without a CLS token has no protected token
(ToMe, MCTF and Expedit work on it; EViT, which scores with the CLS token, refuses it); a head that pools over
positions (average, max, attention pooling: CLIP/MAE/EVA style) pools the final tokens restored onto the full grid,
which for merging families is the size-weighted average (``TokenVisionTransformer.pools_positions``).

timm's ``Eva`` (EVA-02), and ViTs whose blocks or attention are not timm's ``Block`` / ``Attention`` (parallel blocks,
rotary attention), are refused with the reason: the families' blocks subclass those two.
"""
from functools import partial
from typing import Any, Callable, Dict, Tuple, Union

import timm
import torch
from timm.layers import Attention, LayerScale
from timm.models import VisionTransformer
from timm.models._features import FeatureGetterNet
from timm.models.vision_transformer import Block
from torch import nn

from .evit import EViT
from .expedit import Expedit, paper_cluster_loc
from .mctf import MCTF
from .token_vit import TokenVisionTransformer
from .tome import ToMe

__all__ = ["FAMILIES", "accelerate", "accelerate_families", "vit_kwargs"]


def _quarters(depth: int) -> Tuple[int, ...]:
    """EViT's and MCTF-Fast's reducing blocks (3, 6, 9 of 12) at the same share of any depth."""
    return depth // 4, depth // 2, 3 * depth // 4


# The parameter-free families by name: their class and their paper defaults for a model of a given depth (the user's
# keyword arguments win). A table of families, not of architectures.
FAMILIES: Dict[str, Tuple[type, Callable[[int], Dict[str, Any]]]] = {
    "evit": (EViT, lambda depth: dict(reduction_loc=_quarters(depth))),
    "tome": (ToMe, lambda depth: {}),
    "mctf": (MCTF, lambda depth: {}),
    "mctf_fast": (MCTF, lambda depth: dict(r=0.35, reduction_loc=_quarters(depth))),
    "expedit": (Expedit, lambda depth: dict(cluster_loc=paper_cluster_loc(depth))),
}


def accelerate_families() -> list:
    """The family names ``accelerate`` takes."""
    return sorted(FAMILIES)


def _layer(module: nn.Module) -> Callable[..., nn.Module]:
    """The constructor that rebuilds ``module``: its class, with the settings timm leaves to arguments (a norm's eps,
    GELU's approximation). Anything else it got wrong shows in the strict state-dict load."""
    if isinstance(module, nn.GELU):
        return partial(nn.GELU, approximate=module.approximate)
    if hasattr(module, "eps"):
        return partial(type(module), eps=module.eps)
    return type(module)


def vit_kwargs(model: nn.Module) -> Dict[str, Any]:
    """The ``VisionTransformer`` constructor arguments that rebuild ``model``'s architecture, read off its modules.

    Raises:
        ValueError: Not a timm ``VisionTransformer``, or a part the families cannot rebuild (with the reason).
    """
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"tokenzoo.accelerate takes timm VisionTransformer models; {type(model).__name__} is not one "
                         f"(timm's EVA-02 is the separate Eva class, with rotary attention the families cannot "
                         f"follow); pass a VisionTransformer such as 'vit_base_patch16_clip_224' or "
                         f"'vit_small_patch14_reg4_dinov2'")
    blocks = list(model.blocks)
    block, attn, mlp = blocks[0], blocks[0].attn, blocks[0].mlp
    if not isinstance(block, Block) or not isinstance(attn, Attention):
        raise ValueError(f"tokenzoo.accelerate needs timm's Block with its Attention in every block; this model has "
                         f"{type(block).__name__} / {type(attn).__name__}, which the families' blocks cannot replace")
    patch = model.patch_embed
    uses_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    kwargs = dict(
        img_size=tuple(patch.img_size), patch_size=tuple(patch.patch_size), in_chans=patch.proj.in_channels,
        num_classes=model.num_classes, global_pool=model.global_pool, embed_dim=model.embed_dim, depth=len(blocks),
        num_heads=attn.num_heads, mlp_ratio=mlp.fc2.in_features / model.embed_dim,
        qkv_bias=attn.qkv.bias is not None, qk_norm=not isinstance(attn.q_norm, nn.Identity),
        scale_attn_norm=not isinstance(attn.norm, nn.Identity),
        scale_mlp_norm=not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity),
        proj_bias=attn.proj.bias is not None,
        init_values=1.0 if isinstance(block.ls1, LayerScale) else None,  # layer scale on; its values are weights
        class_token=model.has_class_token, reg_tokens=model.num_reg_tokens, no_embed_class=model.no_embed_class,
        pos_embed="learn" if model.pos_embed is not None else "none",
        pre_norm=not isinstance(model.norm_pre, nn.Identity),
        final_norm=uses_fc_norm or not isinstance(model.norm, nn.Identity), fc_norm=uses_fc_norm,
        pool_include_prefix=model.pool_include_prefix, dynamic_img_pad=patch.dynamic_img_pad,
        drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p, attn_drop_rate=attn.attn_drop.p,
        proj_drop_rate=attn.proj_drop.p, drop_path_rate=getattr(blocks[-1].drop_path1, "drop_prob", 0.0),
        norm_layer=_layer(block.norm1), act_layer=_layer(mlp.act),
        mlp_layer=type(mlp),
    )
    if not isinstance(getattr(patch, "norm", nn.Identity()), nn.Identity):
        kwargs["embed_norm_layer"] = _layer(patch.norm)
    return kwargs


def accelerate(
        model_or_name: Union[str, nn.Module],
        family: str,
        pretrained: bool = False,
        features_only: bool = False,
        out_indices: Any = 4,
        **family_kwargs: Any,
) -> nn.Module:
    """A parameter-free family applied to a timm ViT, with its weights and pretrained cfg (see the module docstring).

    Args:
        model_or_name: A timm ``VisionTransformer`` instance, or a timm model name (``timm.create_model`` builds it,
            with ``pretrained``).
        family: One of ``FAMILIES``: 'evit', 'tome', 'mctf', 'mctf_fast', 'expedit'.
        pretrained: With a name, load timm's pretrained weights for it (needs internet or timm's cache).
        features_only: Return timm's feature wrapper (full-resolution maps of ``out_indices``), as
            ``timm.create_model(..., features_only=True)`` does for the registered families.
        out_indices: Blocks for ``features_only``.
        **family_kwargs: The family's settings (``r=13``, ``keep_rate=0.7``, ...), over its paper defaults for the
            model's depth; with the reduction off (``r=0``, ``keep_rate=1``, ``cluster_loc=-1``) the result computes
            exactly what the source model computes.

    Returns:
        The family model (or its feature wrapper), on the source's device and dtype, in the source's train/eval mode.

    Raises:
        ValueError: Unknown family, a source that is not a timm ViT the families can rebuild, a setting the family
            cannot honour (e.g. EViT without a CLS token), or a state dict that does not load strictly.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}: tokenzoo.accelerate applies the parameter-free families "
                         f"{accelerate_families()} (Sparsifiner and LookupViT add parameters and must be trained)")
    if isinstance(model_or_name, str):
        if not timm.is_model(model_or_name):
            raise ValueError(f"unknown timm model {model_or_name!r}; list ViTs with timm.list_models('vit_*')")
        source = timm.create_model(model_or_name, pretrained=pretrained)
    elif pretrained:
        raise ValueError("pretrained=True only applies to a model name; an instance keeps the weights it has")
    else:
        source = model_or_name
    if isinstance(source, TokenVisionTransformer):
        raise ValueError(f"the model is already a tokenzoo {type(source).__name__}; accelerate a timm ViT")
    kwargs = vit_kwargs(source)
    model_cls, defaults = FAMILIES[family]
    parameter = next(source.parameters())
    with torch.device(parameter.device):
        model = model_cls(**{**kwargs, **defaults(kwargs["depth"]), **family_kwargs}, weight_init="skip")
    model = model.to(parameter.dtype)
    missing, unexpected = model.load_state_dict(source.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"could not rebuild {type(source).__name__} as {model_cls.__name__}: the state dicts differ "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]}); report the source model")
    model.pretrained_cfg = dict(getattr(source, "pretrained_cfg", {}) or {})
    model.default_cfg = model.pretrained_cfg
    model.train(source.training)
    if features_only:
        return FeatureGetterNet(model, out_indices=out_indices, output_fmt="NCHW")
    return model
