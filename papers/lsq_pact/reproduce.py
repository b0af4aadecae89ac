"""Esser et al. (2019), LSQ, and Choi et al. (2018), PACT: the learned-range gradients.

LSQ (eq. 3) learns the step ``s`` of ``x_hat = s * clip(round(x / s), -Q_N, Q_P)``; the
straight-through gradient of one element is::

    d x_hat / d s = -x/s + round(x/s)   if -Q_N < x/s < Q_P
                  = -Q_N                if x/s <= -Q_N
                  = Q_P                 if x/s >= Q_P

scaled by ``g = 1 / sqrt(N Q_P)`` (sec. 2.2, N elements sharing ``s``). PACT (eq. 3) learns
the clip ``alpha`` of ``y = clip(x, 0, alpha)`` quantized to ``2^k - 1`` steps on [0, alpha]:
``d y_q / d alpha = 1`` for ``x >= alpha``, else 0.

This script differentiates ``jquant.fake_quant(..., estimator="lsq" | "pact")`` element by
element (``jax.jacobian`` with respect to the scale) at 2, 3, 4 and 8 bits and compares every
element with the closed forms above; the table holds the largest absolute difference.

QAT on MNIST-1D (their Table 1 analogue): the zoo CNN trained in float
(``jquant.models.train.train_or_load``) is quantized by rules (``jquant.nn.linen``), calibrated
(min/max) and fine-tuned at 2, 3, 4 and 8 bits (weights and activations inside, 8 bits in
``conv1`` and ``head``, as both papers keep the first and last layer at 8 bits) with three
estimators, over 3 seeds (each seed its own float model and batch order):

- ``ste``: fixed calibrated ranges, straight-through gradient;
- ``pact``: activations unsigned in ``[0, alpha]``, ``alpha`` learned (Choi et al. eq. 3),
  weights STE;
- ``lsq``: every step size learned (Esser et al. eq. 3, scaled by ``g``).

The optimizer is ``jquant.examples.mnist1d_qat.qat_optimizer`` (Adam, cosine schedule, scales
at 1e-5). ``lsq_pact_qat_runs`` holds every (bits, method, seed); ``lsq_pact_qat`` the mean,
sample standard deviation, min and max over seeds; ``lsq_pact_published`` the ImageNet
numbers we compare orderings with.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jquant as jq
from jquant.data import load_mnist1d
from jquant.examples.mnist1d_qat import qat_optimizer, rules_for
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table

BITS = (2, 3, 4, 8)
METHODS = ("ste", "pact", "lsq")
# Esser et al. 2019 (ICLR 2020), Table 1: ImageNet top-1 (%) of ResNet-18 (full precision
# 70.5), LSQ and PACT (the latter as they quote Choi et al. 2018); "-": not reported.
PUBLISHED_TOP1 = {
    "lsq": {2: 67.6, 3: 70.2, 4: 71.1, 8: 71.1},
    "pact": {2: 64.4, 3: 68.1, 4: 69.2, 8: None},
}
PUBLISHED_FLOAT_TOP1 = 70.5


@dataclasses.dataclass(frozen=True)
class QATSetup:
    """Sizes of the QAT experiment (``QUICK`` is the tests' few-step version)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    bits: tuple[int, ...] = BITS
    methods: tuple[str, ...] = METHODS
    model: str = "cnn"
    float_steps: int = T.RECOMMENDED_STEPS["mnist1d"]
    qat_steps: int = 300
    learning_rate: float = 1e-3
    calib_batches: int = 8
    batch_size: int = 128


FULL = QATSetup()
QUICK = QATSetup(seeds=(0,), bits=(4,), model="mlp", float_steps=30, qat_steps=3, calib_batches=1)


def lsq_closed_form(x: np.ndarray, s: float, fmt: jq.IntFormat) -> np.ndarray:
    """Esser et al. eq. 3 times ``g = 1 / sqrt(N Q_P)``, per element (float64)."""
    v = x / s
    qn, qp = -fmt.qmin, fmt.qmax
    d = np.where(v <= -qn, -qn, np.where(v >= qp, qp, -v + np.round(v)))
    return d / np.sqrt(x.size * qp)


def pact_closed_form(x: np.ndarray, alpha: float) -> np.ndarray:
    """Choi et al. eq. 3: ``1[x >= alpha]``."""
    return (x >= alpha).astype(np.float64)


def gradient_rows(n: int, seed: int = 0) -> list[dict]:
    x = jax.random.normal(jax.random.key(seed), (n,), jnp.float32) * 2.0
    rows = []
    for b in BITS:
        signed, unsigned = jq.IntFormat(b), jq.IntFormat(b, signed=False)
        s = 3.0 / signed.qmax
        alpha = 2.5

        def lsq_fq(sc, fmt=signed):
            return jq.fake_quant(x, jq.QParams(sc), fmt, estimator="lsq")

        def pact_fq(a, fmt=unsigned):
            return jq.fake_quant(x, jq.pact_qparams(a, fmt), fmt, estimator="pact")

        lsq = jax.jacobian(lsq_fq)(jnp.float32(s))
        d_alpha = jax.jacobian(pact_fq)(jnp.float32(alpha))
        xs = np.asarray(x, np.float64)
        lsq_want = lsq_closed_form(xs, s, signed)
        pact_want = pact_closed_form(xs, alpha)
        rows.append(
            {
                "bits": b,
                "elements": n,
                "lsq_max_abs_diff": float(np.max(np.abs(np.asarray(lsq) - lsq_want))),
                "lsq_clipped_fraction": float(np.mean(np.abs(xs / s) >= signed.qmax)),
                "pact_max_abs_diff": float(np.max(np.abs(np.asarray(d_alpha) - pact_want))),
                "pact_clipped_fraction": float(np.mean(pact_want)),
            }
        )
    return rows


def method_rules(method: str, bits: int) -> tuple[QuantRule, ...]:
    """Rules of ``method`` at ``bits`` (8 bits in ``conv1`` / ``head``; see module docstring)."""
    if method in ("ste", "lsq"):
        return rules_for(bits, method)
    if method == "pact":
        edge = QuantRule("conv1|head", weight="int8", act="int8")
        inner = QuantRule(
            ".*",
            weight=jq.IntFormat(bits),
            act=jq.IntFormat(bits, signed=False),
            act_estimator="pact",
        )
        return (edge, inner)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


class Quantized(NamedTuple):
    """One architecture under one rule set, with its QAT step and evaluation function built
    once, so that every seed reuses their compilations (jitted on function identity), and the
    fresh quantization variables (``quant_stats``, learned scales) every seed starts from."""

    qmodel: ql.QuantizedModel
    optimizer: optax.GradientTransformation
    train_step: Callable
    eval_fn: T.ApplyFn
    fresh: dict


def quantized(model, rules, x0, *, steps: int, learning_rate: float) -> Quantized:
    """Quantizes ``model`` by ``rules``; QAT optimizer :func:`qat_optimizer` over ``steps``."""
    qmodel, _ = ql.quantize_model(model, rules, x0, on_unused="ignore")
    opt = qat_optimizer(learning_rate, max(steps, 1))
    step = T.make_train_step(T.linen_apply_fn(qmodel.with_phase("train")), opt)
    fresh = jax.jit(qmodel.init)(jax.random.key(0), x0)
    return Quantized(qmodel, opt, step, T.linen_apply_fn(qmodel.with_phase("eval")), fresh)


def _merged(base, override):
    """``base`` with ``override``'s leaves written over it, nested dicts merged key by key
    (what ``QuantizedModel.attach`` returns, without re-running ``init`` per seed)."""
    if not (isinstance(base, Mapping) and isinstance(override, Mapping)):
        return override
    return {**base, **{k: _merged(base.get(k), v) for k, v in override.items()}}


def ptq_then_qat(
    q: Quantized,
    variables,
    data,
    *,
    steps: int,
    calib_batches: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """``{"ptq", "qat"}`` test accuracies of the float ``variables`` quantized by ``q``:
    calibrate min/max on the first ``calib_batches`` training batches, evaluate (PTQ),
    fine-tune ``steps`` steps on batches drawn with ``seed``, evaluate (QAT; skipped when
    ``steps == 0``)."""
    calib = [data.x_train[i * batch_size : (i + 1) * batch_size] for i in range(calib_batches)]
    params, state = T.split_linen(q.qmodel.calibrate(_merged(q.fresh, variables), calib))
    out = {"ptq": T.evaluate(q.eval_fn, params, state, data.x_test, data.y_test)["accuracy"]}
    if steps:
        st, _ = T.fit(
            q.train_step,
            T.TrainState.create(params, state, q.optimizer),
            data.x_train,
            data.y_train,
            steps=steps,
            batch_size=batch_size,
            key=jax.random.key(seed),
        )
        ev = T.evaluate(q.eval_fn, st.params, st.model_state, data.x_test, data.y_test)
        out["qat"] = ev["accuracy"]
    return out


def qat_rows(setup: QATSetup, log=print) -> list[dict]:
    """One row per (bits, method, seed): float, PTQ and QAT test accuracy."""
    data = load_mnist1d()
    trained = [T.train_or_load(setup.model, data, s, setup.float_steps) for s in setup.seeds]
    x0 = data.x_train[:2]
    rows = []
    for bits in setup.bits:
        for method in setup.methods:
            q = quantized(
                trained[0].model,
                method_rules(method, bits),
                x0,
                steps=setup.qat_steps,
                learning_rate=setup.learning_rate,
            )
            for seed, tr in zip(setup.seeds, trained, strict=True):
                acc = ptq_then_qat(
                    q,
                    tr.variables,
                    data,
                    steps=setup.qat_steps,
                    calib_batches=setup.calib_batches,
                    batch_size=setup.batch_size,
                    seed=seed * 100 + bits,
                )
                row = {"bits": bits, "method": method, "seed": seed}
                row.update(float=tr.metrics["test_accuracy"], **acc)
                log(f"w{bits}a{bits} {method} seed {seed}: {row}")
                rows.append(row)
    return rows


def summarize(rows: list[dict], keys=("bits", "method"), values=("float", "ptq", "qat")):
    """Mean, sample std (ddof=1; 0 for one seed), min and max of ``values`` per ``keys``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key, strict=True)) | {"seeds": len(rs)}
        for v in values:
            a = np.array([r[v] for r in rs], np.float64)
            std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
            row |= {
                f"{v}_mean": a.mean(),
                f"{v}_std": std,
                f"{v}_min": a.min(),
                f"{v}_max": a.max(),
            }
        out.append(row)
    return out


def published_rows() -> list[dict]:
    return [
        {
            "bits": b,
            "method": m,
            "imagenet_top1": PUBLISHED_TOP1[m][b],
            "float_top1": PUBLISHED_FLOAT_TOP1,
        }
        for b in BITS
        for m in PUBLISHED_TOP1
    ]


def _plot_qat(summary: Table):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for m in METHODS:
            t = summary.where(method=m)
            if len(t):
                ax.errorbar(
                    t.column("bits"),
                    t.column("qat_mean"),
                    t.column("qat_std"),
                    marker="o",
                    capsize=3,
                    label=m,
                )
        ax.set_xlabel("bits (weights and activations)")
        ax.set_ylabel("MNIST-1D test accuracy after QAT")
        ax.legend()

    return draw


def _plot(x: np.ndarray, s: float, fmt: jq.IntFormat):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        order = np.argsort(x)
        ax.plot(x[order], lsq_closed_form(x, s, fmt)[order] * np.sqrt(x.size * fmt.qmax))
        ax.set_xlabel("x")
        ax.set_ylabel("d x_hat / d s (Esser et al. eq. 3)")
        ax.set_title(f"LSQ step gradient, {fmt.bits} bits, s = {s:.3g}")

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Gradient checks on 1,000 elements when ``quick``, else 10,000 (``jax.jacobian`` holds
    an n x n array); QAT at :data:`QUICK` or :data:`FULL` size."""
    paper = "Esser et al. 2019 (LSQ), Choi et al. 2018 (PACT)"
    setup = QUICK if quick else FULL
    table = Table.from_dicts(gradient_rows(1_000 if quick else 10_000)).with_meta(paper=paper)
    runs = qat_rows(setup)
    meta = dict(paper=paper, **{k: str(v) for k, v in dataclasses.asdict(setup).items()})
    summary = Table.from_dicts(summarize(runs)).with_meta(**meta)
    x = np.linspace(-4.0, 4.0, 2001)
    save_figure(out_dir, "lsq_pact_gradients", _plot(x, 1.0, jq.IntFormat(2)))
    save_figure(out_dir, "lsq_pact_qat", _plot_qat(summary))
    tables = {
        "lsq_pact_gradients": table,
        "lsq_pact_qat_runs": Table.from_dicts(runs).with_meta(**meta),
        "lsq_pact_qat": summary,
        "lsq_pact_published": Table.from_dicts(published_rows()).with_meta(
            source="Esser et al. 2019, Table 1 (ResNet-18, ImageNet top-1 %)"
        ),
    }
    return write_tables(out_dir, tables)


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
