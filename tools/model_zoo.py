"""Render model_zoo.md from tools/benchmark.py JSON results: measured figures beside the machine and settings.

model_zoo.md is generated, never typed by hand (DESIGN contract 9). Each JSON file is one benchmark run and becomes one
section: its protocol (machine, runtimes, threads, batch sizes, iterations) followed by the table of params, GMACs,
tokens per block, eager PyTorch speed and onnxruntime latency. Accuracy columns will be added as "reported by the
paper" figures with citations once they are collected; none are shown now.

Usage::

    python tools/model_zoo.py results/*.json --out model_zoo.md [--force]
    python tools/model_zoo.py results/evit.json            # to stdout
"""
import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from tokenzoo.cli import user_errors
from tokenzoo.profiling import dense_table, format_token_counts

_REQUIRED = {
    'run': ('created', 'machine', 'settings', 'models'),
    'machine': ('cpu', 'cpu_usable', 'platform', 'torch', 'timm', 'onnxruntime', 'torch_num_threads'),
    'settings': ('base', 'img_size', 'precision', 'batch_size', 'iters', 'warmup', 'threads', 'onnx'),
    'model': ('name', 'weights', 'params_m', 'gmacs', 'tokens_per_block', 'eager_throughput_ips', 'eager_latency_ms',
              'onnx', 'ratios'),
    'dense model': ('name', 'model_name', 'img_size', 'params_m', 'gmacs', 'tokens_per_block', 'eager_latency_ms',
                    'ratios'),
}


def _require(record: dict, kind: str, source: str) -> None:
    missing = [key for key in _REQUIRED[kind] if key not in record]
    if missing:
        raise ValueError(f"{source}: {kind} record lacks {missing}; expected a JSON file written by tools/benchmark.py")


def load_run(path: Path) -> dict[str, Any]:
    """Read and check one benchmark JSON file.

    Args:
        path: A file written by ``tools/benchmark.py --json``.

    Returns:
        The run: ``created``, ``machine``, ``settings`` and ``models``.

    Raises:
        FileNotFoundError: If the file does not exist.
        ValueError: If it is not JSON written by tools/benchmark.py.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist or is not a file")
    try:
        run = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(run, dict):
        raise ValueError(f"{path}: expected a JSON object written by tools/benchmark.py")
    _require(run, 'run', str(path))
    _require(run['machine'], 'machine', str(path))
    _require(run['settings'], 'settings', str(path))
    for model in run['models']:
        _require(model, 'dense model' if run['settings'].get('dense') else 'model', str(path))
    return run


def _protocol(run: dict, source: str) -> list[str]:
    m, s = run['machine'], run['settings']
    lines = [
        f"- **Machine**: {m['cpu']}, {m['cpu_usable']} usable cores, {m['platform']}",
        f"- **Software**: torch {m['torch']}, timm {m['timm']}, onnxruntime {m['onnxruntime']}",
        f"- **Input**: {s['img_size'][0]}x{s['img_size'][1]}, {s['precision']}",
        f"- **Eager PyTorch**: eval, `torch.inference_mode`, {m['torch_num_threads']} thread(s); throughput at batch "
        f"{s['batch_size']}, latency at batch 1; {s['warmup']} warm-up + {s['iters']} timed iterations",
    ]
    if s['onnx']:
        lines.append(
            f"- **onnxruntime**: CPU execution provider, {s['threads']} intra-op thread(s), 1 inter-op, sequential, "
            f"ORT_ENABLE_ALL, opset {s.get('opset')}, batch 1; {s['warmup']} warm-up + {s['iters']} timed runs; "
            f"parity = max abs diff vs PyTorch at batch 1 / 3")
    lines.append(f"- **Ratios** are model / {s['base']}; speedup = eager throughput ratio")
    lines.append(f"- **Source**: `{source}`, measured {run['created']}")
    return lines


def _table(run: dict) -> list[str]:
    s = run['settings']
    header = ['model', 'weights', 'params (M)', 'GMACs', 'GMACs vs base', 'tokens per block',
              f"eager img/s (b{s['batch_size']})", 'speedup', 'eager b1 p50 (ms)']
    if s['onnx']:
        header += ['ORT b1 p50 / p90 (ms)', 'ORT p50 vs base', 'parity (b1 / b3)']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in run['models']:
        row = [f"`{r['name']}`", r['weights'], f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}",
               f"{r['ratios']['gmacs']:.3f}", format_token_counts(r['tokens_per_block']),
               f"{r['eager_throughput_ips']:.1f}",
               f"{r['ratios']['eager_throughput']:.2f}x", f"{r['eager_latency_ms']['p50_ms']:.2f}"]
        if s['onnx']:
            onnx = r['onnx']
            lat = onnx['ort_latency']
            row += [f"{lat['p50_ms']:.2f} / {lat['p90_ms']:.2f}", f"{r['ratios']['ort_latency_p50']:.3f}",
                    ' / '.join(f'{d:.1e}' for d in onnx['parity_max_abs_diff'].values())
                    + ('' if onnx['parity_ok'] else ' FAIL')]
        lines.append('| ' + ' | '.join(row) + ' |')
    return lines


def _dense_section(run: dict, source: str) -> list[str]:
    m, s = run['machine'], run['settings']
    return [
        f"- **Machine**: {m['cpu']}, {m['cpu_usable']} usable cores, {m['platform']}",
        f"- **Software**: torch {m['torch']}, timm {m['timm']}",
        f"- **Protocol**: the backbone of each OpenMMLab config as built by the config (random weights), eager "
        f"PyTorch, eval, `torch.inference_mode`, {m['torch_num_threads']} thread(s), batch 1 at the config's training "
        f"size, full-resolution maps of its out_indices; {s['warmup']} warm-up + {s['iters']} timed iterations",
        f"- **Ratios** are config / `{Path(s['base']).name}`",
        f"- **Source**: `{source}`, measured {run['created']}",
        '',
        *dense_table(run['models']),
    ]


def render(runs: Sequence[tuple[str, dict]]) -> str:
    """Render model_zoo.md from ``(source name, run)`` pairs, one section per run."""
    sources = ', '.join(f'`{source}`' for source, _ in runs)
    lines = [
        '# Model zoo',
        '',
        f'<!-- Generated by tools/model_zoo.py from {sources}. Do not edit by hand: re-run tools/benchmark.py and '
        f'tools/model_zoo.py. -->',
        '',
        'Every figure is measured: params and GMACs by running the model under `FlopCounterMode` (attention '
        'included), tokens per block (patch tokens in each block\'s output, CLS not counted) from '
        '`model.token_counts`, speed by `tools/benchmark.py`. Each table states the machine and protocol it was '
        'measured with; figures from different machines are not comparable.',
    ]
    for i, (source, run) in enumerate(runs, 1):
        s = run['settings']
        if s.get('dense'):
            lines += ['', f"## Run {i}: backbones inside detection / segmentation, base `{Path(s['base']).name}`", '']
            lines += _dense_section(run, source)
        else:
            lines += ['', f"## Run {i}: {s['img_size'][0]}x{s['img_size'][1]}, base `{s['base']}`", '']
            lines += _protocol(run, source) + [''] + _table(run)
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description='Render model_zoo.md from tools/benchmark.py JSON results.')
    parser.add_argument('results', nargs='+', type=Path, metavar='JSON', help='benchmark result files')
    parser.add_argument('--out', type=Path, help='write here instead of stdout (e.g. model_zoo.md)')
    parser.add_argument('--force', action='store_true', help='overwrite --out if it exists')
    args = parser.parse_args(argv)
    with user_errors(parser):
        if args.out is not None and args.out.exists() and not args.force:
            raise FileExistsError(f"{args.out} already exists; pass --force to overwrite it")
        text = render([(str(path), load_run(path)) for path in args.results])
    if args.out is None:
        sys.stdout.write(text)
    else:
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(main())
