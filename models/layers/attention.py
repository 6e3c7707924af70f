"""Self-attention that hands token-reduction methods what they score with, and stays fused otherwise.

Token reduction is only worth it if the blocks that do not need the attention matrix keep running fused attention
(``F.scaled_dot_product_attention``). A block that scores tokens by the attention the CLS token pays them needs one
row of that matrix; it costs O(N * head_dim) to compute on its own, so the block still runs the fused kernel for its
output and computes that row beside it.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention

__all__ = ["TokenAttention", "cls_attention"]


def cls_attention(q: torch.Tensor, k: torch.Tensor, scale: float, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Attention the first (CLS) token pays every patch token, averaged over heads (EViT, Sec. 3.1, Eq. 1).

    Args:
        q: Queries, (B, H, N, D).
        k: Keys, (B, H, N, D).
        scale: Softmax temperature applied to the logits (head_dim ** -0.5).
        num_prefix_tokens: Leading tokens (CLS, registers) that are not patch tokens and are left out of the result.

    Returns:
        (B, N - num_prefix_tokens): the softmax row of the CLS query over all N keys, restricted to patch tokens and
        averaged over the H heads. It is the same row the full attention matrix would hold.
    """
    logits = (q[:, :, :1] * scale) @ k.transpose(-2, -1)  # (B, H, 1, N)
    return logits.softmax(dim=-1)[:, :, 0, num_prefix_tokens:].mean(dim=1)


class TokenAttention(Attention):
    """timm ``Attention`` (same parameters and state-dict keys) with a forward that also returns CLS attention.

    ``forward`` is timm's own, so a block that reduces nothing computes exactly what timm computes.
    """

    def forward_with_cls_attn(self, x: torch.Tensor, num_prefix_tokens: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention output plus the CLS attention row used for scoring.

        Args:
            x: Tokens, (B, N, C), the CLS token first.
            num_prefix_tokens: Leading non-patch tokens.

        Returns:
            The attention output (B, N, C) and the CLS attention over patch tokens (B, N - num_prefix_tokens).
        """
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(B, N, self.attn_dim)
        out = self.proj_drop(self.proj(self.norm(out)))
        return out, cls_attention(q, k, self.scale, num_prefix_tokens)
