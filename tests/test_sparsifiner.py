"""Sparsifiner: the connectivity mask, the two attention paths, official checkpoints, any resolution, token sparsity,
the training losses and phases, and bad input.

Equality with DeiT at keep rate 1, loading DeiT weights, gradients, features and batch independence are tested for
every family in test_models.py; the ONNX export here and in test_export.py.
"""
import logging
import math
from typing import Dict

import pytest
import timm
import torch
import torch.nn.functional as F

from conftest import record_block_outputs
from tokenzoo.layers import (TokenRecord, connectivity_index, connectivity_mask, destination_of_kept,
                             gathered_sparse_attention, keep_top_coefficients, masked_sparse_attention,
                             resample_token_projection, sparsify_basis)
from tokenzoo import sparsifiner
from tokenzoo.profiling import count_gmacs
from tokenzoo.sparsifiner import (Sparsifiner, backbone_distillation_loss, mhsa_gmacs, predictor_distillation_loss,
                                  set_training_phase, teacher_outputs)

pytestmark = pytest.mark.usefixtures("one_thread")


def _attention_inputs(B=2, H=3, N=37, D=16, K=8, per_image_basis=False):
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    coef = keep_top_coefficients(torch.randn(B, H, N - 1, K).softmax(-1), 3)
    basis = sparsify_basis(torch.randn(B, 1, N, K) * 0.05 if per_image_basis else torch.randn(N, K) * 0.05, 0.02)
    return q, k, v, coef, basis


def test_mask_keeps_the_budget_per_row_and_the_cls_row_dense(monkeypatch) -> None:
    q, k, v, coef, basis = _attention_inputs()
    budget = math.ceil(0.25 * 37)
    mask = connectivity_mask(connectivity_index(coef, basis, budget), 37)
    assert mask.shape == (2, 3, 37, 37)
    assert mask[:, :, 0].all()
    assert (mask[:, :, 1:].sum(-1) == budget).all()
    # in the model: every patch row of every block keeps ceil(0.25 * 197) = 50 of 197 keys
    masks = []

    def spy(q, k, v, mask, dropout_p=0.0):
        masks.append(mask)
        return masked_sparse_attention(q, k, v, mask, dropout_p)

    monkeypatch.setattr(sparsifiner, "masked_sparse_attention", spy)
    model = timm.create_model("sparsifiner_tiny", depth=2, sparse_path="masked").eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert len(masks) == 2 and all(m.shape == (1, 3, 197, 197) and m.dtype == torch.float32 for m in masks)
    for m in masks:
        assert set(m.unique().tolist()) == {0.0, float("-inf")}  # the additive form of the mask
        connected = m == 0
        assert connected[:, :, 0].all() and (connected[:, :, 1:].sum(-1) == 50).all()
    # the additive form attends exactly like the bool mask
    index = connectivity_index(coef, basis, budget)
    torch.testing.assert_close(masked_sparse_attention(q, k, v, connectivity_mask(index, 37, dtype=torch.float32)),
                               masked_sparse_attention(q, k, v, connectivity_mask(index, 37)), rtol=0, atol=1e-6)


def test_exact_zero_scores_go_to_the_lowest_keys() -> None:
    coef = torch.zeros(1, 1, 2, 4)
    coef[..., 0] = 1.0
    basis = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.0, 0.0], [1.0] * 6, [1.0] * 6, [1.0] * 6])
    index = connectivity_index(coef, basis, 4)
    assert sorted(index[0, 0, 0].tolist()) == [0, 1, 2, 3]  # the two nonzero keys, then the zeros 0 and 2


def test_a_predictor_that_matches_the_true_attention_selects_its_top_k() -> None:
    B, H, N, D, budget = 2, 2, 20, 8, 6
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    scale = D ** -0.5
    attention = ((q @ k.transpose(-2, -1)) * scale).softmax(-1)
    # coefficients = the true attention rows over an identity basis: approximate attention == true attention
    index = connectivity_index(attention[:, :, 1:], torch.eye(N), budget)
    true_top = attention[:, :, 1:].topk(budget, dim=-1).indices
    assert torch.equal(index.sort(-1).values, true_top.sort(-1).values)
    out = masked_sparse_attention(q, k, v, connectivity_mask(index, N))
    for b in range(B):
        for h in range(H):
            for i in range(1, N):
                keys = true_top[b, h, i - 1]
                weights = ((q[b, h, i] @ k[b, h, keys].T) * scale).softmax(-1)
                torch.testing.assert_close(out[b, h, i], weights @ v[b, h, keys], rtol=0, atol=1e-5)
            torch.testing.assert_close(out[b, h, 0], attention[b, h, 0] @ v[b, h], rtol=0, atol=1e-5)


@pytest.mark.parametrize("per_image_basis", [False, True])
@pytest.mark.parametrize("chunk_size", [0, 1, 7, 36])
def test_gather_path_equals_masked_path(per_image_basis: bool, chunk_size: int) -> None:
    q, k, v, coef, basis = _attention_inputs(per_image_basis=per_image_basis)
    budget = 10
    masked = masked_sparse_attention(q, k, v, connectivity_mask(connectivity_index(coef, basis, budget), 37))
    gathered = gathered_sparse_attention(q, k, v, coef, basis, budget, scale=16 ** -0.5, chunk_size=chunk_size)
    torch.testing.assert_close(gathered, masked, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(), dict(token_keep_rate=0.7)])
@pytest.mark.parametrize("size", [(224, 224), (160, 256)])
def test_model_paths_agree(kwargs: dict, size: tuple) -> None:
    masked = timm.create_model("sparsifiner_tiny", depth=4, reduction_loc=(1, 2), sparse_path="masked",
                               **kwargs).eval()
    gather = timm.create_model("sparsifiner_tiny", depth=4, reduction_loc=(1, 2), sparse_path="gather",
                               **kwargs).eval()
    gather.load_state_dict(masked.state_dict())
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        torch.testing.assert_close(gather(x), masked(x), rtol=0, atol=1e-5)


def test_auto_path_is_gather_in_eval_from_the_crossover_and_masked_in_training() -> None:
    from tokenzoo.sparsifiner import GATHER_MIN_TOKENS

    model = timm.create_model("sparsifiner_tiny", depth=1)
    attn = model.blocks[0].attn
    assert not attn.use_gather(197)  # training
    model.eval()
    assert attn.use_gather(197) and attn.use_gather(GATHER_MIN_TOKENS) and not attn.use_gather(GATHER_MIN_TOKENS - 1)
    model = timm.create_model("sparsifiner_tiny", depth=1, sparse_path="masked").eval()
    assert not model.blocks[0].attn.use_gather(4097)


def test_flop_count_follows_the_path_that_runs() -> None:
    masked = timm.create_model("sparsifiner_tiny", depth=1, sparse_path="masked")
    gather = timm.create_model("sparsifiner_tiny", depth=1, sparse_path="gather")
    H, D, N, b = 3, 64, 197, 50
    # masked: fused attention over all N x N pairs; gather: dense CLS row, dense q.k of the patch rows (the chunk
    # product), and the value sum over the b selected keys only (the embedding bag)
    masked_attention = 2 * H * N * N * D
    gather_attention = 2 * H * N * D + H * (N - 1) * N * D + H * (N - 1) * b * D
    difference = (count_gmacs(masked, 224) - count_gmacs(gather, 224)) * 1e9
    assert difference == pytest.approx(masked_attention - gather_attention, abs=1.0)


def _official_keys(depth: int) -> list:
    """Every key of the official ``Sparsifiner`` state dict (src/models/sparsifiner.py), written out."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        keys += [f"blocks.{i}.{name}" for name in (
            "norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
            "attn.mask_predictor.proj_n", "attn.mask_predictor.proj_back_n",
            "attn.mask_predictor.proj_c_q.weight", "attn.mask_predictor.proj_c_q.bias",
            "attn.mask_predictor.proj_c_k.weight", "attn.mask_predictor.proj_c_k.bias",
            "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias")]
    return keys + ["norm.weight", "norm.bias", "head.weight", "head.bias"]


def _official_state_dict(depth: int, C: int = 192, heads: int = 3) -> Dict[str, torch.Tensor]:
    """A random state dict in the official layout (DeiT-Ti dims), with a predictor whose every step matters: the
    coefficients are spread enough that keeping the top 8 changes the selected keys, and about half the basis
    entries fall under the 2e-2 threshold (the logits test fails when the scale, the coefficient top-k, the threshold
    or the dense CLS row is changed)."""
    D, N, K = C // heads, 197, 197 // 6
    shapes = {"cls_token": (1, 1, C), "pos_embed": (1, N, C), "patch_embed.proj.weight": (C, 3, 16, 16),
              "patch_embed.proj.bias": (C,), "norm.weight": (C,), "norm.bias": (C,), "head.weight": (1000, C),
              "head.bias": (1000,), "norm1.weight": (C,), "norm1.bias": (C,), "attn.qkv.weight": (3 * C, C),
              "attn.qkv.bias": (3 * C,), "attn.proj.weight": (C, C), "attn.proj.bias": (C,),
              "attn.mask_predictor.proj_n": (N, K), "attn.mask_predictor.proj_back_n": (N, K),
              "attn.mask_predictor.proj_c_q.weight": (D // 2, D), "attn.mask_predictor.proj_c_q.bias": (D // 2,),
              "attn.mask_predictor.proj_c_k.weight": (D // 2, D), "attn.mask_predictor.proj_c_k.bias": (D // 2,),
              "norm2.weight": (C,), "norm2.bias": (C,), "mlp.fc1.weight": (4 * C, C), "mlp.fc1.bias": (4 * C,),
              "mlp.fc2.weight": (C, 4 * C), "mlp.fc2.bias": (C,)}
    std = {"proj_n": 0.1, "proj_back_n": 0.03, "proj_c_q.weight": 0.08, "proj_c_k.weight": 0.08, "qkv.weight": 0.1,
           "norm1.weight": 0.0, "norm2.weight": 0.0, "norm.weight": 0.0}
    state_dict = {}
    for key in _official_keys(depth):
        name = key.split(".", 2)[-1] if key.startswith("blocks.") else key
        scale = next((s for suffix, s in std.items() if name.endswith(suffix)), 0.02)
        value = torch.randn(shapes[name]) * scale
        state_dict[key] = value + 1.0 if name.endswith(("norm1.weight", "norm2.weight", "norm.weight")) else value
    return state_dict


def _official_forward(sd: Dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int,
                      keep: float = 0.25, topk: int = 8, threshold: float = 2e-2) -> torch.Tensor:
    """The official Sparsifiner eval forward (src/models/sparsifiner.py, default config), written out."""
    B = x.shape[0]
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    t = torch.cat([sd["cls_token"].expand(B, -1, -1), t], dim=1) + sd["pos_embed"]
    N, C = t.shape[1:]
    D = C // heads
    for i in range(depth):
        p, mp = f"blocks.{i}.", f"blocks.{i}.attn.mask_predictor."
        h = F.layer_norm(t, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).reshape(
            B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
        # MaskPredictor.forward
        q_r = F.linear(q, sd[mp + "proj_c_q.weight"], sd[mp + "proj_c_q.bias"])
        k_r = F.linear(k, sd[mp + "proj_c_k.weight"], sd[mp + "proj_c_k.bias"]).permute(0, 1, 3, 2) @ sd[mp + "proj_n"]
        basis = sd[mp + "proj_back_n"].permute(1, 0).abs()
        basis = torch.where(basis > threshold, basis, torch.zeros_like(basis))  # nn.Threshold(2e-2, 0.)
        cheap_attn = ((q_r @ k_r) * heads ** -0.5)[..., 1:, :]
        basis_coef = cheap_attn.softmax(dim=-1)
        values, indices = basis_coef.topk(topk, sorted=False)
        basis_coef = torch.zeros_like(basis_coef).scatter(-1, indices, values)
        approx_attn = basis_coef @ basis
        connected = approx_attn.topk(math.ceil(keep * N), sorted=False)[1]
        attn_mask = torch.zeros_like(approx_attn).scatter(-1, connected, 1.0)
        attn_mask = torch.cat([torch.ones(B, heads, 1, N), attn_mask], dim=2)
        # Attention.forward
        attn = (q @ k.transpose(-2, -1)) * D ** -0.5
        attn = attn.masked_fill(~attn_mask.bool(), float("-inf")).softmax(dim=-1).nan_to_num()
        out = (attn @ v).transpose(1, 2).reshape(B, N, C)
        t = t + F.linear(out, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.layer_norm(t, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        t = t + h
    t = F.layer_norm(t, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return F.linear(t[:, 0], sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("wrapped", [True, False])
def test_official_checkpoint_loads_and_reproduces_the_official_logits(tmp_path, wrapped: bool) -> None:
    depth = 3
    official = _official_state_dict(depth)
    path = tmp_path / "sparsifiner_official.pth"
    torch.save({"model": official} if wrapped else official, path)
    model = timm.create_model("sparsifiner_tiny", depth=depth, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    state_dict = model.state_dict()
    assert set(state_dict) == set(official)  # every key mapped, none missing, none unexpected
    for key, value in official.items():
        torch.testing.assert_close(state_dict[key], value, rtol=0, atol=0)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = _official_forward(official, x, depth, heads=3)
        for path_name in ("masked", "gather"):
            for blk in model.blocks:
                blk.attn.sparse_path = path_name
            assert (model(x) - expected).abs().max() <= 1e-4, path_name
        # each predictor tensor is used where the official code uses it: swapping two of them shows
        swapped = dict(official)
        for i in range(depth):
            swapped[f"blocks.{i}.attn.mask_predictor.proj_n"] = official[f"blocks.{i}.attn.mask_predictor.proj_back_n"]
            swapped[f"blocks.{i}.attn.mask_predictor.proj_back_n"] = official[f"blocks.{i}.attn.mask_predictor.proj_n"]
        assert (model(x) - _official_forward(swapped, x, depth, heads=3)).abs().max() > 1e-2


def test_checkpoint_filter_resamples_the_token_projections_and_lists_what_it_could_not_map(caplog) -> None:
    official = _official_state_dict(1)
    official["blocks.5.attn.mask_predictor.proj_n"] = torch.zeros(197, 32)  # a block this model does not have
    model = timm.create_model("sparsifiner_tiny", depth=1, img_size=(160, 256))
    with caplog.at_level(logging.WARNING, logger="tokenzoo.sparsifiner"):
        out = model.checkpoint_filter({"model": official})
    assert "blocks.5.attn.mask_predictor.proj_n" in caplog.text and "model tensors" not in caplog.text
    proj_n, proj_back = (out[f"blocks.0.attn.mask_predictor.{name}"] for name in ("proj_n", "proj_back_n"))
    assert proj_n.shape == proj_back.shape == (1 + 10 * 16, 32)
    key = "blocks.0.attn.mask_predictor."
    torch.testing.assert_close(proj_n[0], official[key + "proj_n"][0], rtol=0, atol=0)  # CLS row kept
    torch.testing.assert_close(proj_back[0], official[key + "proj_back_n"][0], rtol=0, atol=0)
    torch.testing.assert_close(proj_back, resample_token_projection(official[key + "proj_back_n"], (10, 16), (14, 14)))
    # a constant down-projection keeps its sum over the patch tokens (the projected keys keep their magnitude)
    constant = torch.ones(197, 32)
    resampled = resample_token_projection(constant, (10, 16), (14, 14), preserve_sum=True)
    torch.testing.assert_close(resampled[1:].sum(0), constant[1:].sum(0))
    assert resample_token_projection(constant, (14, 14), (14, 14), preserve_sum=True) is constant
    model.load_state_dict(out)


def test_deit_weights_load_with_the_predictor_keys_listed(caplog, deit_state_dicts) -> None:
    model = timm.create_model("sparsifiner_tiny")
    with caplog.at_level(logging.WARNING, logger="tokenzoo.sparsifiner"):
        out = model.checkpoint_filter(deit_state_dicts["tiny"])
    missing = set(model.state_dict()) - set(out)
    assert missing == {key for key in model.state_dict() if ".mask_predictor." in key} and len(missing) == 12 * 6
    assert "72 model tensors not in the checkpoint" in caplog.text
    assert all(key in caplog.text for key in missing)


def test_openmmlab_backbone_loads_deit_weights_and_logs_the_random_predictor(tmp_path, monkeypatch) -> None:
    tm = pytest.importorskip("tokenzoo.mm")
    deit = timm.create_model("deit_tiny_patch16_224", depth=2)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit.state_dict()}, path)
    backbone = tm.TokenZooViT("sparsifiner_tiny", dict(depth=2), img_size=128, out_indices=(0, 1),
                              init_cfg=dict(type="Pretrained", checkpoint=str(path)))
    predictor = {k: v.clone() for k, v in backbone.state_dict().items() if ".mask_predictor." in k}
    messages = []
    monkeypatch.setattr(tm.backbone, "print_log", lambda message, **kwargs: messages.append(message))
    backbone.init_weights()
    torch.testing.assert_close(backbone.vit.blocks[1].attn.qkv.weight, deit.blocks[1].attn.qkv.weight)
    assert len(predictor) == 12 and all(torch.equal(backbone.state_dict()[k], v) for k, v in predictor.items())
    assert len(messages) == 1 and all(key.removeprefix("vit.") in messages[0] for key in predictor)
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 96, 160))
    assert [tuple(m.shape) for m in maps] == [(1, 192, 6, 10)] * 2


def test_predictor_is_skipped_at_keep_rate_one() -> None:
    model = timm.create_model("sparsifiner_tiny", depth=2, attn_keep_rate=1.0).eval()
    for blk in model.blocks:
        blk.attn.mask_predictor.register_forward_pre_hook(lambda *args: pytest.fail("the predictor ran"))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))


def test_other_resolutions_run_and_give_full_maps() -> None:
    for kwargs in (dict(), dict(token_keep_rate=0.7)):
        model = timm.create_model("sparsifiner_tiny", depth=4, reduction_loc=(1, 2), **kwargs).eval()
        for size in ((384, 384), (160, 256), (64, 64)):
            x = torch.randn(1, 3, *size)
            ran = record_block_outputs(model)
            with torch.no_grad():
                maps = model.forward_intermediates(x, intermediates_only=True)
            assert all(m.shape == (1, 192, size[0] // 16, size[1] // 16) for m in maps)
            assert all(torch.isfinite(m).all() for m in maps)
            assert ran == model.token_counts(size)


def test_token_sparsity_keeps_the_official_counts() -> None:
    model = timm.create_model("sparsifiner_small", token_keep_rate=0.7).eval()
    expected = [196] * 3 + [138] * 3 + [97] * 3 + [68] * 3  # official: ceil(0.7 ** i * 196) at blocks 3, 6, 9
    assert model.token_counts(224) == expected
    assert [math.ceil(0.7 ** i * 196) for i in (1, 2, 3)] == [138, 97, 68]
    ran = record_block_outputs(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    assert ran == expected


def test_removed_tokens_match_the_official_zero_masking_for_the_kept_queries() -> None:
    """After a removal a block must give the predictor the kept tokens' own rows of proj_n / proj_back_n (found from
    the record): the patch tokens left then get exactly what the official code computes for them with the removed
    tokens zero-masked (token_mask)."""
    model = timm.create_model("sparsifiner_tiny", depth=1, sparse_path="masked").eval()
    block = model.blocks[0]
    attn, predictor = block.attn, block.attn.mask_predictor
    predictor.proj_c_q.weight.data.mul_(15)
    predictor.proj_c_k.weight.data.mul_(15)
    B, N, C, H, D = 2, 197, 192, 3, 64
    x = torch.randn(B, N, C)
    kept = torch.stack([torch.randperm(196)[:120] for _ in range(B)])  # the tokens left, in their new order
    token_mask = torch.zeros(B, 196, dtype=torch.bool).scatter(1, kept, True)
    record = TokenRecord.start(x, 1, (14, 14), track_sources=True).follow(destination_of_kept(kept, 196), 120)
    x_kept = torch.cat([x[:, :1], x[:, 1:].gather(1, kept.unsqueeze(-1).expand(-1, -1, C))], dim=1)
    with torch.no_grad():
        out, _ = block(x_kept, record)
        # official Attention + MaskPredictor with prev_token_mask (PRUNE_ATTN_MATRIX_ROW off), written out
        qkv = F.linear(block.norm1(x), attn.qkv.weight, attn.qkv.bias)
        q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
        zero = ~token_mask[:, None, :, None]
        q, k, v = (torch.cat([t[:, :, :1], t[:, :, 1:].masked_fill(zero, 0.0)], dim=2) for t in (q, k, v))
        q_r, k_r = predictor.proj_c_q(q), predictor.proj_c_k(k)
        q_r, k_r = (torch.cat([t[:, :, :1], t[:, :, 1:].masked_fill(zero, 0.0)], dim=2) for t in (q_r, k_r))
        k_r = k_r.permute(0, 1, 3, 2) @ predictor.proj_n
        basis = sparsify_basis(predictor.proj_back_n, 2e-2)
        coef = keep_top_coefficients(((q_r @ k_r) * H ** -0.5)[:, :, 1:].softmax(-1), 8)
        score = (coef @ basis).clone()
        score[..., 1:] = score[..., 1:].masked_fill(~token_mask[:, None, None, :], float("-inf"))
        budget = min(120, math.ceil(0.25 * N))
        mask = torch.zeros_like(score).scatter(-1, score.topk(budget, sorted=False)[1], 1.0)
        logits = ((q[:, :, 1:] @ k.transpose(-2, -1)) * D ** -0.5).masked_fill(mask == 0, float("-inf"))
        official = attn.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N - 1, C))
        patches = x_kept[:, 1:] + official.gather(1, kept.unsqueeze(-1).expand(-1, -1, C))
        expected = patches + block.mlp(block.norm2(patches))
    torch.testing.assert_close(out[:, 1:], expected, rtol=0, atol=1e-5)


def test_positions_follow_two_removals() -> None:
    from tokenzoo.sparsifiner import _patch_positions

    record = TokenRecord.start(torch.zeros(2, 17, 1), 1, (4, 4), track_sources=True)
    positions = torch.arange(16).expand(2, 16)
    for num_old, num_new in ((16, 9), (9, 4)):
        keep = torch.stack([torch.randperm(num_old)[:num_new] for _ in range(2)])
        record = record.follow(destination_of_kept(keep, num_old), num_new)
        positions = positions.gather(1, keep)
        assert torch.equal(_patch_positions(record, num_new, 16), positions)


@pytest.mark.parametrize("kwargs", [dict(sparse_path="masked"), dict(sparse_path="gather"),
                                    dict(sparse_path="gather", token_keep_rate=0.5, reduction_loc=(0,))])
def test_onnx_export_matches_pytorch_at_batch_1_and_3(tmp_path, kwargs: dict) -> None:
    """The export always takes the masked path (no embedding bag, whose ONNX form is a loop over bags); the eager
    gather path must give the same outputs. Two blocks keep the number of top-k choices (each a possible near-tie
    between two runtimes' roundings, see the module docstring) small."""
    onnx_export = pytest.importorskip("tokenzoo.export.onnx_export")
    onnx = pytest.importorskip("onnx")
    model = timm.create_model("sparsifiner_tiny", depth=2, img_size=96, **kwargs).eval()
    path = onnx_export.export_onnx(model, tmp_path / "sparsifiner.onnx", img_size=96)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert "TopK" in ops and "Loop" not in ops
    diffs = onnx_export.check_parity(model, path, batch_sizes=(1, 3), img_size=96)
    assert max(diffs.values()) < onnx_export.PARITY_TOL, diffs


def _tiny_student_and_teacher(img_size: int = 96, **kwargs):
    teacher = timm.create_model("deit_tiny_patch16_224", depth=2, img_size=img_size).eval()
    student = timm.create_model("sparsifiner_tiny", depth=2, img_size=img_size, num_classes=1000, **kwargs)
    student.load_state_dict(teacher.state_dict(), strict=False)
    return student, teacher


def test_teacher_outputs_are_the_dense_teachers() -> None:
    _, teacher = _tiny_student_and_teacher()
    x = torch.randn(2, 3, 96, 96)
    out = teacher_outputs(teacher, x)
    with torch.no_grad():
        torch.testing.assert_close(out["logits"], teacher(x))
        assert out["tokens"].shape == (2, 36, 192)
        h = teacher.blocks[0].norm1(teacher._pos_embed(teacher.patch_embed(x)))
        q, k, _ = teacher.blocks[0].attn.qkv(h).reshape(2, 37, 3, 3, 64).permute(2, 0, 3, 1, 4)
        torch.testing.assert_close(out["attn"][0], ((q @ k.transpose(-2, -1)) / 8).softmax(-1))
    assert len(out["attn"]) == 2


def test_losses_against_their_definitions() -> None:
    approx = [torch.rand(2, 3, 9, 10) for _ in range(2)]
    teacher_attn = [torch.rand(2, 3, 10, 10) for _ in range(2)]
    expected = 0.01 * sum(((a - t[:, :, 1:]) ** 2).sum() for a, t in zip(approx, teacher_attn)) / 2
    torch.testing.assert_close(predictor_distillation_loss(approx, teacher_attn), expected)

    logits, teacher_logits = torch.randn(4, 5), torch.randn(4, 5)
    tokens, teacher_tokens = torch.randn(4, 3, 6), torch.randn(4, 9, 6)
    positions = torch.stack([torch.randperm(9)[:3] for _ in range(4)])
    targets = torch.tensor([0, 3, 1, 4])
    total, parts = backbone_distillation_loss(
        dict(logits=logits, tokens=tokens, positions=positions), targets,
        dict(logits=teacher_logits, tokens=teacher_tokens))
    p_t, log_p_s = teacher_logits.softmax(-1), logits.log_softmax(-1)
    kl = (p_t * (p_t.log() - log_p_s)).sum() / 4
    picked = torch.stack([teacher_tokens[b, positions[b]] for b in range(4)])
    torch.testing.assert_close(parts["cls"], -log_p_s[torch.arange(4), targets].mean())
    torch.testing.assert_close(parts["cls_distill"], 0.5 * kl)
    torch.testing.assert_close(parts["token_distill"], 0.5 * ((tokens - picked) ** 2).mean())
    torch.testing.assert_close(total, parts["cls"] + parts["cls_distill"] + parts["token_distill"])
    with pytest.raises(ValueError, match="one teacher attention per student block"):
        predictor_distillation_loss(approx, teacher_attn[:1])


def _train(student, teacher, loss_fn, params, steps: int = 6):
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 96, 96, generator=generator)
    targets = torch.randint(0, 1000, (4,), generator=generator)
    losses = []
    for _ in range(steps):
        loss = loss_fn(student.forward_train(x), targets, teacher_outputs(teacher, x))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_the_two_training_phases_train_what_they_should_and_lower_their_losses() -> None:
    student, teacher = _tiny_student_and_teacher()
    student.train()
    assert not any(p.requires_grad for n, p in student.named_parameters() if ".mask_predictor." in n)

    params = set_training_phase(student, "predictor")
    assert {id(p) for p in params} == {id(p) for n, p in student.named_parameters() if ".mask_predictor." in n}
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if ".mask_predictor." not in n}
    out = student.forward_train(torch.randn(1, 3, 96, 96))
    assert out["approx_attn"][0].shape == (1, 3, 36, 37) and out["positions"] is None
    losses = _train(student, teacher, lambda o, t, tt: predictor_distillation_loss(o["approx_attn"], tt["attn"]),
                    params)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in student.named_parameters() if n in frozen)

    params = set_training_phase(student, "backbone")
    assert student.forward_train(torch.randn(1, 3, 96, 96))["approx_attn"] == [None, None]
    predictor = {n: p.detach().clone() for n, p in student.named_parameters() if ".mask_predictor." in n}
    assert len(params) == len(frozen)
    losses = _train(student, teacher, lambda o, t, tt: backbone_distillation_loss(o, t, tt)[0], params)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p, predictor[n]) for n, p in student.named_parameters() if n in predictor)


def test_predictor_phase_trains_with_dense_attention_and_all_tokens() -> None:
    student, teacher = _tiny_student_and_teacher(token_keep_rate=0.5, reduction_loc=(0,))
    set_training_phase(student, "predictor")
    student.train()
    x = torch.randn(2, 3, 96, 96)
    assert student.token_counts(96) == [36, 36]
    with torch.no_grad():
        # same weights, dense attention: the student computes the teacher (in eval both, dropout aside)
        torch.testing.assert_close(student.forward_train(x)["logits"], teacher(x), rtol=0, atol=1e-5)
    student.eval()
    assert student.token_counts(96) == [18, 18]


def test_mhsa_accounting_of_the_paper() -> None:
    model = timm.create_model("sparsifiner_small")
    deit = timm.create_model("deit_small_patch16_224")
    N, H, D, b, K, c = 197, 6, 64, 50, 32, 32
    dense = 12 * 2 * H * D * N * N
    sparse = 12 * (2 * H * D * (N + (N - 1) * b) + H * D * K * (N + 2 * c + N - 1) + H * (N - 1) * 8 * N)
    assert mhsa_gmacs(deit) == pytest.approx(dense / 1e9)
    assert mhsa_gmacs(model) == pytest.approx(sparse / 1e9)
    assert mhsa_gmacs(model) < 0.52 * mhsa_gmacs(deit)


@pytest.mark.parametrize("kwargs, message", [
    (dict(attn_keep_rate=0.0), "attn_keep_rate must be a number in \\(0, 1\\]"),
    (dict(attn_keep_rate=1.5), "attn_keep_rate must be a number in \\(0, 1\\]"),
    (dict(attn_keep_rate="0.25"), "attn_keep_rate must be a number"),
    (dict(token_keep_rate=0.0), "token_keep_rate must be a number in \\(0, 1\\]"),
    (dict(reduce_n_factor=198), "leaves no basis token"),
    (dict(reduce_n_factor=0), "reduce_n_factor must be a positive number"),
    (dict(reduce_c_factor=65), "leaves no channel"),
    (dict(reduce_c_factor=-2), "reduce_c_factor must be a positive number"),
    (dict(basis_topk=33), "basis_topk must be an int in \\[1, 32\\]"),
    (dict(basis_topk=0), "basis_topk must be an int"),
    (dict(basis_threshold=-1.0), "basis_threshold must be a number >= 0"),
    (dict(sparse_path="sparse"), "sparse_path must be one of"),
    (dict(token_keep_rate=0.7, reduction_loc=(12,)), "reduction_loc must be a sequence of block indices"),
    (dict(class_token=False, global_pool="avg"), "exactly one CLS token"),
])
def test_bad_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        timm.create_model("sparsifiner_tiny", **kwargs)


def test_three_sizes_register_with_the_deit_weights_tag() -> None:
    for size, dim in (("tiny", 192), ("small", 384), ("base", 768)):
        assert timm.is_model(f"sparsifiner_{size}") and timm.is_model(f"sparsifiner_{size}.deit_in1k")
        with torch.device("meta"):
            assert timm.create_model(f"sparsifiner_{size}").embed_dim == dim


def test_bad_training_phase_is_rejected() -> None:
    with pytest.raises(ValueError, match="phase must be one of"):
        set_training_phase(timm.create_model("sparsifiner_tiny", depth=1), "both")
    with pytest.raises(ValueError, match="needs a Sparsifiner model"):
        set_training_phase(timm.create_model("deit_tiny_patch16_224", depth=1), "predictor")
    assert isinstance(timm.create_model("sparsifiner_tiny", depth=1), Sparsifiner)
