"""Export a model to one self-contained ONNX file (dynamic batch axis, or a static graph), and check it against PyTorch.

Exporter choice: torch's dynamo exporter (``torch.onnx.export(..., dynamo=True)``, the default in torch 2.14) on a
program captured by ``torch.export``. It handles what the token-reduction models use: ``torch.topk`` /
``torch.gather`` over the token axis with a static k (``math.ceil`` on Python ints folds into the graph), and
``F.scaled_dot_product_attention`` (MatMul/Softmax at the default opset). The batch axis is a named
``torch.export.Dim``, so a model that silently specializes on its batch size fails the export instead of producing a
fixed-batch graph. The legacy TorchScript exporter (``dynamo=False``) is not used: dynamo exports every model here,
and a second exporter would only hide failures.

``static=True`` writes a ``[1, 3, H, W]`` graph instead (every shape fixed): what mobile runtimes and the NNAPI/CoreML
execution providers want, and what lets onnxruntime fold the shape arithmetic away. Every written graph goes through
``graph.make_tooling_friendly`` (no stale shape records, reductions every tool can follow: the reason onnxruntime's
quantization tools failed on the ToMe and MCTF graphs, see ``tokenzoo.export.graph``) and, optionally, an optimizer
(``optimize='onnxslim'`` or ``'ort'``).

Usage::

    python -m tokenzoo.export evit_small --out evit_small.onnx
    python export/onnx_export.py deit_small_patch16_224 --out deit_s.onnx --img-size 224 --opset 18
    python -m tokenzoo.export tome_small --out tome_small.onnx --static --optimize onnxslim --int8 --fp16
    python -m tokenzoo.export '*_small' --out deploy/ --int8 --fp16     # every registered small model, with progress
"""
import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from tokenzoo.cli import parse_model_kwargs, user_errors
from tokenzoo.export.files import atomic_output, check_out_path
from tokenzoo.export.graph import DEFAULT_OPTIMIZER, OPTIMIZERS, make_tooling_friendly, optimize_graph
from tokenzoo.profiling import (
    ImgSize, build_model, check_img_size, eval_mode, example_input, to_img_size, validate_model_name)

__all__ = [
    'DEFAULT_OPSET', 'PARITY_TOL', 'SUPPORTED_OPSETS', 'atomic_output', 'check_out_path', 'check_parity',
    'export_onnx', 'is_static', 'main', 'parse_model_kwargs',
]

# 18 is the opset torch's exporter implements natively (lower ones go through a best-effort version converter) and
# runs on every onnxruntime since 1.14 and on most edge runtimes; 23 is the highest torch 2.14 targets.
DEFAULT_OPSET = 18
SUPPORTED_OPSETS = range(18, 24)
PARITY_TOL = 1e-4  # DESIGN contract 7: float32 outputs match PyTorch within this max abs diff
_PROTOBUF_LIMIT = 2 ** 31  # a single-file ONNX model holds at most 2 GB (protobuf message size)
_EXAMPLE_BATCH = 2  # torch.export specializes sizes 0 and 1, so trace with 2 to keep the batch axis symbolic


def is_static(onnx_path: str | os.PathLike) -> bool:
    """Whether the graph's input has a fixed batch size (a ``static=True`` export)."""
    dim = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.HasField('dim_value')


def _check_opset(opset: int) -> None:
    if opset not in SUPPORTED_OPSETS:
        raise ValueError(
            f"opset {opset} is not supported; allowed: {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}")


def _check_size(model: nn.Module) -> None:
    num_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if num_bytes >= _PROTOBUF_LIMIT:
        raise ValueError(
            f"the model's weights take {num_bytes / 2 ** 30:.2f} GB; a single-file ONNX model is limited to 2 GB")


def _to_onnx(model: nn.Module, example: torch.Tensor, opset: int, static: bool) -> torch.onnx.ONNXProgram:
    """Capture ``model`` with ``torch.export`` (dynamic batch axis unless ``static``) and convert it with the dynamo
    ONNX exporter."""
    options = dict(dynamo=True, input_names=['input'], opset_version=opset, verbose=False)
    if static:
        exported = torch.export.export(model, (example,), strict=False)
    else:
        exported = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim('batch', min=1)},), strict=False)
        # the string form only names the axis in the ONNX graph ('batch' instead of torch's symbol, e.g. 's77')
        options['dynamic_shapes'] = ({0: 'batch'},)
    with torch.no_grad():
        num_outputs = len(_as_arrays(exported.module()(example)))
    options['output_names'] = ['output'] if num_outputs == 1 else [f'output{i}' for i in range(num_outputs)]
    return torch.onnx.export(exported, **options)


def export_onnx(
        model: nn.Module | str,
        out_path: str | os.PathLike,
        img_size: ImgSize = (224, 224),
        opset: int = DEFAULT_OPSET,
        force: bool = False,
        static: bool = False,
        optimize: str = 'none',
) -> Path:
    """Export a model in eval mode to one ONNX file (weights inside) with a dynamic batch axis, or a static graph.

    The graph has one input ``input`` of shape (batch, 3, H, W) (``static``: (1, 3, H, W)) and one output ``output``
    (``output0``, ``output1``, ... for a model with several, e.g. an OpenMMLab backbone's maps). The file is written
    to a temporary file in the same folder, made tooling-friendly (``graph.make_tooling_friendly``), optimized,
    checked with ``onnx.checker.check_model`` and then renamed, so a failed or interrupted export leaves neither a
    partial file nor a clobbered one.

    Args:
        model: A model, or a timm model name (built with random weights at ``img_size``).
        out_path: The ``.onnx`` file to write.
        img_size: Input size, one int or ``(height, width)``.
        opset: ONNX opset, one of ``SUPPORTED_OPSETS``.
        force: Overwrite ``out_path`` if it exists.
        static: A ``[1, 3, H, W]`` graph with every shape fixed, for mobile runtimes (it rejects other batch sizes).
        optimize: 'none', 'onnxslim' or 'ort' (see ``graph.optimize_graph``).

    Returns:
        The path of the written file.

    Raises:
        FileExistsError: If ``out_path`` exists and ``force`` is False.
        ValueError: Unknown model name, unsupported opset or optimizer, an image size the model cannot take, or
            weights too large for one file.
    """
    out_path = check_out_path(out_path, force)
    _check_opset(opset)
    if optimize not in OPTIMIZERS:
        raise ValueError(f"optimize={optimize!r} is not known; allowed: {', '.join(OPTIMIZERS)}")
    if isinstance(model, str):
        model = build_model(model, img_size=img_size)
    img_size = check_img_size(model, img_size)
    _check_size(model)

    with atomic_output(out_path, force) as tmp_path:
        with eval_mode(model):
            example = example_input(model, 1 if static else _EXAMPLE_BATCH, img_size)
            program = _to_onnx(model, example, opset, static)
        onnx.save(make_tooling_friendly(program.model_proto), str(tmp_path))
        if optimize != 'none':
            optimize_graph(tmp_path, tmp_path, optimize)
        onnx.checker.check_model(str(tmp_path), full_check=True)
    return out_path


def _as_arrays(output: Any) -> list[np.ndarray]:
    tensors = [output] if isinstance(output, torch.Tensor) else list(output)
    return [t.detach().float().cpu().numpy() for t in tensors]


def check_parity(
        model: nn.Module,
        onnx_path: str | os.PathLike,
        batch_sizes: Sequence[int] | None = None,
        img_size: ImgSize = (224, 224),
        seed: int = 0,
) -> dict[int, float]:
    """Compare onnxruntime (CPU execution provider) with the PyTorch model in eval mode on random inputs.

    Args:
        model: The PyTorch model that was exported.
        onnx_path: The exported file.
        batch_sizes: Batch sizes to run; more than one checks that the batch axis is really dynamic. Default: 1 and 3
            for a dynamic-batch graph, 1 for a static one.
        img_size: Input size, one int or ``(height, width)``.
        seed: Seed of the random inputs.

    Returns:
        Max absolute difference over all outputs, per batch size.

    Raises:
        ValueError: On an empty or non-positive batch size list, or an image size the model cannot take.
    """
    if batch_sizes is None:
        batch_sizes = (1,) if is_static(onnx_path) else (1, 3)
    if not batch_sizes or any(b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be a non-empty list of ints >= 1, got {batch_sizes!r}")
    img_size = check_img_size(model, img_size)
    session = ort.InferenceSession(str(onnx_path), providers=['CPUExecutionProvider'])
    input_name = session.get_inputs()[0].name
    diffs = {}
    for batch_size in batch_sizes:
        x = example_input(model, batch_size, img_size, seed=seed + batch_size)
        with eval_mode(model), torch.inference_mode():
            expected = _as_arrays(model(x))
        actual = session.run(None, {input_name: x.float().cpu().numpy()})
        diffs[batch_size] = max(float(np.abs(a - e).max()) for a, e in zip(actual, expected))
    return diffs


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m tokenzoo.export',
        description='Export a timm/tokenzoo model to one ONNX file (dynamic batch axis, or --static) and check it '
                    'against PyTorch with onnxruntime (exit code 1 if the max abs diff exceeds %g); with --int8 / '
                    '--fp16 also write the quantized files beside it, each with its agreement with FP32 on real '
                    'images.' % PARITY_TOL)
    parser.add_argument('model', help="timm model name, e.g. evit_small or deit_small_patch16_224; a pattern such as "
                                      "'*_small' (every tokenzoo model it matches, into the folder --out); or an "
                                      "OpenMMLab config file (its backbone at the config's training size, maps out)")
    parser.add_argument('--out', required=True, help='the .onnx file to write (FP32; the others go beside it), or the '
                                                     'folder for a pattern')
    parser.add_argument('--img-size', type=int, nargs='+', default=[224], metavar='N',
                        help='input size: N (square) or H W; a multiple of the patch size (default: 224)')
    parser.add_argument('--opset', type=int, default=DEFAULT_OPSET, help=f'ONNX opset (default: {DEFAULT_OPSET})')
    parser.add_argument('--static', action='store_true',
                        help='a static [1, 3, H, W] graph (mobile runtimes, NNAPI/CoreML) instead of a dynamic batch')
    parser.add_argument('--optimize', choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER,
                        help='graph optimizer on the written graph: onnxslim (default), onnxruntime\'s basic offline '
                             'optimizer, or none')
    parser.add_argument('--int8', nargs='?', const='default', choices=['default', 'static', 'dynamic', 'both'],
                        help='also write OUT.int8.onnx (onnxruntime quantization; default mode: dynamic; static: QDQ '
                             'calibrated on real images; both: OUT.int8-static.onnx and OUT.int8-dynamic.onnx)')
    parser.add_argument('--fp16', action='store_true', help='also write OUT.fp16.onnx')
    parser.add_argument('--images', help='folder of images for calibration and agreement (default: scikit-image\'s '
                                         'bundled photographs)')
    parser.add_argument('--force', action='store_true', help='overwrite existing files')
    parser.add_argument('--checkpoint', help='local weight file; random weights if omitted')
    parser.add_argument('--model-kwargs', nargs='+', metavar='KWARGS',
                        help='model constructor arguments: one JSON object or key=value pairs')
    return parser


def _print_manifest(manifest: dict[str, Any]) -> None:
    for name, path in manifest['files'].items():
        print(f"wrote {path} ({name}, {Path(path).stat().st_size / 2 ** 20:.1f} MB)")
    for batch_size, diff in manifest['parity'].items():
        status = 'ok' if diff <= PARITY_TOL else f'FAIL (> {PARITY_TOL:g})'
        print(f"parity batch {batch_size}: max abs diff {diff:.3g} {status}")
    for name, a in manifest['agreement'].items():
        if a is None:
            print(f"{name}: written and checked (several outputs: no agreement figure)")
            continue
        print(f"{name} vs fp32: top-1 agreement {a['top1_agreement']:.1%}, mean logit cosine {a['mean_cosine']:.5f} "
              f"({a['num_images']} images: {a['images']}; weights: {a['weights']})")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit code (1 if a parity check failed)."""
    from tqdm import tqdm

    import tokenzoo
    from tokenzoo.export.deploy import DEFAULT_INT8, deployment_paths, export_deployment  # imports this module

    parser = _parser()
    args = parser.parse_args(argv)
    int8 = DEFAULT_INT8 if args.int8 == 'default' else args.int8
    # validate everything cheap before building or tracing anything
    with user_errors(parser):
        img_size = to_img_size(args.img_size[0] if len(args.img_size) == 1 else args.img_size)
        model_kwargs = parse_model_kwargs(args.model_kwargs)
        config = args.model.endswith('.py')
        pattern = not config and any(c in args.model for c in '*?[')
        if config and (args.checkpoint or model_kwargs):
            raise ValueError("a config builds its own backbone: --checkpoint and --model-kwargs are for model names "
                             "(set the config's init_cfg / model.backbone instead)")
        if config and not Path(args.model).is_file():
            raise FileNotFoundError(f"config {args.model} does not exist")
        if pattern:  # every registered tokenzoo model that matches, into the folder --out
            names = tokenzoo.list_models(args.model)
            if not names:
                raise ValueError(f"no tokenzoo model matches {args.model!r}; e.g. '*_small' or 'evit_*'")
            if args.checkpoint:
                raise ValueError("--checkpoint names one model's weights; export a pattern with random weights or one "
                                 "model at a time")
            if not Path(args.out).is_dir():
                raise NotADirectoryError(f"--out {args.out} must be an existing folder when MODEL is a pattern")
            outputs = {name: Path(args.out) / f'{name}.onnx' for name in names}
        else:
            if not config:
                validate_model_name(args.model)
            outputs = {args.model: Path(args.out)}
        _check_opset(args.opset)
        for out in outputs.values():
            for path in deployment_paths(out, int8, args.fp16).values():
                check_out_path(path, args.force)
        if args.images is not None and not Path(args.images).is_dir():
            raise FileNotFoundError(f"--images {args.images} is not a folder")
        if config:
            from tokenzoo.mm import build_backbone  # OpenMMLab: the mm extra

            model = build_backbone(args.model).eval()
            img_size = tuple(model.img_size)
        elif not pattern:
            model = build_model(args.model, img_size=img_size, checkpoint=args.checkpoint, **model_kwargs)
    weights = args.checkpoint or 'random (no --checkpoint)'
    failed = []
    for name, out in tqdm(outputs.items(), desc='models', unit='model', disable=len(outputs) == 1, file=sys.stderr):
        if pattern:
            model = build_model(name, img_size=img_size, **model_kwargs)
        print(f"exporting {name} ({img_size[0]}x{img_size[1]}, opset {args.opset}, "
              f"{'static [1, 3, H, W]' if args.static else 'dynamic batch'}, weights: {weights})", file=sys.stderr)
        manifest = export_deployment(model, out, img_size=img_size, static=args.static, optimize=args.optimize,
                                     int8=int8, fp16=args.fp16, weights=weights, calibration=args.images,
                                     images=args.images, opset=args.opset, force=args.force)
        _print_manifest(manifest)
        if not manifest['parity_ok']:
            failed.append(name)
    if failed:
        print(f"parity FAILED for {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
