"""Tests for jquant.quant: QParams, qparams_from_range, rounding, quantize / dequantize.

Oracles: a NumPy re-implementation of the affine quantizer (float32 division, float64
rounding formulas), onnxruntime's QuantizeLinear, the fake-quant == integer path identity,
and hypothesis properties.
"""

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

import jquant as jq
from jquant.quant import round_values

_quantize = jax.jit(jq.quantize, static_argnames=("fmt", "rounding"))
_dequantize = jax.jit(jq.dequantize, static_argnames=("fmt",))
_fake_quant = jax.jit(jq.fake_quant, static_argnames=("fmt", "rounding", "estimator"))
_round = jax.jit(round_values, static_argnames=("rounding",))
_qparams = jax.jit(jq.qparams_from_range, static_argnames=("fmt", "symmetric"))

# Rounding rules written in float64, where ``v + 1/2`` is exact for every float32 ``v``.
NP_ROUND = {
    "nearest_even": np.round,
    "half_away": lambda v: np.copysign(np.floor(np.abs(v) + 0.5), v),
    "half_up": lambda v: np.floor(v + 0.5),
    "floor": np.floor,
}


def np_quantize(x, scale, zp, fmt, rounding="nearest_even"):
    """``clip(round(x / scale) + zp, qmin, qmax)`` in NumPy (float32 division)."""
    v = (np.asarray(x, np.float32) / np.asarray(scale, np.float32)).astype(np.float64)
    return np.clip(NP_ROUND[rounding](v) + np.round(zp), fmt.qmin, fmt.qmax)


def np_fake_quant(x, scale, zp, fmt):
    q = np_quantize(x, scale, zp, fmt).astype(np.float32)
    return np.float32(scale) * (q - np.float32(zp))


INT_FORMATS = [jq.uint8, jq.IntFormat(3, narrow=True), jq.IntFormat(12)]


# --- qparams_from_range -----------------------------------------------------------------------


@given(
    rmin=st.floats(-100, 100, width=32),
    rmax=st.floats(-100, 100, width=32),
    fmt=st.sampled_from(INT_FORMATS),
)
def test_qparams_from_range_affine_formula(rmin, rmax, fmt):
    rmin, rmax = min(rmin, rmax), max(rmin, rmax)  # a reversed range is NaN (test_bad_input)
    qp = _qparams(rmin, rmax, fmt)
    lo, hi = np.float32(min(rmin, 0.0)), np.float32(max(rmax, 0.0))
    scale = (hi - lo) / np.float32(fmt.qmax - fmt.qmin)
    if scale < np.finfo(np.float32).tiny:  # a zero (or subnormal) range: scale 1
        assert float(qp.scale) == 1.0
        return
    zp = np.clip(np.round(np.float32(fmt.qmin) - lo / scale), fmt.qmin, fmt.qmax)
    np.testing.assert_allclose(float(qp.scale), scale, rtol=1e-6)
    assert float(qp.zero_point) == zp
    # the widened range ends are on (or within half a step of) the grid ends, 0 is exact
    assert float(_dequantize(_quantize(jnp.zeros(()), qp, fmt), qp)) == 0.0
    ends = np.asarray(_fake_quant(jnp.array([lo, hi]), qp, fmt))
    assert np.all(np.abs(ends - [lo, hi]) <= 0.5 * scale * 1.0001)


@pytest.mark.parametrize("fmt", INT_FORMATS, ids=str)
def test_qparams_from_range_symmetric_formula(fmt):
    for rmin, rmax in [(-3.0, 1.5), (-0.5, 2.0), (0.25, 4.0), (-8.0, -2.0)]:
        qp = jq.qparams_from_range(rmin, rmax, fmt, symmetric=True)
        amax = max(abs(min(rmin, 0.0)), abs(max(rmax, 0.0)))
        np.testing.assert_allclose(float(qp.scale), amax / fmt.qmax, rtol=1e-7)
        assert float(qp.zero_point) == 0.0


def test_qparams_from_range_widens_to_include_zero():
    a, b = jq.qparams_from_range(0.5, 2.0, jq.int8), jq.qparams_from_range(0.0, 2.0, jq.int8)
    assert (float(a.scale), float(a.zero_point)) == (float(b.scale), float(b.zero_point))
    assert float(a.zero_point) == jq.int8.qmin
    a, b = jq.qparams_from_range(-3.0, -1.0, jq.int8), jq.qparams_from_range(-3.0, 0.0, jq.int8)
    assert (float(a.scale), float(a.zero_point)) == (float(b.scale), float(b.zero_point))
    assert float(a.zero_point) == jq.int8.qmax


def test_zero_range_gives_finite_scale():
    fmts = [jq.int8, jq.uint4, jq.IntFormat(4, midrise=True), jq.fp8_e4m3, jq.binary]
    r = jnp.array([0.0, 1e-45, -1e-44])

    @jax.jit
    def run(r):
        out = []
        for fmt in fmts:
            for symmetric in (False, True):
                qp = jq.qparams_from_range(r, r, fmt, symmetric=symmetric)
                out.append((qp.scale, qp.zero_point, jq.fake_quant(jnp.zeros(3), qp, fmt)))
        return out

    for scale, zp, y in run(r):
        assert np.all(np.isfinite(np.asarray(scale))) and np.all(np.asarray(scale) > 0)
        assert np.all(np.isfinite(np.asarray(zp))) and np.all(np.isfinite(np.asarray(y)))
    # zero itself stays exact where the grid has a zero level (not midrise, not binary)
    for i in (0, 1, 2, 3, 6, 7):
        np.testing.assert_array_equal(np.asarray(run(r)[i][2]), 0.0)


def test_qparams_from_range_per_axis_arrays():
    rmin, rmax = np.array([-1.0, -2.0, 0.5], np.float32), np.array([1.0, 0.5, 3.0], np.float32)
    qp = _qparams(rmin, rmax, jq.uint8)
    assert qp.scale.shape == (3,) and qp.zero_point.shape == (3,)
    for i in range(3):
        one = _qparams(rmin[i], rmax[i], jq.uint8)
        assert float(qp.scale[i]) == float(one.scale)
        assert float(qp.zero_point[i]) == float(one.zero_point)


@pytest.mark.parametrize(
    "bad, error",
    [(np.nan, ValueError), (np.inf, ValueError), (-np.inf, ValueError), ("1", TypeError)],
)
def test_qparams_from_range_rejects_non_finite(bad, error):
    with pytest.raises(error, match="rmin"):
        jq.qparams_from_range(bad, 1.0, jq.int8)
    with pytest.raises(error, match="rmax"):
        jq.qparams_from_range(-1.0, bad, jq.int8)


# --- properties of the quantizer --------------------------------------------------------------

_X = hnp.arrays(np.float32, (64,), elements=st.floats(-50, 50, width=32))


@given(
    x=_X,
    scale=st.floats(2**-10, 4.0, width=32),
    zp_frac=st.floats(0, 1),
    fmt=st.sampled_from(INT_FORMATS),
)
def test_fake_quant_properties(x, scale, zp_frac, fmt):
    zp = float(np.round(fmt.qmin + zp_frac * (fmt.qmax - fmt.qmin)))
    qp = jq.QParams(jnp.float32(scale), jnp.float32(zp))
    y = np.asarray(_fake_quant(x, qp, fmt))
    s = np.float32(scale)
    lo, hi = s * (fmt.qmin - zp), s * (fmt.qmax - zp)
    inside = (x >= lo) & (x <= hi)
    err = np.abs(x - y)[inside]
    assert np.all(err <= 0.5 * s * (1 + 1e-5) + 1e-6 * np.abs(x[inside]))
    # outside, the nearest end of the range
    np.testing.assert_allclose(y[x < lo], lo, rtol=1e-6)
    np.testing.assert_allclose(y[x > hi], hi, rtol=1e-6)
    # idempotent, 0 exact, monotone
    np.testing.assert_array_equal(np.asarray(_fake_quant(y, qp, fmt)), y)
    assert float(_fake_quant(jnp.zeros(()), qp, fmt)) == 0.0
    order = np.argsort(x, kind="stable")
    assert np.all(np.diff(y[order]) >= 0)
    # fake-quant == integer path, and both == the NumPy quantizer
    q = _quantize(x, qp, fmt)
    assert q.dtype == fmt.dtype
    np.testing.assert_array_equal(np.asarray(_dequantize(q, qp)), y)
    np.testing.assert_array_equal(np.asarray(q), np_quantize(x, s, zp, fmt))
    np.testing.assert_allclose(y, np_fake_quant(x, s, zp, fmt), rtol=1e-6, atol=1e-30)


@given(
    k=hnp.arrays(np.int64, (32,), elements=st.integers(-(2**15), 2**16 - 1)),
    scale=st.floats(2**-13, 100.0, width=32),
    zp_frac=st.floats(0, 1),
    fmt=st.sampled_from(INT_FORMATS),
)
def test_grid_points_round_trip_exactly(k, scale, zp_frac, fmt):
    k = np.clip(k, fmt.qmin, fmt.qmax).astype(np.float32)
    zp = np.float32(np.round(fmt.qmin + zp_frac * (fmt.qmax - fmt.qmin)))
    qp = jq.QParams(jnp.float32(scale), jnp.float32(zp))
    x = np.asarray(_dequantize(k, qp))  # the grid points scale * (k - zp)
    np.testing.assert_array_equal(x, np.float32(scale) * (k - zp))
    q = np.asarray(_quantize(x, qp, fmt))
    np.testing.assert_array_equal(q, k)
    np.testing.assert_array_equal(np.asarray(_dequantize(q, qp)), x)


class GranularityTest(chex.TestCase):
    """Per-axis and per-block QParams against the NumPy quantizer applied slice by slice.

    (with_jit only: eager dispatch costs seconds here; tests/test_estimators.py runs both.)
    """

    @chex.variants(with_jit=True)
    def test_per_axis(self):
        rng = np.random.default_rng(1)
        x = (rng.standard_normal((4, 6, 5)) * 3).astype(np.float32)
        fmt = jq.uint8
        fq = self.variant(lambda x, qp: (jq.quantize(x, qp, fmt), jq.fake_quant(x, qp, fmt)))
        for shape in [(4, 1, 1), (5,), (1, 6, 1), (6, 5)]:
            scale = rng.uniform(0.01, 0.1, shape).astype(np.float32)
            zp = rng.integers(0, 256, shape).astype(np.float32)
            q, y = fq(x, jq.QParams(scale, zp))
            np.testing.assert_array_equal(np.asarray(q), np_quantize(x, scale, zp, fmt))
            np.testing.assert_allclose(np.asarray(y), np_fake_quant(x, scale, zp, fmt), rtol=1e-6)

    @chex.variants(with_jit=True)
    def test_per_block(self):
        rng = np.random.default_rng(2)
        x = (rng.standard_normal((3, 16)) * 2).astype(np.float32)
        fmt = jq.int4

        def per_block(x):
            xb = jq.to_blocks(x, axis=-1, block_size=4)  # (3, 4, 4)
            amax = jnp.max(jnp.abs(xb), axis=-1, keepdims=True)
            qp = jq.qparams_from_range(-amax, amax, fmt, symmetric=True)
            return jq.from_blocks(jq.fake_quant(xb, qp, fmt), axis=-1), qp.scale

        y, scale = self.variant(per_block)(x)
        assert scale.shape == (3, 4, 1)
        want = np.empty_like(x)
        for r in range(3):
            for b in range(4):
                blk = x[r, 4 * b : 4 * b + 4]
                s = np.float32(np.abs(blk).max()) / np.float32(fmt.qmax)
                want[r, 4 * b : 4 * b + 4] = np_fake_quant(blk, s, 0.0, fmt)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6)


def test_blocks_round_trip_and_errors():
    x = jnp.arange(2 * 12 * 3.0).reshape(2, 12, 3)
    for axis, shape in [(1, (2, 4, 3, 3)), (-2, (2, 4, 3, 3)), (0, (1, 2, 12, 3))]:
        bs = 3 if axis != 0 else 2
        xb = jq.to_blocks(x, axis, bs)
        assert xb.shape == shape
        np.testing.assert_array_equal(np.asarray(jq.from_blocks(xb, axis)), np.asarray(x))
    # blocks are runs of consecutive elements along the axis
    np.testing.assert_array_equal(
        np.asarray(jq.to_blocks(jnp.arange(6), 0, 2)), [[0, 1], [2, 3], [4, 5]]
    )
    with pytest.raises(ValueError, match="block_size"):
        jq.to_blocks(x, 1, 5)
    with pytest.raises(ValueError, match="block_size"):
        jq.to_blocks(x, 1, 0)
    with pytest.raises(ValueError, match="axis"):
        jq.to_blocks(x, 3, 3)


# --- traced bits ------------------------------------------------------------------------------

BITS = list(range(2, 17))


@pytest.mark.parametrize("signed, symmetric", [(True, True), (False, False)])
def test_vmap_over_traced_bits_equals_static_bits(signed, symmetric):
    x = jnp.asarray(np.random.default_rng(3).standard_normal(50).astype(np.float32) * 4)
    x = x.at[:3].set(jnp.array([0.0, 1e4, -1e4]))
    rmin, rmax = -3.0, 5.0

    def run(fmt):
        qp = jq.qparams_from_range(rmin, rmax, fmt, symmetric=symmetric)
        q = jq.quantize(x, qp, fmt)
        return q, jq.fake_quant(x, qp, fmt), jq.dequantize(q, qp), qp

    traced_fmt = jq.IntFormat(jnp.arange(2, 17), signed=signed)
    traced = jax.jit(jax.vmap(run))(traced_fmt)
    assert traced[0].dtype == jnp.int32  # traced bits store as int32
    some = [2, 3, 8, 13, 16]  # compiling all 15 static programs costs more than it adds
    static = jax.jit(lambda: [run(jq.IntFormat(b, signed=signed)) for b in some])()
    for b, outs in zip(some, static, strict=True):
        for t, s in zip(jax.tree.leaves(traced), jax.tree.leaves(outs), strict=True):
            np.testing.assert_array_equal(np.asarray(t[b - 2]), np.asarray(s), err_msg=f"bits={b}")
    # every width against the NumPy quantizer with Python-int qmin / qmax
    for i, b in enumerate(BITS):
        f = jq.IntFormat(b, signed=signed)
        s, z = np.asarray(traced[3].scale[i]), np.asarray(traced[3].zero_point[i])
        np.testing.assert_array_equal(np.asarray(traced[0][i]), np_quantize(x, s, z, f))
        np.testing.assert_allclose(np.asarray(traced[1][i]), np_fake_quant(x, s, z, f), rtol=1e-6)


# --- onnxruntime QuantizeLinear ---------------------------------------------------------------


def _ort_quantize_linear(x, scale, zp, axis):
    zp_type = TensorProto.INT8 if zp.dtype == np.int8 else TensorProto.UINT8
    node = helper.make_node(
        "QuantizeLinear", ["x", "scale", "zp"], ["y"], **({} if axis is None else {"axis": axis})
    )
    graph = helper.make_graph(
        [node],
        "quantize_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)],
        [helper.make_tensor_value_info("y", zp_type, x.shape)],
        initializer=[numpy_helper.from_array(scale, "scale"), numpy_helper.from_array(zp, "zp")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("fmt", [jq.int8, jq.uint8], ids=str)
@pytest.mark.parametrize("axis", [None, 0, 1, 3])
def test_quantize_matches_onnxruntime(fmt, axis, rng):
    x = (rng.standard_normal((3, 4, 5, 6)) * 4).astype(np.float32)
    np_zp = np.int8 if fmt.signed else np.uint8
    if axis is None:
        scale, zp, shape = np.float32(0.1), np_zp(-3 if fmt.signed else 120), ()
    else:
        n = x.shape[axis]
        scale = rng.uniform(0.01, 0.1, n).astype(np.float32)
        zp = rng.integers(fmt.qmin, fmt.qmax + 1, n).astype(np_zp)
        shape = (n,) + (1,) * (x.ndim - 1 - axis)
    # Near-ties (k + 1/2) * scale and their float32 neighbours: there x / scale and
    # x * (1 / scale) round to different integers.
    ties = ((rng.integers(-60, 60, x.shape) + 0.5) * np.reshape(scale, shape)).astype(np.float32)
    pick = rng.integers(0, 4, x.shape)
    up, down = np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))
    x = np.select([pick == 0, pick == 1, pick == 2], [ties, up, down], x)
    want = _ort_quantize_linear(x, scale, zp, axis)
    qp = jq.QParams(np.reshape(scale, shape), np.reshape(zp, shape).astype(np.float32))
    got = _quantize(x, qp, fmt)
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(np.asarray(got), want)
    if axis in (None, 3):  # per example under vmap, the QParams shared
        got = jax.jit(jax.vmap(lambda xi: jq.quantize(xi, qp, fmt)))(x)
        np.testing.assert_array_equal(np.asarray(got), want)


# --- rounding modes ---------------------------------------------------------------------------


def _rounding_inputs():
    ties = np.arange(-6, 6, dtype=np.float32) + np.float32(0.5)
    near = np.concatenate([np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf)])
    rand = np.random.default_rng(4).uniform(-6, 6, 200).astype(np.float32)
    special = np.array([0.0, -0.0, 0.49999997, -0.49999997, 1.5, 2.5, 8388607.5, -8388607.5])
    return np.concatenate([ties, near, rand, special.astype(np.float32)])


@pytest.mark.parametrize("rounding", list(NP_ROUND))
def test_rounding_modes_match_formulas(rounding):
    v = _rounding_inputs()
    want = NP_ROUND[rounding](v.astype(np.float64))
    np.testing.assert_array_equal(np.asarray(_round(jnp.asarray(v), rounding)), want)
    # through quantize, with an exact power-of-two scale and a zero point
    qp = jq.QParams(jnp.float32(0.25), jnp.float32(3.0))
    q = _quantize(v * np.float32(0.25), qp, jq.int8, rounding=rounding)
    np.testing.assert_array_equal(np.asarray(q), np.clip(want + 3, -128, 127))


def test_rounding_modes_differ_on_ties():
    v = jnp.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5])
    got = {r: np.asarray(_round(v, r)).tolist() for r in NP_ROUND}
    assert got["nearest_even"] == [-2, -2, -0, 0, 2, 2]
    assert got["half_away"] == [-3, -2, -1, 1, 2, 3]
    assert got["half_up"] == [-2, -1, 0, 1, 2, 3]
    assert got["floor"] == [-3, -2, -1, 0, 1, 2]


_stochastic_q = jax.jit(
    jax.vmap(
        lambda k, x: jq.quantize(x, jq.QParams(0.5), jq.int8, rounding="stochastic", key=k),
        (0, None),
    )
)


def test_stochastic_rounding_is_unbiased():
    v = np.array([0.1, 0.25, 0.5, 0.9, -0.3, -1.7, 2.0, 7.5], np.float32)
    n = 1000
    q = np.asarray(_stochastic_q(jax.random.split(jax.random.key(0), n), v * 0.5))
    # every sample is floor(v) or floor(v) + 1
    assert np.all((q == np.floor(v)) | (q == np.floor(v) + 1))
    p = v - np.floor(v)
    sd = np.sqrt(p * (1 - p) / n)
    assert np.all(np.abs(q.mean(axis=0) - v) <= 5 * sd + 1e-9)
    assert np.all(q[:, 6] == 2)  # integers never move
    # the same key gives the same draw, another key another draw
    again = np.asarray(_stochastic_q(jax.random.split(jax.random.key(0), n), v * 0.5))
    np.testing.assert_array_equal(again, q)
    assert np.any(q[0] != q[1]) or np.any(q[1] != q[2])


def test_stochastic_fake_quant_is_unbiased():
    x = jnp.float32(0.3)
    keys = jax.random.split(jax.random.key(2), 1000)
    y = jax.jit(
        jax.vmap(lambda k: jq.fake_quant(x, jq.QParams(1.0), jq.int8, rounding="stochastic", key=k))
    )(keys)
    assert set(np.unique(np.asarray(y)).tolist()) == {0.0, 1.0}
    assert abs(float(y.mean()) - 0.3) <= 5 * np.sqrt(0.21 / 1000)


# --- NaN, Inf ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", jq.ROUNDING_MODES)
def test_nan_stays_nan_and_inf_saturates(rounding):
    x = jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.0])
    qp = jq.QParams(jnp.float32(0.5), jnp.float32(10.0))
    key = jax.random.key(0)
    y = np.asarray(_fake_quant(x, qp, jq.int8, rounding=rounding, key=key))
    assert np.isnan(y[0])
    assert y[1] == 0.5 * (127 - 10) and y[2] == 0.5 * (-128 - 10)
    q = np.asarray(_quantize(x, qp, jq.int8, rounding=rounding, key=key))
    assert q.tolist()[:3] == [0, 127, -128]


# --- bad input --------------------------------------------------------------------------------

X4 = jnp.ones(4)


@pytest.mark.parametrize(
    "qp, fmt, match",
    [
        (jq.QParams(0.0), jq.int8, "scale"),
        (jq.QParams(-1.0), jq.int8, "scale"),
        (jq.QParams(np.nan), jq.int8, "scale"),
        (jq.QParams(np.inf), jq.int8, "scale"),
        (jq.QParams(1.0, np.nan), jq.int8, "zero_point"),
        (jq.QParams(1.0, np.inf), jq.uint8, "zero_point"),
        (jq.QParams(np.array([0.1, 0.2, 0.0, 0.1])), jq.int8, "scale"),
        (jq.QParams(1.0, 128.0), jq.int8, "zero_point"),
        (jq.QParams(1.0, -129.0), jq.int8, "zero_point"),
        (jq.QParams(1.0, -1.0), jq.uint8, "zero_point"),
        (jq.QParams(1.0, 255.6), jq.uint8, "zero_point"),
        (jq.QParams(1.0, 8.0), jq.int4, "zero_point"),
        (jq.QParams(1.0, 1.0), jq.fp8_e4m3, "zero_point"),
        (jq.QParams(1.0, 1.0), jq.binary, "zero_point"),
        (jq.QParams(np.ones(3)), jq.int8, "qp"),
        (jq.QParams(np.ones((2, 4))), jq.int8, "qp"),
        (jq.QParams(1.0, np.zeros(5)), jq.int8, "qp"),
    ],
)
def test_bad_qparams_raise_value_error(qp, fmt, match):
    with pytest.raises(ValueError, match=match):
        jq.quantize(X4, qp, fmt)
    with pytest.raises(ValueError, match=match):
        jq.fake_quant(X4, qp, fmt)


@pytest.mark.parametrize(
    "qp", [jq.QParams(0.0), jq.QParams(-1.0), jq.QParams(np.inf), jq.QParams(1.0, np.nan)]
)
def test_dequantize_checks_concrete_qparams_and_nans_traced_ones(qp):
    with pytest.raises(ValueError, match="qp.scale|qp.zero_point"):
        jq.dequantize(jnp.array([1, 2], jnp.int8), qp)
    assert np.all(np.isnan(np.asarray(_dequantize(jnp.array([1, 2], jnp.int8), qp))))
    with pytest.raises(TypeError, match="q must be a real"):
        jq.dequantize(jnp.array([1j]), jq.QParams(1.0))


def test_bad_types_and_rounding():
    with pytest.raises(TypeError, match="qp"):
        jq.quantize(X4, (1.0, 0.0), jq.int8)
    with pytest.raises(TypeError, match="fmt"):
        jq.quantize(X4, jq.QParams(1.0), "int8")
    for fn in (jq.quantize, jq.fake_quant):
        with pytest.raises(ValueError, match="rounding"):
            fn(X4, jq.QParams(1.0), jq.int8, rounding="nearest")
        with pytest.raises(ValueError, match="key"):
            fn(X4, jq.QParams(1.0), jq.int8, rounding="stochastic")


def test_learned_zero_point_between_integers_is_rounded():
    # an LSQ+ offset after an update is not an integer; it is used rounded
    x = jnp.linspace(-2, 2, 9)
    a = _fake_quant(x, jq.QParams(0.1, 3.3), jq.int8)
    b = _fake_quant(x, jq.QParams(0.1, 3.0), jq.int8)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dequantize_formula():
    q = jnp.array([-128, 0, 5, 127], jnp.int8)
    qp = jq.QParams(jnp.array(0.5), jnp.array(5.0))
    np.testing.assert_array_equal(np.asarray(jq.dequantize(q, qp)), [-66.5, -2.5, 0.0, 61.0])
    with pytest.raises(TypeError, match="qp"):
        jq.dequantize(q, 0.5)


# --- no silent wrong answers (issue #12) ------------------------------------------------------


def test_quantize_refuses_complex_and_bool_input():
    for x in (jnp.array([1 + 2j, 0.5j]), jnp.array([True, False])):
        with pytest.raises(TypeError, match="x must be a real"):
            jq.quantize(x, jq.QParams(0.1), jq.int8)
        with pytest.raises(TypeError, match="x must be a float"):
            jq.fake_quant(x, jq.QParams(0.1), jq.int8)


def test_quantize_integer_input_is_exact_not_truncated():
    x = jnp.array([-300, -7, 0, 5, 254], jnp.int32)
    q = np.asarray(jq.quantize(x, jq.QParams(2.0), jq.int8))
    np.testing.assert_array_equal(q, np_quantize(np.asarray(x, np.float32), 2.0, 0, jq.int8))


def test_qparams_from_range_rejects_reversed_and_complex_ranges():
    with pytest.raises(ValueError, match="rmin must be <= rmax"):
        jq.qparams_from_range(1.0, 0.5, jq.int8)
    with pytest.raises(ValueError, match="rmin must be <= rmax"):
        jq.qparams_from_range(np.array([-1.0, 2.0]), np.array([1.0, 1.5]), jq.uint8)
    with pytest.raises(TypeError, match="rmax must be a real"):
        jq.qparams_from_range(-1.0, 1 + 1j, jq.int8)
    with pytest.raises(TypeError, match="rmin must be a real"):
        jq.qparams_from_range(np.array([True]), 1.0, jq.int8)


@pytest.mark.parametrize(
    "rmin, rmax",
    [(1.0, 0.5), (np.nan, 1.0), (-1.0, np.nan), (-np.inf, 1.0), (-1.0, np.inf)],
)
def test_traced_bad_range_gives_nan_qparams_and_nan_outputs(rmin, rmax):
    for symmetric in (False, True):
        qp = _qparams(jnp.float32(rmin), jnp.float32(rmax), jq.int8, symmetric=symmetric)
        assert np.isnan(float(qp.scale)) and np.isnan(float(qp.zero_point))
    qp = _qparams(jnp.float32(rmin), jnp.float32(rmax), jq.int8)
    assert np.all(np.isnan(np.asarray(_fake_quant(jnp.linspace(-1, 1, 5), qp, jq.int8))))


def test_traced_bad_range_is_nan_only_in_its_own_channel():
    rmin = jnp.array([-1.0, jnp.nan, -2.0, 3.0])
    rmax = jnp.array([1.0, 1.0, jnp.inf, 2.0])  # channel 3 reversed
    qp = _qparams(rmin, rmax, jq.uint8)
    np.testing.assert_array_equal(np.isnan(np.asarray(qp.scale)), [False, True, True, True])
    y = np.asarray(_fake_quant(jnp.full((2, 4), 0.5), qp, jq.uint8))
    np.testing.assert_array_equal(np.isnan(y), np.tile([False, True, True, True], (2, 1)))
    assert np.all(np.abs(y[:, 0] - 0.5) <= float(qp.scale[0]) / 2)


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("fmt", [jq.int8, jq.uint8, jq.int2, jq.fp8_e4m3, jq.binary], ids=str)
def test_ranges_near_the_float32_limit_give_finite_scales_and_outputs(fmt, symmetric):
    big = float(np.finfo(np.float32).max)
    x = jnp.array([-big, -3e38, -1.0, 0.0, 1e30, 3e38, big], jnp.float32)
    qp = _qparams(jnp.float32(-big), jnp.float32(big), fmt, symmetric=symmetric)
    assert np.isfinite(float(qp.scale)) and float(qp.scale) > 0
    y = np.asarray(_fake_quant(x, qp, fmt))
    assert np.all(np.isfinite(y))
    # ranges are clipped to +-2^126: values inside it are within half a step (int formats)
    if isinstance(fmt, jq.IntFormat):
        inside = np.abs(np.asarray(x)) <= 2.0**126
        assert np.all(np.abs(y - np.asarray(x))[inside] <= float(qp.scale) / 2 * 1.0001)


def test_low_precision_range_arguments_are_accepted():
    """bf16 / fp8 (ml_dtypes) scalars and arrays are numbers: eager quantization of a bf16
    model's weights works and equals the NumPy formula on the float32 values."""
    import flax.linen as fnn

    params = fnn.Dense(8, param_dtype=jnp.bfloat16).init(
        jax.random.key(0), jnp.ones((1, 5), jnp.bfloat16)
    )
    w = params["params"]["kernel"]
    assert w.dtype == jnp.bfloat16
    w_np = np.asarray(w)  # an ml_dtypes bfloat16 array
    lo, hi = w_np.min(axis=0), w_np.max(axis=0)  # per output channel, still bfloat16
    qp = jq.qparams_from_range(lo, hi, jq.int8)  # eager: refused before (issue #12)
    lo32 = np.minimum(lo.astype(np.float32), 0)
    hi32 = np.maximum(hi.astype(np.float32), 0)
    scale = (hi32 - lo32) / np.float32(255)
    np.testing.assert_array_equal(np.asarray(qp.scale), scale)
    np.testing.assert_array_equal(
        np.asarray(qp.zero_point), np.clip(np.round(np.float32(-128) - lo32 / scale), -128, 127)
    )
    q = np.asarray(jq.quantize(w, qp, jq.int8))
    want = np_quantize(w_np.astype(np.float32), scale, np.asarray(qp.zero_point), jq.int8)
    np.testing.assert_array_equal(q, want)
    e4m3 = ml_dtypes.float8_e4m3fn
    qp = jq.qparams_from_range(e4m3(-2.0), np.array([3.0], e4m3), jq.int8)
    np.testing.assert_allclose(float(qp.scale[0]), 5.0 / 255, rtol=1e-6)
    qp = jq.qparams_from_range(jnp.bfloat16(-1.0), jnp.float16(1.0), jq.int8, symmetric=True)
    np.testing.assert_allclose(float(qp.scale), 1 / 127, rtol=1e-6)


_fq_bits = jax.jit(lambda x, qp, bits: jq.fake_quant(x, qp, jq.IntFormat(bits)))
_q_bits = jax.jit(lambda x, qp, bits: jq.quantize(x, qp, jq.IntFormat(bits)))


@pytest.mark.parametrize("bits", [40, 1, 17, 0, -3, 2.5, 8.0001, np.nan])
def test_invalid_traced_bits_give_nan_not_a_clipped_grid(bits):
    x = jnp.linspace(-1.0, 1.0, 7)
    b = jnp.asarray(bits, jnp.float32 if isinstance(bits, float) else jnp.int32)
    assert np.all(np.isnan(np.asarray(_fq_bits(x, jq.QParams(0.1), b))))
    assert np.all(np.asarray(_q_bits(x, jq.QParams(0.1), b)) == np.iinfo(np.int32).min)
    fmt_qp = jax.jit(lambda b: jq.qparams_from_range(-1.0, 1.0, jq.IntFormat(b)))(b)
    assert np.isnan(float(fmt_qp.scale))
    # valid traced widths are unaffected
    np.testing.assert_array_equal(
        np.asarray(_fq_bits(x, jq.QParams(0.1), jnp.int32(3))),
        np.asarray(jq.fake_quant(x, jq.QParams(0.1), jq.int3)),
    )
