"""One grid cell: a product (matmul or conv) timed in every operand format on this backend.

A :class:`Case` is one shape of one product: its ``lax`` op with the geometry bound
(``product(lhs, rhs, preferred_element_type=..., precision=...)``), the same op from
:mod:`jquant.ops` (``quantized(lhs, rhs, lhs_quant=..., ...)``) and its operation count.
:func:`run_case` times, in one interleaved :func:`jquant.bench.timing.measure`, the raw op in
each :data:`OPERANDS` format and jquant's ``simulate`` and ``int`` ops (int8 activations per
tensor and weights per output channel, symmetric, with scales computed ahead of time: no
min/max pass, as deployed), and returns one row per variant:

- ``median_ms`` and ``ci95_ms`` (bootstrap interval of the median time);
- ``rate_tflops = flops / median`` (TOP/s for integer operands) and ``percent_of_peak``;
- ``time_ratio`` ``t / t_baseline`` in the same round (median, ``ci95``) and ``speedup =
  1 / time_ratio``, the baseline being bfloat16 on GPU/TPU and float32 on CPU;
- ``intensity = flops / bytes`` with ``bytes`` the operands' and the output's sizes;
- ``max_rel_err`` of the output against the float32 op on the same inputs
  (``max |y - y32| / max |y32|``): the inputs are integers in ``[-8, 7]``, exact in every
  format, so integer products are exact and float ones differ by rounding only.

A format the backend cannot compile or run is a row with ``status="unsupported"`` and the
error's first line; it is never dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.bench import timing
from jquant.bench.peaks import Peak
from jquant.quant import QParams, QuantConfig, dynamic_qparams

__all__ = [
    "OPERANDS",
    "JQUANT_MODES",
    "Case",
    "Operand",
    "baseline_for",
    "integer_inputs",
    "raw_product",
    "run_case",
    "with_peak",
]


@dataclasses.dataclass(frozen=True)
class Operand:
    """A raw operand format: both operands of ``dtype``, accumulated into ``accumulate``
    (``preferred_element_type``; None: the operand type). ``integer`` rates are TOP/s."""

    name: str
    dtype: str
    accumulate: str | None
    integer: bool

    def to_json(self) -> dict:
        """Plain JSON."""
        return dataclasses.asdict(self)


OPERANDS: tuple[Operand, ...] = (
    Operand("float32", "float32", None, False),
    Operand("bfloat16", "bfloat16", None, False),
    Operand("float16", "float16", None, False),
    Operand("int8", "int8", "int32", True),
    Operand("fp8_e4m3", "float8_e4m3fn", "float32", False),
    Operand("int4", "int4", "int32", True),
)
JQUANT_MODES = ("simulate", "int")
_INT8 = next(o for o in OPERANDS if o.name == "int8")


def baseline_for(platform: str) -> str:
    """The format ratios are taken against: float32 on CPU, bfloat16 elsewhere."""
    return "float32" if platform == "cpu" else "bfloat16"


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape of one product.

    Attributes:
      name: the cell's name (``"m1024_n1024_k1024"``, ``"resnet50.conv2_3x3"``).
      group: a family of shapes (``"square"``, ``"unaligned"``, ``"resnet50"``, ...).
      lhs_shape, rhs_shape: operand shapes (activations, weights; weights' last axis is the
        output-feature axis, quantized per channel).
      flops: operations of one product, ``2 * outputs * taps`` (a multiply-add is two).
      product: the ``lax`` op with its geometry bound: ``product(lhs, rhs, **kw)``.
      quantized: the :mod:`jquant.ops` op with the same geometry bound.
    """

    name: str
    group: str
    lhs_shape: tuple[int, ...]
    rhs_shape: tuple[int, ...]
    flops: int
    product: Callable[..., jax.Array]
    quantized: Callable[..., jax.Array]

    def to_json(self) -> dict:
        """The case's description (no callables)."""
        return dict(
            case=self.name,
            group=self.group,
            lhs_shape=list(self.lhs_shape),
            rhs_shape=list(self.rhs_shape),
            flops=self.flops,
        )


def integer_inputs(case: Case, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Integer-valued operands in ``[-8, 7]`` (exact in every format, int4 included)."""
    rng = np.random.default_rng(seed)
    return (
        rng.integers(-8, 8, case.lhs_shape).astype(np.float32),
        rng.integers(-8, 8, case.rhs_shape).astype(np.float32),
    )


def raw_product(case: Case, op: Operand):
    """The jitted raw op of ``case`` in format ``op`` (float32 with ``precision=HIGHEST``)."""
    precision = lax.Precision.HIGHEST if op.dtype == "float32" else None
    return jax.jit(
        functools.partial(case.product, preferred_element_type=op.accumulate, precision=precision)
    )


def _jquant_fn(case: Case, mode: str, lhs: jax.Array, rhs: jax.Array):
    """jquant's op in ``mode``: int8 symmetric, lhs per tensor, rhs per output channel, with
    QParams computed once ahead of time (static)."""
    lhs_quant, rhs_quant = QuantConfig(), QuantConfig(axis=-1)
    qp_l = dynamic_qparams(lhs, lhs_quant)
    qp_r = dynamic_qparams(rhs, rhs_quant)
    qp_l = QParams(qp_l.scale.reshape(()), qp_l.zero_point.reshape(()))
    fn = functools.partial(case.quantized, lhs_quant=lhs_quant, rhs_quant=rhs_quant, mode=mode)
    return jax.jit(lambda x, w, a, b: fn(x, w, lhs_qparams=a, rhs_qparams=b)), (qp_l, qp_r)


def _error_line(e: BaseException) -> str:
    first = next((line for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {first[:300]}"


def _out_bytes(fn, *args) -> int:
    out = jax.eval_shape(fn, *args)
    return int(np.prod(out.shape)) * jnp.dtype(out.dtype).itemsize


def run_case(
    case: Case,
    *,
    peak: Peak,
    platform: str,
    rounds: int,
    operands: Sequence[Operand] = OPERANDS,
    jquant_modes: Sequence[str] = JQUANT_MODES,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Times ``case`` in every format (see the module docstring); one row per variant.

    Variants are the raw op in each of ``operands`` (named by the format) and jquant's op in
    each of ``jquant_modes`` (``"jquant_simulate"``, ``"jquant_int"``); jquant's operands are
    in the baseline float type. ``jquant_int`` also carries ``ratio_to_raw_int8``, its time
    over the raw int8 op's in the same round.
    """
    baseline = baseline_for(platform)
    if baseline not in [o.name for o in operands]:
        raise ValueError(f"operands must include the baseline {baseline!r}")
    x_np, w_np = integer_inputs(case, seed)
    reference = np.asarray(raw_product(case, OPERANDS[0])(x_np, w_np), np.float64)
    ref_scale = max(float(np.abs(reference).max()), 1.0)
    variants: dict[str, Callable[[], Any]] = {}
    rows: dict[str, dict[str, Any]] = {}

    def add(name, fmt, peak_format, integer, fn, args):
        row = dict(case.to_json(), variant=name, format=fmt, unit="TOP/s" if integer else "TFLOP/s")
        row["peak_tflops"] = peak.rate(peak_format)
        try:
            out = np.asarray(jnp.asarray(fn(*args), jnp.float32), np.float64)
        except Exception as e:  # the backend cannot compile or run this format
            rows[name] = row | dict(status="unsupported", error=_error_line(e))
            return
        in_bytes = sum(int(np.size(a)) * jnp.dtype(a.dtype).itemsize for a in args[:2])
        nbytes = in_bytes + _out_bytes(fn, *args)
        rows[name] = row | dict(
            status="ok",
            error=None,
            bytes=nbytes,
            intensity=case.flops / nbytes,
            max_rel_err=float(np.abs(out - reference).max() / ref_scale),
        )
        variants[name] = functools.partial(fn, *args)

    for op in operands:
        try:
            args = (jnp.asarray(x_np, op.dtype), jnp.asarray(w_np, op.dtype))
        except Exception as e:  # the dtype itself is missing from this jax
            rows[op.name] = dict(
                case.to_json(), variant=op.name, format=op.name, status="unsupported",
                error=_error_line(e), peak_tflops=peak.rate(op.name),
                unit="TOP/s" if op.integer else "TFLOP/s",
            )  # fmt: skip
            continue
        add(op.name, op.name, op.name, op.integer, raw_product(case, op), args)
    x, w = jnp.asarray(x_np, baseline), jnp.asarray(w_np, baseline)
    for mode in jquant_modes:
        fn, qps = _jquant_fn(case, mode, x, w)
        integer = mode == "int"
        fmt = "int8" if integer else baseline
        add(f"jquant_{mode}", fmt, fmt, integer, fn, (x, w, *qps))

    timings = timing.measure(variants, baseline=baseline, rounds=rounds, warmup=1, seed=seed)
    for name in variants:
        row = rows[name]
        med = timings.median(name)
        r = timings.ratio(name)
        row |= dict(
            median_ms=1e3 * med,
            ci95_ms=[1e3 * t for t in timing.bootstrap_median_ci(timings.times[name], seed=seed)],
            min_ms=1e3 * timings.min(name),
            rate_tflops=case.flops / med / 1e12,
            time_ratio=dict(median=r.median, ci95=list(r.ci), against=baseline),
            speedup=1.0 / r.median,
        )
        row["percent_of_peak"] = (
            None if row["peak_tflops"] is None else 100 * row["rate_tflops"] / row["peak_tflops"]
        )
    if "jquant_int" in variants and _INT8.name in variants:
        pair = timings.pair_json("jquant_int", _INT8.name)
        rows["jquant_int"]["ratio_to_raw_int8"] = dict(median=pair["median"], ci95=pair["ci95"])
    return list(rows.values())


def with_peak(rows: Sequence[dict[str, Any]], peak: Peak) -> list[dict[str, Any]]:
    """The rows with ``peak_tflops`` and ``percent_of_peak`` taken from ``peak``: ``100 *
    rate_tflops / peak.rate(format)``, None where ``peak`` has no rate for the format."""
    out = []
    for row in rows:
        rate = peak.rate(row["format"])
        row = dict(row, peak_tflops=rate)
        if row["status"] == "ok":
            row["percent_of_peak"] = None if rate is None else 100 * row["rate_tflops"] / rate
        out.append(row)
    return out
