"""What a mobile deployment would make of a graph: onnxruntime's mobile usability check, summarized.

onnxruntime ships ``python -m onnxruntime.tools.check_onnx_model_mobile_usability``, which optimizes a graph to the
basic level (as converting to the ORT format does), then checks which nodes the NNAPI execution provider (Android)
and the CoreML execution provider (iOS; its NeuralNetwork and MLProgram formats) can take, from the operator lists
onnxruntime keeps for them, and how the graph would be split into partitions between them and the CPU. It logs its
findings; ``mobile_usability`` runs the same checks through its Python functions and returns them as data: per
execution provider the share of nodes it takes, the number of partitions, the operators it would not take, and
onnxruntime's verdict (``YES``: should perform well as is, ``MAYBE``, ``NO``: use the CPU execution provider).
A graph with a dynamic batch axis is checked as is and as if its shapes were fixed (what a ``static=True`` export
gives): NNAPI takes no dynamic shapes.
"""
import logging
import os
import pathlib
import tempfile
from typing import Any

__all__ = ['EXECUTION_PROVIDERS', 'format_mobile_summary', 'mobile_usability']

EXECUTION_PROVIDERS = ('NNAPI', 'CoreML NeuralNetwork', 'CoreML MLProgram')


def _partitioning(model, ep: str, require_fixed: bool) -> Any:
    from onnxruntime.tools.mobile_helpers import usability_checker as checker

    if ep == 'NNAPI':
        return checker.check_nnapi_partitions(model, require_fixed_input_sizes=require_fixed)
    filename = 'coreml_supported_neuralnetwork_ops.md' if ep == 'CoreML NeuralNetwork' else \
        'coreml_supported_mlprogram_ops.md'
    return checker.check_coreml_partitions(model, require_fixed_input_sizes=require_fixed, config_filename=filename)


def mobile_usability(onnx_path: str | os.PathLike) -> dict[str, Any]:
    """onnxruntime's mobile usability check of an ONNX file, as data (see the module docstring).

    Args:
        onnx_path: The ONNX file (FP32 is what the mobile execution providers take; INT8 QDQ graphs are checked the
            same way).

    Returns:
        ``dynamic_input`` (whether the input has a symbolic dimension) and, per name of ``EXECUTION_PROVIDERS``:
        ``supported_nodes``, ``nodes``, ``partitions``, ``unsupported_ops`` (sorted op types), ``verdict``
        ('YES', 'MAYBE' or 'NO', for the graph as it is, or with its shapes fixed when that is better).
    """
    from onnxruntime.tools.mobile_helpers import usability_checker as checker
    from onnxruntime.tools.onnx_model_utils import ModelProtoWithShapeInfo, optimize_model

    logging.getLogger('onnxruntime').setLevel(logging.ERROR)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix='tokenzoo-mobile-') as tmp:
        optimized = pathlib.Path(tmp) / 'optimized.onnx'
        optimize_model(pathlib.Path(onnx_path), optimized, use_external_initializers=True)
        model = ModelProtoWithShapeInfo(optimized).model_with_shape_info
        dynamic_inputs, _ = checker.check_shapes(model.graph)
        result['dynamic_input'] = bool(dynamic_inputs)
        for ep in EXECUTION_PROVIDERS:
            info = _partitioning(model, ep, require_fixed=True)
            verdict = info.suitability()
            if dynamic_inputs and verdict != checker.PartitioningInfo.TryWithEP.YES:
                fixed_info = _partitioning(model, ep, require_fixed=False)  # as if the shapes were made fixed
                if fixed_info.suitability().value > verdict.value:
                    info, verdict = fixed_info, fixed_info.suitability()
            result[ep] = dict(
                supported_nodes=int(info.num_supported_nodes),
                nodes=int(info.num_nodes),
                partitions=int(info.num_partitions),
                unsupported_ops=sorted(op.split(":")[-1] for op in info.unsupported_ops),
                verdict=verdict.name,
            )
    return result


def format_mobile_summary(result: dict[str, Any]) -> str:
    """One line per execution provider: verdict, share of nodes taken, partitions, operators it would not take."""
    lines = []
    for ep in EXECUTION_PROVIDERS:
        r = result[ep]
        share = r['supported_nodes'] / max(r['nodes'], 1)
        ops = ', '.join(r['unsupported_ops']) or 'none'
        lines.append(f"{ep}: {r['verdict']}, {share:.0%} of {r['nodes']} nodes in {r['partitions']} partition(s); "
                     f"ops it does not take: {ops}")
    return '\n'.join(lines)
