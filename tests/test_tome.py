"""ToMe: the paper's token counts and sizes, proportional attention, dense unmerge, the r knob and bad input."""
import pytest
import timm
import torch

from conftest import record_block_outputs


def _record_sizes(model):
    sizes = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda module, args, output: sizes.append(output[1].size) and None)
    return sizes


def test_paper_token_counts_and_sizes_at_224() -> None:
    model = timm.create_model("tome_small").eval()
    expected = [183, 170, 157, 144, 131, 118, 105, 92, 79, 66, 53, 40]  # 41 tokens with CLS at the end
    assert model.token_counts(224) == expected
    ran, sizes = record_block_outputs(model), _record_sizes(model)
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    assert ran == expected
    for size in sizes:
        torch.testing.assert_close(size.sum(dim=(1, 2)), torch.full((2,), 197.0))
    assert sizes[-1][:, 0].eq(1).all(), "the CLS token never merges"


def test_proportional_attention_changes_the_output_once_tokens_merged() -> None:
    with_prop = timm.create_model("tome_tiny").eval()
    without = timm.create_model("tome_tiny", prop_attn=False).eval()
    without.load_state_dict(with_prop.state_dict())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert (with_prop(x) - without(x)).abs().max() > 1e-4


def test_r_schedule_forms_reach_the_blocks() -> None:
    model = timm.create_model("tome_tiny", r=[20, 10])
    assert model.token_counts(224) == [176, 166] + [166] * 10
    model = timm.create_model("tome_tiny", r=(8, 0.5))
    assert [blk.r for blk in model.blocks] == [int(4 + 8 / 11 * i) for i in range(12)]
    model.set_r([100])
    assert model.token_counts(224)[:2] == [98, 98], "r is capped at half the mergeable tokens"


def test_dense_map_copies_each_merged_token_to_all_its_positions() -> None:
    model = timm.create_model("tome_tiny").eval()
    captured = {}
    model.blocks[-1].register_forward_hook(lambda m, a, out: captured.update(x=out[0], size=out[1].size) and None)
    with torch.no_grad():
        grid = model.forward_intermediates(torch.randn(1, 3, 224, 224), indices=[-1], output_fmt="NLC",
                                           intermediates_only=True)[0][0]
    tokens, size = captured["x"][0, 1:], captured["size"][0, 1:, 0]
    equal = (grid[:, None] == tokens[None]).all(-1)  # (196 positions, 40 tokens)
    assert equal.sum(-1).eq(1).all(), "every position shows exactly one current token"
    torch.testing.assert_close(equal.sum(0).float(), size)  # a token of size s stands at s positions


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=-1), "r must be"),
    (dict(r="13"), "r must be"),
    (dict(r=(13, 3.0)), "a tuple r must be"),
    (dict(r=[1] * 13), "a per-block r list"),
])
def test_bad_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("tome_tiny", **kwargs)


def test_r_is_capped_at_half_the_patch_tokens_per_block_as_the_official_code() -> None:
    """A schedule larger than the input runs (timm's reduced test sizes, small detection crops), and token_counts
    reports what runs: each block merges min(r, N // 2)."""
    model = timm.create_model("tome_tiny").eval()
    expected, n = [], 16  # 64x64: 16 patch tokens, r = 13 asks for 156 merges in all
    for _ in range(12):
        n -= min(13, n // 2)
        expected.append(n)
    assert expected[:5] == [8, 4, 2, 1, 1]
    assert model.token_counts(64) == expected
    ran = record_block_outputs(model)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert ran == expected and torch.isfinite(out).all()


def _expected_counts(num_tokens: int, amounts: dict, depth: int = 12) -> list:
    counts = []
    for i in range(depth):
        num_tokens -= min(int(amounts.get(i, 0) * num_tokens), num_tokens // 2)
        counts.append(num_tokens)
    return counts


@pytest.mark.parametrize("img_size, num_tokens", [(512, 1024), (1024, 4096)])
def test_ratio_schedule_token_counts_for_dense_inputs(img_size: int, num_tokens: int) -> None:
    model = timm.create_model("tome_small", r=0.35, reduction_loc=(3, 6, 9))
    expected = _expected_counts(num_tokens, {3: 0.35, 6: 0.35, 9: 0.35})
    assert model.token_counts(img_size) == expected
    assert expected[3] == num_tokens - int(0.35 * num_tokens)
    model.set_r([0, 0.9])  # more than the matching allows: capped at half the patch tokens
    assert model.token_counts(img_size)[1] == num_tokens // 2


def test_ratio_schedule_runs_what_token_counts_says() -> None:
    model = timm.create_model("tome_tiny", r=0.35, reduction_loc=(3, 6, 9), img_size=256).eval()
    ran = record_block_outputs(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 256, 256))
    assert ran == model.token_counts(256) == _expected_counts(256, {3: 0.35, 6: 0.35, 9: 0.35})


def test_windowed_first_merge_caps_at_one_minus_one_over_s_squared_and_unmerges() -> None:
    model = timm.create_model("tome_tiny", r=[0.9, 0.3], merge_window=2, img_size=128).eval()
    assert [blk.merge_window for blk in model.blocks[:3]] == [2, None, None]
    counts = model.token_counts(128)
    assert counts[0] == 16, "64 tokens, 16 windows of 2x2: at most 48 merge, one set-B token per window stays"
    assert counts[1] == 16 - int(0.3 * 16)
    ran = record_block_outputs(model)
    captured = {}
    model.blocks[0].register_forward_hook(lambda m, a, out: captured.update(x=out[0], size=out[1].size) and None)
    with torch.no_grad():
        grid = model.forward_intermediates(torch.randn(1, 3, 128, 128), indices=[0], output_fmt="NLC",
                                           intermediates_only=True)[0][0]
    assert ran == counts
    tokens, size = captured["x"][0, 1:], captured["size"][0, 1:, 0]
    equal = (grid[:, None] == tokens[None]).all(-1)  # (64 positions, 16 tokens)
    assert equal.sum(-1).eq(1).all()
    torch.testing.assert_close(equal.sum(0).float(), size)
    anchors = torch.zeros(8, 8, dtype=torch.bool)
    anchors[::2, ::2] = True
    assert equal[anchors.flatten()].sum(0).eq(1).all(), "each remaining token holds exactly one window's anchor"


@pytest.mark.parametrize("kwargs, message", [
    (dict(r=1.2), "r must be"),
    (dict(r=0.5, reduction_loc=(12,)), "reduction_loc must be"),
    (dict(r=[3, 2], reduction_loc=(1,)), "reduction_loc applies to an int or float r"),
    (dict(merge_window=1), "merge_window must be None"),
])
def test_bad_dense_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("tome_tiny", **kwargs)


def test_a_window_larger_than_the_grid_is_rejected_before_running() -> None:
    model = timm.create_model("tome_tiny", r=0.5, merge_window=9)
    with pytest.raises(ValueError, match="merge window 9 is not allowed for a 8x8 patch grid"):
        model(torch.randn(1, 3, 128, 128))
