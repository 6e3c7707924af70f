"""EViT: the paper's token counts, dense restore, the keep-rate schedule, settings and bad input.

Equality with DeiT at keep rate 1 and loading DeiT weights are tested for every family in test_models.py.
"""
import math

import pytest
import timm
import torch

from conftest import record_block_outputs
from tokenzoo.evit import keep_rate_schedule

PAPER_COUNTS = [196, 196, 196, 139, 139, 139, 99, 99, 99, 71, 71, 71]
PAPER_COUNTS_NO_FUSE = [196, 196, 196, 138, 138, 138, 97, 97, 97, 68, 68, 68]


def test_paper_token_counts_at_224() -> None:
    for kwargs, expected in (({}, PAPER_COUNTS), (dict(fuse_token=False), PAPER_COUNTS_NO_FUSE)):
        model = timm.create_model("evit_small", **kwargs).eval()
        assert model.token_counts(224) == expected
        ran = record_block_outputs(model)
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        assert ran == expected


def test_set_keep_rate_changes_the_reduction() -> None:
    model = timm.create_model("evit_tiny")
    model.set_keep_rate(0.5)
    assert model.token_counts(224) == [196] * 3 + [99] * 3 + [51] * 3 + [27] * 3
    model.set_keep_rate(1.0)
    assert model.token_counts(224) == [196] * 12


def _block_output_tokens(model, x, block):
    tokens = {}

    def keep_output(module, args, output) -> None:
        tokens["x"] = output[0]

    model.blocks[block].register_forward_hook(keep_output)
    with torch.no_grad():
        maps = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    return tokens["x"][:, 1:], maps


def test_dense_map_puts_kept_tokens_back_and_dropped_positions_on_the_fused_token() -> None:
    model = timm.create_model("evit_tiny").eval()
    tokens, maps = _block_output_tokens(model, torch.randn(2, 3, 224, 224), block=3)
    assert tokens.shape[1] == 139
    match = torch.cdist(maps[3], tokens).argmin(-1)  # (B, 196): which token each grid position shows
    torch.testing.assert_close(maps[3], tokens.gather(1, match[..., None].expand(-1, -1, tokens.shape[-1])))
    for b in range(2):
        assert (match[b] == 138).sum() == 196 - 138  # the fused token stands at every dropped position
        assert set(match[b].tolist()) == set(range(139))  # every kept token appears, once each
        assert torch.bincount(match[b])[:138].eq(1).all()


def test_dense_map_without_fusion_keeps_dropped_positions_at_their_last_value() -> None:
    model = timm.create_model("evit_tiny", fuse_token=False).eval()
    tokens, maps = _block_output_tokens(model, torch.randn(1, 3, 224, 224), block=3)
    unchanged = (maps[3] == maps[2]).all(-1)[0]
    assert unchanged.sum() == 196 - 138
    kept_values = maps[3][0, ~unchanged]
    assert (kept_values[:, None] == tokens[0][None]).all(-1).any(-1).all()


def test_keep_rate_schedule_follows_the_official_warm_up() -> None:
    assert keep_rate_schedule(0, 0.7) == 1.0
    assert keep_rate_schedule(9.99, 0.7) == 1.0
    assert keep_rate_schedule(60, 0.7) == pytest.approx(0.85)
    assert keep_rate_schedule(35, 0.7) == pytest.approx(0.7 + 0.3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert keep_rate_schedule(110, 0.7) == 0.7
    assert keep_rate_schedule(300, 0.7) == 0.7
    values = [keep_rate_schedule(e / 4, 0.7) for e in range(0, 480)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_training_with_the_schedule_lowers_the_loss() -> None:
    model = timm.create_model("evit_tiny", depth=4, reduction_loc=(1, 2), num_classes=4, img_size=64)
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 4
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(12):
        model.set_keep_rate(keep_rate_schedule(step, 0.5, start_epoch=2, decay_epochs=6))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert model.token_counts() == [16, 8 + 1, 5 + 1, 6]  # the schedule reached the target: ceil(0.5 * 9) = 5
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(keep_rate=0), r"keep_rate must be a number in \(0, 1\]"),
    (dict(keep_rate=1.5), r"keep_rate must be a number in \(0, 1\]"),
    (dict(keep_rate="0.7"), r"keep_rate must be a number in \(0, 1\]"),
    (dict(reduction_loc=(3, 12)), r"reduction_loc must be a sequence of block indices in \[0, 11\]"),
    (dict(reduction_loc=(-1,)), r"reduction_loc must be a sequence of block indices in \[0, 11\]"),
    (dict(class_token=False, global_pool="avg"), "EViT scores tokens with the CLS token"),
    (dict(patch_drop_rate=0.1), "patch_drop_rate must be 0"),
])
def test_bad_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("evit_tiny", **kwargs)


def test_bad_keep_rate_at_run_time_is_rejected() -> None:
    model = timm.create_model("evit_tiny")
    with pytest.raises(ValueError, match=r"keep_rate must be a number in \(0, 1\]"):
        model.set_keep_rate(0.0)
    with pytest.raises(ValueError, match=r"keep_rate must be a number in \(0, 1\]"):
        keep_rate_schedule(3, target=1.2)
