"""model_zoo.md is generated from the committed results, and regenerating it gives the committed file."""
import copy
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RESULTS = sorted((REPO / 'tools' / 'results').glob('*.json'))


def _tool():
    spec = importlib.util.spec_from_file_location('model_zoo_tool', REPO / 'tools' / 'model_zoo.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def zoo():
    return _tool()


def _runs(zoo):
    # the names `make model-zoo` passes: paths relative to the repository
    return [(str(path.relative_to(REPO)), zoo.load_run(path)) for path in RESULTS]


def test_model_zoo_md_is_what_the_committed_results_render(zoo):
    runs = _runs(zoo)
    kinds = {zoo.classify(run) for _, run in runs}
    assert {'benchmark', 'dense', 'reported', 'tradeoff'} <= kinds, \
        'commit a benchmark, a dense, a trade-off and the reported-accuracy file'
    links = zoo.plot_links(runs, REPO / 'tools' / 'results', REPO)
    text = zoo.render(runs, links)
    committed = (REPO / 'model_zoo.md').read_text()
    assert text == committed, 'model_zoo.md is stale: run `make model-zoo` and commit the result'
    for link in links.values():  # every embedded plot is committed beside the results
        assert (REPO / link).is_file() and f'({link})' in committed


def test_make_model_zoo_command_writes_the_same_file(tmp_path):
    out = tmp_path / 'model_zoo.md'
    args = [str(p.relative_to(REPO)) for p in RESULTS]
    proc = subprocess.run([sys.executable, 'tools/model_zoo.py', *args, '--out', str(out), '--plots-dir',
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    plots = sorted(p.name for p in tmp_path.glob('*.png'))
    assert plots and all(p.endswith(('_latency_vs_gmacs.png', '_accuracy_vs_cost.png')) for p in plots)
    assert any(p.endswith('_accuracy_vs_cost.png') for p in plots)
    text = out.read_text()
    # the same tables as the committed file; only the plot paths point to where this run wrote them
    committed = (REPO / 'model_zoo.md').read_text()
    for name in plots:
        committed = committed.replace(f'tools/results/{name}', name)
    assert text == committed
    again = subprocess.run([sys.executable, 'tools/model_zoo.py', *args, '--out', str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and '--force' in again.stderr


def test_every_measured_figure_of_a_run_reaches_the_page(zoo):
    runs = _runs(zoo)
    text = zoo.render(runs)
    for source, run in runs:
        kind = zoo.classify(run)
        if kind == 'benchmark':
            assert f'`{source}`' in text and run['machine']['cpu'] in text
            for r in run['models']:
                assert f"`{r['name']}`" in text and f"{r['gmacs']:.3f}" in text
                if r['onnx']:
                    assert f"{r['onnx']['ort_latency']['p50_ms']:.2f}" in text
        elif kind == 'dense':
            for r in run['models']:
                assert Path(r['name']).name in text
                if r.get('peak_memory_mb') is not None:
                    assert f"{r['peak_memory_mb']:.0f} |" in text
        elif kind == 'reported':
            for e in run['entries']:
                assert f"{e['top1']} (reported by the paper)" in text and e['citation'] in text


def test_tradeoff_runs_are_rendered_labelled_with_their_plot(zoo):
    runs = _runs(zoo)
    tradeoff = [(source, run) for source, run in runs if zoo.classify(run) == 'tradeoff']
    links = zoo.plot_links(runs, REPO / 'tools' / 'results', REPO)
    text = zoo.render(runs, links)
    for source, run in tradeoff:
        assert '## Speed/accuracy trade-off, measured on scikit-learn digits with the reference model' in text
        assert f"`{source}`" in text and f"({links[source]})" in text
        for point in [run['base'], *run['points']]:
            assert f"| {point['top1']:.2f} |" in text
    broken = dict(tradeoff[0][1], kind='benchmark')
    with pytest.raises(ValueError, match='not a tools/tradeoff.py result'):
        zoo.render([('tools/results/broken.json', broken)])


def test_results_are_rendered_in_name_order_whatever_the_order_given(zoo):
    runs = _runs(zoo)
    assert zoo.render(runs) == zoo.render(list(reversed(runs)))


def test_bad_result_files_are_rejected(zoo, tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('[1, 2]')
    with pytest.raises(ValueError, match='JSON object'):
        zoo.load_run(bad)
    benchmark = next(run for _, run in _runs(zoo) if zoo.classify(run) == 'benchmark')
    broken = copy.deepcopy(benchmark)
    del broken['models'][0]['gmacs']
    bad.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="lacks \\['gmacs'\\]"):
        zoo.load_run(bad)
    reported = {'kind': 'reported by the paper', 'entries': [{'family': 'EViT', 'model': 'evit_small'}]}
    bad.write_text(json.dumps(reported))
    with pytest.raises(ValueError, match='citation'):
        zoo.load_run(bad)
    with pytest.raises(FileNotFoundError):
        zoo.load_run(tmp_path / 'missing.json')
