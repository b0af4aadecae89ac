"""A Flax model's accuracy (or any :class:`Metric`) with its weights and activations at each
bit width (PTQ): :func:`model_vs_bits`; and a GPT's perplexity under the ``jquant.ptq``
recipes: :func:`ptq_vs_bits`.

Post-training quantization through the rules of :mod:`jquant.nn` (``quantize_model``):

1. the model runs once in the ``calibrate`` phase over ``calib_x``; the activation observers'
   states (running min/max or histograms) do not depend on the format;
2. for each configuration (width ``b``, weight granularity, what is quantized), every rule
   gets ``IntFormat(b)`` for its weights and/or activations, each layer's input QParams are
   recomputed from its observer state for that format (``observer.result(state, fmt)``), and
   the model is evaluated in the ``eval`` phase (``mode="simulate"``)::

       accuracy = mean(argmax(logits_q) == y)
       loss     = mean cross-entropy(logits_q, y)
       kl       = mean KL(softmax(logits_float) || softmax(logits_q))
       sqnr_db  = 10 log10(sum logits_float^2 / sum (logits_float - logits_q)^2)

The width is traced: for each (target, granularity) one compiled program evaluates every width
(:class:`QuantizedLogits` through :func:`jquant.sweep.sharding.map_over_bits`: ``chunk_size``
widths vmapped at a time, sharded over a ``mesh``); inside it the data run in batches of
``batch_size`` (``lax.map``), so memory is about ``chunk_size`` batches' activations.
Every calibration method supports traced widths; ``"mse"`` picks its clip by a search whose
float rounding may differ by an ulp from the static-width program.

What is reported is a :class:`Metric` of the quantized logits, the labels and the float
logits: :data:`ACCURACY` (the default: accuracy, loss, KL, SQNR), :data:`PERPLEXITY`
(a language model's labels ``(N, positions)``: ``perplexity = exp(loss)``) or :data:`SQNR`
(output SQNR alone, labels unused), or any ``Metric(fn, key, higher_is_better)``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jquant import metrics, ptq
from jquant.formats import IntFormat
from jquant.models import gpt
from jquant.nn.linen import QuantizedModel, quantize_model
from jquant.nn.rules import QuantRule, first_match, parse_granularity
from jquant.nn.state import STATS, make_observer, qparams_to_dict, variable_key
from jquant.sweep.results import Table
from jquant.sweep.sharding import check_bits_list, map_over_bits, peak_bytes, sweep_mesh

__all__ = [
    "ACCURACY",
    "PERPLEXITY",
    "SQNR",
    "TARGETS",
    "Metric",
    "PTQ",
    "QuantizedLogits",
    "check_data",
    "check_rules",
    "layer_rules",
    "logits_vs_bits",
    "model_vs_bits",
    "ptq_vs_bits",
    "score",
    "uniform_rules",
    "with_bits",
]

TARGETS = ("weights+acts", "weights", "acts")
FLOAT_BITS = 32


def with_bits(
    rule: QuantRule, bits: int | None, target: str = "weights+acts", granularity: str | None = None
) -> QuantRule:
    """``rule`` with ``IntFormat(bits)`` on what ``target`` names and float on the rest.

    ``bits`` may be traced (a sweep inside ``jit`` / ``vmap``); ``bits=None`` leaves the rule's
    formats as they are; ``keep_float`` rules pass through.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if rule.keep_float:
        return rule
    changes: dict[str, Any] = {}
    if granularity is not None:  # "per_block:32": per-block weights of 32
        name, block_size = parse_granularity(granularity)
        changes["weight_granularity"] = name
        changes["block_size"] = block_size
    if bits is not None:
        changes["weight"] = IntFormat(bits) if target != "acts" else None
        changes["act"] = IntFormat(bits) if target != "weights" else None
    return dataclasses.replace(rule, **changes)


def uniform_rules(
    rules: Sequence[QuantRule], target: str, granularity: str | None, bits
) -> tuple[QuantRule, ...]:
    """Every rule at width ``bits`` (a scalar, possibly traced) on ``target``."""
    return tuple(with_bits(r, bits, target, granularity) for r in rules)


def layer_rules(
    rules: Sequence[QuantRule],
    layers: Sequence[str],
    target: str,
    granularity: str | None,
    tail: Sequence[QuantRule],
    bits,
) -> tuple[QuantRule, ...]:
    """One exact-path rule per layer, ``layers[i]`` at width ``bits[i]`` (possibly traced;
    the rule is a copy of the one of ``rules`` that matches it), in front of ``tail``."""
    own = tuple(
        with_bits(
            dataclasses.replace(first_match(rules, p), pattern=re.escape(p)),
            bits[i],
            target,
            granularity,
        )
        for i, p in enumerate(layers)
    )
    return (*own, *tail)


def check_rules(
    rules: Sequence[QuantRule], bits: Sequence[int], targets: str | Sequence[str]
) -> np.ndarray:
    """Validates that every rule's activation calibration serves its format at every width of
    a sweep (e.g. ``calibration="kl"`` needs ``qmax + 1 <= 2048`` levels: at most 12 bits),
    before any data or model is run; returns the widths as int32.

    The sweep traces the width, so an observer can only check a traced width's limits once it
    runs; this asks each rule's observer for QParams at the narrowest and widest width,
    statically (abstract evaluation: nothing is compiled; limits on a width are bounds).
    """
    widths = check_bits_list(bits)
    tgts = (targets,) if isinstance(targets, str) else tuple(targets)
    ends = sorted({int(widths.min()), int(widths.max())})
    example = jax.ShapeDtypeStruct((2,), jnp.float32)
    for rule in rules:
        for target, b in ((t, b) for t in tgts for b in ends):
            cfg = with_bits(rule, b, target).act_config()
            if cfg is not None:
                observer = make_observer(rule.calibration, cfg)
                result = functools.partial(observer.result, fmt=cfg.fmt, symmetric=cfg.symmetric)
                jax.eval_shape(result, jax.eval_shape(observer.init, example))
    return widths


def _batches(x, batch_size: int):
    """Equal batches of ``x`` (the last zero-padded; NumPy, so no per-shape op compiles)."""
    x = np.asarray(x)
    n = x.shape[0]
    xp = np.concatenate([x, np.zeros((-n % batch_size, *x.shape[1:]), x.dtype)])
    return [xp[s : s + batch_size] for s in range(0, len(xp), batch_size)], n


@dataclasses.dataclass(frozen=True, eq=False)
class PTQ:
    """A float Linen model with calibrated activation observers, ready to evaluate under rules.

    Build with :meth:`PTQ.calibrated`; :meth:`logits` runs any rule set over inputs.
    """

    model: nn.Module
    variables: Mapping[str, Any]  # float variables plus calibrated quant_stats
    example: jax.Array
    batch_size: int

    @classmethod
    def calibrated(
        cls,
        model: nn.Module,
        variables: Mapping[str, Any],
        calib_x: jax.Array,
        rules: Sequence[QuantRule] = (QuantRule(".*"),),
        *,
        batch_size: int = 512,
    ) -> PTQ:
        """Attaches observers for ``rules`` and folds ``calib_x`` (in batches) into them."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        calib_x = np.asarray(calib_x)
        if calib_x.ndim < 1 or calib_x.shape[0] == 0:
            raise ValueError(f"calib_x must hold at least one example, got {calib_x.shape}")
        example = calib_x[:1]
        base = tuple(with_bits(r, 8) for r in rules)
        qm, _ = quantize_model(model, base, example, on_unused="ignore")
        attached = qm.attach(variables, example)
        calibrated = qm.calibrate(
            attached, [calib_x[s : s + batch_size] for s in range(0, calib_x.shape[0], batch_size)]
        )
        return cls(model, calibrated, example, batch_size)

    def quantized(self, rules: Sequence[QuantRule]) -> tuple[QuantizedModel, dict[str, Any]]:
        """The eval-phase model for ``rules`` and variables whose input QParams match them."""
        return _eval_model(self.model, self.example, self.variables, rules)

    def logits(self, rules: Sequence[QuantRule] | None, x: jax.Array) -> jax.Array:
        """Logits of ``x`` with ``rules`` applied (None: the float model)."""
        if rules is None:
            fn: Callable = jax.jit(lambda v, xb: self.model.apply(v, xb))
            variables = {k: v for k, v in self.variables.items() if k != STATS}
        else:
            qm, variables = self.quantized(rules)
            fn = jax.jit(lambda v, xb: qm.apply(v, xb))
        parts, n = _batches(x, self.batch_size)
        return np.concatenate([np.asarray(fn(variables, xb)) for xb in parts])[:n]


def _eval_model(
    model: nn.Module, example, variables: Mapping[str, Any], rules: Sequence[QuantRule]
) -> tuple[QuantizedModel, dict[str, Any]]:
    """:meth:`PTQ.quantized` on any variables; traceable (rules may carry traced widths)."""
    qm, match = quantize_model(model, tuple(rules), example, on_unused="ignore")
    stats = traverse_util.flatten_dict(dict(variables.get(STATS, {})), sep="/")
    for path, rule in match.assignment.items():
        cfg = None if rule is None else rule.act_config()
        key = f"{path}/{variable_key('input', 'observer')}"
        if cfg is None or key not in stats:
            continue
        qp = make_observer(rule.calibration, cfg).result(
            stats[key], cfg.fmt, symmetric=cfg.symmetric
        )
        for name, value in qparams_to_dict(qp).items():
            flat = f"{path}/{variable_key('input', 'qparams')}/{name}"
            stats[flat] = jnp.reshape(value, jnp.shape(stats[flat]))
    variables = {**variables, STATS: traverse_util.unflatten_dict(stats, sep="/")}
    return qm.with_phase("eval"), variables


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedLogits:
    """``fn(bits, variables, batches)`` for :func:`~jquant.sweep.sharding.map_over_bits`: the
    logits of every batch (``batches``: ``(n_batches, batch, ...)``) in the eval phase under
    ``rules_at(bits)``, with input QParams recomputed from the observers for those formats.

    Compared by identity: one instance is one compiled program, whatever the widths.
    """

    model: nn.Module
    example: np.ndarray
    rules_at: Callable[[jax.Array], Sequence[QuantRule]]

    def __call__(self, bits: jax.Array, variables: Mapping[str, Any], batches: jax.Array):
        qm, v = _eval_model(self.model, self.example, variables, self.rules_at(bits))
        return jax.lax.map(lambda xb: qm.apply(v, xb), batches)


def logits_vs_bits(
    ptq: PTQ,
    rules_at: Callable[[jax.Array], Sequence[QuantRule]],
    bits: np.ndarray,
    x: jax.Array,
    *,
    chunk_size: int | None = None,
    mesh=None,
) -> tuple[np.ndarray, int]:
    """Logits of ``x`` under ``rules_at(b)`` for every ``b`` in ``bits`` (widths ``(n,)`` or
    rows of widths ``(n, k)``), in one compiled program; and its peak memory in bytes.

    Returns:
      ``(logits of shape (n, len(x), classes), peak_bytes)``.
    """
    fn = QuantizedLogits(ptq.model, ptq.example, rules_at)
    parts, n = _batches(x, ptq.batch_size)
    args = (ptq.variables, np.stack(parts))
    out = map_over_bits(fn, bits, args, chunk_size=chunk_size, mesh=mesh)
    peak = peak_bytes(fn, bits, args, chunk_size=chunk_size, mesh=mesh)
    return out.reshape(out.shape[0], -1, *out.shape[3:])[:, :n], peak


@jax.jit
def _score(logits: jax.Array, y: jax.Array, reference: jax.Array) -> dict[str, jax.Array]:
    return {
        "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
        "loss": jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)),
        "kl": jnp.mean(metrics.kl(reference, logits)),
        "sqnr_db": metrics.sqnr_db(reference, logits),
    }


def score(logits: jax.Array, y: jax.Array, reference: jax.Array) -> dict[str, float]:
    """Accuracy, loss and, against ``reference`` logits, mean KL and SQNR (dB)."""
    return {k: float(v) for k, v in _score(logits, y, reference).items()}


def _perplexity(logits: jax.Array, y: jax.Array, reference: jax.Array) -> dict[str, float]:
    out = score(logits, y, reference)
    return {"perplexity": float(np.exp(out["loss"])), **out}


def _sqnr(logits: jax.Array, y: jax.Array, reference: jax.Array) -> dict[str, float]:
    del y
    return {"sqnr_db": float(metrics.sqnr_db(jnp.asarray(reference), jnp.asarray(logits)))}


@dataclasses.dataclass(frozen=True)
class Metric:
    """What a model sweep reports: ``fn(logits, y, reference) -> {column: value}`` of the
    quantized logits, the labels and the float model's logits; ``key`` is its headline
    column (what ``sensitivity`` ranks and ``mixed_precision`` trades against size) and
    ``higher_is_better`` its direction.

    >>> Metric(score, "accuracy", True).drop({"accuracy": 0.9}, {"accuracy": 0.8})
    0.09999999999999998
    """

    fn: Callable[[Any, Any, Any], Mapping[str, float]]
    key: str
    higher_is_better: bool = True

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"Metric.fn must be callable, got {type(self.fn).__name__}")
        if not isinstance(self.key, str) or not isinstance(self.higher_is_better, bool):
            raise TypeError("Metric.key must be a str and Metric.higher_is_better a bool")

    def __call__(self, logits, y, reference) -> dict[str, float]:
        out = {k: float(v) for k, v in self.fn(logits, y, reference).items()}
        if self.key not in out:
            raise ValueError(f"Metric.fn returned {list(out)}, without its key {self.key!r}")
        return out

    @property
    def drop_column(self) -> str:
        """``"<key>_drop"`` (higher is better) or ``"<key>_increase"`` (lower is better)."""
        return f"{self.key}_{'drop' if self.higher_is_better else 'increase'}"

    def drop(self, base: Mapping[str, float], value: Mapping[str, float]) -> float:
        """How much worse ``value`` is than ``base`` on ``key`` (positive: worse)."""
        diff = base[self.key] - value[self.key]
        return diff if self.higher_is_better else -diff


ACCURACY = Metric(score, "accuracy", True)
PERPLEXITY = Metric(_perplexity, "perplexity", False)
SQNR = Metric(_sqnr, "sqnr_db", True)


def check_metric(metric) -> Metric:
    """``metric`` if it is a :class:`Metric`; TypeError otherwise."""
    if not isinstance(metric, Metric):
        raise TypeError(
            f"metric must be a jquant.sweep.model_sweep.Metric (ACCURACY, PERPLEXITY, SQNR or "
            f"Metric(fn, key, higher_is_better)), got {type(metric).__name__}"
        )
    return metric


def check_data(x, y) -> tuple[np.ndarray, np.ndarray]:
    """``x``, ``y`` as NumPy arrays; ValueError unless ``y`` has one label (or one label per
    position, a language model's) for each example: ``y.shape[0] == len(x)``."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.ndim < 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have shape (len(x), ...) = ({x.shape[0]}, ...), got {y.shape}")
    return x, y


def model_vs_bits(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    y: jax.Array,
    bits: Sequence[int] = tuple(range(2, 9)),
    *,
    calib_x: jax.Array | None = None,
    rules: Sequence[QuantRule] = (QuantRule(".*"),),
    granularities: str | Sequence[str] = ("per_channel",),
    targets: str | Sequence[str] = ("weights+acts",),
    batch_size: int = 512,
    progress: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    metric: Metric = ACCURACY,
) -> Table:
    """A metric (accuracy, loss, KL and logit SQNR by default) of a PTQ model at each width
    (see module docstring).

    Args:
      model, variables: a plain Linen classifier and its float variables.
      x, y: evaluation inputs and integer labels (``(N,)``, or ``(N, positions)`` for a
        language model).
      bits: integer widths in ``[2, 16]``, applied to every quantized layer.
      calib_x: calibration inputs (default: ``x``).
      rules: base rules (which layers, calibration, symmetry); their widths are replaced.
      granularities: weight granularities, ``"per_channel"``, ``"per_tensor"`` and/or
        ``"per_block:<size>"``.
      targets: what is quantized: ``"weights+acts"``, ``"weights"``, ``"acts"``.
      batch_size: evaluation batch (the last is padded, so each program compiles once).
      progress: tqdm progress bar over the (target, granularity) programs.
      chunk_size: widths vmapped at once (memory ~ chunk_size batches); None: all at once.
      mesh: a ``jquant.sweep.sharding.bits_mesh(...)`` to shard the widths over; None: all
        devices (``bits_mesh()``; one device runs unsharded).
      metric: a :class:`Metric`: :data:`ACCURACY` (default), :data:`PERPLEXITY`, :data:`SQNR`.

    Returns:
      Table with columns ``target, granularity, bits`` and the metric's (by default
      ``accuracy, loss, kl, sqnr_db``); the first
      row is the float model (``target="float"``, ``bits=32``). ``meta["peak_bytes"]``: the
      largest sweep program's memory high-water mark (XLA's analysis, per device);
      ``meta["devices"]``: how many devices the widths were split over.
    """
    mesh = sweep_mesh(mesh)
    metric = check_metric(metric)
    x, y = check_data(x, y)
    grans = (granularities,) if isinstance(granularities, str) else tuple(granularities)
    tgts = (targets,) if isinstance(targets, str) else tuple(targets)
    for g in grans:
        parse_granularity(g)
    for t in tgts:
        if t not in TARGETS:
            raise ValueError(f"targets must be in {TARGETS}, got {t!r}")
    widths = check_rules(rules, bits, tgts)
    ptq = PTQ.calibrated(
        model, variables, x if calib_x is None else calib_x, rules, batch_size=batch_size
    )
    ref = ptq.logits(None, x)
    rows = [{"target": "float", "granularity": "", "bits": FLOAT_BITS, **metric(ref, y, ref)}]
    programs = [(t, g) for t in tgts for g in grans]
    if progress:
        from tqdm.auto import tqdm

        programs = tqdm(programs, desc="model_vs_bits", unit="program")
    peak = 0
    for t, g in programs:
        rules_at = functools.partial(uniform_rules, tuple(rules), t, g)
        logits, p = logits_vs_bits(ptq, rules_at, widths, x, chunk_size=chunk_size, mesh=mesh)
        peak = max(peak, p)
        for b, z in zip(widths, logits, strict=True):
            rows.append({"target": t, "granularity": g, "bits": int(b), **metric(z, y, ref)})
    return Table.from_dicts(rows).with_meta(peak_bytes=peak, devices=mesh.size)


PTQ_METHODS = ("rtn", "rtn_g32", "gptq", "awq_g32")  # ptq_vs_bits's default methods


def parse_method(name: str) -> tuple[str, int | None]:
    """``"gptq"`` -> ``("gptq", None)`` (per channel); ``"awq_g32"`` -> ``("awq", 32)``."""
    method, _, group = str(name).partition("_g")
    if method not in ptq.METHODS or (group and not group.isdigit()) or group == "0":
        raise ValueError(
            f"methods: {name!r} must be one of {ptq.METHODS}, optionally with '_g<group size>' "
            "(e.g. 'rtn_g32')"
        )
    return method, int(group) if group else None


def _lm_logits(model, variables, x: np.ndarray, batch_size: int) -> np.ndarray:
    fn = jax.jit(lambda v, xb: model.apply(v, xb))
    parts, n = _batches(x, batch_size)
    return np.concatenate([np.asarray(fn(variables, xb)) for xb in parts])[:n]


def ptq_vs_bits(
    model: gpt.GPT,
    variables: Mapping[str, Any],
    x: jax.Array,
    y: jax.Array,
    bits: Sequence[int] = (3, 4, 8),
    *,
    calib_x: jax.Array,
    methods: Sequence[str] = PTQ_METHODS,
    act_bits: int | None = 8,
    targets: Sequence[str] = ("weights", "weights+acts"),
    metric: Metric = PERPLEXITY,
    calib_batch: int = 8,
    batch_size: int = 16,
    progress: bool = False,
) -> Table:
    """A GPT's perplexity (or ``metric``) with its block kernels quantized by the
    ``jquant.ptq`` recipes at each width (:func:`jquant.ptq.quantize_model`, sequential).

    For each method (``"rtn"``, ``"gptq"``, ``"awq"``, per channel or with ``_g<size>``
    groups: ``"rtn_g32"``) and width ``b``, the weights are quantized once to
    ``IntFormat(b)``; target ``"weights"`` evaluates them with float activations,
    ``"weights+acts"`` also quantizes every block Dense input to ``IntFormat(act_bits)``
    (``act_bits=None``: ``b``) with dynamic per-token ranges (:func:`jquant.ptq.act_rules`).
    Embeddings and attention products stay float. Not one traced program: every width is a
    separate PTQ run.

    Args:
      model, variables: a Linen ``jquant.models.gpt.GPT`` and its float variables.
      x, y: evaluation windows and next-token targets ``(N, n)``.
      calib_x: calibration windows ``(M, n)``, in batches of ``calib_batch``.

    Returns:
      Table ``method, group_size, target, bits, act_bits`` and the metric's columns; the first
      row is the float model (``method="float"``, ``bits=32``).
    """
    metric = check_metric(metric)
    x, y = check_data(x, y)
    widths = check_bits_list(bits, "bits")
    parsed = [(name, *parse_method(name)) for name in methods]
    for t in targets:
        if t not in ("weights", "weights+acts"):
            raise ValueError(f"targets must be in ('weights', 'weights+acts'), got {t!r}")
    calib_x = np.asarray(calib_x)
    calib = [calib_x[s : s + calib_batch] for s in range(0, len(calib_x), calib_batch)]
    ref = _lm_logits(model, variables, x, batch_size)
    rows = [
        {"method": "float", "group_size": 0, "target": "float", "bits": FLOAT_BITS,
         "act_bits": FLOAT_BITS, **metric(ref, y, ref)}
    ]  # fmt: skip
    runs = [(p, int(b)) for p in parsed for b in widths]
    if progress:
        from tqdm.auto import tqdm

        runs = tqdm(runs, desc="ptq_vs_bits", unit="run")
    for (name, method, group), b in runs:
        recipe = ptq.Recipe(method, weight=IntFormat(b), group_size=group)
        result = ptq.quantize_model(model, variables, calib, recipe)
        for t in targets:
            a = (b if act_bits is None else act_bits) if t == "weights+acts" else FLOAT_BITS
            run = result._replace(rules=ptq.act_rules(IntFormat(a) if a != FLOAT_BITS else None))
            qmodel, qvars = run.runner(x[:1])
            logits = _lm_logits(qmodel, qvars, x, batch_size)
            rows.append(
                {"method": name, "group_size": group or 0, "target": t, "bits": b,
                 "act_bits": a, **metric(logits, y, ref)}
            )  # fmt: skip
    return Table.from_dicts(rows)
