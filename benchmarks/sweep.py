"""Benchmark: one traced-bits program for a sweep over widths vs a loop with one program per width.

Tensor sweep: the error metrics (jquant.sweep.QuantSpec: symmetric min-max, per tensor) of one
N(0, 1) tensor at widths 2..16. Model sweep: the PTQ logits of the zoo CNN (MNIST-1D shapes,
random weights, weights + activations quantized, per channel) at widths 2..8. Each is timed
as a cold pair and a warm pair with ``jquant.bench.timing`` (interleaved, shuffled rounds;
the ratio is ``t_loop / t_vmapped`` per round, its median with a bootstrap 95% CI):

- cold (trace + compile + run; JAX's caches cleared before every call): ``vmapped``, one
  ``map_over_bits`` program over all widths (a fresh function object, so its program cache
  misses too), against ``loop``, a fresh ``jax.jit`` per width with the width baked in (as a
  script looping over ``IntFormat(b)`` does; for the model ``PTQ.logits`` per width);
- warm (compiled ahead, run only): the same ``map_over_bits`` program against the per-width
  programs compiled ahead (for the model: each width's eval model jitted, over the batches).

Peak memory is XLA's ``memory_analysis()`` of each compiled program (arguments + outputs +
temporaries): one width, all widths with ``chunk_size`` 1 (and 4), and all vmapped at once.
It also prints the SQNR-per-bit slope on U(-1, 1) and N(0, 1) data (4..12 bits).

Usage: python benchmarks/sweep.py [--quick] [--model-only]   -> benchmarks/results/sweep.json
(``--model-only`` re-measures the model sweep and keeps the file's tensor numbers).
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib

import jax
import numpy as np

from jquant import bench
from jquant.models.linen import make_model
from jquant.nn.rules import QuantRule
from jquant.sweep import error_vs_bits, sharding
from jquant.sweep.error_vs_bits import QuantSpec
from jquant.sweep.model_sweep import PTQ, QuantizedLogits, uniform_rules

WIDTHS = np.arange(2, 17)
MODEL_WIDTHS = np.arange(2, 9)


def _speedups(timings: bench.Timings) -> dict:
    """Ratio ``t_loop / t_vmapped`` (the speed-up of one program) with its 95% CI."""
    return timings.pair_json("loop", "vmapped", lower_is_better=False)


def _pairs(cold: dict, warm: dict, rounds: tuple[int, int]) -> dict:
    """Times the cold pair and the warm pair; their JSON and speed-ups."""
    out = {}
    for label, fns, n, warmup in (("cold", cold, rounds[0], 0), ("warm", warm, rounds[1], 2)):
        t = bench.measure(fns, baseline="vmapped", rounds=n, warmup=warmup)
        print(t.format(f"{label}:"))
        out[label] = dict(timing=t.to_json(), speedup=_speedups(t))
    return out


def model_sweep(quick: bool) -> dict:
    """Vmapped model sweep over 7 widths against a loop with one program per width."""
    n, rounds = (256, (3, 5)) if quick else (1024, (5, 15))
    batch = 256
    model = make_model("cnn", (40, 1), 10)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 40, 1)).astype(np.float32)
    variables = model.init(jax.random.key(0), x[:1])
    rules = (QuantRule(".*"),)
    ptq = PTQ.calibrated(model, variables, x, rules, batch_size=batch)
    rules_at = functools.partial(uniform_rules, rules, "weights+acts", "per_channel")
    batches = x.reshape(n // batch, batch, 40, 1)  # n is a multiple of the batch: no padding
    args = (ptq.variables, batches)

    def loop_rejit():
        return np.stack([ptq.logits(rules_at(int(b)), x) for b in MODEL_WIDTHS])

    def vmapped_fresh():  # a new QuantizedLogits is a new program (compared by identity)
        fn = QuantizedLogits(ptq.model, ptq.example, rules_at)
        return sharding.map_over_bits(fn, MODEL_WIDTHS, args)

    fn = QuantizedLogits(ptq.model, ptq.example, rules_at)
    per_width = []
    for b in MODEL_WIDTHS:
        qm, v = ptq.quantized(rules_at(int(b)))
        per_width.append((jax.jit(qm.apply), v))

    def loop_warm():
        return [[f(v, xb) for xb in batches] for f, v in per_width]

    swept = vmapped_fresh().reshape(len(MODEL_WIDTHS), -1, 10)
    np.testing.assert_allclose(swept, loop_rejit(), rtol=1e-4, atol=1e-4)  # equal work
    warm = np.stack([np.concatenate(w) for w in loop_warm()])
    np.testing.assert_allclose(swept, warm, rtol=1e-4, atol=1e-4)
    print(f"\nmodel sweep: cnn, {n} examples, widths 2..8, rounds cold/warm {rounds}")
    pairs = _pairs(
        {"vmapped": bench.cold(vmapped_fresh), "loop": bench.cold(loop_rejit)},
        {"vmapped": lambda: sharding.map_over_bits(fn, MODEL_WIDTHS, args), "loop": loop_warm},
        rounds,
    )
    peaks = {
        "one_width": sharding.peak_bytes(fn, [8], args),
        "7_widths_chunk1": sharding.peak_bytes(fn, MODEL_WIDTHS, args, chunk_size=1),
        "7_widths_unchunked": sharding.peak_bytes(fn, MODEL_WIDTHS, args),
    }
    for k, v in peaks.items():
        print(f"{k:<22}{v / 2**20:>10.2f} MiB{v / peaks['one_width']:>8.2f}x")
    return {
        "model": "cnn",
        "examples": n,
        "widths": MODEL_WIDTHS.tolist(),
        **pairs,
        "peak_bytes": peaks,
        "peak_chunk1_vs_one_width": peaks["7_widths_chunk1"] / peaks["one_width"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller tensor, fewer rounds")
    ap.add_argument("--model-only", action="store_true", help="only the model sweep")
    args = ap.parse_args()
    load_before = bench.loadavg()
    path = pathlib.Path(__file__).parent / "results" / "sweep.json"
    if args.model_only:
        out = json.loads(path.read_text()) if path.exists() else {}
        meta = bench.results_meta(quick=args.quick, load_before=load_before)
        out["model_sweep"] = {**model_sweep(args.quick), "meta": meta}
        out.setdefault("meta", meta)
        print(f"\nwrote {bench.write_results(path, out)}")
        return
    n = 256 if args.quick else 1024
    rounds = (3, 5) if args.quick else (5, 15)
    x = jax.random.normal(jax.random.key(0), (n, n))
    spec = QuantSpec()

    def loop_rejit():
        return [jax.jit(lambda x, b=int(b): spec(b, x))(x) for b in WIDTHS]

    compiled_loop = [jax.jit(lambda x, b=int(b): spec(b, x)) for b in WIDTHS]

    def vmapped_fresh():  # a new function object: map_over_bits's program cache misses
        return sharding.map_over_bits(functools.partial(spec), WIDTHS, (x,))

    # Same numbers both ways (the benchmark compares equal work).
    ref = vmapped_fresh()
    for i, d in enumerate(loop_rejit()):
        np.testing.assert_allclose(ref["mse"][i], d["mse"], rtol=1e-6)

    print(f"tensor {n}x{n} float32, widths 2..16, rounds cold/warm {rounds}")
    pairs = _pairs(
        {"vmapped": bench.cold(vmapped_fresh), "loop": bench.cold(loop_rejit)},
        {
            "vmapped": lambda: sharding.map_over_bits(spec, WIDTHS, (x,)),
            "loop": lambda: [f(x) for f in compiled_loop],
        },
        rounds,
    )
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
    print(f"\n{'program':<22}{'peak MiB':>10}{'vs one width':>14}")
    for k, v in peaks.items():
        print(f"{k:<22}{v / 2**20:>10.2f}{v / peaks['one_width']:>13.2f}x")
    print("\nSQNR slope over 4..12 bits (dB/bit):", {k: round(v, 3) for k, v in slopes.items()})
    print(table.where(bits=8).format())

    out = {
        "tensor_shape": [n, n],
        "widths": WIDTHS.tolist(),
        **pairs,
        "peak_bytes": peaks,
        "peak_chunk1_vs_one_width": peaks["15_widths_chunk1"] / peaks["one_width"],
        "sqnr_slope_db_per_bit": slopes,
        "sqnr_table": table.to_dicts(),
        "model_sweep": model_sweep(args.quick),
    }
    out = {"meta": bench.results_meta(quick=args.quick, load_before=load_before), **out}
    print(f"\nwrote {bench.write_results(path, out)}")


if __name__ == "__main__":
    main()
