"""MCTF: the paper's token counts, one-step-ahead attention, the consistency loss, settings and bad input."""
import pytest
import timm
import torch

from conftest import record_block_outputs
from tokenzoo.layers import bipartite_soft_matching, multi_criteria_scores, received_attention
from tokenzoo.mctf import consistency_training_loss


@pytest.mark.parametrize("name, expected_with_cls", [
    ("mctf_small", [197, 181, 165, 149, 133, 117, 101, 85, 69, 53, 37, 21]),
    ("mctf_fast_small", [197, 197, 197, 129, 129, 129, 85, 85, 85, 56, 56, 56]),
])
def test_paper_token_counts_at_224(name: str, expected_with_cls) -> None:
    model = timm.create_model(name).eval()
    expected = [n - 1 for n in expected_with_cls]
    assert model.token_counts(224) == expected
    ran = record_block_outputs(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert ran == expected


def test_one_step_ahead_attention_is_fused_and_reused_not_recomputed() -> None:
    model = timm.create_model("mctf_tiny", reduction_loc=(0,), r=40).eval()
    block, x = model.blocks[0], torch.randn(1, 197, 192)
    with torch.no_grad():
        out, record = block(x)
        attn = block.attn.attention_probs(block.norm1(x))  # the block's own attention, before fusion
        scores = multi_criteria_scores(x, received_attention(attn), None)
        destination = bipartite_soft_matching(scores, 20, 20)
        # dense reference: membership matrix and weights (attention received x size 1)
        members = torch.nn.functional.one_hot(destination[0], 157).float().T  # (157, 197)
        weighted = members * attn.mean(dim=(1, 2))
        average = weighted / weighted.sum(-1, keepdim=True)
        fused_x = average @ x[0]
        fused_attn = average @ attn[0] @ members.T  # (H, 157, 157)
        values = block.attn.values(block.norm1(fused_x)[None])[0]  # (H, 157, D)
        expected = fused_x + block.attn.proj((fused_attn @ values).transpose(0, 1).reshape(157, 192))
        expected = expected + block.mlp(block.norm2(expected))
        recomputed = fused_x + block.attn(block.norm1(fused_x)[None])[0]
    assert out.shape == (1, 157, 192) and record.size.sum() == 197
    torch.testing.assert_close(out[0], expected, rtol=1e-4, atol=1e-4)
    assert (recomputed + block.mlp(block.norm2(recomputed)) - out[0]).abs().max() > 1e-3


def test_consistency_loss_matches_its_definition() -> None:
    model = timm.create_model("mctf_tiny", num_classes=3).eval()
    images, targets = torch.randn(4, 3, 224, 224), torch.tensor([0, 1, 2, 0])
    out = consistency_training_loss(model, images, targets, r_teacher_max=1, confidence_threshold=0.0)
    assert out["r_teacher"] == 0 and model.r == 16, "the teacher ran at r' = 0 and the model's r came back"
    with torch.no_grad():
        student = model.forward_features(images)
        model.set_r(0)
        teacher = model.forward_features(images)
        model.set_r(16)
    expected = (teacher[:, 0] - student[:, 0]).square().mean()
    torch.testing.assert_close(out["consistency"], expected)
    strict = consistency_training_loss(model, images, targets, r_teacher_max=1, confidence_threshold=1.0)
    assert strict["consistency"] == 0, "no image is confident enough to count"
    torch.testing.assert_close(out["loss"], out["ce_student"] + out["ce_teacher"] + 3 * out["consistency"])


def test_consistency_training_lowers_the_loss() -> None:
    model = timm.create_model("mctf_tiny", depth=4, reduction_loc=(1, 2), r=4, num_classes=4, img_size=64)
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(12):
        loss = consistency_training_loss(model, x, y, r_teacher_max=4, generator=generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=-1), "r must be an int >= 0"),
    (dict(r=1.5), "r must be an int >= 0"),
    (dict(r=float("nan")), "r must be an int >= 0"),
    (dict(tau_info=-1.0), "tau_info must be a number >= 0"),
    (dict(tau_sim="1"), "tau_sim must be a number >= 0"),
    (dict(reduction_loc=(12,)), r"reduction_loc must be a sequence of block indices in \[0, 11\]"),
])
def test_bad_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("mctf_tiny", **kwargs)


def test_tokens_that_receive_no_attention_fuse_without_nan() -> None:
    """Sharp attention leaves tokens that no query attends to; their informativeness was inf / inf and a fused token
    made only of such parts divided 0 / 0 (NaN) before the floor in received_attention."""
    model = timm.create_model("mctf_tiny", depth=2, reduction_loc=(0, 1), r=0.45, img_size=160).eval()
    with torch.no_grad():
        for blk in model.blocks:  # scale q and k: softmax saturates to one key per query
            blk.attn.qkv.weight[:2 * 192] *= 300.0
        x = torch.randn(2, 3, 160, 160)
        attn = model.blocks[0].attn.attention_probs(model.blocks[0].norm1(model._embed(x)))
        assert (attn.mean(dim=(1, 2)) == 0).any(), "the setting must produce tokens without received attention"
        out = model(x)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("chunk_size", [64, 30, 7])
def test_chunked_path_equals_the_materialized_one(chunk_size: int) -> None:
    """Above attn_chunk_size tokens a block never builds its attention matrix; the result is the same, whether the
    chunk divides the token count (65 tokens at 128 px) or not."""
    kwargs = dict(depth=4, reduction_loc=(0, 1, 2), r=0.3, img_size=128)
    materialized = timm.create_model("mctf_tiny", attn_chunk_size=1000, **kwargs).eval()
    chunked = timm.create_model("mctf_tiny", attn_chunk_size=chunk_size, **kwargs).eval()
    chunked.load_state_dict(materialized.state_dict())
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(chunked(x), materialized(x), rtol=0, atol=1e-5)
        for a, b in zip(chunked.forward_intermediates(x, intermediates_only=True),
                        materialized.forward_intermediates(x, intermediates_only=True)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("img_size, num_tokens", [(512, 1024), (1024, 4096)])
def test_ratio_schedule_token_counts_for_dense_inputs(img_size: int, num_tokens: int) -> None:
    model = timm.create_model("mctf_fast_small")
    expected, n = [], num_tokens
    for i in range(12):
        if i in (3, 6, 9):
            n -= int(0.35 * n)
        expected.append(n)
    assert model.token_counts(img_size) == expected
    model.set_r(0.8)  # beyond half the patch tokens: capped, at the same blocks
    assert model.token_counts(img_size)[3] == num_tokens // 2
    windowed = timm.create_model("mctf_fast_small", r=0.8, merge_window=2)
    # windowed split: a quarter of the tokens in set B; bidirectional fusion sends half of r from B, so at most
    # twice set B (half the tokens) fuse
    assert windowed.token_counts(img_size)[3] == num_tokens - 2 * (num_tokens // 4)


def test_windowed_split_runs_and_restores() -> None:
    model = timm.create_model("mctf_tiny", r=[0, 0.3, 0.2], merge_window=2, img_size=128).eval()
    ran = record_block_outputs(model)
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, 128, 128), indices=[2], intermediates_only=True)
    assert ran == model.token_counts(128) and ran[1] == 64 - int(0.3 * 64)
    assert maps[0].shape == (2, 192, 8, 8) and torch.isfinite(maps[0]).all()
