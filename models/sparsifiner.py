"""Sparsifiner: learned instance-dependent sparse attention.

Paper: "Sparsifiner: Learning Sparse Instance-Dependent Attention for Efficient Vision Transformers", Cong Wei et
al., CVPR 2023 - https://arxiv.org/abs/2303.13755
Official code: https://github.com/lim142857/Sparsifiner (``src/models/sparsifiner.py``, ``src/losses.py``,
``src/main.py``, ``experiments-results-analysis/experiments/sparsifiner_default_config.yaml``); read, not copied.

Each block gets a light connectivity predictor (Sec. 3, Fig. 2; the official ``MaskPredictor``) that decides, per
image, head and query, which keys the query attends to:

* reduced queries and keys: one Linear head_dim -> head_dim / ``reduce_c_factor`` each, shared across heads
  (``proj_c_q``, ``proj_c_k``);
* the reduced keys projected along the token axis onto K = (197 // ``reduce_n_factor``) basis tokens (``proj_n``,
  one row per token, the CLS token's first);
* basis coefficients = softmax over the K basis tokens of (reduced query . projected key) * num_heads ** -0.5, the
  official scale (not head_dim ** -0.5: a quirk of the official code, kept because it shapes the coefficients the
  official weights were trained with); only the top ``basis_topk`` (8) per query are kept;
* the sparse basis = |``proj_back_n``| transposed, entries <= ``basis_threshold`` (2e-2) set to 0;
* approximate attention = coefficients x basis (one row per patch query, one column per key, the CLS key included),
  and the top ceil(``attn_keep_rate`` * N) keys of each row form the binary connectivity mask. The CLS query row is
  dense (it is not predicted), the CLS key column is predicted like any other.

Attention then runs only over each query's connected keys (``tokenzoo.layers.sparse_attention``): the masked path
(one fused SDPA call with the mask: training, reference, ONNX export) or the gather path (selected keys only, in
query chunks, memory bounded). ``sparse_path="auto"`` (default) takes the gather path in eval mode from
``GATHER_MIN_TOKENS`` = 65 tokens on; training and export always use the masked path. Measured side by side in one
process (``tools/sparsifiner_attention.py``: DeiT-S heads, batch 1, one thread, keep 0.25, predictor and selection
included, fastest of 20 runs; approximate, shared 2-core machine), masked vs gather per block: 0.47 vs 0.54 ms at 37
tokens, 0.85 vs 0.85 ms at 65, 1.66 vs 1.56 at 101, 4.9 vs 4.4 at 197, 88 vs 65 at 577. On this CPU both stay
slower than DeiT's dense fused attention (0.90 ms at 197 tokens): the top-k selection of each query's keys alone
(2.2 ms at 197) costs more than the attention it saves; the sparse attention itself, given the selection, is about
as fast as dense attention (1.0 ms at 197).

Defaults are the official default config (``sparsifiner_default_config.yaml``): keep rate 0.25 in every block,
reduce_n 6, reduce_c 2, basis top-8, basis threshold 2e-2, no token sparsity. ``token_keep_rate`` < 1 adds the
paper's attention + token sparsity setting (official ``TOKEN_PRUNING_LOC`` / ``TOKEN_KEEP_RATE_BASE``): at blocks
``reduction_loc`` (3, 6, 9) the patch tokens are scored as the official code scores them (the CLS query's attention
averaged over heads) and the top ceil(rate * N) are kept (``keep_topk`` of the shared core), e.g. 196, 138, 97, 68
patch tokens for DeiT-S at 224 with rate 0.7.

Training follows the official two phases (``src/main.py``, the default yaml): ``set_training_phase(model,
"predictor")`` trains the predictors alone, with dense attention in the backbone, on ``predictor_distillation_loss``
(approximate attention against a dense teacher's, summed MSE, weight 0.01; 5 epochs); ``set_training_phase(model,
"backbone")`` then trains the backbone with the predictors frozen on ``backbone_distillation_loss`` (CE 1.0 + KL
distillation 0.5 + last-layer token MSE 0.5; 45 epochs). ``teacher_outputs`` gives the teacher's targets and
``Sparsifiner.forward_train`` the student's. The official schedule around them (the trainer's business): AdamW,
weight decay 0.05, 168 images per GPU on 8 GPUs; predictor phase lr 3e-4 -> 2e-4 (cosine, 3 warm-up epochs),
backbone phase lr 8e-5 -> 2e-6 (cosine, 3 warm-up epochs), each phase with its own optimizer over its parameters.

Differences from the official code, and why:

* Any input size. The official projections are tied to 197 tokens (224 px). Here ``proj_n`` and ``proj_back_n`` have
  one row per token of the model's grid (``img_size``): a checkpoint's rows are resampled to it by
  ``checkpoint_filter``, and to other input grids on the fly, as the position embedding is (bicubic over the patch
  grid, CLS row kept). ``proj_n``'s resampled patch rows are scaled by old / new patch count so that the projected
  keys, a sum over tokens, keep their magnitude. K is reduce_n_factor's share of the tokens at 224 px whatever
  ``img_size`` (official: at the training size), so models built for other sizes (e.g. 1024 px in detection) take
  checkpoints trained at 224. At the trained grid nothing changes.
* Token sparsity removes the pruned tokens (the official code zero-masks them and keeps computing them, which saves
  nothing). Kept tokens see the same computation except in the CLS query row: the official dense CLS row also
  spreads softmax mass over the zeroed tokens (logit 0, value 0); here they are gone. The tokens are kept after the
  attention, before the MLP (the official code masks after the MLP: the same result for the kept tokens). Each
  reduction block keeps ceil(rate * its input tokens) (official: ceil(rate ** i * 196) from the full count; equal at
  224: 138, 97, 68). The attention budget stays ceil(keep * (P + 1)) of the full grid, as official, capped at the
  tokens left, CLS included (official: at the patch tokens left, which can drop the CLS key in dense rows).
* The predictor is computed reassociated: projected keys K~^T = (P_n^T k) W_k^T + (P_n^T 1) b_k^T and coefficient
  logits q (K~^T W_q)^T + 1 (K~^T b_q)^T, the same function as the official (q W_q^T + b_q)((k W_k^T + b_k)^T P_n)
  with fewer multiply-adds (DeiT-S at 224: 5.6 instead of 7.3 M per block); the coefficients of the CLS row, which
  the official code computes and discards, are not computed. Rounding differs at the 1e-7 level.
* The top-8 coefficients are chosen on the logits (the softmax's order, without the rounding of its exponential) and
  every entry >= the 8th is kept (no scatter): different from the official top-k + scatter only on exact ties.
* Keys whose approximate score is exactly 0 (no kept basis token reaches them) are taken in key order when a row has
  fewer nonzero scores than its budget (official: in whatever order the top-k kernel returns them), so every runtime
  and both paths select the same keys.
* When the budget covers every key (keep rate 1, or very few tokens), attention is dense and the predictor does not
  run (the official code runs it and masks nothing: the same result).
* The predictor parameters are frozen (``requires_grad=False``) except in the predictor phase: the official code only
  ever updates them there (separate optimizers), and the task loss never reaches them (the mask is detached), so a
  fine-tune (classification, detection, segmentation) leaves them as loaded.
* Selections are discontinuous: where two candidates' scores are closer than rounding (~1e-7 relative), two
  implementations can choose differently (as the official code run on two GPUs can). Between two float32 orders of
  the same products this happened in about 1 patch row in 20,000 (DeiT-Ti, random weights), moving the logits by up
  to ~2e-4, so an ONNX export matches PyTorch to < 1e-4 on most inputs, not by construction on all.
* Not implemented (official options off by default): ``SHARE_INOUT_PROJ``, threshold instead of top-k for the
  coefficients and the connectivity, the L1/ratio/budget losses and the attention self-distillation phase.
"""
import logging
import math
from functools import partial
from numbers import Real
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import is_exporting, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models.vision_transformer import Block
from torch import nn

from .layers import (TokenAttention, TokenRecord, check_reduction_loc, cls_attention, connectivity_index,
                     connectivity_mask, destination_of_kept, gathered_sparse_attention, keep_top_coefficients,
                     keep_topk, masked_sparse_attention, resample_token_projection, sparsify_basis)
from .token_vit import (TokenPicture, TokenVisionTransformer, build_token_vit, check_one_cls_token, deit_weights_cfg,
                        to_2tuple_size)

__all__ = [
    "ConnectivityPredictor", "GATHER_MIN_TOKENS", "Sparsifiner", "SparsifinerAttention", "SparsifinerBlock",
    "backbone_distillation_loss", "mhsa_gmacs", "predictor_distillation_loss", "set_training_phase",
    "teacher_outputs",
]

_logger = logging.getLogger(__name__)

# Tokens (CLS included) from which sparse_path="auto" takes the gather path in eval mode; see the module docstring.
GATHER_MIN_TOKENS = 65
SPARSE_PATHS = ("auto", "masked", "gather")
REFERENCE_IMG_SIZE = 224  # the official predictor's K is counted at the paper's training size
PHASES = ("predictor", "backbone")


class ConnectivityPredictor(nn.Module):
    """The connectivity predictor of one block (official ``MaskPredictor``, same parameter names and shapes).

    Produces, for the patch queries of a block, sparse basis coefficients and the sparse basis whose product is the
    approximate attention; the connectivity mask is its row-wise top-k (``tokenzoo.layers.sparse_attention``).
    """

    def __init__(
            self,
            head_dim: int,
            num_heads: int,
            grid: Tuple[int, int],
            num_basis: int,
            reduce_c_factor: float = 2,
            basis_topk: int = 8,
            basis_threshold: float = 2e-2,
    ) -> None:
        """
        Args:
            head_dim: Channels per head of the queries and keys.
            num_heads: Heads (the official logit scale is num_heads ** -0.5).
            grid: (H, W) patch grid the token-axis projections are stored for (the model's ``img_size`` grid).
            num_basis: K, basis tokens.
            reduce_c_factor: head_dim / reduced channels.
            basis_topk: Basis coefficients kept per query.
            basis_threshold: Basis entries whose absolute value is at most this are 0.
        """
        super().__init__()
        self.grid = tuple(grid)
        self.scale = num_heads ** -0.5  # official quirk: num_heads, not head_dim
        self.basis_topk = basis_topk
        self.basis_threshold = basis_threshold
        reduced_c = int(head_dim // reduce_c_factor)
        num_tokens = self.grid[0] * self.grid[1] + 1
        self.proj_c_q = nn.Linear(head_dim, reduced_c)
        self.proj_c_k = nn.Linear(head_dim, reduced_c)
        self.proj_n = nn.Parameter(torch.zeros(num_tokens, num_basis))
        self.proj_back_n = nn.Parameter(torch.zeros(num_tokens, num_basis))
        self.init_weights()
        self.requires_grad_(False)  # trained only in the predictor phase (set_training_phase)

    def init_weights(self) -> None:
        """Official init: truncated normal, std 0.02 (the Linear layers get timm's, which is the same)."""
        trunc_normal_(self.proj_n, std=.02)
        trunc_normal_(self.proj_back_n, std=.02)

    def token_projections(
            self, grid: Tuple[int, int], rows: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``proj_n`` and ``proj_back_n`` for an input grid, optionally restricted to the current tokens.

        Args:
            grid: (H, W) patch grid of the input.
            rows: (B, N) row of each current token (0 = CLS, 1 + p = patch position p), or None for all tokens.

        Returns:
            Two (1 + H * W, K) tensors, or (B, N, K) with ``rows``.
        """
        proj_n = resample_token_projection(self.proj_n, grid, self.grid, preserve_sum=True)
        proj_back = resample_token_projection(self.proj_back_n, grid, self.grid)
        if rows is None:
            return proj_n, proj_back
        return proj_n[rows], proj_back[rows]

    def coefficient_logits(self, q: torch.Tensor, k: torch.Tensor, proj_n: torch.Tensor) -> torch.Tensor:
        """Logits of the patch queries' basis coefficients (softmax over the last axis gives the coefficients).

        Args:
            q, k: (B, H, N, D) queries and keys, CLS first.
            proj_n: (N, K), or (B, N, K) per image, token-axis projection of the current tokens.

        Returns:
            (B, H, N - 1, K).
        """
        B, H, N, D = k.shape
        # Reassociated (module docstring), in transposed form so that the big products have the K basis rows on the
        # left: K~^T = (P^T k) W_k^T + (P^T 1) b_k^T (K x c) and logits = q (K~^T W_q)^T + 1 (K~^T b_q)^T, scale
        # folded into the small factors. P^T k is one product for all heads (k's heads are adjacent in memory).
        projected = (proj_n.transpose(-2, -1) @ k.transpose(1, 2).reshape(B, N, H * D))
        projected = projected.view(B, -1, H, D).transpose(1, 2)  # (B, H, K, D)
        column = proj_n.sum(dim=-2).unsqueeze(-1)  # P^T 1: (K, 1), or (B, K, 1) -> (B, 1, K, 1)
        column = column.unsqueeze(1) if column.dim() == 3 else column
        keys = F.linear(projected, self.proj_c_k.weight) + column * self.proj_c_k.bias
        query_map = (keys @ self.proj_c_q.weight) * self.scale
        query_bias = (keys @ self.proj_c_q.bias) * self.scale
        return q[:, :, 1:] @ query_map.transpose(-2, -1) + query_bias.unsqueeze(-2)

    def forward(
            self,
            q: torch.Tensor,
            k: torch.Tensor,
            grid: Tuple[int, int],
            rows: Optional[torch.Tensor] = None,
            reconstruct: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Coefficients and basis of the approximate attention ``coef @ basis`` of the patch queries.

        Args:
            q, k: (B, H, N, D) queries and keys, CLS first.
            grid: (H, W) patch grid of the input.
            rows: (B, N) projection row of each current token when tokens were removed (see ``token_projections``).
            reconstruct: The predictor-training form (official ``training and USE_ATTN_RECON``): all coefficients
                and the raw signed basis, so that the reconstruction loss reaches every entry.

        Returns:
            coef (B, H, N - 1, K) and basis (K, N) or (B, 1, K, N).
        """
        proj_n, proj_back = self.token_projections(grid, rows)
        logits = self.coefficient_logits(q, k, proj_n)
        coef = logits.softmax(dim=-1)
        if reconstruct:
            basis = proj_back.transpose(-2, -1)
            return coef, basis if rows is None else basis.unsqueeze(1)
        # the top-k is taken on the logits: the softmax's order, without its rounding (keep_top_coefficients)
        coef = keep_top_coefficients(coef, self.basis_topk, order=logits)
        basis = sparsify_basis(proj_back, self.basis_threshold)
        return coef, basis if rows is None else basis.unsqueeze(1)


class SparsifinerAttention(TokenAttention):
    """timm ``Attention`` (same keys) plus a ``mask_predictor``: sparse attention on the predicted connectivity.

    timm builds the attention layer from its class alone, so the block attaches the predictor after construction.
    """

    mask_predictor: ConnectivityPredictor

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.attn_keep_rate = 1.0  # set by Sparsifiner
        self.sparse_path = "auto"
        self.distill_predictor = False  # set by set_training_phase

    @property
    def reconstructing(self) -> bool:
        """Predictor-phase training: dense attention, approximate attention in its training form."""
        return self.training and self.distill_predictor

    def budget(self, num_tokens: int, num_grid_tokens: int) -> int:
        """Keys per patch query: ceil(keep * tokens of the full grid), at most the ``num_tokens`` present."""
        return min(num_tokens, math.ceil(self.attn_keep_rate * num_grid_tokens))

    def use_gather(self, num_tokens: int) -> bool:
        """Whether the sparse attention of ``num_tokens`` tokens takes the gather path (eval only, never exported)."""
        if self.training or is_exporting() or torch.onnx.is_in_onnx_export():
            return False
        return self.sparse_path == "gather" or (self.sparse_path == "auto" and num_tokens >= GATHER_MIN_TOKENS)

    def forward_sparse(
            self,
            x: torch.Tensor,
            grid: Tuple[int, int],
            rows: Optional[torch.Tensor] = None,
            with_cls_attn: bool = False,
            with_approx: bool = False,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """Attention of tokens x (B, N, C), CLS first, on the predicted connectivity.

        Args:
            x: (B, N, C) normalized tokens.
            grid: (H, W) patch grid of the input image.
            rows: (B, N) predictor row of each token when tokens were removed, else None.
            with_cls_attn: Also return the CLS query's attention over the patch tokens, averaged over heads (B, N - 1)
                (the dense CLS row of the sparse attention: the official token score).
            with_approx: Also return the approximate attention (B, H, N - 1, N) of the patch queries.

        Returns:
            Output (B, N, C), the CLS attention or None, the approximate attention or None.
        """
        q, k, v = self._qkv(x)
        num_tokens = q.shape[2]
        budget = self.budget(num_tokens, grid[0] * grid[1] + 1)
        sparse = budget < num_tokens and not self.reconstructing
        approx = None
        if sparse or with_approx:
            coef, basis = self.mask_predictor(q, k, grid, rows, reconstruct=self.reconstructing)
            if with_approx:
                approx = coef @ basis
        if not sparse:
            out = self._fused(q, k, v)
        elif self.use_gather(num_tokens):
            out = gathered_sparse_attention(q, k, v, coef, basis, budget, self.scale)
        else:
            mask = connectivity_mask(connectivity_index(coef, basis, budget), num_tokens, dtype=q.dtype)
            out = masked_sparse_attention(q, k, v, mask, self.attn_drop.p if self.training else 0.0)
        cls_attn = cls_attention(q, k, self.scale) if with_cls_attn else None
        return self._project(out), cls_attn, approx


def _patch_positions(record: TokenRecord, num_patch: int, num_grid: int) -> Optional[torch.Tensor]:
    """Grid position (B, N) of each current patch token, or None while every position is still a token.

    After hard keep steps each kept position's source is its current token and dropped positions point at N, so
    sorting the sources puts position j's index at rank j (a sort on (B, P) ints, no scatter).
    """
    if num_patch == num_grid:
        return None
    if record.sources is None:
        raise ValueError("Sparsifiner blocks after a token reduction need the record's sources (grid positions of "
                         "the tokens); run them through Sparsifiner, which tracks them when tokens are removed")
    return record.sources[..., 0].sort(dim=1).indices[:, :num_patch]


class SparsifinerBlock(Block):
    """timm ``Block`` (same keys, plus the attention's ``mask_predictor``) with sparse attention and, when its token
    keep rate < 1, token sparsity between attention and MLP."""

    def __init__(self, *args, predictor_fn: Callable[..., ConnectivityPredictor], **kwargs) -> None:
        """
        Args:
            *args, **kwargs: timm ``Block`` arguments.
            predictor_fn: Builds the connectivity predictor from (head_dim, num_heads).
        """
        kwargs["attn_layer"] = SparsifinerAttention
        super().__init__(*args, **kwargs)
        self.attn.mask_predictor = predictor_fn(self.attn.head_dim, self.attn.num_heads)
        self.token_keep_rate = 1.0  # set by Sparsifiner

    def num_kept(self, num_patch_tokens: int) -> int:
        """Patch tokens kept: ceil(token_keep_rate * N); all of them while the predictor trains (official)."""
        if self.attn.reconstructing:
            return num_patch_tokens
        return min(num_patch_tokens, math.ceil(self.token_keep_rate * num_patch_tokens))

    def num_patch_tokens_out(self, num_patch_tokens: int, grid: Tuple[int, int]) -> int:
        return self.num_kept(num_patch_tokens)

    def forward(self, x: torch.Tensor, record: TokenRecord = TokenRecord()) -> Tuple[torch.Tensor, TokenRecord]:
        """Tokens (B, 1 + N, C), CLS first -> (B, 1 + N_kept, C), and the record followed through the block."""
        x, record, _ = self.forward_with_approx(x, record, with_approx=False)
        return x, record

    def forward_with_approx(
            self, x: torch.Tensor, record: TokenRecord = TokenRecord(), with_approx: bool = True,
    ) -> Tuple[torch.Tensor, TokenRecord, Optional[torch.Tensor]]:
        """``forward`` that also returns the approximate attention (B, H, N - 1, N) of the patch queries."""
        num_prefix = record.num_prefix
        num_patch = x.shape[1] - num_prefix
        grid = record.grid if record.grid is not None else self.attn.mask_predictor.grid
        positions = _patch_positions(record, num_patch, grid[0] * grid[1])
        rows = None if positions is None else torch.cat([positions.new_zeros(x.shape[0], 1), positions + 1], dim=1)
        num_kept = self.num_kept(num_patch)
        attn_out, cls_attn, approx = self.attn.forward_sparse(
            self.norm1(x), grid, rows, with_cls_attn=num_kept < num_patch, with_approx=with_approx)
        x = x + self.drop_path1(self.ls1(attn_out))
        if num_kept < num_patch:
            patches, keep_index = keep_topk(x[:, num_prefix:], cls_attn, num_kept, fuse=False)
            x = torch.cat([x[:, :num_prefix], patches], dim=1)
            record = record.follow(destination_of_kept(keep_index, num_patch), num_kept)
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return x, record, approx


def _check_rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (1 keeps everything), got {value!r}")
    return float(value)


def _check_factor(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


class Sparsifiner(TokenVisionTransformer):
    """Vision Transformer with Sparsifiner's learned sparse attention in every block; see the module docstring."""

    zero_reduction = dict(attn_keep_rate=1.0)
    adds_parameters = True
    reduces_tokens = False

    @classmethod
    def check_pooling(cls, global_pool: str, class_token: bool, reg_tokens: int) -> None:
        check_one_cls_token("Sparsifiner", global_pool, class_token, reg_tokens)

    def __init__(
            self,
            attn_keep_rate: float = 0.25,
            reduce_n_factor: float = 6,
            reduce_c_factor: float = 2,
            basis_topk: int = 8,
            basis_threshold: float = 2e-2,
            token_keep_rate: float = 1.0,
            reduction_loc: Sequence[int] = (3, 6, 9),
            sparse_path: str = "auto",
            **kwargs,
    ) -> None:
        """
        Args:
            attn_keep_rate: Fraction of keys each patch query attends to, in (0, 1] (1: dense attention, no
                predictor runs).
            reduce_n_factor: Basis tokens K = (tokens at 224 px) // reduce_n_factor (197 // 6 = 32 for patch 16).
            reduce_c_factor: Reduced query/key channels = head_dim // reduce_c_factor.
            basis_topk: Basis coefficients kept per query, in [1, K].
            basis_threshold: Basis entries with absolute value at most this are 0 (>= 0).
            token_keep_rate: Token sparsity: fraction of patch tokens each block of ``reduction_loc`` keeps, in
                (0, 1] (1: off, the default).
            reduction_loc: 0-indexed blocks that remove tokens when ``token_keep_rate`` < 1 (ignored otherwise).
            sparse_path: Eval-mode attention path: 'auto' (gather from ``GATHER_MIN_TOKENS`` tokens on),
                'masked' or 'gather'. Training and export always use 'masked'.
            **kwargs: timm ``VisionTransformer`` arguments.
        """
        attn_keep_rate = _check_rate("attn_keep_rate", attn_keep_rate)
        token_keep_rate = _check_rate("token_keep_rate", token_keep_rate)
        _check_factor("reduce_n_factor", reduce_n_factor)
        _check_factor("reduce_c_factor", reduce_c_factor)
        if sparse_path not in SPARSE_PATHS:
            raise ValueError(f"sparse_path must be one of {SPARSE_PATHS}, got {sparse_path!r}")
        if isinstance(basis_threshold, bool) or not isinstance(basis_threshold, Real) or basis_threshold < 0:
            raise ValueError(f"basis_threshold must be a number >= 0, got {basis_threshold!r}")
        # The token-sparsity blocks matter (and are checked) only when token sparsity is on: a shallow model with
        # attention sparsity alone needs no reduction_loc.
        reduction_loc = check_reduction_loc(reduction_loc, kwargs.get("depth", 12)) if token_keep_rate < 1 else ()
        patch = to_2tuple_size(kwargs.get("patch_size", 16))
        img = to_2tuple_size(kwargs.get("img_size", 224))
        grid = (img[0] // patch[0], img[1] // patch[1])
        reference_tokens = (REFERENCE_IMG_SIZE // patch[0]) * (REFERENCE_IMG_SIZE // patch[1]) + 1
        num_basis = int(reference_tokens // reduce_n_factor)
        if num_basis < 1:
            raise ValueError(f"reduce_n_factor {reduce_n_factor} leaves no basis token: K = {reference_tokens} tokens "
                             f"(at {REFERENCE_IMG_SIZE} px) // reduce_n_factor must be >= 1")
        head_dim = kwargs.get("embed_dim", 768) // kwargs.get("num_heads", 12)
        if int(head_dim // reduce_c_factor) < 1:
            raise ValueError(f"reduce_c_factor {reduce_c_factor} leaves no channel: head_dim {head_dim} // "
                             f"reduce_c_factor must be >= 1")
        if isinstance(basis_topk, bool) or not isinstance(basis_topk, int) or not 1 <= basis_topk <= num_basis:
            raise ValueError(f"basis_topk must be an int in [1, {num_basis}] (the basis tokens), got {basis_topk!r}")
        predictor_fn = partial(ConnectivityPredictor, grid=grid, num_basis=num_basis, reduce_c_factor=reduce_c_factor,
                               basis_topk=basis_topk, basis_threshold=float(basis_threshold))
        block_fn = partial(SparsifinerBlock, predictor_fn=predictor_fn)
        super().__init__(block_fn=block_fn, **kwargs)
        self.attn_keep_rate = attn_keep_rate
        self.token_keep_rate = token_keep_rate
        self.reduction_loc = reduction_loc
        self.sparse_path = sparse_path
        for i, blk in enumerate(self.blocks):
            blk.attn.attn_keep_rate = attn_keep_rate
            blk.attn.sparse_path = sparse_path
            blk.token_keep_rate = token_keep_rate if i in reduction_loc else 1.0

    @property
    def removes_tokens(self) -> bool:
        """Whether some block removes tokens (token sparsity on)."""
        return any(blk.token_keep_rate < 1.0 for blk in self.blocks)

    def _start(self, x: torch.Tensor, track_sources: bool) -> Tuple[torch.Tensor, TokenRecord]:
        # The predictor rows of the tokens left after a removal are found from the sources.
        return super()._start(x, track_sources or self.removes_tokens)

    def token_picture(
            self, index: int, x_in: torch.Tensor, record_in: TokenRecord, x_out: torch.Tensor,
            record_out: TokenRecord, query: Tuple[int, int],
    ) -> TokenPicture:
        """The keys the query at grid position ``query`` attends to in block ``index``: per grid position, the share
        of heads whose predicted connectivity selects that key (1: every head). The CLS key is not on the grid."""
        blk = self.blocks[index]
        grid = record_in.grid
        num_grid = grid[0] * grid[1]
        num_patch = x_in.shape[1] - record_in.num_prefix
        positions = _patch_positions(record_in, num_patch, num_grid)  # (B, N) grid position of each patch token
        if positions is None:
            positions = torch.arange(num_patch, device=x_in.device).expand(x_in.shape[0], -1)
        q, k, _ = blk.attn._qkv(blk.norm1(x_in))
        budget = blk.attn.budget(q.shape[2], num_grid + 1)
        B, H = q.shape[:2]
        # the query's patch token (rows of the predictor are patch queries in token order), or none if removed
        position = query[0] * grid[1] + query[1]
        carrier = (positions == position).float().argmax(dim=1)  # (B,)
        present = (positions == position).any(dim=1)
        if budget >= q.shape[2]:  # dense attention: every key
            share = x_in.new_ones(B, num_patch)
        else:
            rows = torch.cat([positions.new_zeros(B, 1), positions + 1], dim=1)
            coef, basis = blk.attn.mask_predictor(q, k, grid, rows if num_patch < num_grid else None)
            keys = connectivity_index(coef, basis, budget)  # (B, H, N, budget)
            keys = keys.gather(2, carrier.view(B, 1, 1, 1).expand(B, H, 1, budget))[:, :, 0]  # (B, H, budget)
            share = torch.zeros(B, H, num_patch + 1, device=x_in.device).scatter(2, keys, 1.0).mean(1)[:, 1:]
        share = share * present.view(B, 1)
        values = x_in.new_zeros(B, num_grid).scatter(1, positions, share.to(x_in.dtype))
        return TokenPicture("attention", values.reshape(B, *grid),
                            f"keys of the query (of {q.shape[2]}, {budget} per head)", query)

    def forward_train(self, x: torch.Tensor, with_approx: Optional[bool] = None) -> Dict[str, Any]:
        """The student's outputs the training losses take (official ``Sparsifiner.forward`` dictionary).

        Args:
            x: Images (B, 3, H, W).
            with_approx: Return the approximate attention; by default only in the predictor phase, the one loss
                that uses it (in the backbone phase it would only hold memory for the backward).

        Returns:
            ``logits`` (B, classes); ``tokens`` (B, N, C): the final-norm patch tokens; ``positions`` (B, N) their
            grid positions, or None when no token was removed; ``approx_attn``: per block the approximate attention
            (B, H, N_i - 1, N_i) of its patch queries (the training form in the predictor phase), or None.
        """
        if with_approx is None:
            with_approx = any(blk.attn.distill_predictor for blk in self.blocks)
        x, record = self._start(x, track_sources=False)
        approx_attn = []
        for blk in self.blocks:
            x, record, approx = blk.forward_with_approx(x, record, with_approx=with_approx)
            approx_attn.append(approx)
        x = self.norm(x)
        num_patch = x.shape[1] - self.num_prefix_tokens
        return dict(logits=self.forward_head(x), tokens=x[:, self.num_prefix_tokens:],
                    positions=_patch_positions(record, num_patch, record.grid[0] * record.grid[1]),
                    approx_attn=approx_attn)

    def checkpoint_filter(self, state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Adapt an official Sparsifiner checkpoint (bare or under 'model') or a DeiT/timm ViT one to this model.

        The backbone goes through timm's ViT filter (position embedding resampled to this model's grid). Predictor
        tensors keep their official names; ``proj_n`` / ``proj_back_n`` are resampled along the token axis to this
        model's grid (CLS row kept; see the module docstring). What cannot be mapped is logged: model keys the
        checkpoint lacks (a DeiT checkpoint lacks every predictor key: they keep their random initialization) and
        checkpoint keys left unused (with the reason for predictor tensors that do not fit).
        """
        if isinstance(state_dict.get("model"), dict):
            state_dict = state_dict["model"]
        predictor = {key: value for key, value in state_dict.items() if ".mask_predictor." in key}
        out = super().checkpoint_filter({key: value for key, value in state_dict.items() if key not in predictor})
        own = self.state_dict()
        unused = []
        for key, value in predictor.items():
            if key not in own:
                unused.append(f"{key} (no such block or tensor here)")
                continue
            if key.endswith((".proj_n", ".proj_back_n")):
                num_patches = value.shape[0] - 1
                side = math.isqrt(num_patches)
                if value.dim() != 2 or value.shape[1] != own[key].shape[1] or side * side != num_patches:
                    unused.append(f"{key} {tuple(value.shape)} (needs (1 + a square grid, {own[key].shape[1]}))")
                    continue
                value = resample_token_projection(value, self.blocks[0].attn.mask_predictor.grid, (side, side),
                                                  preserve_sum=key.endswith(".proj_n"))
            if value.shape != own[key].shape:
                unused.append(f"{key} {tuple(value.shape)} (this model has {tuple(own[key].shape)})")
                continue
            out[key] = value
        missing = [key for key in own if key not in out]
        unused += [key for key in out if key not in own]
        if missing:
            _logger.warning("Sparsifiner checkpoint: %d model tensors not in the checkpoint keep their "
                            "initialization: %s", len(missing), ", ".join(missing))
        if unused:
            _logger.warning("Sparsifiner checkpoint: %d tensors not used: %s", len(unused), ", ".join(unused))
        return {key: value for key, value in out.items() if key in own}


def set_training_phase(model: Sparsifiner, phase: str) -> List[nn.Parameter]:
    """Freeze and unfreeze for one of the official training phases; returns the parameters to optimize.

    * 'predictor': only the connectivity predictors train; in training mode the backbone runs dense attention and
      ``forward_train`` returns the approximate attention in its training form (official ``attn_recon``).
    * 'backbone': the predictors are frozen, everything else trains on the sparse attention (official
      ``cls_distill``). A new model is in this phase.

    Raises:
        ValueError: Unknown phase, or a model that is not a Sparsifiner.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if not isinstance(model, Sparsifiner):
        raise ValueError(f"set_training_phase needs a Sparsifiner model, got {type(model).__name__}")
    predictor = {id(p) for blk in model.blocks for p in blk.attn.mask_predictor.parameters()}
    for param in model.parameters():
        param.requires_grad_((id(param) in predictor) == (phase == "predictor"))
    for blk in model.blocks:
        blk.attn.distill_predictor = phase == "predictor"
    return [param for param in model.parameters() if param.requires_grad]


@torch.no_grad()
def teacher_outputs(teacher: nn.Module, images: torch.Tensor) -> Dict[str, Any]:
    """Targets from a dense timm ViT teacher (official ``VisionTransformerTeacher``: logits, tokens, attention).

    Args:
        teacher: A timm ``VisionTransformer`` (e.g. DeiT-S with its ImageNet weights) whose blocks have timm
            attention (``qkv``, ``num_heads``, ``scale``); put it in eval mode.
        images: (B, 3, H, W).

    Returns:
        ``logits`` (B, classes), ``tokens`` (B, P, C) final-norm patch tokens, ``attn`` per block the attention
        probabilities (B, H, N, N).
    """
    attn: List[torch.Tensor] = []

    def record_attention(module: nn.Module, args: Tuple[torch.Tensor, ...], output: Any) -> None:
        x = args[0]
        B, N, _ = x.shape
        q, k = module.qkv(x).reshape(B, N, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)[:2]
        logits = (module.q_norm(q) * module.scale) @ module.k_norm(k).transpose(-2, -1)
        attn.append(logits.softmax(dim=-1))

    hooks = [blk.attn.register_forward_hook(record_attention) for blk in teacher.blocks]
    try:
        features = teacher.forward_features(images)
    finally:
        for hook in hooks:
            hook.remove()
    return dict(logits=teacher.forward_head(features), tokens=features[:, teacher.num_prefix_tokens:], attn=attn)


def predictor_distillation_loss(
        approx_attn: Sequence[torch.Tensor], teacher_attn: Sequence[torch.Tensor], weight: float = 0.01,
) -> torch.Tensor:
    """The predictor phase's loss (official ``ATTN_RECON``, MSE, weight 0.01).

    ``weight`` * mean over blocks of sum((approx - teacher patch rows) ** 2): the squared errors are summed over
    images, heads, queries and keys (official ``F.mse_loss(reduction='sum')``), and averaged over blocks.

    Args:
        approx_attn: Per block the student's approximate attention (B, H, N - 1, N) (``forward_train``).
        teacher_attn: Per block the teacher's attention (B, H, N, N) (``teacher_outputs``); its CLS row is dropped.
        weight: Loss weight.

    Raises:
        ValueError: Different numbers of blocks, or shapes that do not match.
    """
    if len(approx_attn) != len(teacher_attn) or not approx_attn:
        raise ValueError(f"need one teacher attention per student block, got {len(teacher_attn)} for "
                         f"{len(approx_attn)}")
    total = 0.0
    for approx, target in zip(approx_attn, teacher_attn):
        target = target[:, :, 1:]
        if approx is None or approx.shape != target.shape:
            raise ValueError(f"approximate attention {None if approx is None else tuple(approx.shape)} does not match "
                             f"the teacher's patch rows {tuple(target.shape)}")
        total = total + F.mse_loss(approx, target, reduction="sum")
    return weight * total / len(approx_attn)


def backbone_distillation_loss(
        outputs: Dict[str, Any],
        targets: torch.Tensor,
        teacher: Dict[str, Any],
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
        cls_weight: float = 1.0,
        distill_weight: float = 0.5,
        token_weight: float = 0.5,
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The backbone phase's loss (official ``cls_distill``): CE + KL distillation + last-layer token MSE.

    cls_weight * criterion(logits, targets) + distill_weight * KL(teacher || student) over classes (batchmean) +
    token_weight * mean squared error between the student's final-norm patch tokens and the teacher's at the same
    grid positions (only the tokens left when token sparsity removed some, as the official token mask does).

    Args:
        outputs: ``Sparsifiner.forward_train`` output.
        targets: Class indices (B,) or class probabilities (B, classes) (mixup; ``F.cross_entropy`` takes both).
        teacher: ``teacher_outputs`` of the same images.
        criterion: Classification loss.
        cls_weight, distill_weight, token_weight: The official weights 1.0, 0.5, 0.5.

    Returns:
        The total and its weighted parts ``cls``, ``cls_distill``, ``token_distill``.
    """
    logits, tokens, positions = outputs["logits"], outputs["tokens"], outputs["positions"]
    teacher_tokens = teacher["tokens"]
    if positions is not None:
        teacher_tokens = teacher_tokens.gather(1, positions.unsqueeze(-1).expand(-1, -1, teacher_tokens.shape[-1]))
    if teacher_tokens.shape != tokens.shape or teacher["logits"].shape != logits.shape:
        raise ValueError(f"teacher outputs (logits {tuple(teacher['logits'].shape)}, tokens "
                         f"{tuple(teacher_tokens.shape)}) do not match the student's ({tuple(logits.shape)}, "
                         f"{tuple(tokens.shape)}): same images and input size needed")
    parts = dict(
        cls=cls_weight * criterion(logits, targets),
        cls_distill=distill_weight * F.kl_div(F.log_softmax(logits, dim=-1), F.log_softmax(teacher["logits"], dim=-1),
                                              reduction="batchmean", log_target=True),
        token_distill=token_weight * F.mse_loss(tokens, teacher_tokens),
    )
    return sum(parts.values()), parts


def mhsa_gmacs(model: nn.Module, img_size: int = 224) -> float:
    """MHSA GMACs of one image in the paper's accounting: the attention products and the predictor, counted sparse.

    Per block with N tokens (CLS included): dense attention 2 * H * D * N^2 (q k^T and attention x values). A
    Sparsifiner block whose budget b < N counts only the connected pairs, 2 * H * D * (N + (N - 1) * b) (the CLS row
    is dense), plus its predictor as computed here: H * D * K * (N + 2 * c + N - 1) for the projected keys and the
    coefficient logits, and H * (N - 1) * topk * N for the approximate attention from the top-k coefficients. The
    q/k/v and output projections are not MHSA in this accounting; whole-model GMACs come from
    ``tokenzoo.profiling.count_gmacs``, which counts what actually runs.

    Args:
        model: A Sparsifiner or a timm ViT with timm attention blocks.
        img_size: Square input size.
    """
    grid = img_size // model.patch_embed.patch_size[0], img_size // model.patch_embed.patch_size[1]
    num_grid = grid[0] * grid[1]
    counts = model.token_counts(img_size) if hasattr(model, "token_counts") else [num_grid] * len(model.blocks)
    prefix, macs = model.num_prefix_tokens, 0
    for blk, num_in in zip(model.blocks, [num_grid] + counts[:-1]):
        attn, n = blk.attn, prefix + num_in
        heads, head_dim = attn.num_heads, attn.head_dim
        budget = attn.budget(n, num_grid + prefix) if isinstance(attn, SparsifinerAttention) else n
        if budget >= n:
            macs += 2 * heads * head_dim * n * n
            continue
        predictor = attn.mask_predictor
        num_basis, reduced = predictor.proj_n.shape[1], predictor.proj_c_q.out_features
        macs += 2 * heads * head_dim * (n + (n - 1) * budget)
        macs += heads * head_dim * num_basis * (n + 2 * reduced + n - 1)
        macs += heads * (n - 1) * predictor.basis_topk * n
    return macs / 1e9


default_cfgs = generate_default_cfgs({
    f"sparsifiner_{size}.deit_in1k": deit_weights_cfg(
        size, paper_ids="arXiv:2303.13755", paper_name="Sparsifiner",
        notes=(f"DeiT-{size} ImageNet-1k weights for the backbone; the connectivity predictors are new and keep their "
               "random initialization until trained (set_training_phase(model, 'predictor') and "
               "predictor_distillation_loss, then the backbone phase). Official Sparsifiner checkpoints load through "
               "pretrained_cfg_overlay=dict(file=...).",))
    for size in ("tiny", "small", "base")
})


def _create_sparsifiner(variant: str, pretrained: bool = False, **kwargs) -> Sparsifiner:
    return build_token_vit(Sparsifiner, variant, pretrained, **kwargs)


@register_model
def sparsifiner_tiny(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-Ti (192 dim, 3 heads), attention keep rate 0.25."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_sparsifiner("sparsifiner_tiny", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sparsifiner_small(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-S (384 dim, 6 heads), attention keep rate 0.25 (the official default)."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_sparsifiner("sparsifiner_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sparsifiner_base(pretrained: bool = False, **kwargs) -> Sparsifiner:
    """Sparsifiner on DeiT-B (768 dim, 12 heads), attention keep rate 0.25."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_sparsifiner("sparsifiner_base", pretrained=pretrained, **dict(model_args, **kwargs))
