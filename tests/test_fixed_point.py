"""Tests for jquant.integer.fixed_point.

Oracles: the C semantics of TFLite / gemmlowp written with Python's exact big integers
(``c_*`` below: truncating division, 64-bit products, int32 wraparound), ``math.frexp`` for
QuantizeMultiplier, NumPy float32 for the ``fp32`` mode, the seed's and Jacob et al.'s worked
examples, and hypothesis properties. x64 stays off: everything must run in 32-bit words.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from jquant.integer import fixed_point as fxp

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
EDGES = [INT32_MIN, INT32_MIN + 1, -(2**30), -12345, -2, -1, 0, 1, 2, 54321, 2**30, INT32_MAX]

# ------------------------------------------------------------------ C reference (Python ints)


def c_wrap32(v: int) -> int:
    """Two's complement int32 wraparound."""
    return (v + 2**31) % 2**32 - 2**31


def c_div(n: int, d: int) -> int:
    """C integer division (truncates towards zero)."""
    q = abs(n) // abs(d)
    return q if (n >= 0) == (d > 0) else -q


def c_round_half_away(v: float) -> int:
    return int(math.copysign(math.floor(abs(v) + 0.5), v))


def c_quantize_multiplier(m: float, single: bool = False) -> tuple[int, int]:
    """TFLite QuantizeMultiplier (quantization_util.cc), incl. the q31 overflow fix-up."""
    if m == 0.0:
        return 0, 0
    q, shift = math.frexp(m)
    q_fixed = c_round_half_away(q * 2**31)
    if q_fixed == 2**31:
        q_fixed //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if single and shift > 30:
        return 2**31 - 1, 30
    return q_fixed, shift


def c_srdhm(a: int, b: int) -> int:
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    return c_div(ab + nudge, 2**31)


def c_rdbpot(x: int, e: int) -> int:
    mask = (1 << e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> e) + (1 if remainder > threshold else 0)


def c_mbqm(x: int, m0: int, shift: int, mode: str) -> int:
    """MultiplyByQuantizedMultiplier, double and single rounding (common.h)."""
    if mode == "double":
        left, right = max(shift, 0), max(-shift, 0)
        return c_rdbpot(c_srdhm(c_wrap32(x * (1 << left)), m0), right)
    total = 31 - shift
    return c_wrap32((x * m0 + (1 << (total - 1))) >> total)


# ----------------------------------------------------------------------------------- tests

_srdhm = jax.jit(fxp.saturating_rounding_doubling_high_mul)
_rdbpot = jax.jit(fxp.rounding_divide_by_pot)
_mbqm = jax.jit(fxp.multiply_by_quantized_multiplier, static_argnames=("mode",))


def _random_int32(rng, n):
    return rng.integers(INT32_MIN, INT32_MAX, n, endpoint=True).astype(np.int32)


def test_x64_is_off():
    assert not jax.config.jax_enable_x64


@given(st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_matches_tflite(m):
    m0, shift = fxp.quantize_multiplier(m)
    assert (int(m0), int(shift)) == c_quantize_multiplier(m)
    if m0:
        # M = 2^-n M0 with M0 / 2^31 in [0.5, 1) (Jacob et al. 2018), within half a Q31 ulp
        assert 2**30 <= int(m0) < 2**31
        assert abs(int(m0) * 2.0 ** (int(shift) - 31) - m) <= 2.0 ** (int(shift) - 32)


@pytest.mark.parametrize(
    "m, expected",
    [
        (0.0, (0, 0)),
        (0.5, (2**30, 0)),
        (1.0, (2**30, 1)),
        (0.75, (3 * 2**29, 0)),
        (1.0 - 2.0**-40, (2**30, 1)),  # q * 2^31 rounds up to 2^31: the fix-up
        (2.0**-40, (0, 0)),  # shift < -31
        (-0.75, (-3 * 2**29, 0)),
    ],
)
def test_quantize_multiplier_edges(m, expected):
    m0, shift = fxp.quantize_multiplier(m)
    assert (int(m0), int(shift)) == expected == c_quantize_multiplier(m)


def test_quantize_multiplier_arrays_and_single(rng):
    m = np.concatenate([rng.uniform(1e-6, 4.0, 50), [2.0**40, 2.0**31, 1e-3]])
    for mode in ("double", "single"):
        m0, shift = fxp.quantize_multiplier(m, mode)
        assert m0.dtype == np.int32 and m0.shape == m.shape
        want = [c_quantize_multiplier(float(v), single=mode == "single") for v in m]
        assert list(zip(m0.tolist(), shift.tolist(), strict=True)) == want
    assert fxp.quantize_multiplier(2.0**40, "single") == (2**31 - 1, 30)


def test_quantize_multiplier_bad_input():
    with pytest.raises(ValueError, match="mode"):
        fxp.quantize_multiplier(0.5, "fp32")
    with pytest.raises(ValueError, match="finite"):
        fxp.quantize_multiplier(float("nan"))
    with pytest.raises(TypeError, match="concrete"):
        jax.jit(lambda m: fxp.quantize_multiplier(m)[0])(0.5)


def test_srdhm_matches_big_integers(rng):
    edges = np.array(EDGES, np.int32)
    a = np.concatenate([_random_int32(rng, 3000), np.repeat(edges, len(edges))])
    b = np.concatenate([_random_int32(rng, 3000), np.tile(edges, len(edges))])
    got = np.asarray(_srdhm(a, b))
    want = np.array([c_srdhm(int(x), int(y)) for x, y in zip(a, b, strict=True)])
    np.testing.assert_array_equal(got, want)
    # the one overflow saturates
    assert int(_srdhm(np.int32(INT32_MIN), np.int32(INT32_MIN))) == INT32_MAX


def test_rounding_divide_by_pot_matches_big_integers(rng):
    x = np.concatenate([_random_int32(rng, 2000), np.array(EDGES * 32, np.int32)])
    e = np.concatenate([rng.integers(0, 32, 2000), np.repeat(np.arange(32), len(EDGES))])
    got = np.asarray(_rdbpot(x, e.astype(np.int32)))
    want = np.array([c_rdbpot(int(v), int(k)) for v, k in zip(x, e, strict=True)])
    np.testing.assert_array_equal(got, want)


def test_jacob_rounding_example():
    # Jacob et al. 2018, section 2.2: -12 / 2^3 = -1.5 rounds away from zero to -2
    got = _rdbpot(np.array([-12, 12, -11, -4], np.int32), np.int32(3))
    np.testing.assert_array_equal(got, [-2, 2, -1, -1])
    with pytest.raises(ValueError, match="exponent"):
        fxp.rounding_divide_by_pot(5, 32)


@pytest.mark.parametrize("mode", ["double", "single"])
def test_multiply_by_quantized_multiplier_matches_big_integers(rng, mode):
    n = 3000
    x = np.concatenate([_random_int32(rng, n), rng.integers(-(2**20), 2**20, n)]).astype(np.int32)
    m = rng.uniform(1e-6, 2.0, 2 * n)
    m0, shift = fxp.quantize_multiplier(m, mode)
    got = np.asarray(_mbqm(x, m0, shift, mode=mode))
    want = [c_mbqm(int(v), int(a), int(s), mode) for v, a, s in zip(x, m0, shift, strict=True)]
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode", ["double", "single"])
def test_multiply_by_quantized_multiplier_per_channel_edges(mode):
    # per-channel multipliers broadcast over the last axis; extreme shifts and accumulators
    x = np.array(EDGES, np.int32)[:, None]
    m0 = np.array([2**30, 2**31 - 1, 1518500250, 2**30], np.int32)
    shift = np.array([-31, 0, 5, 30 if mode == "single" else 31], np.int32)
    got = np.asarray(_mbqm(x, m0, shift, mode=mode))
    pairs = list(zip(m0.tolist(), shift.tolist(), strict=True))
    want = [[c_mbqm(int(v), a, s, mode) for a, s in pairs] for v in x[:, 0]]
    np.testing.assert_array_equal(got, want)


def test_multiply_by_quantized_multiplier_fp32(rng):
    x = rng.integers(-(2**24), 2**24, 5000).astype(np.int32)
    m = rng.uniform(1e-5, 0.5, (5000,)).astype(np.float32)
    got = np.asarray(_mbqm(x, m, 0, mode="fp32"))
    want = np.rint(x.astype(np.float32) * m)  # float32 product, ties to even
    np.testing.assert_array_equal(got, want.astype(np.int32))
    # exact ties go to even
    ties = np.asarray(_mbqm(np.array([1, 3, 5, -1, -3], np.int32), np.float32(0.5), mode="fp32"))
    np.testing.assert_array_equal(ties, [0, 2, 2, 0, -2])


def test_multiply_by_quantized_multiplier_bad_input():
    with pytest.raises(ValueError, match="mode"):
        fxp.multiply_by_quantized_multiplier(np.int32(1), np.int32(2**30), 0, "half")
    with pytest.raises(TypeError, match="multiplier"):
        fxp.multiply_by_quantized_multiplier(np.int32(1), 0.5, 0, "double")
    with pytest.raises(TypeError, match="x"):
        fxp.multiply_by_quantized_multiplier(np.float32(1), np.int32(2**30), 0, "double")
    with pytest.raises(ValueError, match="shift"):
        fxp.multiply_by_quantized_multiplier(np.int32(1), np.int32(2**30), 31, "single")


def test_no_64_bit_types_in_jaxpr():
    x = jnp.zeros((4,), jnp.int32)
    for mode in ("double", "single"):
        jaxpr = jax.make_jaxpr(lambda v, mode=mode: _mbqm(v, jnp.int32(2**30), -3, mode=mode))(x)
        assert not re.search(r"\b[iuf]64\[", str(jaxpr)), jaxpr


def test_fixed_point_product_seed_example():
    # the seed: a = 0.29, b = 1.04 scaled by 2^15, 2^10, 2^5, truncated, multiplied, rescaled
    exact = 0.29 * 1.04  # 0.3016
    got = [fxp.fixed_point_product(0.29, 1.04, f) for f in (15, 10, 5)]
    assert got[0] == pytest.approx(0.3015707768, abs=1e-10)
    assert got[1] == pytest.approx(0.300354, abs=1e-6)
    assert got[2] == 0.2900390625
    losses = [exact - g for g in got]
    assert 0 < losses[0] < losses[1] < losses[2]
    with pytest.raises(ValueError, match="frac_bits"):
        fxp.fixed_point_product(0.29, 1.04, 40)
