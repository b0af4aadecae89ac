"""Codebook quantization and Lloyd-Max against Max (1960) and brute force."""

import jax.numpy as jnp
import numpy as np
import pytest

from jquant import codebook as cb

# Max (1960), Tables I and II: (N, Lloyd-Max MSE, uniform step, uniform MSE).
# Max's N=16 non-uniform entry (0.009497) is 4e-6 below the exact optimum (0.009501, also
# computed here in float64 in the test below), so that row is checked at 1e-5.
MAX_1960 = [
    (4, 0.1175, 0.9957, 0.1188),
    (8, 0.03454, 0.5860, 0.03744),
    (16, 0.009497, 0.3352, 0.01154),
]


@pytest.mark.parametrize("n, lm_mse, step, uni_mse", MAX_1960)
def test_max_1960_gaussian_tables(n, lm_mse, step, uni_mse):
    s, d = cb.optimal_uniform_step(n)
    assert abs(float(s) - step) < 6e-4
    assert abs(float(d) - uni_mse) < 6e-5 * max(uni_mse / 0.01, 1)
    _, dl = cb.lloyd_max(n, iters=1500)
    assert abs(float(dl) - lm_mse) < 1e-5 * max(lm_mse / 0.01, 1)
    assert float(dl) < float(d)  # non-uniform beats uniform


def test_lloyd_max_exact_float64_oracle():
    """NumPy float64 Lloyd iteration with math.erf as the independent oracle."""
    from math import erf, exp, pi, sqrt

    def cdf(t):
        return 0.5 * (1 + erf(t / sqrt(2))) if np.isfinite(t) else float(t > 0)

    def pdf(t):
        return exp(-t * t / 2) / sqrt(2 * pi) if np.isfinite(t) else 0.0

    y = np.linspace(-1.5, 1.5, 4)
    for _ in range(200):
        t = np.concatenate([[-np.inf], (y[1:] + y[:-1]) / 2, [np.inf]])
        p = np.diff([cdf(v) for v in t])
        m = np.diff([-pdf(v) for v in t])
        y = m / p
    levels, _ = cb.lloyd_max(4, iters=200)
    np.testing.assert_allclose(np.asarray(levels), y, atol=2e-5)
    np.testing.assert_allclose(y, [-1.510, -0.4528, 0.4528, 1.510], atol=1e-3)  # Max, Table I


def test_codebook_quantize_is_nearest_level():
    rng = np.random.default_rng(0)
    levels = np.sort(rng.standard_normal(7)).astype(np.float32)
    x = rng.standard_normal(1000).astype(np.float32) * 2
    got = np.asarray(cb.codebook_quantize(x, levels))
    want = levels[np.argmin(np.abs(x[:, None] - levels[None, :]), axis=1)]
    np.testing.assert_array_equal(got, want)
    assert np.isnan(cb.codebook_quantize(jnp.array([np.nan]), levels)[0])


def test_empirical_and_closed_form_agree():
    x = np.random.default_rng(1).standard_normal(200_000).astype(np.float32)
    levels = cb.uniform_levels(8, 0.586)
    sampled = float(cb.codebook_mse(levels, x))
    direct = float(np.mean((x - np.asarray(cb.codebook_quantize(x, levels))) ** 2))
    assert abs(sampled - direct) < 1e-6
    # stratified samples (the N(0, 1) quantiles) approximate the closed form closely
    from scipy.special import ndtri

    strat = ndtri((np.arange(200_000) + 0.5) / 200_000).astype(np.float32)
    closed = float(cb.codebook_mse(levels, "gaussian"))
    assert abs(float(cb.codebook_mse(levels, strat)) - closed) < 2e-3 * closed


def test_laplace_moments_integrate_to_unit_variance():
    m = cb.laplace_moments()
    inf = jnp.array([-jnp.inf, jnp.inf])
    p, mm, s = (np.asarray(f(inf)) for f in m)
    assert p[1] - p[0] == pytest.approx(1.0)
    assert mm[1] - mm[0] == pytest.approx(0.0, abs=1e-7)
    assert s[1] - s[0] == pytest.approx(1.0, rel=1e-6)
    # continuity at 0 and a numerical integral of x^2 p(x) over [-1, 0.5]
    t = np.linspace(-1.0, 0.5, 200_001)
    pdf = np.exp(-np.abs(t) * np.sqrt(2)) / np.sqrt(2)
    want = np.trapezoid(t * t * pdf, t)
    got = float(m.second(jnp.float32(0.5)) - m.second(jnp.float32(-1.0)))
    assert got == pytest.approx(want, rel=1e-4)


def test_uniform_levels_midrise_and_midtread():
    np.testing.assert_allclose(cb.uniform_levels(4, 1.0), [-1.5, -0.5, 0.5, 1.5])
    np.testing.assert_allclose(cb.uniform_levels(3, 2.0), [-2.0, 0.0, 2.0])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: cb.uniform_levels(0, 1.0), "n_levels"),
        (lambda: cb.codebook_quantize(jnp.ones(3), jnp.ones((2, 2))), "levels"),
        (lambda: cb.get_moments("cauchy"), "distribution"),
        (lambda: cb.empirical_moments(jnp.zeros((0,))), "samples"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()
