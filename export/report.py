"""Markdown tables of deployment results, shared by ``tools/benchmark.py`` (stdout) and ``tools/model_zoo.py``.

Pure Python over the benchmark JSON (no onnx import): a row of every table carries its own protocol (profile,
threads, batch) or sits under protocol lines that state it.
"""
from typing import Any, Sequence

__all__ = ['default_int8_variant', 'mobile_table', 'variant_table']


def default_int8_variant(variants: dict[str, Any]) -> str | None:
    """The INT8 variant a summary shows: dynamic INT8 (the export default) if measured, else static QDQ, else None."""
    return next((v for v in ('int8-dynamic', 'int8-static') if v in variants), None)


def _check(entry: dict[str, Any]) -> str:
    if 'agreement' in entry:
        a = entry['agreement']
        return f"top-1 {a['top1_agreement']:.1%}, cosine {a['mean_cosine']:.4f} ({a['num_images']} images)"
    return 'max abs diff ' + ' / '.join(f'{d:.1e}' for d in entry['parity_max_abs_diff'].values())


def variant_table(models: Sequence[dict[str, Any]]) -> list[str]:
    """One row per model and graph variant: latency with its protocol, ratios, size, parity or agreement."""
    lines = ['| model | variant | ORT p50 / p90 / p99 (ms) | threads, batch | p50 vs base (same variant) | '
             'speedup vs own FP32 | size (MB) | parity / agreement with FP32 |', '|' + '---|' * 8]
    for r in models:
        for variant, entry in r['onnx']['variants'].items():
            lat = entry['ort_latency']
            ratio = r['ratios']['ort_latency_p50'] if variant == 'fp32' else r['ratios'][f'ort_latency_p50_{variant}']
            speedup = '1.00x' if variant == 'fp32' else f"{r['ratios'][f'speedup_{variant}_vs_fp32']:.2f}x"
            lines.append(f"| `{r['name']}` | {lat['variant']} | {lat['p50_ms']:.2f} / {lat['p90_ms']:.2f} / "
                         f"{lat['p99_ms']:.2f} | {lat['threads']}, {lat['batch_size']} | {ratio:.3f} | {speedup} | "
                         f"{entry['size_mb']:.1f} | {_check(entry)} |")
    return lines


def mobile_table(models: Sequence[dict[str, Any]], execution_providers: Sequence[str]) -> list[str]:
    """One row per model: per execution provider onnxruntime's verdict, the share of nodes it takes and its
    partitions; then the operators none of them would take."""
    header = ['model', *execution_providers, 'ops one of them would not take']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    for r in models:
        mobile = r['onnx']['mobile']
        cells = []
        ops: set[str] = set()
        for ep in execution_providers:
            e = mobile[ep]
            cells.append(f"{e['verdict']}: {e['supported_nodes'] / max(e['nodes'], 1):.0%} of {e['nodes']} nodes, "
                         f"{e['partitions']} partition(s)")
            ops.update(e['unsupported_ops'])
        lines.append(f"| `{r['name']}` | {' | '.join(cells)} | {', '.join(sorted(ops)) or 'none'} |")
    return lines
