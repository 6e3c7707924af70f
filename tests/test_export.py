"""tokenzoo.export and the benchmark tools: ONNX round trip, no clobbering, clear errors, end-to-end CLI runs."""
import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import timm
import torch
from torch import nn

import tokenzoo
from tokenzoo.export.latency import ort_latency
from tokenzoo.export.onnx_export import PARITY_TOL, check_parity, export_onnx, parse_model_kwargs

REPO = Path(__file__).resolve().parents[1]


class DataDependent(nn.Module):
    """Cannot be exported: a Python branch on tensor data (DESIGN contract 6 forbids it)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.proj(x.mean((2, 3)))
        return x


def small_evit() -> nn.Module:
    """A two-block EViT that reduces in its second block: quick to export, with topk/gather on the token axis."""
    return timm.create_model('evit_tiny', depth=2, reduction_loc=(1,), img_size=64).eval()


def _assert_roundtrip(model: nn.Module, path: Path, img_size: int) -> None:
    diffs = check_parity(model, path, batch_sizes=(1, 3), img_size=img_size)
    assert set(diffs) == {1, 3}
    assert max(diffs.values()) < PARITY_TOL, diffs


def _assert_single_file(folder: Path, name: str) -> None:
    # one self-contained file: no external-data side files, no temporary leftovers
    assert sorted(p.name for p in folder.iterdir()) == [name]


def test_export_deit_tiny_roundtrip(tmp_path):
    model = timm.create_model('deit_tiny_patch16_224').eval()
    path = export_onnx(model, tmp_path / 'deit_tiny.onnx', img_size=224)
    _assert_single_file(tmp_path, 'deit_tiny.onnx')
    _assert_roundtrip(model, path, 224)
    batch_dim = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic, i.e. a dynamic batch axis


# Every registered model exports with parity (DESIGN contract 7): test_deploy.py, over the whole registry.


class _Matching(nn.Module):
    """Bipartite matching alone, on given scores: the part of a merging model whose output is a choice of indices."""

    def __init__(self, r: int, r_reverse: int):
        super().__init__()
        self.r, self.r_reverse = r, r_reverse

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        return tokenzoo.layers.bipartite_soft_matching(scores, self.r, self.r_reverse)


@pytest.mark.parametrize('r, r_reverse', [(5, 0), (4, 4)])
def test_matching_on_tied_scores_is_the_same_in_onnxruntime(tmp_path, r, r_reverse):
    """Ties are broken by index in both runtimes (the cause of MCTF-Fast's intermittent parity failures at batch 3:
    PyTorch's and onnxruntime's unstable sorts ordered equal edge scores differently)."""
    import onnxruntime as ort

    scores = torch.randint(0, 3, (3, 98, 97)).float()  # ties everywhere, in every image of the batch
    scores[:, 0] = float('-inf')
    model = _Matching(r, r_reverse).eval()
    path = tmp_path / 'matching.onnx'
    torch.onnx.export(torch.export.export(model, (scores,), dynamic_shapes=({0: torch.export.Dim('batch')},)),
                      dynamo=True, f=str(path), input_names=['scores'])
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    for batch in (1, 3):
        (onnx_destination,) = session.run(None, {'scores': scores[:batch].numpy()})
        assert (onnx_destination == model(scores[:batch]).numpy()).all()


def _op_types(path: Path) -> set:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


@pytest.mark.slow
@pytest.mark.parametrize('name, kwargs', [
    ('tome_tiny', dict(depth=4)),
    ('mctf_tiny', dict(depth=4, reduction_loc=(1, 2, 3))),
])
def test_scatter_free_merging_leaves_no_scatter_in_the_graph(tmp_path, name, kwargs):
    with_scatter = timm.create_model(name, **kwargs).eval()
    scatter_free = timm.create_model(name, scatter_free=True, **kwargs).eval()
    scatter_free.load_state_dict(with_scatter.state_dict())
    default_ops = _op_types(export_onnx(with_scatter, tmp_path / 'scatter.onnx', img_size=224))
    assert any(op.startswith('Scatter') for op in default_ops), 'the check below would prove nothing'
    path = export_onnx(scatter_free, tmp_path / 'scatter_free.onnx', img_size=224)
    assert not any(op.startswith('Scatter') for op in _op_types(path))
    _assert_roundtrip(scatter_free, path, 224)


@pytest.mark.parametrize('name', tokenzoo.list_models('*_tiny'))
def test_torchscript_onnx_exporter_also_works(tmp_path, name):
    """torch's legacy TorchScript exporter (``dynamo=False``), which timm users still call, traces the model at one
    input size (the input's shape reaches the model as tensors) and matches PyTorch in onnxruntime."""
    import onnxruntime as ort

    model = timm.create_model(name, img_size=96).eval()
    x = torch.randn(1, 3, 96, 96)
    path = tmp_path / f'{name}.onnx'
    with torch.no_grad():
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=['input'], opset_version=17)
        expected = model(x).numpy()
    (actual,) = ort.InferenceSession(str(path), providers=['CPUExecutionProvider']).run(None, {'input': x.numpy()})
    assert abs(actual - expected).max() < PARITY_TOL


def test_export_by_name(tmp_path):
    path = export_onnx('vit_tiny_patch16_224', tmp_path / 'vit.onnx', img_size=32)
    assert onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[2].dim_value == 32


def test_refuses_to_overwrite(tmp_path):
    path = tmp_path / 'model.onnx'
    path.write_text('keep me')
    with pytest.raises(FileExistsError, match='--force'):
        export_onnx(small_evit(), path, img_size=64)
    assert path.read_text() == 'keep me'
    _assert_single_file(tmp_path, 'model.onnx')


def test_a_folder_as_out_is_refused_before_any_work(tmp_path):
    with pytest.raises(IsADirectoryError, match='is a folder'):
        export_onnx(small_evit(), tmp_path, img_size=64, force=True)
    proc = _run('-m', 'tokenzoo.export', 'vit_tiny_patch16_224', '--out', str(tmp_path), '--force', '--img-size', '32')
    assert proc.returncode == 2 and 'is a folder' in proc.stderr and 'exporting' not in proc.stderr
    assert not any(tmp_path.iterdir())


def test_force_overwrites(tmp_path):
    path = tmp_path / 'model.onnx'
    path.write_text('old')
    model = small_evit()
    export_onnx(model, path, img_size=64, force=True)
    onnx.checker.check_model(str(path))
    _assert_roundtrip(model, path, 64)


def _failing_check(*args, **kwargs):
    raise onnx.checker.ValidationError('simulated checker failure')


@pytest.mark.parametrize('stage', ['trace', 'check'])
def test_failed_export_leaves_target_untouched(tmp_path, monkeypatch, stage):
    path = tmp_path / 'model.onnx'
    path.write_text('keep me')
    if stage == 'check':  # fails after the temporary file was written
        monkeypatch.setattr(onnx.checker, 'check_model', _failing_check)
    model = DataDependent() if stage == 'trace' else small_evit()
    with pytest.raises(Exception, match='simulated' if stage == 'check' else None):
        export_onnx(model, path, img_size=64, force=True)
    assert path.read_text() == 'keep me'
    _assert_single_file(tmp_path, 'model.onnx')


@pytest.mark.parametrize('kwargs, match', [
    (dict(model='deit_small'), 'deit_small_patch16_224'),
    (dict(model='vit_tiny_patch16_224', img_size=100), 'multiple of the patch size'),
    (dict(model='vit_tiny_patch16_224', img_size=32, opset=11), 'opset'),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        export_onnx(out_path=tmp_path / 'model.onnx', **kwargs)
    assert not any(tmp_path.iterdir())


def test_parse_model_kwargs():
    assert parse_model_kwargs(['{"keep_rate": 0.5, "depth": 2}']) == {'keep_rate': 0.5, 'depth': 2}
    assert parse_model_kwargs(['keep_rate=0.5', 'act_layer=gelu']) == {'keep_rate': 0.5, 'act_layer': 'gelu'}
    with pytest.raises(ValueError, match='key=value'):
        parse_model_kwargs(['keep_rate'])


def test_ort_latency(tmp_path):
    path = export_onnx(small_evit(), tmp_path / 'toy.onnx', img_size=64)
    result = ort_latency(path, img_size=64, warmup=1, runs=3)
    assert {'p50_ms', 'p90_ms', 'mean_ms', 'threads', 'runs', 'warmup', 'provider', 'ort_version'} <= set(result)
    assert result['provider'] == 'CPUExecutionProvider' and result['threads'] == 1
    for bad in (dict(warmup=0), dict(runs=0), dict(threads=0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ort_latency(path, img_size=64, **bad)
    with pytest.raises(ValueError, match='does not match'):
        ort_latency(path, img_size=32)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize('entry', [['-m', 'tokenzoo.export'], [str(REPO / 'export' / 'onnx_export.py')]])
def test_export_cli(tmp_path, entry):
    out = tmp_path / 'vit.onnx'
    args = [*entry, 'vit_tiny_patch16_224', '--out', str(out), '--img-size', '32', '--model-kwargs', 'depth=2']
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr
    assert 'parity batch 3' in proc.stdout and 'random' in proc.stderr
    proc = _run(*args)  # the file exists now
    assert proc.returncode == 2 and '--force' in proc.stderr


def test_benchmark_rejects_bad_input_early(tmp_path):
    proc = _run('tools/benchmark.py', 'deit_small', '--img-size', '64')
    assert proc.returncode == 2 and 'deit_small_patch16_224' in proc.stderr
    existing = tmp_path / 'out.json'
    existing.write_text('{}')
    proc = _run('tools/benchmark.py', 'vit_tiny_patch16_224', '--json', str(existing))
    assert proc.returncode == 2 and '--force' in proc.stderr
    assert existing.read_text() == '{}'


@pytest.mark.slow
def test_benchmark_and_model_zoo_end_to_end(tmp_path):
    out = tmp_path / 'bench.json'
    proc = _run('tools/benchmark.py', 'vit_tiny_patch16_224', '--img-size', '64', '--batch-size', '2', '--iters', '2',
                '--warmup', '1', '--onnx', '--json', str(out))
    assert proc.returncode == 0, proc.stderr
    assert 'RANDOM' in proc.stdout and '[1/1] vit_tiny_patch16_224' in proc.stderr
    report = json.loads(out.read_text())
    assert {'created', 'command', 'machine', 'settings', 'models'} <= set(report)
    assert {'cpu', 'torch', 'onnxruntime'} <= set(report['machine'])
    assert report['settings']['img_size'] == [64, 64] and report['settings']['base'] == 'vit_tiny_patch16_224'
    (result,) = report['models']
    assert {'name', 'weights', 'params_m', 'gmacs', 'tokens_per_block', 'eager_throughput_ips', 'eager_latency_ms',
            'onnx', 'ratios'} <= set(result)
    assert result['weights'] == 'random' and result['tokens_per_block'] == [16] * 12
    assert result['onnx']['parity_ok'] and set(result['onnx']['parity_max_abs_diff']) == {'1', '3'}
    assert {'p50_ms', 'p90_ms'} <= set(result['onnx']['ort_latency'])
    assert result['ratios']['gmacs'] == 1.0

    zoo = tmp_path / 'model_zoo.md'
    proc = _run('tools/model_zoo.py', str(out), '--out', str(zoo))
    assert proc.returncode == 0, proc.stderr
    text = zoo.read_text()
    assert '`vit_tiny_patch16_224`' in text and report['machine']['cpu'] in text and '16x12' in text
    proc = _run('tools/model_zoo.py', str(out), '--out', str(zoo))
    assert proc.returncode == 2 and '--force' in proc.stderr
    assert zoo.read_text() == text
