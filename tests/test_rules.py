"""Tests of jquant.nn.rules: matching order, unused rules, validation, per-layer bits."""

import re
import warnings
from dataclasses import replace

import numpy as np
import pytest

from jquant.formats import IntFormat, fp8_e4m3, int4
from jquant.nn.rules import (
    QuantRule,
    match_rules,
    report_not_quantized,
    report_unused,
    set_bits,
)

PATHS = ["conv1", "conv2", "dense1", "head"]


def test_first_match_wins_and_fullmatch():
    first = QuantRule("conv1", keep_float=True)
    convs = QuantRule("conv.", weight="int4")
    rest = QuantRule(".*", weight="int2")
    m = match_rules([first, convs, rest], PATHS)
    assert m.assignment["conv1"] is first
    assert m.assignment["conv2"] is convs
    assert m.assignment["dense1"] is rest and m.assignment["head"] is rest
    assert m.unused == ()
    # fullmatch: "conv" alone matches no path ("conv1" is longer)
    assert match_rules([QuantRule("conv")], PATHS).assignment == dict.fromkeys(PATHS)


def test_unused_rules_reported_in_order():
    a, b, c = QuantRule("head"), QuantRule("encoder/.*"), QuantRule("xyz")
    m = match_rules([a, b, c], PATHS)
    assert m.unused == (b, c)
    with pytest.warns(UserWarning, match=re.escape("['encoder/.*', 'xyz']")):
        report_unused(m, "warn")
    with pytest.raises(ValueError, match="matched no layer"):
        report_unused(m, "raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_unused(m, "ignore")


def test_layers_rules_cannot_quantize_are_listed_and_warned_about():
    keep, convs, rest = QuantRule("up2", keep_float=True), QuantRule("up1"), QuantRule("head")
    m = match_rules([keep, convs, rest], ["head"], {"up1": "ConvTranspose", "up2": "Foo"})
    assert m.not_quantized == {"up1": "ConvTranspose"}  # up2 is float on purpose
    assert m.unused == ()  # a rule matching only unquantizable layers was used
    with pytest.warns(UserWarning, match=re.escape("'up1' (ConvTranspose)")):
        report_not_quantized(m)
    assert match_rules([rest], ["head"], {"up1": "ConvTranspose"}).not_quantized == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_not_quantized(match_rules([rest], PATHS))


def test_rule_formats_and_configs():
    r = QuantRule(".*", weight="int4", act="uint8", weight_granularity="per_tensor")
    assert r.weight == int4 and r.act == IntFormat(8, signed=False)
    assert r.weight_config(4).axis is None
    assert QuantRule(".*").weight_config(4).axis == 3  # per output channel (HWIO / IO)
    # a DenseGeneral / einsum kernel: per channel along every non-contracted axis
    assert QuantRule(".*").weight_config(3, (0, 2)).axis == (0, 2)
    assert r.weight_config(3, (0, 2)).axis is None
    assert QuantRule(".*", act=None).act_config() is None
    assert QuantRule(".*", keep_float=True).weight_config(2) is None
    assert (
        QuantRule(".*", act=IntFormat(2, signed=False), act_estimator="pact").act_config().estimator
        == "pact"
    )


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"pattern": "conv(1"}, ValueError, "not a valid regex"),
        ({"pattern": ".*", "weight": "int5"}, ValueError, "unknown format 'int5'"),
        ({"pattern": ".*", "act": 8}, TypeError, "QuantRule.act"),
        ({"pattern": ".*", "estimator": "magic"}, ValueError, "estimator"),
        ({"pattern": ".*", "calibration": "max"}, ValueError, "calibration"),
        ({"pattern": ".*", "mode": "fast"}, ValueError, "mode"),
        ({"pattern": ".*", "weight_granularity": "per_row"}, ValueError, "granularity"),
        ({"pattern": ".*", "act_estimator": "pact"}, ValueError, "unsigned"),
        ({"pattern": ".*", "weight": fp8_e4m3, "estimator": "lsq"}, ValueError, "IntFormat"),
        ({"pattern": 3}, TypeError, "pattern"),
    ],
)
def test_bad_rules_raise(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        QuantRule(**kwargs)


def test_match_rules_rejects_non_rules():
    with pytest.raises(TypeError, match=r"rules\[1\]"):
        match_rules([QuantRule(".*"), "conv1"], PATHS)


def test_set_bits_overrides_one_layer_only():
    rules = (QuantRule("conv1", keep_float=True), QuantRule(".*", weight="int8", act="uint8"))
    new = set_bits(rules, "dense1", weight_bits=3, act_bits=4)
    m = match_rules(new, PATHS).assignment
    assert m["dense1"].weight == IntFormat(3)
    assert m["dense1"].act == IntFormat(4, signed=False)  # keeps signedness of the old format
    assert m["conv2"].weight == IntFormat(8) and m["conv1"].keep_float
    assert (
        not match_rules(set_bits(rules, "conv1", weight_bits=2), PATHS)
        .assignment["conv1"]
        .keep_float
    )


# --- block-wise (sub-channel) weights ----------------------------------------------------------


def _np_block_int4(w, b):
    """NumPy oracle: symmetric int4, one scale per output column and block of ``b`` rows."""
    k, n = w.shape
    wb = w.reshape(k // b, b, n)
    s = np.abs(wb).max(1, keepdims=True) / np.float32(7)
    return (np.clip(np.round(wb / s), -8, 7) * s).reshape(k, n)


def test_block_rule_validation_and_config():
    r = QuantRule(".*", weight="int4", block_size=8)
    assert r.weight_granularity == "per_block"
    cfg = r.weight_config(2)
    assert (cfg.block_size, cfg.block_axis, cfg.axis) == (8, 0, 1)
    assert QuantRule(".*", block_size=4).weight_config(4).block_axis == 2  # Conv HWIO: I
    with pytest.raises(ValueError, match="per_block' needs block_size"):
        QuantRule(".*", weight_granularity="per_block")
    with pytest.raises(ValueError, match="QuantRule.block_size must be None or a positive"):
        QuantRule(".*", block_size=0)
    with pytest.raises(ValueError, match="weight_granularity is 'per_tensor'"):
        QuantRule(".*", block_size=8, weight_granularity="per_tensor")


@pytest.mark.parametrize("mode", ["simulate", "int"])
def test_dense_with_block_int4_kernel_equals_numpy_linen_and_nnx(mode):
    import flax.linen as nn
    import jax
    from flax import nnx

    from jquant.nn import linen as ql
    from jquant.nn import nnx as qn

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 16)).astype(np.float32)
    rule = QuantRule(".*", weight="int4", act=None, block_size=8, mode=mode)
    if mode == "int":  # int mode quantizes both operands: int8 input, calibrated
        rule = QuantRule(".*", weight="int4", act="int8", block_size=8, mode=mode)
    dense = nn.Dense(3)
    v = dense.init(jax.random.key(0), x)
    w = np.asarray(v["params"]["kernel"])
    qm, _ = ql.quantize_model(dense, rule, x)
    qv = qm.calibrate(qm.attach(v, x), [x])
    y = jax.jit(qm.with_phase("eval").apply)(qv, x)
    xs = x
    if mode == "int":  # the calibrated affine int8 input, fake-quantized in NumPy
        qp = qv["quant_stats"]["input_qparams"]
        s, z = np.float32(qp["scale"]), np.float32(qp["zero_point"])
        xs = (np.clip(np.round(x / s) + z, -128, 127) - z) * s
    ref = xs.astype(np.float64) @ _np_block_int4(w, 8) + np.asarray(v["params"]["bias"])
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    class Net(nnx.Module):
        def __init__(self):
            self.dense = nnx.Linear(16, 3, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.dense(x)

    net = Net()
    net.dense.kernel.value, net.dense.bias.value = w, v["params"]["bias"]
    qn_model, _ = qn.quantize_model(net, rule)
    qn.calibrate(qn_model, [x])
    qn.set_phase(qn_model, "eval")
    np.testing.assert_allclose(qn_model(x), y, rtol=1e-6, atol=1e-6)


def test_block_rule_with_lsq_learns_one_step_per_block():
    import flax.linen as nn
    import jax

    from jquant.nn import linen as ql

    x = np.random.default_rng(1).normal(size=(4, 16)).astype(np.float32)
    rule = QuantRule(".*", weight="int4", act=None, block_size=4, estimator="lsq")
    qm, _ = ql.quantize_model(nn.Dense(3), rule, x)
    v = qm.calibrate(qm.attach(nn.Dense(3).init(jax.random.key(0), x), x), [x])
    assert v["params"]["kernel_scale"].shape == (4, 3)  # 16 / 4 blocks x 3 channels
    g = jax.grad(lambda p: qm.with_phase("train").apply(v | {"params": p}, x).sum())(v["params"])
    assert g["kernel_scale"].shape == (4, 3) and np.all(np.isfinite(g["kernel_scale"]))
    assert np.any(g["kernel_scale"] != 0)


# --- block-wise activations ---------------------------------------------------------------------


def _np_act_block_fq(x, b, lo, hi):
    """NumPy oracle: affine int8 of ``x`` (tokens, features), one ``(lo, hi)`` per block of
    ``b`` features (``lo`` / ``hi`` of shape (blocks,) or (tokens, blocks)), from the formula
    ``s = (hi - lo) / 255``, ``z = clip(round(-128 - lo / s))``."""
    lo, hi = np.minimum(lo, 0).astype(np.float32), np.maximum(hi, 0).astype(np.float32)
    s = ((hi - lo) / np.float32(255)).astype(np.float32)
    z = np.clip(np.round(np.float32(-128) - lo / s), -128, 127)
    s, z = np.repeat(s, b, axis=-1), np.repeat(z, b, axis=-1)
    return (np.clip(np.round(x / s) + z, -128, 127) - z) * s


def _np_int8_per_channel(w):
    s = np.abs(w).max(0, keepdims=True) / np.float32(127)
    return np.clip(np.round(w / s), -127, 127) * s


class _TinyNNX:
    """An nnx.Linear(16, 3) holding given weights, inside a module (path "dense")."""

    @staticmethod
    def build(w, bias):
        from flax import nnx

        class Net(nnx.Module):
            def __init__(self):
                self.dense = nnx.Linear(16, 3, rngs=nnx.Rngs(0))

            def __call__(self, x):
                return self.dense(x)

        net = Net()
        net.dense.kernel.value, net.dense.bias.value = w, bias
        return net


@pytest.mark.parametrize("act_scale", ["static", "dynamic_per_token"])
def test_block_activations_on_a_dense_match_numpy_linen_and_nnx_simulate_and_int(act_scale):
    """One int8 range per block of 8 input features: calibrated over the stream (static) or
    per token (dynamic). Linen simulate is the NumPy oracle; NNX in int mode (an int32
    partial sum per block, scaled and summed in float) equals it to float tolerance."""
    import flax.linen as nn
    import jax

    from jquant.nn import linen as ql
    from jquant.nn import nnx as qn

    rng = np.random.default_rng(3)
    x = rng.standard_t(3, size=(4, 16)).astype(np.float32)  # heavy tails: blocks differ
    batches = [x, 2.0 * x[::-1]]
    dense = nn.Dense(3)
    v = dense.init(jax.random.key(0), x)
    w, bias = np.asarray(v["params"]["kernel"]), np.asarray(v["params"]["bias"])
    rule = QuantRule(".*", act_block_size=8, act_scale=act_scale)
    qm, _ = ql.quantize_model(dense, rule, x)
    qv = qm.calibrate(qm.attach(v, x), batches)
    y = np.asarray(jax.jit(qm.with_phase("eval").apply)(qv, x))
    whole = np.concatenate(batches).reshape(-1, 2, 8)
    # calibration records the stream's range per block, over every token, in both cases
    wlo, whi = np.minimum(whole.min((0, 2)), 0), np.maximum(whole.max((0, 2)), 0)
    stored = qv["quant_stats"]["input_qparams"]["scale"]
    assert np.shape(stored) == (1, 2)  # one calibrated scale per block of 8 features
    np.testing.assert_allclose(stored[0], (whi - wlo) / 255, rtol=1e-6)
    if act_scale == "static":
        lo, hi = wlo, whi
    else:  # each token's own range per block
        lo, hi = x.reshape(4, 2, 8).min(2), x.reshape(4, 2, 8).max(2)
    ref = _np_act_block_fq(x, 8, lo, hi).astype(np.float64) @ _np_int8_per_channel(w) + bias
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)

    int_model = ql.quantize_model(dense, replace(rule, mode="int"), x)[0].with_phase("eval")
    jaxpr = str(jax.make_jaxpr(int_model.apply)(qv, x))
    assert jaxpr.count("preferred_element_type=int32") == 1  # one batched int8 product
    qnet, _ = qn.quantize_model(_TinyNNX.build(w, bias), replace(rule, mode="int"))
    qn.calibrate(qnet, batches)
    qn.with_phase(qnet, "eval")
    np.testing.assert_allclose(qnet(x), y, rtol=1e-5, atol=1e-5)


def test_act_quant_block_wise_is_the_numpy_block_quantizer_with_a_partial_last_block():
    """ActQuant with act_block_size=5 on 12 features: blocks of 5, 5 and 2 features, each
    fake-quantized with its own calibrated int8 range (NumPy, block by block)."""
    import jax

    from jquant.nn import linen as ql

    x = np.random.default_rng(5).standard_t(3, size=(4, 12)).astype(np.float32)
    layer = ql.ActQuant(rule=QuantRule(".*", act_block_size=5), phase="calibrate")
    v = layer.init(jax.random.key(0), x)
    _, upd = layer.apply(v, x, mutable=["quant_stats"])
    y = layer.clone(phase="eval").apply({**v, **upd}, x)
    ref = np.concatenate(
        [
            _np_act_block_fq(
                x[:, a:b], b - a, x[:, a:b].min(keepdims=True)[0], x[:, a:b].max(keepdims=True)[0]
            )
            for a, b in ((0, 5), (5, 10), (10, 12))
        ],
        axis=1,
    )
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # ~15-20 s on the loaded 2-core machine; a sibling test stays default
def test_dynamic_per_token_activations_run_in_int_mode_as_in_simulate():
    """act_scale='dynamic_per_token' (without blocks) in mode='int': the int8 product with each
    token's own scale equals the simulated one."""
    import flax.linen as nn
    import jax

    from jquant.nn import linen as ql

    x = np.random.default_rng(6).normal(size=(3, 16)).astype(np.float32)
    ys = []
    for mode in ("simulate", "int"):
        qm, _ = ql.quantize_model(
            nn.Dense(4), QuantRule(".*", act_scale="dynamic_per_token", mode=mode), x
        )
        v = qm.calibrate(qm.attach(nn.Dense(4).init(jax.random.key(0), x), x), [x])
        ys.append(qm.with_phase("eval").apply(v, x))
    np.testing.assert_allclose(ys[1], ys[0], rtol=1e-5, atol=1e-5)
    jaxpr = str(jax.make_jaxpr(qm.with_phase("eval").apply)(v, x))
    assert "preferred_element_type=int32" in jaxpr  # the int8 x int8 -> int32 product ran


def test_block_activations_calibrated_by_a_histogram_are_the_observer_on_each_block():
    """Static block ranges from a histogram method (NNX): each block's stored QParams are those
    of the per-tensor Percentile observer fed that block's features alone."""
    import jax.numpy as jnp

    from jquant import calibration as cal
    from jquant.nn import nnx as qn
    from jquant.quant import qparams_from_range

    rng = np.random.default_rng(4)
    batches = [rng.standard_t(3, size=(4, 16)).astype(np.float32) * k for k in (1.0, 3.0)]
    method = cal.Percentile(99.0, num_bins=64)
    rule = QuantRule(".*", act_block_size=8, calibration=method)
    qnet, _ = qn.quantize_model(_TinyNNX.build(np.ones((16, 3), np.float32), np.zeros(3)), rule)
    qn.calibrate(qnet, batches)
    stored = qnet.dense.input_qparams.value
    for blk in range(2):
        state = method.init(batches[0][:, :8])
        for x in batches:
            state = method.update(x[:, 8 * blk : 8 * blk + 8], state)
        lo, hi = method.bounds(state, rule.act)
        want = qparams_from_range(jnp.asarray(lo), jnp.asarray(hi), rule.act)
        np.testing.assert_allclose(stored["scale"][0, blk], want.scale, rtol=1e-6)
        np.testing.assert_allclose(stored["zero_point"][0, blk], want.zero_point)


def test_block_activation_rule_validation_and_config():
    from jquant import mx

    cfg = QuantRule(".*", act_block_size=32).act_config()
    assert (cfg.block_size, cfg.block_axis, cfg.axis) == (32, -1, None)
    assert QuantRule(".*").act_config().block_size is None
    assert QuantRule(".*", act_block_size=8, block_size=8, mode="int").blockwise()
    bad = [
        (dict(act_block_size=0), "act_block_size must be None or a positive int"),
        (dict(act_block_size=8, act=None), "act is None"),
        (dict(act_block_size=8, act=mx.get_block_format("mxfp8_e4m3")), "its own blocks"),
        (dict(act_block_size=8, estimator="lsq"), "learns one scale per tensor"),
        (dict(act_block_size=8, block_size=16, mode="int"), "must be the same size"),
        (dict(act_block_size=8, requant="double"), "block-wise activation scales"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            QuantRule(".*", **kwargs)

    class PerTensorOnly:  # a user-defined observer without observer(axis=...)
        def __init__(self):
            from jquant import calibration as cal

            self._obs = cal.running_minmax()
            self.init, self.update = self._obs.init, self._obs.update
            self.result, self.bounds = self._obs.result, self._obs.bounds

    with pytest.raises(ValueError, match="QuantRule.calibration .* no per-axis"):
        QuantRule(".*", act_block_size=8, calibration=PerTensorOnly())
    # dynamic block ranges need no calibration per block
    QuantRule(".*", act_block_size=8, calibration=PerTensorOnly(), act_scale="dynamic_per_token")


def test_pooling_refuses_block_wise_activations():
    import jax

    from jquant.nn import linen as ql

    pool = ql.QAvgPool((2, 2), rule=QuantRule(".*", act_block_size=2), phase="eval")
    with pytest.raises(ValueError, match="pooling keeps its input's per-tensor QParams"):
        pool.init(jax.random.key(0), np.ones((1, 4, 4, 4), np.float32))


@pytest.mark.parametrize(
    "rule, match",
    [
        (QuantRule(".*", weight="int4", block_size=8), r"layer '.*' has block-wise weight scales"),
        (
            QuantRule(".*", act_block_size=8),
            r"layer '.*' has block-wise activation scales \(act_block_size=8\)",
        ),
        (QuantRule(".*", weight="mxfp4"), r"layer '.*' uses the block format\(s\) \['mxfp4'\]"),
    ],
)
def test_convert_refuses_block_wise_layers_naming_the_layer(rule, match):
    import jax
    import jax.numpy as jnp

    from jquant import convert as C
    from jquant.models.config import MLPConfig
    from jquant.models.linen import MLP
    from jquant.nn import linen as ql
    from jquant.quant import QParams

    model = MLP(MLPConfig(hidden=(8,), num_classes=3))
    x = np.random.default_rng(2).normal(size=(4, 16)).astype(np.float32)
    qm, _ = ql.quantize_model(model, rule, x)
    v = qm.calibrate(qm.attach(model.init(jax.random.key(0), x), x), [x])
    with pytest.raises(ValueError, match=match):
        C.convert(qm, v, x[:1], output_qparams=QParams(jnp.float32(0.1), jnp.float32(0)))
