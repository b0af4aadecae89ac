"""Pooling of quantized tensors that keeps the input's scale and zero point, as TFLite does:
:func:`avg_pool` and :func:`max_pool` work on the codes in both modes."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from jquant.formats import IntFormat
from jquant.integer import rounded_average
from jquant.ops._prepare import check_mode, tuple_or_none
from jquant.quant import QParams, check_qparams, nan_if_invalid, quantize

__all__ = ["avg_pool", "max_pool"]


def _pool_geometry(x, window, strides, padding):
    """``(dims, strides, pads)`` for ``lax.reduce_window`` over ``x`` of shape (N, *S, C)."""
    window = tuple_or_none("window", window)
    if window is None or x.ndim != len(window) + 2:
        raise ValueError(
            f"window must give one size per spatial axis of x (N, *spatial, C) of shape "
            f"{x.shape}, got {window!r}"
        )
    strides = (1,) * len(window) if strides is None else tuple_or_none("strides", strides)
    if len(strides) != len(window):
        raise ValueError(f"strides must have {len(window)} entries, got {strides!r}")
    dims, full_strides = (1, *window, 1), (1, *strides, 1)
    if isinstance(padding, str):
        if padding not in ("SAME", "VALID"):
            raise ValueError(
                f"padding must be 'SAME', 'VALID' or (low, high) pairs, got {padding!r}"
            )
        pads = tuple(lax.padtype_to_pads(x.shape, dims, full_strides, padding))
    else:
        pads = tuple((int(lo), int(hi)) for lo, hi in padding)
        if len(pads) != len(window):
            raise ValueError(f"padding must have {len(window)} (low, high) pairs, got {padding!r}")
        if any(lo >= k or hi >= k for (lo, hi), k in zip(pads, window, strict=True)):
            # otherwise a window could hold padding only, with no element to average
            raise ValueError(f"padding must be smaller than the window {window}, got {padding!r}")
        pads = ((0, 0), *pads, (0, 0))
    return dims, full_strides, pads


def _check_pool_format(fmt) -> None:
    if not (getattr(fmt, "integer_grid", False) and fmt.has_zero_point):
        raise ValueError(f"pooling works on integer codes: fmt must be an IntFormat, got {fmt}")


def _avg_codes(q, geometry):
    """TFLite's int8 average (:func:`jquant.integer.rounded_average`) of the sum of the codes
    over the ``n`` unpadded window elements."""
    dims, strides, pads = geometry
    acc = lax.reduce_window(q.astype(jnp.int32), 0, lax.add, dims, strides, pads)
    ones = jnp.ones((1, *q.shape[1:-1], 1), jnp.int32)
    n = lax.reduce_window(ones, 0, lax.add, dims, strides, pads)
    return rounded_average(acc, n)


def _max_codes(q, geometry):
    dims, strides, pads = geometry
    init = jnp.array(jnp.iinfo(q.dtype).min, q.dtype)
    return lax.reduce_window(q, init, lax.max, dims, strides, pads)


def _float_avg(x, geometry):
    dims, strides, pads = geometry
    total = lax.reduce_window(x, 0.0, lax.add, dims, strides, pads)
    ones = jnp.ones((1, *x.shape[1:-1], 1), x.dtype)
    return total / lax.reduce_window(ones, 0.0, lax.add, dims, strides, pads)


def _float_max(x, geometry):
    dims, strides, pads = geometry
    return lax.reduce_window(x, -jnp.inf, lax.max, dims, strides, pads)


_POOLS = {"avg": (_avg_codes, _float_avg), "max": (_max_codes, _float_max)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _pool_simulate(kind, fmt, geometry, x, qp):
    """Dequantized code-domain pooling of ``quantize(x)``; backward is the float pool's."""
    qp = nan_if_invalid(qp)  # a bad traced scale / zero point: NaN, not a plausible pool
    q = quantize(x, qp, fmt).astype(jnp.int32)
    out = _POOLS[kind][0](q, geometry)
    out = qp.scale * (out - jnp.round(qp.zero_point))
    # NaN has no code: a window that holds a NaN is NaN, as in the float pool
    dims, strides, pads = geometry
    nan = lax.reduce_window(jnp.isnan(x).astype(jnp.int32), 0, lax.max, dims, strides, pads)
    return jnp.where(nan > 0, jnp.nan, out).astype(x.dtype)


def _pool_simulate_fwd(kind, fmt, geometry, x, qp):
    return _pool_simulate(kind, fmt, geometry, x, qp), (x, qp)


def _pool_simulate_bwd(kind, fmt, geometry, res, g):
    x, qp = res
    _, vjp = jax.vjp(lambda v: _POOLS[kind][1](v, geometry), x)
    return (*vjp(g), jax.tree_util.tree_map(jnp.zeros_like, qp))


_pool_simulate.defvjp(_pool_simulate_fwd, _pool_simulate_bwd)


def _pool(kind, x, qp, fmt, window, strides, padding, mode):
    check_mode(mode)
    _check_pool_format(fmt)
    x = jnp.asarray(x)
    geometry = _pool_geometry(x, window, strides, padding)
    if mode == "int":
        if not jnp.issubdtype(x.dtype, jnp.integer):
            raise TypeError(f"mode='int' pools integer codes: x must be integer, got {x.dtype}")
        check_qparams(x, qp, fmt)
        out = _POOLS[kind][0](x.astype(jnp.int32), geometry)
        return jnp.clip(out, fmt.qmin, fmt.qmax).astype(x.dtype)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"mode='simulate' pools float values: x must be float, got {x.dtype}")
    check_qparams(x, qp, fmt)
    qp = QParams(jnp.asarray(qp.scale, jnp.float32), jnp.asarray(qp.zero_point, jnp.float32))
    return _pool_simulate(kind, fmt, geometry, x, qp)


def _pool_function(kind: str, name: str, doc: str) -> Callable[..., jax.Array]:
    """The public ``kind`` pooling function, named ``name``, with docstring ``doc``."""

    def pool(
        x: jax.Array,
        qp: QParams,
        fmt: IntFormat,
        window: Sequence[int],
        strides: Sequence[int] | None = None,
        padding: str | Sequence[tuple[int, int]] = "VALID",
        mode: str = "simulate",
    ) -> jax.Array:
        return _pool(kind, x, qp, fmt, window, strides, padding, mode)

    pool.__name__ = pool.__qualname__ = name
    pool.__doc__ = doc
    return pool


avg_pool = _pool_function(
    "avg",
    "avg_pool",
    """Average pooling of a quantized tensor that keeps its scale and zero point (TFLite).

    On codes ``q`` (not ``q - z``), over the ``n`` unpadded elements of each window::

        acc = sum q;   out = (acc > 0 ? acc + n/2 : acc - n/2) / n   (C integer division)

    i.e. the mean code rounded half away from zero.

    Args:
      x: ``(N, *spatial, C)``; integer codes in ``"int"`` mode (same dtype out), float values
        in ``"simulate"`` mode (quantized with ``qp``/``fmt`` first, dequantized after; the
        gradient is the float average pool's).
      qp, fmt: the input's (and output's) QParams and integer format.
      window, strides, padding: per spatial axis, as ``flax.linen.avg_pool``.
      mode: ``"simulate"`` or ``"int"``.
    """,
)
max_pool = _pool_function(
    "max",
    "max_pool",
    """Max pooling of a quantized tensor that keeps its scale and zero point: the max code
    over each window (padding never wins). Arguments as :func:`avg_pool`; the simulate mode's
    gradient is the float max pool's.""",
)
