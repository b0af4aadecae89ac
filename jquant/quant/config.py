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
from jquant.formats import (
    Format,
    block_size_of,
    check_format,
    format_name,
    get_format,
    int8,
    rounding_modes_of,
)
from jquant.quant.affine import (
    QParams,
    block_qparams,
    block_range,
    check_real,
    qparams_from_data_range,
)

__all__ = ["QuantConfig", "check_config", "dynamic_qparams", "fake_quant_config", "resolve_format"]


def resolve_format(fmt, name: str = "fmt") -> Format:
    """A format from a name of ``jquant.formats.NAMED_FORMATS`` or of the block formats
    ``jquant.mx.FORMATS`` (``"mxfp4"``, ...); a format object (any object following the
    ``jquant.formats.Format`` protocol) passes through. ``name`` is the argument's name in
    errors."""
    if isinstance(fmt, str) and fmt in mx.FORMATS:
        return mx.FORMATS[fmt]
    try:
        return get_format(fmt)
    except (ValueError, TypeError) as e:
        if isinstance(fmt, str):
            e = ValueError(f"{e}; block formats: {', '.join(mx.FORMATS)}")
        raise type(e)(f"{name}: {e}") from None


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
        or a block format (one with ``block_size`` and ``block_scales``, such as those of
        :mod:`jquant.mx`: ``mx.FORMATS["mxfp4"]`` or its name), which scales its own blocks
        along ``block_axis`` (the op's contracting axis when None): ``jquant.mx.fake_quant``,
        straight-through gradient, ``mode="simulate"`` only, no QParams.
      symmetric: zero point 0 (``scale = max|x| / qmax``) if True, else affine
        (``scale = (max - min) / (qmax - qmin)``); given QParams must then have zero point 0.
      axis: axes that keep their own scale (per channel / per row); ``None`` is per tensor.
      estimator: gradient estimator, a ``jquant.estimators.Estimator`` or a registered name
        (``jquant.estimators.ESTIMATORS``); stored as the object.
      rounding: one of the format's rounding modes (``jquant.formats.rounding_modes_of``:
        ``jquant.quant.ROUNDING_MODES`` for most formats, ``"nearest_even"`` and
        ``"stochastic"`` for block formats). ``"stochastic"`` needs a PRNG key where the
        operand is quantized (``key=`` of the ops and of :func:`fake_quant_config`) and runs
        in ``mode="simulate"`` only.
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
            object.__setattr__(self, "fmt", resolve_format(self.fmt))
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
        roundings = rounding_modes_of(self.fmt)
        if self.rounding not in roundings:
            raise ValueError(
                f"rounding must be one of {roundings} for {format_name(self.fmt)}, got "
                f"{self.rounding!r}"
            )
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"block_size must be None or a positive int, got {b!r}")
        ba = self.block_axis
        if ba is not None and (isinstance(ba, bool) or not isinstance(ba, numbers.Integral)):
            raise TypeError(f"block_axis must be None or an int, got {ba!r}")
        own = block_size_of(self.fmt)
        if own is not None:
            if b is not None:
                raise ValueError(
                    f"block_size must be None for {format_name(self.fmt)}: the format has its own "
                    f"blocks of {own}"
                )
            if self.estimator not in ("ste",):
                raise ValueError(
                    f"{format_name(self.fmt)} fake-quantizes with the straight-through estimator: "
                    f"estimator must be 'ste', got {self.estimator!r}"
                )
        elif ba is not None and b is None:
            raise ValueError(f"block_axis={ba!r} needs block_size to be set")

    @property
    def scales_itself(self) -> bool:
        """Whether ``fmt`` is a block format (``jquant.formats.block_size_of``: MX, NVFP4,
        NF4, ...): it derives its own block scales from the data, so the config takes no
        QParams and no calibration."""
        return block_size_of(self.fmt) is not None

    @property
    def is_microscaling(self) -> bool:
        """The former name of :attr:`scales_itself`."""
        return self.scales_itself

    @property
    def is_blockwise(self) -> bool:
        """Whether the operand has one scale per block (``block_size``, or a block format)."""
        return self.block_size is not None or self.scales_itself

    def with_block_axis(self, axis: int) -> QuantConfig:
        """This config with ``block_axis = axis`` when it is block-wise and leaves
        ``block_axis`` None (an op's contracting axis, an activation's feature axis)."""
        if self.block_axis is not None or not self.is_blockwise:
            return self
        return dataclasses.replace(self, block_axis=int(axis))

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
    if cfg.scales_itself:
        raise ValueError(
            f"{format_name(cfg.fmt)} computes its own block scales (jquant.mx.fake_quant): it has "
            "no QParams"
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


def fake_quant_config(
    x: jax.Array, cfg: QuantConfig, qp: QParams | None = None, *, key: jax.Array | None = None
) -> jax.Array:
    """``x`` fake-quantized as ``cfg`` says, in ``x``'s dtype.

    A block format (``cfg.scales_itself``) scales its own blocks along ``cfg.block_axis``
    (a partial last block is padded with zeros): ``s * fmt.decode(fmt.encode(x / s))``,
    ``s = fmt.block_scales(amax)`` (:func:`jquant.mx.fake_quant`), straight-through gradient;
    ``qp`` must be None. Any other format: ``jquant.estimators.fake_quant(x, qp, fmt)`` with
    the config's rounding and estimator (``qp`` None: :func:`dynamic_qparams`).

    Args:
      x: float array.
      cfg: the operand's config.
      qp: its QParams (None: dynamic, or a block format's own scales).
      key: PRNG key, required by ``cfg.rounding="stochastic"`` (ValueError without one).
    """
    check_config("cfg", cfg)
    if cfg.rounding == "stochastic" and key is None:
        raise ValueError(
            f"rounding='stochastic' of {format_name(cfg.fmt)} needs a PRNG key: pass "
            "key=jax.random.key(...)"
        )
    key = key if cfg.rounding == "stochastic" else None
    if cfg.scales_itself:
        if qp is not None:
            raise ValueError(
                f"{format_name(cfg.fmt)} computes its own block scales: qp must be None"
            )
        y = mx.fake_quant(
            x,
            cfg.fmt,
            axis=cfg.block_axis_for(jnp.ndim(x)),
            rounding=cfg.rounding,
            key=key,
            pad=True,
        )
        return y.astype(jnp.asarray(x).dtype)
    qp = dynamic_qparams(x, cfg) if qp is None else qp
    return estimators.fake_quant(
        x, qp, cfg.fmt, rounding=cfg.rounding, estimator=cfg.estimator, key=key
    )
