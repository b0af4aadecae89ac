"""Tests of jquant.convert: Flax model -> integer program, run, save / load, errors.

Main oracle: the fake-quant model (phase ``eval``) with its biases rounded to the program's
int32 grid (``with_quantized_bias``), its logits quantized with the program's output QParams,
equals the integer program bit for bit in the ``single`` and ``fp32`` requantization modes,
and within 1 LSB in ``double`` (gemmlowp rounds twice); ``simulation`` (the fake-quant model
with the program's requantization) equals it bit for bit in all three. The file format is
checked by parsing it by hand (safetensors layout); jaxprs show that ``run`` is integer-only.
"""

import dataclasses
import functools
import hashlib
import json
import pathlib
import struct
import tempfile

import flax.linen as nn
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant import convert as C
from jquant.formats import IntFormat, int8
from jquant.models.config import CNNConfig, MLPConfig
from jquant.models.linen import CNN, MLP
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.quant import QParams, qparams_from_range, quantize

RUN = jax.jit(C.run)


def _randomize_bn(variables, key):
    """Non-trivial BatchNorm statistics and affine parameters, one gamma negative, one zero."""
    variables = jax.tree.map(lambda a: a, variables)
    for name in [k for k in variables.get("batch_stats", {})]:
        key, k1, k2, k3, k4 = jax.random.split(key, 5)
        st, p = variables["batch_stats"][name], variables["params"][name]
        c = st["mean"].shape[0]
        st["mean"] = 0.3 * jax.random.normal(k1, (c,))
        st["var"] = jax.random.uniform(k2, (c,), minval=0.2, maxval=3.0)
        p["scale"] = jax.random.uniform(k3, (c,), minval=0.5, maxval=2.0).at[0].set(-1.3)
        p["scale"] = p["scale"].at[1].set(0.0)
        p["bias"] = 0.2 * jax.random.normal(k4, (c,))
    return variables


def _setup(model, x, rules, seed=0):
    """Calibrated quantized model, the fake-quant logits with int32-grid biases, and output
    QParams from their range: ``(qmodel, variables, output_qparams, expected codes)``."""
    qmodel, _ = ql.quantize_model(model, rules, x[:2])
    variables = jax.jit(qmodel.init)(jax.random.key(seed), x[:2])  # params, stats, observers
    variables = _randomize_bn(variables, jax.random.key(seed + 1))
    v = qmodel.calibrate(variables, [x[: len(x) // 2], x[len(x) // 2 :]])
    vb = C.with_quantized_bias(qmodel, v, x[:1])
    y = jax.jit(qmodel.with_phase("eval").apply)(vb, x)
    oqp = qparams_from_range(jnp.min(y), jnp.max(y), int8)
    want = np.asarray(quantize(y, oqp, int8)).astype(np.int32)
    return qmodel, v, oqp, want


def _program_codes(program, x):
    return np.asarray(RUN(program, program.quantize_input(x))).astype(np.int32)


X1D = jax.random.normal(jax.random.key(7), (48, 16, 1))
X2D = jax.random.normal(jax.random.key(8), (48, 8, 8, 1))
# (model, inputs, rules): 4-bit inner layers (narrow clamps) in the BN CNN, unsigned
# activations (shifted onto the int8 grid) in the 2-D CNN
MODELS = {
    "cnn_bn_1d": (
        CNN(CNNConfig(features=(8, 8), dense=(16,), batch_norm=True)),
        X1D,
        (QuantRule("conv1|head"), QuantRule(".*", weight=IntFormat(4), act=IntFormat(4))),
    ),
    "cnn_1d": (CNN(CNNConfig(features=(8,), dense=())), X1D, (QuantRule(".*"),)),
    "cnn_2d": (
        CNN(CNNConfig(features=(4, 6), kernel_size=(3, 3), dense=(8,))),
        X2D,
        (QuantRule(".*", act="uint8"),),
    ),
    "mlp": (MLP(MLPConfig(hidden=(16, 16))), X2D, (QuantRule(".*"),)),
}


_SLOW = pytest.mark.slow
# requantization modes checked per model in the default run (all three under -m slow)
# (double rounding moves near-ties by one code, which 4-bit layers amplify: no double there)
_MODES = {"cnn_bn_1d": ("single",), "cnn_2d": ("fp32", "double")}


@functools.cache
def _cached(name):
    return (name, MODELS[name][1], *_setup(*MODELS[name]))


@pytest.fixture(
    scope="module",
    params=[
        "cnn_bn_1d",
        "cnn_2d",
        pytest.param("mlp", marks=_SLOW),
        pytest.param("cnn_1d", marks=_SLOW),
    ],
)
def setup(request):
    return _cached(request.param)


def test_program_matches_fake_quant_model(setup):
    name, x, qmodel, v, oqp, want = setup
    assert want.shape == (len(x), 10) and len(np.unique(want)) > 20  # not saturated
    for mode in _MODES.get(name, ("single", "fp32", "double")):
        program = C.convert(qmodel, v, x[:1], output_qparams=oqp, mode=mode)
        assert program.input_shape == x.shape[1:]
        got = _program_codes(program, x)
        diff = np.abs(got - want)
        if mode == "double":  # gemmlowp rounds twice: near-ties move by one code, and the
            # difference can grow by a code per layer
            assert diff.max() <= 2
            assert np.mean(diff > 0) < 0.2
        else:
            np.testing.assert_array_equal(got, want, err_msg=mode)


def test_simulation_matches_program_bit_for_bit(setup):
    # the fake-quant model with the program's requantization (the accumulator recovered from
    # the float output) equals the program in every mode, double included; on the plain
    # variables: the recovered accumulator carries the rounded bias by itself
    name, x, qmodel, v, oqp, _ = setup
    for mode in _MODES.get(name, ("single", "fp32", "double")):
        program = C.convert(qmodel, v, x[:1], output_qparams=oqp, mode=mode)
        sim = jax.jit(C.simulation(qmodel, v, x[:1], output_qparams=oqp, mode=mode))(x)
        codes = np.asarray(quantize(sim, oqp, int8)).astype(np.int32)
        np.testing.assert_array_equal(codes, _program_codes(program, x), err_msg=mode)


def test_save_refuses_constants_that_do_not_follow_from_the_scales(small, tmp_path):
    *_, program = small
    i = next(i for i, layer in enumerate(program.layers) if hasattr(layer, "w"))
    layer = program.layers[i]
    rq = layer.requant
    bad_rq = type(rq)(np.asarray(rq.multiplier) - 1, rq.shift, rq.mode)
    layers = list(program.layers)
    layers[i] = dataclasses.replace(layer, requant=bad_rq)
    bad = dataclasses.replace(program, layers=tuple(layers))
    with pytest.raises(ValueError, match=rf"layer {layer.path!r}: requant.multiplier"):
        C.save(bad, tmp_path / "bad")


def test_program_structure_and_bn_folding(setup):
    name, x, qmodel, v, oqp, _ = setup
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp)
    kinds = [type(layer).__name__ for layer in program.layers]
    linear = [layer for layer in program.layers if isinstance(layer, C.Conv | C.Dense)]
    assert [layer.path for layer in linear] == [q.path for q in qmodel.quantized_layers(v)]
    assert kinds.count("Pool") == sum(isinstance(layer, C.Conv) for layer in linear)
    for layer in linear:
        assert layer.w.dtype == np.int8 and layer.b.dtype == np.int32
        assert np.abs(layer.w.astype(int)).max() <= 127  # symmetric narrow codes
        assert layer.w_scale.shape == (layer.w.shape[-1],)
        # activations after every hidden layer are relu-clamped; the head is not
        assert layer.activation == (None if layer.path == "head" else "relu")
    if name == "cnn_bn_1d":  # int4 inputs of conv2 and dense1: outputs clamp to [-8, 7]
        assert [layer.clamp for layer in linear] == [(-8, 7), (-8, 7), (-128, 127), (-128, 127)]
        assert np.abs(np.asarray(linear[1].w, int)).max() <= 7
        conv1 = linear[0]
        k = np.asarray(v["params"]["bn1"]["scale"])
        q = next(q for q in qmodel.quantized_layers(v) if q.path == "conv1")
        raw = np.asarray(quantize(q.kernel, q.kernel_qparams, int8)).astype(int)
        # negative gamma flips the codes of channel 0; zero gamma zeroes channel 1
        np.testing.assert_array_equal(conv1.w[0, :, :, 0], -raw[:, :, 0])
        assert not np.any(conv1.w[..., 1])
        np.testing.assert_array_equal(conv1.w[0, :, :, 2:], raw[:, :, 2:] * np.sign(k[2:]))


def test_accumulator_report_is_255_sum_abs_w_plus_abs_b(setup):
    _, x, qmodel, v, oqp, _ = setup
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp)
    report = C.accumulator_report(program)
    for info, layer in zip(report, [m for m in program.layers if hasattr(m, "w")], strict=True):
        w = np.asarray(layer.w).astype(object).reshape(-1, layer.w.shape[-1])
        bound = max(255 * sum(abs(int(a)) for a in w[:, c]) + abs(int(layer.b[c])) for c in
                    range(w.shape[1]))  # fmt: skip
        assert info.path == layer.path and info.bound == bound
        assert 2 ** (info.bits - 2) <= bound < 2 ** (info.bits - 1)


def test_run_is_integer_only(setup):
    _, x, qmodel, v, oqp, _ = setup
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp, mode="double")
    xq = program.quantize_input(x[:4])
    jaxpr = jax.make_jaxpr(C.run)(program, xq)
    dtypes = set()
    prims = []

    def walk(jx):
        for eqn in jx.eqns:
            prims.append(eqn)
            dtypes.update(str(o.aval.dtype) for o in eqn.outvars)
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jaxpr.jaxpr)
    assert not any(d.startswith(("float", "bfloat")) for d in dtypes), dtypes
    heavy = [e for e in prims if e.primitive.name in ("conv_general_dilated", "dot_general")]
    assert heavy
    for e in heavy:
        assert [str(a.aval.dtype) for a in e.invars] == ["int8", "int8"]
        assert str(e.outvars[0].aval.dtype) == "int32"


def test_save_load_roundtrip_and_file_layout(setup, tmp_path):
    _, x, qmodel, v, oqp, _ = setup
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp, mode="single")
    path = tmp_path / "p.safetensors"
    size = C.save(program, path)
    raw = path.read_bytes()
    assert size == len(raw)
    # parse the safetensors layout by hand
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["jquant_program"])
    assert [e[1] for e in meta["layers"]] == [layer.path for layer in program.layers]
    body = raw[8 + n :]
    ends = sorted(e["data_offsets"] for e in header.values())
    assert ends[0][0] == 0 and ends[-1][1] == len(body)
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:], strict=False))  # contiguous
    # weights, in layer order: 8-bit codes in one int8 tensor, narrower ones packed in "u8"
    assert header["i8"]["dtype"] == "I8" and header.get("u8", {"dtype": "U8"})["dtype"] == "U8"
    raw_w = {k: body[slice(*header[k]["data_offsets"])] for k in ("i8", "u8") if k in header}
    linear = [layer for layer in program.layers if hasattr(layer, "w")]
    stored = [e[3] for e in meta["layers"] if "w_storage" in e[3]]
    assert [s["w_shape"] for s in stored] == [list(np.shape(layer.w)) for layer in linear]
    pairs = list(zip(linear, stored, strict=True))
    i8 = [np.asarray(w.w).reshape(-1) for w, s in pairs if s["w_storage"] == "int8"]
    np.testing.assert_array_equal(np.frombuffer(raw_w["i8"], np.int8), np.concatenate(i8))
    at = 0
    for layer, s in pairs:
        if s["w_storage"] != "int8":  # int4, uint4, int2, uint2
            w = np.asarray(layer.w).reshape(-1)
            bits, signed = int(s["w_storage"][-1]), not s["w_storage"].startswith("u")
            n = -(-w.size * bits // 8)
            got = _unpack_by_hand(raw_w["u8"][at : at + n], bits, signed, w.size)
            np.testing.assert_array_equal(got, w)
            at += n
    assert at == len(raw_w.get("u8", b""))
    # requantization constants are not stored: only the packed tensors
    assert sorted(header) in (["f32", "i32", "i8"], ["f32", "i32", "i8", "u8"])
    loaded = C.load(path)
    assert jax.tree.structure(loaded) == jax.tree.structure(program)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(program), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(_program_codes(loaded, x), _program_codes(program, x))


def _unpack_by_hand(raw: bytes, bits: int, signed: bool, n: int) -> np.ndarray:
    """``n`` codes of ``bits`` bits, ``8 // bits`` per byte, the first in the lowest bits."""
    mask, k = (1 << bits) - 1, 8 // bits
    codes = [(byte >> (bits * j)) & mask for byte in raw for j in range(k)][:n]
    return np.array([c - (1 << bits) if signed and c >> (bits - 1) else c for c in codes])


def test_quantize_dequantize_helpers(setup):
    _, x, qmodel, v, oqp, _ = setup
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp)
    q1 = qmodel.quantized_layers(v)[0]
    fmt = q1.rule.act  # unsigned codes move down by 2^(b-1) onto the int8 grid
    want = np.asarray(quantize(x, q1.input_qparams, fmt)).astype(int) - (not fmt.signed) * 128
    got = program.quantize_input(x)
    assert got.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(got), want)
    codes = jnp.arange(-128, 128, dtype=jnp.int8)
    s, z = float(oqp.scale), float(oqp.zero_point)
    np.testing.assert_allclose(
        np.asarray(program.dequantize_output(codes)), s * (np.arange(-128, 128) - z), rtol=1e-6
    )


def test_nnx_model_converts_to_the_linen_program():
    from flax import nnx

    from jquant.models import nnx as model_nnx
    from jquant.nn import nnx as qn

    x = X1D[:24]
    cfg = CNNConfig(features=(8, 8), dense=(16,), batch_norm=True)
    lm = CNN(cfg)
    v = _randomize_bn(dict(jax.jit(lm.init)(jax.random.key(0), x[:2])), jax.random.key(1))
    nm = model_nnx.linen_to_nnx(v, model_nnx.CNN(cfg, x.shape[1:], rngs=nnx.Rngs(0)))
    rules = (QuantRule(".*"),)
    qm, _ = ql.quantize_model(lm, rules, x[:2])
    vq = qm.calibrate(qm.attach(v, x[:2]), [x[:12], x[12:]])
    qnm, _ = qn.quantize_model(nm, rules)
    qn.calibrate(qnm, [x[:12], x[12:]])
    oqp = qparams_from_range(jnp.float32(-3.0), jnp.float32(3.0), int8)
    linen_p = C.convert(qm, vq, x[:1], output_qparams=oqp, mode="double")
    nnx_p = C.convert_nnx(qnm, x[:1], output_qparams=oqp, mode="double")
    assert jax.tree.structure(nnx_p) == jax.tree.structure(linen_p)
    for a, b in zip(jax.tree.leaves(nnx_p), jax.tree.leaves(linen_p), strict=True):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    codes = _program_codes(nnx_p, X1D)
    np.testing.assert_array_equal(codes, _program_codes(linen_p, X1D))
    assert len(np.unique(codes)) > 10


class _UserNnxCNN:
    """Built lazily (flax.nnx imported inside the tests): a user's own NNX CNN, not a zoo
    model: Conv -> relu -> max pool -> Conv -> relu -> flatten -> Linear."""

    @staticmethod
    def make(flatten: bool = True):
        from flax import nnx

        class UserCNN(nnx.Module):
            def __init__(self, rngs):
                self.features = nnx.Conv(1, 6, (3,), rngs=rngs)
                self.mix = nnx.Conv(6, 8, (3,), padding="VALID", rngs=rngs)
                self.classifier = nnx.Linear(8 * 6 if flatten else 8, 5, rngs=rngs)

            def __call__(self, x):
                x = nnx.max_pool(nnx.relu(self.features(x)), (2,), strides=(2,))
                x = nnx.relu(self.mix(x))
                x = x.reshape(x.shape[0], -1) if flatten else jnp.mean(x, axis=1)
                return self.classifier(x)

        return UserCNN(nnx.Rngs(3))


def _user_nnx_quantized(flatten: bool = True):
    from jquant.nn import nnx as qn

    model = _UserNnxCNN.make(flatten)
    qnm, match = qn.quantize_model(model, QuantRule(".*"))
    assert match.unused == () and set(match.assignment) == {"features", "mix", "classifier"}
    qn.calibrate(qnm, [X1D[:24], X1D[24:]])
    return qnm


def test_user_nnx_cnn_converts_natively_bit_exact_with_simulation():
    from flax import nnx

    from jquant.nn import nnx as qn

    qnm = _user_nnx_quantized()
    before = jax.tree.map(np.asarray, nnx.state(qnm))
    oqp = C.output_qparams_from_data(qnm, None, [X1D])
    program = C.convert(qnm, None, X1D[:1], output_qparams=oqp, mode="double")
    assert [type(layer).__name__ for layer in program.layers] == [
        "Conv",
        "Pool",
        "Conv",
        "Reshape",
        "Dense",
    ]
    codes = _program_codes(program, X1D)
    sim = jax.jit(C.simulation(qnm, None, X1D[:1], output_qparams=oqp, mode="double"))
    np.testing.assert_array_equal(np.asarray(quantize(sim(X1D), oqp, int8)), codes)
    # the NNX model's own fake-quant eval: within one output code
    qn.with_phase(qnm, "eval")
    fake = np.asarray(quantize(nnx.jit(lambda m, x: m(x))(qnm, X1D), oqp, int8))
    assert np.max(np.abs(fake.astype(np.int32) - codes)) <= 1
    assert len(np.unique(codes)) > 10
    # converting left the model as it was (phase aside): same variables
    qn.with_phase(qnm, "float")
    after = jax.tree.map(np.asarray, nnx.state(qnm))
    jax.tree.map(np.testing.assert_array_equal, after, before)
    # convert_nnx is convert(model, None, ...)
    again = C.convert_nnx(qnm, X1D[:1], output_qparams=oqp, mode="double")
    for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(program), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_user_nnx_cnn_with_spatial_mean_converts():
    from flax import nnx

    from jquant.nn import nnx as qn

    qnm = _user_nnx_quantized(flatten=False)
    oqp = C.output_qparams_from_data(qnm, None, [X1D])
    residual = C.residual_qparams_from_data(qnm, None, [X1D])
    assert set(residual) == {"mix"}  # read by the mean alone: its range from the data
    program = C.convert(qnm, None, X1D[:1], output_qparams=oqp, residual_qparams=residual)
    assert "Mean" in [type(layer).__name__ for layer in program.layers]
    fake = np.asarray(
        quantize(nnx.jit(lambda m, x: m(x))(qn.with_phase(qnm, "eval"), X1D), oqp, int8)
    )
    assert np.max(np.abs(fake.astype(np.int32) - _program_codes(program, X1D))) <= 1


def test_nnx_convert_errors_name_the_problem():
    qnm = _user_nnx_quantized()
    oqp = qparams_from_range(jnp.float32(-3.0), jnp.float32(3.0), int8)
    with pytest.raises(TypeError, match="variables must be a mapping of collections or None"):
        C.convert(qnm, 3, X1D[:1], output_qparams=oqp)
    plain = _UserNnxCNN.make()
    with pytest.raises(ValueError, match="layer 'features' is not quantized"):
        C.convert(plain, None, X1D[:1], output_qparams=oqp)
    with pytest.warns(DeprecationWarning, match="linen_model"):  # warned, then validated
        with pytest.raises(ValueError, match="mode must be one of"):
            C.convert_nnx(qnm, X1D[:1], output_qparams=oqp, mode="exact", linen_model=object())


# --- errors -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small():
    _, x, qmodel, v, oqp, _ = _cached("cnn_bn_1d")
    return x, qmodel, v, oqp, C.convert(qmodel, v, x[:1], output_qparams=oqp)


def test_run_rejects_non_int8_and_bad_shapes(small):
    x, *_, program = small
    with pytest.raises(TypeError, match="x must be an int8 array"):
        RUN(program, x)
    with pytest.raises(TypeError, match="int8"):
        RUN(program, program.quantize_input(x).astype(jnp.uint8))
    with pytest.raises(ValueError, match="shape"):
        RUN(program, program.quantize_input(x)[:, :8])
    with pytest.raises(TypeError, match="Program"):
        C.run({"layers": ()}, program.quantize_input(x))


@pytest.mark.parametrize(
    "qp, match",
    [
        (QParams(jnp.float32(0.0), jnp.float32(0.0)), "out_scale must be finite and > 0"),
        (QParams(jnp.float32(-1.0), jnp.float32(0.0)), "out_scale must be finite and > 0"),
        (QParams(jnp.float32(0.1), jnp.float32(300.0)), r"output_zp must be .*\[-128, 127\]"),
        (QParams(jnp.float32(0.1), jnp.float32(0.5)), "zero point must be an integer"),
    ],
)
def test_convert_rejects_bad_output_qparams(small, qp, match):
    x, qmodel, v, _, _ = small
    with pytest.raises(ValueError, match=match):
        C.convert(qmodel, v, x[:1], output_qparams=qp)


def test_output_qparams_from_data_takes_the_float_or_the_fake_quant_range(small):
    """``output_range="float"``: the plain (unquantized) model's logits, TFLiteConverter's
    rule; the default: the fake-quant model's. Oracles: each model applied directly."""
    x, qmodel, v, _, _ = small
    plain = {k: v[k] for k in ("params", "batch_stats")}
    for output_range, y in [
        ("float", qmodel.model.apply(plain, x)),
        ("fake_quant", qmodel.with_phase("eval").apply(v, x)),
    ]:
        want = qparams_from_range(jnp.min(y), jnp.max(y), int8)
        got = C.output_qparams_from_data(qmodel, v, [x[:24], x[24:]], output_range=output_range)
        assert float(got.scale) == float(want.scale), output_range
        assert float(got.zero_point) == float(want.zero_point), output_range
    default = C.output_qparams_from_data(qmodel, v, [x])
    float_qp = C.output_qparams_from_data(qmodel, v, [x], output_range="float")
    assert float(default.scale) != float(float_qp.scale)  # the two rules differ here
    with pytest.raises(ValueError, match=r"output_range must be one of \('fake_quant', 'float'\)"):
        C.output_qparams_from_data(qmodel, v, [x], output_range="tflite")


def test_convert_rejects_bad_calibrated_scales(small):
    x, qmodel, v, oqp, _ = small
    bad = jax.tree.map(lambda a: a, v)
    bad["quant_stats"]["dense1" if "dense1" in bad["quant_stats"] else "head"]["input_qparams"][
        "scale"
    ] = jnp.float32(0.0)
    # dense1's input scale is also conv2's output scale: the first layer to use it fails
    with pytest.raises(ValueError, match=r"layer 'conv2': out_scale must be finite and > 0"):
        C.convert(qmodel, bad, x[:1], output_qparams=oqp)
    with pytest.raises(ValueError, match="mode must be one of"):
        C.convert(qmodel, v, x[:1], output_qparams=oqp, mode="float")
    with pytest.raises(TypeError, match="QuantizedModel or a Linen model"):
        C.convert({"model": qmodel}, v, x[:1], output_qparams=oqp)
    # a plain model is accepted only when built from jquant layers
    with pytest.raises(ValueError, match=r"layer 'conv1' is not quantized \(no rule"):
        C.convert(qmodel.model, v, x[:1], output_qparams=oqp)
    with pytest.raises(TypeError, match="output_qparams"):
        C.convert(qmodel, v, x[:1], output_qparams=(0.1, 0))


def test_convert_refuses_delayed_scaling_rather_than_ignoring_its_histories(small):
    x, qmodel, _, oqp, _ = small
    rule = QuantRule(".*", weight="int8", act="int8", scaling="delayed", amax_history=4)
    delayed, _ = ql.quantize_model(qmodel.model, (rule,), x[:2])
    v = delayed.attach(jax.jit(delayed.model.init)(jax.random.key(0), x[:2]), x[:2])
    assert "scaling_history" in v
    with pytest.raises(ValueError, match=r"layer 'conv1': its rule uses delayed scaling"):
        C.convert(delayed, v, x[:1], output_qparams=oqp)


class _Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2, name="wide")(x.reshape(x.shape[0], -1))


def _uncalibrated(model, x, stats=None):
    """Quantized model and plain variables, plus hand-written ``quant_stats`` (state.py's
    layout) instead of a calibration run: enough for conversion."""
    qmodel, _ = ql.quantize_model(model, QuantRule(".*"), x, on_unused="ignore")
    variables = dict(jax.jit(model.init)(jax.random.key(0), x))
    if stats is not None:
        variables["quant_stats"] = stats
    return qmodel, variables, QParams(jnp.float32(0.1), jnp.float32(0.0))


def test_accumulator_overflow_caught_at_conversion():
    # 255 * 127 * 70000 > 2^31 - 1: every weight of the column saturates at +-127
    x = jnp.ones((1, 70000))
    qp = {"scale": jnp.float32(0.01), "zero_point": jnp.float32(0.0)}
    qmodel, v, oqp = _uncalibrated(_Wide(), x, {"wide": {"input_qparams": qp}})
    v["params"] = {"wide": {**v["params"]["wide"], "kernel": jnp.ones((70000, 2))}}
    with pytest.raises(ValueError, match=r"layer 'wide'.*int32 accumulator may overflow"):
        C.convert(qmodel, v, x[:1], output_qparams=oqp)


class _WithLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(4, name="d1")(x)
        x = nn.LayerNorm(name="norm")(x)
        return nn.Dense(3, name="d2")(x)


class _WithTanh(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="d2")(jnp.tanh(nn.Dense(4, name="d1")(x)))


class _Product(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(6, name="d1")(x)
        return nn.Dense(6, name="d2")(h) * h


@pytest.mark.parametrize(
    "model, match",
    [
        (_WithLayerNorm(), r"in module 'norm'"),
        (_WithTanh(), r"unsupported operation 'tanh'"),
        (_Product(), r"unsupported operation 'mul'"),
    ],
)
def test_unsupported_layers_are_named(model, match):
    x = jnp.ones((1, 6))
    qmodel, v, oqp = _uncalibrated(model, x)
    with pytest.raises(ValueError, match=match):
        C.convert(qmodel, v, x[:1], output_qparams=oqp)


def test_float_and_uncalibrated_layers_are_named(small):
    x, qmodel, v, oqp, _ = small
    rules = (QuantRule("head", keep_float=True), QuantRule(".*"))
    kept, _ = ql.quantize_model(qmodel.model, rules, x[:2])
    with pytest.raises(ValueError, match=r"layer 'head' is not quantized"):
        C.convert(kept, v, x[:1], output_qparams=oqp)
    fresh = {k: val for k, val in v.items() if k != "quant_stats"}
    with pytest.raises(ValueError, match=r"layer 'conv1' has no input QParams"):
        C.convert(qmodel, fresh, x[:1], output_qparams=oqp)


def test_load_rejects_foreign_and_corrupt_files(small, tmp_path):
    *_, program = small
    other = tmp_path / "other.safetensors"
    C.write_tensors(other, {"a": np.zeros(3, np.float32)}, {})
    with pytest.raises(ValueError, match="not a saved jquant program"):
        C.load(other)
    good = tmp_path / "p.safetensors"
    C.save(program, good)
    raw = bytearray(good.read_bytes())
    (tmp_path / "short").write_bytes(raw[:4])
    with pytest.raises(ValueError, match="not a valid safetensors file .*header too small"):
        C.load(tmp_path / "short")
    (tmp_path / "trunc").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        C.load(tmp_path / "trunc")
    bad = C.Program(
        **{**{f: getattr(program, f) for f in ("layers", "input_scale", "output_scale")},
           "input_zp": np.int32(200), "output_zp": program.output_zp,
           "input_shape": program.input_shape},
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"input_zp must be .*\[-128, 127\]"):
        C.save(bad, tmp_path / "bad")


# --- the program file: version 3 files, checksum, malformed input; validate ---------------

DATA = pathlib.Path(__file__).parent / "data"


def _tiny_program():
    """A hand-built program of every layer kind (1-D conv + relu, 1x1 conv, residual add, max
    pool, reshape, dense with a narrow clamp), constants drawn by NumPy; double requant."""
    from jquant import integer

    rng = np.random.default_rng(0)

    def linear(cls, path, w_shape, x_scale, out_scale, **kw):
        w = rng.integers(-127, 128, w_shape).astype(np.int8)
        out = w_shape[-1]
        w_scale = rng.uniform(0.01, 0.05, out).astype(np.float32)
        x_scale, out_scale = np.float32(x_scale), np.float32(out_scale)
        return cls(
            path=path,
            w=w,
            b=rng.integers(-500, 500, out).astype(np.int32),
            x_zp=np.int32(kw.pop("x_zp", 0)),
            out_zp=np.int32(kw.pop("out_zp", 0)),
            requant=integer.requant_from_scales(x_scale, w_scale, out_scale, "double"),
            x_scale=x_scale,
            w_scale=w_scale,
            out_scale=out_scale,
            **kw,
        )

    s = (0.05, 0.4, 0.3, 0.5)
    add_scales = (np.float32(s[1]), np.float32(s[2]), np.float32(s[3]))
    layers = (
        linear(C.Conv, "conv1", (1, 3, 2, 4), s[0], s[1], x_zp=3, out_zp=-5,
               activation="relu", padding=((0, 0), (1, 1)), spatial=1),
        linear(C.Conv, "conv2", (1, 1, 4, 4), s[1], s[2], x_zp=-5, out_zp=2, spatial=1),
        C.Add("add", np.int32(-5), np.int32(2), np.int32(1),
              integer.add_requant(*add_scales, "double"), *add_scales),
        C.Pool("pool", "max", (1, 2), (1, 2), spatial=1),
        C.Reshape("flatten", (12,)),
        linear(C.Dense, "head", (12, 3), s[3], 4.0, x_zp=1, out_zp=-1, clamp=(-8, 7)),
    )  # fmt: skip
    return C.Program(
        layers=layers,
        input_scale=np.float32(s[0]),
        input_zp=np.int32(3),
        output_scale=np.float32(4.0),
        output_zp=np.int32(-1),
        input_shape=(6, 2),
        inputs=((0,), (1,), (1, 2), (3,), (4,), (5,)),
    )


def _assert_same_program(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(u).dtype == np.asarray(v).dtype
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


@functools.cache
def _tiny_file() -> bytes:
    path = pathlib.Path(tempfile.mkdtemp()) / "tiny.safetensors"
    C.save(_tiny_program(), path)
    return path.read_bytes()


def _header(raw: bytes) -> tuple[dict, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    return header, json.loads(header["__metadata__"]["jquant_program"])


def test_version_3_file_still_loads_and_version_6_has_a_checksum(tmp_path):
    program = _tiny_program()
    old = C.load(DATA / "program_v3.safetensors")  # written by the version 3 code
    assert _header((DATA / "program_v3.safetensors").read_bytes())[1]["version"] == 3
    _assert_same_program(old, program)
    header, meta = _header(_tiny_file())
    assert meta["version"] == 6
    body = _tiny_file()[8 + struct.unpack("<Q", _tiny_file()[:8])[0] :]
    digest = header["__metadata__"].pop("jquant_sha256")
    # sha256 of the canonical {metadata, tensors: {name: [dtype, shape]}}, then the tensors'
    # bytes in name order (independent of the byte layout the safetensors package chose)
    dtypes = {"I8": "int8", "U8": "uint8", "I32": "int32", "F32": "float32"}
    layout = {
        "metadata": header.pop("__metadata__"),
        "tensors": {k: [dtypes[e["dtype"]], e["shape"]] for k, e in header.items()},
    }
    canonical = json.dumps(layout, sort_keys=True, separators=(",", ":")).encode()
    data = b"".join(body[slice(*header[k]["data_offsets"])] for k in sorted(header))
    assert digest == hashlib.sha256(canonical + data).hexdigest()
    (tmp_path / "p").write_bytes(_tiny_file())
    new = C.load(tmp_path / "p")
    _assert_same_program(new, program)
    x = jax.random.normal(jax.random.key(0), (4, 6, 2))
    np.testing.assert_array_equal(_program_codes(new, x), _program_codes(old, x))


@hypothesis.given(st.data())
def test_flipped_or_truncated_files_raise_value_error(tmp_path_factory, data):
    raw = bytearray(_tiny_file())
    path = tmp_path_factory.mktemp("flip") / "p"
    if data.draw(st.booleans(), "truncate"):
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), "length")])
        with pytest.raises(ValueError, match=str(path)):
            C.load(path)
        return
    at = data.draw(st.integers(0, len(raw) - 1), "position")
    raw[at] ^= data.draw(st.integers(1, 255), "xor")
    path.write_bytes(raw)
    try:
        loaded = C.load(path)
    except ValueError as e:
        assert str(path) in str(e)
    else:  # only a flip between blanks of the header's padding leaves the program intact
        header_end = 8 + struct.unpack("<Q", _tiny_file()[:8])[0]
        assert _tiny_file()[at] == ord(" ") and at < header_end and chr(raw[at]).isspace()
        _assert_same_program(loaded, _tiny_program())


def test_every_truncation_and_data_flip_is_caught(tmp_path):
    raw = _tiny_file()
    path = tmp_path / "p"
    for n in range(len(raw)):
        path.write_bytes(raw[:n])
        with pytest.raises(ValueError):
            C.load(path)
    header_end = 8 + struct.unpack("<Q", raw[:8])[0]
    for at in range(header_end, len(raw), 3):  # the data section: the checksum catches each
        flipped = bytearray(raw)
        flipped[at] ^= 1
        path.write_bytes(flipped)
        with pytest.raises(ValueError, match="sha256 checksum mismatch"):
            C.load(path)


def _write_raw_header(path, header_json: bytes, body: bytes = b"") -> None:
    path.write_bytes(struct.pack("<Q", len(header_json)) + header_json + body)


_SAFETENSORS = "not a valid safetensors file"


@pytest.mark.parametrize(
    "header, match",
    [  # refused by the safetensors package (its reason quoted), then by jquant's metadata checks
        (b"[]", f"{_SAFETENSORS} .*invalid type: sequence"),
        (b'"text"', f"{_SAFETENSORS} .*invalid type: string"),
        (b"null", f"{_SAFETENSORS} .*invalid type: null"),
        (b"3", f"{_SAFETENSORS} .*invalid type: integer `3`"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, _SAFETENSORS, id="deep-nesting"),
        (b'{"a": 1}', f"{_SAFETENSORS} .*expected struct TensorInfo"),
        (b'{"a": {"dtype": ["I8"], "shape": [], "data_offsets": [0, 1]}}', _SAFETENSORS),
        (b'{"a": {"dtype": "I8", "shape": [2], "data_offsets": [0, 1]}}', "invalid shape"),
        (b'{"a": {"dtype": "I8", "shape": [1], "data_offsets": [true, 1]}}', "expected usize"),
        (b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 1]}}', "invalid shape"),
        (b'{"a": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}', "dtype BF16"),
        (b'{"__metadata__": []}', f"{_SAFETENSORS} .*expected a map"),
        (b'{"__metadata__": {"jquant_program": 3}}', f"{_SAFETENSORS} .*expected a string"),
        (b'{"__metadata__": {"jquant_program": "[]"}}', "must be a JSON object"),
        (b'{"__metadata__": {"jquant_program": "{\\"version\\": 3.0}"}}', "version 3.0"),
        (b'{"__metadata__": {"jquant_program": "{\\"version\\": 4}"}}', "without its"),
        (b'{"__metadata__": {"jquant_program": "{\\"version\\": 6}"}}', "without its"),
        (b'{"__metadata__": {"jquant_program": "{\\"version\\": 3}"}}', "missing key"),
    ],
)
def test_malformed_headers_raise_value_error(tmp_path, header, match):
    path = tmp_path / "p"
    body = b"\0" * (b'"a"' in header) * (2 if b"BF16" in header else 1)  # what "a" covers
    _write_raw_header(path, header, body)
    with pytest.raises(ValueError, match=match):
        C.load(path)


def _json_values():
    scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text()
    return st.recursive(
        scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(), c, max_size=4)
    )


def _locations(value, prefix=()):
    """Every (path of keys / indices) inside a JSON value."""
    yield prefix
    if isinstance(value, dict | list):
        for k, v in value.items() if isinstance(value, dict) else enumerate(value):
            yield from _locations(v, (*prefix, k))


@hypothesis.given(st.data())
def test_metadata_of_wrong_types_raises_value_error(tmp_path_factory, data):
    """Any value (or a deletion) anywhere in a version 3 file's metadata: the file loads (and
    validates) or load raises ValueError, never another exception."""
    tensors, metadata = C.read_tensors(DATA / "program_v3.safetensors")
    meta = json.loads(metadata["jquant_program"])
    where = data.draw(st.sampled_from([w for w in _locations(meta) if w]), "where")
    parent = functools.reduce(lambda v, k: v[k], where[:-1], meta)
    if isinstance(parent, dict) and data.draw(st.booleans(), "delete"):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(_json_values(), "value")
    path = tmp_path_factory.mktemp("meta") / "p"
    C.write_tensors(path, tensors, {"jquant_program": json.dumps(meta)})
    try:
        C.validate(C.load(path))
    except ValueError as e:
        assert str(path) in str(e)


@hypothesis.given(st.data())
def test_safetensors_header_of_wrong_types_raises_value_error(tmp_path_factory, data):
    """The whole header, or any value in it (or a deletion), replaced: always ValueError."""
    header, _ = _header(_tiny_file())
    body = _tiny_file()[8 + struct.unpack("<Q", _tiny_file()[:8])[0] :]
    where = data.draw(st.sampled_from(list(_locations(header))), "where")
    if not where:
        header = data.draw(_json_values(), "header")
    else:
        parent = functools.reduce(lambda v, k: v[k], where[:-1], header)
        if isinstance(parent, dict) and data.draw(st.booleans(), "delete"):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(_json_values(), "value")
    hypothesis.assume(header != _header(_tiny_file())[0])  # a change, not the same value
    path = tmp_path_factory.mktemp("header") / "p"
    _write_raw_header(path, json.dumps(header).encode(), body)
    with pytest.raises(ValueError, match=str(path)):
        C.load(path)


def _replace_layer(program, i, **changes):
    layers = list(program.layers)
    layers[i] = dataclasses.replace(layers[i], **changes)
    return dataclasses.replace(program, layers=tuple(layers))


def _bad_programs():
    from jquant import integer

    p = _tiny_program()
    conv, _, add, _, _, head = p.layers
    huge = np.full(4, 1e30, np.float32)  # issue #12: shift 99, a constant output
    m0 = np.asarray(conv.requant.multiplier)
    return {
        "w_scale 1e30": (
            _replace_layer(
                p,
                0,
                w_scale=huge,
                requant=integer.requant_from_scales(conv.x_scale, huge, conv.out_scale),
            ),
            r"'conv1': requant.shift must be in \[-31, 31\] in mode 'double'",
        ),
        "single shift 31": (
            _replace_layer(p, 0, requant=integer.Requant(m0, np.full(4, 31, np.int32), "single")),
            r"requant.shift must be in \[-31, 30\] in mode 'single'",
        ),
        "M0 below 2^30": (
            _replace_layer(p, 0, requant=integer.Requant(m0 // 4, conv.requant.shift)),
            r"requant.multiplier must be in \[2\^30, 2\^31\)",
        ),
        "fp32 inf": (
            _replace_layer(
                p,
                5,
                requant=integer.Requant(
                    np.full(3, np.inf, np.float32), np.zeros(3, np.int32), "fp32"
                ),
            ),
            "'head': requant.multiplier must be finite float32",
        ),
        "add shift": (
            _replace_layer(
                p,
                2,
                requant=dataclasses.replace(
                    add.requant, out=integer.Requant(np.int32(2**30), np.int32(40))
                ),
            ),
            r"'add': requant.out.shift must be in \[-31, 31\]",
        ),
        "pool window 0": (
            _replace_layer(p, 3, window=(1, 0)),
            r"'pool': window must be a tuple of 2 integers >= 1",
        ),
        "pool strides 0": (_replace_layer(p, 3, strides=(0, 2)), "'pool': strides must be"),
        "pool padding": (
            _replace_layer(p, 3, padding=((0, 0), (-1, 0))),
            "'pool': padding must be",
        ),
        "pool spatial": (
            _replace_layer(p, 3, spatial=3),
            r"'pool': spatial must be an integer in \[1, 2\]",
        ),
        "conv dilation": (_replace_layer(p, 0, dilation=(1, 0)), "'conv1': dilation must be"),
        "conv groups": (_replace_layer(p, 0, groups=3), "groups=3 must divide the 4 outputs"),
        "clamp beyond int8": (
            _replace_layer(p, 5, clamp=(-200, 7)),
            r"'head': clamp must be a pair .* -128 <= lo <= hi <= 127",
        ),
        "clamp lo > hi": (_replace_layer(p, 5, clamp=(7, -8)), "'head': clamp must be a pair"),
        "add clamp": (_replace_layer(p, 2, clamp=(0, 300)), "'add': clamp must be a pair"),
        "input clamp": (dataclasses.replace(p, input_clamp=(-128, 128)), "input_clamp must be"),
        "bias shape": (
            _replace_layer(p, 5, b=np.zeros(4, np.int32)),
            r"'head': b must have shape \(3,\)",
        ),
        "w_scale shape": (
            _replace_layer(p, 5, w_scale=np.ones(2, np.float32)),
            "'head': w_scale must have shape",
        ),
        "reshape size": (
            _replace_layer(p, 4, shape=(13,)),
            r"'flatten' cannot read inputs of shape \[\(1, 3, 4\)\]",
        ),
        "reshape shape": (_replace_layer(p, 4, shape=(0, 12)), "'flatten': shape must be"),
        "dense width": (_replace_layer(p, 5, w=np.zeros((11, 3), np.int8)), "'head' cannot read"),
        "rounding": (dataclasses.replace(p, rounding="stochastic"), "rounding must be one of"),
        "input shape": (dataclasses.replace(p, input_shape=(6, 0)), "input_shape must be"),
        "path": (_replace_layer(p, 3, path=3), "layer path must be a str"),
        "no layers": (dataclasses.replace(p, layers=(), inputs=None), "non-empty tuple"),
    }


@pytest.mark.parametrize("case", list(_bad_programs()))
def test_validate_names_each_bad_field(case, tmp_path):
    program, match = _bad_programs()[case]
    with pytest.raises(ValueError, match=match):
        C.validate(program)
    with pytest.raises(ValueError, match=match):
        C.save(program, tmp_path / "p")
    assert not (tmp_path / "p").exists()
    C.validate(_tiny_program())


# --- acceptance on the trained MNIST-1D CNN (slow: trains on a cold cache) ---------------


@pytest.mark.slow
def test_mnist1d_cnn_acceptance():
    from jquant.data import load_mnist1d
    from jquant.models import train as T

    data = load_mnist1d()
    trained = T.train_or_load("cnn", data, 0, 3000)
    x0 = data.x_train[:2]
    qmodel, _ = ql.quantize_model(trained.model, QuantRule(".*"), x0)
    calib = [data.x_train[i * 128 : (i + 1) * 128] for i in range(8)]
    v = qmodel.calibrate(qmodel.attach(trained.variables, x0), calib)
    oqp = C.output_qparams_from_data(qmodel, v, calib)
    vb = C.with_quantized_bias(qmodel, v, x0)
    want = np.asarray(quantize(qmodel.with_phase("eval").apply(vb, data.x_test), oqp, int8))
    want = want.astype(np.int32)
    y = np.asarray(data.y_test)
    for mode in ("double", "single", "fp32"):
        program = C.convert(qmodel, v, x0, output_qparams=oqp, mode=mode)
        got = _program_codes(program, data.x_test)
        assert np.abs(got - want).max() <= 1, mode
        acc_int, acc_fq = np.mean(got.argmax(1) == y), np.mean(want.argmax(1) == y)
        assert abs(acc_int - acc_fq) <= 0.002, (mode, acc_int, acc_fq)
        if mode != "double":  # one rounding, as the fake-quant model: bit-exact
            np.testing.assert_array_equal(got, want, err_msg=mode)
        # the fake-quant model with the deployment's requantization (double: two roundings)
        sim = jax.jit(C.simulation(qmodel, v, x0, output_qparams=oqp, mode=mode))(data.x_test)
        sim = np.asarray(quantize(sim, oqp, int8)).astype(np.int32)
        np.testing.assert_array_equal(got, sim, err_msg=mode)
        assert np.mean(got.argmax(1) == sim.argmax(1)) >= 0.999, mode


# --- residual connections: the program is a DAG with integer adds --------------------------


class _ResCNN(nn.Module):
    """conv -> relu -> conv + skip -> relu -> max pool -> dense (plain Flax)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(6, (3,), name="conv1")(x))
        y = nn.relu(nn.Conv(6, (3,), name="conv2")(h) + h)
        y = nn.max_pool(y, (2,), strides=(2,))
        return nn.Dense(10, name="head")(y.reshape(y.shape[0], -1))


@pytest.fixture(scope="module")
def residual():
    x = X1D
    qmodel, v, oqp, want = _setup(_ResCNN(), x, (QuantRule(".*"),))
    rq = C.residual_qparams_from_data(qmodel, v, [x[:24], x[24:]])
    return x, qmodel, v, oqp, want, rq


def test_residual_cnn_converts_to_a_dag_with_an_add(residual):
    x, qmodel, v, oqp, _, rq = residual
    assert sorted(rq) == ["conv2"]  # conv2's output is read by the add alone
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp, residual_qparams=rq)
    kinds = [type(layer).__name__ for layer in program.layers]
    assert kinds == ["Conv", "Conv", "Add", "Pool", "Reshape", "Dense"]
    # v1 = conv1(x), v2 = conv2(v1), v3 = relu(v2 + v1): the skip reads v1 again
    assert program.inputs == ((0,), (1,), (2, 1), (3,), (4,), (5,))
    conv1, conv2, add, _, _, head = program.layers
    assert add.activation == "relu" and conv2.activation is None
    # scales: the skip at conv2's input quantizer, conv2's output at its measured range,
    # the add's output at the head's input quantizer (TFLite: ADD requantizes to its own)
    assert add.b_scale == conv1.out_scale == conv2.x_scale and add.b_zp == conv2.x_zp
    assert add.a_scale == conv2.out_scale == np.float32(rq["conv2"].scale)
    assert add.out_scale == head.x_scale and add.out_zp == head.x_zp
    # without residual_qparams: symmetric int8 over the add's output range
    default = C.convert(qmodel, v, x[:1], output_qparams=oqp).layers[1]
    top = max(
        abs(add.out_scale * (-128 - int(add.out_zp))), abs(add.out_scale * (127 - int(add.out_zp)))
    )
    assert int(default.out_zp) == 0
    np.testing.assert_allclose(default.out_scale, top / 127, rtol=1e-6)


@pytest.mark.parametrize("mode", ["double", "single", "fp32"])
def test_residual_program_equals_simulation_and_is_near_fake_quant(residual, mode):
    x, qmodel, v, oqp, want, rq = residual
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp, mode=mode, residual_qparams=rq)
    got = _program_codes(program, x)
    sim = C.simulation(qmodel, v, x[:1], output_qparams=oqp, mode=mode, residual_qparams=rq)
    codes = np.asarray(quantize(jax.jit(sim)(x), oqp, int8)).astype(np.int32)
    np.testing.assert_array_equal(codes, got)
    # the fake-quant model adds the float skip h to conv2's float output; the program adds
    # int8 codes of both (h at conv2's input scale, conv2's output at its own): each rounding
    # moves the head's input by up to half a code, so logits move by up to two codes
    diff = np.abs(got - want)
    assert diff.max() <= 2 and np.mean(diff > 0) < 0.5, (diff.max(), np.mean(diff > 0))
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
    assert len(np.unique(got)) > 20


def test_residual_program_save_load_and_integer_only(residual, tmp_path):
    x, qmodel, v, oqp, _, rq = residual
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp, mode="fp32", residual_qparams=rq)
    path = tmp_path / "res.safetensors"
    C.save(program, path)
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = json.loads(header.pop("__metadata__")["jquant_program"])
    assert meta["version"] == 6 and meta["inputs"] == [list(r) for r in program.inputs]
    assert sorted(header) == ["f32", "i32", "i8"]  # the add's constants are recomputed
    loaded = C.load(path)
    assert loaded.inputs == program.inputs
    assert jax.tree.structure(loaded) == jax.tree.structure(program)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(program), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.asarray(a).dtype == np.asarray(b).dtype
    np.testing.assert_array_equal(_program_codes(loaded, x), _program_codes(program, x))
    jaxpr = jax.make_jaxpr(C.run)(program, program.quantize_input(x[:2]))
    floats = [
        e.primitive.name
        for e in jaxpr.jaxpr.eqns
        if any(str(o.aval.dtype).startswith("float") for o in e.outvars)
    ]
    # fp32 requantization multiplies in float32 (XNNPACK); double mode is integer-only
    assert floats
    program_d = C.convert(qmodel, v, x[:1], output_qparams=oqp, residual_qparams=rq)
    jaxpr = jax.make_jaxpr(C.run)(program_d, program_d.quantize_input(x[:2]))
    assert not any(
        str(o.aval.dtype).startswith("float") for e in jaxpr.jaxpr.eqns for o in e.outvars
    )


def test_program_inputs_are_validated(residual):
    x, qmodel, v, oqp, _, rq = residual
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp, residual_qparams=rq)
    bad = dataclasses.replace(program, inputs=((0,), (1,), (2, 4), (3,), (4,), (5,)))
    with pytest.raises(ValueError, match=r"'<top level>' \(number 2\) must read 2 earlier"):
        C.validate(bad)
    with pytest.raises(ValueError, match="inputs of 2 layers"):
        C.validate(dataclasses.replace(program, inputs=((0,), (1,))))
    with pytest.raises(ValueError, match=r"residual_qparams names \['head'\]"):
        C.convert(qmodel, v, x[:1], output_qparams=oqp, residual_qparams={"head": oqp})


# --- QConvBN (conv + BN trained with folded, quantized weights) ----------------------------


class _FoldedNet(nn.Module):
    """Built from jquant layers: QConvBN -> relu -> max pool -> QDense."""

    phase: str = "float"

    @nn.compact
    def __call__(self, x, train: bool = False):
        from jquant.nn.bn_folding import QConvBN

        q = {"rule": QuantRule(".*"), "phase": self.phase}
        x = QConvBN(6, (3,), name="conv1", **q)(x, use_running_average=not train)
        x = nn.max_pool(nn.relu(x), (2,), strides=(2,))
        return ql.QDense(10, name="head", **q)(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def folded():
    x = X1D
    model = _FoldedNet()
    v = dict(jax.jit(model.init)(jax.random.key(0), x[:2]))
    key = jax.random.split(jax.random.key(3), 4)
    c = 6  # BN statistics and affine parameters away from the identity, one gamma negative
    v["batch_stats"] = {
        "conv1": {
            "mean": 0.3 * jax.random.normal(key[0], (c,)),
            "var": jax.random.uniform(key[1], (c,), minval=0.2, maxval=3.0),
        }
    }
    p = dict(v["params"]["conv1"])
    p["scale"] = jax.random.uniform(key[2], (c,), minval=0.5, maxval=2.0).at[0].set(-1.3)
    p["bias"] = 0.2 * jax.random.normal(key[3], (c,))
    v["params"] = {**v["params"], "conv1": p}
    calib = jax.jit(lambda v, x: _FoldedNet("calibrate").apply(v, x, mutable=["quant_stats"]))
    for batch in (x[:24], x[24:]):
        v["quant_stats"] = calib(v, batch)[1]["quant_stats"]
    return x, v


@pytest.mark.parametrize("mode", ["double", "single", "fp32"])
def test_qconvbn_model_converts_like_its_eval_forward(folded, mode):
    from jquant.nn.bn_folding import fold_bn

    x, v = folded
    model = _FoldedNet()  # built in phase float: convert traces it in float, runs it in eval
    vb = C.with_quantized_bias(model, v, x[:1])
    y = jax.jit(_FoldedNet("eval").apply)(vb, x)
    oqp = qparams_from_range(jnp.min(y), jnp.max(y), int8)
    want = np.asarray(quantize(y, oqp, int8)).astype(np.int32)
    program = C.convert(model, v, x[:1], output_qparams=oqp, mode=mode)
    assert [type(layer).__name__ for layer in program.layers] == [
        "Conv", "Pool", "Reshape", "Dense"
    ]  # fmt: skip
    conv = program.layers[0]
    # the weight codes are those of the folded kernel W gamma / sigma_R, per-channel symmetric
    p, st = v["params"]["conv1"], v["batch_stats"]["conv1"]
    w_fold, b_fold = fold_bn(p["kernel"], None, p["scale"], p["bias"], st["mean"], st["var"])
    s_w = np.abs(np.asarray(w_fold)).reshape(-1, 6).max(0) / 127
    np.testing.assert_allclose(conv.w_scale, s_w, rtol=1e-6)
    np.testing.assert_array_equal(
        conv.w[0].astype(int), np.round(np.asarray(w_fold) / s_w).astype(int)
    )
    np.testing.assert_array_equal(
        conv.b,
        np.round(np.asarray(b_fold, np.float64) / (conv.x_scale * conv.w_scale.astype(np.float64))),
    )
    got = _program_codes(program, x)
    sim = C.simulation(model, v, x[:1], output_qparams=oqp, mode=mode)
    np.testing.assert_array_equal(np.asarray(quantize(jax.jit(sim)(x), oqp, int8)), got)
    diff = np.abs(got - want)
    assert diff.max() <= 1 and np.mean(got.argmax(1) == want.argmax(1)) >= 0.999
    if mode != "double":  # one rounding, as the fake-quant model
        np.testing.assert_array_equal(got, want)
    assert len(np.unique(got)) > 20


class _ConvBNHead(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Conv(8, (3,), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        return nn.Dense(10)(y.reshape(y.shape[0], -1))


def test_fold_bn_model_converts():
    """A plain Conv -> BatchNorm model trained with ``quantize_model(fold_bn=True)`` converts:
    the program equals ``simulation`` bit for bit and its eval model within 1 LSB."""
    x = jax.random.normal(jax.random.key(0), (64, 16, 2))
    model = _ConvBNHead()
    v = model.init(jax.random.key(1), x)
    v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
    qm, _ = ql.quantize_model(model, QuantRule(".*"), x, fold_bn=True)
    assert qm.folds
    qv = qm.calibrate(qm.attach(v, x), [x])
    oqp = C.output_qparams_from_data(qm, qv, [x])
    program = C.convert(qm, qv, x[:2], output_qparams=oqp, mode="fp32")
    got = _program_codes(program, x)
    sim = jax.jit(C.simulation(qm, qv, x[:2], output_qparams=oqp, mode="fp32"))(x)
    np.testing.assert_array_equal(got, np.asarray(quantize(sim, oqp, int8)).astype(np.int32))
    want = np.asarray(quantize(qm.with_phase("eval").apply(qv, x), oqp, int8)).astype(np.int32)
    assert np.abs(got - want).max() <= 1


def test_nnx_fold_bn_model_converts_as_its_linen_twin():
    """An NNX Conv -> BatchNorm model quantized with ``fold_bn=True`` converts natively: the
    program equals ``simulation`` bit for bit, its eval model within 1 LSB, and the Linen
    fold of the same weights gives the same program."""
    from flax import nnx

    from jquant.nn import nnx as qn

    class ConvBN(nnx.Module):  # _ConvBNHead in NNX: the same paths, the same variables
        def __init__(self, rngs):
            self.Conv_0 = nnx.Conv(2, 8, (3,), use_bias=False, rngs=rngs)
            self.BatchNorm_0 = nnx.BatchNorm(8, rngs=rngs)
            self.Dense_0 = nnx.Linear(8 * 16, 10, rngs=rngs)

        def __call__(self, x, train=False):
            x = nnx.relu(self.BatchNorm_0(self.Conv_0(x), use_running_average=not train))
            return self.Dense_0(x.reshape(x.shape[0], -1))

    x = jax.random.normal(jax.random.key(0), (64, 16, 2))
    v = _ConvBNHead().init(jax.random.key(1), x)
    v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
    model = ConvBN(nnx.Rngs(0))
    params, stats = nnx.state(model, nnx.Param, nnx.BatchStat)
    params.replace_by_pure_dict(v["params"])
    stats.replace_by_pure_dict(v["batch_stats"])
    nnx.update(model, params, stats)
    qnm, _ = qn.quantize_model(model, QuantRule(".*"), x, fold_bn=True)
    qn.calibrate(qnm, [x])
    oqp = C.output_qparams_from_data(qnm, None, [x])
    program = C.convert(qnm, None, x[:2], output_qparams=oqp, mode="fp32")
    got = _program_codes(program, x)
    sim = jax.jit(C.simulation(qnm, None, x[:2], output_qparams=oqp, mode="fp32"))(x)
    np.testing.assert_array_equal(got, np.asarray(quantize(sim, oqp, int8)).astype(np.int32))
    fake = nnx.jit(lambda m, x: m(x))(qn.with_phase(qnm, "eval"), x)
    assert np.abs(got - np.asarray(quantize(fake, oqp, int8)).astype(np.int32)).max() <= 1
    lq, _ = ql.quantize_model(_ConvBNHead(), QuantRule(".*"), x, fold_bn=True)
    lv = lq.calibrate(lq.attach(v, x), [x])
    linen = C.convert(lq, lv, x[:2], output_qparams=oqp, mode="fp32")
    for a, b in zip(jax.tree.leaves(program), jax.tree.leaves(linen), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ------------------------------------------------------------------------------ mean / concat


class _BranchGAP(nn.Module):
    """conv -> two branches (1x1, 3x3 SAME) -> concat channels -> global mean -> dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), name="stem")(x))
        a = nn.relu(nn.Conv(4, (1, 1), name="left")(h))
        b = nn.relu(nn.Conv(6, (3, 3), padding="SAME", name="right")(h))
        y = jnp.concatenate([a, b], axis=-1)
        return nn.Dense(10, name="head")(jnp.mean(y, axis=(1, 2)))


@pytest.fixture(scope="module")
def branch_gap():
    qmodel, v, oqp, want = _setup(_BranchGAP(), X2D, (QuantRule(".*"),))
    rq = C.residual_qparams_from_data(qmodel, v, [X2D])
    return qmodel, v, oqp, want, rq


def test_concat_and_mean_convert(branch_gap):
    """jnp.concatenate and jnp.mean over H, W become Concat and Mean; the branches share the
    concat's quantizer, measured from data (both ranges merged); the mean requantizes to the
    head's input quantizer. The program is within 1 code of the fake-quant model."""
    qmodel, v, oqp, want, rq = branch_gap
    assert sorted(rq) == ["left", "right"]
    program = C.convert(qmodel, v, X2D[:1], output_qparams=oqp, residual_qparams=rq)
    stem, left, right, cat, mean, head = program.layers
    assert isinstance(cat, C.Concat) and isinstance(mean, C.Mean)
    assert program.inputs == ((0,), (1,), (1,), (2, 3), (4,), (5,))
    assert (cat.axis, cat.arity, mean.axes, mean.count) == (3, 2, (1, 2), 64)
    for branch in (left, right):
        assert (branch.out_scale, branch.out_zp) == (cat.scale, cat.zp)
    assert (mean.x_scale, mean.x_zp) == (cat.scale, cat.zp)
    assert (mean.out_scale, mean.out_zp) == (head.x_scale, head.x_zp)
    lo = min(float(q.scale) * (-128 - float(q.zero_point)) for q in rq.values())
    hi = max(float(q.scale) * (127 - float(q.zero_point)) for q in rq.values())
    merged = qparams_from_range(jnp.float32(lo), jnp.float32(hi), int8)
    assert np.float32(merged.scale) == cat.scale and int(merged.zero_point) == int(cat.zp)
    assert np.abs(_program_codes(program, X2D) - want).max() <= 1
    with pytest.raises(ValueError, match="simulation does not model the integer MEAN"):
        C.simulation(qmodel, v, X2D[:1], output_qparams=oqp, residual_qparams=rq)


def test_mean_needs_a_measured_input_range(branch_gap):
    qmodel, v, oqp, _, _ = branch_gap
    with pytest.raises(ValueError, match=r"'left' is read by a mean .* residual_qparams"):
        C.convert(qmodel, v, X2D[:1], output_qparams=oqp)


def test_mean_and_concat_programs_save_and_load(branch_gap, tmp_path):
    qmodel, v, oqp, _, rq = branch_gap
    for mode in ("double", "fp32"):
        program = C.convert(qmodel, v, X2D[:1], output_qparams=oqp, residual_qparams=rq, mode=mode)
        C.save(program, tmp_path / "p.safetensors")
        loaded = C.load(tmp_path / "p.safetensors")
        _, metadata = C.read_tensors(tmp_path / "p.safetensors")
        assert json.loads(metadata["jquant_program"])["version"] == 6
        np.testing.assert_array_equal(_program_codes(loaded, X2D), _program_codes(program, X2D))
        for a, b in zip(jax.tree.leaves(program), jax.tree.leaves(loaded), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert jax.tree.structure(program) == jax.tree.structure(loaded)


def test_bad_mean_and_concat_specs_are_refused(branch_gap):
    qmodel, v, oqp, _, rq = branch_gap
    program = C.convert(qmodel, v, X2D[:1], output_qparams=oqp, residual_qparams=rq)
    layers = list(program.layers)

    def swap(k, **kw):
        return dataclasses.replace(
            program, layers=(*layers[:k], dataclasses.replace(layers[k], **kw), *layers[k + 1 :])
        )  # noqa: E501

    with pytest.raises(ValueError, match=r"layer '<top level>': requant does not follow"):
        C.validate(swap(4, out_scale=np.float32(layers[4].out_scale * 2)))
    with pytest.raises(ValueError, match=r"axes must be \(1,\) or \(1, 2\)"):
        C.validate(swap(4, axes=(3,)))
    with pytest.raises(ValueError, match="arity must be an integer >= 2"):
        C.validate(swap(3, arity=1))
    with pytest.raises(ValueError, match="must read 3 earlier value"):
        C.validate(swap(3, arity=3))
    with pytest.raises(ValueError, match="axis must be an integer >= 1"):
        C.validate(swap(3, axis=0))


class _ChannelMean(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(4, (3, 3), name="conv")(x)
        return nn.Dense(3, name="head")(jnp.mean(h, axis=-1))


def test_a_mean_over_channels_is_refused_naming_the_module():
    qmodel, _ = ql.quantize_model(_ChannelMean(), (QuantRule(".*"),), X2D[:2])
    v = qmodel.calibrate(jax.jit(qmodel.init)(jax.random.key(0), X2D[:2]), [X2D])
    with pytest.raises(ValueError, match="reduce_sum.*only the mean over all spatial axes"):
        C.convert(qmodel, v, X2D[:1], output_qparams=QParams(jnp.float32(0.1), jnp.float32(0)))


def test_dynamic_activation_scales_are_refused():
    """A rule with dynamic activation ranges has no deployable program: an error, not the
    calibrated ranges silently swapped in."""
    model, x, _ = MODELS["cnn_1d"]
    qmodel, _ = ql.quantize_model(model, QuantRule(".*", act_scale="dynamic_per_example"), x[:2])
    v = qmodel.calibrate(jax.jit(qmodel.init)(jax.random.key(0), x[:2]), [x])
    with pytest.raises(ValueError, match="act_scale='dynamic_per_example'"):
        C.convert(qmodel, v, x[:1], output_qparams=QParams(jnp.float32(0.1), jnp.float32(0)))


# --- the program file through the safetensors package: old files, packed weights, modes ---

_V5_SHA256 = {
    "program_v5.safetensors": "8b7b2be9125849f7931715b278b2725d5e4d23150f74fcf683fec6c294691d04",
    "program_v5_expected.npz": "f2f64198d0c2e391aef9d8fd091fec0b8c09dd231f9ee08f984fc6f7a44b6362",
}


def _make_program_v5():
    """``tests/data/make_program_v5.py`` as a module (it builds the program in the file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_program_v5", DATA / "make_program_v5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_version_5_file_loads_and_runs_to_its_stored_outputs():
    """A file written by the version 5 code (hand-written layout) loads with today's code to
    the program its script builds, and runs to the int8 codes that code computed."""
    for name, digest in _V5_SHA256.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest, name
    loaded = C.load(DATA / "program_v5.safetensors")
    _assert_same_program(loaded, _make_program_v5().build())
    expected = np.load(DATA / "program_v5_expected.npz")
    got = RUN(loaded, loaded.quantize_input(expected["x"]))
    assert got.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(got), expected["y"])


def test_version_5_checksum_is_still_verified(tmp_path):
    raw = bytearray((DATA / "program_v5.safetensors").read_bytes())
    raw[-1] ^= 1  # the last data byte
    (tmp_path / "p").write_bytes(raw)
    with pytest.raises(ValueError, match="sha256 checksum mismatch"):
        C.load(tmp_path / "p")


def _low_bit_program():
    """``_tiny_program`` with its weights redrawn in narrower ranges, odd sizes: conv1 int4
    (2 x 3 x 4 = 24 codes, incl. -8), conv2 int2 (16 codes in [-2, 1]), head uint4 (36 codes
    in [0, 15], one of them 15); the int8 fallback is tested by the other programs."""
    p = _tiny_program()
    rng = np.random.default_rng(1)
    conv1, conv2, add, pool, flat, head = p.layers
    w1 = rng.integers(-8, 8, (1, 3, 2, 4)).astype(np.int8)
    w1.flat[5] = -8
    w2 = rng.integers(-2, 2, (1, 1, 4, 4)).astype(np.int8)
    w3 = rng.integers(0, 16, (12, 3)).astype(np.int8)
    w3.flat[7] = 15
    layers = (dataclasses.replace(conv1, w=w1), dataclasses.replace(conv2, w=w2), add, pool,
              flat, dataclasses.replace(head, w=w3))  # fmt: skip
    return dataclasses.replace(p, layers=layers)


def test_low_bit_weights_are_stored_packed_and_load_bit_exact(tmp_path):
    program = _low_bit_program()
    size = C.save(program, tmp_path / "p")
    tensors, metadata = C.read_tensors(tmp_path / "p")
    meta = json.loads(metadata["jquant_program"])
    assert [e[3].get("w_storage") for e in meta["layers"]] == [
        "int4", "int2", None, None, None, "uint4"]  # fmt: skip
    assert "i8" not in tensors  # no layer needs 8 bits
    assert tensors["u8"].size == 24 // 2 + 16 // 4 + -(-36 // 2)  # 34 bytes for 76 codes
    loaded = C.load(tmp_path / "p")
    _assert_same_program(loaded, program)
    x = jax.random.normal(jax.random.key(0), (8, 6, 2))
    np.testing.assert_array_equal(_program_codes(loaded, x), _program_codes(program, x))
    # the same program with one code each needing 8 bits (int8 storage) takes more bytes
    wide = _replace_layer(program, 0, w=np.asarray(program.layers[0].w).copy())
    wide.layers[0].w.flat[0] = -128
    wide = _replace_layer(wide, 5, w=np.where(program.layers[5].w == 15, 127, program.layers[5].w))
    assert C.save(wide, tmp_path / "wide") > size
    _, metadata = C.read_tensors(tmp_path / "wide")
    entries = json.loads(metadata["jquant_program"])["layers"]
    assert [e[3].get("w_storage") for e in entries] == [
        "int8", "int2", None, None, None, "int8"]  # fmt: skip
    _assert_same_program(C.load(tmp_path / "wide"), wide)


@pytest.mark.slow  # ~15-25 s on 2 shared cores (two conversions of the zoo CNN)
def test_int4_program_file_is_at_most_0_55x_its_int8_file(tmp_path):
    """The zoo's MNIST-1D CNN (untrained: the size does not depend on the values), weights
    per channel at 8 and 4 bits: the int4 file (weights two per byte) is <= 0.55x the int8
    one, and loads to the identical program."""
    from jquant.models.linen import make_model

    x = jax.random.normal(jax.random.key(0), (32, 40, 1))
    model = make_model("cnn", (40, 1), 10)
    sizes = {}
    for bits in (8, 4):
        qmodel, _ = ql.quantize_model(model, QuantRule(".*", weight=IntFormat(bits)), x[:2])
        v = qmodel.calibrate(jax.jit(qmodel.init)(jax.random.key(1), x[:2]), [x])
        oqp = C.output_qparams_from_data(qmodel, v, [x])
        program = C.convert(qmodel, v, x[:1], output_qparams=oqp)
        sizes[bits] = C.save(program, tmp_path / f"int{bits}")
        _, metadata = C.read_tensors(tmp_path / f"int{bits}")
        layers = json.loads(metadata["jquant_program"])["layers"]
        storages = {e[3]["w_storage"] for e in layers if "w_storage" in e[3]}
        assert storages == {f"int{bits}"}
    loaded = C.load(tmp_path / "int4")
    _assert_same_program(loaded, program)
    np.testing.assert_array_equal(_program_codes(loaded, x), _program_codes(program, x))
    assert sizes[4] <= 0.55 * sizes[8], sizes  # measured: 15568 / 28768 = 0.54


def _saved_and_loaded(program, path):
    C.save(program, path)
    _, metadata = C.read_tensors(path)
    return C.load(path), json.loads(metadata["jquant_program"])["layers"]


@pytest.mark.parametrize(
    "target",
    ["litert_ref", "xnnpack", {"conv": "single", "add": "fp32", "dense": "double"}],
    ids=["litert_ref", "xnnpack", "mapping"],
)
def test_retargeted_programs_round_trip_bit_for_bit(residual, target, tmp_path):
    """Per-layer requantization modes (conv double, dense single for LiteRT's reference
    kernels) survive save -> load: the same leaves and the same codes as in memory."""
    x, qmodel, v, oqp, _, rq = residual
    program = C.retarget(
        C.convert(qmodel, v, x[:1], output_qparams=oqp, residual_qparams=rq), target
    )
    modes = C.TARGETS[target] if isinstance(target, str) else target
    want = {"conv1": modes["conv"], "conv2": modes["conv"], "head": modes["dense"]}
    linear = {layer.path: layer.requant.mode for layer in program.layers if hasattr(layer, "w")}
    assert linear == want
    loaded, entries = _saved_and_loaded(program, tmp_path / "p")
    assert [e[3].get("mode") for e in entries] == [
        getattr(layer, "requant", None) and layer.requant.mode for layer in program.layers
    ]
    _assert_same_program(loaded, program)
    np.testing.assert_array_equal(_program_codes(loaded, x), _program_codes(program, x))


def test_retargeted_mean_program_round_trips(branch_gap, tmp_path):
    qmodel, v, oqp, _, rq = branch_gap
    program = C.convert(qmodel, v, X2D[:1], output_qparams=oqp, residual_qparams=rq)
    program = C.retarget(program, {"conv": "fp32", "mean": "single", "dense": "double"})
    loaded, entries = _saved_and_loaded(program, tmp_path / "p")
    assert [e[3].get("mode") for e in entries] == [
        "fp32", "fp32", "fp32", None, "single", "double"]  # fmt: skip
    _assert_same_program(loaded, program)
    np.testing.assert_array_equal(_program_codes(loaded, X2D), _program_codes(program, X2D))


def _rewrite_v6(path, out, edit) -> None:
    """``path``'s tensors and program metadata after ``edit(meta)``, with a valid checksum
    (computed here from the format's definition) written to ``out``."""
    tensors, metadata = C.read_tensors(path)
    meta = json.loads(metadata["jquant_program"])
    edit(meta)
    metadata = {"jquant_program": json.dumps(meta)}
    layout = {
        "metadata": metadata,
        "tensors": {k: [a.dtype.name, list(a.shape)] for k, a in tensors.items()},
    }
    h = hashlib.sha256(json.dumps(layout, sort_keys=True, separators=(",", ":")).encode())
    for k in sorted(tensors):
        h.update(tensors[k].astype(tensors[k].dtype.newbyteorder("<")).tobytes())
    C.write_tensors(out, tensors, {**metadata, "jquant_sha256": h.hexdigest()})


def _set(i, key, value):
    def edit(meta):
        meta["layers"][i][3][key] = value

    return edit


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda m: None, None),  # the checksum written by the test is the format's
        (_set(0, "mode", "half"), r"'conv1'.*mode must be in"),
        (_set(0, "w_storage", "int3"), r"'conv1'.*w_storage must be in"),
        (_set(0, "w_storage", "int8"), "packed tensor 'i8'"),
        (_set(0, "w_storage", "int2"), "packed tensor 'u8' has 6 extra"),  # 24 codes: 12 -> 6 B
        (_set(0, "w_shape", [1, 3, 2]), "weight shape must be 4 positive integers"),
        (_set(2, "w_shape", [1]), r"stored fields of 'add' 'add' must be exactly \['mode'\]"),
        (lambda m: m["layers"][3].pop(), "a 'pool' entry has 4 items"),
        (lambda m: m["layers"][0][3].pop("mode"), "must be exactly"),
    ],
)
def test_bad_stored_fields_raise_value_error(tmp_path, edit, match):
    C.save(_low_bit_program(), tmp_path / "p")
    _rewrite_v6(tmp_path / "p", tmp_path / "q", edit)
    if match is None:
        _assert_same_program(C.load(tmp_path / "q"), _low_bit_program())
        return
    with pytest.raises(ValueError, match=match) as e:
        C.load(tmp_path / "q")
    assert str(tmp_path / "q") in str(e.value)


@functools.cache
def _low_bit_file() -> bytes:
    path = pathlib.Path(tempfile.mkdtemp()) / "low_bit.safetensors"
    C.save(_low_bit_program(), path)
    return path.read_bytes()


@hypothesis.settings(deadline=None)
@hypothesis.given(st.data())
def test_version_6_metadata_of_wrong_types_raises_value_error(tmp_path_factory, data):
    """Any value (or a deletion) anywhere in a version 6 file's metadata, the checksum made
    valid again: the file loads or load raises ValueError naming it, never another error."""
    path = tmp_path_factory.mktemp("v6") / "p"
    path.write_bytes(_low_bit_file())

    def edit(meta):
        where = data.draw(st.sampled_from([w for w in _locations(meta) if w]), "where")
        parent = functools.reduce(lambda v, k: v[k], where[:-1], meta)
        if isinstance(parent, dict) and data.draw(st.booleans(), "delete"):
            del parent[where[-1]]
        else:
            parent[where[-1]] = data.draw(_json_values(), "value")

    _rewrite_v6(path, path, edit)
    try:
        C.load(path)
    except ValueError as e:
        assert str(path) in str(e)
