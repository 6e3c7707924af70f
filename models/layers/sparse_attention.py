"""Instance-dependent sparse attention (Sparsifiner, CVPR 2023): the parameter-free pieces.

A connectivity predictor (``tokenzoo.sparsifiner``) turns each query into a few coefficients over K basis tokens;
the operators here take it from there:

* ``sparsify_basis``, ``keep_top_coefficients``: the two sparsifications of the predictor's low-rank factors (the
  basis: absolute value, small entries set to 0; the coefficients: top-k per query row);
* ``connectivity_index`` / ``connectivity_mask``: approximate attention = coefficients x basis, and the top
  ``budget`` keys of each query row (the binary connectivity mask; the CLS query row stays dense);
* ``masked_sparse_attention``: dense attention restricted by the mask (one fused SDPA call with the mask as an
  additive bias: the training, reference and export path);
* ``gathered_sparse_attention``: the same result from each query's selected keys only, in query chunks so that memory
  stays bounded (measured peak at 4096 tokens, two DeiT-S blocks, batch 1: +231 MB, against +1038 MB for the masked
  path and +129 MB for DeiT-S's fused dense attention);
* ``resample_token_projection``: the predictor's token-axis projections resampled to another patch grid.

The gather path computes each chunk's query-key scores with one dense matrix product and keeps the selected ones:
on CPU, BLAS computes all N scores of a row faster than torch can compute only the selected ones (index_select of
the keys + batched dot products: 10-20x slower than the dense product at 197 and 577 tokens; CSR
``sampled_addmm``: as fast as the dense product at 197 tokens, 2x slower at 577; one thread, approximate, shared
machine). The softmax and the value sum, the part whose cost falls with the keep rate, run over the selected keys
only; the value sum is a weighted ``embedding_bag`` over the flattened values (a fused gather and multiply-add that
never materializes the gathered values). tokenzoo.profiling counts it as its multiply-adds. The gather path is for
eager PyTorch: ONNX has no fused gather and multiply-add (torch exports ``embedding_bag`` as a loop over the bags), so
an export takes the masked path.
"""
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import is_exporting, resample_abs_pos_embed

__all__ = [
    "connectivity_index", "connectivity_mask", "gathered_sparse_attention", "keep_top_coefficients",
    "masked_sparse_attention", "query_chunk_size", "resample_token_projection", "sparsify_basis",
]

# Elements of one (query chunk x keys) score block per image and head, about 4 MB in float32: the gather path's
# memory per image and block is a few such blocks per head (scores, approximate scores, indices).
_CHUNK_ELEMENTS = 2 ** 20
_TIE_BREAK = 1e-30  # per key index, to order exact-zero approximate scores (connectivity_index)


def sparsify_basis(proj_back: torch.Tensor, threshold: float) -> torch.Tensor:
    """The sparse basis: |W_up| transposed, entries <= ``threshold`` set to 0 (the official ``nn.Threshold``).

    Args:
        proj_back: (..., N, K) token-axis up-projection (``proj_back_n``), optionally one per image.
        threshold: Entries whose absolute value is at most this become 0.

    Returns:
        (..., K, N) nonnegative basis, one row per basis token.
    """
    basis = proj_back.abs().transpose(-2, -1)
    return torch.where(basis > threshold, basis, torch.zeros_like(basis))


def keep_top_coefficients(coef: torch.Tensor, k: int, order: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Keep the ``k`` largest coefficients of each row and set the others to 0 (official ``BASIS_COEF.TOPK``).

    Entries equal to the k-th largest are all kept: they can only differ from the official top-k + scatter when
    several of them tie at a nonzero value, which softmax outputs practically never do.

    Args:
        coef: (..., K) basis coefficients.
        k: Coefficients kept per row, 1 <= k <= K.
        order: (..., K) scores in the same order as ``coef`` to select with, e.g. the logits of a softmax ``coef``:
            the same choice without the rounding of the exponential, which decides near-ties differently from one
            runtime to another when the coefficients are close to uniform (an untrained predictor).

    Returns:
        (..., K) with at most ``K - k`` zeros added per row.
    """
    if k >= coef.shape[-1]:
        return coef
    order = coef if order is None else order
    kth = order.topk(k, dim=-1, sorted=True).values[..., -1:]
    return coef.masked_fill(order < kth, 0.0)


def connectivity_index(coef: torch.Tensor, basis: torch.Tensor, budget: int) -> torch.Tensor:
    """Keys each query connects to: the top ``budget`` entries of its row of the approximate attention.

    A key that none of the query's kept basis tokens reaches scores exactly 0; when a row has fewer than ``budget``
    nonzero scores, the official top-k picks among those zeros in whatever order its kernel happens to use. Here a
    ramp of 1e-30 * (N - key) is added first: the zeros go to the lowest key indices, so PyTorch, onnxruntime and the
    two attention paths all select the same keys. The ramp is below the rounding of any nonzero score above 1e-18
    (for N <= 16k keys), so it leaves the official choice unchanged wherever that choice is determined.

    Args:
        coef: (B, H, R, K) nonnegative basis coefficients of R query rows.
        basis: (K, N) nonnegative basis, or (B, 1, K, N) one per image.
        budget: Keys per query, 1 <= budget <= N.

    Returns:
        (B, H, R, budget) int64 key indices, in no particular order.
    """
    num_keys = basis.shape[-1]
    ramp = (num_keys - torch.arange(num_keys, device=coef.device, dtype=coef.dtype)) * _TIE_BREAK
    scores = coef @ basis + ramp
    if not (is_exporting() or torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()):
        # Nonnegative floats order as their bit patterns do, and torch's integer top-k is about 1.7x faster on CPU
        # (no NaN handling); ONNX has no bit cast at the opsets used and TorchScript cannot trace one, so exports
        # and traces select on the floats.
        scores = scores.view(torch.int32)
    return scores.topk(budget, dim=-1, sorted=False).indices


def connectivity_mask(
        index: torch.Tensor, num_keys: int, num_dense_rows: int = 1, dtype: torch.dtype = torch.bool,
) -> torch.Tensor:
    """Binary connectivity mask from the selected keys, with the leading (CLS) query rows dense.

    Args:
        index: (B, H, R, budget) selected keys of the R sparse query rows.
        num_keys: N, keys per row.
        num_dense_rows: Query rows in front that attend to every key (the official code keeps the CLS row dense).
        dtype: torch.bool for True where a query attends to a key; a float dtype for the same mask as an additive
            logit bias (0 where it attends, -inf elsewhere), which SDPA takes without converting it (the conversion
            of a bool mask costs more than the attention itself at 197 tokens on CPU).

    Returns:
        (B, H, num_dense_rows + R, N).
    """
    B, H, R, _ = index.shape
    on, off = (True, False) if dtype == torch.bool else (0.0, float("-inf"))
    sparse = torch.full((B, H, R, num_keys), off, dtype=dtype, device=index.device).scatter(-1, index, on)
    dense = torch.full((B, H, num_dense_rows, num_keys), on, dtype=dtype, device=index.device)
    return torch.cat([dense, sparse], dim=2)


def masked_sparse_attention(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention restricted to a connectivity mask: softmax over each query's connected keys only.

    The official code fills the logits of unconnected pairs with -inf before the softmax; this is that, fused.

    Args:
        q, k, v: (B, H, N, D) queries, keys, values.
        mask: (B, H, N, N) ``connectivity_mask``: bool (True where a query attends to a key) or its additive float
            form; every row attends to at least one key.
        dropout_p: Attention dropout (training only).

    Returns:
        (B, H, N, D).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


def query_chunk_size(num_keys: int) -> int:
    """Query rows per chunk of the gather path: a (chunk x keys) block of about ``_CHUNK_ELEMENTS`` per head."""
    return max(1, _CHUNK_ELEMENTS // num_keys)


def gathered_sparse_attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        coef: torch.Tensor,
        basis: torch.Tensor,
        budget: int,
        scale: float,
        num_dense_rows: int = 1,
        chunk_size: int = 0,
) -> torch.Tensor:
    """Sparse attention from each query's selected keys, chunk by chunk over the queries.

    Equals ``masked_sparse_attention`` with ``connectivity_mask(connectivity_index(coef, basis, budget), N)``: the
    leading rows attend densely; every other query row selects its top ``budget`` keys of the approximate attention,
    and softmax and value sum run over those keys only.

    Args:
        q, k, v: (B, H, N, D) queries, keys, values.
        coef: (B, H, N - num_dense_rows, K) basis coefficients of the sparse query rows.
        basis: (K, N) basis, or (B, 1, K, N) one per image.
        budget: Keys per sparse query row, 1 <= budget <= N.
        scale: Logit scale (head_dim ** -0.5).
        num_dense_rows: Leading query rows that attend to every key (CLS).
        chunk_size: Query rows per chunk; 0 picks ``query_chunk_size(N)``.

    Returns:
        (B, H, N, D).
    """
    B, H, N, D = q.shape
    chunk_size = chunk_size or query_chunk_size(N)
    outputs = [F.scaled_dot_product_attention(q[:, :, :num_dense_rows], k, v)]
    keys_t = k.transpose(-2, -1)
    # embedding_bag reads values from one flat table: row (b * H + h) * N + n is value n of image b, head h.
    values = v.reshape(B * H * N, D)
    offsets = (torch.arange(B * H, device=q.device) * N).view(B, H, 1, 1)
    for start in range(num_dense_rows, N, chunk_size):
        stop = min(N, start + chunk_size)
        index = connectivity_index(coef[:, :, start - num_dense_rows:stop - num_dense_rows], basis, budget)
        logits = ((q[:, :, start:stop] * scale) @ keys_t).gather(-1, index)
        probs = logits.softmax(dim=-1)
        out = F.embedding_bag((index + offsets).reshape(-1, budget), values,
                              per_sample_weights=probs.reshape(-1, budget), mode="sum")
        outputs.append(out.view(B, H, stop - start, D))
    return torch.cat(outputs, dim=2)


def resample_token_projection(
        weight: torch.Tensor,
        new_grid: Sequence[int],
        old_grid: Sequence[int],
        num_prefix: int = 1,
        preserve_sum: bool = False,
) -> torch.Tensor:
    """A token-axis projection (one row per token) resampled from one patch grid to another, prefix rows kept.

    The patch rows are interpolated over the 2-D grid as timm resamples a position embedding (bicubic). A
    down-projection that sums over tokens (``preserve_sum``) has its patch rows scaled by old / new patch count, so
    that the projected keys keep their magnitude when the grid has more or fewer tokens.

    Args:
        weight: (num_prefix + H_old * W_old, K).
        new_grid: (H_new, W_new).
        old_grid: (H_old, W_old).
        num_prefix: Leading non-patch rows (CLS), copied as they are.
        preserve_sum: Scale the patch rows by (H_old * W_old) / (H_new * W_new).

    Returns:
        (num_prefix + H_new * W_new, K); ``weight`` itself when the grids are equal.
    """
    new_grid, old_grid = tuple(new_grid), tuple(old_grid)
    if new_grid == old_grid:
        return weight
    resampled = resample_abs_pos_embed(weight.unsqueeze(0), new_size=new_grid, old_size=old_grid,
                                       num_prefix_tokens=num_prefix)[0]
    if not preserve_sum:
        return resampled
    ratio = math.prod(old_grid) / math.prod(new_grid)
    return torch.cat([resampled[:num_prefix], resampled[num_prefix:] * ratio], dim=0)

