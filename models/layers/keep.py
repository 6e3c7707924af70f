"""Top-k token keeping with an optional fused token (EViT, Sec. 3.2 "token reorganization")."""
from typing import Tuple

import torch

__all__ = ["keep_topk"]


def keep_topk(
        tokens: torch.Tensor, scores: torch.Tensor, num_keep: int, fuse: bool,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``num_keep`` highest-scoring tokens; optionally fuse the others into one token appended at the end.

    The fused token is the score-weighted sum of the dropped tokens, with the raw scores as weights (not
    renormalized), as in the paper's Eq. 2 and the official code.

    Args:
        tokens: (B, N, C) patch tokens.
        scores: (B, N) attentiveness of each token (EViT: CLS attention averaged over heads).
        num_keep: K, 1 <= K <= N.
        fuse: Append the fused token.

    Returns:
        The new tokens (B, K + fuse, C), kept tokens in descending score order, and the kept indices (B, K).
    """
    B, N, C = tokens.shape
    keep_index = scores.topk(num_keep, dim=1, largest=True, sorted=True).indices
    kept = tokens.gather(1, keep_index.unsqueeze(-1).expand(-1, -1, C))
    if not fuse:
        return kept, keep_index
    # Zero the kept tokens' weights instead of gathering the complement: same sum, no second index tensor.
    dropped_weight = scores.scatter(1, keep_index, torch.zeros_like(keep_index, dtype=scores.dtype))
    fused = torch.einsum("bn,bnc->bc", dropped_weight, tokens).unsqueeze(1)
    return torch.cat([kept, fused], dim=1), keep_index
