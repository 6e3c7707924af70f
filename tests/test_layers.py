"""The shared token-reduction core against straightforward reference computations."""
import pytest
import torch
from timm.layers import Attention

from tokenzoo.layers import (TokenAttention, cls_attention, compose_sources, destination_of_kept, identity_sources,
                             keep_topk, restore)


def test_cls_attention_is_the_cls_row_of_the_full_matrix() -> None:
    q, k = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 10, 8)
    full = ((q * 8 ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    torch.testing.assert_close(cls_attention(q, k, 8 ** -0.5), full[:, :, 0, 1:].mean(1))
    torch.testing.assert_close(cls_attention(q, k, 8 ** -0.5, num_prefix_tokens=2), full[:, :, 0, 2:].mean(1))


def test_token_attention_output_equals_timm_attention() -> None:
    timm_attn, attn = Attention(48, num_heads=4, qkv_bias=True).eval(), TokenAttention(48, num_heads=4, qkv_bias=True)
    attn.load_state_dict(timm_attn.state_dict())
    x = torch.randn(2, 11, 48)
    out, cls_attn = attn.eval().forward_with_cls_attn(x)
    torch.testing.assert_close(out, timm_attn(x), rtol=0, atol=1e-6)
    assert cls_attn.shape == (2, 10)
    assert ((cls_attn.sum(-1) > 0) & (cls_attn.sum(-1) < 1)).all(), "the CLS token's own share is left out"


@pytest.mark.parametrize("fuse", [True, False])
def test_keep_topk_against_per_image_reference(fuse: bool) -> None:
    tokens, scores = torch.randn(3, 12, 5), torch.rand(3, 12)
    new, keep_index = keep_topk(tokens, scores, 7, fuse)
    assert new.shape == (3, 7 + fuse, 5)
    for b in range(3):
        order = scores[b].argsort(descending=True)
        kept, dropped = order[:7], order[7:]
        torch.testing.assert_close(keep_index[b], kept)
        torch.testing.assert_close(new[b, :7], tokens[b, kept])
        if fuse:  # Eq. 2: attention-weighted sum of the dropped tokens, weights not renormalized
            torch.testing.assert_close(new[b, 7], (scores[b, dropped, None] * tokens[b, dropped]).sum(0))


def test_sources_follow_two_keep_steps_with_and_without_fusion() -> None:
    # Step 1: 6 tokens keep (4, 1, 2), fused token at 3. Step 2: 4 tokens keep (3, 0) without fusion.
    sources = identity_sources(1, 6, torch.device("cpu"))
    sources = compose_sources(sources, destination_of_kept(torch.tensor([[4, 1, 2]]), 6), num_new=4)
    assert sources.tolist() == [[3, 1, 2, 3, 0, 3]]
    sources = compose_sources(sources, destination_of_kept(torch.tensor([[3, 0]]), 4), num_new=2)
    # old token 3 (fused) -> 0, old 0 -> 1, old 1 and 2 dropped (-> 2 = no token)
    assert sources.tolist() == [[0, 2, 2, 0, 1, 0]]

    tokens = torch.tensor([[[10.0], [20.0]]])
    previous = torch.arange(6.0).view(1, 6, 1)
    assert restore(tokens, sources).flatten().tolist() == [10, 0, 0, 10, 20, 10]
    assert restore(tokens, sources, previous).flatten().tolist() == [10, 1, 2, 10, 20, 10]
