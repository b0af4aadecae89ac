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

Baselines from other libraries, forward and forward+backward, when installed (``bench`` extra),
int8 x int8 with dynamic absmax / min-max ranges and a float backward pass (straight-through):

- ``aqt_int8``: AQT (``aqt.jax.v2``). Dense: ``config.dot_general_make(lhs_bits=8,
  rhs_bits=8, bwd_bits=None)`` with the lhs calibrated per tensor (``calib_shared_axes=
  "per_tensor"``), the rhs per output channel (AQT's default). Conv:
  ``aqt_conv_general.conv_general_dilated_make(spatial, 8, 8)``, which fixes the lhs scale per
  example and the rhs per output channel, and runs the conv in float on the integer values.
  AQT's int numerics are symmetric only, so its lhs is symmetric even with ``--lhs affine``.
- ``qwix_int8``: Qwix's op-level quantized-training ops ``dot_general_qt`` /
  ``conv_general_qt`` (``qwix._src.core``; the public ``qwix.dot_general`` takes ready QArrays
  and has no backward rule), lhs per tensor (``absmax``, or ``minmax`` for ``--lhs affine``),
  rhs per output channel.
- ``qwix_int8_static`` (forward, beside ``int_static``): the same with the lhs range fixed
  ahead of time, through Qwix's own hook for static scales (``lhs_collect_quant_stat``, which
  its ``QtProvider`` uses for ``act_static_scale=True``) returning the precomputed range.
  AQT 0.9.0 has a ``ConstantCalibration``, but ``dot_general_make`` and
  ``conv_general_dilated_make`` build their calibrators eagerly and refuse a second
  ``init_calibration``, so AQT runs dynamic only here.

The ``conv1d`` ratios depend on XLA:CPU's 1-D conv path: its int8 conv is fast only for two
or more spatial axes, so jquant's ``int`` lifts the 1-D conv to 2-D around the int8 product,
and ``lax_int8`` (not lifted) shows the generic path.

A gradient section runs each int8 conv on a small case and records, in the JSON under
``conv_gradients``, the largest gradient w.r.t. lhs and rhs (AQT's conv has no custom VJP, so
its gradient goes through ``round`` and the stop-gradient'ed scale: zero) and, for jquant, the
largest deviation from the float conv's gradient at the dequantized operands (STE).

Timing: ``jquant.bench.timing.measure``: each variant jitted and warmed up, then interleaved,
shuffled rounds; per variant min, median and the median paired ratio to float with its bootstrap
95% CI; a target is met only when the CI lies below it. JSON: ``benchmarks/results/ops.json``.

    python benchmarks/ops.py            # 15 rounds
    python benchmarks/ops.py --quick    # 5 rounds
"""

from __future__ import annotations

import argparse
import functools
import importlib.metadata
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import bench, ops
from jquant.quant import QuantConfig, dequantize, dynamic_qparams, quantize

try:
    from aqt.jax.v2 import aqt_conv_general
    from aqt.jax.v2 import config as aqt_config
except ImportError:  # the bench extra is optional
    aqt_conv_general = aqt_config = None
try:
    from qwix._src.core.conv_general_qt import ConvGeneralQtConfig, conv_general_qt
    from qwix._src.core.dot_general_qt import DotGeneralQtConfig, dot_general_qt
except ImportError:
    dot_general_qt = conv_general_qt = None

CONV_DN = {"conv": ("NHWC", "HWIO", "NHWC"), "conv1d": ("NWC", "WIO", "NWC")}
DENSE_DN = (((1,), (0,)), ((), ()))
_AQT_CONFIG = (
    "dense dot_general_make(8, 8, bwd_bits=None), lhs per tensor, rhs per output channel;"
    " conv conv_general_dilated_make(spatial, 8, 8), lhs per example, rhs per output channel,"
    " float conv on integer values; symmetric absmax"
)
_QWIX_CONFIG = (
    "dot_general_qt / conv_general_qt, int8, lhs per tensor (absmax or minmax), rhs"
    " absmax per output channel, float backward"
)
_AQT_STATIC = (
    "AQT 0.9.0 has ConstantCalibration, but dot_general_make / conv_general_dilated_make"
    " initialise their calibrators eagerly and assert against a second init_calibration"
)
_XLA_1D = (
    "conv1d ratios depend on XLA:CPU's 1-D conv path: its int8 conv is fast only with two or"
    " more spatial axes; jquant int lifts 1-D to 2-D, lax_int8 and the peers do not"
)
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
        geometry = dict(window_strides=(1,) * (len(dn[0]) - 2), padding="SAME")
        lax_op = functools.partial(lax.conv_general_dilated, **geometry, dimension_numbers=dn)
        ours = functools.partial(ops.conv_general_dilated, **geometry, dimension_numbers=dn)
    else:
        lax_op = functools.partial(lax.dot_general, dimension_numbers=DENSE_DN)
        ours = functools.partial(ops.dot_general, dimension_numbers=DENSE_DN)
    if mode in (None, "lax_int8"):
        return functools.partial(lax_op, preferred_element_type=None if mode is None else jnp.int32)
    return functools.partial(
        ours, lhs_quant=lhs_quant, rhs_quant=rhs_quant, lhs_qparams=lhs_qparams, mode=mode
    )


def _aqt_product(op: str):
    """AQT's int8 x int8 ``f(x, w)`` (symmetric; see the module docstring), or None."""
    if aqt_config is None:
        return None
    if op in CONV_DN:
        spatial = len(CONV_DN[op][0]) - 2
        conv = aqt_conv_general.make_conv_general_dilated(
            aqt_conv_general.conv_general_dilated_make(spatial, lhs_bits=8, rhs_bits=8)
        )
        return lambda x, w: conv(
            x,
            w,
            (1,) * spatial,
            "SAME",
            dimension_numbers=lax.conv_dimension_numbers(x.shape, w.shape, CONV_DN[op]),
        )
    cfg = aqt_config.dot_general_make(lhs_bits=8, rhs_bits=8, bwd_bits=None)
    cfg.fwd.dg_quantizer.lhs.calib_shared_axes = "per_tensor"
    return lambda x, w: cfg(x, w, DENSE_DN)


def _qwix_product(op: str, lhs_symmetric: bool, static_range=None):
    """Qwix's int8 x int8 quantized-training ``f(x, w)``: lhs per tensor, rhs per output
    channel; or None. ``static_range = (min, max)`` fixes the lhs range (Qwix's static-scale
    hook), else it is computed from the lhs."""
    if dot_general_qt is None:
        return None
    kw = dict(
        lhs_qtype=jnp.int8,
        rhs_qtype=jnp.int8,
        lhs_calibration_method="absmax" if lhs_symmetric else "minmax",
        lhs_disable_channelwise_axes=True,
    )
    if static_range is not None:
        lo, hi = static_range
        fixed = {"min": lo, "max": hi, "absmax": jnp.maximum(-lo, hi)}
        kw["lhs_collect_quant_stat"] = lambda cal: {
            k: jnp.broadcast_to(fixed[k], v.shape).astype(v.dtype) for k, v in cal.items()
        }
    if op in CONV_DN:
        cfg, dn = ConvGeneralQtConfig(**kw), CONV_DN[op]
        strides = (1,) * (len(dn[0]) - 2)
        return lambda x, w: conv_general_qt(x, w, cfg, strides, "SAME", dimension_numbers=dn)
    cfg = DotGeneralQtConfig(**kw)
    return lambda x, w: dot_general_qt(x, w, DENSE_DN, cfg)


def _baselines(op: str, lhs_symmetric: bool) -> dict:
    """The other libraries' int8 ``f(x, w)`` for ``op`` that are installed."""
    fns = {"aqt_int8": _aqt_product(op), "qwix_int8": _qwix_product(op, lhs_symmetric)}
    return {name: f for name, f in fns.items() if f is not None}


def _compiled(f, passes: str):
    if passes == "fwd":
        return jax.jit(f)
    # forward + backward: a loss of the output, gradients w.r.t. both operands
    return jax.jit(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))


def _conv_gradients(lhs_quant, rhs_quant) -> dict:
    """Gradients of ``sum(conv(x, w)^2)`` w.r.t. ``(x, w)`` of every int8 conv on a small case.

    Per variant: ``max|dL/dx|``, ``max|dL/dw|``; for jquant also ``max|g - g_ste| / max|g_ste|``,
    with ``g_ste`` the float conv's gradient at the dequantized operands ``x_hat = s (q - z)``.
    """
    keys = jax.random.split(jax.random.key(1))
    x = jax.random.normal(keys[0], (2, 8, 8, 4)) + 0.5
    w = jax.random.normal(keys[1], (3, 3, 4, 8)) / 6
    fns = {
        str(mode or "float"): _product("conv", mode, lhs_quant, rhs_quant)
        for mode in (None, "simulate", "int")
    } | _baselines("conv", lhs_quant.symmetric)
    grads = {name: _compiled(f, "fwd+bwd")(x, w) for name, f in fns.items()}
    dequantized = []
    for v, cfg in ((x, lhs_quant), (w, rhs_quant)):
        qp = dynamic_qparams(v, cfg)
        dequantized.append(dequantize(quantize(v, qp, cfg.fmt), qp, cfg.fmt))
    ste = _compiled(fns.pop("float"), "fwd+bwd")(*dequantized)
    facts = {}
    for name in fns:
        gx, gw = grads[name]
        facts[name] = dict(
            max_abs_grad_lhs=float(jnp.abs(gx).max()), max_abs_grad_rhs=float(jnp.abs(gw).max())
        )
        if name in ops.MODES:
            facts[name]["max_rel_dev_from_ste"] = max(
                float(jnp.abs(g - e).max() / jnp.abs(e).max())
                for g, e in zip(grads[name], ste, strict=True)
            )
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--lhs", choices=("affine", "symmetric"), default="affine")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "ops.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    rounds = args.rounds or (5 if args.quick else 15)
    lhs_quant = QuantConfig(symmetric=args.lhs == "symmetric")
    rhs_quant = QuantConfig(axis=-1)

    keys = jax.random.split(jax.random.key(0), 4)
    shapes = {
        "conv": (jax.random.normal(keys[0], (32, 32, 32, 64)), (3, 3, 64, 64)),
        "dense": (jax.random.normal(keys[1], (256, 1024)), (1024, 1024)),
        # the MNIST-1D CNN's second layer
        "conv1d": (jax.random.normal(keys[3], (128, 20, 32)), (5, 32, 32)),
    }
    cases = []
    for op, (x, w_shape) in shapes.items():
        w = jax.random.normal(keys[2], w_shape) / np.sqrt(np.prod(w_shape[:-1]))
        static = dynamic_qparams(x, lhs_quant)  # as calibrated once, ahead of time
        codes = (
            quantize(x, static, lhs_quant.fmt).astype(jnp.int8),
            quantize(w, dynamic_qparams(w, rhs_quant), rhs_quant.fmt).astype(jnp.int8),
        )
        for passes in ("fwd", "fwd+bwd"):
            fns = {
                str(mode or "float"): _compiled(_product(op, mode, lhs_quant, rhs_quant), passes)
                for mode in (None, "simulate", "int")
            }
            fns |= {
                name: _compiled(f, passes)
                for name, f in _baselines(op, lhs_quant.symmetric).items()
            }
            inputs = {name: (x, w) for name in fns}
            if passes == "fwd":
                fns["int_static"] = jax.jit(_product(op, "int", lhs_quant, rhs_quant, static))
                inputs["int_static"] = (x, w)
                qwix_static = _qwix_product(
                    op, lhs_quant.symmetric, (jnp.minimum(x.min(), 0), jnp.maximum(x.max(), 0))
                )
                if qwix_static is not None:
                    fns["qwix_int8_static"] = jax.jit(qwix_static)
                    inputs["qwix_int8_static"] = (x, w)
                fns["lax_int8"] = jax.jit(_product(op, "lax_int8", None, None))
                inputs["lax_int8"] = codes
            timings = bench.measure(
                {name: functools.partial(fn, *inputs[name]) for name, fn in fns.items()},
                baseline="float",
                rounds=rounds,
            )
            targets = {v: t for (o, p, v), t in TARGETS.items() if (o, p) == (op, passes)}
            print(timings.format(f"\n{op} {passes}"))
            # an all-zero gradient lets XLA drop the backward pass: flag it beside its time
            zero_grads = {
                name: not any(bool(jnp.any(g)) for g in fn(*inputs[name]))
                for name, fn in fns.items()
                if passes == "fwd+bwd"
            }
            cases.append(
                dict(
                    op=op,
                    passes=passes,
                    xla_cpu_1d_conv_path=op == "conv1d",
                    timing=timings.to_json(targets),
                    zero_gradients=zero_grads or None,
                )
            )
            for name, row in cases[-1]["timing"]["variants"].items():
                if "verdict" in row:
                    print(f"  {name}: target <= {row['target']}: {row['verdict']}")
                if zero_grads.get(name):
                    print(f"  {name}: gradients all zero (no backward pass to time)")
    grads = _conv_gradients(lhs_quant, rhs_quant)
    print("\nconv gradients (small case): max|dL/dlhs|, max|dL/drhs|, jquant vs STE oracle")
    for name, g in grads.items():
        dev = g.get("max_rel_dev_from_ste")
        print(
            f"{name:10} {g['max_abs_grad_lhs']:10.4g} {g['max_abs_grad_rhs']:10.4g}"
            + ("" if dev is None else f"  rel. dev. from STE {dev:.2e}")
        )
    config = dict(
        rounds=rounds,
        lhs=args.lhs,
        rhs="symmetric per output channel",
        aqt_int8=None
        if aqt_config is None
        else f"aqtp {importlib.metadata.version('aqtp')}: {_AQT_CONFIG}",
        aqt_int8_static="not run: " + _AQT_STATIC,
        qwix_int8=None
        if dot_general_qt is None
        else f"qwix {importlib.metadata.version('qwix')}: {_QWIX_CONFIG}",
        xla_cpu_1d_conv_path=_XLA_1D,
    )
    meta = bench.results_meta(quick=args.quick, load_before=load_before)
    out = bench.write_results(
        args.out, dict(meta=meta, config=config, cases=cases, conv_gradients=grads)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
