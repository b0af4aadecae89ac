"""Quantization parameters, rounding, quantize / dequantize and the fake-quant forward.

The affine map between real values ``r`` and integer codes ``q`` (Jacob et al. 2018)::

    r = scale * (q - zero_point)
    q = clip(round(r / scale) + zero_point, qmin, qmax)

Granularity is the *shape* of ``QParams.scale`` / ``QParams.zero_point``: ``()`` is per tensor,
a shape that broadcasts against ``x`` (``(C,)`` for the last axis, ``(C, 1, 1)`` for axis 0)
is per axis, and :func:`to_blocks` / :func:`from_blocks` reshape an axis into blocks so that a
per-axis scale becomes a per-block one.

Gradients: these functions have no custom derivative; ``jquant.estimators.fake_quant`` wraps
:func:`fake_quant_forward` in the straight-through (and learned-step) estimators.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import (
    RANGE_LIMIT,
    ROUNDING_MODES,
    Format,
    block_size_of,
    check_format,
    exact_divide,
    format_name,
    round_to_float_format,
    round_values,
)

# The public names are listed in jquant/quant/__init__.py, which re-exports them; the rounding
# rules and RANGE_LIMIT live with the formats that encode with them (jquant.formats).
__all__ = ["RANGE_LIMIT", "ROUNDING_MODES", "round_to_float_format", "round_values"]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["scale", "zero_point"],
    meta_fields=["block_size", "block_axis"],
)
@dataclasses.dataclass(frozen=True)
class QParams:
    """Scale and zero point of an affine quantizer; both are pytree leaves.

    ``zero_point`` is stored as float32 holding an integer, so that learned offsets (LSQ+)
    receive gradients; a non-integer value (a learned offset between updates) is rounded where
    it is used. Its shape, like the scale's, sets the granularity.

    Block-wise (sub-channel) granularity: with ``block_size = B`` (static), each run of ``B``
    consecutive elements along ``block_axis`` shares one scale / zero point; their shape has
    ``x``'s rank (left-padded with ones) and ``ceil(N / B)`` along ``block_axis`` (``N`` its
    length), and broadcasts along the other axes. Element ``i`` along the axis uses entry
    ``i // B``; when ``B`` does not divide ``N`` the last block is partial (``N mod B``
    elements). See :func:`block_view`.
    """

    scale: jax.Array
    zero_point: jax.Array = 0.0
    block_size: int | None = None
    block_axis: int = -1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(np.broadcast_shapes(np.shape(self.scale), np.shape(self.zero_point)))


def _concrete(x) -> np.ndarray | None:
    """The value of ``x`` as numpy when it is known at trace time, else None."""
    if isinstance(x, jax.core.Tracer):
        return None
    try:
        return np.asarray(x)
    except (TypeError, jax.errors.ConcretizationTypeError):
        return None


def is_real_dtype(dtype) -> bool:
    """True for integer and floating dtypes, including ml_dtypes' (bfloat16, float8_*); False
    for bool, complex and everything else."""
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        return False
    if dtype == jnp.bool_:
        return False
    return bool(jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))


def check_real(name: str, x) -> None:
    """TypeError unless ``x`` is a real (integer or floating, ml_dtypes included) number or array:
    complex values would lose their imaginary part, booleans are not quantities."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        if isinstance(x, bool) or not isinstance(x, int | float | np.generic | list | tuple):
            raise TypeError(f"{name} must be a real number or array, got {type(x).__name__}")
        try:
            dtype = np.asarray(x).dtype
        except (TypeError, ValueError):
            raise TypeError(f"{name} must be a real number or array, got {x!r}") from None
    if not is_real_dtype(dtype):
        raise TypeError(
            f"{name} must be a real (integer or floating) number or array, got dtype {dtype}"
        )


def check_rounding(rounding: str, key) -> None:
    """Raises ValueError for an unknown rounding name or stochastic rounding without a key."""
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if rounding == "stochastic" and key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)")


def _check_qparams_values(qp: QParams) -> None:
    """ValueError unless a concrete scale is finite and > 0 and a concrete zero point finite."""
    scale = _concrete(qp.scale)
    if scale is not None and not np.all(np.isfinite(scale) & (scale > 0)):
        bad = scale[~(np.isfinite(scale) & (scale > 0))]
        raise ValueError(f"qp.scale must be finite and > 0 everywhere, got {bad.ravel()[:4]}")
    zp = _concrete(qp.zero_point)
    if zp is not None and not np.all(np.isfinite(zp)):
        bad = zp[~np.isfinite(zp)]
        raise ValueError(f"qp.zero_point must be finite everywhere, got {bad.ravel()[:4]}")


def check_qparams(x, qp: QParams, fmt: Format) -> None:
    """Validates QParams against ``x`` and ``fmt``: shapes and dtypes always; when concrete,
    ``scale`` finite and > 0 and ``zero_point`` finite and (rounded) inside ``[qmin, qmax]``.

    Traced values cannot raise: a NaN or infinite scale / zero point then gives NaN outputs.
    """
    if not isinstance(qp, QParams):
        raise TypeError(f"qp must be a jquant.QParams, got {type(qp).__name__}")
    if qp.block_size is not None:
        xb, qpb = block_view(jax.ShapeDtypeStruct(np.shape(x), jnp.float32), qp)
        return check_qparams(xb, qpb, fmt)
    check_format(fmt)
    if block_size_of(fmt) is not None:
        raise ValueError(
            f"fmt {format_name(fmt)} is a block format: it derives its own block scales and "
            "takes no QParams; use jquant.mx.fake_quant(x, fmt, axis=...) or "
            "jquant.quant.fake_quant_config(x, QuantConfig(fmt=fmt, block_axis=...))"
        )
    check_real("qp.scale", qp.scale)
    check_real("qp.zero_point", qp.zero_point)
    x_shape = np.shape(x)
    try:
        out = np.broadcast_shapes(qp.shape, x_shape)
    except ValueError:
        out = None
    if out != tuple(x_shape):
        raise ValueError(
            f"qp (scale/zero_point shape {qp.shape}) must broadcast against x of shape {x_shape}"
        )
    _check_qparams_values(qp)
    zp = _concrete(qp.zero_point)
    if zp is None:
        return
    if not fmt.has_zero_point:
        if np.any(zp != 0):
            raise ValueError(
                f"qp.zero_point must be 0 for {fmt}, which has no zero point (float, binary "
                "and midrise formats)"
            )
        return
    lo, hi = (_concrete(b) for b in fmt.grid_range())
    if lo is not None and hi is not None:
        # learned (LSQ+) zero points are rounded in the forward pass; their rounding must fit
        if np.any(np.round(zp) < np.min(lo)) or np.any(np.round(zp) > np.max(hi)):
            raise ValueError(
                f"qp.zero_point must round to an integer in [qmin, qmax] = [{np.min(lo)}, "
                f"{np.max(hi)}] for {fmt}, got values in [{np.min(zp)}, {np.max(zp)}]"
            )


def qparams_from_range(rmin, rmax, fmt: Format, *, symmetric: bool = False) -> QParams:
    """QParams that map ``[rmin, rmax]`` onto ``fmt``'s grid.

    The range is first widened to include 0 so that 0 is exactly representable, then::

        affine:    scale = (rmax - rmin) / (qmax - qmin)
                   zero_point = clip(round(qmin - rmin / scale), qmin, qmax)
        symmetric: scale = max(|rmin|, |rmax|) / qmax,  zero_point = 0

    Midrise grids use ``scale = max|r| / (qmax + 1/2)``; float formats ``max|r| / fmt.max``;
    the binary format ``max|r|``. A zero range gives ``scale = 1`` (finite, never NaN/Inf).
    For integer (not midrise) grids, range ends beyond ``+-2^126`` are clipped to it, so that
    every grid value is a finite float32 (values beyond saturate there).

    Bad ranges: concrete ones raise (``TypeError`` for complex / bool / non-numbers,
    ``ValueError`` for NaN, +-inf or ``rmin > rmax``); traced ones cannot raise and give
    ``scale = zero_point = NaN`` in the affected elements, so everything quantized with them
    is NaN. An invalid traced bit width does the same (``fmt.qmax`` is NaN).

    Args:
      rmin, rmax: real numbers or arrays (float16, bfloat16, fp8, float32, integers),
        broadcastable against each other.
      fmt: the target format.
      symmetric: zero point 0 (integer formats).

    >>> from jquant.formats import IntFormat
    >>> qp = qparams_from_range(-1.0, 1.0, IntFormat(8), symmetric=True)
    >>> round(float(qp.scale) * 127, 6), float(qp.zero_point)
    (1.0, 0.0)
    """
    check_format(fmt)
    check_real("rmin", rmin)
    check_real("rmax", rmax)
    cmin, cmax = _concrete(rmin), _concrete(rmax)
    for name, c in (("rmin", cmin), ("rmax", cmax)):
        if c is not None and not np.all(np.isfinite(c)):
            raise ValueError(f"{name} must be a finite number or array, got {c!r}")
    if cmin is not None and cmax is not None:
        lo, hi = cmin.astype(np.float32), cmax.astype(np.float32)
        if np.any(lo > hi):
            raise ValueError(f"rmin must be <= rmax, got rmin {cmin!r} > rmax {cmax!r}")
    return qparams_from_data_range(rmin, rmax, fmt, symmetric=symmetric)


def qparams_from_data_range(rmin, rmax, fmt: Format, *, symmetric: bool = False) -> QParams:
    """:func:`qparams_from_range` for a range measured from data (dynamic quantization), with
    no eager value checks: NaN, +-inf or reversed ends give ``scale = zero_point = NaN`` in
    the affected elements, eagerly and under ``jit`` alike, so a NaN (or inf) in the data makes
    NaN exactly the outputs quantized with that range. Dtypes and ``fmt`` are still checked.
    """
    check_format(fmt)
    check_real("rmin", rmin)
    check_real("rmax", rmax)
    rmin = jnp.asarray(rmin).astype(jnp.float32)
    rmax = jnp.asarray(rmax).astype(jnp.float32)
    bad = ~(jnp.isfinite(rmin) & jnp.isfinite(rmax) & (rmin <= rmax))
    rmin, rmax = jnp.minimum(rmin, 0.0), jnp.maximum(rmax, 0.0)
    scale, zp = fmt.scale_for_range(rmin, rmax, symmetric)
    scale, zp = jnp.asarray(scale, jnp.float32), jnp.asarray(zp, jnp.float32)
    tiny = jnp.finfo(jnp.float32).tiny
    # a zero (or subnormal) range gives 1; NaN (an invalid traced width) stays NaN
    scale = jnp.where(scale < tiny, 1.0, scale)
    scale = jnp.where(bad, jnp.nan, scale)
    zp = jnp.where(bad, jnp.nan, zp)
    return QParams(scale=scale.astype(jnp.float32), zero_point=zp.astype(jnp.float32))


def stochastic_noise(key, shape) -> jax.Array:
    """Uniform noise in [0, 1) for stochastic rounding."""
    return jax.random.uniform(key, shape, jnp.float32)


def nan_if_invalid(qp: QParams) -> QParams:
    """``qp`` with ``scale`` NaN where it is not finite and > 0, and ``zero_point`` NaN where it
    is not finite: traced QParams cannot raise, so bad ones make their outputs NaN instead of
    plausible numbers (a zero scale would give zeros, a negative one a mirrored grid)."""
    scale = jnp.asarray(qp.scale)
    zp = jnp.asarray(qp.zero_point)
    return dataclasses.replace(
        qp,
        scale=jnp.where(jnp.isfinite(scale) & (scale > 0), scale, jnp.nan),
        zero_point=jnp.where(jnp.isfinite(zp), zp, jnp.nan),
    )


def _codes(x, qp: QParams, fmt: Format, rounding: str, noise) -> jax.Array:
    """Float codes ``clip(round(x / scale) + zp, qmin, qmax)`` (float formats: grid values)."""
    qp = nan_if_invalid(qp)
    x = jnp.asarray(x, jnp.float32)
    return fmt.encode(exact_divide(x, qp.scale), qp.zero_point, rounding, noise)


def _values(codes, qp: QParams, fmt: Format | None) -> jax.Array:
    qp = nan_if_invalid(qp)
    if fmt is None:
        return qp.scale * (codes - jnp.round(qp.zero_point))
    return qp.scale * fmt.decode(codes, qp.zero_point)


def quantize(
    x: jax.Array,
    qp: QParams,
    fmt: Format,
    *,
    rounding: str = "nearest_even",
    key: jax.Array | None = None,
) -> jax.Array:
    """``q = clip(round(x / scale) + zero_point, qmin, qmax)`` in ``fmt``'s storage dtype.

    Static integer formats store as int8/uint8 (<= 8 bits) or int16/uint16; traced bits give
    int32; float formats give float32 values on the minifloat grid (of ``x / scale``), rounded
    with any of the rounding modes.
    NaN has no integer code: static integer storage maps it to 0 (use ``fake_quant`` to keep
    NaN); int32 storage (traced bits) maps it to ``-2^31``, outside every grid, so that an
    invalid traced width (``qmax`` NaN) or a NaN scale cannot produce plausible codes.
    +-Inf saturate to ``qmax`` / ``qmin``.

    Raises TypeError for a non-real ``x`` (complex, bool): no imaginary part is dropped.
    """
    check_real("x", x)
    check_qparams(x, qp, fmt)
    check_rounding(rounding, key)
    if qp.block_size is not None:
        xb, qpb = block_view(x, qp)
        return unblock(quantize(xb, qpb, fmt, rounding=rounding, key=key), qp, np.shape(x))
    noise = stochastic_noise(key, jnp.shape(x)) if rounding == "stochastic" else None
    q = _codes(x, qp, fmt, rounding, noise)
    if jnp.issubdtype(fmt.dtype, jnp.floating):  # grid values (float formats)
        return q
    no_code = 0 if fmt.is_static else jnp.iinfo(jnp.int32).min
    return jnp.where(jnp.isnan(q), no_code, q).astype(fmt.dtype)


def dequantize(q: jax.Array, qp: QParams, fmt: Format | None = None) -> jax.Array:
    """``x = scale * fmt.decode(q, zero_point)`` as float32: ``scale * (q - zero_point)``
    without ``fmt`` or for integer grids (midrise formats add 1/2: pass ``fmt``).

    A concrete scale must be finite and > 0 and a concrete zero point finite (ValueError);
    traced bad ones give NaN (:func:`nan_if_invalid`).
    """
    if not isinstance(qp, QParams):
        raise TypeError(f"qp must be a jquant.QParams, got {type(qp).__name__}")
    check_real("q", q)
    check_real("qp.scale", qp.scale)
    check_real("qp.zero_point", qp.zero_point)
    _check_qparams_values(qp)
    if qp.block_size is not None:
        qb, qpb = block_view(q, qp)
        return unblock(dequantize(qb, qpb, fmt), qp, np.shape(q))
    return _values(jnp.asarray(q, jnp.float32), qp, fmt)


def fake_quant_forward(
    x: jax.Array, qp: QParams, fmt: Format, rounding: str = "nearest_even", noise=None
) -> jax.Array:
    """``dequantize(quantize(x))`` computed in float, NaN preserved; no custom gradient.

    Callers validate first (``jquant.fake_quant`` does). Returns ``x``'s float dtype.
    """
    x = jnp.asarray(x)
    if qp.block_size is not None:
        if noise is not None:
            noise, _ = block_view(noise, qp)
        xb, qpb = block_view(x, qp)
        return unblock(fake_quant_forward(xb, qpb, fmt, rounding, noise), qp, x.shape)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    return _values(_codes(x, qp, fmt, rounding, noise), qp, fmt).astype(dtype)


def to_blocks(x: jax.Array, axis: int, block_size: int) -> jax.Array:
    """Splits ``axis`` of length ``n * block_size`` into ``(n, block_size)``.

    A QParams of shape ``(..., n, 1, ...)`` then gives one scale per block of ``block_size``
    consecutive elements along ``axis``; :func:`from_blocks` undoes the reshape.
    """
    x = jnp.asarray(x)
    axis = _normalize_axis(axis, x.ndim)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    n = x.shape[axis]
    if n % block_size:
        raise ValueError(f"block_size {block_size} must divide the length {n} of axis {axis} of x")
    return x.reshape(x.shape[:axis] + (n // block_size, block_size) + x.shape[axis + 1 :])


def from_blocks(xb: jax.Array, axis: int) -> jax.Array:
    """Inverse of :func:`to_blocks`: merges axes ``axis`` and ``axis + 1``."""
    axis = _normalize_axis(axis, xb.ndim - 1)
    s = xb.shape
    return xb.reshape(s[:axis] + (s[axis] * s[axis + 1],) + s[axis + 2 :])


def _normalize_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}), got {axis!r}")
    return axis % ndim


# --- block-wise (sub-channel) QParams ----------------------------------------------------------


def block_qparams(qp: QParams, block_size: int, axis: int = -1) -> QParams:
    """``qp`` read block-wise: one scale / zero point per ``block_size`` consecutive elements
    along ``axis`` (see :class:`QParams`).

    >>> qp = block_qparams(QParams(jnp.array([1.0, 2.0])), 4, axis=0)
    >>> dequantize(jnp.ones(8), qp).tolist()
    [1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    """
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"block_axis must be an int, got {axis!r}")
    return dataclasses.replace(qp, block_size=block_size, block_axis=axis)


def _block_param(a, ndim: int, axis: int, n: int, name: str):
    a = jnp.asarray(a) if not isinstance(a, jax.ShapeDtypeStruct) else a
    shape = tuple(np.shape(a))
    if len(shape) > ndim:
        raise ValueError(
            f"qp.{name} of a block-wise QParams must have at most x's rank {ndim}, got shape "
            f"{shape}"
        )
    if len(shape) == 0:
        return jnp.asarray(a)
    shape = (1,) * (ndim - len(shape)) + shape
    if shape[axis] not in (1, n):
        raise ValueError(
            f"qp.{name} of a block-wise QParams must have {n} entries (one per block) or 1 "
            f"along block_axis {axis}, got shape {tuple(np.shape(a))}"
        )
    return jnp.asarray(a).reshape(shape[: axis + 1] + (1,) + shape[axis + 1 :])


def block_view(x, qp: QParams) -> tuple[jax.Array, QParams]:
    """``(xb, qpb)``: ``x`` with ``qp.block_axis`` split into ``(ceil(N / B), B)`` and ``qp``
    as an ordinary QParams broadcasting against it (size 1 on the new ``B`` axis), so that
    ``f(x, qp) = unblock(f(xb, qpb), qp, x.shape)`` for every element-wise quantizer ``f``.

    When ``B`` does not divide ``N`` the axis is first padded with zeros to a multiple of
    ``B`` (:func:`unblock` drops them again): the last block is partial.
    Raises ValueError when the QParams' shapes do not fit.
    """
    if qp.block_size is None:
        return jnp.asarray(x), qp
    ndim = len(np.shape(x))
    if ndim == 0:
        raise ValueError("a block-wise QParams needs x of rank >= 1, got a scalar")
    axis = _normalize_axis(qp.block_axis, ndim)
    b, n_total = qp.block_size, np.shape(x)[axis]
    n = -(-n_total // b)
    if isinstance(x, jax.ShapeDtypeStruct):
        s = x.shape
        xb = jax.ShapeDtypeStruct(s[:axis] + (n, b) + s[axis + 1 :], x.dtype)
    else:
        x = jnp.asarray(x)
        pad = [(0, 0)] * ndim
        pad[axis] = (0, n * b - n_total)
        xb = to_blocks(jnp.pad(x, pad) if n * b != n_total else x, axis, b)
    scale = _block_param(qp.scale, ndim, axis, n, "scale")
    zp = _block_param(qp.zero_point, ndim, axis, n, "zero_point")
    return xb, QParams(scale, zp)


def unblock(yb: jax.Array, qp: QParams, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`block_view` for an ``x`` of shape ``shape``: merges the block axes
    and drops the padding of a partial last block."""
    if qp.block_size is None:
        return yb
    axis = _normalize_axis(qp.block_axis, yb.ndim - 1)
    y = from_blocks(yb, axis)
    return jax.lax.slice_in_dim(y, 0, shape[axis], axis=axis)


def block_range(
    x: jax.Array, block_size: int, axis: int, kept: tuple[int, ...] = (), *, symmetric: bool
) -> tuple[jax.Array, jax.Array]:
    """``(rmin, rmax)`` of each block of ``block_size`` elements along ``axis``, also kept
    separate along the axes ``kept`` and reduced over all others: arrays of ``x``'s rank with
    ``N / block_size`` along ``axis``. Symmetric: ``(-max|x|, max|x|)``.

    >>> [a.tolist() for a in block_range(jnp.array([1.0, -3.0, 2.0, 0.5]), 2, 0, symmetric=True)]
    [[-3.0, -2.0], [3.0, 2.0]]
    """
    x = jnp.asarray(x)
    axis = _normalize_axis(axis, x.ndim)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    xb, _ = block_view(x, QParams(1.0, block_size=block_size, block_axis=axis))
    keep = {axis} | {a + (a > axis) for a in kept}
    reduce = tuple(a for a in range(xb.ndim) if a not in keep)
    if symmetric:
        amax = jnp.max(jnp.abs(xb), axis=reduce, keepdims=True)
        rmin, rmax = -amax, amax
    else:
        rmin = jnp.min(xb, axis=reduce, keepdims=True)
        rmax = jnp.max(xb, axis=reduce, keepdims=True)
    return jnp.squeeze(rmin, axis + 1), jnp.squeeze(rmax, axis + 1)
