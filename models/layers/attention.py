"""Self-attention that hands token-reduction methods what they score with, and stays fused otherwise.

Token reduction is only worth it if the blocks keep running fused attention (``F.scaled_dot_product_attention``)
wherever the attention matrix itself is not needed. So each method gets exactly what it scores with:

* EViT needs one row of the matrix, the CLS query's; it costs O(N * head_dim) on its own, so the block still runs the
  fused kernel for its output and computes that row beside it;
* ToMe needs the keys (averaged over heads) and an additive size bias (proportional attention): fused attention with
  a bias mask;
* MCTF needs the whole matrix (informativeness is attention received, and the matrix is reused after fusion), so it
  is the one path that materializes it.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Attention

__all__ = ["TokenAttention", "cls_attention", "size_bias"]


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


def size_bias(size: torch.Tensor) -> torch.Tensor:
    """Proportional attention (ToMe, Sec. 3.2, Eq. 1): log(size) added to every query's logits.

    Args:
        size: (B, N, 1) input tokens each token stands for.

    Returns:
        (B, 1, 1, N) additive attention bias.
    """
    B, N, _ = size.shape
    return size.log().reshape(B, 1, 1, N)


class TokenAttention(Attention):
    """timm ``Attention`` (same parameters and state-dict keys) with forwards that also return scoring inputs.

    ``forward`` is timm's own, so a block that reduces nothing computes exactly what timm computes.
    """

    def _heads(self, x: torch.Tensor, first: int, count: int) -> torch.Tensor:
        """``count`` of the q, k, v projections starting at ``first`` (0 = q): (count, B, H, N, D).

        Projecting only what is needed matters for MCTF, which takes q and k before fusion and v after it.
        """
        B, N, _ = x.shape
        rows = slice(first * self.attn_dim, (first + count) * self.attn_dim)
        bias = self.qkv.bias[rows] if self.qkv.bias is not None else None
        out = F.linear(x, self.qkv.weight[rows], bias)
        return out.reshape(B, N, count, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def _qkv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = self._heads(x, 0, 3).unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _project(self, out: torch.Tensor) -> torch.Tensor:
        """(B, H, N, D) per-head outputs -> (B, N, C)."""
        B, _, N, _ = out.shape
        # An explicit copy, not reshape's "copy if needed": torch 2.14's export records the reshape of an SDPA-with-mask
        # output as a view, valid for the CPU kernel's memory layout but not after ONNX decomposition.
        return self.project(out.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(B, N, self.attn_dim))

    def _fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_bias, dropout_p=self.attn_drop.p if self.training else 0.0)

    def forward_with_cls_attn(self, x: torch.Tensor, num_prefix_tokens: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention output (B, N, C) and the CLS attention over patch tokens (B, N - num_prefix_tokens)."""
        q, k, v = self._qkv(x)
        return self._project(self._fused(q, k, v)), cls_attention(q, k, self.scale, num_prefix_tokens)

    def forward_with_keys(
            self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Attention output (B, N, C) and the keys averaged over heads (B, N, head_dim), the ToMe merge metric.

        Args:
            x: Tokens, (B, N, C).
            attn_bias: Additive logit bias broadcastable to (B, H, N, N), e.g. ``size_bias(size)``.
        """
        q, k, v = self._qkv(x)
        return self._project(self._fused(q, k, v, attn_bias)), k.mean(dim=1)

    def forward_biased(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fused attention with an additive logit bias (proportional attention in blocks that do not reduce)."""
        q, k, v = self._qkv(x)
        return self._project(self._fused(q, k, v, attn_bias))

    def queries_keys(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Queries and keys (B, H, N, D) alone, after their norms (MCTF computes the values after fusion)."""
        q, k = self._heads(x, 0, 2).unbind(0)
        return self.q_norm(q), self.k_norm(k)

    def attention_probs(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention probabilities (B, H, N, N), before dropout; computes only q and k (MCTF)."""
        return self.probs(*self.queries_keys(x), attn_bias)

    def probs(self, q: torch.Tensor, k: torch.Tensor, attn_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """softmax(q k^T * scale + attn_bias): (B, H, N, N) attention probabilities of given queries and keys."""
        logits = (q * self.scale) @ k.transpose(-2, -1)
        if attn_bias is not None:
            logits = logits + attn_bias
        return logits.softmax(dim=-1)

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """Values (B, H, N, D) alone (MCTF computes them after fusion)."""
        return self._heads(x, 2, 1)[0]

    def project(self, out: torch.Tensor) -> torch.Tensor:
        """Output projection of heads-concatenated attention outputs: (B, N, H * D) -> (B, N, C)."""
        return self.proj_drop(self.proj(self.norm(out)))
