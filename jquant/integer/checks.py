"""Argument checks of the int8 kernels and the int32 accumulator bound.

Every check runs at trace time: dtypes and shapes always, values whenever they are concrete
(Python numbers, NumPy arrays, or JAX arrays outside of a trace).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import Format, int8
from jquant.integer.fixed_point import INT32_MAX

__all__ = [
    "accumulator_bound",
    "centered_code_bound",
    "check_accumulator",
    "check_int32_bound",
    "product_bound",
]


def centered_code_bound(fmt: Format, *, zero_point: bool) -> int:
    """Largest ``|q - z|`` over the codes ``q`` of a static format and its zero points ``z``.

    With a zero point inside ``[qmin, qmax]``: ``qmax - qmin`` (255 for int8 and uint8);
    without one (``z = 0``): ``max(-qmin, qmax)`` (128 for int8, 127 for narrow int8).

    >>> centered_code_bound(int8, zero_point=True), centered_code_bound(int8, zero_point=False)
    (255, 128)
    """
    if not fmt.is_static:
        raise ValueError(f"the accumulator bound needs a static format, got {fmt}")
    qmin, qmax = int(fmt.qmin), int(fmt.qmax)
    return qmax - qmin if zero_point else max(-qmin, qmax)


def product_bound(k: int, lhs: int, rhs: int, bias: int = 0) -> int:
    """Worst-case ``|acc|`` of ``acc = sum_{k=1..K} (q_l - z_l)(q_r - z_r) + b``:
    ``K * lhs * rhs + |b|`` with ``lhs``, ``rhs`` the :func:`centered_code_bound` of each side.

    >>> product_bound(2**17, 128, 128) > 2**31 - 1
    True
    """
    return int(k) * int(lhs) * int(rhs) + abs(int(bias))


def check_int32_bound(bound, what: str) -> None:
    """ValueError if a worst-case accumulator ``bound`` (an int or array) exceeds ``2^31 - 1``;
    ``what`` says where the bound comes from (the formula and its terms)."""
    worst = int(np.max(bound))
    if worst > INT32_MAX:
        raise ValueError(
            f"int32 accumulator may overflow: worst case {what} = {worst} > 2^31 - 1 = {INT32_MAX}"
        )


def concrete(x) -> np.ndarray | None:
    """``x`` as NumPy when known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def check_int8(name: str, x) -> jax.Array:
    """``x`` as a JAX array; TypeError unless its dtype is int8."""
    dtype = getattr(x, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.int8:
        got = f"dtype {dtype}" if dtype is not None else type(x).__name__
        raise TypeError(f"{name} must be an int8 array, got {got}")
    return jnp.asarray(x)


def check_scale(name: str, s, size: int | None = None):
    """Validates a scale: float, ``> 0`` and finite when concrete; shape ``()``, ``(1,)`` or,
    when ``size`` is given, ``(size,)``. Returns it flattened to ``()`` or ``(size,)``."""
    if s is None:
        raise ValueError(f"{name} is required (a positive float or array)")
    shape = np.shape(s)
    allowed = [(), (1,)] + ([(size,)] if size is not None else [])
    if shape not in allowed:
        raise ValueError(f"{name} must have shape in {allowed}, got {shape}")
    c = concrete(s)
    if c is not None:
        if c.dtype.kind not in "iuf":
            raise TypeError(f"{name} must be a real number or array, got dtype {c.dtype}")
        if not np.all(np.isfinite(c) & (c > 0)):
            raise ValueError(f"{name} must be finite and > 0, got {c}")
    new_shape = () if shape == (1,) else shape
    return np.reshape(c, new_shape) if c is not None else jnp.reshape(s, new_shape)


def check_zero_point(name: str, zp) -> jax.Array:
    """A per-tensor int8 zero point (shape ``()`` or ``(1,)``, integer in [-128, 127]) as an
    int32 scalar."""
    shape = np.shape(zp)
    if shape not in ((), (1,)):
        raise ValueError(f"{name} must be a scalar (shape () or (1,)), got shape {shape}")
    c = concrete(zp)
    if c is not None:
        if c.dtype.kind not in "iuf" or np.any(c != np.round(c)):
            raise ValueError(f"{name} must be an integer, got {c}")
        if np.any(c < int8.qmin) or np.any(c > int8.qmax):
            raise ValueError(f"{name} must be in [{int8.qmin}, {int8.qmax}] for int8, got {c}")
    return jnp.asarray(zp).reshape(()).astype(jnp.int32)


def check_bias(b, channels: int) -> jax.Array:
    """Bias: int32 of shape ``(channels,)``; None gives zeros."""
    if b is None:
        return jnp.zeros((channels,), jnp.int32)
    dtype = getattr(b, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.int32:
        raise TypeError(f"b must be an int32 array (bias at scale x_scale * w_scale), got {dtype}")
    if np.shape(b) != (channels,):
        raise ValueError(f"b must have shape ({channels},), got {np.shape(b)}")
    return jnp.asarray(b)


def accumulator_bound(w, b=None) -> np.ndarray:
    """Worst-case ``|acc|`` per output channel of an int8 conv or dense: ``255 sum|w| + |b|``.

    ``acc[c] = sum_k (x_k - x_zp) w[k, c] + b[c]`` with ``|x_k - x_zp| <= 255``; the output
    channel is ``w``'s last axis (HWIO kernels, ``(in, out)`` dense weights).

    Args:
      w: int8 (or any integer) weights, output channels last.
      b: optional integer bias of shape ``(channels,)``.

    Returns:
      int64 NumPy array of shape ``(channels,)``.
    """
    w = np.asarray(w)
    if w.dtype.kind not in "iu" or w.ndim < 1:
        raise TypeError(f"w must be an integer array with output channels last, got {w.dtype}")
    centered = centered_code_bound(int8, zero_point=True)
    bound = centered * np.abs(w.astype(np.int64)).reshape(-1, w.shape[-1]).sum(0)
    if b is not None:
        b = np.asarray(b)
        if b.shape != (w.shape[-1],) or b.dtype.kind not in "iu":
            raise ValueError(
                f"b must be integers of shape ({w.shape[-1]},), got {b.dtype}{b.shape}"
            )
        bound = bound + np.abs(b.astype(np.int64))
    return bound


def check_accumulator(w, b=None) -> np.ndarray:
    """:func:`accumulator_bound`, raising ValueError if any channel may exceed ``2^31 - 1``."""
    bound = accumulator_bound(w, b)
    bad = np.flatnonzero(bound > INT32_MAX)
    check_int32_bound(bound, f"255 * sum|w| + |b| in output channels {bad.tolist()}")
    return bound
