"""jquant's PTQ equals TensorFlow's TFLiteConverter on the seed's workflow, bit for bit.

``tests/data/mnist1d_cnn_tfliteconverter.tflite`` is TensorFlow's full-integer conversion of the
float MNIST-1D CNN in ``tests/data/mnist1d_cnn_float.npz`` with min/max calibration on its
representative examples (``tests/data/make_tflite_converter.py``; TensorFlow ran in a separate
environment). jquant converts the same float model with the same data, taking the logits'
range from the float model as TFLiteConverter does
(``output_qparams_from_data(..., output_range="float")``; the default reads the fake-quant
model). Then the weights, biases and activation quantizers equal the file's (one scale differs
in its last bits: float32 summation order in the calibration pass, see below), and LiteRT
running TensorFlow's file gives
exactly the program's codes on the stored test examples, in the reference kernels and in
XNNPACK.
"""

import hashlib
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tflite

from jquant import convert as C
from jquant.export import run_tflite
from jquant.formats import int8
from jquant.models.linen import make_model
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.quant import qparams_from_range

pytestmark = pytest.mark.slow  # calibrates and converts the MNIST-1D CNN (~20 s)

DATA = pathlib.Path(__file__).parent / "data"
LAYERS = ("conv1", "conv2", "dense1", "head")


@pytest.fixture(scope="module")
def files():
    f = dict(np.load(DATA / "mnist1d_cnn_float.npz"))
    return f, (DATA / "mnist1d_cnn_tfliteconverter.tflite").read_bytes()


@pytest.fixture(scope="module")
def program(files):
    f, _ = files
    x_rep = jnp.asarray(f["x_rep"])
    model = make_model("cnn", x_rep.shape[1:], 10)
    params = {L: {k: jnp.asarray(f[f"params/{L}/{k}"]) for k in ("kernel", "bias")} for L in LAYERS}
    variables = {"params": params}
    qmodel, _ = ql.quantize_model(model, QuantRule(".*"), x_rep[:2])
    v = qmodel.calibrate(qmodel.attach(variables, x_rep[:2]), [x_rep])
    # TFLiteConverter's rule: the float model's range (oracle: the float model applied)
    oqp = C.output_qparams_from_data(qmodel, v, [x_rep], output_range="float")
    logits = model.apply(variables, x_rep)
    want = qparams_from_range(jnp.min(logits), jnp.max(logits), int8)
    assert (float(oqp.scale), float(oqp.zero_point)) == (float(want.scale), float(want.zero_point))
    return C.convert(qmodel, v, x_rep[:1], output_qparams=oqp)


def test_the_files_are_the_documented_ones():
    readme = (DATA / "README.md").read_text()
    for name in ("mnist1d_cnn_float.npz", "mnist1d_cnn_tfliteconverter.tflite"):
        want = re.search(re.escape(name) + r".*?sha256 `([0-9a-f]{64})`", readme, re.S).group(1)
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == want, name


def _dense_input(f) -> np.ndarray:
    """The float model's input to ``dense1`` on ``x_rep`` (XLA, float32)."""
    model = make_model("cnn", f["x_rep"].shape[1:], 10)
    params = {L: {k: jnp.asarray(f[f"params/{L}/{k}"]) for k in ("kernel", "bias")} for L in LAYERS}
    found = []

    def grab(call, args, kwargs, context):
        if context.module.name == "dense1" and context.method_name == "__call__":
            found.append(np.asarray(args[0]))
        return call(*args, **kwargs)

    with nn.intercept_methods(grab):
        model.apply({"params": params}, jnp.asarray(f["x_rep"]))
    return found[0]


def _tensors(data: bytes) -> dict[str, tuple]:
    """name -> (scales, zero points, int data or None) of every quantized tensor of the file."""
    model = tflite.Model.GetRootAsModel(data, 0)
    g = model.Subgraphs(0)
    out = {}
    for i in range(g.TensorsLength()):
        t = g.Tensors(i)
        q = t.Quantization()
        if q is None or q.ScaleLength() == 0:
            continue
        buf = model.Buffers(t.Buffer()).DataAsNumpy()
        dtype = {tflite.TensorType.INT8: np.int8, tflite.TensorType.INT32: np.int32}.get(t.Type())
        values = None
        if isinstance(buf, np.ndarray) and buf.size and dtype is not None:
            values = buf.view(dtype).reshape(t.ShapeAsNumpy())
        out[t.Name().decode()] = (q.ScaleAsNumpy(), q.ZeroPointAsNumpy(), values)
    return out


def _tflite_float_dense(h: np.ndarray, kernel: np.ndarray, bias: np.ndarray, lanes=8):
    """``h @ kernel + bias`` summed as TFLite's float FULLY_CONNECTED (Eigen's row-major GEMV)
    sums it: one fused multiply-add accumulator per SIMD lane (term ``j`` into lane
    ``j mod lanes``), the lanes added pairwise (halves, then ``(a0 + a2) + (a1 + a3)``), then
    the bias. The fma is the float64 product (exact) plus the accumulator, rounded to float32."""
    acc = np.zeros((h.shape[0], lanes, kernel.shape[1]), np.float32)
    for j in range(0, kernel.shape[0], lanes):
        prod = h[:, j : j + lanes, None].astype(np.float64) * kernel[j : j + lanes][None]
        acc = (prod + acc).astype(np.float32)
    while acc.shape[1] > 4:
        acc = acc[:, : acc.shape[1] // 2] + acc[:, acc.shape[1] // 2 :]
    return ((acc[:, 0] + acc[:, 2]) + (acc[:, 1] + acc[:, 3])) + bias


def test_the_scales_weights_and_biases_equal_the_converters(files, program):
    """Weights, biases, the input's and the convs' output quantizers and the logits' are
    identical. The Dense output scale (the head's input range) differs in the last bits: its
    maximum comes from a 320-term float32 dot product, summed by XLA in jquant's calibration
    pass and by TFLite's float kernel in TensorFlow's (39.155000 against 39.155014, 4 ulp; the
    float64 sum is 39.155010). Summed in TFLite's order (``_tflite_float_dense``) from the
    same Dense input, the range gives the file's scale exactly."""
    f, data = files
    tensors = _tensors(data)
    act = {float(s[0]): int(z[0]) for s, z, v in tensors.values() if v is None and s.size == 1}
    assert act[float(program.input_scale)] == int(program.input_zp)
    for layer in program.layers:
        if not isinstance(layer, C.Conv | C.Dense):
            continue
        scale, zp = float(layer.out_scale), int(layer.out_zp)
        if layer.path == "dense1":
            (near,) = [s for s in act if s != scale and abs(s - scale) <= 1e-6 * scale]
            assert act[near] == zp
            h = _dense_input(f)
            y = _tflite_float_dense(h, f["params/dense1/kernel"], f["params/dense1/bias"])
            tflite_order = qparams_from_range(jnp.float32(0), jnp.float32(y.max()), int8)
            assert float(tflite_order.scale) == near != scale
        else:
            assert act.get(scale) == zp, layer.path
        w = np.moveaxis(np.asarray(layer.w), -1, 0).reshape(np.shape(layer.w)[-1], -1)
        file_w = [v.reshape(v.shape[0], -1) for s, z, v in tensors.values() if v is not None]
        assert any(x.shape == w.shape and np.array_equal(w, x) for x in file_w), layer.path
        assert any(np.array_equal(np.asarray(layer.b), v) for s, z, v in tensors.values()
                   if v is not None and v.dtype == np.int32), layer.path  # fmt: skip


@pytest.mark.parametrize("target", ["litert_ref", "xnnpack"])
def test_litert_runs_the_converters_file_as_the_program(files, program, target):
    f, data = files
    prog = C.retarget(program, target)
    xq = np.asarray(prog.quantize_input(f["x_test"]))
    want = np.asarray(jax.jit(C.run)(prog, xq))
    got = run_tflite(data, xq, target=target).reshape(want.shape)
    np.testing.assert_array_equal(got, want)
    assert np.mean(want.argmax(1) == f["y_test"]) > 0.85
