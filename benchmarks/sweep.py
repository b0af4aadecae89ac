"""Benchmark: one traced-bits program for a sweep over 15 widths vs a loop that re-jits per width.

Both compute the same error metrics (jquant.sweep.QuantSpec: symmetric min-max, per tensor) of
one N(0, 1) tensor at widths 2..16. Times are medians of several runs in this process:

- ``loop_rejit``: for each width a fresh ``jax.jit`` with the width baked in (trace + compile
  + run per width), as a script that loops over ``IntFormat(b)`` does;
- ``vmapped_cold``: ``map_over_bits`` with its program cache cleared (trace + compile once);
- ``vmapped_warm``: ``map_over_bits`` again (cached program: run only);
- ``loop_warm``: the per-width programs already compiled (run only).

Peak memory is XLA's ``memory_analysis()`` of each compiled program (arguments + outputs +
temporaries): one width, all 15 with ``chunk_size`` 1 and 4, and all 15 vmapped at once.
It also prints the SQNR-per-bit slope on U(-1, 1) and N(0, 1) data (4..12 bits).

Model sweep (``model_sweep`` in the JSON): the PTQ logits of the zoo CNN (MNIST-1D shapes,
random weights, weights + activations quantized, per channel) at widths 2..8:
``loop_rejit`` evaluates each width with its own jitted static-bits program
(``PTQ.logits``, as model_vs_bits did before traced widths); ``vmapped_cold`` is
``logits_vs_bits`` (one traced-bits program, traced + compiled); ``vmapped_warm`` reruns it.

Usage: python benchmarks/sweep.py [--quick] [--model-only]   -> benchmarks/results/sweep.json
(``--model-only`` re-measures the model sweep and keeps the file's tensor numbers).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np

from jquant.models.linen import make_model
from jquant.nn.rules import QuantRule
from jquant.sweep import error_vs_bits, sharding
from jquant.sweep.error_vs_bits import QuantSpec
from jquant.sweep.model_vs_bits import PTQ, QuantizedLogits, _batches, uniform_rules

WIDTHS = np.arange(2, 17)
MODEL_WIDTHS = np.arange(2, 9)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_sweep(quick: bool) -> dict:
    """Vmapped model sweep over 7 widths against a loop that re-jits per width."""
    n, repeats = (256, 2) if quick else (1000, 3)
    model = make_model("cnn", (40, 1), 10)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 40, 1)).astype(np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    rules = (QuantRule(".*"),)
    ptq = PTQ.calibrated(model, variables, x, rules, batch_size=256)
    rules_at = functools.partial(uniform_rules, rules, "weights+acts", "per_channel")

    def loop_rejit():
        return np.stack([ptq.logits(rules_at(int(b)), x) for b in MODEL_WIDTHS])

    fn = QuantizedLogits(ptq.model, ptq.example, rules_at)
    args = (ptq.variables, np.stack(_batches(x, ptq.batch_size)[0]))

    def vmapped_cold():
        sharding._compiled.cache_clear()  # benchmark only: force trace + compile
        return sharding.map_over_bits(fn, MODEL_WIDTHS, args)

    swept = vmapped_cold().reshape(len(MODEL_WIDTHS), -1, 10)[:, :n]
    np.testing.assert_allclose(swept, loop_rejit(), rtol=1e-4, atol=1e-4)  # equal work
    seconds = {
        "loop_rejit": _median_time(loop_rejit, repeats),
        "vmapped_cold": _median_time(vmapped_cold, repeats),
        "vmapped_warm": _median_time(
            lambda: sharding.map_over_bits(fn, MODEL_WIDTHS, args), repeats
        ),
    }
    peaks = {
        "one_width": sharding.peak_bytes(fn, [8], args),
        "7_widths_chunk1": sharding.peak_bytes(fn, MODEL_WIDTHS, args, chunk_size=1),
        "7_widths_unchunked": sharding.peak_bytes(fn, MODEL_WIDTHS, args),
    }
    print(f"\nmodel sweep: cnn, {n} examples, widths 2..8, {repeats} runs")
    print(f"{'variant':<16}{'median s':>10}{'vs loop_rejit':>15}")
    for k, v in seconds.items():
        print(f"{k:<16}{v:>10.4f}{seconds['loop_rejit'] / v:>14.1f}x")
    for k, v in peaks.items():
        print(f"{k:<22}{v / 2**20:>10.2f} MiB{v / peaks['one_width']:>8.2f}x")
    return {
        "model": "cnn",
        "examples": n,
        "widths": MODEL_WIDTHS.tolist(),
        "repeats": repeats,
        "seconds": seconds,
        "speedup_cold": seconds["loop_rejit"] / seconds["vmapped_cold"],
        "peak_bytes": peaks,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller tensor, fewer repeats")
    ap.add_argument("--model-only", action="store_true", help="only the model sweep")
    args = ap.parse_args()
    path = pathlib.Path(__file__).parent / "results" / "sweep.json"
    if args.model_only:
        out = json.loads(path.read_text()) if path.exists() else {}
        out["model_sweep"] = model_sweep(args.quick)
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"\nwrote {path}")
        return
    n = 256 if args.quick else 1024
    repeats = 3 if args.quick else 5
    x = jax.random.normal(jax.random.key(0), (n, n))
    spec = QuantSpec()

    def loop_rejit():
        return [jax.jit(lambda x, b=int(b): spec(b, x))(x) for b in WIDTHS]

    compiled_loop = [jax.jit(lambda x, b=int(b): spec(b, x)) for b in WIDTHS]
    jax.block_until_ready([f(x) for f in compiled_loop])

    def vmapped_cold():
        sharding._compiled.cache_clear()  # benchmark only: force trace + compile
        return sharding.map_over_bits(spec, WIDTHS, (x,))

    # Same numbers both ways (the benchmark compares equal work).
    ref = vmapped_cold()
    for i, d in enumerate(loop_rejit()):
        np.testing.assert_allclose(ref["mse"][i], d["mse"], rtol=1e-6)

    results = {
        "loop_rejit": _median_time(loop_rejit, repeats),
        "vmapped_cold": _median_time(vmapped_cold, repeats),
        "loop_warm": _median_time(lambda: [f(x) for f in compiled_loop], repeats),
        "vmapped_warm": _median_time(lambda: sharding.map_over_bits(spec, WIDTHS, (x,)), repeats),
    }
    peaks = {
        "one_width": sharding.peak_bytes(spec, [8], (x,)),
        "15_widths_chunk1": sharding.peak_bytes(spec, WIDTHS, (x,), chunk_size=1),
        "15_widths_chunk4": sharding.peak_bytes(spec, WIDTHS, (x,), chunk_size=4),
        "15_widths_unchunked": sharding.peak_bytes(spec, WIDTHS, (x,)),
    }
    rng = np.random.default_rng(0)
    data = {"uniform": rng.uniform(-1, 1, 200_000), "normal": rng.normal(size=200_000)}
    data = {k: v.astype(np.float32) for k, v in data.items()}
    table = error_vs_bits(data, bits=range(4, 13))
    slopes = {
        k: float(np.polyfit(range(4, 13), table.where(tensor=k).column("sqnr_db"), 1)[0])
        for k in data
    }

    print(f"tensor {n}x{n} float32, widths 2..16, {repeats} runs, device {jax.devices()[0]}")
    print(f"{'variant':<16}{'median s':>10}{'vs loop_rejit':>15}")
    for k, v in results.items():
        print(f"{k:<16}{v:>10.4f}{results['loop_rejit'] / v:>14.1f}x")
    print(f"\n{'program':<22}{'peak MiB':>10}{'vs one width':>14}")
    for k, v in peaks.items():
        print(f"{k:<22}{v / 2**20:>10.2f}{v / peaks['one_width']:>13.2f}x")
    print("\nSQNR slope over 4..12 bits (dB/bit):", {k: round(v, 3) for k, v in slopes.items()})
    print(table.where(bits=8).format())

    out = {
        "tensor_shape": [n, n],
        "widths": WIDTHS.tolist(),
        "repeats": repeats,
        "device": str(jax.devices()[0]),
        "seconds": results,
        "speedup_cold": results["loop_rejit"] / results["vmapped_cold"],
        "speedup_warm": results["loop_warm"] / results["vmapped_warm"],
        "peak_bytes": peaks,
        "peak_chunk1_vs_one_width": peaks["15_widths_chunk1"] / peaks["one_width"],
        "sqnr_slope_db_per_bit": slopes,
        "sqnr_table": table.to_dicts(),
        "model_sweep": model_sweep(args.quick),
    }
    os.makedirs(path.parent, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
