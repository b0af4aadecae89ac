"""One QAT train step (forward + backward + optax update) of the MNIST-1D CNN, against float.

Variants, all measured in this process on the same model, batch and optimizer, int8 weights
(symmetric, per output channel) and int8 activations (affine, min/max, per tensor):

- ``float``: the plain Linen CNN;
- ``simulate``: jquant rules, phase ``train``, fake-quant, activation ranges calibrated ahead
  (static: jquant's QAT trains with calibrated ranges);
- ``int``: the same with ``mode="int"`` (int8 x int8 -> int32 forward, STE backward);
- ``qwix_int8_static``: Qwix's ``QtProvider`` with ``act_static_scale=True`` and
  ``act_calibration_method="minmax"``: static activation scales (Qwix updates their moving
  average in every training step), beside jquant's ``simulate`` / ``int``;
- ``qwix_int8``: Qwix's default dynamic activation scales (minmax per batch). jquant has no
  dynamic-activation training mode (a rule's activation ranges come from calibration; see
  ``jquant.nn.state``), so this row has no jquant counterpart.

The CNN's convs are 1-D: every ratio here depends on XLA:CPU's 1-D conv path (see
``benchmarks/ops.py``). Timing: ``jquant.bench.timing.measure`` (interleaved, shuffled rounds;
median paired ratio to float with a bootstrap 95% CI; a target is met only when the CI lies
below it). Writes ``benchmarks/results/train_step.json``; ``--quick`` uses 5 rounds.
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import optax

from jquant import bench
from jquant.models import linen as models
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql

TARGETS = {"simulate": 1.2}
# "int no slower than Qwix in the same (static) configuration"
PAIR_TARGETS = {("int", "qwix_int8_static"): 1.0}
NO_JQUANT_DYNAMIC = (
    "jquant has no dynamic-activation training mode: QuantRule activations train with "
    "calibrated (static) ranges, so qwix_int8 (dynamic) has no jquant counterpart"
)


class _Stepper:
    """A zero-argument callable running one step and keeping the new state."""

    def __init__(self, step, state, x, y):
        self.step, self.state, self.x, self.y = step, state, x, y

    def __call__(self):
        self.state, metrics = self.step(self.state, self.x, self.y)
        return self.state, metrics


def _step_for(apply_model, variables, opt):
    params, state = T.split_linen(variables)
    step = jax.jit(T.make_train_step(T.linen_apply_fn(apply_model), opt))
    return step, T.TrainState.create(params, state, opt)


def _qwix(model, x, opt, static: bool):
    import qwix

    rule = qwix.QtRule(
        module_path=".*",
        weight_qtype="int8",
        act_qtype="int8",
        act_calibration_method="minmax",
        act_static_scale=static,
    )
    qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
    variables = qmodel.init(jax.random.key(0), x)
    return _step_for(qmodel, variables, opt)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="5 rounds")
    args = p.parse_args(argv)
    load_before = bench.loadavg()
    rounds = 5 if args.quick else args.rounds
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
    for name, static in (("qwix_int8_static", True), ("qwix_int8", False)):
        try:
            steps[name] = _qwix(model, x, opt, static)
        except Exception as e:  # report why Qwix could not run with these jax / flax versions
            errors[name] = f"{type(e).__name__}: {e}"
    timings = bench.measure(
        {name: _Stepper(step, state, x, y) for name, (step, state) in steps.items()},
        baseline="float",
        rounds=rounds,
        warmup=3,
    )
    print(timings.format(f"QAT step, MNIST-1D CNN, batch {args.batch}"))
    pairs = [
        timings.pair_json(a, b, target)
        for (a, b), target in PAIR_TARGETS.items()
        if a in steps and b in steps
    ]
    for pr in pairs:
        print(f"{pr['variant']} / {pr['against']}: {pr['median']:.3f} {pr['ci95']} {pr['verdict']}")
    for k, e in errors.items():
        print(f"{k}: failed: {e}")
    config = dict(
        batch=args.batch,
        model="MNIST-1D CNN (jquant.models 'cnn'), Adam",
        quantization="int8 weights symmetric per channel, int8 activations affine minmax",
        jquant_dynamic=NO_JQUANT_DYNAMIC,
        xla_cpu_1d_conv_path="the CNN's convs are 1-D: ratios depend on XLA:CPU's 1-D conv path",
    )
    meta = bench.results_meta(quick=args.quick, load_before=load_before)
    out = bench.write_results(
        pathlib.Path(__file__).parent / "results" / "train_step.json",
        dict(
            meta=meta,
            config=config,
            timing=timings.to_json(TARGETS),
            pairs=pairs,
            errors=errors,
        ),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
