"""Running exported files in the runtimes they are for: LiteRT (.tflite) and onnxruntime (ONNX).

``run_tflite(data, x, target=...)`` runs a .tflite flatbuffer in LiteRT with the kernels of
``target`` (:data:`TFLITE_TARGETS`: ``"litert_ref"``, the reference kernels,
``experimental_op_resolver_type=BUILTIN_REF``; ``"xnnpack"``, LiteRT's default resolver with
the XNNPACK delegate); ``run_onnx(model, x)`` runs an ONNX model on onnxruntime's CPU provider.
Both resize the input to ``x``'s batch. The runtimes are imported when called (``ai-edge-litert``
and ``onnxruntime`` are in the ``test`` extra); a missing one raises ``ImportError`` naming the
package.
"""

from __future__ import annotations

import importlib

import numpy as np

__all__ = ["RUNTIME_PACKAGES", "TFLITE_TARGETS", "require", "run_onnx", "run_tflite"]

TFLITE_TARGETS = ("litert_ref", "xnnpack")
# import name -> the package that provides it
RUNTIME_PACKAGES = {"ai_edge_litert.interpreter": "ai-edge-litert", "onnxruntime": "onnxruntime"}


def require(module: str):
    """Imports runtime ``module`` (a key of :data:`RUNTIME_PACKAGES`).

    Raises:
      ImportError: it is not installed (the message names the package to install).
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        package = RUNTIME_PACKAGES.get(module, module)
        raise ImportError(
            f"{module} is not installed: pip install {package} (or jquant[test])"
        ) from None


def run_tflite(data: bytes, x: np.ndarray, *, target: str = "xnnpack") -> np.ndarray:
    """The output of the .tflite flatbuffer ``data`` on input ``x`` in LiteRT.

    Args:
      data: the file's bytes (:func:`jquant.export.tflite_bytes`).
      x: the input, of the model's input dtype (int8 codes, or float32 with ``io="float"``).
      target: ``"litert_ref"`` (reference kernels) or ``"xnnpack"`` (the default delegate).

    Raises:
      ValueError: ``target`` unknown. ImportError: ``ai-edge-litert`` is missing.
    """
    if target not in TFLITE_TARGETS:
        raise ValueError(f"target must be one of {TFLITE_TARGETS}, got {target!r}")
    litert = require("ai_edge_litert.interpreter")
    resolver = {
        "litert_ref": litert.OpResolverType.BUILTIN_REF,
        "xnnpack": litert.OpResolverType.AUTO,
    }[target]
    interp = litert.Interpreter(model_content=bytes(data), experimental_op_resolver_type=resolver)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], np.asarray(x))
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    """The output of ONNX ``model`` (a ``ModelProto`` or its bytes) on input ``x`` (fed to
    the graph input ``"input"``) in onnxruntime's CPU provider.

    Raises:
      ImportError: ``onnxruntime`` is missing.
    """
    ort = require("onnxruntime")
    data = model if isinstance(model, bytes) else model.SerializeToString()
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": np.asarray(x)})[0]
