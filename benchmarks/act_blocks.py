"""Block-wise activation scales: MNIST-1D accuracy with int4 activations per tensor or per
block of features, calibrated (min/max, percentile, MSE histograms) or dynamic per token.

The zoo CNN (``jquant sweep``'s default model and weights, as ``benchmarks/formats.py``), every
layer quantized by ``QuantRule(weight="int8", act="int4", ...)``: int8 weights per output
channel, affine int4 input activations either per tensor or with ``act_block_size=8`` (one
scale per 8 consecutive input features), ranges calibrated on 512 training examples (4 batches
of 128) or taken per token (``act_scale="dynamic_per_token"``). Test accuracy on the first
1000 test examples, in ``mode="simulate"``; for the calibrated min/max blocks the same model
also runs in ``mode="int"`` (an int32 partial sum per block), and the largest logit
difference to simulate is recorded. Writes ``benchmarks/results/act_blocks.json``::

    python benchmarks/act_blocks.py
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib

import jax
import numpy as np

from jquant import bench, data
from jquant.models.train import train_or_load
from jquant.nn import QuantRule
from jquant.nn import linen as ql

RESULTS = pathlib.Path(__file__).parent / "results"
BLOCK = 8
CALIBRATIONS = ("minmax", "percentile", "mse")


def _rules():
    """``(granularity, calibration, QuantRule)`` of every row."""
    base = QuantRule(".*", weight="int8", act="int4")
    for block in (None, BLOCK):
        label = "per_tensor" if block is None else f"per_block:{block}"
        for calibration in CALIBRATIONS:
            rule = dataclasses.replace(base, act_block_size=block, calibration=calibration)
            yield label, calibration, rule
        yield (
            label,
            "dynamic_per_token",
            dataclasses.replace(base, act_block_size=block, act_scale="dynamic_per_token"),
        )


def accuracy(n_eval: int, n_calib: int) -> dict:
    ds = data.load("mnist1d")
    trained = train_or_load("cnn", ds, 0, 600)
    x, y = ds.x_test[:n_eval], ds.y_test[:n_eval]
    calib = np.split(ds.x_train[:n_calib], 4)
    float_acc = float(np.mean(np.argmax(trained.model.apply(trained.variables, x), -1) == y))
    rows, int_gap, same = [], None, None
    for granularity, calibration, rule in _rules():
        qm, _ = ql.quantize_model(trained.model, rule, x[:1], on_unused="ignore")
        v = qm.calibrate(qm.attach(trained.variables, x[:1]), calib)
        logits = jax.jit(qm.with_phase("eval").apply)(v, x)
        acc = float(np.mean(np.argmax(logits, -1) == y))
        rows.append(dict(granularity=granularity, calibration=calibration, accuracy=acc))
        print(f"{granularity:<14}{calibration:<20}accuracy {acc:.4f}")
        if granularity != "per_tensor" and calibration == "minmax":
            qi, _ = ql.quantize_model(
                trained.model, dataclasses.replace(rule, mode="int"), x[:1], on_unused="ignore"
            )
            li = jax.jit(qi.with_phase("eval").apply)(v, x)
            int_gap = float(np.max(np.abs(np.asarray(li) - np.asarray(logits))))
            same = float(np.mean(np.argmax(li, -1) == np.argmax(logits, -1)))
            print(f"int mode: max |logits_int - logits_simulate| = {int_gap:.2e}, same {same}")
    return dict(model="cnn", data="mnist1d", weight="int8 per_channel", act="int4 affine",
                block_size=BLOCK, float_accuracy=float_acc, eval_examples=n_eval,
                calibration_examples=n_calib, rows=rows,
                int_vs_simulate_max_abs_logit=int_gap, int_same_prediction=same)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--calibration-examples", type=int, default=512)
    parser.add_argument("--out", default=str(RESULTS / "act_blocks.json"))
    args = parser.parse_args()
    load_before = bench.loadavg()
    result = accuracy(args.eval_examples, args.calibration_examples)
    meta = bench.results_meta(quick=False, load_before=load_before)
    path = bench.write_results(args.out, dict(meta=meta, mnist1d_accuracy=result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
