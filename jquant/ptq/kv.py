"""KV-cache quantization: keys and values fake-quantized per head and token, or per channel.

A model's attention keys and values ``(B, n, heads, head_dim)`` are quantized as they enter
the cache (symmetric, ``scale = amax / qmax``,
``x_hat = scale * clip(round(x / scale), qmin, qmax)``), with ``amax`` either

- ``"per_token"``: ``max_d |x_d|`` of each (batch, token, head) vector, computed on the fly
  (the scheme of KIVI's value cache and of KVQuant's per-token quantization); or
- ``"per_channel"``: ``max |x|`` of each (layer, head, channel) over calibration data
  (:func:`kv_ranges`), fixed: KVQuant's pre-computed per-channel key scales (Hooper et al.
  2024), which keep the outlier channels of keys from setting every token's scale. Values
  beyond the calibrated range clip.

Both scales are fixed once a token is written (its own vector, or constants), so quantizing
at the cache write (incremental decoding) equals quantizing every position of a full forward
pass: the cached and the non-cached model compute the same function. Pass the callable to
``jquant.models.gpt.generate``, ``jquant.models.gpt.perplexity`` or the model call as
``kv_transform``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jquant.formats import Format
from jquant.models import gpt
from jquant.quant import QParams, fake_quant_forward, qparams_from_data_range

__all__ = ["KV_GRANULARITIES", "KVRanges", "kv_fake_quant", "kv_ranges"]

KV_GRANULARITIES = ("per_token", "per_channel")


class KVRanges(NamedTuple):
    """Calibrated ``max |k|`` and ``max |v|`` per layer, head and channel, each
    ``(num_layers, heads, head_dim)``."""

    keys: jax.Array
    values: jax.Array


def kv_ranges(
    model: gpt.GPT | gpt.NNXGPT, batches: Iterable[jax.Array], *, variables: dict | None = None
) -> KVRanges:
    """``max |x|`` of every layer's keys and values over ``batches`` of token ids ``(B, n)``,
    per (layer, head, channel), reduced over batch and positions.

    Raises:
      ValueError: ``batches`` yields nothing.
    """
    fn, state = gpt.forward_fn(model, variables)
    layers = model.config.num_layers

    @jax.jit
    def amax(state, tokens):
        seen = {}

        def record(x, layer, kind):
            seen[layer, kind] = jnp.max(jnp.abs(x), axis=(0, 1))
            return x

        fn(state, tokens, kv_transform=record)
        return tuple(jnp.stack([seen[i, kind] for i in range(layers)]) for kind in ("key", "value"))

    out = None
    for tokens in batches:
        new = amax(state, jnp.asarray(tokens))
        out = (
            new if out is None else tuple(jnp.maximum(a, b) for a, b in zip(out, new, strict=True))
        )
    if out is None:
        raise ValueError("kv_ranges needs data: batches yielded no batch")
    return KVRanges(*out)


def kv_fake_quant(
    fmt: Format, *, granularity: str = "per_token", ranges: KVRanges | None = None
) -> Callable[..., jax.Array]:
    """A ``kv_transform(x, layer, kind)`` fake-quantizing keys and values ``(B, n, H, d)``.

    ``x_hat = fake_quant(x, QParams(amax / qmax, 0))`` with ``amax`` per head and token
    (``granularity="per_token"``, ``max_d |x|``) or per layer, head and channel from
    calibration (``"per_channel"``, ``ranges`` from :func:`kv_ranges`); see the module
    docstring. E.g. ``kv_fake_quant(jquant.int8)`` or ``kv_fake_quant(jquant.int4)``.

    Raises:
      TypeError: ``fmt`` is not a signed IntFormat; ``ranges`` is not a KVRanges.
      ValueError: unknown ``granularity``; ``ranges`` missing for ``"per_channel"`` or given
        for ``"per_token"``.
    """
    if not getattr(fmt, "integer_grid", False) or not fmt.signed:
        raise TypeError(f"fmt must be a signed jquant.IntFormat (e.g. jquant.int8), got {fmt!r}")
    if granularity not in KV_GRANULARITIES:
        raise ValueError(f"granularity must be one of {KV_GRANULARITIES}, got {granularity!r}")
    if granularity == "per_channel" and not isinstance(ranges, KVRanges):
        raise TypeError(
            f"ranges must be a KVRanges (from kv_ranges) for per_channel, got {ranges!r}"
        )
    if granularity == "per_token" and ranges is not None:
        raise ValueError("ranges are calibrated per channel: pass granularity='per_channel'")

    def qparams(x: jax.Array, layer, kind) -> QParams:
        if granularity == "per_token":
            amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        else:
            if layer is None or kind not in ("key", "value"):
                raise ValueError(
                    f"a per_channel KV quantizer needs the layer and kind ('key' or "
                    f"'value'), got layer={layer!r}, kind={kind!r}"
                )
            amax = (ranges.keys if kind == "key" else ranges.values)[layer]
        return qparams_from_data_range(-amax, amax, fmt, symmetric=True)

    def transform(x: jax.Array, layer: int | None = None, kind: str | None = None) -> jax.Array:
        return fake_quant_forward(x, qparams(x, layer, kind), fmt)

    return transform
