"""MNIST-1D CNN: float training, PTQ and QAT at 8, 4 and 2 bits, as a table of test accuracies.

1. Train the zoo CNN in float with optax (``jquant.models.train.train_or_load``, cached).
2. PTQ: quantize by rules (weights symmetric per channel, activations affine per tensor),
   calibrate min/max on training batches, evaluate (phase ``eval``).
3. QAT: from the float weights and the PTQ calibration, fine-tune in phase ``train`` with the
   LSQ estimator (learned step sizes initialised from calibration), evaluate.

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
import json
import os
import pathlib
import re
import sys
import time

import jax
import numpy as np
import optax

from jquant.data import load_mnist1d
from jquant.formats import IntFormat
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql

__all__ = ["rules_for", "qat_optimizer", "describe", "run", "run_seeds", "summarize", "main"]


def rules_for(bits: int, estimator: str = "lsq") -> tuple[QuantRule, ...]:
    """``bits``-bit weights and activations inside, 8 bits in the first and last layer."""
    edge = QuantRule("conv1|head", weight="int8", act="int8", estimator=estimator)
    inner = QuantRule(".*", weight=IntFormat(bits), act=IntFormat(bits), estimator=estimator)
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

# What each row of the table is: (label, estimator, activation scales), by row name.
PTQ_SCHEME = "min/max calibrated static ranges (8 batches), no training"
QAT_SCHEME = (
    "LSQ: learned step sizes initialised from min/max calibration (8 batches); "
    "activation zero points fixed at calibration"
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
    data = load_mnist1d()
    x_train, y_train = data.x_train[:n_train], data.y_train[:n_train]
    trained = [T.train_or_load("cnn", data, s, float_steps) for s in seeds]
    x0 = data.x_train[:2]
    results = [{"float": tr.metrics["test_accuracy"]} for tr in trained]
    log(f"float: {[r['float'] for r in results]}")
    calib = [x_train[i * 128 : (i + 1) * 128] for i in range(calib_batches)]
    for b in sorted({8, *bits}, reverse=True):
        rules = rules_for(b, QAT_ESTIMATOR)
        qmodel, _ = ql.quantize_model(trained[0].model, rules, x0, on_unused="ignore")
        ev = T.linen_apply_fn(qmodel.with_phase("eval"))
        opt = qat_optimizer(1e-3, qat_steps)
        step = T.make_train_step(T.linen_apply_fn(qmodel.with_phase("train")), opt)
        for seed, tr, res in zip(seeds, trained, results, strict=True):
            variables = qmodel.calibrate(qmodel.attach(tr.variables, x0), calib)
            params, state = T.split_linen(variables)
            res[f"ptq_w{b}a{b}"] = T.evaluate(ev, params, state, data.x_test, data.y_test)[
                "accuracy"
            ]
            log(f"seed {seed} ptq w{b}a{b}: {res[f'ptq_w{b}a{b}']:.4f}")
            if b not in bits:
                continue
            start = time.perf_counter()
            st, _ = T.fit(
                step,
                T.TrainState.create(params, state, opt),
                x_train,
                y_train,
                steps=qat_steps,
                batch_size=128,
                key=jax.random.key(seed + b),
            )
            acc = T.evaluate(ev, st.params, st.model_state, data.x_test, data.y_test)["accuracy"]
            res[f"qat_w{b}a{b}"] = acc
            log(f"seed {seed} qat w{b}a{b}: {acc:.4f} ({time.perf_counter() - start:.0f} s)")
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
