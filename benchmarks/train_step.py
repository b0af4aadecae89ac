"""Training step time (forward + backward + Adam update, jitted) of quantized models against float.

Two suites (``--suite``), each timed in one interleaved run with ``jquant.bench.timing.measure``
(shuffled rounds; median paired ratio to float with a bootstrap 95% CI; a target is met only
when the CI lies below it).

``--suite qat_cnn`` (default; writes ``benchmarks/results/train_step.json``): one QAT train step
of the MNIST-1D CNN, against float. Variants, all measured in this process on the same model,
batch and optimizer, int8 weights (symmetric, per output channel) and int8 activations (affine,
min/max, per tensor):

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

``--suite quantized_backward`` (writes ``benchmarks/results/train_step_cpu.json``): forward-only
against forward + backward quantization, on a dense stack and on a 1-D CNN of MNIST-1D shapes;
see :func:`quantized_backward` for the variants and what AQT and Qwix run beside jquant.

The CNNs' convs are 1-D: every ratio here depends on XLA:CPU's 1-D conv path (see
``benchmarks/ops.py``). ``--quick`` uses 5 rounds.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
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


def _qwix(model, x, opt, static: bool, calibration: str = "minmax", bwd: bool = False):
    """Qwix's QAT (``QtProvider``) train step: int8 weights and activations with
    ``calibration`` ranges, static or dynamic, and int8 backward products if ``bwd``."""
    import qwix

    rule = qwix.QtRule(
        module_path=".*",
        weight_qtype="int8",
        act_qtype="int8",
        act_calibration_method=calibration,
        act_static_scale=static,
        bwd_qtype="int8" if bwd else None,
    )
    qmodel = qwix.quantize_model(model, qwix.QtProvider([rule]))
    return _step_for(qmodel, qmodel.init(jax.random.key(0), x), opt)


def qat_cnn(args) -> pathlib.Path:
    """The ``qat_cnn`` suite (see the module docstring); returns the results path."""
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
        args.out or pathlib.Path(__file__).parent / "results" / "train_step.json",
        dict(
            meta=meta,
            config=config,
            timing=timings.to_json(TARGETS),
            pairs=pairs,
            errors=errors,
        ),
    )
    print(f"wrote {out}")
    return out


# ------------------------------------------------------------------ suite quantized_backward

MODELS = ("dense", "conv")
INPUT = {"dense": (40,), "conv": (40, 1)}  # MNIST-1D: 40 samples, 1 channel, 10 classes
DENSE_WIDTHS = (256, 256, 256)
# jquant's rules: int8 weights symmetric per output channel, int8 activations symmetric with
# calibrated (static) ranges; backward: int8 output gradient per tensor (dynamic), the reused
# input and kernel requantized to int8 per tensor (what mode="int" runs as int8 x int8 -> int32).
# Activations are symmetric in every variant: Qwix's quantized backward needs them so (its
# dot_general_qt_bwd asserts zero_point is None), AQT's fully_quantized is symmetric.
JQ_FWD = dict(weight="int8", act="int8", act_symmetric=True)
JQ_BWD = dict(grad="int8", grad_operands="int8")
PEERS = {
    "aqt": "aqt.jax.v2 config.fully_quantized(fwd_bits=8, bwd_bits=8 | None, "
    "use_stochastic_rounding=False): int8 per-token activations and per-channel weights, "
    "dynamic scales; int8 gradients (dynamic) in both backward products; injected as "
    "nn.Dense(dot_general_cls=AqtDotGeneral); convs: aqt_conv_general (forward only)",
    "qwix": "qwix.QtProvider(QtRule(weight_qtype='int8', act_qtype='int8', "
    "act_calibration_method='absmax', act_static_scale=True, bwd_qtype=None | 'int8')): "
    "symmetric static activation scales (a moving average updated in every step)",
}


class DenseStack(nn.Module):
    """``x -> relu(x W_1) -> ... -> x W_head``: widths ``DENSE_WIDTHS`` then 10 classes."""

    dot_general_cls: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        for w in DENSE_WIDTHS:
            x = nn.relu(nn.Dense(w, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(10, dot_general_cls=self.dot_general_cls)(x)


class Conv1D(nn.Module):
    """The zoo CNN's shapes: conv 5x1->32, relu, max-pool 2, conv 5x32->32, relu, max-pool 2,
    dense 320->64, relu, dense 64->10; products injectable (AQT)."""

    dot_general_cls: Any = None
    conv_general_dilated: Any = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        for _ in range(2):
            x = nn.Conv(32, (5,), conv_general_dilated=self.conv_general_dilated)(x)
            x = nn.max_pool(nn.relu(x), (2,), strides=(2,))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(64, dot_general_cls=self.dot_general_cls)(x))
        return nn.Dense(10, dot_general_cls=self.dot_general_cls)(x)


def _plain(model_name: str, **ops) -> nn.Module:
    return DenseStack(**ops) if model_name == "dense" else Conv1D(**ops)


def _jquant(model, variables, x, opt, mode: str, bwd: bool):
    rule = QuantRule(".*", mode=mode, **JQ_FWD, **(JQ_BWD if bwd else {}))
    qm, _ = ql.quantize_model(model, rule, x, on_unused="raise")
    qv = qm.calibrate(qm.attach(variables, x), [x])
    return _step_for(qm.with_phase("train"), qv, opt)


def _aqt(model_name: str, x, opt, bwd: bool):
    from aqt.jax.v2 import aqt_conv_general, config
    from aqt.jax.v2.flax import aqt_flax

    cfg = config.fully_quantized(
        fwd_bits=8, bwd_bits=8 if bwd else None, use_stochastic_rounding=False
    )
    # prng_name=None: no stochastic rounding, so no "params" RNG stream in the train step
    dg = functools.partial(aqt_flax.AqtDotGeneral, cfg, prng_name=None)
    ops = {"dot_general_cls": dg}
    if model_name == "conv":
        if bwd:
            raise NotImplementedError(
                "aqt.jax.v2 has no conv with quantized backward products: aqt_conv_general "
                "quantizes the forward only (JAX differentiates it; the straight-through "
                "estimator of its numerics passes float gradients to float backward convs), "
                "and config.fully_quantized configures dot_general only"
            )
        conv_cfg = config.conv_general_dilated_make(1, lhs_bits=8, rhs_bits=8)
        ops["conv_general_dilated"] = aqt_conv_general.make_conv_general_dilated(conv_cfg)
    model = _plain(model_name, **ops)
    return _step_for(model, jax.jit(model.init)(jax.random.key(2), x), opt)


def _variants(model_name: str, x, opt) -> dict[str, Callable[[], tuple]]:
    """``{variant: builder}``; a builder returns ``(jitted step, state)`` or raises."""
    model = _plain(model_name)
    variables = jax.jit(model.init)(jax.random.key(2), x)
    out = {"float": lambda: _step_for(model, variables, opt)}
    for passes, bwd in (("fwd", False), ("fwd+bwd", True)):
        for mode in ("simulate", "int"):
            out[f"jquant_{mode} {passes}"] = functools.partial(
                _jquant, model, variables, x, opt, mode, bwd
            )
        out[f"aqt_int8 {passes}"] = functools.partial(_aqt, model_name, x, opt, bwd)
        out[f"qwix_int8 {passes}"] = functools.partial(_qwix, model, x, opt, True, "absmax", bwd)
    return out


def _check_every_param_trains(before, after) -> None:
    """ValueError naming the parameters one step left unchanged (a zero gradient: Adam's
    first update is ``-lr sign(g)`` where ``g != 0``), e.g. a quantized op that cuts the
    gradient; such a step is not a training step to time."""
    if before is None:
        return
    flat, _ = jax.tree_util.tree_flatten_with_path(before)
    frozen = [
        "/".join(str(getattr(k, "key", k)) for k in path)
        for (path, b), a in zip(flat, jax.tree.leaves(after), strict=True)
        if bool(jax.numpy.all(a == b))
    ]
    if frozen:
        raise ValueError(f"one step left these parameters unchanged (zero gradient): {frozen}")


def build_steppers(
    builders: dict[str, Callable[[], tuple]], x, y
) -> tuple[dict[str, _Stepper], dict[str, str]]:
    """``(steppers, unsupported)``: each builder's ``(step, state)`` as a :class:`_Stepper`
    that has run one step (compiled) and changed every parameter, or, when building, that
    first step or :func:`_check_every_param_trains` raises, the error as
    ``"<type>: <message>"`` under its name: an explicit row, never a silent drop."""
    steppers, unsupported = {}, {}
    for name, build in builders.items():
        try:
            stepper = _Stepper(*build(), x, y)
            before = getattr(stepper.state, "params", None)
            jax.block_until_ready(stepper())
            _check_every_param_trains(before, getattr(stepper.state, "params", None))
            steppers[name] = stepper
        except Exception as e:  # reported as an "unsupported" row with its error
            unsupported[name] = f"{type(e).__name__}: {str(e)[:500]}"
            print(f"{name}: unsupported: {unsupported[name]}", flush=True)
    return steppers, unsupported


def quantized_backward(args) -> pathlib.Path:
    """The ``quantized_backward`` suite: one train step per variant, dense stack and 1-D CNN.

    Per model (``dense``: 40 -> 256 -> 256 -> 256 -> 10, relu; ``conv``: the MNIST-1D CNN's
    shapes), batch ``--batch``, Adam, every variant in the same interleaved rounds:

    - ``float``;
    - ``jquant_simulate`` / ``jquant_int`` ``fwd``: int8 forward products (``QuantRule(".*",
      mode=..., act_symmetric=True)``, static calibrated activation ranges), float backward
      (STE);
    - ``jquant_simulate`` / ``jquant_int`` ``fwd+bwd``: also both backward products quantized,
      ``QuantRule(grad="int8", grad_operands="int8")`` (``jquant.ops.train_dot_general`` /
      ``train_conv_general_dilated``; ``int``: int8 x int8 -> int32 backward products);
    - ``aqt_int8`` and ``qwix_int8`` ``fwd`` / ``fwd+bwd``: the peers' own int8 training
      configurations (``PEERS``).

    A variant that does not build or compile (e.g. AQT's conv backward), or whose step leaves
    a parameter unchanged (a zero gradient: AQT's forward-quantized conv), is kept as an
    ``unsupported`` row with its error. Ratios are each variant's time over its model's
    ``float`` in the same round (median, bootstrap 95% CI).
    """
    load_before = bench.loadavg()
    rounds = 5 if args.quick else args.rounds
    opt = optax.adam(1e-3)
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 10)
    steppers, unsupported = {}, {}
    for m in MODELS:
        x = jax.random.normal(jax.random.key(0), (args.batch, *INPUT[m]))
        builders = {f"{m}/{name}": b for name, b in _variants(m, x, opt).items()}
        ok, failed = build_steppers(builders, x, y)
        steppers |= ok
        unsupported |= failed
    timings = bench.measure(steppers, baseline="dense/float", rounds=rounds, warmup=2)
    print(timings.format(f"train step, batch {args.batch} (ratios below: x own model's float)"))
    rows = []
    for key in [*steppers, *unsupported]:
        model_name, variant = key.split("/")
        row = dict(model=model_name, variant=variant)
        if key in unsupported:
            row |= dict(status="unsupported", error=unsupported[key])
        else:
            r = timings.ratio(key, f"{model_name}/float")
            row |= dict(
                status="ok",
                median_ms=1e3 * timings.median(key),
                min_ms=1e3 * timings.min(key),
                ratio=dict(median=r.median, ci95=list(r.ci)),
            )
            print(f"{key:<32} {r.median:.2f}x [{r.ci[0]:.2f}, {r.ci[1]:.2f}]")
        rows.append(row)
    config = dict(
        batch=args.batch,
        rounds=rounds,
        models=dict(
            dense=f"dense stack {INPUT['dense'][0]} -> {' -> '.join(map(str, DENSE_WIDTHS))} "
            "-> 10, relu",
            conv="1-D CNN, MNIST-1D shapes (40 x 1): conv 5x1->32, pool 2, conv 5x32->32, "
            "pool 2, dense 320->64, dense 64->10",
        ),
        optimizer="Adam (optax.adam(1e-3)), one jitted step: forward + backward + update",
        jquant=dict(fwd=f"QuantRule('.*', mode=..., **{JQ_FWD})", bwd=f"+ {JQ_BWD}"),
        peers=PEERS,
        ratio="median over rounds of t_variant / t_float of the same model (same round), "
        "bootstrap 95% CI",
    )
    out = bench.write_results(
        args.out or pathlib.Path(__file__).parent / "results" / "train_step_cpu.json",
        dict(
            meta=bench.results_meta(quick=args.quick, load_before=load_before),
            config=config,
            rows=rows,
            warmup=timings.warmup,
            times_ms={k: [1e3 * t for t in ts] for k, ts in timings.times.items()},
        ),
    )
    print(f"wrote {out}")
    return out


SUITES = {"qat_cnn": qat_cnn, "quantized_backward": quantized_backward}


def main(argv=None) -> pathlib.Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=tuple(SUITES), default="qat_cnn")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--quick", action="store_true", help="5 rounds")
    p.add_argument("--out", type=pathlib.Path, default=None, help="results JSON path")
    args = p.parse_args(argv)
    return SUITES[args.suite](args)


if __name__ == "__main__":
    main()
