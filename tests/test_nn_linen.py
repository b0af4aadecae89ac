"""Tests of jquant.nn.linen: quantized layers, rule-based quantization, phases, state."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization

from jquant.formats import IntFormat
from jquant.models import linen as models
from jquant.nn import QuantRule
from jquant.nn import linen as ql

X = jax.random.normal(jax.random.key(1), (4, 16, 2))
BATCHES = [X, 1.5 * jax.random.normal(jax.random.key(2), (4, 16, 2))]


def np_fq_affine(x, rmin, rmax, bits=8):
    """NumPy oracle: affine signed grid over [min(rmin, 0), max(rmax, 0)]."""
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rmin, rmax = np.float32(min(rmin, 0)), np.float32(max(rmax, 0))
    s = np.float32((rmax - rmin) / np.float32(qmax - qmin))
    zp = np.clip(np.round(qmin - rmin / s), qmin, qmax)
    return s * (np.clip(np.round(x / s) + zp, qmin, qmax) - zp), s, zp


def np_fq_weight(w, bits=8):
    """NumPy oracle: symmetric per-output-channel (last axis) grid."""
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(w).reshape(-1, w.shape[-1]).max(0)
    s = (amax / np.float32(qmax)).astype(np.float32)
    return s * np.clip(np.round(w / s), -qmax - 1, qmax)


class HandCNN(nn.Module):
    """The zoo CNN (2 convs, max pool, dense1, head) built by hand from jquant layers."""

    rules: tuple
    phase: str = "float"

    @nn.compact
    def __call__(self, x, train=False):
        def rule(name):
            return next(r for r in self.rules if r.pattern in (name, ".*"))

        for i, c in enumerate((32, 32), 1):
            x = ql.QConv(c, (5,), rule=rule(f"conv{i}"), phase=self.phase, name=f"conv{i}")(x)
            x = nn.max_pool(nn.relu(x), (2,), strides=(2,), padding="VALID")
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(ql.QDense(64, rule=rule("dense1"), phase=self.phase, name="dense1")(x))
        return ql.QDense(10, rule=rule("head"), phase=self.phase, name="head")(x)


def INIT(model):
    return jax.jit(model.init)(jax.random.key(0), X)


def _calib_layer(layer, v, batches):
    """Calibrates a hand-built layer or model (jitted) over batches."""
    step = jax.jit(
        lambda v, b: layer.clone(phase="calibrate").apply(v, b, mutable=["quant_stats"])[1]
    )
    for b in batches:
        v = v | step(v, b)
    return v


def _calibrated(qmodel, variables, *args):
    return qmodel.calibrate(qmodel.attach(variables, *args), BATCHES)


def test_qdense_eval_matches_numpy_oracle():
    layer = ql.QDense(3, rule=QuantRule(".*"))
    v = jax.jit(layer.init)(jax.random.key(0), X[:, 0])
    v = _calib_layer(layer, v, [X[:, 0], BATCHES[1][:, 0]])
    y = jax.jit(layer.clone(phase="eval").apply)(v, X[:, 3])
    data = np.concatenate([np.asarray(X[:, 0]), np.asarray(BATCHES[1][:, 0])])
    xq, _, _ = np_fq_affine(np.asarray(X[:, 3]), data.min(), data.max())
    w, b = (np.asarray(v["params"][k]) for k in ("kernel", "bias"))
    np.testing.assert_allclose(y, xq @ np_fq_weight(w) + b, rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, np.asarray(X[:, 3]) @ w + b, atol=1e-3)  # it did quantize


def test_rule_quantized_model_equals_hand_built():
    cnn = models.CNN(models.CNNConfig(features=(32, 32), dense=(64,)))
    rules = (QuantRule("conv1", keep_float=True), QuantRule(".*", weight="int4", act="uint8"))
    qmodel, match = ql.quantize_model(cnn, rules, X)
    assert list(match.assignment) == ["conv1", "conv2", "dense1", "head"]
    hand = HandCNN(rules)
    v_plain = INIT(cnn)
    v_rule = _calibrated(qmodel, v_plain, X)
    v_hand = {**jax.jit(hand.init)(jax.random.key(3), X), "params": v_plain["params"]}
    v_hand = _calib_layer(hand, v_hand, BATCHES)
    same = jax.tree_util.tree_map(lambda a, b: np.array_equal(a, b), v_rule, v_hand)
    assert all(jax.tree_util.tree_leaves(same))
    y_rule = jax.jit(qmodel.with_phase("eval").apply)(v_rule, X)
    y_hand = jax.jit(hand.clone(phase="eval").apply)(v_hand, X)
    np.testing.assert_array_equal(y_rule, y_hand)
    assert not np.allclose(y_rule, jax.jit(cnn.apply)(v_plain, X), atol=1e-3)


def test_float_phase_and_keep_float_are_the_plain_model():
    cnn = models.CNN(models.CNNConfig(features=(8,), dense=()))
    v = INIT(cnn)
    y = jax.jit(cnn.apply)(v, X)
    qf, _ = ql.quantize_model(cnn, QuantRule(".*"), X)
    np.testing.assert_array_equal(jax.jit(qf.apply)(qf.attach(v, X), X), y)
    qk, _ = ql.quantize_model(cnn, QuantRule(".*", keep_float=True), X, phase="eval")
    np.testing.assert_array_equal(jax.jit(qk.apply)(qk.attach(v, X), X), y)


def test_calibrate_then_eval_under_jit_and_enumeration():
    cnn = models.CNN(models.CNNConfig(features=(8,), dense=()))
    qmodel, _ = ql.quantize_model(cnn, QuantRule(".*"), X)
    v = _calibrated(qmodel, INIT(cnn), X)
    ev = qmodel.with_phase("eval")
    y, y_float = jax.jit(ev.apply)(v, X), jax.jit(cnn.apply)(v, X)
    err = np.abs(y - y_float).max()
    assert 0 < err < 0.1 * np.abs(y_float).max()
    layers = {layer.path: layer for layer in qmodel.quantized_layers(v)}
    assert set(layers) == {"conv1", "head"}
    data = np.concatenate([np.asarray(b) for b in BATCHES])
    _, s, zp = np_fq_affine(data, data.min(), data.max())
    np.testing.assert_allclose(layers["conv1"].input_qparams.scale, s, rtol=1e-6)
    assert float(layers["conv1"].input_qparams.zero_point) == zp
    k = np.asarray(layers["head"].kernel)
    np.testing.assert_allclose(
        np.ravel(layers["head"].kernel_qparams.scale), np.abs(k).max(0) / 127, rtol=1e-6
    )


def test_int_mode_equals_simulate():
    cnn = models.CNN(models.CNNConfig(features=(8,), dense=(16,)))
    v = INIT(cnn)
    out = {}
    for mode in ("simulate", "int"):
        qm, _ = ql.quantize_model(cnn, QuantRule(".*", mode=mode), X)
        out[mode] = jax.jit(qm.with_phase("eval").apply)(_calibrated(qm, v, X), X)
    np.testing.assert_allclose(out["int"], out["simulate"], rtol=1e-4, atol=1e-4)


def test_gradients_reach_weights_and_learned_scales():
    cnn = models.CNN(models.CNNConfig(features=(8,), dense=()))
    rules = QuantRule(
        ".*",
        weight="int4",
        act=IntFormat(4, signed=False),
        estimator="lsq",
        learned_init="calibration",
    )
    qm, _ = ql.quantize_model(cnn, rules, X)
    v = _calibrated(qm, INIT(cnn), X)
    # learned scales start at the calibrated ranges (learned_init="calibration")
    np.testing.assert_array_equal(
        v["params"]["conv1"]["input_scale"], v["quant_stats"]["conv1"]["input_qparams"]["scale"]
    )
    train = qm.with_phase("train")
    g = jax.jit(jax.grad(lambda p: jnp.sum(train.apply({**v, "params": p}, X) ** 2)))(v["params"])
    for layer in ("conv1", "head"):
        for name in ("kernel", "bias", "kernel_scale", "input_scale"):
            leaf = np.asarray(g[layer][name])
            assert np.all(np.isfinite(leaf)) and np.any(leaf != 0), (layer, name)


def test_learned_scales_stay_positive():
    """A step size pushed through zero still quantizes on the grid of ``|s|``."""
    dense = nn.Dense(3)
    x = jax.random.normal(jax.random.key(3), (8, 5))
    rules = QuantRule(".*", weight="int4", act="int4", estimator="lsq")
    qm, _ = ql.quantize_model(dense, rules, x)
    v = qm.calibrate(qm.attach(jax.jit(dense.init)(jax.random.key(0), x), x), [x])
    train = qm.with_phase("train")

    def flip(v):
        p = {k: -a if k.endswith("_scale") else a for k, a in v["params"].items()}
        return {**v, "params": p}

    for phase in (train, qm.with_phase("eval")):
        np.testing.assert_array_equal(phase.apply(flip(v), x), phase.apply(v, x))
    g = jax.grad(lambda p: jnp.sum(train.apply({**v, "params": p}, x) ** 2))
    g_pos, g_neg = g(v["params"]), g(flip(v)["params"])
    for name in ("kernel_scale", "input_scale"):
        assert np.any(g_pos[name] != 0)
        # d/dp |p| = sign(p): the gradient flips with the parameter's sign.
        np.testing.assert_allclose(g_neg[name], -g_pos[name], rtol=1e-6)
    zero = {**v, "params": {**v["params"], "input_scale": jnp.zeros(())}}
    assert np.all(np.isfinite(train.apply(zero, x)))


def test_attach_and_calibrate_trace_once_per_model():
    traces = []

    class Counting(nn.Module):
        @nn.compact
        def __call__(self, x):
            traces.append(x.shape)
            return nn.Dense(3)(x)

    x = jnp.ones((2, 4))
    qm, _ = ql.quantize_model(Counting(), QuantRule(".*"), x)
    variables = Counting().init(jax.random.key(0), x)
    traces.clear()
    v = qm.calibrate(qm.attach(variables, x), [x, 2 * x])
    # init, then the calibrate step twice: the first batch creates the qparams entries
    assert len(traces) == 3
    for _ in range(2):
        v = qm.calibrate(qm.attach(variables, x), [x, 2 * x])
    assert len(traces) == 3
    assert v["quant_stats"]["Dense_0"]["input_qparams"]["scale"] > 0


def test_save_restore_gives_identical_outputs():
    cnn = models.CNN(models.CNNConfig(features=(8,), dense=()))
    rules = QuantRule(".*", calibration="ema", estimator="lsq_plus", act_symmetric=False)
    qm, _ = ql.quantize_model(cnn, rules, X)
    v = _calibrated(qm, INIT(cnn), X)
    blob = serialization.to_bytes(v)
    template = qm.attach(jax.jit(cnn.init)(jax.random.key(7), X), X)
    template = qm.calibrate(template, [X * 0.1])  # same structure, other values
    restored = serialization.from_bytes(template, blob)
    ev = qm.with_phase("eval")
    np.testing.assert_array_equal(jax.jit(ev.apply)(restored, X), jax.jit(ev.apply)(v, X))


def test_depthwise_conv_matches_oracle():
    layer = ql.QConv(4, (3,), feature_group_count=2, padding="VALID", use_bias=False)
    v = jax.jit(layer.init)(jax.random.key(0), X)
    v = _calib_layer(layer, v, [X])
    y = jax.jit(layer.clone(phase="eval").apply)(v, X)
    x = np.asarray(X)
    xq, _, _ = np_fq_affine(x, x.min(), x.max())
    wq = np_fq_weight(np.asarray(v["params"]["kernel"]))  # (3, 1, 4)
    ref = jax.lax.conv_general_dilated(
        xq, wq, (1,), "VALID", dimension_numbers=("NHC", "HIO", "NHC"), feature_group_count=2
    )
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_pooling_keeps_input_qparams(kind):
    cls = ql.QAvgPool if kind == "avg" else ql.QMaxPool
    layer = cls((3,), (2,), "SAME")
    v = jax.jit(layer.init)(jax.random.key(0), X)
    v = _calib_layer(layer, v, [X])
    y = np.asarray(jax.jit(layer.clone(phase="eval").apply)(v, X))
    x = np.asarray(X)
    _, s, zp = np_fq_affine(x, x.min(), x.max())
    q = np.clip(np.round(x / s) + zp, -128, 127)
    qp = np.pad(q, ((0, 0), (0, 1), (0, 0)), constant_values=np.nan)  # SAME: 16 -> 8, pad (0, 1)
    win = np.stack([qp[:, 2 * i : 2 * i + 3] for i in range(8)], 1)  # (N, 8, 3, C)
    if kind == "avg":
        n = np.sum(~np.isnan(win), 2)
        acc = np.nansum(win, 2)
        codes = np.trunc((acc + np.sign(acc) * n / 2) / n)  # half away from zero
    else:
        codes = np.nanmax(win, 2)
    np.testing.assert_allclose(y, s * (codes - zp), rtol=1e-6, atol=1e-6)


def test_errors_name_what_is_wrong():
    cnn = models.CNN(models.CNNConfig(features=(8,), dense=()))
    qm, _ = ql.quantize_model(cnn, QuantRule(".*"), X)
    v = qm.attach(INIT(cnn), X)
    with pytest.raises(ValueError, match="'conv1'.*never calibrated"):
        jax.jit(qm.with_phase("eval").apply)(v, X)
    with pytest.raises(ValueError, match="batches yielded no batch"):
        qm.calibrate(v, [])
    with pytest.raises(ValueError, match="mutable=\\['quant_stats'\\]"):
        jax.jit(qm.with_phase("calibrate").apply)(v, X)
    with pytest.raises(ValueError, match="phase must be one of"):
        qm.with_phase("inference")
    with pytest.raises(TypeError, match="example inputs"):
        ql.quantize_model(cnn, QuantRule(".*"))
    with pytest.raises(ValueError, match="matched no layer"):
        ql.quantize_model(cnn, QuantRule("conv9"), X, on_unused="raise")


def np_fq_kernel(w, contracted, bits=8):
    """NumPy oracle: symmetric grid, one scale per index of the non-contracted kernel axes."""
    qmax = 2 ** (bits - 1) - 1
    s = (np.abs(w).max(axis=contracted, keepdims=True) / np.float32(qmax)).astype(np.float32)
    return s * np.clip(np.round(w / s), -qmax - 1, qmax)


class _OneLayer(nn.Module):
    """A plain model of one DenseGeneral (features (2, 3)) or Einsum layer, named "layer"."""

    kind: str

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(1.0)
        if self.kind == "dense_general":
            return nn.DenseGeneral((2, 3), bias_init=init, name="layer")(x)
        return nn.Einsum((2, 5, 3), "btd,ndh->bnth", bias_init=init, name="layer")(x)


# kind -> (einsum of x and kernel as the layer computes it, kernel axes it contracts)
_GENERAL = {"dense_general": ("btd,dnh->btnh", (0,)), "einsum": ("btd,ndh->bnth", (1,))}


@pytest.mark.parametrize("kind", sorted(_GENERAL))
def test_dense_general_and_einsum_are_quantized_by_rules(kind):
    eq, contracted = _GENERAL[kind]
    model = _OneLayer(kind)
    x = jax.random.normal(jax.random.key(3), (2, 4, 5))
    v = jax.jit(model.init)(jax.random.key(0), x)
    qm, match = ql.quantize_model(model, QuantRule(".*"), x)
    assert list(match.assignment) == ["layer"] and not match.not_quantized
    v = qm.calibrate(qm.attach(v, x), [x])
    xn, w = np.asarray(x), np.asarray(v["params"]["layer"]["kernel"])
    xq, s, zp = np_fq_affine(xn, xn.min(), xn.max())
    stats = v["quant_stats"]["layer"]["input_qparams"]
    np.testing.assert_allclose(stats["scale"], s, rtol=1e-6)
    y_float = np.asarray(jax.jit(model.apply)({"params": v["params"]}, x))
    bias = y_float - np.einsum(eq, xn, w)  # Flax's bias, broadcast its way
    y_ref = np.einsum(eq, xq, np_fq_kernel(w, contracted)) + bias
    for mode in ("simulate", "int"):
        qmode, _ = ql.quantize_model(model, QuantRule(".*", mode=mode), x)
        y = jax.jit(qmode.with_phase("eval").apply)(v, x)
        np.testing.assert_allclose(y, y_ref, atol=2e-5, err_msg=mode)
    assert np.abs(y_float - y_ref).max() > 1e-3  # quantization did something
    (layer,) = qm.quantized_layers(v)  # per-channel kernel QParams along the non-contracted axes
    s_w = np.abs(w).max(axis=contracted, keepdims=True) / 127
    np.testing.assert_allclose(layer.kernel_qparams.scale, s_w, rtol=1e-6)


class _WithTransposedConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.ConvTranspose(2, (3,), name="up")(x))


def test_layer_with_a_kernel_rules_cannot_quantize_is_reported():
    model = _WithTransposedConv()
    with pytest.warns(UserWarning, match=r"cannot quantize.*'up' \(ConvTranspose\)"):
        _, match = ql.quantize_model(model, QuantRule(".*"), X)
    assert match.not_quantized == {"up": "ConvTranspose"}
    assert list(match.assignment) == ["head"] and match.unused == ()
    with warnings.catch_warnings():  # kept float on purpose: neither listed nor warned about
        warnings.simplefilter("error")
        rules = (QuantRule("up", keep_float=True), QuantRule(".*"))
        _, match = ql.quantize_model(model, rules, X)
    assert match.not_quantized == {} and match.unused == ()


def test_a_custom_product_op_is_an_error_not_a_silent_float():
    class Custom(nn.Module):  # Flax runs dot_general_cls() before any injected dot_general
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, dot_general_cls=lambda: jax.lax.dot_general)(x)

    with pytest.raises(ValueError, match=r"'Dense_0' \(Dense\) sets its own dot_general_cls"):
        ql.quantize_model(Custom(), QuantRule(".*"), X[:, 0])
    ql.quantize_model(Custom(), QuantRule(".*", keep_float=True), X[:, 0])  # float: fine


def test_learned_init_paper_is_lsq_formula_and_dynamic_act_scales_match_numpy():
    """LSQ's paper initialisation after calibrate, and dynamic per-example / per-token
    activation ranges in eval, against NumPy re-derivations."""
    net = nn.Dense(3)
    v0 = net.init(jax.random.key(0), X[:, 0])
    rule = QuantRule(".*", weight="int4", act="int4", estimator="lsq")
    qm, _ = ql.quantize_model(net, rule, X[:, 0])
    v = qm.calibrate(qm.attach(v0, X[:, 0]), [X[:, 0], 2 * X[:, 0]])
    w, a = np.asarray(v0["params"]["kernel"]), np.asarray(X[:, 0])
    np.testing.assert_allclose(
        np.ravel(v["params"]["kernel_scale"]), 2 * np.abs(w).mean(0) / np.sqrt(7), rtol=1e-5
    )
    zp = float(v["quant_stats"]["input_qparams"]["zero_point"])
    mean_abs = (np.abs(a).mean() + np.abs(2 * a).mean()) / 2
    np.testing.assert_allclose(v["params"]["input_scale"], 2 * mean_abs / np.sqrt(7 - zp), 1e-5)

    def np_fq(x, axes):  # affine min/max per group, int4 (qmin -8, qmax 7)
        lo = np.minimum(x.min(axes, keepdims=True), 0)
        hi = np.maximum(x.max(axes, keepdims=True), 0)
        s = (hi - lo) / 15
        z = np.clip(np.round(-8 - lo / s), -8, 7)
        return s * (np.clip(np.round(x / s) + z, -8, 7) - z)

    conv = nn.Conv(4, (3,), use_bias=False)
    cv = conv.init(jax.random.key(1), X)
    x = np.asarray(X)
    for act_scale, axes in (("dynamic_per_example", (1, 2)), ("dynamic_per_token", (2,))):
        r = QuantRule(".*", weight=None, act="int4", act_scale=act_scale)
        qc, _ = ql.quantize_model(conv, r, X)
        got = qc.with_phase("eval").apply(qc.calibrate(qc.attach(cv, X), [X]), X)
        want = conv.apply(cv, jnp.asarray(np_fq(x, axes), jnp.float32))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="act_scale"):
        QuantRule(".*", estimator="lsq", act_scale="dynamic_per_example")
    with pytest.raises(ValueError, match="act_scale"):
        QuantRule(".*", act_scale="per_row")


def test_two_bit_weight_grids_against_numpy():
    """2-bit weights: Qwix / AQT's bound (``scale = max|w| / 1.5``, codes -2..1), midrise
    (levels ``(q + 1/2) s``, no zero) and affine, each against NumPy through QDense."""
    net = nn.Dense(3, use_bias=False)
    v0 = net.init(jax.random.key(0), X[:, 0])
    w, x = np.asarray(v0["params"]["kernel"]), np.asarray(X[:, 0])
    eye = jnp.eye(2)  # eval on the identity: the rows of the fake-quantized kernel

    def kernel_q(**kw):
        rule = QuantRule(".*", weight=kw.pop("weight", "int2"), act=None, **kw)
        qm, _ = ql.quantize_model(net, rule, x)
        v = qm.calibrate(qm.attach(v0, x), [x])
        return np.asarray(qm.with_phase("eval").apply(v, eye)), qm.quantized_layers(v)[
            0
        ].kernel_qparams

    s = np.abs(w).max(0) / 1.5
    got, qp = kernel_q(weight_scale_bound="qmax_plus_half")
    # the largest |w| sits on the tie +-1.5 steps: one ulp decides between -2 and -1 there
    tie = np.isclose(np.abs(w / s), 1.5, rtol=1e-5)
    codes = np.round(got / s)
    np.testing.assert_array_equal(codes[~tie], np.clip(np.round(w / s), -2, 1)[~tie])
    assert set(np.sign(w[tie]) * codes[tie]).issubset({1.0, 2.0})
    assert codes.min() >= -2 and codes.max() <= 1
    np.testing.assert_allclose(np.ravel(qp.scale), s, rtol=1e-6)
    got, _ = kernel_q(weight=IntFormat(2, midrise=True))
    steps = got / np.ravel(kernel_q(weight=IntFormat(2, midrise=True))[1].scale)
    np.testing.assert_allclose(steps - np.floor(steps), 0.5, atol=1e-5)  # (q + 1/2) s
    got, qp = kernel_q(weight_symmetric=False)
    lo, hi = np.minimum(w.min(0), 0), np.maximum(w.max(0), 0)
    sa = (hi - lo) / 3
    z = np.clip(np.round(-2 - lo / sa), -2, 1)
    np.testing.assert_allclose(got, sa * (np.clip(np.round(w / sa) + z, -2, 1) - z), rtol=1e-5)
    with pytest.raises(ValueError, match="weight_scale_bound"):
        QuantRule(".*", weight=IntFormat(2, midrise=True), weight_scale_bound="qmax_plus_half")


def test_calibrate_shares_the_loop_and_compiles_once_per_model(capsys):
    """QuantizedModel.calibrate runs jquant.calibration.calibration_loop (max_batches check,
    progress bar) and compiles its step once per model: a second call traces nothing."""
    traces = []

    class Counted(nn.Module):
        @nn.compact
        def __call__(self, x):
            traces.append(1)
            return nn.Dense(3, name="fc")(x)

    x = jnp.ones((2, 4))
    qm, _ = ql.quantize_model(Counted(), QuantRule(".*"), x)
    v = qm.attach(Counted().init(jax.random.key(0), x), x)
    before = len(traces)
    v1 = qm.calibrate(v, [x, 2 * x])
    first = len(traces)
    v2 = qm.calibrate(v, [x, 2 * x], progress=True)
    assert first > before and len(traces) == first  # the second call reuses the compiled step
    jax.tree.map(np.testing.assert_array_equal, v1, v2)
    assert "calibrate" in capsys.readouterr().err  # the progress bar
    half = qm.calibrate(v, [x, 2 * x], max_batches=1)
    np.testing.assert_allclose(half["quant_stats"]["fc"]["input_qparams"]["scale"], 1 / 255)
    with pytest.raises(ValueError, match="max_batches"):
        qm.calibrate(v, [x], max_batches=0)
    # the NNX names: quantized_layers (layers: deprecated alias, same result)
    with pytest.warns(DeprecationWarning, match="quantized_layers"):
        old = qm.layers(v1)
    assert [q.path for q in old] == [q.path for q in qm.quantized_layers(v1)] == ["fc"]
