"""Generic tests over every model tokenzoo registers (in the spirit of timm's tests/test_models.py).

A family is covered the moment it registers. Tiny inputs keep the suite quick; the full-size models run in a few
targeted tests and in tools/benchmark.py.
"""
import subprocess
import sys

import pytest
import timm
import torch

import tokenzoo
from conftest import record_block_outputs

MODELS = tokenzoo.list_models()
TINY_MODELS = [name for name in MODELS if name.endswith("_tiny")]
# Non-square and off the default 224, yet large enough for every family's default schedule (ToMe removes 156 tokens).
SMALL_INPUT = (2, 3, 224, 256)


def model_class(name: str) -> type:
    """The class a registered name builds (read from a model built on the meta device: no weights allocated)."""
    with torch.device("meta"):
        return type(timm.create_model(name))


def num_params(name: str) -> int:
    """Parameters of a registered name (counted on the meta device: no weights allocated)."""
    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name).parameters())


def test_every_family_registers() -> None:
    for family in ("evit", "tome", "mctf", "mctf_fast", "expedit", "lookupvit"):
        assert {f"{family}_{size}" for size in ("tiny", "small", "base")} <= set(MODELS)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_forward_backward_reaches_every_parameter(name: str) -> None:
    model = timm.create_model(name, num_classes=10)
    out = model(torch.randn(SMALL_INPUT))
    assert out.shape == (SMALL_INPUT[0], 10)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_forward_intermediates_full_grid_and_final_output(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(SMALL_INPUT)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        features = model.forward_features(x)
        nlc = model.forward_intermediates(x, indices=[-1], output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    grid = (SMALL_INPUT[2] // 16, SMALL_INPUT[3] // 16)
    assert len(maps) == len(model.blocks)
    assert all(m.shape == (SMALL_INPUT[0], model.embed_dim, *grid) for m in maps)
    assert nlc[0].shape == (SMALL_INPUT[0], grid[0] * grid[1], model.embed_dim)
    torch.testing.assert_close(nlc[0], maps[-1].flatten(2).transpose(1, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_features_only_matches_feature_info(name: str) -> None:
    out_indices = (1, 5, -1)
    model = timm.create_model(name, features_only=True, out_indices=out_indices).eval()
    with torch.no_grad():
        features = model(torch.randn(SMALL_INPUT))
    assert len(features) == len(out_indices)
    for feature, channels, stride in zip(features, model.feature_info.channels(), model.feature_info.reduction()):
        assert feature.shape == (SMALL_INPUT[0], channels, SMALL_INPUT[2] // stride, SMALL_INPUT[3] // stride)


# Models over 100M parameters (ViT-L) take ~20 s to build and run on 2 CPU cores: they run in the slow suite.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if num_params(n) > 100e6 else n
                                  for n in MODELS])
def test_token_counts_match_forward(name: str) -> None:
    model = timm.create_model(name).eval()
    ran = record_block_outputs(model)
    with torch.no_grad():
        model(torch.randn(1, *SMALL_INPUT[1:]))
    assert ran == model.token_counts(SMALL_INPUT[2:])
    if type(model).reduces_tokens:
        assert ran[-1] < ran[0], "the default setting must reduce tokens"


@pytest.mark.parametrize("name", TINY_MODELS)
def test_batch_independence(name: str) -> None:
    model = timm.create_model(name).eval()
    x = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_input_not_multiple_of_patch_is_rejected(name: str) -> None:
    model = timm.create_model(name)
    with pytest.raises(ValueError, match="multiples of the patch size 16x16"):
        model(torch.randn(1, 3, 225, 224))
    with pytest.raises(ValueError, match="multiples of the patch size"):
        model.token_counts(225)


def test_every_family_declares_what_generic_code_relies_on() -> None:
    for name in MODELS:
        cls = model_class(name)
        assert issubclass(cls, tokenzoo.TokenVisionTransformer)
        assert cls.zero_reduction is None or isinstance(cls.zero_reduction, dict), name
        assert isinstance(cls.adds_parameters, bool) and isinstance(cls.reduces_tokens, bool), name


# The sizes deit_state_dicts provides (base and large are the same code at a size too slow for the quick suite).
ZERO_REDUCTION_MODELS = [n for n in MODELS if n.rsplit("_", 1)[1] in ("tiny", "small")
                         and model_class(n).zero_reduction is not None]


def load_deit(model: torch.nn.Module, state_dict: dict) -> None:
    """Load a DeiT state dict: strictly, or, for a family that adds parameters, with exactly those left out."""
    missing, unexpected = model.load_state_dict(state_dict, strict=not type(model).adds_parameters)
    assert not unexpected
    assert set(missing) == set(model.state_dict()) - set(state_dict)


@pytest.mark.parametrize("name", ZERO_REDUCTION_MODELS)
def test_zero_reduction_equals_timm_deit(name: str, deit_state_dicts) -> None:
    size = name.rsplit("_", 1)[1]
    deit = timm.create_model(f"deit_{size}_patch16_224").eval()
    deit.load_state_dict(deit_state_dicts[size])
    model = timm.create_model(name, **model_class(name).zero_reduction).eval()
    load_deit(model, deit_state_dicts[size])
    assert model.token_counts(224) == [196] * 12
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert (model(x) - deit(x)).abs().max() < 1e-5
        # at another input size too, where both resample the position embedding
        deit_dynamic = timm.create_model(f"deit_{size}_patch16_224", dynamic_img_size=True).eval()
        deit_dynamic.load_state_dict(deit_state_dicts[size])
        x = torch.randn(1, 3, 160, 256)
        assert (model(x) - deit_dynamic(x)).abs().max() < 1e-5


@pytest.mark.parametrize("name", TINY_MODELS)
def test_pretrained_loads_a_local_deit_file_through_timm(name: str, tmp_path, deit_state_dicts) -> None:
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit_state_dicts["tiny"]}, path)  # the layout of the official DeiT release
    model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    state_dict = model.state_dict()
    shared = [key for key in deit_state_dicts["tiny"] if key in state_dict]
    assert type(model).adds_parameters or len(shared) == len(state_dict) == len(deit_state_dicts["tiny"])
    for key in shared:
        torch.testing.assert_close(state_dict[key], deit_state_dicts["tiny"][key], rtol=0, atol=0)


def test_import_tokenzoo_stays_light() -> None:
    """`import tokenzoo` registers the families without pulling in OpenMMLab or ONNX."""
    code = ("import sys, tokenzoo, timm; assert timm.is_model('evit_small'); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mmengine', 'mmcv', 'mmdet', 'mmseg', 'onnx', "
            "'onnxruntime', 'onnxscript'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


# What timm's own tests/test_models.py checks of every model (its tests are not in the wheel, so the generic checks
# the families must pass are written out here), at the reduced input sizes timm's suite uses.
@pytest.mark.parametrize("name", TINY_MODELS)
@pytest.mark.parametrize("size", [128, 96])
def test_timm_reduced_sizes_forward_backward(name: str, size: int) -> None:
    model = timm.create_model(name, num_classes=5)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    ran = record_block_outputs(model)
    with torch.no_grad():
        model(x)
    assert ran == model.token_counts(size)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_timm_default_cfg_head_and_features_api(name: str) -> None:
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    state_dict = model.state_dict()
    classifiers = [cfg["classifier"]] if isinstance(cfg["classifier"], str) else cfg["classifier"]
    assert all(f"{name}.weight" in state_dict for name in classifiers) and f"{cfg['first_conv']}.weight" in state_dict
    size = cfg["input_size"][-1]
    x = torch.randn(2, *cfg["input_size"])
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape[0] == 2 and features.shape[-1] == model.num_features
        assert model.forward_head(features, pre_logits=True).shape == (2, model.head_hidden_size)
        assert model.forward_head(features).shape == (2, cfg["num_classes"])
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
        layers = model.get_intermediate_layers(x, n=2, reshape=True)
        assert [tuple(t.shape) for t in layers] == [(2, model.embed_dim, size // 16, size // 16)] * 2
        as_dict = model.forward_intermediates(x, indices=[1], output_dict=True, return_prefix_tokens=True)
        final, maps = model.forward_intermediates(x, indices=[1])
    prefix = {"image_intermediates_prefix"} if model.num_prefix_tokens else set()  # as timm: only with prefix tokens
    assert set(as_dict) == {"image_intermediates", "image_features"} | prefix
    torch.testing.assert_close(as_dict["image_intermediates"][0], maps[0], rtol=0, atol=0)
    torch.testing.assert_close(as_dict["image_features"], final, rtol=0, atol=0)
    if prefix:
        assert as_dict["image_intermediates_prefix"][0].shape == (2, model.num_prefix_tokens, model.embed_dim)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_timm_keyword_arguments_are_accepted_or_refused_clearly(name: str) -> None:
    model = timm.create_model(name, dynamic_img_size=True).eval()  # a no-op: the models take any size already
    with torch.no_grad():
        assert model(torch.randn(1, 3, 96, 128)).shape == (1, 1000)
        assert model.forward_features(torch.randn(1, 3, 96, 96), attn_mask=None).shape[-1] == model.embed_dim
        with pytest.raises(ValueError, match="attn_mask and is_causal are not supported"):
            model.forward_features(torch.randn(1, 3, 96, 96), attn_mask=torch.ones(17, 17, dtype=torch.bool))
        with pytest.raises(ValueError, match="attn_mask and is_causal are not supported"):
            model.forward_intermediates(torch.randn(1, 3, 96, 96), is_causal=True)
    with pytest.raises(ValueError, match="dynamic_img_size=False is not supported"):
        timm.create_model(name, dynamic_img_size=False)


@pytest.mark.parametrize("name", TINY_MODELS)
def test_reset_classifier_applies_the_constructor_pooling_rule(name: str) -> None:
    """A head reset accepts exactly the poolings the family's constructor accepts (``check_pooling``)."""
    cls, model = model_class(name), timm.create_model(name)
    for pool in ("avg", "token", "max"):
        try:
            cls.check_pooling(pool, model.has_class_token, model.num_reg_tokens)
        except ValueError:
            before = model.global_pool
            with pytest.raises(ValueError, match="global_pool"):
                model.reset_classifier(0, pool)
            assert model.global_pool == before
        else:
            model.reset_classifier(0, pool)
    model.reset_classifier(0, "")  # no pooling (timm's prune_intermediate_layers does this) is always allowed


@pytest.mark.parametrize("name", TINY_MODELS)
def test_torch_jit_trace_matches_eager(name: str) -> None:
    model = timm.create_model(name, img_size=96).eval()
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.testing.assert_close(traced(x), model(x), rtol=0, atol=1e-5)
