"""A small decoder-only transformer (Linen and NNX) on token ids, with a KV-cache ``generate``.

The architecture is :class:`~jquant.models.config.GPTConfig`'s: pre-RMSNorm blocks, causal
multi-head attention written with ``einsum``, a GELU MLP, tied or untied embeddings, no
biases. Both frameworks build the same parameter tree (``embed/embedding``, ``pos_embed``,
``block1/attn/query/kernel``, ``block1/mlp/up/kernel``, ``block1/norm1/scale``, ...), so
:func:`jquant.models.nnx.linen_to_nnx` copies Linen variables into the NNX model.

A model is called as ``model(tokens)`` -> logits ``(B, n, vocab)`` for positions ``0..n-1``,
or as ``model(tokens, cache=cache)`` -> ``(logits, cache)``: the tokens sit at positions
``cache.length ..`` and attend to every earlier key and value kept in the cache (incremental
decoding). :func:`generate` runs that loop under ``jit``.

>>> import jax, jax.numpy as jnp
>>> cfg = GPTConfig(vocab_size=11, context=8, num_layers=1, num_heads=2, width=16)
>>> model = GPT(cfg)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
>>> model.apply(variables, jnp.zeros((2, 5), jnp.int32)).shape
(2, 5, 11)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jquant.models.config import GPTConfig

__all__ = [
    "GPT",
    "Generated",
    "KVCache",
    "KVTransform",
    "MLPTransform",
    "NNXGPT",
    "NNXProduct",
    "Product",
    "TRAIN_RECIPE",
    "causal_attention",
    "forward_fn",
    "generate",
    "init_cache",
    "perplexity",
]

EMBED_INIT = jax.nn.initializers.normal(0.02)
# ``kv_transform(x, layer, kind)`` maps the keys (kind "key") or values ("value")
# (B, n, heads, head_dim) of block ``layer`` (0-based) before they are used and cached.
KVTransform = Callable[[jax.Array, int, str], jax.Array]


# ``mlp_transform(h, layer)`` maps the MLP's hidden activation ``gelu(x W_up)``
# (B, n, mlp_ratio * width) of block ``layer`` (0-based) before ``down`` reads it.
MLPTransform = Callable[[jax.Array, int], jax.Array]


def _layer_mlp(mlp_transform: MLPTransform | None, layer: int):
    """``mlp_transform`` bound to one layer: ``h -> mlp_transform(h, layer)``."""
    if mlp_transform is None:
        return None
    return lambda h: mlp_transform(h, layer)


def _layer_kv(kv_transform: KVTransform | None, layer: int):
    """``kv_transform`` bound to one layer: ``(k, v) -> (t(k, layer, "key"), t(v, ...))``."""
    if kv_transform is None:
        return None
    return lambda k, v: (kv_transform(k, layer, "key"), kv_transform(v, layer, "value"))


class KVCache(NamedTuple):
    """Keys and values of every layer, ``(num_layers, B, context, heads, head_dim)``, and the
    number of positions written so far (``length``, an int32 scalar)."""

    keys: jax.Array
    values: jax.Array
    length: jax.Array


def init_cache(config: GPTConfig, batch: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty :class:`KVCache` for ``batch`` sequences of up to ``config.context`` tokens."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    shape = (config.num_layers, batch, config.context, config.num_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


SCORES = "bqhd,bkhd->bhqk"  # q k^T per head
MIX = "bhqk,bkhd->bqhd"  # softmax(scores) v per head
# ``product(a, b)`` of two activations: an attention einsum (SCORES or MIX)
ActProduct = Callable[[jax.Array, jax.Array], jax.Array]


def causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_start: Any = 0,
    *,
    scores: ActProduct | None = None,
    mix: ActProduct | None = None,
) -> jax.Array:
    """Multi-head causal attention ``softmax(q k^T / sqrt(d) + mask) v``.

    ``q`` is ``(B, n, H, d)`` at positions ``q_start + i``; ``k``, ``v`` are ``(B, m, H, d)``
    at positions ``j = 0..m-1``; query ``i`` sees key ``j`` iff ``j <= q_start + i`` (the mask
    adds ``-inf`` elsewhere). Returns ``(B, n, H, d)``.

    ``scores(q, k)`` and ``mix(p, v)`` are the two activation x activation products,
    ``einsum("bqhd,bkhd->bhqk", q, k)`` and ``einsum("bhqk,bkhd->bqhd", p, v)`` by default;
    the models pass their :class:`Product` modules so that quantization rules reach them.
    """
    if scores is None:
        scores = functools.partial(jnp.einsum, SCORES)
    if mix is None:
        mix = functools.partial(jnp.einsum, MIX)
    s = scores(q, k) / math.sqrt(q.shape[-1])
    q_pos = q_start + jnp.arange(q.shape[1])
    visible = jnp.arange(k.shape[1])[None, :] <= q_pos[:, None]
    s = jnp.where(visible, s, -jnp.inf)
    return mix(jax.nn.softmax(s, axis=-1), v)


def _start(tokens: jax.Array, cache: KVCache | None, context: int):
    """Position of ``tokens[:, 0]``; ValueError when the sequence would pass ``context``."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"tokens must be integer ids (B, n), got {tokens.dtype}{tokens.shape}")
    n = tokens.shape[1]
    if cache is None:
        if n > context:
            raise ValueError(f"tokens must hold at most context={context} positions, got {n}")
        return 0
    if not isinstance(cache.length, jax.core.Tracer) and int(cache.length) + n > context:
        raise ValueError(
            f"cache holds {int(cache.length)} positions; {n} more pass context={context}"
        )
    return cache.length


def _with_cache(k, v, layer_cache, start):
    """Writes ``k``, ``v`` at ``start`` into the layer's cache; returns the full keys/values."""
    kc, vc = layer_cache
    kc = jax.lax.dynamic_update_slice(kc, k.astype(kc.dtype), (0, start, 0, 0))
    vc = jax.lax.dynamic_update_slice(vc, v.astype(vc.dtype), (0, start, 0, 0))
    return kc, vc


def _split_cache(cache: KVCache | None, num_layers: int) -> list:
    if cache is None:
        return [None] * num_layers
    return [(cache.keys[i], cache.values[i]) for i in range(num_layers)]


def _join_cache(layers: list, start, n: int) -> KVCache:
    keys, values = zip(*layers, strict=True)
    return KVCache(jnp.stack(keys), jnp.stack(values), jnp.asarray(start + n, jnp.int32))


# ---------------------------------------------------------------------------------------- Linen


class Product(nn.Module):
    """``einsum(einsum_str, a, b)`` of two activations, a parameter-free module so that it
    has a path (``block1/attn/scores``, ``block1/attn/mix``).

    ``einsum`` (``jnp.einsum``'s signature) is the injection point, as ``dot_general=`` is
    Flax Dense's: ``jquant.nn.linen.quantize_model`` fills it with a quantized einsum.
    """

    einsum_str: str
    einsum: Callable[..., jax.Array] = jnp.einsum

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self.einsum(self.einsum_str, a, b)


class Attention(nn.Module):
    """``out(causal_attention(x Wq, x Wk, x Wv))`` with heads split from the projections;
    the attention products are the :class:`Product` modules ``scores`` and ``mix``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, layer_cache=None, start=0, kv=None):
        cfg = self.config
        b, n, _ = x.shape
        q, k, v = (
            nn.Dense(cfg.width, use_bias=False, name=name)(x).reshape(
                b, n, cfg.num_heads, cfg.head_dim
            )
            for name in ("query", "key", "value")
        )
        if kv is not None:  # the model's kv_transform bound to this layer (_layer_kv)
            k, v = kv(k, v)
        if layer_cache is not None:
            k, v = layer_cache = _with_cache(k, v, layer_cache, start)
        products = {"scores": Product(SCORES, name="scores"), "mix": Product(MIX, name="mix")}
        out = causal_attention(q, k, v, start, **products).reshape(b, n, cfg.width)
        return nn.Dense(cfg.width, use_bias=False, name="out")(out), layer_cache


class MLP(nn.Module):
    """``down(t(gelu(up(x))))``: widths ``width -> mlp_ratio * width -> width``; ``t`` is the
    optional ``transform`` of the hidden activation (identity when None), the model's
    ``mlp_transform`` bound to this layer (:func:`_layer_mlp`)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, transform=None):
        cfg = self.config
        h = nn.gelu(nn.Dense(cfg.mlp_ratio * cfg.width, use_bias=False, name="up")(x))
        if transform is not None:
            h = transform(h)
        return nn.Dense(cfg.width, use_bias=False, name="down")(h)


class Block(nn.Module):
    """``h + attn(norm1(h))``, then ``h + mlp(norm2(h))``, ``mlp(x) = gelu(x W_up) W_down``."""

    config: GPTConfig

    @nn.compact
    def __call__(self, h, layer_cache=None, start=0, kv=None, mlp=None):
        cfg = self.config
        a, layer_cache = Attention(cfg, name="attn")(
            nn.RMSNorm(cfg.rms_epsilon, name="norm1")(h), layer_cache, start, kv
        )
        h = h + a
        m = MLP(cfg, name="mlp")(nn.RMSNorm(cfg.rms_epsilon, name="norm2")(h), mlp)
        return h + m, layer_cache


class GPT(nn.Module):
    """The Linen GPT of :class:`GPTConfig`; see the module docstring for the call forms.

    ``mlp_transform(h, layer)`` (:data:`MLPTransform`, None: identity) maps every MLP's
    hidden activation before ``down``: part of the model's function (e.g. QuaRot's online
    Hadamard, whose inverse is folded into ``down``'s kernel, ``jquant.ptq.rotate_mlp``), so
    it is a field, kept by ``clone``, where ``kv_transform`` is a call argument.
    """

    config: GPTConfig = GPTConfig()
    mlp_transform: MLPTransform | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        *,
        train: bool = False,
        cache: KVCache | None = None,
        kv_transform: KVTransform | None = None,
    ):
        """Logits ``(B, n, vocab)`` of token ids ``(B, n)``; with ``cache``, ``(logits, cache)``.

        ``kv_transform(x, layer, kind)`` maps every layer's keys (``kind="key"``) and values
        (``"value"``) ``(B, n, heads, head_dim)`` before they are used or cached (e.g. a
        KV-cache quantizer, ``jquant.ptq.kv_fake_quant``);
        ``train`` is unused (no dropout).
        """
        del train
        cfg = self.config
        start = _start(tokens, cache, cfg.context)
        n = tokens.shape[1]
        embed = nn.Embed(cfg.vocab_size, cfg.width, embedding_init=EMBED_INIT, name="embed")
        pos = self.param("pos_embed", EMBED_INIT, (cfg.context, cfg.width))
        h = embed(tokens) + jax.lax.dynamic_slice_in_dim(pos, start, n)
        layers = _split_cache(cache, cfg.num_layers)
        for i in range(cfg.num_layers):
            block = Block(cfg, name=f"block{i + 1}")
            kv, mlp = _layer_kv(kv_transform, i), _layer_mlp(self.mlp_transform, i)
            h, layers[i] = block(h, layers[i], start, kv, mlp)
        h = nn.RMSNorm(cfg.rms_epsilon, name="norm")(h)
        if cfg.tied_embeddings:
            logits = embed.attend(h)
        else:
            logits = nn.Dense(cfg.vocab_size, use_bias=False, name="head")(h)
        return logits if cache is None else (logits, _join_cache(layers, start, n))


# ------------------------------------------------------------------------------------------ NNX


class NNXProduct(nnx.Module):
    """NNX twin of :class:`Product`: ``einsum(einsum_str, a, b)``; ``einsum`` is the injection
    point (``jquant.nn.nnx.quantize_model`` puts a quantized einsum there)."""

    def __init__(self, einsum_str: str, einsum: Callable[..., jax.Array] = jnp.einsum):
        self.einsum_str = einsum_str
        self.einsum = einsum

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        return self.einsum(self.einsum_str, a, b)


class NNXAttention(nnx.Module):
    """NNX twin of :class:`Attention`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.scores, self.mix = NNXProduct(SCORES), NNXProduct(MIX)
        for name in ("query", "key", "value", "out"):
            setattr(self, name, nnx.Linear(config.width, config.width, use_bias=False, rngs=rngs))

    def __call__(self, x, layer_cache=None, start=0, kv=None):
        cfg = self.config
        b, n, _ = x.shape
        q, k, v = (
            layer(x).reshape(b, n, cfg.num_heads, cfg.head_dim)
            for layer in (self.query, self.key, self.value)
        )
        if kv is not None:  # the model's kv_transform bound to this layer (_layer_kv)
            k, v = kv(k, v)
        if layer_cache is not None:
            k, v = layer_cache = _with_cache(k, v, layer_cache, start)
        out = causal_attention(q, k, v, start, scores=self.scores, mix=self.mix)
        return self.out(out.reshape(b, n, cfg.width)), layer_cache


class NNXMLP(nnx.Module):
    """NNX twin of :class:`MLP`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        hidden = config.mlp_ratio * config.width
        self.up = nnx.Linear(config.width, hidden, use_bias=False, rngs=rngs)
        self.down = nnx.Linear(hidden, config.width, use_bias=False, rngs=rngs)

    def __call__(self, x, transform=None):
        h = nnx.gelu(self.up(x))
        return self.down(h if transform is None else transform(h))


class NNXBlock(nnx.Module):
    """NNX twin of :class:`Block`."""

    def __init__(self, config: GPTConfig, *, rngs: nnx.Rngs):
        eps = config.rms_epsilon
        self.norm1 = nnx.RMSNorm(config.width, epsilon=eps, rngs=rngs)
        self.attn = NNXAttention(config, rngs=rngs)
        self.norm2 = nnx.RMSNorm(config.width, epsilon=eps, rngs=rngs)
        self.mlp = NNXMLP(config, rngs=rngs)

    def __call__(self, h, layer_cache=None, start=0, kv=None, mlp=None):
        a, layer_cache = self.attn(self.norm1(h), layer_cache, start, kv)
        h = h + a
        return h + self.mlp(self.norm2(h), mlp), layer_cache


class NNXGPT(nnx.Module):
    """The NNX GPT of :class:`GPTConfig`, called like :class:`GPT` (same parameter paths);
    ``mlp_transform`` as :class:`GPT`'s field."""

    def __init__(
        self,
        config: GPTConfig,
        *,
        rngs: nnx.Rngs,
        mlp_transform: MLPTransform | None = None,
    ):
        self.config = config
        self.mlp_transform = mlp_transform
        self.embed = nnx.Embed(
            config.vocab_size, config.width, embedding_init=EMBED_INIT, rngs=rngs
        )
        self.pos_embed = nnx.Param(EMBED_INIT(rngs.params(), (config.context, config.width)))
        for i in range(config.num_layers):
            setattr(self, f"block{i + 1}", NNXBlock(config, rngs=rngs))
        self.norm = nnx.RMSNorm(config.width, epsilon=config.rms_epsilon, rngs=rngs)
        if not config.tied_embeddings:
            self.head = nnx.Linear(config.width, config.vocab_size, use_bias=False, rngs=rngs)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        train: bool = False,
        cache: KVCache | None = None,
        kv_transform: KVTransform | None = None,
    ):
        """Logits ``(B, n, vocab)`` of token ids ``(B, n)``; with ``cache``, ``(logits, cache)``;
        ``kv_transform`` as in :class:`GPT`."""
        del train
        cfg = self.config
        start = _start(tokens, cache, cfg.context)
        n = tokens.shape[1]
        h = self.embed(tokens) + jax.lax.dynamic_slice_in_dim(self.pos_embed[...], start, n)
        layers = _split_cache(cache, cfg.num_layers)
        for i in range(cfg.num_layers):
            block = getattr(self, f"block{i + 1}")
            kv, mlp = _layer_kv(kv_transform, i), _layer_mlp(self.mlp_transform, i)
            h, layers[i] = block(h, layers[i], start, kv, mlp)
        h = self.norm(h)
        logits = self.embed.attend(h) if cfg.tied_embeddings else self.head(h)
        return logits if cache is None else (logits, _join_cache(layers, start, n))


# ------------------------------------------------------------------------------------ generation


class Generated(NamedTuple):
    """Output of :func:`generate`: ``tokens (B, P + T)`` (prompt then the ``T`` new tokens)
    and ``logits (B, T, vocab)``, those each new token was drawn from."""

    tokens: jax.Array
    logits: jax.Array


def forward_fn(model: GPT | NNXGPT, variables: dict | None = None):
    """``(fn, state)``: ``fn(state, tokens, cache=None, kv_transform=None)`` is the model's
    call as a pure function of ``state`` (the Linen variables, or the NNX model's state), for
    ``jax.jit``.

    Raises:
      TypeError: not a jquant GPT; variables missing (Linen) or given (NNX).
    """
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TypeError("variables must be None for an NNX model (it holds its own)")
        graphdef, state = nnx.split(model)

        def nnx_fn(s, tokens, cache=None, kv_transform=None):
            return nnx.merge(graphdef, s)(tokens, cache=cache, kv_transform=kv_transform)

        return nnx_fn, state
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a jquant GPT (Linen or NNX), got {type(model).__name__}")
    if variables is None:
        raise TypeError("variables are required for a Linen model")

    def linen_fn(v, tokens, cache=None, kv_transform=None):
        return model.apply(v, tokens, cache=cache, kv_transform=kv_transform)

    return linen_fn, variables


def perplexity(
    model: GPT | NNXGPT,
    tokens: jax.Array,
    targets: jax.Array,
    *,
    variables: dict | None = None,
    kv_transform: KVTransform | None = None,
    batch_size: int = 64,
) -> float:
    """Perplexity ``exp(mean_{b,i} -log softmax(z_{b,i})[y_{b,i}])`` of next-token targets.

    ``z = model(tokens, kv_transform=kv_transform)`` (a quantized KV cache gives the same
    logits as cached decoding: :func:`jquant.ptq.kv_fake_quant`), averaged over every
    position of every window; batches of ``batch_size`` windows, the last one padded and
    masked so that one program is compiled.

    Args:
      model: a Linen :class:`GPT` (pass ``variables``) or an :class:`NNXGPT`.
      tokens: int ids ``(N, n)``; targets: int ids ``(N, n)``, the next tokens.
    """
    tokens, targets = jnp.asarray(tokens), jnp.asarray(targets)
    if tokens.ndim != 2 or tokens.shape != targets.shape or len(tokens) == 0:
        raise ValueError(
            f"tokens and targets must be non-empty (N, n) of one shape, got {tokens.shape} "
            f"and {targets.shape}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    fn, state = forward_fn(model, variables)

    @jax.jit
    def nll_sum(state, x, y, mask):
        logits = fn(state, x, kv_transform=kv_transform)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
        return jnp.sum(nll * mask[:, None])

    n = len(tokens)
    pad = -n % batch_size if n > batch_size else 0
    size = min(batch_size, n)
    tokens = jnp.concatenate([tokens, jnp.zeros((pad, tokens.shape[1]), tokens.dtype)])
    targets = jnp.concatenate([targets, jnp.zeros((pad, targets.shape[1]), targets.dtype)])
    mask = (jnp.arange(n + pad) < n).astype(jnp.float32)
    total = sum(
        float(nll_sum(state, tokens[s : s + size], targets[s : s + size], mask[s : s + size]))
        for s in range(0, n + pad, size)
    )
    return math.exp(total / (n * tokens.shape[1]))


def generate(
    model: GPT | NNXGPT,
    prompt: jax.Array,
    num_tokens: int,
    *,
    variables: dict | None = None,
    key: jax.Array | None = None,
    temperature: float = 0.0,
    kv_transform: KVTransform | None = None,
) -> Generated:
    """Autoregressive sampling with a KV cache, one compiled program.

    The prompt ``(B, P)`` fills the cache in one call (prefill); then for ``t = 0..T-1``:
    ``x_t ~ softmax(z_t / temperature)`` (``argmax z_t`` when ``temperature == 0``), where
    ``z_t`` are the logits at the last position, and ``x_t`` is fed back at position
    ``P + t``, attending to the cached keys and values of positions ``< P + t`` (a
    ``lax.scan``). Needs ``P + T <= context``.

    Args:
      model: a Linen :class:`GPT` (pass ``variables``) or an :class:`NNXGPT`.
      prompt: int token ids ``(B, P)``, ``P >= 1``.
      num_tokens: ``T``, a positive int.
      variables: the Linen model's variables.
      key: PRNG key, required when ``temperature > 0``.
      temperature: ``>= 0``.
      kv_transform: applied to keys and values before they are cached (see :class:`GPT`),
        e.g. ``jquant.ptq.kv_fake_quant(jquant.int8)`` for an int8 KV cache per head and token.
    """
    cfg = model.config
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(
            f"prompt must be int token ids (B, P>=1), got {prompt.dtype}{prompt.shape}"
        )
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 1:
        raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
    if prompt.shape[1] + num_tokens > cfg.context:
        raise ValueError(
            f"prompt length {prompt.shape[1]} + num_tokens {num_tokens} must be <= context "
            f"{cfg.context}"
        )
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    if temperature > 0 and key is None:
        raise ValueError("key is required when temperature > 0")
    keys = jax.random.split(jax.random.key(0) if key is None else key, num_tokens)
    forward, state = forward_fn(model, variables)

    def fn(state, tokens, cache):
        return forward(state, tokens, cache, kv_transform)

    @jax.jit
    def run(state, prompt, keys):
        logits, cache = fn(state, prompt, init_cache(cfg, prompt.shape[0]))

        def step(carry, k):
            cache, last = carry
            if temperature > 0:
                tok = jax.random.categorical(k, last / temperature, axis=-1)
            else:
                tok = jnp.argmax(last, axis=-1)
            tok = tok.astype(prompt.dtype)
            logits, cache = fn(state, tok[:, None], cache)
            return (cache, logits[:, -1]), (tok, last)

        _, (toks, step_logits) = jax.lax.scan(step, (cache, logits[:, -1]), keys)
        return jnp.concatenate([prompt, toks.T], axis=1), jnp.swapaxes(step_logits, 0, 1)

    return Generated(*run(state, prompt, keys))


# The zoo GPT's float training (train_or_load's keyword arguments): see tests/test_gpt.py
# (slow) for the validation loss it reaches on jquant.data.load("text").
TRAIN_RECIPE = {"steps": 1200, "batch_size": 16, "learning_rate": 3e-3}
