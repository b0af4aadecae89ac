"""Tests of ``QuantRule.requant``: the eval forward is the integer program, bit for bit.

Oracle: ``run(convert(..., mode=m), x)`` (the integer program: int8 codes, int32
accumulators, the mode's fixed-point requantization, TFLite ``ADD``), computed independently
of the layers' eval forward (``jquant.integer`` kernels on the program's own int8 weights).
The eval forward of the same model with ``requant=m`` on its rules, quantized with the
output QParams, must equal it in every code, in all three modes; the plain fake-quant eval
forward (``requant=None``) rounds once and differs on some codes in ``double``.
"""

import dataclasses
import functools

import flax.linen as nn
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
from jquant.quant import qparams_from_range, quantize

MODES = ("double", "single", "fp32")
X1D = jax.random.normal(jax.random.key(7), (64, 16, 1))
X2D = jax.random.normal(jax.random.key(8), (64, 8, 8, 1))


class _ResCNN(nn.Module):
    """conv -> relu -> QAdd(conv(h), h) -> relu -> max pool -> dense: the residual ``+``
    written as a :class:`QAdd` (a plain ``a + b`` outside eval with requant)."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(6, (3,), name="conv1")(x))
        y = nn.relu(ql.QAdd(name="add")(nn.Conv(6, (3,), name="conv2")(h), h))
        y = nn.max_pool(y, (2,), strides=(2,))
        return nn.Dense(10, name="head")(y.reshape(y.shape[0], -1))


class _Depthwise(nn.Module):
    """conv -> depthwise conv (multiplier 2, SAME, stride 2) -> max pool -> dense."""

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3), padding="SAME", name="conv1")(x))
        h = nn.relu(nn.Conv(8, (3, 3), strides=2, feature_group_count=4, name="dw")(h))
        h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
        return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))


MODELS = {
    "mlp": (MLP(MLPConfig(hidden=(16, 16))), X2D, (QuantRule(".*"),)),
    "cnn_1d": (CNN(CNNConfig(features=(8,), dense=())), X1D, (QuantRule(".*"),)),
    "cnn_2d": (
        CNN(CNNConfig(features=(4, 6), kernel_size=(3, 3), dense=(8,))),
        X2D,
        (QuantRule(".*", act="uint8"),),
    ),
    "depthwise": (_Depthwise(), X2D, (QuantRule(".*"),)),
    "residual": (_ResCNN(), X1D, (QuantRule(".*"),)),
    # BatchNorm folded (one gamma negative, one zero), 4-bit inner layers (narrow clamps)
    "cnn_bn_1d": (
        CNN(CNNConfig(features=(8, 8), dense=(16,), batch_norm=True)),
        X1D,
        (QuantRule("conv1|head"), QuantRule(".*", weight=IntFormat(4), act=IntFormat(4))),
    ),
}


def _non_trivial_bn(variables):
    """BatchNorm statistics and affine parameters away from the identity: gamma in
    [0.5, 2] with channel 0 negative and channel 1 zero."""
    variables = jax.tree.map(lambda a: a, variables)
    key = jax.random.key(1)
    for name in list(variables.get("batch_stats", {})):
        key, k1, k2, k3, k4 = jax.random.split(key, 5)
        st, p = variables["batch_stats"][name], variables["params"][name]
        c = st["mean"].shape[0]
        st["mean"] = 0.3 * jax.random.normal(k1, (c,))
        st["var"] = jax.random.uniform(k2, (c,), minval=0.2, maxval=3.0)
        gamma = jax.random.uniform(k3, (c,), minval=0.5, maxval=2.0)
        p["scale"] = gamma.at[0].set(-1.3).at[1].set(0.0)
        p["bias"] = 0.2 * jax.random.normal(k4, (c,))
    return variables


def _with_requant(rules, mode):
    return tuple(dataclasses.replace(r, requant=mode) for r in rules)


@functools.cache
def _calibrated(name):
    """``(model, x, rules, variables, output QParams, residual QParams)``: calibrated on half
    the inputs, checked on all of them."""
    model, x, rules = MODELS[name]
    qmodel, _ = ql.quantize_model(model, rules, x[:2])
    v = _non_trivial_bn(jax.jit(qmodel.init)(jax.random.key(0), x[:2]))
    v = qmodel.calibrate(v, [x[:32]])
    oqp = C.output_qparams_from_data(qmodel, v, [x])
    rq = C.residual_qparams_from_data(qmodel, v, [x]) if name == "residual" else None
    return model, x, rules, v, oqp, rq


def _program_codes(name, mode, x=None):
    _, x0, _, v, oqp, rq = _calibrated(name)
    qmodel, _ = ql.quantize_model(MODELS[name][0], MODELS[name][2], x0[:2])
    program = C.convert(qmodel, v, x0[:1], output_qparams=oqp, mode=mode, residual_qparams=rq)
    x = x0 if x is None else x
    return np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)


def _eval_codes(name, mode, x=None):
    model, x0, rules, v, oqp, rq = _calibrated(name)
    qmodel, _ = ql.quantize_model(model, _with_requant(rules, mode), x0[:2])
    vr = C.with_requant_constants(qmodel, v, x0[:1], output_qparams=oqp, residual_qparams=rq)
    y = jax.jit(qmodel.with_phase("eval").apply)(vr, x0 if x is None else x)
    return np.asarray(quantize(y, oqp, int8)).astype(np.int32)


def _check(name, mode):
    want = _program_codes(name, mode)
    assert len(np.unique(want)) > 20  # not saturated
    np.testing.assert_array_equal(_eval_codes(name, mode), want, err_msg=f"{name} {mode}")


@pytest.mark.parametrize("mode", MODES)
def test_mlp_eval_forward_equals_the_program(mode):
    _check("mlp", mode)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["cnn_1d", "cnn_bn_1d", "cnn_2d", "depthwise", "residual"])
def test_conversion_models_eval_forward_equals_the_program(name, mode):
    _check(name, mode)


@pytest.mark.slow
def test_residual_without_requant_rounds_differently():
    # the plain fake-quant eval adds floats; the requant eval adds int8 codes as the program:
    # the oracle separates them (else the bit-exact test above would prove nothing)
    model, x, rules, v, oqp, rq = _calibrated("residual")
    qmodel, _ = ql.quantize_model(model, rules, x[:2])
    plain = np.asarray(quantize(jax.jit(qmodel.with_phase("eval").apply)(v, x), oqp, int8))
    assert np.any(plain.astype(np.int32) != _program_codes("residual", "double"))


def test_train_and_calibrate_phases_are_unchanged():
    model, x, rules, v, *_ = _calibrated("mlp")
    plain, _ = ql.quantize_model(model, rules, x[:2])
    rq, _ = ql.quantize_model(model, _with_requant(rules, "double"), x[:2])
    for phase in ("train", "float"):
        a = plain.with_phase(phase).apply(v, x[:4])
        b = rq.with_phase(phase).apply(v, x[:4])  # no constants needed outside eval
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_without_constants_names_the_layer():
    model, x, rules, v, *_ = _calibrated("mlp")
    qmodel, _ = ql.quantize_model(model, _with_requant(rules, "single"), x[:2])
    with pytest.raises(ValueError, match=r"layer 'dense1'.*with_requant_constants"):
        qmodel.with_phase("eval").apply(v, x[:2])


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(requant="triple"), r"QuantRule.requant must be one of"),
        (dict(requant="double", act_scale="dynamic_per_tensor"), "static activation scales"),
        (dict(requant="fp32", weight="fp8_e4m3"), "signed static integer weights"),
        (dict(requant="single", weight_symmetric=False), "symmetric signed"),
        (dict(requant="double", act="int16"), "<= 8 bits"),
        (dict(requant="double", keep_float=True), "keep_float"),
    ],
)
def test_rules_the_program_cannot_honour_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        QuantRule(".*", **kw)


@pytest.mark.slow
def test_batch_norm_folded_into_constants_needs_its_requant_layer():
    # the BatchNorm passes through only after a layer with requant: the same variables with
    # requant-free rules would skip it silently, so they raise, naming it
    model = CNN(CNNConfig(features=(4,), dense=(), batch_norm=True))
    x = X1D[:8]
    rules = (QuantRule(".*", requant="double"),)
    qmodel, _ = ql.quantize_model(model, rules, x[:2])
    v = qmodel.calibrate(jax.jit(qmodel.init)(jax.random.key(0), x[:2]), [x])
    oqp = qparams_from_range(jnp.float32(-3.0), jnp.float32(3.0), int8)
    vr = C.with_requant_constants(qmodel, v, x[:1], output_qparams=oqp)
    plain, _ = ql.quantize_model(model, QuantRule(".*"), x[:2])
    with pytest.raises(ValueError, match=r"BatchNorm 'bn1' is folded into the requant"):
        plain.with_phase("eval").apply(vr, x[:2])


@pytest.mark.slow
def test_folded_conv_bn_layer_refuses_requant_in_eval():
    from jquant.nn.bn_folding import QConvBN

    rule = QuantRule(".*", requant="fp32")
    layer = QConvBN(4, (3,), rule=rule, phase="calibrate")
    x = X1D[:4]
    v = layer.init(jax.random.key(0), x)
    v = {**v, **layer.apply(v, x, mutable=["quant_stats"])[1]}
    with pytest.raises(ValueError, match=r"requant='fp32' is supported on Conv / Dense"):
        layer.clone(phase="eval").apply(v, x)


@pytest.mark.slow
def test_mnist1d_cnn_whole_test_set_eval_forward_equals_the_program():
    from jquant.data import load_mnist1d
    from jquant.models import train as T

    data = load_mnist1d()
    trained = T.train_or_load("cnn", data, 0, 3000)
    x0, x = data.x_train[:2], data.x_test
    rules = (QuantRule(".*"),)
    qmodel, _ = ql.quantize_model(trained.model, rules, x0)
    calib = [data.x_train[i * 128 : (i + 1) * 128] for i in range(8)]
    v = qmodel.calibrate(qmodel.attach(trained.variables, x0), calib)
    oqp = C.output_qparams_from_data(qmodel, v, calib)
    plain = np.asarray(quantize(jax.jit(qmodel.with_phase("eval").apply)(v, x), oqp, int8))
    for mode in MODES:
        program = C.convert(qmodel, v, x0, output_qparams=oqp, mode=mode)
        want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
        qm, _ = ql.quantize_model(trained.model, _with_requant(rules, mode), x0)
        vr = C.with_requant_constants(qm, v, x0, output_qparams=oqp)
        got = np.asarray(quantize(jax.jit(qm.with_phase("eval").apply)(vr, x), oqp, int8))
        np.testing.assert_array_equal(got.astype(np.int32), want, err_msg=mode)
        if mode == "double":  # the plain eval forward rounds once: some codes differ
            assert np.any(plain.astype(np.int32) != want)


class _HandBuiltRes(nn.Module):
    """The residual CNN from jquant layers, each with its own rule and phase."""

    rule: QuantRule = QuantRule(".*")
    phase: str = "float"

    @nn.compact
    def __call__(self, x):
        q = {"rule": self.rule, "phase": self.phase}
        h = nn.relu(ql.QConv(6, (3,), name="conv1", **q)(x))
        y = nn.relu(ql.QAdd(name="add", **q)(ql.QConv(6, (3,), name="conv2", **q)(h), h))
        y = nn.max_pool(y, (2,), strides=(2,))
        return ql.QDense(10, name="head", **q)(y.reshape(y.shape[0], -1))


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_hand_built_layers_with_their_own_rules_equal_the_program(mode):
    x = X1D
    model = _HandBuiltRes()
    v = dict(jax.jit(model.init)(jax.random.key(0), x[:2]))
    calib = jax.jit(
        lambda v, x: _HandBuiltRes(phase="calibrate").apply(v, x, mutable=["quant_stats"])
    )
    v["quant_stats"] = calib(v, x[:32])[1]["quant_stats"]
    y = jax.jit(_HandBuiltRes(phase="eval").apply)(v, x)
    oqp = qparams_from_range(jnp.min(y), jnp.max(y), int8)
    program = C.convert(model, v, x[:1], output_qparams=oqp, mode=mode)
    want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
    rule = QuantRule(".*", requant=mode)
    # built in phase float, as convert traces it; the same layers in eval compute the program
    vr = C.with_requant_constants(_HandBuiltRes(rule), v, x[:1], output_qparams=oqp)
    got = jax.jit(_HandBuiltRes(rule, "eval").apply)(vr, x)
    got = np.asarray(quantize(got, oqp, int8)).astype(np.int32)
    assert len(np.unique(want)) > 20
    np.testing.assert_array_equal(got, want)
