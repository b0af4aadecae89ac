"""Delayed scaling and per-pass backward settings in rules and layers (Linen and NNX).

Oracles: a NumPy replay of Transformer Engine's delayed-scaling rule on the amaxes of the
data, ml_dtypes fp8 casts for the forward and backward products, and
``jquant.ops.train_dot_general`` called directly with a BackwardConfig.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from flax import nnx

from jquant import ops
from jquant.formats import int8
from jquant.nn import linen as ql
from jquant.nn import nnx as qn
from jquant.nn.einsum import check_act_rule
from jquant.nn.rules import QuantRule
from jquant.nn.state import ScalingHistory, history_name
from jquant.ops import BackwardConfig, QuantConfig
from jquant.ops.scaling import AmaxHistory, record_amax, record_grad_amax

DENSE_DN = (((1,), (0,)), ((), ()))
E4M3_MAX, E5M2_MAX = 448.0, 57344.0
TENSORS = ("input", "kernel", "grad")


def _fp8_rule(history: int = 2, margin: float = 0, pattern: str = ".*") -> QuantRule:
    return QuantRule(
        pattern,
        weight="fp8_e4m3",
        act="fp8_e4m3",
        grad="fp8_e5m2",
        scaling="delayed",
        amax_history=history,
        margin=margin,
    )


# --- NumPy oracle ------------------------------------------------------------------------------


def _te_scale(history: np.ndarray, fmt_max: float, margin: float) -> np.float32:
    """Transformer Engine: ``scale_TE = fmt_max / amax / 2^margin`` (kept at 1 while the history
    is all zero); ours divides, so it is ``1 / scale_TE``."""
    amax = np.float32(history.max())
    if amax == 0:
        return np.float32(1.0)
    return np.float32(1.0) / (np.float32(fmt_max) / amax / np.float32(2.0**margin))


def _cast(v, scale, dtype, fmt_max):
    """Saturating fp8 cast of ``v / scale`` (ml_dtypes), back to float times ``scale``."""
    v = np.clip(np.asarray(v, np.float32) / scale, -fmt_max, fmt_max)
    return v.astype(dtype).astype(np.float32) * scale


def _push(history: np.ndarray, amax) -> np.ndarray:
    return np.concatenate([[np.float32(amax)], history[:-1]]).astype(np.float32)


# --- one training step, in Linen and in NNX ---------------------------------------------------


def _linen_stepper(rule, x0):
    layer = ql.QDense(3, rule=rule, phase="train")
    variables = jax.jit(layer.init)(jax.random.key(0), x0)

    @jax.jit
    def step(params, hist, x, c):
        def loss(p, h):
            y = layer.apply({"params": p, "scaling_history": h}, x)
            return jnp.sum(c * y), y

        (_, y), (dp, new_hist) = jax.value_and_grad(loss, (0, 1), has_aux=True)(params, hist)
        return y, dp["kernel"], new_hist

    state = {"params": variables["params"], "hist": variables["scaling_history"]}

    def run(x, c, lr):
        y, dk, state["hist"] = step(state["params"], state["hist"], x, c)
        kernel = state["params"]["kernel"]
        state["params"] = {**state["params"], "kernel": kernel - lr * dk}
        return y, dk, {t: np.asarray(state["hist"][t]) for t in TENSORS}

    return run, lambda: np.asarray(state["params"]["kernel"]), lambda: state["params"]["bias"]


def _nnx_stepper(rule, x0):
    layer = qn.QLinear(x0.shape[1], 3, rule=rule, phase="train", rngs=nnx.Rngs(0))
    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, ScalingHistory))

    @nnx.jit
    def step(layer, x, c):
        def loss(m):
            y = m(x)
            return jnp.sum(c * y), y

        (_, y), grads = nnx.value_and_grad(loss, argnums=wrt, has_aux=True)(layer)
        nnx.update(layer, grads.filter(ScalingHistory))  # overwrite with gradient
        return y, grads["kernel"].value

    def run(x, c, lr):
        y, dk = step(layer, x, c)
        layer.kernel.value = layer.kernel.value - lr * dk
        return y, dk, {t: np.asarray(getattr(layer, history_name(t)).value) for t in TENSORS}

    return run, lambda: np.asarray(layer.kernel.value), lambda: layer.bias.value


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_delayed_scaling_replays_transformer_engine(framework):
    """k = 4 steps with a history of 2 and margin 1: the histories equal a NumPy replay of TE's
    rule on the amaxes of x_t, W_t and g_t = c_t, and step t's forward and kernel gradient
    equal the fp8 (ml_dtypes) products with the scales of steps < t."""
    history, margin, lr = 2, 1, 0.1
    rule = _fp8_rule(history, margin)
    x_gains, c_gains = (1.0, 30.0, 0.5, 2.0), (1.0, 0.01, 4.0, 0.2)
    xs = [g * jax.random.normal(jax.random.key(10 + t), (4, 5)) for t, g in enumerate(x_gains)]
    cs = [g * jax.random.normal(jax.random.key(20 + t), (4, 3)) for t, g in enumerate(c_gains)]
    run, kernel, bias = (_linen_stepper if framework == "linen" else _nnx_stepper)(rule, xs[0])
    h = {t: np.zeros(history, np.float32) for t in TENSORS}
    for t, (x, c) in enumerate(zip(xs, cs, strict=True)):
        w = kernel()
        s_in, s_k = (_te_scale(h[n], E4M3_MAX, margin) for n in ("input", "kernel"))
        s_g = _te_scale(h["grad"], E5M2_MAX, margin)
        x_hat = _cast(x, s_in, ml_dtypes.float8_e4m3fn, E4M3_MAX)
        w_hat = _cast(w, s_k, ml_dtypes.float8_e4m3fn, E4M3_MAX)
        g_hat = _cast(c, s_g, ml_dtypes.float8_e5m2, E5M2_MAX)
        y, dk, got = run(x, c, lr)
        np.testing.assert_allclose(y, x_hat @ w_hat + np.asarray(bias()), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(dk, x_hat.T @ g_hat, rtol=1e-5, atol=1e-6)
        if t == 1:  # x grew 30x: this step's scale is last step's, so x saturates
            current = _cast(
                x, np.abs(x).max() * 2.0**margin / E4M3_MAX, ml_dtypes.float8_e4m3fn, 448
            )
            assert np.abs(x_hat).max() < 0.2 * np.abs(current).max()
        h = {
            "input": _push(h["input"], np.abs(x).max()),
            "kernel": _push(h["kernel"], np.abs(w).max()),
            "grad": _push(h["grad"], np.abs(c).max()),
        }
        for n in TENSORS:
            np.testing.assert_array_equal(got[n], h[n], err_msg=f"step {t}, {n}")


def test_record_amax_passes_gradients_through():
    x, h = jnp.array([[1.0, -6.0], [2.0, 0.5]]), AmaxHistory(jnp.array([3.0, 9.0, 1.0]))
    w = jnp.array([[2.0], [-1.0]])

    def f(x, h):
        return jnp.sum(record_grad_amax(record_amax(x, h) @ w, h) * jnp.array([[4.0], [-7.0]]))

    dx, dh = jax.grad(f, (0, 1))(x, h)
    np.testing.assert_array_equal(dx, jnp.array([[4.0], [-7.0]]) @ w.T)
    # both wrappers write their history: the cotangents of the one history add up
    np.testing.assert_array_equal(dh.history, [6.0 + 7.0, 6.0, 18.0])
    with pytest.raises(TypeError, match="AmaxHistory"):
        record_amax(x, jnp.zeros(3))


# --- training ----------------------------------------------------------------------------------


class _MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(1)(nn.relu(nn.Dense(16)(x)))


class _NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1, self.l2 = nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))


def _regression():
    x = jax.random.normal(jax.random.key(1), (64, 8))
    y = jnp.sin(x @ jax.random.normal(jax.random.key(2), (8, 1)))
    return x, y


STEPS = 40


def test_linen_model_trains_with_delayed_scaling():
    x, target = _regression()
    rule = _fp8_rule(history=16, margin=0)
    qmodel, _ = ql.quantize_model(_MLP(), rule, x, phase="train")
    variables = jax.jit(qmodel.init)(jax.random.key(0), x)  # eager init runs op by op: slow
    params, hist = variables["params"], variables["scaling_history"]
    opt = optax.adam(1e-2)

    def loss_fn(params, hist):
        pred = qmodel.apply({"params": params, "scaling_history": hist}, x)
        return jnp.mean((pred - target) ** 2)

    @jax.jit
    def step(params, opt_state, hist):
        loss, (g, new_hist) = jax.value_and_grad(loss_fn, (0, 1))(params, hist)
        updates, opt_state = opt.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, new_hist, loss

    opt_state, losses = opt.init(params), []
    for _ in range(STEPS):
        params, opt_state, hist, loss = step(params, opt_state, hist)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses[::8]
    for path in ("Dense_0", "Dense_1"):
        for t in TENSORS:
            assert np.count_nonzero(hist[path][t]) == 16, (path, t)  # 40 steps filled 16


def test_nnx_model_trains_with_delayed_scaling():
    x, target = _regression()
    model, _ = qn.quantize_model(_NnxMLP(nnx.Rngs(0)), _fp8_rule(history=16))
    qn.with_phase(model, "train")  # delayed scaling needs no calibration
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    wrt = nnx.DiffState(0, nnx.Any(nnx.Param, ScalingHistory))

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: jnp.mean((m(x) - target) ** 2)  # noqa: E731
        loss, grads = nnx.value_and_grad(loss_fn, argnums=wrt)(model)
        optimizer.update(model, grads.filter(nnx.Param))
        nnx.update(model, grads.filter(ScalingHistory))
        return loss

    losses = [float(step(model, optimizer)) for _ in range(STEPS)]
    assert np.isfinite(losses).all() and losses[-1] < 0.5 * losses[0], losses[::8]
    hist = nnx.state(model, ScalingHistory)
    assert len(jax.tree.leaves(hist)) == 6
    assert all(np.count_nonzero(h) == 16 for h in jax.tree.leaves(hist))


# --- per-pass backward settings ----------------------------------------------------------------


def test_rule_backward_config_equals_train_dot_general():
    """dL/dlhs with an int8 g and kernel, dL/drhs float: the layer's gradients are those of
    ``train_dot_general`` with the same BackwardConfig, and dL/dW is the float-backward one."""
    bwd = BackwardConfig(dlhs_grad=QuantConfig(int8), dlhs_rhs=QuantConfig(int8))
    rule = QuantRule(".*", act_scale="dynamic_per_tensor", backward=bwd)
    assert rule.backward_config() is bwd
    x, c = (
        jax.random.normal(jax.random.key(3), (4, 5)),
        jax.random.normal(jax.random.key(4), (4, 3)),
    )
    layer = ql.QDense(3, rule=rule, phase="train", use_bias=False)
    variables = jax.jit(layer.init)(jax.random.key(0), x)
    params = variables["params"]

    def loss(x, p):
        y, _ = layer.apply({**variables, "params": p}, x, mutable=["quant_stats"])
        return jnp.sum(c * y)

    got_dx, got_dk = jax.jit(jax.grad(loss, (0, 1)))(x, params)
    lhs_q, rhs_q = rule.act_config(), rule.weight_config(2)

    def direct(b):
        def f(x, w):
            y = ops.train_dot_general(x, w, DENSE_DN, lhs_quant=lhs_q, rhs_quant=rhs_q, bwd=b)
            return jnp.sum(c * y)

        return jax.jit(jax.grad(f, (0, 1)))(x, params["kernel"])

    close = dict(rtol=1e-6, atol=1e-6)  # the same products, fused differently by XLA
    ref_dx, ref_dk = direct(bwd)
    np.testing.assert_allclose(got_dx, ref_dx, **close)
    np.testing.assert_allclose(got_dk["kernel"], ref_dk, **close)
    float_dx, float_dk = direct(BackwardConfig())
    np.testing.assert_allclose(got_dk["kernel"], float_dk, **close)  # drhs stays float
    assert not np.allclose(got_dx, float_dx, rtol=1e-4)  # dlhs is int8

    nnx_layer = qn.QLinear(5, 3, rule=rule, phase="train", use_bias=False, rngs=nnx.Rngs(0))
    nnx_layer.kernel.value = params["kernel"]
    nnx_dk = nnx.jit(nnx.grad(lambda m: jnp.sum(c * m(x))))(nnx_layer)["kernel"].value
    np.testing.assert_allclose(nnx_dk, ref_dk, **close)


# --- bad input ---------------------------------------------------------------------------------


def test_bad_scaling_rules():
    for h in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="QuantRule.amax_history must be an int >= 1"):
            _fp8_rule(history=h)
    with pytest.raises(ValueError, match="QuantRule.margin must be a real number >= 0"):
        _fp8_rule(margin=-1)
    with pytest.raises(ValueError, match="QuantRule.scaling must be one of"):
        QuantRule(".*", scaling="current")
    with pytest.raises(TypeError, match="QuantRule.backward must be a jquant.ops.BackwardConfig"):
        QuantRule(".*", backward=QuantConfig(int8))
    with pytest.raises(ValueError, match="QuantRule.backward sets both"):
        QuantRule(".*", grad="int8", backward=BackwardConfig())
    cases = {
        "learned": dict(weight="int8", estimator="lsq"),
        "act_scale": dict(act_scale="dynamic_per_tensor"),
        "block formats": dict(weight="mxfp8_e4m3"),
        "per tensor": dict(block_size=32),
        "one per-tensor gradient format": dict(
            backward=BackwardConfig(QuantConfig("fp8_e5m2"), None, None, QuantConfig(int8))
        ),
        "requant": dict(weight="int8", act="int8", requant="fp32"),
    }
    for msg, kw in cases.items():
        with pytest.raises(ValueError, match=f"QuantRule.scaling='delayed'.*{msg}"):
            QuantRule(".*", scaling="delayed", **kw)
    # a variable tree without the histories, an activation quantizer with delayed scaling
    x = jnp.ones((2, 5))
    layer = ql.QDense(3, rule=_fp8_rule(), phase="train")
    params = jax.eval_shape(layer.init, jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match="scaling_history/input"):
        jax.eval_shape(layer.apply, {"params": params}, x)
    with pytest.raises(ValueError, match="keeps no amax history"):
        check_act_rule(_fp8_rule(), "attn/einsum")
    act = ql.ActQuant(rule=_fp8_rule(), phase="train")
    with pytest.raises(ValueError, match="activation quantizers and pooling"):
        jax.eval_shape(act.init, jax.random.key(0), x)
