"""Block-wise (sub-channel) calibration: one range per ``block_size`` consecutive elements
along ``block_axis``, from any range estimator or min/max observer.

A block-wise range is a per-axis range of the blocked view ``to_blocks(x, block_axis, B)``
(shape ``(..., ceil(N / B), B, ...)``) that keeps the block-index axis (and the ``axis`` kept
per channel) and reduces the rest; the ``B`` axis is then dropped, so ranges have ``x``'s
rank with ``ceil(N / B)`` entries along ``block_axis``, the shape of a block-wise
:class:`~jquant.QParams` (``QParams(..., block_size=B, block_axis=...)``).

>>> from jquant.calibration import minmax
>>> lo, hi = block_ranges(minmax, jnp.array([1.0, -3.0, 2.0, 0.5]), 2, block_axis=0)
>>> lo.tolist(), hi.tolist()
([-3.0, 0.5], [1.0, 2.0])

A partial last block (``B`` does not divide ``N``) is padded with NaN, which every estimator
and observer ignores: its range is that of its own elements.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jquant.calibration.grouping import Axis, check_data, kept_axes
from jquant.calibration.observers import Observer, get_observer
from jquant.formats import Format
from jquant.quant import QParams, block_qparams, qparams_from_range, to_blocks


def _padded_blocks(x: jax.Array, axis: int, size: int) -> jax.Array:
    """``to_blocks`` of ``x`` padded with NaN along ``axis`` to a multiple of ``size``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -x.shape[axis] % size)
    return to_blocks(jnp.pad(x.astype(jnp.float32), pad, constant_values=jnp.nan), axis, size)


__all__ = ["block_ranges", "block_observer", "method_block_observer"]


def _blocked_axes(ndim: int, block_size: int, block_axis: int, axis: Axis):
    """``(block axis, kept axes of the blocked view)`` for an ``x`` of rank ``ndim``."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(block_axis, bool) or not isinstance(block_axis, int):
        raise TypeError(f"block_axis must be an int, got {block_axis!r}")
    (ax,) = kept_axes(block_axis, ndim)
    kept = kept_axes(axis, ndim)
    if ax in kept:
        raise ValueError(f"block_axis {block_axis} must not also be a kept axis {axis!r}")
    return ax, tuple(sorted({ax} | {a + (a > ax) for a in kept}))


def block_ranges(
    estimator: Callable,
    x: jax.Array,
    block_size: int,
    *,
    block_axis: int = -1,
    axis: Axis = None,
    **kwargs,
) -> tuple[jax.Array, jax.Array]:
    """``(rmin, rmax)`` of each block: ``estimator(to_blocks(x), ..., axis=kept + block
    index)`` with the block axis squeezed. Works for every range estimator of
    :mod:`jquant.calibration` (``minmax``, ``absmax``, ``percentile``, ``mse``, ``kl``,
    ``aciq``); ``kwargs`` go to it (``fmt=...`` for those that need a format).

    A partial last block is padded with NaN (ignored by the estimators).
    """
    x = jnp.asarray(check_data(x))
    ax, kept = _blocked_axes(x.ndim, block_size, block_axis, axis)
    lo, hi = estimator(_padded_blocks(x, ax, block_size), axis=kept, **kwargs)
    return jnp.squeeze(lo, ax + 1), jnp.squeeze(hi, ax + 1)


def block_observer(
    factory: Callable[..., Observer],
    block_size: int,
    *,
    block_axis: int = -1,
    axis: Axis = None,
    **kwargs,
) -> Observer:
    """A streaming observer with one range per block: ``factory(axis=..., **kwargs)`` (a
    per-axis observer such as ``running_minmax``, ``ema_minmax``, ``histogram`` or a
    calibration method's ``observer``) run on the blocked view. ``result`` gives a block-wise
    QParams (``block_size``, ``block_axis``); ``bounds`` the block-shaped range.

    Each block's range is the per-tensor observer's on that block's elements alone (one
    histogram per block for ``histogram``: counts of shape ``(n_blocks, 2 num_bins)``). A
    partial last block (``block_size`` does not divide the axis) is padded with NaN, which
    observers ignore (and count in ``state.nonfinite``): its range is that of its own elements.
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")

    def inner(ndim: int) -> tuple[int, Observer]:
        ax, kept = _blocked_axes(ndim, block_size, block_axis, axis)
        return ax, factory(axis=kept, **kwargs)

    def view(x):
        x = jnp.asarray(check_data(x))
        ax, obs = inner(x.ndim)
        return _padded_blocks(x, ax, block_size), obs

    def init(x):
        xb, obs = view(x)
        return obs.init(xb)

    def update(x, state):
        xb, obs = view(x)
        return obs.update(xb, state)

    def bounds(state, fmt: Format | None = None, *, symmetric: bool = False):
        ndim = len(jnp.shape(state.min)) - 1
        ax, obs = inner(ndim)
        lo, hi = obs.bounds(state, fmt, symmetric=symmetric)
        return jnp.squeeze(lo, ax + 1), jnp.squeeze(hi, ax + 1)

    def result(state, fmt: Format, *, symmetric: bool = False) -> QParams:
        ax, _ = inner(len(jnp.shape(state.min)) - 1)
        lo, hi = bounds(state, fmt, symmetric=symmetric)
        qp = qparams_from_range(lo, hi, fmt, symmetric=symmetric)
        return block_qparams(qp, block_size, ax)

    return Observer(init, update, result, bounds)


def method_block_observer(
    calibration, block_size: int, *, block_axis: int = -1, name: str = "calibration"
) -> Observer:
    """The block-wise streaming observer of a calibration method (or its registered name):
    :func:`block_observer` on ``method.observer(axis=...)``, one range per ``block_size``
    consecutive elements along ``block_axis`` (the reduced axes: all others).

    >>> import jquant as jq
    >>> obs = method_block_observer("percentile", 2)
    >>> state = obs.update(jnp.array([[1.0, -3.0, 2.0, 0.5]]), obs.init(jnp.zeros((1, 4))))
    >>> obs.result(state, jq.int8).scale.shape
    (1, 2)

    Raises:
      ValueError: the method has no per-axis observer (``observer(axis=...)``), as a user-defined
        per-tensor observer; ``name`` names the argument in the message.
    """
    method = get_observer(calibration, name)
    factory = getattr(method, "observer", None)
    params = inspect.signature(factory).parameters if callable(factory) else {}
    if "axis" not in params or not getattr(method, "streams", True):
        raise ValueError(
            f"{name} {method!r} has no per-axis streaming observer (observer(axis=...)), so it "
            "cannot keep one range per block; use a built-in streaming method (MinMax, "
            "EmaMinMax, Percentile, MSE, KL) or give the method an observer(axis=...)"
        )
    return block_observer(factory, block_size, block_axis=block_axis)
