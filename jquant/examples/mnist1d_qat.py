"""MNIST-1D CNN: float training, PTQ and QAT at 8, 4 and 2 bits, as a table of test accuracies.

1. Train the zoo CNN in float with optax (``jquant.models.train.train_or_load``, cached).
2. PTQ: quantize by rules (weights symmetric per channel, activations affine per tensor),
   calibrate min/max on training batches, evaluate (phase ``eval``).
3. QAT: from the float weights and the PTQ calibration, fine-tune in phase ``train`` with the
   LSQ estimator (learned step sizes initialised from calibration), evaluate.

The first and last layers stay at 8 bits at every width (``conv1``, ``head``), the usual
practice (Esser et al. 2019). Run::

    python -m jquant.examples.mnist1d_qat [--quick] [--out results/mnist1d_qat.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import optax

from jquant.data import load_mnist1d
from jquant.formats import IntFormat
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql

__all__ = ["rules_for", "qat_optimizer", "run", "main"]


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
    data = load_mnist1d()
    x_train, y_train = data.x_train[:n_train], data.y_train[:n_train]
    trained = T.train_or_load("cnn", data, seed, float_steps)
    x0 = data.x_train[:2]
    results = {"float": trained.metrics["test_accuracy"]}
    log(f"float: {results['float']:.4f}")
    calib = [x_train[i * 128 : (i + 1) * 128] for i in range(calib_batches)]
    for b in sorted({8, *bits}, reverse=True):
        qmodel, _ = ql.quantize_model(trained.model, rules_for(b), x0, on_unused="ignore")
        variables = qmodel.calibrate(qmodel.attach(trained.variables, x0), calib)
        params, state = T.split_linen(variables)
        ev = T.linen_apply_fn(qmodel.with_phase("eval"))
        results[f"ptq_w{b}a{b}"] = T.evaluate(ev, params, state, data.x_test, data.y_test)[
            "accuracy"
        ]
        log(f"ptq w{b}a{b}: {results[f'ptq_w{b}a{b}']:.4f}")
        if b not in bits:
            continue
        opt = qat_optimizer(1e-3, qat_steps)
        step = T.make_train_step(T.linen_apply_fn(qmodel.with_phase("train")), opt)
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
        results[f"qat_w{b}a{b}"] = acc
        log(f"qat w{b}a{b}: {acc:.4f} ({time.perf_counter() - start:.0f} s)")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="short QAT (300 steps)")
    p.add_argument("--out", default="results/mnist1d_qat.json")
    args = p.parse_args(argv)
    results = run(qat_steps=300 if args.quick else 1500)
    print("\n| model | test accuracy |\n|---|---|")
    for k, v in results.items():
        print(f"| {k} | {100 * v:.2f}% |")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
