"""INT8 and FP16 variants of an exported FP32 graph, with onnxruntime's own tools.

* **INT8 static** (``mode='static'``): QDQ format, weights int8 per channel, activations int8, both symmetric
  (S8S8, onnxruntime's recommended CPU setting), activation ranges calibrated on real images (min/max over the
  calibration set; scikit-image's photographs by default, see ``tokenzoo.export.images``). Asymmetric uint8
  activations (U8S8) measured far worse here (ToMe-Ti at 96 px, random weights: mean logit cosine with FP32 0.78,
  against 0.999 for S8S8; the cause was not investigated). Only the linear layers are quantized (``MatMul`` with a
  constant weight, ``Gemm``, ``Conv``: the projections and MLPs, nearly all of a ViT's multiply-adds); the
  attention products themselves (q k^T, softmax x v) stay float32. Token reduction decides on those attention scores
  (EViT's CLS attention, MCTF's informativeness, Sparsifiner's connectivity; ToMe's keys feed a cosine similarity),
  so keeping them in float keeps more of the FP32 model's decisions.
* **INT8 dynamic** (``mode='dynamic'``, the default): weights int8 per channel, activations quantized per run from
  their own range (``quantize_dynamic``); no calibration, nothing to go stale when the input distribution moves. It
  agreed with FP32 better than static QDQ on every trained model measured and ran faster on most graphs (see
  ``tokenzoo.export.deploy``).
* **FP16** (``to_fp16``): onnxruntime's float16 converter, float32 inputs and outputs kept (``keep_io_types``).
  Op types the CPU execution provider has no float16 kernel for (e.g. ``ScatterElements`` with add reduction, the
  merging families' sums) are found by opening a session and running it once, and kept in float32.

Both INT8 modes first run ``quant_pre_process`` (symbolic shape inference and ONNX shape inference; its optimization
step is skipped, see ``quantize_int8``), which works on every family's graph since
``tokenzoo.export.graph.make_tooling_friendly``.
Every writer goes through ``atomic_output``: an interrupted run leaves no half-written file.
"""
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import onnxruntime as ort

from tokenzoo.export.images import ImageSet
from tokenzoo.export.onnx_export import atomic_output, is_static

__all__ = ['INT8_MODES', 'QUANTIZED_OPS', 'quantize_int8', 'to_fp16']

INT8_MODES = ('static', 'dynamic')
QUANTIZED_OPS = ('MatMul', 'Gemm', 'Conv')
_MAX_FP16_RETRIES = 20


class _Calibration:
    """onnxruntime's CalibrationDataReader protocol over an ImageSet (batches the graph accepts)."""

    def __init__(self, input_name: str, images: ImageSet, batch_size: int) -> None:
        self._batches = iter([{input_name: batch.numpy().astype(np.float32)} for batch in images.batches(batch_size)])

    def get_next(self) -> dict | None:
        return next(self._batches, None)

    def rewind(self) -> None:  # the MinMax calibrator reads the data once
        pass


def _quiet_quantization_logs() -> None:
    # the tools warn about pre-processing on every call even after it ran ("Please consider to run pre-processing")
    logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))


def _vector_weight_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose constant operand B is not a matrix (e.g. Sparsifiner's reassociated bias product,
    keys @ bias): per-channel quantization needs a 2-D weight (onnxruntime rejects the zero point of a 1-D one at
    run time), and a matrix-vector product is no cost worth quantizing."""
    initializers = {init.name: init for init in model.graph.initializer}
    return [node.name for node in model.graph.node if node.op_type == 'MatMul' and len(node.input) > 1 and
            node.input[1] in initializers and len(initializers[node.input[1]].dims) != 2]


def quantize_int8(
        src: str | os.PathLike,
        dst: str | os.PathLike,
        mode: str = 'dynamic',
        calibration: ImageSet | None = None,
        force: bool = False,
) -> Path:
    """Write an INT8 version of the FP32 ONNX file ``src`` to ``dst`` (see the module docstring).

    Args:
        src: The FP32 graph (``export_onnx``'s output).
        dst: The file to write.
        mode: 'dynamic' (the default: see ``tokenzoo.export.deploy.DEFAULT_INT8``) or 'static' (QDQ, calibrated).
        calibration: Real images for the static mode's activation ranges (required there, unused otherwise).
        force: Overwrite ``dst``.

    Returns:
        ``dst`` as a Path.

    Raises:
        ValueError: On an unknown mode or a static mode without calibration images.
        FileExistsError: If ``dst`` exists and ``force`` is False.
    """
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in INT8_MODES:
        raise ValueError(f"INT8 mode {mode!r} is not known; allowed: {', '.join(INT8_MODES)}")
    if mode == 'static' and (calibration is None or not calibration.images):
        raise ValueError("static INT8 quantization needs calibration images (an ImageSet of real images)")
    _quiet_quantization_logs()
    with atomic_output(dst, force) as tmp_path, tempfile.TemporaryDirectory(prefix='tokenzoo-quant-') as scratch:
        prepared = Path(scratch) / 'prepared.onnx'
        # no onnxruntime optimization here: on static graphs it fuses MatMul + Add into Gemm even when the addend
        # is an activation (the residual), which the QDQ quantizer then takes for a constant bias (it writes a second
        # producer of that tensor), and the dynamic quantizer leaves Gemm in float; the session fuses at load anyway
        quant_pre_process(str(src), str(prepared), skip_optimization=True)
        graph = onnx.load(str(prepared))
        excluded = _vector_weight_matmuls(graph)
        if mode == 'dynamic':
            quantize_dynamic(str(prepared), str(tmp_path), weight_type=QuantType.QInt8, per_channel=True,
                             nodes_to_exclude=excluded)
        else:
            reader = _Calibration(graph.graph.input[0].name, calibration, 1 if is_static(prepared) else 16)
            quantize_static(str(prepared), str(tmp_path), reader, quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax, op_types_to_quantize=list(QUANTIZED_OPS),
                            nodes_to_exclude=excluded,
                            extra_options=dict(MatMulConstBOnly=True, WeightSymmetric=True, ActivationSymmetric=True))
        onnx.checker.check_model(str(tmp_path), full_check=True)
    return Path(dst)


def _unsupported_fp16_node(error: Exception) -> str | None:
    """The node named in onnxruntime's "no float16 kernel" errors (at session creation or at run time), or None."""
    message = str(error)
    match = (re.search(r"Could not find an implementation for \w+\(\d+\) node with name '([^']*)'", message) or
             re.search(r"running \w+ node\. Name:'([^']*)' Status Message: .*(MLFloat16|float16|not supported)",
                       message))
    return match.group(1) if match else None


def _drop_repeated_casts(model: onnx.ModelProto) -> None:
    """Keep one of several identical nodes writing the same value, and make node names unique.

    The float16 converter names the cast it inserts after the value it casts: a value cast back to float32 for two
    blocked consumers gets two identical ``Cast`` nodes writing one name, which onnxruntime refuses (SSA). They
    compute the same thing, so one is enough; any other clash is an error.
    """
    producers: dict[str, onnx.NodeProto] = {}
    nodes, names = [], set()
    for node in model.graph.node:
        clash = [producers[out] for out in node.output if out in producers]
        if clash:
            if len(clash) == len(node.output) and all(
                    (c.op_type, list(c.input), list(c.output), list(c.attribute)) ==
                    (node.op_type, list(node.input), list(node.output), list(node.attribute)) for c in clash):
                continue
            raise ValueError(f"float16 conversion: node {node.name!r} writes {list(node.output)}, already written")
        producers.update({out: node for out in node.output})
        while node.name in names:
            node.name = f'{node.name}_'
        names.add(node.name)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _smoke_run(path: Path) -> None:
    """Open a session and run it once on zeros (some kernels refuse float16 only when they run)."""
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the failure is expected and handled: no error lines on the console
    session = ort.InferenceSession(str(path), sess_options=options, providers=['CPUExecutionProvider'])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    session.run(None, {inp.name: np.zeros(shape, dtype=np.float32)})


def to_fp16(src: str | os.PathLike, dst: str | os.PathLike, force: bool = False,
            keep_float32: Sequence[str] = ()) -> Path:
    """Write a float16 version of the FP32 ONNX file ``src`` to ``dst``; inputs and outputs stay float32.

    Args:
        src: The FP32 graph.
        dst: The file to write.
        force: Overwrite ``dst``.
        keep_float32: Op types to keep in float32 besides the converter's default list and the ops the CPU
            execution provider cannot run in float16 (found automatically).

    Returns:
        ``dst`` as a Path.
    """
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    _quiet_quantization_logs()
    op_types = {node.name: node.op_type for node in onnx.load(str(src), load_external_data=False).graph.node}
    blocked = [*DEFAULT_OP_BLOCK_LIST, *keep_float32]
    with atomic_output(dst, force) as tmp_path:
        for _ in range(_MAX_FP16_RETRIES):
            # loaded each time: the converter edits its input in place
            model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True, op_block_list=blocked)
            OnnxModel(model).topological_sort()  # the converter appends the input casts after their users
            _drop_repeated_casts(model)
            onnx.save(model, str(tmp_path))
            try:
                _smoke_run(tmp_path)
                break
            except Exception as e:  # onnxruntime raises its own exception types
                op_type = op_types.get(_unsupported_fp16_node(e))
                if op_type is None or op_type in blocked:
                    raise
                blocked.append(op_type)  # every node of that type: one retry per op type, not per node
        else:
            raise RuntimeError(f"float16 conversion of {src}: more than {_MAX_FP16_RETRIES} op types lack a float16 "
                               f"kernel")
        onnx.checker.check_model(str(tmp_path), full_check=True)
    return Path(dst)
