"""Time the same models exported without a graph optimizer, with onnxslim and with onnxruntime's offline optimizer,
side by side in one process (runs interleaved round-robin, so a busy machine slows every candidate alike).

Prints one Markdown row per model and optimizer: nodes in the written graph, p50 / p90 latency (onnxruntime CPU,
the profile's threads and batch) and the ratio to the unoptimized graph. Timing on a shared machine is approximate.

Usage::

    python tools/compare_graph_optimizers.py evit_small tome_small mctf_small --img-size 224 --rounds 15
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
from tqdm import tqdm

from tokenzoo.cli import user_errors
from tokenzoo.export.graph import OPTIMIZERS
from tokenzoo.export.latency import edge_session, profile_settings
from tokenzoo.export.onnx_export import export_onnx
from tokenzoo.profiling import build_model, to_img_size, validate_model_name


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('models', nargs='+', metavar='MODEL', help='timm model names')
    parser.add_argument('--img-size', type=int, default=224, help='input size (default: 224)')
    parser.add_argument('--profile', choices=['edge', 'server'], default='edge', help='threads and batch')
    parser.add_argument('--static', action='store_true', help='static [1, 3, H, W] graphs (edge profile only)')
    parser.add_argument('--rounds', type=int, default=15, help='timed runs per graph, interleaved (default: 15)')
    parser.add_argument('--warmup', type=int, default=5, help='untimed runs per graph first (default: 5)')
    args = parser.parse_args(argv)
    with user_errors(parser):
        img_size = to_img_size(args.img_size)
        for name in args.models:
            validate_model_name(name)
        if args.rounds < 1 or args.warmup < 0:
            raise ValueError("--rounds must be >= 1 and --warmup >= 0")
        settings = profile_settings(args.profile)
        if args.static and settings['batch_size'] != 1:
            raise ValueError("--static graphs take batch 1: use the edge profile")

    rows = []
    with tempfile.TemporaryDirectory(prefix='tokenzoo-optimizers-') as tmp:
        for name in tqdm(args.models, desc='models', file=sys.stderr):
            model = build_model(name, img_size=img_size)
            sessions, nodes = {}, {}
            for method in OPTIMIZERS:
                path = export_onnx(model, Path(tmp) / f'{name}.{method}.onnx', img_size=img_size,
                                   static=args.static, optimize=method)
                nodes[method] = len(onnx.load(str(path), load_external_data=False).graph.node)
                sessions[method] = edge_session(path, settings['threads'])
            x = np.random.default_rng(0).standard_normal(
                (settings['batch_size'], 3, *img_size), dtype=np.float32)
            times: dict[str, list[float]] = {method: [] for method in OPTIMIZERS}
            for i in range(args.warmup + args.rounds):
                for method, session in sessions.items():
                    start = time.perf_counter()
                    session.run(None, {'input': x})
                    if i >= args.warmup:
                        times[method].append((time.perf_counter() - start) * 1e3)
            base = float(np.percentile(times['none'], 50))
            for method in OPTIMIZERS:
                p50, p90 = np.percentile(times[method], 50), np.percentile(times[method], 90)
                rows.append(f"| {name} | {method} | {nodes[method]} | {p50:.2f} / {p90:.2f} | {p50 / base:.3f} |")
    print(f"# {args.profile} profile ({settings['threads']} thread(s), batch {settings['batch_size']}), "
          f"{'static' if args.static else 'dynamic-batch'} graphs at {img_size[0]}x{img_size[1]}, {args.rounds} "
          f"interleaved runs each after {args.warmup} warm-up; onnxruntime applies its own ORT_ENABLE_ALL on top")
    print('| model | optimizer | nodes | p50 / p90 (ms) | p50 vs none |')
    print('|---|---|---|---|---|')
    print('\n'.join(rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
