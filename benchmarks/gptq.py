"""Benchmark of jquant.ptq.gptq against a straightforward NumPy GPTQ, in the same run.

A 1024x1024 layer (Flax kernel ``(in, out)``) with 4096 calibration rows of correlated inputs,
int4 per output channel, block 128, damp 0.01. Both variants compute the Hessian
``2 X^T X``, the Cholesky factor of the damped inverse and Algorithm 1 of Frantar et al. 2022
with lazy batch updates (the NumPy one line by line as the paper writes it, float32 like the
paper's code); ``jquant`` is the jitted :func:`jquant.ptq.gptq`, warmed up (its cold time,
trace + compile + first run, is reported beside it). Timed with ``jquant.bench.timing.measure``
(interleaved, shuffled rounds; median paired ratio with a bootstrap 95% CI); target:
jquant / numpy <= 1/3 (at least 3x faster), met only when the whole CI lies below it.

Each timed call starts from an idle machine (``settle``: 0.25 s untimed before it): NumPy's
OpenBLAS worker threads keep spinning for a while after a call returns, and a jquant call
right after one shares the 2 cores with them. The same variants back to back
(``settle=0``) are measured too, in their own rounds, and reported as
``timing_back_to_back`` with their own verdict. Also reports the agreement of the two
quantized kernels and the layer error against RTN's.
JSON goes to ``benchmarks/results/gptq.json``.

    python benchmarks/gptq.py            # 7 rounds
    python benchmarks/gptq.py --quick    # 3 rounds
"""

from __future__ import annotations

import argparse
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from jquant import bench, ptq
from jquant.formats import int4

IN = OUT = 1024
ROWS = 4096
BLOCK = 128
DAMP = 0.01
TARGET = 1 / 3
SETTLE = 0.25  # idle seconds before each timed call (bench.measure's settle)


def numpy_gptq(kernel: np.ndarray, x: np.ndarray, qmin: int, qmax: int) -> np.ndarray:
    """Algorithm 1 (per-channel min-max ranges, lazy batches of BLOCK), in NumPy float32."""
    w = kernel.T.copy()  # (out, in)
    h = 2.0 * x.T @ x
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    lo, hi = np.minimum(w.min(1), 0), np.maximum(w.max(1), 0)
    scale = (hi - lo) / (qmax - qmin)
    scale[scale == 0] = 1.0
    zero = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    n = h.shape[0]
    h += DAMP * np.mean(np.diag(h)) * np.eye(n, dtype=h.dtype)
    u = np.linalg.cholesky(np.linalg.inv(h)).T
    q = np.zeros_like(w)
    for i1 in range(0, n, BLOCK):
        i2 = min(i1 + BLOCK, n)
        w1, u1 = w[:, i1:i2].copy(), u[i1:i2, i1:i2]
        err1 = np.zeros_like(w1)
        for j in range(i2 - i1):
            col = w1[:, j]
            qc = scale * (np.clip(np.round(col / scale) + zero, qmin, qmax) - zero)
            q[:, i1 + j] = qc
            err1[:, j] = (col - qc) / u1[j, j]
            w1[:, j:] -= np.outer(err1[:, j], u1[j, j:])
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q.T


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds instead of 7")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "gptq.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    rounds = args.rounds or (3 if args.quick else 7)
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(IN, OUT)).astype(np.float32) / np.sqrt(IN)
    x = rng.normal(size=(ROWS, 64)) @ rng.normal(size=(64, IN)) + 0.3 * rng.normal(size=(ROWS, IN))
    x = x.astype(np.float32)
    kernel_j, x_j = jnp.asarray(kernel), jnp.asarray(x)

    def run_jquant():
        return ptq.gptq(kernel_j, x_j, int4, block=BLOCK, damp=DAMP).kernel

    start = time.perf_counter()
    jax.block_until_ready(bench.cold(run_jquant)())
    cold_s = time.perf_counter() - start
    fns = {
        "numpy": lambda: numpy_gptq(kernel, x, int(int4.qmin), int(int4.qmax)),
        "jquant": run_jquant,
    }
    timings = bench.measure(fns, baseline="numpy", rounds=rounds, warmup=1, settle=SETTLE)
    timing = timings.to_json({"jquant": TARGET})
    back = bench.measure(fns, baseline="numpy", rounds=rounds, warmup=0, seed=1)
    back_to_back = back.to_json({"jquant": TARGET})

    ours, ref = np.asarray(run_jquant()), fns["numpy"]()
    rtn = np.asarray(ptq.rtn(kernel_j, int4).kernel)

    def err(k):
        return float(np.sum((x @ kernel - x @ k) ** 2))

    quality = dict(
        same_grid_point_fraction=float(np.mean(np.abs(ours - ref) < 1e-5)),
        error_gptq_over_rtn=err(ours) / err(rtn),
        error_numpy_over_rtn=err(ref) / err(rtn),
    )
    print(timings.format(f"gptq {IN}x{OUT}, {ROWS} rows, int4 per channel, block {BLOCK}"))
    row = timing["variants"]["jquant"]
    print(f"  jquant / numpy: {row['ratio']['median']:.3f} CI {row['ratio']['ci95']}")
    print(f"  target <= {TARGET:.3f} (>= 3x faster): {row['verdict']}; cold {cold_s:.2f} s")
    row = back_to_back["variants"]["jquant"]
    ratio = row["ratio"]
    print(f"  back to back: {ratio['median']:.3f} CI {ratio['ci95']}: {row['verdict']}")
    print("  " + ", ".join(f"{k} {v:.4f}" for k, v in quality.items()))
    out = bench.write_results(
        args.out,
        dict(
            meta=bench.results_meta(quick=args.quick, load_before=load_before),
            shape=dict(inputs=IN, outputs=OUT, rows=ROWS, block=BLOCK, damp=DAMP, fmt="int4"),
            timing=timing,
            settle_seconds=SETTLE,
            timing_back_to_back=back_to_back,
            cold_seconds=cold_s,
            quality=quality,
        ),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
