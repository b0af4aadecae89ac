"""Makes ``tests/data/export_golden.npz``: whole-model outputs of the exported conversion-test
models in LiteRT (reference kernels and XNNPACK) and onnxruntime (QOperator and QDQ forms).

For each model of ``tests/test_export.py::CASES`` (MLP, 1-D CNN, 2-D CNN with uint8
activations, depthwise CNN, residual CNN, branches + concat + global mean) the program is
converted once (``build_program``), saved with ``jquant.convert.save`` in ``fp32`` mode (its
bytes are stored, so the check does not depend on rebuilding the same scales on another
machine), and for the fixed input (the test's 48 examples, as int8 codes) each runtime's output
is stored:

- ``NAME/program``: the program file's bytes (uint8);
- ``NAME/x``: int8 input codes;
- ``NAME/litert_ref``: LiteRT, reference kernels, of ``retarget(program, "litert_ref")``;
- ``NAME/xnnpack``: LiteRT, default XNNPACK delegate, of ``retarget(program, "xnnpack")``;
- ``NAME/onnxruntime_qoperator``, ``NAME/onnxruntime_qdq``: onnxruntime's CPU provider on
  ``onnx_model(retarget(program, "onnxruntime"), form=...)``;
- ``versions``: the runtimes' versions, as a string.

Run from the repository root (needs ai-edge-litert and onnxruntime):

    PYTHONPATH=$PWD:$PWD/tests python tests/data/make_export_golden.py
"""

from __future__ import annotations

import io
import pathlib
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests folder: test_export's models


def main() -> None:
    import ai_edge_litert
    import onnxruntime
    from test_export import CASES, build_program

    from jquant import convert as C
    from jquant.export import onnx_model, run_onnx, run_tflite, tflite_bytes

    arrays: dict[str, np.ndarray] = {}
    for name in sorted(CASES):
        program, x = build_program(name)
        program = C.retarget(program, "xnnpack")
        with tempfile.TemporaryDirectory() as tmp:
            path = pathlib.Path(tmp) / "program.safetensors"
            C.save(program, path)
            arrays[f"{name}/program"] = np.frombuffer(path.read_bytes(), np.uint8)
        xq = np.asarray(program.quantize_input(x))
        arrays[f"{name}/x"] = xq
        for target in ("litert_ref", "xnnpack"):
            data = tflite_bytes(C.retarget(program, target))
            arrays[f"{name}/{target}"] = run_tflite(data, xq, target=target)
        for form in ("qoperator", "qdq"):
            model = onnx_model(C.retarget(program, "onnxruntime"), form=form)
            arrays[f"{name}/onnxruntime_{form}"] = run_onnx(model, xq)
    arrays["versions"] = np.array(
        f"ai-edge-litert {ai_edge_litert.__version__}, onnxruntime {onnxruntime.__version__}"
    )
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    out = HERE / "export_golden.npz"
    out.write_bytes(buffer.getvalue())
    print(f"wrote {out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
