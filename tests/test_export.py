"""jquant.export: the .tflite and ONNX files run in LiteRT and onnxruntime as the program does.

Oracles, independent of jquant: the LiteRT interpreter (``ai-edge-litert``) running the
exported .tflite with its reference kernels (``BUILTIN_REF``) and with its default XNNPACK
delegate, and onnxruntime's CPU provider running the ONNX models. Each runtime must give
exactly the program's codes once the program is retargeted to that runtime's per-op rounding
(``jquant.convert.retarget``: ``litert_ref`` rounds CONV_2D twice and FULLY_CONNECTED once;
XNNPACK and onnxruntime use the float32 multiplier), except onnxruntime's average pool, which
rounds its float mean half to even where TFLite rounds half away from zero.
"""

import flax.linen as nn
import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tflite
from test_convert import MODELS, X1D, X2D, _BranchGAP, _program_codes, _ResCNN, _setup

from jquant import convert as C
from jquant import integer as qi
from jquant.export import (
    TFLITE_TARGETS,
    onnx_model,
    run_onnx,
    run_tflite,
    tflite_bytes,
    to_onnx,
    to_tflite,
)
from jquant.nn import QuantRule


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
    "branch_gap": (_BranchGAP(), X2D, (QuantRule(".*"),)),  # CONCATENATION and MEAN
}
_MEASURED = ("residual", "branch_gap")  # values only adds / means read: ranges from data


def build_program(name: str):
    """``(program, x)`` of conversion-test model ``name`` (a key of ``CASES``); also used by
    ``tests/data/make_export_golden.py``."""
    model, x, rules = CASES[name]
    qmodel, v, oqp, _ = _setup(model, x, rules)
    rq = C.residual_qparams_from_data(qmodel, v, [x]) if name in _MEASURED else None
    return C.convert(qmodel, v, x[:1], output_qparams=oqp, residual_qparams=rq), x


@pytest.fixture(scope="module", params=sorted(CASES))
def program(request):
    return build_program(request.param)


@pytest.mark.parametrize("target", TFLITE_TARGETS)
def test_litert_equals_the_retargeted_program_bit_for_bit(program, target):
    program, x = program
    prog = C.retarget(program, target)
    want = _program_codes(prog, x)
    got = run_tflite(tflite_bytes(prog), np.asarray(prog.quantize_input(x)), target=target)
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
    assert kinds.count("MEAN") == sum(isinstance(s, C.Mean) for s in program.layers)
    assert kinds.count("CONCATENATION") == sum(isinstance(s, C.Concat) for s in program.layers)
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


def test_the_tflite_file_stores_each_thing_once(program):
    """No dead tensor, no RESHAPE of a RESHAPE, no shape tensor, no buffer twice; the
    per-channel zero points of equal width share one vector (the same offset)."""
    program, _ = program
    data = tflite_bytes(program)
    model = tflite.Model.GetRootAsModel(data, 0)
    graph = model.Subgraphs(0)
    ops = [graph.Operators(i) for i in range(graph.OperatorsLength())]
    read = {int(t) for op in ops for t in op.InputsAsNumpy()}
    edges = {*graph.InputsAsNumpy().tolist(), *graph.OutputsAsNumpy().tolist()}
    assert read | edges == set(range(graph.TensorsLength()))
    reshape = tflite.BuiltinOperator.RESHAPE
    code = lambda op: model.OperatorCodes(op.OpcodeIndex()).BuiltinCode()  # noqa: E731
    reshaped = {int(op.Outputs(0)) for op in ops if code(op) == reshape}
    for op in ops:
        if code(op) == reshape:
            assert op.InputsLength() == 1 and int(op.Inputs(0)) not in reshaped
    buffers = [model.Buffers(i).DataAsNumpy() for i in range(1, model.BuffersLength())]
    stored = [b.tobytes() for b in buffers if isinstance(b, np.ndarray)]
    assert len(set(stored)) == len(stored)
    zero_points = {}
    for i in range(graph.TensorsLength()):
        q = graph.Tensors(i).Quantization()
        if q is not None and q.ZeroPointLength() > 1:
            offset = q._tab.Vector(q._tab.Offset(10))  # where zero_point (field 3) starts
            zero_points.setdefault(q.ZeroPointLength(), set()).add(offset)
    assert all(len(offsets) == 1 for offsets in zero_points.values()), zero_points


def test_float_io_quantizes_and_dequantizes_at_the_edges(program):
    program, x = program
    prog = C.retarget(program, "litert_ref")
    got = run_tflite(tflite_bytes(prog, io="float"), np.asarray(x, np.float32), target="litert_ref")
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


# ------------------------------------------------------------------------------ ONNX


def _has_avg_pool(program) -> bool:
    """An average pool or a mean: onnxruntime rounds its own float formula there."""
    return any(
        isinstance(s, C.Mean) or (isinstance(s, C.Pool) and s.kind == "avg") for s in program.layers
    )


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_onnxruntime_equals_the_program(program, form):
    program, x = program
    prog = C.retarget(program, "onnxruntime")
    want = _program_codes(prog, x)
    model = onnx_model(prog, form=form)
    ops = {n.op_type for n in model.graph.node}
    assert ("QLinearConv" in ops) == (form == "qoperator")
    got = run_onnx(model, np.asarray(prog.quantize_input(x))).astype(np.int32).reshape(want.shape)
    if not _has_avg_pool(prog):
        np.testing.assert_array_equal(got, want)
    else:  # QLinearAveragePool / AveragePool / QLinearGlobalAveragePool / ReduceMean round
        # their own float mean (see below)
        assert np.abs(got - want).max() <= 1
        assert np.mean(got.argmax(-1) == want.argmax(-1)) >= 0.99


@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_the_onnx_file_stores_each_thing_once(program, form):
    """Every initializer read and none twice; no Reshape of a Reshape, no Transpose of a
    Transpose; QLinearConv's weight zero point is one scalar, DequantizeLinear's absent."""
    program, _ = program
    model = onnx_model(C.retarget(program, "onnxruntime"), form=form)
    nodes, inits = model.graph.node, model.graph.initializer
    read = {name for n in nodes for name in n.input}
    assert {t.name for t in inits} <= read
    values = [(t.data_type, tuple(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in inits]
    assert len(set(values)) == len(values)
    producer = {n.output[0]: n.op_type for n in nodes}
    for n in nodes:
        if n.op_type in ("Reshape", "Transpose"):
            assert producer.get(n.input[0]) != n.op_type, n
    shapes = {t.name: tuple(t.dims) for t in inits}
    for n in nodes:
        if n.op_type == "QLinearConv":
            assert shapes[n.input[5]] == ()
        if n.op_type == "DequantizeLinear" and n.input[0] in shapes:
            assert len(n.input) == 2


def test_onnxruntime_average_pool_rounds_the_float_mean_half_to_even(rng):
    """Where the ONNX program's codes differ: onnxruntime's QLinearAveragePool dequantizes,
    averages in float32 and requantizes half to even. With a power-of-two scale every float
    step is exact and it equals the mean of the codes rounded half to even (NumPy), where
    TFLite's integer average rounds it half away from zero. (Other scales add float32
    rounding near the ties.)"""
    x = rng.integers(-128, 128, (64, 6, 8, 8)).astype(np.int8)  # NCHW
    node = onnx.helper.make_node(
        "QLinearAveragePool", ["x", "s", "z", "s", "z"], ["y"], domain="com.microsoft",
        kernel_shape=[2, 2], strides=[2, 2], count_include_pad=0,
    )  # fmt: skip
    graph = onnx.helper.make_graph(
        [node], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.INT8, x.shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.INT8, None)],
        initializer=[onnx.numpy_helper.from_array(np.float32(0.0625), "s"),
                     onnx.numpy_helper.from_array(np.int8(3), "z")],
    )  # fmt: skip
    opsets = [onnx.helper.make_opsetid("", 13), onnx.helper.make_opsetid("com.microsoft", 1)]
    model = onnx.helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"x": x})[0]
    raw = x.astype(np.float64).reshape(64, 6, 4, 2, 4, 2).mean(axis=(3, 5))
    np.testing.assert_array_equal(got, np.rint(raw).astype(np.int8))
    tflite = qi.avg_pool(x.transpose(0, 2, 3, 1), (2, 2), (2, 2), "VALID").transpose(0, 3, 1, 2)
    away = np.sign(raw) * np.floor(np.abs(raw) + 0.5)
    np.testing.assert_array_equal(np.asarray(tflite), away.astype(np.int8))
    assert np.mean(np.asarray(tflite) != got) > 0.05  # the two runtimes differ at the ties


def test_onnx_files_pass_the_checker_and_refuse_what_they_cannot_express(program, tmp_path):
    program, _ = program
    for form in ("qoperator", "qdq"):
        n = to_onnx(program, tmp_path / f"{form}.onnx", form=form)
        onnx.checker.check_model(str(tmp_path / f"{form}.onnx"))
        assert n == (tmp_path / f"{form}.onnx").stat().st_size
    with pytest.raises(ValueError, match="form must be one of"):
        onnx_model(program, form="qlinear")
    with pytest.raises(ValueError, match="opset must be in"):
        onnx_model(program, opset=9)
    with pytest.raises(ValueError, match="does not exist"):
        to_onnx(program, tmp_path / "missing" / "m.onnx")


def test_onnx_refuses_a_narrow_clamp(tmp_path):
    model, x, rules = MODELS["cnn_bn_1d"]
    qmodel, v, oqp, _ = _setup(model, x, rules)
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp)
    with pytest.raises(ValueError, match=r"layer '.*': output clamp \(-8, 7\)"):
        to_onnx(program, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------- ONNX INT4 weights


@pytest.fixture(scope="module")
def int4_program():
    """The 1-D CNN with int8 weights in ``conv1`` and 4-bit weights in ``head`` (int8
    activations): the program stores the head's codes in int8, within [-8, 7]."""
    model, x, _ = MODELS["cnn_1d"]
    rules = (QuantRule("conv1"), QuantRule(".*", weight="int4"))
    qmodel, v, oqp, _ = _setup(model, x, rules)
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp)
    head = next(s for s in program.layers if s.path == "head")
    assert -8 <= int(np.min(head.w)) and int(np.max(head.w)) <= 7
    return C.retarget(program, "onnxruntime"), x


def _dq_weight_types(model: onnx.ModelProto) -> list[int]:
    """Element types of the weights (first input) of the per-axis DequantizeLinear nodes that
    feed a Conv, in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    producer = {n.output[0]: n for n in model.graph.node}
    types = []
    for n in model.graph.node:
        if n.op_type == "Conv":
            dq = producer[n.input[1]]
            assert dq.op_type == "DequantizeLinear"
            types.append(inits[dq.input[0]].data_type)
    return types


def test_onnx_int4_weights_where_the_program_has_them(int4_program, tmp_path):
    program, x = int4_program
    int4 = onnx_model(program, form="qdq", opset=21)  # weight_type="auto"
    int8 = onnx_model(program, form="qdq", opset=21, weight_type="int8")
    assert _dq_weight_types(int4) == [onnx.TensorProto.INT8, onnx.TensorProto.INT4]
    assert _dq_weight_types(int8) == [onnx.TensorProto.INT8, onnx.TensorProto.INT8]
    head_w = next(s.w for s in program.layers if s.path == "head")
    stored = [t for t in int4.graph.initializer if t.data_type == onnx.TensorProto.INT4]
    (w,) = [t for t in stored if t.dims[0] > 1 and len(t.dims) == 4]  # (out, in, 1, 1)
    codes = onnx.numpy_helper.to_array(w).astype(np.int8).reshape(w.dims[0], -1)
    np.testing.assert_array_equal(codes, np.asarray(head_w).T)
    path = tmp_path / "int4.onnx"
    to_onnx(program, path, form="qdq", opset=21)
    onnx.checker.check_model(str(path))
    assert path.stat().st_size < len(int8.SerializeToString())
    xq = np.asarray(program.quantize_input(x))
    got4, got8 = run_onnx(int4, xq), run_onnx(int8, xq)  # onnxruntime runs INT4 DQ
    np.testing.assert_array_equal(got4, got8)
    want = _program_codes(program, x)
    np.testing.assert_array_equal(got4.astype(np.int32).reshape(want.shape), want)


def test_onnx_int4_only_where_onnx_has_it(int4_program):
    int4_prog, _ = int4_program
    for form, opset in (("qoperator", 21), ("qdq", 13), ("qdq", 20)):
        model = onnx_model(int4_prog, form=form, opset=opset)
        assert all(t.data_type != onnx.TensorProto.INT4 for t in model.graph.initializer)
        with pytest.raises(ValueError, match="weight_type='int4' needs form='qdq' and opset 21"):
            onnx_model(int4_prog, form=form, opset=opset, weight_type="int4")
    with pytest.raises(ValueError, match=r"layer 'conv1': weight codes in \[-\d+, \d+\] do not"):
        onnx_model(int4_prog, form="qdq", weight_type="int4")
    with pytest.raises(ValueError, match="weight_type must be one of"):
        onnx_model(int4_prog, form="qdq", weight_type="int2")
