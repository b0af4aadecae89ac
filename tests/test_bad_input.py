"""Property test (hypothesis) of bad input across the quantizers and the ops (issue #12).

Random shapes, dtypes (float16, bfloat16, float32, int32, complex64, bool), NaN / +-Inf
positions, scales, zero points and bit widths go to ``quantize``, ``fake_quant``,
``qparams_from_range`` and ``ops.dot_general`` / ``ops.conv_general_dilated`` / pooling,
eagerly and under ``jit``. Each call must either raise a clear TypeError / ValueError naming
the argument, or return a result that is finite where the input is finite and NaN exactly
where NaN flows. The oracle of "where NaN flows" is written from the rules, independently:

- given QParams: a NaN element is NaN (+-Inf saturate to the grid's end, which is finite);
- a dynamic range (computed from the data) with a NaN or +-Inf in it: its whole group
  (tensor, or row with ``axis``) is NaN;
- traced bad parameters (scale <= 0, NaN or inf; zero point NaN or inf; NaN / inf / reversed
  range ends; bit widths outside [2, 16] or non-integer): every output they touch is NaN;
- products: an output is NaN iff it contracts over a NaN operand element (row of ``lhs``,
  column of ``rhs``, window of a conv, window of a pool).

Bad-input classes covered (14): complex operand, bool operand, integer operand of a float
quantizer, non-positive scale, infinite scale, NaN scale, NaN zero point, infinite zero point,
NaN in data, +-Inf in data, NaN range end, infinite range end, reversed range, invalid traced
bit width (too small, too large, fractional).
"""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import jquant as jq
from jquant import ops
from jquant.ops import QuantConfig

DTYPES = {
    "float16": jnp.float16,
    "bfloat16": jnp.bfloat16,
    "float32": jnp.float32,
    "int32": jnp.int32,
    "complex64": jnp.complex64,
    "bool": jnp.bool_,
}
FLOATS = ("float16", "bfloat16", "float32")
FMTS = {
    "int8": jq.int8,
    "uint8": jq.uint8,
    "int4_narrow": jq.IntFormat(4, narrow=True),
    "fp8_e4m3_sat": jq.FloatFormat(4, 3, inf="fn", saturate=True, name="e4m3_sat"),
    "binary": jq.binary,
}
BAD_SCALES = (0.0, -0.5, np.inf, np.nan)
BAD_ZPS = (np.nan, np.inf)

# Compiled once per static combination and reused across examples.
_quantize = jax.jit(jq.quantize, static_argnames=("fmt",))
_fake_quant = jax.jit(jq.fake_quant, static_argnames=("fmt",))
_qparams = jax.jit(jq.qparams_from_range, static_argnames=("fmt", "symmetric"))
_dot = jax.jit(
    ops.dot_general, static_argnames=("dimension_numbers", "lhs_quant", "rhs_quant", "mode")
)


@st.composite
def _data(draw, shape=None):
    """A float32 array of small finite values with NaN / +-Inf at drawn positions."""
    if shape is None:
        shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    n = int(np.prod(shape))
    vals = draw(st.lists(st.floats(-20, 20, width=32), min_size=n, max_size=n))
    kinds = draw(st.lists(st.sampled_from("fffffnip"), min_size=n, max_size=n))
    x = np.array(vals, np.float32)
    special = {"n": np.nan, "i": np.inf, "p": -np.inf}
    for i, k in enumerate(kinds):
        if k in special:
            x[i] = special[k]
    return x.reshape(shape)


def _cast(x: np.ndarray, dtype_name: str):
    if dtype_name == "int32":
        return jnp.asarray(np.nan_to_num(x, posinf=7, neginf=-7).astype(np.int32))
    if dtype_name == "bool":
        return jnp.asarray(x > 0)
    if dtype_name == "complex64":
        return jnp.asarray(x.astype(np.complex64) * (1 + 1j))
    return jnp.asarray(x).astype(DTYPES[dtype_name])


def _qp_case(draw, fmt):
    """(scale, zero_point, bad): mostly valid, sometimes one of the bad classes."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "bad_scale", "bad_zp"]))
    scale = draw(st.floats(0.015625, 4.0, width=32))
    zp = 0.0
    if isinstance(fmt, jq.IntFormat):
        zp = float(draw(st.integers(int(fmt.qmin), int(fmt.qmax))))
    if kind == "bad_scale":
        scale = draw(st.sampled_from(BAD_SCALES))
    elif kind == "bad_zp":
        zp = draw(st.sampled_from(BAD_ZPS))
    return np.float32(scale), np.float32(zp), kind != "ok"


@given(
    data=st.data(),
    dtype=st.sampled_from(list(DTYPES)),
    fmt_name=st.sampled_from(list(FMTS)),
    jit=st.booleans(),
)
def test_quantize_and_fake_quant_raise_or_keep_nan_where_it_flows(data, dtype, fmt_name, jit):
    fmt = FMTS[fmt_name]
    x_np = data.draw(_data())
    x = _cast(x_np, dtype)
    scale, zp, bad = _qp_case(data.draw, fmt)
    qp = jq.QParams(jnp.float32(scale), jnp.float32(zp))
    quantize = _quantize if jit else jq.quantize
    fake_quant = _fake_quant if jit else jq.fake_quant

    if dtype in ("complex64", "bool"):
        with pytest.raises(TypeError, match="x must be a real"):
            quantize(x, qp, fmt)
    if dtype not in FLOATS:
        with pytest.raises(TypeError, match="x must be a float"):
            fake_quant(x, qp, fmt)
        if dtype != "int32":
            return
    if bad and not jit:  # concrete bad QParams: ValueError naming the field
        with pytest.raises(ValueError, match="qp.scale|qp.zero_point"):
            quantize(x, qp, fmt)
        return

    # the input as the quantizer sees it (after the cast to x's dtype)
    xf = np.asarray(x.astype(jnp.float32)) if dtype != "int32" else np.asarray(x, np.float32)
    nan_in = np.isnan(xf)
    want_nan = np.ones_like(nan_in) if bad else nan_in
    q = np.asarray(quantize(x, qp, fmt))
    if isinstance(fmt, jq.FloatFormat):
        np.testing.assert_array_equal(np.isnan(q), want_nan)
    else:  # integer storage: NaN has no code (0, documented); every code inside the grid
        assert np.all((q >= fmt.qmin) & (q <= fmt.qmax))
        assert np.all(q[want_nan] == 0)
    if dtype in FLOATS:
        y = np.asarray(fake_quant(x, qp, fmt)).astype(np.float32)
        assert y.dtype == np.float32 and np.asarray(fake_quant(x, qp, fmt)).dtype == x.dtype
        np.testing.assert_array_equal(np.isnan(y), want_nan)  # finite everywhere else
        assert np.all(np.isfinite(y[~want_nan]))


@given(
    rmin=st.sampled_from([-1.5, -0.0, 0.25, 3.0, 1e38, -3.4e38, np.nan, np.inf, -np.inf]),
    rmax=st.sampled_from([-2.0, 0.0, 0.5, 4.0, 3.4e38, np.nan, np.inf, -np.inf]),
    dtype=st.sampled_from(["float16", "bfloat16", "float32", "int32", "complex64", "fp8"]),
    fmt_name=st.sampled_from(list(FMTS)),
    symmetric=st.booleans(),
    jit=st.booleans(),
)
def test_qparams_from_range_raises_or_is_nan_exactly_for_bad_ranges(
    rmin, rmax, dtype, fmt_name, symmetric, jit
):
    fmt = FMTS[fmt_name]

    def cast(v):
        if dtype == "fp8":
            return np.array(v, np.float32).astype(ml_dtypes.float8_e5m2)
        if dtype == "int32":
            return np.int32(np.clip(np.nan_to_num(v), -1e9, 1e9))
        if dtype == "complex64":
            return np.complex64(v)
        return jnp.asarray(v, jnp.float32).astype(DTYPES[dtype])

    lo, hi = cast(rmin), cast(rmax)
    fn = _qparams if jit else jq.qparams_from_range
    if dtype == "complex64":
        with pytest.raises(TypeError, match="rmin must be a real"):
            fn(lo, hi, fmt, symmetric=symmetric)
        return
    lo32, hi32 = np.float32(np.asarray(lo, np.float32)), np.float32(np.asarray(hi, np.float32))
    bad = not (np.isfinite(lo32) and np.isfinite(hi32) and lo32 <= hi32)
    if bad and not jit:
        with pytest.raises(ValueError, match="rmin|rmax"):
            fn(lo, hi, fmt, symmetric=symmetric)
        return
    qp = fn(lo, hi, fmt, symmetric=symmetric)
    scale, zp = float(qp.scale), float(qp.zero_point)
    if bad:
        assert np.isnan(scale) and np.isnan(zp)
        return
    assert np.isfinite(scale) and scale > 0 and np.isfinite(zp)
    # the whole grid is finite: every code dequantizes to a finite value
    if isinstance(fmt, jq.IntFormat):
        ends = jq.dequantize(jnp.array([fmt.qmin, fmt.qmax], jnp.float32), qp)
    else:
        ends = jq.fake_quant(jnp.array([-3.4e38, 3.4e38]), qp, fmt)
    assert np.all(np.isfinite(np.asarray(ends)))


def _nan_groups(x: np.ndarray, axis) -> np.ndarray:
    """True over each dynamic-range group (per tensor, or per row) holding a non-finite value."""
    bad = ~np.isfinite(x)
    if axis is None:
        return np.full(x.shape, bad.any())
    return np.broadcast_to(bad.any(axis=1, keepdims=True), x.shape)


@given(
    data=st.data(),
    mode=st.sampled_from(ops.MODES),
    lhs_dtype=st.sampled_from(["float32", "bfloat16", "float32", "int32", "complex64"]),
    per_row=st.booleans(),
    given_lhs=st.booleans(),
    bad_scale=st.sampled_from([None, None, None, 0.0, -1.0, np.nan, np.inf]),
)
def test_dot_general_raises_or_nan_flows_only_where_it_should(
    data, mode, lhs_dtype, per_row, given_lhs, bad_scale
):
    lhs_np, rhs_np = data.draw(_data((3, 4))), data.draw(_data((4, 2)))
    lhs, rhs = _cast(lhs_np, lhs_dtype), jnp.asarray(rhs_np)
    lhs_q = QuantConfig(axis=0 if per_row else None, symmetric=False)
    rhs_q = QuantConfig(axis=-1)
    kw = dict(
        dimension_numbers=(((1,), (0,)), ((), ())), lhs_quant=lhs_q, rhs_quant=rhs_q, mode=mode
    )
    if lhs_dtype in ("int32", "complex64"):
        with pytest.raises(TypeError, match="lhs is quantized"):
            _dot(lhs, rhs, **kw)
        return
    lhs_f = np.asarray(lhs.astype(jnp.float32))
    qp_l = None
    if given_lhs:
        scale = np.full((3, 1), 0.1, np.float32)
        if bad_scale is not None:
            scale[1, 0] = bad_scale  # traced (under jit): NaN in row 1, no error
        qp_l = jq.QParams(jnp.asarray(scale), jnp.zeros((3, 1)))
    out = np.asarray(_dot(lhs, rhs, lhs_qparams=qp_l, **kw)).astype(np.float32)

    if given_lhs:
        lhs_nan = np.isnan(lhs_f).any(1)
        if bad_scale is not None:
            lhs_nan[1] = True
    else:
        lhs_nan = _nan_groups(lhs_f, 0 if per_row else None).any(1)
    rhs_nan = (~np.isfinite(rhs_np)).any(0)  # rhs: dynamic per column
    want = lhs_nan[:, None] | rhs_nan[None, :]
    np.testing.assert_array_equal(np.isnan(out), want)
    assert np.all(np.isfinite(out[~want]))


_NHWC = ("NHWC", "HWIO", "NHWC")
_W = jnp.asarray(np.random.default_rng(0).normal(size=(2, 2, 2, 3)).astype(np.float32))


@functools.partial(jax.jit, static_argnames="mode")
def _conv(x, qp, mode):
    return ops.conv_general_dilated(
        x,
        _W,
        (1, 1),
        "SAME",
        dimension_numbers=_NHWC,
        lhs_quant=QuantConfig(symmetric=False),
        rhs_quant=QuantConfig(axis=-1),
        lhs_qparams=qp,
        mode=mode,
    )


@functools.partial(jax.jit, static_argnames="pool")
def _pool(x, qp, pool):
    fn = ops.avg_pool if pool == "avg" else ops.max_pool
    return fn(x, qp, jq.int8, (2, 2), (1, 1), "VALID")


def _windows_hold_nan(x: np.ndarray, pad_high: int) -> np.ndarray:
    """NumPy: does each 2x2 window (stride 1, ``pad_high`` zero rows / columns at the end) of
    ``x`` (N, H, W, C) hold a NaN, over all channels (per channel if ``pad_high`` is 0)?"""
    nan = np.pad(np.isnan(x), ((0, 0), (0, pad_high), (0, pad_high), (0, 0)))
    win = np.lib.stride_tricks.sliding_window_view(nan, (2, 2), axis=(1, 2)).any(axis=(-2, -1))
    return win.any(axis=-1, keepdims=True) if pad_high else win


@given(
    data=st.data(),
    mode=st.sampled_from(ops.MODES),
    pool=st.sampled_from(["avg", "max"]),
    scale=st.sampled_from([0.05, 0.05, 0.05, 0.0, -1.0, np.nan, np.inf]),
)
def test_conv_and_pool_nan_flows_only_into_the_windows_that_hold_it(data, mode, pool, scale):
    x = data.draw(_data((1, 4, 4, 2)))
    x = np.where(np.isinf(x), np.float32(3.0), x)  # given QParams: only NaN should flow
    qp = jq.QParams(jnp.float32(scale), jnp.float32(2.0))  # traced: a bad scale cannot raise
    bad = not (np.isfinite(scale) and scale > 0)
    out = np.asarray(_conv(jnp.asarray(x), qp, mode))
    want = np.broadcast_to(_windows_hold_nan(x, 1), out.shape) | bad
    np.testing.assert_array_equal(np.isnan(out), want)
    assert np.all(np.isfinite(out[~want]))
    y = np.asarray(_pool(jnp.asarray(x), qp, pool))
    np.testing.assert_array_equal(np.isnan(y), _windows_hold_nan(x, 0) | bad)
    assert np.all(np.isfinite(y[~np.isnan(y)]))


@pytest.mark.parametrize("bits", [1, 17, 40, 2.5])
def test_invalid_traced_bits_make_every_output_nan(bits):
    b = jnp.asarray(bits, jnp.float32 if isinstance(bits, float) else jnp.int32)
    x = jnp.array([-1.0, 0.0, 0.3, np.inf])

    @jax.jit
    def run(b):
        fmt = jq.IntFormat(b)
        qp = jq.qparams_from_range(-1.0, 1.0, fmt)
        return qp.scale, jq.fake_quant(x, jq.QParams(0.1), fmt)

    scale, y = run(b)
    assert np.isnan(float(scale)) and np.all(np.isnan(np.asarray(y)))
