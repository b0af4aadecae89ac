"""Tests of jquant.nn.einsum: einsum parsing and the QEinsum layer.

Oracles: np.einsum (float, and on NumPy-fake-quantized operands), Flax's nn.Einsum (variable
shapes), simulate == int mode.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jquant.nn.einsum import QEinsum, einsum_dims
from jquant.nn.rules import QuantRule

# (einsum, input shape, kernel shape): kernel last axis free / contracted, batch axes, a
# transposed output.
CASES = [
    ("bd,dh->bh", (3, 4), (4, 5)),
    ("bd,hd->bh", (3, 4), (5, 4)),
    ("btd,dnh->bnth", (2, 3, 4), (4, 2, 3)),
    ("nbd,ndh->bnh", (2, 3, 4), (2, 4, 3)),
]


def _np_fake_quant(x, scale, zp, qmin, qmax):
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


@pytest.mark.parametrize("eq, xs, ks", CASES)
def test_einsum_dims_is_einsum(eq, xs, ks):
    a = np.random.default_rng(0).normal(size=xs).astype(np.float32)
    b = np.random.default_rng(1).normal(size=ks).astype(np.float32)
    dims = einsum_dims(eq)
    got = jnp.transpose(lax.dot_general(a, b, dims.dimension_numbers), dims.perm)
    np.testing.assert_allclose(got, np.einsum(eq, a, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "eq", ["...d,dh->...h", "ii,ij->j", "ij,jk->ikl", "ij,jk", "ij,jk,kl->il", "ijk,jl->il"]
)
def test_einsum_dims_rejects_non_dot_general(eq):
    with pytest.raises(ValueError, match="einsum_str"):
        einsum_dims(eq)


DEFAULT = QuantRule(".*")


def _apply(layer, v, x, **kw):
    """``layer.apply`` under one jit (eager Flax compiles every primitive separately)."""
    return jax.jit(lambda v, x: layer.apply(v, x, **kw))(v, x)


def _init(eq, xs, ks, phase="float", rule=DEFAULT):
    x = jnp.asarray(np.random.default_rng(0).normal(size=xs), jnp.float32)
    layer = QEinsum(ks, eq, rule=rule, phase=phase, bias_init=nn.initializers.normal(1.0))
    return x, layer, jax.jit(layer.init)(jax.random.key(1), x)


@pytest.mark.parametrize("eq, xs, ks", [CASES[1], CASES[2]])
def test_float_and_eval_are_einsums_of_float_and_fake_quantized_operands(eq, xs, ks):
    x, layer, v = _init(eq, xs, ks, phase="calibrate")
    ref = nn.Einsum(ks, eq)
    ref_shapes = jax.tree_util.tree_map(jnp.shape, jax.eval_shape(ref.init, jax.random.key(1), x))
    assert jax.tree_util.tree_map(jnp.shape, v["params"]) == ref_shapes["params"]
    y_float, upd = _apply(layer, v, x, mutable=["quant_stats"])
    y_ref = np.asarray(_apply(ref, {"params": v["params"]}, x), np.float64)
    np.testing.assert_allclose(y_float, y_ref, atol=1e-6)
    v = {**v, **upd}
    xn, w = np.asarray(x, np.float64), np.asarray(v["params"]["kernel"], np.float64)
    lo, hi = min(xn.min(), 0.0), max(xn.max(), 0.0)
    s_x = (hi - lo) / 255
    zp_x = np.clip(np.round(-128 - lo / s_x), -128, 127)
    np.testing.assert_allclose(v["quant_stats"]["input_qparams"]["scale"], s_x, rtol=1e-6)
    rhs, out = eq.split(",")[1].split("->")
    contracted = tuple(i for i, c in enumerate(rhs) if c not in out)
    s_w = np.abs(w).max(axis=contracted, keepdims=True) / 127  # per non-contracted kernel axes
    y_q = np.einsum(
        eq, _np_fake_quant(xn, s_x, zp_x, -128, 127), _np_fake_quant(w, s_w, 0, -128, 127)
    )
    bias = y_ref - np.einsum(eq, xn, w)  # Flax's bias, broadcast its way
    for mode in ("simulate", "int"):
        y = _apply(layer.clone(phase="eval", rule=QuantRule(".*", mode=mode)), v, x)
        np.testing.assert_allclose(y, y_q + bias, atol=1e-5, err_msg=mode)
    assert np.abs(np.einsum(eq, xn, w) + bias - y).max() > 1e-3  # quantization did something


def test_train_gradients_reach_kernel_bias_and_learned_scale():
    rule = QuantRule(".*", estimator="lsq")
    x, layer, v = _init("bd,hd->bh", (3, 4), (5, 4), phase="calibrate", rule=rule)
    _, upd = _apply(layer, v, x, mutable=["quant_stats"])
    v = {**v, **upd}
    train = layer.clone(phase="train")
    g = jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(train.apply({**v, "params": p}, x)))))(
        v["params"]
    )
    assert set(g) == {"kernel", "bias", "input_scale", "kernel_scale"}
    for name, gv in g.items():
        assert np.all(np.isfinite(gv)) and np.abs(gv).max() > 1e-5, name


def test_keep_float_rule_and_bad_phase():
    x, layer, v = _init("bd,dh->bh", (3, 4), (4, 5))
    kf = layer.clone(phase="eval", rule=QuantRule(".*", keep_float=True))
    np.testing.assert_allclose(_apply(kf, v, x), _apply(layer, v, x), atol=0)
    with pytest.raises(ValueError, match="phase"):
        layer.clone(phase="bogus").apply(v, x)


class _HandBuilt(nn.Module):
    """A model holding a hand-built QEinsum (its own phase "float") beside a plain Dense."""

    @nn.compact
    def __call__(self, x):
        y = QEinsum((5, 4), "bd,hd->bh", bias_init=nn.initializers.normal(1.0), name="qe")(x)
        return y, nn.Dense(2, name="head")(x)


def test_hand_built_qeinsum_follows_the_rule_quantized_models_phase_and_calibrate():
    from jquant.nn import linen as ql

    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4)), jnp.float32)
    model = _HandBuilt()
    qm, match = ql.quantize_model(model, QuantRule("head"), x)
    assert list(match.assignment) == ["head"]
    v = qm.attach(jax.jit(model.init)(jax.random.key(1), x), x)
    assert "input_qparams" not in v["quant_stats"]["qe"]  # not calibrated yet
    with pytest.raises(ValueError, match="'qe'.*never calibrated"):
        jax.jit(qm.with_phase("eval").apply)(v, x)  # eval reaches the QEinsum too
    v = qm.calibrate(v, [x, 2 * x])
    x2 = 2 * np.asarray(x, np.float64)  # running min / max over both batches: those of 2x
    lo, hi = min(x2.min(), 0.0), max(x2.max(), 0.0)
    s_x = (hi - lo) / 255
    zp_x = np.clip(np.round(-128 - lo / s_x), -128, 127)
    np.testing.assert_allclose(v["quant_stats"]["qe"]["input_qparams"]["scale"], s_x, rtol=1e-6)
    w = np.asarray(v["params"]["qe"]["kernel"], np.float64)
    s_w = np.abs(w).max(axis=1, keepdims=True).T / 127  # one scale per output h
    xq = _np_fake_quant(np.asarray(x, np.float64), s_x, zp_x, -128, 127)
    y_ref = xq @ _np_fake_quant(w, s_w.T, 0, -128, 127).T + np.asarray(v["params"]["qe"]["bias"])
    y_eval, _ = jax.jit(qm.with_phase("eval").apply)(v, x)
    np.testing.assert_allclose(y_eval, y_ref, atol=1e-5)
    y_float, _ = jax.jit(qm.apply)(v, x)  # the model's float phase: the QEinsum is float
    np.testing.assert_allclose(y_float, np.asarray(x) @ w.T + v["params"]["qe"]["bias"], atol=1e-5)
    assert np.abs(y_float - y_eval).max() > 1e-3
