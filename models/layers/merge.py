"""Bipartite soft matching and weighted merging (ToMe, Sec. 3.1; MCTF builds on both).

A merge step is described, like every reduction step here, by ``destination`` (B, N_old): the new token each old
token goes into (see ``record``). The matching builds it from sorts, cumsums and gathers only; merging is then one
weighted sum into the new tokens, either a ``scatter_add`` or, for runtimes without scatter support, a one-hot matrix
product (``scatter_free=True``); both are exact sums, and with the latter no scatter op is left in the graph. Means
are taken as sum / sum-of-weights: ``scatter_reduce(mean)`` exports to ONNX with wrong results.

The tokens are split into the two sets of the bipartite graph by a ``TokenSplit``: ToMe's alternation (A = even
positions, B = odd ones) by default, or, for a first merge on the full patch grid of a large input, ToMe for Stable
Diffusion's windowed split (B = one token per s x s window of the grid), which keeps merges local and lets one step
merge up to 1 - 1/s^2 of the tokens.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch

__all__ = ["TokenSplit", "argsort_descending", "bipartite_soft_matching", "cosine_scores", "merge_sum",
           "merge_weighted_average", "num_b_tokens", "protect_rows", "with_registers", "without_registers"]


class TokenSplit(NamedTuple):
    """The sets A and B of bipartite matching, as token indices; None for ToMe's alternation (A even, B odd).

    Attributes:
        a_index: (N_a,) tokens of set A in token order; a protected prefix token must be its first entry.
        b_index: (N_b,) tokens of set B in token order.
        order: (N,) position of each token in ``cat([A, B])``.
    """

    a_index: Optional[torch.Tensor] = None
    b_index: Optional[torch.Tensor] = None
    order: Optional[torch.Tensor] = None

    @classmethod
    def windowed(cls, grid: Tuple[int, int], window: int, num_prefix: int, device: torch.device) -> "TokenSplit":
        """ToMe for Stable Diffusion's 2-D split of ``num_prefix`` + H * W tokens (row-major grid after the prefix).

        Set B holds the top-left token of every whole ``window`` x ``window`` cell of the grid: a fixed choice (the
        official code may draw it at random per cell), so the split is deterministic, reproducible and exportable.
        Set A holds the prefix tokens, first, and every other patch token (rows or columns past the last whole cell
        included).
        """
        height, width = _check_window(grid, window)
        rows = torch.arange(height, device=device).view(-1, 1)
        cols = torch.arange(width, device=device).view(1, -1)
        in_b = ((rows % window == 0) & (cols % window == 0) &
                (rows < height - height % window) & (cols < width - width % window)).flatten()
        in_b = torch.cat([torch.zeros(num_prefix, dtype=torch.bool, device=device), in_b])
        tokens = torch.arange(in_b.numel(), device=device)
        a_index, b_index = tokens[~in_b], tokens[in_b]
        return cls(a_index, b_index, torch.cat([a_index, b_index]).argsort())

    @classmethod
    def of(cls, grid: Optional[Tuple[int, int]], window: Optional[int], num_prefix: int,
           device: torch.device) -> "TokenSplit":
        """The windowed split when ``window`` is set (tokens on the full grid), ToMe's alternation otherwise."""
        return cls() if window is None else cls.windowed(grid, window, num_prefix, device)

    def sets(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(B, N, ...) -> the set A and set B parts along dim 1."""
        if self.a_index is None:
            return tokens[:, ::2], tokens[:, 1::2]
        return tokens.index_select(1, self.a_index), tokens.index_select(1, self.b_index)

    def join(self, values_a: torch.Tensor, values_b: torch.Tensor) -> torch.Tensor:
        """Per-token values of set A (B, N_a) and set B (B, N_b) back in token order (B, N)."""
        if self.a_index is None:  # interleave: A at even positions, B at odd ones
            joined = torch.stack([values_a[:, :values_b.shape[1]], values_b], dim=-1).flatten(1)
            return torch.cat([joined, values_a[:, values_b.shape[1]:]], dim=1)
        return torch.cat([values_a, values_b], dim=1).index_select(1, self.order)


def num_b_tokens(num_tokens: int, grid: Optional[Tuple[int, int]] = None, window: Optional[int] = None) -> int:
    """Size of set B for ``num_tokens`` tokens (prefix included), without building the split (for token counts).

    Args:
        num_tokens: Tokens entering the matching, protected prefix included.
        grid: The patch grid (H, W), for the windowed split.
        window: The window of ``TokenSplit.windowed``, or None for ToMe's alternation.
    """
    if window is None:
        return num_tokens // 2
    height, width = _check_window(grid, window)
    return (height // window) * (width // window)


def _check_window(grid: Optional[Tuple[int, int]], window: int) -> Tuple[int, int]:
    if grid is None:
        raise ValueError("a windowed split needs the patch grid (the record's grid); blocks called on their own have "
                         "none")
    height, width = grid
    if not 1 <= window <= min(height, width):
        raise ValueError(f"merge window {window} is not allowed for a {height}x{width} patch grid: it must be an int "
                         f"in [1, {min(height, width)}] (2 in ToMe for Stable Diffusion)")
    return height, width


def without_registers(tokens: torch.Tensor, num_prefix: int, num_registers: int) -> torch.Tensor:
    """(B, N, ...) -> (B, N - num_registers, ...): the tokens a matching runs on, register tokens held aside.

    timm orders the prefix as [CLS, registers]; the CLS token stays in the matching (protected, as the official ToMe
    and MCTF protect it: first in set A), register tokens are never matched, merged or fused.
    """
    if not num_registers:
        return tokens
    num_cls = num_prefix - num_registers
    return torch.cat([tokens[:, :num_cls], tokens[:, num_prefix:]], dim=1)


def with_registers(destination: torch.Tensor, num_prefix: int, num_registers: int) -> torch.Tensor:
    """A matching's destination over the tokens ``without_registers`` kept -> a destination over all tokens in which
    each register token stays where it is, right after the CLS token (B, N - R) -> (B, N)."""
    if not num_registers:
        return destination
    num_cls = num_prefix - num_registers
    shifted = destination + num_registers * (destination >= num_cls).long()
    registers = num_cls + torch.arange(num_registers, device=destination.device).expand(destination.shape[0], -1)
    return torch.cat([shifted[:, :num_cls], registers, shifted[:, num_cls:]], dim=1)


def cosine_scores(metric: torch.Tensor, num_protected: int = 1, split: TokenSplit = TokenSplit()) -> torch.Tensor:
    """ToMe's edge scores: cosine similarity between the tokens of set A and those of set B.

    Args:
        metric: (B, N, D) similarity features (ToMe: keys averaged over heads).
        num_protected: Leading tokens never merged (0 or 1): their rows get -inf.
        split: The sets; ToMe's alternation by default.

    Returns:
        (B, N_a, N_b) scores, A rows by B columns (alternation: N_a = ceil(N / 2), N_b = floor(N / 2)).
    """
    with torch.no_grad():  # scores only choose indices
        metric = metric / metric.norm(dim=-1, keepdim=True)
        metric_a, metric_b = split.sets(metric)
        return protect_rows(metric_a @ metric_b.transpose(-1, -2), num_protected)


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


def bipartite_soft_matching(
        scores: torch.Tensor, r: int, r_reverse: int = 0, split: TokenSplit = TokenSplit(), order_by_score: bool = True,
) -> torch.Tensor:
    """Bipartite soft matching (ToMe, Sec. 3.1), optionally bidirectional (MCTF, Sec. 3.3).

    Tokens are split into sets A and B (``split``: ToMe's alternation, A at even positions and B at odd ones, by
    default). A to B: each A token's edge goes to
    its best B token and the ``r`` A tokens with the strongest edges merge into their B token; the others stay, in
    their original order (so a protected CLS token, whose row is -inf, stays first). B to A (``r_reverse`` > 0): on
    the same scores restricted to the A tokens that stayed, each B token's edge goes to its best of them and the
    ``r_reverse`` strongest B tokens merge into it; a B token that already took A tokens carries them along.

    New order: the A tokens that stay, then the B tokens that stay - in their original order when ``r_reverse`` is 0
    (ToMe), by descending edge score otherwise (as MCTF's official code leaves them; the order decides the next
    block's A/B split, so it is kept), unless ``order_by_score`` is False (original order). Ordering by score makes
    every later merge depend on the order of nearly equal scores, which 1-ulp rounding differences between runtimes
    can swap (see the MCTF module docstring); the original order does not.

    Args:
        scores: (B, N_a, N_b) edge scores, A rows by B columns; protected rows -inf.
        r: A-to-B merges, at most N_a minus the protected rows.
        r_reverse: B-to-A merges, at most N_b.
        split: The sets the scores were computed on.
        order_by_score: With ``r_reverse``, put the B tokens that stay in descending edge-score order (MCTF).

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
            merged_b = rank_b < r_reverse
            kept_b_index = rank_b - r_reverse if order_by_score else (~merged_b).long().cumsum(dim=-1) - 1
            destination_b = torch.where(merged_b, best_kept_a, num_kept_a + kept_b_index)
        else:
            destination_b = (num_kept_a + torch.arange(num_b, device=scores.device)).expand(B, -1)
        destination_a = torch.where(merged_a, destination_b.gather(1, best_b), kept_a_index)
        return split.join(destination_a, destination_b)


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
