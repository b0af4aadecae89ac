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


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name", ["mlp", "cnn_1d", "cnn_bn_1d", "cnn_2d", "depthwise", "residual"]
)
def test_nnx_conversion_models_eval_forward_equals_the_program(name, mode):
    if (name, mode) == ("mlp", "double"):
        pytest.skip("the default run's test_nnx_mlp_eval_forward_equals_the_program")
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
