"""Streaming observers: pure ``init`` / ``update`` / ``result`` triples over NamedTuple states.

For datasets too large to hold, an observer folds batches into a small state::

    state = obs.init(example_x)              # shapes only; no data is recorded
    for x in batches:
        state = obs.update(x, state)         # jit-able, state in, state out
    qp = obs.result(state, fmt, symmetric=True)
    rmin, rmax = obs.bounds(state, fmt)      # the range behind ``result``

Non-finite values are ignored and counted in ``state.nonfinite``; ``state.count`` counts the
finite values seen. Both are int32 counters that saturate at ``2^31 - 1``. An observer that
saw no finite value gives the range ``[0, 0]`` (a finite scale).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant.calibration import histograms, ranges
from jquant.calibration.grouping import (
    Axis,
    as_groups,
    check_data,
    check_format,
    finite_min_max,
    kept_axes,
    or_zero,
    stat_shape,
)
from jquant.calibration.ranges import check_percentile, kl_format_levels
from jquant.calibration.search import check_search, mse_clip_factor
from jquant.formats import Format
from jquant.quant import QParams, qparams_from_range

__all__ = [
    "Observer",
    "MinMaxState",
    "HistogramState",
    "HISTOGRAM_METHODS",
    "running_minmax",
    "ema_minmax",
    "histogram",
    "Calibration",
    "MinMax",
    "EmaMinMax",
    "Percentile",
    "MSE",
    "KL",
    "ACIQ",
    "check_observer",
    "register_observer",
    "observer_names",
    "get_observer",
    "observed_range",
    "calibration_label",
]

HISTOGRAM_METHODS = ("percentile", "mse", "kl")
_INT32_MAX = jnp.iinfo(jnp.int32).max


class Observer(NamedTuple):
    """A streaming statistic: ``init(x) -> state``, ``update(x, state) -> state``,
    ``result(state, fmt, *, symmetric=False) -> QParams`` and ``bounds(state, fmt, *,
    symmetric=False) -> (rmin, rmax)``, all pure and jit-able (``fmt`` static)."""

    init: Callable[[jax.Array], Any]
    update: Callable[[jax.Array, Any], Any]
    result: Callable[..., QParams]
    bounds: Callable[..., tuple[jax.Array, jax.Array]] | None = None


class MinMaxState(NamedTuple):
    """Running (or averaged) range, keepdims-shaped; ``+inf`` / ``-inf`` before any data."""

    min: jax.Array
    max: jax.Array
    count: jax.Array
    nonfinite: jax.Array


class HistogramState(NamedTuple):
    """``2 n`` bins on ``[-amax, amax]`` (``n`` per sign), exact min / max, counters."""

    counts: jax.Array
    amax: jax.Array
    min: jax.Array
    max: jax.Array
    count: jax.Array
    nonfinite: jax.Array


def _saturating_add(counter: jax.Array, n: jax.Array) -> jax.Array:
    n = n.astype(jnp.int32)
    return jnp.where(counter > _INT32_MAX - n, _INT32_MAX, counter + n)


def _counters(x: jax.Array, count, nonfinite):
    finite = jnp.sum(jnp.isfinite(x), dtype=jnp.int32)
    return _saturating_add(count, finite), _saturating_add(nonfinite, x.size - finite)


def _observer(init, update, check, core, **static) -> Observer:
    """Assembles an Observer from module-level functions (compiled once per configuration):
    ``update(x, state)``, ``check(fmt, symmetric, **static)`` validating in Python,
    and ``core(state, fmt, symmetric, **static) -> (rmin, rmax)`` jitted with ``fmt`` a pytree
    argument (sweeping ``bits`` does not recompile)."""

    def bounds(state, fmt: Format | None = None, *, symmetric: bool = False):
        check(fmt, symmetric, **static)
        return core(state, fmt, bool(symmetric), **static)

    def result(state, fmt: Format, *, symmetric: bool = False) -> QParams:
        check(fmt, symmetric, **static)
        check_format(fmt)
        return _qparams(core, state, fmt, bool(symmetric), tuple(sorted(static.items())))

    return Observer(init, update, result, bounds)


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _qparams(core, state, fmt, symmetric, static) -> QParams:
    rmin, rmax = core(state, fmt, symmetric, **dict(static))
    return qparams_from_range(rmin, rmax, fmt, symmetric=symmetric)


# ----------------------------------------------------------------------------- min / max


def _minmax_init(axis: Axis):
    def init(x: jax.Array) -> MinMaxState:
        x = check_data(x)
        shape = stat_shape(x.shape, kept_axes(axis, x.ndim))
        zero = np.zeros((), np.int32)
        return MinMaxState(
            np.full(shape, np.inf, np.float32), np.full(shape, -np.inf, np.float32), zero, zero
        )

    return init


def _batch_range(x: jax.Array, state: MinMaxState, axis: Axis):
    x = check_data(x)
    kept = kept_axes(axis, x.ndim)
    if stat_shape(x.shape, kept) != np.shape(state.min):
        raise ValueError(
            f"x of shape {x.shape} does not match the observer state of shape "
            f"{np.shape(state.min)} (axis={axis!r})"
        )
    return x, finite_min_max(jnp.asarray(x, jnp.float32), kept)


def _no_check(fmt, symmetric, **static) -> None:
    return None


@functools.partial(jax.jit, static_argnames=("symmetric", "axis", "decay"))
def _minmax_core(state: MinMaxState, fmt, symmetric: bool, axis=None, decay=None):
    return or_zero(state.min), or_zero(state.max)


@functools.partial(jax.jit, static_argnames="axis")
def _running_update(x: jax.Array, state: MinMaxState, axis: Axis = None) -> MinMaxState:
    x, (lo, hi) = _batch_range(x, state, axis)
    count, nonfinite = _counters(x, state.count, state.nonfinite)
    return MinMaxState(jnp.minimum(state.min, lo), jnp.maximum(state.max, hi), count, nonfinite)


def running_minmax(axis: Axis = None) -> Observer:
    """Running range ``min_t min(x_t)``, ``max_t max(x_t)``: equals :func:`minmax` of the stream.

    ``axis``: axes that keep their own range (per channel), as in :func:`minmax`.
    """
    axis = _hashable_axis(axis)
    update = functools.partial(_running_update, axis=axis)
    return _observer(_minmax_init(axis), update, _no_check, _minmax_core, axis=axis)


@functools.partial(jax.jit, static_argnames=("axis", "decay"))
def _ema_update(x: jax.Array, state: MinMaxState, axis: Axis, decay: float) -> MinMaxState:
    x, (lo, hi) = _batch_range(x, state, axis)

    def average(old, new):
        mixed = jnp.where(jnp.isfinite(old), decay * old + (1.0 - decay) * new, new)
        return jnp.where(jnp.isfinite(new), mixed, old)

    count, nonfinite = _counters(x, state.count, state.nonfinite)
    return MinMaxState(average(state.min, lo), average(state.max, hi), count, nonfinite)


def ema_minmax(decay: float = 0.99, axis: Axis = None) -> Observer:
    """Exponential moving average of batch ranges (TensorFlow's moving-average quantizer).

    ``m_1 = min(x_1)``, ``m_t = decay * m_{t-1} + (1 - decay) * min(x_t)``; likewise for max.
    A batch with no finite value (in a group) leaves that group's range unchanged.
    """
    if not isinstance(decay, int | float) or isinstance(decay, bool) or not 0 <= decay < 1:
        raise ValueError(f"decay must be a number in [0, 1), got {decay!r}")
    axis, decay = _hashable_axis(axis), float(decay)
    update = functools.partial(_ema_update, axis=axis, decay=decay)
    return _observer(_minmax_init(axis), update, _no_check, _minmax_core, axis=axis, decay=decay)


def _hashable_axis(axis: Axis) -> Axis:
    kept_axes(axis, 64)  # validates type and repeats; the range is checked against x later
    return tuple(axis) if isinstance(axis, list) else axis


# ----------------------------------------------------------------------------- histogram


def _histogram_init(num_bins: int, axis: Axis):
    def init(x: jax.Array) -> HistogramState:
        x = check_data(x)
        shape = stat_shape(x.shape, kept_axes(axis, x.ndim))
        groups = (math.prod(shape),) if shape else ()
        zero = np.zeros((), np.int32)
        inf = np.full(shape, np.inf, np.float32)
        counts = np.zeros((*groups, 2 * num_bins), np.float32)
        return HistogramState(counts, np.zeros(shape, np.float32), inf, -inf, zero, zero)

    return init


def _histogram_row(row: jax.Array, counts: jax.Array, old_amax, lo, hi):
    """One group's histogram after a batch: the range grows to the new ``max |x|`` (old
    counts re-binned), then the finite values of ``row`` are counted."""
    finite = jnp.isfinite(row)
    amax = jnp.maximum(old_amax, jnp.maximum(or_zero(-lo), or_zero(hi)))
    counts = jnp.where(
        amax > old_amax, histograms.rebin(counts, -old_amax, old_amax, -amax, amax), counts
    )
    values = jnp.where(finite, row, 0.0)
    weights = finite.astype(jnp.float32)
    counts = counts + histograms.bin_counts(values, weights, -amax, amax, counts.shape[0])
    return counts, amax


@functools.partial(jax.jit, static_argnames="axis")
def _histogram_update(x: jax.Array, state: HistogramState, axis: Axis = None) -> HistogramState:
    x, (lo, hi) = _batch_range(x, state, axis)
    x = jnp.asarray(x, jnp.float32)
    rows = as_groups(x, kept_axes(axis, x.ndim))  # (G, N): one histogram per group, vmapped
    bins = state.counts.shape[-1]
    counts, amax = jax.vmap(_histogram_row)(
        rows,
        jnp.reshape(state.counts, (-1, bins)),
        jnp.reshape(state.amax, -1),
        jnp.reshape(lo, -1),
        jnp.reshape(hi, -1),
    )
    count, nonfinite = _counters(x, state.count, state.nonfinite)
    return HistogramState(
        jnp.reshape(counts, state.counts.shape),
        jnp.reshape(amax, jnp.shape(state.amax)),
        jnp.minimum(state.min, lo),
        jnp.maximum(state.max, hi),
        count,
        nonfinite,
    )


def _histogram_check(fmt, symmetric: bool, *, method, percentile, **unused) -> None:
    if method == "kl":
        kl_format_levels(fmt, unused["num_bins"])
    if method == "percentile" and not symmetric:
        check_percentile(percentile, symmetric=False)
    if method == "mse":
        check_format(fmt)


@functools.partial(
    jax.jit,
    static_argnames=(
        "symmetric",
        "axis",
        "method",
        "percentile",
        "num_bins",
        "num_candidates",
        "num_rounds",
    ),
)
def _histogram_core(
    state: HistogramState,
    fmt: Format,
    symmetric: bool,
    *,
    axis: Axis,
    method: str,
    percentile: float,
    num_bins: int,
    num_candidates: int,
    num_rounds: int,
):
    """The range of the histogram (per tensor) or of each group's, keepdims-shaped like
    ``state.min``; groups run one after the other (``lax.map``: KL's ``O(num_bins^2)`` work
    per group stays bounded in memory)."""
    static = dict(
        method=method,
        percentile=percentile,
        num_bins=num_bins,
        num_candidates=num_candidates,
        num_rounds=num_rounds,
    )
    if state.counts.ndim == 1:  # per tensor
        return _histogram_row_range(state, fmt, symmetric, **static)
    shape = jnp.shape(state.min)

    def one(row):
        counts, amax, lo, hi = row
        group = HistogramState(counts, amax, lo, hi, state.count, state.nonfinite)
        return _histogram_row_range(group, fmt, symmetric, **static)

    rows = (
        jnp.reshape(state.counts, (-1, 2 * num_bins)),
        *(jnp.reshape(v, -1) for v in (state.amax, state.min, state.max)),
    )
    lo, hi = jax.lax.map(one, rows)
    return jnp.reshape(lo, shape), jnp.reshape(hi, shape)


def _histogram_row_range(
    state: HistogramState,
    fmt: Format,
    symmetric: bool,
    *,
    method: str,
    percentile: float,
    num_bins: int,
    num_candidates: int,
    num_rounds: int,
):
    """``(rmin, rmax)`` of one histogram (counts ``(2 num_bins,)``, scalar amax / min / max)."""
    rmin, rmax = or_zero(state.min), or_zero(state.max)
    width = state.amax / num_bins
    if method == "percentile":
        q = percentile / 100.0
        if symmetric:
            a = histograms.quantile(histograms.fold(state.counts), 0.0, width, q)
            a = jnp.minimum(a, jnp.maximum(-rmin, rmax))
            return -a, a
        lower, upper = (
            jnp.clip(histograms.quantile(state.counts, -state.amax, width, v), rmin, rmax)
            for v in (1.0 - q, q)
        )
        return lower, upper
    if method == "kl":
        levels = histograms.kl_levels(fmt)
        if fmt.signed:
            t = histograms.kl_threshold(histograms.fold(state.counts), state.amax, levels)
            return -t, t
        t = histograms.kl_threshold(histograms.positive_part(state.counts), state.amax, levels)
        return jnp.zeros_like(t), t
    centres = -state.amax + (jnp.arange(2 * num_bins, dtype=jnp.float32) + 0.5) * width
    lo, hi = jnp.minimum(rmin, 0.0), jnp.maximum(rmax, 0.0)
    alpha = mse_clip_factor(
        centres,
        state.counts,
        lo,
        hi,
        fmt,
        symmetric=symmetric,
        num_candidates=num_candidates,
        num_rounds=num_rounds,
    )
    return alpha * lo, alpha * hi


def histogram(
    num_bins: int = 2048,
    method: str = "percentile",
    percentile: float = 99.99,
    *,
    num_candidates: int = 16,
    num_rounds: int = 4,
    axis: Axis = None,
) -> Observer:
    """A histogram of the stream on a growing range ``[-amax, amax]``, per tensor or, with
    ``axis`` (the axes that keep their own range, as :func:`running_minmax`), one per group.

    ``num_bins`` bins on each side of 0, so ``|x|`` has ``num_bins`` bins as in TensorRT.
    When a batch exceeds ``amax`` the range grows to the new ``max |x|`` exactly and the old
    counts are re-binned (:func:`~jquant.calibration.histograms.rebin`: mass spread evenly
    inside each old bin), so ``amax`` is always the stream's ``max |x|``; without re-binning
    the bins are those of the one-shot estimators on the concatenated data, and each re-binning
    moves old mass by less than one old bin. ``bounds`` / ``result`` serve:

    - ``percentile``: NumPy's linear percentile read off the histogram, two-sided or of ``|x|``
      (``symmetric``): within one bin width of :func:`~jquant.calibration.percentile`;
    - ``mse``: the search of :func:`~jquant.calibration.mse` on bin centres weighted by counts
      (base range: the exact stream min / max);
    - ``kl``: :func:`~jquant.calibration.kl` on the folded histogram (``|x|``), or on its
      positive part for unsigned formats.

    Per group (``axis`` set): ``G`` histograms, ``state.counts`` of shape ``(G, 2 num_bins)``
    (groups in row-major order of the kept axes) and ``amax`` / ``min`` / ``max`` keepdims,
    updated at once (``vmap``); each group's counts, ``amax`` and range are exactly those of
    the per-tensor observer fed only that group's values (each group re-bins on its own
    ``amax``). :func:`~jquant.calibration.block_observer` runs it on blocks (``(n_blocks,
    2 num_bins)``). ``state.count`` / ``state.nonfinite`` stay totals over the tensor.
    """
    if method not in HISTOGRAM_METHODS:
        raise ValueError(f"method must be one of {HISTOGRAM_METHODS}, got {method!r}")
    if not isinstance(num_bins, int) or isinstance(num_bins, bool) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    check_search(num_candidates, num_rounds)
    percentile = check_percentile(percentile, symmetric=True) if method == "percentile" else 0.0
    axis = _hashable_axis(axis)
    static = {
        "axis": axis,
        "method": method,
        "percentile": percentile,
        "num_bins": num_bins,
        "num_candidates": num_candidates,
        "num_rounds": num_rounds,
    }
    update = functools.partial(_histogram_update, axis=axis)
    return _observer(
        _histogram_init(num_bins, axis), update, _histogram_check, _histogram_core, **static
    )


# ----------------------------------------------------------------------------- calibration methods


@dataclasses.dataclass(frozen=True, eq=False)
class Calibration:
    """A calibration method: an observer factory (Optax style) and a one-shot range.

    As an observer it is ``init(x) -> state``, ``update(x, state) -> state``,
    ``result(state, fmt, *, symmetric=False) -> QParams`` and ``bounds(state, fmt, *,
    symmetric=False) -> (rmin, rmax)``, per tensor (what rules use, through
    :func:`observer`); :meth:`range` is the same method applied at once to a whole tensor,
    with ``axis`` keeping its own ranges (what the tensor sweeps use). The hyperparameters are
    its fields (``Percentile(99.9)``); ``streams`` / ``one_shot`` say which uses it offers.

    A method written outside jquant needs only ``init``, ``update``, ``result`` and ``bounds``
    (:func:`observed_range` then gives its one-shot per-tensor range); it compares equal to
    the name that :func:`get_observer` resolves to an equal method.
    """

    name: ClassVar[str] = ""
    streams: ClassVar[bool] = True
    one_shot: ClassVar[bool] = True

    def observer(self, axis: Axis = None) -> Observer:
        """The streaming :class:`Observer` of this method, per tensor or keeping ``axis``
        (per channel; :func:`~jquant.calibration.block_observer` builds blocks on it)."""
        raise ValueError(
            f"calibration {self.name!r} has no streaming observer; use it on whole tensors "
            f"(jquant.sweep) or choose one of {observer_names(streams=True)}"
        )

    def init(self, x: jax.Array):
        return self.observer().init(x)

    def update(self, x: jax.Array, state):
        return self.observer().update(x, state)

    def result(self, state, fmt: Format, *, symmetric: bool = False) -> QParams:
        return self.observer().result(state, fmt, symmetric=symmetric)

    def bounds(self, state, fmt: Format | None = None, *, symmetric: bool = False):
        return self.observer().bounds(state, fmt, symmetric=symmetric)

    def range(self, x: jax.Array, fmt: Format, *, axis: Axis = None, symmetric: bool = False):
        """``(rmin, rmax)`` of the whole of ``x``, ``axis`` keeping its own ranges (the
        built-ins); by default ``x`` is one batch of the observer (per tensor only)."""
        return _one_batch(self, x, fmt, axis, symmetric)

    def __eq__(self, other):
        if isinstance(other, str):
            return _REGISTRY.get(other) == self
        if type(other) is not type(self):
            return NotImplemented
        return self is other or self._fields() == other._fields()

    def __hash__(self):
        return hash((type(self).__name__, self._fields()))

    def _fields(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclasses.dataclass(frozen=True, eq=False)
class MinMax(Calibration):
    """The range ``[min x, max x]``: :func:`running_minmax` / :func:`~jquant.calibration.minmax`."""

    name: ClassVar[str] = "minmax"

    def observer(self, axis: Axis = None) -> Observer:
        return running_minmax(axis)

    def range(self, x, fmt, *, axis=None, symmetric=False):
        return ranges.minmax(x, axis=axis)


@dataclasses.dataclass(frozen=True, eq=False)
class EmaMinMax(Calibration):
    """Exponential moving average of batch ranges (:func:`ema_minmax`); streams only."""

    decay: float = 0.99
    name: ClassVar[str] = "ema"
    one_shot: ClassVar[bool] = False

    def __post_init__(self):
        ema_minmax(self.decay)  # validates

    def observer(self, axis: Axis = None) -> Observer:
        return ema_minmax(self.decay, axis)

    def range(self, x, fmt, *, axis=None, symmetric=False):
        return ranges.minmax(x, axis=axis)  # one batch: its own range


@dataclasses.dataclass(frozen=True, eq=False)
class Percentile(Calibration):
    """The ``percentile``-th percentile range, of ``x`` (two-sided) or of ``|x|``
    (symmetric): :func:`~jquant.calibration.percentile`, streamed by :func:`histogram`."""

    percentile: float = 99.99
    num_bins: int = 2048
    name: ClassVar[str] = "percentile"

    def __post_init__(self):
        self.observer()  # validates

    def observer(self, axis: Axis = None) -> Observer:
        return histogram(self.num_bins, "percentile", self.percentile, axis=axis)

    def range(self, x, fmt, *, axis=None, symmetric=False):
        return ranges.percentile(x, self.percentile, axis=axis, symmetric=symmetric)


@dataclasses.dataclass(frozen=True, eq=False)
class MSE(Calibration):
    """The clip range of least quantization MSE for ``fmt``: :func:`~jquant.calibration.mse`,
    streamed by :func:`histogram`."""

    num_candidates: int = 16
    num_rounds: int = 4
    num_bins: int = 2048
    name: ClassVar[str] = "mse"

    def __post_init__(self):
        self.observer()  # validates

    def observer(self, axis: Axis = None) -> Observer:
        return histogram(
            self.num_bins,
            "mse",
            num_candidates=self.num_candidates,
            num_rounds=self.num_rounds,
            axis=axis,
        )

    def range(self, x, fmt, *, axis=None, symmetric=False):
        return ranges.mse(
            x,
            fmt,
            axis=axis,
            symmetric=symmetric,
            num_candidates=self.num_candidates,
            num_rounds=self.num_rounds,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class KL(Calibration):
    """TensorRT's entropy calibration: :func:`~jquant.calibration.kl`, streamed by
    :func:`histogram`."""

    num_bins: int = 2048
    name: ClassVar[str] = "kl"

    def __post_init__(self):
        self.observer()  # validates

    def observer(self, axis: Axis = None) -> Observer:
        return histogram(self.num_bins, "kl", axis=axis)

    def range(self, x, fmt, *, axis=None, symmetric=False):
        return ranges.kl(x, fmt, axis=axis, num_bins=self.num_bins)


@dataclasses.dataclass(frozen=True, eq=False)
class ACIQ(Calibration):
    """Banner et al.'s analytical clipping (:func:`~jquant.calibration.aciq`); one-shot only."""

    prior: str = "gaussian"
    name: ClassVar[str] = "aciq"
    streams: ClassVar[bool] = False

    def __post_init__(self):
        if self.prior not in ranges.ACIQ_PRIORS:
            raise ValueError(f"prior must be one of {ranges.ACIQ_PRIORS}, got {self.prior!r}")

    def range(self, x, fmt, *, axis=None, symmetric=False):
        return ranges.aciq(x, fmt, prior=self.prior, axis=axis)


# ----------------------------------------------------------------------------- the registry

_OBSERVER_MEMBERS = ("init", "update", "result", "bounds")
_REGISTRY: dict[str, Any] = {}


def check_observer(obs, name: str = "calibration") -> None:
    """TypeError unless ``obs`` has ``init``, ``update``, ``result`` and ``bounds``."""
    missing = [m for m in _OBSERVER_MEMBERS if not callable(getattr(obs, m, None))]
    if missing:
        raise TypeError(
            f"{name} must be a calibration name or an observer with "
            f"{', '.join(_OBSERVER_MEMBERS)}, got {type(obs).__name__} lacking {missing}"
        )


def register_observer(obs, name: str | None = None):
    """Makes ``name`` (default ``obs.name``) a shorthand for the calibration method ``obs``;
    returns ``obs``. ValueError if the name is taken by a different method."""
    check_observer(obs, "obs")
    name = getattr(obs, "name", None) if name is None else name
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty str (or obs.name), got {name!r}")
    old = _REGISTRY.get(name)
    if old is not None and old is not obs:
        raise ValueError(f"calibration name {name!r} is already registered: {old!r}")
    _REGISTRY[name] = obs
    return obs


def observer_names(*, streams: bool | None = None, one_shot: bool | None = None):
    """Registered calibration names, optionally only those that stream (rules) or work on
    whole tensors (sweeps); built-ins first."""
    return tuple(
        n
        for n, o in _REGISTRY.items()
        if (streams is None or getattr(o, "streams", True) == streams)
        and (one_shot is None or getattr(o, "one_shot", True) == one_shot)
    )


def get_observer(calibration, name: str = "calibration"):
    """Resolves a registered name (``"minmax"``, ``"percentile"``, ...) to its method;
    objects with ``init`` / ``update`` / ``result`` / ``bounds`` pass through."""
    if isinstance(calibration, str):
        try:
            return _REGISTRY[calibration]
        except KeyError:
            raise ValueError(
                f"{name} must be one of {observer_names()} or an observer, got {calibration!r}"
            ) from None
    check_observer(calibration, name)
    return calibration


def observed_range(
    calibration, x: jax.Array, fmt: Format, *, axis: Axis = None, symmetric: bool = False
):
    """``(rmin, rmax)`` of the whole tensor ``x`` by a calibration method (or its name).

    Methods with a ``range`` (the built-ins) compute it directly, ``axis`` keeping its own
    ranges; any other observer sees ``x`` as one batch, ``init -> update -> bounds``, per
    tensor only (ValueError for ``axis``).
    """
    obs = get_observer(calibration)
    if not getattr(obs, "one_shot", True):
        raise ValueError(f"calibration {obs!r} does not calibrate whole tensors")
    if hasattr(obs, "range"):
        return obs.range(x, fmt, axis=axis, symmetric=symmetric)
    return _one_batch(obs, x, fmt, axis, symmetric)


def _one_batch(obs, x, fmt, axis, symmetric):
    """``bounds(update(x, init(x)))``: ``x`` as the one batch of a per-tensor observer."""
    if axis is not None:
        raise ValueError(
            f"calibration {obs!r} is a streaming observer (per tensor): it has no range() for "
            f"per-channel ranges (axis={axis!r}); use granularity 'per_tensor'"
        )
    return obs.bounds(obs.update(x, obs.init(x)), fmt, symmetric=symmetric)


def calibration_label(calibration) -> str:
    """The name of a registered method (or of a name), else its ``repr``."""
    if isinstance(calibration, str):
        return calibration
    name = getattr(calibration, "name", None)
    if isinstance(name, str) and _REGISTRY.get(name) == calibration:
        return name
    return repr(calibration)


for _method in (MinMax(), EmaMinMax(), Percentile(), MSE(), KL(), ACIQ()):
    register_observer(_method)
