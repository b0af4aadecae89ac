"""MNIST-1D CNN: float training, PTQ and QAT at 8, 4 and 2 bits, as a table of test accuracies.

1. Train the zoo CNN in float with optax (``jquant.models.train.train_or_load``, cached).
2. PTQ: quantize by rules (weights symmetric per channel, activations affine per tensor),
   calibrate min/max on training batches, evaluate (phase ``eval``).
3. QAT with :mod:`jquant.qat`'s recipe (``RECIPE_RULE``, ``RECIPE``): LSQ weight steps
   initialised by LSQ's ``2 mean|w| / sqrt(Q_P)`` and learned at a relative rate, dynamic
   affine activation ranges per example and position, distillation from the float model;
   all seeds of a width train in one vmapped program; evaluate.

The first and last layers stay at 8 bits at every width (``conv1``, ``head``), the usual
practice (Esser et al. 2019). Run::

    python -m jquant.examples.mnist1d_qat [--quick] [--seeds 3] [--out FILE]

(default ``FILE``: ``benchmarks/results/mnist1d_qat.json``).

The JSON holds, per row, its estimator and activation scales (:func:`describe`), the accuracy
of every seed, their mean and sample standard deviation, and the command, ``--quick``, the
1-minute load average and the wall time of the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import sys
import time

import jax
import numpy as np
import optax

from jquant import qat
from jquant.data import load_mnist1d
from jquant.formats import IntFormat
from jquant.models import train as T
from jquant.nn import QuantRule

__all__ = ["rules_for", "qat_optimizer", "describe", "run", "run_seeds", "summarize", "main"]


def rules_for(bits: int, estimator: str = "lsq", **rule_kwargs) -> tuple[QuantRule, ...]:
    """``bits``-bit weights and activations inside, 8 bits in the first and last layer;
    ``rule_kwargs`` (e.g. :data:`RECIPE_RULE`) go to both rules."""
    kw = dict(estimator=estimator, **rule_kwargs)
    edge = QuantRule("conv1|head", weight="int8", act="int8", **kw)
    inner = QuantRule(".*", weight=IntFormat(bits), act=IntFormat(bits), **kw)
    return (edge, inner)


def qat_optimizer(learning_rate: float, steps: int, scale_lr: float = 1e-5):
    """Adam with a cosine schedule; learned scales / zero points (``*_scale``,
    ``*_zero_point``) get Adam at ``scale_lr``: Adam's steps have the size of the learning
    rate whatever the gradient, and a step size of 1e-3 would overshoot 8-bit scales (~1e-3)."""

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: "q" if str(path[-1].key).endswith(("_scale", "_zero_point")) else "w",
            params,
        )

    return optax.multi_transform(
        {
            "w": optax.adam(optax.cosine_decay_schedule(learning_rate, steps)),
            "q": optax.adam(optax.cosine_decay_schedule(scale_lr, steps)),
        },
        labels,
    )


FLOAT_STEPS = 3000  # Adam steps of the float model (the zoo recipe, cached per seed)

QAT_ESTIMATOR = "lsq"  # of every QAT row (rules_for)
# the recipe's rule options and QATConfig (jquant.qat) of every QAT row
RECIPE_RULE = dict(act_estimator="ste", act_scale="dynamic_per_token", learned_init="paper")
RECIPE = dict(quant_lr=1e-2, distill=0.5, cosine=True)

# What each row of the table is: (label, estimator, activation scales), by row name.
PTQ_SCHEME = "min/max calibrated static ranges (8 batches), no training"
QAT_SCHEME = (
    "dynamic min/max per example and position (STE); LSQ weight steps from "
    "2 mean|w| / sqrt(Q_P), relative rate 1e-2; distillation 0.5"
)


def describe(name: str) -> dict[str, str | None]:
    """The label, estimator and activation-scale choice of result row ``name`` (``"float"``,
    ``"ptq_w{b}a{b}"`` or ``"qat_w{b}a{b}"``), as :func:`run_seeds` computes it."""
    if name == "float":
        return {"label": "float", "estimator": None, "activation_scales": None}
    m = re.fullmatch(r"(ptq|qat)_(w(\d+)a\3)", name)
    if m is None:
        raise ValueError(f"name must be 'float', 'ptq_w<b>a<b>' or 'qat_w<b>a<b>', got {name!r}")
    if m[1] == "ptq":
        return {"label": f"PTQ {m[2]}", "estimator": None, "activation_scales": PTQ_SCHEME}
    return {"label": f"QAT {m[2]}", "estimator": QAT_ESTIMATOR, "activation_scales": QAT_SCHEME}


def run_seeds(
    seeds: tuple[int, ...] = (0,),
    *,
    float_steps: int = 3000,
    qat_steps: int = 1500,
    bits: tuple[int, ...] = (8, 4, 2),
    calib_batches: int = 8,
    n_train: int | None = None,
    log=print,
) -> list[dict[str, float]]:
    """:func:`run` for every seed of ``seeds`` (one float model and one QAT batch order per
    seed, ``jax.random.key(seed + b)`` at ``b`` bits): per width, one quantized model, optimizer
    and train step serve every seed, so each width compiles once.

    Returns:
      One dict per seed, ``{"float", "ptq_w8a8", "ptq_w{b}a{b}", "qat_w{b}a{b}", ...}``, test
      accuracies.
    """
    if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        raise ValueError(f"seeds must be a non-empty tuple of ints, got {seeds!r}")
    full = load_mnist1d()
    trained = [T.train_or_load("cnn", full, s, float_steps) for s in seeds]
    data = dataclasses.replace(full, x_train=full.x_train[:n_train], y_train=full.y_train[:n_train])
    model, float_vars = trained[0].model, [tr.variables for tr in trained]
    results = [{"float": tr.metrics["test_accuracy"]} for tr in trained]
    log(f"float: {[r['float'] for r in results]}")
    for b in sorted({8, *bits}, reverse=True):
        ptq = qat.QATConfig(steps=0, calib_batches=calib_batches)
        static = qat.run_linen(model, float_vars, rules_for(b, "ste"), data, ptq, log=None)
        for seed, res, r in zip(seeds, results, static, strict=True):
            res[f"ptq_w{b}a{b}"] = r["ptq"]
            log(f"seed {seed} ptq w{b}a{b}: {r['ptq']:.4f}")
        if b not in bits:
            continue
        cfg = qat.QATConfig(steps=qat_steps, calib_batches=calib_batches, **RECIPE)
        rules = rules_for(b, QAT_ESTIMATOR, **RECIPE_RULE)
        start = time.perf_counter()
        trained_q = qat.run_linen(
            model, float_vars, rules, data, cfg, seeds=[s + b for s in seeds], log=None
        )
        for seed, res, r in zip(seeds, results, trained_q, strict=True):
            res[f"qat_w{b}a{b}"] = r["qat"]
            log(f"seed {seed} qat w{b}a{b}: {r['qat']:.4f}")
        log(f"w{b}a{b}: {time.perf_counter() - start:.0f} s")
    return results


def run(
    *,
    float_steps: int = 3000,
    qat_steps: int = 1500,
    bits: tuple[int, ...] = (8, 4, 2),
    calib_batches: int = 8,
    seed: int = 0,
    n_train: int | None = None,
    log=print,
) -> dict[str, float]:
    """Accuracies ``{"float", "ptq_w8a8", "ptq_w{b}a{b}", "qat_w{b}a{b}", ...}`` on the test set."""
    (out,) = run_seeds(
        (seed,),
        float_steps=float_steps,
        qat_steps=qat_steps,
        bits=bits,
        calib_batches=calib_batches,
        n_train=n_train,
        log=log,
    )
    return out


def summarize(per_seed: list[dict[str, float]]) -> list[dict]:
    """Per row name: :func:`describe`, the per-seed accuracies, their mean and sample standard
    deviation ``sqrt(sum (a_i - mean)^2 / (n - 1))`` (0 for one seed)."""
    rows = []
    for name in per_seed[0]:
        a = np.array([r[name] for r in per_seed], np.float64)
        std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        rows.append(
            {"name": name, **describe(name), "per_seed": a.tolist(), "mean": a.mean(), "std": std}
        )
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short QAT (300 steps)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0 .. SEEDS-1 (default 3)")
    p.add_argument("--out", default="benchmarks/results/mnist1d_qat.json")
    args = p.parse_args(argv)
    if args.seeds < 1:
        p.error(f"--seeds must be >= 1, got {args.seeds}")
    start, load = time.perf_counter(), os.getloadavg()[0]
    qat_steps = 300 if args.quick else 1500
    per_seed = run_seeds(tuple(range(args.seeds)), float_steps=FLOAT_STEPS, qat_steps=qat_steps)
    rows = summarize(per_seed)
    print("\n| model | test accuracy (mean +- std) |\n|---|---|")
    for r in rows:
        print(f"| {r['label']} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f}% |")
    results = {
        "command": "python -m jquant.examples.mnist1d_qat "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "quick": args.quick,
        "seeds": list(range(args.seeds)),
        "float_steps": FLOAT_STEPS,
        "qat_steps": qat_steps,
        "wall_s": round(time.perf_counter() - start),
        "load_1min_start": round(load, 2),
        "load_1min_end": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "rows": rows,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
