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

Usage: python benchmarks/sweep.py [--quick]   -> table + benchmarks/results/sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import time

import jax
import numpy as np

from jquant.sweep import error_vs_bits, sharding
from jquant.sweep.error_vs_bits import QuantSpec

WIDTHS = np.arange(2, 17)


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller tensor, fewer repeats")
    args = ap.parse_args()
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
    }
    path = pathlib.Path(__file__).parent / "results" / "sweep.json"
    os.makedirs(path.parent, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
