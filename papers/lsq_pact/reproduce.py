"""Esser et al. (2019), LSQ, and Choi et al. (2018), PACT: the learned-range gradients.

LSQ (eq. 3) learns the step ``s`` of ``x_hat = s * clip(round(x / s), -Q_N, Q_P)``; the
straight-through gradient of one element is::

    d x_hat / d s = -x/s + round(x/s)   if -Q_N < x/s < Q_P
                  = -Q_N                if x/s <= -Q_N
                  = Q_P                 if x/s >= Q_P

scaled by ``g = 1 / sqrt(N Q_P)`` (sec. 2.2, N elements sharing ``s``). PACT (eq. 3) learns
the clip ``alpha`` of ``y = clip(x, 0, alpha)`` quantized to ``2^k - 1`` steps on [0, alpha]:
``d y_q / d alpha = 1`` for ``x >= alpha``, else 0.

This script differentiates ``jquant.fake_quant(..., estimator="lsq" | "pact")`` element by
element (``jax.jacobian`` with respect to the scale) at 2, 3, 4 and 8 bits and compares every
element with the closed forms above; the table holds the largest absolute difference.

QAT on MNIST-1D, a fair comparison (:class:`Protocol`). The zoo CNN is trained in float on
3,500 training examples (the other 500 are a validation split; the test set is only read for
the final table). Its inner layers (``conv2``, ``dense1``) are quantized to ``b`` bits, weights
signed symmetric per output channel and inputs unsigned (they follow a ReLU); ``conv1`` and
``head`` stay at 8 bits with fixed min/max ranges for every method, so the methods differ only
where they are compared. Each method has its paper's initialisation:

- ``ste``: min/max calibrated activation ranges (8 batches), fixed; weight scales
  ``max|w_c| / Q_P`` follow the weights; straight-through gradient.
- ``pact``: ``alpha`` (``= Q_P * scale``) initialised from the same calibration and learned
  with Choi et al. eq. 3, with an L2 penalty ``lambda_alpha * alpha^2 / 2`` (SGD on ``alpha``
  itself: the stored scale's gradient is divided by ``Q_P^2``); weights as ``ste``.
- ``lsq``: every step learned (Esser et al. eq. 3, gradient scale ``1 / sqrt(N Q_P)``),
  initialised to ``2 <|w|> / sqrt(Q_P)`` per output channel and ``2 <|x|> / sqrt(Q_P)`` on the
  first training batch.
- ``lsq_act`` (ablation, :data:`ABLATION`, :func:`ablation`): LSQ on the activations only,
  weights as ``ste``, which compares the activation quantizers with identical weights.

All parameters (weights, steps, clips) share one optimizer: SGD with momentum 0.9 and a cosine
schedule (with Adam, which normalises each step, the LSQ gradient scale would cancel). The
learning rate of each (method, bits) is the one of ``Protocol.learning_rates`` with the best
mean validation accuracy over the seeds; the test accuracies of those runs form the table.
Every run of one (method, bits) -- learning rates x seeds -- trains in one ``jax.vmap``-ed
program, compiled once.
``lsq_pact_qat_runs`` holds every run, ``lsq_pact_qat`` the selected ones (mean, sample std,
min, max over seeds), ``lsq_pact_qat_paired`` the per-seed differences between methods.

Matched-rate controls (:func:`control_rows`): the rates differ between methods, so LSQ's lead
could be its rate's. At every width each method also trains at every rate chosen there for
another (STE and PACT at LSQ's rate, LSQ at theirs), and the float models train unquantized
(float fine-tuning, :func:`float_runs`) at every chosen rate, with the same seeds, steps,
optimizer and batch orders; ``lsq_pact_controls_runs`` (per seed), ``lsq_pact_controls``
(mean, sample std, min, max per bits, method and rate) and ``lsq_pact_controls_paired``
(per-seed differences at one rate, :data:`CONTROL_PAIRS`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jquant as jq
from jquant.data import load_mnist1d
from jquant.examples.mnist1d_qat import qat_optimizer as adam_qat_optimizer
from jquant.models import train as T
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table

BITS = (2, 3, 4, 8)  # of the gradient checks
METHODS = ("ste", "pact", "lsq")
# "lsq_act": LSQ on the activations only, weights as ste / pact (the ablation that compares
# the activation quantizers alone); not in FULL, see ABLATION.
ALL_METHODS = (*METHODS, "lsq_act")
PAIRS = (
    ("lsq", "pact"),
    ("pact", "ste"),
    ("lsq", "ste"),
    ("lsq_act", "pact"),
    ("lsq", "lsq_act"),
)
# Matched-rate controls (:func:`control_rows`): each pair at one learning rate; "float" is
# float fine-tuning (no quantization) at that rate.
CONTROL_PAIRS = (
    ("lsq", "pact"),
    ("lsq", "ste"),
    ("pact", "ste"),
    ("lsq", "float"),
    ("pact", "float"),
    ("ste", "float"),
)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The QAT comparison (module docstring); ``QUICK`` is the tests' few-step version.

    Attributes:
      seeds: one float model and one batch order per seed (shared by every method and
        learning rate, so differences between methods are paired by seed).
      bits: widths of the inner layers' weights and activations.
      methods: a subset of ``METHODS``.
      model: zoo model name; ``edge``: regex of its first and last layer (8 bits, fixed).
      float_steps: float training steps (the zoo's Adam recipe).
      qat_steps: SGD steps of every QAT run.
      learning_rates: the search grid, the same for every method and width.
      momentum: SGD momentum.
      pact_alpha_decay: ``lambda_alpha`` of PACT's penalty ``lambda_alpha * alpha^2 / 2``.
      val_size: training examples held out for the learning-rate choice.
      calib_batches: min/max calibration batches (STE ranges, PACT's initial alpha).
      batch_size: of training and calibration.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    bits: tuple[int, ...] = (2, 3)
    methods: tuple[str, ...] = METHODS
    model: str = "cnn"
    edge: str = "conv1|head"
    float_steps: int = T.RECOMMENDED_STEPS["mnist1d"]
    qat_steps: int = 300
    learning_rates: tuple[float, ...] = (0.01, 0.03, 0.1)
    momentum: float = 0.9
    pact_alpha_decay: float = 1e-4
    val_size: int = 500
    calib_batches: int = 8
    batch_size: int = 128


FULL = Protocol()
# Wider grids at these widths would pass the 10-minute budget: each method keeps the learning
# rate that validation chose for it at the widest searched width.
FULL_CARRIED_BITS = (4, 8)
QUICK = Protocol(
    seeds=(0,),
    bits=(2,),
    methods=("pact", "lsq"),
    model="mlp",
    edge="dense1|head",
    float_steps=30,
    qat_steps=3,
    learning_rates=(0.01,),
    val_size=200,
    calib_batches=1,
)
ABLATION = dataclasses.replace(FULL, methods=("lsq_act",))


def lsq_closed_form(x: np.ndarray, s: float, fmt: jq.IntFormat) -> np.ndarray:
    """Esser et al. eq. 3 times ``g = 1 / sqrt(N Q_P)``, per element (float64)."""
    v = x / s
    qn, qp = -fmt.qmin, fmt.qmax
    d = np.where(v <= -qn, -qn, np.where(v >= qp, qp, -v + np.round(v)))
    return d / np.sqrt(x.size * qp)


def pact_closed_form(x: np.ndarray, alpha: float) -> np.ndarray:
    """Choi et al. eq. 3: ``1[x >= alpha]``."""
    return (x >= alpha).astype(np.float64)


def gradient_rows(n: int, seed: int = 0) -> list[dict]:
    x = jax.random.normal(jax.random.key(seed), (n,), jnp.float32) * 2.0
    rows = []
    for b in BITS:
        signed, unsigned = jq.IntFormat(b), jq.IntFormat(b, signed=False)
        s = 3.0 / signed.qmax
        alpha = 2.5

        def lsq_fq(sc, fmt=signed):
            return jq.fake_quant(x, jq.QParams(sc), fmt, estimator="lsq")

        def pact_fq(a, fmt=unsigned):
            return jq.fake_quant(x, jq.pact_qparams(a, fmt), fmt, estimator="pact")

        lsq = jax.jacobian(lsq_fq)(jnp.float32(s))
        d_alpha = jax.jacobian(pact_fq)(jnp.float32(alpha))
        xs = np.asarray(x, np.float64)
        lsq_want = lsq_closed_form(xs, s, signed)
        pact_want = pact_closed_form(xs, alpha)
        rows.append(
            {
                "bits": b,
                "elements": n,
                "lsq_max_abs_diff": float(np.max(np.abs(np.asarray(lsq) - lsq_want))),
                "lsq_clipped_fraction": float(np.mean(np.abs(xs / s) >= signed.qmax)),
                "pact_max_abs_diff": float(np.max(np.abs(np.asarray(d_alpha) - pact_want))),
                "pact_clipped_fraction": float(np.mean(pact_want)),
            }
        )
    return rows


def method_rules(method: str, bits: int, edge: str = FULL.edge) -> tuple[QuantRule, ...]:
    """Rules of ``method`` at ``bits``: ``edge`` layers int8 with fixed min/max ranges (every
    method); the others ``bits``-bit weights (signed, per channel) and unsigned inputs, with
    ``method``'s activation estimator (LSQ also learns the weight steps)."""
    if method not in ALL_METHODS:
        raise ValueError(f"method must be one of {ALL_METHODS}, got {method!r}")
    inner = QuantRule(
        ".*",
        weight=jq.IntFormat(bits),
        act=jq.IntFormat(bits, signed=False),
        estimator="lsq" if method == "lsq" else "ste",
        act_estimator="lsq" if method == "lsq_act" else method,
    )
    return (QuantRule(edge, weight="int8", act="int8"), inner)


@functools.partial(jax.jit, static_argnums=0)
def layer_input_abs_means(model: nn.Module, variables, x: jax.Array) -> dict[str, jax.Array]:
    """``mean |input|`` of every Dense / Conv of the float ``model`` on ``x``, by module path."""
    means = {}

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense | nn.Conv):
            means["/".join(context.module.path)] = jnp.mean(jnp.abs(args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, x)
    return means


def lsq_init(params: dict, input_abs_means: dict, bits: int) -> dict:
    """Esser et al.'s initial steps, for every step a layer learns: ``2 <|w|> / sqrt(Q_P)``
    per output channel (``Q_P = 2^(b-1) - 1``) and ``2 <|x|> / sqrt(Q_P)`` for its unsigned
    input (``Q_P = 2^b - 1``; ``<|x|>`` over the first batch)."""
    qp_w, qp_a = jq.IntFormat(bits).qmax, jq.IntFormat(bits, signed=False).qmax
    out = dict(params)
    for path, layer in params.items():
        if "kernel_scale" not in layer and "input_scale" not in layer:
            continue
        new = dict(layer)
        if "kernel_scale" in layer:
            k = layer["kernel"]
            w_abs = jnp.mean(jnp.abs(k), axis=tuple(range(k.ndim - 1)))
            new["kernel_scale"] = jnp.reshape(
                2 * w_abs / np.sqrt(qp_w), jnp.shape(layer["kernel_scale"])
            )
        if "input_scale" in layer:
            x_abs = input_abs_means[path]
            new["input_scale"] = jnp.reshape(
                2 * x_abs / np.sqrt(qp_a), jnp.shape(layer["input_scale"])
            )
        out[path] = new
    return out


def qat_optimizer(
    steps: int, momentum: float, *, pact_qmax: int | None = None, alpha_decay: float = 0.0
) -> optax.GradientTransformation:
    """SGD with momentum at unit learning rate and a cosine schedule: ``u_t = -c_t m_t``,
    ``m_t = momentum m_{t-1} + g_t``, ``c_t = (1 + cos(pi t / steps)) / 2``; the train step
    adds ``lr * u_t``, so one program serves every learning rate.

    With ``pact_qmax`` the learned input scales are PACT clips ``alpha = Q_P s``: SGD with an
    L2 penalty on ``alpha`` (``d alpha = -lr (dL/d alpha + lambda alpha)``) moves the stored
    ``s`` by ``-lr (dL/ds / Q_P^2 + lambda s)``, which is what their gradient becomes here.
    """
    cosine = optax.cosine_decay_schedule(1.0, max(steps, 1))
    base = optax.identity()
    if pact_qmax is not None:
        alpha = optax.chain(optax.scale(1.0 / pact_qmax**2), optax.add_decayed_weights(alpha_decay))

        def labels(params):
            return jax.tree_util.tree_map_with_path(
                lambda path, _: "alpha" if str(path[-1].key) == "input_scale" else "w", params
            )

        base = optax.multi_transform({"alpha": alpha, "w": optax.identity()}, labels)
    return optax.chain(
        base, optax.trace(decay=momentum), optax.scale_by_schedule(lambda t: -cosine(t))
    )


def make_train_step(apply_fn: T.ApplyFn, opt: optax.GradientTransformation) -> Callable:
    """``jit(vmap(step))`` over runs: ``step(state, x, y, order, t, lr)`` takes the batch
    ``order[t]`` of ``(x, y)``, one cross-entropy gradient and ``params + lr * u``."""

    def step(state: T.TrainState, x, y, order, t, lr):
        idx = order[t]

        def objective(params):
            logits, _ = apply_fn(params, state.model_state, x[idx], True)
            return T.cross_entropy(logits, y[idx])

        grads = jax.grad(objective)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = jax.tree.map(lambda p, u: p + lr * u, state.params, updates)
        return T.TrainState(params, state.model_state, opt_state, state.step + 1)

    return jax.jit(jax.vmap(step, in_axes=(0, None, None, 0, None, 0)))


def make_accuracy(apply_fn: T.ApplyFn, n_val: int) -> Callable:
    """``jit(vmap(accuracy))`` over runs of inputs that are ``n_val`` validation examples then
    test examples (one compilation for both): ``(mean(argmax(logits) == y)`` over the first
    ``n_val``, over the rest``)`` in eval mode."""

    def accuracy(params, model_state, x, y):
        logits, _ = apply_fn(params, model_state, x, False)
        correct = jnp.argmax(logits, -1) == y
        return jnp.mean(correct[:n_val]), jnp.mean(correct[n_val:])

    return jax.jit(jax.vmap(accuracy, in_axes=(0, 0, None, None)))


def batch_order(n: int, batch_size: int, steps: int, seed: int) -> np.ndarray:
    """``(steps, batch_size)`` indices: shuffled epochs of ``range(n)``, remainders dropped."""
    per_epoch = n // batch_size
    rng = np.random.default_rng(seed)
    epochs = [rng.permutation(n)[: per_epoch * batch_size] for _ in range(-(-steps // per_epoch))]
    return np.concatenate(epochs).reshape(-1, batch_size)[:steps]


def _stack(trees: list):
    return jax.tree.map(lambda *a: jnp.stack(a), *trees)


class Split:
    """MNIST-1D with the last ``val_size`` training examples held out for validation."""

    def __init__(self, val_size: int):
        data = load_mnist1d()
        if not 0 < val_size < len(data.x_train):
            raise ValueError(f"val_size must be in (0, {len(data.x_train)}), got {val_size}")
        self.fit = dataclasses.replace(
            data, x_train=data.x_train[:-val_size], y_train=data.y_train[:-val_size]
        )
        self.x_val, self.y_val = data.x_train[-val_size:], data.y_train[-val_size:]


def _train_runs(
    p: Protocol,
    split: Split,
    apply_fns: tuple[T.ApplyFn, T.ApplyFn],
    per_seed: list[tuple[dict, dict]],
    opt: optax.GradientTransformation,
    learning_rates: tuple[float, ...],
) -> tuple[list[tuple[float, int]], np.ndarray, np.ndarray, np.ndarray]:
    """Trains every (learning rate, seed) of ``per_seed`` (``(params, model_state)`` per seed)
    in one vmapped program of ``p.qat_steps`` SGD steps (:func:`make_train_step` of the train
    apply function of ``apply_fns = (train, eval)``, batch order :func:`batch_order` of each
    seed). Returns the grid and the ``(initial test, val, test)`` accuracies, one per run."""
    data = split.fit
    bs = p.batch_size
    grid = [(lr, i) for lr in learning_rates for i in range(len(p.seeds))]
    params = _stack([per_seed[i][0] for _, i in grid])
    model_state = _stack([per_seed[i][1] for _, i in grid])
    state = T.TrainState(
        params, model_state, jax.vmap(opt.init)(params), jnp.zeros(len(grid), jnp.int32)
    )
    orders = [batch_order(len(data.x_train), bs, p.qat_steps, s) for s in p.seeds]
    order = jnp.asarray(np.stack([orders[i] for _, i in grid]))
    lrs = jnp.asarray([lr for lr, _ in grid], jnp.float32)
    step = make_train_step(apply_fns[0], opt)
    accuracy = make_accuracy(apply_fns[1], len(split.x_val))
    x_eval = jnp.concatenate([split.x_val, data.x_test])
    y_eval = jnp.concatenate([split.y_val, data.y_test])
    _, start = accuracy(state.params, model_state, x_eval, y_eval)
    for t in range(p.qat_steps):
        state = step(state, data.x_train, data.y_train, order, t, lrs)
    val, test = accuracy(state.params, model_state, x_eval, y_eval)
    return grid, np.asarray(start), np.asarray(val), np.asarray(test)


def method_runs(p: Protocol, split: Split, trained: list, method: str, bits: int) -> list[dict]:
    """Every (learning rate, seed) run of ``method`` at ``bits``, trained in one vmapped
    program: ``{"lr", "seed", "float", "ptq", "val", "qat"}`` (``ptq``: test accuracy at the
    method's initialisation, before QAT; ``val`` / ``qat``: after QAT)."""
    data = split.fit
    x0 = data.x_train[:2]
    qmodel, _ = ql.quantize_model(
        trained[0].model, method_rules(method, bits, p.edge), x0, on_unused="ignore"
    )
    fresh = jax.jit(qmodel.init)(jax.random.key(0), x0)
    bs = p.batch_size
    calib = [data.x_train[i * bs : (i + 1) * bs] for i in range(p.calib_batches)]
    per_seed = []
    for tr in trained:
        variables = qmodel.calibrate(_merged(fresh, tr.variables), calib)
        params, state = T.split_linen(variables)
        if method in ("lsq", "lsq_act"):
            means = layer_input_abs_means(tr.model, tr.variables, data.x_train[:bs])
            params = lsq_init(params, means, bits)
        per_seed.append((params, state))
    pact_qmax = jq.IntFormat(bits, signed=False).qmax if method == "pact" else None
    opt = qat_optimizer(
        p.qat_steps, p.momentum, pact_qmax=pact_qmax, alpha_decay=p.pact_alpha_decay
    )
    apply_fns = tuple(T.linen_apply_fn(qmodel.with_phase(ph)) for ph in ("train", "eval"))
    grid, ptq, val, test = _train_runs(p, split, apply_fns, per_seed, opt, p.learning_rates)
    return [
        {
            "bits": bits,
            "method": method,
            "seed": p.seeds[i],
            "lr": lr,
            "float": trained[i].metrics["test_accuracy"],
            "ptq": float(ptq[r]),
            "val": float(val[r]),
            "qat": float(test[r]),
        }
        for r, (lr, i) in enumerate(grid)
    ]


def float_runs(p: Protocol, split: Split, trained: list, learning_rates) -> list[dict]:
    """Float fine-tuning, the control with no quantization: the float models trained on as
    the QAT runs are (same optimizer, steps, seeds and batch orders; :func:`_train_runs`) at
    each of ``learning_rates``. Rows as :func:`method_runs` with ``bits=None``,
    ``method="float"``; ``ptq`` is the float model's own test accuracy (nothing quantized)."""
    per_seed = [T.split_linen(tr.variables) for tr in trained]
    opt = qat_optimizer(p.qat_steps, p.momentum)
    apply_fn = T.linen_apply_fn(trained[0].model)
    lrs = tuple(learning_rates)
    grid, start, val, test = _train_runs(p, split, (apply_fn, apply_fn), per_seed, opt, lrs)
    return [
        {
            "bits": None,
            "method": "float",
            "seed": p.seeds[i],
            "lr": lr,
            "float": trained[i].metrics["test_accuracy"],
            "ptq": float(start[r]),
            "val": float(val[r]),
            "qat": float(test[r]),
        }
        for r, (lr, i) in enumerate(grid)
    ]


def qat_rows(p: Protocol, log=print) -> list[dict]:
    """All runs of :func:`method_runs` for every (bits, method) of ``p``."""
    split = Split(p.val_size)
    trained = [T.train_or_load(p.model, split.fit, s, p.float_steps) for s in p.seeds]
    rows = []
    for bits in p.bits:
        for method in p.methods:
            start = time.perf_counter()
            runs = method_runs(p, split, trained, method, bits)
            log(f"w{bits}a{bits} {method}: {len(runs)} runs in {time.perf_counter() - start:.0f} s")
            rows += runs
    return rows


def carried_rows(p: Protocol, selected: list[dict], bits: tuple[int, ...], log=print):
    """Runs at ``bits`` with each method's learning rate as :func:`select` chose it at the
    widest width of ``p`` (one rate per method: no search, so the test set still plays no
    part)."""
    widest = max(p.bits)
    rows = []
    for method in p.methods:
        (lr,) = {r["lr"] for r in selected if r["bits"] == widest and r["method"] == method}
        q = dataclasses.replace(p, bits=bits, methods=(method,), learning_rates=(lr,))
        rows += qat_rows(q, log=log)
    return rows


def chosen_rates(runs: list[dict], methods: tuple[str, ...]) -> dict[int, dict[str, float]]:
    """``{bits: {method: learning rate}}`` that :func:`select` keeps for ``methods``."""
    out: dict[int, dict[str, float]] = {}
    for r in select([r for r in runs if r["method"] in methods]):
        out.setdefault(r["bits"], {})[r["method"]] = r["lr"]
    return out


def control_plan(
    runs: list[dict], methods: tuple[str, ...]
) -> tuple[list[tuple[int, str, tuple[float, ...]]], list[float]]:
    """What the matched-rate controls must train beyond ``runs``: at every width, every method
    of ``methods`` at every rate chosen there for one of them (STE and PACT at LSQ's rate, LSQ
    at STE's and PACT's); ``(bits, method, rates not in runs)`` where some are missing, and the
    float fine-tuning rates (every rate chosen at any width)."""
    chosen = chosen_rates(runs, methods)
    missing = []
    for bits, by_method in chosen.items():
        for method in methods:
            have = {r["lr"] for r in runs if (r["bits"], r["method"]) == (bits, method)}
            lrs = tuple(lr for lr in sorted(set(by_method.values())) if lr not in have)
            if lrs:
                missing.append((bits, method, lrs))
    return missing, sorted({lr for d in chosen.values() for lr in d.values()})


def assemble_controls(runs: list[dict], new: list[dict], methods: tuple[str, ...]) -> list[dict]:
    """The controls' runs: for every width of ``runs`` and method of ``methods``, the runs at
    the rates chosen there (:func:`control_plan`), from ``runs`` (``source="search"``) or
    ``new`` (trained for the controls, ``source="control"``), then the float fine-tuning runs
    of ``new`` (``bits=None``). ``rate_of`` names the methods that chose the row's rate (at its
    width; for ``float``, at any width)."""
    chosen = chosen_rates(runs, methods)
    out = []
    for bits, by_method in chosen.items():
        for method in methods:
            for src, rows in (("search", runs), ("control", new)):
                out += [
                    {**r, "source": src, "rate_of": _rate_of(by_method, r["lr"])}
                    for r in rows
                    if (r["bits"], r["method"]) == (bits, method) and r["lr"] in by_method.values()
                ]
    for r in new:
        if r["method"] == "float":
            ms = dict.fromkeys(m for d in chosen.values() for m, lr in d.items() if lr == r["lr"])
            out.append({**r, "source": "control", "rate_of": ",".join(ms)})
    return out


def _rate_of(by_method: Mapping[str, float], lr: float) -> str:
    return ",".join(m for m, chosen in by_method.items() if chosen == lr)


def control_rows(p: Protocol, runs: list[dict], log=print) -> list[dict]:
    """The matched-rate controls of ``runs``: trains what :func:`control_plan` lists (the
    quantized runs by :func:`method_runs`, the float fine-tuning by :func:`float_runs`; same
    seeds, steps and batch orders) and returns :func:`assemble_controls`."""
    missing, float_lrs = control_plan(runs, p.methods)
    split = Split(p.val_size)
    trained = [T.train_or_load(p.model, split.fit, s, p.float_steps) for s in p.seeds]
    new = []
    for bits, method, lrs in missing:
        start = time.perf_counter()
        q = dataclasses.replace(p, learning_rates=lrs)
        new += method_runs(q, split, trained, method, bits)
        log(f"control w{bits}a{bits} {method} at {lrs}: {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    new += float_runs(p, split, trained, float_lrs)
    log(f"control float fine-tuning at {float_lrs}: {time.perf_counter() - start:.0f} s")
    return assemble_controls(runs, new, p.methods)


def control_summary(controls: list[dict]) -> list[dict]:
    """:func:`summarize` of ``controls`` per (bits, method, lr): ``val`` and ``qat`` (the test
    accuracy after training) over seeds, with the row's ``rate_of``."""
    rows = []
    for s in summarize(controls, keys=("bits", "method", "lr"), values=("val", "qat")):
        (rate_of,) = {
            r["rate_of"]
            for r in controls
            if (r["bits"], r["method"], r["lr"]) == (s["bits"], s["method"], s["lr"])
        }
        rows.append({**s, "rate_of": rate_of})
    return rows


def control_paired(controls: list[dict]) -> list[dict]:
    """:func:`paired` differences of ``CONTROL_PAIRS`` at one learning rate, per (bits, lr):
    methods against each other and against float fine-tuning (whose runs, width-free, are
    paired with every width's)."""
    widths = sorted({r["bits"] for r in controls if r["bits"] is not None})
    out = []
    for lr in sorted({r["lr"] for r in controls}):
        at = [r for r in controls if r["lr"] == lr]
        rows = [r for r in at if r["bits"] is not None]
        rows += [{**r, "bits": b} for r in at if r["bits"] is None for b in widths]
        rows.sort(key=lambda r: r["bits"])
        out += [{"lr": lr, **d} for d in paired(rows, CONTROL_PAIRS)]
    return out


def select(rows: list[dict]) -> list[dict]:
    """Per (bits, method), the runs of the learning rate with the best mean validation
    accuracy over seeds (ties: the smaller rate); the test set plays no part."""
    out = []
    for key in dict.fromkeys((r["bits"], r["method"]) for r in rows):
        mine = [r for r in rows if (r["bits"], r["method"]) == key]
        lrs = sorted({r["lr"] for r in mine})
        best = max(lrs, key=lambda lr: (np.mean([r["val"] for r in mine if r["lr"] == lr]), -lr))
        out += [r for r in mine if r["lr"] == best]
    return out


def paired(selected: list[dict], pairs: tuple[tuple[str, str], ...] = PAIRS) -> list[dict]:
    """Per bits and pair ``(a, b)`` of ``pairs``: ``d_s = qat_a - qat_b`` on seed ``s`` (same
    float model and batch order), its mean, sample std and ``t = mean / (std / sqrt(n))``."""
    out = []
    for bits in dict.fromkeys(r["bits"] for r in selected):
        acc = {(r["method"], r["seed"]): r["qat"] for r in selected if r["bits"] == bits}
        for a, b in pairs:
            seeds = sorted(s for m, s in acc if m == a and (b, s) in acc)
            if not seeds:
                continue
            d = np.array([acc[(a, s)] - acc[(b, s)] for s in seeds], np.float64)
            std = float(d.std(ddof=1)) if len(d) > 1 else 0.0
            t = float(d.mean() / (std / np.sqrt(len(d)))) if std > 0 else float("nan")
            out.append(
                {
                    "bits": bits,
                    "pair": f"{a}-{b}",
                    "seeds": len(d),
                    "diff_mean": float(d.mean()),
                    "diff_std": std,
                    "diff_min": float(d.min()),
                    "diff_max": float(d.max()),
                    "t": t,
                }
            )
    return out


def _merged(base, override):
    """``base`` with ``override``'s leaves written over it, nested dicts merged key by key
    (what ``QuantizedModel.attach`` returns, without re-running ``init`` per seed)."""
    if not (isinstance(base, Mapping) and isinstance(override, Mapping)):
        return override
    return {**base, **{k: _merged(base.get(k), v) for k, v in override.items()}}


# --- min/max PTQ then Adam QAT, one seed at a time (used by papers/krishnamoorthi2018) -----


class Quantized(NamedTuple):
    """One architecture under one rule set, with its QAT step and evaluation function built
    once, so that every seed reuses their compilations (jitted on function identity), and the
    fresh quantization variables (``quant_stats``, learned scales) every seed starts from."""

    qmodel: ql.QuantizedModel
    optimizer: optax.GradientTransformation
    train_step: Callable
    eval_fn: T.ApplyFn
    fresh: dict


def quantized(model, rules, x0, *, steps: int, learning_rate: float) -> Quantized:
    """Quantizes ``model`` by ``rules``; QAT optimizer ``mnist1d_qat.qat_optimizer`` (Adam) over
    ``steps``."""
    qmodel, _ = ql.quantize_model(model, rules, x0, on_unused="ignore")
    opt = adam_qat_optimizer(learning_rate, max(steps, 1))
    step = T.make_train_step(T.linen_apply_fn(qmodel.with_phase("train")), opt)
    fresh = jax.jit(qmodel.init)(jax.random.key(0), x0)
    return Quantized(qmodel, opt, step, T.linen_apply_fn(qmodel.with_phase("eval")), fresh)


def ptq_then_qat(
    q: Quantized,
    variables,
    data,
    *,
    steps: int,
    calib_batches: int,
    batch_size: int,
    seed: int,
) -> dict[str, float]:
    """``{"ptq", "qat"}`` test accuracies of the float ``variables`` quantized by ``q``:
    calibrate min/max on the first ``calib_batches`` training batches, evaluate (PTQ),
    fine-tune ``steps`` steps on batches drawn with ``seed``, evaluate (QAT; skipped when
    ``steps == 0``)."""
    calib = [data.x_train[i * batch_size : (i + 1) * batch_size] for i in range(calib_batches)]
    params, state = T.split_linen(q.qmodel.calibrate(_merged(q.fresh, variables), calib))
    out = {"ptq": T.evaluate(q.eval_fn, params, state, data.x_test, data.y_test)["accuracy"]}
    if steps:
        st, _ = T.fit(
            q.train_step,
            T.TrainState.create(params, state, q.optimizer),
            data.x_train,
            data.y_train,
            steps=steps,
            batch_size=batch_size,
            key=jax.random.key(seed),
        )
        ev = T.evaluate(q.eval_fn, st.params, st.model_state, data.x_test, data.y_test)
        out["qat"] = ev["accuracy"]
    return out


def summarize(rows: list[dict], keys=("bits", "method"), values=("float", "ptq", "qat")):
    """Mean, sample std (ddof=1; 0 for one seed), min and max of ``values`` per ``keys``."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key, strict=True)) | {"seeds": len(rs)}
        for v in values:
            a = np.array([r[v] for r in rs], np.float64)
            std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
            row |= {
                f"{v}_mean": a.mean(),
                f"{v}_std": std,
                f"{v}_min": a.min(),
                f"{v}_max": a.max(),
            }
        out.append(row)
    return out


def _plot(x: np.ndarray, s: float, fmt: jq.IntFormat):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        order = np.argsort(x)
        ax.plot(x[order], lsq_closed_form(x, s, fmt)[order] * np.sqrt(x.size * fmt.qmax))
        ax.set_xlabel("x")
        ax.set_ylabel("d x_hat / d s (Esser et al. eq. 3)")
        ax.set_title(f"LSQ step gradient, {fmt.bits} bits, s = {s:.3g}")

    return draw


def _plot_qat(summary: Table):
    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        for i, m in enumerate(METHODS):
            t = summary.where(method=m)
            if len(t):
                x = np.asarray(t.column("bits"), np.float64) + 0.05 * (i - 1)
                ax.errorbar(
                    x, t.column("qat_mean"), t.column("qat_std"), marker="o", capsize=3, label=m
                )
        ax.set_xlabel("bits (inner weights and activations)")
        ax.set_ylabel("MNIST-1D test accuracy after QAT")
        ax.legend()

    return draw


def summary_rows(selected: list[dict]) -> list[dict]:
    """:func:`summarize` of the selected runs plus their learning rate and mean validation
    accuracy."""
    rows = []
    for s in summarize(selected):
        mine = [r for r in selected if (r["bits"], r["method"]) == (s["bits"], s["method"])]
        val = float(np.mean([r["val"] for r in mine]))
        rows.append({**s, "lr": mine[0]["lr"], "val_mean": val})
    return rows


def ablation(out_dir: str | pathlib.Path, protocol: Protocol = ABLATION) -> dict[str, Table]:
    """Runs ``protocol`` (LSQ on the activations only) and sets it beside the runs of
    :func:`main` in ``out_dir/lsq_pact_qat_runs.json`` (same seeds, float models, batch orders
    and learning-rate grid), as ``lsq_pact_ablation_{runs,qat,paired}``."""
    out = pathlib.Path(out_dir)
    base = Table.from_json((out / "lsq_pact_qat_runs.json").read_text()).to_dicts()
    start = time.perf_counter()
    runs = qat_rows(protocol)
    selected = select(base + runs)
    meta = {k: str(v) for k, v in dataclasses.asdict(protocol).items()}
    meta["wall_s"] = f"{time.perf_counter() - start:.0f}"
    tables = {
        "lsq_pact_ablation_runs": Table.from_dicts(runs).with_meta(**meta),
        "lsq_pact_ablation_qat": Table.from_dicts(summary_rows(selected)).with_meta(**meta),
        "lsq_pact_ablation_paired": Table.from_dicts(paired(selected)).with_meta(**meta),
    }
    return write_tables(out, tables)


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Gradient checks on 1,000 elements when ``quick``, else 10,000 (``jax.jacobian`` holds
    an n x n array); QAT by :data:`QUICK` or :data:`FULL`, then the matched-rate controls
    (:func:`control_rows`). Wall time and load in the meta."""
    paper = "Esser et al. 2019 (LSQ), Choi et al. 2018 (PACT)"
    p = QUICK if quick else FULL
    start, load = time.perf_counter(), os.getloadavg()[0]
    table = Table.from_dicts(gradient_rows(1_000 if quick else 10_000)).with_meta(paper=paper)
    runs = qat_rows(p)
    runs += carried_rows(p, select(runs), (3,) if quick else FULL_CARRIED_BITS)
    selected = select(runs)
    controls = control_rows(p, runs)
    meta = dict(paper=paper, **{k: str(v) for k, v in dataclasses.asdict(p).items()})
    meta |= {
        "wall_s": f"{time.perf_counter() - start:.0f}",
        "load_1min_start": f"{load:.2f}",
        "load_1min_end": f"{os.getloadavg()[0]:.2f}",
        "cpus": str(os.cpu_count()),
    }
    summary = Table.from_dicts(summary_rows(selected)).with_meta(**meta)
    x = np.linspace(-4.0, 4.0, 2001)
    save_figure(out_dir, "lsq_pact_gradients", _plot(x, 1.0, jq.IntFormat(2)))
    save_figure(out_dir, "lsq_pact_qat", _plot_qat(summary))
    tables = {
        "lsq_pact_gradients": table,
        "lsq_pact_qat_runs": Table.from_dicts(runs).with_meta(**meta),
        "lsq_pact_qat": summary,
        "lsq_pact_qat_paired": Table.from_dicts(paired(selected)).with_meta(**meta),
        "lsq_pact_controls_runs": Table.from_dicts(controls).with_meta(**meta),
        "lsq_pact_controls": Table.from_dicts(control_summary(controls)).with_meta(**meta),
        "lsq_pact_controls_paired": Table.from_dicts(control_paired(controls)).with_meta(**meta),
    }
    return write_tables(out_dir, tables)


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
