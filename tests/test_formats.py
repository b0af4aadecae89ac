"""Tests for jquant.formats: integer grids, the binary grid and minifloats.

Oracles: Python integer arithmetic and ``np.iinfo`` for integer grids; ``ml_dtypes`` casts
(bit patterns) for float8 / bfloat16 and NumPy's float16 for fp16.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import jquant as jq

BITS = list(range(2, 17))

# (our format, the reference dtype, the unsigned view of its bit pattern)
FLOAT_CASES = [
    (jq.fp8_e4m3, ml_dtypes.float8_e4m3fn, np.uint8),
    (jq.fp8_e5m2, ml_dtypes.float8_e5m2, np.uint8),
    (jq.fp16, np.float16, np.uint16),
    (jq.bf16, ml_dtypes.bfloat16, np.uint16),
]
FLOAT_IDS = [f.name for f, _, _ in FLOAT_CASES]

# Compiled once per format and reused: eager dispatch op by op is slower than compiling.
_ROUND = {f.name: jax.jit(lambda x, f=f: jq.round_to_float_format(x, f)) for f, _, _ in FLOAT_CASES}
_fake_quant = jax.jit(jq.fake_quant, static_argnames=("fmt", "rounding", "estimator"))
_quantize = jax.jit(jq.quantize, static_argnames=("fmt", "rounding"))
_dequantize = jax.jit(jq.dequantize, static_argnames=("fmt",))


# --- IntFormat --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("narrow", [False, True])
def test_int_grid_limits_match_integer_formula(bits, signed, narrow):
    f = jq.IntFormat(bits, signed=signed, narrow=narrow)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    assert (f.qmin, f.qmax) == (lo + narrow, hi)
    assert f.levels == hi - lo + 1 - narrow
    assert isinstance(f.qmin, int) and isinstance(f.qmax, int)


@pytest.mark.parametrize(
    "fmt, np_dtype",
    [
        (jq.int8, np.int8),
        (jq.uint8, np.uint8),
        (jq.int16, np.int16),
        (jq.IntFormat(16, False), np.uint16),
    ],
)
def test_int_grid_limits_match_numpy_iinfo(fmt, np_dtype):
    info = np.iinfo(np_dtype)
    assert (fmt.qmin, fmt.qmax) == (info.min, info.max)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_storage_dtype(bits, signed):
    want = {(True, True): np.int8, (True, False): np.uint8}.get((bits <= 8, signed))
    if want is None:
        want = np.int16 if signed else np.uint16
    fmt = jq.IntFormat(bits, signed=signed)
    assert fmt.dtype == want
    # the whole grid fits the storage dtype
    info = np.iinfo(fmt.dtype)
    assert info.min <= fmt.qmin and fmt.qmax <= info.max
    assert jq.IntFormat(jnp.asarray(bits), signed=signed).dtype == jnp.int32


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("narrow", [False, True])
def test_traced_bits_limits_equal_static(signed, narrow):
    traced = jq.IntFormat(jnp.arange(2, 17), signed=signed, narrow=narrow)
    static = [jq.IntFormat(b, signed=signed, narrow=narrow) for b in BITS]
    np.testing.assert_array_equal(np.asarray(traced.qmin), [f.qmin for f in static])
    np.testing.assert_array_equal(np.asarray(traced.qmax), [f.qmax for f in static])
    # the same under vmap, where bits is a tracer
    qmin, qmax = jax.vmap(lambda f: (f.qmin, f.qmax))(traced)
    np.testing.assert_array_equal(np.asarray(qmax), [f.qmax for f in static])
    np.testing.assert_array_equal(np.asarray(qmin), [f.qmin for f in static])


def test_int_format_is_a_pytree_with_bits_leaf():
    f = jq.IntFormat(4, signed=False, narrow=True)
    leaves, treedef = jax.tree_util.tree_flatten(f)
    assert leaves == [4]
    assert jax.tree_util.tree_unflatten(treedef, [6]) == jq.IntFormat(6, signed=False, narrow=True)
    # signed / narrow / midrise live in the treedef: they are static
    structs = {
        jax.tree_util.tree_structure(g)
        for g in (jq.IntFormat(4), jq.IntFormat(4, signed=False), jq.IntFormat(4, narrow=True))
    }
    assert len(structs) == 3
    assert jax.tree_util.tree_structure(jq.IntFormat(4)) == jax.tree_util.tree_structure(
        jq.IntFormat(7)
    )
    doubled = jax.tree_util.tree_map(lambda b: b * 2, jq.IntFormat(4))
    assert doubled == jq.IntFormat(8)


def test_int_format_bits_traced_through_jit_compiles_once():
    traces = []

    @jax.jit
    def qmax(f):
        traces.append(None)
        return f.qmax

    assert [float(qmax(jq.IntFormat(jnp.int32(b)))) for b in (3, 5, 9)] == [3.0, 15.0, 255.0]
    assert len(traces) == 1


def test_int_format_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        jq.int8.bits = 4


@pytest.mark.parametrize(
    "bits, exc",
    [
        (1, ValueError),
        (17, ValueError),
        (0, ValueError),
        (8.5, ValueError),
        (8.0, ValueError),
        (True, TypeError),
        ("8", TypeError),
        (np.array([2, 17]), ValueError),
        (np.array([2.5, 3.0]), ValueError),
        (jnp.array([1, 4]), ValueError),
    ],
)
def test_bad_bits_raise_naming_bits(bits, exc):
    with pytest.raises(exc, match="bits"):
        jq.IntFormat(bits)


def test_midrise_requires_signed_non_narrow():
    with pytest.raises(ValueError, match="midrise"):
        jq.IntFormat(4, signed=False, midrise=True)
    with pytest.raises(ValueError, match="midrise"):
        jq.IntFormat(4, narrow=True, midrise=True)


def test_midrise_grid_has_half_integer_levels_and_no_zero():
    fmt = jq.IntFormat(3, midrise=True)
    qp = jq.qparams_from_range(-1.0, 1.0, fmt)
    s = float(qp.scale)
    # top level (qmax + 1/2) * s is the range end
    assert s == pytest.approx(1.0 / 3.5, rel=1e-7)
    # offset so that no x is an exact tie between two levels (0 is one: -s/2 vs +s/2)
    x = jnp.linspace(-2.0, 2.0, 401) + 0.003
    y = np.asarray(_fake_quant(x, qp, fmt))
    levels = (np.arange(fmt.qmin, fmt.qmax + 1) + 0.5) * s
    np.testing.assert_allclose(np.unique(y), levels, rtol=1e-6)
    assert not np.any(y == 0)
    # each x goes to its nearest level
    nearest = levels[np.argmin(np.abs(np.asarray(x)[:, None] - levels[None, :]), axis=1)]
    np.testing.assert_allclose(y, nearest, rtol=1e-6)
    q = _quantize(x, qp, fmt)
    np.testing.assert_allclose(np.asarray(_dequantize(q, qp, fmt)), y, rtol=1e-6)


# --- BinaryFormat -----------------------------------------------------------------------------


def test_binary_format_is_sign_with_sign0_positive():
    x = jnp.array([-3.0, -1e-30, 0.0, -0.0, 2e-30, 5.0, jnp.inf, -jnp.inf])
    qp = jq.QParams(jnp.float32(0.75))
    q = _quantize(x, qp, jq.binary)
    assert q.dtype == jnp.int8
    np.testing.assert_array_equal(np.asarray(q), [-1, -1, 1, 1, 1, 1, 1, -1])
    y = _fake_quant(x, qp, jq.binary)
    np.testing.assert_array_equal(np.asarray(y), 0.75 * np.array([-1, -1, 1, 1, 1, 1, 1, -1]))
    assert np.isnan(float(_fake_quant(jnp.float32(jnp.nan), qp, jq.binary)))
    qp = jq.qparams_from_range(-0.5, 2.0, jq.binary)
    assert float(qp.scale) == 2.0 and float(qp.zero_point) == 0.0


def test_binary_format_static_under_jit():
    assert jax.tree_util.tree_leaves(jq.binary) == []
    assert jax.tree_util.tree_leaves(jq.fp8_e4m3) == []


# --- FloatFormat ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt, dt, _", FLOAT_CASES, ids=FLOAT_IDS)
def test_float_format_constants_match_finfo(fmt, dt, _):
    info = ml_dtypes.finfo(dt)
    assert fmt.max == float(info.max)
    assert fmt.smallest_subnormal == float(info.smallest_subnormal)
    assert 2.0**fmt.emin == float(info.smallest_normal)
    assert fmt.bits == info.bits


def _assert_same_bits(x: np.ndarray, fmt, dt, uint):
    """Our rounding of float32 ``x`` equals the ml_dtypes / NumPy cast, bit for bit."""
    y = np.asarray(_ROUND[fmt.name](jnp.asarray(x)))
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(dt)
        ours = y.astype(dt)  # exact when y is on the grid, which we check next
    nan = np.isnan(y)
    np.testing.assert_array_equal(ours.astype(np.float32)[~nan], y[~nan])
    mism = ours.view(uint) != ref.view(uint)
    assert not mism.any(), (
        f"{mism.sum()} mismatches, e.g. x={x[mism][:4]} -> {y[mism][:4]}, want {ref[mism][:4]}"
    )


def _grid_and_midpoints(dt, uint) -> np.ndarray:
    """Every value of the format, the exact midpoints between neighbours and 1 ulp around them."""
    codes = np.arange(np.iinfo(uint).max + 1, dtype=np.uint64).astype(uint)
    vals = codes.view(dt).astype(np.float64)
    pos = np.unique(vals[np.isfinite(vals) & (vals >= 0)])
    mids = (pos[:-1] + pos[1:]) / 2
    info = ml_dtypes.finfo(dt)
    top = float(info.max) + (pos[-1] - pos[-2]) / 2  # the overflow tie above max
    exact = np.concatenate([mids, [top]])
    m32 = exact.astype(np.float32)
    assert np.all(m32.astype(np.float64) == exact)
    near = np.concatenate(
        [m32, np.nextafter(m32, np.float32(np.inf)), np.nextafter(m32, np.float32(0))]
    )
    allv = np.concatenate([vals[np.isfinite(vals)].astype(np.float32), near])
    return np.concatenate([allv, -allv])


@pytest.mark.parametrize("fmt, dt, uint", FLOAT_CASES, ids=FLOAT_IDS)
def test_round_to_float_format_grid_ties_and_neighbours_match_cast(fmt, dt, uint):
    _assert_same_bits(_grid_and_midpoints(dt, uint), fmt, dt, uint)


@pytest.mark.parametrize("fmt, dt, uint", FLOAT_CASES, ids=FLOAT_IDS)
def test_round_to_float_format_special_values_match_cast(fmt, dt, uint):
    mx = float(ml_dtypes.finfo(dt).max)
    tiny = float(ml_dtypes.finfo(dt).smallest_subnormal)
    f32 = np.finfo(np.float32)
    mx4 = min(4 * mx, float(f32.max))
    x = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, mx, -mx, mx * 1.01, mx * 1.2, mx4]
        + [tiny, tiny / 2, tiny * 0.51, tiny * 0.49, tiny * 1.5, tiny * 2.5, -tiny * 1.5]
        + [float(f32.max), float(f32.smallest_normal), float(f32.smallest_subnormal), 1e-40]
        + [1.0, -1.0, 1.0 + 2**-20, 3.14159, -2.71828],
        np.float32,
    )
    _assert_same_bits(x, fmt, dt, uint)


@pytest.mark.parametrize("fmt, dt, uint", FLOAT_CASES, ids=FLOAT_IDS)
def test_round_to_float_format_random_bit_patterns_match_cast(fmt, dt, uint, rng):
    x = rng.integers(0, 2**32, size=50_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    _assert_same_bits(x, fmt, dt, uint)


def test_saturating_float_format_clamps_to_max():
    fmt = dataclasses.replace(jq.fp8_e4m3, saturate=True)
    x = np.array([500.0, -1e6, np.inf, -np.inf, 448.0, 464.0, 100.3, np.nan], np.float32)
    y = np.asarray(jax.jit(jq.round_to_float_format, static_argnums=1)(x, fmt))
    want = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(y, want)  # NaN == NaN for assert_array_equal


def test_float_format_through_quantize_and_fake_quant(rng):
    x = (rng.standard_normal(256) * 30).astype(np.float32)
    s = np.float32(0.37)
    qp = jq.QParams(jnp.float32(s))
    for fmt, dt, _ in FLOAT_CASES[:3]:
        q = np.asarray(_quantize(x, qp, fmt))
        np.testing.assert_array_equal(q, (x / s).astype(dt).astype(np.float32))
        y = np.asarray(_fake_quant(jnp.asarray(x), qp, fmt))
        np.testing.assert_array_equal(y, q * s)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(exponent_bits=0, mantissa_bits=3), "exponent_bits"),
        (dict(exponent_bits=9, mantissa_bits=3), "exponent_bits"),
        (dict(exponent_bits=4, mantissa_bits=-1), "mantissa_bits"),
        (dict(exponent_bits=4, mantissa_bits=2.0), "mantissa_bits"),
        (dict(exponent_bits=4, mantissa_bits=3, inf="none"), "inf"),
    ],
)
def test_bad_float_format_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jq.FloatFormat(**kwargs)


# --- named formats ----------------------------------------------------------------------------


def test_get_format():
    for name, fmt in jq.NAMED_FORMATS.items():
        assert jq.get_format(name) is fmt
        assert jq.get_format(fmt) is fmt
    with pytest.raises(ValueError, match="int7"):
        jq.get_format("int7")
    with pytest.raises(TypeError, match="format"):
        jq.get_format(8)


# --- rounding modes of float formats (issue #12) ----------------------------------------------

_FP8 = FLOAT_CASES[:2]


def _round_mode(x, fmt, rounding):
    """Rounding through the public fake_quant with scale 1 (``x / 1`` and ``1 * y`` are exact)."""
    return _fake_quant(x, jq.QParams(1.0), fmt, rounding=rounding)


def _neighbours(x: np.ndarray, dt) -> tuple[np.ndarray, np.ndarray]:
    """The largest grid value <= x and the smallest >= x, from every finite code of ``dt``."""
    codes = np.arange(256, dtype=np.uint8).view(dt).astype(np.float64)
    grid = np.unique(codes[np.isfinite(codes)])
    x64 = x.astype(np.float64)
    lo = grid[np.searchsorted(grid, x64, "right") - 1]
    hi = grid[np.searchsorted(grid, x64, "left")]
    return lo, hi


def _in_range_samples(dt, rng) -> np.ndarray:
    """Grid values, exact midpoints, 1 ulp around them and random values inside [-max, max]."""
    mx = float(ml_dtypes.finfo(dt).max)
    grid = _grid_and_midpoints(dt, np.uint8)
    grid = grid[np.abs(grid) <= mx]
    rand = rng.uniform(-mx, mx, 2000) * np.exp2(-rng.integers(0, 20, 2000))
    return np.concatenate([grid, rand.astype(np.float32), [0.0, -0.0, 1e-30, -1e-30]]).astype(
        np.float32
    )


@pytest.mark.parametrize("rounding", ["floor", "half_away", "half_up"])
@pytest.mark.parametrize("fmt, dt, uint", _FP8, ids=[f.name for f, _, _ in _FP8])
def test_float_format_directed_and_tie_modes_pick_the_right_ml_dtypes_neighbour(
    fmt, dt, uint, rounding, rng
):
    x = _in_range_samples(dt, rng)
    lo, hi = _neighbours(x, dt)
    x64 = x.astype(np.float64)
    if rounding == "floor":
        want = lo
    else:
        d_lo, d_hi = x64 - lo, hi - x64
        tie_up = np.abs(hi) > np.abs(lo) if rounding == "half_away" else np.ones(x.shape, bool)
        want = np.where(d_lo < d_hi, lo, np.where(d_hi < d_lo, hi, np.where(tie_up, hi, lo)))
    y = np.asarray(_round_mode(jnp.asarray(x), fmt, rounding)).astype(np.float64)
    bad = y != want
    assert not bad.any(), f"x={x[bad][:4]} -> {y[bad][:4]}, want {want[bad][:4]}"


@pytest.mark.parametrize("fmt, dt, uint", _FP8, ids=[f.name for f, _, _ in _FP8])
def test_float_format_floor_overflow_is_ieee_round_toward_negative(fmt, dt, uint):
    mx = float(ml_dtypes.finfo(dt).max)
    x = np.array([1e6, mx * 1.5, -1e6, np.inf, -np.inf, np.nan], np.float32)
    y = np.asarray(_round_mode(jnp.asarray(x), fmt, "floor"))
    neg_overflow = -np.inf if fmt.inf == "ieee" else np.nan
    pos_inf = np.inf if fmt.inf == "ieee" else np.nan
    np.testing.assert_array_equal(y, [mx, mx, neg_overflow, pos_inf, neg_overflow, np.nan])


@pytest.mark.parametrize("fmt, dt, uint", _FP8, ids=[f.name for f, _, _ in _FP8])
def test_float_format_stochastic_rounding_is_unbiased_between_neighbours(fmt, dt, uint, rng):
    mx = float(ml_dtypes.finfo(dt).max)
    tiny = float(ml_dtypes.finfo(dt).smallest_subnormal)
    # normal, subnormal, below the smallest subnormal, negative, on the grid, near max
    x = np.array(
        [1.3, -2.7, 0.1, 3 * tiny / 4, tiny / 8, -tiny * 1.25, 1.0, mx * 0.97, 1e-30], np.float32
    )
    lo, hi = _neighbours(x, dt)
    n = 4000
    xs = jnp.broadcast_to(jnp.asarray(x), (n, x.size))
    fq = jax.jit(jq.fake_quant, static_argnames=("fmt", "rounding"))
    y = np.asarray(fq(xs, jq.QParams(1.0), fmt, rounding="stochastic", key=jax.random.key(3)))
    y = y.astype(np.float64)
    assert np.all((y == lo) | (y == hi)), "stochastic rounding left the two neighbours"
    step = hi - lo
    # E[y] = x; the mean of n Bernoulli draws has std <= step / (2 sqrt(n)); 5 sigma
    bound = 5 * step / (2 * np.sqrt(n)) + 2.0**-22 * step
    err = np.abs(y.mean(0) - x.astype(np.float64))
    assert np.all(err <= bound), (err, bound)
    # both neighbours occur where neither is nearly certain (not round-to-nearest in disguise)
    p = np.divide(x - lo, step, out=np.zeros_like(step), where=step > 0)
    mixed = (p > 0.05) & (p < 0.95)
    assert mixed.sum() >= 5
    assert np.all(((y == lo).any(0) & (y == hi).any(0))[mixed])


def test_float_format_stochastic_needs_a_key_and_quantize_uses_it():
    x = jnp.full((4096,), 1.1, jnp.float32)
    with pytest.raises(ValueError, match="key"):
        jq.quantize(x, jq.QParams(1.0), jq.fp8_e4m3, rounding="stochastic")
    q = _quantize(x, jq.QParams(1.0), jq.fp8_e4m3, rounding="stochastic", key=jax.random.key(0))
    q = np.asarray(q)
    assert set(np.unique(q)) == {1.0, 1.125}
    assert abs(q.mean() - 1.1) < 0.01


# --- the format protocol ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(jq.NAMED_FORMATS))
def test_named_formats_follow_the_protocol(name):
    fmt = jq.NAMED_FORMATS[name]
    assert isinstance(fmt, jq.formats.Format)
    jq.formats.check_format(fmt)
    lo, hi = fmt.grid_range()
    assert float(lo) <= 0 < float(hi)
    # values across the grid land on it, inside its range, and grid values are fixed points
    v = jnp.linspace(float(lo), float(hi), 97, dtype=jnp.float32)
    back = fmt.decode(fmt.encode(v, 0.0), 0.0)
    assert np.all((np.asarray(back) >= float(lo)) & (np.asarray(back) <= float(hi)))
    np.testing.assert_array_equal(np.asarray(fmt.decode(fmt.encode(back, 0.0), 0.0)), back)


def test_binary_format_has_no_integer_fields():
    assert dataclasses.fields(jq.binary) == ()
    with pytest.raises(TypeError):
        jq.BinaryFormat(bits=4)
    assert not hasattr(jq.binary, "midrise") and not hasattr(jq.binary, "narrow")


def test_get_format_names_missing_protocol_members():
    class Half:
        bits = 4

    with pytest.raises(TypeError, match="encode"):
        jq.get_format(Half())
    with pytest.raises(TypeError, match="fmt"):
        jq.quantize(jnp.ones(2), jq.QParams(1.0), Half())
