"""QAT accuracy of jquant, Qwix and AQT on one protocol (issue #13), PTQ and QAT, 3 seeds.

Protocol, the same for every library: the zoo's float MNIST-1D CNN (one per seed, 3000 Adam
steps, cached), every layer quantized (Dense and Conv, first and last included), weights
per output channel, activations per tensor unless a configuration says otherwise, ``b``-bit
weights and activations (w8a8 / w4a4 / w3a3 / w2a2, ``--bits``), the same 8 calibration batches (the
first 8 x 128 training examples), then QAT: Adam 1e-3 (constant), batch 128, ``--steps``
steps, seed ``s``'s batch order from ``jax.random.key(s)`` for every library. Seeds train in
one ``jax.vmap``-ed program per (configuration, width). Test accuracy on the 1000 test examples.

Configurations (``CONFIGS``):

- ``jquant_ste``: jquant's default rule (STE, static min/max ranges), plain Adam.
- ``jquant_recipe``: :mod:`jquant.qat`'s dynamic recipe, ``qat.DYNAMIC_RECIPE`` (``RECIPES``).
- ``jquant_static_recipe``: the deployable recipe, ``qat.STATIC_RECIPE`` (``RECIPES``).
- ``jquant_static_lowering``: the static recipe with progressive lowering of the width,
  ``schedule=(8, 4)`` down to the target (``(8, 4, 2)`` at 2 bits), equal thirds of the steps.
- ``jquant_static``: the deployable variant: LSQ on weights and activations (static ranges,
  steps initialised by LSQ's formula, activation zero points from min/max calibration),
  relative rate 1e-2, no distillation.
- ``qwix_default``: ``qwix.QtRule(weight_qtype, act_qtype)``: Qwix's default on XLA, dynamic
  absmax activation scales per example.
- ``qwix_fixed``: Qwix with fixed activation ranges ``"fixed,min,max"`` per layer, from the
  calibration batches' min / max (static, as jquant's PTQ ranges); Qwix's int2 and int3
  reject asymmetric ranges, so at 2 and 3 bits ``"fixed,-m,m"``, ``m = max(|min|, |max|)``.
- ``qwix_minmax``: Qwix, dynamic affine (``"minmax"``) activation ranges. Qwix ignores
  ``act_batch_axes`` in dynamic mode, so these are per example, as its default, not per
  position; Qwix's int2 and int3 are symmetric only, so at 2 and 3 bits this is ``"absmax"``,
  i.e. the default.
- ``aqt_default``: ``aqt.jax.v2.flax`` ``AqtDotGeneral`` (``config_v4``, float backward) and
  ``AqtConvGeneralDilated`` (``conv_general_dilated_make``) injected into every Dense / Conv:
  dynamic activation scales (AQT's default).

The "best peer" of a cell is the best of the peers' configurations there with the same kind
of activation ranges (the table says which): dynamic (Qwix default and minmax, AQT) for
jquant's dynamic recipe, static (Qwix fixed ranges; AQT has no static activation mode) for
jquant's static recipe. Qwix's int4 / int2 codes are stored as int4, which XLA:CPU's conv and
dot do not compile; here (and only here) its ``numerics.convert_to`` stores them in int8 (the
same codes, scales and zero points), checked against Qwix's own quantize -> dequantize -> float
conv (``qwix_storage_check`` in the JSON).

Run: ``python benchmarks/qat_accuracy.py [--steps 300] [--seeds 3] [--bits 8 4 3 2]
[--configs ...] [--out FILE]``; results are merged into ``--out`` (default
``benchmarks/results/qat_accuracy.json``) keyed by steps, configuration and width, so runs can
be split; ``--merge FILE ...`` merges split runs' files into ``--out``, every cell keeping the
command that measured it.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import bench, qat
from jquant.data import load_mnist1d
from jquant.formats import IntFormat
from jquant.models import train as T
from jquant.nn import QuantRule

OUT = pathlib.Path(__file__).parent / "results" / "qat_accuracy.json"
CALIB_BATCHES = 8
BATCH = 128
LR = 1e-3

# jquant's recipes (jquant.qat): every choice and what it means
RECIPES = {
    "jquant_recipe": (
        qat.DYNAMIC_RECIPE,
        "LSQ weights (per-channel steps initialised by LSQ's 2 mean|w| / sqrt(Q_P), learned "
        "on Adam with a relative rate 1e-2, jquant.qat.qat_optimizer); activations with "
        "dynamic affine min/max ranges per example and position (act_scale="
        "'dynamic_per_token', STE); distillation from the float model (weight 0.5, T=1)",
    ),
    "jquant_static_recipe": (
        qat.STATIC_RECIPE,
        "the deployable recipe: LSQ weights as the dynamic recipe; static per-tensor affine "
        "activation ranges whose step and offset are learned (LSQ+, act_estimator="
        "'lsq_plus', initialised from the calibration batches), relative rate 1e-2; "
        "distillation from the float model (weight 0.5, T=1); no lowering schedule",
    ),
}


# --- jquant -----------------------------------------------------------------------------------


def _jquant_rule(bits: int, **kw) -> QuantRule:
    return QuantRule(".*", weight=IntFormat(bits), act=IntFormat(bits), **kw)


def run_jquant(name, model, float_vars, data, bits, steps, seeds, log):
    if name == "jquant_ste":
        rule, cfg = _jquant_rule(bits), qat.QATConfig(steps=steps, quant_lr=None, distill=0.0)
    elif name == "jquant_static":  # deployable: static activation ranges, all steps learned
        rule = _jquant_rule(bits, estimator="lsq", learned_init="paper")
        cfg = qat.QATConfig(steps=steps, quant_lr=1e-2, distill=0.0)
    elif name == "jquant_static_lowering":  # the static recipe, lowering 8 -> 4 -> ... -> b
        recipe = dataclasses.replace(qat.STATIC_RECIPE, schedule=(8, 4))
        rule = recipe.rule(".*", IntFormat(bits), IntFormat(bits))
        cfg = recipe.config(steps, target_bits=bits)
    else:
        recipe = RECIPES[name][0]
        rule = recipe.rule(".*", IntFormat(bits), IntFormat(bits))
        cfg = recipe.config(steps, target_bits=bits)
    return qat.run_linen(model, float_vars, rule, data, cfg, seeds=seeds, log=log)


# --- peers: a shared harness ------------------------------------------------------------------


def _calibration(data) -> list[jax.Array]:
    return [data.x_train[i * BATCH : (i + 1) * BATCH] for i in range(CALIB_BATCHES)]


def _peer_run(qmodel, float_vars, data, steps, seeds, log, calibrate_fn=None):
    """PTQ eval, then QAT with plain Adam 1e-3, for a Qwix / AQT model (Linen)."""
    x0 = data.x_train[:2]
    init = qmodel.init(jax.random.key(0), x0)
    apply = T.linen_apply_fn(qmodel)
    results, states = [], []
    opt = optax.adam(LR)
    for fv in float_vars:
        v = {**init, **fv, "params": {**init.get("params", {}), **fv["params"]}}
        v = jax.tree.map(jnp.asarray, v)
        if calibrate_fn is not None:
            v = calibrate_fn(v)
        params, state = T.split_linen(v)
        acc = T.evaluate(apply, params, state, data.x_test, data.y_test)["accuracy"]
        results.append({"ptq": acc})
        states.append(T.TrainState.create(params, state, opt))
    log(f"ptq {[r['ptq'] for r in results]}")
    if steps:
        step = qat.make_qat_step(apply, opt)
        states = qat.fit_seeds(
            step,
            states,
            data.x_train,
            data.y_train,
            steps=steps,
            batch_size=BATCH,
            keys=[jax.random.key(s) for s in seeds],
            log=log,
        )
        for r, st in zip(results, states, strict=True):
            r["qat"] = T.evaluate(apply, st.params, st.model_state, data.x_test, data.y_test)[
                "accuracy"
            ]
        log(f"qat {[r['qat'] for r in results]}")
    return results


def _input_ranges(model, variables, batches) -> dict[str, tuple[float, float]]:
    """Per Dense / Conv path: min and max of its input over ``batches`` (float model)."""
    ranges: dict[str, list[float]] = {}

    def record(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name == "__call__" and isinstance(m, nn.Dense | nn.Conv):
            path = "/".join(m.path)
            lo, hi = float(jnp.min(args[0])), float(jnp.max(args[0]))
            old = ranges.get(path, [lo, hi])
            ranges[path] = [min(old[0], lo), max(old[1], hi)]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        for xb in batches:
            model.apply(variables, xb, train=False)
    return {k: (min(lo, 0.0), max(hi, 0.0)) for k, (lo, hi) in ranges.items()}


# --- Qwix -------------------------------------------------------------------------------------


def _widen_qwix_storage():
    """Qwix stores int2 / int4 codes as ``jnp.int4``; XLA:CPU cannot run its conv / dot on
    those. Store the same codes (``round(x).clip(qmin, qmax)``) as int8 instead."""
    from qwix._src.core import numerics

    if getattr(numerics.convert_to, "_widened", False):
        return
    original = numerics.convert_to

    def convert_to(x, qtype, noise_fn=None):
        if isinstance(qtype, str):
            bits = {"int2": 2, "int3": 3, "int4": 4}.get(qtype)
        else:
            bits = 4 if jnp.dtype(qtype) == jnp.dtype(jnp.int4) else None
        if bits is None:
            return original(x, qtype, noise_fn)
        if noise_fn is not None:
            x = x + noise_fn(x.shape)
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        return jnp.round(x).clip(qmin, qmax).astype(jnp.int8)

    convert_to._widened = True
    numerics.convert_to = convert_to


def _qtype(bits: int):
    return {8: "int8", 4: "int4", 2: "int2"}.get(bits, f"int{bits}")


def qwix_storage_check(bits: int) -> float:
    """Max |Qwix conv (widened storage) - float conv of Qwix's dequantized operands| on a
    random 1-D conv; 0 up to float rounding when the widening keeps codes and scales."""
    from qwix._src.core import conv_general_qt, qarray

    _widen_qwix_storage()
    k1, k2 = jax.random.split(jax.random.key(0))
    x = jax.random.normal(k1, (4, 40, 8))
    w = jax.random.normal(k2, (5, 8, 16))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NWC", "WIO", "NWC"))
    cfg = conv_general_qt.ConvGeneralQtConfig(lhs_qtype=_qtype(bits), rhs_qtype=_qtype(bits))
    y = conv_general_qt.conv_general_qt(x, w, cfg, (1,), "SAME", dimension_numbers=dn)
    qx = qarray.quantize(x, qarray.HowToQuantize(qtype=_qtype(bits), channelwise_axes=(0,)))
    qw = qarray.quantize(w, qarray.HowToQuantize(qtype=_qtype(bits), channelwise_axes=(2,)))
    ref = jax.lax.conv_general_dilated(
        qarray.dequantize(qx), qarray.dequantize(qw), (1,), "SAME", dimension_numbers=dn
    )
    return float(jnp.max(jnp.abs(y - ref)))


def _fixed(lo: float, hi: float, bits: int) -> str:
    """Qwix's fixed range: ``[lo, hi]``; Qwix's int2 and int3 are symmetric only, so there
    ``[-m, m]`` with ``m = max(|lo|, |hi|)``."""
    if bits > 3:
        return f"fixed,{lo},{hi}"
    m = max(abs(lo), abs(hi))
    return f"fixed,{-m},{m}"


def run_qwix(name, model, float_vars, data, bits, steps, seeds, log):
    import qwix

    _widen_qwix_storage()
    qt = _qtype(bits)
    if name == "qwix_default":
        rules = [qwix.QtRule(module_path=".*", weight_qtype=qt, act_qtype=qt)]
    elif name == "qwix_minmax":  # dynamic affine ranges (per example: see the docstring)
        rules = [
            qwix.QtRule(
                module_path=".*",
                weight_qtype=qt,
                act_qtype=qt,
                act_calibration_method="minmax" if bits > 3 else "absmax",
            )
        ]
    else:  # qwix_fixed: calibrated min / max of each layer's input, from seed 0's model
        ranges = _input_ranges(model, float_vars[0], _calibration(data))
        rules = [
            qwix.QtRule(
                module_path=path,
                weight_qtype=qt,
                act_qtype=qt,
                act_calibration_method=_fixed(lo, hi, bits),
            )
            for path, (lo, hi) in ranges.items()
        ]
    qmodel = qwix.quantize_model(model, qwix.QtProvider(rules))
    return _peer_run(qmodel, float_vars, data, steps, seeds, log)


# --- AQT --------------------------------------------------------------------------------------


class _AqtModel:
    """The plain model with AQT's quantized ops injected into every Dense / Conv."""

    def __init__(self, model, bits):
        from aqt.jax.v2 import aqt_conv_general
        from aqt.jax.v2 import config as aqt_config
        from aqt.jax.v2.flax import aqt_flax

        dg = aqt_config.config_v4(fwd_bits=bits, dlhs_bits=None, drhs_bits=None)
        cg = aqt_config.default_unquantized_config()  # as aqt's examples/flax_e2e_model.py
        cg.fwd = aqt_conv_general.conv_general_dilated_make(1, lhs_bits=bits, rhs_bits=bits)
        self.model = model
        # no stochastic rounding in these configs, so no PRNG stream (prng_name=None)
        self.dense_cls = functools.partial(aqt_flax.AqtDotGeneral, dg, prng_name=None)
        self.conv_cls = functools.partial(aqt_flax.AqtConvGeneralDilated, cg, prng_name=None)

    def _intercept(self, next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or getattr(m, "_aqt", False):
            return next_fun(*args, **kwargs)
        if isinstance(m, nn.Dense) and m.dot_general_cls is None:
            clone = m.clone(parent=m.scope, dot_general_cls=self.dense_cls)
        elif isinstance(m, nn.Conv) and m.conv_general_dilated_cls is None:
            clone = m.clone(parent=m.scope, conv_general_dilated_cls=self.conv_cls)
        else:
            return next_fun(*args, **kwargs)
        return type(m).__call__(clone, *args, **kwargs)

    def init(self, *a, **k):
        with nn.intercept_methods(self._intercept):
            return self.model.init(*a, **k)

    def apply(self, *a, **k):
        with nn.intercept_methods(self._intercept):
            return self.model.apply(*a, **k)


def run_aqt(name, model, float_vars, data, bits, steps, seeds, log):
    return _peer_run(_AqtModel(model, bits), float_vars, data, steps, seeds, log)


CONFIGS = {
    "jquant_ste": run_jquant,
    "jquant_recipe": run_jquant,
    "jquant_static": run_jquant,
    "jquant_static_recipe": run_jquant,
    "jquant_static_lowering": run_jquant,
    "qwix_default": run_qwix,
    "qwix_fixed": run_qwix,
    "qwix_minmax": run_qwix,
    "aqt_default": run_aqt,
}


def merge(out: pathlib.Path, files: list[str]) -> None:
    """Merges the cells of result ``files`` (runs with ``--out``) into ``out``, each cell
    recording the command that measured it (its file's ``meta.command``), and each file's
    meta under ``runs``."""
    payload = json.loads(out.read_text()) if out.exists() else {}
    cells, runs = payload.get("cells", {}), payload.get("runs", [])
    for f in files:
        part = json.loads(pathlib.Path(f).read_text())
        for k, c in part["cells"].items():
            cells[k] = {**c, "command": c.get("command", part["meta"]["command"])}
        runs.append(part["meta"])
        payload["float"] = part["float"]
    payload["cells"], payload["runs"] = dict(sorted(cells.items())), runs
    payload.pop("recipe", None)  # one description per recipe now, under "recipes"
    payload["recipes"] = {k: d for k, (_, d) in RECIPES.items()}
    payload["protocol"] = __doc__.split("\n\n")[1]
    bench.write_results(out, payload)
    print(f"merged {len(files)} files into {out}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--merge", nargs="+", metavar="FILE", help="merge these results into --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(pathlib.Path(args.out), args.merge)
    load_before = bench.loadavg()
    data = load_mnist1d()
    seeds = list(range(args.seeds))
    trained = [T.train_or_load("cnn", data, s, 3000) for s in seeds]
    model, float_vars = trained[0].model, [t.variables for t in trained]
    out = pathlib.Path(args.out)
    payload = json.loads(out.read_text()) if out.exists() else {}
    cells = payload.get("cells", {})
    payload["float"] = [t.metrics["test_accuracy"] for t in trained]
    payload["qwix_storage_check"] = {f"int{b}": qwix_storage_check(b) for b in (8, 4, 2)}
    for name in args.configs:
        for b in args.bits:
            start = time.perf_counter()
            print(f"== {name} w{b}a{b}, {args.steps} steps", flush=True)
            res = CONFIGS[name](name, model, float_vars, data, b, args.steps, seeds, print)
            cells[f"{args.steps}/{name}/w{b}a{b}"] = {
                "steps": args.steps,
                "config": name,
                "bits": b,
                "seeds": seeds,
                "ptq": [r["ptq"] for r in res],
                "qat": [r["qat"] for r in res] if args.steps else None,
                "command": bench.results_meta(quick=False, load_before=None)["command"],
                "wall_s": round(time.perf_counter() - start),
            }
            payload["cells"] = dict(sorted(cells.items()))
            payload["meta"] = bench.results_meta(quick=False, load_before=load_before)
            payload["protocol"] = __doc__.split("\n\n")[1]
            payload["recipes"] = {k: d for k, (_, d) in RECIPES.items()}
            bench.write_results(out, payload)
    print(f"wrote {out}")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
