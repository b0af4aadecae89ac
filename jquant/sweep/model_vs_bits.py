"""A Flax model's accuracy and loss with its weights and activations at each bit width (PTQ).

Post-training quantization through the rules of :mod:`jquant.nn` (``quantize_model``):

1. the model runs once in the ``calibrate`` phase over ``calib_x``; the activation observers'
   states (running min/max or histograms) do not depend on the format;
2. for each configuration (width ``b``, weight granularity, what is quantized), every rule
   gets ``IntFormat(b)`` for its weights and/or activations, each layer's input QParams are
   recomputed from its observer state for that format (``observer.result(state, fmt)``), and
   the model is evaluated in the ``eval`` phase::

       accuracy = mean(argmax(logits_q) == y)
       loss     = mean cross-entropy(logits_q, y)
       kl       = mean KL(softmax(logits_float) || softmax(logits_q))
       sqnr_db  = 10 log10(sum logits_float^2 / sum (logits_float - logits_q)^2)

``jquant.ops.QuantConfig`` keeps ``bits`` static (it selects int8 kernels), so each
configuration is its own compiled program here; tensor sweeps
(:func:`jquant.sweep.error_vs_bits`) trace the width instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from jquant import metrics
from jquant.formats import IntFormat
from jquant.nn.linen import QuantizedModel, quantize_model
from jquant.nn.rules import GRANULARITIES, QuantRule
from jquant.nn.state import STATS, make_observer, qparams_to_dict
from jquant.sweep.results import Table
from jquant.sweep.sharding import check_bits_list

__all__ = ["TARGETS", "PTQ", "model_vs_bits", "with_bits"]

TARGETS = ("weights+acts", "weights", "acts")
FLOAT_BITS = 32


def with_bits(
    rule: QuantRule, bits: int | None, target: str = "weights+acts", granularity: str | None = None
) -> QuantRule:
    """``rule`` with ``IntFormat(bits)`` on what ``target`` names and float on the rest.

    ``bits=None`` leaves the rule's formats as they are; ``keep_float`` rules pass through.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if rule.keep_float:
        return rule
    changes: dict[str, Any] = {}
    if granularity is not None:
        changes["weight_granularity"] = granularity
    if bits is not None:
        changes["weight"] = IntFormat(bits) if target != "acts" else None
        changes["act"] = IntFormat(bits) if target != "weights" else None
    return dataclasses.replace(rule, **changes)


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
        qm, match = quantize_model(self.model, tuple(rules), self.example, on_unused="ignore")
        stats = traverse_util.flatten_dict(dict(self.variables.get(STATS, {})), sep="/")
        for path, rule in match.assignment.items():
            cfg = None if rule is None else rule.act_config()
            key = f"{path}/input_observer"
            if cfg is None or key not in stats:
                continue
            qp = make_observer(rule.calibration).result(
                stats[key], cfg.fmt, symmetric=cfg.symmetric
            )
            for name, value in qparams_to_dict(qp).items():
                old = stats[f"{path}/input_qparams/{name}"]
                stats[f"{path}/input_qparams/{name}"] = jnp.reshape(value, jnp.shape(old))
        variables = {**self.variables, STATS: traverse_util.unflatten_dict(stats, sep="/")}
        return qm.with_phase("eval"), variables

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


def _check_data(x, y) -> tuple[jax.Array, jax.Array]:
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or y.shape != (x.shape[0],):
        raise ValueError(f"y must have shape (len(x),) = ({x.shape[0]},), got {y.shape}")
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
) -> Table:
    """Accuracy, loss, KL and logit SQNR of a PTQ model at each width (see module docstring).

    Args:
      model, variables: a plain Linen classifier and its float variables.
      x, y: evaluation inputs and integer labels.
      bits: integer widths in ``[2, 16]``, applied to every quantized layer.
      calib_x: calibration inputs (default: ``x``).
      rules: base rules (which layers, calibration, symmetry); their widths are replaced.
      granularities: weight granularities, ``"per_channel"`` and/or ``"per_tensor"``.
      targets: what is quantized: ``"weights+acts"``, ``"weights"``, ``"acts"``.
      batch_size: evaluation batch (the last is padded, so each program compiles once).
      progress: tqdm progress bar over configurations.

    Returns:
      Table with columns ``target, granularity, bits, accuracy, loss, kl, sqnr_db``; the first
      row is the float model (``target="float"``, ``bits=32``).
    """
    widths = check_bits_list(bits)
    x, y = _check_data(x, y)
    grans = (granularities,) if isinstance(granularities, str) else tuple(granularities)
    tgts = (targets,) if isinstance(targets, str) else tuple(targets)
    for g in grans:
        if g not in GRANULARITIES:
            raise ValueError(f"granularities must be in {GRANULARITIES}, got {g!r}")
    for t in tgts:
        if t not in TARGETS:
            raise ValueError(f"targets must be in {TARGETS}, got {t!r}")
    ptq = PTQ.calibrated(
        model, variables, x if calib_x is None else calib_x, rules, batch_size=batch_size
    )
    ref = ptq.logits(None, x)
    rows = [{"target": "float", "granularity": "", "bits": FLOAT_BITS, **score(ref, y, ref)}]
    configs = [(t, g, int(b)) for t in tgts for g in grans for b in widths]
    if progress:
        from tqdm.auto import tqdm

        configs = tqdm(configs, desc="model_vs_bits", unit="config")
    for t, g, b in configs:
        logits = ptq.logits([with_bits(r, b, t, g) for r in rules], x)
        rows.append({"target": t, "granularity": g, "bits": b, **score(logits, y, ref)})
    return Table.from_dicts(rows)
