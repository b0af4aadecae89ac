"""Calibration throughput, and ``mse`` over 15 bit widths: one vmapped call vs a re-jit loop.

1. Streams: each observer folds ``--batches`` batches of ``--batch`` float32 samples
   (``update`` jitted, state on device), then computes its range; samples/s, and the time
   relative to ``running_minmax``.
2. One-shot estimators on one array of ``--batches * --batch`` samples; samples/s, and the
   time relative to ``minmax``.
3. ``mse`` at bits 2..16 on ``--sweep`` samples: one ``jax.vmap`` over ``IntFormat(bits=...)``
   (one compilation) vs a Python loop over static ``IntFormat(b)`` that compiles per width;
   a cold pair (JAX's caches cleared before every call: trace + compile + run) and a warm
   pair (compiled ahead); the ratio is ``t_loop / t_vmapped``.

Timing: ``jquant.bench.timing.measure`` (interleaved, shuffled rounds; per variant min and
median; the median paired ratio with a bootstrap 95% CI). Usage::

    python benchmarks/calibration.py [--quick]

Writes benchmarks/results/calibration.json.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp

import jquant as jq
from jquant import bench
from jquant import calibration as cal


def _throughput(fns: dict, baseline: str, samples: int, rounds: int) -> dict:
    """Timings of ``fns`` against ``baseline`` and each one's samples/s (median time)."""
    t = bench.measure(fns, baseline=baseline, rounds=rounds)
    print(t.format())
    return dict(
        timing=t.to_json(),
        samples_per_s={name: samples / t.median(name) for name in fns},
    )


def _streams(batches: list[jax.Array], rounds: int) -> dict:
    n = sum(b.size for b in batches)
    observers = {
        "running_minmax": (cal.running_minmax(), False),
        "ema_minmax": (cal.ema_minmax(), False),
        "histogram/percentile": (cal.histogram(method="percentile"), True),
        "histogram/mse": (cal.histogram(method="mse"), True),
        "histogram/kl": (cal.histogram(method="kl"), True),
    }

    def stream(obs, symmetric):
        def run():
            state = obs.init(batches[0])
            for b in batches:
                state = obs.update(b, state)
            return obs.result(state, jq.int8, symmetric=symmetric).scale

        return run

    fns = {name: stream(*o) for name, o in observers.items()}
    return _throughput(fns, "running_minmax", n, rounds)


def _one_shot(x: jax.Array, rounds: int) -> dict:
    estimators = {
        "minmax": lambda: cal.minmax(x),
        "absmax": lambda: cal.absmax(x),
        "percentile": lambda: cal.percentile(x, 99.99),
        "mse": lambda: cal.mse(x, jq.int8, symmetric=True),
        "kl": lambda: cal.kl(x, jq.int8),
        "aciq": lambda: cal.aciq(x, jq.int8),
    }
    return _throughput(estimators, "minmax", x.size, rounds)


def _sweep(x: jax.Array, rounds: tuple[int, int]) -> dict:
    bits = list(range(2, 17))
    widths = jq.IntFormat(bits=jnp.asarray(bits), narrow=True)

    def mse_of(x, f):
        return cal.mse(x, f, symmetric=True)

    def vmapped():  # a fresh jit: compiles once for all widths
        return jax.jit(jax.vmap(lambda f: mse_of(x, f)))(widths)

    def loop():  # a fresh jit per width: compiles 15 times
        return [jax.jit(lambda x, b=b: mse_of(x, jq.IntFormat(b, narrow=True)))(x) for b in bits]

    compiled_vmap = jax.jit(jax.vmap(lambda f: mse_of(x, f)))
    static = [jax.jit(lambda x, b=b: mse_of(x, jq.IntFormat(b, narrow=True))) for b in bits]
    # sanity: both paths agree on the ranges
    lo_v, _ = compiled_vmap(widths)
    lo_l = jnp.stack([f(x)[0] for f in static])
    agree = bool(jnp.allclose(lo_v, lo_l, rtol=1e-5))
    out = dict(ranges_agree=agree)
    pairs = (
        ("cold", {"vmapped": bench.cold(vmapped), "loop": bench.cold(loop)}, rounds[0], 0),
        (
            "warm",
            {"vmapped": lambda: compiled_vmap(widths), "loop": lambda: [f(x) for f in static]},
            rounds[1],
            2,
        ),
    )
    for label, fns, n, warmup in pairs:
        t = bench.measure(fns, baseline="vmapped", rounds=n, warmup=warmup)
        print(t.format(f"mse at bits 2..16, {label}:"))
        out[label] = dict(
            timing=t.to_json(), speedup=t.pair_json("loop", "vmapped", lower_is_better=False)
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer rounds")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--batches", type=int, default=None)
    parser.add_argument("--sweep", type=int, default=None, help="samples for the bit sweep")
    parser.add_argument("--rounds", type=int, default=None, help="warm rounds")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "calibration.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    batch = args.batch or (1 << 14 if args.quick else 1 << 16)
    n_batches = args.batches or (8 if args.quick else 32)
    sweep_n = args.sweep or (1 << 14 if args.quick else 1 << 16)
    rounds = args.rounds or (5 if args.quick else 11)
    cold_rounds = 3 if args.quick else 5

    keys = jax.random.split(jax.random.key(0), n_batches)
    batches = [jax.random.normal(k, (batch,)) for k in keys]
    x = jnp.concatenate(batches)

    print("streams (init + updates + result)")
    streams = _streams(batches, rounds)
    print("one-shot estimators")
    one_shot = _one_shot(x, rounds)
    sweep = _sweep(x[:sweep_n], (cold_rounds, rounds))
    print(f"ranges agree: {sweep['ranges_agree']}")
    config = dict(
        batch=batch,
        batches=n_batches,
        sweep_samples=sweep_n,
        rounds=rounds,
        cold_rounds=cold_rounds,
    )
    out = bench.write_results(
        args.out,
        dict(
            meta=bench.results_meta(quick=args.quick, load_before=load_before),
            config=config,
            streams=streams,
            one_shot=one_shot,
            mse_15_widths=sweep,
        ),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
