"""Jacob et al. (2018), integer-arithmetic-only inference: the fixed-point requantization.

Section 2.2 of the paper: the real multiplier ``M = S1 S2 / S3`` of a quantized layer lies in
``(0, 1)`` and is stored as ``M = 2^-n M0`` with ``M0`` in ``[0.5, 1)`` held as a Q31 int32;
``x * M`` is then an int32 x int32 -> int64 product, its rounded high word (gemmlowp's
``SaturatingRoundingDoublingHighMul``), and a rounding right shift by ``n``
(``RoundingDivideByPOT``, round half away from zero: ``-12 / 2^3 -> -2``, where a plain
arithmetic shift after adding half, ``(-12 + 4) >> 3``, gives ``-1``).

This script tabulates, through ``jquant.integer.fixed_point``:

- ``multipliers``: ``(M0, n)`` of typical multipliers, ``M0 / 2^31`` in ``[0.5, 1)`` and the
  relative representation error (at most ``2^-31``);
- ``rounding``: the paper's rounding example and its neighbours, three ways;
- ``requant``: ``x * M`` on random int32 accumulators in the three requantization modes
  (``double``: gemmlowp / TFLite reference; ``single``: TFLITE_SINGLE_ROUNDING; ``fp32``:
  XNNPACK / ONNX Runtime), against the exactly rounded real product.

- ``integer_only`` (their Table 4.1 analogue, on MNIST-1D): the float zoo CNN, the same
  network fake-quantized at w8a8 (TFLite layout: weights symmetric per channel, activations
  affine per tensor, min/max calibration, post-training) and the integer-only program
  ``jquant.convert`` builds from it (int8 codes, int32 biases, ``double`` requantization),
  run on the int8-quantized test set; test accuracy of each and the fraction of test examples
  where the integer program's prediction equals the fake-quant model's, over 3 seeds.
- ``qat_bn_folding`` (their Table 4.1 with training, sec. 3 and 3.2): the float ``cnn_bn``
  (conv -> BatchNorm -> relu -> pool) fine-tuned with quantization-aware training where each
  conv + BN is a :class:`jquant.nn.bn_folding.QConvBN`: the BN is folded into the weights
  before they are fake-quantized, ``y = conv(fq(x), fq(W gamma / sigma_R)) sigma_R / sigma_B +
  beta - gamma mu_B / sigma_B`` (running sigma_R in the weights, the batch statistics corrected
  in the output), straight-through gradients. ``jquant.convert`` turns the trained QConvBN
  model into the integer-only program (BN folded into the int8 codes and per-channel scales
  as in its eval forward). As a cross-check the same variables, mapped onto the zoo's
  ``cnn_bn`` layout, run as the rule-quantized plain model. Float, PTQ, QAT fake-quant and
  integer-only test accuracy per seed.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from fractions import Fraction

import flax.linen as nn
import jax
import numpy as np

from jquant import convert as cv
from jquant.data import load_mnist1d
from jquant.integer import fixed_point as fp
from jquant.models import train as T
from jquant.models.config import CNNConfig
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.nn.bn_folding import QConvBN
from jquant.nn.state import STATS
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table

MULTIPLIERS = (0.75, 0.5, 0.999999, 2.0**-10, 1.0 / 3.0, 0.0123456, 3.1e-4, 1.7e-6)
ROUNDING_CASES = (-13, -12, -11, -4, 4, 11, 12, 13)
ROUNDING_EXPONENT = 3


def _exact_round_half_away(v: Fraction) -> int:
    """Nearest integer to the rational ``v``, ties away from zero."""
    n = abs(v)
    r = int(n + Fraction(1, 2))  # floor(|v| + 1/2)
    return r if v >= 0 else -r


def multiplier_rows() -> list[dict]:
    m0, shift = fp.quantize_multiplier(np.array(MULTIPLIERS))
    rows = []
    for m, q, s in zip(MULTIPLIERS, m0.tolist(), shift.tolist(), strict=True):
        rep = Fraction(q) * Fraction(2) ** (s - 31)
        rows.append(
            {
                "M": m,
                "M0_int32": q,
                "M0": q / 2.0**31,
                "n": -s,
                "relative_error": float(abs(rep - Fraction(m)) / Fraction(m)),
            }
        )
    return rows


def rounding_rows() -> list[dict]:
    x = np.array(ROUNDING_CASES, np.int32)
    e = ROUNDING_EXPONENT
    ours = np.asarray(fp.rounding_divide_by_pot(x, e)).tolist()
    return [
        {
            "x": int(v),
            "exponent": e,
            "exact": float(v) / 2**e,
            "rounding_divide_by_pot": o,
            "add_half_then_shift": (int(v) + 2 ** (e - 1)) >> e,
            "round_half_away": _exact_round_half_away(Fraction(int(v), 2**e)),
        }
        for v, o in zip(x, ours, strict=True)
    ]


def requant_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    x = rng.integers(-(2**24), 2**24, size=n, dtype=np.int64).astype(np.int32)
    rows = []
    for m in MULTIPLIERS:
        m0, shift = fp.quantize_multiplier(m)
        exact_m = Fraction(int(m0)) * Fraction(2) ** (int(shift) - 31)
        want = np.array([_exact_round_half_away(int(v) * exact_m) for v in x.tolist()])
        real = x.astype(np.float64) * m
        for mode in fp.MULTIPLIER_MODES:
            mult = np.float32(m) if mode == "fp32" else m0
            got = np.asarray(fp.multiply_by_quantized_multiplier(x, mult, shift, mode))
            rows.append(
                {
                    "M": m,
                    "mode": mode,
                    "samples": n,
                    "equal_to_rounded_product": float(np.mean(got == want)),
                    "max_abs_diff": int(np.max(np.abs(got.astype(np.int64) - want))),
                    "max_abs_error_vs_real": float(np.max(np.abs(got - real))),
                }
            )
    return rows


@dataclasses.dataclass(frozen=True)
class IntegerSetup:
    """Sizes of the integer-only experiment (``QUICK_INT``: MLP, 30 float steps, one seed)."""

    model: str = "cnn"
    seeds: tuple[int, ...] = (0, 1, 2)
    float_steps: int = T.RECOMMENDED_STEPS["mnist1d"]
    calib_batches: int = 8
    batch_size: int = 128


FULL_INT = IntegerSetup()
QUICK_INT = IntegerSetup(model="mlp", seeds=(0,), float_steps=30, calib_batches=1)


def integer_only_rows(setup: IntegerSetup) -> list[dict]:
    """Float, fake-quant (w8a8 PTQ) and integer-only test accuracy per seed."""
    data = load_mnist1d()
    x0, bs = data.x_train[:2], setup.batch_size
    calib = [data.x_train[i * bs : (i + 1) * bs] for i in range(setup.calib_batches)]
    rows = []
    for seed in setup.seeds:
        tr = T.train_or_load(setup.model, data, seed, setup.float_steps)
        qmodel, _ = ql.quantize_model(tr.model, QuantRule(".*"), x0, on_unused="raise")
        variables = qmodel.calibrate(qmodel.attach(tr.variables, x0), calib)
        fake = np.asarray(jax.jit(qmodel.with_phase("eval").apply)(variables, data.x_test))
        out_qp = cv.output_qparams_from_data(qmodel, variables, calib)
        program = cv.convert(qmodel, variables, x0, output_qparams=out_qp)
        codes = jax.jit(cv.run)(program, program.quantize_input(data.x_test))
        integer = np.asarray(program.dequantize_output(codes))
        # Logits outside the output quantizer's range (calibrated on training batches) saturate.
        lo, hi = (np.asarray(program.dequantize_output(np.int8(v))) for v in (-128, 127))
        y = np.asarray(data.y_test)
        rows.append(
            {
                "model": setup.model,
                "seed": seed,
                "float": tr.metrics["test_accuracy"],
                "fake_quant_w8a8": float(np.mean(fake.argmax(-1) == y)),
                "integer_only": float(np.mean(integer.argmax(-1) == y)),
                "same_prediction": float(np.mean(integer.argmax(-1) == fake.argmax(-1))),
                "max_abs_logit_diff": float(np.max(np.abs(integer - np.clip(fake, lo, hi)))),
                "saturated_fraction": float(np.mean((fake < lo) | (fake > hi))),
                "output_scale": float(program.output_scale),
            }
        )
    return rows


class FoldedCNN(nn.Module):
    """The zoo's ``cnn_bn`` (:class:`jquant.models.linen.CNN` with BatchNorm) hand-built from
    jquant layers: each ``conv_i -> bn_i`` is one :class:`QConvBN` named ``conv_i``, the dense
    layers are ``QDense``. Same variables as ``cnn_bn`` up to the renaming of
    :func:`to_folded` / :func:`to_zoo`; ``train`` selects batch statistics."""

    config: CNNConfig
    rule: QuantRule = ql.DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        cfg, q = self.config, {"rule": self.rule, "phase": self.phase}
        pool = nn.avg_pool if cfg.pool == "avg" else nn.max_pool
        for i, channels in enumerate(cfg.features, 1):
            x = QConvBN(
                channels,
                cfg.kernel_size,
                momentum=cfg.bn_momentum,
                epsilon=cfg.bn_epsilon,
                name=f"conv{i}",
                **q,
            )(x, use_running_average=not train)
            x = pool(nn.relu(x), cfg.window, strides=cfg.window, padding="VALID")
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(cfg.dense, 1):
            x = nn.relu(ql.QDense(width, name=f"dense{i}", **q)(x))
        return ql.QDense(cfg.num_classes, name="head", **q)(x)


def _bn_pairs(variables: Mapping) -> list[str]:
    return sorted(k[2:] for k in variables["batch_stats"] if k.startswith("bn"))


def to_folded(zoo: Mapping) -> dict:
    """``cnn_bn`` variables (``conv_i/kernel``, ``bn_i/{scale, bias}``, ``batch_stats/bn_i``)
    in the :class:`FoldedCNN` layout (``conv_i/{kernel, scale, bias}``, ``batch_stats/conv_i``)."""
    params = dict(zoo["params"])
    stats = {}
    for i in _bn_pairs(zoo):
        bn = params.pop(f"bn{i}")
        params[f"conv{i}"] = {**params[f"conv{i}"], "scale": bn["scale"], "bias": bn["bias"]}
        stats[f"conv{i}"] = zoo["batch_stats"][f"bn{i}"]
    return {**zoo, "params": params, "batch_stats": stats}


def to_zoo(folded: Mapping) -> dict:
    """The inverse of :func:`to_folded` (other collections, e.g. ``quant_stats``, as they are:
    their paths are the same)."""
    params = dict(folded["params"])
    stats = {}
    for name, st in folded["batch_stats"].items():
        conv = dict(params[name])
        params["bn" + name[4:]] = {"scale": conv.pop("scale"), "bias": conv.pop("bias")}
        params[name] = conv
        stats["bn" + name[4:]] = st
    return {**folded, "params": params, "batch_stats": stats}


@dataclasses.dataclass(frozen=True)
class QATSetup:
    """Sizes of the QAT + BN folding experiment (``QUICK_QAT``: 30 float steps, 5 QAT steps)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    float_steps: int = T.RECOMMENDED_STEPS["mnist1d"]
    qat_steps: int = 200
    learning_rate: float = 1e-3
    calib_batches: int = 8
    batch_size: int = 128


FULL_QAT = QATSetup()
QUICK_QAT = QATSetup(seeds=(0,), float_steps=30, qat_steps=5, calib_batches=1)


def _calibrate(model: nn.Module, variables: dict, batches) -> dict:
    step = jax.jit(lambda v, x: model.apply(v, x, mutable=[STATS])[1][STATS])
    for x in batches:
        variables = {**variables, STATS: step(variables, x)}
    return variables


def qat_bn_rows(setup: QATSetup) -> list[dict]:
    """Float, PTQ (fake-quant), QAT with folded BN (fake-quant) and integer-only accuracy."""
    data = load_mnist1d()
    x0, bs, y = data.x_train[:2], setup.batch_size, np.asarray(data.y_test)
    calib = [data.x_train[i * bs : (i + 1) * bs] for i in range(setup.calib_batches)]
    rule = QuantRule(".*")  # TFLite: int8 weights symmetric per channel, activations affine
    tr0 = T.train_or_load("cnn_bn", data, setup.seeds[0], setup.float_steps)
    folded = FoldedCNN(tr0.model.config, rule)
    fresh = jax.jit(folded.init)(jax.random.key(0), x0)
    opt = T.make_optimizer(setup.learning_rate, setup.qat_steps)
    train_step = T.make_train_step(T.linen_apply_fn(folded.clone(phase="train")), opt)
    folded_eval = folded.clone(phase="eval")
    eval_fn = T.linen_apply_fn(folded_eval)
    qzoo, _ = ql.quantize_model(tr0.model, rule, x0, on_unused="raise")
    zoo_eval = jax.jit(qzoo.with_phase("eval").apply)
    run = jax.jit(cv.run)
    rows = []
    for seed in setup.seeds:
        tr = T.train_or_load("cnn_bn", data, seed, setup.float_steps)
        v = _calibrate(folded.clone(phase="calibrate"), {**fresh, **to_folded(tr.variables)}, calib)
        params, state = T.split_linen(v)
        ptq = T.evaluate(eval_fn, params, state, data.x_test, data.y_test)["accuracy"]
        st, _ = T.fit(
            train_step,
            T.TrainState.create(params, state, opt),
            data.x_train,
            data.y_train,
            steps=setup.qat_steps,
            batch_size=bs,
            key=jax.random.key(1000 + seed),
        )
        qat_logits, _ = eval_fn(st.params, st.model_state, data.x_test, False)
        qat_logits = np.asarray(qat_logits)
        trained = {"params": st.params, **st.model_state}
        # cross-check: the same variables on the zoo layout, whose nn.BatchNorm jquant folds
        fake = np.asarray(zoo_eval(to_zoo(trained), data.x_test))
        # the QAT model itself converts: QConvBN folds as in its eval forward
        out_qp = cv.output_qparams_from_data(folded_eval, trained, calib)
        program = cv.convert(folded_eval, trained, x0, output_qparams=out_qp)
        integer = np.asarray(
            program.dequantize_output(run(program, program.quantize_input(data.x_test)))
        )
        lo, hi = (np.asarray(program.dequantize_output(np.int8(v))) for v in (-128, 127))
        rows.append(
            {
                "seed": seed,
                "float": tr.metrics["test_accuracy"],
                "ptq_w8a8": ptq,
                "qat_folded_bn": float(np.mean(qat_logits.argmax(-1) == y)),
                "zoo_fake_quant": float(np.mean(fake.argmax(-1) == y)),
                "integer_only": float(np.mean(integer.argmax(-1) == y)),
                "same_prediction": float(np.mean(integer.argmax(-1) == qat_logits.argmax(-1))),
                "max_abs_logit_diff_folded_vs_zoo": float(np.max(np.abs(qat_logits - fake))),
                # logits beyond the calibrated output range saturate in int8
                "max_abs_logit_diff_integer_vs_folded": float(
                    np.max(np.abs(integer - np.clip(qat_logits, lo, hi)))
                ),
                "saturated_fraction": float(np.mean((qat_logits < lo) | (qat_logits > hi))),
                "output_scale": float(program.output_scale),
            }
        )
    return rows


def _plot(table: Table):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        ax.loglog(table.column("M"), np.maximum(table.column("relative_error"), 1e-20), "o")
        ax.axhline(2.0**-31, color="k", lw=0.8, label="2^-31")
        ax.set_xlabel("multiplier M")
        ax.set_ylabel("|M0 2^-n - M| / M")
        ax.set_title("Q31 fixed-point multiplier (Jacob et al. 2018, sec. 2.2)")
        ax.legend()

    return draw


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """The four tables (2,000 accumulators per multiplier when ``quick``, else 100,000;
    integer-only at :data:`QUICK_INT` or :data:`FULL_INT` size)."""
    tables = {
        "multipliers": Table.from_dicts(multiplier_rows()),
        "rounding": Table.from_dicts(rounding_rows()),
        "requant": Table.from_dicts(requant_rows(2_000 if quick else 100_000)),
    }
    tables["requant"] = tables["requant"].with_meta(paper="Jacob et al. 2018")
    tables["integer_only"] = Table.from_dicts(
        integer_only_rows(QUICK_INT if quick else FULL_INT)
    ).with_meta(paper="Jacob et al. 2018, Table 4.1 analogue (MNIST-1D, PTQ w8a8)")
    tables["qat_bn_folding"] = Table.from_dicts(
        qat_bn_rows(QUICK_QAT if quick else FULL_QAT)
    ).with_meta(paper="Jacob et al. 2018, Table 4.1 analogue (MNIST-1D, QAT, BN folded)")
    save_figure(out_dir, "jacob2018_multipliers", _plot(tables["multipliers"]))
    return write_tables(out_dir, tables)


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
