"""Expedit: token clustering and reconstruction against references written from the official definitions, the model
against timm's ViT with those references in between, token counts, dense maps, errors, ONNX export."""
from typing import Tuple

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tokenzoo.expedit import paper_cluster_loc
from tokenzoo.export.onnx_export import PARITY_TOL, check_parity, export_onnx
from tokenzoo.layers import (TokenRecord, cluster_grid_size, cluster_windows, nearest_source_index,
                             reconstruction_weights, token_clustering)

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- references, written from the official Expedit-Segmenter ops (mmseg/ops/cluster.py, reconstruction.py) ----

def reference_clustering(tokens: torch.Tensor, grid: Tuple[int, int], cluster_grid: Tuple[int, int], iters: int,
                         window: int, temperature: float) -> torch.Tensor:
    """The official clustering: full (M, N) distance matrix, +1e16 outside each token's window, softmax over the
    centres, detached weighted means."""
    B, N, C = tokens.shape
    (H, W), (h, w) = grid, cluster_grid
    x = tokens.transpose(1, 2)  # (B, C, N)
    centres = F.adaptive_avg_pool2d(x.reshape(B, C, H, W), (h, w)).reshape(B, C, h * w)
    # initial cell of each token, in float32 as the official code runs (labels .type_as a float32 model's features)
    labels = F.interpolate(torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w), size=(H, W),
                           mode="nearest").view(-1).long()
    cells = torch.arange(h * w)
    r = window // 2
    allowed = (((labels[None] // w - cells[:, None] // w).abs() <= r) &
               ((labels[None] % w - cells[:, None] % w).abs() <= r))  # (M, N)
    for _ in range(iters):
        dist = ((x * x).sum(1)[:, None, :] + (centres * centres).sum(1)[:, :, None]
                - 2 * torch.einsum("bcm,bcn->bmn", centres, x))
        affinity = (-(dist + (~allowed) * 1e16) * temperature).softmax(dim=1).detach()
        centres = (torch.bmm(affinity, tokens) / affinity.sum(2, keepdim=True).clamp(min=1e-16)).transpose(1, 2)
    return centres.transpose(1, 2)


def reference_reconstruction(before: torch.Tensor, centres: torch.Tensor, refined: torch.Tensor, k: int,
                             temperature: float) -> torch.Tensor:
    """The official reconstruction, token by token: weights exp(-t * |x - c|^2) over all centres, the top k kept,
    L2-normalized, applied to the refined cluster tokens."""
    out = torch.empty(before.shape[0], before.shape[1], refined.shape[-1], dtype=refined.dtype)
    for b in range(before.shape[0]):
        for n in range(before.shape[1]):
            weight = torch.exp(-temperature * (before[b, n] - centres[b]).square().sum(-1))
            kth = weight.topk(k).values[-1]
            weight = F.normalize(torch.where(weight >= kth, weight, torch.zeros_like(weight)), dim=0)
            out[b, n] = weight @ refined[b]
    return out


def rebuild(index: torch.Tensor, weights: torch.Tensor, num_clusters: int, refined: torch.Tensor) -> torch.Tensor:
    """Full-grid tokens from cluster tokens through the shared record (what dense maps use)."""
    B, N, k = index.shape
    record = TokenRecord.start(torch.zeros(B, N, 1), num_prefix=0, grid=(1, N), track_sources=True)
    record = record.follow(index, num_clusters, weights if k > 1 else None)
    return record.restore(refined)


# ---- operators ----

def test_initial_cells_are_the_official_nearest_interpolation() -> None:
    for cells in range(1, 50):
        for size in range(cells, 100):
            expected = F.interpolate(torch.arange(cells, dtype=torch.float32).view(1, 1, cells, 1),
                                     size=(size, 1), mode="nearest").view(-1).long().tolist()
            assert nearest_source_index(size, cells) == expected, (size, cells)
    assert nearest_source_index(82, 2)[41] == 0  # float32 rounding, not the exact floor(41 * 2 / 82) = 1


@pytest.mark.parametrize("grid, cluster_grid, window, iters, temperature", [
    ((8, 8), (5, 5), 5, 5, 0.5),
    ((14, 16), (10, 11), 5, 5, 0.1),  # non-square, cells of 1 and 2 tokens
    ((7, 12), (3, 9), 3, 3, 0.3),
    ((10, 10), (2, 2), 5, 2, 0.2),  # the window covers the whole cluster grid
    ((9, 13), (9, 13), 1, 2, 0.1),  # one cell per token, window 1
    ((12, 5), (7, 3), 7, 4, 0.05),
    ((40, 40), (28, 28), 5, 5, 0.02),  # the paper's ADE20K setting
    ((33, 20), (4, 17), 3, 5, 1.0),  # tiles cut off at the grid's edge
    ((6, 6), (4, 4), 5, 0, 1.0),  # no iteration: the average-pooled centres
    ((82, 3), (2, 2), 1, 2, 0.5),  # position 41 starts in cell 0 (float32 rounding), where floor(41 * 2 / 82) = 1
])
def test_windowed_clustering_equals_the_masked_full_computation(grid, cluster_grid, window, iters, temperature):
    tokens = (2 * torch.randn(2, grid[0] * grid[1], 8, dtype=torch.float64)).requires_grad_()
    centres = token_clustering(tokens, grid, cluster_grid, iters, window, temperature)
    expected = reference_clustering(tokens, grid, cluster_grid, iters, window, temperature)
    torch.testing.assert_close(centres, expected, rtol=0, atol=1e-10)
    # the assignments are detached in both: the gradients reach the tokens through the weighted means alone
    probe = torch.randn_like(centres)
    (grad,) = torch.autograd.grad((centres * probe).sum(), tokens)
    (expected_grad,) = torch.autograd.grad((expected * probe).sum(), tokens)
    torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)


def test_clustering_recovers_well_separated_groups() -> None:
    # a 12x12 grid split into two groups at column 5, while the two initial cells split it at column 6: the
    # average-pooled start mixes the groups, the soft k-means rounds must separate them
    grid, group_left = (12, 12), torch.arange(12).repeat(12) < 5
    means = torch.tensor([[4.0, 0.0, 0.0], [0.0, 4.0, 0.0]])
    tokens = means[(~group_left).long()] + 0.05 * torch.randn(144, 3)
    initial = token_clustering(tokens[None], grid, (1, 2), iters=0, window=3, temperature=1.0)[0]
    centres = token_clustering(tokens[None], grid, (1, 2), iters=5, window=3, temperature=1.0)[0]
    assert (initial[0] - means[0]).norm() > 0.5, "the test needs a start that mixes the groups"
    torch.testing.assert_close(centres, torch.stack([tokens[group_left].mean(0), tokens[~group_left].mean(0)]),
                               rtol=0, atol=1e-4)
    nearest = torch.cdist(tokens, centres).argmin(dim=1)
    assert torch.equal(nearest, (~group_left).long())


def test_clustering_cost_follows_the_window_not_the_grid() -> None:
    def macs(side: int) -> int:
        tokens = torch.randn(1, side * side, 16)
        with FlopCounterMode(display=False) as counter:
            token_clustering(tokens, (side, side), (round(0.7 * side),) * 2, iters=5, window=5)
        return counter.get_total_flops()

    # 4x the tokens at the same cluster ratio: at most ~4x the work (edge tiles aside), 16x for the full matrix
    counts = [macs(side) for side in (32, 64, 128)]
    assert counts[1] / counts[0] < 4.5 and counts[2] / counts[1] < 4.5
    tables = cluster_windows((64, 64), (45, 45), window=5)
    assert tables.allowed.shape[-1] <= (2 * 5 - 1) ** 2  # centres met per token, whatever the grid
    assert tables.allowed[tables.token_ok].sum(-1).max() <= 25  # of which each keeps its 5x5 window


def test_reconstruction_matches_the_official_definition() -> None:
    before = torch.randn(2, 30, 6, dtype=torch.float64)
    centres = torch.randn(2, 12, 6, dtype=torch.float64)
    refined = torch.randn(2, 12, 5, dtype=torch.float64)
    index, weights = reconstruction_weights(before, centres, k=4, temperature=0.3)
    assert index.shape == weights.shape == (2, 30, 4)
    torch.testing.assert_close(weights.norm(dim=-1), torch.ones(2, 30, dtype=torch.float64))  # L2, not sum-to-one
    expected = reference_reconstruction(before, centres, refined, k=4, temperature=0.3)
    torch.testing.assert_close(rebuild(index, weights, 12, refined), expected, rtol=0, atol=1e-10)
    # with k = 1 each token is its nearest cluster token, exactly
    index, weights = reconstruction_weights(before, centres, k=1, temperature=0.3)
    nearest = torch.cdist(before, centres).argmin(dim=-1)
    assert torch.equal(index[..., 0], nearest) and torch.equal(weights, torch.ones_like(weights))
    assert torch.equal(rebuild(index, weights, 12, refined), refined.gather(1, nearest[..., None].expand(-1, -1, 5)))


def test_reconstruction_weights_do_not_underflow() -> None:
    # temperature * distance ~ 200: the official exp(-t * D) is 0 in float32 for every centre
    before, centres = torch.zeros(1, 3, 4), torch.full((1, 5, 4), 50.0) + torch.arange(5.0)[None, :, None]
    assert torch.exp(-0.02 * (before[:, :, None] - centres[:, None]).square().sum(-1)).max() == 0
    index, weights = reconstruction_weights(before, centres, k=3, temperature=0.02)
    assert torch.equal(index, torch.tensor([0, 1, 2]).expand(1, 3, 3))
    expected = F.normalize(torch.exp(-0.02 * torch.tensor([0.0, 404.0, 816.0])), dim=0)  # D - D_min, same ratios
    torch.testing.assert_close(weights, expected.expand(1, 3, 3))


def test_cluster_grid_from_a_fraction_or_a_pair() -> None:
    assert cluster_grid_size((40, 40), 0.7) == (28, 28)  # the paper's 28x28 of 40x40
    assert cluster_grid_size((32, 32), 0.7) == (22, 22)
    assert cluster_grid_size((64, 43), 0.7) == (45, 30)
    assert cluster_grid_size((14, 14), 0.7) == (10, 10)
    assert cluster_grid_size((3, 3), 0.1) == (1, 1)
    assert cluster_grid_size((10, 12), (4, 12)) == (4, 12)
    with pytest.raises(ValueError, match=r"does not fit a 10x12 patch grid: at most 10x12"):
        cluster_grid_size((10, 12), (4, 13))


# ---- the model ----

def tiny(**kwargs) -> torch.nn.Module:
    """A 6-block DeiT-Ti-sized Expedit clustering after block 2, unless told otherwise."""
    return timm.create_model("expedit_tiny", **dict(dict(depth=6, cluster_loc=2), **kwargs)).eval()


def timm_twin(model: torch.nn.Module) -> torch.nn.Module:
    """timm's DeiT with the same depth and weights."""
    deit = timm.create_model("deit_tiny_patch16_224", depth=len(model.blocks), dynamic_img_size=True).eval()
    deit.load_state_dict(model.state_dict())
    return deit


def test_paper_setting_and_the_scaling_rule() -> None:
    assert paper_cluster_loc(24) == 9 and paper_cluster_loc(12) == 4 and paper_cluster_loc(4) == 1
    with torch.device("meta"):  # no weights needed to count tokens: ViT-L stays cheap
        large = timm.create_model("expedit_large")
        small = timm.create_model("expedit_small")
    assert (large.cluster_loc, len(large.blocks), large.embed_dim) == (9, 24, 1024)
    assert large.cluster_settings == (0.7, 5, 5, 0.02, 20, 0.02)  # clusters, iters, window, t, k, recon t
    assert large.token_counts(640) == [1600] * 10 + [784] * 14  # 28x28 clusters of the 40x40 grid after block 9
    assert small.token_counts(224) == [196] * 5 + [100] * 7
    assert small.token_counts(512) == [1024] * 5 + [484] * 7
    assert small.token_counts((1024, 688)) == [64 * 43] * 5 + [45 * 30] * 7


def test_large_loads_timm_vit_large_weights_through_timm(tmp_path) -> None:
    """expedit_large takes timm's ViT-L/16 (384) checkpoint as it is, its position embedding resampled to the input
    size (2 blocks here, the rest of ViT-L as it is)."""
    vit = timm.create_model("vit_large_patch16_384", depth=2)
    torch.save(vit.state_dict(), tmp_path / "vit_large.pth")
    model = timm.create_model("expedit_large", depth=2, cluster_loc=0, img_size=640, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "vit_large.pth")))
    assert model.pretrained_cfg["hf_hub_id"] == "timm/vit_large_patch16_384.augreg_in21k_ft_in1k"
    state_dict = model.state_dict()
    assert set(state_dict) == set(vit.state_dict()) and state_dict["pos_embed"].shape == (1, 1 + 40 * 40, 1024)
    torch.testing.assert_close(state_dict["blocks.1.mlp.fc1.weight"], vit.blocks[1].mlp.fc1.weight, rtol=0, atol=0)


def test_classification_is_timm_with_the_official_clustering_in_between() -> None:
    model = tiny(cluster_temperature=1.0)
    deit = timm_twin(model)
    x = torch.randn(2, 3, 160, 224)
    with torch.no_grad():
        tokens = deit.norm_pre(deit._pos_embed(deit.patch_embed(x)))
        for i, blk in enumerate(deit.blocks):
            tokens = blk(tokens)
            if i == 2:
                centres = reference_clustering(tokens[:, 1:], (10, 14), (7, 10), 5, 5, 1.0)
                tokens = torch.cat([tokens[:, :1], centres], dim=1)
        expected = deit.forward_head(deit.norm(tokens))
        assert model.token_counts((160, 224)) == [140] * 3 + [70] * 3
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)


def test_dense_maps_full_up_to_the_clustering_and_reconstructed_after() -> None:
    model = tiny(cluster_temperature=1.0, recon_k=6, recon_temperature=0.05)
    deit = timm_twin(model)
    x = torch.randn(2, 3, 160, 224)
    refined = {}
    for i in (3, 4, 5):
        model.blocks[i].register_forward_hook(lambda m, args, out, i=i: refined.update({i: out[0][:, 1:]}))
    with torch.no_grad():
        maps = model.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
        timm_maps = deit.forward_intermediates(x, output_fmt="NLC", intermediates_only=True)
    assert all(m.shape == (2, 140, 192) for m in maps)
    for i in range(3):  # blocks up to the clustering location (after block 2): the ViT's own maps
        torch.testing.assert_close(maps[i], timm_maps[i], rtol=0, atol=0)
    # later blocks run on the clusters of block 2's output and are rebuilt from their cluster tokens, with the
    # weights between block 2's output and the centres
    before = maps[2].double()
    centres = reference_clustering(before, (10, 14), (7, 10), 5, 5, 1.0)
    for i in (3, 4, 5):
        expected = reference_reconstruction(before, centres, refined[i].double(), 6, 0.05)
        torch.testing.assert_close(maps[i].double(), expected, rtol=0, atol=1e-4)


def test_clustering_after_the_last_block_or_none_is_the_vit() -> None:
    from tokenzoo.expedit import Expedit

    for model in (tiny(cluster_loc=-1), tiny(cluster_loc=5), Expedit(cluster_loc=None, depth=6, embed_dim=192,
                                                                       num_heads=3)):
        assert all(blk.clustering is None for blk in model.blocks) and model.token_counts(224) == [196] * 6
    assert tiny(cluster_loc=-3).cluster_loc == 3 and tiny(cluster_loc=-3).blocks[4].clustering is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(cluster_loc=6), r"cluster_loc must be None or a block index in \[-6, 5\] \(depth 6; negative counts"),
    (dict(cluster_loc=-7), r"block index in \[-6, 5\]"),
    (dict(cluster_loc=1.5), r"block index in \[-6, 5\]"),
    (dict(num_clusters=1.5), r"num_clusters must be a float in \(0, 1\] .* or a pair \(h, w\)"),
    (dict(num_clusters=(3, 0)), r"num_clusters must be"),
    (dict(num_clusters=3), r"num_clusters must be"),
    (dict(cluster_window=4), r"cluster_window must be an odd int >= 1"),
    (dict(cluster_window=0), r"cluster_window must be an odd int >= 1"),
    (dict(cluster_iters=-1), r"cluster_iters must be an int >= 0"),
    (dict(recon_k=0), r"recon_k must be an int >= 1"),
    (dict(num_clusters=(3, 3), recon_k=10), r"recon_k=10 is larger than the \(3, 3\) clusters: .* \[1, 9\]"),
    (dict(cluster_temperature=0.0), r"cluster_temperature must be a positive number"),
    (dict(recon_temperature=-1), r"recon_temperature must be a positive number"),
])
def test_bad_settings_are_refused_when_built(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        timm.create_model("expedit_tiny", depth=6, **dict(dict(cluster_loc=2), **kwargs))


def test_settings_that_do_not_fit_an_input_are_refused_before_running() -> None:
    model = tiny(num_clusters=(8, 8))
    with pytest.raises(ValueError, match=r"num_clusters=\(8, 8\) does not fit a 6x10 patch grid: at most 6x10"):
        model(torch.randn(1, 3, 96, 160))
    assert tiny().token_counts(224)[-1] == 100


def test_a_fractional_cluster_grid_caps_recon_k_on_small_inputs() -> None:
    """0.7 of a 4x4 grid is 3x3 clusters, fewer than recon_k = 20: the input still runs (DESIGN contract 8), and each
    position is rebuilt from all 9 clusters."""
    model = tiny(recon_k=20).eval()
    assert model.token_counts(64)[-1] == 9
    record = {}
    model.blocks[-1].register_forward_hook(lambda m, a, out: record.update(r=out[1]) and None)
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[-1], intermediates_only=True)
    assert record["r"].sources.shape == (1, 16, 9) and maps[0].shape == (1, 192, 4, 4)


@pytest.mark.parametrize("features_only", [False, True])
def test_onnx_export_matches_pytorch(tmp_path, features_only: bool) -> None:
    """Classification (clustering) and dense maps (clustering and reconstruction) export with a dynamic batch."""
    kwargs = dict(depth=3, cluster_loc=0, img_size=96, recon_k=8)
    if features_only:
        kwargs.update(features_only=True, out_indices=(0, 2))
    model = timm.create_model("expedit_tiny", **kwargs).eval()
    path = export_onnx(model, tmp_path / "expedit.onnx", img_size=96)
    diffs = check_parity(model, path, batch_sizes=(1, 3), img_size=96)
    assert max(diffs.values()) < PARITY_TOL, diffs


def test_ade20k_640_config_has_the_paper_setting() -> None:
    """The ViT-L leaf: the official Segmenter ViT-L setting, AugReg weights and normalization, and it builds."""
    import tokenzoo.mm as tm
    from test_mm_configs import CONFIG_ROOT, tiny_options

    path = CONFIG_ROOT / "expedit" / "upernet_expedit-large-loc9-c28_mln_8xb2-160k_ade20k-640x640.py"
    cfg = tm.read_config(path)
    backbone = cfg.model.backbone
    assert backbone.model_name == "expedit_large" and backbone.img_size == 640
    assert backbone.model_kwargs == dict(cluster_loc=9, num_clusters=0.7, cluster_iters=5, cluster_window=5,
                                         cluster_temperature=0.02, recon_k=20, recon_temperature=0.02)
    assert "vit_large_patch16_384.augreg_in21k_ft_in1k" in backbone.init_cfg.checkpoint
    assert cfg.model.data_preprocessor.mean == [127.5] * 3 and cfg.model.decode_head.in_channels == [1024] * 4
    model = tm.build_model(path, tiny_options("expedit", "seg")).eval()  # 4 blocks, clustering after block 1
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128), mode="tensor").shape == (1, 150, 24, 32)
