"""LookupViT: the block against its definition, both reuse modes, linear cost, the two streams and heads, flexible
compressed size, the DeiT warm start, export and bad input.

Forward/backward over every parameter, dense maps, features_only, token counts, batch independence and loading a DeiT
file through timm are tested for every family in test_models.py.
"""
import logging
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed
from torch.utils.flop_counter import FlopCounterMode

from tokenzoo.layers import TokenRecord
from tokenzoo.lookupvit import LookupViT, LookupViTBlock, multi_resolution_size
from tokenzoo.profiling import count_gmacs

DIM, HEADS = 48, 3


def small(**kwargs) -> LookupViT:
    """A two-block LookupViT at DeiT-Ti width, with a 10-class head."""
    return timm.create_model("lookupvit_tiny", **dict(dict(depth=2, num_classes=10), **kwargs))


def make_block(reuse: str = "softmax", **kwargs) -> LookupViTBlock:
    block = LookupViTBlock(DIM, HEADS, reuse=reuse, **kwargs).eval()
    with torch.no_grad():  # non-trivial norms, so that a norm applied to the wrong input shows
        for module in block.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
    return block


def reference_block(block: LookupViTBlock, lookup: torch.Tensor, compressed: torch.Tensor, reuse: str):
    """The block written out from its definition (module docstring, step 2), head by head."""
    B, N, D = lookup.shape
    M = compressed.shape[1]
    d = D // HEADS
    cross = block.cross
    c, lk = block.norm_gather(compressed), block.norm_lookup(lookup)
    q = F.linear(c, cross.q.weight, cross.q.bias)
    k = F.linear(lk, cross.kv.weight[:D], cross.kv.bias[:D])
    v = F.linear(lk, cross.kv.weight[D:], cross.kv.bias[D:])
    gathered, maps = [], []
    for head in range(HEADS):
        part = slice(head * d, (head + 1) * d)
        logits = q[..., part] @ k[..., part].transpose(1, 2) / math.sqrt(d)  # (B, M, N)
        maps.append(logits)
        gathered.append(torch.softmax(logits, dim=2) @ v[..., part])
    compressed = compressed + F.linear(torch.cat(gathered, dim=2), cross.proj.weight, cross.proj.bias)
    # refinement: a plain pre-LN ViT block on the compressed tokens
    compressed = compressed + block.attn(block.norm1(compressed))
    compressed = compressed + block.mlp(block.norm2(compressed))
    v_c = F.linear(block.norm_infuse(compressed), cross.v_infuse.weight, cross.v_infuse.bias)  # (B, M, D)
    infused = []
    for head, logits in enumerate(maps):
        part = slice(head * d, (head + 1) * d)
        if reuse == "softmax":  # the transposed logits (B, N, M), normalized over the compressed tokens
            weights = torch.softmax(logits.transpose(1, 2), dim=2)
        else:  # the gathering's probabilities (normalized over the lookup tokens), transposed
            weights = torch.softmax(logits, dim=2).transpose(1, 2)
        infused.append(weights @ v_c[..., part])
    lookup = lookup + F.linear(torch.cat(infused, dim=2), cross.proj_infuse.weight, cross.proj_infuse.bias)
    hidden = F.gelu(F.linear(block.norm_lookup_mlp(lookup), block.lookup_mlp.fc1.weight, block.lookup_mlp.fc1.bias))
    lookup = lookup + F.linear(hidden, block.lookup_mlp.fc2.weight, block.lookup_mlp.fc2.bias)
    return lookup, compressed


@pytest.mark.parametrize("reuse", ["softmax", "transpose"])
def test_block_computes_its_definition(reuse: str) -> None:
    block = make_block(reuse)
    lookup, compressed = torch.randn(2, 35, DIM), torch.randn(2, 6, DIM)
    with torch.no_grad():
        out, record = block(lookup, TokenRecord(num_prefix=0, side_tokens=compressed))
        expected_lookup, expected_compressed = reference_block(block, lookup, compressed, reuse)
    torch.testing.assert_close(out, expected_lookup, rtol=0, atol=1e-5)
    torch.testing.assert_close(record.side_tokens, expected_compressed, rtol=0, atol=1e-5)
    assert block.lookup_mlp.fc1.out_features == DIM // 2  # lookup_mlp_ratio 0.5
    assert block.mlp.fc1.out_features == 4 * DIM


def test_reuse_modes_normalize_over_different_axes() -> None:
    """With identity value/output projections and equal compressed tokens u, 'softmax' hands every lookup token
    exactly u (its weights over the compressed tokens sum to 1); 'transpose' hands it u times its column sum of the
    gathering probabilities, which sum to M over the lookup tokens."""
    block = make_block("softmax")
    compressed, lookup = torch.randn(2, 1, DIM).expand(2, 6, DIM), torch.randn(2, 35, DIM)
    cross = block.cross
    with torch.no_grad():
        for linear in (cross.v_infuse, cross.proj_infuse):
            linear.weight.copy_(torch.eye(DIM))
            linear.bias.zero_()
        _, logits = cross.gather(compressed, lookup)
        torch.testing.assert_close(cross.infuse(compressed, logits), compressed[:, :1].expand(2, 35, DIM))
        cross.reuse = "transpose"
        _, probs = cross.gather(compressed, lookup)
        received = cross.infuse(compressed, probs)  # (B, N, D)
    column_sums = probs.sum(dim=2)  # (B, h, N): the share of each lookup token, per head
    head_dim = DIM // HEADS
    expected = (column_sums.repeat_interleave(head_dim, dim=1).transpose(1, 2) * compressed[:, :1])
    torch.testing.assert_close(received, expected)
    torch.testing.assert_close(column_sums.sum(dim=2), torch.full((2, HEADS), 6.0))
    assert not torch.allclose(column_sums, torch.ones_like(column_sums))


@pytest.mark.parametrize("grid, compressed_size", [((14, 14), (3, 3)), ((14, 14), (5, 5)), ((14, 14), (7, 7)),
                                                   ((14, 14), (10, 10)), ((8, 12), (2, 5)), ((4, 4), (4, 4))])
def test_shapes_for_several_compressed_sizes(grid, compressed_size) -> None:
    model = small(compressed_size=compressed_size, img_size=(16 * grid[0], 16 * grid[1])).eval()
    x = torch.randn(2, 3, 16 * grid[0], 16 * grid[1])
    lookup, record = model._start(x, track_sources=False)
    num_lookup, num_compressed = grid[0] * grid[1], compressed_size[0] * compressed_size[1]
    for blk in model.blocks:
        lookup, record = blk(lookup, record)
        assert lookup.shape == (2, num_lookup, 192) and record.side_tokens.shape == (2, num_compressed, 192)
    with torch.no_grad():
        assert model.forward_features(x).shape == (2, num_compressed + num_lookup, 192)
        assert model(x).shape == (2, 10)
    assert model.token_counts(x.shape[-2:]) == [num_lookup] * 2
    assert model.num_compressed_tokens(x.shape[-2:]) == num_compressed


def test_streams_start_from_the_patch_embedding() -> None:
    """Lookup tokens: patch embedding + lookup position embedding; compressed tokens: the patch-embedding map resized
    (bilinear, antialiased) + their own position embedding, resampled to the grid in use."""
    model = small(compressed_size=(3, 4)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        lookup, record = model._start(x, track_sources=False)
        patches = F.conv2d(x, model.patch_embed.proj.weight, model.patch_embed.proj.bias, stride=16)  # (B, D, 14, 14)
        expected_lookup = patches.flatten(2).transpose(1, 2) + model.lookup_pos_embed
        resized = F.interpolate(patches, size=(3, 4), mode="bilinear", antialias=True)
        expected_compressed = resized.flatten(2).transpose(1, 2) + model.compressed_pos_embed
        torch.testing.assert_close(lookup, expected_lookup)
        torch.testing.assert_close(record.side_tokens, expected_compressed)
        model.set_compressed_size((6, 2))
        _, record = model._start(x, track_sources=False)
        pos = resample_abs_pos_embed(model.compressed_pos_embed, new_size=(6, 2), old_size=(3, 4), num_prefix_tokens=0)
        resized = F.interpolate(patches, size=(6, 2), mode="bilinear", antialias=True)
        torch.testing.assert_close(record.side_tokens, resized.flatten(2).transpose(1, 2) + pos)


def _block_flops(block: torch.nn.Module, num_lookup: int, num_compressed: int = 25) -> int:
    lookup, compressed = torch.randn(1, num_lookup, DIM), torch.randn(1, num_compressed, DIM)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        block(lookup, TokenRecord(num_prefix=0, side_tokens=compressed))
    return counter.get_total_flops()


@pytest.mark.parametrize("reuse", ["softmax", "transpose"])
def test_block_cost_is_linear_in_the_lookup_tokens(reuse: str) -> None:
    """No N x N term: at a fixed compressed size the cost is a*N + b exactly (second difference zero), so doubling N
    less than doubles it. A ViT block, quadratic in N, fails the same check."""
    block = make_block(reuse)
    f1, f2, f3 = (_block_flops(block, n) for n in (196, 392, 588))
    assert f3 - 2 * f2 + f1 == 0
    assert 1.5 < f2 / f1 < 2.0

    vit_block = timm.models.vision_transformer.Block(DIM, HEADS).eval()
    g1, g2, g3 = (_block_flops(lambda t, r: vit_block(t), n) for n in (196, 392, 588))
    assert g3 - 2 * g2 + g1 > 0


def test_model_gmacs_double_with_the_lookup_tokens_and_halve_deit_b() -> None:
    model = small(depth=1, compressed_size=(5, 5))
    g1, g2, g3 = (count_gmacs(model, (224, 224 * k)) for k in (1, 2, 3))
    assert abs((g3 - 2 * g2 + g1) / g1) < 1e-9
    assert 1.7 < g2 / g1 < 2.0
    with torch.device("meta"):
        base, deit = timm.create_model("lookupvit_base"), timm.create_model("deit_base_patch16_224")
    # the paper's headline setting, counted on the meta device (no weights allocated): about half of DeiT-B
    ratio = _meta_gmacs(base) / _meta_gmacs(deit)
    assert 0.4 < ratio <= 0.5


def _meta_gmacs(model: torch.nn.Module) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, 224, 224, device="meta"))
    return counter.get_total_flops() / 2e9


def test_compressed_size_changes_at_inference_without_reloading() -> None:
    model = small().eval()
    x = torch.randn(1, 3, 224, 224)
    gmacs, logits = [], []
    for side in (3, 5, 7, 10):
        model.set_compressed_size(side)
        with torch.no_grad():
            assert model.forward_features(x).shape == (1, side * side + 196, 192)
            logits.append(model(x))
        gmacs.append(count_gmacs(model, 224))
    assert gmacs == sorted(gmacs) and len(set(gmacs)) == 4
    assert not torch.allclose(logits[0], logits[3])
    model.set_compressed_size(5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), logits[1], rtol=0, atol=0)


def test_fractional_compressed_size_follows_the_input_grid() -> None:
    model = small(compressed_size=0.36).eval()
    assert [model.compressed_grid(g) for g in ((14, 14), (32, 32), (64, 64), (4, 6), (1, 1))] == \
        [(5, 5), (12, 12), (23, 23), (1, 2), (1, 1)]
    x = torch.randn(2, 3, 160, 96)  # grid 10x6 -> compressed 4x2
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
        maps = model.forward_intermediates(x, intermediates_only=True)
    assert features.shape == (2, 8 + 60, 192)
    torch.testing.assert_close(logits, model.forward_head(features, num_compressed=8))
    assert [m.shape for m in maps] == [(2, 192, 10, 6)] * 2
    with pytest.raises(ValueError, match="pass num_compressed"):
        model.forward_head(features)


def test_heads_average_and_both_heads() -> None:
    model = small().eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        features = model.forward_features(x)
        lookup_logits, compressed_logits = model(x, both_heads=True)
        logits = model(x)
        pooled = model.forward_head(features, pre_logits=True)
    torch.testing.assert_close(lookup_logits, model.head(features[:, 25:].mean(1)))
    torch.testing.assert_close(compressed_logits, model.head_compressed(features[:, :25].mean(1)))
    torch.testing.assert_close(logits, (lookup_logits + compressed_logits) / 2)
    torch.testing.assert_close(pooled, (features[:, 25:].mean(1) + features[:, :25].mean(1)) / 2)
    assert pooled.shape == (3, model.num_features) and model.head_hidden_size == model.num_features

    model.reset_classifier(0)
    assert isinstance(model.head, torch.nn.Identity) and isinstance(model.head_compressed, torch.nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(model(x), pooled)
    model.reset_classifier(7)
    assert model.head.out_features == model.head_compressed.out_features == 7
    with torch.no_grad():
        assert model(x).shape == (3, 7)


def test_each_head_trains_both_streams() -> None:
    """The streams exchange information both ways: the compressed head's loss reaches the lookup stream's own
    parameters (lookup MLP, via the next block's gathering) and the lookup head's loss reaches the compressed
    position embedding (via the infusion)."""
    model = small()
    x = torch.randn(2, 3, 224, 224)
    lookup_logits, compressed_logits = model(x, both_heads=True)
    compressed_logits.square().mean().backward(retain_graph=True)
    assert model.blocks[0].lookup_mlp.fc1.weight.grad.abs().sum() > 0
    assert model.head.weight.grad is None and model.lookup_pos_embed.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    lookup_logits.square().mean().backward()
    assert model.compressed_pos_embed.grad.abs().sum() > 0 and model.blocks[1].attn.qkv.weight.grad.abs().sum() > 0
    assert model.head_compressed.weight.grad is None


def test_training_lowers_the_loss_and_checkpointing_changes_nothing() -> None:
    torch.manual_seed(0)
    model = small(num_classes=4, img_size=64, compressed_size=(2, 2))
    x, y = torch.randn(8, 3, 64, 64), torch.arange(8) % 4
    reference = small(num_classes=4, img_size=64, compressed_size=(2, 2))
    reference.load_state_dict(model.state_dict())
    reference.set_grad_checkpointing(True)
    out, out_cp = model(x), reference(x)
    torch.testing.assert_close(out, out_cp)
    out.sum().backward()
    out_cp.sum().backward()
    torch.testing.assert_close(model.blocks[0].cross.q.weight.grad, reference.blocks[0].cross.q.weight.grad)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for step in range(30):
        model.set_compressed_size(multi_resolution_size(step, sizes=(1, 2, 3)))
        lookup_logits, compressed_logits = model(x, both_heads=True)
        loss = F.cross_entropy(lookup_logits, y) + F.cross_entropy(compressed_logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_multi_resolution_size_is_a_function_of_the_step() -> None:
    draws = [multi_resolution_size(step) for step in range(200)]
    assert draws == [multi_resolution_size(step) for step in range(200)]  # what every rank computes
    assert {d[0] for d in draws} == {3, 5, 7, 10} and all(h == w for h, w in draws)
    assert draws != [multi_resolution_size(step, seed=1) for step in range(200)]
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            multi_resolution_size(bad)
    with pytest.raises(ValueError, match="sizes must be"):
        multi_resolution_size(0, sizes=(3, 0))


def test_deit_warm_start_maps_what_it_says(deit_state_dicts, caplog) -> None:
    deit = deit_state_dicts["tiny"]
    model = timm.create_model("lookupvit_tiny", img_size=256, compressed_size=(4, 6))
    with caplog.at_level(logging.WARNING, logger="tokenzoo.lookupvit"):
        mapped = model.checkpoint_filter({"model": deit})
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    assert not unexpected
    assert set(missing) == {f"blocks.{i}.lookup_mlp.{fc}.{p}" for i in range(12) for fc in ("fc1", "fc2")
                            for p in ("weight", "bias")}
    assert "blocks.*.lookup_mlp.fc1.weight" in caplog.text and "cls_token" in caplog.text

    state, dim = model.state_dict(), 192
    patch_pos = deit["pos_embed"][:, 1:]
    torch.testing.assert_close(state["lookup_pos_embed"], resample_abs_pos_embed(
        patch_pos, new_size=(16, 16), old_size=(14, 14), num_prefix_tokens=0))
    torch.testing.assert_close(state["compressed_pos_embed"], resample_abs_pos_embed(
        patch_pos, new_size=(4, 6), old_size=(14, 14), num_prefix_tokens=0))
    same = {"patch_embed.proj.weight": "patch_embed.proj.weight", "norm.weight": "norm.weight",
            "compressed_norm.weight": "norm.weight", "head.weight": "head.weight",
            "head_compressed.bias": "head.bias"}
    for i in (0, 11):
        b = f"blocks.{i}."
        same.update({b + k: b + k for k in ("norm1.weight", "attn.qkv.weight", "attn.proj.bias", "mlp.fc2.weight")})
        same.update({b + "cross.proj.weight": b + "attn.proj.weight",
                     b + "cross.proj_infuse.bias": b + "attn.proj.bias"})
        same.update({b + "norm_gather.weight": b + "norm1.weight", b + "norm_lookup.bias": b + "norm1.bias",
                     b + "norm_infuse.weight": b + "norm1.weight", b + "norm_lookup_mlp.weight": b + "norm2.weight"})
        qkv, qkv_bias = deit[b + "attn.qkv.weight"], deit[b + "attn.qkv.bias"]
        torch.testing.assert_close(state[b + "cross.q.weight"], qkv[:dim])
        torch.testing.assert_close(state[b + "cross.kv.weight"], qkv[dim:])
        torch.testing.assert_close(state[b + "cross.v_infuse.weight"], qkv[2 * dim:])
        torch.testing.assert_close(state[b + "cross.kv.bias"], qkv_bias[dim:])
    for key, source in same.items():
        torch.testing.assert_close(state[key], deit[source], rtol=0, atol=0)

    # a lookup MLP as wide as DeiT's takes DeiT's MLP too; nothing is then left unmapped
    wide = timm.create_model("lookupvit_tiny", lookup_mlp_ratio=4.0)
    missing, _ = wide.load_state_dict(wide.checkpoint_filter(deit), strict=False)
    assert not missing


def test_own_checkpoint_loads_at_another_size() -> None:
    source = small(compressed_size=(5, 5))
    target = small(img_size=256, compressed_size=(4, 4))
    missing, unexpected = target.load_state_dict(target.checkpoint_filter(source.state_dict()), strict=True)
    assert not missing and not unexpected
    torch.testing.assert_close(target.lookup_pos_embed, resample_abs_pos_embed(
        source.lookup_pos_embed, new_size=(16, 16), old_size=(14, 14), num_prefix_tokens=0))
    torch.testing.assert_close(target.blocks[1].cross.kv.weight, source.blocks[1].cross.kv.weight)


def test_features_only_prunes_what_dense_maps_do_not_use() -> None:
    model = timm.create_model("lookupvit_tiny", depth=4, features_only=True, out_indices=(1, 2),
                              compressed_size=0.36)
    assert len(model.model.blocks) == 3
    maps = model(torch.randn(2, 3, 96, 128))
    assert [m.shape for m in maps] == [(2, 192, 6, 8)] * 2
    sum(m.square().mean() for m in maps).backward()
    assert not [n for n, p in model.named_parameters() if p.grad is None]


def test_group_matcher_and_no_weight_decay() -> None:
    model = small()
    groups = timm.models.group_parameters(model, model.group_matcher())
    assert {"lookup_pos_embed", "compressed_pos_embed", "patch_embed.proj.weight"} <= set(groups[0])
    # the final norms join the last block's group (timm's rule), the heads come last
    assert {"blocks.1.cross.q.weight", "compressed_norm.weight", "norm.weight"} <= set(groups[2])
    assert set(groups[3]) == {"head.weight", "head.bias", "head_compressed.weight", "head_compressed.bias"}
    assert model.no_weight_decay() == {"lookup_pos_embed", "compressed_pos_embed"}


def test_onnx_export_parity_and_dynamic_batch(tmp_path) -> None:
    from tokenzoo.export.onnx_export import PARITY_TOL, check_parity, export_onnx

    for name, kwargs, size in (("fixed", dict(compressed_size=(3, 3)), 96), ("fraction", dict(compressed_size=0.4),
                                                                                 (64, 112))):
        model = small(img_size=96, **kwargs).eval()
        path = export_onnx(model, tmp_path / f"{name}.onnx", img_size=size)
        diffs = check_parity(model, path, batch_sizes=(1, 3), img_size=size)
        assert max(diffs.values()) < PARITY_TOL, diffs


@pytest.mark.parametrize("kwargs, message", [
    (dict(compressed_size=0), "compressed_size must be an int >= 1"),
    (dict(compressed_size=(5, -1)), "compressed_size must be an int >= 1"),
    (dict(compressed_size=1.5), r"a float in \(0, 1\]"),
    (dict(compressed_size=0.0), r"a float in \(0, 1\]"),
    (dict(compressed_size="5"), "compressed_size must be"),
    (dict(compressed_size=(15, 5)), "compressed grid 15x5 is larger than the lookup grid 14x14"),
    (dict(lookup_mlp_ratio=0), "lookup_mlp_ratio must be a number > 0"),
    (dict(lookup_mlp_ratio=-0.5), "lookup_mlp_ratio must be a number > 0"),
    (dict(reuse="mean"), "reuse must be one of"),
    (dict(class_token=True), "LookupViT does not support"),
    (dict(global_pool="token"), "LookupViT does not support"),
])
def test_bad_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("lookupvit_tiny", **kwargs)


def test_bad_input_at_run_time_is_rejected() -> None:
    model = small()
    with pytest.raises(ValueError, match="compressed grid 5x5 is larger than the lookup grid 4x8 of a 64x128 input"):
        model(torch.randn(1, 3, 64, 128))
    with pytest.raises(ValueError, match="larger than the lookup grid"):
        model.token_counts(64)
    with pytest.raises(ValueError, match="compressed_size must be"):
        model.set_compressed_size(-3)
    with pytest.raises(ValueError, match="global_pool must be 'avg'"):
        model.reset_classifier(3, "token")
    with pytest.raises(ValueError, match="compressed tokens in record.side_tokens"):
        model.blocks[0](torch.randn(1, 196, 192), TokenRecord(num_prefix=0))
