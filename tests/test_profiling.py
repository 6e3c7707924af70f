"""tokenzoo.profiling: GMACs with attention counted, idempotent flop registration, token counts, timing helpers."""
import importlib

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tokenzoo import profiling


def _tiny_vit(**kwargs) -> torch.nn.Module:
    return timm.create_model('vit_tiny_patch16_224', img_size=32, depth=2, **kwargs).eval()


def test_deit_small_gmacs_counts_attention():
    # 4.24 without the attention matmuls, ~4.60 with them
    gmacs = profiling.count_gmacs(timm.create_model('deit_small_patch16_224'), img_size=224)
    assert 4.55 <= gmacs <= 4.65


def test_gmacs_scale_with_batch():
    model = _tiny_vit()
    assert profiling.count_gmacs(model, 32, batch=2) == pytest.approx(2 * profiling.count_gmacs(model, 32))


@pytest.mark.parametrize('mask', [None, 'float', 'bool'])
def test_sdpa_cpu_formula(mask):
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    attn_mask = {None: None, 'float': torch.randn(5, 7), 'bool': torch.rand(5, 7) > 0.3}[mask]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    # q @ k^T and attn @ v, 2 FLOPs per multiply-add
    assert counter.get_total_flops() == 2 * (2 * 3 * 5 * 7 * 8) * 2


def test_sdpa_cpu_backward_formula():
    q, k, v = (torch.randn(2, 3, 5, 8, requires_grad=True) for _ in range(3))
    with FlopCounterMode(display=False) as counter:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    assert counter.get_total_flops() == 3 * 2 * (2 * 3 * 5 * 5 * 8) * 2  # backward: four matmuls, twice the forward


def test_flop_registration_is_idempotent():
    model = _tiny_vit()
    before = profiling.count_gmacs(model, 32)
    profiling._register_sdpa_flops()  # a second registration keeps the first, without raising
    importlib.reload(profiling)  # re-running the module-level registration does not raise either
    assert profiling.count_gmacs(model, 32) == before


def test_count_gmacs_keeps_train_mode():
    model = _tiny_vit().train()
    profiling.count_gmacs(model, 32)
    assert model.training


def test_count_params():
    assert profiling.count_params(torch.nn.Linear(3, 4)) == 16


def test_token_counts_timm_vit_fallback():
    model = _tiny_vit()
    assert not hasattr(model, 'token_counts')
    assert profiling.token_counts(model, 32) == [4, 4]
    assert profiling.token_counts(model, (64, 32)) == [8, 8]


def test_token_counts_uses_model_method():
    if not timm.is_model('evit_tiny'):
        pytest.skip('evit_tiny is not registered yet')
    model = timm.create_model('evit_tiny')
    assert profiling.token_counts(model, 224) == model.token_counts((224, 224))


def test_token_counts_rejects_non_vit():
    with pytest.raises(ValueError, match='token_counts'):
        profiling.token_counts(torch.nn.Linear(3, 4), 224)


def test_format_token_counts():
    assert profiling.format_token_counts([196, 196, 196, 139, 139, 139, 99, 71]) == '196x3 139x3 99 71'
    assert profiling.format_token_counts(None) == 'n/a'


def test_validate_model_name_lists_close_matches():
    with pytest.raises(ValueError, match='deit_small_patch16_224'):
        profiling.validate_model_name('deit_small')


@pytest.mark.parametrize('img_size, match', [(100, 'multiple of the patch size'), (64, 'built for 32x32'),
                                             ((32, 0), 'positive')])
def test_check_img_size_errors(img_size, match):
    with pytest.raises(ValueError, match=match):
        profiling.check_img_size(_tiny_vit(), img_size)


def test_build_model_loads_checkpoint(tmp_path):
    source = _tiny_vit()
    path = tmp_path / 'weights.pth'
    torch.save(source.state_dict(), path)
    model = profiling.build_model('vit_tiny_patch16_224', img_size=32, checkpoint=path, depth=2)
    assert not model.training
    torch.testing.assert_close(model.state_dict(), source.state_dict(), rtol=0, atol=0)


def test_build_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        profiling.build_model('vit_tiny_patch16_224', checkpoint=tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match='does not accept'):
        profiling.build_model('vit_tiny_patch16_224', no_such_argument=1)


def test_eager_timing_helpers():
    model = _tiny_vit()
    assert profiling.eager_throughput(model, batch_size=2, img_size=32, warmup=1, iters=2) > 0
    latency = profiling.eager_latency(model, img_size=32, warmup=1, iters=3)
    assert set(latency) == {'p50_ms', 'p90_ms'} and latency['p90_ms'] >= latency['p50_ms'] > 0
    with pytest.raises(ValueError, match='iters'):
        profiling.eager_latency(model, img_size=32, iters=0)


def test_machine_info():
    info = profiling.machine_info()
    assert {'cpu', 'cpu_count', 'platform', 'torch', 'timm', 'onnxruntime', 'torch_num_threads'} <= set(info)
    assert info['torch'] == torch.__version__
