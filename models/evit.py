"""EViT: keep the attentive patch tokens, fuse the rest.

Paper: "Not All Patches are What You Need: Expediting Vision Transformers via Token Reorganizations",
Youwei Liang et al., ICLR 2022 - https://arxiv.org/abs/2202.07800
Official code: https://github.com/youweiliang/evit

A reduction block (Sec. 3.2, Fig. 2) runs attention on all tokens and scores each patch token by the attention the
CLS token pays it, averaged over heads (Eq. 1). After the attention residual it keeps the ceil(keep_rate * N) best
patch tokens (N counts the fused token of an earlier block like any other) and fuses the others into one token, their
score-weighted sum (Eq. 2), appended at the end; the MLP then runs on the reduced set. Defaults reproduce the paper's
main setting for DeiT: keep rate 0.7 at blocks 3, 6 and 9 (0-indexed), fused token on. For DeiT-S at 224 that leaves
196, 139, 99 and 71 patch tokens (138, 97, 68 without the fused token).

Differences from the official code, and why:

* The keep rate is a model setting (constructor, or ``set_keep_rate`` between training steps for the warm-up of
  ``keep_rate_schedule``), not a forward argument: token counts stay static for an input size, so the model batches
  and exports to ONNX (DESIGN contract 6).
* The CLS attention row is computed beside fused SDPA instead of materializing the full attention matrix. It is the
  same row; with attention dropout in training the official code scores with the dropped-out matrix and this code with
  the clean row (DeiT trains with attention dropout 0, so the paper's setting is unaffected).
* Any timm ViT (``tokenzoo.accelerate``): register tokens are kept like the CLS token and not scored; a model
  without a CLS token is refused (EViT has no score without it); a head that pools over positions pools the final
  tokens restored onto the grid (a dropped position counts as the fused token that carries it).
* Dense maps (``forward_intermediates``, ``features_only``; not in the paper): kept tokens go back to their positions;
  a dropped position takes the fused token's value when there is one, since that token is what the network carries
  for it from then on; without a fused token nothing carries it, so it keeps the value it had in the last block output
  that still had it.
"""
import math
from functools import partial
from numbers import Real
from typing import Any, Sequence, Tuple

import torch
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from .layers import TokenAttention, TokenRecord, check_reduction_loc, destination_of_kept, keep_topk
from .token_vit import TokenVisionTransformer, build_token_vit, deit_weights_cfg

__all__ = ["EViT", "EViTBlock", "keep_rate_schedule"]


class EViTBlock(Block):
    """timm ``Block`` (same state-dict keys) that keeps the attentive tokens after attention when its keep rate < 1."""

    def __init__(self, *args, fuse_token: bool = True, **kwargs) -> None:
        kwargs["attn_layer"] = TokenAttention  # scoring needs the CLS attention row
        super().__init__(*args, **kwargs)
        self.fuse_token = fuse_token
        self.keep_rate = 1.0  # set by EViT.set_keep_rate

    def num_kept(self, num_patch_tokens: int) -> int:
        """Patch tokens kept out of ``num_patch_tokens`` (the official rounding: ceil(keep_rate * N))."""
        return min(num_patch_tokens, math.ceil(self.keep_rate * num_patch_tokens))

    def num_patch_tokens_out(self, num_patch_tokens: int, grid: Tuple[int, int]) -> int:
        num_kept = self.num_kept(num_patch_tokens)
        return num_kept + int(self.fuse_token) if num_kept < num_patch_tokens else num_patch_tokens

    def forward(self, x: torch.Tensor, record: TokenRecord = TokenRecord()) -> Tuple[torch.Tensor, TokenRecord]:
        """Tokens (B, prefix + N, C) -> (B, prefix + N_out, C), and the record followed through the block.

        EViT does not weight tokens by size (a fused token is a plain sum), so the record's sizes stay untouched.
        """
        num_prefix = record.num_prefix
        num_patch = x.shape[1] - num_prefix
        num_kept = self.num_kept(num_patch)
        if num_kept == num_patch:
            return super().forward(x), record

        attn_out, cls_attn = self.attn.forward_with_cls_attn(self.norm1(x), num_prefix)
        x = x + self.drop_path1(self.ls1(attn_out))
        patches, keep_index = keep_topk(x[:, num_prefix:], cls_attn, num_kept, self.fuse_token)
        x = torch.cat([x[:, :num_prefix], patches], dim=1)
        record = record.follow(destination_of_kept(keep_index, num_patch), patches.shape[1])
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, record


def _check_keep_rate(keep_rate: Any) -> float:
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, Real) or not 0.0 < keep_rate <= 1.0:
        raise ValueError(f"keep_rate must be a number in (0, 1] (1 keeps every token), got {keep_rate!r}")
    return float(keep_rate)


class EViT(TokenVisionTransformer):
    """Vision Transformer with EViT token reorganization at ``reduction_loc``; see the module docstring."""

    zero_reduction = dict(keep_rate=1.0)

    @classmethod
    def check_pooling(cls, global_pool: str, class_token: bool, reg_tokens: int) -> None:
        if not class_token:
            raise ValueError("EViT scores tokens with the CLS token's attention: a model without a class token "
                             "(class_token=False) has no score to keep tokens by; use ToMe or MCTF (tokenzoo."
                             "accelerate(model, 'tome')), which match tokens by similarity and need no CLS token")

    def __init__(
            self,
            keep_rate: float = 0.7,
            reduction_loc: Sequence[int] = (3, 6, 9),
            fuse_token: bool = True,
            **kwargs,
    ) -> None:
        """
        Args:
            keep_rate: Fraction of patch tokens each reduction block keeps, in (0, 1].
            reduction_loc: 0-indexed blocks that reduce.
            fuse_token: Fuse the inattentive tokens into one token instead of discarding them.
            **kwargs: timm ``VisionTransformer`` arguments.
        """
        depth = kwargs.get("depth", 12)
        _check_keep_rate(keep_rate)
        reduction_loc = check_reduction_loc(reduction_loc, depth)
        block_fn = partial(EViTBlock, fuse_token=fuse_token)
        super().__init__(block_fn=block_fn, **kwargs)
        self.reduction_loc = reduction_loc
        self.fuse_token = fuse_token
        self.set_keep_rate(keep_rate)

    def set_keep_rate(self, keep_rate: float) -> None:
        """Set the keep rate of the reduction blocks (used between training steps by the keep-rate warm-up)."""
        self.keep_rate = _check_keep_rate(keep_rate)
        for i, blk in enumerate(self.blocks):
            blk.keep_rate = self.keep_rate if i in self.reduction_loc else 1.0


def keep_rate_schedule(epoch: float, target: float, start_epoch: float = 10, decay_epochs: float = 100) -> float:
    """Keep rate for training at a (fractional) epoch: the official warm-up of the token reduction.

    1 for the first ``start_epoch`` epochs, then a cosine from 1 down to ``target`` over ``decay_epochs`` epochs, then
    ``target``. The defaults are the official training script's (``--shrink_start_epoch 10 --shrink_epochs 100``).
    Call ``model.set_keep_rate(keep_rate_schedule(epoch + step / steps_per_epoch, 0.7))`` before each step.
    """
    _check_keep_rate(target)
    if start_epoch < 0 or decay_epochs <= 0:
        raise ValueError(f"start_epoch must be >= 0 and decay_epochs > 0, got {start_epoch} and {decay_epochs}")
    if epoch < start_epoch:
        return 1.0
    if epoch >= start_epoch + decay_epochs:
        return target
    progress = (epoch - start_epoch) / decay_epochs
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * progress))


default_cfgs = generate_default_cfgs({
    f"evit_{size}.deit_in1k": deit_weights_cfg(size, paper_ids="arXiv:2202.07800", paper_name="EViT")
    for size in ("tiny", "small", "base")
})


def _create_evit(variant: str, pretrained: bool = False, **kwargs) -> EViT:
    return build_token_vit(EViT, variant, pretrained, **kwargs)


@register_model
def evit_tiny(pretrained: bool = False, **kwargs) -> EViT:
    """EViT on DeiT-Ti (192 dim, 3 heads), keep rate 0.7 at blocks 3/6/9."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_evit("evit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_small(pretrained: bool = False, **kwargs) -> EViT:
    """EViT on DeiT-S (384 dim, 6 heads), keep rate 0.7 at blocks 3/6/9."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_evit("evit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def evit_base(pretrained: bool = False, **kwargs) -> EViT:
    """EViT on DeiT-B (768 dim, 12 heads), keep rate 0.7 at blocks 3/6/9."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_evit("evit_base", pretrained=pretrained, **dict(model_args, **kwargs))
