"""Quantized training: backward products against plain-lax references on explicitly
quantized operands, int8 bit for bit, stochastic rounding statistics, delayed scaling."""

from __future__ import annotations

import dataclasses

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

from jquant import ops
from jquant.formats import fp8_e4m3, fp8_e5m2, int4, int8
from jquant.nn import linen as ql
from jquant.nn import nnx as qn
from jquant.nn.rules import QuantRule
from jquant.ops import BackwardConfig, QuantConfig
from jquant.ops.conv import int8_conv
from jquant.ops.scaling import current_scaling, delayed_scaling
from jquant.quant import dynamic_qparams, fake_quant_forward, quantize, stochastic_noise

Q8 = QuantConfig(int8)
slow = pytest.mark.slow
DENSE_DN = (((1,), (0,)), ((), ()))


def _rand(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _fq(x, cfg, rounding=None, key=None):
    """Explicit fake quantization with dynamic QParams (the reference's quantizer)."""
    rounding = rounding or cfg.rounding
    noise = stochastic_noise(key, x.shape) if rounding == "stochastic" else None
    return fake_quant_forward(x, dynamic_qparams(x, cfg), cfg.fmt, rounding, noise)


def _codes(x, cfg, rounding=None, key=None):
    qp = dynamic_qparams(x, cfg)
    q = quantize(x, qp, cfg.fmt, rounding=rounding or cfg.rounding, key=key)
    return q.astype(jnp.float32), qp.scale


# --- dense --------------------------------------------------------------------------------------


def test_dense_backward_products():
    x, w, g = _rand(0, (5, 7)), _rand(1, (7, 3)), _rand(2, (5, 3))
    runs = {
        "nearest": (BackwardConfig.uniform(Q8, Q8), "simulate"),
        "stochastic": (BackwardConfig.uniform(Q8, Q8, "stochastic"), "simulate"),
        "int": (BackwardConfig.uniform(Q8, Q8), "int"),
    }

    def f(x, w, bwd, mode, key):
        return ops.train_dot_general(
            x, w, DENSE_DN, lhs_quant=Q8, rhs_quant=Q8, bwd=bwd, mode=mode, key=key
        )

    @jax.jit  # one compile for the three runs and their references
    def compute(x, w, g, key):
        out = {}
        for name, (bwd, mode) in runs.items():
            y, vjp = jax.vjp(lambda x, w, bwd=bwd, mode=mode: f(x, w, bwd, mode, key), x, w)
            out[name] = (y, *vjp(g))
        # references: plain matmuls on explicitly quantized operands (same keys, split once)
        xh, wh = _fq(x, Q8), _fq(w, Q8)
        k_l, k_r = jax.random.split(key)
        ref = {
            "nearest": (xh @ wh, _fq(g, Q8) @ _fq(wh, Q8).T, _fq(xh, Q8).T @ _fq(g, Q8)),
            "stochastic": (
                xh @ wh,
                _fq(g, Q8, "stochastic", k_l) @ _fq(wh, Q8).T,
                _fq(xh, Q8).T @ _fq(g, Q8, "stochastic", k_r),
            ),
        }
        # int: s_g s_o times integer matmuls of the codes (exact in float32 at these sizes)
        (qg, sg), (qw, sw), (qx, sx) = _codes(g, Q8), _codes(wh, Q8), _codes(xh, Q8)
        ref["int"] = (xh @ wh, (sg * sw) * (qg @ qw.T), (sx * sg) * (qx.T @ qg))
        return out, ref, xh.T @ g

    out, ref, dw_float_grad = compute(x, w, g, jax.random.key(7))
    for name in runs:
        np.testing.assert_allclose(out[name][0], ref[name][0], rtol=1e-5, atol=1e-5)
        if name == "int":  # bit for bit
            np.testing.assert_array_equal(out[name][1], ref[name][1])
            np.testing.assert_array_equal(out[name][2], ref[name][2])
        else:
            np.testing.assert_allclose(out[name][1], ref[name][1], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(out[name][2], ref[name][2], rtol=1e-5, atol=1e-6)
        # the gradient really is quantized: differs from the float-gradient backward
        assert not np.allclose(out[name][2], dw_float_grad, rtol=1e-6, atol=1e-7)
    assert not np.array_equal(out["stochastic"][2], out["nearest"][2])
    # forward + the two backward products, each int8 x int8 -> int32
    jaxpr = jax.make_jaxpr(
        lambda x, w: jax.vjp(lambda x, w: f(x, w, *runs["int"], None), x, w)[1](g)
    )(x, w)
    products = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    products += [
        e
        for eqn in jaxpr.eqns
        for sub in jax.core.jaxprs_in_params(eqn.params)
        for e in sub.eqns
        if e.primitive.name == "dot_general"
    ]
    int8_products = [
        e
        for e in products
        if [v.aval.dtype for v in e.invars] == [jnp.int8] * 2
        and e.outvars[0].aval.dtype == jnp.int32
    ]
    assert len(int8_products) == 3, str(jaxpr)


def test_batched_dot_general_and_einsum_backward():
    # "bij,bjk->bik" as dot_general with a batch axis
    dn = (((2,), (1,)), ((0,), (0,)))
    x, w, g = _rand(6, (2, 3, 4)), _rand(7, (2, 4, 5)), _rand(8, (2, 3, 5))
    cfg = QuantConfig(int8, axis=0)  # per batch element: allowed in simulate
    bwd = BackwardConfig.uniform(cfg, cfg)
    f = lambda x, w: ops.train_dot_general(x, w, dn, lhs_quant=cfg, rhs_quant=cfg, bwd=bwd)  # noqa: E731

    @jax.jit
    def compute(x, w, g):
        xh, wh, gq = _fq(x, cfg), _fq(w, cfg), _fq(g, cfg)
        ref = (
            jnp.einsum("bik,bjk->bij", gq, _fq(wh, cfg)),
            jnp.einsum("bij,bik->bjk", _fq(xh, cfg), gq),
        )
        return jax.vjp(f, x, w)[1](g), ref

    (dx, dw), (dx_ref, dw_ref) = compute(x, w, g)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-6)


def test_float_backward_matches_finite_differences():
    # no quantization anywhere: the custom vjp must be the exact derivative
    x, w = _rand(9, (3, 4)), _rand(10, (4, 2))
    f = lambda x, w: ops.train_dot_general(x, w, DENSE_DN)  # noqa: E731
    check_grads(f, (x, w), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    lhs, rhs = _rand(11, (1, 6, 2)), _rand(12, (3, 2, 2))
    c = lambda a, b: ops.train_conv_general_dilated(
        a, b, (2,), "SAME", None, (2,), ("NWC", "WIO", "NWC")
    )  # noqa: E731
    check_grads(c, (lhs, rhs), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)


# --- conv ---------------------------------------------------------------------------------------

CONV_CASES = {
    "1d": dict(lhs=(2, 9, 3), rhs=(3, 3, 4), window_strides=(1,), padding="SAME",
               dn=("NWC", "WIO", "NWC")),
    "2d_strided_dilated": dict(
        lhs=(2, 7, 6, 3), rhs=(3, 2, 3, 4), window_strides=(2, 1), padding=((1, 2), (0, 1)),
        lhs_dilation=(1, 2), rhs_dilation=(2, 1), dn=("NHWC", "HWIO", "NHWC"),
    ),
    "2d_grouped_nchw": dict(
        lhs=(2, 4, 5, 5), rhs=(6, 2, 3, 3), window_strides=(1, 2), padding="VALID",
        dn=("NCHW", "OIHW", "NCHW"), feature_group_count=2,
    ),
    "2d_depthwise": dict(
        lhs=(1, 5, 5, 3), rhs=(3, 3, 1, 3), window_strides=(1, 1), padding="SAME",
        dn=("NHWC", "HWIO", "NHWC"), feature_group_count=3,
    ),
    "3d": dict(lhs=(1, 4, 4, 4, 2), rhs=(2, 2, 2, 2, 3), window_strides=(1, 2, 1), padding="VALID",
               dn=("NDHWC", "DHWIO", "NDHWC")),
}  # fmt: skip


def _conv_setup(case):
    c = dict(CONV_CASES[case])
    lhs, rhs = _rand(20, c.pop("lhs")), _rand(21, c.pop("rhs"))
    c["dimension_numbers"] = c.pop("dn")
    return lhs, rhs, c


def _float_conv_vjp(lhs, rhs, g, kw):
    return jax.vjp(lambda a, b: lax.conv_general_dilated(a, b, **kw), lhs, rhs)[1](g)


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(c, marks=() if c in ("2d_strided_dilated", "2d_grouped_nchw") else slow)
        for c in CONV_CASES
    ],
)
def test_conv_backward_products(case):
    lhs, rhs, kw = _conv_setup(case)
    bwd = BackwardConfig.uniform(Q8, Q8)
    y_shape = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, **kw), lhs, rhs).shape
    g = _rand(22, y_shape)

    @jax.jit  # one compile per case
    def compute(lhs, rhs, g):
        outs = {}
        for mode in ("simulate", "int"):
            f = lambda a, b, mode=mode: ops.train_conv_general_dilated(  # noqa: E731
                a, b, **kw, lhs_quant=Q8, rhs_quant=Q8, bwd=bwd, mode=mode
            )
            outs[mode] = jax.vjp(f, lhs, rhs)[1](g)
        lh, rh = _fq(lhs, Q8), _fq(rhs, Q8)
        # simulate: the float conv's vjp (the transposed and kernel-gradient convs) on
        # quantized operands
        gq = _fq(g, Q8)
        ref = (
            _float_conv_vjp(lh, _fq(rh, Q8), gq, kw)[0],
            _float_conv_vjp(_fq(lh, Q8), rh, gq, kw)[1],
        )
        # int: s_g s_o times the integer convs of the codes (exact in float32 at these sizes)
        qg, sg = _codes(g, Q8)
        qr, sr = _codes(rh, Q8)
        ql, sl = _codes(lh, Q8)
        dl_int, dr_int = _float_conv_vjp(ql, qr, qg, kw)
        return outs, ref, ((sg * sr) * dl_int, (sl * sg) * dr_int)

    outs, ref, ref_int = compute(lhs, rhs, g)
    np.testing.assert_allclose(outs["simulate"][0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs["simulate"][1], ref[1], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(outs["int"][0], ref_int[0])  # bit for bit
    np.testing.assert_array_equal(outs["int"][1], ref_int[1])


def _int8_convs(jaxpr) -> list:
    """The int8 x int8 -> int32 conv equations of ``jaxpr`` and of its sub-jaxprs."""
    found = []
    for eqn in jaxpr.eqns:
        if (
            eqn.primitive.name == "conv_general_dilated"
            and [v.aval.dtype for v in eqn.invars] == [jnp.int8] * 2
        ):
            assert eqn.outvars[0].aval.dtype == jnp.int32
            found.append(eqn)
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _int8_convs(sub)
    return found


def test_conv1d_int_backward_lifted_to_2d():
    # mode="int" runs a 1-D conv's backward int8 convs (the transposed conv, here with input
    # dilation 2, and the grouped kernel-gradient conv) lifted to 2-D channels-last, as the
    # forward: the same integers as plain lax's 1-D convs of the codes, bit for bit
    kw = dict(
        window_strides=(2,), padding=((2, 1),), rhs_dilation=(2,),
        dimension_numbers=("NCW", "OIW", "NCW"), feature_group_count=2,
    )  # fmt: skip
    lhs, rhs = _rand(23, (2, 4, 11)), _rand(24, (6, 2, 3))
    bwd = BackwardConfig.uniform(Q8, Q8)
    f = lambda a, b: ops.train_conv_general_dilated(  # noqa: E731
        a, b, **kw, lhs_quant=Q8, rhs_quant=Q8, bwd=bwd, mode="int"
    )
    g = _rand(25, jax.eval_shape(f, lhs, rhs).shape)

    def compute(lhs, rhs, g):
        lh, rh = _fq(lhs, Q8), _fq(rhs, Q8)
        (qg, sg), (qr, sr), (ql, sl) = _codes(g, Q8), _codes(rh, Q8), _codes(lh, Q8)
        dl_int, dr_int = _float_conv_vjp(ql, qr, qg, kw)  # 1-D float convs of the codes
        return jax.vjp(f, lhs, rhs)[1](g), ((sg * sr) * dl_int, (sl * sg) * dr_int)

    (dl, dr), (dl_ref, dr_ref) = jax.jit(compute)(lhs, rhs, g)
    np.testing.assert_array_equal(dl, dl_ref)
    np.testing.assert_array_equal(dr, dr_ref)
    assert np.any(dl != 0) and np.any(dr != 0)
    # forward and both backward products: int8 x int8 -> int32 convs, all of them 2-D
    jaxpr = jax.make_jaxpr(lambda a, b: jax.vjp(f, a, b)[1](g))(lhs, rhs).jaxpr
    convs = _int8_convs(jaxpr)
    assert len(convs) >= 3, str(jaxpr)
    assert all(v.aval.ndim == 4 for e in convs for v in e.invars), str(jaxpr)
    assert {e.params["dimension_numbers"].lhs_spec for e in convs} == {(0, 3, 1, 2)}
    with pytest.raises(TypeError, match="int8_conv needs int8 lhs and rhs, got float32"):
        int8_conv(lhs, rhs, (1,), "VALID", dimension_numbers=kw["dimension_numbers"])


# --- stochastic rounding ------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", [QuantConfig(int8), QuantConfig(fp8_e5m2)], ids=["int8", "e5m2"])
def test_stochastic_rounding_unbiased(cfg):
    # dL/dw = eye^T Q(g) = Q(g): the quantized gradient itself, drawn with many keys
    g = _rand(30, (8, 8)) * 1e-3
    eye = jnp.eye(8)
    bwd = BackwardConfig(drhs_grad=cfg, grad_rounding="stochastic")

    def dw(key):
        f = lambda w: ops.train_dot_general(eye, w, DENSE_DN, bwd=bwd, key=key)  # noqa: E731
        return jax.vjp(f, jnp.zeros((8, 8)))[1](g)[0]

    n = 4000
    draws = jax.jit(jax.vmap(dw))(jax.random.split(jax.random.key(0), n))
    # the two grid neighbours of each g: floor / ceil on the grid
    qp = dynamic_qparams(g, cfg)
    lo = fake_quant_forward(g, qp, cfg.fmt, "floor")
    hi_all = jnp.max(draws, 0)
    assert bool(jnp.all((draws == lo) | (draws == hi_all)))  # only the two neighbours
    step = jnp.where(hi_all > lo, hi_all - lo, 1.0)
    err = draws - g
    # unbiased: |mean - g| within 5 standard errors of a draw (std <= step / 2)
    assert bool(jnp.all(jnp.abs(err.mean(0)) <= 5 * step / 2 / np.sqrt(n)))
    # variance of the rounding error p (1 - p) step^2 <= step^2 / 4
    assert bool(jnp.all(err.var(0) <= step**2 / 4 * 1.05))
    # nearest rounding is deterministic and biased on the same values
    near = fake_quant_forward(g, qp, cfg.fmt, "nearest_even")
    assert float(jnp.abs(near - g).mean()) > 10 * float(jnp.abs(err.mean(0)).mean())


def test_fp8_gradient_matches_ml_dtypes():
    g = _rand(31, (8, 8)) * 1e-2
    eye = jnp.eye(8)
    bwd = BackwardConfig(drhs_grad=QuantConfig(fp8_e5m2))
    f = lambda w: ops.train_dot_general(eye, w, DENSE_DN, bwd=bwd)  # noqa: E731
    dw = jax.jit(lambda g: jax.vjp(f, jnp.zeros((8, 8)))[1](g)[0])(g)
    s = np.float32(np.max(np.abs(np.asarray(g)))) / np.float32(57344.0)
    ref = (np.asarray(g) / s).astype(ml_dtypes.float8_e5m2).astype(np.float32) * s
    np.testing.assert_array_equal(dw, ref)


# --- delayed scaling ----------------------------------------------------------------------------


def test_delayed_scaling_matches_transformer_engine_formula():
    ds = delayed_scaling(history_len=3, margin=1)
    st = ds.init()
    amaxes = [2.0, 7.0, 1.0, 0.5, 0.25]
    hist = []
    for a in amaxes:
        st = ds.update(st, a)
        hist = ([a] + hist)[:3]
        np.testing.assert_array_equal(st.history, np.pad(hist, (0, 3 - len(hist))))
        te_scale = fp8_e4m3.max / max(hist) / 2**1  # TE multiplies by its scale
        assert float(ds.qparams(st, fp8_e4m3).scale) == pytest.approx(1 / te_scale, rel=1e-7)
    assert float(ds.qparams(ds.init(), fp8_e4m3).scale) == 1.0
    assert float(current_scaling(jnp.array([-3.0, 1.0]), fp8_e5m2).scale) == pytest.approx(
        3.0 / 57344.0
    )


def test_grad_amax_sink_and_given_grad_qparams():
    x, w = _rand(40, (4, 6)), _rand(41, (6, 5))
    c = _rand(42, (4, 5))
    ds = delayed_scaling(history_len=4)
    e5m2 = QuantConfig(dataclasses.replace(fp8_e5m2, saturate=True))
    st = ds.update(ds.init(), 0.5)  # last step's gradient amax

    def loss(x, w, sink):
        y = ops.train_dot_general(
            x, w, DENSE_DN, bwd=BackwardConfig.uniform(e5m2),
            grad_qparams=ds.qparams(st, e5m2.fmt), grad_amax_sink=sink,
        )  # fmt: skip
        return jnp.sum(c * y)

    dx, dw, amax = jax.jit(jax.grad(loss, (0, 1, 2)))(x, w, jnp.float32(0.0))
    assert float(amax) == pytest.approx(float(jnp.max(jnp.abs(c))))  # g = c
    qp = ds.qparams(st, e5m2.fmt)
    gq = fake_quant_forward(c, qp, e5m2.fmt)  # the delayed scale, saturating
    np.testing.assert_allclose(dw, x.T @ gq, rtol=1e-6)
    np.testing.assert_allclose(dx, gq @ w.T, rtol=1e-6)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input():
    x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    sr = BackwardConfig.uniform(Q8, Q8, "stochastic")
    with pytest.raises(ValueError, match="stochastic.*needs key"):
        ops.train_dot_general(x, w, DENSE_DN, lhs_quant=Q8, rhs_quant=Q8, bwd=sr)
    fp8 = BackwardConfig.uniform(QuantConfig(fp8_e5m2), Q8)
    with pytest.raises(ValueError, match=r"mode='int'.*bwd.dlhs_grad"):
        ops.train_dot_general(x, w, DENSE_DN, lhs_quant=Q8, rhs_quant=Q8, bwd=fp8, mode="int")
    per_ch = BackwardConfig.uniform(Q8, QuantConfig(int8, axis=1))
    with pytest.raises(ValueError, match=r"bwd.dlhs_rhs.*per-tensor"):
        ops.train_dot_general(x, w, DENSE_DN, lhs_quant=Q8, rhs_quant=Q8, bwd=per_ch, mode="int")
    # a backward contraction of K = 2^17 terms (the batch, in dL/dW) may overflow int32
    xb, gb = jnp.ones((1 << 17, 1)), jnp.ones((1 << 17, 1))
    big = lambda w, acc: ops.train_dot_general(  # noqa: E731
        xb, w, DENSE_DN, lhs_quant=Q8, rhs_quant=Q8, bwd=BackwardConfig.uniform(Q8, Q8),
        mode="int", accumulator=acc,
    )  # fmt: skip
    with pytest.raises(ValueError, match="int32_wrap"):
        jax.eval_shape(lambda w: jax.vjp(lambda w: big(w, "int32"), w)[1](gb), jnp.ones((1, 1)))
    jax.eval_shape(lambda w: jax.vjp(lambda w: big(w, "int32_wrap"), w)[1](gb), jnp.ones((1, 1)))
    with pytest.raises(ValueError, match="grad_rounding must be one of"):
        BackwardConfig(grad_rounding="nearest")
    with pytest.raises(TypeError, match="dlhs_grad must be a jquant.QuantConfig"):
        BackwardConfig(dlhs_grad=int4)
    for h in (0, -1, 1.5):
        with pytest.raises(ValueError, match="history_len must be an int >= 1"):
            delayed_scaling(history_len=h)
    with pytest.raises(ValueError, match="margin"):
        delayed_scaling(margin=-1)


# --- rules and layers ---------------------------------------------------------------------------


def _layer_rule(rounding):
    return QuantRule(".*", act_scale="dynamic_per_tensor", grad="int8", grad_rounding=rounding)


def _kernel_grad_oracle(x, c):
    """dL/dkernel of ``sum(c * (fq(x) @ fq(W)))`` with an int8 gradient: ``fq(x)^T Q(c)``."""
    act = _layer_rule("nearest_even").act_config()
    return _fq(x, act).T @ _fq(c, Q8)


def test_rule_backward_config_and_linen_layer():
    assert QuantRule(".*").backward_config() is None
    cfg = QuantRule(".*", grad="fp8_e5m2", grad_rounding="stochastic").backward_config()
    assert cfg.drhs_grad.fmt.name == "fp8_e5m2" and cfg.stochastic
    with pytest.raises(ValueError, match="QuantRule.grad_rounding must be one of"):
        QuantRule(".*", grad="int8", grad_rounding="up")
    with pytest.raises(ValueError, match="QuantRule.grad_operands must be set"):
        QuantRule(".*", grad="int8", mode="int")
    x, c = _rand(50, (4, 5)), _rand(51, (4, 3))
    layer = ql.QDense(3, rule=_layer_rule("nearest_even"), phase="train")
    variables = layer.init(jax.random.key(0), x)
    params = variables["params"]

    def grad_of(layer, **kw):
        v = lambda p: {**variables, "params": p}  # noqa: E731
        f = lambda p: jnp.sum(c * layer.apply(v(p), x, mutable=["quant_stats"], **kw)[0])  # noqa: E731
        return jax.jit(jax.grad(f))(params)["kernel"]

    np.testing.assert_allclose(grad_of(layer), _kernel_grad_oracle(x, c), rtol=1e-5, atol=1e-6)
    sr = layer.clone(rule=_layer_rule("stochastic"))
    a, b = (grad_of(sr, rngs={"quant": jax.random.key(k)}) for k in (1, 2))
    assert not np.array_equal(a, b)  # the stream's key draws the rounding
    np.testing.assert_array_equal(a, grad_of(sr, rngs={"quant": jax.random.key(1)}))
    with pytest.raises(ValueError, match="rngs=\\{'quant': key\\}"):
        grad_of(sr)


def test_nnx_layer_quantized_gradient():
    x, c = _rand(52, (4, 5)), _rand(53, (4, 3))
    layer = qn.QLinear(5, 3, rule=_layer_rule("nearest_even"), phase="train", rngs=nnx.Rngs(0))
    grads = nnx.grad(lambda m: jnp.sum(c * m(x)))(layer)
    np.testing.assert_allclose(
        grads["kernel"].value, _kernel_grad_oracle(x, c), rtol=1e-5, atol=1e-6
    )
    sr = qn.QLinear(5, 3, rule=_layer_rule("stochastic"), phase="train", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="quant_rngs"):
        sr(x)
    sr.quant_rngs = nnx.Rngs(quant=1)
    g1 = nnx.grad(lambda m: jnp.sum(c * m(x)))(sr)["kernel"].value
    g2 = nnx.grad(lambda m: jnp.sum(c * m(x)))(sr)["kernel"].value  # the stream advanced
    assert not np.array_equal(g1, g2)
    # each element of Q(c) is within one step of c: |dW - fq(x)^T c| <= |fq(x)|^T 1 * step
    x_hat = _fq(x, _layer_rule("nearest_even").act_config())
    bound = jnp.abs(x_hat).T @ jnp.ones_like(c) * dynamic_qparams(c, Q8).scale
    assert bool(jnp.all(jnp.abs(g1 - x_hat.T @ c) <= bound))
