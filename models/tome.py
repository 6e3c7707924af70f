"""ToMe: token merging, the baseline every token-reduction paper compares with.

Paper: "Token Merging: Your ViT But Faster", Daniel Bolya et al., ICLR 2023 - https://arxiv.org/abs/2210.09461
Official code: https://github.com/facebookresearch/ToMe (read for details only: its licence is non-commercial and
none of it is copied here).

Every block merges r tokens between attention and MLP (Sec. 3.1): the keys averaged over heads are the similarity
metric; tokens alternate between sets A and B, each A token's edge goes to its most cosine-similar B token, and the r
strongest edges merge (bipartite soft matching; the CLS token is never merged). As in the official code, a block
merges at most half of its patch tokens (r is capped at ``N // 2``), so any schedule runs on any input size (a small
detection crop, timm's reduced test sizes) and ``token_counts`` reports what runs. Merged tokens are the
size-weighted average of their parts and sizes add (Sec. 3.2); proportional attention adds log(size) to the attention
logits (Eq. 1), on by default as in the paper's off-the-shelf results. ``r`` takes the official knob: an int, a
per-block list, or ``(r, inflection)``. The default r = 13 is the paper's DeiT setting:
DeiT-S at 224 ends with 41 tokens (40 patch tokens and CLS), and the sizes always sum to 197.

Differences from the official code, and why:

* No monkeypatching and no per-forward mutable state: the per-block r is a model setting and sizes travel in the
  immutable ``TokenRecord`` beside the tokens (re-entrant, exportable, compilable).
* Merging is one ``scatter_add`` of (size * x, size) into the new tokens followed by a division, or a one-hot matrix
  product (``scatter_free=True``) for runtimes without scatter; the official ``scatter_reduce`` is not used (its
  'mean' mode exports to ONNX with wrong results).
* Dense maps (not in the paper): a merged token is copied back to every position it stands for (ToMe's "unmerge").
* Any timm ViT (``tokenzoo.accelerate``): the CLS token, when there is one, is protected in the matching as in the
  official code (first token of set A); register tokens are held out of the matching (never merged) and stay in
  front; a head that pools over positions pools the final tokens restored onto the grid, which is the size-weighted
  average the official code uses for MAE models (without per-forward state to carry the sizes).
"""
from functools import partial
from typing import Optional, Sequence, Tuple

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from .layers import (RSchedule, TokenAttention, TokenRecord, TokenSplit, bipartite_soft_matching, check_merge_window,
                     cosine_scores, merge_weighted_average, num_b_tokens, reduction_schedule, size_bias,
                     tokens_to_reduce, with_registers, without_registers)
from .layers.schedule import Amount
from .token_vit import TokenVisionTransformer, build_token_vit, deit_weights_cfg, set_merge_schedule

__all__ = ["ToMe", "ToMeBlock"]


class ToMeBlock(Block):
    """timm ``Block`` (same state-dict keys) that merges ``r`` tokens between attention and MLP."""

    def __init__(self, *args, prop_attn: bool = True, scatter_free: bool = False, **kwargs) -> None:
        kwargs["attn_layer"] = TokenAttention  # merging needs the keys, proportional attention a bias
        super().__init__(*args, **kwargs)
        self.prop_attn = prop_attn
        self.scatter_free = scatter_free
        self.r: Amount = 0  # tokens, or a fraction of the patch tokens; set by ToMe.set_r
        self.merge_window: Optional[int] = None  # windowed split (first merging block only); set by ToMe.set_r

    def num_merges(self, num_patch_tokens: int, grid: Optional[Tuple[int, int]]) -> int:
        """Merges this block makes: r (or the fraction r of the patch tokens), capped at half the patch tokens for the
        alternating split (the official cap), at the set-A patch tokens (1 - 1/s^2) for the windowed one."""
        if self.merge_window is None:
            cap = num_patch_tokens // 2
        else:
            cap = num_patch_tokens - num_b_tokens(num_patch_tokens, grid, self.merge_window)
        return min(tokens_to_reduce(self.r, num_patch_tokens), cap)

    def num_patch_tokens_out(self, num_patch_tokens: int, grid: Tuple[int, int]) -> int:
        return num_patch_tokens - self.num_merges(num_patch_tokens, grid)

    def forward(self, x: torch.Tensor, record: TokenRecord = TokenRecord()) -> Tuple[torch.Tensor, TokenRecord]:
        """Tokens (B, prefix + N, C) -> (B, prefix + N - r, C), and the record followed through the block."""
        num_tokens, num_prefix, num_registers = x.shape[1], record.num_prefix, record.num_registers
        r = self.num_merges(num_tokens - num_prefix, record.grid)
        attn_bias = size_bias(record.size) if self.prop_attn and record.size is not None else None
        if r == 0 and attn_bias is None:
            return super().forward(x), record

        attn_out, metric = self.attn.forward_with_keys(self.norm1(x), attn_bias)
        x = x + self.drop_path1(self.ls1(attn_out))
        if r > 0:
            num_cls = num_prefix - num_registers  # protected in the matching, as the official code; registers aside
            split = TokenSplit.of(record.grid, self.merge_window, num_cls, x.device)
            scores = cosine_scores(without_registers(metric, num_prefix, num_registers), num_cls, split)
            destination = with_registers(bipartite_soft_matching(scores, r, 0, split), num_prefix, num_registers)
            size = record.size if record.size is not None else x.new_ones(x.shape[0], num_tokens, 1)
            x, size = merge_weighted_average(x, size, destination, num_tokens - r, self.scatter_free)
            record = record._replace(size=size).follow_all_tokens(destination, num_tokens - r)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, record


class ToMe(TokenVisionTransformer):
    """Vision Transformer with ToMe token merging; see the module docstring."""

    zero_reduction = dict(r=0)

    def __init__(
            self,
            r: RSchedule = 13,
            reduction_loc: Optional[Sequence[int]] = None,
            merge_window: Optional[int] = None,
            prop_attn: bool = True,
            scatter_free: bool = False,
            **kwargs,
    ) -> None:
        """
        Args:
            r: Tokens merged per block: an int, a float fraction of the patch tokens, a per-block list of those, or
                (r, inflection) (see ``layers.reduction_schedule``).
            reduction_loc: Blocks that merge, for an int or float r; every block when None (the paper).
            merge_window: Windowed split (ToMe for Stable Diffusion) at the first merging block: one set-B token per
                window x window cell of the grid; None for the paper's alternating split everywhere.
            prop_attn: Proportional attention (log of the token size added to the attention logits).
            scatter_free: Merge with a one-hot matrix product instead of scatter_add (same result).
            **kwargs: timm ``VisionTransformer`` arguments.
        """
        reduction_schedule(r, kwargs.get("depth", 12), reduction_loc)  # clear errors before building anything
        check_merge_window(merge_window)
        block_fn = partial(ToMeBlock, prop_attn=prop_attn, scatter_free=scatter_free)
        super().__init__(block_fn=block_fn, **kwargs)
        self.set_r(r, reduction_loc, merge_window)

    def set_r(self, r: RSchedule, reduction_loc: Optional[Sequence[int]] = None,
              merge_window: Optional[int] = None) -> None:
        """Set the merge schedule (see ``__init__``)."""
        set_merge_schedule(self.blocks, r, reduction_loc, merge_window)
        self.r, self.reduction_loc, self.merge_window = r, reduction_loc, merge_window


default_cfgs = generate_default_cfgs({
    f"tome_{size}.deit_in1k": deit_weights_cfg(size, paper_ids="arXiv:2210.09461", paper_name="ToMe")
    for size in ("tiny", "small", "base")
})


def _create_tome(variant: str, pretrained: bool = False, **kwargs) -> ToMe:
    return build_token_vit(ToMe, variant, pretrained, **kwargs)


@register_model
def tome_tiny(pretrained: bool = False, **kwargs) -> ToMe:
    """ToMe on DeiT-Ti (192 dim, 3 heads), r = 13 in every block."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, r=13)
    return _create_tome("tome_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tome_small(pretrained: bool = False, **kwargs) -> ToMe:
    """ToMe on DeiT-S (384 dim, 6 heads), r = 13 in every block: 41 tokens at the end at 224."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, r=13)
    return _create_tome("tome_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def tome_base(pretrained: bool = False, **kwargs) -> ToMe:
    """ToMe on DeiT-B (768 dim, 12 heads), r = 13 in every block."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, r=13)
    return _create_tome("tome_base", pretrained=pretrained, **dict(model_args, **kwargs))
