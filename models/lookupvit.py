"""LookupViT: a few compressed tokens get full ViT blocks, full-resolution lookup tokens get cheap layers.

Paper: "LookupViT: Compressing visual information to a limited number of tokens", Rajat Koner, Gagan Jain, Prateek
Jain, Volker Tresp, Sujoy Paul, ECCV 2024 - https://arxiv.org/abs/2407.12753
Official code: none released. Written from the paper; lucidrains/vit-pytorch ``look_vit.py`` was read for orientation
only (it differs: a separate high-res patchifier with a conv, sin-cos positions, a norm on the lookup residual stream,
one shared head) and nothing is taken from it.

The paper's idea (abstract): the block "operates by compressing information from higher resolution tokens to a fixed
number of tokens. These few compressed tokens undergo meticulous processing, while the higher-resolution tokens are
passed through computationally cheaper layers. Information sharing between these two token sets is enabled through a
bidirectional cross-attention mechanism" (multi-head bidirectional cross-attention, MHBC, Sec. 3).

What is implemented, step by step (D = width, N = lookup tokens, M = compressed tokens, h = heads):

1. Tokens (Sec. 3, overall architecture). Lookup tokens ``F_l``: the DeiT patch embedding of the image at full
   resolution (patch 16) plus a learned position embedding, N = H/16 * W/16, no CLS token. Compressed tokens ``F_p``:
   the patch-embedding map resized bilinearly to an h_p x w_p grid (5x5 by default) plus their own learned position
   embedding. Both embeddings are resampled (bicubic, as timm) when the grid they are used at differs from the one
   they were built for. Choices the paper leaves open: the resize takes the patch embeddings *before* the lookup
   position embedding, so each stream carries one position code, its own (the compressed one is what the grid change
   of multi-resolution training resamples); the bilinear resize is antialiased (``antialias=True``), so that at a
   14 -> 5 reduction every patch contributes to the compressed tokens instead of only the 4 samples nearest to each
   output (``jax.image.resize``, the usual resize of the JAX setting the paper comes from, antialiases likewise). It
   runs as two small matrix products (``bilinear_resize_matrix``), equal to ``F.interpolate``'s, which every ONNX
   exporter and runtime takes.
2. The LookupViT block (Sec. 3, the block's update rules), pre-LN, drop path on every residual branch:

   a. Information gathering, ``F_p += MHBC_{l->p}(LN(F_p), LN(F_l))``: multi-head cross-attention with queries from
      the compressed tokens and keys/values from the lookup tokens. Its logits ``A = q k^T / sqrt(d)`` (B, h, M, N)
      are kept for step c. The attention is written out, not fused, because step c reuses it; it is M x N per head.
   b. Representation refinement: a full pre-LN ViT block (self-attention + MLP, ratio 4) on the compressed tokens
      only. It *is* timm's ``Block`` (this block subclasses it), so its weights have DeiT's state-dict keys
      (``blocks.i.norm1/attn/norm2/mlp``) and a DeiT checkpoint fills them as they are; it runs fused SDPA.
   c. Global context infusion, ``F_l += MHBC_{p->l}(LN(F_l), LN(F_p))``: the lookup tokens receive from the refined
      compressed tokens through the attention of step a transposed, so no query/key projection is computed for it
      (the paper reuses the attention matrix); it has its own value projection (on the compressed tokens) and output
      projection. How the reused attention is normalized is not settled by the paper; ``reuse`` offers both readings:
      ``"softmax"`` (default) re-normalizes the transposed logits over the compressed axis, ``softmax(A^T)`` (each
      lookup token's weights over the M compressed tokens sum to 1, an attention in the usual sense);
      ``"transpose"`` takes the gathering's probabilities transposed, ``softmax(A)^T`` (weights sum to 1 over the
      lookup axis, so a lookup token receives a share of each compressed token).
   d. A cheaper MLP on the lookup tokens: ``F_l += MLP_l(LN(F_l))`` with hidden width ``lookup_mlp_ratio * D``
      (0.5 by default, vs 4 for the compressed tokens).

   Per block this costs 4 N D^2 (keys/values 2, infusion output projection 1, MLP at ratio 0.5: 1) + 15 M D^2 (query,
   gathering output, self-attention projections 4, MLP 8, infusion values) + 3 N M D + 2 M^2 D multiply-adds: linear
   in N, no N x N term anywhere. LookupViT-B at 224 with 5x5 compressed tokens counts 8.5 GMACs, 0.48x DeiT-B's
   17.6 (3x3: 6.7, 7x7: 11.2, 10x10: 17.0). The cross-attentions (6 D^2) and the lookup MLP (D^2) add parameters:
   137M for LookupViT-B against DeiT-B's 86.6M.
3. Head: a final norm per stream (``norm`` for the lookup tokens, DeiT's key; ``compressed_norm``), global average
   pooling of each stream, a linear head each (``head`` on the lookup stream, ``head_compressed``); the prediction is
   the average of the two heads' logits. Training may use both outputs: ``forward(x, both_heads=True)`` returns
   ``(lookup_logits, compressed_logits)``.

Open choices, with the reason for each:

* Layer norms: one per input of each sub-layer and per stream (gathering: one on the compressed queries, one on the
  lookup keys/values; infusion: one on the compressed values; lookup MLP: its own), none shared across streams, since
  the streams have different statistics; the infusion computes nothing from the lookup tokens (no queries), so it
  has no norm on them; no norm on a residual stream (pre-LN throughout, as ViT).
* Dropout: attention dropout on each probability map (the gathering's, the infusion's), after the reused logits or
  probabilities are taken, so both steps reuse the same clean attention; drop path at the block's rate (timm's linear
  rule) on all five residual branches.
* Projections: none shared between gathering and infusion beyond the reused logits (the paper keeps the attention,
  not the values); cross-attention widths and head count equal the ViT's (D, h).
* The lookup stream has no self-attention, only the two cross-attentions and its MLP (self-attention over N tokens is
  the N^2 term the method removes).
* Layer scale (``init_values``) applies to every residual branch when set; off for DeiT.
* Heads combined by averaging logits (the paper's inference rule). ``forward_head(pre_logits=True)`` returns the
  average of the two pooled features (B, D), as timm's DeiT-distilled does with its two heads: the pre-logit width is
  ``num_features`` and ``reset_classifier(0)`` makes ``forward`` return exactly that vector.
* ``forward_features`` returns both streams' normed tokens concatenated, compressed first: (B, M + N, D).
  ``forward_head`` needs M to split them: it is h_p * w_p for a fixed compressed grid; for a fractional one it
  depends on the input grid, so ``forward`` passes it and a direct ``forward_head`` call must (``num_compressed``).
* Flexible compressed size: ``compressed_size`` is an int, a pair (h_p, w_p) or a float in (0, 1], a fraction of the
  lookup grid's side (rounded, at least 1) for dense inputs whose grid varies; ``set_compressed_size`` changes it
  between calls without touching the weights (the paper trains one model at several compressed resolutions and picks
  one at inference). ``multi_resolution_size(step)`` draws the size of a training step from {3, 5, 7, 10} squared,
  seeded by the step so every rank draws the same.
* The compressed position embedding is stored at the grid the model is built with (5x5 by default) and resampled to
  other grids; the paper does not say at which resolution it keeps it.

Differences from the paper, and why:

* DeiT warm start (not in the paper, which trains from scratch): ``checkpoint_filter`` takes a DeiT/ViT state dict
  and fills every part that has a counterpart: patch embedding; the lookup position embedding and the compressed one
  (DeiT's, CLS entry dropped, resampled to each grid); the compressed stream's self-attention and MLP (the DeiT block,
  same keys); the gathering's q/k/v and output projection and the infusion's value and output projection from the
  same block's attention (the cross-attentions start as that block's attention between the two token sets); their
  norms from ``norm1``, the lookup MLP's norm from ``norm2``; the final norm into both stream norms; the classifier
  into both heads. The lookup MLP (width 0.5 D, DeiT's is 4 D) has no counterpart and keeps its initialization; what
  was not mapped, and what the checkpoint had that was not used, is logged.
* Dense maps (not in the paper): ``forward_intermediates`` / ``features_only`` / the OpenMMLab backbone return the
  lookup tokens of each requested block on the full grid (they are all kept). The dense configs use a fractional
  compressed size (0.36: 5x5 at 224, 12x12 at 512, 23x23 at 1024) so that the compression stays that of the paper's
  main setting whatever the input size; a fixed grid (the paper's "limited number of tokens") runs too, e.g. 5x5
  for the 4096 lookup tokens of a 1024 input, wherever it fits in the lookup grid.
"""
import logging
import math
import random
import re
from functools import partial
from numbers import Integral, Real
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from timm.layers import DropPath, LayerNorm, LayerScale, Mlp, get_norm_layer, resample_abs_pos_embed, trunc_normal_
from timm.models import generate_default_cfgs, named_apply, register_model
from timm.models.vision_transformer import Block, get_init_weights_vit
from torch import nn

from .layers import TokenRecord
from .token_vit import TokenPicture, TokenVisionTransformer, build_token_vit, deit_weights_cfg

__all__ = ["BidirectionalCrossAttention", "LookupViT", "LookupViTBlock", "MULTI_RESOLUTION_SIZES",
           "multi_resolution_size"]

_logger = logging.getLogger(__name__)

CompressedSize = Union[Tuple[int, int], float]
REUSE_MODES = ("softmax", "transpose")
MULTI_RESOLUTION_SIZES = (3, 5, 7, 10)  # the paper's multi-resolution compressed grids (side of a square grid)


def check_compressed_size(size: Any) -> CompressedSize:
    """``compressed_size`` as a pair (h, w) of ints >= 1 or a float fraction in (0, 1], or ValueError."""
    if isinstance(size, Integral) and not isinstance(size, bool):
        size = (int(size), int(size))
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(
            isinstance(s, Integral) and not isinstance(s, bool) and s >= 1 for s in size):
        return int(size[0]), int(size[1])
    if isinstance(size, Real) and not isinstance(size, (bool, Integral)) and 0.0 < size <= 1.0:
        return float(size)
    raise ValueError(f"compressed_size must be an int >= 1, a pair of ints >= 1 (h, w), or a float in (0, 1] (a "
                     f"fraction of the lookup grid's side), got {size!r}")


def multi_resolution_size(step: int, sizes: Sequence[int] = MULTI_RESOLUTION_SIZES, seed: int = 0) -> Tuple[int, int]:
    """Compressed grid for a multi-resolution training step, drawn uniformly from ``sizes`` (squares).

    The draw depends only on ``(seed, step)``, so every rank of a distributed run picks the same grid without
    communicating. Call ``model.set_compressed_size(multi_resolution_size(step))`` before each step.

    Args:
        step: Global training step (an int >= 0).
        sizes: Sides to draw from; the paper's are 3, 5, 7 and 10.
        seed: Run seed, to vary the sequence between runs.
    """
    if isinstance(step, bool) or not isinstance(step, Integral) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if not sizes or any(isinstance(s, bool) or not isinstance(s, Integral) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be a non-empty sequence of ints >= 1, got {sizes!r}")
    side = random.Random(int(seed) * 1_000_003 + int(step)).choice(list(sizes))
    return side, side


class BidirectionalCrossAttention(nn.Module):
    """MHBC (Sec. 3): gathering (compressed queries over lookup keys/values) and infusion reusing its attention.

    The infusion computes no queries or keys: it reuses the gathering's attention transposed, with its own value
    projection (on the compressed tokens) and output projection (into the lookup tokens).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            reuse: str = "softmax",
            qkv_bias: bool = True,
            proj_bias: bool = True,
            attn_drop: float = 0.0,
            proj_drop: float = 0.0,
            device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            dim: Token width D.
            num_heads: Attention heads h (D must be a multiple).
            reuse: 'softmax' (re-normalize the transposed logits over the compressed tokens) or 'transpose' (the
                gathering's probabilities, transposed).
            qkv_bias: Bias in the query/key/value projections.
            proj_bias: Bias in the output projections.
            attn_drop: Dropout on the attention probabilities.
            proj_drop: Dropout after the output projections.
        """
        super().__init__()
        if reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be a multiple of num_heads {num_heads}")
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.reuse = reuse
        self.q = nn.Linear(dim, dim, bias=qkv_bias, **dd)  # compressed tokens
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias, **dd)  # lookup tokens
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)  # gathered -> compressed
        self.v_infuse = nn.Linear(dim, dim, bias=qkv_bias, **dd)  # refined compressed tokens
        self.proj_infuse = nn.Linear(dim, dim, bias=proj_bias, **dd)  # infused -> lookup
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """(B, L, count * D) projections -> (count, B, h, L, d)."""
        B, L, _ = x.shape
        return x.reshape(B, L, count, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, L, d) -> (B, L, D)."""
        B, _, L, _ = x.shape
        return x.transpose(1, 2).reshape(B, L, self.num_heads * self.head_dim)

    def gather(self, compressed: torch.Tensor, lookup: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Information gathering, MHBC_{l->p}.

        Args:
            compressed: Normed compressed tokens, (B, M, D): the queries.
            lookup: Normed lookup tokens, (B, N, D): keys and values.

        Returns:
            The update of the compressed tokens (B, M, D), and what the infusion reuses, (B, h, M, N): the logits
            ``q k^T / sqrt(d)`` for reuse='softmax', their softmax over the lookup tokens for reuse='transpose'.
        """
        q = self._heads(self.q(compressed), 1)[0]
        k, v = self._heads(self.kv(lookup), 2).unbind(0)
        logits = (q * self.scale) @ k.transpose(-2, -1)
        probs = logits.softmax(dim=-1)
        out = self.proj_drop(self.proj(self._merge(self.attn_drop(probs) @ v)))
        return out, (logits if self.reuse == "softmax" else probs)

    def infuse(self, compressed: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
        """Global context infusion, MHBC_{p->l}, with the gathering's attention transposed.

        Args:
            compressed: Normed refined compressed tokens, (B, M, D): the values.
            reused: The second output of ``gather``, (B, h, M, N).

        Returns:
            The update of the lookup tokens, (B, N, D).
        """
        v = self._heads(self.v_infuse(compressed), 1)[0]
        # softmax over dim -2 of (M, N) is the softmax of the transposed (N, M) logits over M, without a copy
        probs = reused.softmax(dim=-2) if self.reuse == "softmax" else reused
        return self.proj_drop(self.proj_infuse(self._merge(self.attn_drop(probs).transpose(-2, -1) @ v)))


def bilinear_resize_matrix(in_size: int, out_size: int, like: torch.Tensor) -> torch.Tensor:
    """(out_size, in_size) matrix of an antialiased bilinear resize along one axis: ``F.interpolate(...,
    mode="bilinear", align_corners=False, antialias=True)`` is this matrix applied along each axis (a triangle filter
    widened by the downscaling factor, normalized per output).

    As matrix products the resize exports to every ONNX exporter and runtime (torch's TorchScript exporter has no
    antialiased resize, and ONNX Resize takes ``antialias`` only from opset 18), and costs next to nothing.
    """
    scale = in_size / out_size
    support = max(scale, 1.0)
    centres = (torch.arange(out_size, device=like.device, dtype=like.dtype) + 0.5) * scale
    positions = torch.arange(in_size, device=like.device, dtype=like.dtype) + 0.5
    weights = (1 - ((positions[None, :] - centres[:, None]) / support).abs()).clamp_min(0)
    return weights / weights.sum(dim=-1, keepdim=True)


class LookupViTBlock(Block):
    """One LookupViT block: gathering, refinement, infusion, lookup MLP (see the module docstring, step 2).

    It subclasses timm's ``Block``: ``norm1/attn/ls1/norm2/mlp/ls2`` are the refinement of the compressed tokens (step
    b) with DeiT's state-dict keys. The block keeps the ``(x, record) -> (x, record)`` protocol of the shared core:
    ``x`` are the lookup tokens (all kept) and the compressed tokens travel in ``record.side_tokens``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            lookup_mlp_ratio: float = 0.5,
            reuse: str = "softmax",
            qkv_bias: bool = True,
            proj_bias: bool = True,
            proj_drop: float = 0.0,
            attn_drop: float = 0.0,
            init_values: Optional[float] = None,
            drop_path: float = 0.0,
            act_layer: type = nn.GELU,
            norm_layer: type = LayerNorm,
            mlp_layer: type = Mlp,
            **kwargs,
    ) -> None:
        """
        Args:
            dim: Token width D.
            num_heads: Attention heads (self- and cross-attention).
            lookup_mlp_ratio: Hidden width of the lookup tokens' MLP over D, > 0.
            reuse: How the infusion reuses the gathering's attention: 'softmax' or 'transpose'.
            **kwargs: The rest of timm ``Block``'s arguments (``mlp_ratio`` is the compressed tokens' MLP ratio).
        """
        _check_lookup_mlp_ratio(lookup_mlp_ratio, dim)
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, proj_drop=proj_drop,
                         attn_drop=attn_drop, init_values=init_values, drop_path=drop_path, act_layer=act_layer,
                         norm_layer=norm_layer, mlp_layer=mlp_layer, **kwargs)
        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))

        def layer_scale() -> nn.Module:
            return LayerScale(dim, init_values=init_values, **dd) if init_values else nn.Identity()

        self.norm_gather = norm_layer(dim, **dd)  # compressed queries
        self.norm_lookup = norm_layer(dim, **dd)  # lookup keys/values
        self.cross = BidirectionalCrossAttention(dim, num_heads, reuse=reuse, qkv_bias=qkv_bias, proj_bias=proj_bias,
                                                 attn_drop=attn_drop, proj_drop=proj_drop, **dd)
        self.ls_gather = layer_scale()
        self.norm_infuse = norm_layer(dim, **dd)  # refined compressed tokens, the infusion's values
        self.ls_infuse = layer_scale()
        self.norm_lookup_mlp = norm_layer(dim, **dd)
        self.lookup_mlp = mlp_layer(in_features=dim, hidden_features=int(dim * lookup_mlp_ratio), act_layer=act_layer,
                                    drop=proj_drop, **dd)
        self.ls_lookup_mlp = layer_scale()
        self.drop_path_lookup = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def num_patch_tokens_out(self, num_patch_tokens: int, grid: Tuple[int, int]) -> int:
        return num_patch_tokens  # every lookup token is kept

    def forward(self, x: torch.Tensor, record: TokenRecord = TokenRecord()) -> Tuple[torch.Tensor, TokenRecord]:
        """Lookup tokens (B, N, D) and the record carrying the compressed tokens (B, M, D) -> both updated."""
        compressed = record.side_tokens
        if compressed is None:
            raise ValueError("a LookupViT block needs the compressed tokens in record.side_tokens (B, M, D)")
        gathered, reused = self.cross.gather(self.norm_gather(compressed), self.norm_lookup(x))
        compressed = compressed + self.drop_path1(self.ls_gather(gathered))
        compressed = super().forward(compressed)  # refinement: timm's pre-LN block, fused attention
        infused = self.cross.infuse(self.norm_infuse(compressed), reused)
        x = x + self.drop_path_lookup(self.ls_infuse(infused))
        x = x + self.drop_path_lookup(self.ls_lookup_mlp(self.lookup_mlp(self.norm_lookup_mlp(x))))
        return x, record._replace(side_tokens=compressed)


def _check_lookup_mlp_ratio(ratio: Any, dim: int) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, Real) or not ratio > 0 or int(dim * ratio) < 1:
        raise ValueError(f"lookup_mlp_ratio must be a number > 0 (hidden width lookup_mlp_ratio * {dim} >= 1), got "
                         f"{ratio!r}")
    return float(ratio)


class LookupViT(TokenVisionTransformer):
    """LookupViT classifier and dense backbone on timm's ``VisionTransformer``; see the module docstring."""

    zero_reduction = None  # a different architecture: no setting makes it a DeiT
    adds_parameters = True
    reduces_tokens = False  # the lookup tokens are all kept; the compression is the separate compressed stream

    @classmethod
    def check_pooling(cls, global_pool: str, class_token: bool, reg_tokens: int) -> None:
        if class_token or reg_tokens or global_pool not in ("avg", ""):
            raise ValueError(f"LookupViT has no CLS or register tokens and pools each stream by its average: "
                             f"global_pool must be 'avg' (or '' when the head is pruned), class_token False and "
                             f"reg_tokens 0; got global_pool={global_pool!r}, class_token={class_token}, "
                             f"reg_tokens={reg_tokens}")

    def __init__(
            self,
            compressed_size: Union[int, Tuple[int, int], float] = (5, 5),
            lookup_mlp_ratio: float = 0.5,
            reuse: str = "softmax",
            **kwargs,
    ) -> None:
        """
        Args:
            compressed_size: Compressed grid (h_p, w_p) (an int for a square), or a float in (0, 1]: that fraction of
                the lookup grid's side, rounded, for inputs of varying size.
            lookup_mlp_ratio: Hidden width of the lookup tokens' MLP over the width D, > 0.
            reuse: How the infusion reuses the gathering attention: 'softmax' (transposed logits re-normalized over the
                compressed tokens) or 'transpose' (the gathering's probabilities transposed).
            **kwargs: timm ``VisionTransformer`` arguments. LookupViT has no CLS or register tokens, pools by average,
                normalizes each stream before pooling and owns its position embeddings, so ``class_token``,
                ``reg_tokens``, ``global_pool``, ``fc_norm``, ``pos_embed``, ``no_embed_class`` and ``qk_norm`` may
                only be given their LookupViT values.
        """
        compressed_size = check_compressed_size(compressed_size)
        embed_dim = kwargs.get("embed_dim", 768)
        _check_lookup_mlp_ratio(lookup_mlp_ratio, embed_dim)
        if reuse not in REUSE_MODES:
            raise ValueError(f"reuse must be one of {REUSE_MODES}, got {reuse!r}")
        fixed = dict(class_token=False, reg_tokens=0, global_pool="avg", fc_norm=False, pos_embed="none",
                     no_embed_class=False, qk_norm=False, final_norm=True)
        wrong = {key: kwargs[key] for key in fixed if key in kwargs and kwargs[key] != fixed[key]}
        if wrong:
            raise ValueError(f"LookupViT does not support {wrong}: it has no CLS/register tokens, averages each stream "
                             f"after its own final norm and has its own position embeddings ({fixed})")
        kwargs.update(fixed)
        block_fn = partial(LookupViTBlock, lookup_mlp_ratio=lookup_mlp_ratio, reuse=reuse)
        super().__init__(block_fn=block_fn, **kwargs)
        self.compressed_size = compressed_size
        self.lookup_mlp_ratio = float(lookup_mlp_ratio)
        self.reuse = reuse

        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        dim = self.embed_dim
        self.lookup_pos_grid = tuple(self.patch_embed.grid_size)
        self.compressed_pos_grid = self.compressed_grid(self.lookup_pos_grid)
        self.lookup_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.lookup_pos_grid), dim, **dd))
        self.compressed_pos_embed = nn.Parameter(torch.zeros(1, math.prod(self.compressed_pos_grid), dim, **dd))
        norm_layer = get_norm_layer(kwargs.get("norm_layer")) or LayerNorm
        self.compressed_norm = norm_layer(dim, **dd)
        self.head_compressed = nn.Linear(dim, self.num_classes, **dd) if self.num_classes > 0 else nn.Identity()
        if kwargs.get("weight_init", "") != "skip":
            self._init_added_weights(self.weight_init_mode)

    def _init_added_weights(self, mode: str) -> None:
        """timm's initialization for what this class adds after timm's own init ran (position embeddings, head)."""
        trunc_normal_(self.lookup_pos_embed, std=0.02)
        trunc_normal_(self.compressed_pos_embed, std=0.02)
        self._init_head_compressed(mode)

    def _init_head_compressed(self, mode: str) -> None:
        head_bias = -math.log(self.num_classes) if "nlhb" in mode and self.num_classes > 0 else 0.0
        named_apply(get_init_weights_vit(mode, head_bias), self.head_compressed, name="head_compressed",
                    include_root=True)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        super().init_weights(mode, needs_reset)
        if hasattr(self, "head_compressed"):  # timm's constructor calls this before the added weights exist
            self._init_added_weights(mode or self.weight_init_mode)

    # ----------------------------------------------------------------------------------------------- compressed size
    def set_compressed_size(self, compressed_size: Union[int, Tuple[int, int], float]) -> None:
        """Change the compressed grid between calls (multi-resolution training, or a cheaper/better inference).

        Args:
            compressed_size: (h_p, w_p), an int for a square, or a float in (0, 1] (fraction of the lookup grid).
        """
        self.compressed_size = check_compressed_size(compressed_size)

    def compressed_grid(self, grid: Tuple[int, int]) -> Tuple[int, int]:
        """Compressed grid (h_p, w_p) for a lookup grid (H, W), or ValueError if it does not fit in it."""
        height, width = grid
        if isinstance(self.compressed_size, float):
            fraction = self.compressed_size
            return max(1, math.floor(fraction * height + 0.5)), max(1, math.floor(fraction * width + 0.5))
        h, w = self.compressed_size
        if h > height or w > width:
            ph, pw = self.patch_embed.patch_size
            raise ValueError(f"compressed grid {h}x{w} is larger than the lookup grid {height}x{width} of a "
                             f"{height * ph}x{width * pw} input: the compressed grid must fit in the lookup grid (use "
                             f"inputs of at least {h * ph}x{w * pw}, a smaller compressed_size, or a float fraction)")
        return h, w

    def num_compressed_tokens(self, img_size: Optional[Union[int, Sequence[int]]] = None) -> int:
        """Compressed tokens M for an input size (the model's default input size when None)."""
        grid = self.grid_size(self.patch_embed.img_size if img_size is None else img_size)
        return math.prod(self.compressed_grid(grid))

    def token_counts(self, img_size: Optional[Union[int, Sequence[int]]] = None) -> List[int]:
        """Lookup tokens in each block's output (all N kept); ValueError if the compressed grid does not fit."""
        counts = super().token_counts(img_size)
        self.num_compressed_tokens(img_size)
        return counts

    # ---------------------------------------------------------------------------------------------------- forward
    @staticmethod
    def _resampled(pos_embed: torch.Tensor, stored: Tuple[int, int], grid: Tuple[int, int]) -> torch.Tensor:
        """A (1, H0 * W0, D) position embedding on another grid (the parameter itself on its own grid)."""
        if tuple(grid) == tuple(stored):
            return pos_embed
        return resample_abs_pos_embed(pos_embed, new_size=grid, old_size=stored, num_prefix_tokens=0)

    def _start(self, x: torch.Tensor, track_sources: bool) -> Tuple[torch.Tensor, TokenRecord]:
        """Images -> lookup tokens (B, N, D) and the record carrying the compressed tokens (B, M, D) (step 1)."""
        grid = self.grid_size(tuple(x.shape[-2:]))
        compressed_grid = self.compressed_grid(grid)  # checked before any compute
        patches = self.patch_embed(x)  # (B, H, W, D)
        B, H, W, D = patches.shape
        lookup = patches.reshape(B, H * W, D) + self._resampled(self.lookup_pos_embed, self.lookup_pos_grid, grid)
        compressed = torch.einsum("ih,bhwd,jw->bijd", bilinear_resize_matrix(H, compressed_grid[0], patches),
                                  patches, bilinear_resize_matrix(W, compressed_grid[1], patches))
        compressed = compressed.reshape(B, -1, D) + self._resampled(
            self.compressed_pos_embed, self.compressed_pos_grid, compressed_grid)
        lookup = self.norm_pre(self.pos_drop(lookup))
        compressed = self.norm_pre(self.pos_drop(compressed))
        record = TokenRecord.start(lookup, 0, grid, track_sources)._replace(side_tokens=compressed)
        return lookup, record

    @property
    def pools_positions(self) -> bool:
        return False  # every lookup token is kept: the heads average the streams as they are (``forward_head``)

    def token_picture(
            self, index: int, x_in: torch.Tensor, record_in: TokenRecord, x_out: torch.Tensor,
            record_out: TokenRecord, query: Tuple[int, int],
    ) -> TokenPicture:
        """Block ``index``'s information gathering: the attention (averaged over heads, scaled to a maximum of 1)
        that the compressed token whose cell holds grid position ``query`` pays to the lookup tokens."""
        blk = self.blocks[index]
        grid = record_in.grid
        compressed_grid = self.compressed_grid(grid)
        cell = (query[0] * compressed_grid[0] // grid[0], query[1] * compressed_grid[1] // grid[1])
        _, reused = blk.cross.gather(blk.norm_gather(record_in.side_tokens), blk.norm_lookup(x_in))
        probs = reused.softmax(dim=-1) if blk.cross.reuse == "softmax" else reused  # (B, h, M, N)
        attn = probs[:, :, cell[0] * compressed_grid[1] + cell[1]].mean(1)  # (B, N)
        attn = attn / attn.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)
        return TokenPicture("attention", attn.reshape(-1, *grid),
                            f"compressed token {cell[0]},{cell[1]} of {compressed_grid[0]}x{compressed_grid[1]}", query)

    def _final_features(self, x: torch.Tensor, record: TokenRecord,
                        last_carried: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Both streams normed, compressed tokens first: (B, M + N, D)."""
        return torch.cat([self.compressed_norm(record.side_tokens), self.norm(x)], dim=1)

    def forward_head(
            self,
            x: torch.Tensor,
            pre_logits: bool = False,
            num_compressed: Optional[int] = None,
            both_heads: bool = False,
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Pool each stream, apply its head, average.

        Args:
            x: ``forward_features`` output, (B, M + N, D), compressed tokens first.
            pre_logits: Return the pooled features instead of logits.
            num_compressed: M; only needed when the compressed size is a fraction of the input grid.
            both_heads: Return ``(lookup, compressed)`` instead of their average.

        Returns:
            (B, num_classes) averaged logits (or (B, D) averaged pooled features with ``pre_logits``), or the pair.
        """
        if num_compressed is None:
            if isinstance(self.compressed_size, float):
                raise ValueError("forward_head cannot tell compressed from lookup tokens when compressed_size is a "
                                 "fraction of the input grid: pass num_compressed=model.num_compressed_tokens(img_size)"
                                 " or call the model itself")
            num_compressed = math.prod(self.compressed_size)
        compressed = self.head_drop(x[:, :num_compressed].mean(dim=1))
        lookup = self.head_drop(x[:, num_compressed:].mean(dim=1))
        if not pre_logits:
            lookup, compressed = self.head(lookup), self.head_compressed(compressed)
        return (lookup, compressed) if both_heads else (lookup + compressed) / 2

    def forward(self, x: torch.Tensor, both_heads: bool = False) -> Union[torch.Tensor, Tuple[torch.Tensor, ...]]:
        """Images (B, 3, H, W) -> averaged logits of the two heads, or ``(lookup, compressed)`` with ``both_heads``."""
        num_compressed = self.num_compressed_tokens(tuple(x.shape[-2:]))
        return self.forward_head(self.forward_features(x), num_compressed=num_compressed, both_heads=both_heads)

    # --------------------------------------------------------------------------------------------- timm's contract
    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New heads for both streams (``Identity`` for 0 classes).

        Args:
            num_classes: Classes of the new heads.
            global_pool: None or 'avg'; '' (what timm's feature extraction passes when it prunes the head) is taken
                too: LookupViT always averages each stream, and a pruned head is never called.
        """
        if global_pool is not None:
            type(self).check_pooling(global_pool, self.has_class_token, self.num_reg_tokens)
        super().reset_classifier(num_classes, None)
        like = self.lookup_pos_embed
        self.head_compressed = nn.Linear(self.embed_dim, num_classes, device=like.device, dtype=like.dtype) \
            if num_classes > 0 else nn.Identity()
        self._init_head_compressed(self.weight_init_mode)
        self.head_compressed.train(self.training)

    def prune_intermediate_layers(
            self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True,
    ) -> List[int]:
        """timm's pruning for dense maps; pruning the head also drops the compressed stream's final norm, which only
        the head uses (unused parameters would get no gradient, which DDP rejects)."""
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        if prune_head:
            self.compressed_norm = nn.Identity()
        return take_indices

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"lookup_pos_embed", "compressed_pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^(?:lookup_pos_embed|compressed_pos_embed|patch_embed|norm_pre)",
            blocks=[(r"^blocks\.(\d+)", None), (r"^(?:norm|compressed_norm)\.", (99999,))],
        )

    # -------------------------------------------------------------------------------------------- checkpoint filter
    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Warm start from a DeiT/ViT state dict (timm or official DeiT layout, weights under 'model' or not), or
        resample the position embeddings of a LookupViT state dict to this model's grids.

        What is mapped is listed in the module docstring; what could not be mapped (no counterpart, or a shape that
        differs) and what the checkpoint holds that is not used are logged as a warning.
        """
        for key in ("model", "state_dict"):
            if isinstance(state_dict.get(key), dict):
                state_dict = state_dict[key]
                break
        if "lookup_pos_embed" in state_dict:
            return self._filter_own(state_dict)
        return _warm_start_from_vit(self, state_dict)

    def _filter_own(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """A LookupViT state dict with its position embeddings resampled to this model's grids (a checkpoint does not
        record its grids: embeddings of another token count are taken as square)."""
        out = dict(state_dict)
        grids = (("lookup_pos_embed", self.lookup_pos_grid), ("compressed_pos_embed", self.compressed_pos_grid))
        for key, grid in grids:
            if key in out and out[key].shape[1] != math.prod(grid):
                out[key] = resample_abs_pos_embed(out[key], new_size=grid, old_size=_square_grid(out[key].shape[1]),
                                                  num_prefix_tokens=0)
        return out


def _square_grid(num_tokens: int) -> Tuple[int, int]:
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"cannot resample a position embedding of {num_tokens} tokens: only square grids are "
                         f"recognized in checkpoints")
    return side, side


def _compact(keys: Iterable[str]) -> List[str]:
    """Keys with block indices folded (``blocks.*.lookup_mlp.fc1.weight``), for a readable log line."""
    return sorted({re.sub(r"^blocks\.\d+\.", "blocks.*.", key) for key in keys})


def _warm_start_from_vit(model: LookupViT, source: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The LookupViT state dict that a DeiT/ViT state dict fills (see the module docstring); logs what is left."""
    target = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    used = set()

    def put(key: str, value: torch.Tensor, *sources: str) -> None:
        if key in target and value.shape == target[key].shape:
            out[key] = value
            used.update(sources)

    def copy(key: str, src: str) -> None:
        if src in source:
            put(key, source[src], src)

    for key in ("patch_embed.proj.weight", "patch_embed.proj.bias"):
        copy(key, key)
    if "pos_embed" in source:
        pos_embed = source["pos_embed"]
        num_prefix = pos_embed.shape[1] - math.isqrt(pos_embed.shape[1]) ** 2  # CLS (+ distillation) entries first
        patch_pos = pos_embed[:, num_prefix:]
        old_grid = _square_grid(patch_pos.shape[1])
        for key, grid in (("lookup_pos_embed", model.lookup_pos_grid),
                          ("compressed_pos_embed", model.compressed_pos_grid)):
            put(key, resample_abs_pos_embed(patch_pos, new_size=grid, old_size=old_grid, num_prefix_tokens=0),
                "pos_embed")
    final_norm = "norm" if "norm.weight" in source else "fc_norm"  # ViTs pooling by average keep it after pooling
    for stream_norm in ("norm", "compressed_norm"):
        for param in ("weight", "bias"):
            copy(f"{stream_norm}.{param}", f"{final_norm}.{param}")
    for head in ("head", "head_compressed"):
        for param in ("weight", "bias"):
            copy(f"{head}.{param}", f"head.{param}")

    dim = model.embed_dim
    for i in range(len(model.blocks)):
        prefix = f"blocks.{i}."
        for key in [k for k in source if k.startswith(prefix)]:
            copy(key, key)  # the refinement of the compressed tokens: DeiT's block, same keys
        for param in ("weight", "bias"):
            qkv, proj = source.get(f"{prefix}attn.qkv.{param}"), source.get(f"{prefix}attn.proj.{param}")
            sources = (f"{prefix}attn.qkv.{param}", f"{prefix}attn.proj.{param}")
            if qkv is not None:
                put(f"{prefix}cross.q.{param}", qkv[:dim], *sources)
                put(f"{prefix}cross.kv.{param}", qkv[dim:], *sources)
                put(f"{prefix}cross.v_infuse.{param}", qkv[2 * dim:], *sources)
            if proj is not None:
                put(f"{prefix}cross.proj.{param}", proj, *sources)
                put(f"{prefix}cross.proj_infuse.{param}", proj, *sources)
            for norm in ("norm_gather", "norm_lookup", "norm_infuse"):
                copy(f"{prefix}{norm}.{param}", f"{prefix}norm1.{param}")
            copy(f"{prefix}norm_lookup_mlp.{param}", f"{prefix}norm2.{param}")
            # the lookup MLP as a whole, only when it has DeiT's width (lookup_mlp_ratio == mlp_ratio): a lone fc2
            # bias of the same shape belongs to other hidden units
            fc1 = source.get(f"{prefix}mlp.fc1.weight")
            if fc1 is not None and fc1.shape == target[f"{prefix}lookup_mlp.fc1.weight"].shape:
                for fc in ("fc1", "fc2"):
                    copy(f"{prefix}lookup_mlp.{fc}.{param}", f"{prefix}mlp.{fc}.{param}")
        copy(f"{prefix}ls_gather.gamma", f"{prefix}ls1.gamma")
        copy(f"{prefix}ls_infuse.gamma", f"{prefix}ls1.gamma")
        copy(f"{prefix}ls_lookup_mlp.gamma", f"{prefix}ls2.gamma")

    not_mapped, not_used = _compact(set(target) - set(out)), _compact(set(source) - used)
    if not_mapped or not_used:
        _logger.warning("LookupViT warm start from a ViT checkpoint: kept the initialization of %s (no counterpart of "
                        "that shape); not used from the checkpoint: %s", not_mapped or "nothing",
                        not_used or "nothing")
    return out


def _cfg(size: str) -> Dict[str, Any]:
    return deit_weights_cfg(
        size, paper_ids="arXiv:2407.12753", paper_name="LookupViT", classifier=("head", "head_compressed"),
        notes=(f"DeiT-{size} ImageNet-1k weights warm-start the parts LookupViT shares with DeiT (see the module "
               "docstring); the lookup MLPs keep their initialization, so the model must be trained or fine-tuned. "
               "The paper trains from scratch and releases no weights.",),
    )


default_cfgs = generate_default_cfgs({
    f"lookupvit_{size}.deit_in1k_warmstart": _cfg(size) for size in ("tiny", "small", "base")
})


def _create_lookupvit(variant: str, pretrained: bool = False, **kwargs) -> LookupViT:
    return build_token_vit(LookupViT, variant, pretrained, **kwargs)


@register_model
def lookupvit_tiny(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT at DeiT-Ti width (192 dim, 3 heads), 5x5 compressed tokens, lookup MLP ratio 0.5."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_lookupvit("lookupvit_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookupvit_small(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT at DeiT-S width (384 dim, 6 heads), 5x5 compressed tokens, lookup MLP ratio 0.5."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_lookupvit("lookupvit_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def lookupvit_base(pretrained: bool = False, **kwargs) -> LookupViT:
    """LookupViT at DeiT-B width (768 dim, 12 heads), 5x5 compressed tokens, lookup MLP ratio 0.5."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_lookupvit("lookupvit_base", pretrained=pretrained, **dict(model_args, **kwargs))
