"""``jquant bench model``: throughput and memory of the MNIST-1D CNN and the small GPT in
each execution mode.

Models: :mod:`jquant.models`' ``"cnn"`` on MNIST-1D-shaped inputs ``(N, 40, 1)``
(initialised, not trained: throughput does not depend on the weights) and the small GPT
(:func:`gpt_model`: the cached zoo GPT, or a freshly initialised one of the same config when
the cache has none; the payload says which) on random token windows ``(N, context)``. Each is
quantized by one rule ``QuantRule(".*", mode=...)`` (int8 kernels per channel, int8
activations calibrated on the batch; the GPT's attention products stay float). Variants,
timed together per phase with :func:`jquant.bench.timing.measure`:

- inference: ``float``; ``simulate`` and ``int`` (:mod:`jquant.nn`, phase eval); for the
  CNN, ``program`` (:func:`jquant.convert.run` of the integer-only program, int8 codes in and
  out) and ``program_e2e`` (with input quantization and output dequantization); for the GPT,
  a ``program`` row with status ``unsupported`` and ``jquant.convert``'s refusal (it has no
  attention);
- training (one optax Adam step): ``float``, ``simulate``, ``int`` (int8 forward, straight-
  through backward).

Per variant: median ms and its interval, ``samples_per_s = batch / median`` (and for the GPT
``tokens_per_s = batch * context / median``), the time ratio to ``float`` in the same round,
and memory: the compiled program's (``memory_analysis()``: arguments + outputs +
temporaries - aliased) on every backend, and where the backend has ``memory_stats()`` (GPU,
TPU; not CPU) the device's ``peak_bytes_in_use`` after the variant's first run (process-wide,
never reset: an upper bound). Weight bytes per format (:func:`weight_bytes`): float32,
bfloat16, int8 and packed int4 kernels (two codes per byte, :func:`jquant.integer.packing.pack`,
as the program file stores them), each with float32 per-channel scales and the other
parameters in float32; for the CNN also the saved integer program's file.
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
from jquant import data
from jquant.bench import timing
from jquant.formats import int4, int8
from jquant.integer.packing import pack
from jquant.models import gpt as gpt_lib
from jquant.models import linen as models
from jquant.models import train as T
from jquant.models.config import GPTConfig, model_config
from jquant.models.gpt import GPT
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.quant import QuantConfig, dynamic_qparams, quantize

__all__ = [
    "CSV_COLUMNS",
    "compiled_memory",
    "device_peaks",
    "format_summary",
    "gpt_model",
    "run",
    "run_cnn",
    "run_gpt",
    "weight_bytes",
]

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


def device_peaks(fns: dict[str, Any]) -> dict[str, int | None]:
    """``memory_stats()["peak_bytes_in_use"]`` after the first call of each zero-argument
    callable, in order, or None per callable where the backend has no ``memory_stats()``
    (CPU). The device's peak is process-wide and never reset, so each value bounds the
    variant's peak from above (it includes every earlier allocation's)."""
    device = jax.devices()[0]
    peaks: dict[str, int | None] = {}
    for name, fn in fns.items():
        jax.block_until_ready(fn())
        stats = device.memory_stats()
        peaks[name] = None if not stats else stats.get("peak_bytes_in_use")
    return peaks


def _rows(
    phase: str,
    t: timing.Timings,
    batch: int,
    memory: dict,
    peaks: dict,
    tokens_per_sample: int | None,
) -> list[dict[str, Any]]:
    rows = []
    for name in t.times:
        r = t.ratio(name)
        med = t.median(name)
        row = dict(
            phase=phase,
            variant=name,
            status="ok",
            batch=batch,
            median_ms=1e3 * med,
            ci95_ms=[1e3 * v for v in timing.bootstrap_median_ci(t.times[name])],
            samples_per_s=batch / med,
            time_ratio=dict(median=r.median, ci95=list(r.ci), against=t.baseline),
            speedup=1.0 / r.median,
            compiled_memory_bytes=memory[name],
            device_peak_bytes=peaks[name],
        )
        if tokens_per_sample is not None:
            row["tokens_per_s"] = batch * tokens_per_sample / med
        rows.append(row)
    return rows


def _quantized(model, variables, x) -> dict[str, tuple[Any, Any]]:
    """``{"simulate": (qmodel, qvariables), "int": ...}``: ``QuantRule(".*", mode=...)``,
    activation ranges calibrated on ``x``; attention's activation x activation products
    (``scores``, ``mix``) stay float: the rows time quantized weights x activations only."""
    out = {}
    for mode in ("simulate", "int"):
        rules = [QuantRule(r".*/(scores|mix)$", keep_float=True), QuantRule(".*", mode=mode)]
        qm, _ = ql.quantize_model(model, rules, x[:2], on_unused="ignore")
        out[mode] = (qm, qm.calibrate(qm.attach(variables, x[:2]), [x]))
    return out


def _time_model(
    model,
    variables,
    x,
    y,
    qmodels: dict,
    *,
    programs: dict[str, tuple[Any, tuple]],
    rounds: int,
    seed: int,
    tokens_per_sample: int | None = None,
) -> list[dict[str, Any]]:
    """Inference (float, simulate, int and ``programs``) and one Adam training step (float,
    simulate, int) timed together per phase; one row per phase and variant."""
    batch = x.shape[0]
    infer = {
        "float": (model.apply, (variables, x)),
        **{m: (q.with_phase("eval").apply, (v, x)) for m, (q, v) in qmodels.items()},
        **programs,
    }
    fns = {name: functools.partial(jax.jit(f), *a) for name, (f, a) in infer.items()}
    peaks_inf = device_peaks(fns)
    t_inf = timing.measure(fns, baseline="float", rounds=rounds, seed=seed)
    mem_inf = {name: compiled_memory(f, *a) for name, (f, a) in infer.items()}

    opt = optax.adam(1e-3)
    steppers, raw = {}, {}
    steppers["float"], raw["float"] = _stepper(model, variables, opt, x, y)
    for mode, (q, v) in qmodels.items():
        steppers[mode], raw[mode] = _stepper(q.with_phase("train"), v, opt, x, y)
    peaks_train = device_peaks(steppers)
    t_train = timing.measure(steppers, baseline="float", rounds=rounds, seed=seed)
    mem_train = {name: compiled_memory(step, s, x, y) for name, (step, s) in raw.items()}
    return _rows("inference", t_inf, batch, mem_inf, peaks_inf, tokens_per_sample) + _rows(
        "training", t_train, batch, mem_train, peaks_train, tokens_per_sample
    )


def run_cnn(*, quick: bool, rounds: int, seed: int = 0) -> dict[str, Any]:
    """The MNIST-1D CNN: rows (``model="cnn"``) and its weight bytes per format."""
    batch = 256 if quick else 1024
    model = models.make_model("cnn", INPUT_SHAPE, 10)
    x = jax.random.normal(jax.random.key(seed), (batch, *INPUT_SHAPE))
    y = jax.random.randint(jax.random.key(seed + 1), (batch,), 0, 10)
    variables = jax.jit(model.init)(jax.random.key(seed + 2), x[:2])
    qmodels = _quantized(model, variables, x)
    qm, qv = qmodels["simulate"]
    oqp = C.output_qparams_from_data(qm, qv, [x])
    program = C.convert(qm, qv, x[:2], output_qparams=oqp)
    programs = {
        "program": (C.run, (program, program.quantize_input(x))),
        "program_e2e": (
            lambda p, x: p.dequantize_output(C.run(p, p.quantize_input(x))),
            (program, x),
        ),
    }
    rows = _time_model(model, variables, x, y, qmodels, programs=programs, rounds=rounds, seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        program_bytes = C.save(program, pathlib.Path(tmp) / "program.safetensors")
    return dict(
        description="MNIST-1D CNN (jquant.models 'cnn'), inputs (N, 40, 1), initialised weights",
        batch=batch,
        quantization="QuantRule('.*', mode=...): int8 weights per channel, int8 activations "
        "calibrated on the batch; program: jquant.convert.convert (double requantization)",
        rows=[dict(model="cnn", **r) for r in rows],
        weights_bytes=dict(weight_bytes(variables["params"]), program_file=program_bytes),
    )


def gpt_model(
    config: GPTConfig | None = None, *, seed: int = 0, cache: str | None = None
) -> tuple[GPT, dict, str]:
    """The GPT to time and where its weights come from.

    With ``config=None``: the zoo GPT (``model_config("gpt")`` on ``jquant.data.load("text")``)
    trained with :data:`jquant.models.gpt.TRAIN_RECIPE`, loaded from the weights cache
    (``cache``, default ``$JQUANT_CACHE`` or ``~/.cache/jquant``) when the file is there,
    otherwise freshly initialised with the same config (never trained here). A given
    ``config`` is freshly initialised.

    Returns:
      ``(model, variables, source)``, ``source`` saying which.
    """
    if config is None:
        ds = data.load("text")
        recipe = gpt_lib.TRAIN_RECIPE
        path = T.cache_path("gpt", ds, seed, T.TrainConfig(**recipe), cache=cache)
        if path.exists():
            trained = T.train_or_load("gpt", ds, seed, cache=cache, **recipe)
            return trained.model, trained.variables, f"zoo GPT, cached weights ({path})"
        config = model_config("gpt", ds.input_shape, ds.num_classes)
        source = f"zoo GPT config, freshly initialised (no cached weights at {path})"
    else:
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig or None, got {type(config).__name__}")
        source = "given GPTConfig, freshly initialised"
    model = GPT(config)
    tokens = np.zeros((1, config.context), np.int32)
    return model, jax.jit(model.init)(jax.random.key(seed), tokens), source


def _program_error(qmodel, qvariables, tokens) -> str:
    """Why the GPT has no integer-only program: ``jquant.convert``'s own refusal."""
    try:
        oqp = C.output_qparams_from_data(qmodel, qvariables, [tokens])
        C.convert(qmodel, qvariables, tokens[:2], output_qparams=oqp)
    except (ValueError, TypeError, NotImplementedError, KeyError) as e:
        return f"{type(e).__name__}: {e}"
    raise RuntimeError("jquant.convert converted the GPT: time its program in jquant bench model")


def run_gpt(
    *,
    quick: bool,
    rounds: int,
    seed: int = 0,
    config: GPTConfig | None = None,
    batch: int | None = None,
    cache: str | None = None,
) -> dict[str, Any]:
    """The small GPT (:func:`gpt_model`) on random token windows of its full context: rows
    (``model="gpt"``, with ``tokens_per_s = batch * context / median``), an ``unsupported``
    row for the integer program (``jquant.convert`` has no attention) and weight bytes."""
    model, variables, source = gpt_model(config, seed=seed, cache=cache)
    cfg = model.config
    batch = batch or (4 if quick else 16)
    keys = jax.random.split(jax.random.key(seed + 3))
    tokens = jax.random.randint(keys[0], (batch, cfg.context), 0, cfg.vocab_size)
    labels = jax.random.randint(keys[1], (batch, cfg.context), 0, cfg.vocab_size)
    qmodels = _quantized(model, variables, tokens)
    rows = _time_model(
        model,
        variables,
        tokens,
        labels,
        qmodels,
        programs={},
        rounds=rounds,
        seed=seed,
        tokens_per_sample=cfg.context,
    )
    rows.append(
        dict(
            phase="inference",
            variant="program",
            status="unsupported",
            batch=batch,
            error=_program_error(*qmodels["simulate"], tokens),
        )
    )
    return dict(
        description=f"small GPT (jquant.models.gpt) {cfg}: {source}",
        batch=batch,
        context=cfg.context,
        quantization="QuantRule('.*', mode=...) on every Dense kernel (query, key, value, out, "
        "up, down): int8 per channel, int8 activations calibrated on the batch; the attention "
        "products (q k^T, softmax v), embeddings and norms stay float; no integer program "
        "(jquant.convert has no attention)",
        rows=[dict(model="gpt", **r) for r in rows],
        weights_bytes=weight_bytes(variables["params"]),
    )


def run(*, quick: bool, rounds: int, seed: int = 0, gpt_config: GPTConfig | None = None):
    """Times the CNN and the GPT (:func:`run_cnn`, :func:`run_gpt`); returns every row
    (``model`` names which), each model's description and weight bytes, and the memory
    sources."""
    parts = dict(
        cnn=run_cnn(quick=quick, rounds=rounds, seed=seed),
        gpt=run_gpt(quick=quick, rounds=rounds, seed=seed, config=gpt_config),
    )
    stats = jax.devices()[0].memory_stats()
    return dict(
        rows=[r for p in parts.values() for r in p.pop("rows")],
        models=parts,
        device_peak_memory_bytes=None if not stats else stats.get("peak_bytes_in_use"),
        device_memory_source="memory_stats()" if stats else "none on this backend (CPU)",
        compiled_memory="memory_analysis(): arguments + outputs + temporaries - aliased",
    )


def format_summary(payload: dict[str, Any]) -> str:
    """Per model: the rows as a text table (tokens/s for the GPT, samples/s otherwise), then
    the weight bytes per format."""
    lines = []
    for name, part in payload["models"].items():
        rows = [r for r in payload["rows"] if r["model"] == name]
        unit = "tokens/s" if "tokens_per_s" in rows[0] else "samples/s"
        lines += [
            f"{part['description']}, batch {part['batch']}",
            f"{'phase':<11}{'variant':<13}{'median ms':>10}{unit:>12}  x float [95% CI]"
            f"{'compiled B':>13}{'device peak B':>15}",
        ]
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"{r['phase']:<11}{r['variant']:<13}{r['status']}: {r['error']}")
                continue
            t = r["time_ratio"]
            rate = r.get("tokens_per_s", r["samples_per_s"])
            mem, peak = r["compiled_memory_bytes"], r["device_peak_bytes"]
            lines.append(
                f"{r['phase']:<11}{r['variant']:<13}{r['median_ms']:>10.3f}{rate:>12.0f}"
                f"  {t['median']:.3f} [{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]"
                f"{'-' if mem is None else mem:>13}{'-' if peak is None else peak:>15}"
            )
        weights = part["weights_bytes"].items()
        lines.append("weights: " + ", ".join(f"{k} {v} B" for k, v in weights))
    lines.append(f"device peak memory: {payload['device_memory_source']}")
    return "\n".join(lines)


CSV_COLUMNS = (
    "model",
    "phase",
    "variant",
    "status",
    "batch",
    "median_ms",
    "ci95_ms",
    "samples_per_s",
    "tokens_per_s",
    "time_ratio",
    "speedup",
    "compiled_memory_bytes",
    "device_peak_bytes",
    "error",
)
