"""Tests of jquant.models.gpt: Linen/NNX parity, attention against NumPy, KV-cache generation,
training on the text corpus (short here; the full recipe is slow)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant import data, ptq
from jquant.data import text
from jquant.models import config as config_lib
from jquant.models import gpt, linen, train
from jquant.models import nnx as nnx_models
from jquant.nn.einsum import QuantActEinsum
from jquant.nn.linen import quantize_model as quantize_linen
from jquant.nn.nnx import QActEinsum
from jquant.nn.nnx import quantize_model as quantize_nnx
from jquant.nn.nnx import quantized_layers as quantized_layers_nnx
from jquant.nn.nnx import with_phase as nnx_with_phase
from jquant.nn.rules import QuantRule
from jquant.sweep.sensitivity import layer_paths

TINY = config_lib.GPTConfig(vocab_size=13, context=16, num_layers=2, num_heads=2, width=16)


def _variables(cfg, seed=0):
    return gpt.GPT(cfg).init(jax.random.key(seed), jnp.zeros((1, cfg.context), jnp.int32))


def _tokens(cfg, shape, seed=1):
    return jax.random.randint(jax.random.key(seed), shape, 0, cfg.vocab_size)


def test_causal_attention_against_numpy():
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
    want = np.zeros_like(q)
    for b in range(2):
        for h in range(3):
            for i in range(5):
                s = np.array([q[b, i, h] @ k[b, j, h] / 2.0 for j in range(i + 1)])
                p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                want[b, i, h] = p @ v[b, : i + 1, h]
    got = gpt.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # queries at positions 2..4 against all five keys: the last three rows
    np.testing.assert_allclose(
        gpt.causal_attention(jnp.asarray(q[:, 2:]), jnp.asarray(k), jnp.asarray(v), 2),
        want[:, 2:],
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("tied", [True, False])
def test_linen_and_nnx_share_parameters_and_outputs(tied):
    cfg = dataclasses.replace(TINY, tied_embeddings=tied)
    variables = _variables(cfg)
    names = set(variables["params"])
    assert names == {"embed", "pos_embed", "block1", "block2", "norm"} | (
        {"head"} if not tied else set()
    )
    assert set(variables["params"]["block1"]["attn"]) == {"query", "key", "value", "out"}
    model = nnx_models.linen_to_nnx(variables, gpt.NNXGPT(cfg, rngs=nnx.Rngs(1)))
    tokens = _tokens(cfg, (2, 16))
    np.testing.assert_allclose(
        model(tokens), gpt.GPT(cfg).apply(variables, tokens), rtol=1e-5, atol=1e-6
    )


def test_logits_are_causal():
    variables = _variables(TINY)
    tokens = _tokens(TINY, (1, 16))
    changed = tokens.at[0, 10:].set((tokens[0, 10:] + 1) % TINY.vocab_size)
    a, b = (gpt.GPT(TINY).apply(variables, t) for t in (tokens, changed))
    np.testing.assert_array_equal(a[:, :10], b[:, :10])
    assert not np.allclose(a[:, 10:], b[:, 10:])


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_kv_cache_generation_equals_the_full_forward(framework):
    variables = _variables(TINY)
    prompt = _tokens(TINY, (2, 5))
    if framework == "linen":
        model, kwargs = gpt.GPT(TINY), {"variables": variables}
        forward = lambda t: model.apply(variables, t)
    else:
        model, kwargs = nnx_models.linen_to_nnx(variables, gpt.NNXGPT(TINY, rngs=nnx.Rngs(0))), {}
        forward = model
    for temperature, key in ((0.0, None), (1.0, jax.random.key(2))):
        out = gpt.generate(model, prompt, 11, temperature=temperature, key=key, **kwargs)
        assert out.tokens.shape == (2, 16) and out.logits.shape == (2, 11, 13)
        np.testing.assert_array_equal(out.tokens[:, :5], prompt)
        full = forward(out.tokens[:, :-1])  # no cache: every position at once
        np.testing.assert_allclose(out.logits, full[:, 4:], rtol=1e-5, atol=1e-5)
        if temperature == 0.0:
            np.testing.assert_array_equal(out.tokens[:, 5:], jnp.argmax(out.logits, -1))


def test_cache_calls_compose():
    """Prefill 6 tokens, then 4 + 6 more: the logits equal one call on all 16."""
    model, variables = gpt.GPT(TINY), _variables(TINY)
    tokens = _tokens(TINY, (2, 16))
    cache = gpt.init_cache(TINY, 2)
    parts = []
    for lo, hi in ((0, 6), (6, 10), (10, 16)):
        logits, cache = model.apply(variables, tokens[:, lo:hi], cache=cache)
        parts.append(logits)
    assert int(cache.length) == 16
    np.testing.assert_allclose(
        jnp.concatenate(parts, 1), model.apply(variables, tokens), rtol=1e-5, atol=1e-5
    )


def test_zoo_registration():
    cfg = config_lib.model_config("gpt", (128,), 103)
    assert cfg == config_lib.GPTConfig(vocab_size=103, context=128)
    assert (cfg.num_layers, cfg.num_heads, cfg.width) == (4, 4, 128)
    assert isinstance(linen.make_model("gpt", (32,), 50), gpt.GPT)
    model = nnx.eval_shape(lambda: nnx_models.make_model("gpt", (32,), 50, rngs=nnx.Rngs(0)))
    assert isinstance(model, gpt.NNXGPT) and model.pos_embed.shape == (32, 128)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: config_lib.GPTConfig(num_heads=3), ValueError, "num_heads must divide"),
        (lambda: config_lib.GPTConfig(context=0), TypeError, "context"),
        (lambda: config_lib.model_config("gpt", (8, 1), 10), ValueError, "input_shape"),
        (lambda: gpt.GPT(TINY).apply(_variables(TINY), jnp.zeros((1, 17), jnp.int32)),
         ValueError, "context"),
        (lambda: gpt.GPT(TINY).apply(_variables(TINY), jnp.zeros((1, 4))), TypeError, "tokens"),
        (lambda: gpt.generate(gpt.GPT(TINY), jnp.zeros((1, 8), jnp.int32), 9,
                              variables=_variables(TINY)), ValueError, "context"),
        (lambda: gpt.generate(gpt.GPT(TINY), jnp.zeros((1, 2), jnp.int32), 3,
                              variables=_variables(TINY), temperature=1.0), ValueError, "key"),
        (lambda: gpt.generate(gpt.GPT(TINY), jnp.zeros((1, 2), jnp.int32), 3), TypeError,
         "variables"),
        (lambda: gpt.init_cache(TINY, 0), ValueError, "batch"),
    ],
)  # fmt: skip
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_short_training_learns_more_than_character_frequencies():
    """A tiny GPT, 80 steps on 32-character windows: validation loss below the unigram
    entropy of the validation text (what a model of character frequencies alone reaches)."""
    ds = data.load("text", context=32)
    cfg = config_lib.GPTConfig(vocab_size=ds.num_classes, context=32, num_layers=1, width=32)
    model = gpt.GPT(cfg)
    params, state = train.split_linen(model.init(jax.random.key(0), ds.x_train[:1]))
    opt = train.make_optimizer(1e-2, 80)
    step = train.make_train_step(train.linen_apply_fn(model), opt)
    final, _ = train.fit(
        step, train.TrainState.create(params, state, opt), ds.x_train, ds.y_train,
        steps=80, batch_size=32, key=jax.random.key(1),
    )  # fmt: skip
    apply_fn = train.linen_apply_fn(model)
    loss = train.evaluate(apply_fn, final.params, {}, ds.x_test, ds.y_test)["loss"]
    assert loss < text.unigram_entropy(ds.ids_test, ds.num_classes) < math.log(ds.num_classes)


@pytest.mark.slow  # trains the zoo GPT (about 30 s on a loaded machine)
def test_train_or_load_caches_the_zoo_gpt(tmp_path):
    """The zoo path: model_config("gpt") from the text data, float training, the weights
    cache with its checksum (a second call loads, with the same metrics)."""
    ds = data.load("text", context=16, stride=64)
    first = train.train_or_load("gpt", ds, 0, 2, batch_size=4, cache=tmp_path)
    assert isinstance(first.model, gpt.GPT) and first.model.config.context == 16
    assert set(first.metrics) >= {"test_loss", "test_accuracy", "train_seconds"}
    again = train.train_or_load("gpt", ds, 0, 2, batch_size=4, cache=tmp_path)
    assert again.metrics == first.metrics
    assert len(list((tmp_path / "models").glob("gpt-text-*.msgpack"))) == 1


@pytest.mark.slow
def test_recipe_beats_the_bigram_baseline_by_0_8_nats(tmp_path):
    """The zoo GPT (4 layers, 4 heads, width 128, context 128) trained with
    :data:`gpt.TRAIN_RECIPE`: validation loss <= bigram entropy - 0.8 nats/char."""
    ds = data.load("text")
    trained = train.train_or_load("gpt", ds, 0, cache=tmp_path, **gpt.TRAIN_RECIPE)
    baseline = text.bigram_entropy(ds.ids_train, ds.num_classes)
    loss = trained.metrics["test_loss"]
    print(
        f"validation {loss:.3f} nats/char, perplexity {math.exp(loss):.2f}, bigram "
        f"{baseline:.3f}; trained in {trained.metrics['train_seconds']:.0f} s (with compiles)"
    )
    assert loss <= baseline - 0.8


def _numpy_kv_int8(x):
    """Symmetric int8 per (batch, token, head): scale = max|x| / 127 over head_dim."""
    x = np.asarray(x, np.float64)
    scale = np.abs(x).max(-1, keepdims=True) / 127.0
    scale = np.where(scale > 0, scale, 1.0)
    return scale * np.clip(np.round(x / scale), -128, 127)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_int8_kv_cache_generation_equals_the_forward_with_fake_quantized_kv(framework):
    variables = _variables(TINY)
    kv = ptq.kv_fake_quant(jq.int8)
    x = jax.random.normal(jax.random.key(5), (2, 7, 2, 8))
    np.testing.assert_allclose(kv(x), _numpy_kv_int8(x), rtol=1e-6, atol=1e-7)
    prompt = _tokens(TINY, (2, 4))
    if framework == "linen":
        model, kwargs = gpt.GPT(TINY), {"variables": variables}
        forward = lambda t, **kw: model.apply(variables, t, **kw)
    else:
        model, kwargs = nnx_models.linen_to_nnx(variables, gpt.NNXGPT(TINY, rngs=nnx.Rngs(0))), {}
        forward = model
    out = gpt.generate(model, prompt, 12, kv_transform=kv, **kwargs)
    quantized = forward(out.tokens[:, :-1], kv_transform=kv)[:, 3:]
    np.testing.assert_allclose(out.logits, quantized, rtol=1e-5, atol=1e-5)
    floating = forward(out.tokens[:, :-1])[:, 3:]
    gap = float(jnp.max(jnp.abs(out.logits - floating)))
    assert 0.0 < gap < 1e-2  # int8 K/V moves the logits, slightly


def _numpy_per_token(x, bits):
    """Symmetric fake-quant with one scale per vector along the last axis (NumPy)."""
    x = np.asarray(x, np.float64)
    qmax = 2 ** (bits - 1) - 1
    scale = np.abs(x).max(-1, keepdims=True) / qmax
    scale = np.where(scale > 0, scale, 1.0)
    return scale * np.clip(np.round(x / scale), -qmax - 1, qmax)


def _attention_rule(bits):
    return QuantRule(
        ".*/attn/(scores|mix)",
        weight=None,
        act=jq.IntFormat(bits),
        act_symmetric=True,
        act_scale="dynamic_per_token",
    )


def test_quant_act_einsum_matches_numpy_per_token_fake_quant():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(2, 5, 3, 4)), rng.normal(size=(2, 6, 3, 4))
    op = QuantActEinsum(_attention_rule(4), "eval")
    got = op(gpt.SCORES, jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
    want = np.einsum(gpt.SCORES, _numpy_per_token(a, 4), _numpy_per_token(b, 4))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (
        float(
            jnp.max(
                jnp.abs(
                    QuantActEinsum(_attention_rule(4), "float")(
                        gpt.SCORES, jnp.asarray(a), jnp.asarray(b)
                    )
                    - np.einsum(gpt.SCORES, a, b)
                )
            )
        )
        < 1e-5
    )


def test_rules_quantize_the_attention_products():
    model, variables = gpt.GPT(TINY), _variables(TINY)
    tokens = _tokens(TINY, (2, TINY.context))
    reference = model.apply(variables, tokens)
    gaps = {}
    for bits in (8, 2):
        qmodel, match = quantize_linen(model, _attention_rule(bits), tokens, on_unused="raise")
        quantized = [p for p, r in match.assignment.items() if r is not None]
        assert quantized == [f"block{i}/attn/{n}" for i in (1, 2) for n in ("scores", "mix")]
        qvars = qmodel.attach(variables, tokens)
        np.testing.assert_array_equal(qmodel.apply(qvars, tokens), reference)  # float phase
        logits = qmodel.with_phase("eval").apply(qvars, tokens)
        gaps[bits] = float(jnp.max(jnp.abs(logits - reference)))
    assert 0.0 < gaps[8] < 0.02 < 0.1 < gaps[2]
    static = QuantRule(".*/attn/scores", weight=None, act="int8")
    with pytest.raises(ValueError, match="act_scale.*block1/attn/scores"):
        quantize_linen(model, static, tokens)


def _nnx_gpt(cfg, variables):
    return nnx_models.linen_to_nnx(variables, gpt.NNXGPT(cfg, rngs=nnx.Rngs(0)))


def test_nnx_rules_quantize_the_attention_products_as_linen():
    """Same weights and rules (int4 per-token attention products; int4 weights and dynamic
    int8 inputs elsewhere): the NNX GPT computes the Linen GPT's quantized logits, with no
    calibration (dynamic ranges only), and its report lists scores and mix."""
    variables, tokens = _variables(TINY), _tokens(TINY, (2, TINY.context))
    dense = QuantRule(".*", weight="int4", act_symmetric=True, act_scale="dynamic_per_token")
    rules = (_attention_rule(4), dense)
    qmodel, _ = quantize_linen(gpt.GPT(TINY), rules, tokens, on_unused="raise")
    want = qmodel.with_phase("eval").apply(qmodel.attach(variables, tokens), tokens)
    float_nnx = _nnx_gpt(TINY, variables)
    qnnx, match = quantize_nnx(float_nnx, rules, on_unused="raise")
    products = {f"block{i}/attn/{n}" for i in (1, 2) for n in ("scores", "mix")}
    assert {p for p, r in match.assignment.items() if r is rules[0]} == products
    assert match.not_quantized == {}
    injected = [m.quant_path for _, m in nnx.iter_graph(qnnx) if isinstance(m, QActEinsum)]
    assert set(injected) == products
    got = nnx_with_phase(qnnx, "eval")(tokens)  # no calibration: dynamic ranges only
    for m in (qnnx.block1.attn.scores, qnnx.block2.attn.mix):
        assert isinstance(m.einsum, QActEinsum) and m.einsum.phase == "eval"
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    static = QuantRule(".*/attn/mix", weight=None, act="int8")
    with pytest.raises(ValueError, match="act_scale.*block1/attn/mix"):
        quantize_nnx(float_nnx, static)


def test_quantized_layers_list_the_attention_products_in_linen_and_nnx():
    """Both APIs list scores and mix (no kernel, lhs / rhs in the rule's format with dynamic
    per-token scales) beside the Dense layers; kept float (keep_float, or act=None) they are
    left out, as a kept-float Dense is; sensitivity counts only the layers with kernels."""
    variables, tokens = _variables(TINY), _tokens(TINY, (2, TINY.context))
    dense = QuantRule(".*", weight="int4", act_symmetric=True, act_scale="dynamic_per_token")
    products = {f"block{i}/attn/{n}" for i in (1, 2) for n in ("scores", "mix")}
    kernels = {f"block{i}/{n}" for i in (1, 2) for n in ptq.model.QKV + ("attn/out",)}
    kernels |= {f"block{i}/mlp/{n}" for i in (1, 2) for n in ("up", "down")}
    float_products = (
        QuantRule(r".*/(scores|mix)$", keep_float=True),
        QuantRule(r".*/(scores|mix)$", weight="int8", act=None),
    )
    float_nnx = _nnx_gpt(TINY, variables)
    for first, listed in [(_attention_rule(4), products), *((r, set()) for r in float_products)]:
        rules = (first, dense)
        qmodel, _ = quantize_linen(gpt.GPT(TINY), rules, tokens, on_unused="raise")
        linen = {q.path: q for q in qmodel.quantized_layers(variables)}  # dynamic: no stats
        qnnx, _ = quantize_nnx(float_nnx, rules, on_unused="raise")
        layers = {q.path: q for q in quantized_layers_nnx(qnnx)}
        assert set(linen) == set(layers) == kernels | listed
        for path, q in layers.items():
            other = linen[path]
            assert q.rule == other.rule == (first if path in products else dense)
            assert q.operands == other.operands and q.has_kernel == (path in kernels)
            if path in kernels:  # the Linen and NNX entries of a Dense hold the same kernel
                np.testing.assert_array_equal(q.kernel, other.kernel)
                assert q.operands[1] == ("kernel", jq.IntFormat(4), "per_channel", None)
                continue
            assert q[2:] == other[2:] == (None, None, None, None)  # no kernel, bias, QParams
            lhs, rhs = q.operands
            assert lhs == ("lhs", jq.IntFormat(4), "dynamic_per_token", None)
            assert rhs == ("rhs", jq.IntFormat(4), "dynamic_per_token", None)
            assert q.describe().startswith(f"{path}: lhs ") and "; no kernel;" in q.describe()
        assert layer_paths(gpt.GPT(TINY), rules, tokens) == [
            p for p, q in linen.items() if q.has_kernel
        ]


def _numpy_block_fq(w, block, bits):
    """Symmetric fake-quant of a Dense kernel ``(in, out)``: one scale per output column and
    block of ``block`` consecutive inputs, ``s = max|w| / qmax`` (NumPy, float64)."""
    w, qmax = np.asarray(w, np.float64), 2 ** (bits - 1) - 1
    wb = w.reshape(w.shape[0] // block, block, w.shape[1])
    s = np.abs(wb).max(1, keepdims=True) / qmax
    s = np.where(s > 0, s, 1.0)
    return (s * np.clip(np.round(wb / s), -qmax - 1, qmax)).reshape(w.shape)


def _numpy_perplexity(logits, y):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return math.exp(-np.take_along_axis(logp, np.asarray(y)[..., None], -1).mean())


@pytest.mark.parametrize(
    "acts",
    [pytest.param(False, id="w4"), pytest.param(True, id="w4a8", marks=pytest.mark.slow)],
)
def test_block_wise_int4_weight_rules_on_the_linen_and_nnx_gpt(acts):
    """``QuantRule(".*", weight="int4", block_size=32)``, weight-only (``w4``) and with
    dynamic per-token int8 activations (``w4a8``): Linen and NNX give the same logits and a
    finite perplexity; weight-only equals the float GPT whose kernels are NumPy
    block-fake-quantized, and one NNX kernel (read through the layer on the identity) is that
    NumPy kernel, not the per-channel one."""
    cfg = config_lib.GPTConfig(vocab_size=13, context=8, num_layers=1, num_heads=2, width=64)
    variables, x, y = _variables(cfg), _tokens(cfg, (2, 8), seed=3), _tokens(cfg, (2, 8), seed=4)
    rule = QuantRule(".*", weight="int4", act=None, block_size=32)
    if acts:
        rule = dataclasses.replace(
            rule, act="int8", act_symmetric=True, act_scale="dynamic_per_token"
        )
    assert rule.weight_granularity == "per_block"
    fq_params = jax.tree_util.tree_map_with_path(
        lambda path, a: _numpy_block_fq(a, 32, 4) if path[-1].key == "kernel" else a,
        variables["params"],
    )
    oracle = gpt.GPT(cfg).apply({"params": fq_params}, x)  # float GPT, NumPy block kernels
    qmodel, _ = quantize_linen(gpt.GPT(cfg), rule, x, on_unused="raise")
    linen_logits = qmodel.with_phase("eval").apply(qmodel.attach(variables, x), x)
    qnnx, match = quantize_nnx(_nnx_gpt(cfg, variables), rule, on_unused="raise")
    assert match.not_quantized == {}
    nnx_logits = nnx_with_phase(qnnx, "eval")(x)  # dynamic ranges: no calibration needed
    np.testing.assert_allclose(nnx_logits, linen_logits, rtol=1e-5, atol=1e-5)
    assert all(math.isfinite(_numpy_perplexity(z, y)) for z in (linen_logits, nnx_logits))
    gap = float(jnp.max(jnp.abs(linen_logits - oracle)))
    if acts:
        assert 1e-4 < gap < 0.1  # the int8 activations move the logits, slightly
        return
    np.testing.assert_allclose(linen_logits, oracle, rtol=1e-4, atol=1e-4)
    down = qnnx.block1.mlp.down  # kernel (256, 64): 8 blocks per output column
    got = down(jnp.eye(256))
    want = _numpy_block_fq(variables["params"]["block1"]["mlp"]["down"]["kernel"], 32, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(got - _numpy_block_fq(down.kernel.value, 256, 4))) > 1e-3


def _numpy_kv_per_channel(x, amax, bits):
    """Symmetric fake-quant with fixed per-(head, channel) ranges ``amax`` (NumPy)."""
    x, qmax = np.asarray(x, np.float64), 2 ** (bits - 1) - 1
    scale = np.where(amax > 0, np.asarray(amax, np.float64) / qmax, 1.0)
    return scale * np.clip(np.round(x / scale), -qmax - 1, qmax)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_per_channel_kv_cache_generation_equals_the_forward(framework):
    """Calibrated per-channel int4 K/V: the NumPy formula, and cached decoding computes the
    quantized forward's logits (the ranges are constants)."""
    variables = _variables(TINY)
    if framework == "linen":
        model, kwargs = gpt.GPT(TINY), {"variables": variables}
    else:
        model, kwargs = nnx_models.linen_to_nnx(variables, gpt.NNXGPT(TINY, rngs=nnx.Rngs(0))), {}
    ranges = ptq.kv_ranges(model, [_tokens(TINY, (2, 16), seed=s) for s in (7, 8)], **kwargs)
    assert ranges.keys.shape == ranges.values.shape == (2, 2, 8)
    kv = ptq.kv_fake_quant(jq.int4, granularity="per_channel", ranges=ranges)
    x = jax.random.normal(jax.random.key(5), (2, 7, 2, 8))
    want = _numpy_kv_per_channel(x, np.asarray(ranges.values[1]), 4)
    np.testing.assert_allclose(kv(x, 1, "value"), want, rtol=1e-6, atol=1e-6)
    forward, state = gpt.forward_fn(model, kwargs.get("variables"))
    out = gpt.generate(model, _tokens(TINY, (2, 4)), 10, kv_transform=kv, **kwargs)
    quantized = forward(state, out.tokens[:, :-1], kv_transform=kv)[:, 3:]
    np.testing.assert_allclose(out.logits, quantized, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(out.logits - forward(state, out.tokens[:, :-1])[:, 3:]))) > 0


def test_perplexity_matches_numpy_and_int8_kv_stays_close():
    model, variables = gpt.GPT(TINY), _variables(TINY)
    x, y = _tokens(TINY, (5, 16), seed=3), _tokens(TINY, (5, 16), seed=4)
    logits = np.asarray(model.apply(variables, x), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    want = math.exp(-np.take_along_axis(logp, np.asarray(y)[..., None], -1).mean())
    ppl = gpt.perplexity(model, x, y, variables=variables, batch_size=2)  # padded last batch
    assert ppl == pytest.approx(want, rel=1e-5)
    ppl = {
        bits: gpt.perplexity(
            model, x, y, variables=variables, kv_transform=ptq.kv_fake_quant(jq.IntFormat(bits))
        )
        for bits in (8, 2)
    }
    assert abs(ppl[8] - want) / want < 1e-3 < abs(ppl[2] - want) / want
