"""Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference".

The whitepaper's tables, on the zoo CNN with BatchNorm (``cnn_bn``) trained on MNIST-1D and
scikit-learn digits (every layer quantized, activations affine per tensor, min/max calibration):

- ``table2`` (their Table 2): PTQ at w8a8, weights per layer (per tensor) or per channel,
  symmetric or asymmetric;
- ``table4_5`` (their Tables 4 and 5): w4a8, per layer or per channel, PTQ and QAT;
- ``table6`` (their Table 6): w8a4 (4-bit activations), per channel, PTQ and QAT;
- ``collapse`` (their finding behind Table 2: folding BatchNorm gives the channels of a kernel
  very different ranges, and per-layer quantization collapses): ``conv1``'s output channel
  ``c`` is multiplied by ``k_c = 10^(3 c / (C - 1))`` (1 to 1000) and ``bn1`` absorbs it,
  ``mean_c -> k_c mean_c``, ``var_c -> k_c^2 (var_c + eps) - eps``, so the float network is
  unchanged; per-layer weights then round the small channels to zero, per-channel weights
  get the same codes as before (their scales scale by ``k_c``).

QAT fine-tunes with the straight-through estimator from the PTQ calibration (the paper's
"fake quantization" training). Each table holds mean, sample std, min and max over seeds.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax.numpy as jnp
import numpy as np

from jquant.data import load_digits, load_mnist1d
from jquant.formats import IntFormat
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.reproduce import load_paper, save_figure, script_main, write_tables
from jquant.sweep import Table

# Shared PTQ / QAT machinery and the seed summary live with paper 5.
_qat = load_paper("lsq_pact")

LOADERS = {"mnist1d": load_mnist1d, "digits": load_digits}


@dataclasses.dataclass(frozen=True)
class Config:
    """One row of the whitepaper's tables: weight / activation bits and weight layout."""

    table: str
    w_bits: int
    a_bits: int
    granularity: str  # "per_channel" | "per_tensor" (the paper's "per layer")
    symmetric: bool
    qat: bool
    rescaled: bool = False  # the collapse experiment's conv1 / bn1 rescaling

    def rule(self) -> QuantRule:
        return QuantRule(
            ".*",
            weight=IntFormat(self.w_bits),
            act=IntFormat(self.a_bits),
            weight_granularity=self.granularity,
            weight_symmetric=self.symmetric,
        )


def _grid() -> tuple[Config, ...]:
    t2 = tuple(
        Config("table2", 8, 8, g, s, False)
        for g in ("per_tensor", "per_channel")
        for s in (False, True)
    )
    t45 = tuple(
        Config("table4_5", 4, 8, g, False, q)
        for g in ("per_tensor", "per_channel")
        for q in (False, True)
    )
    t6 = tuple(Config("table6", 8, 4, "per_channel", False, q) for q in (False, True))
    collapse = tuple(
        Config("collapse", 8, 8, g, True, False, rescaled=r)
        for r in (False, True)
        for g in ("per_tensor", "per_channel")
    )
    return t2 + t45 + t6 + collapse


CONFIGS = _grid()


@dataclasses.dataclass(frozen=True)
class Setup:
    datasets: tuple[str, ...] = ("mnist1d", "digits")
    seeds: tuple[int, ...] = (0, 1, 2)
    configs: tuple[Config, ...] = CONFIGS
    qat_steps: int = 200
    learning_rate: float = 1e-3
    calib_batches: int = 8
    batch_size: int = 128
    float_steps: dict | None = None  # default: T.RECOMMENDED_STEPS


FULL = Setup()
QUICK = Setup(
    datasets=("digits",),
    seeds=(0,),
    configs=tuple(c for c in CONFIGS if c.table == "collapse" and c.rescaled),
    float_steps={"digits": 30},
    calib_batches=2,
)


def channel_factors(channels: int, decades: float = 3.0) -> np.ndarray:
    """``k_c = 10^(decades c / (C - 1))``, c = 0 .. C-1."""
    return 10.0 ** (decades * np.arange(channels) / max(channels - 1, 1))


def rescale_conv_bn(variables, conv: str = "conv1", bn: str = "bn1", eps: float = 1e-5):
    """Multiplies ``conv``'s output channel c by ``k_c`` and lets ``bn`` undo it in eval mode.

    ``BN(k x) = gamma (k x - k mu) / sqrt(k^2 (var + eps)) + beta = BN(x)`` with running
    ``mu -> k mu`` and ``var -> k^2 (var + eps) - eps`` (k >= 1 keeps it positive).
    """
    kernel = variables["params"][conv]["kernel"]
    k = jnp.asarray(channel_factors(kernel.shape[-1]), kernel.dtype)
    stats = variables["batch_stats"][bn]
    params = {**variables["params"], conv: {**variables["params"][conv], "kernel": kernel * k}}
    new_stats = {"mean": stats["mean"] * k, "var": k * k * (stats["var"] + eps) - eps}
    batch_stats = {**variables["batch_stats"], bn: new_stats}
    return {**variables, "params": params, "batch_stats": batch_stats}


def rows(setup: Setup, log=print) -> list[dict]:
    """One row per (dataset, config, seed): float and quantized test accuracy."""
    out = []
    for name in setup.datasets:
        data = LOADERS[name]()
        steps = (setup.float_steps or T.RECOMMENDED_STEPS)[name]
        trained = [T.train_or_load("cnn_bn", data, s, steps) for s in setup.seeds]
        x0 = data.x_train[:2]
        for cfg in setup.configs:
            qat_steps = setup.qat_steps if cfg.qat else 0
            q = _qat.quantized(
                trained[0].model,
                (cfg.rule(),),
                x0,
                steps=qat_steps,
                learning_rate=setup.learning_rate,
            )
            for seed, tr in zip(setup.seeds, trained, strict=True):
                variables = rescale_conv_bn(tr.variables) if cfg.rescaled else tr.variables
                acc = _qat.ptq_then_qat(
                    q,
                    variables,
                    data,
                    steps=qat_steps,
                    calib_batches=setup.calib_batches,
                    batch_size=setup.batch_size,
                    seed=seed,
                )
                ev = T.evaluate(
                    T.linen_apply_fn(tr.model), *T.split_linen(variables), data.x_test, data.y_test
                )
                row = {
                    "dataset": name,
                    **dataclasses.asdict(cfg),
                    "seed": seed,
                    "float": ev["accuracy"],
                    "quantized": acc.get("qat", acc["ptq"]),
                }
                log(row)
                out.append(row)
    return out


KEYS = ("dataset", "table", "w_bits", "a_bits", "granularity", "symmetric", "qat", "rescaled")


def _plot(summary: Table):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        labels, values, errs = [], [], []
        for r in summary.to_dicts():
            g = "chan" if r["granularity"] == "per_channel" else "layer"
            tag = ("qat" if r["qat"] else "ptq") + (" rescaled" if r["rescaled"] else "")
            labels.append(f"{r['dataset']} {r['table']} w{r['w_bits']}a{r['a_bits']} {g} {tag}")
            values.append(r["quantized_mean"])
            errs.append(r["quantized_std"])
        ax.barh(range(len(values)), values, xerr=errs)
        ax.set_yticks(range(len(values)), labels, fontsize=6)
        ax.set_xlabel("test accuracy")

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Every table at :data:`QUICK` (collapse only, digits, one seed) or :data:`FULL` size."""
    setup = QUICK if quick else FULL
    runs = rows(setup)
    summary = Table.from_dicts(_qat.summarize(runs, KEYS, ("float", "quantized")))
    meta = {"paper": "Krishnamoorthi 2018, arXiv:1806.08342", "qat_steps": setup.qat_steps}
    save_figure(out_dir, "krishnamoorthi2018", _plot(summary))
    return write_tables(
        out_dir,
        {
            "krishnamoorthi2018_runs": Table.from_dicts(runs).with_meta(**meta),
            "krishnamoorthi2018": summary.with_meta(**meta),
        },
    )


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
