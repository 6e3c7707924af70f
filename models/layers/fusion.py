"""Multi-criteria token fusion (MCTF, Sec. 3.2-3.4): the scores and the fusion of tokens and attention.

MCTF scores an (A, B) pair by the product of three criteria, each raised to 1 / temperature (Eq. 3-6):

* similarity ((1 + cos(x_a, x_b)) / 2) on the block's input tokens (the residual stream before the norm);
* informativeness: tokens that receive little attention are uninformative, so each token's inverse mean received
  attention (over heads and all queries), normalized by its maximum, enters as a product u_a * u_b;
* size: inverse token size, normalized the same way, so small tokens merge first (only once sizes exist).

A temperature of 0 switches its criterion off, as in the official code. The fused token is the average of its parts
weighted by attention received x size; "one-step-ahead" attention (Sec. 3.4) fuses this block's attention matrix the
same way (key columns summed, query rows weight-averaged) and reuses it after fusion instead of recomputing it.

Both uses of the attention matrix reduce it right away: informativeness to a column mean, the reuse to a product
with the values. So neither needs the (B, H, N, N) matrix in memory: ``received_attention_chunked`` takes column
means over chunks of queries, and ``one_step_ahead_attention_fused`` computes the reuse with fused attention. At
4096 tokens the matrix would take 400 MB per block for 6 heads.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from .merge import TokenSplit, merge_weighted_average, protect_rows

__all__ = ["multi_criteria_scores", "one_step_ahead_attention", "one_step_ahead_attention_fused",
           "received_attention", "received_attention_chunked"]


def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives, over heads and queries: (B, H, N, N) -> (B, N).

    Floored at the dtype's smallest normal number. A token can receive exactly zero attention (sharp attention, and
    in float16 readily); the official code then divides 0 / 0 in the fusion weights of a token whose parts all
    received none, and inf / inf in the informativeness score, and returns NaN. With the floor, such a fused token is
    the size-weighted average of its parts and its score is finite; any attention above the floor is unchanged.
    """
    return _floor(attn.mean(dim=(1, 2)))


def _floor(received: torch.Tensor) -> torch.Tensor:
    return received.clamp_min(torch.finfo(received.dtype).tiny)


def received_attention_chunked(
        q: torch.Tensor, k: torch.Tensor, scale: float, attn_bias: Optional[torch.Tensor], chunk_size: int,
) -> torch.Tensor:
    """``received_attention`` of the attention softmax(q k^T * scale + bias), over chunks of ``chunk_size`` queries.

    Memory O(B H chunk_size N) instead of O(B H N^2); the chunk count is fixed by N, so the loop exports and traces.

    Args:
        q: (B, H, N, D) queries.
        k: (B, H, N, D) keys.
        scale: Logit scale (head_dim ** -0.5).
        attn_bias: Additive bias broadcastable to (B, H, chunk, N) (proportional attention: (B, 1, 1, N)), or None.
        chunk_size: Queries per chunk.

    Returns:
        (B, N), equal to ``received_attention`` of the full matrix.
    """
    B, H, N, _ = q.shape
    total = q.new_zeros(B, N)
    k_t = k.transpose(-2, -1)
    for start in range(0, N, chunk_size):
        logits = (q[:, :, start:start + chunk_size] * scale) @ k_t
        if attn_bias is not None:
            logits = logits + attn_bias
        total = total + logits.softmax(dim=-1).sum(dim=(1, 2))
    return _floor(total / (H * N))


def _inverse_normalized(values: torch.Tensor) -> torch.Tensor:
    """(1 / v) / max(1 / v) per sample: (B, N) -> (B, N) in (0, 1]."""
    inverse = values.reciprocal()
    return inverse / inverse.amax(dim=-1, keepdim=True)


def _pairwise(per_token: torch.Tensor, temperature: float, split: TokenSplit) -> torch.Tensor:
    """(B, N) per-token factor -> (B, N_a, N_b) pair factor (f_a * f_b) ** (1 / temperature)."""
    factor_a, factor_b = split.sets(per_token)
    return (factor_a[:, :, None] * factor_b[:, None, :]).pow_(1.0 / temperature)


def multi_criteria_scores(
        x: torch.Tensor,
        received: torch.Tensor,
        size: Optional[torch.Tensor],
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        num_protected: int = 1,
        split: TokenSplit = TokenSplit(),
) -> torch.Tensor:
    """Edge scores between the tokens of set A and those of set B, MCTF Eq. 3-6.

    Args:
        x: (B, N, C) tokens entering the block (before its norm).
        received: (B, N) attention each token receives in the block (``received_attention``).
        size: (B, N, 1) token sizes, or None before the first fusion (all ones: the size criterion is constant).
        tau_sim: Similarity temperature; 0 switches the criterion off.
        tau_info: Informativeness temperature; 0 switches it off.
        tau_size: Size temperature; 0 switches it off.
        num_protected: Leading tokens never fused (0 or 1).
        split: The sets A and B; MCTF's (ToMe's) alternation by default.

    Returns:
        (B, N_a, N_b) scores; protected rows are -inf.
    """
    with torch.no_grad():  # the scores only choose indices
        unit_a, unit_b = split.sets(x / x.norm(dim=-1, keepdim=True))
        # In place on one (B, N_a, N_b) buffer: at 4096 tokens each such matrix is 16 MB per image.
        if tau_sim > 0:
            scores = (unit_a @ unit_b.transpose(-1, -2)).add_(1).div_(2).pow_(1.0 / tau_sim)
        else:
            scores = x.new_ones(x.shape[0], unit_a.shape[1], unit_b.shape[1])
        if tau_info > 0:
            scores.mul_(_pairwise(_inverse_normalized(received), tau_info, split))
        if tau_size > 0 and size is not None:
            scores.mul_(_pairwise(_inverse_normalized(size.squeeze(-1)), tau_size, split))
        return protect_rows(scores, num_protected)


def _values_of_parts(v: torch.Tensor, destination: torch.Tensor) -> torch.Tensor:
    """M^T v: the value of each token's fused token, (B, H, G, D) -> (B, H, N, D)."""
    B, H, _, D = v.shape
    N = destination.shape[1]
    return v.gather(2, destination.view(B, 1, N, 1).expand(B, H, N, D))


def _average_rows(out: torch.Tensor, weight: torch.Tensor, destination: torch.Tensor, num_fused: int,
                  scatter_free: bool) -> torch.Tensor:
    """P out: per-query outputs (B, H, N, D) averaged per fused token with the fusion weights -> (B, G, H * D)."""
    B, H, N, D = out.shape
    fused, _ = merge_weighted_average(out.transpose(1, 2).reshape(B, N, H * D), weight, destination, num_fused,
                                      scatter_free)
    return fused


def one_step_ahead_attention(
        attn: torch.Tensor, v: torch.Tensor, weight: torch.Tensor, destination: torch.Tensor,
        scatter_free: bool = False,
) -> torch.Tensor:
    """Attention output of the fused tokens from the attention matrix before fusion (MCTF Sec. 3.4).

    The paper fuses the matrix itself, A' = P A M^T (key columns summed by the membership M, query rows averaged by
    P, the fusion weights normalized per fused token), and multiplies it with the fused values. The same product is
    evaluated here as P (A (M^T v)): M^T v gathers each fused value back to its parts, A multiplies as ordinary
    attention over the N tokens, and P averages the rows like the tokens themselves. No G x G matrix and no scatter
    over the N x N matrix are needed, so the cost is that of plain attention over N tokens.

    Args:
        attn: (B, H, N, N) attention probabilities before fusion.
        v: (B, H, G, D) values of the fused tokens.
        weight: (B, N, 1) fusion weights.
        destination: (B, N) fused index of each token.
        scatter_free: See ``merge.merge_sum``.

    Returns:
        (B, G, H * D) per-head outputs of the fused tokens, heads concatenated (before the output projection).
    """
    return _average_rows(attn @ _values_of_parts(v, destination), weight, destination, v.shape[2], scatter_free)


def one_step_ahead_attention_fused(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_bias: Optional[torch.Tensor], weight: torch.Tensor,
        destination: torch.Tensor, dropout_p: float = 0.0, scatter_free: bool = False,
) -> torch.Tensor:
    """``one_step_ahead_attention`` without the attention matrix: P (softmax(q k^T + bias) (M^T v)) with fused SDPA.

    The product of the pre-fusion attention with the fused values gathered back to their parts is ordinary
    attention of the N pre-fusion queries over the N pre-fusion keys with values M^T v, so it runs as one
    ``F.scaled_dot_product_attention`` (the logits are computed again, not kept); the rows are then averaged per
    fused token like the tokens themselves.

    Args:
        q: (B, H, N, D) queries before fusion.
        k: (B, H, N, D) keys before fusion.
        v: (B, H, G, D) values of the fused tokens.
        attn_bias: Additive logit bias (proportional attention) broadcastable to (B, H, N, N), or None.
        weight: (B, N, 1) fusion weights.
        destination: (B, N) fused index of each token.
        dropout_p: Attention dropout (training).
        scatter_free: See ``merge.merge_sum``.

    Returns:
        (B, G, H * D), equal to ``one_step_ahead_attention`` of the full attention matrix.
    """
    out = F.scaled_dot_product_attention(q, k, _values_of_parts(v, destination), attn_mask=attn_bias,
                                         dropout_p=dropout_p)
    return _average_rows(out, weight, destination, v.shape[2], scatter_free)
