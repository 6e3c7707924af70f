"""Multi-criteria token fusion (MCTF, Sec. 3.2-3.4): the scores and the fusion of tokens and attention.

MCTF scores an (A, B) pair by the product of three criteria, each raised to 1 / temperature (Eq. 3-6):

* similarity ((1 + cos(x_a, x_b)) / 2) on the block's input tokens (the residual stream before the norm);
* informativeness: tokens that receive little attention are uninformative, so each token's inverse mean received
  attention (over heads and all queries), normalized by its maximum, enters as a product u_a * u_b;
* size: inverse token size, normalized the same way, so small tokens merge first (only once sizes exist).

A temperature of 0 switches its criterion off, as in the official code. The fused token is the average of its parts
weighted by attention received x size; "one-step-ahead" attention (Sec. 3.4) fuses this block's attention matrix the
same way (key columns summed, query rows weight-averaged) and reuses it after fusion instead of recomputing it.
"""
from typing import Optional

import torch

from .merge import merge_sum, merge_weighted_average, protect_rows

__all__ = ["fuse_attention", "multi_criteria_scores", "received_attention"]


def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives, over heads and queries: (B, H, N, N) -> (B, N)."""
    return attn.mean(dim=(1, 2))


def _inverse_normalized(values: torch.Tensor) -> torch.Tensor:
    """(1 / v) / max(1 / v) per sample: (B, N) -> (B, N) in (0, 1]."""
    inverse = values.reciprocal()
    return inverse / inverse.amax(dim=-1, keepdim=True)


def _pairwise(per_token: torch.Tensor, temperature: float) -> torch.Tensor:
    """(B, N) per-token factor -> (B, N_a, N_b) pair factor (f_a * f_b) ** (1 / temperature)."""
    return (per_token[:, ::2, None] * per_token[:, None, 1::2]).pow(1.0 / temperature)


def multi_criteria_scores(
        x: torch.Tensor,
        attn: torch.Tensor,
        size: Optional[torch.Tensor],
        tau_sim: float = 1.0,
        tau_info: float = 20.0,
        tau_size: float = 40.0,
        num_protected: int = 1,
) -> torch.Tensor:
    """Edge scores between set A (even positions) and set B (odd positions), MCTF Eq. 3-6.

    Args:
        x: (B, N, C) tokens entering the block (before its norm).
        attn: (B, H, N, N) the block's attention probabilities on these tokens.
        size: (B, N, 1) token sizes, or None before the first fusion (all ones: the size criterion is constant).
        tau_sim: Similarity temperature; 0 switches the criterion off.
        tau_info: Informativeness temperature; 0 switches it off.
        tau_size: Size temperature; 0 switches it off.
        num_protected: Leading tokens never fused (0 or 1).

    Returns:
        (B, ceil(N / 2), floor(N / 2)) scores; protected rows are -inf.
    """
    with torch.no_grad():  # the scores only choose indices
        B, N, _ = x.shape
        unit = x / x.norm(dim=-1, keepdim=True)
        scores = x.new_ones(B, (N + 1) // 2, N // 2)
        if tau_sim > 0:
            scores = scores * ((unit[:, ::2] @ unit[:, 1::2].transpose(-1, -2) + 1) / 2).pow(1.0 / tau_sim)
        if tau_info > 0:
            scores = scores * _pairwise(_inverse_normalized(received_attention(attn)), tau_info)
        if tau_size > 0 and size is not None:
            scores = scores * _pairwise(_inverse_normalized(size.squeeze(-1)), tau_size)
        return protect_rows(scores, num_protected)


def fuse_attention(
        attn: torch.Tensor, weight: torch.Tensor, destination: torch.Tensor, num_new: int, scatter_free: bool = False,
) -> torch.Tensor:
    """One-step-ahead attention: the attention matrix of the fused tokens, from the one before fusion.

    Key columns of fused tokens are summed (a fused key receives what its parts received, so rows stay stochastic);
    query rows are averaged with the fusion weights, like the tokens themselves.

    Args:
        attn: (B, H, N, N) attention probabilities.
        weight: (B, N, 1) fusion weights.
        destination: (B, N) new index per old token.
        num_new: G, tokens after fusion.
        scatter_free: See ``merge.merge_sum``.

    Returns:
        (B, H, G, G).
    """
    B, H, N, _ = attn.shape
    keys_first = attn.permute(0, 3, 1, 2).reshape(B, N, H * N)  # (B, keys, heads x queries)
    fused_keys = merge_sum(keys_first, destination, num_new, scatter_free)  # (B, G, H * N)
    queries_first = fused_keys.reshape(B, num_new, H, N).permute(0, 3, 2, 1).reshape(B, N, H * num_new)
    fused, _ = merge_weighted_average(queries_first, weight, destination, num_new, scatter_free)  # (B, G, H * G)
    return fused.reshape(B, num_new, H, num_new).transpose(1, 2)
