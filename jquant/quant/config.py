"""How one operand of a quantized product is quantized: :class:`QuantConfig`, and the
QParams a config derives from the data itself (:func:`dynamic_qparams`).

``jquant.ops`` runs the products; the config lives here, beside :class:`QParams`, so that
the layers above ``ops`` (``nn``, ``bench``, ...) take it from the quant layer.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers

import jax
import jax.numpy as jnp
from jax import lax

# a module import: jquant.estimators imports this package (for QParams), so its names are
# looked up when a config is built, not when this module loads
from jquant import estimators, mx
from jquant.formats import Format, check_format, get_format, int8
from jquant.quant.affine import (
    ROUNDING_MODES,
    QParams,
    block_qparams,
    block_range,
    check_real,
    qparams_from_data_range,
)

__all__ = ["QuantConfig", "check_config", "dynamic_qparams"]

# Stochastic rounding needs a PRNG key per call, which lax's signatures have no room for.
_ROUNDINGS = tuple(r for r in ROUNDING_MODES if r != "stochastic")


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["fmt"],
    meta_fields=["symmetric", "axis", "estimator", "rounding", "block_size", "block_axis"],
)
@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How one operand of a product is quantized.

    A pytree: ``fmt`` is its child (an ``IntFormat``'s ``bits`` is a leaf), the rest static.
    With a static format it is hashable; an ``IntFormat`` with traced ``bits`` (a sweep over
    widths inside ``jit`` / ``vmap``) is allowed in ``mode="simulate"`` only.

    Args:
      fmt: the number format (``IntFormat``, ``FloatFormat``, ``BinaryFormat``, any object
        following the ``jquant.formats.Format`` protocol, or a name of ``NAMED_FORMATS``),
        or a block format of :mod:`jquant.mx` (``mx.FORMATS["mxfp4"]``, or its name):
        quantized by ``jquant.mx.fake_quant`` along ``block_axis`` (the op's contracting
        axis when None), straight-through gradient, ``mode="simulate"`` only, no QParams.
      symmetric: zero point 0 (``scale = max|x| / qmax``) if True, else affine
        (``scale = (max - min) / (qmax - qmin)``); given QParams must then have zero point 0.
      axis: axes that keep their own scale (per channel / per row); ``None`` is per tensor.
      estimator: gradient estimator, a ``jquant.estimators.Estimator`` or a registered name
        (``jquant.estimators.ESTIMATORS``); stored as the object.
      rounding: one of ``jquant.quant.ROUNDING_MODES`` except ``"stochastic"``.
      block_size: block-wise (sub-channel) scales: one scale per ``block_size`` consecutive
        elements along ``block_axis`` (besides the kept ``axis``); None: no blocks.
      block_axis: the axis the blocks run along; None lets the op choose its (single)
        contracting axis (``dot_general``'s contracting dimension, a convolution's input
        feature dimension). ``dynamic_qparams`` needs it set.

    >>> QuantConfig(axis=-1).axes(2)
    (1,)
    """

    fmt: Format = int8
    symmetric: bool = True
    axis: int | tuple[int, ...] | None = None
    estimator: str | estimators.Estimator = "ste"
    rounding: str = "nearest_even"
    block_size: int | None = None
    block_axis: int | None = None

    def __post_init__(self):
        # Unflattening inside jax transformations may pass placeholders for the child.
        if self.fmt is None or type(self.fmt) is object:
            return
        if isinstance(self.fmt, str):
            named = self.fmt
            fmt = mx.get_block_format(named) if named in mx.FORMATS else get_format(named)
            object.__setattr__(self, "fmt", fmt)
        if not isinstance(self.fmt, mx.BlockFormat):
            check_format(self.fmt)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        axes = (self.axis,) if isinstance(self.axis, numbers.Integral) else self.axis
        if axes is not None and (
            not isinstance(axes, tuple)
            or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes)
        ):
            raise TypeError(f"axis must be None, an int or a tuple of ints, got {self.axis!r}")
        object.__setattr__(self, "estimator", estimators.get_estimator(self.estimator))
        if self.rounding not in _ROUNDINGS:
            raise ValueError(f"rounding must be one of {_ROUNDINGS}, got {self.rounding!r}")
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"block_size must be None or a positive int, got {b!r}")
        ba = self.block_axis
        if ba is not None and (isinstance(ba, bool) or not isinstance(ba, numbers.Integral)):
            raise TypeError(f"block_axis must be None or an int, got {ba!r}")
        if self.is_microscaling:
            if b is not None:
                raise ValueError(
                    f"block_size must be None for {self.fmt.name}: the format has its own "
                    f"blocks of {self.fmt.block_size}"
                )
            if self.estimator not in ("ste",):
                raise ValueError(
                    f"{self.fmt.name} fake-quantizes with the straight-through estimator: "
                    f"estimator must be 'ste', got {self.estimator!r}"
                )
        elif ba is not None and b is None:
            raise ValueError(f"block_axis={ba!r} needs block_size to be set")

    @property
    def is_microscaling(self) -> bool:
        """Whether ``fmt`` is a block format of :mod:`jquant.mx` (MX, NVFP4, NF4): it carries
        its own scales, so the config has no QParams."""
        return isinstance(self.fmt, mx.BlockFormat)

    def block_axis_for(self, ndim: int) -> int:
        """The block axis as a non-negative int for an operand of rank ``ndim``; ValueError if
        it is unset, out of range or also a kept ``axis``."""
        if self.block_axis is None:
            raise ValueError(
                "QuantConfig.block_axis is None: set it (or let a quantized op choose its "
                "contracting axis)"
            )
        if not -ndim <= self.block_axis < ndim:
            raise ValueError(
                f"block_axis {self.block_axis!r} is out of range for an operand of rank {ndim}"
            )
        ax = int(self.block_axis) % ndim
        if ax in self.axes(ndim):
            raise ValueError(
                f"block_axis {self.block_axis!r} is also a kept axis {self.axis!r}: an axis is "
                "either per channel or split into blocks"
            )
        return ax

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


def check_config(name: str, cfg) -> None:
    """TypeError unless ``cfg`` (the argument ``name``) is a :class:`QuantConfig` or None."""
    if cfg is not None and not isinstance(cfg, QuantConfig):
        raise TypeError(f"{name} must be a jquant.QuantConfig or None, got {cfg!r}")


def dynamic_qparams(x: jax.Array, cfg: QuantConfig) -> QParams:
    """QParams from ``x``'s own range, reduced over every axis not in ``cfg.axis`` (and, with
    ``cfg.block_size``, within each block along ``cfg.block_axis``: block-wise QParams).

    ``qparams_from_range(min x, max x)`` (affine) or ``qparams_from_range(-max|x|, max|x|)``
    (symmetric), with the reduced axes kept as size 1 so the result broadcasts against ``x``.
    The range is ``stop_gradient``-ed: dynamic ranges are not learned. A NaN or +-inf in a
    reduced group makes that group's scale and zero point NaN (see
    :func:`jquant.quant.qparams_from_data_range`), eagerly and under ``jit``.

    >>> qp = dynamic_qparams(jnp.array([[1.0, -2.0], [0.5, 4.0]]), QuantConfig(axis=1))
    >>> qp.scale.shape, [round(float(s) * 127, 4) for s in qp.scale[0]]
    ((1, 2), [1.0, 4.0])
    """
    check_config("cfg", cfg)
    check_real("x", x)
    if cfg.is_microscaling:
        raise ValueError(
            f"{cfg.fmt.name} computes its own block scales (jquant.mx.fake_quant): it has no "
            "QParams"
        )
    x = lax.stop_gradient(jnp.asarray(x))
    kept = cfg.axes(x.ndim)
    if cfg.block_size is not None:
        ax = cfg.block_axis_for(x.ndim)
        rmin, rmax = block_range(x, cfg.block_size, ax, kept, symmetric=cfg.symmetric)
        qp = qparams_from_data_range(rmin, rmax, cfg.fmt, symmetric=cfg.symmetric)
        return block_qparams(qp, cfg.block_size, ax)
    reduce = tuple(a for a in range(x.ndim) if a not in kept)
    if cfg.symmetric:
        amax = jnp.max(jnp.abs(x), axis=reduce, keepdims=True)
        rmin, rmax = -amax, amax
    else:
        rmin = jnp.min(x, axis=reduce, keepdims=True)
        rmax = jnp.max(x, axis=reduce, keepdims=True)
    return qparams_from_data_range(rmin, rmax, cfg.fmt, symmetric=cfg.symmetric)
