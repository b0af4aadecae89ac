"""Quantized lax ops: ``dot_general``, ``conv_general_dilated`` and pooling.

The products quantize ``lhs`` (activations) and ``rhs`` (weights), each with its own
:class:`QuantConfig`, and run in one of two modes that give the same numbers:

- ``"simulate"``: fake quantization in float, ``op(fq(lhs), fq(rhs))``; gradients come from the
  estimators of ``jquant.estimators`` (straight-through by default).
- ``"int"``: codes stored as int8, ``op(q_lhs, q_rhs)`` in ``lax`` with
  ``preferred_element_type=int32``, then rescaled. With ``x = s_x (q_x - z_x)`` and the scales
  constant along the contracted axes, a product over a contraction of ``K`` terms is::

      sum_k x_l x_r = s_l s_r (sum q_l q_r - z_l sum_k q_r - z_r sum_k q_l + K z_l z_r)

  The backward pass of ``"int"`` is the backward pass of ``"simulate"`` (same estimators).

Unsigned formats run in int8 too: a ``b``-bit unsigned code ``q`` equals the signed code
``q - 2^(b-1)`` with zero point ``z - 2^(b-1)``, so ``uint8`` activations become affine int8.

Pooling keeps the input's scale and zero point, as TFLite does; both modes work on the codes.

Overflow: ``"int"`` mode accumulates in int32. The worst case over a contraction of ``K``
terms is ``K * max|q_l - z_l| * max|q_r - z_r|`` (:func:`jquant.integer.checks.product_bound`;
255 for a side with a zero point, 128 for symmetric int8); when it can exceed ``2^31 - 1`` the
op raises ValueError at trace time, unless ``accumulator="int32_wrap"`` accepts wrap-around
modulo ``2^32`` (the result is then exact only where the true sum fits in int32). For
symmetric int8 on both sides ``K <= 2^17 - 1`` is accepted; affine activations with symmetric
int8 weights ``K <= 65793``.

NaN: under ``jit`` nothing can raise, so NaN flows as it does through the float op: a NaN in
``lhs`` makes NaN every output that contracts over it (its row of a product, every window
holding it in a conv, for all output channels of its group), a NaN in ``rhs`` every output
of its column / output channel, in both modes (``"int"`` masks its finite integer result).
A dynamic range is the range of the data: a NaN or +-inf in a per-tensor dynamic range makes
its scale NaN and hence *every* output NaN; per row / per channel (``QuantConfig(axis=...)``)
only the outputs of that row or channel.

All entry points keep ``lax``'s signatures, so ``functools.partial`` of them (see
:func:`quantized_dot_general`, :func:`quantized_conv_general_dilated`) drops into
``flax.linen.Dense(dot_general=...)``, ``flax.linen.Conv(conv_general_dilated=...)`` and their
NNX counterparts.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.estimators import ESTIMATORS, fake_quant
from jquant.formats import BinaryFormat, FloatFormat, Format, IntFormat, int8
from jquant.integer import rounded_average
from jquant.integer.checks import centered_code_bound, check_int32_bound, product_bound
from jquant.quant import (
    ROUNDING_MODES,
    QParams,
    check_qparams,
    check_real,
    nan_if_invalid,
    qparams_from_data_range,
    quantize,
)

__all__ = [
    "MODES",
    "ACCUMULATORS",
    "QuantConfig",
    "dynamic_qparams",
    "dot_general",
    "conv_general_dilated",
    "quantized_dot_general",
    "quantized_conv_general_dilated",
    "avg_pool",
    "max_pool",
]

MODES = ("simulate", "int")
# "int32": exact int32 accumulation, refused at trace time when the worst case can exceed
# 2^31 - 1; "int32_wrap": the user accepts two's-complement wrap-around (modulo 2^32).
ACCUMULATORS = ("int32", "int32_wrap")
# Stochastic rounding needs a PRNG key per call, which lax's signatures have no room for.
_ROUNDINGS = tuple(r for r in ROUNDING_MODES if r != "stochastic")


# --- configuration ----------------------------------------------------------------------------


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["fmt"],
    meta_fields=["symmetric", "axis", "estimator", "rounding"],
)
@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How one operand of a product is quantized.

    A pytree: ``fmt`` is its child (an ``IntFormat``'s ``bits`` is a leaf), the rest static.
    With a static format it is hashable; an ``IntFormat`` with traced ``bits`` (a sweep over
    widths inside ``jit`` / ``vmap``) is allowed in ``mode="simulate"`` only.

    Args:
      fmt: the number format (``IntFormat``, ``FloatFormat`` or ``BinaryFormat``).
      symmetric: zero point 0 (``scale = max|x| / qmax``) if True, else affine
        (``scale = (max - min) / (qmax - qmin)``); given QParams must then have zero point 0.
      axis: axes that keep their own scale (per channel / per row); ``None`` is per tensor.
      estimator: gradient estimator, one of ``jquant.estimators.ESTIMATORS``.
      rounding: one of ``jquant.quant.ROUNDING_MODES`` except ``"stochastic"``.

    >>> QuantConfig(axis=-1).axes(2)
    (1,)
    """

    fmt: Format = int8
    symmetric: bool = True
    axis: int | tuple[int, ...] | None = None
    estimator: str = "ste"
    rounding: str = "nearest_even"

    def __post_init__(self):
        # Unflattening inside jax transformations may pass placeholders for the child.
        if self.fmt is None or type(self.fmt) is object:
            return
        if not isinstance(self.fmt, IntFormat | BinaryFormat | FloatFormat):
            raise TypeError(
                f"fmt must be an IntFormat, BinaryFormat or FloatFormat, got {self.fmt!r}"
            )
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        axes = (self.axis,) if isinstance(self.axis, numbers.Integral) else self.axis
        if axes is not None and (
            not isinstance(axes, tuple)
            or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes)
        ):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {self.axis!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {self.rounding!r}")

    def axes(self, ndim: int) -> tuple[int, ...]:
        """The kept axes as non-negative ints for an operand of rank ``ndim``."""
        if self.axis is None:
            return ()
        axes = (self.axis,) if isinstance(self.axis, numbers.Integral) else self.axis
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(
                    f"axis {self.axis!r} is out of range for an operand of rank {ndim}"
                )
        return tuple(sorted({int(a) % ndim for a in axes}))


def _check_config(name: str, cfg) -> None:
    if cfg is not None and not isinstance(cfg, QuantConfig):
        raise TypeError(f"{name} must be a jquant.ops.QuantConfig or None, got {cfg!r}")


def _check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _check_accumulator_name(accumulator) -> None:
    if accumulator not in ACCUMULATORS:
        raise ValueError(f"accumulator must be one of {ACCUMULATORS}, got {accumulator!r}")


def _check_operand(name: str, x, cfg: QuantConfig | None) -> None:
    """TypeError unless a quantized operand is a float array (integers would be truncated by
    nothing and complex values would lose their imaginary part)."""
    if cfg is not None and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} is quantized ({name}_quant is set), so it must be a float array "
            f"(float16, bfloat16, float32, ...), got dtype {x.dtype}"
        )


def _check_overflow(k: int, lhs_quant: QuantConfig, rhs_quant: QuantConfig, accumulator) -> None:
    """ValueError unless ``K * max|q_l - z_l| * max|q_r - z_r|`` fits in int32 (or the user
    accepted wrap-around with ``accumulator="int32_wrap"``)."""
    if accumulator == "int32_wrap":
        return
    cl = centered_code_bound(lhs_quant.fmt, zero_point=_has_zero_point(lhs_quant))
    cr = centered_code_bound(rhs_quant.fmt, zero_point=_has_zero_point(rhs_quant))
    try:
        check_int32_bound(
            product_bound(k, cl, cr),
            f"K * max|q_l - z_l| * max|q_r - z_r| = {k} * {cl} * {cr} (contraction size "
            f"K = {k}, lhs {lhs_quant.fmt}, rhs {rhs_quant.fmt})",
        )
    except ValueError as e:
        raise ValueError(
            f"mode='int': {e}; pass accumulator='int32_wrap' to accept wrap-around modulo "
            f"2^32, split the contraction, or use mode='simulate'"
        ) from None


def dynamic_qparams(x: jax.Array, cfg: QuantConfig) -> QParams:
    """QParams from ``x``'s own range, reduced over every axis not in ``cfg.axis``.

    ``qparams_from_range(min x, max x)`` (affine) or ``qparams_from_range(-max|x|, max|x|)``
    (symmetric), with the reduced axes kept as size 1 so the result broadcasts against ``x``.
    The range is ``stop_gradient``-ed: dynamic ranges are not learned. A NaN or +-inf in a
    reduced group makes that group's scale and zero point NaN (see
    :func:`jquant.quant.qparams_from_data_range`), eagerly and under ``jit``.

    >>> qp = dynamic_qparams(jnp.array([[1.0, -2.0], [0.5, 4.0]]), QuantConfig(axis=1))
    >>> qp.scale.shape, [round(float(s) * 127, 4) for s in qp.scale[0]]
    ((1, 2), [1.0, 4.0])
    """
    _check_config("cfg", cfg)
    check_real("x", x)
    x = lax.stop_gradient(jnp.asarray(x))
    kept = cfg.axes(x.ndim)
    reduce = tuple(a for a in range(x.ndim) if a not in kept)
    if cfg.symmetric:
        amax = jnp.max(jnp.abs(x), axis=reduce, keepdims=True)
        rmin, rmax = -amax, amax
    else:
        rmin = jnp.min(x, axis=reduce, keepdims=True)
        rmax = jnp.max(x, axis=reduce, keepdims=True)
    return qparams_from_data_range(rmin, rmax, cfg.fmt, symmetric=cfg.symmetric)


def _given_qparams(name: str, x, cfg: QuantConfig | None, qp: QParams | None):
    """Validated given QParams (float32 arrays), or None (dynamic, or not quantized)."""
    if cfg is None:
        if qp is not None:
            raise ValueError(f"{name}_qparams was given but {name}_quant is None")
        return None
    if qp is None:
        return None
    check_qparams(x, qp, cfg.fmt)
    qp = QParams(jnp.asarray(qp.scale, jnp.float32), jnp.asarray(qp.zero_point, jnp.float32))
    if cfg.symmetric:
        zp = qp.zero_point
        if not isinstance(zp, jax.core.Tracer) and np.any(np.asarray(zp) != 0):
            raise ValueError(
                f"{name}_quant is symmetric, so {name}_qparams.zero_point must be 0, got {zp}"
            )
    return qp


def _qparams_shape(x, cfg: QuantConfig, qp: QParams | None) -> tuple[int, ...]:
    """Shape of the QParams that ``x`` will use (dynamic ones: size 1 on the reduced axes)."""
    if qp is not None:
        return qp.shape
    kept = cfg.axes(x.ndim)
    return tuple(n if a in kept else 1 for a, n in enumerate(x.shape))


def _resolve_qparams(x, cfg: QuantConfig | None, qp: QParams | None):
    return dynamic_qparams(x, cfg) if cfg is not None and qp is None else qp


def _fake_quant(x, qp: QParams | None, cfg: QuantConfig | None):
    if cfg is None:
        return x
    return fake_quant(x, qp, cfg.fmt, rounding=cfg.rounding, estimator=cfg.estimator)


# --- int8 operands ----------------------------------------------------------------------------


def _check_int_config(name: str, cfg: QuantConfig | None) -> None:
    if cfg is None:
        raise ValueError(
            f"mode='int' quantizes both operands: {name}_quant must be a QuantConfig, got None"
        )
    fmt = cfg.fmt
    if isinstance(fmt, IntFormat) and not fmt.is_static:
        raise ValueError(
            f"mode='int' needs a static bit width (a Python int) for {name}_quant.fmt, got "
            f"traced bits {fmt.bits!r}; sweep traced widths with mode='simulate'"
        )
    ok = isinstance(fmt, BinaryFormat) or (
        isinstance(fmt, IntFormat) and fmt.bits <= 8 and not fmt.midrise
    )
    if not ok:
        raise ValueError(
            f"mode='int' needs a static integer format of <= 8 bits (not midrise) for "
            f"{name}_quant.fmt, got {fmt}; use mode='simulate'"
        )


def _has_zero_point(cfg: QuantConfig) -> bool:
    """Whether the int8 codes of this operand carry a (possibly) non-zero zero point."""
    return not (cfg.symmetric and cfg.fmt.signed)


def _int8_codes(x, qp: QParams, cfg: QuantConfig):
    """``(q, z)``: int8 codes and the int32 zero point (or None) with ``x ~ s (q - z)``.

    Unsigned grids are shifted by ``2^(b-1)`` onto the signed grid of the same width.
    """
    fmt = cfg.fmt
    if isinstance(fmt, IntFormat) and not fmt.signed:
        half = float(1 << (fmt.bits - 1))
        qp = QParams(qp.scale, qp.zero_point - half)
        fmt = dataclasses.replace(fmt, signed=True)
    q = quantize(x, qp, fmt, rounding=cfg.rounding).astype(jnp.int8)
    z = jnp.round(qp.zero_point).astype(jnp.int32) if _has_zero_point(cfg) else None
    return q, z


def _expand_to(a, ndim: int):
    """Left-pads ``a``'s shape with ones up to rank ``ndim``."""
    a = jnp.asarray(a)
    return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def _check_constant_along(name: str, qp_shape, ndim: int, axes, what: str) -> None:
    """Raises unless scale and zero point have size 1 along ``axes`` (they must factor out)."""
    shape = (1,) * (ndim - len(qp_shape)) + tuple(qp_shape)
    bad = [a for a in axes if shape[a] != 1]
    if bad:
        raise ValueError(
            f"mode='int' needs {name}'s scale/zero point to be constant along {what} {bad} "
            f"(got shape {tuple(qp_shape)}); quantize per tensor or per non-contracting axis"
        )


def _out_dtype(lhs, rhs, preferred_element_type):
    if preferred_element_type is None:
        return jnp.result_type(lhs, rhs)
    dtype = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"preferred_element_type must be a float dtype or None for quantized ops, got {dtype}"
        )
    return dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _int_with_simulated_grad(int_fn, sim_fn, static, lhs, rhs, qp_l, qp_r):
    """``int_fn(...)`` forward, ``sim_fn``'s vjp backward (the simulate mode's estimators)."""
    return int_fn(static, lhs, rhs, qp_l, qp_r)


def _int_fwd(int_fn, sim_fn, static, lhs, rhs, qp_l, qp_r):
    return int_fn(static, lhs, rhs, qp_l, qp_r), (lhs, rhs, qp_l, qp_r)


def _int_bwd(int_fn, sim_fn, static, res, g):
    # The primal output of this vjp is unused, so XLA drops the float product from backward.
    _, vjp = jax.vjp(functools.partial(sim_fn, static), *res)
    return vjp(g)


_int_with_simulated_grad.defvjp(_int_fwd, _int_bwd)


# --- dot_general ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _DotStatic:
    dimension_numbers: tuple
    precision: object
    preferred_element_type: object
    lhs_quant: QuantConfig | None
    rhs_quant: QuantConfig | None
    out_sharding: object = None

    def dot(self, lhs, rhs, **overrides):
        kw = dict(precision=self.precision, preferred_element_type=self.preferred_element_type)
        kw |= _sharding_kw(self.out_sharding)
        return lax.dot_general(lhs, rhs, self.dimension_numbers, **(kw | overrides))


def _sharding_kw(out_sharding) -> dict:
    # Passed only when set: older jax releases have no out_sharding argument.
    return {} if out_sharding is None else {"out_sharding": out_sharding}


def _dot_simulate(st: _DotStatic, lhs, rhs, qp_l, qp_r):
    return st.dot(_fake_quant(lhs, qp_l, st.lhs_quant), _fake_quant(rhs, qp_r, st.rhs_quant))


def _dot_int(st: _DotStatic, lhs, rhs, qp_l, qp_r):
    qp_l, qp_r = nan_if_invalid(qp_l), nan_if_invalid(qp_r)  # bad traced QParams: NaN out
    (lc, rc), (lb, rb) = st.dimension_numbers
    lfree = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rfree = [d for d in range(rhs.ndim) if d not in rc and d not in rb]

    def lhs_side(a):  # lhs-shaped (size 1 on lc) -> output layout (batch, lhs free, 1...)
        a = _expand_to(a, lhs.ndim)
        a = jnp.transpose(a, (*lb, *lfree, *lc))
        return a.reshape(a.shape[: len(lb) + len(lfree)] + (1,) * len(rfree))

    def rhs_side(a):  # rhs-shaped (size 1 on rc) -> output layout (batch, 1..., rhs free)
        a = _expand_to(a, rhs.ndim)
        a = jnp.transpose(a, (*rb, *rfree, *rc))
        return a.reshape(a.shape[: len(rb)] + (1,) * len(lfree) + a.shape[len(rb) :][: len(rfree)])

    q_l, z_l = _int8_codes(lhs, qp_l, st.lhs_quant)
    q_r, z_r = _int8_codes(rhs, qp_r, st.rhs_quant)
    acc = st.dot(q_l, q_r, precision=None, preferred_element_type=jnp.int32)
    if z_l is not None:
        acc = acc - lhs_side(z_l) * rhs_side(jnp.sum(q_r, rc, jnp.int32, keepdims=True))
    if z_r is not None:
        acc = acc - rhs_side(z_r) * lhs_side(jnp.sum(q_l, lc, jnp.int32, keepdims=True))
    if z_l is not None and z_r is not None:
        k = int(np.prod([lhs.shape[d] for d in lc]))
        acc = acc + k * lhs_side(z_l) * rhs_side(z_r)
    scale = lhs_side(qp_l.scale) * rhs_side(qp_r.scale)
    out = scale * acc.astype(jnp.float32)
    # NaN has no int8 code: the outputs that contract over a NaN (operand or zero point) are NaN
    nan_l = jnp.any(jnp.isnan(lhs), lc, keepdims=True) | jnp.isnan(qp_l.zero_point)
    nan_r = jnp.any(jnp.isnan(rhs), rc, keepdims=True) | jnp.isnan(qp_r.zero_point)
    out = jnp.where(lhs_side(nan_l) | rhs_side(nan_r), jnp.nan, out)
    return out.astype(_out_dtype(lhs, rhs, st.preferred_element_type))


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_quant: QuantConfig | None = None,
    rhs_quant: QuantConfig | None = None,
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    mode: str = "simulate",
    out_sharding=None,
    accumulator: str = "int32",
) -> jax.Array:
    """``lax.dot_general(fq(lhs), fq(rhs), ...)`` with ``fq`` the fake quantizer of each side.

    ``mode="int"`` computes the same value as ``s_l s_r (sum q_l q_r - z_l sum q_r - z_r sum
    q_l + K z_l z_r)`` with int8 codes and an int32 accumulator, exact while the worst case
    ``K * max|q_l - z_l| * max|q_r - z_r|`` fits in int32 (larger ``K`` raise ValueError unless
    ``accumulator="int32_wrap"``; see the module docstring, also for NaN); it needs both
    configs, static integer formats of <= 8 bits, and QParams constant along the contracting
    axes (per tensor, per row of ``lhs``, per output column of ``rhs``).

    Args:
      lhs, rhs, dimension_numbers, precision, preferred_element_type: as ``lax.dot_general``
        (``precision`` is unused by the integer product).
      lhs_quant, rhs_quant: how each side is quantized; ``None`` leaves it in float
        (``"simulate"`` only).
      lhs_qparams, rhs_qparams: fixed or learned QParams (they receive the estimator's
        gradients); ``None`` computes them from the operand with :func:`dynamic_qparams`.
      mode: ``"simulate"`` or ``"int"``.
      out_sharding: as ``lax.dot_general`` (passed on when set).
      accumulator: ``"int32"`` (exact; a contraction whose worst case may overflow int32
        raises ValueError at trace time) or ``"int32_wrap"`` (accept two's-complement
        wrap-around modulo ``2^32``). Only ``"int"`` mode accumulates in integers.

    Returns:
      The float product; in ``"int"`` mode of dtype ``preferred_element_type`` or the
      operands' float type.
    """
    _check_mode(mode)
    _check_accumulator_name(accumulator)
    _check_config("lhs_quant", lhs_quant)
    _check_config("rhs_quant", rhs_quant)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    _check_operand("lhs", lhs, lhs_quant)
    _check_operand("rhs", rhs, rhs_quant)
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    except (TypeError, ValueError):
        raise TypeError(
            f"dimension_numbers must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), "
            f"got {dimension_numbers!r}"
        ) from None
    if mode == "int":
        _check_int_config("lhs", lhs_quant)
        _check_int_config("rhs", rhs_quant)
        _out_dtype(lhs, rhs, preferred_element_type)
        k = int(np.prod([lhs.shape[d] for d in dn[0][0]]))
        _check_overflow(k, lhs_quant, rhs_quant, accumulator)
    qp_l = _given_qparams("lhs", lhs, lhs_quant, lhs_qparams)
    qp_r = _given_qparams("rhs", rhs, rhs_quant, rhs_qparams)
    if mode == "int":
        shape_l, shape_r = (
            _qparams_shape(lhs, lhs_quant, qp_l),
            _qparams_shape(rhs, rhs_quant, qp_r),
        )
        _check_constant_along("lhs", shape_l, lhs.ndim, dn[0][0], "contracting axes")
        _check_constant_along("rhs", shape_r, rhs.ndim, dn[0][1], "contracting axes")
    qp_l, qp_r = _resolve_qparams(lhs, lhs_quant, qp_l), _resolve_qparams(rhs, rhs_quant, qp_r)
    st = _DotStatic(dn, precision, preferred_element_type, lhs_quant, rhs_quant, out_sharding)
    if mode == "simulate":
        return _dot_simulate(st, lhs, rhs, qp_l, qp_r)
    return _int_with_simulated_grad(_dot_int, _dot_simulate, st, lhs, rhs, qp_l, qp_r)


# --- conv_general_dilated ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _ConvStatic:
    window_strides: tuple
    padding: str | tuple
    lhs_dilation: tuple | None
    rhs_dilation: tuple | None
    dimension_numbers: lax.ConvDimensionNumbers
    feature_group_count: int
    batch_group_count: int
    precision: object
    preferred_element_type: object
    lhs_quant: QuantConfig | None
    rhs_quant: QuantConfig | None
    out_sharding: object = None

    def conv(self, lhs, rhs, **overrides):
        kw = dict(
            window_strides=self.window_strides,
            padding=self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            dimension_numbers=self.dimension_numbers,
            feature_group_count=self.feature_group_count,
            batch_group_count=self.batch_group_count,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        kw |= _sharding_kw(self.out_sharding)
        return lax.conv_general_dilated(lhs, rhs, **(kw | overrides))


def _conv_simulate(st: _ConvStatic, lhs, rhs, qp_l, qp_r):
    return st.conv(_fake_quant(lhs, qp_l, st.lhs_quant), _fake_quant(rhs, qp_r, st.rhs_quant))


def _explicit_pads(st: _ConvStatic, lhs_shape, rhs_shape) -> list[tuple[int, int]]:
    """``padding`` as (low, high) pairs per spatial axis (strings resolved as lax does)."""
    if not isinstance(st.padding, str):
        return list(st.padding)
    lhs_spec, rhs_spec, _ = st.dimension_numbers
    window = [rhs_shape[d] for d in rhs_spec[2:]]
    dil = st.rhs_dilation or (1,) * len(window)
    window = [(k - 1) * r + 1 for k, r in zip(window, dil, strict=True)]
    spatial = [lhs_shape[d] for d in lhs_spec[2:]]
    return list(lax.padtype_to_pads(spatial, window, st.window_strides, st.padding))


def _int_layout(st: _ConvStatic, lhs, rhs, qp_l, qp_r):
    """The conv in the layout XLA:CPU's int8 kernel takes: channels last (NHWC / HWIO) and at
    least 2 spatial axes (a 1-D conv gains a unit axis after its spatial one). Same numbers.

    Returns the new ``(st, lhs, rhs, qp_l, qp_r)`` and a function that maps the output back.
    Otherwise XLA:CPU upcasts the codes to int32 and takes a generic path: about 7x the float
    conv on the MNIST-1D CNN's 1-D layers and 40x on an NCHW 3x3 conv (``benchmarks/ops.py``).
    """
    lhs_spec, rhs_spec, out_spec = st.dimension_numbers
    lift = len(lhs_spec) == 3  # 1-D: a unit spatial axis follows the real one
    n = len(lhs_spec) + int(lift)  # rank of the int8 operands

    def to_int_layout(a, perm, unit_axis):
        a = jnp.transpose(_expand_to(a, len(perm)), perm)
        return jnp.expand_dims(a, unit_axis) if lift else a

    def with_unit(t, value):  # per-spatial-axis parameters gain the unit axis's
        return (*t, value) if lift and t is not None else t

    perm_l = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    perm_r = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    lhs_, rhs_ = to_int_layout(lhs, perm_l, 2), to_int_layout(rhs, perm_r, 1)
    qp_l = QParams(*(to_int_layout(a, perm_l, 2) for a in (qp_l.scale, qp_l.zero_point)))
    qp_r = QParams(*(to_int_layout(a, perm_r, 1) for a in (qp_r.scale, qp_r.zero_point)))
    nhwc = (0, n - 1, *range(1, n - 1))
    hwio = (n - 1, n - 2, *range(n - 2))
    padding = st.padding if isinstance(st.padding, str) else with_unit(tuple(st.padding), (0, 0))
    st2 = dataclasses.replace(
        st,
        window_strides=with_unit(st.window_strides, 1),
        padding=padding,
        lhs_dilation=with_unit(st.lhs_dilation, 1),
        rhs_dilation=with_unit(st.rhs_dilation, 1),
        dimension_numbers=lax.ConvDimensionNumbers(nhwc, hwio, nhwc),
    )

    def restore(out):
        out = jnp.squeeze(out, 2) if lift else out
        return jnp.transpose(out, np.argsort((out_spec[0], *out_spec[2:], out_spec[1])))

    return (st2, lhs_, rhs_, qp_l, qp_r), restore


def _conv_int(st: _ConvStatic, lhs, rhs, qp_l, qp_r):
    qp_l, qp_r = nan_if_invalid(qp_l), nan_if_invalid(qp_r)  # bad traced QParams: NaN out
    args, restore = _int_layout(st, lhs, rhs, qp_l, qp_r)
    return restore(_conv_int_channels_last(*args))


def _conv_int_channels_last(st: _ConvStatic, lhs, rhs, qp_l, qp_r):
    lhs_spec, rhs_spec, out_spec = st.dimension_numbers
    out_ndim = lhs.ndim

    def along(a, src_ndim, src_dim, out_dim):  # a per-axis vector -> output layout
        a = _expand_to(a, src_ndim)
        shape = [1] * out_ndim
        shape[out_dim] = a.shape[src_dim]
        return a.reshape(shape)

    q_l, z_l = _int8_codes(lhs, qp_l, st.lhs_quant)
    q_r, z_r = _int8_codes(rhs, qp_r, st.rhs_quant)
    int_conv = functools.partial(st.conv, preferred_element_type=jnp.int32, precision=None)
    groups, n_out = st.feature_group_count, rhs.shape[rhs_spec[0]]

    def window_sums(q):  # sum of q over each window and input group, per output channel
        ones = jnp.ones((*rhs.shape[:-1], groups), jnp.int8)  # channels last: HWIO
        return jnp.repeat(int_conv(q, ones), n_out // groups, axis=out_spec[1])

    # NaN has no int8 code: every window that holds a NaN input (for the output channels of its
    # group), every output channel with a NaN weight, and NaN zero points give NaN outputs
    # (the window count is a conv as costly as a depthwise one: skipped unless a NaN is there)
    def count_nan_windows(nan_l):
        if st.batch_group_count == 1:
            return window_sums(nan_l) > 0
        # one output feature per kernel: count the NaN taps with an all-ones kernel
        return int_conv(nan_l, jnp.ones(rhs.shape, jnp.int8)) > 0

    nan_l = jnp.isnan(lhs).astype(jnp.int8)
    no_nan = jax.eval_shape(count_nan_windows, nan_l)
    nan_windows = lax.cond(
        jnp.any(nan_l),
        count_nan_windows,
        lambda _: jnp.zeros(no_nan.shape, no_nan.dtype),
        nan_l,
    )
    z_r = None if z_r is None else along(z_r, rhs.ndim, rhs_spec[0], out_spec[1])
    lhs_dilated = st.lhs_dilation is not None and any(d != 1 for d in st.lhs_dilation)
    if z_l is None:
        acc = int_conv(q_l, q_r)
        if z_r is not None:
            acc = acc - z_r * window_sums(q_l)
    elif z_l.size == 1 and not lhs_dilated:
        # Real padding is 0, i.e. the code z_l: pad the codes with z_l, then every window is
        # full and sum (q_l - z_l)(q_r - z_r) expands over the K taps of a window.
        pads = _explicit_pads(st, lhs.shape, rhs.shape)
        config = [(0, 0, 0)] * lhs.ndim
        for d, (lo, hi) in zip(lhs_spec[2:], pads, strict=True):
            config[d] = (lo, hi, 0)
        z8 = z_l.reshape(()).astype(jnp.int8)
        q_l = lax.pad(q_l, z8, config)
        int_conv = functools.partial(int_conv, padding=[(0, 0)] * len(pads))
        acc = int_conv(q_l, q_r)
        kernel_sum = jnp.sum(q_r, tuple(d for d in range(rhs.ndim) if d != rhs_spec[0]), jnp.int32)
        acc = acc - z_l.reshape(()) * along(kernel_sum, 1, 0, out_spec[1])
        if z_r is not None:
            k = int(np.prod(rhs.shape)) // n_out
            acc = acc - z_r * (window_sums(q_l) - k * z_l.reshape(()))
    else:
        # Per-sample zero points or input dilation: the corrections count, per output position,
        # only the kernel taps that hit real (not padded, not inserted) inputs: convs of ones.
        ones_shape = list(lhs.shape)
        ones_shape[lhs_spec[0]] = st.batch_group_count
        ones_l = jnp.ones(ones_shape, jnp.int8)
        z_l = along(z_l, lhs.ndim, lhs_spec[0], out_spec[0])
        acc = int_conv(q_l, q_r) - z_l * int_conv(ones_l, q_r)
        if z_r is not None:
            acc = acc - z_r * (window_sums(q_l) - z_l * window_sums(ones_l))
    scale = along(qp_l.scale, lhs.ndim, lhs_spec[0], out_spec[0]) * along(
        qp_r.scale, rhs.ndim, rhs_spec[0], out_spec[1]
    )
    out = scale * acc.astype(jnp.float32)
    nan_zl = along(jnp.isnan(qp_l.zero_point), lhs.ndim, lhs_spec[0], out_spec[0])
    rhs_axes = tuple(d for d in range(rhs.ndim) if d != rhs_spec[0])
    nan_r = jnp.any(jnp.isnan(rhs), rhs_axes) | jnp.isnan(qp_r.zero_point).reshape(-1)
    nan_r = along(nan_r, 1, 0, out_spec[1])
    out = jnp.where(nan_windows | nan_zl | nan_r, jnp.nan, out)
    return out.astype(_out_dtype(lhs, rhs, st.preferred_element_type))


def _tuple_or_none(name: str, v):
    if v is None:
        return None
    try:
        return tuple(int(i) for i in v)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints or None, got {v!r}") from None


def conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_quant: QuantConfig | None = None,
    rhs_quant: QuantConfig | None = None,
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    mode: str = "simulate",
    out_sharding=None,
    accumulator: str = "int32",
) -> jax.Array:
    """``lax.conv_general_dilated(fq(lhs), fq(rhs), ...)`` with per-side fake quantizers.

    ``mode="int"`` computes ``s_l s_r conv(q_l - z_l, q_r)`` with int8 codes and an int32
    accumulator. Padding is 0 in the real domain, i.e. the code ``z_l``: the codes are padded
    with ``z_l`` and ``z_l * sum(kernel)`` subtracted (per-sample zero points and input dilation
    subtract ``z_l * conv(1, q_r)`` instead). A weight zero point ``z_r`` subtracts
    ``z_r * (window sums of q_l - z_l * taps)``, the window sums being a conv with an all-ones
    kernel (one output per feature group). It needs both configs, static integer formats of
    <= 8 bits, ``lhs`` QParams constant except along the batch axis, ``rhs`` QParams constant
    except along the output features, and a symmetric signed ``rhs`` if ``batch_group_count >
    1``.

    Arguments are those of ``lax.conv_general_dilated`` plus ``lhs_quant``, ``rhs_quant``,
    ``lhs_qparams``, ``rhs_qparams``, ``mode`` and ``accumulator`` as in :func:`dot_general`;
    the contraction size of the overflow bound is ``K = rhs.size / out_features`` (the taps of
    one output). Gradients in
    both modes are those of ``"simulate"``; grouped and depthwise convs
    (``feature_group_count``) work in both.
    """
    _check_mode(mode)
    _check_accumulator_name(accumulator)
    _check_config("lhs_quant", lhs_quant)
    _check_config("rhs_quant", rhs_quant)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    _check_operand("lhs", lhs, lhs_quant)
    _check_operand("rhs", rhs, rhs_quant)
    if lhs.ndim != rhs.ndim or lhs.ndim < 3:
        raise ValueError(
            f"lhs and rhs must have the same rank >= 3, got shapes {lhs.shape} and {rhs.shape}"
        )
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if not isinstance(padding, str):
        try:
            padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        except (TypeError, ValueError):
            raise TypeError(
                f"padding must be a string or a sequence of (low, high) pairs, got {padding!r}"
            ) from None
    st = _ConvStatic(
        _tuple_or_none("window_strides", window_strides),
        padding,
        _tuple_or_none("lhs_dilation", lhs_dilation),
        _tuple_or_none("rhs_dilation", rhs_dilation),
        dn,
        int(feature_group_count),
        int(batch_group_count),
        precision,
        preferred_element_type,
        lhs_quant,
        rhs_quant,
        out_sharding,
    )
    if mode == "int":
        _check_int_config("lhs", lhs_quant)
        _check_int_config("rhs", rhs_quant)
        if _has_zero_point(rhs_quant) and batch_group_count != 1:
            raise ValueError(
                f"mode='int' conv with batch_group_count={batch_group_count} needs rhs "
                f"(weights) without zero point: symmetric with a signed format, got {rhs_quant}"
            )
        _out_dtype(lhs, rhs, preferred_element_type)
        _check_overflow(rhs.size // rhs.shape[dn.rhs_spec[0]], lhs_quant, rhs_quant, accumulator)
    qp_l = _given_qparams("lhs", lhs, lhs_quant, lhs_qparams)
    qp_r = _given_qparams("rhs", rhs, rhs_quant, rhs_qparams)
    if mode == "int":
        lhs_varying = (dn.lhs_spec[0],) if st.batch_group_count == 1 else ()
        _check_constant_along(
            "lhs",
            _qparams_shape(lhs, lhs_quant, qp_l),
            lhs.ndim,
            [d for d in range(lhs.ndim) if d not in lhs_varying],
            "axes other than the batch axis",
        )
        _check_constant_along(
            "rhs",
            _qparams_shape(rhs, rhs_quant, qp_r),
            rhs.ndim,
            [d for d in range(rhs.ndim) if d != dn.rhs_spec[0]],
            "axes other than the output-feature axis",
        )
    qp_l, qp_r = _resolve_qparams(lhs, lhs_quant, qp_l), _resolve_qparams(rhs, rhs_quant, qp_r)
    if mode == "simulate":
        return _conv_simulate(st, lhs, rhs, qp_l, qp_r)
    return _int_with_simulated_grad(_conv_int, _conv_simulate, st, lhs, rhs, qp_l, qp_r)


# --- drop-in factories ------------------------------------------------------------------------


def quantized_dot_general(
    lhs: QuantConfig | None,
    rhs: QuantConfig | None,
    mode: str = "simulate",
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    accumulator: str = "int32",
) -> Callable[..., jax.Array]:
    """A ``lax.dot_general`` look-alike for ``flax.linen.Dense(dot_general=...)`` /
    ``nnx.Linear(dot_general=...)``: :func:`dot_general` with these configs bound.

    >>> import flax.linen as nn
    >>> layer = nn.Dense(4, dot_general=quantized_dot_general(QuantConfig(), QuantConfig()))
    """
    _check_mode(mode)
    _check_accumulator_name(accumulator)
    _check_config("lhs", lhs)
    _check_config("rhs", rhs)
    return functools.partial(
        dot_general,
        lhs_quant=lhs,
        rhs_quant=rhs,
        lhs_qparams=lhs_qparams,
        rhs_qparams=rhs_qparams,
        mode=mode,
        accumulator=accumulator,
    )


def quantized_conv_general_dilated(
    lhs: QuantConfig | None,
    rhs: QuantConfig | None,
    mode: str = "simulate",
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    accumulator: str = "int32",
) -> Callable[..., jax.Array]:
    """A ``lax.conv_general_dilated`` look-alike for ``flax.linen.Conv(conv_general_dilated=
    ...)`` / ``nnx.Conv``: :func:`conv_general_dilated` with these configs bound."""
    _check_mode(mode)
    _check_accumulator_name(accumulator)
    _check_config("lhs", lhs)
    _check_config("rhs", rhs)
    return functools.partial(
        conv_general_dilated,
        lhs_quant=lhs,
        rhs_quant=rhs,
        lhs_qparams=lhs_qparams,
        rhs_qparams=rhs_qparams,
        mode=mode,
        accumulator=accumulator,
    )


# --- pooling ----------------------------------------------------------------------------------


def _pool_geometry(x, window, strides, padding):
    """``(dims, strides, pads)`` for ``lax.reduce_window`` over ``x`` of shape (N, *S, C)."""
    window = _tuple_or_none("window", window)
    if window is None or x.ndim != len(window) + 2:
        raise ValueError(
            f"window must give one size per spatial axis of x (N, *spatial, C) of shape "
            f"{x.shape}, got {window!r}"
        )
    strides = (1,) * len(window) if strides is None else _tuple_or_none("strides", strides)
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
    if not isinstance(fmt, IntFormat) or fmt.midrise:
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
    _check_mode(mode)
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


def avg_pool(
    x: jax.Array,
    qp: QParams,
    fmt: IntFormat,
    window: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    mode: str = "simulate",
) -> jax.Array:
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
    """
    return _pool("avg", x, qp, fmt, window, strides, padding, mode)


def max_pool(
    x: jax.Array,
    qp: QParams,
    fmt: IntFormat,
    window: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: str | Sequence[tuple[int, int]] = "VALID",
    mode: str = "simulate",
) -> jax.Array:
    """Max pooling of a quantized tensor that keeps its scale and zero point: the max code
    over each window (padding never wins). Arguments as :func:`avg_pool`; the simulate mode's
    gradient is the float max pool's."""
    return _pool("max", x, qp, fmt, window, strides, padding, mode)
