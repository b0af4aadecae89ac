"""Tests of jquant.metrics against NumPy (float64) and SciPy re-implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from jquant import metrics

_floats = st.floats(-100, 100, allow_nan=False, width=32)
# Few distinct shapes and axes: each one is a compilation.
_pairs = st.sampled_from([(5,), (3, 4)]).flatmap(
    lambda shape: st.tuples(
        hnp.arrays(np.float32, shape, elements=_floats),
        hnp.arrays(np.float32, shape, elements=_floats),
        st.sampled_from([None, -1]),
    )
)


def _np_metric(name, x, y, axis):
    x, y = x.astype(np.float64), y.astype(np.float64)
    d = x - y
    if name == "mse":
        return np.mean(d**2, axis=axis)
    if name == "rmse":
        return np.sqrt(np.mean(d**2, axis=axis))
    if name == "max_abs":
        return np.max(np.abs(d), axis=axis)
    if name == "cosine":
        den = np.linalg.norm(x, axis=axis) * np.linalg.norm(y, axis=axis)
        return np.where(den > 0, np.sum(x * y, axis=axis) / np.where(den > 0, den, 1), 0.0)
    raise ValueError(name)


# Jitted once per shape: eager mode would compile every primitive separately.
_jitted = {name: jax.jit(fn, static_argnums=2) for name, fn in metrics.METRICS.items()}
_kl = jax.jit(metrics.kl, static_argnames=("axis", "from_logits"))
_sqnr = _jitted["sqnr_db"]


@pytest.mark.parametrize("name", ["mse", "rmse", "max_abs", "cosine"])
@settings(max_examples=20, deadline=None)
@given(_pairs)
def test_metric_matches_numpy(name, case):
    x, y, axis = case
    got = np.asarray(_jitted[name](x, y, axis))
    want = _np_metric(name, x, y, axis)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-4)


def test_sqnr_matches_numpy_and_limits():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 50)).astype(np.float32)
    noise = (0.01 * rng.normal(size=x.shape)).astype(np.float32)
    y = x + noise
    want = 10 * np.log10(np.sum(x.astype(float) ** 2) / np.sum((x.astype(float) - y) ** 2))
    np.testing.assert_allclose(float(_sqnr(x, y, None)), want, rtol=1e-5)
    per_row = np.asarray(_sqnr(x, y, 1))
    want_rows = 10 * np.log10(np.sum(x**2, axis=1) / np.sum((x - y) ** 2, axis=1))
    np.testing.assert_allclose(per_row, want_rows, rtol=1e-4)
    assert float(_sqnr(x, x, None)) == np.inf
    assert float(_sqnr(np.zeros(3), np.ones(3), None)) == -np.inf


def test_sqnr_of_uniform_noise_is_analytic():
    # x ~ U(-1, 1) (power 1/3), error ~ U(-s/2, s/2) (power s^2/12): SQNR = 10 log10(4 / s^2).
    rng = np.random.default_rng(1)
    s = 0.01
    x = rng.uniform(-1, 1, 200_000).astype(np.float32)
    y = x + rng.uniform(-s / 2, s / 2, x.shape).astype(np.float32)
    np.testing.assert_allclose(float(_sqnr(x, y, None)), 10 * np.log10(4 / s**2), atol=0.05)


def test_kl_matches_scipy():
    rng = np.random.default_rng(2)
    p_logits = rng.normal(size=(6, 10)).astype(np.float32)
    q_logits = (p_logits + 0.3 * rng.normal(size=p_logits.shape)).astype(np.float32)
    want = scipy.special.rel_entr(
        scipy.special.softmax(p_logits.astype(float), axis=-1),
        scipy.special.softmax(q_logits.astype(float), axis=-1),
    ).sum(axis=-1)
    np.testing.assert_allclose(np.asarray(_kl(p_logits, q_logits)), want, rtol=1e-4)
    # distributions (unnormalised; zeros in p contribute 0) along axis 0
    p = np.array([[0.0, 2.0], [1.0, 1.0], [3.0, 1.0]], np.float32)
    q = np.array([[1.0, 1.0], [1.0, 2.0], [2.0, 1.0]], np.float32)
    got = np.asarray(_kl(p, q, axis=0, from_logits=False))
    p64, q64 = p / p.sum(0), q / q.sum(0)
    np.testing.assert_allclose(got, scipy.special.rel_entr(p64, q64).sum(0), rtol=1e-5)
    assert float(_kl(p_logits[0], p_logits[0])) == pytest.approx(0.0, abs=1e-6)


def test_kl_is_infinite_where_q_misses_support():
    got = _kl(jnp.array([0.5, 0.5]), jnp.array([1.0, 0.0]), from_logits=False)
    assert float(got) == np.inf


@pytest.mark.parametrize("name", sorted(metrics.METRICS))
def test_bad_input(name):
    fn = metrics.METRICS[name]
    with pytest.raises(ValueError, match="same shape"):
        fn(jnp.ones(3), jnp.ones(4))
    with pytest.raises(ValueError, match="axis"):
        fn(jnp.ones((2, 3)), jnp.ones((2, 3)), 2)
    with pytest.raises(TypeError, match="dtype"):
        fn(jnp.ones(2, bool), jnp.ones(2, bool))


def test_kl_bad_axis():
    with pytest.raises(ValueError, match="axis"):
        metrics.kl(jnp.ones((2, 3)), jnp.ones((2, 3)), axis=5)
