"""Benchmark of jquant.export: file sizes and LiteRT latency of the MNIST-1D CNN.

The model is ``benchmarks/integer.py``'s: the zoo CNN trained on MNIST-1D (cached by
``train_or_load``), PTQ with int8 weights per channel and int8 activations (minmax on 1024
representative examples), converted and retargeted to XNNPACK (``fp32`` requantization).

- Sizes: the .tflite (int8 in and out) and the ONNX QOperator and QDQ files against the float32
  model written the same way as the float checkpoint of ``benchmarks/integer.py`` (its
  parameters as float32 safetensors): jquant has no float exporter, so the baseline is the
  float32 weights every float .tflite / ONNX file must hold, plus the safetensors header
  (target <= 0.27x).
- Latency: the .tflite in LiteRT with its default XNNPACK delegate (``num_threads`` recorded)
  against the jquant program under ``jax.jit`` (``convert.run`` on int8 codes), batch 1 and
  256, with ``jquant.bench.timing.measure`` (warm-up calls, then interleaved, shuffled rounds;
  median of the paired ratio ``t_litert / t_jquant`` with its bootstrap 95% CI).
- Check: LiteRT's codes equal the program's on the whole test set (counted), accuracies.

- Byte breakdown of each file (``size.breakdown``): weights, biases, per-channel scales and
  zero points, activation quantizers, names, and the container's own structure (flatbuffer
  tables, vtables, shape vectors, alignment; protobuf tags, lengths, op types, attributes),
  with the ``floor``: the bytes the runtimes require whatever the writer does, and why.
- Sizes against model width (``size_vs_width``, with its own meta): the same CNN with every
  conv and dense width times 1, 2, 4, 8, random weights (sizes depend on shapes, not values:
  the 1x row equals the trained model's sizes), each row with the four files' bytes and
  ratios, the floors and :data:`RATIO_MODEL`, the closed form of the ratio: per-channel
  metadata ``b`` bytes per output channel against 4 bytes per float weight, amortized over
  the fan-in ``F = W / C`` (weights per output channel), which grows with the width.

JSON goes to ``benchmarks/results/export.json``.

    python benchmarks/export.py               # 30 rounds per batch size
    python benchmarks/export.py --quick       # 5 rounds
    python benchmarks/export.py --sizes-only  # sizes and the sweep, merged into the JSON
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import pathlib
import tempfile
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
import onnx
import tflite
from flax import traverse_util

from jquant import bench
from jquant import convert as C
from jquant import export as E
from jquant.data import Dataset, load_mnist1d
from jquant.models import CNNConfig, model_config
from jquant.models import train as T
from jquant.models.linen import CNN
from jquant.nn import QuantRule
from jquant.nn import linen as ql

SIZE_TARGET = 0.27
BATCHES = (1, 256)
WIDTHS = (1, 2, 4, 8)  # width multipliers of the size sweep


def _flat(tree) -> dict[str, np.ndarray]:
    """``{"a.b.kernel": float32 array}``: the parameters as a safetensors file stores them."""
    flat = traverse_util.flatten_dict(dict(tree), sep=".")
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


_TFLITE_KINDS = {
    tflite.TensorType.INT8: ("weight codes (int8)", "weight scales (float32)"),
    tflite.TensorType.INT32: ("biases (int32)", "bias scales (float32)"),
}


def tflite_breakdown(data: bytes) -> dict[str, int]:
    """Bytes of a .tflite by what they hold, each shared buffer or vector counted once;
    ``structure``: the rest (tables, vtables, shape and operator vectors, padding)."""
    model = tflite.Model.GetRootAsModel(data, 0)
    g = model.Subgraphs(0)
    out: collections.Counter = collections.Counter()
    seen: set[tuple] = set()

    def once(key: tuple, n: int, what: str) -> None:
        if key not in seen:
            seen.add(key)
            out[what] += n

    for i in range(g.TensorsLength()):
        t = g.Tensors(i)
        n = model.Buffers(t.Buffer()).DataLength()
        data_of, scale_of = _TFLITE_KINDS.get(t.Type(), ("other constants", ""))
        if n:
            once(("buffer", t.Buffer()), n, data_of)
        out["tensor names"] += len(t.Name() or b"")
        q = t.Quantization()
        if q is None or q.ScaleLength() == 0:
            continue
        per_channel = n > 0 and q.ScaleLength() > 1
        scale_of = scale_of if per_channel else "activation scales (float32)"
        zp_of = "per-channel zero points (int64)" if per_channel else "activation zero points"
        # the vectors' positions: a vector shared by several tensors is stored once
        once(("scale", q._tab.Vector(q._tab.Offset(8))), 4 * q.ScaleLength(), scale_of)
        once(("zp", q._tab.Vector(q._tab.Offset(10))), 8 * q.ZeroPointLength(), zp_of)
    out["description"] = len(model.Description() or b"")
    out["structure"] = len(data) - sum(out.values())
    return dict(out)


def onnx_breakdown(model: onnx.ModelProto) -> dict[str, int]:
    """Bytes of an ONNX model by what they hold; ``structure``: the rest (protobuf tags and
    lengths, op types, attributes, dims, opsets)."""
    consumers = collections.defaultdict(list)
    for n in model.graph.node:
        for k, name in enumerate(n.input):
            consumers[name].append((n, k))
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out: collections.Counter = collections.Counter()
    for name, a in inits.items():
        raw = next(t for t in model.graph.initializer if t.name == name)
        n = len(raw.raw_data) or a.nbytes
        if a.dtype == np.int64:
            what = "shapes (int64)"
        elif a.size == 1:
            what = "activation scales and zero points"
        elif a.dtype == np.int8 or a.dtype == np.int32:
            what = "weight codes (int8)" if a.dtype == np.int8 else "biases (int32)"
        else:
            node, k = consumers[name][0]
            biased = node.op_type == "DequantizeLinear" and inits[node.input[0]].dtype == np.int32
            what = "bias scales (float32)" if biased else "weight scales (float32)"
        out[what] += n
        out["initializer names"] += len(name)
    out["value names"] = sum(len(o) for n in model.graph.node for o in n.output)
    out["structure"] = len(model.SerializeToString()) - sum(out.values())
    return dict(out)


# the bytes each runtime requires: the codes, the int32 biases, a float32 scale per output
# channel of the weights (and, in .tflite and QDQ, of the biases), and in .tflite an int64
# zero point per channel (one shared vector per channel count)
_REQUIRED = {
    "tflite": ("weight codes (int8)", "biases (int32)", "weight scales (float32)",
               "bias scales (float32)", "per-channel zero points (int64)"),
    "onnx_qoperator": ("weight codes (int8)", "biases (int32)",
                       "weight scales (float32)"),
    "onnx_qdq": ("weight codes (int8)", "biases (int32)", "weight scales (float32)",
                 "bias scales (float32)"),
}  # fmt: skip
WHY = {  # why a file misses the target, filled in with the measured bytes
    "tflite": (
        "LiteRT refuses a zero_point vector shorter than its scale vector ('QuantizationParam "
        "has 1 zero_point values and 32 scale values. Must have same number'), so each "
        "per-channel weight and bias tensor carries one int64 zero point per channel (shared "
        "here: one vector per channel count); without the biases' per-channel quantization "
        "XNNPACK does not delegate the layers (417 of 5,120 codes differed from its output). "
        "These required bytes ({floor:,}) alone exceed the target ({target:,} bytes)."
    ),
    "onnx_qdq": (
        "QDQ needs a float32 scale per bias channel besides QOperator's data, and spells each "
        "layer as DequantizeLinear nodes (input, weights, bias), Conv and QuantizeLinear: the "
        "required data ({floor:,} bytes) leaves {left:,} bytes under the target ({target:,}) "
        "for {nodes} nodes and {inits} initializers, whose encoding takes {rest:,} bytes."
    ),
}


def calibrated_program(model: nn.Module, variables: dict, data: Dataset) -> C.Program:
    """The benchmark's int8 program of a float Linen ``model``: every layer int8 per channel,
    activations minmax-calibrated on 1024 training examples (8 batches of 128), the output
    quantizer from data, requantized as XNNPACK does (``fp32``)."""
    x0 = data.x_train[:2]
    qmodel, _ = ql.quantize_model(model, QuantRule(".*"), x0)
    calib = [data.x_train[i * 128 : (i + 1) * 128] for i in range(8)]
    v = qmodel.calibrate(qmodel.attach(variables, x0), calib)
    oqp = C.output_qparams_from_data(qmodel, v, calib)
    return C.retarget(C.convert(qmodel, v, x0, output_qparams=oqp), "xnnpack")


def size_report(program: C.Program, variables: dict) -> dict:
    """The four int8 files of ``program`` against the float32 ``variables`` in safetensors.

    ``ratio = bytes / float32_bytes``, ``target_met = ratio <= SIZE_TARGET``; each .tflite and
    ONNX file's ``breakdown`` (its parts sum to its bytes) with its ``floor``: the required
    parts' bytes, and ``why_not_met`` when the file misses the target.
    """
    tfl = E.tflite_bytes(program)
    onnx_program = C.retarget(program, "onnxruntime")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        files = {
            "tflite": E.to_tflite(program, tmp / "m.tflite"),
            "onnx_qoperator": E.to_onnx(onnx_program, tmp / "q.onnx"),
            "onnx_qdq": E.to_onnx(onnx_program, tmp / "d.onnx", form="qdq"),
            "program": C.save(program, tmp / "p.safetensors"),
        }
        float_bytes = C.write_tensors(tmp / "float.safetensors", _flat(variables), {})
    models = {
        "onnx_qoperator": E.onnx_model(onnx_program),
        "onnx_qdq": E.onnx_model(onnx_program, form="qdq"),
    }
    breakdown = {"tflite": tflite_breakdown(tfl)}
    breakdown |= {key: onnx_breakdown(model) for key, model in models.items()}
    for key, parts in breakdown.items():
        assert sum(parts.values()) == files[key], key
        floor = sum(parts.get(k, 0) for k in _REQUIRED[key])
        parts["floor"] = dict(required=list(_REQUIRED[key]), bytes=floor, ratio=floor / float_bytes)
        if files[key] / float_bytes > SIZE_TARGET:
            target = int(SIZE_TARGET * float_bytes)
            model = models.get(key, onnx.ModelProto())
            parts["floor"]["why_not_met"] = WHY[key].format(
                floor=floor, target=target, left=target - floor, rest=files[key] - floor,
                nodes=len(model.graph.node), inits=len(model.graph.initializer),
            )  # fmt: skip
    return dict(
        float32_bytes=float_bytes,
        breakdown=breakdown,
        files={
            k: dict(bytes=n, ratio=n / float_bytes, target_met=bool(n / float_bytes <= SIZE_TARGET))
            for k, n in files.items()
        },
        target=SIZE_TARGET,
        weights=int(sum(np.size(w) for w in jax.tree.leaves(variables["params"]))),
    )


# the closed-form model of the ratio: bytes each format requires per output channel (int32
# bias, float32 weight scale, float32 bias scale) and per entry of each distinct per-channel
# zero-point vector (the .tflite's int64 zero points, one vector per channel count)
PER_CHANNEL = {"tflite": 12, "onnx_qoperator": 8, "onnx_qdq": 12}
PER_DISTINCT_CHANNEL = {"tflite": 8, "onnx_qoperator": 0, "onnx_qdq": 0}
RATIO_MODEL = (
    "W weight codes (int8, 1 byte each), C output channels (= biases), D = the sum of the "
    "distinct channel counts (one shared zero-point vector each in the .tflite), S the rest of "
    "a file (names, activation quantizers, shapes, tables, tags: about constant in width), h the "
    "float file's safetensors header. Required bytes floor = W + b C + z D (b bytes per output "
    "channel: .tflite 12 = int32 bias + float32 weight scale + float32 bias scale, QOperator 8, "
    "QDQ 12; z: .tflite 8 for its int64 zero points, else 0); float32 bytes = 4 (W + C) + h; "
    "ratio = (W + b C + z D + S) / (4 (W + C) + h) -> (F + b + z D / C) / (4 (F + 1)) as the "
    "width grows, F = W / C the mean weights per output channel (fan-in), against 1/4 for the "
    "codes alone. Target t met iff (4 t - 1) W >= (b - 4 t) C + z D + S - t h, i.e. at t = 0.27 "
    "F >= 12.5 (b - 1.08 + z D / C + (S - 0.27 h) / C) (min_fan_in)."
)


def widened(config: CNNConfig, k: int) -> CNNConfig:
    """``config`` with every width times ``k``: ``features_i -> k features_i``, ``dense_j ->
    k dense_j``; kernel, pooling and the head's ``num_classes`` unchanged. The weights grow as
    ``k^2``, the output channels as ``k``, so the fan-in ``F = W / C`` grows as ``k``."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (width multiplier) must be an int >= 1, got {k!r}")
    return dataclasses.replace(
        config,
        features=tuple(k * f for f in config.features),
        dense=tuple(k * d for d in config.dense),
    )


def channel_counts(params: dict) -> dict[str, int]:
    """``W`` (kernel elements), ``C`` (output channels: bias elements) and ``D`` (the sum of
    the distinct output-channel counts) of a Linen CNN's ``params``."""
    layers = list(params.values())
    return dict(
        W=int(sum(np.size(p["kernel"]) for p in layers)),
        C=int(sum(np.size(p["bias"]) for p in layers)),
        D=int(sum({np.size(p["bias"]) for p in layers})),
    )


def ratio_model(counts: dict[str, int], size: dict) -> dict[str, dict]:
    """Per format, the closed form :data:`RATIO_MODEL` at these ``counts`` and measured
    ``size``: the formula's required bytes ``floor = W + b C + z D`` (equal to the measured
    floor), the rest ``S`` (file minus floor), the ratio ``(floor + S) / (4 (W + C) + h)`` and
    ``min_fan_in`` ``12.5 (b - 4 t + z D / C + (S - t h) / C)`` (for ``t = SIZE_TARGET``,
    ``12.5 = 1 / (4 t - 1)``) against the fan-in ``W / C``."""
    W, Cn, D = counts["W"], counts["C"], counts["D"]
    t, float_bytes = size["target"], size["float32_bytes"]
    h = float_bytes - 4 * (W + Cn)
    out = {}
    for key, b in PER_CHANNEL.items():
        z = PER_DISTINCT_CHANNEL[key]
        floor = W + b * Cn + z * D
        rest = size["files"][key]["bytes"] - floor
        min_fan_in = (b - 4 * t + z * D / Cn + (rest - t * h) / Cn) / (4 * t - 1)
        out[key] = dict(
            b=b, z=z, floor=floor, rest=rest, ratio=(floor + rest) / (4 * (W + Cn) + h),
            min_fan_in=min_fan_in, met=bool(W / Cn >= min_fan_in),
        )  # fmt: skip
    return out


def random_variables(model: nn.Module, x: jax.Array, seed: int) -> dict:
    """``model``'s variables with Flax's default initial kernels and biases ``b ~ N(0, 0.1^2)``
    instead of Flax's zeros: the writers store equal tensors once, so zero biases (equal in
    every layer of the same width) would make the files smaller than a trained model's."""
    init_key, bias_key = jax.random.split(jax.random.key(seed))
    flat = traverse_util.flatten_dict(model.init(init_key, x))
    keys = jax.random.split(bias_key, len(flat))
    flat = {
        path: 0.1 * jax.random.normal(key, v.shape, v.dtype) if path[-1] == "bias" else v
        for key, (path, v) in zip(keys, flat.items(), strict=True)
    }
    return traverse_util.unflatten_dict(flat)


def width_sweep(data: Dataset, widths: Sequence[int], *, seed: int = 0) -> dict:
    """File sizes of the zoo CNN with every width times ``k`` for ``k`` in ``widths``.

    The weights are random (:func:`random_variables`), not trained: file sizes depend on the
    tensors' shapes, not their values, as long as no two tensors are equal (the writers store
    those once). Each is calibrated and converted by :func:`calibrated_program` and measured
    by :func:`size_report`; each row adds the counts ``W``, ``C``, ``D``, the fan-in ``W / C``
    and :func:`ratio_model`.
    """
    base = model_config("cnn", data.input_shape, data.num_classes)
    x0 = data.x_train[:2]
    rows = []
    for k in widths:
        config = widened(base, k)
        model = CNN(config)
        variables = random_variables(model, x0, seed)
        size = size_report(calibrated_program(model, variables, data), variables)
        counts = channel_counts(variables["params"])
        rows.append(
            dict(
                width=k,
                features=list(config.features),
                dense=list(config.dense),
                weights=size["weights"],
                counts=counts,
                fan_in=counts["W"] / counts["C"],
                size=size,
                model=ratio_model(counts, size),
            )
        )
    return dict(
        weights=f"random init (seed {seed}): Flax's default kernels, biases N(0, 0.1^2) (not "
        "Flax's zeros, which the writers would store once per width), not trained: sizes depend "
        "on the shapes only (the 1x row equals the trained model's sizes); calibrated like the "
        "main measurement (minmax on 1024 MNIST-1D training examples, the output quantizer from "
        "data, xnnpack requantization)",
        model="the zoo CNN ('cnn' on MNIST-1D) with every conv and dense width times k",
        ratio_model=RATIO_MODEL,
        target=SIZE_TARGET,
        rows=rows,
    )


def merge_sizes(path: str | os.PathLike, size: dict, sweep: dict) -> pathlib.Path:
    """Adds ``sweep`` as ``size_vs_width`` to the results at ``path``, keeping their meta,
    timing, accuracy and agreement.

    Raises:
      ValueError: ``path`` holds no full run (no ``timing``), or its ``size`` differs from
        ``size`` (measured now): its meta would no longer describe it; run the full benchmark.
    """
    path = pathlib.Path(path)
    payload = json.loads(path.read_text())
    if "timing" not in payload or "meta" not in payload:
        raise ValueError(f"{path}: no full run (timing and meta) to merge the sizes into")
    if payload["size"] != json.loads(json.dumps(size)):
        raise ValueError(
            f"{path}: the model's sizes measured now differ from the stored ones; run the full "
            "benchmark (without --sizes-only)"
        )
    return bench.write_results(path, payload | dict(size_vs_width=sweep))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 30")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3000, help="float training steps (cached)")
    parser.add_argument("--threads", type=int, default=None, help="LiteRT num_threads")
    parser.add_argument(
        "--sizes-only",
        action="store_true",
        help="measure the sizes and the width sweep only and merge them into --out, keeping its "
        "timing, accuracy and meta (refused if the model's sizes differ from the stored ones)",
    )
    parser.add_argument(
        "--widths", type=int, nargs="+", default=list(WIDTHS), help="width multipliers to sweep"
    )
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "export.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    rounds = args.rounds or (5 if args.quick else 30)

    data = load_mnist1d()
    trained = T.train_or_load("cnn", data, 0, args.steps)
    program = calibrated_program(trained.model, trained.variables, data)
    size = size_report(program, trained.variables)
    sweep = width_sweep(data, args.widths)
    sweep["meta"] = bench.results_meta(quick=args.quick, load_before=load_before)
    for row in sweep["rows"]:
        print(
            f"width x{row['width']}: {row['weights']:,} parameters, "
            + ", ".join(f"{k} {f['ratio']:.3f}x" for k, f in row["size"]["files"].items())
        )
    if args.sizes_only:
        out = merge_sizes(args.out, size, sweep)
        print(f"merged the sizes into {out}")
        return

    tfl = E.tflite_bytes(program)

    run = jax.jit(C.run)
    timing = {}
    for batch in BATCHES:
        xq = np.asarray(program.quantize_input(data.x_test[:batch]))
        litert = E.tflite_runner(tfl, xq.shape, np.int8, num_threads=args.threads)
        xq_jax = jax.device_put(xq)
        fns = {
            "jquant": lambda xq_jax=xq_jax: run(program, xq_jax),
            "litert": lambda litert=litert, xq=xq: litert(xq),
        }
        timings = bench.measure(fns, baseline="jquant", rounds=rounds)
        timing[f"batch {batch}"] = timings.to_json()
        print(timings.format(f"batch {batch}"))

    xq = np.asarray(program.quantize_input(data.x_test))
    codes = np.asarray(run(program, xq))
    got = E.run_tflite(tfl, xq).reshape(codes.shape)
    y = np.asarray(data.y_test)
    accuracy = dict(
        float=float(
            np.mean(np.asarray(trained.model.apply(trained.variables, data.x_test)).argmax(1) == y)
        ),
        program=float(np.mean(codes.argmax(1) == y)),
        litert_xnnpack=float(np.mean(got.argmax(1) == y)),
    )
    agreement = dict(codes_differing=int(np.sum(got != codes)), codes_total=int(codes.size))

    for name, f in size["files"].items():
        print(f"size {name}: {f['bytes']} B, {f['ratio']:.3f}x float32 ({size['float32_bytes']} B)")
    differ, total = agreement["codes_differing"], agreement["codes_total"]
    print(f"LiteRT vs program: {differ} of {total} codes differ")
    print("test accuracy: " + ", ".join(f"{k} {100 * a:.2f}%" for k, a in accuracy.items()))
    config = dict(
        rounds=rounds,
        batches=list(BATCHES),
        litert_num_threads=args.threads,
        model="MNIST-1D CNN (jquant.models 'cnn'), int8 weights per channel, int8 activations, "
        "xnnpack requantization (fp32)",
        float_baseline="float32 parameters in safetensors (benchmarks/integer.py's checkpoint)",
        cpus_usable=len(os.sched_getaffinity(0)),
    )
    meta = bench.results_meta(quick=args.quick, load_before=load_before)
    out = bench.write_results(
        args.out,
        dict(meta=meta, config=config, size=size, timing=timing, accuracy=accuracy,
             agreement=agreement, size_vs_width=sweep),
    )  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
