"""Render model_zoo.md (and its plots) from the committed results in tools/results/: the one generator of the zoo.

model_zoo.md is generated, never typed by hand (DESIGN contract 9); ``make model-zoo`` runs this on a fresh clone and
a test regenerates the file from the committed results and compares. Each JSON file in tools/results/ is one of:

* a benchmark run (``tools/benchmark.py --json``): a section with its protocol (machine, runtimes, profile, threads,
  batch sizes, iterations) and the table of params, GMACs, tokens, eager PyTorch speed, onnxruntime FP32 and INT8
  latency with ratios vs the base, parity and INT8 agreement; the latency of every graph variant and onnxruntime's
  mobile usability check when the run measured them; a plot of latency ratio vs GMACs ratio;
* a dense run (``tools/benchmark.py --dense``): the backbones inside detection / segmentation, with peak memory,
  and the same plot;
* accuracy reported by the papers (``"kind": "reported by the paper"``): not measured here, each figure with its
  citation;
* a trade-off run (``tools/tradeoff.py --json``: accuracy against cost on scikit-learn digits with the reference
  model): rendered by ``tokenzoo.classification.tradeoff.tradeoff_section`` (the accuracy tools own their format)
  and drawn by its ``plot_tradeoff``.

Plots (matplotlib PNGs) are written beside the results (``--plots-dir``, tools/results/ by default) and embedded with
paths relative to model_zoo.md.

Usage::

    python tools/model_zoo.py tools/results/*.json --out model_zoo.md --force      # what make model-zoo runs
    python tools/model_zoo.py results/evit.json                                       # to stdout, no plots
"""
import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from tokenzoo.classification.tradeoff import check_tradeoff_run, plot_tradeoff, tradeoff_section
from tokenzoo.cli import user_errors
from tokenzoo.export.files import atomic_output
from tokenzoo.export.report import default_int8_variant, mobile_table, variant_table
from tokenzoo.profiling import dense_table, format_token_counts

__all__ = ['REPORTED', 'classify', 'load_run', 'plot_links', 'plot_name', 'plotted', 'render', 'write_plots']

REPORTED = 'reported by the paper'
_MOBILE_EPS = ('NNAPI', 'CoreML NeuralNetwork', 'CoreML MLProgram')  # tokenzoo.export.mobile.EXECUTION_PROVIDERS

_REQUIRED = {
    'run': ('created', 'machine', 'settings', 'models'),
    'machine': ('cpu', 'cpu_usable', 'platform', 'torch', 'timm', 'onnxruntime', 'torch_num_threads'),
    'settings': ('base', 'img_size', 'precision', 'batch_size', 'iters', 'warmup', 'threads', 'onnx'),
    'model': ('name', 'weights', 'params_m', 'gmacs', 'tokens_per_block', 'eager_throughput_ips', 'eager_latency_ms',
              'onnx', 'ratios'),
    'dense model': ('name', 'model_name', 'img_size', 'params_m', 'gmacs', 'tokens_per_block', 'eager_latency_ms',
                    'ratios'),
    'reported': ('kind', 'entries'),
    'reported entry': ('family', 'model', 'setting', 'top1', 'citation', 'source'),
}


def _require(record: dict, kind: str, source: str) -> None:
    missing = [key for key in _REQUIRED[kind] if key not in record]
    if missing:
        raise ValueError(f"{source}: {kind} record lacks {missing}; expected a JSON file written by tools/benchmark.py "
                         f"(or a reported-accuracy or trade-off file, see tools/model_zoo.py)")


def classify(run: dict) -> str:
    """'tradeoff', 'reported', 'dense' or 'benchmark'."""
    if 'dataset' in run:
        return 'tradeoff'
    if run.get('kind') == REPORTED:
        return 'reported'
    return 'dense' if run.get('settings', {}).get('dense') else 'benchmark'


def load_run(path: Path) -> dict[str, Any]:
    """Read and check one result file (see the module docstring for the kinds).

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not one of the kinds, or lacks what its kind needs.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(run, dict):
        raise ValueError(f"{path}: expected a JSON object written by tools/benchmark.py")
    kind = classify(run)
    if kind == 'tradeoff':
        check_tradeoff_run(run, str(path))
        return run
    if kind == 'reported':
        _require(run, 'reported', str(path))
        for entry in run['entries']:
            _require(entry, 'reported entry', str(path))
        return run
    _require(run, 'run', str(path))
    _require(run['machine'], 'machine', str(path))
    _require(run['settings'], 'settings', str(path))
    for model in run['models']:
        _require(model, 'dense model' if kind == 'dense' else 'model', str(path))
    return run


def plot_name(source: str, run: dict) -> str:
    """File name of the plot of the run read from ``source``: accuracy against cost for a trade-off run, latency
    ratio against GMACs ratio otherwise."""
    kind = 'accuracy_vs_cost' if classify(run) == 'tradeoff' else 'latency_vs_gmacs'
    return f'{Path(source).stem}_{kind}.png'


# ------------------------------------------------------------------------------------------------- benchmark runs
def _protocol(run: dict, source: str) -> list[str]:
    m, s = run['machine'], run['settings']
    lines = [
        f"- **Machine**: {m['cpu']}, {m['cpu_usable']} usable cores, {m['platform']}",
        f"- **Software**: torch {m['torch']}, timm {m['timm']}, onnx {m.get('onnx')}, onnxruntime {m['onnxruntime']}",
        f"- **Input**: {s['img_size'][0]}x{s['img_size'][1]}, {s['precision']} (INT8/FP16: the exported variants)",
        f"- **Eager PyTorch**: eval, `torch.inference_mode`, {m['torch_num_threads']} thread(s); throughput at batch "
        f"{s['batch_size']}, latency at batch 1; {s['warmup']} warm-up + {s['iters']} timed iterations",
    ]
    if s['onnx']:
        lines.append(
            f"- **onnxruntime** ({s.get('profile') or 'custom'} profile): CPU execution provider, {s['threads']} "
            f"intra-op thread(s), 1 inter-op, sequential, ORT_ENABLE_ALL, opset {s.get('opset')}, batch "
            f"{s.get('ort_batch_size') or 1} (static graphs: 1), {s['warmup']} warm-up + {s['iters']} timed runs, "
            f"graph optimizer: {s.get('optimize') or 'none'}; parity = max abs diff vs PyTorch at batch 1 / 3; "
            f"INT8 agreement = top-1 agreement with FP32 on real images (weights and images named per variant below)")
    lines.append(f"- **Ratios** are model / `{s['base']}` (INT8: vs the base's INT8); speedup = eager throughput "
                 f"ratio; GMACs of the exported program (what onnxruntime runs) are given where they differ from the "
                 f"eager model's")
    lines.append(f"- **Source**: `{source}`, measured {run['created']}")
    return lines


def _table(run: dict) -> list[str]:
    s = run['settings']
    header = ['model', 'weights', 'params (M)', 'GMACs', 'GMACs vs base', 'tokens (last block)', 'tokens per block',
              f"eager img/s (b{s['batch_size']})", 'speedup', 'eager b1 p50 (ms)']
    if s['onnx']:
        header += ['ORT FP32 p50 / p90 (ms)', 'FP32 vs base', 'ORT INT8 p50 (ms)', 'INT8 vs base', 'INT8 speedup',
                   'INT8 top-1 agreement', 'parity (b1 / b3)']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in run['models']:
        tokens = r['tokens_per_block']
        gmacs, ratio = f"{r['gmacs']:.3f}", f"{r['ratios']['gmacs']:.3f}"
        exported = r.get('gmacs_exported')
        if exported is not None and abs(exported - r['gmacs']) > 5e-4 * r['gmacs']:  # the export runs another path
            gmacs += f" (export path {exported:.3f})"
            ratio += f" ({r['ratios']['gmacs_exported']:.3f})"
        row = [f"`{r['name']}`", r['weights'], f"{r['params_m']:.2f}", gmacs,
               ratio, str(tokens[-1]) if tokens else 'n/a', format_token_counts(tokens),
               f"{r['eager_throughput_ips']:.1f}", f"{r['ratios']['eager_throughput']:.2f}x",
               f"{r['eager_latency_ms']['p50_ms']:.2f}"]
        if s['onnx']:
            onnx = r['onnx']
            lat = onnx['ort_latency']
            row += [f"{lat['p50_ms']:.2f} / {lat['p90_ms']:.2f}", f"{r['ratios']['ort_latency_p50']:.3f}"]
            int8 = default_int8_variant(onnx.get('variants', {}))
            if int8 is None:
                row += ['n/a'] * 4
            else:
                entry = onnx['variants'][int8]
                row += [f"{entry['ort_latency']['p50_ms']:.2f} ({int8[5:]})",
                        f"{r['ratios'][f'ort_latency_p50_{int8}']:.3f}",
                        f"{r['ratios'][f'speedup_{int8}_vs_fp32']:.2f}x",
                        f"{entry['agreement']['top1_agreement']:.1%}"]
            row.append(' / '.join(f'{d:.1e}' for d in onnx['parity_max_abs_diff'].values())
                       + ('' if onnx['parity_ok'] else ' FAIL'))
        lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def _agreement_sources(run: dict) -> list[str]:
    """One line per distinct (weights, images) pair the agreement figures of a run were measured with."""
    pairs = []
    for r in run['models']:
        for entry in (r['onnx'] or {}).get('variants', {}).values():
            if 'agreement' in entry:
                pairs.append((entry['agreement']['weights'], entry['agreement']['images']))
    return [f"- Agreement figures measured with weights: {w}; images: {i}" for w, i in dict.fromkeys(pairs)]


def _benchmark_section(run: dict, source: str, plot: str | None) -> list[str]:
    lines = [*_protocol(run, source), '', *_table(run)]
    models = run['models']
    if run['settings']['onnx'] and any(len(r['onnx'].get('variants', {})) > 1 for r in models):
        lines += ['', '**Every graph variant** (latency with the protocol of its row):', '', *_agreement_sources(run),
                  '', *variant_table(models)]
    mobile = [r for r in models if r['onnx'] and r['onnx'].get('mobile')]
    if mobile:
        lines += ['', "**onnxruntime's mobile usability check** (static FP32 graph, basic optimizations; what the "
                      "NNAPI and CoreML execution providers would take; `python -m "
                      "onnxruntime.tools.check_onnx_model_mobile_usability`):", '', *mobile_table(mobile, _MOBILE_EPS)]
    if plot:
        lines += ['', f"![latency ratio vs GMACs ratio, {source}]({plot})"]
    return lines


# ----------------------------------------------------------------------------------------------------- dense runs
def _dense_section(run: dict, source: str, plot: str | None) -> list[str]:
    m, s = run['machine'], run['settings']
    lines = [
        f"- **Machine**: {m['cpu']}, {m['cpu_usable']} usable cores, {m['platform']}",
        f"- **Software**: torch {m['torch']}, timm {m['timm']}",
        f"- **Protocol**: the backbone of each OpenMMLab config as built by the config (random weights), eager "
        f"PyTorch, eval, `torch.inference_mode`, {m['torch_num_threads']} thread(s), batch 1 at the config's training "
        f"size, full-resolution maps of its out_indices; {s['warmup']} warm-up + {s['iters']} timed iterations; peak "
        f"memory = resident-set high-water mark one forward adds",
        f"- **Ratios** are config / `{Path(s['base']).name}`",
        f"- **Source**: `{source}`, measured {run['created']}",
        '',
        *dense_table(run['models']),
    ]
    if plot:
        lines += ['', f"![latency ratio vs GMACs ratio, {source}]({plot})"]
    return lines


# ------------------------------------------------------------------------------------------------ reported figures
def _reported_section(runs: Sequence[tuple[str, dict]]) -> list[str]:
    lines = ['## Accuracy reported by the papers', '',
             'Not measured here: ImageNet-1k top-1 as each paper or its official repository reports it, for its own '
             'training or fine-tuning (the `deit_in1k` tags load the unmodified DeiT weights, whose accuracy with '
             'token reduction switched on is not these figures). Figures that could not be checked against the paper '
             'or its official README are left out.', '',
             '| family | model | setting | top-1 (%) | GFLOPs (reported) | baseline top-1 (%) | citation | source |',
             '|---|---|---|---|---|---|---|---|']
    for _, run in runs:
        for e in run['entries']:
            lines.append(f"| {e['family']} | `{e['model']}` | {e['setting']} | {e['top1']} ({REPORTED}) | "
                         f"{e.get('gflops', 'n/a')} | {e.get('baseline_top1', 'n/a')} | {e['citation']} | "
                         f"{e['source']} |")
    return lines


# ------------------------------------------------------------------------------------------------------- plots
def _plot_points(run: dict) -> list[tuple[str, float, float, float | None]]:
    """(label, GMACs ratio, FP32/eager latency ratio, INT8 latency ratio or None) per model of a run."""
    points = []
    for r in run['models']:
        if run['settings'].get('dense'):
            points.append((r['model_name'], r['ratios']['gmacs'], r['ratios']['eager_latency_p50'], None))
        elif r.get('onnx'):
            int8 = default_int8_variant(r['onnx'].get('variants', {}))
            gmacs = r['ratios'].get('gmacs_exported') or r['ratios']['gmacs']  # the path the exported graph runs
            points.append((r['name'], gmacs, r['ratios']['ort_latency_p50'],
                           r['ratios'][f'ort_latency_p50_{int8}'] if int8 else None))
    return points


def plotted(run: dict) -> bool:
    """Whether a run gets a plot: a dense or trade-off run, or a benchmark run that timed onnxruntime."""
    kind = classify(run)
    return kind in ('dense', 'tradeoff') or (kind == 'benchmark' and bool(run['settings']['onnx']))


def plot_links(runs: Sequence[tuple[str, dict]], folder: Path, root: Path) -> dict[str, str]:
    """Markdown path (relative to ``root``, the folder of model_zoo.md) of each run's plot in ``folder``."""
    return {source: Path(os.path.relpath((folder / plot_name(source, run)).resolve(), root.resolve())).as_posix()
            for source, run in runs if plotted(run)}


def write_plots(runs: Sequence[tuple[str, dict]], folder: Path) -> dict[str, Path]:
    """Write the latency-ratio vs GMACs-ratio plot of every benchmark (with onnxruntime) and dense run, and the
    accuracy-vs-cost plot of every trade-off run (``plot_tradeoff``).

    Each point is a model; the dashed diagonal is the ideal (latency falls exactly with the multiply-adds), the
    dotted line the target of 1.10x the GMACs ratio. Written atomically (a temporary file renamed).

    Returns:
        The written PNG per source.
    """
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    written = {}
    for source, run in runs:
        if not plotted(run):
            continue
        kind = classify(run)
        path = folder / plot_name(source, run)
        if kind == 'tradeoff':
            with atomic_output(path, force=True) as tmp:
                plot_tradeoff(run, tmp)
            written[source] = path
            continue
        points = _plot_points(run)
        fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
        right = max([1.05, *(p[1] for p in points)]) * 1.1
        top = max([1.05, *(p[2] for p in points), *(p[3] for p in points if p[3] is not None)]) * 1.08
        ax.plot([0, right], [0, right], '--', color='gray', label='ideal: latency ratio = GMACs ratio')
        ax.plot([0, right], [0, 1.1 * right], ':', color='gray', label='target: 1.10 x GMACs ratio')
        label = 'eager PyTorch' if kind == 'dense' else 'onnxruntime FP32'
        ax.scatter([p[1] for p in points], [p[2] for p in points], color='tab:blue', label=label, zorder=3)
        int8 = [p for p in points if p[3] is not None]
        if int8:
            ax.scatter([p[1] for p in int8], [p[3] for p in int8], marker='s', color='tab:orange',
                       label='onnxruntime INT8 (vs base INT8)', zorder=3)
        for name, x, y, _ in points:
            ax.annotate(name, (x, y), textcoords='offset points', xytext=(4, 3), fontsize=7)
        s = run['settings']
        where = ('backbones in OpenMMLab configs, eager, batch 1' if kind == 'dense' else
                 f"{s.get('profile') or 'custom'} profile: {s['threads']} thread(s), batch {s.get('ort_batch_size')}")
        xlabel = "GMACs / base's" if kind == 'dense' else "GMACs of the exported program / base's"
        ax.set(xlim=(0, right), ylim=(0, top), xlabel=xlabel, ylabel="latency p50 / base's",
               title=f"{Path(source).name}\n{where}")
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, loc='lower right')
        ax.grid(alpha=0.3)
        try:
            with atomic_output(path, force=True) as tmp:
                fig.savefig(tmp, format='png', bbox_inches='tight', metadata={'Software': None})
        finally:
            plt.close(fig)
        written[source] = path
    return written


# ------------------------------------------------------------------------------------------------------- render
def render(
        runs: Sequence[tuple[str, dict]],
        plots: dict[str, str] | None = None,
) -> str:
    """Render model_zoo.md.

    Args:
        runs: ``(source name, run)`` pairs; rendered in source-name order whatever the order given.
        plots: Markdown path of the plot of each source that has one (relative to model_zoo.md).
    """
    runs = sorted(runs, key=lambda pair: pair[0])
    plots = plots or {}
    sources = ', '.join(f'`{source}`' for source, _ in runs)
    lines = [
        '# Model zoo',
        '',
        f'<!-- Generated by tools/model_zoo.py from {sources}. Do not edit by hand: re-run tools/benchmark.py and '
        f'`make model-zoo`. -->',
        '',
        'Every figure is measured, except those marked as reported by a paper: params and GMACs by running the model '
        'under `FlopCounterMode` (attention included), tokens per block (patch tokens in each block\'s output, CLS '
        'not counted) from `model.token_counts`, speed by `tools/benchmark.py`. Each table states the machine and '
        'protocol it was measured with; figures from different machines are not comparable.',
    ]
    benchmark = [(s, r) for s, r in runs if classify(r) == 'benchmark']
    dense = [(s, r) for s, r in runs if classify(r) == 'dense']
    reported = [(s, r) for s, r in runs if classify(r) == 'reported']
    tradeoff = [(s, r) for s, r in runs if classify(r) == 'tradeoff']
    number = 0
    for source, run in benchmark:
        number += 1
        s = run['settings']
        profile = f", {s['profile']} profile" if s.get('profile') else ''
        lines += ['', f"## Run {number}: {s['img_size'][0]}x{s['img_size'][1]}{profile}, base `{s['base']}`", '']
        lines += _benchmark_section(run, source, plots.get(source))
    for source, run in dense:
        number += 1
        lines += ['', f"## Run {number}: backbones inside detection / segmentation, base "
                      f"`{Path(run['settings']['base']).name}`", '']
        lines += _dense_section(run, source, plots.get(source))
    for source, run in tradeoff:
        lines += ['', *tradeoff_section(run), '', f'Source: `{source}`.']
        if source in plots:
            lines += ['', f'![accuracy against GMACs and latency, {run["label"]}]({plots[source]})']
    if reported:
        lines += ['', *_reported_section(reported)]
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description='Render model_zoo.md and its plots from result JSON files.')
    parser.add_argument('results', nargs='+', type=Path, metavar='JSON', help='result files (tools/results/*.json)')
    parser.add_argument('--out', type=Path, help='write here instead of stdout (e.g. model_zoo.md)')
    parser.add_argument('--force', action='store_true', help='overwrite --out if it exists')
    parser.add_argument('--plots-dir', type=Path,
                        help='write the plots here (default with --out: the folder of the first result; without '
                             '--out: no plots)')
    args = parser.parse_args(argv)
    with user_errors(parser):
        if args.out is not None and args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} already exists; pass --force to overwrite it")
        runs = [(str(path), load_run(path)) for path in args.results]
        plots_dir = args.plots_dir or (args.results[0].parent if args.out is not None else None)
        if plots_dir is not None and not plots_dir.is_dir():
            raise FileNotFoundError(f"--plots-dir {plots_dir} is not a folder")
    plots = {}
    if plots_dir is not None:
        write_plots(runs, plots_dir)
        plots = plot_links(runs, plots_dir, args.out.parent if args.out is not None else Path('.'))
    text = render(runs, plots)
    if args.out is None:
        sys.stdout.write(text)
    else:
        with atomic_output(args.out, args.force) as tmp:
            tmp.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
