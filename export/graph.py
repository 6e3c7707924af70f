"""Passes on a written ONNX graph: what every export gets (tooling-friendly form) and the optional optimizers.

Why the tooling-friendly form (found on the ToMe and MCTF graphs, and by the quantization of every family):

* torch's dynamo exporter records a ``value_info`` entry for every initializer. Those entries duplicate the
  initializers' own shapes and go stale as soon as a tool rewrites a weight: onnxruntime's ``quantize_dynamic``
  turns the classifier's ``Gemm(transB=1)`` into a ``MatMul`` by transposing the weight in place, and the next shape
  inference then stops on the stale entry ("Inferred shape and existing shape differ in dimension 0: (384) vs
  (1000)"). Whether the head stays a ``Gemm`` depends on the exporter's own clean-up (a zero bias is dropped), so the
  failure came and went with the weights. ``strip_initializer_value_info`` removes those entries.
* onnxruntime's symbolic shape inference (the first step of ``quant_pre_process``) knows the opset-18 form of only
  ``ReduceSum``, ``ReduceMean`` and ``ReduceProd`` (axes as an input); for ``ReduceMax``, ``ReduceMin``, ``ReduceL2``,
  ``ReduceL1`` and ``ReduceSumSquare`` it runs ONNX's single-node inference without the axes' values, loses the
  output rank and fails on the next elementwise op ("object of type 'NoneType' has no len()"). Token merging uses
  them (cosine similarity: ``ReduceL2``; matching: ``ReduceMax``). ``rewrite_reductions`` replaces each by
  equivalents that every tool knows: ``ReduceMax`` / ``ReduceMin`` over one axis by ``ArgMax`` / ``ArgMin`` and a
  ``GatherElements`` of that element (the same value, bit for bit), ``ReduceL2`` by ``Sqrt(ReduceSum(x * x))``,
  ``ReduceSumSquare`` and ``ReduceL1`` by ``ReduceSum`` of ``x * x`` and ``Abs(x)`` (the same sums, in onnxruntime's
  ``ReduceSum`` order: equal to ~1e-7 relative; parity with PyTorch is checked on every export).

Optimizers (``optimize_graph``): ``onnxslim`` (constant folding, dead-node and duplicate elimination, shape-op
simplification; a portable ONNX graph) or onnxruntime's offline optimizer at its basic level (constant folding and
redundant-node elimination with standard ops only; the extended level writes onnxruntime-only fused ops, which
mobile runtimes and other tools cannot read, and onnxruntime applies them at session start anyway).
``DEFAULT_OPTIMIZER`` is onnxslim: measured side by side in one process (``tools/compare_graph_optimizers.py``,
EViT/ToMe/MCTF/LookupViT-S at 224, 1 thread, batch 1, 20 interleaved runs, a busy 2-core machine: approximate), it
removes 15-17% of the nodes of a dynamic-batch graph (the batch-size arithmetic) for a p50 of 0.95-1.00x the
unoptimized graph's, where onnxruntime's offline optimizer gives 0.99-1.03x and adds nodes; on static graphs neither
changes the latency beyond the noise (onnxruntime folds the same shape arithmetic when it loads a graph).
"""
import os
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ['DEFAULT_OPTIMIZER', 'OPTIMIZERS', 'make_tooling_friendly', 'optimize_graph', 'rewrite_reductions',
           'strip_initializer_value_info']

OPTIMIZERS = ('none', 'onnxslim', 'ort')
DEFAULT_OPTIMIZER = 'onnxslim'


def strip_initializer_value_info(model: onnx.ModelProto) -> int:
    """Remove ``value_info`` entries that name initializers (see the module docstring); returns how many."""
    initializers = {init.name for init in model.graph.initializer}
    keep = [vi for vi in model.graph.value_info if vi.name not in initializers]
    removed = len(model.graph.value_info) - len(keep)
    del model.graph.value_info[:]
    model.graph.value_info.extend(keep)
    return removed


def _constant_ints(name: str, initializers: dict, producers: dict) -> Optional[list]:
    """The values of a constant int tensor (initializer or ``Constant`` node output), or None if not constant."""
    if name in initializers:
        return np.asarray(numpy_helper.to_array(initializers[name])).reshape(-1).tolist()
    node = producers.get(name)
    if node is not None and node.op_type == 'Constant' and node.attribute and node.attribute[0].name == 'value':
        return np.asarray(numpy_helper.to_array(node.attribute[0].t)).reshape(-1).tolist()
    return None


def _reduction_replacement(node: onnx.NodeProto, axes: Optional[list]) -> Optional[list]:
    """Nodes computing what the reduction ``node`` computes with ops symbolic shape inference knows, or None."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    keepdims = attrs.get('keepdims', 1)
    (x, *_), (y,) = node.input, node.output
    prefix = node.name or y
    if node.op_type in ('ReduceMax', 'ReduceMin'):
        if axes is None or len(axes) != 1:
            return None
        arg = 'ArgMax' if node.op_type == 'ReduceMax' else 'ArgMin'
        index, kept = f'{prefix}/index', (y if keepdims else f'{prefix}/kept')
        nodes = [helper.make_node(arg, [x], [index], name=f'{prefix}/{arg}', axis=axes[0], keepdims=1),
                 helper.make_node('GatherElements', [x, index], [kept], name=f'{prefix}/GatherElements',
                                  axis=axes[0])]
        if not keepdims:
            nodes.append(helper.make_node('Squeeze', [kept, node.input[1]], [y], name=f'{prefix}/Squeeze'))
        return nodes
    elementwise = f'{prefix}/elementwise'
    first = (helper.make_node('Abs', [x], [elementwise], name=f'{prefix}/Abs') if node.op_type == 'ReduceL1' else
             helper.make_node('Mul', [x, x], [elementwise], name=f'{prefix}/Square'))
    summed = f'{prefix}/sum' if node.op_type == 'ReduceL2' else y
    nodes = [first, helper.make_node('ReduceSum', [elementwise, *node.input[1:]], [summed], name=f'{prefix}/ReduceSum',
                                     keepdims=keepdims,
                                     noop_with_empty_axes=attrs.get('noop_with_empty_axes', 0))]
    if node.op_type == 'ReduceL2':
        nodes.append(helper.make_node('Sqrt', [summed], [y], name=f'{prefix}/Sqrt'))
    return nodes


def rewrite_reductions(model: onnx.ModelProto) -> int:
    """Replace the opset-18 reductions onnxruntime's symbolic shape inference cannot follow (module docstring).

    Only reductions whose axes come as an input (opset >= 18) are touched; one over several axes stays a
    ``ReduceMax``/``ReduceMin`` (there is no single-op equivalent). Returns how many nodes were replaced.
    """
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    nodes, replaced = [], 0
    for node in graph.node:
        replacement = None
        if node.op_type in ('ReduceMax', 'ReduceMin', 'ReduceL2', 'ReduceL1', 'ReduceSumSquare') and \
                len(node.input) > 1 and node.input[1] and node.domain in ('', 'ai.onnx'):
            replacement = _reduction_replacement(node, _constant_ints(node.input[1], initializers, producers))
        if replacement is None:
            nodes.append(node)
        else:
            nodes.extend(replacement)
            replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return replaced


def make_tooling_friendly(model: onnx.ModelProto) -> onnx.ModelProto:
    """Apply both passes of the module docstring in place and return the model."""
    strip_initializer_value_info(model)
    rewrite_reductions(model)
    return model


def optimize_graph(src: str | os.PathLike, dst: str | os.PathLike, method: str) -> Path:
    """Optimize the ONNX file ``src`` into ``dst`` (may be the same path) with ``method``, one of ``OPTIMIZERS``.

    Args:
        src: The ONNX file.
        dst: Where to write the result.
        method: 'onnxslim', 'ort' (onnxruntime's basic offline optimization) or 'none' (a copy).

    Returns:
        ``dst`` as a Path.

    Raises:
        ValueError: On an unknown method.
    """
    if method not in OPTIMIZERS:
        raise ValueError(f"optimizer {method!r} is not known; allowed: {', '.join(OPTIMIZERS)}")
    src, dst = Path(src), Path(dst)
    if method == 'onnxslim':
        import onnxslim  # the export extra

        model = onnxslim.slim(str(src))
    elif method == 'ort':
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        scratch = dst.with_name(f'.{dst.name}.ort-optimized')
        options.optimized_model_filepath = str(scratch)
        try:
            ort.InferenceSession(str(src), sess_options=options, providers=['CPUExecutionProvider'])
            model = onnx.load(str(scratch))
        finally:
            scratch.unlink(missing_ok=True)
    else:
        model = onnx.load(str(src))
    # the optimizers re-infer shapes (and may record initializers again): keep the file tooling-friendly
    make_tooling_friendly(model)
    onnx.save(model, str(dst))
    return dst
