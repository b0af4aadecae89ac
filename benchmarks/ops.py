"""Benchmark of jquant.ops: float vs ``simulate`` vs ``int`` conv and dense on this machine.

Cases: 3x3 conv (batch 32, 32x32, 64 -> 64 channels, SAME, NHWC), dense (batch 256,
1024 -> 1024) and the MNIST-1D CNN's 1-D conv (batch 128, 20 steps, 32 -> 32, width 5, NWC),
forward and forward+backward (gradients w.r.t. both operands). Quantization: activations affine
int8 per tensor (``--lhs symmetric`` for symmetric), weights symmetric int8 per output channel,
ranges computed from the tensors (dynamic). Forward only, two more variants:

- ``int_static``: ``int`` with the activation QParams computed ahead of time (calibrated, as
  deployed), so no min/max pass;
- ``lax_int8``: the bare ``lax`` int8 x int8 -> int32 product on ready-made codes: the floor
  that XLA sets for ``int`` on this machine (no quantize, no rescale).

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
from jquant.quant import quantize

CONV_DN = {"conv": ("NHWC", "HWIO", "NHWC"), "conv1d": ("NWC", "WIO", "NWC")}
DENSE_DN = (((1,), (0,)), ((), ()))
TARGETS = {
    ("conv", "fwd+bwd", "simulate"): 1.15,
    ("dense", "fwd+bwd", "simulate"): 1.15,
    ("conv", "fwd", "int"): 0.8,
}


def _product(op: str, mode: str | None, lhs_quant, rhs_quant, lhs_qparams=None):
    """``f(x, w)`` for one op; ``mode=None`` is the float lax op, ``mode="lax_int8"`` the bare
    int8 x int8 -> int32 lax op on codes (XLA's floor for ``int``)."""
    if op in CONV_DN:
        dn = CONV_DN[op]
        strides = (1,) * (len(dn[0]) - 2)
        if mode in (None, "lax_int8"):
            pet = None if mode is None else jnp.int32
            return lambda x, w: lax.conv_general_dilated(
                x, w, strides, "SAME", dimension_numbers=dn, preferred_element_type=pet
            )
        return functools.partial(
            ops.conv_general_dilated,
            window_strides=strides,
            padding="SAME",
            dimension_numbers=dn,
            lhs_quant=lhs_quant,
            rhs_quant=rhs_quant,
            lhs_qparams=lhs_qparams,
            mode=mode,
        )
    if mode in (None, "lax_int8"):
        pet = None if mode is None else jnp.int32
        return lambda x, w: lax.dot_general(x, w, DENSE_DN, preferred_element_type=pet)
    return functools.partial(
        ops.dot_general,
        dimension_numbers=DENSE_DN,
        lhs_quant=lhs_quant,
        rhs_quant=rhs_quant,
        lhs_qparams=lhs_qparams,
        mode=mode,
    )


def _compiled(f, passes: str):
    if passes == "fwd":
        return jax.jit(f)
    # forward + backward: a loss of the output, gradients w.r.t. both operands
    return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))


def _time_rounds(fns: dict, args: dict, rounds: int) -> dict[str, list[float]]:
    for name, fn in fns.items():  # compile and warm up
        for _ in range(2):
            jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
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
        # the MNIST-1D CNN's second layer
        "conv1d": (jax.random.normal(keys[3], (128, 20, 32)), (5, 32, 32)),
    }
    rows = []
    for op, (x, w_shape) in shapes.items():
        w = jax.random.normal(keys[2], w_shape) / np.sqrt(np.prod(w_shape[:-1]))
        static = ops.dynamic_qparams(x, lhs_quant)  # as calibrated once, ahead of time
        codes = (
            quantize(x, static, lhs_quant.fmt).astype(jnp.int8),
            quantize(w, ops.dynamic_qparams(w, rhs_quant), rhs_quant.fmt).astype(jnp.int8),
        )
        for passes in ("fwd", "fwd+bwd"):
            fns = {
                str(mode or "float"): _compiled(_product(op, mode, lhs_quant, rhs_quant), passes)
                for mode in (None, "simulate", "int")
            }
            inputs = {name: (x, w) for name in fns}
            if passes == "fwd":
                fns["int_static"] = jax.jit(_product(op, "int", lhs_quant, rhs_quant, static))
                fns["lax_int8"] = jax.jit(_product(op, "lax_int8", None, None))
                inputs |= {"int_static": (x, w), "lax_int8": codes}
            times = _time_rounds(fns, inputs, rounds)
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
