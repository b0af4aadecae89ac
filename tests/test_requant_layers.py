"""Tests of ``QuantRule.requant``: the eval forward is the integer program, bit for bit.

Oracle: ``run(convert(..., mode=m), x)`` (the integer program: int8 codes, int32
accumulators, the mode's fixed-point requantization, TFLite ``ADD``, ``AVERAGE_POOL_2D``,
``MEAN``), computed independently of the layers' eval forward (``jquant.integer`` kernels on
the program's own int8 weights). The eval forward of the same model (Linen or NNX) with
``requant=m`` on its rules, quantized with the output QParams, must equal it in every code,
in all three modes; the plain fake-quant eval forward (``requant=None``) rounds once and
differs on some codes in ``double``.
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
from jquant.nn.state import STATS, QuantStat
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


# --- NNX: the same models, NNX layers (jquant.models.nnx, or written here) -------------------


def _nnx_models():
    """``{name: (make(rngs), x, rules)}``: the conversion models in NNX (flax.nnx imported
    here, as the other NNX tests do)."""
    from flax import nnx

    from jquant.models import nnx as mn
    from jquant.nn import nnx as qn

    class Depthwise(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 4, (3, 3), padding="SAME", rngs=rngs)
            self.dw = nnx.Conv(4, 8, (3, 3), strides=2, feature_group_count=4, rngs=rngs)
            self.head = nnx.Linear(2 * 2 * 8, 10, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.dw(nnx.relu(self.conv1(x))))
            h = nnx.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
            return self.head(h.reshape(h.shape[0], -1))

    class Residual(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 6, (3,), rngs=rngs)
            self.conv2 = nnx.Conv(6, 6, (3,), rngs=rngs)
            self.add = qn.QAdd()
            self.head = nnx.Linear(8 * 6, 10, rngs=rngs)

        def __call__(self, x):
            h = nnx.relu(self.conv1(x))
            y = nnx.max_pool(nnx.relu(self.add(self.conv2(h), h)), (2,), strides=(2,))
            return self.head(y.reshape(y.shape[0], -1))

    def zoo(cfg, x):
        return lambda rngs: (mn.MLP if isinstance(cfg, MLPConfig) else mn.CNN)(
            cfg, x.shape[1:], rngs=rngs
        )

    def bn_cnn(rngs):  # the Linen cnn_bn_1d's weights and non-trivial BatchNorms
        model, x, _ = MODELS["cnn_bn_1d"]
        v = _non_trivial_bn(jax.jit(model.init)(jax.random.key(0), x[:2]))
        return mn.linen_to_nnx(v, mn.CNN(model.config, x.shape[1:], rngs=rngs))

    out = {name: (zoo(MODELS[name][0].config, MODELS[name][1]), *MODELS[name][1:])
           for name in ("mlp", "cnn_1d", "cnn_2d")}  # fmt: skip
    out["depthwise"] = (Depthwise, X2D, (QuantRule(".*"),))
    out["residual"] = (Residual, X1D, (QuantRule(".*"),))
    out["cnn_bn_1d"] = (bn_cnn, *MODELS["cnn_bn_1d"][1:])
    return out


@functools.cache
def _nnx_calibrated(name):
    """``(make, x, rules, QuantStat state, output QParams, residual QParams)`` of the
    calibrated NNX model (requant-free rules)."""
    from flax import nnx

    from jquant.nn import nnx as qn
    from jquant.nn.state import QuantStat

    make, x, rules = _nnx_models()[name]
    qnm, _ = qn.quantize_model(make(nnx.Rngs(0)), rules)
    qn.calibrate(qnm, [x[:32]])
    oqp = C.output_qparams_from_data(qnm, None, [x])
    rq = C.residual_qparams_from_data(qnm, None, [x])
    return qnm, nnx.state(qnm, QuantStat), oqp, rq


def _nnx_check(name, mode):
    """The NNX eval forward with ``requant=mode`` equals ``run(convert(nnx model))``."""
    from flax import nnx

    from jquant.nn import nnx as qn

    make, x, rules = _nnx_models()[name]
    qnm, stats, oqp, rq = _nnx_calibrated(name)
    program = C.convert(qnm, None, x[:1], output_qparams=oqp, mode=mode, residual_qparams=rq)
    want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
    assert len(np.unique(want)) > 20  # not saturated
    qr, _ = qn.quantize_model(make(nnx.Rngs(0)), _with_requant(rules, mode))
    nnx.update(qr, stats)  # the same calibration
    qr = C.with_requant_constants(qr, None, x[:1], output_qparams=oqp, residual_qparams=rq)
    y = nnx.jit(lambda m, x: m(x))(qn.with_phase(qr, "eval"), x)
    got = np.asarray(quantize(y, oqp, int8)).astype(np.int32)
    np.testing.assert_array_equal(got, want, err_msg=f"nnx {name} {mode}")
    return qr


def test_nnx_mlp_eval_forward_equals_the_program():
    _nnx_check("mlp", "double")


# every model x mode but the default run's (mlp, double)
_NNX_CASES = [
    (name, mode)
    for name in ("mlp", "cnn_1d", "cnn_bn_1d", "cnn_2d", "depthwise", "residual")
    for mode in MODES
    if (name, mode) != ("mlp", "double")
]


@pytest.mark.slow
@pytest.mark.parametrize("name, mode", _NNX_CASES)
def test_nnx_conversion_models_eval_forward_equals_the_program(name, mode):
    qr = _nnx_check(name, mode)
    if name == "cnn_bn_1d":  # the BatchNorms were folded into the constants: pass-through
        from jquant.nn import nnx as qn

        assert isinstance(qr.bn1, qn.RequantBatchNorm) and isinstance(qr.bn2, qn.RequantBatchNorm)


def test_nnx_with_requant_constants_leaves_the_model_and_refuses_variables():
    from flax import nnx

    from jquant.nn import nnx as qn

    make, x, rules = _nnx_models()["mlp"]
    _, stats, oqp, _ = _nnx_calibrated("mlp")
    qr, _ = qn.quantize_model(make(nnx.Rngs(0)), _with_requant(rules, "fp32"))
    nnx.update(qr, stats)
    out = C.with_requant_constants(qr, None, x[:1], output_qparams=oqp)
    assert not hasattr(qr.dense1, "requant")  # a copy holds the constants
    assert set(out.head.requant.get_value()) == {"b", "multiplier", "shift", "out_scale",
                                                 "out_zp", "clamp"}  # fmt: skip
    with pytest.raises(TypeError, match="pass variables=None"):
        C.with_requant_constants(qr, C.nnx_variables(qr), x[:1], output_qparams=oqp)
    with pytest.raises(ValueError, match=r"layer 'dense1'.*with_requant_constants"):
        nnx.jit(lambda m, x: m(x))(qn.with_phase(qr, "eval"), x[:2])


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


# --- average pool and spatial mean (QAvgPool, QMean), Linen and NNX ---------------------------


class _PoolMean(nn.Module):
    """conv -> relu -> QAvgPool 2x2 -> conv -> relu -> QMean (global average) -> dense; the
    pool keeps its own rule (``pool_rule``), the mean takes the rule of its path."""

    pool_rule: QuantRule = QuantRule(".*")

    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Conv(6, (3, 3), name="conv1")(x))
        h = ql.QAvgPool((2, 2), strides=(2, 2), rule=self.pool_rule, name="pool")(h)
        h = nn.relu(nn.Conv(8, (3, 3), name="conv2")(h))
        return nn.Dense(10, name="head")(ql.QMean(name="gap")(h))


def _pool_mean_check(mode, x=X2D):
    rules = (QuantRule(".*"),)
    qmodel, _ = ql.quantize_model(_PoolMean(), rules, x[:2])
    v = qmodel.calibrate(jax.jit(qmodel.init)(jax.random.key(0), x[:2]), [x[:32]])
    oqp = C.output_qparams_from_data(qmodel, v, [x])
    rq = C.residual_qparams_from_data(qmodel, v, [x])
    assert set(rq) == {"conv2"}  # read by the mean alone
    program = C.convert(qmodel, v, x[:1], output_qparams=oqp, mode=mode, residual_qparams=rq)
    assert [type(layer).__name__ for layer in program.layers] == [
        "Conv", "Pool", "Conv", "Mean", "Dense"
    ]  # fmt: skip
    assert program.layers[1].kind == "avg"
    want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
    assert len(np.unique(want)) > 20
    rule = QuantRule(".*", requant=mode)
    qr, _ = ql.quantize_model(_PoolMean(pool_rule=rule), (rule,), x[:2])
    vr = C.with_requant_constants(qr, v, x[:1], output_qparams=oqp, residual_qparams=rq)
    got = np.asarray(quantize(jax.jit(qr.with_phase("eval").apply)(vr, x), oqp, int8))
    np.testing.assert_array_equal(got.astype(np.int32), want, err_msg=mode)
    return qmodel, v, oqp, want


def test_avg_pool_and_mean_eval_forward_equals_the_program():
    qmodel, v, oqp, want = _pool_mean_check("double")
    # the plain fake-quant eval (float mean, the pool on its own grid) differs: the oracle
    # separates them
    plain = np.asarray(quantize(jax.jit(qmodel.with_phase("eval").apply)(v, X2D), oqp, int8))
    assert np.any(plain.astype(np.int32) != want)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["single", "fp32"])
def test_avg_pool_and_mean_eval_forward_equals_the_program_other_modes(mode):
    _pool_mean_check(mode)


def _nnx_pool_mean(pool_rule, rngs):
    from flax import nnx

    from jquant.nn import nnx as qn

    class PoolMean(nnx.Module):  # _PoolMean in NNX
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(1, 6, (3, 3), rngs=rngs)
            self.pool = qn.QAvgPool((2, 2), (2, 2), rule=pool_rule)
            self.conv2 = nnx.Conv(6, 8, (3, 3), rngs=rngs)
            self.gap = qn.QMean()
            self.head = nnx.Linear(8, 10, rngs=rngs)

        def __call__(self, x):
            h = self.pool(nnx.relu(self.conv1(x)))
            return self.head(self.gap(nnx.relu(self.conv2(h))))

    return PoolMean(rngs)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_nnx_avg_pool_and_mean_eval_forward_equals_the_program(mode):
    from flax import nnx

    from jquant.nn import nnx as qn

    x = X2D
    qnm, _ = qn.quantize_model(_nnx_pool_mean(QuantRule(".*"), nnx.Rngs(0)), QuantRule(".*"))
    qn.calibrate(qnm, [x[:32]])
    oqp = C.output_qparams_from_data(qnm, None, [x])
    rq = C.residual_qparams_from_data(qnm, None, [x])
    program = C.convert(qnm, None, x[:1], output_qparams=oqp, mode=mode, residual_qparams=rq)
    assert [layer.path for layer in program.layers] == ["conv1", "pool", "conv2", "gap", "head"]
    want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
    rule = QuantRule(".*", requant=mode)
    qr, _ = qn.quantize_model(_nnx_pool_mean(rule, nnx.Rngs(0)), rule)
    nnx.update(qr, nnx.state(qnm, QuantStat))
    qr = C.with_requant_constants(qr, None, x[:1], output_qparams=oqp, residual_qparams=rq)
    y = nnx.jit(lambda m, x: m(x))(qn.with_phase(qr, "eval"), x)
    got = np.asarray(quantize(y, oqp, int8)).astype(np.int32)
    assert len(np.unique(want)) > 20
    np.testing.assert_array_equal(got, want, err_msg=mode)


def test_function_call_avg_pool_is_refused_naming_it():
    # nn.avg_pool in a plain model stays float in the eval forward: refused, not approximated
    model = CNN(CNNConfig(features=(4,), dense=(), pool="avg"))
    x = X1D[:8]
    qmodel, _ = ql.quantize_model(model, QuantRule(".*", requant="double"), x[:2])
    v = qmodel.calibrate(jax.jit(qmodel.init)(jax.random.key(0), x[:2]), [x])
    oqp = qparams_from_range(jnp.float32(-3.0), jnp.float32(3.0), int8)
    with pytest.raises(ValueError, match=r"average pool at '<top level>'.*QAvgPool"):
        C.with_requant_constants(qmodel, v, x[:1], output_qparams=oqp)


# --- QConvBN (QAT conv + BN) and DenseGeneral ----------------------------------------------


class _ConvBNNet(nn.Module):
    """QConvBN -> relu -> max pool -> QDense, each with ``rule`` and ``phase``."""

    rule: QuantRule = QuantRule(".*")
    phase: str = "float"

    @nn.compact
    def __call__(self, x):
        from jquant.nn.bn_folding import QConvBN

        q = {"rule": self.rule, "phase": self.phase}
        x = QConvBN(6, (3,), use_running_average=True, name="conv1", **q)(x)
        x = nn.max_pool(nn.relu(x), (2,), strides=(2,))
        return ql.QDense(10, name="head", **q)(x.reshape(x.shape[0], -1))


@functools.cache
def _conv_bn_variables():
    x = X1D
    v = dict(jax.jit(_ConvBNNet().init)(jax.random.key(0), x[:2]))
    k = jax.random.split(jax.random.key(3), 4)  # BN away from the identity, gamma[0] < 0
    var = jax.random.uniform(k[1], (6,), minval=0.2, maxval=3)
    v["batch_stats"] = {"conv1": {"mean": 0.3 * jax.random.normal(k[0], (6,)), "var": var}}
    gamma = jax.random.uniform(k[2], (6,), minval=0.5, maxval=2.0).at[0].set(-1.3)
    beta = 0.2 * jax.random.normal(k[3], (6,))
    v["params"] = {**v["params"], "conv1": {**v["params"]["conv1"], "scale": gamma, "bias": beta}}
    calib = jax.jit(lambda v, x: _ConvBNNet(phase="calibrate").apply(v, x, mutable=[STATS]))
    v[STATS] = calib(v, x[:32])[1][STATS]
    return v


@pytest.mark.parametrize("mode", ["fp32", pytest.param("double", marks=pytest.mark.slow)])
def test_qconvbn_eval_forward_equals_the_program(mode):
    x, v = X1D, _conv_bn_variables()
    y = jax.jit(_ConvBNNet(phase="eval").apply)(v, x)
    oqp = qparams_from_range(jnp.min(y), jnp.max(y), int8)
    program = C.convert(_ConvBNNet(), v, x[:1], output_qparams=oqp, mode=mode)
    want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
    rule = QuantRule(".*", requant=mode)
    vr = C.with_requant_constants(_ConvBNNet(rule), v, x[:1], output_qparams=oqp)
    got = jax.jit(_ConvBNNet(rule, "eval").apply)(vr, x)
    got = np.asarray(quantize(got, oqp, int8)).astype(np.int32)
    assert len(np.unique(want)) > 20
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_nnx_qconvbn_eval_forward_equals_the_program(mode):
    from flax import nnx

    from jquant.nn import nnx as qn

    x, v = X1D, _conv_bn_variables()

    class ConvBNNet(nnx.Module):  # _ConvBNNet in NNX, the same variables
        def __init__(self, rule):
            rngs = nnx.Rngs(0)
            self.conv1 = qn.NnxQConvBN(
                1, 6, (3,), use_running_average=True, rule=rule, quant_path="conv1", rngs=rngs
            )
            self.head = qn.QLinear(48, 10, rule=rule, quant_path="head", rngs=rngs)

        def __call__(self, x):
            h = nnx.max_pool(nnx.relu(self.conv1(x)), (2,), strides=(2,))
            return self.head(h.reshape(h.shape[0], -1))

    def make(rule):
        m = ConvBNNet(rule)
        for c, t in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
            state = nnx.state(m, t)
            state.replace_by_pure_dict(v[c])
            nnx.update(m, state)
        for path in ("conv1", "head"):
            for name, value in v[STATS][path].items():
                setattr(getattr(m, path), name, QuantStat(value))
        return m

    plain = make(QuantRule(".*"))
    y = nnx.jit(lambda m, x: m(x))(qn.with_phase(plain, "eval"), x)
    oqp = qparams_from_range(jnp.min(y), jnp.max(y), int8)
    qn.with_phase(plain, "float")
    program = C.convert(plain, None, x[:1], output_qparams=oqp, mode=mode)
    want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
    linen = C.convert(_ConvBNNet(), v, x[:1], output_qparams=oqp, mode=mode)
    np.testing.assert_array_equal(  # the NNX twin converts to the Linen program
        want, np.asarray(jax.jit(C.run)(linen, linen.quantize_input(x))).astype(np.int32)
    )
    rule = QuantRule(".*", requant=mode)
    qr = C.with_requant_constants(make(rule), None, x[:1], output_qparams=oqp)
    got = nnx.jit(lambda m, x: m(x))(qn.with_phase(qr, "eval"), x)
    np.testing.assert_array_equal(np.asarray(quantize(got, oqp, int8)).astype(np.int32), want)


def test_dense_general_and_linear_general_refuse_requant_naming_the_layer():
    # the integer program has no DenseGeneral: refused in eval, never approximated
    from flax import nnx

    from jquant.nn import nnx as qn

    class DG(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.DenseGeneral((2, 3), name="proj")(x)

    x = X2D[:4, 0]  # (4, 8, 1)
    rule = QuantRule(".*", requant="single")
    qmodel, _ = ql.quantize_model(DG(), rule, x)
    v = qmodel.calibrate(jax.jit(qmodel.init)(jax.random.key(0), x), [x])
    with pytest.raises(ValueError, match=r"layer 'proj'.*supports nn.Dense and nn.Conv"):
        qmodel.with_phase("eval").apply(v, x)

    class LG(nnx.Module):
        def __init__(self):
            self.proj = nnx.LinearGeneral(1, (2, 3), rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.proj(x)

    qlg, _ = qn.quantize_model(LG(), rule)
    qn.calibrate(qlg, [x])
    with pytest.raises(ValueError, match=r"layer 'proj'.*requant='single' is supported on Conv"):
        qn.with_phase(qlg, "eval")(x)


class _ConvBNHead(nn.Module):
    """Conv (no bias) -> BatchNorm -> relu -> dense: trained with ``fold_bn=True``."""

    @nn.compact
    def __call__(self, x, train=False):
        y = nn.Conv(8, (3,), use_bias=False)(x)
        y = nn.relu(nn.BatchNorm(use_running_average=not train)(y))
        return nn.Dense(10)(y.reshape(y.shape[0], -1))


@pytest.mark.slow
def test_fold_bn_models_eval_forward_equals_the_program():
    # quantize_model(fold_bn=True) (Linen and NNX): in requant eval the conv + BN is the
    # program's fold (BN factor in the requantization, its sign in the weight codes)
    from flax import nnx

    from jquant.nn import nnx as qn

    class NnxConvBNHead(nnx.Module):  # the same paths, the same variables
        def __init__(self, rngs):
            self.Conv_0 = nnx.Conv(2, 8, (3,), use_bias=False, rngs=rngs)
            self.BatchNorm_0 = nnx.BatchNorm(8, rngs=rngs)
            self.Dense_0 = nnx.Linear(8 * 16, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.BatchNorm_0(self.Conv_0(x), use_running_average=True))
            return self.Dense_0(x.reshape(x.shape[0], -1))

    x = jax.random.normal(jax.random.key(0), (64, 16, 2))
    v = _ConvBNHead().init(jax.random.key(1), x)
    v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
    mode, rule = "double", QuantRule(".*")
    lq, _ = ql.quantize_model(_ConvBNHead(), rule, x, fold_bn=True)
    lv = lq.calibrate(lq.attach(v, x), [x])
    oqp = C.output_qparams_from_data(lq, lv, [x])
    program = C.convert(lq, lv, x[:2], output_qparams=oqp, mode=mode)
    want = np.asarray(jax.jit(C.run)(program, program.quantize_input(x))).astype(np.int32)
    assert len(np.unique(want)) > 20
    rule = QuantRule(".*", requant=mode)
    rq, _ = ql.quantize_model(_ConvBNHead(), rule, x, fold_bn=True)
    vr = C.with_requant_constants(rq, lv, x[:2], output_qparams=oqp)
    got = np.asarray(quantize(jax.jit(rq.with_phase("eval").apply)(vr, x), oqp, int8))
    np.testing.assert_array_equal(got.astype(np.int32), want, err_msg="linen")
    model = NnxConvBNHead(nnx.Rngs(0))
    params, stats = nnx.state(model, nnx.Param, nnx.BatchStat)
    params.replace_by_pure_dict(v["params"])
    stats.replace_by_pure_dict(v["batch_stats"])
    nnx.update(model, params, stats)
    qnm, _ = qn.quantize_model(model, rule, x, fold_bn=True)
    assert isinstance(qnm.BatchNorm_0, qn.FoldedBatchNorm)
    qn.calibrate(qnm, [x])
    qnm = C.with_requant_constants(qnm, None, x[:2], output_qparams=oqp)
    y = nnx.jit(lambda m, x: m(x))(qn.with_phase(qnm, "eval"), x)
    got = np.asarray(quantize(y, oqp, int8)).astype(np.int32)
    np.testing.assert_array_equal(got, want, err_msg="nnx")  # the same program as Linen's


def test_requantized_avg_pool_rounds_the_mean_code_half_away_from_zero():
    # TFLite AVERAGE_POOL_2D on codes (NumPy from the formula): ties (sum = 2 mod 4, or odd
    # sums of 2) round away from zero in the code domain, zero point included, which the
    # float mean rounded half-to-even on the grid does not
    rng = np.random.default_rng(0)
    s, z = np.float32(0.05), -3
    q = rng.integers(-128, 128, size=(4, 12, 3)).astype(np.int32)
    x = jnp.asarray(s * (q - z).astype(np.float32))
    rule = QuantRule(".*", requant="single")
    pool = ql.QAvgPool((2,), strides=(2,), rule=rule, phase="eval")
    c = {"out_scale": s, "out_zp": np.int32(z), "clamp": np.array([-128, 127], np.int32)}
    y = pool.apply({STATS: {"requant": jax.tree.map(jnp.asarray, c)}}, x)
    acc = q.reshape(4, 6, 2, 3).sum(2)
    want = np.sign(acc) * np.floor(np.abs(acc) / 2 + 0.5)
    np.testing.assert_array_equal(np.round(np.asarray(y) / s) + z, want)
    assert np.any(np.round(acc / 2 - z) + z != want)  # half-even on the grid differs


def test_pooling_layer_with_constants_but_no_requant_refuses():
    # constants stored for a QAvgPool / QMaxPool whose rule lacks requant: it would pool on
    # its own grid, silently not the program's
    x = X1D[:2]
    for cls in (ql.QAvgPool, ql.QMaxPool):
        layer = cls((2,), strides=(2,), rule=QuantRule(".*"), phase="eval")
        with pytest.raises(ValueError, match=r"pooling layer .* holds requantization constants"):
            layer.apply({STATS: {"requant": {"max_pool": jnp.int32(1)}}}, x)
