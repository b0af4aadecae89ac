"""Tests for jquant.calibration: range estimators, streaming observers, calibrate.

Oracles: NumPy (min/max, np.percentile, a loop re-implementation of TensorRT's entropy
calibration, brute-force MSE search with a NumPy quantizer), published values (Max 1960,
Banner et al. 2019), scipy minimisation of Banner's expressions, one-shot vs streamed.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special

import jquant as jq
from jquant import calibration as cal


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _np_fake_quant(x, lo, hi, fmt, symmetric):
    """NumPy quantizer of DESIGN.md (float64, half-even): the independent MSE oracle."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    qmin, qmax = fmt.qmin, fmt.qmax
    if symmetric:
        scale, zp = max(-lo, hi) / qmax, 0.0
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax) if scale > 0 else 0.0
    if not scale > 0:
        scale = 1.0
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


def _sse(x, lo, hi, fmt, symmetric):
    return float(np.sum((x - _np_fake_quant(x, lo, hi, fmt, symmetric)) ** 2))


# ----------------------------------------------------------------------------- one-shot ranges


@pytest.mark.parametrize("axis", [None, 0, -1, (0, 2)])
def test_minmax_absmax_match_numpy_per_axis(axis):
    x = _rng(1).standard_normal((3, 4, 5)).astype(np.float32)
    x[1, 2, 3] = np.nan
    x[0, 0, 0] = np.inf
    kept = () if axis is None else np.atleast_1d(axis) % 3
    reduce = tuple(i for i in range(3) if i not in kept)
    finite = np.where(np.isfinite(x), x, np.nan)
    want_lo = np.nanmin(finite, axis=reduce, keepdims=axis is not None)
    want_hi = np.nanmax(finite, axis=reduce, keepdims=axis is not None)
    lo, hi = cal.minmax(x, axis=axis)
    np.testing.assert_array_equal(lo, want_lo)
    np.testing.assert_array_equal(hi, want_hi)
    alo, ahi = cal.absmax(x, axis=axis)
    np.testing.assert_array_equal(ahi, np.maximum(-want_lo, want_hi))
    np.testing.assert_array_equal(alo, -np.asarray(ahi))
    assert np.broadcast_shapes(lo.shape, x.shape) == x.shape  # keepdims: QParams broadcast


def test_blocks_are_kept_block_axes():
    w = _rng(2).standard_normal((4, 12)).astype(np.float32)
    lo, hi = cal.absmax(jq.to_blocks(w, 1, 4), axis=(0, 1))
    assert lo.shape == (4, 3, 1)
    want = np.abs(w.reshape(4, 3, 4)).max(axis=2)
    np.testing.assert_array_equal(hi[..., 0], want)


@pytest.mark.parametrize("axis, symmetric", [(None, False), (1, True)])
def test_percentile_matches_numpy(axis, symmetric):
    x = _rng(3).laplace(size=(500, 3)).astype(np.float32)
    x[7, 0] = np.nan
    p = 99.0
    lo, hi = cal.percentile(x, p, axis=axis, symmetric=symmetric)
    kd = axis is not None
    if symmetric:
        want_hi = np.nanpercentile(np.abs(x.astype(np.float64)), p, axis=0, keepdims=kd)
        want_lo = -want_hi
    else:
        want_lo = np.nanpercentile(x.astype(np.float64), 100 - p, axis=0, keepdims=kd)
        want_hi = np.nanpercentile(x.astype(np.float64), p, axis=0, keepdims=kd)
    if axis is None:
        flat = x.astype(np.float64).ravel()
        v = np.abs(flat) if symmetric else flat
        want_hi = np.nanpercentile(v, p)
        want_lo = -want_hi if symmetric else np.nanpercentile(v, 100 - p)
    np.testing.assert_allclose(lo, want_lo, rtol=1e-5)
    np.testing.assert_allclose(hi, want_hi, rtol=1e-5)


@pytest.mark.parametrize("p, symmetric", [(0, True), (-1, True), (100.5, True), (40, False)])
def test_percentile_outside_range_raises(p, symmetric):
    with pytest.raises(ValueError, match="percentile"):
        cal.percentile(np.ones(4), p, symmetric=symmetric)
    with pytest.raises(ValueError, match="percentile"):
        obs = cal.histogram(method="percentile", percentile=p)
        obs.bounds(obs.init(np.ones(4)), jq.int8, symmetric=symmetric)


_MAX_1960 = {3: (0.04686, 0.6508), 4: (0.01289, 0.3534)}  # Max (1960): N = 7, 15 levels


def _check_max_1960(x):
    """Both widths in one vmapped call over traced bits; MSE and step vs Max's table."""
    widths = jq.IntFormat(bits=jnp.array([3, 4]), narrow=True)
    lo, hi = jax.vmap(lambda f: cal.mse(x, f, symmetric=True))(widths)
    qp = jax.vmap(lambda lo, hi, f: jq.qparams_from_range(lo, hi, f, symmetric=True))(
        lo, hi, widths
    )
    for k, bits in enumerate((3, 4)):
        step, qmax = float(qp.scale[k]), 2 ** (bits - 1) - 1
        x64 = np.asarray(x, np.float64)
        err = float(np.mean((x64 - np.clip(np.round(x64 / step), -qmax, qmax) * step) ** 2))
        want_mse, want_step = _MAX_1960[bits]
        assert abs(err / want_mse - 1) < 0.01, (bits, err)
        assert abs(step / want_step - 1) < 0.01, (bits, step)


def test_mse_finds_max_1960_optimum_on_stratified_gaussian():
    """2^16 stratified N(0, 1) samples (Phi^-1 at (k + 1/2) / n): MSE ~ the Gaussian integral."""
    n = 1 << 16
    _check_max_1960(jnp.asarray(special.ndtri((np.arange(n) + 0.5) / n), jnp.float32))


@pytest.mark.slow
def test_mse_finds_max_1960_optimum_on_a_million_samples():
    _check_max_1960(jax.random.normal(jax.random.key(0), (1_000_000,)))


@pytest.mark.parametrize("symmetric", [True, False])
def test_mse_matches_brute_force_numpy_search(symmetric):
    """Per channel, int4: the searched range is as good as a 4000-point NumPy grid."""
    x = np.stack([_rng(4).standard_normal(800), _rng(5).exponential(size=800) - 0.3], axis=1)
    x = x.astype(np.float32)
    x[[5, 9], 0] = np.nan  # ignored: the oracle sees only the finite values
    x[11, 1] = np.inf
    fmt = jq.int4
    lo, hi = cal.mse(x, fmt, axis=1, symmetric=symmetric)
    assert lo.shape == (1, 2)
    alphas = np.linspace(1e-3, 1.0, 4000)
    for c in range(2):
        col = x[:, c].astype(np.float64)
        col = col[np.isfinite(col)]
        base_lo, base_hi = min(col.min(), 0.0), max(col.max(), 0.0)
        brute = min(_sse(col, a * base_lo, a * base_hi, fmt, symmetric) for a in alphas)
        ours = _sse(col, float(lo[0, c]), float(hi[0, c]), fmt, symmetric)
        assert ours <= brute * (1 + 2e-3), (c, ours, brute)
        no_clip = _sse(col, base_lo, base_hi, fmt, symmetric)
        assert ours < no_clip  # clipping helps at 4 bits: the search did something


def _np_kl_at(hist, levels, i):
    """KL(P_i || Q_i) of Migacz (2017)'s pseudo-code, in float64, for one candidate ``i``."""
    p = hist[:i].astype(np.float64).copy()
    p[i - 1] += hist[i:].sum()
    ref = hist[:i].astype(np.float64)
    q = np.zeros(i)
    group = (np.arange(i) * levels) // i  # bin k merges into level floor(k * levels / i)
    for j in range(levels):
        members = np.flatnonzero(group == j)
        nonzero = members[ref[members] > 0]
        if nonzero.size:
            q[nonzero] = ref[members].sum() / nonzero.size
    if p.sum() == 0 or q.sum() == 0:
        return np.inf
    p, q = p / p.sum(), q / q.sum()
    mask = p > 0
    if np.any(q[mask] == 0):
        return np.inf
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _np_tensorrt_kl(hist, levels):
    """Straightforward loop over the candidates i = levels .. n (i = n included): the i of
    least divergence, whose threshold is the upper edge of bin i - 1."""
    divergences = [_np_kl_at(hist, levels, i) for i in range(levels, len(hist) + 1)]
    return levels + int(np.argmin(divergences))


@pytest.mark.parametrize(
    "fmt, num_bins", [(jq.IntFormat(6), 256), (jq.IntFormat(4, signed=False), 128)]
)
def test_kl_matches_numpy_tensorrt(fmt, num_bins):
    # Values at bin centres (plus one at the top edge) so that both sides bin them alike.
    width = 0.01
    k = np.minimum(np.floor(np.abs(_rng(6).laplace(scale=18.0, size=3000))), num_bins - 1)
    sign = _rng(7).choice([-1.0, 1.0], size=k.size)
    x = np.concatenate([sign * (k + 0.5) * width, [num_bins * width]]).astype(np.float32)
    v = np.abs(x) if fmt.signed else np.maximum(x, 0.0)
    hist = np.zeros(num_bins)
    np.add.at(hist, np.minimum((v / width).astype(int), num_bins - 1), 1)
    best = _np_tensorrt_kl(hist, fmt.qmax + 1)
    assert best < num_bins  # the data has a tail worth clipping
    lo, hi = cal.kl(np.concatenate([x, [np.nan, -np.inf]]), fmt, num_bins=num_bins)
    np.testing.assert_allclose(float(hi), best * width, rtol=1e-5)
    assert float(lo) == (-float(hi) if fmt.signed else 0.0)


@pytest.mark.slow
def test_kl_matches_numpy_tensorrt_int8_2048_bins():
    width = 1e-3
    k = np.minimum(np.floor(np.abs(_rng(8).standard_normal(20000)) * 300), 2047)
    x = np.concatenate([(k + 0.5) * width, [2048 * width]]).astype(np.float32)
    hist = np.bincount(np.minimum((x / width).astype(int), 2047), minlength=2048)
    best = _np_tensorrt_kl(hist, 128)
    np.testing.assert_allclose(float(cal.kl(x, jq.int8)[1]), best * width, rtol=1e-5)


def _scipy_aciq(bits, prior):
    def noise(t):
        if prior == "laplace":
            clip = 2 * np.exp(-t)
        else:
            clip = (t * t + 1) * special.erfc(t / np.sqrt(2)) - np.sqrt(2 / np.pi) * t * np.exp(
                -t * t / 2
            )
        return clip + t * t / (3 * 4.0**bits)

    return optimize.minimize_scalar(
        noise, bounds=(0, 40), method="bounded", options={"xatol": 1e-9}
    ).x


@pytest.mark.parametrize(
    "prior, published",
    [("laplace", (2.83, 3.89, 5.03)), ("gaussian", (1.71, 2.15, 2.55))],
)
def test_aciq_reproduces_banner_2019(prior, published):
    for bits, want in zip((2, 3, 4), published, strict=True):
        t = float(cal.aciq_clip(bits, prior))
        # Published to two decimals; the paper truncates some entries (3.8972 -> 3.89).
        assert abs(t - want) < 0.01, (prior, bits, t)
        np.testing.assert_allclose(t, _scipy_aciq(bits, prior), rtol=1e-5)


@pytest.mark.parametrize("prior", ["laplace", "gaussian"])
def test_aciq_on_data_scales_by_the_spread(prior):
    x = _rng(9).laplace(size=4000) if prior == "laplace" else _rng(10).standard_normal(4000)
    x = 3.0 * x + 0.5
    mu = x.mean()
    spread = np.abs(x - mu).mean() if prior == "laplace" else x.std()
    lo, hi = cal.aciq(np.append(x, np.nan).astype(np.float32), jq.int4, prior=prior)
    t = _scipy_aciq(4, prior)  # the optimum from the paper's formula in SciPy, not jquant's
    np.testing.assert_allclose(
        [float(lo), float(hi)], [mu - t * spread, mu + t * spread], rtol=1e-4
    )


def test_aciq_per_channel():
    x = np.stack([_rng(11).standard_normal(1000), 5 * _rng(12).standard_normal(1000)], 1)
    lo, hi = cal.aciq(x.astype(np.float32), jq.int3, axis=-1)
    t = float(cal.aciq_clip(3, "gaussian"))
    np.testing.assert_allclose(hi[0] - x.mean(0), t * x.std(0), rtol=1e-4)


# ----------------------------------------------------------------------------- under shard_map


def test_estimators_under_shard_map_equal_unsharded():
    # Each device of a shard_map calibrates for its own widths. Loop carries started from
    # constants were typed as replicated over the mesh: MSE's scan rejected the per-device
    # carry, and ACIQ's jax.grad summed its derivative over the devices. A one-device mesh
    # has the same typing; tests/test_sweep.py runs 2, 3 and 4 devices and 2 processes.
    x = jnp.asarray(_rng(13).standard_normal((64, 4)), jnp.float32)
    obs = cal.histogram(64, method="mse")
    state = obs.update(x, obs.init(x))

    def per_width(b):
        fmt = jq.IntFormat(b)
        return {
            "mse": cal.mse(x, fmt, axis=-1),
            "aciq": cal.aciq(x, fmt, prior="laplace"),
            "aciq_clip": cal.aciq_clip(b),
            "histogram_mse": obs.bounds(state, fmt, symmetric=True),
        }

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("bits",))
    spec = jax.sharding.PartitionSpec("bits")
    sharded = jax.shard_map(jax.vmap(per_width), mesh=mesh, in_specs=spec, out_specs=spec)
    bits = jnp.arange(2, 9)
    got = jax.jit(sharded)(bits)
    want = jax.jit(jax.vmap(per_width))(bits)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-6), got, want)
    clip = [float(cal.aciq_clip(int(b))) for b in bits]  # checked against SciPy above
    np.testing.assert_array_equal(got["aciq_clip"], clip)  # one table: the same float32


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "fn",
    [
        cal.minmax,
        cal.absmax,
        cal.percentile,
        functools.partial(cal.mse, fmt=jq.int8),
        functools.partial(cal.kl, fmt=jq.int8),
        functools.partial(cal.aciq, fmt=jq.int8),
    ],
)
def test_empty_array_raises(fn):
    with pytest.raises(ValueError, match="x must not be empty"):
        fn(np.zeros((0, 3), np.float32))


@pytest.mark.parametrize(
    "fn, fmt, match",
    [
        (cal.kl, jq.fp8_e4m3, "IntFormat"),
        (cal.kl, jq.binary, "IntFormat"),
        (cal.kl, jq.int16, "num_bins"),
        (cal.aciq, jq.fp8_e5m2, "IntFormat"),
        (cal.aciq, jq.uint8, "signed"),
    ],
)
def test_format_the_method_cannot_serve_raises(fn, fmt, match):
    with pytest.raises(ValueError, match=match):
        fn(np.ones(8, np.float32), fmt)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="prior"):
        cal.aciq(np.ones(4), jq.int8, prior="cauchy")
    with pytest.raises(ValueError, match="axis"):
        cal.minmax(np.ones((2, 2)), axis=2)
    with pytest.raises(TypeError, match="axis"):
        cal.minmax(np.ones((2, 2)), axis=1.0)
    with pytest.raises(TypeError, match="fmt"):
        cal.mse(np.ones(4), "int8")
    with pytest.raises(ValueError, match="num_candidates"):
        cal.mse(np.ones(4), jq.int8, num_candidates=2)
    with pytest.raises(ValueError, match="method"):
        cal.histogram(method="entropy")
    with pytest.raises(ValueError, match="num_bins"):
        cal.histogram(num_bins=1)
    with pytest.raises(ValueError, match="decay"):
        cal.ema_minmax(decay=1.0)
    with pytest.raises(ValueError, match="IntFormat"):
        obs = cal.histogram(method="kl")
        obs.result(obs.init(np.ones(4)), jq.fp8_e4m3)
    obs = cal.running_minmax(axis=-1)
    with pytest.raises(ValueError, match="does not match"):
        obs.update(np.ones((2, 5)), obs.init(np.ones((2, 4))))


# ----------------------------------------------------------------------------- constant, NaN

_ESTIMATORS = {  # per row (axis 0): one compilation serves every case
    "minmax": lambda x, f: cal.minmax(x, axis=0),
    "absmax": lambda x, f: cal.absmax(x, axis=0),
    "percentile": lambda x, f: cal.percentile(x, 99.0, axis=0),
    "mse": lambda x, f: cal.mse(x, f, axis=0),
    "kl": lambda x, f: cal.kl(x, f, axis=0, num_bins=64),
    "aciq": lambda x, f: cal.aciq(x, f, axis=0),
}
_OBSERVERS = {
    "running_minmax": cal.running_minmax(),
    "ema_minmax": cal.ema_minmax(),
    "hist_percentile": cal.histogram(64, "percentile", 99.0),
    "hist_mse": cal.histogram(64, "mse"),
    "hist_kl": cal.histogram(64, "kl"),
}


def test_constant_or_all_nan_data_gives_finite_scale():
    """Rows: constant 0, constant 3, all NaN."""
    x = np.stack([np.zeros(8), np.full(8, 3.0), np.full(8, np.nan)]).astype(np.float32)
    fmt = jq.int4
    for name, est in _ESTIMATORS.items():
        lo, hi = est(x, fmt)
        for symmetric in (False, True):
            qp = jq.qparams_from_range(lo, hi, fmt, symmetric=symmetric)
            scale = np.asarray(qp.scale)
            assert np.all(np.isfinite(scale) & (scale > 0)), (name, symmetric, scale)
            exact = name in ("minmax", "mse", "aciq") or (name == "absmax" and symmetric)
            if exact:  # the constant is on the grid, and so is 0
                np.testing.assert_allclose(jq.fake_quant(x, qp, fmt)[:2], x[:2], rtol=1e-6)
    for name, obs in _OBSERVERS.items():
        for row in x:
            qp = obs.result(obs.update(row, obs.init(row)), fmt)
            assert np.isfinite(float(qp.scale)) and float(qp.scale) > 0, (name, row[0])


def test_nan_is_ignored_and_counted():
    """One-shot estimators: NaN / Inf in the oracle tests above. Observers count them."""
    dirty = _rng(7).standard_normal(100).astype(np.float32)
    dirty[[3, 50]] = np.nan
    dirty[7] = -np.inf
    clean = dirty[np.isfinite(dirty)].astype(np.float64)
    obs = _OBSERVERS["running_minmax"]
    state = obs.update(dirty, obs.init(dirty))
    assert int(state.nonfinite) == 3 and int(state.count) == 97
    np.testing.assert_array_equal(obs.bounds(state), [clean.min(), clean.max()])
    obs = _OBSERVERS["hist_percentile"]
    state = obs.update(dirty, obs.init(dirty))
    assert int(state.nonfinite) == 3 and int(state.count) == 97
    np.testing.assert_allclose(float(jnp.sum(state.counts)), 97)
    width = float(state.amax) / 64
    want = np.percentile(np.abs(clean), 99.0)
    np.testing.assert_allclose(obs.bounds(state, symmetric=True)[1], want, atol=width)


# ----------------------------------------------------------------------------- observers

_HIST_BINS = 1024


def _histogram_of(batches):
    obs = cal.histogram(_HIST_BINS)
    state = obs.init(batches[0])
    rebins = -1  # the first update grows the empty range: not a re-binning
    for b in batches:
        new = obs.update(b, state)
        rebins += int(new.amax > state.amax)
        state = new
    return state, np.concatenate(batches), rebins


def _growing_stream(seed):
    rng = _rng(seed)
    return [
        (rng.standard_normal(4000) * (1 + 0.06 * i) + 0.2).astype(np.float32) for i in range(12)
    ]


@pytest.fixture(scope="module")
def grown():
    """Gaussian batches whose spread grows: the histogram range grows and re-bins."""
    state, whole, rebins = _histogram_of(_growing_stream(8))
    assert rebins >= 3
    return state, whole, rebins


@pytest.fixture(scope="module")
def fixed():
    """The same kind of stream, but the first batch holds max |x|: no re-binning, so the
    histogram's bins are those of the one-shot estimators."""
    batches = _growing_stream(9)
    batches[0][0] = 1.01 * max(np.abs(b).max() for b in batches)
    state, whole, rebins = _histogram_of(batches)
    assert rebins == 0
    return state, whole, rebins


@pytest.mark.parametrize("axis", [None, -1, (0, 2)])
def test_running_minmax_equals_one_shot_exactly(axis):
    rng = _rng(15)
    batches = [rng.standard_normal((2, 3, 5)).astype(np.float32) * (i + 1) for i in range(5)]
    obs = cal.running_minmax(axis=axis)
    state = obs.init(batches[0])
    for b in batches:
        state = obs.update(b, state)
    whole = np.concatenate(batches, axis=1)  # axis 1 is never kept here
    lo, hi = cal.minmax(whole, axis=axis)
    np.testing.assert_array_equal(state.min, lo)
    np.testing.assert_array_equal(state.max, hi)
    assert int(state.count) == whole.size
    qp = obs.result(state, jq.int8)
    want_scale = (np.maximum(hi, 0) - np.minimum(lo, 0)) / 255  # DESIGN.md's affine formula
    np.testing.assert_allclose(qp.scale, want_scale, rtol=1e-6)


def test_ema_minmax_follows_recurrence():
    decay = 0.9
    rng = _rng(16)
    batches = [rng.standard_normal(300).astype(np.float32) * (1 + 0.3 * i) for i in range(6)]
    obs = cal.ema_minmax(decay)
    state = obs.init(batches[0])
    for b in batches:
        state = obs.update(b, state)
    lo, hi = float(batches[0].min()), float(batches[0].max())
    for b in batches[1:]:
        lo = decay * lo + (1 - decay) * float(b.min())
        hi = decay * hi + (1 - decay) * float(b.max())
    np.testing.assert_allclose([state.min, state.max], [lo, hi], rtol=1e-6)


def test_histogram_conserves_mass_and_tracks_range(grown):
    state, whole, _ = grown
    np.testing.assert_allclose(float(jnp.sum(state.counts)), whole.size, rtol=1e-6)
    assert float(state.amax) == np.abs(whole).max()
    assert float(state.min) == whole.min() and float(state.max) == whole.max()
    assert np.all(np.asarray(state.counts) >= 0)


@pytest.mark.parametrize("symmetric", [True, False])
def test_histogram_percentile_within_one_bin_of_one_shot(fixed, grown, symmetric):
    """Within one bin; each re-binning moves mass by less than one more bin."""
    obs = cal.histogram(_HIST_BINS, "percentile", 99.9)
    for state, whole, rebins in (fixed, grown):
        width = float(state.amax) / _HIST_BINS
        got = obs.bounds(state, symmetric=symmetric)
        want = cal.percentile(whole, 99.9, symmetric=symmetric)
        np.testing.assert_allclose(got, want, atol=(1 + rebins) * width)


_HIST_KL = cal.histogram(_HIST_BINS, "kl")
_HIST_MSE = cal.histogram(_HIST_BINS, "mse")
_KL_FORMATS = [jq.int8, jq.uint4]


@pytest.mark.parametrize("fmt", _KL_FORMATS)
def test_histogram_kl_equals_one_shot_without_rebinning(fixed, fmt):
    state, whole, _ = fixed
    width = float(state.amax) / _HIST_BINS
    got = _HIST_KL.bounds(state, fmt)
    want = cal.kl(whole, fmt, num_bins=_HIST_BINS)
    np.testing.assert_allclose(got, want, atol=1.001 * width)


@pytest.mark.parametrize(
    "fmt", [jq.int8, pytest.param(jq.IntFormat(4, narrow=True), marks=pytest.mark.slow)]
)
def test_histogram_kl_near_optimal_with_rebinning(grown, fmt):
    """The KL objective is flat (at int8 neighbours 50 bins apart differ by 0.2%), so after
    re-binning compare divergences on the one-shot histogram, not thresholds."""
    state, whole, _ = grown
    width = float(state.amax) / _HIST_BINS
    hist = np.histogram(np.abs(whole), bins=_HIST_BINS, range=(0, float(state.amax)))[0]
    got = round(float(_HIST_KL.bounds(state, fmt)[1]) / width)
    best = round(float(cal.kl(whole, fmt, num_bins=_HIST_BINS)[1]) / width)
    levels = fmt.qmax + 1
    assert _np_kl_at(hist, levels, got) <= 1.01 * _np_kl_at(hist, levels, best)


@pytest.mark.parametrize("symmetric", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_histogram_mse_close_to_one_shot(fixed, grown, symmetric):
    for state, whole, rebins in (fixed, grown):
        width = float(state.amax) / _HIST_BINS
        got = _HIST_MSE.bounds(state, jq.int4, symmetric=symmetric)
        want = cal.mse(whole, jq.int4, symmetric=symmetric)
        np.testing.assert_allclose(got, want, atol=(1 + rebins) * width)
        # At 8 bits the MSE is flat around its minimum: compare what matters, the error.
        got = _HIST_MSE.bounds(state, jq.int8, symmetric=symmetric)
        want = cal.mse(whole, jq.int8, symmetric=symmetric)
        whole64 = whole.astype(np.float64)
        sse_got = _sse(whole64, *map(float, got), jq.int8, symmetric)
        sse_want = _sse(whole64, *map(float, want), jq.int8, symmetric)
        assert sse_got <= sse_want * 1.005


# ----------------------------------------------------------------------------- calibrate


class _ObservedDense(nn.Module):
    """A Dense layer that observes its input, as the nn/ layers do in calibrate mode."""

    observer: cal.Observer
    features: int = 3

    @nn.compact
    def __call__(self, x):
        stats = self.variable("quant_stats", "input", self.observer.init, x)
        if self.is_mutable_collection("quant_stats") and not self.is_initializing():
            stats.value = self.observer.update(x, stats.value)
        return nn.Dense(self.features)(x)


def test_calibrate_runs_observers_over_a_generator():
    obs = cal.running_minmax(axis=-1)
    model = _ObservedDense(obs)
    rng = _rng(17)
    data = [rng.standard_normal((8, 4)).astype(np.float32) * (i + 1) for i in range(5)]
    variables = model.init(jax.random.key(0), data[0])
    out = cal.calibrate(model.apply, variables, (b for b in data), progress=False)
    stats = out["quant_stats"]["input"]
    lo, hi = cal.minmax(np.concatenate(data), axis=-1)
    np.testing.assert_array_equal(stats.min, lo)
    np.testing.assert_array_equal(stats.max, hi)
    assert int(stats.count) == 5 * 32
    jax.tree.map(np.testing.assert_array_equal, out["params"], variables["params"])
    qp = obs.result(stats, jq.int8)
    # affine int8 from the range widened to include 0 (DESIGN.md), in NumPy
    lo0, hi0 = np.minimum(np.asarray(lo), 0), np.maximum(np.asarray(hi), 0)
    np.testing.assert_allclose(qp.scale, ((hi0 - lo0) / 255).reshape(1, 4), rtol=1e-6)
    want_zp = np.clip(np.round(-128 - lo0 / ((hi0 - lo0) / 255)), -128, 127).reshape(1, 4)
    np.testing.assert_allclose(qp.zero_point, want_zp)
    # max_batches stops early; the input variables are not modified
    two = cal.calibrate(model.apply, variables, data, max_batches=2, progress=False)
    assert int(two["quant_stats"]["input"].count) == 2 * 32
    assert int(variables["quant_stats"]["input"].count) == 0


def test_calibrate_bad_input_raises():
    model = _ObservedDense(cal.running_minmax())
    x = np.ones((2, 4), np.float32)
    variables = model.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="data"):
        cal.calibrate(model.apply, variables, iter([]), progress=False)
    with pytest.raises(ValueError, match="max_batches"):
        cal.calibrate(model.apply, variables, [x], max_batches=0, progress=False)
    with pytest.raises(ValueError, match="collection"):
        cal.calibrate(model.apply, {"params": variables["params"]}, [x], progress=False)


def test_aciq_mse_is_minimised_at_aciq_clip_and_checks_prior():
    from jquant.calibration import aciq_clip, aciq_mse

    for prior in ("gaussian", "laplace"):
        t = float(aciq_clip(4, prior))
        at = float(aciq_mse(t, 4, prior))
        assert at < float(aciq_mse(t * 0.97, 4, prior)) and at < float(aciq_mse(t * 1.03, 4, prior))
    with pytest.raises(ValueError, match="prior"):
        aciq_mse(1.0, 4, "cauchy")


# --- calibration methods as objects, one registry -------------------------------------------


def test_calibration_registry_names_and_uses():
    from jquant.nn.rules import CALIBRATIONS as RULE_CALIBRATIONS
    from jquant.sweep import CALIBRATIONS as SWEEP_CALIBRATIONS

    assert cal.observer_names()[:6] == ("minmax", "ema", "percentile", "mse", "kl", "aciq")
    assert RULE_CALIBRATIONS == cal.observer_names(streams=True)[:5]
    assert SWEEP_CALIBRATIONS == cal.observer_names(one_shot=True)[:5]
    assert cal.get_observer("percentile") == cal.Percentile() == "percentile"
    assert cal.Percentile(99.9) != "percentile"
    with pytest.raises(ValueError, match="calibration must be one of"):
        cal.get_observer("nope")
    with pytest.raises(TypeError, match="lacking"):
        cal.get_observer(object())
    with pytest.raises(ValueError, match="already registered"):
        cal.register_observer(cal.Percentile(99.0), "percentile")
    with pytest.raises(ValueError, match="percentile"):
        cal.Percentile(101.0)


def test_percentile_setting_is_an_observer_argument():
    from jquant.nn.rules import QuantRule

    rule = QuantRule(".*", calibration=cal.Percentile(99.0))
    assert rule.calibration == cal.Percentile(99.0)
    with pytest.raises(ValueError, match="streaming"):
        QuantRule(".*", calibration="aciq")
    x = np.random.default_rng(0).standard_normal((2, 4000)).astype(np.float32)
    obs = rule.calibration
    state = obs.init(x[0])
    for batch in x:
        state = obs.update(batch, state)
    lo, hi = obs.bounds(state, jq.int8, symmetric=True)
    want = np.percentile(np.abs(x), 99.0)
    width = np.abs(x).max() / 2048  # the histogram's bin width
    assert abs(float(hi) - want) <= width and float(lo) == -float(hi)
    one_shot = cal.Percentile(99.0).range(x, jq.int8, symmetric=True)
    np.testing.assert_allclose(float(one_shot[1]), want, rtol=1e-6)
