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
from collections.abc import Callable

import numpy as np

__all__ = [
    "RUNTIME_PACKAGES",
    "TFLITE_TARGETS",
    "require",
    "run_onnx",
    "run_tflite",
    "tflite_runner",
]

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


def tflite_runner(
    data: bytes, shape, dtype, *, target: str = "xnnpack", num_threads: int | None = None
) -> Callable[[np.ndarray], np.ndarray]:
    """A LiteRT interpreter of the .tflite flatbuffer ``data``, its input resized to ``shape``
    and its tensors allocated once, as a function ``x -> output`` (a copy).

    Args:
      data: the file's bytes (:func:`jquant.export.tflite_bytes`).
      shape, dtype: the input's shape (the batch included) and dtype (int8 codes, or float32
        with ``io="float"``).
      target: ``"litert_ref"`` (reference kernels) or ``"xnnpack"`` (the default delegate).
      num_threads: LiteRT's ``num_threads`` (None: its default).

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
    interp = litert.Interpreter(
        model_content=bytes(data), experimental_op_resolver_type=resolver, num_threads=num_threads
    )
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    interp.resize_tensor_input(inp, list(shape))
    interp.allocate_tensors()

    def run(x: np.ndarray) -> np.ndarray:
        interp.set_tensor(inp, np.asarray(x, dtype))
        interp.invoke()
        return interp.get_tensor(out)

    return run


def run_tflite(data: bytes, x: np.ndarray, *, target: str = "xnnpack") -> np.ndarray:
    """The output of the .tflite flatbuffer ``data`` on input ``x`` in LiteRT
    (:func:`tflite_runner` for ``x``'s shape and dtype).

    Raises:
      ValueError: ``target`` unknown. ImportError: ``ai-edge-litert`` is missing.
    """
    x = np.asarray(x)
    return tflite_runner(data, x.shape, x.dtype, target=target)(x)


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
