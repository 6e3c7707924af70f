"""The record of where each current token came from, and how to restore a full-resolution map from it.

``TokenRecord`` travels beside the tokens from block to block. It holds what a block may need besides the tokens
themselves, all of it fixed by the input's shape or followed step by step, never kept in mutable state:

* ``num_prefix``: how many leading tokens (CLS, registers) are not patch tokens; every family protects them;
  ``num_registers`` of them are register tokens (after the CLS token, as timm orders them), which merging families
  hold aside from their matching;
* ``grid``: the (H, W) patch grid of the input, for operators that work on the 2-D layout (clustering);
* ``size``: how many input tokens each current token stands for (size-weighted merging, proportional attention);
* ``sources`` and ``source_weights``: for each of the P positions of the patch grid, the current patch token(s) that
  carry it;
* ``side_tokens``: the tokens of a second stream that runs beside the patch tokens from block to block (LookupViT's
  compressed tokens); None for the single-stream families, whose blocks pass it on untouched.

A position is carried by K tokens with weights: the map value at the position is the weighted sum of those tokens.
A hard source (a kept, merged or fused token copied back to the position) is the case K = 1 with weight 1, and then
``source_weights`` is None; reconstruction from clusters (Expedit) carries each position by its k nearest clusters.
Index N (the current patch-token count) means "no token": a position dropped without being fused.

A reduction step turns N_old patch tokens into N_new and describes what it did with ``destination`` (B, N_old): the
new token each old token went into (N_new for none). A step that rebuilds each old token from several new ones gives
``destination`` (B, N_old, k) and ``destination_weights`` (B, N_old, k). ``TokenRecord.follow`` composes a step into
the sources; ``restore`` gathers the current tokens back onto the grid. Everything is a gather with index tensors:
static shapes, no scatter_reduce, exportable. Sources and sizes are None while nobody needs them (sources unless
dense maps are asked for), so the classification path pays nothing for them.
"""
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ["TokenRecord", "compose_sources", "destination_of_kept", "identity_sources", "restore"]


def identity_sources(batch_size: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """Sources before any reduction: position p is carried by token p alone.

    Returns:
        (B, P, 1) int64.
    """
    return torch.arange(num_patches, device=device).view(1, num_patches, 1).expand(batch_size, num_patches, 1)


def compose_sources(
        sources: torch.Tensor,
        source_weights: Optional[torch.Tensor],
        destination: torch.Tensor,
        num_new: int,
        destination_weights: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Follow one reduction step.

    Args:
        sources: (B, P, K) current token indices per grid position; N_old means no token.
        source_weights: (B, P, K) their weights, or None for hard sources (K = 1, weight 1).
        destination: (B, N_old) new token index per old token, or (B, N_old, k) new tokens per old token;
            num_new means no token.
        num_new: N_new, the number of patch tokens after the step.
        destination_weights: (B, N_old, k) weights of a (B, N_old, k) destination; None for a (B, N_old) one.

    Returns:
        Sources (B, P, K * k) after the step (k = 1 for a (B, N_old) destination) and their weights (None while all
        sources are hard).
    """
    B, P, K = sources.shape
    if destination.dim() == 2:
        destination = destination.unsqueeze(-1)
    k = destination.shape[-1]
    if (destination_weights is None) != (k == 1) or (destination_weights is not None and
                                                   destination_weights.shape != destination.shape):
        raise ValueError(f"a destination with k={k} new tokens per old token needs weights of its shape "
                         f"{tuple(destination.shape)} when k > 1 and none when k == 1")
    # Positions already without a token (index N_old) look up the appended row and stay without one.
    unrepresented = destination.new_full((B, 1, k), num_new)
    rows = torch.cat([destination, unrepresented], dim=1).gather(1, sources.reshape(B, P * K, 1).expand(-1, -1, k))
    new_sources = rows.reshape(B, P, K * k)
    if destination_weights is None:
        return new_sources, source_weights
    padded_weights = torch.cat([destination_weights, destination_weights.new_zeros(B, 1, k)], dim=1)
    row_weights = padded_weights.gather(1, sources.reshape(B, P * K, 1).expand(-1, -1, k)).reshape(B, P, K, k)
    if source_weights is not None:
        row_weights = row_weights * source_weights.unsqueeze(-1)
    return new_sources, row_weights.reshape(B, P, K * k)


def destination_of_kept(keep_index: torch.Tensor, num_old: int) -> torch.Tensor:
    """Destination of a keep step: kept token ``keep_index[:, j]`` becomes token j, every other token goes to K.

    Token K is the fused token when the step appends one, and "no token" when it does not, so one rule covers both.

    Args:
        keep_index: (B, K) indices of the kept tokens among the N_old old ones, in their new order.
        num_old: N_old.

    Returns:
        (B, N_old) int64.
    """
    B, K = keep_index.shape
    destination = keep_index.new_full((B, num_old), K)
    return destination.scatter(1, keep_index, torch.arange(K, device=keep_index.device).expand(B, K))


def restore(
        tokens: torch.Tensor,
        sources: torch.Tensor,
        source_weights: Optional[torch.Tensor] = None,
        previous: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Spread the current patch tokens back over the full patch grid.

    Args:
        tokens: (B, N, C) current patch tokens (prefix tokens removed).
        sources: (B, P, K) token indices per grid position; N means none.
        source_weights: (B, P, K) weights of the sources, or None for hard sources (K = 1).
        previous: (B, P, C) map to take positions without any token from (their last value). Zeros when not given.

    Returns:
        (B, P, C) one vector per grid position: a hard source's token copied to every position it carries, or the
        weighted sum of a position's sources.
    """
    B, N, C = tokens.shape
    _, P, K = sources.shape
    padded = torch.cat([tokens, tokens.new_zeros(B, 1, C)], dim=1)
    if source_weights is None:  # hard sources: K == 1
        full = padded.gather(1, sources.reshape(B, P * K, 1).expand(-1, -1, C))
    elif torch.compiler.is_exporting():
        # ONNX has no fused gather-and-sum (embedding_bag exports as a Loop over the positions): add the sources one
        # at a time, so the (B, P, K, C) gathered rows never exist at once.
        full = sum(padded.gather(1, sources[:, :, j:j + 1].expand(-1, -1, C)) * source_weights[:, :, j:j + 1]
                   for j in range(K))
    else:
        # One fused gather and weighted sum over the batch's stacked tokens: gathering the (B, P, K, C) rows first
        # moves K times the map through memory (K = 20 for Expedit's reconstruction: 50-100x slower on a 2-core CPU).
        rows = sources + torch.arange(B, device=sources.device).view(B, 1, 1) * (N + 1)
        full = F.embedding_bag(rows.reshape(B * P, K), padded.reshape(B * (N + 1), C), mode="sum",
                               per_sample_weights=source_weights.reshape(B * P, K).to(tokens.dtype)).view(B, P, C)
    if previous is None:
        return full
    return torch.where((sources < N).any(dim=-1, keepdim=True), full, previous)


class TokenRecord(NamedTuple):
    """Immutable per-token bookkeeping; a block returns a new record (``follow``, ``_replace``), never mutates one.

    Attributes:
        num_prefix: Leading non-patch tokens (CLS, registers), never reduced.
        num_registers: How many of them are register tokens (the rest, 0 or 1, is the CLS token).
        grid: (H, W) patch grid of the input; None only for blocks called on their own.
        size: (B, N, 1) input tokens each current token (prefix included) stands for; None means all ones.
        sources: (B, P, K) current patch-token indices per grid position (N_patch means none); None when not tracked.
        source_weights: (B, P, K) weights of ``sources``; None for hard sources (K = 1).
        side_tokens: (B, M, C) tokens of a second stream beside the patch tokens (LookupViT's compressed tokens), or
            None. They are state a block computes on, not bookkeeping, but they travel here so that every block keeps
            the one ``(x, record) -> (x, record)`` signature and ``x`` stays the patch tokens.
    """

    num_prefix: int = 1
    num_registers: int = 0
    grid: Optional[Tuple[int, int]] = None
    size: Optional[torch.Tensor] = None
    sources: Optional[torch.Tensor] = None
    source_weights: Optional[torch.Tensor] = None
    side_tokens: Optional[torch.Tensor] = None

    @classmethod
    def start(cls, x: torch.Tensor, num_prefix: int, grid: Tuple[int, int], track_sources: bool,
              num_registers: int = 0) -> "TokenRecord":
        """The record of freshly embedded tokens x (B, num_prefix + H * W, C); sources only if ``track_sources``."""
        sources = identity_sources(x.shape[0], grid[0] * grid[1], x.device) if track_sources else None
        return cls(num_prefix=num_prefix, num_registers=num_registers, grid=tuple(grid), sources=sources)

    def follow(
            self, destination: torch.Tensor, num_new: int, destination_weights: Optional[torch.Tensor] = None,
    ) -> "TokenRecord":
        """The record after a reduction step of the patch tokens (see ``compose_sources``); sizes are left as they
        are (a step that changes them replaces them itself)."""
        if self.sources is None:
            return self
        sources, weights = compose_sources(self.sources, self.source_weights, destination, num_new,
                                           destination_weights)
        return self._replace(sources=sources, source_weights=weights)

    def follow_all_tokens(self, destination: torch.Tensor, num_new: int) -> "TokenRecord":
        """``follow`` for a step described over all N_old tokens (B, N_old) -> N_new, prefix tokens included, that
        leaves each prefix token where it is (merging with the CLS token protected)."""
        p = self.num_prefix
        return self.follow(destination[:, p:] - p, num_new - p)

    def restore(self, x: torch.Tensor, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Full-grid map (B, P, C) of the tokens x (B, num_prefix + N, C) this record describes."""
        return restore(x[:, self.num_prefix:], self.sources, self.source_weights, previous)
