"""Per-layer sensitivity: quantize one layer at a time, everything else in float.

For each quantized layer ``L`` (a Dense / Conv path matched by the rules) and width ``b``::

    rules_L     = (rule of L with IntFormat(b) on `target`, then ".*" kept float)
    accuracy_drop = accuracy(float) - accuracy(rules_L)
    sqnr_db       = 10 log10(sum z^2 / sum (z - z_L)^2)      z: float logits, z_L: with rules_L
    weight_sqnr_db: SQNR of L's kernel alone under the same weight quantizer

Layers with the largest drop (lowest SQNR) deserve the most bits (see mixed precision).

Each layer is one compiled program that evaluates every width (traced ``bits``, as in
:func:`jquant.sweep.model_vs_bits`); the kernel SQNRs are one program per kernel shape.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util

from jquant.nn.linen import quantize_model
from jquant.nn.rules import QuantRule, first_match
from jquant.sweep.error_vs_bits import QuantSpec
from jquant.sweep.model_sweep import (
    ACCURACY,
    PTQ,
    TARGETS,
    Metric,
    check_data,
    check_metric,
    check_rules,
    layer_rules,
    logits_vs_bits,
)
from jquant.sweep.results import Table
from jquant.sweep.sharding import map_over_bits, sweep_mesh

__all__ = ["layer_paths", "sensitivity"]


def layer_paths(model: nn.Module, rules: Sequence[QuantRule], example: jax.Array) -> list[str]:
    """Paths of the Dense / Conv layers that ``rules`` quantize (not kept float), in call order.

    Only layers with a kernel count: an activation x activation einsum (attention's products)
    that a rule quantizes has no weights to give a width to."""
    _, match = quantize_model(model, tuple(rules), example, on_unused="ignore")
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), example))
    params = traverse_util.flatten_dict(dict(shapes["params"]), sep="/")
    owners = {k.removesuffix("/kernel") for k in params if k.endswith("/kernel")}
    return [
        p for p, r in match.assignment.items() if r is not None and not r.keep_float and p in owners
    ]


def sensitivity(
    model: nn.Module,
    variables: Mapping[str, Any],
    x: jax.Array,
    y: jax.Array,
    bits: int | Sequence[int] = 4,
    *,
    calib_x: jax.Array | None = None,
    rules: Sequence[QuantRule] = (QuantRule(".*"),),
    target: str = "weights+acts",
    granularity: str = "per_channel",
    batch_size: int = 512,
    progress: bool = False,
    chunk_size: int | None = None,
    mesh=None,
    metric: Metric = ACCURACY,
) -> Table:
    """Accuracy drop (or any metric's) and SQNR when only one layer is quantized, for every
    layer and width.

    Args:
      model, variables: a plain Linen classifier and its float variables.
      x, y: evaluation inputs and labels; ``calib_x``: calibration inputs (default ``x``).
      bits: one width or several.
      rules: base rules (which layers count, calibration); ``target`` and ``granularity``
        as in :func:`jquant.sweep.model_vs_bits`; so are ``batch_size``, ``progress`` (over
        layers), ``chunk_size``, ``mesh`` and ``metric`` (a
        :class:`~jquant.sweep.model_sweep.Metric`, e.g. ``PERPLEXITY`` for a GPT).

    Returns:
      Table ``layer, bits, params``, the metric's columns, its drop (``accuracy_drop``, or
      ``<key>_increase`` when lower is better: ``perplexity_increase``) and
      ``weight_sqnr_db`` (one row per layer and width); ``meta``: ``float_<key>`` (e.g.
      ``float_accuracy``), ``float_metrics`` (every column of the float model) and
      ``peak_bytes`` (the largest sweep program's memory high-water mark) and ``devices``
      (how many devices the widths were split over).
    """
    mesh = sweep_mesh(mesh)
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    widths = check_rules(rules, bits, target)
    metric = check_metric(metric)
    x, y = check_data(x, y)
    ptq = PTQ.calibrated(
        model, variables, x if calib_x is None else calib_x, rules, batch_size=batch_size
    )
    ref = ptq.logits(None, x)
    base = metric(ref, y, ref)
    kernels = traverse_util.flatten_dict(dict(variables["params"]), sep="/")
    layers = layer_paths(model, rules, ptq.example)
    if progress:
        from tqdm.auto import tqdm

        layers = tqdm(layers, desc="sensitivity", unit="layer")
    only = (QuantRule(".*", keep_float=True),)
    rows, peak = [], 0
    for path in layers:
        rules_at = functools.partial(layer_rules, tuple(rules), (path,), target, granularity, only)
        logits, p = logits_vs_bits(
            ptq, rules_at, widths[:, None], x, chunk_size=chunk_size, mesh=mesh
        )
        peak = max(peak, p)
        kernel = jax.numpy.asarray(kernels[f"{path}/kernel"], jax.numpy.float32)
        if target == "acts":
            w_sqnr = np.full(widths.shape, np.inf)
        else:
            rule = first_match(rules, path)
            spec = QuantSpec(granularity=granularity, symmetric=rule.weight_symmetric)
            w_sqnr = map_over_bits(spec, widths, (kernel,), mesh=mesh)["sqnr_db"]
        for b, z, ws in zip(widths, logits, w_sqnr, strict=True):
            s = metric(z, y, ref)
            rows.append(
                {
                    "layer": path,
                    "bits": int(b),
                    "params": int(np.size(kernel)),
                    **s,
                    metric.drop_column: metric.drop(base, s),
                    "weight_sqnr_db": float(ws),
                }
            )
    return Table.from_dicts(rows).with_meta(
        **{f"float_{metric.key}": base[metric.key]},
        float_metrics=base,
        peak_bytes=peak,
        devices=mesh.size,
    )
