"""Calibration throughput, and ``mse`` over 15 bit widths: one vmapped call vs a re-jit loop.

1. Streams: each observer folds ``--batches`` batches of ``--batch`` float32 samples
   (``update`` jitted, state on device), then computes its range; samples/s.
2. One-shot estimators on one array of ``--batches * --batch`` samples; samples/s.
3. ``mse`` at bits 2..16 on ``--sweep`` samples: one ``jax.vmap`` over ``IntFormat(bits=...)``
   (one compilation) vs a Python loop over static ``IntFormat(b)`` that compiles per width;
   both timed cold (compilation caches cleared first) and warm (compiled).

Medians of ``--reps`` runs after a warm-up. Usage::

    python benchmarks/calibration.py [--quick]

Writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp

import jquant as jq
from jquant import calibration as cal


def _median_time(fn, reps: int, warmup: bool = True) -> float:
    if warmup:
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _streams(batches: list[jax.Array], reps: int) -> dict[str, float]:
    n = sum(b.size for b in batches)
    observers = {
        "running_minmax": (cal.running_minmax(), False),
        "ema_minmax": (cal.ema_minmax(), False),
        "histogram/percentile": (cal.histogram(method="percentile"), True),
        "histogram/mse": (cal.histogram(method="mse"), True),
        "histogram/kl": (cal.histogram(method="kl"), True),
    }
    out = {}
    for name, (obs, symmetric) in observers.items():

        def run(obs=obs, symmetric=symmetric):
            state = obs.init(batches[0])
            for b in batches:
                state = obs.update(b, state)
            return obs.result(state, jq.int8, symmetric=symmetric).scale

        out[name] = n / _median_time(run, reps)
    return out


def _one_shot(x: jax.Array, reps: int) -> dict[str, float]:
    estimators = {
        "minmax": lambda: cal.minmax(x),
        "absmax": lambda: cal.absmax(x),
        "percentile": lambda: cal.percentile(x, 99.99),
        "mse": lambda: cal.mse(x, jq.int8, symmetric=True),
        "kl": lambda: cal.kl(x, jq.int8),
        "aciq": lambda: cal.aciq(x, jq.int8),
    }
    return {name: x.size / _median_time(fn, reps) for name, fn in estimators.items()}


def _sweep(x: jax.Array, reps: int) -> dict[str, float]:
    bits = list(range(2, 17))

    def vmapped():
        widths = jq.IntFormat(bits=jnp.asarray(bits), narrow=True)
        return jax.jit(jax.vmap(lambda f: cal.mse(x, f, symmetric=True)))(widths)

    def loop():
        return [
            jax.jit(lambda x, b=b: cal.mse(x, jq.IntFormat(b, narrow=True), symmetric=True))(x)
            for b in bits
        ]

    def cold(fn):
        def run():
            jax.clear_caches()
            return fn()

        return _median_time(run, reps, warmup=False)

    cold_vmap, cold_loop = cold(vmapped), cold(loop)
    compiled_vmap = jax.jit(jax.vmap(lambda f: cal.mse(x, f, symmetric=True)))
    widths = jq.IntFormat(bits=jnp.asarray(bits), narrow=True)
    static = [
        jax.jit(lambda x, b=b: cal.mse(x, jq.IntFormat(b, narrow=True), symmetric=True))
        for b in bits
    ]
    warm_vmap = _median_time(lambda: compiled_vmap(widths), reps)
    warm_loop = _median_time(lambda: [f(x) for f in static], reps)
    # sanity: both paths agree on the ranges
    lo_v, _ = compiled_vmap(widths)
    lo_l = jnp.stack([f(x)[0] for f in static])
    agree = bool(jnp.allclose(lo_v, lo_l, rtol=1e-5))
    return {
        "cold_vmap_s": cold_vmap,
        "cold_loop_s": cold_loop,
        "cold_ratio": cold_loop / cold_vmap,
        "warm_vmap_s": warm_vmap,
        "warm_loop_s": warm_loop,
        "warm_ratio": warm_loop / warm_vmap,
        "ranges_agree": agree,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 repetitions")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--sweep", type=int, default=None, help="samples for the bit sweep")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--out", default="benchmarks/results/calibration.json")
    args = parser.parse_args()
    batch = args.batch or (1 << 14 if args.quick else 1 << 16)
    n_batches = args.batches or (8 if args.quick else 32)
    sweep_n = args.sweep or (1 << 14 if args.quick else 1 << 16)
    reps = args.reps or (3 if args.quick else 5)

    keys = jax.random.split(jax.random.key(0), n_batches)
    batches = [jax.random.normal(k, (batch,)) for k in keys]
    x = jnp.concatenate(batches)

    results = {
        "config": {
            "batch": batch,
            "batches": n_batches,
            "sweep_samples": sweep_n,
            "reps": reps,
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0]),
            "cpu_count": os.cpu_count(),
            "load_average": list(os.getloadavg()),
            "jax": jax.__version__,
            "python": platform.python_version(),
        },
        "stream_samples_per_s": _streams(batches, reps),
        "one_shot_samples_per_s": _one_shot(x, reps),
        "mse_15_widths": _sweep(x[:sweep_n], reps),
    }

    print(f"{'stream (init+updates+result)':34s} {'samples/s':>12s}")
    for name, v in results["stream_samples_per_s"].items():
        print(f"  {name:32s} {v:12.3e}")
    print(f"{'one-shot estimator':34s} {'samples/s':>12s}")
    for name, v in results["one_shot_samples_per_s"].items():
        print(f"  {name:32s} {v:12.3e}")
    s = results["mse_15_widths"]
    print("mse at bits 2..16          vmapped      loop     ratio")
    print(
        f"  cold (compile + run)  {s['cold_vmap_s']:8.2f} s {s['cold_loop_s']:8.2f} s "
        f"{s['cold_ratio']:7.1f}x"
    )
    print(
        f"  warm (run only)       {s['warm_vmap_s']:8.3f} s {s['warm_loop_s']:8.3f} s "
        f"{s['warm_ratio']:7.2f}x"
    )
    print(f"  ranges agree: {s['ranges_agree']}")

    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
