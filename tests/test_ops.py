"""Tests of jquant.ops: quantized dot_general / conv_general_dilated and pooling.

Oracles: a NumPy fake quantizer, onnxruntime's MatMulInteger / ConvInteger (exact int32
products with zero points), golden TFLite pooling vectors, the analytic straight-through
gradient, and the agreement of the ``simulate`` and ``int`` modes.
"""

import functools
import pathlib

import flax.linen as nn
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from flax import nnx
from hypothesis import given, settings
from jax import lax
from onnx import TensorProto, helper

import jquant as jq
from jquant import ops
from jquant.ops import QuantConfig

GOLDEN = pathlib.Path(__file__).resolve().parent / "data" / "tflite_int8_ops.npz"
DENSE_DN = (((1,), (0,)), ((), ()))
NHWC = ("NHWC", "HWIO", "NHWC")

SYM = QuantConfig()
AFFINE = QuantConfig(symmetric=False)
PER_CHANNEL_LAST = QuantConfig(axis=-1)


def _normal(seed, shape, scale=1.0, shift=0.0):
    return (np.random.default_rng(seed).normal(size=shape) * scale + shift).astype(np.float32)


def _np_fake_quant(x, scale, zp, qmin, qmax):
    """NumPy oracle: ``s * (clip(round_half_even(x / s) + zp, qmin, qmax) - zp)``."""
    x, scale, zp = np.float32(x), np.float32(scale), np.float32(zp)
    q = np.clip(np.round(x / scale) + zp, qmin, qmax)
    return scale * (q - zp), q


_qparams = jax.jit(ops.dynamic_qparams, static_argnums=1)


def _close(actual, desired, rel=1e-5):
    """Equal up to float32 rounding of a sum: tolerance relative to the output's magnitude."""
    desired = np.asarray(desired)
    np.testing.assert_allclose(actual, desired, rtol=rel, atol=rel * np.abs(desired).max())


# --- QuantConfig and dynamic_qparams ----------------------------------------------------------


def test_quant_config_is_hashable_and_validates():
    assert hash(QuantConfig(axis=(0, 1))) == hash(QuantConfig(axis=(0, 1)))
    assert QuantConfig(fmt="int4") == QuantConfig(fmt=jq.int4)  # names resolved at the edge
    assert QuantConfig(estimator="lsq").estimator is jq.estimators.get_estimator("lsq")
    with pytest.raises(TypeError, match="fmt"):
        QuantConfig(fmt=4)
    with pytest.raises(ValueError, match="format"):
        QuantConfig(fmt="int9")
    with pytest.raises(ValueError, match="estimator"):
        QuantConfig(estimator="nope")
    with pytest.raises(ValueError, match="rounding"):
        QuantConfig(rounding="nope")
    with pytest.raises(ValueError, match="rounding must be one of"):  # the format's own modes
        QuantConfig(fmt="mxfp4", rounding="floor")
    with pytest.raises(TypeError, match="axis"):
        QuantConfig(axis=1.5)
    with pytest.raises(TypeError, match="unhashable"):  # array bits (a sweep) are not static
        hash(QuantConfig(fmt=jq.IntFormat(jnp.asarray(4))))
    with pytest.raises(ValueError, match="out of range"):
        ops.dynamic_qparams(jnp.ones((2, 3)), QuantConfig(axis=2))


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("axis", [None, 1, (0, 2)])
def test_dynamic_qparams_match_numpy_range(symmetric, axis):
    x = _normal(0, (3, 4, 5), shift=0.3)
    cfg = QuantConfig(symmetric=symmetric, axis=axis)
    qp = _qparams(x, cfg)
    kept = () if axis is None else np.atleast_1d(axis)
    red = tuple(a for a in range(3) if a not in kept)
    lo, hi = np.minimum(x.min(red, keepdims=True), 0), np.maximum(x.max(red, keepdims=True), 0)
    if symmetric:
        scale, zp = np.maximum(-lo, hi) / 127, np.zeros_like(lo)
    else:
        scale = (hi - lo) / 255
        zp = np.clip(np.round(-128 - lo / scale), -128, 127)
    np.testing.assert_allclose(qp.scale, scale, rtol=1e-6)
    np.testing.assert_array_equal(qp.zero_point, zp)
    grad = jax.jit(jax.grad(lambda v: ops.dynamic_qparams(v, cfg).scale.sum()))(x)
    assert not np.any(grad)  # stop_gradient'ed


# --- dot_general ------------------------------------------------------------------------------

DENSE_CASES = {
    "sym_tensor": (SYM, SYM),
    "sym_channel": (SYM, PER_CHANNEL_LAST),
    "affine_lhs": (AFFINE, PER_CHANNEL_LAST),
    "affine_per_row_lhs": (QuantConfig(symmetric=False, axis=0), PER_CHANNEL_LAST),
    "uint8_lhs": (QuantConfig(fmt=jq.uint8, symmetric=False), SYM),
    "affine_both": (AFFINE, QuantConfig(symmetric=False, axis=1)),
    "int4": (QuantConfig(fmt=jq.int4, symmetric=False), QuantConfig(fmt=jq.int4, axis=1)),
}


def _with_vjp(f, x, w):
    """``(f(x, w), vjp(ct))`` with a fixed non-uniform cotangent ``ct``: one compile for both."""
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(jnp.cos(jnp.arange(y.size, dtype=y.dtype)).reshape(y.shape))


def _all_modes(f, x, w, lhs_quant, rhs_quant):
    """Per mode, ``(y, grads)``; and the float op (quantizers None): one compile for all."""
    q = functools.partial(f, lhs_quant=lhs_quant, rhs_quant=rhs_quant)
    out = {m: _with_vjp(functools.partial(q, mode=m), x, w) for m in ops.MODES}
    out["float"] = f(x, w, lhs_quant=None, rhs_quant=None, mode="simulate")
    return out


@functools.partial(jax.jit, static_argnames=("lhs_quant", "rhs_quant"))
def _dense(x, w, lhs_quant, rhs_quant):
    f = functools.partial(ops.dot_general, dimension_numbers=DENSE_DN)
    return _all_modes(f, x, w, lhs_quant, rhs_quant)


DENSE_SHAPES = ((8, 24), (24, 6))


def test_simulate_dense_matches_numpy_fake_quant():
    x, w = _normal(1, DENSE_SHAPES[0], shift=0.5), _normal(2, DENSE_SHAPES[1])
    lq, rq = DENSE_CASES["affine_lhs"]
    qx, qw = _qparams(x, lq), _qparams(w, rq)
    fx, _ = _np_fake_quant(x, qx.scale, qx.zero_point, -128, 127)
    fw, _ = _np_fake_quant(w, qw.scale, qw.zero_point, -128, 127)
    _close(_dense(x, w, lq, rq)["simulate"][0], fx.astype(np.float64) @ fw)


@pytest.mark.parametrize("case", DENSE_CASES)
def test_dense_int_matches_simulate_and_gradients_agree(case):
    lq, rq = DENSE_CASES[case]
    x, w = _normal(3, DENSE_SHAPES[0], shift=0.7), _normal(4, DENSE_SHAPES[1], shift=-0.2)
    out = _dense(x, w, lq, rq)
    (sim, g_sim), (int_, g_int) = out["simulate"], out["int"]
    assert not np.allclose(sim, out["float"], rtol=1e-3)  # quantization really happened
    _close(int_, sim)
    for a, b in zip(g_sim, g_int, strict=True):
        assert np.abs(a).sum() > 0
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_dense_ste_gradient_is_analytic():
    """STE: dL/dx = G fq(w)^T and dL/dw = fq(x)^T G, with fq the forward's fake quantizer."""
    lq, rq = DENSE_CASES["affine_lhs"]
    x, w = _normal(5, DENSE_SHAPES[0]), _normal(6, DENSE_SHAPES[1])
    gx, gw = _dense(x, w, lq, rq)["int"][1]
    qx, qw = _qparams(x, lq), _qparams(w, rq)
    fx, _ = _np_fake_quant(x, qx.scale, qx.zero_point, -128, 127)
    fw, _ = _np_fake_quant(w, qw.scale, qw.zero_point, -128, 127)
    g = np.cos(np.arange(48, dtype=np.float32)).reshape(8, 6)
    np.testing.assert_allclose(gx, g @ fw.T, rtol=1e-5)
    np.testing.assert_allclose(gw, fx.T @ g, rtol=1e-5)


def _ort_run(node, inputs, types, out_type):
    names = list(node.input)
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info(n, t, None) for n, t in zip(names, types, strict=True)],
        [helper.make_tensor_value_info(node.output[0], out_type, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, dict(zip(names, inputs, strict=True)))[0]


def test_dense_int_equals_onnxruntime_matmul_integer():
    """int mode == s_l s_r * MatMulInteger(q_l - z_l, q_r - z_r), ORT's exact int32 product."""
    lq, rq = AFFINE, QuantConfig(symmetric=False, axis=1)
    x, w = _normal(7, DENSE_SHAPES[0], shift=1.0), _normal(8, DENSE_SHAPES[1])
    qx, qw = _qparams(x, lq), _qparams(w, rq)
    _, cx = _np_fake_quant(x, qx.scale, qx.zero_point, -128, 127)
    _, cw = _np_fake_quant(w, qw.scale, qw.zero_point, -128, 127)
    zx, zw = (
        np.int8(qx.zero_point.reshape(())),
        np.asarray(qw.zero_point).reshape(-1).astype(np.int8),
    )
    assert zx != 0 and np.any(zw != 0)
    acc = _ort_run(
        helper.make_node("MatMulInteger", ["a", "b", "az", "bz"], ["y"]),
        [cx.astype(np.int8), cw.astype(np.int8), np.array(zx), zw],
        [TensorProto.INT8] * 4,
        TensorProto.INT32,
    )
    expected = (np.float32(qx.scale) * qw.scale) * acc.astype(np.float32)
    np.testing.assert_allclose(_dense(x, w, lq, rq)["int"][0], expected, rtol=1e-6, atol=0)


@settings(max_examples=15)
@given(
    seed=st.integers(0, 2**16),
    lhs_sym=st.booleans(),
    shift=st.floats(-2, 2),
    log_scale=st.floats(-3, 3),
)
def test_dense_int_matches_simulate_property(seed, lhs_sym, shift, log_scale):
    """Fixed shapes (one compile per config), random data: int == simulate, equal gradients."""
    x = _normal(seed, DENSE_SHAPES[0], scale=10.0**log_scale, shift=shift)
    w = _normal(seed + 1, DENSE_SHAPES[1])
    lq = QuantConfig(symmetric=lhs_sym, axis=0)
    out = _dense(x, w, lq, PER_CHANNEL_LAST)
    (a, ga), (b, gb) = out["simulate"], out["int"]
    _close(b, a)
    for u, v in zip(ga, gb, strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-6 * np.abs(u).max())


def test_batched_dot_general_int_per_batch_scales():
    """Batch dims (attention-like): scales per batch and per row / column factor out."""
    dn = (((2,), (1,)), ((0,), (0,)))
    x, w = _normal(9, (3, 4, 16), shift=0.4), _normal(10, (3, 16, 5))
    lq, rq = QuantConfig(symmetric=False, axis=(0, 1)), QuantConfig(axis=(0, 2))
    dot = functools.partial(ops.dot_general, dimension_numbers=dn, lhs_quant=lq, rhs_quant=rq)
    a = jax.jit(dot)(x, w)
    b = jax.jit(functools.partial(dot, mode="int"))(x, w)
    assert b.shape == (3, 4, 5)
    _close(b, a)


def test_given_learned_qparams_get_equal_gradients_in_both_modes():
    x, w = _normal(11, (6, 12)), _normal(12, (12, 4))
    lq, rq = QuantConfig(estimator="lsq"), QuantConfig(axis=1, estimator="lsq")

    def loss(sx, sw, mode):
        y = ops.dot_general(
            x,
            w,
            DENSE_DN,
            lhs_quant=lq,
            rhs_quant=rq,
            lhs_qparams=jq.QParams(sx),
            rhs_qparams=jq.QParams(sw),
            mode=mode,
        )
        return jnp.sum(jnp.sin(y))

    sx, sw = jnp.float32(0.02), jnp.full((1, 4), 0.01, jnp.float32)
    grad = jax.jit(jax.grad(loss, (0, 1)), static_argnums=2)
    g_sim, g_int = grad(sx, sw, "simulate"), grad(sx, sw, "int")
    assert np.abs(g_sim[0]) > 0 and np.all(np.abs(g_sim[1]) > 0)
    for a, b in zip(g_sim, g_int, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_int_mode_errors_name_the_problem():
    x, w = jnp.ones((2, 4)), jnp.ones((4, 3))
    dot = functools.partial(ops.dot_general, x, w, DENSE_DN, mode="int")
    with pytest.raises(ValueError, match="rhs_quant must be a QuantConfig"):
        dot(lhs_quant=SYM)
    with pytest.raises(ValueError, match="<= 8 bits"):
        dot(lhs_quant=QuantConfig(fmt=jq.int16), rhs_quant=SYM)
    with pytest.raises(ValueError, match="<= 8 bits"):
        dot(lhs_quant=SYM, rhs_quant=QuantConfig(fmt=jq.fp8_e4m3))
    with pytest.raises(ValueError, match="constant along contracting"):
        dot(lhs_quant=QuantConfig(axis=1), rhs_quant=SYM)
    with pytest.raises(ValueError, match="mode must be"):
        ops.dot_general(x, w, DENSE_DN, lhs_quant=SYM, mode="fast")
    with pytest.raises(ValueError, match="zero_point must be 0"):
        ops.dot_general(x, w, DENSE_DN, lhs_quant=SYM, lhs_qparams=jq.QParams(0.1, 3.0))
    with pytest.raises(ValueError, match="lhs_quant is None"):
        ops.dot_general(x, w, DENSE_DN, lhs_qparams=jq.QParams(0.1))
    with pytest.raises(ValueError, match="float dtype"):
        dot(lhs_quant=SYM, rhs_quant=SYM, preferred_element_type=jnp.int32)


# --- conv_general_dilated ---------------------------------------------------------------------

CONV_CASES = {
    # name: (x shape, w shape, conv kwargs, lhs config, rhs config)
    "same_sym_tensor": ((2, 7, 7, 3), (3, 3, 3, 4), dict(padding="SAME"), SYM, SYM),
    "same_affine_channel": (
        (2, 7, 7, 3),
        (3, 3, 3, 4),
        dict(padding="SAME"),
        AFFINE,
        PER_CHANNEL_LAST,
    ),
    "valid_stride2_dilated_sym_tensor": (
        (2, 9, 8, 3),
        (3, 3, 3, 4),
        dict(padding="VALID", window_strides=(2, 2), rhs_dilation=(2, 1)),
        SYM,
        SYM,
    ),
    "dilated_explicit_pad": (
        (1, 8, 8, 2),
        (3, 2, 2, 5),
        dict(padding=((2, 1), (0, 3)), rhs_dilation=(2, 1), window_strides=(1, 2)),
        AFFINE,
        PER_CHANNEL_LAST,
    ),
    "grouped": (
        (2, 6, 6, 4),
        (3, 3, 2, 6),
        dict(padding="SAME", feature_group_count=2),
        AFFINE,
        PER_CHANNEL_LAST,
    ),
    "depthwise": (
        (2, 6, 6, 4),
        (3, 3, 1, 4),
        dict(padding="SAME", feature_group_count=4, window_strides=(2, 1)),
        AFFINE,
        PER_CHANNEL_LAST,
    ),
    # per-sample zero points and input dilation take the conv-of-ones correction
    "per_sample_affine": (
        (3, 6, 6, 2),
        (3, 3, 2, 4),
        dict(padding="SAME"),
        QuantConfig(symmetric=False, axis=0),
        PER_CHANNEL_LAST,
    ),
    "lhs_dilation": (
        (2, 5, 5, 2),
        (3, 3, 2, 3),
        dict(padding=((2, 2), (1, 2)), lhs_dilation=(2, 2)),
        AFFINE,
        PER_CHANNEL_LAST,
    ),
    # 1-D convs run as 2-D ones over a unit axis in int mode (XLA:CPU's fast kernel)
    "conv1d_strided_affine": (
        (3, 13, 4),
        (3, 4, 5),
        dict(padding=((2, 1),), window_strides=(2,), dimension_numbers=("NWC", "WIO", "NWC")),
        AFFINE,
        PER_CHANNEL_LAST,
    ),
    "conv1d_per_sample_dilated": (
        (3, 9, 2),
        (3, 2, 3),
        dict(
            padding=((1, 2),),
            window_strides=(1,),
            lhs_dilation=(2,),
            rhs_dilation=(2,),
            dimension_numbers=("NWC", "WIO", "NWC"),
        ),
        QuantConfig(symmetric=False, axis=0),
        PER_CHANNEL_LAST,
    ),
    # weight zero points: every correction term of sum (q_l - z_l)(q_r - z_r)
    "affine_weights_grouped": (
        (2, 6, 6, 4),
        (3, 3, 2, 6),
        dict(padding="SAME", feature_group_count=2, window_strides=(2, 1)),
        AFFINE,
        QuantConfig(symmetric=False, axis=3),
    ),
    "affine_weights_per_sample_dilated": (
        (3, 5, 5, 2),
        (3, 3, 2, 3),
        dict(padding=((2, 2), (1, 2)), lhs_dilation=(2, 2)),
        QuantConfig(symmetric=False, axis=0),
        QuantConfig(fmt=jq.uint8, symmetric=False, axis=3),
    ),
    "sym_lhs_affine_weights_1d": (
        (3, 13, 4),
        (3, 4, 5),
        dict(padding="SAME", window_strides=(1,), dimension_numbers=("NWC", "WIO", "NWC")),
        SYM,
        QuantConfig(symmetric=False),
    ),
    "uint8_lhs_nchw": (
        (2, 3, 6, 6),
        (4, 3, 3, 3),
        dict(padding="SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")),
        QuantConfig(fmt=jq.uint8, symmetric=False),
        QuantConfig(axis=0),
    ),
}


def _conv_call(x, w, kw, lhs_quant, rhs_quant, mode):
    kw = dict(kw)
    kw.setdefault("window_strides", (1, 1))
    kw.setdefault("dimension_numbers", NHWC)
    return ops.conv_general_dilated(x, w, lhs_quant=lhs_quant, rhs_quant=rhs_quant, mode=mode, **kw)


def _hashable(kw: dict) -> tuple:
    return tuple(sorted(kw.items()))


@functools.partial(jax.jit, static_argnames=("kw", "lhs_quant", "rhs_quant"))
def _conv(x, w, kw, lhs_quant, rhs_quant):
    return _all_modes(functools.partial(_conv_call, kw=dict(kw)), x, w, lhs_quant, rhs_quant)


# covered by the others too; run with -m slow
SLOW_CONV_CASES = ("same_sym_tensor", "same_affine_channel", "dilated_explicit_pad")


@pytest.mark.parametrize(
    "case",
    [pytest.param(c, marks=pytest.mark.slow) if c in SLOW_CONV_CASES else c for c in CONV_CASES],
)
def test_conv_int_matches_simulate_and_gradients_agree(case):
    xs, ws, kw, lq, rq = CONV_CASES[case]
    x, w = _normal(13, xs, shift=0.8), _normal(14, ws, scale=0.5)
    kw = _hashable(kw)
    out = _conv(x, w, kw, lq, rq)
    (sim, g_sim), (int_, g_int), ref = out["simulate"], out["int"], out["float"]
    assert sim.shape == ref.shape and not np.allclose(sim, ref, rtol=1e-3)
    _close(int_, sim)
    for a, b in zip(g_sim, g_int, strict=True):
        assert np.abs(a).sum() > 0  # AQT's int conv returns zeros here
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_simulate_conv_is_lax_conv_of_numpy_fake_quant_and_ste_gradient():
    xs, ws, kw, lq, rq = CONV_CASES["grouped"]
    x, w = _normal(15, xs, shift=0.5), _normal(16, ws)
    qx, qw = _qparams(x, lq), _qparams(w, rq)
    fx, _ = _np_fake_quant(x, qx.scale, qx.zero_point, -128, 127)
    fw, _ = _np_fake_quant(w, qw.scale, qw.zero_point, -128, 127)
    float_conv = functools.partial(
        _conv_call, kw=kw, lhs_quant=None, rhs_quant=None, mode="simulate"
    )
    y, (gx, gw) = _conv(x, w, _hashable(kw), lq, rq)["int"]
    _close(y, float_conv(fx, fw))
    # STE: the gradient is the float conv's gradient evaluated at the fake-quantized operands
    ex, ew = _with_vjp(float_conv, fx, fw)[1]
    np.testing.assert_allclose(gx, ex, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, ew, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kw,group",
    [
        (dict(padding=((1, 1), (1, 1))), 1),
        (dict(padding=((0, 2), (1, 0)), window_strides=(2, 1), rhs_dilation=(1, 2)), 1),
        (dict(padding=((1, 1), (1, 1)), feature_group_count=2), 2),
    ],
)
@pytest.mark.parametrize("weight_zp", [False, True])
def test_conv_int_equals_onnxruntime_conv_integer(kw, group, weight_zp):
    """int mode == s_l s_r * ConvInteger(q_l - z_l, q_r - z_r): ORT pads with the zero point."""
    lq = QuantConfig(fmt=jq.uint8, symmetric=False)
    rq = QuantConfig(fmt=jq.uint8, symmetric=False) if weight_zp else QuantConfig(axis=0)
    x, w = _normal(17, (2, 4, 7, 6), shift=1.5), _normal(18, (6, 4 // group, 3, 3), shift=0.3)
    kw = dict(kw, dimension_numbers=("NCHW", "OIHW", "NCHW"))
    qx, qw = _qparams(x, lq), _qparams(w, rq)
    _, cx = _np_fake_quant(x, qx.scale, qx.zero_point, 0, 255)
    w_range = (0, 255) if weight_zp else (-128, 127)
    _, cw = _np_fake_quant(w, qw.scale, qw.zero_point, *w_range)
    assert 0 < float(qx.zero_point.reshape(())) < 255
    w_zp = np.asarray(qw.zero_point).reshape(-1)[:1]
    assert not weight_zp or 0 < w_zp[0] < 255
    (t, b), (left, right) = kw["padding"]
    node = helper.make_node(
        "ConvInteger",
        ["x", "w", "xz", "wz"] if weight_zp else ["x", "w", "xz"],
        ["y"],
        pads=[t, left, b, right],
        strides=list(kw.get("window_strides", (1, 1))),
        dilations=list(kw.get("rhs_dilation", (1, 1))),
        group=group,
    )
    w_type = (np.uint8, TensorProto.UINT8) if weight_zp else (np.int8, TensorProto.INT8)
    x_zp = np.array(qx.zero_point, np.uint8).reshape(())
    inputs = [cx.astype(np.uint8), cw.astype(w_type[0]), x_zp]
    types = [TensorProto.UINT8, w_type[1], TensorProto.UINT8]
    if weight_zp:
        inputs, types = inputs + [w_zp.astype(np.uint8).reshape(())], types + [w_type[1]]
    acc = _ort_run(node, inputs, types, TensorProto.INT32)
    s_w = np.asarray(qw.scale).reshape(1, -1, 1, 1)
    expected = (np.float32(qx.scale.reshape(())) * s_w) * acc.astype(np.float32)
    got = jax.jit(functools.partial(_conv_call, kw=kw, lhs_quant=lq, rhs_quant=rq, mode="int"))(
        x, w
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_conv_int_errors():
    x, w = jnp.ones((1, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    conv = functools.partial(ops.conv_general_dilated, x, w, (1, 1), "SAME", mode="int")
    conv = functools.partial(conv, dimension_numbers=NHWC)
    with pytest.raises(ValueError, match="without zero point"):
        conv(lhs_quant=SYM, rhs_quant=AFFINE, batch_group_count=2)
    with pytest.raises(ValueError, match="output-feature"):
        conv(lhs_quant=SYM, rhs_quant=QuantConfig(axis=2))
    with pytest.raises(ValueError, match="batch axis"):
        conv(lhs_quant=QuantConfig(axis=3), rhs_quant=SYM)


def _eqns(jaxpr):
    """Every equation of ``jaxpr`` and of the jaxprs nested in its parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, tuple | list) else (v,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    yield from _eqns(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    yield from _eqns(sub)


@pytest.mark.parametrize("op", ["dot_general", "conv_general_dilated", "conv1d"])
def test_int_mode_jaxpr_runs_int8_products_into_int32(op):
    if op == "dot_general":
        args = (jnp.ones((4, 8)), jnp.ones((8, 3)))
        fn = functools.partial(ops.dot_general, dimension_numbers=DENSE_DN)
    elif op == "conv1d":
        args = (jnp.ones((2, 13, 4)), jnp.ones((3, 4, 5)))
        fn = functools.partial(_conv_call, kw=CONV_CASES["conv1d_strided_affine"][2])
    else:
        args = (jnp.ones((1, 5, 5, 4)), jnp.ones((3, 3, 2, 6)))
        fn = functools.partial(_conv_call, kw=CONV_CASES["grouped"][2])
    fn = functools.partial(fn, lhs_quant=AFFINE, rhs_quant=PER_CHANNEL_LAST)
    for mode in ("int", "simulate"):
        products = [
            e
            for e in _eqns(jax.make_jaxpr(functools.partial(fn, mode=mode))(*args).jaxpr)
            if e.primitive.name
            == ("dot_general" if op == "dot_general" else "conv_general_dilated")
        ]
        assert products, mode
        int8 = [
            e
            for e in products
            if all(v.aval.dtype == jnp.int8 for v in e.invars)
            and e.params["preferred_element_type"] == jnp.int32
            and e.outvars[0].aval.dtype == jnp.int32
        ]
        # int: every product of the forward pass is int8 x int8 -> int32; simulate: none is
        assert len(int8) == (len(products) if mode == "int" else 0), mode
        if op == "conv1d" and mode == "int":  # lifted to 2-D for XLA:CPU's fast int8 kernel
            assert all(e.invars[0].aval.ndim == 4 for e in int8)


# --- Flax injection ---------------------------------------------------------------------------


def test_linen_dense_and_conv_injection():
    """int-mode ops injected into linen Dense / Conv give the ops' numbers, and gradients."""
    x = jnp.asarray(_normal(19, (2, 6, 6, 3), shift=0.3))
    dense = nn.Dense(5, dot_general=ops.quantized_dot_general(AFFINE, PER_CHANNEL_LAST, "int"))
    qconv = ops.quantized_conv_general_dilated(AFFINE, PER_CHANNEL_LAST, "int")
    conv = nn.Conv(4, (3, 3), conv_general_dilated=qconv)

    @jax.jit
    def run(x):
        vd = dense.init(jax.random.key(0), x)
        vc = conv.init(jax.random.key(1), x)
        kd, kc = vd["params"]["kernel"], vc["params"]["kernel"]
        ed = ops.dot_general(
            x, kd, (((3,), (0,)), ((), ())), lhs_quant=AFFINE, rhs_quant=PER_CHANNEL_LAST
        )
        ec = _conv_call(x, kc, dict(padding="SAME"), AFFINE, PER_CHANNEL_LAST, "simulate")
        grads = jax.grad(lambda v: jnp.sum(conv.apply(v, x) ** 2))(vc)
        return (
            (dense.apply(vd, x), ed + vd["params"]["bias"]),
            (conv.apply(vc, x), ec + vc["params"]["bias"]),
            grads["params"]["kernel"],
        )

    (yd, ed), (yc, ec), gk = run(x)
    _close(yd, ed)
    _close(yc, ec)
    assert np.abs(gk).sum() > 0


def test_nnx_linear_and_conv_injection():
    """int-mode ops injected into nnx.Conv (depthwise) / nnx.Linear, under nnx.jit (gradients
    through injected ops are checked with linen above)."""
    x = jnp.asarray(_normal(20, (2, 5, 5, 4)))
    rngs = nnx.Rngs(0)
    dw = ops.quantized_conv_general_dilated(SYM, PER_CHANNEL_LAST, "int")
    conv = nnx.Conv(4, 4, (3, 3), feature_group_count=4, conv_general_dilated=dw, rngs=rngs)
    lin = nnx.Linear(4, 3, dot_general=ops.quantized_dot_general(AFFINE, SYM, "int"), rngs=rngs)

    @nnx.jit
    def run(conv, lin, x):
        h = conv(x)
        kw = dict(padding="SAME", feature_group_count=4)
        eh = _conv_call(x, conv.kernel[...], kw, SYM, PER_CHANNEL_LAST, "simulate")
        dn = (((3,), (0,)), ((), ()))
        ez = ops.dot_general(h, lin.kernel[...], dn, lhs_quant=AFFINE, rhs_quant=SYM)
        return (h, eh + conv.bias[...]), (lin(h), ez + lin.bias[...])

    (h, eh), (z, ez) = run(conv, lin, x)
    _close(h, eh)
    _close(z, ez)
    assert z.shape == (2, 5, 5, 3)


# --- pooling ----------------------------------------------------------------------------------

POOL_CASES = ["avgpool2x2", "avgpool3x3_same_s1", "maxpool2x2", "maxpool3x3_same_s2"]


@functools.partial(jax.jit, static_argnames=("kind", "fmt", "window", "strides", "padding", "mode"))
def _pool(x, qp, kind, fmt, window, strides, padding, mode="simulate"):
    pool = ops.avg_pool if kind == "avg" else ops.max_pool
    return pool(x, qp, fmt, window, strides, padding, mode)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return dict(f)


@pytest.mark.parametrize("name", POOL_CASES)
def test_pool_matches_tflite_golden(golden, name):
    g = lambda k: golden[f"{name}/{k}"]
    x = g("x").reshape((-1, *g("x").shape[2:]))
    y = g("y_ref").reshape((-1, *g("y_ref").shape[2:]))
    qp = jq.QParams(g("input_scale").reshape(()), g("input_zp").reshape(()).astype(np.float32))
    pool = functools.partial(_pool, kind=name[:3])
    args = (tuple(g("cfg/pool_size")), tuple(g("cfg/strides")), str(g("cfg/padding")).upper())
    got = pool(x, qp, fmt=jq.int8, window=args[0], strides=args[1], padding=args[2], mode="int")
    assert got.dtype == jnp.int8
    np.testing.assert_array_equal(got, y)
    np.testing.assert_array_equal(y, g("y_xnn").reshape(y.shape))
    # simulate: float in (the dequantized input), float out, the same numbers
    xf = jq.dequantize(x, qp)
    sim = pool(xf, qp, fmt=jq.int8, window=args[0], strides=args[1], padding=args[2])
    np.testing.assert_array_equal(sim, jq.dequantize(y, qp))


def _np_tflite_avg_pool(q, k, stride, pad):
    """Reference: sum codes over the unpadded window, (acc +- n//2) / n truncated."""
    n_, h, w_, c = q.shape
    oh, ow = (
        (h + pad[0][0] + pad[0][1] - k) // stride + 1,
        (w_ + pad[1][0] + pad[1][1] - k) // stride + 1,
    )
    out = np.zeros((n_, oh, ow, c), np.int64)
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * stride - pad[0][0], j * stride - pad[1][0]
            rs = slice(max(r0, 0), min(r0 + k, h))
            cs = slice(max(c0, 0), min(c0 + k, w_))
            win = q[:, rs, cs, :].astype(np.int64)
            acc, cnt = win.sum((1, 2)), win.shape[1] * win.shape[2]
            num = np.where(acc > 0, acc + cnt // 2, acc - cnt // 2)
            out[:, i, j, :] = np.sign(num) * (np.abs(num) // cnt)  # C truncation
    return out


def test_avg_pool_rounds_half_away_over_valid_elements():
    q = np.random.default_rng(21).integers(-128, 128, (2, 5, 6, 3)).astype(np.int8)
    q[0, :2, :2, 0] = [[-3, -2], [-2, -2]]  # sum -9 over 4 -> -2.25 -> -2; ties exercised below
    q[1, :2, :2, 1] = [[1, 2], [1, 2]]  # 6 / 4 = 1.5 -> 2 (half away)
    q[1, :2, :2, 2] = [[-1, -2], [-1, -2]]  # -1.5 -> -2
    pad = ((1, 1), (0, 1))
    avg = functools.partial(_pool, kind="avg", fmt=jq.int8, mode="int")
    got = avg(q, jq.QParams(0.1, 3.0), window=(2, 2), strides=(2, 2), padding=pad)
    np.testing.assert_array_equal(got, _np_tflite_avg_pool(q, 2, 2, pad))
    got = avg(q, jq.QParams(0.1, 3.0), window=(3, 3), strides=(1, 1), padding="SAME")
    np.testing.assert_array_equal(got, _np_tflite_avg_pool(q, 3, 1, ((1, 1), (1, 1))))
    valid = avg(q, jq.QParams(0.1), window=(2, 2), strides=(2, 2), padding="VALID")
    assert valid[1, 0, 0, 1] == 2 and valid[1, 0, 0, 2] == -2


def test_pool_simulate_gradients_are_float_pool_gradients():
    x = jnp.asarray(_normal(22, (1, 4, 4, 2)))
    qp = jq.QParams(jnp.float32(0.05), jnp.float32(-3.0))
    g_avg = jax.jit(
        jax.grad(lambda v: jnp.sum(ops.avg_pool(v, qp, jq.int8, (3, 3), (1, 1), "SAME")))
    )(x)
    # d/dx of sum of window means: each x contributes 1/n of every window it is in
    ones = jnp.ones_like(x)
    dims, pads = (1, 3, 3, 1), ((0, 0), (1, 1), (1, 1), (0, 0))
    n = lax.reduce_window(ones, 0.0, lax.add, dims, (1,) * 4, pads)
    expected = lax.reduce_window(1.0 / n, 0.0, lax.add, dims, (1,) * 4, pads)
    np.testing.assert_allclose(g_avg, expected, rtol=1e-6)
    g_max = jax.jit(jax.grad(lambda v: jnp.sum(ops.max_pool(v, qp, jq.int8, (2, 2), (2, 2)))))(x)
    winners = x.reshape(1, 2, 2, 2, 2, 2).max((2, 4), keepdims=True) == x.reshape(1, 2, 2, 2, 2, 2)
    np.testing.assert_array_equal(g_max, winners.reshape(x.shape).astype(np.float32))


def test_pool_errors():
    qp = jq.QParams(0.1)
    with pytest.raises(TypeError, match="integer"):
        ops.avg_pool(jnp.ones((1, 4, 4, 1)), qp, jq.int8, (2, 2), mode="int")
    with pytest.raises(ValueError, match="window"):
        ops.max_pool(jnp.ones((4, 4, 1)), qp, jq.int8, (2, 2))
    with pytest.raises(ValueError, match="smaller than the window"):
        ops.avg_pool(jnp.ones((1, 5, 5, 1)), qp, jq.int8, (2, 2), (2, 2), ((2, 0), (0, 0)))
    with pytest.raises(ValueError, match="IntFormat"):
        ops.max_pool(jnp.ones((1, 4, 4, 1)), qp, jq.fp8_e4m3, (2, 2))


# --- traced bits in a QuantConfig (sweeps) ----------------------------------------------------


def test_quant_config_is_a_pytree_with_traced_bits_in_simulate_mode():
    cfg = QuantConfig(jq.IntFormat(4), symmetric=False, axis=-1, estimator="clipped_ste")
    leaves, treedef = jax.tree_util.tree_flatten(cfg)
    assert leaves == [4] and jax.tree_util.tree_unflatten(treedef, leaves) == cfg
    lhs, rhs = jnp.asarray(_normal(40, (3, 5))), jnp.asarray(_normal(41, (5, 4)))
    dn = (((1,), (0,)), ((), ()))

    def product(c, l_, r_):  # the config crosses jit as an argument, bits as its leaf
        return ops.dot_general(l_, r_, dn, lhs_quant=c, rhs_quant=c)

    swept = jax.jit(jax.vmap(product, in_axes=(0, None, None)))(
        QuantConfig(jq.IntFormat(jnp.array([2, 5, 8])), symmetric=False, axis=-1), lhs, rhs
    )
    for i, b in enumerate((2, 5, 8)):  # oracle: each width on its own, static config
        static = QuantConfig(jq.IntFormat(b), symmetric=False, axis=-1)
        want = ops.dot_general(lhs, rhs, dn, lhs_quant=static, rhs_quant=static)
        np.testing.assert_allclose(swept[i], want, rtol=1e-6, atol=1e-6)


def test_traced_bits_in_int_mode_raise():
    lhs, rhs = jnp.ones((2, 3)), jnp.ones((3, 2))
    dn = (((1,), (0,)), ((), ()))

    def run(b):
        cfg = QuantConfig(jq.IntFormat(b))
        return ops.dot_general(lhs, rhs, dn, lhs_quant=cfg, rhs_quant=cfg, mode="int")

    with pytest.raises(ValueError, match="static bit width.*mode='simulate'"):
        jax.jit(run)(jnp.int32(8))
    np.testing.assert_allclose(run(8), lhs @ rhs, rtol=0.02)  # static bits still run in int


# --- AQT's int8 conv (optional bench extra) ---------------------------------------------------


def test_aqt_conv_gradients_are_zero_and_jquant_gives_the_ste_gradient():
    """AQT's int8 conv (``aqt.jax.v2.aqt_conv_general``) has no custom VJP, so its gradient
    goes through ``round`` and the stop-gradient'ed scale: zero w.r.t. both operands. With AQT's
    granularity (symmetric int8, lhs per example, rhs per output channel) jquant's conv gives
    the float conv's gradient at the fake-quantized operands (STE)."""
    from aqt.jax.v2 import aqt_conv_general as aqt_conv  # a test dependency: never skipped

    x, w = _normal(50, (2, 6, 6, 4), shift=0.5), _normal(51, (3, 3, 4, 8), scale=0.3)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    aqt = aqt_conv.make_conv_general_dilated(aqt_conv.conv_general_dilated_make(2, 8, 8))
    y_aqt, (gx_aqt, gw_aqt) = _with_vjp(
        lambda a, b: aqt(a, b, (1, 1), "SAME", dimension_numbers=dn), x, w
    )
    kw = _hashable(dict(padding="SAME"))
    lq, rq = QuantConfig(axis=0), PER_CHANNEL_LAST
    out = _conv(x, w, kw, lq, rq)
    (y, (gx, gw)), ref = out["int"], out["float"]
    # a real int8 conv (its scale is max|x| / 127.5, jquant's max|x| / 127: not equal numbers)
    assert not np.allclose(y_aqt, ref, rtol=1e-4)
    np.testing.assert_allclose(y_aqt, ref, atol=0.02 * np.abs(ref).max())
    np.testing.assert_allclose(y, ref, atol=0.02 * np.abs(ref).max())
    assert not np.any(gx_aqt) and not np.any(gw_aqt)
    qx, qw = _qparams(x, lq), _qparams(w, rq)
    fx, _ = _np_fake_quant(x, qx.scale, qx.zero_point, -128, 127)
    fw, _ = _np_fake_quant(w, qw.scale, qw.zero_point, -128, 127)
    float_conv = functools.partial(
        _conv_call, kw=kw, lhs_quant=None, rhs_quant=None, mode="simulate"
    )
    ex, ew = _with_vjp(float_conv, fx, fw)[1]
    assert np.abs(gx).sum() > 0 and np.abs(gw).sum() > 0
    np.testing.assert_allclose(gx, ex, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(gw, ew, rtol=1e-4, atol=1e-5)


# --- overflow and NaN (issue #12) -------------------------------------------------------------


def _ones_dot(k, accumulator="int32", lhs=SYM):
    x, w = jnp.ones((1, k), jnp.float32), jnp.ones((k, 1), jnp.float32)
    return ops.dot_general(
        x, w, DENSE_DN, lhs_quant=lhs, rhs_quant=SYM, mode="int", accumulator=accumulator
    )


def test_int_mode_refuses_a_contraction_that_may_overflow_int32():
    k = 2**17 + 4096  # the reduction: int32 wraps to -131120.5 without the check
    with pytest.raises(ValueError, match=rf"int32 accumulator may overflow.*K = {k}"):
        _ones_dot(k)
    # the bound from the formats: 128 * 128 * K for symmetric int8, 255 * 128 * K with a zero
    # point (checked at trace time: eval_shape traces without running)
    jax.eval_shape(lambda: _ones_dot(2**17 - 1))
    with pytest.raises(ValueError, match="accumulator='int32_wrap'"):
        jax.eval_shape(lambda: _ones_dot(2**17))
    jax.eval_shape(lambda: _ones_dot(65793, lhs=AFFINE))
    with pytest.raises(ValueError, match="overflow"):
        jax.eval_shape(lambda: _ones_dot(65794, lhs=AFFINE))
    lhs, rhs = jnp.ones((1, 140_000, 1, 1)), jnp.ones((1, 140_000, 1, 1))  # NCHW, OIHW: K = C
    with pytest.raises(ValueError, match="K = 140000"):
        ops.conv_general_dilated(
            lhs, rhs, (1, 1), "VALID", lhs_quant=SYM, rhs_quant=SYM, mode="int"
        )
    with pytest.raises(ValueError, match="accumulator must be one of"):
        _ones_dot(4, accumulator="int64")
    with pytest.raises(ValueError, match="accumulator must be one of"):
        ops.quantized_dot_general(SYM, SYM, "int", accumulator="wrap")


def test_int32_wrap_opts_into_modular_arithmetic():
    k = 2**17 + 4096
    got = float(_ones_dot(k, accumulator="int32_wrap")[0, 0])
    acc = (127 * 127 * k + 2**31) % 2**32 - 2**31  # two's complement int32 of the exact sum
    np.testing.assert_allclose(got, np.float32(acc) / np.float32(127) ** 2, rtol=1e-6)
    # below the bound the result is exact: K ones
    np.testing.assert_allclose(float(_ones_dot(2**17 - 1)[0, 0]), 2**17 - 1, rtol=1e-6)


def test_convert_and_ops_share_the_int32_bound():
    from jquant.integer import checks

    w = np.full((10_000, 1), 127, np.int8)
    bound = 255 * 127 * 10_000
    assert int(checks.accumulator_bound(w)[0]) == bound
    assert bound == checks.product_bound(
        10_000, checks.centered_code_bound(jq.int8, zero_point=True), 127
    )
    with pytest.raises(ValueError, match="int32 accumulator may overflow"):
        checks.check_accumulator(np.full((70_000, 1), 127, np.int8))


_dot_jit = jax.jit(
    ops.dot_general,
    static_argnames=("dimension_numbers", "lhs_quant", "rhs_quant", "mode"),
)


def _float_nan_mask(lhs, rhs):
    return np.isnan(np.asarray(lhs, np.float64) @ np.asarray(rhs, np.float64))


@pytest.mark.parametrize("mode", ops.MODES)
@pytest.mark.parametrize("given", [False, True])
def test_nan_in_one_row_gives_nan_in_that_row_only(mode, given):
    lhs, rhs = _normal(0, (4, 6)), _normal(1, (6, 3))
    bad = lhs.copy()
    bad[1, 2] = np.nan
    per_row = QuantConfig(axis=0)
    qp = ops.dynamic_qparams(jnp.asarray(lhs), per_row) if given else None
    kw = dict(lhs_quant=per_row, rhs_quant=SYM, mode=mode, lhs_qparams=qp)
    out = np.asarray(_dot_jit(bad, rhs, DENSE_DN, **kw))
    ref = np.asarray(_dot_jit(lhs, rhs, DENSE_DN, **kw))
    np.testing.assert_array_equal(np.isnan(out), _float_nan_mask(bad, rhs))
    keep = np.arange(4) != 1
    np.testing.assert_array_equal(out[keep], ref[keep])  # other rows untouched
    # per-tensor dynamic: the NaN is in the one range, so every output is NaN (documented)
    out = np.asarray(_dot_jit(bad, rhs, DENSE_DN, lhs_quant=SYM, rhs_quant=SYM, mode=mode))
    assert np.all(np.isnan(out))


@pytest.mark.parametrize("mode", ops.MODES)
def test_nan_or_inf_weight_gives_nan_in_its_column(mode):
    lhs, rhs = _normal(0, (4, 6)), _normal(1, (6, 3))
    for v in (np.nan, np.inf):
        bad = rhs.copy()
        bad[3, 2] = v
        out = np.asarray(
            _dot_jit(lhs, bad, DENSE_DN, lhs_quant=SYM, rhs_quant=PER_CHANNEL_LAST, mode=mode)
        )
        np.testing.assert_array_equal(np.isnan(out), np.tile([False, False, True], (4, 1)))


@pytest.mark.parametrize("mode", ops.MODES)
def test_nan_in_a_conv_input_gives_nan_in_the_windows_that_hold_it(mode):
    lhs, rhs = _normal(2, (2, 5, 5, 4)), _normal(3, (3, 3, 2, 6))  # 2 feature groups
    bad = lhs.copy()
    bad[0, 0, 4, 3] = np.nan  # a corner pixel, in group 1 (channels 2, 3)
    qp = ops.dynamic_qparams(jnp.asarray(lhs), AFFINE)
    kw = dict(
        lhs_quant=AFFINE,
        rhs_quant=PER_CHANNEL_LAST,
        lhs_qparams=qp,
        mode=mode,
        feature_group_count=2,
        dimension_numbers=NHWC,
    )
    conv = jax.jit(
        functools.partial(ops.conv_general_dilated, window_strides=(1, 1), **kw),
        static_argnames="padding",
    )
    out = np.asarray(conv(bad, rhs, padding="SAME"))
    ref = np.asarray(conv(lhs, rhs, padding="SAME"))
    want = np.isnan(
        np.asarray(
            lax.conv_general_dilated(
                bad, rhs, (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2
            )
        )
    )
    assert want.any() and not want.all()
    np.testing.assert_array_equal(np.isnan(out), want)
    np.testing.assert_array_equal(out[~want], ref[~want])


@pytest.mark.parametrize("pool", [ops.avg_pool, ops.max_pool])
def test_nan_in_simulated_pooling_stays_in_its_windows(pool):
    x = _normal(4, (1, 4, 4, 2))
    x[0, 0, 0, 1] = np.nan
    qp = jq.QParams(0.05, 3.0)
    out = np.asarray(jax.jit(lambda v: pool(v, qp, jq.int8, (2, 2), (1, 1)))(x))
    want = np.zeros((1, 3, 3, 2), bool)
    want[0, 0, 0, 1] = True
    np.testing.assert_array_equal(np.isnan(out), want)


def test_quantized_operands_must_be_float():
    i = jnp.ones((2, 3), jnp.int32)
    f = jnp.ones((3, 2), jnp.float32)
    for mode in ops.MODES:
        with pytest.raises(TypeError, match="lhs is quantized.*int32"):
            ops.dot_general(i, f, DENSE_DN, lhs_quant=SYM, rhs_quant=SYM, mode=mode)
        with pytest.raises(TypeError, match="rhs is quantized.*complex64"):
            ops.dot_general(
                f.T, f.astype(jnp.complex64), DENSE_DN, lhs_quant=SYM, rhs_quant=SYM, mode=mode
            )
    with pytest.raises(TypeError, match="lhs is quantized"):
        ops.conv_general_dilated(
            jnp.ones((1, 3, 3, 1), jnp.int8),
            jnp.ones((1, 1, 1, 1)),
            (1, 1),
            "VALID",
            dimension_numbers=NHWC,
            lhs_quant=SYM,
            rhs_quant=SYM,
            mode="int",
        )
