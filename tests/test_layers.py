"""The shared token-reduction core against straightforward reference computations."""
import pytest
import torch
from timm.layers import Attention

from tokenzoo.layers import (TokenAttention, TokenRecord, cls_attention, compose_sources, destination_of_kept,
                             identity_sources, keep_topk, restore)


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
    record = TokenRecord.start(torch.zeros(1, 7, 2), num_prefix=1, grid=(2, 3), track_sources=True)
    assert record.sources.flatten().tolist() == list(range(6))
    record = record.follow(destination_of_kept(torch.tensor([[4, 1, 2]]), 6), num_new=4)
    assert record.sources.flatten().tolist() == [3, 1, 2, 3, 0, 3]
    record = record.follow(destination_of_kept(torch.tensor([[3, 0]]), 4), num_new=2)
    # old token 3 (fused) -> 0, old 0 -> 1, old 1 and 2 dropped (-> 2 = no token)
    assert record.sources.flatten().tolist() == [0, 2, 2, 0, 1, 0] and record.source_weights is None

    tokens = torch.tensor([[[-1.0], [10.0], [20.0]]])  # the CLS token first
    previous = torch.arange(6.0).view(1, 6, 1)
    assert record.restore(tokens).flatten().tolist() == [10, 0, 0, 10, 20, 10]
    assert record.restore(tokens, previous).flatten().tolist() == [10, 1, 2, 10, 20, 10]


def test_weighted_sources_compose_and_restore_against_a_per_position_reference() -> None:
    """A hard merge step, then a step that rebuilds each token from k = 2 new ones (reconstruction), then a drop."""
    B, P = 2, 6
    sources, weights = identity_sources(B, P, torch.device("cpu")), None
    merge = torch.tensor([[0, 0, 1, 2, 3, 3], [1, 0, 0, 2, 3, 2]])  # 6 -> 4 tokens
    sources, weights = compose_sources(sources, weights, merge, 4)
    assert weights is None and sources.shape == (B, P, 1)
    spread, spread_weights = torch.randint(0, 3, (B, 4, 2)), torch.rand(B, 4, 2)  # 4 -> 3 tokens, 2 each
    sources, weights = compose_sources(sources, weights, spread, 3, spread_weights)
    assert sources.shape == weights.shape == (B, P, 2)
    drop = torch.tensor([[0, 2, 1], [2, 1, 0]])  # 3 -> 2 tokens, one token dropped (index 2 = none)
    sources, weights = compose_sources(sources, weights, drop, 2)
    tokens, previous = torch.randn(B, 2, 5), torch.randn(B, P, 5)
    restored = restore(tokens, sources, weights, previous)
    for b in range(B):
        for p in range(P):
            value, carried = torch.zeros(5), False
            for j in range(2):  # follow position p through the three steps by hand
                middle = int(spread[b, merge[b, p], j])
                final = int(drop[b, middle])
                if final < 2:
                    value += spread_weights[b, merge[b, p], j] * tokens[b, final]
                    carried = True
            torch.testing.assert_close(restored[b, p], value if carried else previous[b, p])
    with pytest.raises(ValueError, match="needs weights"):
        compose_sources(sources, weights, spread, 3)
