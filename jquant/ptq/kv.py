"""KV-cache quantization: keys and values fake-quantized per head and token.

A model's attention keys and values ``(B, n, heads, head_dim)`` are quantized as they enter
the cache, each (batch, token, head) vector with its own symmetric scale (the scheme of
KIVI's value cache and of KVQuant's per-token quantization)::

    scale = max_d |k_d| / qmax,    k_hat = scale * clip(round(k / scale), qmin, qmax)

Since every token has its own scale, quantizing at the cache write (incremental decoding)
equals quantizing every position of a full forward pass: the cached and the non-cached
model compute the same function. Pass the callable to ``jquant.models.gpt.generate`` or to
the model call as ``kv_transform``.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jquant.formats import Format, IntFormat
from jquant.quant import fake_quant_forward, qparams_from_data_range

__all__ = ["kv_fake_quant"]


def kv_fake_quant(fmt: Format) -> Callable[[jax.Array], jax.Array]:
    """A ``kv_transform`` fake-quantizing ``(B, n, heads, head_dim)`` per head and token.

    ``x_hat = fake_quant(x, QParams(max_d |x| / qmax, 0))`` over the last axis (module
    docstring); e.g. ``kv_fake_quant(jquant.int8)`` or ``kv_fake_quant(jquant.int4)``.
    """
    if not isinstance(fmt, IntFormat) or not fmt.signed:
        raise TypeError(f"fmt must be a signed jquant.IntFormat (e.g. jquant.int8), got {fmt!r}")

    def transform(x: jax.Array) -> jax.Array:
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        qp = qparams_from_data_range(-amax, amax, fmt, symmetric=True)
        return fake_quant_forward(x, qp, fmt)

    return transform
