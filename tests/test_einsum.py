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


def _init(eq, xs, ks, phase="float", rule=QuantRule(".*")):
    x = jax.random.normal(jax.random.key(0), xs)
    layer = QEinsum(ks, eq, rule=rule, phase=phase, bias_init=nn.initializers.normal(1.0))
    return x, layer, layer.init(jax.random.key(1), x)


@pytest.mark.parametrize("eq, xs, ks", CASES[:3])
def test_float_phase_is_flax_einsum(eq, xs, ks):
    x, layer, v = _init(eq, xs, ks)
    ref = nn.Einsum(ks, eq)
    ref_shapes = jax.tree_util.tree_map(jnp.shape, ref.init(jax.random.key(1), x)["params"])
    assert jax.tree_util.tree_map(jnp.shape, v["params"]) == ref_shapes
    np.testing.assert_allclose(layer.apply(v, x), ref.apply({"params": v["params"]}, x), atol=1e-6)


@pytest.mark.parametrize("eq, xs, ks", [CASES[1], CASES[2]])
def test_eval_is_einsum_of_fake_quantized_operands_in_both_modes(eq, xs, ks):
    x, layer, v = _init(eq, xs, ks, phase="calibrate")
    _, upd = layer.apply(v, x, mutable=["quant_stats"])
    v = {**v, **upd}
    xn, w, b = (np.asarray(a, np.float64) for a in (x, v["params"]["kernel"], v["params"]["bias"]))
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
    zero_kernel = {"kernel": jnp.zeros(ks), "bias": v["params"]["bias"]}
    bias = nn.Einsum(ks, eq).apply({"params": zero_kernel}, x)  # Flax broadcasts the bias
    for mode in ("simulate", "int"):
        y = layer.clone(phase="eval", rule=QuantRule(".*", mode=mode)).apply(v, x)
        np.testing.assert_allclose(y, y_q + bias, atol=1e-5, err_msg=mode)
    assert np.abs(np.einsum(eq, xn, w) + bias - y).max() > 1e-3  # quantization did something


def test_train_gradients_reach_kernel_bias_and_learned_scale():
    rule = QuantRule(".*", estimator="lsq")
    x, layer, v = _init("bd,hd->bh", (3, 4), (5, 4), phase="calibrate", rule=rule)
    _, upd = layer.apply(v, x, mutable=["quant_stats"])
    v = {**v, **upd}
    train = layer.clone(phase="train")
    g = jax.grad(lambda p: jnp.sum(jnp.sin(train.apply({**v, "params": p}, x))))(v["params"])
    assert set(g) == {"kernel", "bias", "input_scale", "kernel_scale"}
    for name, gv in g.items():
        assert np.all(np.isfinite(gv)) and np.abs(gv).max() > 1e-5, name


def test_keep_float_rule_and_bad_phase():
    x, layer, v = _init("bd,dh->bh", (3, 4), (4, 5))
    kf = layer.clone(phase="eval", rule=QuantRule(".*", keep_float=True))
    np.testing.assert_allclose(kf.apply(v, x), layer.apply(v, x), atol=0)
    with pytest.raises(ValueError, match="phase"):
        layer.clone(phase="bogus").apply(v, x)
