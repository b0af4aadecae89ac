"""Block-wise (sub-channel) scales: QParams, fake-quant and estimators, calibration, ops.

Oracle: a NumPy block quantizer written from the formula (reshape the axis into
``(N / B, B)``, one ``amax`` or ``(min, max)`` per block, ``clip(round(x / s) + z)``), and for
LSQ the paper's step gradient summed per block with ``gs = 1 / sqrt(B * Q_P)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import jquant as jq
from jquant import calibration as cal
from jquant.ops import conv_general_dilated, dot_general
from jquant.quant import dynamic_qparams

RNG = np.random.default_rng(0)
X = RNG.standard_t(3, size=(16, 3)).astype(np.float32)  # heavy tails: blocks differ


def np_blocks(x, b, axis):
    """``x`` with ``axis`` split into ``(N / b, b)`` (NumPy)."""
    x = np.moveaxis(x, axis, 0)
    return x.reshape(x.shape[0] // b, b, *x.shape[1:])


def np_unblocks(xb, axis):
    return np.moveaxis(xb.reshape(-1, *xb.shape[2:]), 0, axis)


def np_block_qparams(x, b, axis, bits, symmetric):
    """Per-block ``(scale, zero point)``, blocked layout ``(N / b, 1, ...)``."""
    xb = np_blocks(x, b, axis)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale = np.abs(xb).max(1, keepdims=True) / np.float32(qmax)
        return scale.astype(np.float32), np.zeros_like(scale)
    lo = np.minimum(xb.min(1, keepdims=True), 0)
    hi = np.maximum(xb.max(1, keepdims=True), 0)
    scale = ((hi - lo) / np.float32(qmax - qmin)).astype(np.float32)
    zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale, zp.astype(np.float32)


def np_block_fq(x, b, axis, bits, symmetric=True):
    xb = np_blocks(x, b, axis)
    scale, zp = np_block_qparams(x, b, axis, bits, symmetric)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = np.clip(np.round(xb / scale) + zp, qmin, qmax)
    return np_unblocks((q - zp) * scale, axis)


def _block_qp(x, b, axis, bits, symmetric):
    """The oracle's QParams in the public layout (x's rank, N / b along ``axis``)."""
    scale, zp = np_block_qparams(x, b, axis, bits, symmetric)
    scale, zp = np.moveaxis(scale[:, 0], 0, axis), np.moveaxis(zp[:, 0], 0, axis)
    return jq.QParams(jnp.asarray(scale), jnp.asarray(zp), block_size=b, block_axis=axis)


@pytest.mark.parametrize("axis", [0, 1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dynamic_block_qparams_and_fake_quant_match_numpy(axis, symmetric):
    x = RNG.standard_t(3, size=(8, 12)).astype(np.float32)
    cfg = jq.QuantConfig(
        fmt=jq.int4, symmetric=symmetric, axis=1 - axis, block_size=4, block_axis=axis
    )
    qp = dynamic_qparams(x, cfg)
    ref = _block_qp(x, 4, axis, 4, symmetric)
    assert qp.block_size == 4 and qp.block_axis == axis
    np.testing.assert_allclose(qp.scale, ref.scale, rtol=1e-6)
    np.testing.assert_array_equal(qp.zero_point, ref.zero_point)
    np.testing.assert_allclose(
        jq.fake_quant(x, qp, jq.int4), np_block_fq(x, 4, axis, 4, symmetric), rtol=1e-6, atol=1e-6
    )
    q = jq.quantize(x, qp, jq.int4)
    assert q.dtype == jnp.int8 and q.shape == x.shape
    np.testing.assert_allclose(jq.dequantize(q, qp), jq.fake_quant(x, qp, jq.int4), rtol=1e-6)


@pytest.mark.parametrize("estimator", ["ste", "clipped_ste", "lsq", "lsq_plus", "pact"])
def test_every_estimator_forward_is_the_block_quantizer(estimator):
    fmt = jq.uint8 if estimator == "pact" else jq.int4
    x = np.abs(X) if estimator == "pact" else X
    qp = _block_qp(x, 4, 0, 8 if estimator == "pact" else 4, symmetric=True)
    if estimator == "pact":  # unsigned grid on [0, amax]: scale amax / 255
        qp = jq.QParams(qp.scale * 127 / 255, block_size=4, block_axis=0)
    y = jq.fake_quant(x, qp, fmt, estimator=estimator)
    scale = np.repeat(np.asarray(qp.scale), 4, axis=0)
    q = np.clip(np.round(x / scale), fmt.qmin, fmt.qmax)
    np.testing.assert_allclose(y, q * scale, rtol=1e-6)


def test_lsq_learns_one_step_per_block_with_the_papers_gradient():
    b, bits = 4, 4
    qp = _block_qp(X, b, 0, bits, symmetric=True)
    scale = qp.scale * 0.7  # some values clip
    g = RNG.normal(size=X.shape).astype(np.float32)

    def loss(s):
        y = jq.fake_quant(X, jq.QParams(s, block_size=b, block_axis=0), jq.int4, estimator="lsq")
        return jnp.sum(y * g)

    d_scale = jax.grad(loss)(scale)
    assert d_scale.shape == scale.shape == (16 // b, 3)
    # LSQ (Esser et al. 2019, eq. 3): dy/ds = round(v) - v inside, qmin / qmax outside
    s = np.repeat(np.asarray(scale), b, axis=0)
    v = X / s
    inside = (v >= -8) & (v <= 7)
    dyds = np.where(inside, np.round(v) - v, np.clip(np.round(v), -8, 7))
    gs = 1 / np.sqrt(b * 7)
    ref = (g * dyds * gs).reshape(16 // b, b, 3).sum(1)
    np.testing.assert_allclose(d_scale, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_partial_last_block_is_documented_padding():
    """B = 5 on an axis of 16: blocks of 5, 5, 5 and 1 element (zeros padded, then dropped)."""
    cfg = jq.QuantConfig(fmt=jq.int4, axis=1, block_size=5, block_axis=0)
    qp = dynamic_qparams(X, cfg)
    assert qp.scale.shape == (4, 3)
    starts = [0, 5, 10, 15, 16]
    for i in range(4):
        blk = X[starts[i] : starts[i + 1]]
        np.testing.assert_allclose(qp.scale[i], np.abs(blk).max(0) / 7, rtol=1e-6)
    y = jq.fake_quant(X, qp, jq.int4)
    s = np.concatenate(
        [np.repeat(qp.scale[i : i + 1], starts[i + 1] - starts[i], 0) for i in range(4)]
    )
    np.testing.assert_allclose(y, np.clip(np.round(X / s), -8, 7) * s, rtol=1e-6)
    lo, hi = cal.block_ranges(cal.percentile, X, 5, block_axis=0, axis=1, p=90.0)
    rlo, rhi = cal.percentile(X[15:], p=90.0, axis=1)  # the partial block: its own element
    np.testing.assert_allclose([lo[3], hi[3]], [rlo[0], rhi[0]], rtol=1e-6)
    # int mode: the padded zeros add nothing
    w = RNG.normal(size=(16, 2)).astype(np.float32)
    x = RNG.normal(size=(2, 16)).astype(np.float32)
    kw = dict(lhs_quant=jq.QuantConfig(), rhs_quant=jq.QuantConfig(fmt=jq.int4, block_size=5))
    np.testing.assert_allclose(
        dot_general(x, w, DN, mode="int", **kw),
        dot_general(x, w, DN, mode="simulate", **kw),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_block_arguments_raise():
    with pytest.raises(ValueError, match="one per block"):  # 3 scales for 4 blocks
        jq.quantize(X, jq.QParams(jnp.ones((3, 3)), block_size=4, block_axis=0), jq.int4)
    with pytest.raises(ValueError, match="block_size must be None or a positive int"):
        jq.QuantConfig(block_size=0)
    with pytest.raises(ValueError, match="block_axis=0 needs block_size"):
        jq.QuantConfig(block_axis=0)
    with pytest.raises(ValueError, match="also a kept axis"):
        dynamic_qparams(X, jq.QuantConfig(axis=0, block_size=4, block_axis=0))


@pytest.mark.parametrize(
    "estimator, kwargs",
    [(cal.minmax, {}), (cal.percentile, {"p": 90.0}), (cal.mse, {"fmt": jq.int4})],
)
def test_block_ranges_are_the_estimator_on_each_block(estimator, kwargs):
    lo, hi = cal.block_ranges(estimator, X, 4, block_axis=0, axis=1, **kwargs)
    assert lo.shape == hi.shape == (4, 3)
    for blk in range(4):
        for c in range(3):
            rlo, rhi = estimator(X[4 * blk : 4 * blk + 4, c], **kwargs)
            np.testing.assert_allclose([lo[blk, c], hi[blk, c]], [rlo, rhi], rtol=1e-6)


def test_block_observer_streams_to_the_block_minmax():
    obs = cal.block_observer(cal.running_minmax, 4, block_axis=0, axis=1)
    state = obs.init(X)
    for part in (X[:, :], X * 0.5):
        state = obs.update(part, state)
    qp = obs.result(state, jq.int4, symmetric=True)
    assert (qp.block_size, qp.block_axis) == (4, 0)
    ref = _block_qp(X, 4, 0, 4, symmetric=True)
    np.testing.assert_allclose(qp.scale, ref.scale, rtol=1e-6)


def _per_block_histograms(batches, size, method, symmetric, fmt):
    """Oracle: the per-tensor histogram observer run on each block of features on its own
    (a Python loop over blocks; the last block may be partial)."""
    n = batches[0].shape[-1]
    out = []
    for start in range(0, n, size):
        obs = cal.histogram(32, method, 90.0)
        state = obs.init(batches[0][:, start : start + size])
        for x in batches:
            state = obs.update(x[:, start : start + size], state)
        out.append((state, obs.bounds(state, fmt, symmetric=symmetric)))
    return out


@pytest.mark.parametrize(  # 12 features in blocks of 4, or of 5, 5 and a partial 2
    "method, symmetric, size",
    [
        ("percentile", False, 5),
        pytest.param("percentile", True, 4, marks=pytest.mark.slow),
        ("mse", False, 5),
        ("kl", True, 4),
    ],
)
def test_block_histogram_observer_is_the_per_tensor_one_on_each_block(method, symmetric, size):
    x = np.random.default_rng(11).standard_t(3, size=(6, 12)).astype(np.float32)
    batches = [x, 3.0 * x[::-1]]  # the second batch grows every block's range: re-binning
    fmt = jq.int4
    obs = cal.block_observer(cal.histogram, size, num_bins=32, method=method, percentile=90.0)
    state = obs.init(x)
    for b in batches:
        state = obs.update(b, state)
    ref = _per_block_histograms(batches, size, method, symmetric, fmt)
    n_blocks = len(ref)
    assert state.counts.shape == (n_blocks, 64)  # one histogram per block, updated at once
    np.testing.assert_array_equal(state.counts, np.stack([r[0].counts for r in ref]))
    np.testing.assert_array_equal(state.amax.ravel(), [r[0].amax for r in ref])
    lo, hi = obs.bounds(state, fmt, symmetric=symmetric)
    assert lo.shape == hi.shape == (1, n_blocks)
    np.testing.assert_allclose(lo[0], [r[1][0] for r in ref], rtol=1e-6)
    np.testing.assert_allclose(hi[0], [r[1][1] for r in ref], rtol=1e-6)
    qp = obs.result(state, fmt, symmetric=symmetric)
    assert (qp.block_size, qp.block_axis, qp.scale.shape) == (size, 1, (1, n_blocks))
    want = jq.qparams_from_range(jnp.stack(lo[0]), jnp.stack(hi[0]), fmt, symmetric=symmetric)
    np.testing.assert_allclose(qp.scale[0], want.scale, rtol=1e-6)


@pytest.mark.parametrize(
    "cls",
    [
        cal.Percentile,
        pytest.param(cal.MSE, marks=pytest.mark.slow),
        pytest.param(cal.KL, marks=pytest.mark.slow),
        cal.MinMax,
        cal.EmaMinMax,
    ],
)
def test_every_streaming_method_gives_a_per_channel_observer(cls):
    """``Calibration.observer(axis=...)`` keeps one range per channel: each channel's is the
    per-tensor observer's on that channel alone."""
    x = np.random.default_rng(12).standard_t(3, size=(8, 3)).astype(np.float32)
    method = cls(num_bins=32) if cls in (cal.Percentile, cal.MSE, cal.KL) else cls()
    per_channel = method.observer(axis=1)
    lo, hi = per_channel.bounds(per_channel.update(x, per_channel.init(x)), jq.int4)
    assert lo.shape == (1, 3)
    for c in range(3):
        rlo, rhi = method.bounds(method.update(x[:, c], method.init(x[:, c])), jq.int4)
        np.testing.assert_allclose([lo[0, c], hi[0, c]], [rlo, rhi], rtol=1e-6)


def test_block_histogram_observer_rejects_bad_input():
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        cal.block_observer(cal.histogram, 0)
    obs = cal.block_observer(cal.histogram, 4, num_bins=32)
    state = obs.init(np.ones((2, 8), np.float32))
    with pytest.raises(ValueError, match="does not match the observer state"):
        obs.update(np.ones((2, 12), np.float32), state)  # 3 blocks for a state of 2


# --- ops ---------------------------------------------------------------------------------------

DN = (((1,), (0,)), ((), ()))


def _np_affine_fq(x):
    """Per-tensor affine int8 (the activation side)."""
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    s = np.float32((hi - lo) / 255)
    z = np.clip(np.round(-128 - lo / s), -128, 127)
    return (np.clip(np.round(x / s) + z, -128, 127) - z) * s


@pytest.mark.parametrize("mode", ["simulate", "int"])
def test_dot_general_block_weights_match_numpy(mode):
    x = RNG.normal(size=(3, 16)).astype(np.float32)
    w = RNG.standard_t(3, size=(16, 5)).astype(np.float32)
    cw = jq.QuantConfig(fmt=jq.int4, axis=1, block_size=8)  # block_axis: the contraction
    ca = jq.QuantConfig(fmt=jq.int8, symmetric=False)
    out = dot_general(x, w, DN, lhs_quant=ca, rhs_quant=cw, mode=mode)
    ref = _np_affine_fq(x).astype(np.float64) @ np_block_fq(w, 8, 0, 4).astype(np.float64)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_dot_general_int_blocks_on_both_sides_equal_simulate_with_given_qparams():
    x = RNG.normal(size=(2, 3, 16)).astype(np.float32)
    w = RNG.normal(size=(16, 4)).astype(np.float32)
    cx = jq.QuantConfig(fmt=jq.int8, symmetric=False, axis=(0, 1), block_size=4)
    cw = jq.QuantConfig(fmt=jq.int4, axis=1, block_size=4)
    qp_w = _block_qp(w, 4, 0, 4, symmetric=True)
    dn = (((2,), (0,)), ((), ()))
    kw = dict(lhs_quant=cx, rhs_quant=cw, rhs_qparams=jq.QParams(qp_w.scale))
    sim = dot_general(x, w, dn, mode="simulate", **kw)
    out = dot_general(x, w, dn, mode="int", **kw)
    np.testing.assert_allclose(out, sim, rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(lambda a, b: dot_general(a, b, dn, mode="int", **kw))(x, w))
    assert "preferred_element_type=int32" in jaxpr
    # int mode's gradient is simulate's
    g_int = jax.grad(lambda a: dot_general(a, w, dn, mode="int", **kw).sum())(x)
    g_sim = jax.grad(lambda a: dot_general(a, w, dn, mode="simulate", **kw).sum())(x)
    np.testing.assert_allclose(g_int, g_sim, rtol=1e-6)


def test_int_mode_blocks_must_run_along_the_contraction():
    w = RNG.normal(size=(16, 4)).astype(np.float32)
    x = RNG.normal(size=(2, 16)).astype(np.float32)
    bad = jq.QuantConfig(fmt=jq.int4, block_size=2, block_axis=1)
    with pytest.raises(ValueError, match="must be a contracting axis"):
        dot_general(x, w, DN, lhs_quant=jq.QuantConfig(), rhs_quant=bad, mode="int")
    mismatch = jq.QuantConfig(block_size=4)
    with pytest.raises(ValueError, match="same size"):
        dot_general(
            x, w, DN, lhs_quant=mismatch, rhs_quant=jq.QuantConfig(block_size=8), mode="int"
        )


@pytest.mark.parametrize("mode", ["simulate", "int"])
def test_conv_block_weights_along_input_features_match_numpy(mode):
    x = RNG.normal(size=(2, 5, 5, 8)).astype(np.float32)
    w = RNG.normal(size=(3, 3, 8, 4)).astype(np.float32)
    dn = ("NHWC", "HWIO", "NHWC")
    cw = jq.QuantConfig(fmt=jq.int4, axis=3, block_size=4)  # blocks of 4 input channels
    ca = jq.QuantConfig(fmt=jq.int8, symmetric=False)
    out = conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=dn, lhs_quant=ca, rhs_quant=cw, mode=mode
    )
    # oracle: NumPy block quantizer (per output channel and block of 4 inputs), float conv
    wq = _np_conv_block_fq(w)
    ref = lax.conv_general_dilated(
        jnp.asarray(_np_affine_fq(x)),
        jnp.asarray(wq),
        (1, 1),
        "SAME",
        dimension_numbers=dn,
        precision="highest",
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-4)


def _np_conv_block_fq(w):
    """HWIO kernel: one symmetric int4 scale per output channel and block of 4 inputs."""
    h, k, i, o = w.shape
    wb = w.reshape(h, k, i // 4, 4, o)
    s = np.abs(wb).max(axis=(0, 1, 3), keepdims=True) / np.float32(7)
    return (np.clip(np.round(wb / s), -8, 7) * s).reshape(w.shape)
