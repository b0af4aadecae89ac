"""Fake quantization with gradient estimators: :class:`Estimator` objects, one registry.

An estimator is an object: its backward rule (run by one shared ``jax.custom_vjp`` whose
forward is ``fake_quant_forward``), which quantizer parameters it learns (scale, zero point,
clip) and how they start. :func:`register_estimator` makes its name a shorthand that
:func:`get_estimator` resolves (``fake_quant``, ``QuantConfig`` and ``QuantRule`` accept either);
an estimator written outside jquant works wherever a built-in one does.

Forward, for every estimator: ``y = scale * Q(x / scale)`` where, in units of the step,
``Q(v) = clip(round(v) + zp, qmin, qmax) - zp`` (``fake_quant_forward``). Rounding has zero
derivative almost everywhere, so training needs a surrogate gradient. With ``v = x / s`` and
"inside" meaning ``qmin <= v + zp <= qmax`` (before rounding, as in the LSQ paper):

========== ===================== ========================================= =================
estimator  dL/dx                 dL/dscale                                 dL/dzero_point
========== ===================== ========================================= =================
ste        g                     0                                         0
clipped    g * inside            0                                         0
lsq        g * inside            sum(g * (Q(v) - v * inside)) * gs         0
lsq_plus   g * inside            as lsq                                    -s sum(g (1-inside)) gs
pact       g * inside            sum(g * Q(v) * (1 - inside))              0
========== ===================== ========================================= =================

``gs = 1 / sqrt(N * qmax)`` is LSQ's gradient scale (Esser et al. 2019, section 2.2), with
``N`` the number of elements that share one scale. Outside the range ``Q(v)`` is
``qmin - zp`` or ``qmax - zp``, so LSQ's step gradient is ``round(v) - v`` inside and
``-Q_N`` / ``Q_P`` outside (their eq. 3). PACT (Choi et al. 2018) learns the clip value
``alpha = scale * qmax`` (unsigned, ``zp = 0``): ``dL/dalpha = sum_{x >= alpha} g``, which is
the scale gradient above divided by ``qmax``. LSQ+ (Bhalgat et al. 2020) also learns the offset
``beta = -scale * zp``; the forward rounds ``zp`` to keep the integer grid. With
``x_hat = s * clip(round((x - beta) / s), n, p) + beta`` their ``d x_hat / d beta`` is 0 inside
and 1 outside, so ``dL/dbeta = sum g (1 - inside)`` and, through ``zp = -beta / s``,
``dL/dzp = -s sum g (1 - inside)`` (times ``gs``, as the step).

Initialisations (:func:`lsq_init_scale`, :func:`lsq_plus_weight_init_scale`): LSQ sets
``s0 = 2 mean|v| / sqrt(Q_P)`` (Esser et al., sec. 2.1); LSQ+ sets a weight's step to
``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)`` (Bhalgat et al., sec. 3.3) and an
activation's step and offset from its min / max (``s = (max - min) / (2^b - 1)``,
``beta = min``: the affine calibrated range). PACT initialises ``alpha`` from the calibrated
maximum (the paper's constant 10 would not suit standardised inputs). The gradient scale
``gs`` makes a *shared SGD* rate suit weights and steps; under Adam it cancels (Adam
normalises each parameter), so ``jquant.qat.qat_optimizer`` gives learned steps a relative rate.

Sums run over the axes along which ``scale`` / ``zero_point`` broadcast, so per-tensor,
per-channel and per-block parameters all receive gradients of their own shape.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import Format, check_format
from jquant.quant import (
    QParams,
    block_view,
    check_qparams,
    check_rounding,
    fake_quant_forward,
    stochastic_noise,
    unblock,
)

__all__ = [
    "ESTIMATORS",
    "Estimator",
    "Residuals",
    "estimator_names",
    "fake_quant",
    "get_estimator",
    "pact_qparams",
    "lsq_init_scale",
    "lsq_plus_weight_init_scale",
    "register_estimator",
]


class Residuals(NamedTuple):
    """What a backward rule receives, with ``v = x / scale``.

    ``inside`` is 1 where ``lo <= v + round(zp) <= hi`` for ``(lo, hi) = fmt.grid_range()``
    (before rounding), else 0; ``qv = y / scale`` is ``Q(v)``, the forward output in units of
    the step; ``fmt`` is the format (``bits`` traced as float32 for integer grids).
    """

    v: jax.Array
    inside: jax.Array
    qv: jax.Array
    scale: jax.Array
    zero_point: jax.Array
    fmt: Format


@dataclasses.dataclass(frozen=True, eq=False)
class Estimator:
    """A gradient estimator of fake quantization: one ``jax.custom_vjp`` whose forward is
    ``fake_quant_forward`` and whose backward is ``backward(res, g) -> (dL/dx, dL/dscale,
    dL/dzero_point)`` (:class:`Residuals` ``res``; ``None`` for a zero cotangent), plus what
    the estimator learns and how it starts.

    Args:
      name: its name, the shorthand that :func:`get_estimator` resolves once registered.
      backward: the backward rule; scale / zero-point gradients have their shapes
        (use :func:`sum_to`).
      learns_scale: the step is a parameter (LSQ, LSQ+).
      learns_zero_point: the zero point (offset) is a parameter too (LSQ+).
      learns_clip: the clip value ``alpha = scale * qmax`` is the parameter (PACT: an
        unsigned grid clipped to ``[0, alpha]``, zero point 0).
      weight_init: ``(w, fmt, axis, own) -> QParams``, the paper's initial weight QParams
        from the weight's own range ``own`` (None: ``own``).
      activation_init: ``(mean_abs, fmt, zero_point) -> scale``, the paper's initial
        activation step from ``mean|x|`` over calibration (None: the calibrated range).

    A learned estimator needs an integer grid (``fmt.integer_grid``). An estimator compares
    equal to its registered name, so ``cfg.estimator == "lsq"`` reads as before.
    """

    name: str
    backward: Callable[[Residuals, jax.Array], tuple[Any, Any, Any]]
    learns_scale: bool = False
    learns_zero_point: bool = False
    learns_clip: bool = False
    weight_init: Callable[..., QParams] | None = None
    activation_init: Callable[..., jax.Array] | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise TypeError(f"Estimator.name must be a non-empty str, got {self.name!r}")
        if not callable(self.backward):
            raise TypeError(f"Estimator.backward must be callable, got {self.backward!r}")

    @property
    def learned(self) -> bool:
        """True when a quantizer parameter (scale, zero point or clip) is learned."""
        return self.learns_scale or self.learns_zero_point or self.learns_clip

    def check_format(self, fmt: Format, name: str = "fmt") -> None:
        """ValueError unless ``fmt`` suits this estimator (learned ones need an integer grid)."""
        if self.learned and not getattr(fmt, "integer_grid", False):
            raise ValueError(
                f"estimator {self.name!r} learns an integer grid's step; {name} must have an "
                f"integer grid (an IntFormat), got {fmt} (use 'ste' or 'clipped_ste')"
            )

    def __call__(self, x, scale, zero_point, fmt: Format, rounding: str, noise=None):
        """``fake_quant_forward(x, QParams(scale, zero_point), fmt)`` with this backward.

        The format's leaves (an IntFormat's ``bits``) pass as float32 arrays with zero
        cotangents, so traced widths sweep through the custom VJP.
        """
        leaves, treedef = jax.tree_util.tree_flatten(fmt)
        leaves = [jnp.asarray(leaf, jnp.float32) for leaf in leaves]
        static = (treedef, rounding, self.backward)
        return _quantizer(static, x, scale, zero_point, leaves, noise)

    def __eq__(self, other):
        if isinstance(other, str):
            return _REGISTRY.get(other) is self
        if not isinstance(other, Estimator):
            return NotImplemented
        return self is other or _fields(self) == _fields(other)

    def __hash__(self):
        return hash(self.name)

    def __repr__(self) -> str:
        return f"Estimator({self.name!r})"


def _fields(obj) -> tuple:
    """The field values (not deep copies, as ``dataclasses.astuple`` makes)."""
    return tuple(getattr(obj, f.name) for f in dataclasses.fields(obj))


def _format_of(treedef, leaves) -> Format:
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _forward(static, x, scale, zp, leaves, noise):
    treedef, rounding, _ = static
    return fake_quant_forward(x, QParams(scale, zp), _format_of(treedef, leaves), rounding, noise)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _quantizer(static, x, scale, zp, leaves, noise):
    return _forward(static, x, scale, zp, leaves, noise)


def _quantizer_fwd(static, x, scale, zp, leaves, noise):
    """Forward output plus what every backward rule needs: ``v``, the inside mask, ``Q(v)``."""
    y = _forward(static, x, scale, zp, leaves, noise)
    fmt = _format_of(static[0], leaves)
    lo, hi = fmt.grid_range()
    v = x.astype(jnp.float32) / scale
    vz = v + jnp.round(zp)
    inside = ((vz >= lo) & (vz <= hi)).astype(jnp.float32)
    res = Residuals(v, inside, y.astype(jnp.float32) / scale, scale, zp, fmt)
    return y, (res, leaves, noise)


def _quantizer_bwd(static, saved, g):
    res, leaves, noise = saved
    dx, d_scale, d_zp = static[2](res, g)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, (res.scale, res.zero_point, leaves, noise))
    d_scale = zeros[0] if d_scale is None else d_scale
    d_zp = zeros[1] if d_zp is None else d_zp
    dx = jnp.zeros_like(g) if dx is None else dx
    return (dx.astype(g.dtype), d_scale, d_zp, zeros[2], zeros[3])


_quantizer.defvjp(_quantizer_fwd, _quantizer_bwd)


def sum_to(g: jax.Array, like) -> jax.Array:
    """Sums ``g`` over the axes along which ``like`` was broadcast, to ``like``'s shape."""
    shape = jnp.shape(like)
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return jnp.sum(g, axis=axes).reshape(shape).astype(jnp.result_type(like))


def _grad_scale(res: Residuals) -> jax.Array:
    """LSQ's ``1 / sqrt(N * qmax)``; ``N`` = elements per scale."""
    n = res.v.size / max(int(np.prod(jnp.shape(res.scale))), 1)
    return jax.lax.rsqrt(jnp.asarray(n * jnp.maximum(res.fmt.qmax, 1), jnp.float32))


# --- ste: dL/dx = g ---------------------------------------------------------------------------


def _ste_bwd(res: Residuals, g):
    return g, None, None


# --- clipped_ste: dL/dx = g * inside ----------------------------------------------------------


def _clipped_ste_bwd(res: Residuals, g):
    return g * res.inside, None, None


# --- lsq: dL/dscale = sum(g * (Q(v) - v * inside)) * gs ---------------------------------------


def _lsq_scale_grad(res: Residuals, g):
    # where, not v * inside: v is +-inf for +-inf inputs, and inf * 0 is NaN
    step = res.qv - jnp.where(res.inside > 0, res.v, 0.0)
    return sum_to(g * step * _grad_scale(res), res.scale)


def _lsq_bwd(res: Residuals, g):
    return g * res.inside, _lsq_scale_grad(res, g), None


# --- lsq_plus: as lsq, dL/dzp = -s sum(g (1 - inside)) gs -------------------------------------


def _lsq_plus_bwd(res: Residuals, g):
    d_zp = sum_to(-res.scale * g * (1.0 - res.inside) * _grad_scale(res), res.zero_point)
    return g * res.inside, _lsq_scale_grad(res, g), d_zp


# --- pact: dL/dscale = sum(g * Q(v) * (1 - inside)) -------------------------------------------


def _pact_bwd(res: Residuals, g):
    return g * res.inside, sum_to(g * res.qv * (1.0 - res.inside), res.scale), None


# --- the registry -----------------------------------------------------------------------------

_REGISTRY: dict[str, Estimator] = {}


def register_estimator(estimator: Estimator) -> Estimator:
    """Makes ``estimator.name`` a shorthand for ``estimator``; returns it.

    Raises ValueError if the name is taken by a different estimator.
    """
    if not isinstance(estimator, Estimator):
        raise TypeError(f"estimator must be a jquant.estimators.Estimator, got {estimator!r}")
    old = _REGISTRY.get(estimator.name)
    if old is not None and old is not estimator:
        raise ValueError(f"estimator name {estimator.name!r} is already registered: {old}")
    _REGISTRY[estimator.name] = estimator
    return estimator


def estimator_names() -> tuple[str, ...]:
    """The registered estimator names, built-ins first."""
    return tuple(_REGISTRY)


def get_estimator(estimator: str | Estimator, name: str = "estimator") -> Estimator:
    """Resolves a registered name (``"ste"``, ``"lsq"``, ...) to its :class:`Estimator`;
    estimators pass through. ``name`` is the argument named in errors."""
    if isinstance(estimator, Estimator):
        return estimator
    if not isinstance(estimator, str):
        raise TypeError(
            f"{name} must be a name or a jquant.estimators.Estimator, got {estimator!r}"
        )
    try:
        return _REGISTRY[estimator]
    except KeyError:
        raise ValueError(
            f"{name} must be one of {estimator_names()} or an Estimator, got {estimator!r}"
        ) from None


def fake_quant(
    x: jax.Array,
    qp: QParams,
    fmt: Format,
    *,
    rounding: str = "nearest_even",
    estimator: str | Estimator = "ste",
    key: jax.Array | None = None,
) -> jax.Array:
    """``scale * (clip(round(x / scale) + zp, qmin, qmax) - zp)`` with a chosen gradient.

    Generally ``scale * fmt.decode(fmt.encode(x / scale, zp))`` for any format.

    Args:
      x: float array.
      qp: QParams broadcastable against ``x``, or block-wise (``qp.block_size``: one scale per
        block; learned estimators then learn one step per block, with LSQ's ``N = B`` times
        the broadcast extent); learned estimators send gradients into it.
      fmt: the number format (``IntFormat`` may carry traced ``bits``).
      rounding: one of ``jquant.quant.ROUNDING_MODES``; ``"stochastic"`` needs ``key``.
      estimator: an :class:`Estimator` or a registered name, ``ESTIMATORS`` for the
        built-ins (see the module docstring for each backward rule).
      key: PRNG key for stochastic rounding.

    Returns:
      ``x`` rounded to the grid, in ``x``'s float dtype; NaN stays NaN, +-Inf saturate.

    >>> import jquant as jq
    >>> float(fake_quant(jnp.float32(0.3), jq.QParams(0.25), jq.int8))
    0.25
    """
    est = get_estimator(estimator)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a float array, got dtype {x.dtype}")
    check_qparams(x, qp, fmt)
    check_rounding(rounding, key)
    est.check_format(fmt)
    if qp.block_size is not None:  # one scale per block: LSQ's N is the block's element count
        xb, qpb = block_view(x, qp)
        yb = fake_quant(xb, qpb, fmt, rounding=rounding, estimator=estimator, key=key)
        return unblock(yb, qp, x.shape)
    noise = stochastic_noise(key, x.shape) if rounding == "stochastic" else None
    scale = jnp.asarray(qp.scale, jnp.float32)
    zp = jnp.asarray(qp.zero_point, jnp.float32)
    return est(x, scale, zp, fmt, rounding, noise)


def _check_integer_grid(fmt) -> None:
    check_format(fmt)
    if not getattr(fmt, "integer_grid", False):
        raise TypeError(f"fmt must be an IntFormat (an integer grid), got {type(fmt).__name__}")


def _reduce_axes(x: jax.Array, axis) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(x.ndim))
    kept = {a % x.ndim for a in ((axis,) if isinstance(axis, int) else axis)}
    return tuple(a for a in range(x.ndim) if a not in kept)


def lsq_init_scale(
    x: jax.Array, fmt: Format, *, axis: int | tuple[int, ...] | None = None, zero_point=0.0
) -> jax.Array:
    """LSQ's initial step ``s0 = 2 mean|x| / sqrt(Q_P)`` (Esser et al. 2019, sec. 2.1).

    ``Q_P = qmax - zero_point`` is the number of positive levels (``qmax`` on a symmetric
    grid; ``2^b - 1`` for an affine grid whose zero point is ``qmin``, i.e. unsigned data).
    The mean runs over every axis not in ``axis`` (None: per tensor, a scalar), kept as size 1
    so the result broadcasts against ``x``; a zero mean gives ``tiny``, never 0.

    >>> from jquant.formats import IntFormat
    >>> float(lsq_init_scale(jnp.array([1.0, -3.0]), IntFormat(4)))  # 2 * 2 / sqrt(7)
    1.5118578...
    """
    _check_integer_grid(fmt)
    x = jax.lax.stop_gradient(jnp.asarray(x, jnp.float32))
    q_p = jnp.maximum(jnp.asarray(fmt.qmax, jnp.float32) - zero_point, 1.0)
    mean = jnp.mean(jnp.abs(x), axis=_reduce_axes(x, axis), keepdims=axis is not None)
    return jnp.maximum(2.0 * mean / jnp.sqrt(q_p), jnp.finfo(jnp.float32).tiny)


def lsq_plus_weight_init_scale(
    w: jax.Array, fmt: Format, *, axis: int | tuple[int, ...] | None = None
) -> jax.Array:
    """LSQ+'s initial weight step ``max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)``
    (Bhalgat et al. 2020, sec. 3.3), with ``mu``, ``sigma`` the mean and standard deviation
    over every axis not in ``axis`` (kept as size 1; None: per tensor, a scalar).

    >>> from jquant.formats import IntFormat
    >>> float(lsq_plus_weight_init_scale(jnp.array([1.0, -1.0]), IntFormat(4)))  # 3 / 8
    0.375
    """
    _check_integer_grid(fmt)
    w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))
    red, keep = _reduce_axes(w, axis), axis is not None
    mu, sigma = jnp.mean(w, red, keepdims=keep), jnp.std(w, red, keepdims=keep)
    half = 2.0 ** (jnp.asarray(fmt.bits, jnp.float32) - 1)
    s = jnp.maximum(jnp.abs(mu - 3 * sigma), jnp.abs(mu + 3 * sigma)) / half
    return jnp.maximum(s, jnp.finfo(jnp.float32).tiny)


def pact_qparams(alpha: jax.Array, fmt: Format) -> QParams:
    """QParams of PACT's clip ``[0, alpha]`` on an unsigned grid: ``scale = alpha / qmax``."""
    check_format(fmt)
    if not getattr(fmt, "integer_grid", False) or fmt.signed:
        raise ValueError(f"PACT clips to [0, alpha]: fmt must be an unsigned IntFormat, got {fmt}")
    return QParams(jnp.asarray(alpha, jnp.float32) / fmt.qmax, jnp.zeros((), jnp.float32))


def _lsq_weight_init(w, fmt, axis, own: QParams) -> QParams:
    return QParams(lsq_init_scale(w, fmt, axis=axis, zero_point=own.zero_point), own.zero_point)


def _lsq_plus_weight_init(w, fmt, axis, own: QParams) -> QParams:
    return QParams(lsq_plus_weight_init_scale(w, fmt, axis=axis), own.zero_point)


def _lsq_activation_init(mean_abs, fmt, zero_point) -> jax.Array:
    return lsq_init_scale(mean_abs, fmt, zero_point=zero_point)


ste = register_estimator(Estimator("ste", _ste_bwd))
clipped_ste = register_estimator(Estimator("clipped_ste", _clipped_ste_bwd))
lsq = register_estimator(
    Estimator(
        "lsq",
        _lsq_bwd,
        learns_scale=True,
        weight_init=_lsq_weight_init,
        activation_init=_lsq_activation_init,
    )
)
lsq_plus = register_estimator(
    Estimator(
        "lsq_plus",
        _lsq_plus_bwd,
        learns_scale=True,
        learns_zero_point=True,
        weight_init=_lsq_plus_weight_init,
    )
)
pact = register_estimator(Estimator("pact", _pact_bwd, learns_clip=True))

# The built-in names (the registry may hold more: estimator_names()).
ESTIMATORS = estimator_names()
