"""Tests of jquant.nn.bn_folding: fold_bn and the QConvBN layer.

Oracles: Flax's own nn.Conv + nn.BatchNorm (float outputs, running-stat updates and
gradients), and a NumPy conv of NumPy-fake-quantized operands (quantized eval and train).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numpy.lib.stride_tricks import sliding_window_view

from jquant.nn.bn_folding import NnxQConvBN, QConvBN, fold_bn
from jquant.nn.nnx import with_phase as jnnx_with_phase
from jquant.nn.rules import QuantRule

EPS = 1e-5
C_IN, C_OUT = 3, 4


def _data():
    rng = np.random.default_rng(0)

    def f32(a):
        return jnp.asarray(a, jnp.float32)

    x = f32(rng.normal(size=(2, 5, 5, C_IN)))
    params = {
        "kernel": f32(rng.normal(size=(3, 3, C_IN, C_OUT)) * 0.5),
        "scale": f32(rng.uniform(0.5, 2.0, C_OUT)),
        "bias": f32(rng.normal(size=C_OUT)),
    }
    stats = {"mean": f32(rng.normal(size=C_OUT)), "var": f32(rng.uniform(0.5, 3.0, C_OUT))}
    return x, params, stats


def _apply(layer, v, x, *args, **kw):
    """``layer.apply`` under one jit (eager Flax compiles every primitive separately)."""
    return jax.jit(lambda v, x: layer.apply(v, x, *args, **kw))(v, x)


class _ConvBN(nn.Module):
    """The float reference: Flax's Conv then BatchNorm."""

    use_bias: bool = False

    @nn.compact
    def __call__(self, x, use_running_average):
        y = nn.Conv(C_OUT, (3, 3), padding="VALID", use_bias=self.use_bias)(x)
        return nn.BatchNorm(use_running_average=use_running_average, momentum=0.99, epsilon=EPS)(y)


def _flax_vars(params, stats, conv_bias=None):
    conv = {"kernel": params["kernel"]}
    if conv_bias is not None:
        conv["bias"] = conv_bias
    return {
        "params": {
            "Conv_0": conv,
            "BatchNorm_0": {"scale": params["scale"], "bias": params["bias"]},
        },
        "batch_stats": {"BatchNorm_0": stats},
    }


def _np_conv(x, w):
    """VALID, stride-1 NHWC x HWIO convolution in float64."""
    win = sliding_window_view(np.asarray(x, np.float64), w.shape[:2], axis=(1, 2))
    return np.einsum("nhwcij,ijco->nhwo", win, np.asarray(w, np.float64))


def _np_fake_quant(x, scale, zp, qmin, qmax):
    return (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp) * scale


def test_fold_bn_equals_conv_then_bn_in_eval():
    x, params, stats = _data()
    conv_bias = jnp.linspace(-1.0, 1.0, C_OUT)
    ref = _apply(_ConvBN(use_bias=True), _flax_vars(params, stats, conv_bias), x, True)
    k, b = fold_bn(
        params["kernel"],
        conv_bias,
        params["scale"],
        params["bias"],
        stats["mean"],
        stats["var"],
        EPS,
    )
    np.testing.assert_allclose(_np_conv(x, k) + b, ref, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"scale": jnp.ones(3)}, "scale must have shape"),
        ({"bias": jnp.ones(2)}, "bias must have shape"),
        ({"eps": -1.0}, "eps must be"),
    ],
)
def test_fold_bn_rejects_bad_input(kwargs, match):
    args = dict(kernel=jnp.ones((1, 4)), bias=None, scale=jnp.ones(4), bias_bn=jnp.zeros(4))
    args.update(mean=jnp.zeros(4), var=jnp.ones(4), eps=EPS)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        fold_bn(**args)


def _layer(phase, **kw):
    return QConvBN(C_OUT, (3, 3), padding="VALID", phase=phase, epsilon=EPS, **kw)


@pytest.fixture(scope="module")
def setup():
    """``(x, params, stats, variables)``: QConvBN variables (quant_stats included) holding
    ``params`` and the running statistics ``stats``; initialised once for the module."""
    x, params, stats = _data()
    variables = jax.jit(_layer("float").init)(jax.random.key(1), x)
    return x, params, stats, {**variables, "params": params, "batch_stats": stats}


def test_float_training_matches_flax_conv_bn_outputs_stats_and_grads(setup):
    # Running statistics far from the batch ones: the fold with sigma_R and the
    # sigma_R / sigma_B correction must cancel exactly in float.
    x, params, stats, ours = setup

    def loss_ours(p):
        y, upd = _layer("float").apply({**ours, "params": p}, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd["batch_stats"])

    def loss_ref(p):
        v = {**_flax_vars(params, stats), "params": p}
        y, upd = _ConvBN().apply(v, x, False, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y)), (y, upd["batch_stats"]["BatchNorm_0"])

    (_, (y, st)), g = jax.jit(jax.value_and_grad(loss_ours, has_aux=True))(params)
    ref_params = _flax_vars(params, stats)["params"]
    (_, (y_ref, st_ref)), g_ref = jax.jit(jax.value_and_grad(loss_ref, has_aux=True))(ref_params)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
    np.testing.assert_allclose(st["mean"], st_ref["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(st["var"], st_ref["var"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(st["mean"], stats["mean"])  # the statistics did move
    np.testing.assert_allclose(g["kernel"], g_ref["Conv_0"]["kernel"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(g["scale"], g_ref["BatchNorm_0"]["scale"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(g["bias"], g_ref["BatchNorm_0"]["bias"], rtol=1e-3, atol=1e-4)


def test_quantized_eval_and_train_equal_fake_quant_conv_with_folded_weights(setup):
    x, params, stats, variables = setup
    _, upd = _apply(_layer("calibrate"), variables, x, mutable=["quant_stats"])
    variables = {**variables, **upd}

    xn = np.asarray(x, np.float64)
    lo, hi = min(xn.min(), 0.0), max(xn.max(), 0.0)  # int8 affine minmax, 0 exact
    s_x = (hi - lo) / 255
    zp_x = np.clip(np.round(-128 - lo / s_x), -128, 127)
    stored = variables["quant_stats"]["input_qparams"]
    np.testing.assert_allclose(stored["scale"], s_x, rtol=1e-6)
    np.testing.assert_allclose(stored["zero_point"], zp_x)
    xq = _np_fake_quant(xn, s_x, zp_x, -128, 127)

    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    sigma_r = np.sqrt(np.asarray(stats["var"], np.float64) + EPS)
    w_fold = p["kernel"] * p["scale"] / sigma_r
    s_w = np.abs(w_fold).max(axis=(0, 1, 2)) / 127  # symmetric per output channel
    conv_q = _np_conv(xq, _np_fake_quant(w_fold, s_w, 0, -128, 127))

    y_eval = _apply(_layer("eval"), variables, x)
    b_fold = p["bias"] - p["scale"] * np.asarray(stats["mean"]) / sigma_r
    np.testing.assert_allclose(y_eval, conv_q + b_fold, atol=2e-5)

    y_train, _ = _apply(_layer("train"), variables, x, mutable=["batch_stats"])
    y_float = _np_conv(xn, p["kernel"])
    mu_b, sigma_b = y_float.mean(axis=(0, 1, 2)), np.sqrt(y_float.var(axis=(0, 1, 2)) + EPS)
    expected = conv_q * sigma_r / sigma_b + p["bias"] - p["scale"] * mu_b / sigma_b
    np.testing.assert_allclose(y_train, expected, atol=2e-5)
    # Quantization changed the result (the oracle is not the float layer).
    assert np.abs(_np_conv(xn, w_fold) + b_fold - y_eval).max() > 1e-3


def test_qat_gradients_reach_kernel_and_bn_params_and_frozen_bn_keeps_stats(setup):
    x, params, stats, variables = setup
    rule = QuantRule(".*", weight="int4", act=None)

    def loss(p, frozen):
        y, upd = _layer("train", rule=rule, use_running_average=frozen).apply(
            {**variables, "params": p}, x, mutable=["batch_stats"]
        )
        return jnp.sum(jnp.sin(y)), upd["batch_stats"]

    for frozen in (False, True):
        g, new_stats = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(params, frozen)
        for name, v in g.items():
            assert np.all(np.isfinite(v)), (frozen, name)
            assert np.abs(v).max() > 1e-4, (frozen, name)
        moved = not np.allclose(new_stats["mean"], stats["mean"])
        assert moved != frozen  # frozen BN (Krishnamoorthi) keeps its running statistics


def test_bad_phase_and_rank_raise():
    x, _, _ = _data()
    with pytest.raises(ValueError, match="phase"):
        _layer("training").apply({}, x)
    with pytest.raises(ValueError, match="rank 4"):
        _layer("float").apply({}, x[0])


def _nnx_layer(params, stats):
    layer = NnxQConvBN(C_IN, C_OUT, (3, 3), padding="VALID", epsilon=EPS, rngs=nnx.Rngs(0))
    for name, v in {**params, **stats}.items():
        getattr(layer, name).value = v
    return layer


@nnx.jit
def _nnx_run(m, x):
    return m(x)


def test_nnx_layer_matches_linen_layer_in_float_training(setup):
    x, params, stats, variables = setup
    layer = _nnx_layer(params, stats)
    y = _nnx_run(layer, x)
    y_ref, upd = _apply(_layer("float"), variables, x, mutable=["batch_stats"])
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(layer.mean.value, upd["batch_stats"]["mean"], atol=1e-6)
    np.testing.assert_allclose(layer.var.value, upd["batch_stats"]["var"], atol=1e-6)


@pytest.mark.slow
def test_nnx_layer_matches_linen_layer_quantized_eval(setup):
    """After calibration the NNX eval equals the Linen eval (checked against NumPy above)."""
    x, params, stats, variables = setup
    layer = _nnx_layer(params, stats)
    _nnx_run(jnnx_with_phase(layer, "calibrate"), x)
    y = _nnx_run(jnnx_with_phase(layer, "eval"), x)
    _, q = _apply(_layer("calibrate"), variables, x, mutable=["quant_stats"])
    np.testing.assert_allclose(y, _apply(_layer("eval"), {**variables, **q}, x), atol=1e-5)
    np.testing.assert_array_equal(layer.mean.value, stats["mean"])  # no update in eval


def test_quantize_model_fold_bn_equals_hand_built_qconvbn(setup):
    """A plain Conv -> BatchNorm model, rule-quantized with ``fold_bn=True``, computes what
    the hand-built QConvBN computes: calibrated statistics, eval and train outputs, the
    running-statistic update and the gradients, from the same weights."""
    from jquant.nn import linen as ql

    x, params, stats, hand = setup
    # per-tensor weights: folding the per-channel BN factor changes the weight grid (with
    # per-channel scales it would only rescale it), so the control below can tell
    rule = QuantRule(".*", weight="int4", act="int8", weight_granularity="per_tensor")
    qm, _ = ql.quantize_model(_ConvBN(), rule, x, False, fold_bn=True)
    assert qm.folds == (("Conv_0", "BatchNorm_0", EPS),)
    plain, _ = ql.quantize_model(_ConvBN(), rule, x, False)
    assert plain.folds == ()
    with pytest.raises(TypeError, match="fold_bn"):
        ql.quantize_model(_ConvBN(), rule, x, False, fold_bn="yes")
    # a conv with a bias is not folded (QConvBN's convs have none)
    assert ql.quantize_model(_ConvBN(use_bias=True), rule, x, False, fold_bn=True)[0].folds == ()
    v = qm.calibrate(
        qm.attach(_flax_vars(params, stats), x, use_running_average=False),
        [x],
        use_running_average=False,
    )
    hand = {
        **hand,
        "quant_stats": _apply(_layer("calibrate", rule=rule), hand, x, mutable=["quant_stats"])[1][
            "quant_stats"
        ],
    }
    for a, b in zip(
        jax.tree.leaves(v["quant_stats"]["Conv_0"]),
        jax.tree.leaves(hand["quant_stats"]),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)

    def to_hand(v):
        p = v["params"]
        return {
            "params": {**p["Conv_0"], **p["BatchNorm_0"]},
            "batch_stats": v["batch_stats"]["BatchNorm_0"],
            "quant_stats": v["quant_stats"]["Conv_0"],
        }

    got = _apply(qm.with_phase("eval"), v, x, True)
    want = _apply(_layer("eval", rule=rule), to_hand(v), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the fold is not the plain quantized conv then a float BN
    assert not np.allclose(got, _apply(plain.with_phase("eval"), v, x, True), atol=1e-3)

    train = qm.with_phase("train")
    out, upd = _apply(train, v, x, False, mutable=["batch_stats"])
    h_out, h_upd = _apply(_layer("train", rule=rule), to_hand(v), x, mutable=["batch_stats"])
    np.testing.assert_allclose(out, h_out, rtol=1e-5, atol=1e-5)
    for k in ("mean", "var"):
        np.testing.assert_allclose(
            upd["batch_stats"]["BatchNorm_0"][k], h_upd["batch_stats"][k], rtol=1e-6
        )

    def loss(apply, variables):
        return jnp.sum(apply(variables) ** 2)

    g = jax.jit(
        jax.grad(
            lambda p: loss(
                lambda w: train.apply(w, x, False, mutable=["batch_stats"])[0], {**v, "params": p}
            )
        )
    )(v["params"])
    hv = to_hand(v)
    h_layer = _layer("train", rule=rule)
    hg = jax.jit(
        jax.grad(
            lambda p: loss(
                lambda w: h_layer.apply(w, x, mutable=["batch_stats"])[0], {**hv, "params": p}
            )
        )
    )(hv["params"])
    np.testing.assert_allclose(g["Conv_0"]["kernel"], hg["kernel"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g["BatchNorm_0"]["scale"], hg["scale"], rtol=1e-4, atol=1e-5)


class _LinenConvBNHead(nn.Module):
    """Conv (no bias) -> BatchNorm -> relu -> flatten -> Dense, Linen."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(C_OUT, (3,), use_bias=False, name="conv")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, name="bn")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


class _NnxConvBNHead(nnx.Module):
    """The same model in NNX (same attribute paths, so the same variable tree)."""

    def __init__(self, length: int, rngs):
        self.conv = nnx.Conv(C_IN, C_OUT, (3,), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(C_OUT, rngs=rngs)
        self.head = nnx.Linear(C_OUT * length, 3, rngs=rngs)

    def __call__(self, x, train=False):
        x = nnx.relu(self.bn(self.conv(x), use_running_average=not train))
        return self.head(x.reshape(x.shape[0], -1))


def nnx_conv_bn_head(x):
    """A float NNX Conv -> BN model with BN statistics and affine away from the identity
    (one gamma negative), and its variables as a Linen tree."""
    _, params, stats = _data()
    model = _NnxConvBNHead(x.shape[1], nnx.Rngs(0))
    model.bn.scale.value = params["scale"].at[0].set(-1.3)
    model.bn.bias.value = params["bias"]
    model.bn.mean.value, model.bn.var.value = stats["mean"], stats["var"]
    p, s = nnx.state(model, nnx.Param, nnx.BatchStat)
    return model, {"params": p.to_pure_dict(), "batch_stats": s.to_pure_dict()}


def test_nnx_quantize_model_fold_bn_equals_the_linen_fold():
    """NNX ``quantize_model(..., fold_bn=True)`` computes what the Linen one computes (itself
    checked against QConvBN above) from the same weights: float phase = the plain model,
    calibrated statistics, eval and train outputs, the running-statistic update, gradients."""
    from jquant.nn import linen as ql
    from jquant.nn import nnx as qn
    from jquant.nn.state import QuantStat

    x = jax.random.normal(jax.random.key(2), (6, 10, C_IN))
    model, v = nnx_conv_bn_head(x)
    rule = QuantRule(".*", weight="int4", act="int8", weight_granularity="per_tensor")
    lq, _ = ql.quantize_model(_LinenConvBNHead(), rule, x, fold_bn=True)
    assert lq.folds == (("conv", "bn", EPS),)
    nq, _ = qn.quantize_model(model, rule, x, fold_bn=True)
    assert isinstance(nq.conv, qn.FoldedQConv) and isinstance(nq.bn, qn.FoldedBatchNorm)
    assert type(model.conv) is nnx.Conv  # the input model is left as it is
    with pytest.raises(TypeError, match="example"):
        qn.quantize_model(model, rule, fold_bn=True)
    with pytest.raises(TypeError, match="fold_bn"):
        qn.quantize_model(model, rule, x, fold_bn="yes")
    run = nnx.jit(lambda m, x, t: m(x, train=t), static_argnums=2)
    # float phase: the plain model
    np.testing.assert_array_equal(run(nq, x, False), run(model, x, False))
    lv = lq.calibrate(lq.attach(v, x), [x])
    qn.calibrate(nq, [x])
    got = nnx.state(nq, QuantStat).to_pure_dict()["conv"]
    jax.tree.map(np.testing.assert_array_equal, got, lv["quant_stats"]["conv"])
    qn.with_phase(nq, "eval")
    want = jax.jit(lq.with_phase("eval").apply)(lv, x)
    np.testing.assert_allclose(run(nq, x, False), want, rtol=1e-6, atol=1e-6)
    # the fold is not the plain quantized conv then a float BN
    plain, _ = qn.quantize_model(model, rule)
    qn.with_phase(qn.calibrate(plain, [x]), "eval")
    assert not np.allclose(run(plain, x, False), want, atol=1e-3)

    train = lq.with_phase("train")
    out, upd = jax.jit(lambda v: train.apply(v, x, True, mutable=["batch_stats"]))(lv)
    qn.with_phase(nq, "train")
    grad_model = nnx.clone(nq)
    np.testing.assert_allclose(run(nq, x, True), out, rtol=1e-5, atol=1e-6)
    for k in ("mean", "var"):  # the folded BN updated its running statistics as Linen's
        np.testing.assert_allclose(getattr(nq.bn, k).value, upd["batch_stats"]["bn"][k], rtol=1e-6)

    def linen_loss(params):
        y = train.apply({**lv, "params": params}, x, True, mutable=["batch_stats"])[0]
        return jnp.sum(y**2)

    g_linen = jax.jit(jax.grad(linen_loss))(lv["params"])
    g_nnx = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x, train=True) ** 2)))(grad_model)
    g_nnx = g_nnx.to_pure_dict()
    for layer, name in (("conv", "kernel"), ("bn", "scale"), ("bn", "bias"), ("head", "kernel")):
        np.testing.assert_allclose(
            g_nnx[layer][name], g_linen[layer][name], rtol=1e-4, atol=1e-5, err_msg=layer
        )
