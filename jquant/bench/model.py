"""``jquant bench model``: throughput and memory of the MNIST-1D CNN in each execution mode.

The model is :mod:`jquant.models`' ``"cnn"`` on MNIST-1D-shaped inputs ``(N, 40, 1)``
(initialised, not trained: throughput does not depend on the weights), quantized by one rule
``QuantRule(".*", mode=...)`` (int8 weights per channel, int8 activations calibrated on the
batch). Variants, timed together per phase with :func:`jquant.bench.timing.measure`:

- inference: ``float``; ``simulate`` and ``int`` (:mod:`jquant.nn`, phase eval);
  ``program`` (:func:`jquant.convert.run` of the integer-only program, int8 codes in and out)
  and ``program_e2e`` (with input quantization and output dequantization);
- training (one optax Adam step): ``float``, ``simulate``, ``int`` (int8 forward, straight-
  through backward).

Per variant: median ms and its interval, ``samples_per_s = batch / median``, the time ratio to
``float`` in the same round, and the compiled program's memory (``memory_analysis()``:
arguments + outputs + temporaries - aliased). The device's own peak (``memory_stats()
["peak_bytes_in_use"]``, process-wide) is recorded where the backend has it (GPU, TPU; not CPU).
Weight bytes per format: float32, bfloat16, int8 and packed int4 kernels (two codes per byte,
:func:`jquant.integer.packing.pack`), each with float32 per-channel scales and biases as
stored, and the saved integer program's file.
"""

from __future__ import annotations

import functools
import pathlib
import tempfile
from typing import Any

import jax
import numpy as np
import optax

from jquant import convert as C
from jquant.bench import timing
from jquant.formats import int4, int8
from jquant.integer.packing import pack
from jquant.models import linen as models
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.quant import QuantConfig, dynamic_qparams, quantize

__all__ = ["compiled_memory", "format_summary", "run", "weight_bytes"]

INPUT_SHAPE = (40, 1)


def compiled_memory(fn, *args) -> int | None:
    """Bytes of the compiled ``jax.jit(fn)(*args)``: arguments + outputs + temporaries -
    aliased (``memory_analysis()``), or None where the backend reports none."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def weight_bytes(params) -> dict[str, int]:
    """Bytes of the parameters per storage format: ``float32``, ``bfloat16``; ``int8`` and
    ``int4_packed`` store each kernel as codes (symmetric, per output channel) plus a float32
    scale per output channel, and the other parameters (biases) in float32."""
    leaves = jax.tree_util.tree_leaves_with_path(params)
    n = sum(int(np.size(v)) for _, v in leaves)
    out = dict(float32=4 * n, bfloat16=2 * n)
    for name, fmt in (("int8", int8), ("int4_packed", int4)):
        total = 0
        for path, v in leaves:
            if "kernel" not in jax.tree_util.keystr(path):
                total += 4 * int(np.size(v))
                continue
            qp = dynamic_qparams(v, QuantConfig(fmt=fmt, axis=-1))
            codes = np.asarray(quantize(v, qp, fmt)).astype(np.int8)
            stored = codes if fmt.bits == 8 else pack(codes.reshape(-1), 4)
            total += stored.nbytes + 4 * int(np.size(qp.scale))
        out[name] = total
    return out


class _Stepper:
    """A zero-argument callable running one train step and keeping the new state."""

    def __init__(self, step, state, x, y):
        self.step, self.state, self.x, self.y = step, state, x, y

    def __call__(self):
        self.state, metrics = self.step(self.state, self.x, self.y)
        return self.state, metrics


def _stepper(apply_model, variables, opt, x, y) -> tuple[_Stepper, Any]:
    params, state = T.split_linen(variables)
    step = T.make_train_step(T.linen_apply_fn(apply_model), opt)
    train_state = T.TrainState.create(params, state, opt)
    return _Stepper(jax.jit(step), train_state, x, y), (step, train_state)


def _rows(phase: str, t: timing.Timings, batch: int, memory: dict) -> list[dict[str, Any]]:
    rows = []
    for name in t.times:
        r = t.ratio(name)
        med = t.median(name)
        rows.append(
            dict(
                phase=phase,
                variant=name,
                batch=batch,
                median_ms=1e3 * med,
                ci95_ms=[1e3 * v for v in timing.bootstrap_median_ci(t.times[name])],
                samples_per_s=batch / med,
                time_ratio=dict(median=r.median, ci95=list(r.ci), against=t.baseline),
                speedup=1.0 / r.median,
                compiled_memory_bytes=memory[name],
            )
        )
    return rows


def run(*, quick: bool, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Times inference and training of every variant; returns rows, weights and memory."""
    batch = 256 if quick else 1024
    model = models.make_model("cnn", INPUT_SHAPE, 10)
    x = jax.random.normal(jax.random.key(seed), (batch, *INPUT_SHAPE))
    y = jax.random.randint(jax.random.key(seed + 1), (batch,), 0, 10)
    variables = jax.jit(model.init)(jax.random.key(seed + 2), x[:2])
    qmodels = {}
    for mode in ("simulate", "int"):
        qm, _ = ql.quantize_model(model, QuantRule(".*", mode=mode), x[:2])
        qmodels[mode] = (qm, qm.calibrate(qm.attach(variables, x[:2]), [x]))
    qm, qv = qmodels["simulate"]
    oqp = C.output_qparams_from_data(qm, qv, [x])
    program = C.convert(qm, qv, x[:2], output_qparams=oqp)
    xq = program.quantize_input(x)

    infer = {
        "float": (model.apply, (variables, x)),
        **{m: (q.with_phase("eval").apply, (v, x)) for m, (q, v) in qmodels.items()},
        "program": (C.run, (program, xq)),
        "program_e2e": (
            lambda p, x: p.dequantize_output(C.run(p, p.quantize_input(x))),
            (program, x),
        ),
    }
    fns = {name: functools.partial(jax.jit(f), *a) for name, (f, a) in infer.items()}
    t_inf = timing.measure(fns, baseline="float", rounds=rounds, seed=seed)
    mem_inf = {name: compiled_memory(f, *a) for name, (f, a) in infer.items()}

    opt = optax.adam(1e-3)
    steppers, raw = {}, {}
    steppers["float"], raw["float"] = _stepper(model, variables, opt, x, y)
    for mode, (q, v) in qmodels.items():
        steppers[mode], raw[mode] = _stepper(q.with_phase("train"), v, opt, x, y)
    t_train = timing.measure(steppers, baseline="float", rounds=rounds, seed=seed)
    mem_train = {name: compiled_memory(step, s, x, y) for name, (step, s) in raw.items()}

    with tempfile.TemporaryDirectory() as tmp:
        program_bytes = C.save(program, pathlib.Path(tmp) / "program.safetensors")
    stats = jax.devices()[0].memory_stats()
    rows = _rows("inference", t_inf, batch, mem_inf) + _rows("training", t_train, batch, mem_train)
    return dict(
        model="MNIST-1D CNN (jquant.models 'cnn'), inputs (N, 40, 1), initialised weights",
        batch=batch,
        quantization="QuantRule('.*', mode=...): int8 weights per channel, int8 activations "
        "calibrated on the batch; program: jquant.convert.convert (double requantization)",
        rows=rows,
        weights_bytes=dict(weight_bytes(variables["params"]), program_file=program_bytes),
        device_peak_memory_bytes=None if stats is None else stats.get("peak_bytes_in_use"),
        device_memory_source="memory_stats()" if stats else "none on this backend (CPU)",
        compiled_memory="memory_analysis(): arguments + outputs + temporaries - aliased",
    )


def format_summary(payload: dict[str, Any]) -> str:
    """The rows as a text table, then the weight bytes."""
    lines = [
        f"MNIST-1D CNN, batch {payload['batch']}",
        f"{'phase':<11}{'variant':<13}{'median ms':>10}{'samples/s':>12}  x float [95% CI]"
        f"{'compiled B':>13}",
    ]
    for r in payload["rows"]:
        t = r["time_ratio"]
        mem = r["compiled_memory_bytes"]
        lines.append(
            f"{r['phase']:<11}{r['variant']:<13}{r['median_ms']:>10.3f}{r['samples_per_s']:>12.0f}"
            f"  {t['median']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]"
            f"{'-' if mem is None else mem:>13}"
        )
    lines.append("weights: " + ", ".join(f"{k} {v} B" for k, v in payload["weights_bytes"].items()))
    return "\n".join(lines)
