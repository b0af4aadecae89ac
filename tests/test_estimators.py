"""Tests for jquant.estimators: the gradient of every estimator.

Oracles: the papers' formulas evaluated element by element in NumPy (LSQ, Esser et al. 2019,
eq. 3 with gradient scale 1/sqrt(N Q_P); LSQ+, Bhalgat et al. 2020; PACT, Choi et al. 2018),
``jax.grad`` of each surrogate written out here with ``stop_gradient``, and finite differences
(``jax.test_util.check_grads``) where the fake-quant is smooth.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jquant as jq

sg = jax.lax.stop_gradient


@functools.cache
def _vjp_fn(estimator, fmt, one_hot=False):
    """jit(x, scale, zp, g -> (y, dx, dscale, dzp)); vmapped over one-hot g if ``one_hot``."""

    def f(x, scale, zp, g):
        fq = lambda x, s, z: jq.fake_quant(x, jq.QParams(s, z), fmt, estimator=estimator)
        y, vjp = jax.vjp(fq, x, scale, zp)
        return (y, *vjp(g))

    return jax.jit(jax.vmap(f, (None, None, None, 0)) if one_hot else f)


def _one_hot(shape):
    n = int(np.prod(shape))
    return np.eye(n, dtype=np.float32).reshape((n, *shape))


def _data(scale, shape, lo, hi, seed):
    """x = scale * v with v spread over [lo - 3, hi + 3], at least 0.05 from every tie/boundary."""
    rng = np.random.default_rng(seed)
    k = rng.integers(lo - 3, hi + 3, shape)
    frac = rng.choice([rng.uniform(0.05, 0.45), rng.uniform(0.55, 0.95)], shape)
    return (np.broadcast_to(scale, shape) * (k + frac)).astype(np.float32)


def _v(x, scale):
    return x.astype(np.float64) / np.broadcast_to(scale, x.shape).astype(np.float64)


# (shape of x, shape of scale): per tensor, per channel on the last axis, on the first axis
GRANULARITIES = [((4, 6), ()), ((4, 6), (6,)), ((4, 6), (4, 1))]


def _sum_per_scale(per_elem, scale_shape):
    """(n, *x.shape) one-hot contributions -> (n, *scale_shape) as the gradient would place them."""
    n = per_elem.shape[0]
    out = np.zeros((n, *scale_shape)) if scale_shape else np.zeros(n)
    for i in range(n):
        e = per_elem[i]
        if scale_shape == ():
            out[i] = e.sum()
        elif scale_shape == (6,):
            out[i] = e.sum(axis=0)
        else:
            out[i] = e.sum(axis=1, keepdims=True)
    return out


# --- element by element against the papers ----------------------------------------------------


@pytest.mark.parametrize("x_shape, s_shape", GRANULARITIES)
@pytest.mark.parametrize("fmt", [jq.int4, jq.uint4], ids=str)
def test_lsq_gradients_match_esser_eq3(x_shape, s_shape, fmt):
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.05, 0.2, s_shape).astype(np.float32)
    x = _data(scale, x_shape, fmt.qmin, fmt.qmax, 1)
    g = _one_hot(x_shape)
    y, dx, ds, dz = _vjp_fn("lsq", fmt, True)(x, scale, np.float32(0), g)
    v = _v(x, scale)
    q_n, q_p = -fmt.qmin, fmt.qmax
    n_per_scale = x.size / max(np.prod(s_shape), 1)
    gs = 1 / np.sqrt(n_per_scale * q_p)
    # eq. 3: -v + round(v) inside, -Q_N below, Q_P above
    dq = np.where(v <= -q_n, -q_n, np.where(v >= q_p, q_p, -v + np.round(v)))
    inside = ((v > -q_n) & (v < q_p)).astype(np.float64)
    want_ds = _sum_per_scale(g * dq * gs, s_shape)
    np.testing.assert_allclose(np.asarray(ds), want_ds, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(dx), g * inside)
    np.testing.assert_array_equal(np.asarray(dz), 0)
    assert 0 < inside.mean() < 1  # both branches are exercised


@pytest.mark.parametrize("x_shape, s_shape", GRANULARITIES)
def test_lsq_plus_offset_and_step_gradients(x_shape, s_shape):
    fmt = jq.uint4
    rng = np.random.default_rng(2)
    scale = rng.uniform(0.05, 0.2, s_shape).astype(np.float32)
    zp = rng.integers(2, 8, s_shape).astype(np.float32)
    x = _data(scale, x_shape, fmt.qmin - 6, fmt.qmax + 1, 3)
    g = _one_hot(x_shape)
    _, dx, ds, dz = _vjp_fn("lsq_plus", fmt, True)(x, scale, zp, g)
    v = _v(x, scale) + np.broadcast_to(zp, x_shape)  # the code before clipping
    lo, hi = fmt.qmin, fmt.qmax
    below, above = v < lo, v > hi
    inside = ~(below | above)
    gs = 1 / np.sqrt(x.size / max(np.prod(s_shape), 1) * fmt.qmax)
    zpb = np.broadcast_to(zp, x_shape)
    # x_hat = s (clip(round(x / s + zp), lo, hi) - zp); beta = -s zp is LSQ+'s offset
    dq_ds = np.where(below, lo - zpb, np.where(above, hi - zpb, np.round(v) - v))
    dq_dz = np.where(inside, 0.0, -np.broadcast_to(scale, x_shape))
    np.testing.assert_allclose(
        np.asarray(ds), _sum_per_scale(g * dq_ds * gs, s_shape), rtol=2e-5, atol=1e-7
    )
    np.testing.assert_allclose(
        np.asarray(dz), _sum_per_scale(g * dq_dz * gs, s_shape), rtol=2e-5, atol=1e-7
    )
    np.testing.assert_allclose(np.asarray(dx), g * inside)
    assert below.any() and above.any() and inside.any()


@pytest.mark.parametrize("a_shape", [(), (6,)])
def test_pact_alpha_gradient_is_sum_of_g_where_x_ge_alpha(a_shape):
    fmt = jq.uint4
    rng = np.random.default_rng(4)
    alpha = rng.uniform(1.0, 2.0, a_shape).astype(np.float32)
    x = _data(alpha / fmt.qmax, (4, 6), -2, fmt.qmax, 5)

    def f(x, alpha, g):
        fq = lambda x, a: jq.fake_quant(x, jq.pact_qparams(a, fmt), fmt, estimator="pact")
        y, vjp = jax.vjp(fq, x, alpha)
        return vjp(g)

    g = _one_hot(x.shape)
    dx, da = jax.jit(jax.vmap(f, (None, None, 0)))(x, alpha, g)
    ab = np.broadcast_to(alpha, x.shape)
    clipped = (x >= ab).astype(np.float64)
    want = _sum_per_scale(g * clipped, (6,) if a_shape else ())
    np.testing.assert_allclose(np.asarray(da), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(dx), g * ((x >= 0) & (x < ab)))
    assert 0 < clipped.mean() < 1


@pytest.mark.parametrize("fmt", [jq.int8, jq.uint4, jq.fp8_e4m3, jq.binary], ids=str)
def test_ste_is_identity_and_clipped_ste_masks(fmt):
    if isinstance(fmt, jq.FloatFormat):
        lo, hi = -fmt.max, fmt.max
    elif isinstance(fmt, jq.BinaryFormat):
        lo, hi = -1, 1
    else:
        lo, hi = fmt.qmin, fmt.qmax
    rng = np.random.default_rng(6)
    s = np.float32(0.5)
    x = (s * rng.uniform(1.5 * lo - 0.5 * hi - 1, 1.5 * hi - 0.5 * lo + 1, (4, 6))).astype(
        np.float32
    )
    g = rng.standard_normal((4, 6)).astype(np.float32)
    y, dx, ds, dz = _vjp_fn("ste", fmt)(x, s, np.float32(0), g)
    np.testing.assert_array_equal(np.asarray(dx), g)
    assert float(ds) == 0 and float(dz) == 0
    y2, dx2, ds2, dz2 = _vjp_fn("clipped_ste", fmt)(x, s, np.float32(0), g)
    np.testing.assert_array_equal(np.asarray(y2), np.asarray(y))
    v = _v(x, s)
    inside = (v >= lo) & (v <= hi)
    assert inside.any() and not inside.all()
    np.testing.assert_array_equal(np.asarray(dx2), np.where(inside, g, 0))
    assert float(ds2) == 0 and float(dz2) == 0


# --- against jax.grad of the surrogates written out -------------------------------------------


def _grad_scale(s, gs):
    """Value ``s``, gradient ``gs`` (LSQ's gradient scaling)."""
    return s * gs + sg(s - s * gs)


def _round_pass(v):
    return v + sg(jnp.round(v) - v)


def _lsq_surrogate(x, s, z, fmt, plus):
    n = x.size / s.size
    gs = 1 / jnp.sqrt(n * fmt.qmax)
    s = _grad_scale(s, gs)
    z = _grad_scale(z, gs) if plus else sg(z)
    return (_round_pass(jnp.clip(x / s + z, fmt.qmin, fmt.qmax)) - z) * s


def _pact_surrogate(x, s, z, fmt, plus):
    alpha = s * fmt.qmax
    y = jnp.clip(x, 0.0, alpha)  # PACT's 0.5 (|x| - |x - alpha| + alpha)
    return y + sg(jnp.round(y / s) * s - y)


def _clipped_surrogate(x, s, z, fmt, plus):
    y = jnp.clip(x, sg(s) * fmt.qmin, sg(s) * fmt.qmax)
    return y + sg(jnp.round(y / s) * s - y)


SURROGATES = {
    "lsq": functools.partial(_lsq_surrogate, plus=False),
    "lsq_plus": functools.partial(_lsq_surrogate, plus=True),
    "pact": functools.partial(_pact_surrogate, plus=False),
    "clipped_ste": functools.partial(_clipped_surrogate, plus=False),
}


class SurrogateTest(chex.TestCase):
    # eager (without_jit) dispatch of four custom VJPs costs more than it adds here;
    # test_ste_variants below runs both
    @chex.variants(with_jit=True)
    def test_backward_equals_grad_of_surrogate(self):
        fmt = jq.uint4
        rng = np.random.default_rng(7)
        s_shape = (6,)
        scale = rng.uniform(0.05, 0.2, s_shape).astype(np.float32)
        x = _data(scale, (4, 6), -3, fmt.qmax, 8)
        g = rng.standard_normal((4, 6)).astype(np.float32)
        zp = np.zeros(s_shape, np.float32)

        def all_grads(x, s, z):
            out = {}
            for name, surrogate in SURROGATES.items():
                ours = lambda x, s, z, name=name: jq.fake_quant(
                    x, jq.QParams(s, z), fmt, estimator=name
                )
                theirs = lambda x, s, z, surrogate=surrogate: surrogate(x, s, z, fmt)
                (y1, vjp1), (y2, vjp2) = jax.vjp(ours, x, s, z), jax.vjp(theirs, x, s, z)
                out[name] = (y1, y2, vjp1(g), vjp2(g))
            return out

        for name, (y1, y2, d1, d2) in self.variant(all_grads)(x, scale, zp).items():
            np.testing.assert_allclose(np.asarray(y1), np.asarray(y2), rtol=1e-6, err_msg=name)
            for a, b, what in zip(d1, d2, ("x", "scale", "zp"), strict=True):
                np.testing.assert_allclose(
                    np.asarray(a), np.asarray(b), rtol=2e-5, atol=1e-6, err_msg=f"{name} d{what}"
                )

    @chex.variants(with_jit=True, without_jit=True)
    def test_ste_variants(self):
        x = jnp.array([-300.0, -1.26, 0.04, 0.05, 0.3, 1.27, 5.0])

        def value_and_grads(x, s):
            f = lambda x, s: jnp.sum(jq.fake_quant(x, jq.QParams(s), jq.int8) * jnp.arange(7.0))
            return jax.value_and_grad(f, argnums=(0, 1))(x, s)

        val, (dx, ds) = self.variant(value_and_grads)(x, jnp.float32(0.01))
        y = np.clip(np.round(np.asarray(x) / np.float32(0.01)), -128, 127) * np.float32(0.01)
        np.testing.assert_allclose(float(val), np.sum(y * np.arange(7.0)), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(dx), np.arange(7.0))
        assert float(ds) == 0.0


# --- finite differences where the fake-quant is smooth ----------------------------------------


def test_check_grads_on_smooth_parts():
    fmt = jq.uint4
    x_hi = jnp.array([3.0, 4.5, 10.0])  # all clipped at alpha = 15 * 0.1 = 1.5: y = alpha

    def pact_of_scale(s):
        return jq.fake_quant(x_hi, jq.QParams(s), fmt, estimator="pact")

    check_grads(jax.jit(pact_of_scale), (jnp.float32(0.1),), order=1, modes=["rev"], eps=1e-3)
    # constant (saturated) in x: the true derivative 0 is what clipped_ste / lsq / pact give
    ests = ("clipped_ste", "lsq", "lsq_plus", "pact")
    f = lambda x: jnp.stack([jq.fake_quant(x, jq.QParams(0.1), fmt, estimator=e) for e in ests])
    check_grads(jax.jit(f), (x_hi,), order=1, modes=["rev"], eps=1e-2)
    # LSQ with one element and Q_P = 1 (int2) has gradient scale 1: y = s Q_P above the range
    lsq_of_scale = lambda s: jq.fake_quant(
        jnp.array([5.0]), jq.QParams(s), jq.int2, estimator="lsq"
    )
    check_grads(jax.jit(lsq_of_scale), (jnp.float32(0.7),), order=1, modes=["rev"], eps=1e-3)


# --- shapes, bad input, NaN / Inf -------------------------------------------------------------


def _all_estimators(fmt_for, x, scale, zp, g):
    """{estimator: (y, dx, dscale, dzp)} for every estimator, in one compiled program."""

    @jax.jit
    def run(x, scale, zp, g):
        out = {}
        for e in jq.ESTIMATORS:
            fq = lambda x, s, z, e=e: jq.fake_quant(x, jq.QParams(s, z), fmt_for(e), estimator=e)
            y, vjp = jax.vjp(fq, x, scale, zp)
            out[e] = (y, *vjp(g))
        return out

    return run(x, scale, zp, g)


def test_gradients_have_parameter_shapes_per_block():
    x = jq.to_blocks(jnp.linspace(-3, 3, 3 * 16).reshape(3, 16), axis=1, block_size=4)
    scale, zp = jnp.full((3, 4, 1), 0.01), jnp.zeros((3, 4, 1))
    fmt_for = lambda e: jq.uint8 if e == "pact" else jq.int8
    for e, (_, dx, ds, dz) in _all_estimators(fmt_for, x, scale, zp, jnp.ones_like(x)).items():
        assert dx.shape == x.shape and ds.shape == (3, 4, 1) and dz.shape == (3, 4, 1), e
        if e in ("lsq", "lsq_plus", "pact"):
            assert np.any(np.asarray(ds) != 0), e


def test_nan_and_inf_through_estimators():
    x = jnp.array([jnp.inf, -jnp.inf, 0.3, jnp.nan])
    out = _all_estimators(lambda e: jq.int8, x, jnp.float32(0.1), jnp.float32(0), jnp.ones(4))
    out_finite = _all_estimators(
        lambda e: jq.int8, x[:3], jnp.float32(0.1), jnp.float32(0), jnp.ones(3)
    )
    for e in jq.ESTIMATORS:
        y = np.asarray(out[e][0])
        assert y[0] == np.float32(0.1) * 127 and y[1] == np.float32(0.1) * -128, e
        assert np.isnan(y[3]), e
        # the saturated infinities give finite gradients (inf * 0 must not become NaN)
        assert all(np.all(np.isfinite(np.asarray(d))) for d in out_finite[e][1:]), e


def test_bad_estimator_input():
    x = jnp.ones(3)
    with pytest.raises(ValueError, match="estimator"):
        jq.fake_quant(x, jq.QParams(1.0), jq.int8, estimator="lsq2")
    for est in ("lsq", "lsq_plus", "pact"):
        with pytest.raises(ValueError, match="IntFormat"):
            jq.fake_quant(x, jq.QParams(1.0), jq.fp8_e4m3, estimator=est)
    with pytest.raises(TypeError, match="x"):
        jq.fake_quant(jnp.ones(3, jnp.int32), jq.QParams(1.0), jq.int8)
    with pytest.raises(ValueError, match="unsigned"):
        jq.pact_qparams(1.0, jq.int8)


def test_traced_bits_gradients_equal_static_bits():
    x = jnp.linspace(-2, 2, 12)

    def grads(fmt):
        f = lambda s: jnp.sum(jq.fake_quant(x, jq.QParams(s), fmt, estimator="lsq") * x)
        return jax.grad(f)(jnp.float32(0.05))

    traced = jax.jit(jax.vmap(grads))(jq.IntFormat(jnp.arange(2, 9)))
    static = jax.jit(lambda: jnp.stack([grads(jq.IntFormat(b)) for b in range(2, 9)]))()
    np.testing.assert_allclose(np.asarray(traced), np.asarray(static), rtol=1e-6)


def test_lsq_and_lsq_plus_initialisations_against_numpy():
    """Esser et al. sec. 2.1: ``2 mean|v| / sqrt(Q_P)``; Bhalgat et al. sec. 3.3:
    ``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``; per tensor and per channel."""
    from jquant.estimators import lsq_init_scale, lsq_plus_weight_init_scale

    w = np.asarray(jax.random.normal(jax.random.key(3), (5, 4)) + 0.3)
    for bits in (2, 4, 8):
        fmt = jq.IntFormat(bits)
        q_p = 2 ** (bits - 1) - 1
        np.testing.assert_allclose(
            lsq_init_scale(w, fmt), 2 * np.abs(w).mean() / np.sqrt(q_p), rtol=1e-6
        )
        got = lsq_init_scale(w, fmt, axis=1)
        assert got.shape == (1, 4)
        np.testing.assert_allclose(got[0], 2 * np.abs(w).mean(0) / np.sqrt(q_p), rtol=1e-6)
        # an affine grid whose zero point is qmin: Q_P = 2^b - 1 positive levels
        np.testing.assert_allclose(
            lsq_init_scale(w, fmt, zero_point=fmt.qmin),
            2 * np.abs(w).mean() / np.sqrt(2**bits - 1),
            rtol=1e-6,
        )
        mu, sd = w.mean(0), w.std(0)
        want = np.maximum(np.abs(mu - 3 * sd), np.abs(mu + 3 * sd)) / 2 ** (bits - 1)
        np.testing.assert_allclose(lsq_plus_weight_init_scale(w, fmt, axis=-1)[0], want, rtol=1e-5)
    assert float(lsq_init_scale(np.zeros(3), jq.int4)) > 0  # never a zero step
    with pytest.raises(TypeError, match="IntFormat"):
        lsq_init_scale(w, jq.fp8_e4m3)


# --- estimator objects and their registry ---------------------------------------------------


def test_estimator_registry_resolves_names_once_and_refuses_clashes():
    from jquant import estimators as est

    for name in jq.ESTIMATORS:
        obj = est.get_estimator(name)
        assert obj.name == name and obj == name and est.get_estimator(obj) is obj
    learned = {
        n: (e.learns_scale, e.learns_zero_point, e.learns_clip)
        for n in jq.ESTIMATORS
        if (e := est.get_estimator(n)).learned
    }
    assert learned == {
        "lsq": (True, False, False),
        "lsq_plus": (True, True, False),
        "pact": (False, False, True),
    }
    with pytest.raises(ValueError, match="estimator must be one of"):
        est.get_estimator("nope")
    with pytest.raises(TypeError, match="estimator"):
        est.get_estimator(3)
    with pytest.raises(ValueError, match="already registered"):
        est.register_estimator(est.Estimator("lsq", lambda res, g: (g, None, None)))
    cfg = jq.QuantConfig(estimator="lsq")
    assert cfg.estimator is est.lsq and cfg == jq.QuantConfig(estimator=est.lsq)


def test_unregistered_estimator_object_works_and_matches_its_rule():
    from jquant import estimators as est

    # dL/dx = 2 g inside, dL/dscale = sum g: a rule written here, not registered
    doubled = est.Estimator(
        "doubled",
        lambda res, g: (2 * g * res.inside, est.sum_to(g, res.scale), None),
        learns_scale=True,
    )
    x = jnp.array([[0.1, 0.7, 9.0], [-0.3, -9.0, 0.2]], jnp.float32)
    qp = jq.QParams(jnp.full((1, 3), 0.5, jnp.float32), jnp.zeros((), jnp.float32))
    gx, gqp = jax.grad(
        lambda x, qp: jnp.sum(jq.fake_quant(x, qp, jq.int4, estimator=doubled)), (0, 1)
    )(x, qp)
    v = np.asarray(x) / 0.5
    np.testing.assert_array_equal(np.asarray(gx), 2.0 * ((v >= -8) & (v <= 7)))
    np.testing.assert_array_equal(np.asarray(gqp.scale), [[2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(np.asarray(gqp.zero_point), 0.0)


def test_estimator_with_a_partial_backward_is_one_static_value():
    from jquant import estimators as est

    def rule(factor, res, g):
        return factor * g, None, None

    e = est.Estimator("scaled", functools.partial(rule, 3.0))
    assert e == e and hash(e) == hash(e)  # equality does not deep-copy the partial
    cfgs = [jq.QuantConfig(estimator=e) for _ in range(2)]
    assert jax.tree_util.tree_structure(cfgs[0]) == jax.tree_util.tree_structure(cfgs[1])
    g = jax.grad(lambda x: jnp.sum(jq.fake_quant(x, jq.QParams(1.0), jq.int8, estimator=e)))
    np.testing.assert_array_equal(np.asarray(g(jnp.ones(3))), 3.0)
