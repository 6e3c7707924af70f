"""Deployable files: static graphs, tooling-friendly graphs every family quantizes, INT8/FP16 agreement on a trained
model, latency protocol, mobile check, refusing to overwrite, interrupted runs leaving no file."""
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper

import tokenzoo
from photo_classifier import IMG_SIZE, evaluation_images, train_photograph_classifier
from tokenzoo.export.deploy import deployment_paths, export_deployment
from tokenzoo.export.graph import make_tooling_friendly, rewrite_reductions
from tokenzoo.export.images import ImageSet, images_from, photographs
from tokenzoo.export.latency import ort_latency, profile_settings
from tokenzoo.export.mobile import EXECUTION_PROVIDERS, mobile_usability
from tokenzoo.export.onnx_export import PARITY_TOL, check_parity, export_onnx, is_static
from tokenzoo.export.quantize import quantize_int8, to_fp16
from tokenzoo.export.verify import agreement, onnx_session, run_onnx

# Reductions onnxruntime's symbolic shape inference cannot follow at opset 18 (tokenzoo.export.graph)
UNFRIENDLY_OPS = {'ReduceMax', 'ReduceMin', 'ReduceL2', 'ReduceL1', 'ReduceSumSquare'}
# every registered model at a small input: large enough for each family's default schedule (LookupViT's 5x5
# compressed grid fits in 6x6), small enough to trace quickly
SMALL = 96


def small_evit() -> torch.nn.Module:
    return timm.create_model('evit_tiny', depth=2, reduction_loc=(1,), img_size=64).eval()


def _single_file(folder, names) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


# ------------------------------------------------------------------------------ every registered model, small size
@pytest.mark.parametrize('name', [pytest.param(n, marks=[] if n in ('evit_tiny', 'expedit_tiny') else pytest.mark.slow)
                                  for n in tokenzoo.list_models()])
def test_every_registered_model_exports_with_parity(tmp_path, name):
    model = timm.create_model(name, img_size=SMALL).eval()
    path = export_onnx(model, tmp_path / f'{name}.onnx', img_size=SMALL)
    diffs = check_parity(model, path, img_size=SMALL)
    assert set(diffs) == {1, 3} and max(diffs.values()) < PARITY_TOL, diffs
    graph = onnx.load(str(path)).graph
    initializers = {init.name for init in graph.initializer}
    assert not [vi.name for vi in graph.value_info if vi.name in initializers]  # the stale records quantization hit
    assert not UNFRIENDLY_OPS & {node.op_type for node in graph.node}


@pytest.mark.parametrize('name', [pytest.param(n, marks=[] if n.startswith('evit') else pytest.mark.slow)
                                  for n in tokenzoo.list_models('*_tiny')])
def test_every_family_quantizes_with_onnxruntime_tools_as_they_are(tmp_path, name):
    """onnxruntime's own pre-processing (symbolic shape inference included) and both quantizers, with their
    defaults, on the exported graph: what failed on the ToMe and MCTF graphs."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    logging.getLogger().setLevel(logging.ERROR)
    model = timm.create_model(name, img_size=SMALL).eval()
    path = export_onnx(model, tmp_path / 'fp32.onnx', img_size=SMALL)
    quant_pre_process(str(path), str(tmp_path / 'prepared.onnx'))
    quantize_dynamic(str(path), str(tmp_path / 'raw_dynamic.onnx'), weight_type=QuantType.QInt8)
    images = photographs(SMALL, 4)
    for mode in ('static', 'dynamic'):
        out = quantize_int8(path, tmp_path / f'{mode}.onnx', mode, calibration=images)
        logits = run_onnx(onnx_session(out), torch.stack(images.images))
        assert logits.shape == (4, model.num_classes) and np.isfinite(logits).all()


def test_rewritten_reductions_compute_the_same(tmp_path):
    """Each replaced reduction (both keepdims, one axis) against onnxruntime's own kernel on the same data: max/min
    bit for bit (the same element), the sums to float rounding (another summation order)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    x = helper.make_tensor_value_info('x', TensorProto.FLOAT, ['batch', 5, 7])
    axes = numpy_helper.from_array(np.array([-1], dtype=np.int64), 'axes')
    cases = [('ReduceMax', 1), ('ReduceMax', 0), ('ReduceMin', 1), ('ReduceL2', 1), ('ReduceL1', 0),
             ('ReduceSumSquare', 1)]
    nodes = [helper.make_node(op, ['x', 'axes'], [f'y{i}'], name=f'n{i}', keepdims=keep)
             for i, (op, keep) in enumerate(cases)]
    outputs = [helper.make_tensor_value_info(f'y{i}', TensorProto.FLOAT, ['batch', 5, 1][:3 if keep else 2])
               for i, (_, keep) in enumerate(cases)]
    model = helper.make_model(helper.make_graph(nodes, 'g', [x], outputs, [axes]),
                              opset_imports=[helper.make_opsetid('', 18)], ir_version=10)
    original = model.SerializeToString()
    assert rewrite_reductions(model) == len(cases)
    assert not UNFRIENDLY_OPS & {node.op_type for node in model.graph.node}
    onnx.checker.check_model(model, full_check=True)
    SymbolicShapeInference.infer_shapes(model)  # raised on the original form
    data = np.random.default_rng(0).standard_normal((3, 5, 7), dtype=np.float32)
    data[0, 0] = -np.inf  # a protected row, as in the matching scores
    expected = ort.InferenceSession(original).run(None, {'x': data})
    actual = ort.InferenceSession(model.SerializeToString()).run(None, {'x': data})
    for (op, _), e, a in zip(cases, expected, actual):
        assert e.shape == a.shape
        assert (np.isfinite(a) == np.isfinite(e)).all()
        if op in ('ReduceMax', 'ReduceMin'):
            np.testing.assert_array_equal(a, e)
        else:
            np.testing.assert_allclose(a, e, rtol=1e-6)


def test_stale_initializer_records_are_removed():
    weight = numpy_helper.from_array(np.ones((4, 3), dtype=np.float32), 'w')
    graph = helper.make_graph([helper.make_node('MatMul', ['x', 'w'], ['y'])], 'g',
                              [helper.make_tensor_value_info('x', TensorProto.FLOAT, [2, 4])],
                              [helper.make_tensor_value_info('y', TensorProto.FLOAT, [2, 3])], [weight],
                              value_info=[helper.make_tensor_value_info('w', TensorProto.FLOAT, [4, 3])])
    model = make_tooling_friendly(helper.make_model(graph))
    assert not model.graph.value_info


# --------------------------------------------------------------------------------------------------- static graphs
def test_static_graph_fixes_the_batch_and_rejects_another(tmp_path):
    model = small_evit()
    path = export_onnx(model, tmp_path / 'static.onnx', img_size=64, static=True)
    assert is_static(path)
    dims = [d.dim_value for d in onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == [1, 3, 64, 64]
    assert check_parity(model, path, img_size=64)[1] < PARITY_TOL
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    with pytest.raises(Exception, match='Got invalid dimensions'):
        session.run(None, {'input': np.zeros((2, 3, 64, 64), np.float32)})
    with pytest.raises(ValueError, match='fixed batch size 1'):
        ort_latency(path, batch_size=2, img_size=64)
    dynamic = export_onnx(model, tmp_path / 'dynamic.onnx', img_size=64)
    assert not is_static(dynamic)


@pytest.mark.parametrize('optimize', ['onnxslim', 'ort'])
def test_optimized_graphs_keep_parity(tmp_path, optimize):
    model = small_evit()
    path = export_onnx(model, tmp_path / 'model.onnx', img_size=64, optimize=optimize)
    diffs = check_parity(model, path, img_size=64)
    assert max(diffs.values()) < PARITY_TOL
    assert not UNFRIENDLY_OPS & {node.op_type for node in onnx.load(str(path)).graph.node}
    _single_file(tmp_path, ['model.onnx'])


# ------------------------------------------------------------------------------------- INT8 and FP16 on real images
@pytest.fixture(scope='module')
def trained_vit():
    """A DeiT-shaped ViT (4 blocks, width 96) trained on photograph crops until it classifies held-out crops."""
    model, accuracy = train_photograph_classifier('vit_tiny_patch16_224', depth=4, embed_dim=96, num_heads=3)
    assert accuracy >= 0.9, f"the model did not learn the task (held-out accuracy {accuracy:.2f})"
    return model


@pytest.mark.slow
def test_int8_and_fp16_files_agree_with_fp32_on_a_trained_model(tmp_path, trained_vit):
    """Thresholds, on 60 held-out crops (one flip = 1.7%): FP16 keeps every decision and the logits (cosine >=
    0.999: float16 rounds at ~1e-3 relative); dynamic INT8 quantizes each activation with its own range, measured at
    100% / cosine 0.99999, required >= 95% / 0.99; static QDQ uses ranges calibrated on other crops and was measured
    at 92% / 0.963, required >= 80% / 0.9 (a regression to random would give ~7% and cosine near 0)."""
    manifest = export_deployment(trained_vit, tmp_path / 'vit.onnx', img_size=IMG_SIZE, int8='both', fp16=True,
                                 weights='ViT 4x96 trained 150 steps on photograph crops (tests/photo_classifier.py)',
                                 images=evaluation_images(), progress=False)
    _single_file(tmp_path, ['vit.onnx', 'vit.int8-static.onnx', 'vit.int8-dynamic.onnx', 'vit.fp16.onnx'])
    assert manifest['parity_ok']
    limits = {'fp16': (0.98, 0.999), 'int8-dynamic': (0.95, 0.99), 'int8-static': (0.8, 0.9)}
    for variant, (top1, cosine) in limits.items():
        figure = manifest['agreement'][variant]
        assert figure['top1_agreement'] >= top1 and figure['mean_cosine'] >= cosine, (variant, figure)
        assert 'trained' in figure['weights'] and 'photographs' in figure['images'] and figure['num_images'] == 60
    sizes = {v: (tmp_path / f'vit.{v}.onnx').stat().st_size for v in ('int8-dynamic', 'fp16')}
    assert sizes['int8-dynamic'] < 0.35 * (tmp_path / 'vit.onnx').stat().st_size  # int8 weights
    assert sizes['fp16'] < 0.6 * (tmp_path / 'vit.onnx').stat().st_size
    fp16 = onnx.load(str(tmp_path / 'vit.fp16.onnx'))
    assert fp16.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # float32 in and out
    assert any(init.data_type == TensorProto.FLOAT16 for init in fp16.graph.initializer)


def test_int8_and_fp16_files_load_and_run_for_a_token_reducing_model(tmp_path):
    """Load/run check only (DeiT-shaped random weights: no agreement threshold, the figures would mean nothing)."""
    model = small_evit()
    path = export_onnx(model, tmp_path / 'fp32.onnx', img_size=64)
    x = torch.stack(photographs(64, 3).images)
    for out in (quantize_int8(path, tmp_path / 'int8.onnx', 'dynamic'), to_fp16(path, tmp_path / 'fp16.onnx')):
        logits = run_onnx(onnx_session(out), x)
        assert logits.shape == (3, 1000) and np.isfinite(logits).all()


def test_fp16_keeps_ops_without_a_float16_kernel_in_float32(tmp_path):
    """ToMe sums merged tokens with ScatterElements(add), which the CPU execution provider refuses in float16."""
    model = timm.create_model('tome_tiny', depth=2, r=4, img_size=64).eval()
    path = export_onnx(model, tmp_path / 'fp32.onnx', img_size=64)
    out = to_fp16(path, tmp_path / 'fp16.onnx')
    logits = run_onnx(onnx_session(out), torch.stack(photographs(64, 2).images))
    assert np.isfinite(logits).all()


def test_agreement_names_its_weights_and_images(tmp_path):
    model = small_evit()
    path = export_onnx(model, tmp_path / 'fp32.onnx', img_size=64)
    same = agreement(model, path, None, 'random (test)', img_size=64, count=6)
    assert same['top1_agreement'] == 1.0 and same['mean_cosine'] > 0.99999
    assert same['weights'] == 'random (test)' and 'scikit-image' in same['images'] and same['num_images'] == 6
    images = [torch.randn(3, 64, 64) for _ in range(2)]
    with pytest.raises(ValueError, match='description'):
        agreement(model, path, images, 'random')
    with pytest.raises(ValueError, match='weights'):
        agreement(model, path, None, ' ')
    custom = agreement(model, path, images, 'random', images_description='two noise images (test only)')
    assert custom['images'] == 'two noise images (test only)'


def test_images_from_a_folder_and_disjoint_photograph_crops(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 80 * i, np.uint8)).save(tmp_path / f'{i}.png')
    folder = images_from(tmp_path, 32, 10)
    assert len(folder.images) == 3 and folder.images[0].shape == (3, 32, 32) and str(tmp_path) in folder.description
    first, later = photographs(32, 15), photographs(32, 15, offset=15)
    assert not any(torch.equal(a, b) for a, b in zip(first.images, later.images))
    with pytest.raises(FileNotFoundError):
        images_from(tmp_path / 'missing', 32, 10)
    assert isinstance(images_from(first, 32, 10), ImageSet)


# -------------------------------------------------------------------------------------- overwrite and interruption
def test_deployment_refuses_to_overwrite_any_of_its_files(tmp_path):
    paths = deployment_paths(tmp_path / 'm.onnx', 'dynamic', True)
    assert set(paths) == {'fp32', 'int8-dynamic', 'fp16'} and paths['int8-dynamic'].name == 'm.int8.onnx'
    paths['fp16'].write_text('keep me')
    with pytest.raises(FileExistsError, match='--force'):
        export_deployment(small_evit(), tmp_path / 'm.onnx', img_size=64, progress=False)
    _single_file(tmp_path, ['m.fp16.onnx'])  # refused before writing anything
    assert paths['fp16'].read_text() == 'keep me'


def test_interrupted_quantization_leaves_no_file(tmp_path, monkeypatch):
    import onnxruntime.quantization as quantization

    path = export_onnx(small_evit(), tmp_path / 'fp32.onnx', img_size=64)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantization, 'quantize_dynamic', interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_int8(path, tmp_path / 'int8.onnx', 'dynamic')
    _single_file(tmp_path, ['fp32.onnx'])
    (tmp_path / 'int8.onnx').write_text('keep me')
    with pytest.raises(FileExistsError):
        quantize_int8(path, tmp_path / 'int8.onnx', 'dynamic')
    with pytest.raises(ValueError, match='calibration'):
        quantize_int8(path, tmp_path / 'other.onnx', 'static')
    with pytest.raises(ValueError, match='mode'):
        quantize_int8(path, tmp_path / 'other.onnx', 'int4')


# ---------------------------------------------------------------------------------------- latency protocol, mobile
def test_latency_rows_carry_their_protocol(tmp_path):
    path = export_onnx(small_evit(), tmp_path / 'fp32.onnx', img_size=64)
    row = ort_latency(path, img_size=64, warmup=1, runs=4, variant='FP32, dynamic batch', profile='edge')
    assert row['p50_ms'] <= row['p90_ms'] <= row['p99_ms']
    for key in ('threads', 'batch_size', 'warmup', 'runs', 'ort_version', 'cpu', 'variant', 'profile', 'provider'):
        assert row[key] is not None, key
    assert profile_settings('edge') == dict(threads=1, batch_size=1)
    assert profile_settings('server')['batch_size'] == 32 and profile_settings('server')['threads'] >= 1
    with pytest.raises(ValueError, match='profile'):
        profile_settings('phone')


def test_mobile_usability_summary(tmp_path):
    path = export_onnx(small_evit(), tmp_path / 'static.onnx', img_size=64, static=True)
    result = mobile_usability(path)
    assert result['dynamic_input'] is False
    for ep in EXECUTION_PROVIDERS:
        r = result[ep]
        assert r['verdict'] in ('YES', 'MAYBE', 'NO') and 0 < r['supported_nodes'] <= r['nodes']
        assert 'TopK' in r['unsupported_ops']  # EViT's top-k keep: no mobile execution provider takes it


@pytest.mark.slow
def test_openmmlab_backbone_exports_its_maps(tmp_path):
    """An OpenMMLab backbone (full-resolution maps of its out_indices) exports with a dynamic batch and parity, and
    its INT8 file is written (no agreement figure: maps, not a class decision)."""
    pytest.importorskip('mmengine')
    from pathlib import Path

    from tokenzoo.mm import build_backbone

    config = Path(__file__).resolve().parents[1] / 'configs/evit/upernet_evit-small-kr0.7_mln_1xb2-200i_synthetic.py'
    backbone = build_backbone(str(config)).eval()
    manifest = export_deployment(backbone, tmp_path / 'backbone.onnx', img_size=backbone.img_size, fp16=False,
                                 progress=False)
    outputs = onnx.load(str(tmp_path / 'backbone.onnx')).graph.output
    assert [o.name for o in outputs] == [f'output{i}' for i in range(len(backbone.out_indices))]
    assert manifest['parity_ok'] and manifest['agreement'] == {'int8-dynamic': None}


def test_export_cli_writes_every_model_of_a_pattern_with_its_int8_file(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    args = [sys.executable, '-m', 'tokenzoo.export', 'evit_t*', '--img-size', '64', '--int8', '--model-kwargs',
            'depth=2', 'reduction_loc=[1]']
    proc = subprocess.run([*args, '--out', str(tmp_path / 'missing')], cwd=repo, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 2 and 'must be an existing folder' in proc.stderr
    proc = subprocess.run([*args, '--out', str(tmp_path)], cwd=repo, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    _single_file(tmp_path, ['evit_tiny.onnx', 'evit_tiny.int8.onnx'])
    assert 'int8-dynamic vs fp32: top-1 agreement' in proc.stdout and 'random (no --checkpoint)' in proc.stdout
