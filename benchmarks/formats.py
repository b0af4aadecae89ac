"""Block-wise scales and microscaling formats: speed, weight SQNR and MNIST-1D accuracy.

1. ``dense_fwd_bwd``: a fake-quant Dense (batch 256, 1024 -> 1024, ``jquant.ops.dot_general``
   in ``simulate`` mode, gradients w.r.t. both operands), int8 activations per tensor and int4
   weights either per output channel (baseline) or per output channel and block of 32 inputs
   (``QuantConfig(block_size=32)``), ranges from the tensors (dynamic). Target: the block-wise
   layer at most 1.3x the per-channel one (verdict from the ratio's 95% CI).
2. ``fake_quant_throughput``: ``jquant.mx.fake_quant`` of every block format against the int8
   ``jquant.fake_quant`` (per tensor, dynamic range) on the same 1024 x 1024 float32 tensor.
3. ``weight_sqnr``: :func:`jquant.sweep.error_vs_bits` on a heavy-tailed tensor (Student-t,
   3 degrees of freedom, 1024 x 256, blocks along axis 0): int2..8 per channel, per block of
   32 and of 128, and the block formats (MXFP4/6/8, MXINT8, NVFP4, NF4), one row per format.
4. ``mnist1d_accuracy``: the zoo CNN (``jquant sweep``'s default model, cached weights) with
   only its weights quantized by a rule per format (``QuantRule(weight=..., act=None)``; int
   per channel, ``block_size`` 32 / 128, or a block format), test accuracy on 1000 examples.

Timing: ``jquant.bench.timing.measure`` (interleaved, shuffled rounds; medians; the median
paired ratio with a bootstrap 95% CI). Writes ``benchmarks/results/formats.json`` and the
figure ``benchmarks/results/formats.png``::

    python benchmarks/formats.py [--quick]
"""

from __future__ import annotations

import argparse
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant import bench, mx
from jquant.ops import dot_general
from jquant.quant import dynamic_qparams
from jquant.sweep import error_vs_bits

RESULTS = pathlib.Path(__file__).parent / "results"
DN = (((1,), (0,)), ((), ()))
BLOCK_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "mxint8")
BLOCK_FORMATS += ("nvfp4", "nf4")
GRANULARITIES = ("per_channel", "per_block:32", "per_block:128")


def dense_fwd_bwd(rounds: int) -> dict:
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (256, 1024))
    w = jax.random.normal(kw, (1024, 1024)) * 0.03
    act = jq.QuantConfig(fmt=jq.int8, symmetric=False)

    def step(wcfg):
        def loss(x, w):
            return jnp.sum(dot_general(x, w, DN, lhs_quant=act, rhs_quant=wcfg) ** 2)

        f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return lambda: f(x, w)

    fns = {
        "per_channel": step(jq.QuantConfig(fmt=jq.int4, axis=1)),
        "per_block32": step(jq.QuantConfig(fmt=jq.int4, axis=1, block_size=32)),
    }
    t = bench.measure(fns, baseline="per_channel", rounds=rounds)
    print(t.format("dense 256x1024x1024 fwd+bwd, int4 weights"))
    return dict(timing=t.to_json({"per_block32": 1.3}))


def fake_quant_throughput(rounds: int) -> dict:
    x = jax.random.normal(jax.random.key(1), (1024, 1024))
    cfg = jq.QuantConfig(fmt=jq.int8)
    int8 = jax.jit(lambda v: jq.fake_quant(v, dynamic_qparams(v, cfg), jq.int8))
    fns = {"int8": lambda: int8(x)}
    for name in BLOCK_FORMATS:
        f = jax.jit(lambda v, name=name: mx.fake_quant(v, name))
        fns[name] = lambda f=f: f(x)
    t = bench.measure(fns, baseline="int8", rounds=rounds)
    print(t.format("fake-quant of 1024x1024 float32"))
    return dict(
        timing=t.to_json(),
        elements_per_s={name: x.size / t.median(name) for name in fns},
    )


def weight_sqnr() -> dict:
    w = np.random.default_rng(0).standard_t(3, size=(1024, 256)).astype(np.float32)
    kw = dict(symmetric=True)
    ints = error_vs_bits({"w": w}, bits=range(2, 9), granularities=GRANULARITIES, **kw)
    blocks = error_vs_bits({"w": w}, bits=[8], families=BLOCK_FORMATS, **kw)
    rows = [
        dict(format=_label(r), bits=r["bits"], sqnr_db=r["sqnr_db"])
        for r in ints.to_dicts() + blocks.to_dicts()
    ]
    return dict(tensor="Student-t df 3, 1024 x 256, blocks of 1024 inputs", rows=rows)


def _label(row) -> str:
    if row["family"] == "int":
        return f"int {row['granularity']}"
    return row["family"]


def _rules():
    """``(label, bits, QuantRule)`` for every format of the accuracy sweep."""
    from jquant.nn import QuantRule

    for g in GRANULARITIES:
        size = int(g.split(":")[1]) if ":" in g else None
        for b in range(2, 9):
            yield f"int {g}", b, QuantRule(".*", weight=jq.IntFormat(b), act=None, block_size=size)
    for name in BLOCK_FORMATS:
        fmt = mx.FORMATS[name]
        bits = 1 + fmt.exponent_bits + fmt.mantissa_bits if fmt.exponent_bits else None
        bits = bits or (8 if name == "mxint8" else 4)
        yield name, bits, QuantRule(".*", weight=name, act=None)


def mnist1d_accuracy(n_eval: int) -> dict:
    from jquant import data
    from jquant.models.train import train_or_load
    from jquant.nn import linen as ql

    ds = data.load("mnist1d")
    trained = train_or_load("cnn", ds, 0, 600)
    x, y = ds.x_test[:n_eval], ds.y_test[:n_eval]
    float_acc = float(np.mean(np.argmax(trained.model.apply(trained.variables, x), -1) == y))
    rows = []
    for label, bits, rule in _rules():
        qm, _ = ql.quantize_model(trained.model, rule, x[:1], on_unused="ignore")
        v = qm.attach(trained.variables, x[:1])
        logits = jax.jit(qm.with_phase("eval").apply)(v, x)
        acc = float(np.mean(np.argmax(logits, -1) == y))
        rows.append(dict(format=label, bits=bits, accuracy=acc))
        print(f"{label:<20}{bits:>3}  accuracy {acc:.4f}")
    return dict(model="cnn", data="mnist1d", float_accuracy=float_acc, eval_examples=n_eval,
                rows=rows)  # fmt: skip


def plot(sqnr: dict, accuracy: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, table, key in ((axes[0], sqnr, "sqnr_db"), (axes[1], accuracy, "accuracy")):
        labels = list(dict.fromkeys(r["format"] for r in table["rows"]))
        for label in labels:
            rows = [r for r in table["rows"] if r["format"] == label]
            marker = "-o" if len(rows) > 1 else "s"
            ax.plot([r["bits"] for r in rows], [r[key] for r in rows], marker, label=label)
        ax.set_xlabel("bits per weight element (scales not counted)")
        ax.set_ylabel(key)
    axes[0].set_title("weight SQNR, Student-t (df 3)")
    axes[1].set_title("MNIST-1D CNN accuracy, weights only")
    axes[1].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="5 rounds instead of 15")
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument("--out", default=str(RESULTS / "formats.json"))
    args = parser.parse_args()
    load_before = bench.loadavg()
    rounds = 5 if args.quick else 15
    speed = dense_fwd_bwd(rounds)
    throughput = fake_quant_throughput(rounds)
    sqnr = weight_sqnr()
    accuracy = mnist1d_accuracy(args.eval_examples)
    out = pathlib.Path(args.out)
    plot(sqnr, accuracy, out.with_suffix(".png"))
    path = bench.write_results(
        out,
        dict(
            meta=bench.results_meta(quick=args.quick, load_before=load_before),
            dense_fwd_bwd=speed,
            fake_quant_throughput=throughput,
            weight_sqnr=sqnr,
            mnist1d_accuracy=accuracy,
        ),
    )
    print(f"wrote {path} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
