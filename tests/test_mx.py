"""jquant.mx against independent oracles: ml_dtypes casts (elements, E8M0 / E4M3 scales),
NumPy references written from the OCP MX v1.0 and NVFP4 scale rules, and QLoRA's NF4 levels
rebuilt from the normal quantiles with SciPy."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from scipy import stats

from jquant import mx

MINIFLOAT_MX = {
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
    "mxfp8_e5m2": ml_dtypes.float8_e5m2,
    "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
    "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
    "mxfp4": ml_dtypes.float4_e2m1fn,
}
EMAX = {"mxfp8_e4m3": 8, "mxfp8_e5m2": 15, "mxfp6_e3m2": 4, "mxfp6_e2m3": 2, "mxfp4": 2}


def _heavy(rng, shape):
    """Student-t samples with per-block magnitudes over many binades."""
    x = rng.standard_t(3, size=shape) * np.exp2(rng.integers(-20, 20, size=shape[:-1] + (1,)))
    return x.astype(np.float32)


def np_mx(x: np.ndarray, name: str):
    """OCP MX v1.0 in NumPy from the spec: X = 2^(floor(log2 amax) - emax_elem) (E8M0,
    clipped to [-127, 127]), elements x / X cast by ml_dtypes after saturating at the max."""
    dtype = MINIFLOAT_MX[name]
    b = x.reshape(*x.shape[:-1], -1, 32).astype(np.float64)
    amax = np.abs(b).max(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - EMAX[name], -127)
    scale = np.exp2(np.clip(e, -127, 127))
    top = float(ml_dtypes.finfo(dtype).max)
    elems = np.clip(b / scale, -top, top).astype(np.float32).astype(dtype)
    return elems.reshape(x.shape), scale[..., 0].astype(ml_dtypes.float8_e8m0fnu)


@pytest.mark.parametrize("name", sorted(MINIFLOAT_MX))
def test_mx_elements_and_scales_equal_the_spec_bit_for_bit(rng, name):
    x = _heavy(rng, (8, 4, 64))
    x[0, 0, :32] = 0.0  # amax = 0: the smallest scale, zero elements
    x[0, 1, :32] = 1e-40  # a subnormal float32 amax
    x[0, 2, :32] *= 1e30  # a huge block
    got = mx.quantize(x, name)
    want_e, want_s = np_mx(x, name)
    assert got.elements.dtype == MINIFLOAT_MX[name] and got.scales.dtype == ml_dtypes.float8_e8m0fnu
    np.testing.assert_array_equal(got.elements.view(np.uint8), want_e.view(np.uint8))
    np.testing.assert_array_equal(got.scales.view(np.uint8), want_s.view(np.uint8))
    assert got.scales.astype(np.float32)[0, 0, 0] == 2.0**-127
    assert not np.any(got.elements.astype(np.float32)[0, 0, :32])


@pytest.mark.parametrize("name", sorted(MINIFLOAT_MX))
def test_round_to_minifloat_is_the_ml_dtypes_cast_on_its_range(rng, name):
    dtype = MINIFLOAT_MX[name]
    fmt = mx.FORMATS[name]
    top = float(ml_dtypes.finfo(dtype).max)
    # every representable value, every midpoint between neighbours (ties), random values
    codes = np.arange(2 ** (1 + fmt.exponent_bits + fmt.mantissa_bits), dtype=np.uint8)
    reps = codes.view(dtype).astype(np.float32)
    reps = np.unique(reps[np.isfinite(reps)])
    mids = (reps[1:] + reps[:-1]) / 2
    v = np.concatenate([reps, mids, rng.uniform(-top, top, 4096).astype(np.float32)])
    got = np.asarray(
        mx.round_to_minifloat(jnp.asarray(v), fmt.exponent_bits, fmt.mantissa_bits, top)
    )
    np.testing.assert_array_equal(got, v.astype(dtype).astype(np.float32))


def test_saturation_of_blocks_beyond_the_element_range():
    # amax = 1.9 * 2^3: X = 2^(3 - 2) = 2, amax / X = 7.6 > 6 (E2M1's max): saturates at 6
    x = np.full((32,), 0.5, np.float32)
    x[0] = 1.9 * 8
    q = mx.quantize(x, "mxfp4")
    assert float(q.scales[0].astype(np.float32)) == 2.0
    assert float(q.elements[0].astype(np.float32)) == 6.0
    assert mx.dequantize(q, "mxfp4")[0] == 12.0


def test_nan_and_inf_blocks_give_nan_and_leave_the_others(rng):
    x = rng.normal(size=(4, 64)).astype(np.float32)
    x[1, 3], x[2, 7] = np.nan, np.inf
    nan_where = {  # the elements the NaN / Inf flows to: their block's scale (NVFP4: t)
        "mxfp8_e4m3": np.s_[1:3, :32],
        "mxint8": np.s_[1:3, :32],
        "nf4": np.s_[1:3, :],
        "nvfp4": np.s_[:, :],
    }
    for name, where in nan_where.items():
        y = np.asarray(mx.fake_quant(x, name))
        want = np.zeros(x.shape, bool)
        want[where] = True
        np.testing.assert_array_equal(np.isnan(y), want, err_msg=name)
    q = mx.quantize(x, "mxfp4")
    assert np.isnan(q.scales.astype(np.float32)[1:3, 0]).all()
    assert np.isfinite(q.scales.astype(np.float32)[:, 1]).all()


def test_mxint8_from_the_spec(rng):
    x = _heavy(rng, (6, 64))
    q = mx.quantize(x, "mxint8")
    b = x.reshape(6, 2, 32).astype(np.float64)
    amax = np.abs(b).max(-1, keepdims=True)
    scale = np.exp2(np.floor(np.log2(amax)))  # emax_elem = 0
    want = np.clip(np.rint(b / scale * 64), -127, 127).astype(np.int8).reshape(x.shape)
    np.testing.assert_array_equal(q.elements, want)
    np.testing.assert_array_equal(q.scales.astype(np.float64), scale[..., 0])
    np.testing.assert_array_equal(
        mx.dequantize(q, "mxint8"), (want.reshape(6, 2, 32) / 64 * scale).reshape(x.shape)
    )


def test_nvfp4_from_its_two_level_scale_rule(rng):
    x = _heavy(rng, (4, 64)) / 1e3
    q = mx.quantize(x, "nvfp4")
    t = np.float32(np.abs(x).max() / np.float32(448 * 6))
    b = x.reshape(4, 4, 16)
    block = (np.abs(b).max(-1) / (6 * t)).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    eff = block.astype(np.float32)[..., None] * t
    elems = np.clip(b / np.where(eff > 0, eff, 1), -6, 6).astype(ml_dtypes.float4_e2m1fn)
    assert q.scales.tensor == t
    np.testing.assert_array_equal(q.scales.block.view(np.uint8), block.view(np.uint8))
    np.testing.assert_array_equal(q.elements.view(np.uint8), elems.reshape(x.shape).view(np.uint8))


def test_nf4_levels_are_qlora_normal_quantiles_and_elements_go_to_the_nearest(rng):
    offset = 0.9677083
    pos = stats.norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    neg = -stats.norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    levels = np.sort(np.concatenate([pos, [0.0], neg]))
    np.testing.assert_allclose(mx.NF4_LEVELS, levels / levels.max(), atol=1e-6)
    x = rng.normal(size=(3, 128)).astype(np.float32)
    q = mx.quantize(x, "nf4")
    b = x.reshape(3, 2, 64)
    absmax = np.abs(b).max(-1, keepdims=True)
    want = np.abs((b / absmax)[..., None] - mx.NF4_LEVELS).argmin(-1).reshape(x.shape)
    np.testing.assert_array_equal(q.elements, want)
    np.testing.assert_array_equal(q.scales, absmax[..., 0])


@pytest.mark.parametrize("name", sorted(mx.FORMATS))
def test_fake_quant_is_dequantize_of_quantize_with_a_straight_through_gradient(rng, name):
    x = rng.normal(size=(2, 3, 128)).astype(np.float32)
    want = mx.dequantize(mx.quantize(x, name, axis=-1), name, axis=-1)
    np.testing.assert_array_equal(
        np.asarray(jax.jit(mx.fake_quant, static_argnames=("fmt",))(x, name)), want
    )
    xt = np.swapaxes(x, 1, 2).copy()  # blocks along another axis
    np.testing.assert_array_equal(
        np.asarray(mx.fake_quant(xt, name, axis=1)), np.swapaxes(want, 1, 2)
    )
    g = jax.grad(lambda v: jnp.sum(mx.fake_quant(v, name) * 3.0))(jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(g), np.full(x.shape, 3.0, np.float32))


def test_error_shrinks_with_element_precision(rng):
    x = rng.normal(size=(64, 256)).astype(np.float32)
    err = {n: float(np.mean((np.asarray(mx.fake_quant(x, n)) - x) ** 2)) for n in mx.FORMATS}
    assert err["mxint8"] < err["mxfp8_e4m3"] < err["mxfp8_e5m2"]  # mantissa 6, 3, 2 bits
    assert err["mxfp6_e2m3"] < err["mxfp6_e3m2"] < err["mxfp4"]
    assert err["nvfp4"] < err["mxfp4"]  # finer (E4M3, 16-element) scales
    # MXINT8 is a uniform grid of step X / 64 per block: the noise is step^2 / 12
    amax = np.abs(x.reshape(64, 8, 32)).max(-1)
    step = np.exp2(np.floor(np.log2(amax))) / 64
    np.testing.assert_allclose(err["mxint8"], np.mean(step**2) / 12, rtol=0.05)


def test_bad_input():
    with pytest.raises(ValueError, match="fmt must be a BlockFormat or one of"):
        mx.quantize(np.zeros(32, np.float32), "mxfp3")
    with pytest.raises(ValueError, match="not a multiple of the block size 32"):
        mx.quantize(np.zeros(40, np.float32), "mxfp4")
    with pytest.raises(TypeError, match="x must be a float array"):
        mx.fake_quant(np.zeros(32, np.int32), "mxfp4")


# --- stochastic rounding ------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(mx.FORMATS))
def test_stochastic_rounding_is_unbiased(rng, name):
    """The mean of n draws is within 5 standard errors of x: a draw is one of x's two grid
    neighbours, so its standard deviation is at most half their spacing, at most the largest
    round-to-nearest error max|fq(x) - x| of the tensor (blocks chosen so that no element
    saturates: each block's amax is 1, a power of two)."""
    x = rng.uniform(-1, 1, size=(2, 128)).astype(np.float32)
    x[:, ::16] = 1.0
    n = 2000
    draws = jax.jit(jax.vmap(lambda k: mx.fake_quant(x, name, rounding="stochastic", key=k)))(
        jax.random.split(jax.random.key(0), n)
    )
    nearest = np.asarray(mx.fake_quant(x, name))
    half_spacing = np.abs(nearest - x).max()
    bias = np.abs(np.asarray(draws).mean(0) - x)
    assert bias.max() <= 5 * half_spacing / np.sqrt(n)
    assert bias.mean() < 0.1 * np.abs(nearest - x).mean()  # round-to-nearest is biased here
    # every draw lies on the format's grid: quantize with the same key gives the same values
    key = jax.random.key(7)
    blocks = mx.quantize(x, name, rounding="stochastic", key=key)
    np.testing.assert_allclose(
        mx.dequantize(blocks, name),
        np.asarray(mx.fake_quant(x, name, rounding="stochastic", key=key)),
        rtol=1e-6,
    )


def test_stochastic_rounding_needs_a_key_and_a_known_mode():
    x = np.ones(32, np.float32)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        mx.fake_quant(x, "mxfp4", rounding="stochastic")
    with pytest.raises(ValueError, match="rounding must be one of"):
        mx.fake_quant(x, "mxfp4", rounding="floor")


# --- block formats in ops and rules --------------------------------------------------------------


@pytest.mark.parametrize("name", ["mxfp4", "mxint8", "nvfp4", "nf4"])
def test_block_formats_in_dot_general_and_a_dense_rule(rng, name):
    import flax.linen as nn

    import jquant as jq
    from jquant.nn import QuantRule
    from jquant.nn import linen as ql
    from jquant.ops import dot_general

    x = rng.normal(size=(3, 64)).astype(np.float32)
    w = rng.standard_t(3, size=(64, 5)).astype(np.float32)
    fq_x = mx.dequantize(mx.quantize(x, "mxfp8_e4m3", axis=1), "mxfp8_e4m3", axis=1)
    fq_w = mx.dequantize(mx.quantize(w, name, axis=0), name, axis=0)  # along the contraction
    ref = fq_x.astype(np.float64) @ fq_w
    cx, cw = jq.QuantConfig(fmt=mx.FORMATS["mxfp8_e4m3"]), jq.QuantConfig(fmt=mx.FORMATS[name])
    dn = (((1,), (0,)), ((), ()))
    out = dot_general(x, w, dn, lhs_quant=cx, rhs_quant=cw)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    g = jax.grad(lambda v: dot_general(x, v, dn, rhs_quant=cw).sum())(w)  # straight through
    np.testing.assert_allclose(g, np.broadcast_to(x.sum(0)[:, None], w.shape), rtol=1e-6)
    with pytest.raises(ValueError, match=f"no integer kernel for the block format {name}"):
        dot_general(x, w, dn, lhs_quant=jq.QuantConfig(), rhs_quant=cw, mode="int")

    if name != "nvfp4":  # one layer test (compiles are slow); the op is the same
        return
    rule = QuantRule(".*", weight=name, act="mxfp8_e4m3")
    dense = nn.Dense(5)
    v = dense.init(jax.random.key(0), x)
    v = {"params": {"kernel": jnp.asarray(w), "bias": v["params"]["bias"]}}
    qm, _ = ql.quantize_model(dense, rule, x)
    y = qm.with_phase("eval").apply(qm.attach(v, x), x)
    np.testing.assert_allclose(y, ref + np.asarray(v["params"]["bias"]), rtol=1e-5, atol=1e-5)


def test_block_format_rules_refuse_what_they_cannot_do():
    from jquant.nn import QuantRule

    with pytest.raises(ValueError, match="has no integer kernel: use mode='simulate'"):
        QuantRule(".*", weight="mxfp4", mode="int")
    with pytest.raises(ValueError, match="its estimator must be 'ste'"):
        QuantRule(".*", weight="nvfp4", act=None, estimator="clipped_ste")
    with pytest.raises(ValueError, match="has its own blocks of 64"):
        QuantRule(".*", weight="nf4", block_size=32)


def test_block_format_activations_in_act_quant_and_pooling_layers(rng):
    from jquant.nn import QuantRule
    from jquant.nn import linen as ql

    x = rng.normal(size=(2, 4, 32)).astype(np.float32)
    rule = QuantRule(".*", act="mxfp4")
    act = ql.ActQuant(rule=rule, phase="eval")
    y = act.apply(act.init(jax.random.key(0), x), x)
    np.testing.assert_array_equal(y, mx.dequantize(mx.quantize(x, "mxfp4"), "mxfp4"))
    pool = ql.QAvgPool((2,), rule=rule, phase="eval")
    with pytest.raises(ValueError, match="pooling keeps its input's QParams.*mxfp4"):
        pool.init(jax.random.key(0), x)


def test_mx_weight_only_linen_model_calibrates_and_matches_fake_quant_kernels():
    """A model whose rules create no calibrated statistics (MX weights, float activations)
    still runs ``calibrate``; its eval forward is the float model on MX-fake-quantized kernels
    (blocks along the contracted input axis)."""
    import flax.linen as nn

    from jquant.nn import linen as ql
    from jquant.nn.rules import QuantRule

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4, name="out")(nn.relu(nn.Dense(64, name="hidden")(x)))

    x = jax.random.normal(jax.random.key(0), (8, 64))
    model = MLP()
    qm, _ = ql.quantize_model(model, [QuantRule(".*", weight="mxfp4", act=None)], x)
    qv = qm.calibrate(qm.init(jax.random.key(1), x), [x])
    got = qm.with_phase("eval").apply(qv, x)
    params = dict(qv["params"])
    for name in ("hidden", "out"):
        params[name] = dict(params[name])
        params[name]["kernel"] = mx.fake_quant(params[name]["kernel"], "mxfp4", axis=0)
    want = model.apply({"params": params}, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# --- block formats through the Format protocol, stochastic rounding in configs, ops, rules ------


def _protocol_fake_quant(x: np.ndarray, fmt, noise=None) -> np.ndarray:
    """The block-format protocol written out in NumPy (blocks along the last axis):
    ``s = fmt.block_scales(amax)``, ``x_hat = s * decode(encode(x / s))``."""
    b = x.reshape(*x.shape[:-1], -1, fmt.block_size)
    s = np.asarray(fmt.block_scales(np.abs(b).max(-1, keepdims=True)), np.float32)
    rounding = "nearest_even" if noise is None else "stochastic"
    if noise is not None:
        noise = noise.reshape(b.shape)
    v = b / np.where(s == 0, 1, s)
    return (s * fmt.decode(fmt.encode(v, 0.0, rounding, noise), 0.0)).reshape(x.shape)


@pytest.mark.parametrize("name", sorted(mx.FORMATS))
def test_block_formats_follow_the_format_protocol(rng, name):
    from jquant.formats import FORMAT_MEMBERS, block_size_of, check_format, rounding_modes_of

    fmt = mx.FORMATS[name]
    check_format(fmt)
    assert all(hasattr(fmt, m) for m in FORMAT_MEMBERS)
    assert block_size_of(fmt) == fmt.block_size and fmt.is_static and not fmt.has_zero_point
    assert rounding_modes_of(fmt) == ("nearest_even", "stochastic")
    with pytest.raises(ValueError, match="rounding must be one of"):
        fmt.encode(np.ones(3, np.float32), 0.0, "floor")
    import jquant as jq

    with pytest.raises(ValueError, match="is a block format: it derives its own block scales"):
        jq.fake_quant(np.ones(64, np.float32), jq.QParams(1.0), fmt)  # QParams do not apply
    x = rng.normal(size=(2, 128)).astype(np.float32)
    want = mx.dequantize(mx.quantize(x, name), name)
    np.testing.assert_array_equal(_protocol_fake_quant(x, fmt), want)
    key = jax.random.key(4)  # the same noise as mx.quantize draws from this key
    noise = np.asarray(jax.random.uniform(key, x.shape, jnp.float32))
    got = _protocol_fake_quant(x, fmt, noise)
    stochastic = mx.quantize(x, name, rounding="stochastic", key=key)
    np.testing.assert_array_equal(got, mx.dequantize(stochastic, name))
    assert np.any(got != want)
    # one block as a range: scale_for_range is block_scales of that block's amax
    amax = np.abs(x[:1, : fmt.block_size]).max(-1, keepdims=True)
    s, zp = fmt.scale_for_range(jnp.asarray(-amax), jnp.asarray(amax), True)
    np.testing.assert_allclose(np.asarray(s), _one_block_scale(fmt, amax), rtol=1e-6)
    assert np.all(np.asarray(zp) == 0)


def _one_block_scale(fmt, amax):
    if fmt.kind == "mx":
        return np.exp2(np.floor(np.log2(amax)) - fmt.emax)
    if fmt.kind == "nvfp4":  # a tensor of one block: e4m3(448) t = amax / 6
        return amax / 6
    return amax  # nf4


@pytest.mark.parametrize("name", ["mxfp4", "nf4", "mxint8"])  # all: the protocol test above
def test_stochastic_config_in_dot_general_is_mx_stochastic_quantize_with_the_same_key(rng, name):
    """``QuantConfig(fmt=name, rounding="stochastic")`` with ``key=``: ``rhs`` rounds with
    ``jax.random.split(key)[1]`` exactly as ``jquant.mx.quantize`` does with that key."""
    import jquant as jq
    from jquant.ops import dot_general
    from jquant.quant import fake_quant_config

    w = rng.normal(size=(64, 3)).astype(np.float32)
    key = jax.random.key(11)
    cfg = jq.QuantConfig(fmt=name, rounding="stochastic")
    want = mx.dequantize(
        mx.quantize(w, name, axis=0, rounding="stochastic", key=jax.random.split(key)[1]),
        name,
        axis=0,
    )
    eye = np.eye(5, 64, dtype=np.float32)  # eye @ fq(w) picks rows of fq(w), exactly
    dn = (((1,), (0,)), ((), ()))
    out = dot_general(eye, w, dn, rhs_quant=cfg, key=key)
    np.testing.assert_array_equal(np.asarray(out), want[:5])
    got = fake_quant_config(w, dataclasses.replace(cfg, block_axis=0), key=jax.random.split(key)[1])
    np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="rhs_quant.rounding='stochastic' needs key="):
        dot_general(eye, w, dn, rhs_quant=cfg)
    with pytest.raises(ValueError, match="needs a PRNG key"):
        fake_quant_config(w, dataclasses.replace(cfg, block_axis=0))
    with pytest.raises(ValueError, match="key is given but neither"):
        dot_general(eye, w, dn, rhs_quant=jq.QuantConfig(fmt=name), key=key)


@pytest.mark.parametrize("name", ["mxfp4"])  # every format: test_stochastic_rounding_is_unbiased
def test_stochastic_config_in_dot_general_is_unbiased_per_element(rng, name):
    """The mean over n keys of ``eye @ fq(w)`` (so each output is one element of fq(w)) is
    within 5 standard errors of w per element; a draw's standard deviation is at most half
    the spacing of w's two grid neighbours, at most max|fq_nearest(w) - w| (blocks whose
    amax is 1 so that nothing saturates)."""
    import jquant as jq
    from jquant.ops import dot_general

    w = rng.uniform(-1, 1, size=(64, 2)).astype(np.float32)
    w[::16] = 1.0
    cfg = jq.QuantConfig(fmt=name, rounding="stochastic")
    eye = np.eye(64, dtype=np.float32)
    dn = (((1,), (0,)), ((), ()))
    n = 1000
    draws = jax.jit(jax.vmap(lambda k: dot_general(eye, w, dn, rhs_quant=cfg, key=k)))(
        jax.random.split(jax.random.key(3), n)
    )
    nearest = np.asarray(dot_general(eye, w, dn, rhs_quant=jq.QuantConfig(fmt=name)))
    half_spacing = np.abs(nearest - w).max()
    bias = np.abs(np.asarray(draws).mean(0) - w)
    assert bias.max() <= 5 * half_spacing / np.sqrt(n)
    assert bias.mean() < 0.2 * np.abs(nearest - w).mean()


def test_stochastic_rounding_is_refused_where_no_key_reaches():
    import jquant as jq
    from jquant.nn import QuantRule
    from jquant.ops import BackwardConfig, dot_general, train_dot_general

    x, w = np.ones((2, 32), np.float32), np.ones((32, 3), np.float32)
    dn = (((1,), (0,)), ((), ()))
    key = jax.random.key(0)
    sr = jq.QuantConfig(fmt="mxfp4", rounding="stochastic")
    with pytest.raises(ValueError, match="key is given but mode='int'"):
        dot_general(x, w, dn, lhs_quant=jq.QuantConfig(), rhs_quant=jq.QuantConfig(), mode="int",
                    key=key)  # fmt: skip
    with pytest.raises(ValueError, match="mode='int' rounds deterministically"):
        dot_general(x, w, dn, lhs_quant=jq.QuantConfig(), rhs_quant=jq.QuantConfig(
            rounding="stochastic"), mode="int")  # fmt: skip
    with pytest.raises(ValueError, match="redo the forward quantization"):
        train_dot_general(x, w, dn, rhs_quant=sr, bwd=BackwardConfig.uniform(jq.QuantConfig()),
                          key=key)  # fmt: skip
    with pytest.raises(ValueError, match="'half_away' is not a rounding mode of QuantRule.weight"):
        QuantRule(".*", weight="nf4", rounding="half_away")
    with pytest.raises(ValueError, match="needs mode='simulate', grad=None, backward=None"):
        QuantRule(".*", weight="mxfp4", act=None, rounding="stochastic", grad="int8")
    with pytest.raises(ValueError, match="got backward=BackwardConfig"):
        QuantRule(".*", weight="int8", act=None, rounding="stochastic", backward=BackwardConfig())
    with pytest.raises(ValueError, match="got scaling='delayed'"):
        QuantRule(".*", weight="fp8_e4m3", act=None, rounding="stochastic", scaling="delayed")
    with pytest.raises(ValueError, match="needs mode='simulate', grad=None, backward=None"):
        QuantRule(".*", rounding="stochastic", mode="int")


def test_stochastic_block_format_rule_draws_from_the_quant_rng_stream(rng):
    """A Dense under ``QuantRule(weight="mxfp4", rounding="stochastic")``: the key comes from
    the ``"quant"`` stream (none: ValueError), the same key gives the same output, another key
    another one, and the mean over keys is the float layer's output (unbiased)."""
    import flax.linen as nn

    from jquant.nn import QuantRule
    from jquant.nn import linen as ql

    x = rng.uniform(-1, 1, size=(2, 64)).astype(np.float32)
    w = rng.uniform(-1, 1, size=(64, 3)).astype(np.float32)
    w[::32] = 1.0  # every block's amax is 1: nothing saturates
    rule = QuantRule(".*", weight="mxfp4", act=None, rounding="stochastic")
    dense = nn.Dense(3, use_bias=False)
    qm, _ = ql.quantize_model(dense, rule, x)
    v = qm.attach({"params": {"kernel": jnp.asarray(w)}}, x)
    qm = qm.with_phase("eval")
    with pytest.raises(ValueError, match="rngs=\\{'quant': key\\}"):
        qm.apply(v, x)
    run = jax.jit(lambda k: qm.apply(v, x, rngs={"quant": k}))
    a, b = run(jax.random.key(1)), run(jax.random.key(2))
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, run(jax.random.key(1)))
    n = 400
    mean = jax.vmap(run)(jax.random.split(jax.random.key(5), n)).mean(0)
    nearest = x @ mx.fake_quant(w, "mxfp4", axis=0)
    # |E - x w| per output: each draw's sd <= sum_k |x_k| max|fq(w) - w|
    sd = (
        np.abs(x).sum(1, keepdims=True)
        * np.abs(np.asarray(mx.fake_quant(w, "mxfp4", axis=0)) - w).max()
    )
    assert np.all(np.abs(np.asarray(mean) - x @ w) <= 5 * sd / np.sqrt(n))
    assert np.abs(np.asarray(mean) - x @ w).mean() < np.abs(np.asarray(nearest) - x @ w).mean()


@pytest.mark.slow  # ~15-20 s on the loaded 2-core machine; a sibling test stays default
def test_stochastic_block_format_nnx_layer_draws_from_quant_rngs(rng):
    """NNX: the key comes from the layer's ``quant_rngs`` (none: ValueError); the stream
    advances, so two calls round differently, each within one grid step per weight."""
    from flax import nnx

    from jquant.nn import QuantRule
    from jquant.nn import nnx as qn

    x = jnp.asarray(rng.normal(size=(2, 32)).astype(np.float32))
    rule = QuantRule(".*", weight="mxfp4", act=None, rounding="stochastic")
    layer = qn.QLinear(32, 3, rule=rule, phase="eval", use_bias=False, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quant_rngs"):
        layer(x)
    layer.quant_rngs = nnx.Rngs(quant=1)
    y1, y2 = layer(x), layer(x)
    assert not np.array_equal(y1, y2)
    # each weight moved to a grid neighbour: by at most E2M1's widest spacing (2) times its
    # block's scale 2^(floor(log2 amax) - 2) (one block of 32 per output column)
    w = np.asarray(layer.kernel.value)
    scale = np.exp2(np.floor(np.log2(np.abs(w).max(0))) - 2)
    bound = np.abs(np.asarray(x)) @ np.broadcast_to(2 * scale, w.shape)
    for y in (y1, y2):
        assert np.all(np.abs(np.asarray(y) - np.asarray(x) @ w) <= bound * (1 + 1e-5))
