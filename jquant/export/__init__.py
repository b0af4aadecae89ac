"""Export of integer programs to the runtimes people deploy to.

program = jquant.convert.convert(qmodel, variables, x[:1], output_qparams=qp)
jquant.export.to_tflite(program, "model.tflite")          # LiteRT: int8 in and out
jquant.export.to_tflite(program, "model.tflite", io="float")  # float32 in and out
jquant.export.to_onnx(program, "model.onnx")              # QLinearConv, QLinearAdd, ...
jquant.export.to_onnx(program, "model.onnx", form="qdq")  # float ops between Q / DQ

Which rounding each runtime applies per op: :mod:`jquant.convert.targets`
(``retarget(program, "litert_ref" | "xnnpack")`` is the program that runtime computes).
``run_tflite(data, x, target="litert_ref" | "xnnpack")`` and ``run_onnx(model, x)`` run the
files in LiteRT and onnxruntime.
"""

from jquant.export.onnx import ONNX_FORMS, onnx_model, to_onnx
from jquant.export.runtimes import TFLITE_TARGETS, run_onnx, run_tflite, tflite_runner
from jquant.export.tflite import IO_TYPES, tflite_bytes, to_tflite

__all__ = [
    "IO_TYPES",
    "ONNX_FORMS",
    "TFLITE_TARGETS",
    "onnx_model",
    "run_onnx",
    "run_tflite",
    "tflite_bytes",
    "tflite_runner",
    "to_onnx",
    "to_tflite",
]
