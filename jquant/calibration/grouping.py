"""Granularity and input plumbing shared by the range estimators and observers.

``axis`` names the axes that keep their own range (per channel); every other axis is reduced.
Statistics come back with the *keepdims* shape (size 1 on reduced axes), so they broadcast
against ``x`` and feed :func:`jquant.qparams_from_range` directly; ``axis=None`` gives scalars.
Blocks are per-axis ranges of a reshaped tensor: ``to_blocks(x, axis, size)`` then keep the
block-index axis.

Non-finite values (NaN, +-Inf) are ignored by every statistic; observers count them.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np

from jquant import formats
from jquant.formats import Format, IntFormat

Axis = int | tuple[int, ...] | None


def kept_axes(axis: Axis, ndim: int) -> tuple[int, ...]:
    """Normalizes ``axis`` (None, an int or a tuple of ints) to sorted non-negative axes."""
    if axis is None:
        return ()
    axes = (axis,) if isinstance(axis, numbers.Integral) else axis
    if not isinstance(axes, tuple | list) or not all(
        isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes
    ):
        raise TypeError(f"axis must be None, an int or a tuple of ints, got {axis!r}")
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(f"axis must be in [{-ndim}, {ndim}) for x with {ndim} dims, got {a}")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"axis must not repeat an axis, got {axis!r}")
    return tuple(sorted(out))


def stat_shape(shape: tuple[int, ...], kept: tuple[int, ...]) -> tuple[int, ...]:
    """Keepdims shape of a statistic: ``shape[i]`` on kept axes, 1 elsewhere; ``()`` if none."""
    if not kept:
        return ()
    return tuple(n if i in kept else 1 for i, n in enumerate(shape))


def check_data(x, name: str = "x"):
    """Validates a non-empty real array (TypeError for non-numeric, ValueError when empty).

    Returns ``x`` (a NumPy array if it was a list or scalar); callers cast to float32.
    """
    if not hasattr(x, "dtype"):
        x = np.asarray(x)
    dtype = x.dtype
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        if dtype != np.bool_:
            raise TypeError(f"{name} must be a real numeric array, got dtype {dtype}")
    if math.prod(np.shape(x)) == 0:
        raise ValueError(f"{name} must not be empty, got shape {np.shape(x)}")
    return x


def as_groups(x: jax.Array, kept: tuple[int, ...]) -> jax.Array:
    """Reshapes ``x`` to ``(G, N)``: one row per kept-axes index (``G = 1`` per tensor)."""
    moved = jnp.moveaxis(x, kept, tuple(range(len(kept))))
    groups = math.prod(moved.shape[: len(kept)])
    return moved.reshape(groups, -1)


def finite_min_max(x: jax.Array, kept: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Min and max over the reduced axes, ignoring non-finite values (+inf / -inf if none)."""
    reduce = tuple(i for i in range(x.ndim) if i not in kept)
    finite = jnp.isfinite(x)
    lo = jnp.min(jnp.where(finite, x, jnp.inf), axis=reduce, keepdims=bool(kept))
    hi = jnp.max(jnp.where(finite, x, -jnp.inf), axis=reduce, keepdims=bool(kept))
    return lo, hi


def or_zero(v: jax.Array) -> jax.Array:
    """``v`` where finite, else 0 (a range over no finite data is ``[0, 0]``)."""
    return jnp.where(jnp.isfinite(v), v, 0.0)


def varying_like(value, *refs):
    """``value`` (a pytree) made to vary over every mesh axis that some leaf of ``refs`` varies
    over; the identity outside ``jax.shard_map`` and when ``refs`` are replicated.

    A loop carry (``lax.scan``, ``fori_loop``) started from a constant is *invariant* across
    a ``shard_map``'s devices, while the loop body, depending on per-device inputs such as the
    width being swept, makes it *varying*: ``scan`` then rejects the carry's changed type, and
    ``jax.grad`` with respect to an invariant value sums the cotangent over the devices
    (the transpose of the implicit broadcast is a ``psum``), mixing other devices' widths into
    each device's result. Starting the carry as ``varying_like(init, *inputs)`` types it as
    the body will, so each device's loop sees only its own inputs: ``value + 0``, with a zero
    built by ``lax.full_like`` from each ref (exact for finite ``value``).
    """
    # lax.full_like keeps its reference's mesh-axis type: a 0 that varies as ``refs`` do
    zeros = [jax.lax.full_like(leaf, 0, jnp.float32, shape=()) for leaf in jax.tree.leaves(refs)]
    zero = sum(zeros, jnp.float32(0))
    return jax.tree.map(lambda v: v + zero.astype(jnp.result_type(v)), value)


def check_format(fmt) -> None:
    """TypeError unless ``fmt`` follows the ``jquant.formats.Format`` protocol."""
    formats.check_format(fmt)


def check_int_format(fmt: Format, method: str, *, signed: bool = False) -> IntFormat:
    """Raises unless ``fmt`` is an IntFormat (and signed, if asked): ``method`` needs a grid."""
    check_format(fmt)
    if not getattr(fmt, "integer_grid", False):
        raise ValueError(
            f"{method} needs a uniform integer grid: fmt must be an IntFormat, got {fmt}"
        )
    if signed and not fmt.signed:
        raise ValueError(f"{method} assumes a symmetric prior: fmt must be signed, got {fmt}")
    return fmt
