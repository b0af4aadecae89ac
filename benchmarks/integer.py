"""Benchmark of jquant.convert: the integer program vs the float model (MNIST-1D CNN).

Times batch-256 inference, jitted and warmed up, with ``jquant.bench.timing.measure``
(interleaved, shuffled rounds; median paired ratio to float with a bootstrap 95% CI; a target
is met only when the CI lies below it): the float Linen model, the fake-quant model (phase
``eval``), and the integer program (``run`` on int8 codes; and end to end with
``quantize_input`` / ``dequantize_output``) in each requantization mode. Reports the ratios
to float (target: integer <= 1.0x), the saved program's size vs the float checkpoint written
the same way (safetensors layout, float32; target <= 0.27x), test accuracies, and the argmax
agreement of each program with the fake-quant model and with ``convert.simulation`` (its
requantization). JSON goes to ``benchmarks/results/integer.json``.

    python benchmarks/integer.py            # trained CNN (cached by train_or_load), 15 rounds
    python benchmarks/integer.py --quick    # 5 rounds
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import jax
import numpy as np
from flax import traverse_util

from jquant import bench
from jquant import convert as C
from jquant.data import load_mnist1d
from jquant.formats import int8
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.quant import quantize

BATCH = 256
TIME_TARGET = 1.0
SIZE_TARGET = 0.27
MODES = ("double", "single", "fp32")


def _flat(tree) -> dict[str, np.ndarray]:
    """``{"a.b.kernel": float32 array}``: the parameters as a safetensors file stores them."""
    flat = traverse_util.flatten_dict(dict(tree), sep=".")
    return {k: np.asarray(v, np.float32) for k, v in flat.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3000, help="float training steps (cached)")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "integer.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    rounds = args.rounds or (5 if args.quick else 15)

    data = load_mnist1d()
    trained = T.train_or_load("cnn", data, 0, args.steps)
    x0 = data.x_train[:2]
    qmodel, _ = ql.quantize_model(trained.model, QuantRule(".*"), x0)
    calib = [data.x_train[i * 128 : (i + 1) * 128] for i in range(8)]
    v = qmodel.calibrate(qmodel.attach(trained.variables, x0), calib)
    oqp = C.output_qparams_from_data(qmodel, v, calib)
    programs = {m: C.convert(qmodel, v, x0, output_qparams=oqp, mode=m) for m in MODES}

    x = data.x_test[:BATCH]
    float_fn = jax.jit(trained.model.apply)
    fq_fn = jax.jit(qmodel.with_phase("eval").apply)
    run = jax.jit(C.run)
    end_to_end = jax.jit(lambda p, x: p.dequantize_output(C.run(p, p.quantize_input(x))))
    fns = {
        "float": lambda: float_fn(trained.variables, x),
        "fake-quant": lambda: fq_fn(v, x),
    }
    for m, p in programs.items():
        xq = p.quantize_input(x)
        fns[f"int {m}"] = lambda p=p, xq=xq: run(p, xq)
        fns[f"int {m} e2e"] = lambda p=p: end_to_end(p, x)
    timings = bench.measure(fns, baseline="float", rounds=rounds)
    timing = timings.to_json({name: TIME_TARGET for name in fns if name.startswith("int")})

    with tempfile.TemporaryDirectory() as tmp:
        prog_bytes = C.save(programs["double"], pathlib.Path(tmp) / "program.safetensors")
        float_bytes = C.write_tensors(
            pathlib.Path(tmp) / "float.safetensors", _flat(trained.variables), {}
        )
    size = dict(
        program_bytes=prog_bytes,
        float_checkpoint_bytes=float_bytes,
        ratio=prog_bytes / float_bytes,
        target=SIZE_TARGET,
        target_met=bool(prog_bytes / float_bytes <= SIZE_TARGET),
        weights=int(sum(np.size(w) for w in jax.tree.leaves(trained.variables["params"]))),
    )

    y = np.asarray(data.y_test)
    accuracy = {
        "float": float(np.mean(np.asarray(float_fn(trained.variables, data.x_test)).argmax(1) == y))
    }
    accuracy["fake-quant"] = float(np.mean(np.asarray(fq_fn(v, data.x_test)).argmax(1) == y))
    fq_codes = np.asarray(quantize(fq_fn(v, data.x_test), oqp, int8))
    agreement = {}
    for m, p in programs.items():
        codes = np.asarray(run(p, p.quantize_input(data.x_test)))
        accuracy[f"int {m}"] = float(np.mean(codes.argmax(1) == y))
        sim = jax.jit(C.simulation(qmodel, v, x0, output_qparams=oqp, mode=m))(data.x_test)
        sim_codes = np.asarray(quantize(sim, oqp, int8))
        agreement[m] = dict(
            argmax_vs_fake_quant=float(np.mean(codes.argmax(1) == fq_codes.argmax(1))),
            max_lsb_vs_fake_quant=int(np.abs(codes.astype(int) - fq_codes).max()),
            argmax_vs_simulation=float(np.mean(codes.argmax(1) == sim_codes.argmax(1))),
            codes_equal_simulation=bool(np.array_equal(codes, sim_codes)),
            codes_differing_from_simulation=int(np.sum(codes != sim_codes)),
            codes_total=int(codes.size),
            max_lsb_vs_simulation=int(np.abs(codes.astype(int) - sim_codes).max()),
        )

    print(timings.format(f"batch {BATCH}"))
    for name, row in timing["variants"].items():
        if "verdict" in row:
            print(f"  {name}: target <= {row['target']}: {row['verdict']}")
    print(
        f"size: program {prog_bytes} B, float {float_bytes} B, ratio {size['ratio']:.3f} "
        f"(target <= {SIZE_TARGET}: {'met' if size['target_met'] else 'NOT met'})"
    )
    for m, a in agreement.items():
        print(f"agreement {m}: " + ", ".join(f"{k} {val}" for k, val in a.items()))
    print("test accuracy: " + ", ".join(f"{k} {100 * a:.2f}%" for k, a in accuracy.items()))
    config = dict(
        rounds=rounds,
        batch=BATCH,
        model="MNIST-1D CNN (jquant.models 'cnn'), int8 weights per channel, int8 activations",
        xla_cpu_1d_conv_path="the CNN's convs are 1-D: ratios depend on XLA:CPU's 1-D conv path",
    )
    meta = bench.results_meta(quick=args.quick, load_before=load_before)
    out = bench.write_results(
        args.out,
        dict(
            meta=meta,
            config=config,
            timing=timing,
            size=size,
            accuracy=accuracy,
            agreement=agreement,
        ),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
