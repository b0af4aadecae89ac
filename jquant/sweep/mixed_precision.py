"""Mixed precision: a bit width per layer under a model-size budget.

Model size counts every quantized kernel at its width and every other parameter (biases,
normalisation, layers the rules keep float) at 32 bits::

    size_bytes = sum_L params_L * b_L / 8  +  4 * (other parameters)

Two ways to choose the widths ``b_L`` from ``candidate_bits``:

- ``method="greedy"``: per-layer sensitivity (:func:`jquant.sweep.sensitivity`, one layer
  quantized at a time) at every candidate width gives a cost ``c_L(b)`` (``metric``: mean KL
  to the float logits, loss, or accuracy drop). Starting with every layer at the widest
  candidate, each step lowers the layer ``L`` that minimises::

      (c_L(b_next) - c_L(b_L)) / (params_L * (b_L - b_next) / 8)     b_next: next narrower

  until the size fits the budget (``full_path=True``: until every layer is at the narrowest
  candidate, ``len(layers) * (len(candidate_bits) - 1) + 1`` configurations).
- ``method="pareto"``: every assignment of candidate widths to layers
  (``len(candidate_bits) ** len(layers)``, at most ``max_configs``).

Each configuration is evaluated jointly (all layers at their widths, through the Flax rules)
for a :class:`~jquant.sweep.model_sweep.Metric` (``score_metric``; by default accuracy, loss,
KL and logit SQNR, or e.g. a GPT's ``PERPLEXITY``), whose headline column (``key``) the
choice trades against size; all configurations are one compiled program mapped over
a traced ``(configs, layers)`` array of widths (:func:`~jquant.sweep.model_sweep.logits_vs_bits`).
The chosen configuration is, for ``"greedy"``, the first point of the path that fits the
budget, and for ``"pareto"`` the best-scoring (most accurate) assignment that fits (ties:
the smaller, then the earlier).
:func:`jquant.sweep.plots.pareto_front` draws the table.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jquant.nn.rules import QuantRule, parse_granularity
from jquant.sweep.model_sweep import (
    ACCURACY,
    PTQ,
    Metric,
    check_data,
    check_metric,
    check_rules,
    layer_rules,
    logits_vs_bits,
)
from jquant.sweep.plots import pareto_mask
from jquant.sweep.results import Table
from jquant.sweep.sensitivity import layer_paths, sensitivity
from jquant.sweep.sharding import check_bits_list, sweep_mesh

__all__ = ["METHODS", "METRICS", "bits_column", "mixed_precision", "model_size_bytes"]

METHODS = ("greedy", "pareto")
METRICS = ("kl", "loss", "accuracy_drop")
FLOAT_BITS = 32


def bits_column(layer: str) -> str:
    """Name of the table column holding ``layer``'s width: ``"bits/<layer>"``."""
    return f"bits/{layer}"


def model_size_bytes(variables: Mapping[str, Any], layer_bits: Mapping[str, int]) -> float:
    """Weight bytes with ``layer_bits[L]`` bits for ``L/kernel``, 32 bits for all else.

    ``size = (sum_L size(L/kernel) * layer_bits[L] + 32 * other parameters) / 8``

    Args:
      variables: Flax variables with a ``"params"`` collection.
      layer_bits: width of each quantized layer's kernel, by module path.
    """
    flat = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
    missing = [p for p in layer_bits if f"{p}/kernel" not in flat]
    if missing:
        raise ValueError(f"layer_bits names layers without a kernel: {missing}")
    kernels = {f"{p}/kernel": int(b) for p, b in layer_bits.items()}
    bits = sum(int(np.size(v)) * kernels.get(k, FLOAT_BITS) for k, v in flat.items())
    return bits / 8


def _check_budget(budget_bytes: Any, budget_fraction: Any, float_bytes: float) -> float:
    """The budget in bytes from exactly one of the two arguments."""
    if (budget_bytes is None) == (budget_fraction is None):
        raise ValueError(
            "give exactly one of budget_bytes and budget_fraction, got "
            f"budget_bytes={budget_bytes!r}, budget_fraction={budget_fraction!r}"
        )
    name, value = (
        ("budget_bytes", budget_bytes)
        if budget_bytes is not None
        else ("budget_fraction", budget_fraction)
    )
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not value > 0:  # also catches NaN
        raise ValueError(f"{name} must be > 0 (inf allowed), got {value!r}")
    return float(value) if name == "budget_bytes" else float(value) * float_bytes


def _costs(
    sens: Table, layers: Sequence[str], widths: Sequence[int], metric: str
) -> dict[tuple[str, int], float]:
    """``{(layer, width): metric}`` from a sensitivity table, which must cover every pair."""
    if not isinstance(sens, Table):
        raise TypeError(
            f"sensitivity_table must be a jquant.sweep.Table, got {type(sens).__name__}"
        )
    if not {"layer", "bits", metric} <= set(sens.columns):
        raise ValueError(
            f"sensitivity_table needs columns layer, bits, {metric}; it has {list(sens.columns)}"
        )
    cost = {(r["layer"], r["bits"]): float(r[metric]) for r in sens.to_dicts()}
    missing = [(p, b) for p in layers for b in widths if (p, b) not in cost]
    if missing:
        raise ValueError(f"sensitivity_table lacks rows (layer, bits) {missing}")
    return cost


def _greedy_path(
    layers: Sequence[str],
    widths: Sequence[int],
    cost: Mapping[tuple[str, int], float],
    params: Mapping[str, int],
) -> list[tuple[dict[str, int], str | None]]:
    """Configurations from all-widest to all-narrowest, lowering one layer one step at a time,
    the one with the least cost increase per byte saved (ties: the earlier layer)."""
    current = {p: widths[-1] for p in layers}
    path: list[tuple[dict[str, int], str | None]] = [(dict(current), None)]
    while True:
        best, best_rate = None, math.inf
        for p in layers:
            i = widths.index(current[p])
            if i == 0:
                continue
            saved = params[p] * (current[p] - widths[i - 1]) / 8
            rate = (cost[p, widths[i - 1]] - cost[p, current[p]]) / saved
            if best is None or rate < best_rate:
                best, best_rate = p, rate
        if best is None:
            return path
        current[best] = widths[widths.index(current[best]) - 1]
        path.append((dict(current), best))


def mixed_precision(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    y: jax.Array,
    *,
    candidate_bits: Sequence[int] = (2, 4, 8),
    budget_bytes: float | None = None,
    budget_fraction: float | None = None,
    calib_x: jax.Array | None = None,
    rules: Sequence[QuantRule] = (QuantRule(".*"),),
    target: str = "weights",
    granularity: str = "per_channel",
    method: str = "greedy",
    metric: str = "kl",
    max_configs: int = 512,
    full_path: bool = False,
    sensitivity_table: Table | None = None,
    ptq: PTQ | None = None,
    batch_size: int = 512,
    progress: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    score_metric: Metric = ACCURACY,
) -> Table:
    """Per-layer widths under a size budget, with the accuracy (or ``score_metric``) of each
    configuration explored.

    Args:
      model, variables: a plain Linen classifier and its float variables.
      x, y: evaluation inputs and integer labels; ``calib_x``: calibration inputs (default x).
      candidate_bits: widths a layer may take, in ``[2, 16]``.
      budget_bytes: largest allowed ``size_bytes`` (see the module docstring); ``inf`` allowed.
      budget_fraction: the budget as a fraction of the float32 model's size (4 bytes per
        parameter); give exactly one of the two.
      rules: base rules (which layers are quantized, calibration, symmetry).
      target: ``"weights"`` (activations float) or ``"weights+acts"`` (each layer's input at
        the layer's width); the size counts weights only.
      granularity: weight granularity, ``"per_channel"`` or ``"per_tensor"``.
      method: ``"greedy"`` (sensitivity-guided path) or ``"pareto"`` (all assignments).
      metric: greedy cost from the sensitivity table: ``"kl"``, ``"loss"`` or the score
        metric's drop column (``"accuracy_drop"``; ``"perplexity_increase"`` for PERPLEXITY).
      max_configs: largest number of assignments ``method="pareto"`` evaluates.
      full_path: greedy only: evaluate the whole path down to every layer at the narrowest
        width (for a Pareto plot), not just up to the first configuration that fits.
      sensitivity_table: greedy only: a :func:`jquant.sweep.sensitivity` table of this model,
        with a row per layer and candidate width, computed with the same ``rules``, ``target``
        and ``granularity`` (reused, e.g. across budgets; default: computed here).
      ptq: ``PTQ.calibrated(model, variables, calib_x, rules)``, reused instead of
        calibrating again (calibration compiles the most; pass the same model and variables).
      batch_size, progress, chunk_size, mesh: as in :func:`jquant.sweep.model_vs_bits`
        (``chunk_size``: configurations vmapped at once).
      score_metric: the :class:`~jquant.sweep.model_sweep.Metric` each configuration is
        scored by (the sensitivity table's too): ``ACCURACY`` (default), ``PERPLEXITY``, ...

    Returns:
      Table, one row per configuration explored (in order): ``step, changed, bits/<layer>...,
      size_bytes``, the metric's columns (``accuracy, loss, kl, sqnr_db``), ``fits, pareto,
      chosen``. ``changed`` is the layer the greedy step lowered; ``fits``:
      ``size_bytes <= budget``; ``pareto``: not dominated in (size, metric key) among the rows.
      ``meta``: ``method, budget_bytes, float_bytes, float_<key>, layers, chosen_bits,
      chosen_size_bytes, chosen_<key>`` (``float_accuracy``, ``chosen_accuracy``), ``peak_bytes,
      devices`` (how many devices the configurations were split over)
      and, for greedy, ``sensitivity`` (the per-layer table's rows).

    Raises:
      ValueError: a bad budget (not one of the two, not > 0, or below the size with every
        layer at the narrowest width), method, metric, target or ``max_configs``.
    """
    widths = sorted({int(b) for b in check_bits_list(candidate_bits, "candidate_bits")})
    mesh = sweep_mesh(mesh)
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    score_metric = check_metric(score_metric)
    costs = (*METRICS[:2], score_metric.drop_column)
    if metric not in costs:
        raise ValueError(f"metric must be one of {costs}, got {metric!r}")
    if target not in ("weights", "weights+acts"):
        raise ValueError(f"target must be 'weights' or 'weights+acts', got {target!r}")
    parse_granularity(granularity)
    if isinstance(max_configs, bool) or not isinstance(max_configs, int) or max_configs < 1:
        raise ValueError(f"max_configs must be a positive int, got {max_configs!r}")
    check_rules(rules, widths, target)
    float_bytes = model_size_bytes(variables, {})
    budget = _check_budget(budget_bytes, budget_fraction, float_bytes)
    x, y = check_data(x, y)
    calib = x if calib_x is None else calib_x
    layers = layer_paths(model, rules, np.asarray(calib)[:1])
    flat_params = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
    if not layers:
        raise ValueError("rules quantize no Dense / Conv layer of the model; nothing to choose")
    smallest = model_size_bytes(variables, dict.fromkeys(layers, widths[0]))
    if budget < smallest:
        name = "budget_bytes" if budget_bytes is not None else "budget_fraction"
        given = budget_bytes if budget_bytes is not None else budget_fraction
        raise ValueError(
            f"{name}={given!r} ({budget:g} bytes) is below the smallest size, {smallest:g} "
            f"bytes with every layer at {widths[0]} bits"
        )

    meta: dict[str, Any] = {}
    if method == "greedy":
        sens = sensitivity_table
        if sens is None:
            sens = sensitivity(
                model,
                variables,
                x,
                y,
                widths,
                calib_x=calib,
                rules=rules,
                target=target,
                granularity=granularity,
                batch_size=batch_size,
                chunk_size=chunk_size,
                mesh=mesh,
                metric=score_metric,
            )
        cost = _costs(sens, layers, widths, metric)
        params = {p: int(np.size(flat_params[f"{p}/kernel"])) for p in layers}
        configs = _greedy_path(layers, widths, cost, params)
        if not full_path:
            sizes = [model_size_bytes(variables, bits) for bits, _ in configs]
            configs = configs[: next(i for i, s in enumerate(sizes) if s <= budget) + 1]
        meta["sensitivity"] = sens.to_dicts()
    else:
        count = len(widths) ** len(layers)
        if count > max_configs:
            raise ValueError(
                f"method='pareto' needs {len(widths)}^{len(layers)} = {count} evaluations, more "
                f"than max_configs={max_configs}; raise max_configs or use method='greedy'"
            )
        configs = [
            (dict(zip(layers, combo, strict=True)), None)
            for combo in itertools.product(widths, repeat=len(layers))
        ]

    if ptq is None:
        ptq = PTQ.calibrated(model, variables, calib, rules, batch_size=batch_size)
    elif not isinstance(ptq, PTQ) or ptq.model is not model:
        raise ValueError(f"ptq must be a PTQ of this model (PTQ.calibrated), got {ptq!r}")
    ref = ptq.logits(None, x)
    key = score_metric.key
    float_score = score_metric(ref, y, ref)[key]
    rules_at = functools.partial(
        layer_rules, tuple(rules), tuple(layers), target, granularity, tuple(rules)
    )
    table = np.array([[layer_bits[p] for p in layers] for layer_bits, _ in configs], np.int32)
    all_logits, peak = logits_vs_bits(ptq, rules_at, table, x, chunk_size=chunk_size, mesh=mesh)
    evaluated = zip(configs, all_logits, strict=True)
    if progress:
        from tqdm.auto import tqdm

        evaluated = tqdm(evaluated, total=len(configs), desc="mixed_precision", unit="config")
    rows = []
    for step, ((layer_bits, changed), logits) in enumerate(evaluated):
        size = model_size_bytes(variables, layer_bits)
        rows.append(
            {
                "step": step,
                "changed": changed,
                **{bits_column(p): b for p, b in layer_bits.items()},
                "size_bytes": size,
                **score_metric(logits, y, ref),
                "fits": size <= budget,
            }
        )
    sizes = np.array([r["size_bytes"] for r in rows])
    sign = 1.0 if score_metric.higher_is_better else -1.0
    accs = sign * np.array([r[key] for r in rows])  # higher is better
    for r, on_front in zip(rows, pareto_mask(sizes, accs), strict=True):
        r["pareto"] = bool(on_front)
    fitting = [i for i, r in enumerate(rows) if r["fits"]]
    if method == "greedy":
        best = fitting[0]  # sizes fall along the path: the first fit is the widest one
    else:
        best = min(fitting, key=lambda i: (-accs[i], sizes[i], i))
    for i, r in enumerate(rows):
        r["chosen"] = i == best
    chosen = {p: rows[best][bits_column(p)] for p in layers}
    return Table.from_dicts(rows).with_meta(
        **meta,
        method=method,
        metric=metric,
        target=target,
        granularity=granularity,
        budget_bytes=budget,
        float_bytes=float_bytes,
        **{f"float_{key}": float_score, f"chosen_{key}": rows[best][key]},
        layers=list(layers),
        chosen_bits=chosen,
        chosen_size_bytes=rows[best]["size_bytes"],
        peak_bytes=peak,
        devices=mesh.size,
    )
