"""Benchmark of jquant.ops: float vs ``simulate`` vs ``int`` conv and dense on this machine.

Cases: 3x3 conv (batch 32, 32x32, 64 -> 64 channels, SAME, NHWC) and dense (batch 256,
1024 -> 1024), forward and forward+backward (gradients w.r.t. both operands). Quantization:
activations affine int8 per tensor (``--lhs symmetric`` for symmetric), weights symmetric int8
per output channel, ranges computed from the tensors (dynamic).

Each variant is jitted and warmed up, then the variants of one case run in interleaved rounds
(so machine load hits all alike); the table reports medians and ratios to float, and the JSON
goes to ``benchmarks/results/ops.json``.

    python benchmarks/ops.py            # 15 rounds
    python benchmarks/ops.py --quick    # 5 rounds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import ops

NHWC = ("NHWC", "HWIO", "NHWC")
DENSE_DN = (((1,), (0,)), ((), ()))
TARGETS = {
    ("conv", "fwd+bwd", "simulate"): 1.15,
    ("dense", "fwd+bwd", "simulate"): 1.15,
    ("conv", "fwd", "int"): 0.8,
}


def _product(op: str, mode: str | None, lhs_quant, rhs_quant):
    """``f(x, w)`` for one op; ``mode=None`` is the float lax op."""
    if op == "conv":
        if mode is None:
            return lambda x, w: lax.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=NHWC
            )
        return functools.partial(
            ops.conv_general_dilated,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=NHWC,
            lhs_quant=lhs_quant,
            rhs_quant=rhs_quant,
            mode=mode,
        )
    if mode is None:
        return lambda x, w: lax.dot_general(x, w, DENSE_DN)
    return functools.partial(
        ops.dot_general,
        dimension_numbers=DENSE_DN,
        lhs_quant=lhs_quant,
        rhs_quant=rhs_quant,
        mode=mode,
    )


def _compiled(f, passes: str):
    if passes == "fwd":
        return jax.jit(f)
    # forward + backward: a loss of the output, gradients w.r.t. both operands
    return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))


def _time_rounds(fns: dict, args, rounds: int) -> dict[str, list[float]]:
    for fn in fns.values():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(fn(*args))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--lhs", choices=("affine", "symmetric"), default="affine")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "ops.json")
    )
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 15)
    lhs_quant = ops.QuantConfig(symmetric=args.lhs == "symmetric")
    rhs_quant = ops.QuantConfig(axis=-1)

    keys = jax.random.split(jax.random.key(0), 4)
    shapes = {
        "conv": (jax.random.normal(keys[0], (32, 32, 32, 64)), (3, 3, 64, 64)),
        "dense": (jax.random.normal(keys[1], (256, 1024)), (1024, 1024)),
    }
    rows = []
    for op, (x, w_shape) in shapes.items():
        w = jax.random.normal(keys[2], w_shape) / np.sqrt(np.prod(w_shape[:-1]))
        for passes in ("fwd", "fwd+bwd"):
            fns = {
                str(mode or "float"): _compiled(_product(op, mode, lhs_quant, rhs_quant), passes)
                for mode in (None, "simulate", "int")
            }
            times = _time_rounds(fns, (x, w), rounds)
            base = float(np.median(times["float"]))
            for name, ts in times.items():
                med = float(np.median(ts))
                target = TARGETS.get((op, passes, name))
                rows.append(
                    dict(
                        op=op,
                        passes=passes,
                        variant=name,
                        median_ms=med * 1e3,
                        min_ms=float(np.min(ts)) * 1e3,
                        ratio_to_float=med / base,
                        target=target,
                        target_met=None if target is None else bool(med / base <= target),
                    )
                )

    print(f"{'op':6} {'pass':8} {'variant':9} {'median ms':>10} {'x float':>8}  target")
    for r in rows:
        target = (
            ""
            if r["target"] is None
            else f"<= {r['target']}: " + ("met" if r["target_met"] else "NOT met")
        )
        print(
            f"{r['op']:6} {r['passes']:8} {r['variant']:9} {r['median_ms']:10.2f} "
            f"{r['ratio_to_float']:8.3f}  {target}"
        )
    meta = dict(
        rounds=rounds,
        lhs=args.lhs,
        rhs="symmetric per output channel",
        jax=jax.__version__,
        backend=jax.default_backend(),
        machine=platform.processor() or platform.machine(),
        cpus=os.cpu_count(),
        load_average=os.getloadavg(),
    )
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
