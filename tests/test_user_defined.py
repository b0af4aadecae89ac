"""A format, an estimator and an observer written here, outside jquant, used through jquant's
public entry points with no change to jquant (issue #15 §1): ``fake_quant``,
``quantized_dot_general``, ``QuantRule`` + ``quantize_model`` + ``calibrate`` and
``error_vs_bits``. Each use is checked against a NumPy oracle written from the formula.

- :class:`Pow2Format`: a power-of-two (log) grid ``{0} u {+-2^k : k = 0 .. K-1}`` in units of
  the scale, ``K = 2^(b-1) - 1`` (a sign bit, the other codes an exponent or zero); ``bits``
  is a pytree leaf, so the sweep vmaps over it.
- ``tanh_ste(alpha)``: a straight-through estimator whose backward is the derivative of the
  tanh-shaped soft quantizer of DSQ (Gong et al. 2019), ``d/dv [floor(v) + 1/2 +
  tanh(alpha (frac(v) - 1/2)) / (2 tanh(alpha / 2))]`` inside the grid, 0 outside.
- :class:`AbsmaxInt4Blocks`: a block format (it scales its own blocks: ``block_size`` and
  ``block_scales``), symmetric int4 codes ``clip(round(7 x / amax_b), -7, 7)`` per block of
  8 with the block's absmax as scale, QLoRA-style; stochastic rounding too.
- :class:`MovingPercentile`: an observer whose state is an exponential moving average of each
  batch's ``q``-th percentile of ``|x|``; the range is ``[-a, a]``.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant import calibration, estimators
from jquant.nn import QuantRule
from jquant.nn import linen as qlinen
from jquant.sweep import error_vs_bits

# --- the user's format --------------------------------------------------------------------------


@functools.partial(jax.tree_util.register_dataclass, data_fields=["bits"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class Pow2Format:
    """Values ``0`` and ``+-2^k`` for ``k = 0 .. K-1``, ``K = 2^(bits-1) - 1``, times the scale.

    ``encode`` rounds to the nearest grid value (in the linear domain, ties to the even
    mantissa: ``1.5 * 2^e`` goes to ``2^e``, ``1/2`` to 0) and saturates at ``+-2^(K-1)``.
    """

    bits: int | jax.Array

    is_static = property(lambda self: isinstance(self.bits, int))
    dtype = property(lambda self: jnp.dtype(jnp.float32))  # codes are the grid values
    has_zero_point = False

    def with_bits(self, bits):
        return Pow2Format(bits)

    def top(self):
        """``2^(K-1)``, exact also for traced (float) bits."""
        b = jnp.asarray(self.bits).astype(jnp.int32)
        k = jnp.left_shift(1, b - 1) - 1
        return jnp.ldexp(jnp.float32(1.0), k - 1)

    def grid_range(self):
        return -self.top(), self.top()

    def encode(self, v, zero_point, rounding="nearest_even", noise=None):
        if rounding != "nearest_even":
            raise ValueError(f"Pow2Format rounds to nearest only, got rounding={rounding!r}")
        a = jnp.minimum(jnp.abs(v), self.top())
        m, e = jnp.frexp(a)  # a = m 2^e, m in [1/2, 1)
        up = jnp.round(2.0 * m - 1.0)  # mantissa 1 + f, f in [0, 1): up if f > 1/2
        big = jnp.ldexp(jnp.float32(1.0), e - 1) * (1.0 + up)
        mag = jnp.where(a >= 1.0, big, jnp.round(a))
        return jnp.where(jnp.isnan(v), v, jnp.sign(v) * mag)

    def decode(self, codes, zero_point):
        return codes

    def scale_for_range(self, rmin, rmax, symmetric):
        amax = jnp.maximum(-rmin, rmax)
        return amax / self.top(), jnp.zeros_like(amax)


def pow2_oracle(x, scale, bits):
    """NumPy: the nearest of ``scale * {0, +-2^k}`` to each ``x`` (float64)."""
    k = 2 ** (bits - 1) - 1
    mags = 2.0 ** np.arange(k)
    grid = np.sort(np.concatenate([-mags, [0.0], mags])) * np.asarray(scale, np.float64)[..., None]
    x = np.asarray(x, np.float64)
    grid = np.broadcast_to(grid, x.shape + grid.shape[-1:])
    idx = np.argmin(np.abs(x[..., None] - grid), axis=-1)
    return np.take_along_axis(grid, idx[..., None], -1)[..., 0]


# --- the user's estimator -----------------------------------------------------------------------


def _tanh_surrogate(alpha, vz):
    frac = vz - np.floor(vz) if isinstance(vz, np.ndarray) else vz - jnp.floor(vz)
    tanh = np.tanh if isinstance(vz, np.ndarray) else jnp.tanh
    return 0.5 * alpha * (1.0 - tanh(alpha * (frac - 0.5)) ** 2) / np.tanh(alpha / 2)


def _tanh_ste_bwd(alpha, res: estimators.Residuals, g):
    vz = res.v + jnp.round(res.zero_point)
    return g * res.inside * _tanh_surrogate(alpha, vz), None, None


def tanh_ste(alpha: float) -> estimators.Estimator:
    return estimators.Estimator(f"tanh_ste_{alpha:g}", functools.partial(_tanh_ste_bwd, alpha))


TANH = estimators.register_estimator(tanh_ste(4.0))


# --- the user's observer ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MovingPercentile:
    """``a_1 = P_q(|x_1|)``, ``a_t = decay a_{t-1} + (1 - decay) P_q(|x_t|)``; range ``[-a, a]``."""

    q: float = 99.0
    decay: float = 0.5

    def init(self, x):
        return {"a": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.int32)}

    def update(self, x, state):
        p = jnp.percentile(jnp.abs(jnp.asarray(x, jnp.float32)), self.q)
        a = jnp.where(state["count"] == 0, p, self.decay * state["a"] + (1 - self.decay) * p)
        return {"a": a, "count": state["count"] + 1}

    def bounds(self, state, fmt=None, *, symmetric=False):
        return -state["a"], state["a"]

    def result(self, state, fmt, *, symmetric=False):
        return jq.qparams_from_range(*self.bounds(state, fmt), fmt, symmetric=symmetric)


def moving_percentile_oracle(batches, q, decay):
    a = None
    for x in batches:
        p = np.percentile(np.abs(np.asarray(x, np.float64)), q)
        a = p if a is None else decay * a + (1 - decay) * p
    return a


def _normal(seed, shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --- the uses -----------------------------------------------------------------------------------


def test_user_format_through_quantize_fake_quant_and_qparams():
    fmt = Pow2Format(4)
    x = _normal(0, (64,)) * 3.0
    qp = jq.qparams_from_range(x.min(), x.max(), fmt)
    amax = np.abs(x).max()
    np.testing.assert_allclose(float(qp.scale), amax / 2.0**6, rtol=1e-6)
    y = jq.fake_quant(jnp.asarray(x), qp, fmt)
    np.testing.assert_allclose(np.asarray(y), pow2_oracle(x, float(qp.scale), 4), rtol=1e-6)
    codes = jq.quantize(x, qp, fmt)
    np.testing.assert_allclose(np.asarray(codes), pow2_oracle(x / float(qp.scale), 1.0, 4))
    np.testing.assert_allclose(np.asarray(jq.dequantize(codes, qp, fmt)), np.asarray(y))
    g = jax.grad(lambda x: jnp.sum(jq.fake_quant(x, qp, fmt)))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), np.ones_like(x))  # straight-through
    with pytest.raises(ValueError, match="Pow2Format rounds to nearest"):
        jq.fake_quant(jnp.asarray(x), qp, fmt, rounding="floor")
    with pytest.raises(ValueError, match="learns an integer grid"):
        jq.fake_quant(jnp.asarray(x), qp, fmt, estimator="lsq")


def test_user_estimator_gradient_matches_numpy_surrogate():
    x = _normal(1, (4, 16)) * 2.0
    qp = jq.QParams(jnp.float32(0.25), jnp.float32(0.0))
    fmt = jq.int4
    g = jax.grad(lambda x: jnp.sum(jq.fake_quant(x, qp, fmt, estimator=TANH.name)))(x)
    v = x.astype(np.float64) / 0.25
    inside = (v >= fmt.qmin) & (v <= fmt.qmax)
    want = inside * _tanh_surrogate(4.0, v)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-6)
    assert estimators.get_estimator(TANH.name) is TANH and not TANH.learned


def test_user_format_through_quantized_dot_general():
    lhs, rhs = _normal(2, (3, 16)), _normal(3, (16, 5))
    dot = jq.ops.quantized_dot_general(
        jq.QuantConfig(fmt=Pow2Format(4)), jq.QuantConfig(fmt="int8", axis=1)
    )
    out = dot(lhs, rhs, (((1,), (0,)), ((), ())))
    s_l = np.float32(np.abs(lhs).max()) / np.float32(2.0**6)
    s_r = np.abs(rhs).max(axis=0).astype(np.float32) / np.float32(127)
    r_q = np.clip(np.round(rhs / s_r), -128, 127) * s_r
    want = pow2_oracle(lhs, s_l, 4) @ r_q
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class AbsmaxInt4Blocks:
    """Blocks of 8 with scale ``s = amax_b`` and elements ``clip(round(7 v), -7, 7) / 7`` of
    ``v = x / s`` (stochastic: ``floor(7 v + u)``); NaN for a non-finite block."""

    block_size = 8
    bits = 4
    is_static = True
    has_zero_point = False
    dtype = property(lambda self: jnp.dtype(jnp.float32))
    rounding_modes = ("nearest_even", "stochastic")

    def grid_range(self):
        return -1.0, 1.0

    def block_scales(self, amax):
        return jnp.where(jnp.isfinite(amax), amax, jnp.nan)

    def encode(self, v, zero_point, rounding="nearest_even", noise=None):
        r = jnp.round(7 * v) if rounding == "nearest_even" else jnp.floor(7 * v + noise)
        return jnp.clip(r, -7, 7)

    def decode(self, codes, zero_point):
        return codes / 7

    def scale_for_range(self, rmin, rmax, symmetric):
        amax = jnp.maximum(-rmin, rmax)
        return amax, jnp.zeros_like(amax)


def absmax_int4_oracle(w: np.ndarray, axis: int, u: np.ndarray | None = None) -> np.ndarray:
    """NumPy: blocks of 8 along ``axis``, ``amax_b * clip(round(7 w / amax_b)) / 7``."""
    b = np.moveaxis(w, axis, -1).astype(np.float64)
    b = b.reshape(*b.shape[:-1], -1, 8)
    amax = np.abs(b).max(-1, keepdims=True)
    v = 7 * b / np.where(amax > 0, amax, 1)
    if u is None:
        r = np.round(v)
    else:
        r = np.floor(v + np.moveaxis(u, axis, -1).reshape(b.shape))
    y = (amax * np.clip(r, -7, 7) / 7).reshape(*b.shape[:-2], -1)
    return np.moveaxis(y, -1, axis)


def test_user_block_format_through_configs_ops_and_rules():
    """A block format written here runs wherever jquant's MX formats do: QuantConfig (no
    QParams, blocks along the contraction), dot_general (stochastic with a key: the key's
    second half rounds rhs), a QuantRule on a Dense layer; and only there."""
    fmt = AbsmaxInt4Blocks()
    lhs, rhs = _normal(6, (3, 16)), _normal(7, (16, 5))
    dn = (((1,), (0,)), ((), ()))
    cfg = jq.QuantConfig(fmt=fmt)
    assert cfg.scales_itself and jq.formats.block_size_of(fmt) == 8
    out = jq.ops.dot_general(lhs, rhs, dn, rhs_quant=cfg)
    want = lhs.astype(np.float64) @ absmax_int4_oracle(rhs, 0)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)

    key = jax.random.key(9)
    sr = jq.QuantConfig(fmt=fmt, rounding="stochastic")
    out = jq.ops.dot_general(lhs, rhs, dn, rhs_quant=sr, key=key)
    u = np.asarray(jax.random.uniform(jax.random.split(key)[1], rhs.shape, jnp.float32))
    want = lhs.astype(np.float64) @ absmax_int4_oracle(rhs, 0, u)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)

    with pytest.raises(ValueError, match="has its own blocks of 8"):
        QuantRule(".*", weight=fmt, block_size=4)
    with pytest.raises(ValueError, match="no integer kernel"):
        QuantRule(".*", weight=fmt, mode="int")
    model = _Net()
    variables = model.init(jax.random.key(0), lhs)
    qmodel, _ = qlinen.quantize_model(model, [QuantRule(".*", weight=fmt, act=None)], lhs)
    qvars = qmodel.attach(variables, lhs)
    got = qmodel.with_phase("eval").apply(qvars, lhs)
    w = np.asarray(variables["params"]["fc"]["kernel"])
    b = np.asarray(variables["params"]["fc"]["bias"])
    want = lhs.astype(np.float64) @ absmax_int4_oracle(w, 0) + b
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


class _Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(5, name="fc")(x)


def test_user_format_estimator_observer_through_rules_and_calibrate():
    x1 = _normal(4, (2, 16))
    model = _Net()
    variables = model.init(jax.random.key(0), x1)
    obs = MovingPercentile(q=99.0, decay=0.5)
    rule = QuantRule(
        ".*",
        weight=Pow2Format(4),
        act="int8",
        act_symmetric=True,
        calibration=obs,
        act_estimator=TANH.name,
    )
    assert rule.calibration is obs and rule.act_estimator is TANH  # resolved once, here
    qmodel, match = qlinen.quantize_model(model, [rule], x1)
    batches = [jnp.asarray(_normal(10 + i, (8, 16)) * (1 + i)) for i in range(3)]
    qvars = qmodel.attach(variables, x1)
    calib = qmodel.with_phase("calibrate")
    qvars = calibration.calibrate(calib.apply, qvars, batches, progress=False)

    a = moving_percentile_oracle(batches, 99.0, 0.5)
    s_a = np.float32(a) / np.float32(127)
    stored = qvars["quant_stats"]["fc"]["input_qparams"]
    np.testing.assert_allclose(float(stored["scale"]), s_a, rtol=1e-5)

    x = _normal(20, (4, 16)) * 2.0
    w = np.asarray(variables["params"]["fc"]["kernel"])
    b = np.asarray(variables["params"]["fc"]["bias"])
    s_w = (np.abs(w).max(axis=0) / 2.0**6).astype(np.float32)
    w_q = pow2_oracle(w, s_w, 4)
    v = x.astype(np.float64) / s_a
    x_q = np.clip(np.round(v), -128, 127) * s_a
    evaluate = qmodel.with_phase("eval")
    out = evaluate.apply(qvars, x)
    np.testing.assert_allclose(np.asarray(out), x_q @ w_q + b, rtol=1e-4, atol=1e-4)

    # the activation's gradient is the user's estimator: dL/dx = (1 w_q^T) * surrogate(v)
    g = jax.grad(lambda x: jnp.sum(evaluate.apply(qvars, x)))(jnp.asarray(x))
    inside = (v >= -128) & (v <= 127)
    want = np.ones((4, 5)) @ w_q.T * inside * _tanh_surrogate(4.0, v)
    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4, atol=1e-4)


def test_user_format_and_observer_through_error_vs_bits():
    x = _normal(5, (256,)) * 2.0
    obs = MovingPercentile(q=99.5, decay=0.5)
    t = error_vs_bits(x, bits=[3, 4], families=Pow2Format(3), calibrations=obs)
    assert t.column("bits") == [3, 4]
    a = np.percentile(np.abs(x.astype(np.float64)), 99.5)
    for bits, sqnr in zip(t.column("bits"), t.column("sqnr_db"), strict=True):
        k = 2 ** (bits - 1) - 1
        y = pow2_oracle(x, np.float32(a) / np.float32(2.0 ** (k - 1)), bits)
        want = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / np.sum((x - y) ** 2))
        assert sqnr == pytest.approx(want, rel=1e-4)
    with pytest.raises(ValueError, match="per_tensor"):
        error_vs_bits(
            x[None].repeat(2, 0),
            bits=[3],
            families=Pow2Format(3),
            granularities="per_channel",
            calibrations=obs,
        )
