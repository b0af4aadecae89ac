"""One QAT train step (forward + backward + optax update) of the MNIST-1D CNN, against float.

Variants, all measured in this process on the same model, batch and optimizer:

- ``float``: the plain Linen CNN;
- ``simulate``: jquant rules, int8 weights and activations, phase ``train``, fake-quant;
- ``int``: the same with ``mode="int"`` (int8 x int8 -> int32 forward, STE backward);
- ``qwix_int8``: Qwix's ``QtProvider`` with int8 weights and activations (if importable).

Prints medians (ms) of ``--repeats`` timed steps after warm-up (the variants interleaved, one
step each per round), and ratios to float; writes
``benchmarks/results/train_step.json``. ``--quick`` uses fewer repeats.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import jax
import optax

from jquant.models import linen as models
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql


def _timed(steps: dict, x, y, repeats: int) -> dict[str, float]:
    """Median ms per step of each ``(step, state)``, timed in interleaved rounds after warm-up
    so that machine load hits every variant alike."""
    states = {}
    for name, (step, state) in steps.items():
        for _ in range(3):  # warm-up (compile)
            state, _ = step(state, x, y)
        states[name] = jax.block_until_ready(state)
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, (step, _) in steps.items():
            t0 = time.perf_counter()
            states[name], m = step(states[name], x, y)
            jax.block_until_ready((states[name], m))
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def _step_for(apply_model, variables, opt):
    params, state = T.split_linen(variables)
    step = jax.jit(T.make_train_step(T.linen_apply_fn(apply_model), opt))
    return step, T.TrainState.create(params, state, opt)


def _qwix(model, x, opt):
    import qwix

    rule = qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")
    qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
    variables = qmodel.init(jax.random.key(0), x)
    return _step_for(qmodel, variables, opt)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    repeats = 5 if args.quick else args.repeats
    model = models.make_model("cnn", (40, 1), 10)
    x = jax.random.normal(jax.random.key(0), (args.batch, 40, 1))
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 10)
    opt = optax.adam(1e-3)
    variables = jax.jit(model.init)(jax.random.key(2), x)
    steps = {"float": _step_for(model, variables, opt)}
    for mode in ("simulate", "int"):
        qm, _ = ql.quantize_model(model, QuantRule(".*", mode=mode), x)
        qv = qm.calibrate(qm.attach(variables, x), [x])
        steps[mode] = _step_for(qm.with_phase("train"), qv, opt)
    errors = {}
    try:
        steps["qwix_int8"] = _qwix(model, x, opt)
    except Exception as e:  # report why Qwix could not run with these jax / flax versions
        errors["qwix_int8"] = f"{type(e).__name__}: {e}"
    ms = _timed(steps, x, y, repeats)
    rows = {k: {"ms": v, "ratio_to_float": v / ms["float"]} for k, v in ms.items()}
    print(f"{'variant':<12}{'ms/step':>10}{'x float':>10}")
    for k, r in rows.items():
        print(f"{k:<12}{r['ms']:>10.2f}{r['ratio_to_float']:>10.2f}")
    for k, e in errors.items():
        print(f"{k}: failed: {e}")
    out = pathlib.Path(__file__).parent / "results" / "train_step.json"
    out.parent.mkdir(exist_ok=True)
    info = {"batch": args.batch, "repeats": repeats, "device": str(jax.devices()[0])}
    out.write_text(json.dumps({"config": info, "results": rows, "errors": errors}, indent=2))


if __name__ == "__main__":
    main()
