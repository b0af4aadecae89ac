"""jquant.export.to_tflite: the .tflite file runs in LiteRT and equals the program bit for bit.

Oracle: the LiteRT interpreter (``ai-edge-litert``), independent of jquant, running the
exported file with its reference kernels (``BUILTIN_REF``) and with its default XNNPACK
delegate. Each runtime must give exactly the program's codes once the program is retargeted
to that runtime's per-op rounding (``jquant.convert.retarget``: ``litert_ref`` rounds CONV_2D
twice and FULLY_CONNECTED once; XNNPACK uses the float32 multiplier everywhere).
"""

import flax.linen as nn
import jax
import numpy as np
import pytest
import tflite
from ai_edge_litert import interpreter as litert
from test_convert import MODELS, X1D, X2D, _program_codes, _ResCNN, _setup

from jquant import convert as C
from jquant.export import tflite_bytes, to_tflite
from jquant.nn import QuantRule

RUNTIMES = {
    "litert_ref": litert.OpResolverType.BUILTIN_REF,
    "xnnpack": litert.OpResolverType.AUTO,
}


def _litert(data: bytes, x: np.ndarray, resolver) -> np.ndarray:
    interp = litert.Interpreter(model_content=data, experimental_op_resolver_type=resolver)
    inp = interp.get_input_details()[0]
    interp.resize_tensor_input(inp["index"], list(x.shape))
    interp.allocate_tensors()
    interp.set_tensor(inp["index"], x)
    interp.invoke()
    return interp.get_tensor(interp.get_output_details()[0]["index"])


class _Depthwise(nn.Module):
    """conv -> depthwise conv (multiplier 2, SAME, stride 2) -> avg pool -> dense (plain Flax)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv1")(x))
        h = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=4, name="dw")(h))
        h = nn.avg_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))


CASES = {
    "cnn_1d": MODELS["cnn_1d"],
    "cnn_2d": MODELS["cnn_2d"],
    "mlp": MODELS["mlp"],
    "depthwise": (_Depthwise(), X2D, (QuantRule(".*"),)),
    "residual": (_ResCNN(), X1D, (QuantRule(".*"),)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def program(request):
    model, x, rules = CASES[request.param]
    qmodel, v, oqp, _ = _setup(model, x, rules)
    rq = C.residual_qparams_from_data(qmodel, v, [x]) if request.param == "residual" else None
    return C.convert(qmodel, v, x[:1], output_qparams=oqp, residual_qparams=rq), x


@pytest.mark.parametrize("target", sorted(RUNTIMES))
def test_litert_equals_the_retargeted_program_bit_for_bit(program, target):
    program, x = program
    prog = C.retarget(program, target)
    want = _program_codes(prog, x)
    got = _litert(tflite_bytes(prog), np.asarray(prog.quantize_input(x)), RUNTIMES[target])
    np.testing.assert_array_equal(got.astype(np.int32).reshape(want.shape), want)


def test_the_ops_and_quantization_in_the_file(program):
    program, _ = program
    model = tflite.Model.GetRootAsModel(tflite_bytes(program), 0)
    graph = model.Subgraphs(0)
    names = {v: k for k, v in vars(tflite.BuiltinOperator).items() if not k.startswith("_")}
    kinds = [
        names[model.OperatorCodes(graph.Operators(i).OpcodeIndex()).BuiltinCode()]
        for i in range(graph.OperatorsLength())
    ]
    linear = [k for k in kinds if k in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert len(linear) == sum(isinstance(s, C.Conv | C.Dense) for s in program.layers)
    assert kinds.count("ADD") == sum(isinstance(s, C.Add) for s in program.layers)
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        kind = kinds[i]
        if kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        w, b = graph.Tensors(op.Inputs(1)), graph.Tensors(op.Inputs(2))
        assert w.Type() == tflite.TensorType.INT8 and b.Type() == tflite.TensorType.INT32
        out_channels = w.ShapeAsNumpy()[3 if kind == "DEPTHWISE_CONV_2D" else 0]
        q = w.Quantization()
        assert q.ScaleLength() == out_channels and not np.any(q.ZeroPointAsNumpy())
        assert q.QuantizedDimension() == (3 if kind == "DEPTHWISE_CONV_2D" else 0)
        x_scale = graph.Tensors(op.Inputs(0)).Quantization().ScaleAsNumpy()[0]
        np.testing.assert_allclose(
            b.Quantization().ScaleAsNumpy(), x_scale * q.ScaleAsNumpy(), rtol=1e-6
        )


def test_float_io_quantizes_and_dequantizes_at_the_edges(program):
    program, x = program
    prog = C.retarget(program, "litert_ref")
    got = _litert(tflite_bytes(prog, io="float"), np.asarray(x, np.float32), RUNTIMES["litert_ref"])
    assert got.dtype == np.float32
    want = np.asarray(prog.dequantize_output(jax.jit(C.run)(prog, prog.quantize_input(x))))
    # the reference QUANTIZE rounds half away from zero, the program half to even: equal
    # except where an input sits exactly on a tie
    np.testing.assert_allclose(got.reshape(want.shape), want, atol=float(prog.output_scale))
    np.testing.assert_array_equal(got.reshape(want.shape).argmax(-1), want.argmax(-1))


def test_a_narrow_clamp_is_refused_naming_the_layer(tmp_path):
    model, x, rules = MODELS["cnn_bn_1d"]  # 4-bit inner activations: clamps narrower than int8
    qmodel, v, oqp, _ = _setup(model, x, rules)
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp)
    with pytest.raises(ValueError, match=r"layer '.*': output clamp \(-8, 7\)"):
        to_tflite(program, tmp_path / "m.tflite")
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_write_nothing(program, tmp_path):
    program, _ = program
    with pytest.raises(ValueError, match="io must be one of"):
        to_tflite(program, tmp_path / "m.tflite", io="int4")
    with pytest.raises(ValueError, match="does not exist"):
        to_tflite(program, tmp_path / "missing" / "m.tflite")
    assert list(tmp_path.iterdir()) == []
    n = to_tflite(program, tmp_path / "m.tflite")
    assert [p.name for p in tmp_path.iterdir()] == ["m.tflite"]
    assert n == (tmp_path / "m.tflite").stat().st_size


def test_retarget_rejects_unknown_targets(program):
    program, _ = program
    with pytest.raises(ValueError, match="target must be one of"):
        C.retarget(program, "tensorrt")
    with pytest.raises(ValueError, match="target kinds"):
        C.retarget(program, {"matmul": "double"})
