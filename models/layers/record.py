"""The record of where each current token came from, and how to restore a full-resolution map from it.

``TokenRecord`` travels beside the tokens from block to block: token sizes (how many input tokens each current token
stands for, for size-weighted merging and proportional attention) and ``sources`` (which current token carries each
patch position). Either is None while nobody needs it: sizes until the first merge, sources unless dense maps are
asked for, so the classification path pays nothing for them.

A reduction step turns N_old patch tokens into N_new. It describes what it did with one index tensor, ``destination``
(B, N_old): the new token each old token went into. An old token that went into no token (dropped without being fused)
has destination N_new, one past the last token. Composing these steps from the identity gives ``sources``
(B, P): for each of the P positions of the patch grid, the index of the current token that carries it, or the current
token count when none does. ``restore`` gathers the current tokens back onto the grid.

Everything is a gather with index tensors: static shapes, no scatter_reduce, exportable.
"""
from typing import NamedTuple, Optional

import torch

__all__ = ["TokenRecord", "identity_sources", "compose_sources", "destination_of_kept", "restore"]


class TokenRecord(NamedTuple):
    """Immutable per-token bookkeeping; a block returns a new record (``record._replace(...)``), never mutates one.

    Attributes:
        size: (B, N, 1) input tokens each current token (prefix included) stands for; None means all ones.
        sources: (B, P) current patch-token index per patch-grid position (N_patch means none); None when not tracked.
    """

    size: Optional[torch.Tensor] = None
    sources: Optional[torch.Tensor] = None


def identity_sources(batch_size: int, num_patches: int, device: torch.device) -> torch.Tensor:
    """Sources before any reduction: position p is carried by token p.

    Returns:
        (B, P) int64.
    """
    return torch.arange(num_patches, device=device).expand(batch_size, num_patches)


def compose_sources(sources: torch.Tensor, destination: torch.Tensor, num_new: int) -> torch.Tensor:
    """Follow one reduction step.

    Args:
        sources: (B, P) current token index per grid position; N_old means no token.
        destination: (B, N_old) new token index per old token; num_new means no token.
        num_new: N_new, the number of patch tokens after the step.

    Returns:
        (B, P) token index per grid position after the step; num_new means no token.
    """
    # Positions already without a token (index N_old) look up the appended column and stay without one.
    unrepresented = destination.new_full((destination.shape[0], 1), num_new)
    return torch.cat([destination, unrepresented], dim=1).gather(1, sources)


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


def restore(tokens: torch.Tensor, sources: torch.Tensor, previous: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Spread the current patch tokens back over the full patch grid.

    Args:
        tokens: (B, N, C) current patch tokens (prefix tokens removed).
        sources: (B, P) token index per grid position; N means no current token carries the position.
        previous: (B, P, C) map to take positions without a token from (their last value). Zeros when not given.

    Returns:
        (B, P, C) one token per grid position: merged and fused tokens are copied to every position they carry.
    """
    B, N, C = tokens.shape
    padded = torch.cat([tokens, tokens.new_zeros(B, 1, C)], dim=1)
    full = padded.gather(1, sources.unsqueeze(-1).expand(-1, -1, C))
    if previous is None:
        return full
    return torch.where((sources < N).unsqueeze(-1), full, previous)
