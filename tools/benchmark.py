"""Benchmark timm/tokenzoo models against a base model: params, GMACs, tokens per block, eager PyTorch speed and,
with --onnx, ONNX parity and onnxruntime latency of each deployable variant (FP32, FP32 static, INT8 static QDQ /
dynamic, FP16) with its agreement with FP32 on real images and onnxruntime's mobile usability check; with --dense, the
backbone of OpenMMLab configs as it runs inside the detector or segmentor (full-resolution maps at the config's
training size).

A thin command line over ``tokenzoo.profiling`` and ``tokenzoo.export``. Progress goes to stderr (tqdm), the table to
stdout, and --json writes every figure with the machine and settings it was measured with (the input of
tools/model_zoo.py); a run interrupted with Ctrl-C writes nothing.

Profiles (``--profile``, see ``tokenzoo.export.latency``): ``edge`` = onnxruntime with 1 thread at batch 1 (the
default), ``server`` = every usable core at batch 32. ``--zoo SIZE`` benchmarks DeiT-SIZE and every registered
tokenzoo model of that size, so a new family is picked up without editing a list.

Usage::

    python tools/benchmark.py --zoo small --profile edge --variants all --mobile --json tools/results/edge.json
    python tools/benchmark.py --zoo small --profile server --variants fp32 int8-dynamic --json server.json
    python tools/benchmark.py evit_small deit_small_patch16_224 --onnx --json results/evit_small.json
    python tools/benchmark.py --dense configs/deit/upernet_deit-small_mln_8xb2-160k_ade20k-512x512.py \
        configs/evit/upernet_evit-small-kr0.7_mln_8xb2-160k_ade20k-512x512.py --json results/dense_upernet.json
"""
import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

import tokenzoo
from tokenzoo.cli import user_errors
from tokenzoo.export.files import atomic_output
from tokenzoo.profiling import (
    build_model, count_gmacs, count_gmacs_exported, count_params, dense_table, eager_latency, eager_throughput,
    format_token_counts, machine_info, peak_memory_mb, to_img_size, token_counts)

PARITY_BATCH_SIZES = (1, 3)  # more than one batch size proves the exported batch axis is dynamic
# graph variants: (precision, static shape); 'fp32' is the dynamic-batch FP32 graph every other one is made from
VARIANTS = {
    'fp32': ('FP32', False),
    'fp32-static': ('FP32', True),
    'int8-static': ('INT8 static QDQ', False),
    'int8-dynamic': ('INT8 dynamic', False),
    'fp16': ('FP16', False),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description='Measure params, GMACs, token counts, eager PyTorch speed and (with --onnx) ONNX parity and '
                    'onnxruntime latency of timm models, with ratios against a base model.')
    parser.add_argument('models', nargs='*', metavar='MODEL',
                        help='timm model names, e.g. evit_small deit_small_patch16_224, or with --dense OpenMMLab '
                             'config files (the first is the base unless --base is given)')
    parser.add_argument('--dense', action='store_true',
                        help="MODELs are OpenMMLab configs: time each config's backbone at its training size "
                             "(batch 1, maps of its out_indices), against the first (e.g. the DeiT baseline)")
    parser.add_argument('--base', help='model the ratios are computed against (added to MODELS if missing)')
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], metavar='N',
                        help='input size: N (square) or H W (default: 224)')
    parser.add_argument('--batch-size', type=int, default=32, help='batch size of the eager throughput (default: 32)')
    parser.add_argument('--iters', type=int, default=30, help='timed iterations per measurement (default: 30)')
    parser.add_argument('--warmup', type=int, default=10, help='untimed iterations before each (default: 10)')
    parser.add_argument('--threads', type=int, default=1,
                        help='CPU threads for eager PyTorch (torch.set_num_threads) and onnxruntime (intra-op) '
                             '(default: 1, the edge protocol)')
    parser.add_argument('--onnx', action='store_true', help='also export to ONNX, check parity, time onnxruntime')
    parser.add_argument('--profile', choices=['edge', 'server'],
                        help='onnxruntime protocol (implies --onnx): edge = 1 thread, batch 1; server = every usable '
                             'core, batch 32 (sets --threads; eager PyTorch uses the same threads)')
    parser.add_argument('--variants', nargs='+', metavar='VARIANT',
                        help=f"graph variants to time (implies --onnx): {', '.join(VARIANTS)} or all (default: fp32); "
                             "INT8 and FP16 get their agreement with FP32 on real images")
    parser.add_argument('--optimize', choices=['none', 'onnxslim', 'ort'], default='onnxslim',
                        help='graph optimizer on the exported graphs (tokenzoo.export.graph; default: onnxslim)')
    parser.add_argument('--mobile', action='store_true',
                        help="onnxruntime's mobile usability check (NNAPI, CoreML) of the static FP32 graph (implies "
                             "--onnx)")
    parser.add_argument('--onnx-dir', type=Path,
                        help='keep the ONNX files here as MODEL_HxW[.variant].onnx (implies --onnx; default: a '
                             'temporary folder)')
    parser.add_argument('--opset', type=int, help='ONNX opset (default: tokenzoo.export.DEFAULT_OPSET)')
    parser.add_argument('--checkpoint', action='append', default=[], metavar='[MODEL=]PATH',
                        help='local weights for MODEL (repeatable); a bare PATH only with a single model. '
                             'Without it weights are random')
    parser.add_argument('--zoo', metavar='SIZE',
                        help='benchmark deit_SIZE_patch16_224 (the base) and every tokenzoo model named *_SIZE, e.g. '
                             'small; MODELs may be omitted')
    parser.add_argument('--json', type=Path, help='write the results here')
    parser.add_argument('--force', action='store_true', help='overwrite an existing --json file and ONNX files')
    return parser


def _checkpoints(items: Sequence[str], models: Sequence[str]) -> dict[str, Path]:
    """Map model names to checkpoint files from ``--checkpoint [MODEL=]PATH`` items."""
    checkpoints = {}
    for item in items:
        name, sep, path = item.partition('=')
        if not sep or name not in models:  # a bare path (which may itself contain '=')
            if len(models) != 1:
                raise ValueError(f"--checkpoint {item!r}: with several models write MODEL=PATH, MODEL one of {models}")
            name, path = models[0], item
        if not Path(path).is_file():
            raise FileNotFoundError(f"--checkpoint {item!r}: {path} does not exist or is not a file")
        checkpoints[name] = Path(path)
    return checkpoints


def _check_new_file(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} already exists; pass --force to overwrite it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist; create it first")


def _validate(args: argparse.Namespace) -> None:
    """Check every argument before any model is built, and normalize them in place."""
    args.img_size = to_img_size(args.img_size[0] if len(args.img_size) == 1 else args.img_size)
    for key in ('batch_size', 'iters', 'warmup', 'threads'):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.zoo is not None:
        if args.dense:
            raise ValueError("--zoo names classification models; --dense takes config files")
        family_models = tokenzoo.list_models(f'*_{args.zoo}')
        if not family_models:
            raise ValueError(f"--zoo {args.zoo}: no tokenzoo model is named *_{args.zoo}; sizes: tiny, small, base")
        args.base = args.base or f'deit_{args.zoo}_patch16_224'
        args.models = [*args.models, *family_models]
    if not args.models and args.base is None:
        raise ValueError("name at least one MODEL (or --zoo SIZE)")
    args.base = args.base or args.models[0]
    args.models = list(dict.fromkeys([args.base, *args.models]))  # base first, duplicates dropped
    if args.dense:
        if args.onnx or args.onnx_dir is not None or args.checkpoint or args.profile or args.variants or args.mobile:
            raise ValueError("--dense times backbones with random weights in PyTorch; --onnx, --onnx-dir and "
                             "--checkpoint are for classification models")
        missing = [c for c in args.models if not Path(c).is_file()]
        if missing:
            raise FileNotFoundError(f"--dense expects config files; not found: {', '.join(missing)}")
        if args.json is not None:
            _check_new_file(args.json, args.force)
        return
    with torch.device('meta'):  # builds every model without allocating weights: checks names, sizes in milliseconds
        for name in args.models:
            build_model(name, img_size=args.img_size)
    args.checkpoint = _checkpoints(args.checkpoint, args.models)
    if args.json is not None:
        _check_new_file(args.json, args.force)
    args.onnx = args.onnx or args.onnx_dir is not None or bool(args.profile or args.variants or args.mobile)
    if args.onnx:
        from tokenzoo.export.latency import profile_settings

        if args.profile is not None:  # the profile decides threads and batch
            settings = profile_settings(args.profile)
            args.threads, args.ort_batch_size = settings['threads'], settings['batch_size']
        else:  # --threads as given, batch 1: the edge protocol when threads is 1
            args.ort_batch_size = 1
            args.profile = 'edge' if args.threads == 1 else None
        variants = args.variants or ['fp32']
        variants = list(VARIANTS) if 'all' in variants else variants
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"--variants {' '.join(unknown)}: not known; allowed: {', '.join(VARIANTS)} or all")
        if args.profile == 'server':  # a static [1, 3, H, W] graph cannot run a batch of 32
            variants = [v for v in variants if not VARIANTS[v][1]]
        args.variants = list(dict.fromkeys(['fp32', *variants]))
    if args.onnx:
        try:  # onnx and onnxruntime are the optional ``export`` extra
            from tokenzoo.export.onnx_export import DEFAULT_OPSET, SUPPORTED_OPSETS
        except ImportError as e:
            raise ValueError(f"--onnx needs the export extra (pip install -e .[export]): {e}") from e
        args.opset = DEFAULT_OPSET if args.opset is None else args.opset
        if args.opset not in SUPPORTED_OPSETS:
            raise ValueError(f"--opset {args.opset} is not supported; allowed: {list(SUPPORTED_OPSETS)}")
    if args.onnx_dir is not None:
        args.onnx_dir.mkdir(parents=True, exist_ok=True)
        for name in args.models:
            for variant in args.variants:
                _check_new_file(_onnx_path(args.onnx_dir, name, args.img_size, variant), args.force)


def _onnx_path(folder: Path, name: str, img_size: tuple[int, int], variant: str = 'fp32') -> Path:
    suffix = '' if variant == 'fp32' else f'.{variant}'
    return folder / f'{name}_{img_size[0]}x{img_size[1]}{suffix}.onnx'


def _weights_description(name: str, checkpoint: Path | None) -> str:
    if checkpoint is not None:
        return f'{checkpoint.name} (--checkpoint)'
    return 'random (timm init, no --checkpoint): agreement figures say nothing about trained weights'


def _measure_onnx(model: torch.nn.Module, name: str, folder: Path, args: argparse.Namespace,
                  step: Callable[[str], None]) -> dict:
    """Export every variant of ``args.variants``, verify it, time it with the profile's protocol."""
    # imported here: onnx/onnxruntime are the optional ``export`` extra, not needed without --onnx
    from tokenzoo.export.images import model_normalization, photographs
    from tokenzoo.export.latency import ort_latency
    from tokenzoo.export.onnx_export import PARITY_TOL, check_parity, export_onnx
    from tokenzoo.export.quantize import quantize_int8, to_fp16
    from tokenzoo.export.verify import agreement

    paths = {v: _onnx_path(folder, name, args.img_size, v) for v in args.variants}
    weights = _weights_description(name, args.checkpoint.get(name))
    mean, std = model_normalization(model)
    images = None
    result: dict[str, Any] = dict(path=str(paths['fp32']) if args.onnx_dir is not None else None, opset=args.opset,
                                  optimize=args.optimize, variants={})
    for variant in args.variants:
        precision, static = VARIANTS[variant]
        step(f'{variant}: writing')
        if precision == 'FP32':
            export_onnx(model, paths[variant], img_size=args.img_size, opset=args.opset, force=args.force,
                        static=static, optimize=args.optimize)
            diffs = check_parity(model, paths[variant], batch_sizes=(1,) if static else PARITY_BATCH_SIZES,
                                 img_size=args.img_size)
            entry: dict[str, Any] = dict(parity_max_abs_diff={str(b): d for b, d in diffs.items()},
                                         parity_ok=max(diffs.values()) <= PARITY_TOL)
        else:
            if images is None:
                images = photographs(args.img_size, 60, mean, std)
            if precision == 'FP16':
                to_fp16(paths['fp32'], paths[variant], force=args.force)
            else:
                mode = 'static' if variant == 'int8-static' else 'dynamic'
                calibration = photographs(args.img_size, 32, mean, std, offset=100) if mode == 'static' else None
                quantize_int8(paths['fp32'], paths[variant], mode, calibration, force=args.force)
            step(f'{variant}: agreement with FP32 on real images')
            entry = dict(agreement=agreement(paths['fp32'], paths[variant], images, weights))
        step(f'{variant}: onnxruntime latency ({args.profile}: batch {1 if static else args.ort_batch_size}, '
             f'{args.threads} thread(s))')
        entry['size_mb'] = paths[variant].stat().st_size / 2 ** 20
        entry['ort_latency'] = ort_latency(
            paths[variant], batch_size=1 if static else args.ort_batch_size, img_size=args.img_size,
            threads=args.threads, warmup=args.warmup, runs=args.iters, profile=args.profile,
            variant=f"{precision}, {'static [1, 3, H, W]' if static else 'dynamic batch'}")
        result['variants'][variant] = entry
    if args.mobile:
        from tokenzoo.export.mobile import mobile_usability

        step("onnxruntime's mobile usability check (static graph)")
        with tempfile.TemporaryDirectory(prefix='tokenzoo-mobile-') as tmp:
            static_path = paths.get('fp32-static')
            if static_path is None:  # not asked for as a variant: checked, not kept
                static_path = export_onnx(model, Path(tmp) / 'static.onnx', img_size=args.img_size, opset=args.opset,
                                          static=True, optimize=args.optimize)
            result['mobile'] = mobile_usability(static_path)
    fp32 = result['variants']['fp32']
    # the FP32 figures where earlier results (and tools/model_zoo.py) read them
    result.update(parity_max_abs_diff=fp32['parity_max_abs_diff'], parity_ok=fp32['parity_ok'],
                  ort_latency=fp32['ort_latency'])
    return result


def measure_model(name: str, args: argparse.Namespace, onnx_dir: Path | None, step: Callable[[str], None]) -> dict:
    """Measure one model; ``step`` reports progress."""
    checkpoint = args.checkpoint.get(name)
    step('building model' + ('' if checkpoint else ' (random weights)'))
    model = build_model(name, img_size=args.img_size, checkpoint=checkpoint)
    step('counting params, GMACs and tokens')
    try:
        tokens = token_counts(model, args.img_size)
    except ValueError:  # not a ViT (e.g. a CNN used as a reference): tokens are undefined
        tokens = None
    result: dict[str, Any] = dict(
        name=name,
        weights=str(checkpoint) if checkpoint else 'random',
        params_m=count_params(model) / 1e6,
        gmacs=count_gmacs(model, args.img_size),
        tokens_per_block=tokens,
    )
    step(f"eager throughput (batch {args.batch_size})")
    result['eager_throughput_ips'] = eager_throughput(model, args.batch_size, args.img_size, args.warmup, args.iters)
    step('eager latency (batch 1)')
    result['eager_latency_ms'] = eager_latency(model, 1, args.img_size, args.warmup, args.iters)
    if onnx_dir:
        step('counting GMACs of the exported program')
        result['gmacs_exported'] = count_gmacs_exported(model, args.img_size)
    result['onnx'] = _measure_onnx(model, name, onnx_dir, args, step) if onnx_dir else None
    return result


def measure_backbone(config: str, args: argparse.Namespace, step: Callable[[str], None]) -> dict:
    """Measure the backbone of one OpenMMLab config at the size the config trains at (random weights)."""
    from tokenzoo.mm import build_backbone  # OpenMMLab is the optional ``mm`` extra, needed only with --dense

    step('building the backbone (random weights)')
    backbone = build_backbone(config)
    img_size = backbone.img_size
    step(f'counting params, GMACs and tokens at {img_size[0]}x{img_size[1]}')
    result: dict[str, Any] = dict(
        name=config,
        model_name=backbone.model_name,
        img_size=list(img_size),
        out_indices=list(backbone.out_indices),
        params_m=count_params(backbone) / 1e6,
        gmacs=count_gmacs(backbone, img_size),
        tokens_per_block=token_counts(backbone.vit, img_size),
    )
    step('eager latency (batch 1)')
    result['eager_latency_ms'] = eager_latency(backbone, 1, img_size, args.warmup, args.iters)
    step('peak memory of a forward (batch 1)')
    result['peak_memory_mb'] = peak_memory_mb(backbone, img_size)
    return result


def add_dense_ratios(results: list[dict], base: str) -> None:
    """Add ``ratios`` (config / base) of GMACs and eager batch-1 latency to each dense result."""
    ref = next(r for r in results if r['name'] == base)
    for r in results:
        r['ratios'] = dict(gmacs=r['gmacs'] / ref['gmacs'],
                           eager_latency_p50=r['eager_latency_ms']['p50_ms'] / ref['eager_latency_ms']['p50_ms'])


def format_dense_report(report: dict) -> str:
    """The summary of a --dense run: protocol lines and a Markdown table."""
    s, m = report['settings'], report['machine']
    return '\n'.join([
        f"# backbones of {len(report['models'])} configs, float32, batch 1, ratios vs {s['base']}",
        f"machine: {m['cpu']} ({m['cpu_usable']} usable cores), {m['platform']}, torch {m['torch']}",
        f"eager: PyTorch inference_mode, {m['torch_num_threads']} thread(s), {s['warmup']} warm-up + {s['iters']} "
        f"timed, random weights, full-resolution maps of the config's out_indices",
        '',
        *dense_table(report['models']),
    ])


def add_ratios(results: list[dict], base: str) -> None:
    """Add ``ratios`` (model / base) to each result: GMACs, eager throughput (speedup), ORT p50 latency of FP32 and
    of every other variant (``ort_latency_p50_<variant>``: vs the base's same variant) and INT8 vs its own FP32."""
    ref = next(r for r in results if r['name'] == base)
    for r in results:
        ratios: dict[str, float | None] = dict(
            gmacs=r['gmacs'] / ref['gmacs'],
            gmacs_exported=r['gmacs_exported'] / ref['gmacs_exported'] if 'gmacs_exported' in r else None,
            eager_throughput=r['eager_throughput_ips'] / ref['eager_throughput_ips'],
            ort_latency_p50=r['onnx']['ort_latency']['p50_ms'] / ref['onnx']['ort_latency']['p50_ms']
            if r['onnx'] else None,
        )
        for variant, entry in (r['onnx'] or {}).get('variants', {}).items():
            own = entry['ort_latency']['p50_ms']
            if variant != 'fp32':
                ratios[f'ort_latency_p50_{variant}'] = own / ref['onnx']['variants'][variant]['ort_latency']['p50_ms']
                ratios[f'speedup_{variant}_vs_fp32'] = r['onnx']['variants']['fp32']['ort_latency']['p50_ms'] / own
        r['ratios'] = ratios


def format_report(report: dict) -> str:
    """The human-readable summary printed to stdout: protocol lines and a Markdown table."""
    s, m = report['settings'], report['machine']
    h, w = s['img_size']
    lines = [
        f"# {len(report['models'])} models at {h}x{w}, float32, ratios vs {s['base']}",
        f"machine: {m['cpu']} ({m['cpu_usable']} usable cores), {m['platform']}, torch {m['torch']}, "
        f"timm {m['timm']}, onnxruntime {m['onnxruntime']}",
        f"eager: PyTorch inference_mode, {m['torch_num_threads']} thread(s), throughput at batch {s['batch_size']}, "
        f"latency at batch 1, {s['warmup']} warm-up + {s['iters']} timed",
    ]
    if s['onnx']:
        lines.append(f"onnxruntime ({s.get('profile') or 'custom'} profile): CPU EP, {s['threads']} intra-op "
                     f"thread(s), 1 inter-op, sequential, ORT_ENABLE_ALL, opset {s['opset']}, batch "
                     f"{s.get('ort_batch_size', 1)} (static graphs: 1), {s['warmup']} warm-up + {s['iters']} timed, "
                     f"graph optimizer: {s.get('optimize', 'none')}")
    random = [r['name'] for r in report['models'] if r['weights'] == 'random']
    if random:
        lines.append(f"weights: RANDOM (no --checkpoint) for {', '.join(random)}")
    header = ['model', 'params (M)', 'GMACs', 'GMACs vs base', 'tokens per block', f"eager img/s (b{s['batch_size']})",
              'speedup vs base', 'eager b1 p50 (ms)']
    if s['onnx']:
        header += ['ORT b1 p50 / p90 (ms)', 'ORT p50 vs base', 'parity max abs diff (b1 / b3)']
    rows = []
    for r in report['models']:
        row = [r['name'], f"{r['params_m']:.2f}", f"{r['gmacs']:.3f}", f"{r['ratios']['gmacs']:.3f}",
               format_token_counts(r['tokens_per_block']), f"{r['eager_throughput_ips']:.1f}",
               f"{r['ratios']['eager_throughput']:.2f}x", f"{r['eager_latency_ms']['p50_ms']:.2f}"]
        if r['onnx']:
            lat, diffs = r['onnx']['ort_latency'], r['onnx']['parity_max_abs_diff']
            row += [f"{lat['p50_ms']:.2f} / {lat['p90_ms']:.2f}", f"{r['ratios']['ort_latency_p50']:.3f}",
                    ' / '.join(f'{d:.1e}' for d in diffs.values()) + ('' if r['onnx']['parity_ok'] else ' FAIL')]
        rows.append(row)
    lines += ['', '| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(row) + ' |' for row in rows]
    if s['onnx']:
        from tokenzoo.export.report import mobile_table, variant_table

        if len(s.get('variants', ['fp32'])) > 1:
            lines += ['', *variant_table(report['models'])]
        mobile = [r for r in report['models'] if r['onnx'].get('mobile')]
        if mobile:
            from tokenzoo.export.mobile import EXECUTION_PROVIDERS

            lines += ['', "onnxruntime's mobile usability check (static FP32 graph):", '',
                      *mobile_table(mobile, EXECUTION_PROVIDERS)]
    return '\n'.join(lines)




def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (1 if an ONNX parity check failed)."""
    parser = _parser()
    args = parser.parse_args(argv)
    with user_errors(parser):
        _validate(args)

    # one protocol for both runtimes; torch's default (all cores) also collapses when the machine is busy
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory(prefix='tokenzoo-onnx-') as tmp, \
            tqdm(args.models, unit='model', file=sys.stderr, dynamic_ncols=True) as bar:
        onnx_dir = (args.onnx_dir or Path(tmp)) if args.onnx else None
        for i, name in enumerate(bar, 1):
            def step(msg: str, prefix: str = f'[{i}/{len(args.models)}] {name}') -> None:
                bar.set_description_str(f'{prefix}: {msg}')

            results.append(measure_backbone(name, args, step) if args.dense else
                           measure_model(name, args, onnx_dir, step))
    (add_dense_ratios if args.dense else add_ratios)(results, args.base)

    report = dict(
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
        command=['tools/benchmark.py', *(sys.argv[1:] if argv is None else argv)],
        machine=machine_info(),
        settings=dict(
            base=args.base, dense=args.dense, img_size=None if args.dense else list(args.img_size),
            precision='float32', batch_size=args.batch_size,
            iters=args.iters, warmup=args.warmup, threads=args.threads, onnx=args.onnx,
            opset=args.opset if args.onnx else None,
            profile=args.profile if args.onnx else None,
            ort_batch_size=args.ort_batch_size if args.onnx else None,
            variants=args.variants if args.onnx else None,
            optimize=args.optimize if args.onnx else None,
            eager='PyTorch eager, torch.inference_mode, eval mode, torch.set_num_threads(threads)',
            ort_session='CPUExecutionProvider, intra_op_num_threads=threads, inter_op_num_threads=1, sequential, '
                        'ORT_ENABLE_ALL' if args.onnx else None,
        ),
        models=results,
    )
    print(format_dense_report(report) if args.dense else format_report(report))
    if args.json is not None:
        _check_new_file(args.json, args.force)  # again: the file may have appeared during the run
        with atomic_output(args.json, args.force) as tmp:  # written whole or not at all
            tmp.write_text(json.dumps(report, indent=2) + '\n')
        print(f"wrote {args.json}", file=sys.stderr)
    failed = [r['name'] for r in results if r.get('onnx') and not r['onnx']['parity_ok']]
    if failed:
        print(f"ONNX parity FAILED (max abs diff > tolerance) for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
