"""Krishnamoorthi (2018), "Quantizing deep convolutional networks for efficient inference".

The whitepaper's Tables 2 to 6, on the zoo CNN with BatchNorm (``cnn_bn``) trained on MNIST-1D
and scikit-learn digits (every conv / dense layer quantized, activations affine per tensor,
min/max calibration on 8 training batches, weights min/max per tensor or per output channel):

- ``table2`` (their Table 2): weight-only PTQ at 8 bits: asymmetric per layer, symmetric per
  channel, asymmetric per channel;
- ``table3`` (their Table 3): PTQ of weights and activations at 8 bits, the same three weight
  layouts plus "activation only" (float weights, 8-bit activations);
- ``table4`` (their Table 4): w8a8, asymmetric per layer / symmetric per channel, PTQ and QAT;
- ``table5`` (their Table 5): w4a8, PTQ asymmetric per layer, PTQ and QAT symmetric per channel;
- ``table6`` (their Table 6): (weight, activation) bits (8, 4) PTQ and QAT, (4, 8) QAT, weights
  symmetric per channel;
- ``collapse`` (their finding behind Tables 2-3: folding BatchNorm gives the channels of a
  kernel very different ranges, and per-layer quantization collapses): ``conv1``'s output
  channel ``c`` is multiplied by ``k_c = 10^(3 c / (C - 1))`` (1 to 1000) and ``bn1`` absorbs
  it, ``mean_c -> k_c mean_c``, ``var_c -> k_c^2 (var_c + eps) - eps``, so the float network is
  unchanged; per-layer weights then round the small channels to zero, per-channel weights get
  the same codes as before (their scales scale by ``k_c``).

Each distinct quantization scheme (weight / activation format and weight layout) is built and
compiled once per data set and shared by every table column and seed that uses it (its PTQ
accuracy is the calibrated model before fine-tuning; QAT fine-tunes it with the
straight-through estimator, as the paper's "simulated quantization" training, with BatchNorm
in training mode). Each table holds mean, sample std, min and max over seeds.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

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
class Scheme:
    """One quantization scheme: weight / activation bits (None: float) and weight layout."""

    w_bits: int | None
    a_bits: int | None
    granularity: str = "per_channel"  # or "per_tensor" (the paper's "per layer")
    symmetric: bool = True

    def rule(self) -> QuantRule:
        return QuantRule(
            ".*",
            weight=None if self.w_bits is None else IntFormat(self.w_bits),
            act=None if self.a_bits is None else IntFormat(self.a_bits),
            weight_granularity=self.granularity,
            weight_symmetric=self.symmetric,
        )


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of one of the paper's tables: a scheme, PTQ or QAT, original or rescaled."""

    table: str
    column: str
    scheme: Scheme
    qat: bool = False
    rescaled: bool = False  # the collapse experiment's conv1 / bn1 rescaling


def _columns() -> tuple[Column, ...]:
    def s(w, a, g="per_channel", sym=True):
        return Scheme(w, a, g, sym)

    asym_layer, sym_chan, asym_chan = (
        ("per_tensor", False),
        ("per_channel", True),
        (
            "per_channel",
            False,
        ),
    )
    layouts = {
        "asym per-layer": asym_layer,
        "sym per-channel": sym_chan,
        "asym per-channel": asym_chan,
    }
    t2 = tuple(Column("table2", k, s(8, None, *v)) for k, v in layouts.items())
    t3 = tuple(Column("table3", k, s(8, 8, *v)) for k, v in layouts.items())
    t3 += (Column("table3", "activation only", s(None, 8)),)
    t4 = tuple(
        Column("table4", f"{k} {'QAT' if q else 'PTQ'}", s(8, 8, *layouts[k]), qat=q)
        for q in (False, True)
        for k in ("asym per-layer", "sym per-channel")
    )
    t5 = (
        Column("table5", "asym per-layer PTQ", s(4, 8, *asym_layer)),
        Column("table5", "sym per-channel PTQ", s(4, 8, *sym_chan)),
        Column("table5", "sym per-channel QAT", s(4, 8, *sym_chan), qat=True),
    )
    t6 = (
        Column("table6", "(8,4) PTQ", s(8, 4, *sym_chan)),
        Column("table6", "(8,4) QAT", s(8, 4, *sym_chan), qat=True),
        Column("table6", "(4,8) QAT", s(4, 8, *sym_chan), qat=True),
    )
    collapse = tuple(
        Column("collapse", f"{k}{' rescaled' if r else ''}", s(8, 8, *layouts[k]), rescaled=r)
        for r in (False, True)
        for k in ("asym per-layer", "sym per-channel")
    )
    return t2 + t3 + t4 + t5 + t6 + collapse


COLUMNS = _columns()

# Published top-1 ImageNet accuracy (fractions), arXiv:1806.08342v1 Tables 2-6, as transcribed
# in two independent public copies of the paper's text (see README.md): the network closest to
# ours in spirit (Mobilenet-v1_1_224, the collapse case) and the robust Resnet-v1_50.
PUBLISHED = {
    "Mobilenet-v1_1_224": {
        "float": 0.709,
        "table2": {"asym per-layer": 0.001, "sym per-channel": 0.591, "asym per-channel": 0.704},
        "table3": {
            "asym per-layer": 0.001,
            "sym per-channel": 0.591,
            "asym per-channel": 0.703,
            "activation only": 0.708,
        },
        "table4": {
            "asym per-layer PTQ": 0.001,
            "sym per-channel PTQ": 0.591,
            "asym per-layer QAT": 0.70,
            "sym per-channel QAT": 0.707,
        },
        "table5": {
            "asym per-layer PTQ": 0.02,
            "sym per-channel PTQ": 0.001,
            "sym per-channel QAT": 0.65,
        },
        "table6": {"(8,4) PTQ": 0.48, "(8,4) QAT": 0.64, "(4,8) QAT": 0.65},
    },
    "Resnet-v1_50": {
        "float": 0.752,
        "table2": {"asym per-layer": 0.75, "sym per-channel": 0.751, "asym per-channel": 0.752},
        "table3": {
            "asym per-layer": 0.75,
            "sym per-channel": 0.751,
            "asym per-channel": 0.751,
            "activation only": 0.751,
        },
        "table4": {
            "asym per-layer PTQ": 0.75,
            "sym per-channel PTQ": 0.751,
            "asym per-layer QAT": 0.75,
            "sym per-channel QAT": 0.75,
        },
        "table5": {
            "asym per-layer PTQ": 0.002,
            "sym per-channel PTQ": 0.54,
            "sym per-channel QAT": 0.732,
        },
        "table6": {"(8,4) PTQ": 0.36, "(8,4) QAT": 0.58, "(4,8) QAT": 0.732},
    },
}


@dataclasses.dataclass(frozen=True)
class Setup:
    datasets: tuple[str, ...] = ("mnist1d", "digits")
    seeds: tuple[int, ...] = (0, 1, 2)
    columns: tuple[Column, ...] = COLUMNS
    qat_steps: int = 200
    learning_rate: float = 1e-3
    calib_batches: int = 8
    batch_size: int = 128
    float_steps: dict | None = None  # default: T.RECOMMENDED_STEPS


FULL = Setup()
QUICK = Setup(
    datasets=("digits",),
    seeds=(0,),
    columns=tuple(c for c in COLUMNS if c.table == "collapse"),
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
    """One row per (dataset, table column, seed): float and quantized test accuracy."""
    out = []
    for name in setup.datasets:
        data = LOADERS[name]()
        steps = (setup.float_steps or T.RECOMMENDED_STEPS)[name]
        trained = [T.train_or_load("cnn_bn", data, s, steps) for s in setup.seeds]
        x0 = data.x_train[:2]
        schemes = dict.fromkeys(c.scheme for c in setup.columns)
        results = {}
        for scheme in schemes:
            start = time.perf_counter()
            cols = [c for c in setup.columns if c.scheme == scheme]
            qat_steps = setup.qat_steps if any(c.qat for c in cols) else 0
            q = _qat.quantized(
                trained[0].model,
                (scheme.rule(),),
                x0,
                steps=qat_steps,
                learning_rate=setup.learning_rate,
            )
            for rescaled in sorted({c.rescaled for c in cols}):
                for seed, tr in zip(setup.seeds, trained, strict=True):
                    variables = rescale_conv_bn(tr.variables) if rescaled else tr.variables
                    results[scheme, rescaled, seed] = _qat.ptq_then_qat(
                        q,
                        variables,
                        data,
                        steps=0 if rescaled else qat_steps,
                        calib_batches=setup.calib_batches,
                        batch_size=setup.batch_size,
                        seed=seed,
                    )
            log(f"{name} {scheme}: {time.perf_counter() - start:.1f} s")
        for c in setup.columns:
            for seed, tr in zip(setup.seeds, trained, strict=True):
                acc = results[c.scheme, c.rescaled, seed]
                row = {
                    "dataset": name,
                    "table": c.table,
                    "column": c.column,
                    **dataclasses.asdict(c.scheme),
                    "qat": c.qat,
                    "rescaled": c.rescaled,
                    "seed": seed,
                    # the rescaling leaves the float network unchanged (tested)
                    "float": tr.metrics["test_accuracy"],
                    "quantized": acc["qat"] if c.qat else acc["ptq"],
                }
                out.append(row)
    return out


KEYS = (
    "dataset",
    "table",
    "column",
    "w_bits",
    "a_bits",
    "granularity",
    "symmetric",
    "qat",
    "rescaled",
)


def published_rows() -> list[dict]:
    """The :data:`PUBLISHED` numbers, one row per (network, table, column)."""
    return [
        {"network": net, "table": t, "column": col, "top1": v, "float_top1": tables["float"]}
        for net, tables in PUBLISHED.items()
        for t, cols in tables.items()
        if t != "float"
        for col, v in cols.items()
    ]


def _plot(summary: Table):
    def draw(fig):
        datasets = sorted(set(summary.column("dataset")))
        for i, name in enumerate(datasets, 1):
            ax = fig.add_subplot(1, len(datasets), i)
            rs = summary.where(dataset=name).to_dicts()
            ax.barh(
                range(len(rs)),
                [r["quantized_mean"] for r in rs],
                xerr=[r["quantized_std"] for r in rs],
            )
            ax.axvline(rs[0]["float_mean"], color="k", lw=0.8, label="float")
            ax.set_yticks(range(len(rs)), [f"{r['table']}: {r['column']}" for r in rs], fontsize=6)
            ax.invert_yaxis()
            ax.set_xlabel(f"{name} test accuracy (mean, std over seeds)")
            ax.legend(fontsize=6)

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Every table at :data:`QUICK` (collapse only, digits, one seed) or :data:`FULL` size."""
    setup = QUICK if quick else FULL
    start = time.perf_counter()
    runs = rows(setup)
    seconds = time.perf_counter() - start
    summary = Table.from_dicts(_qat.summarize(runs, KEYS, ("float", "quantized")))
    meta = {
        "paper": "Krishnamoorthi 2018, arXiv:1806.08342",
        "qat_steps": setup.qat_steps,
        "seconds": round(seconds, 1),
    }
    save_figure(out_dir, "krishnamoorthi2018", _plot(summary))
    return write_tables(
        out_dir,
        {
            "krishnamoorthi2018_runs": Table.from_dicts(runs).with_meta(**meta),
            "krishnamoorthi2018": summary.with_meta(**meta),
            "krishnamoorthi2018_published": Table.from_dicts(published_rows()).with_meta(
                source="arXiv:1806.08342v1 Tables 2-6 (ImageNet top-1), see README.md"
            ),
        },
    )


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
