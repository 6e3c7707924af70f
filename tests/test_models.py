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


def test_every_family_registers() -> None:
    for family in ("evit", "tome", "mctf", "mctf_fast", "lookupvit"):
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
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


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


@pytest.mark.parametrize("name", MODELS)
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


ZERO_REDUCTION_MODELS = [n for n in MODELS if not n.endswith("_base") and model_class(n).zero_reduction is not None]


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
