"""Matching, merging and fusion operators of ToMe and MCTF against per-image reference computations."""
import math

import pytest
import torch

from tokenzoo.layers import (TokenSplit, bipartite_soft_matching, cosine_scores, merge_sum, merge_weighted_average,
                             multi_criteria_scores, one_step_ahead_attention, one_step_ahead_attention_fused,
                             received_attention, received_attention_chunked, reduction_schedule)


def reference_matching(scores: torch.Tensor, r: int, r_reverse: int, a_tokens: list = None,
                       b_tokens: list = None, order_by_score: bool = True) -> list:
    """Groups of original token indices after matching one image, spelled out with Python sets (ToMe / MCTF).

    ``a_tokens`` / ``b_tokens`` are the token indices of the rows / columns (ToMe's alternation by default)."""
    num_a, num_b = scores.shape
    a_tokens = a_tokens or list(range(0, 2 * num_a, 2))
    b_tokens = b_tokens or list(range(1, 2 * num_b + 1, 2))
    best_b = {i: int(scores[i].argmax()) for i in range(num_a)}
    by_edge = sorted(range(num_a), key=lambda i: -float(scores[i].max()))
    merged_a, kept_a = by_edge[:r], sorted(by_edge[r:])
    groups_b = {j: {b_tokens[j]} for j in range(num_b)}
    for i in merged_a:
        groups_b[best_b[i]].add(a_tokens[i])
    groups_a = {i: {a_tokens[i]} for i in kept_a}
    kept_b = list(range(num_b))
    if r_reverse:
        best_a = {j: kept_a[int(scores[kept_a, j].argmax())] for j in range(num_b)}
        by_edge_b = sorted(range(num_b), key=lambda j: -float(scores[kept_a, j].max()))
        for j in by_edge_b[:r_reverse]:
            groups_a[best_a[j]] |= groups_b[j]
        kept_b = by_edge_b[r_reverse:] if order_by_score else sorted(by_edge_b[r_reverse:])
    return [groups_a[i] for i in kept_a] + [groups_b[j] for j in kept_b]


def groups_from_destination(destination: torch.Tensor) -> list:
    groups = [set() for _ in range(int(destination.max()) + 1)]
    for token, new in enumerate(destination.tolist()):
        groups[new].add(token)
    return groups


@pytest.mark.parametrize("order_by_score", [True, False])
@pytest.mark.parametrize("num_tokens, r, r_reverse", [(11, 3, 0), (12, 5, 0), (11, 2, 3), (16, 4, 4)])
def test_bipartite_matching_against_reference(num_tokens: int, r: int, r_reverse: int, order_by_score: bool) -> None:
    scores = cosine_scores(torch.randn(3, num_tokens, 8), num_protected=1)
    destination = bipartite_soft_matching(scores, r, r_reverse, order_by_score=order_by_score)
    assert destination.shape == (3, num_tokens)
    for b in range(3):
        expected = reference_matching(scores[b], r, r_reverse, order_by_score=order_by_score)
        assert groups_from_destination(destination[b]) == expected
        assert destination[b, 0] == 0  # CLS never merges and stays first


def test_merges_are_exact_weighted_averages_and_scatter_free_agrees() -> None:
    x, weight = torch.randn(2, 9, 4), torch.rand(2, 9, 1) + 0.1
    destination = torch.tensor([[0, 1, 1, 2, 3, 3, 3, 4, 0], [0, 4, 3, 2, 1, 0, 1, 2, 3]])
    merged, weight_sum = merge_weighted_average(x, weight, destination, 5)
    for b in range(2):
        for g in range(5):
            members = destination[b] == g
            expected = (x[b, members] * weight[b, members]).sum(0) / weight[b, members].sum()
            torch.testing.assert_close(merged[b, g], expected)
            torch.testing.assert_close(weight_sum[b, g], weight[b, members].sum(0))
    torch.testing.assert_close(merge_sum(x, destination, 5, scatter_free=True), merge_sum(x, destination, 5))


def test_multi_criteria_scores_follow_the_paper_equations() -> None:
    x, size = torch.randn(1, 7, 5), torch.randint(1, 4, (1, 7, 1)).float()
    attn = torch.rand(1, 2, 7, 7).softmax(-1)
    scores = multi_criteria_scores(x, received_attention(attn), size, tau_sim=1.0, tau_info=20.0, tau_size=40.0)
    received = attn.mean(dim=(1, 2))[0]
    info = (1 / received) / (1 / received).max()
    inv_size = (1 / size[0, :, 0]) / (1 / size[0, :, 0]).max()
    for ai, i in enumerate(range(0, 7, 2)):
        for bj, j in enumerate(range(1, 7, 2)):
            cos = torch.nn.functional.cosine_similarity(x[0, i], x[0, j], dim=0)
            expected = ((cos + 1) / 2) * (info[i] * info[j]) ** (1 / 20) * (inv_size[i] * inv_size[j]) ** (1 / 40)
            if i == 0:
                assert scores[0, ai, bj] == -math.inf
            else:
                torch.testing.assert_close(scores[0, ai, bj], expected)
    only_similarity = multi_criteria_scores(x, received_attention(attn), size, tau_sim=1.0, tau_info=0, tau_size=0)
    torch.testing.assert_close(only_similarity[:, 1:], ((cosine_scores(x)[:, 1:]) + 1) / 2)


def test_one_step_ahead_attention_equals_the_fused_matrix_times_the_fused_values() -> None:
    attn, weight = torch.rand(2, 3, 6, 6).softmax(-1), torch.rand(2, 6, 1) + 0.1
    destination = torch.tensor([[0, 1, 1, 2, 3, 2], [0, 3, 1, 1, 2, 3]])
    v = torch.randn(2, 3, 4, 5)
    members = torch.nn.functional.one_hot(destination, 4).float().transpose(1, 2)  # (B, G, N)
    weighted = members * weight.transpose(1, 2)
    average = (weighted / weighted.sum(-1, keepdim=True)).unsqueeze(1)
    fused_matrix = average @ attn @ members.transpose(1, 2).unsqueeze(1)  # the paper's A' (B, H, G, G)
    torch.testing.assert_close(fused_matrix.sum(-1), torch.ones(2, 3, 4))  # rows stay stochastic
    expected = (fused_matrix @ v).transpose(1, 2).reshape(2, 4, 15)
    torch.testing.assert_close(one_step_ahead_attention(attn, v, weight, destination), expected)
    torch.testing.assert_close(one_step_ahead_attention(attn, v, weight, destination, scatter_free=True), expected)


def test_reduction_schedule_forms() -> None:
    assert reduction_schedule(13, 4) == [13, 13, 13, 13]
    assert reduction_schedule([5, 3], 4) == [5, 3, 0, 0]
    assert reduction_schedule((8, 0.5), 5) == [4, 6, 8, 10, 12]
    assert reduction_schedule((8, -1.0), 5) == [16, 12, 8, 4, 0]
    assert reduction_schedule(0.35, 5, reduction_loc=(1, 3)) == [0, 0.35, 0, 0.35, 0]
    assert reduction_schedule(7, 4, reduction_loc=[2]) == [0, 0, 7, 0]
    assert reduction_schedule([0, 0.5, 3], 4) == [0, 0.5, 3, 0]


@pytest.mark.parametrize("r, reduction_loc", [
    (-1, None), (1.5, None), (1.0, None), (float("nan"), None), ("13", None), ((13, 2.0), None), ((13,), None),
    ((0.5, 0.0), None), ([1, -1], None), ([0.2, 1.0], None), ([1] * 13, None), (True, None), (4, (12,)),
    ([1, 2], (0,)), (0.5, 3),
])
def test_reduction_schedule_rejects_unknown_forms(r, reduction_loc) -> None:
    with pytest.raises(ValueError, match="r must be|a per-block r list|a tuple r must be|reduction_loc"):
        reduction_schedule(r, 12, reduction_loc)


def test_windowed_split_against_a_per_image_reference() -> None:
    """ToMe for Stable Diffusion's split on a 4x6 grid with 2x2 windows (+ CLS): set B is the top-left token of each
    window, fixed; every other token is in set A; the matching on it equals the reference written with sets."""
    grid, window = (5, 6), 2  # the fifth row is past the last whole window: all of it in set A
    split = TokenSplit.windowed(grid, window, num_prefix=1, device=torch.device("cpu"))
    anchors = {1 + row * 6 + col for row in (0, 2) for col in (0, 2, 4)}
    assert split.b_index.tolist() == sorted(anchors)
    assert split.a_index.tolist() == [t for t in range(31) if t not in anchors]
    metric = torch.randn(2, 31, 8)
    for r, r_reverse in ((20, 0), (9, 6)):
        scores = cosine_scores(metric, num_protected=1, split=split)
        assert scores.shape == (2, 25, 6)
        destination = bipartite_soft_matching(scores, r, r_reverse, split)
        for b in range(2):
            expected = reference_matching(scores[b], r, r_reverse, split.a_index.tolist(), split.b_index.tolist())
            assert groups_from_destination(destination[b]) == expected
            assert destination[b, 0] == 0
    with pytest.raises(ValueError, match="merge window 7 is not allowed for a 5x6 patch grid"):
        TokenSplit.windowed(grid, 7, 1, torch.device("cpu"))


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
def test_chunked_received_attention_and_fused_one_step_ahead_equal_the_full_matrix(chunk_size: int) -> None:
    B, H, N, D, G = 2, 3, 16, 8, 9
    q, k, v = torch.randn(B, H, N, D), torch.randn(B, H, N, D), torch.randn(B, H, G, D)
    bias = torch.rand(B, 1, 1, N).log()
    attn = ((q * D ** -0.5) @ k.transpose(-2, -1) + bias).softmax(-1)
    torch.testing.assert_close(received_attention_chunked(q, k, D ** -0.5, bias, chunk_size),
                               received_attention(attn))
    weight, destination = torch.rand(B, N, 1) + 0.1, torch.randint(0, G, (B, N))
    destination[:, :G] = torch.arange(G)  # every fused token has a part
    torch.testing.assert_close(one_step_ahead_attention_fused(q, k, v, bias, weight, destination),
                               one_step_ahead_attention(attn, v, weight, destination))
@pytest.mark.parametrize("r, r_reverse", [(4, 0), (3, 3)])
def test_tied_scores_are_broken_by_index(r: int, r_reverse: int) -> None:
    """Exactly equal edges (sharp or quantized scores) merge the lower-indexed token first, in every image of a batch:
    the reference sorts stably and takes the first maximum, as onnxruntime's TopK/ArgMax do."""
    scores = torch.randint(0, 3, (3, 98, 97)).float()  # three values only: ties everywhere (and sorts long enough
    # for PyTorch's unstable CPU sort to reorder equal keys)
    scores = torch.cat([torch.full_like(scores[:, :1], -math.inf), scores[:, 1:]], dim=1)  # CLS protected
    destination = bipartite_soft_matching(scores, r, r_reverse)
    for b in range(3):
        assert groups_from_destination(destination[b]) == reference_matching(scores[b], r, r_reverse)
