"""MCTF: multi-criteria token fusion with one-step-ahead attention.

Paper: "Multi-criteria Token Fusion with One-step-ahead Attention for Efficient Vision Transformers", Sanghyeok Lee
et al., CVPR 2024 - https://arxiv.org/abs/2403.10030
Official code: https://github.com/mlvlab/MCTF

A reducing block fuses r tokens at its start, before attention (Sec. 3.4, "one-step-ahead attention"): it computes
its own attention on the unreduced tokens (q and k only), scores (A, B) pairs by similarity x informativeness x size,
each to the power 1 / tau (Eq. 3-6; tau_sim 1, tau_info 20, tau_size 40), fuses by bidirectional bipartite matching
(r // 2 tokens A to B, the rest B to the A tokens that stayed; CLS protected), with each fused token the average of
its parts weighted by attention received x size, and sizes adding up. The attention matrix is fused the same way and
reused for the block's output (v is computed on the fused tokens), not recomputed; the product of the fused matrix
with the values is evaluated in an equivalent order that never builds the fused matrix (see
``layers.fusion.one_step_ahead_attention``). Proportional attention (log size
added to the logits) is on. Defaults: r = 16 at blocks 1-11, which takes DeiT-S at 224 through
[197, 181, 165, ..., 37, 21] tokens (CLS included); MCTF-Fast fuses 35% of the patch tokens at blocks 3, 6 and 9
([197, 197, 197, 129, 129, 129, 85, 85, 85, 56, 56, 56]). ``consistency_training_loss`` is the paper's
token-reduction consistency training objective.

Differences from the official code, and why:

* The per-block r is a model setting (``set_r``), sizes travel in the immutable ``TokenRecord``; the official code
  keeps them in per-forward mutable state and runs the two training branches inside one forward.
  ``consistency_training_loss`` runs them as two forwards of the same weights, which is the same computation.
* Fusion sums with ``scatter_add`` (or a one-hot matrix product, ``scatter_free=True``) and divides, instead of
  ``scatter_reduce``, whose 'mean' exports to ONNX with wrong results.
* Attention dropout (0 in DeiT and in the paper's setting) applies to the matrix before fusion, not after: the
  fused matrix is never built.
* The floor of 10 remaining tokens is applied after a ratio r is turned into a token count (the official code
  compares the ratio itself); the two agree wherever the floor matters at the paper's settings (never at 224).
* The attention a token receives is floored at the dtype's smallest normal number (``received_attention``): where
  the official code returns NaN (a fused token whose parts all received exactly zero attention, seen with sharp
  attention and in float16), the fused token is the size-weighted average of its parts; nothing else changes.
* Equal edge scores are ordered by token index in every sort (the official code uses PyTorch's unstable sort),
  so onnxruntime, whose TopK orders ties by index, makes the same choices. Nearly equal scores remain a source of
  divergence: the official order of the set-B tokens after fusion (by edge score) decides the next block's A/B split,
  and two scores 1 ulp apart can swap between runtimes; measured on MCTF-Fast-S with random weights, 1 of 120 random
  batches of 3 images took another fusion path in onnxruntime (max diff 3.7e-2). ``order_by_score=False`` keeps them
  in index order (a deviation from the official order, for deployments that need PyTorch and ONNX to agree).
* Above ``attn_chunk_size`` tokens a fusing block never materializes its attention matrix: the received attention
  is summed over chunks of queries and the reuse of the matrix runs as fused attention with the logits computed
  again (``layers.fusion``); same result, O(chunk * N) memory instead of O(N^2) (400 MB per block at 4096 tokens).
* A float r is a fraction of the patch tokens of the block, for inputs of any size; ``merge_window`` offers ToMe for
  Stable Diffusion's windowed split at the first fusing block (not in the paper; for dense inputs).
* Any timm ViT (``tokenzoo.accelerate``): as in ToMe, the CLS token (if any) is protected in the matching, register
  tokens are held out of it (never fused), and a head that pools over positions pools the restored grid (size-weighted).
* DeiT-B uses the DeiT-S/T setting (r = 16): the official code ships no DeiT-B schedule.
* Dense maps (not in the paper): a fused token is copied back to every position it stands for.
"""
from functools import partial
from numbers import Integral, Real
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block

from .layers import (RSchedule, TokenAttention, TokenRecord, TokenSplit, bipartite_soft_matching, check_merge_window,
                     merge_sum, merge_weighted_average, multi_criteria_scores, num_b_tokens, one_step_ahead_attention,
                     one_step_ahead_attention_fused, received_attention, received_attention_chunked,
                     reduction_schedule, size_bias, tokens_to_reduce, with_registers, without_registers)
from .layers.schedule import Amount
from .token_vit import TokenVisionTransformer, build_token_vit, deit_weights_cfg, set_merge_schedule

__all__ = ["MCTF", "MCTFBlock", "consistency_training_loss"]

MIN_TOKENS = 10  # the official code never fuses below 10 tokens (CLS included)


class MCTFBlock(Block):
    """timm ``Block`` (same state-dict keys) that fuses ``r`` tokens at its start with one-step-ahead attention."""

    def __init__(
            self,
            *args,
            tau_sim: float = 1.0,
            tau_info: float = 20.0,
            tau_size: float = 40.0,
            bidirectional: bool = True,
            prop_attn: bool = True,
            scatter_free: bool = False,
            attn_chunk_size: int = 256,
            order_by_score: bool = True,
            **kwargs,
    ) -> None:
        kwargs["attn_layer"] = TokenAttention  # fusion needs the attention matrix
        super().__init__(*args, **kwargs)
        self.taus = (tau_sim, tau_info, tau_size)
        self.bidirectional = bidirectional
        self.prop_attn = prop_attn
        self.scatter_free = scatter_free
        self.attn_chunk_size = attn_chunk_size
        self.order_by_score = order_by_score
        self.r: Amount = 0  # tokens, or a fraction of the patch tokens; set by MCTF.set_r
        self.merge_window: Optional[int] = None  # windowed split (first fusing block only); set by MCTF.set_r

    def num_merges(self, num_patch_tokens: int, grid: Optional[Tuple[int, int]]) -> int:
        """Fusions this block makes: r (or the fraction r of the patch tokens), leaving at least 10 tokens, at most
        the set-A patch tokens (half of them for the alternating split, as the official code) and, with the
        bidirectional matching, at most twice the set-B tokens (half the fusions go B to A)."""
        if self.merge_window is None:
            cap = num_patch_tokens // 2
        else:
            num_b = num_b_tokens(num_patch_tokens, grid, self.merge_window)
            cap = num_patch_tokens - num_b
            if self.bidirectional:
                cap = min(cap, 2 * num_b)
        r = min(tokens_to_reduce(self.r, num_patch_tokens), num_patch_tokens + 1 - MIN_TOKENS)
        return max(0, min(r, cap))

    def num_patch_tokens_out(self, num_patch_tokens: int, grid: Tuple[int, int]) -> int:
        return num_patch_tokens - self.num_merges(num_patch_tokens, grid)

    def forward(self, x: torch.Tensor, record: TokenRecord = TokenRecord()) -> Tuple[torch.Tensor, TokenRecord]:
        """Tokens (B, prefix + N, C) -> (B, prefix + N - r, C), and the record followed through the block."""
        B, num_tokens, _ = x.shape
        num_prefix, num_registers = record.num_prefix, record.num_registers
        r = self.num_merges(num_tokens - num_prefix, record.grid)
        attn_bias = size_bias(record.size) if self.prop_attn and record.size is not None else None
        if r == 0:
            if attn_bias is None:
                return super().forward(x), record
            x = x + self.drop_path1(self.ls1(self.attn.forward_biased(self.norm1(x), attn_bias)))
            return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x)))), record

        # This block's attention on the unfused tokens: kept whole when small; otherwise its column means are taken
        # over chunks of queries here and its product with the fused values runs as fused attention below, so no
        # (B, H, N, N) matrix is ever allocated.
        q, k = self.attn.queries_keys(self.norm1(x))
        if num_tokens <= self.attn_chunk_size:
            attn = self.attn.probs(q, k, attn_bias)
            received = received_attention(attn)
        else:
            attn = None
            received = received_attention_chunked(q, k, self.attn.scale, attn_bias, self.attn_chunk_size)
        num_cls = num_prefix - num_registers  # protected in the matching, as the official code; registers aside
        split = TokenSplit.of(record.grid, self.merge_window, num_cls, x.device)
        size_in = None if record.size is None else without_registers(record.size, num_prefix, num_registers)
        scores = multi_criteria_scores(without_registers(x, num_prefix, num_registers),
                                       without_registers(received, num_prefix, num_registers), size_in, *self.taus,
                                       num_protected=num_cls, split=split)
        r_reverse = r - r // 2 if self.bidirectional else 0
        destination = bipartite_soft_matching(scores, r - r_reverse, r_reverse, split, self.order_by_score)
        destination = with_registers(destination, num_prefix, num_registers)
        num_new = num_tokens - r
        size = record.size if record.size is not None else x.new_ones(B, num_tokens, 1)
        with torch.no_grad():  # fusion weights, as in the official code: attention received x size
            weight = received.unsqueeze(-1) * size
            size = merge_sum(size, destination, num_new, self.scatter_free)
        x, _ = merge_weighted_average(x, weight, destination, num_new, self.scatter_free)
        values = self.attn.values(self.norm1(x))  # computed on the fused tokens
        if attn is not None:
            attn_out = one_step_ahead_attention(self.attn.attn_drop(attn), values, weight, destination,
                                                self.scatter_free)
        else:
            dropout_p = self.attn.attn_drop.p if self.training else 0.0
            attn_out = one_step_ahead_attention_fused(q, k, values, attn_bias, weight, destination, dropout_p,
                                                      self.scatter_free)
        x = x + self.drop_path1(self.ls1(self.attn.project(attn_out)))
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, record._replace(size=size).follow_all_tokens(destination, num_new)


class MCTF(TokenVisionTransformer):
    """Vision Transformer with MCTF token fusion at ``reduction_loc``; see the module docstring."""

    zero_reduction = dict(r=0)

    def __init__(
            self,
            r: RSchedule = 16,
            reduction_loc: Optional[Sequence[int]] = None,
            merge_window: Optional[int] = None,
            tau_sim: float = 1.0,
            tau_info: float = 20.0,
            tau_size: float = 40.0,
            bidirectional: bool = True,
            prop_attn: bool = True,
            scatter_free: bool = False,
            attn_chunk_size: int = 256,
            order_by_score: bool = True,
            **kwargs,
    ) -> None:
        """
        Args:
            r: Tokens fused per reducing block (int), the fraction of the patch tokens (float in [0, 1)), or a
                per-block list or (r, inflection) as ToMe's knob (see ``layers.reduction_schedule``).
            reduction_loc: 0-indexed blocks that fuse, for an int or float r; None: every block but the first (the
                paper's setting).
            merge_window: Windowed split (ToMe for Stable Diffusion) at the first fusing block; None for the paper's
                alternating split everywhere.
            tau_sim: Similarity temperature (0 switches the criterion off).
            tau_info: Informativeness temperature (0 switches it off).
            tau_size: Size temperature (0 switches it off).
            bidirectional: Bidirectional bipartite matching (A to B, then B to A).
            prop_attn: Proportional attention (log of the token size added to the attention logits).
            scatter_free: Fuse with one-hot matrix products instead of scatter_add (same result).
            attn_chunk_size: A fusing block with more tokens (CLS included) than this never builds its attention
                matrix: received attention over chunks of this many queries, the output with fused attention.
            order_by_score: Order the tokens after fusion as the official code does (set-B tokens by edge score);
                False keeps them in their original order, which makes exported graphs choose the same fusions as
                PyTorch even for nearly equal scores (see the module docstring).
            **kwargs: timm ``VisionTransformer`` arguments.
        """
        depth = kwargs.get("depth", 12)
        if reduction_loc is None and not isinstance(r, (list, tuple)):
            reduction_loc = tuple(range(1, depth))
        reduction_schedule(r, depth, reduction_loc)  # clear errors before building anything
        check_merge_window(merge_window)
        for name, tau in (("tau_sim", tau_sim), ("tau_info", tau_info), ("tau_size", tau_size)):
            if isinstance(tau, bool) or not isinstance(tau, Real) or tau < 0:
                raise ValueError(f"{name} must be a number >= 0 (0 switches the criterion off), got {tau!r}")
        if isinstance(attn_chunk_size, bool) or not isinstance(attn_chunk_size, Integral) or attn_chunk_size < 1:
            raise ValueError(f"attn_chunk_size must be an int >= 1 (queries per chunk), got {attn_chunk_size!r}")
        block_fn = partial(MCTFBlock, tau_sim=tau_sim, tau_info=tau_info, tau_size=tau_size,
                           bidirectional=bidirectional, prop_attn=prop_attn, scatter_free=scatter_free,
                           attn_chunk_size=attn_chunk_size, order_by_score=order_by_score)
        super().__init__(block_fn=block_fn, **kwargs)
        self.set_r(r, reduction_loc, merge_window)

    def set_r(self, r: RSchedule, reduction_loc: Optional[Sequence[int]] = None,
              merge_window: Optional[int] = None) -> None:
        """Set the fusion schedule (see ``__init__``); without ``reduction_loc`` and ``merge_window`` an int or float
        r keeps the current ones (consistency training switches r between its two forwards)."""
        if reduction_loc is None and not isinstance(r, (list, tuple)):
            reduction_loc, merge_window = getattr(self, "reduction_loc", None), getattr(self, "merge_window", None)
        set_merge_schedule(self.blocks, r, reduction_loc, merge_window)
        self.r, self.reduction_loc, self.merge_window = r, reduction_loc, merge_window


def consistency_training_loss(
        model: MCTF,
        images: torch.Tensor,
        targets: torch.Tensor,
        r_teacher_max: int = 8,
        weights: Tuple[float, float, float] = (1.0, 1.0, 3.0),
        confidence_threshold: float = 0.4,
        label_smoothing: float = 0.1,
        generator: Optional[torch.Generator] = None,
) -> Dict[str, torch.Tensor]:
    """MCTF's token-reduction consistency training objective (Sec. 3.5; the official training loop's settings).

    The model runs twice with shared weights: at its own r (the student) and at a smaller r' drawn uniformly from
    {0, ..., r_teacher_max - 1} once per batch (the teacher). Both are trained on the labels, and the student's
    final-norm CLS features are pulled towards the teacher's (detached) by a mean squared error, counted only for
    images the student already classifies with probability > ``confidence_threshold``.

    Args:
        model: An MCTF model with an int r; its r is restored afterwards.
        images: (B, 3, H, W).
        targets: (B,) class indices, or (B, K) soft targets (mixup); confidence then sums over the target classes.
        r_teacher_max: Exclusive upper bound of the teacher's r'.
        weights: Weights of (student CE, teacher CE, consistency).
        confidence_threshold: Minimum student probability of the target for an image to count in the consistency.
        label_smoothing: Label smoothing of both cross-entropies (hard targets).
        generator: Random generator for r'.

    Returns:
        'loss' (to backpropagate) and its parts 'ce_student', 'ce_teacher', 'consistency', plus 'r_teacher'.
    """
    if not isinstance(model.r, int):
        raise ValueError(f"consistency training needs an int r (tokens per block), the model has r={model.r!r}")
    if isinstance(r_teacher_max, bool) or not isinstance(r_teacher_max, Integral) or not 1 <= r_teacher_max:
        raise ValueError(f"r_teacher_max must be an int >= 1 (r' is drawn from 0 .. r_teacher_max - 1), "
                         f"got {r_teacher_max!r}")
    r_student = model.r
    r_teacher = int(torch.randint(0, r_teacher_max, (), generator=generator))
    student = model.forward_features(images)
    try:
        model.set_r(r_teacher)
        teacher = model.forward_features(images)
    finally:
        model.set_r(r_student)
    student_logits, teacher_logits = model.forward_head(student), model.forward_head(teacher)
    smoothing = label_smoothing if targets.ndim == 1 else 0.0
    ce_student = F.cross_entropy(student_logits, targets, label_smoothing=smoothing)
    ce_teacher = F.cross_entropy(teacher_logits, targets, label_smoothing=smoothing)

    per_image = (teacher[:, 0].detach() - student[:, 0]).square().mean(dim=-1)
    with torch.no_grad():
        probs = student_logits.softmax(dim=-1)
        target_mask = F.one_hot(targets, probs.shape[-1]).bool() if targets.ndim == 1 else targets > 0
        confident = ((probs * target_mask).sum(dim=-1) > confidence_threshold).to(per_image.dtype)
    consistency = (per_image * confident).sum() / confident.sum().clamp(min=1.0)
    loss = weights[0] * ce_student + weights[1] * ce_teacher + weights[2] * consistency
    return dict(loss=loss, ce_student=ce_student, ce_teacher=ce_teacher, consistency=consistency,
                r_teacher=torch.tensor(r_teacher))


default_cfgs = generate_default_cfgs({
    f"{name}_{size}.deit_in1k": deit_weights_cfg(size, paper_ids="arXiv:2403.10030", paper_name="MCTF")
    for name in ("mctf", "mctf_fast") for size in ("tiny", "small", "base")
})


def _create_mctf(variant: str, pretrained: bool = False, **kwargs) -> MCTF:
    return build_token_vit(MCTF, variant, pretrained, **kwargs)


def _variant_args(size: str, fast: bool) -> Dict[str, object]:
    dims = dict(tiny=(192, 3), small=(384, 6), base=(768, 12))[size]
    schedule = dict(r=0.35, reduction_loc=(3, 6, 9)) if fast else dict(r=16)
    return dict(patch_size=16, embed_dim=dims[0], depth=12, num_heads=dims[1], **schedule)


@register_model
def mctf_tiny(pretrained: bool = False, **kwargs) -> MCTF:
    """MCTF on DeiT-Ti, r = 16 at blocks 1-11."""
    return _create_mctf("mctf_tiny", pretrained=pretrained, **dict(_variant_args("tiny", fast=False), **kwargs))


@register_model
def mctf_small(pretrained: bool = False, **kwargs) -> MCTF:
    """MCTF on DeiT-S, r = 16 at blocks 1-11: 21 tokens at the end at 224."""
    return _create_mctf("mctf_small", pretrained=pretrained, **dict(_variant_args("small", fast=False), **kwargs))


@register_model
def mctf_base(pretrained: bool = False, **kwargs) -> MCTF:
    """MCTF on DeiT-B, r = 16 at blocks 1-11 (the DeiT-S/T setting; the paper gives none for DeiT-B)."""
    return _create_mctf("mctf_base", pretrained=pretrained, **dict(_variant_args("base", fast=False), **kwargs))


@register_model
def mctf_fast_tiny(pretrained: bool = False, **kwargs) -> MCTF:
    """MCTF-Fast on DeiT-Ti: 35% of the patch tokens fused at blocks 3, 6, 9."""
    return _create_mctf("mctf_fast_tiny", pretrained=pretrained, **dict(_variant_args("tiny", fast=True), **kwargs))


@register_model
def mctf_fast_small(pretrained: bool = False, **kwargs) -> MCTF:
    """MCTF-Fast on DeiT-S: 35% of the patch tokens fused at blocks 3, 6, 9."""
    return _create_mctf("mctf_fast_small", pretrained=pretrained, **dict(_variant_args("small", fast=True), **kwargs))


@register_model
def mctf_fast_base(pretrained: bool = False, **kwargs) -> MCTF:
    """MCTF-Fast on DeiT-B: 35% of the patch tokens fused at blocks 3, 6, 9."""
    return _create_mctf("mctf_fast_base", pretrained=pretrained, **dict(_variant_args("base", fast=True), **kwargs))
