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

from .merge import merge_weighted_average, protect_rows

__all__ = ["multi_criteria_scores", "one_step_ahead_attention", "received_attention"]


def received_attention(attn: torch.Tensor) -> torch.Tensor:
    """Mean attention each token receives, over heads and queries: (B, H, N, N) -> (B, N).

    Floored at the dtype's smallest normal number. A token can receive exactly zero attention (sharp attention, and
    in float16 readily); the official code then divides 0 / 0 in the fusion weights of a token whose parts all
    received none, and inf / inf in the informativeness score, and returns NaN. With the floor, such a fused token is
    the size-weighted average of its parts and its score is finite; any attention above the floor is unchanged.
    """
    return attn.mean(dim=(1, 2)).clamp_min(torch.finfo(attn.dtype).tiny)


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
    B, H, G, D = v.shape
    N = attn.shape[-1]
    v_parts = v.gather(2, destination.view(B, 1, N, 1).expand(B, H, N, D))  # M^T v
    out = (attn @ v_parts).transpose(1, 2).reshape(B, N, H * D)
    fused, _ = merge_weighted_average(out, weight, destination, G, scatter_free)
    return fused
