"""Export of integer programs to the runtimes people deploy to.

program = jquant.convert.convert(qmodel, variables, x[:1], output_qparams=qp)
jquant.export.to_tflite(program, "model.tflite")          # LiteRT: int8 in and out
jquant.export.to_tflite(program, "model.tflite", io="float")  # float32 in and out

Which rounding each runtime applies per op: :mod:`jquant.convert.targets`
(``retarget(program, "litert_ref" | "xnnpack")`` is the program that runtime computes).
"""

from jquant.export.tflite import IO_TYPES, tflite_bytes, to_tflite

__all__ = ["IO_TYPES", "tflite_bytes", "to_tflite"]
