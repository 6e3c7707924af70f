"""Bipartite soft matching and weighted merging (ToMe, Sec. 3.1; MCTF builds on both).

A merge step is described, like every reduction step here, by ``destination`` (B, N_old): the new token each old
token goes into (see ``record``). The matching builds it from sorts, cumsums and gathers only; merging is then one
weighted sum into the new tokens, either a ``scatter_add`` or, for runtimes without scatter support, a one-hot matrix
product (``scatter_free=True``); both are exact sums, and with the latter no scatter op is left in the graph. Means
are taken as sum / sum-of-weights: ``scatter_reduce(mean)`` exports to ONNX with wrong results.
"""
import math
from numbers import Integral
from typing import List, Sequence, Tuple, Union

import torch

__all__ = ["RSchedule", "bipartite_soft_matching", "cosine_scores", "merge_sum", "merge_weighted_average",
           "protect_rows", "reduction_schedule"]

RSchedule = Union[int, Sequence[int], Tuple[int, float]]


def reduction_schedule(r: RSchedule, depth: int) -> List[int]:
    """Tokens to merge in each block, from ToMe's knob (its ``parse_r``).

    Args:
        r: An int (the same r in every block), a list of per-block r (padded with zeros to ``depth``), or a tuple
            ``(r, inflection)`` with inflection in [-1, 1]: a linear ramp with mean r from r * (1 - inflection) in
            the first block to r * (1 + inflection) in the last (increasing when inflection > 0).
        depth: Number of blocks.

    Returns:
        ``depth`` non-negative ints.
    """
    if isinstance(r, list):
        if len(r) > depth or not all(isinstance(v, Integral) and v >= 0 for v in r):
            raise ValueError(f"a per-block r list must hold at most {depth} non-negative ints, got {r!r}")
        return [int(v) for v in r] + [0] * (depth - len(r))
    inflection = 0.0
    if isinstance(r, tuple):
        if len(r) != 2 or not isinstance(r[1], (int, float)) or not -1 <= r[1] <= 1:
            raise ValueError(f"a tuple r must be (r, inflection) with inflection in [-1, 1], got {r!r}")
        r, inflection = r
    if isinstance(r, bool) or not isinstance(r, Integral) or r < 0:
        raise ValueError(f"r must be a non-negative int, a list of per-block ints or a tuple (r, inflection), "
                         f"got {r!r}")
    first = int(r * (1.0 - inflection))
    last = 2 * r - first
    step = (last - first) / max(depth - 1, 1)
    return [int(first + step * i) for i in range(depth)]


def cosine_scores(metric: torch.Tensor, num_protected: int = 1) -> torch.Tensor:
    """ToMe's edge scores: cosine similarity between set A (even positions) and set B (odd positions).

    Args:
        metric: (B, N, D) similarity features (ToMe: keys averaged over heads).
        num_protected: Leading tokens never merged (0 or 1): their rows get -inf.

    Returns:
        (B, ceil(N / 2), floor(N / 2)) scores, A rows by B columns.
    """
    with torch.no_grad():  # scores only choose indices
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(-1, -2)
        return protect_rows(scores, num_protected)


def protect_rows(scores: torch.Tensor, num_protected: int) -> torch.Tensor:
    """Set the A rows of the first ``num_protected`` tokens (0 or 1: CLS is A's first token) to -inf."""
    if num_protected not in (0, 1):
        raise ValueError(f"num_protected must be 0 or 1 (the CLS token), got {num_protected}")
    if num_protected:
        scores = torch.cat([torch.full_like(scores[:, :1], -math.inf), scores[:, 1:]], dim=1)
    return scores


def argsort_descending(values: torch.Tensor) -> torch.Tensor:
    """Indices that sort ``values`` along the last axis in descending order, equal values in index order.

    Equal edge scores happen (sharp or quantized scores, identical image regions), and PyTorch's unstable CPU sort
    orders them arbitrarily while onnxruntime orders them by index, so an exported model could merge other tokens
    than the PyTorch model it came from. Eager PyTorch therefore sorts stably. ONNX has no stable sort op, but its
    TopK, which an exported argsort becomes, breaks ties by index by definition, so the export keeps the plain sort.
    """
    if torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return values.argsort(dim=-1, descending=True)
    return values.argsort(dim=-1, descending=True, stable=True)


def bipartite_soft_matching(scores: torch.Tensor, r: int, r_reverse: int = 0) -> torch.Tensor:
    """Bipartite soft matching (ToMe, Sec. 3.1), optionally bidirectional (MCTF, Sec. 3.3).

    Tokens alternate between set A (even positions) and set B (odd positions). A to B: each A token's edge goes to
    its best B token and the ``r`` A tokens with the strongest edges merge into their B token; the others stay, in
    their original order (so a protected CLS token, whose row is -inf, stays first). B to A (``r_reverse`` > 0): on
    the same scores restricted to the A tokens that stayed, each B token's edge goes to its best of them and the
    ``r_reverse`` strongest B tokens merge into it; a B token that already took A tokens carries them along.

    New order: the A tokens that stay, then the B tokens that stay - in their original order when ``r_reverse`` is 0
    (ToMe), by descending edge score otherwise (as MCTF's official code leaves them; the order decides the next
    block's A/B split, so it is kept).

    Args:
        scores: (B, N_a, N_b) edge scores, A rows by B columns; protected rows -inf.
        r: A-to-B merges, at most N_a minus the protected rows.
        r_reverse: B-to-A merges, at most N_b.

    Returns:
        destination (B, N): the new index of every token among the N - r - r_reverse new ones.
    """
    B, num_a, num_b = scores.shape
    with torch.no_grad():  # indices only; built from sorts, cumsum and gathers, no scatter (see scatter_free)
        best_score, best_b = scores.max(dim=-1)  # the first maximum on ties, as ONNX ArgMax
        order_a = argsort_descending(best_score)  # A tokens by edge strength
        rank_a = order_a.argsort(dim=-1)  # edge rank of each A token
        merged_a = rank_a < r
        # A tokens that stay keep their original order: new index = number of staying A tokens before them
        kept_a_index = (~merged_a).long().cumsum(dim=-1) - 1
        num_kept_a = num_a - r
        if r_reverse:
            kept_a = order_a[:, r:].sort(dim=-1).values  # staying A tokens in original order
            reverse = scores.gather(1, kept_a.unsqueeze(-1).expand(-1, -1, num_b)).transpose(1, 2)
            best_score_b, best_kept_a = reverse.max(dim=-1)  # best staying A token (its new index) per B token
            rank_b = argsort_descending(best_score_b).argsort(dim=-1)
            destination_b = torch.where(rank_b < r_reverse, best_kept_a, num_kept_a + rank_b - r_reverse)
        else:
            destination_b = (num_kept_a + torch.arange(num_b, device=scores.device)).expand(B, -1)
        destination_a = torch.where(merged_a, destination_b.gather(1, best_b), kept_a_index)
        # Interleave back to the original order: A at even positions, B at odd ones.
        destination = torch.stack([destination_a[:, :num_b], destination_b], dim=-1).flatten(1)
        if num_a > num_b:
            destination = torch.cat([destination, destination_a[:, -1:]], dim=1)
    return destination


def merge_sum(
        values: torch.Tensor, destination: torch.Tensor, num_new: int, scatter_free: bool = False,
) -> torch.Tensor:
    """Sum old tokens into new ones.

    Args:
        values: (B, N, C).
        destination: (B, N) new index per old token, in [0, num_new).
        num_new: Tokens after the merge.
        scatter_free: Use a one-hot matrix product instead of ``scatter_add`` (same sums; for runtimes without scatter).

    Returns:
        (B, num_new, C).
    """
    B, N, C = values.shape
    if scatter_free:
        one_hot = destination.unsqueeze(1) == torch.arange(num_new, device=values.device).view(1, num_new, 1)
        return one_hot.to(values.dtype) @ values
    return values.new_zeros(B, num_new, C).scatter_add(1, destination.unsqueeze(-1).expand(-1, -1, C), values)


def merge_weighted_average(
        x: torch.Tensor, weight: torch.Tensor, destination: torch.Tensor, num_new: int, scatter_free: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weighted average of the tokens merged into each new token (ToMe's size-weighted average, Sec. 3.2).

    Args:
        x: (B, N, C) tokens.
        weight: (B, N, 1) positive weights (ToMe: token sizes).
        destination: (B, N) new index per old token.
        num_new: Tokens after the merge.
        scatter_free: See ``merge_sum``.

    Returns:
        The merged tokens (B, num_new, C) and the summed weights (B, num_new, 1).
    """
    summed = merge_sum(torch.cat([x * weight, weight], dim=-1), destination, num_new, scatter_free)
    weight_sum = summed[..., -1:]
    return summed[..., :-1] / weight_sum, weight_sum
