"""Timing for benchmarks: interleaved rounds, paired ratios, bootstrap intervals, verdicts.

Every benchmark in ``benchmarks/`` (and ``jquant bench``) times its variants with
:func:`measure` and reports them with :meth:`Timings.to_json`, so that each result file
carries the same statistics:

- each variant is run ``warmup`` times untimed (compiles), then ``rounds`` rounds follow; in
  each round every variant runs once, in a freshly shuffled order (seeded), and its result is
  blocked on (``jax.block_until_ready``), so machine load and drift hit all variants alike;
- per variant: every time, the minimum and the median;
- per variant against the baseline: the paired per-round ratios ``r_i = t_i / b_i`` (the
  variant's and the baseline's times in the same round), their median, and a percentile
  bootstrap 95% confidence interval of that median (seeded NumPy, 2000 resamples);
- :func:`verdict`: a target on a ratio is ``"met"`` only when the whole interval lies on the
  good side of it, ``"not met"`` when it lies wholly on the bad side, else ``"inconclusive"``.

Cold timing (trace + compile + first run) is :func:`cold`: it clears JAX's caches before each
call, so every timed call compiles; report it beside the warm (compiled) timing.

>>> import itertools
>>> ticks = itertools.count()
>>> t = measure({"a": lambda: None, "b": lambda: None}, baseline="a", rounds=5, warmup=0,
...             clock=lambda: float(next(ticks)))
>>> t.ratio("b").median
1.0
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

__all__ = [
    "VERDICTS",
    "Ratio",
    "Timings",
    "bootstrap_median_ci",
    "cold",
    "loadavg",
    "machine_info",
    "measure",
    "paired_ratio",
    "results_meta",
    "verdict",
    "write_results",
]

VERDICTS = ("met", "not met", "inconclusive")


@dataclasses.dataclass(frozen=True)
class Ratio:
    """A variant's time relative to its baseline, from paired rounds.

    ``median`` is ``median_i(t_i / b_i)``; ``ci`` its bootstrap interval ``(low, high)``.
    """

    median: float
    ci: tuple[float, float]
    per_round: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Timings:
    """Seconds per call of each variant (``times[name][i]``: round ``i``) and the baseline."""

    baseline: str
    times: Mapping[str, tuple[float, ...]]
    warmup: int
    seed: int

    def __post_init__(self):
        if self.baseline not in self.times:
            raise ValueError(f"baseline {self.baseline!r} is not a variant: {list(self.times)}")

    def median(self, name: str) -> float:
        """Median seconds per call of variant ``name``."""
        return float(np.median(self.times[name]))

    def min(self, name: str) -> float:
        """Fastest call of variant ``name``, in seconds."""
        return float(np.min(self.times[name]))

    def ratio(self, name: str, baseline: str | None = None) -> Ratio:
        """:func:`paired_ratio` of ``name`` against ``baseline`` (default: the baseline)."""
        base = self.times[self.baseline if baseline is None else baseline]
        return paired_ratio(self.times[name], base, seed=self.seed)

    def to_json(
        self,
        targets: Mapping[str, float] | None = None,
        *,
        lower_is_better: bool = True,
    ) -> dict[str, Any]:
        """The statistics as plain JSON: per variant ``min_ms``, ``median_ms``, ``times_ms``,
        ``ratio`` (median and ``ci95`` against the baseline) and, for variants in
        ``targets``, the ``target`` and its :func:`verdict`."""
        targets = dict(targets or {})
        unknown = set(targets) - set(self.times)
        if unknown:
            raise ValueError(f"targets name unknown variants {sorted(unknown)}: {list(self.times)}")
        variants = {}
        for name, ts in self.times.items():
            r = self.ratio(name)
            row = dict(
                min_ms=1e3 * self.min(name),
                median_ms=1e3 * self.median(name),
                times_ms=[1e3 * t for t in ts],
                ratio=dict(median=r.median, ci95=list(r.ci)),
            )
            if name in targets:
                row["target"] = targets[name]
                row["lower_is_better"] = lower_is_better
                row["verdict"] = verdict(r.ci, targets[name], lower_is_better=lower_is_better)
            variants[name] = row
        return dict(
            baseline=self.baseline,
            rounds=len(self.times[self.baseline]),
            warmup=self.warmup,
            ratio="median over rounds of t_variant / t_baseline (same round), bootstrap 95% CI",
            variants=variants,
        )

    def pair_json(
        self,
        name: str,
        other: str,
        target: float | None = None,
        *,
        lower_is_better: bool = True,
    ) -> dict[str, Any]:
        """``name`` against ``other`` (not the baseline) as JSON: the ratio's median and
        ``ci95``, and the target's :func:`verdict` when a ``target`` is given."""
        r = self.ratio(name, other)
        out: dict[str, Any] = dict(variant=name, against=other, median=r.median, ci95=list(r.ci))
        if target is not None:
            out |= dict(
                target=target,
                lower_is_better=lower_is_better,
                verdict=verdict(r.ci, target, lower_is_better=lower_is_better),
            )
        return out

    def format(self, title: str = "") -> str:
        """A text table: median and min ms, ratio to the baseline with its interval."""
        lines = [title] if title else []
        lines.append(f"{'variant':<18}{'median ms':>11}{'min ms':>10}  x {self.baseline} [95% CI]")
        for name in self.times:
            r = self.ratio(name)
            lines.append(
                f"{name:<18}{1e3 * self.median(name):>11.3f}{1e3 * self.min(name):>10.3f}"
                f"  {r.median:.3f} [{r.ci[0]:.3f}, {r.ci[1]:.3f}]"
            )
        return "\n".join(lines)


def bootstrap_median_ci(
    values: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the median of ``values``.

    ``resamples`` samples of ``len(values)`` drawn with replacement (``np.random.default_rng
    (seed)``); the interval is the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2``
    quantiles of their medians (Efron & Tibshirani 1993, ch. 13).

    >>> bootstrap_median_ci([2.0, 2.0, 2.0])
    (2.0, 2.0)
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {v.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive int, got {resamples!r}")
    rng = np.random.default_rng(seed)
    medians = np.median(v[rng.integers(0, v.size, size=(resamples, v.size))], axis=1)
    lo, hi = np.quantile(medians, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def paired_ratio(times: Sequence[float], base: Sequence[float], *, seed: int = 0) -> Ratio:
    """Ratio of ``times`` to ``base`` over paired rounds: ``r_i = times[i] / base[i]``,
    its median and :func:`bootstrap_median_ci`."""
    t, b = np.asarray(times, np.float64), np.asarray(base, np.float64)
    if t.shape != b.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"times and base must be paired 1-D rounds, got {t.shape} and {b.shape}")
    if np.any(b <= 0):
        raise ValueError("base times must be positive")
    r = t / b
    return Ratio(float(np.median(r)), bootstrap_median_ci(r, seed=seed), tuple(r.tolist()))


def verdict(ci: Sequence[float], target: float, *, lower_is_better: bool = True) -> str:
    """``"met"`` when the interval ``ci = (low, high)`` lies wholly on the good side of
    ``target`` (``high <= target`` when lower is better, ``low >= target`` otherwise),
    ``"not met"`` when it lies wholly on the other side, else ``"inconclusive"``.

    >>> verdict((0.9, 1.1), 1.2), verdict((1.3, 1.4), 1.2), verdict((1.1, 1.3), 1.2)
    ('met', 'not met', 'inconclusive')
    """
    lo, hi = (float(c) for c in ci)
    if not lo <= hi:
        raise ValueError(f"ci must be (low, high) with low <= high, got {tuple(ci)}")
    good, bad = (hi <= target, lo > target) if lower_is_better else (lo >= target, hi < target)
    return "met" if good else "not met" if bad else "inconclusive"


def measure(
    variants: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    rounds: int,
    warmup: int = 2,
    seed: int = 0,
    clock: Callable[[], float] = time.perf_counter,
    settle: float = 0.0,
) -> Timings:
    """Times each zero-argument callable of ``variants`` in interleaved, shuffled rounds.

    Each variant runs ``warmup`` times untimed; then, ``rounds`` times, every variant runs
    once in an order drawn from ``np.random.default_rng(seed)``, timed by ``clock`` around the
    call and ``jax.block_until_ready`` of its result.

    Args:
      variants: name -> callable; the callables hold their own arguments.
      baseline: the variant the ratios are taken against.
      rounds: timed rounds (>= 2).
      warmup: untimed calls of each variant first (compilation).
      seed: seeds the round orders and the bootstrap.
      clock: seconds (injectable for tests).
      settle: seconds of idle before each timed call, untimed (>= 0): lets the worker
        threads of the variant before go quiet, e.g. OpenBLAS's, which spin for a while after
        a call and would otherwise load the next variant's cores.

    Returns:
      :class:`Timings`.
    """
    if baseline not in variants:
        raise ValueError(f"baseline {baseline!r} is not one of the variants {list(variants)}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 2:
        raise ValueError(f"rounds must be an int >= 2, got {rounds!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
    if isinstance(settle, bool) or not isinstance(settle, int | float) or not settle >= 0:
        raise ValueError(f"settle must be a number of seconds >= 0, got {settle!r}")
    for _ in range(warmup):
        for fn in variants.values():
            jax.block_until_ready(fn())
    names = list(variants)
    rng = np.random.default_rng(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        for i in rng.permutation(len(names)):
            fn = variants[names[i]]
            if settle:
                time.sleep(settle)
            start = clock()
            jax.block_until_ready(fn())
            times[names[i]].append(clock() - start)
    return Timings(baseline, {k: tuple(v) for k, v in times.items()}, warmup, seed)


def cold(fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` run after ``jax.clear_caches()``: timed, it costs trace + compile + first run.

    ``fn`` must reach its programs through ``jax.jit`` (whose caches this clears) or build
    them afresh on each call; time cold variants with ``warmup=0`` and apart from warm ones
    (the cleared caches would make those recompile too).
    """

    def run():
        jax.clear_caches()
        return fn()

    return run


def loadavg() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: OS, CPU model and cores, Python, jax / jaxlib, backend, devices."""
    import jaxlib

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return dict(
        platform=platform.platform(),
        cpu=_cpu_model(),
        cpu_count=os.cpu_count(),
        cpus_usable=usable,
        python=platform.python_version(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        backend=jax.default_backend(),
        devices=sorted({d.device_kind for d in jax.devices()}),
        device_count=jax.device_count(),
    )


def results_meta(
    *, quick: bool, load_before: list[float] | None, command: Sequence[str] | None = None
) -> dict[str, Any]:
    """What every results JSON records: whether it was a ``--quick`` run, the load average
    before (``load_before``, taken with :func:`loadavg` at the start) and now, the machine,
    the command line (default ``sys.argv``) and the date (UTC, ISO 8601)."""
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    argv = list(sys.argv if command is None else command)
    return dict(
        quick=quick,
        command="python " + shlex.join(argv),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        load_average_before=load_before,
        load_average_after=loadavg(),
        machine=machine_info(),
    )


def write_results(path: str | os.PathLike, payload: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``payload`` (which must hold a ``meta`` from :func:`results_meta`) as JSON."""
    if "meta" not in payload:
        raise ValueError("payload must carry 'meta' (see results_meta)")
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1) + "\n")
    return out
