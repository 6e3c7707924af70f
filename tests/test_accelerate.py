"""tokenzoo.accelerate: the parameter-free families applied to timm ViTs of every kind, by name or instance.

Architectures are built at tiny widths (random weights: this machine cannot download), which exercises every
structural setting they bring: CLIP's pre-norm and quick-GELU, DINOv2's patch 14, layer scale and registers, MAE's
average pooling with fc-norm, DeiT III's no_embed_class, SigLIP's attention-pool head without a CLS token.
"""
import pytest
import timm
import torch

import tokenzoo
from conftest import record_block_outputs

# timm name -> constructor overrides that make it tiny (the structure is the architecture's own)
ARCHITECTURES = {
    "deit": ("deit_tiny_patch16_224", {}),
    "augreg": ("vit_tiny_patch16_224", {}),
    "clip": ("vit_base_patch16_clip_quickgelu_224", {}),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=98)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=98)),
    "mae": ("vit_base_patch16_224.mae", dict(global_pool="avg", fc_norm=True)),  # MAE fine-tuning: avg + fc-norm
    "deit3": ("deit3_small_patch16_224", {}),
    "siglip": ("vit_base_patch16_siglip_224", {}),
}
ZERO = {"evit": dict(keep_rate=1.0), "tome": dict(r=0), "mctf": dict(r=0), "mctf_fast": dict(r=0),
        "expedit": dict(cluster_loc=-1)}


def tiny(arch: str, depth: int = 4) -> torch.nn.Module:
    name, kwargs = ARCHITECTURES[arch]
    return timm.create_model(name, embed_dim=64, depth=depth, num_heads=2, **kwargs).eval()


def images(model: torch.nn.Module, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *model.patch_embed.img_size)


def test_families_listed() -> None:
    assert tokenzoo.accelerate_families() == sorted(ZERO)


@pytest.mark.parametrize("family", sorted(ZERO))
@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_zero_reduction_equals_the_source_model(arch: str, family: str) -> None:
    source = tiny(arch)
    if family == "evit" and not source.has_class_token:
        with pytest.raises(ValueError, match="EViT scores tokens with the CLS token's attention.*use ToMe or MCTF"):
            tokenzoo.accelerate(source, family)
        return
    model = tokenzoo.accelerate(source, family, **ZERO[family])
    assert isinstance(model, tokenzoo.TokenVisionTransformer) and not model.training
    x = images(source)
    with torch.no_grad():
        assert (model(x) - source(x)).abs().max() < 1e-5
        assert (model.forward_features(x) - source.forward_features(x)).abs().max() < 1e-5
    assert model.pretrained_cfg["mean"] == source.pretrained_cfg["mean"]
    assert timm.data.resolve_data_config(model=model) == timm.data.resolve_data_config(model=source)


@pytest.mark.parametrize("family", ["tome", "mctf_fast", "evit", "expedit"])
def test_register_tokens_survive_every_block(family: str) -> None:
    """DINOv2-reg: the CLS and 4 register tokens stay in front of every block's output, never reduced; at zero
    reduction they hold exactly the source's values, and the dense maps hold only patch positions."""
    source = tiny("dinov2_reg", depth=6)
    x = images(source)
    expected = []
    for blk in source.blocks:
        blk.register_forward_hook(lambda m, a, out: expected.append(out[:, :5]) and None)
    with torch.no_grad():
        source(x)
    for kwargs in (ZERO[family], {}):
        model = tokenzoo.accelerate(source, family, **kwargs)
        prefixes = []
        for blk in model.blocks:
            blk.register_forward_hook(lambda m, a, out: prefixes.append(out[0][:, :5]) and None)
        ran = record_block_outputs(model)
        with torch.no_grad():
            maps = model.forward_intermediates(x, indices=[-1], intermediates_only=True, return_prefix_tokens=True)
        assert ran == model.token_counts(98) and model.num_prefix_tokens == 5
        assert maps[0][0].shape == (2, 64, 7, 7) and maps[0][1].shape == (2, 5, 64)
        if kwargs:
            for got, want in zip(prefixes, expected):
                torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        else:
            assert ran[-1] < 49, "the default setting reduces"


def test_average_pooling_is_size_weighted_for_merging_families() -> None:
    """MAE-style average pooling: the head sees the final tokens restored onto the grid, i.e. each merged token
    weighted by its size (ToMe's choice for MAE), checked against the sizes and tokens of the last block."""
    source = tiny("mae")
    model = tokenzoo.accelerate(source, "tome", r=8).eval()
    captured = {}
    model.blocks[-1].register_forward_hook(lambda m, a, out: captured.update(x=out[0], size=out[1].size) and None)
    x = images(source)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    tokens, size = captured["x"][:, 1:], captured["size"][:, 1:]
    assert tokens.shape[1] == model.token_counts(224)[-1] < 196
    reference = model.fc_norm((tokens * size).sum(1) / size.sum(1))
    torch.testing.assert_close(pooled, reference, rtol=1e-5, atol=1e-5)
    assert (pooled - model.fc_norm(tokens.mean(1))).abs().max() > 1e-3, "the plain mean would differ"


def test_token_counts_for_patch_14_at_518() -> None:
    source = timm.create_model("vit_small_patch14_reg4_dinov2", embed_dim=32, depth=3, num_heads=2).eval()
    assert source.patch_embed.img_size == (518, 518)
    model = tokenzoo.accelerate(source, "tome", r=13)
    expected, n = [], 37 * 37
    for _ in range(3):
        n -= min(13, n // 2)
        expected.append(n)
    assert model.token_counts() == model.token_counts(518) == expected
    ran = record_block_outputs(model)
    with torch.no_grad():
        model(torch.randn(1, 3, 518, 518))
    assert ran == expected


def test_by_name_and_features_only_and_settings_pass_through() -> None:
    model = tokenzoo.accelerate("vit_tiny_patch16_224", "tome", r=5)
    assert type(model).__name__ == "ToMe" and model.token_counts(224)[0] == 191
    features = tokenzoo.accelerate(tiny("clip"), "expedit", features_only=True, out_indices=(1, 3))
    with torch.no_grad():
        maps = features(torch.randn(1, 3, 224, 224))
    assert [tuple(m.shape) for m in maps] == [(1, 64, 14, 14)] * 2


@pytest.mark.parametrize("args, kwargs, match", [
    (("deit_tiny_patch16_224", "sparsifiner"), {}, "unknown family 'sparsifiner'"),
    (("eva02_tiny_patch14_224", "tome"), {}, "not one .*Eva class"),
    (("not_a_model", "tome"), {}, "unknown timm model 'not_a_model'"),
    ((torch.nn.Linear(2, 2), "tome"), {}, "takes timm VisionTransformer models"),
    ((timm.create_model("deit_tiny_patch16_224"), "tome"), dict(pretrained=True), "only applies to a model name"),
    ((timm.create_model("evit_tiny"), "tome"), {}, "already a tokenzoo EViT"),
    (("deit_tiny_patch16_224", "tome"), dict(r=-1), "r must be"),
])
def test_clear_errors(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        tokenzoo.accelerate(*args, **kwargs)


@pytest.mark.parametrize("arch, family", [("clip", "tome"), ("dinov2_reg", "mctf_fast")])
def test_onnx_parity(tmp_path, arch: str, family: str) -> None:
    from tokenzoo.export.onnx_export import PARITY_TOL, check_parity, export_onnx

    model = tokenzoo.accelerate(tiny(arch), family)
    size = tuple(model.patch_embed.img_size)
    path = export_onnx(model, tmp_path / "model.onnx", img_size=size)
    assert max(check_parity(model, path, batch_sizes=(1, 3), img_size=size).values()) < PARITY_TOL


def test_openmmlab_backbone_accelerates_any_timm_vit() -> None:
    import tokenzoo.mm as tm

    backbone = tm.TokenZooViT("vit_small_patch14_reg4_dinov2", model_kwargs=dict(embed_dim=64, depth=4, num_heads=2),
                              family="tome", family_kwargs=dict(r=0.3, reduction_loc=(1,)), out_indices=(1, 3),
                              img_size=112).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(2, 3, 112, 140))
    assert [tuple(m.shape) for m in maps] == [(2, 64, 8, 10)] * 2
    assert backbone.vit.token_counts((112, 140))[1] == 80 - int(0.3 * 80)
    with pytest.raises(ValueError, match="unknown family 'tome2'"):
        tm.TokenZooViT("vit_small_patch14_dinov2", family="tome2")


def test_family_at_name_in_the_measuring_tools() -> None:
    from tokenzoo.profiling import build_model, validate_model_name

    model = build_model("tome@vit_tiny_patch16_224", img_size=64, r=3)
    assert type(model).__name__ == "ToMe" and model.token_counts(64)[:2] == [13, 10] and not model.training
    with pytest.raises(ValueError, match="unknown family 'tomee'"):
        validate_model_name("tomee@vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="unknown model 'vit_tinyy'"):
        validate_model_name("tome@vit_tinyy")
