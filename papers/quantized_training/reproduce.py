"""Quantized training of the MNIST-1D CNN from scratch: int8 / int4 / fp8 backward passes.

Every product of every layer (forward, dL/dinput, dL/dkernel) runs through
``jquant.ops.train_conv_general_dilated`` / ``train_dot_general`` in ``"simulate"`` mode
(``"int"`` gives the same numbers bit for bit up to float summation order; see
``tests/test_quantized_training.py``). The CNN is the zoo's (``jquant.models.CNNConfig()``):
conv1 (5, 1 -> 32), relu, max-pool 2, conv2 (5, 32 -> 32), relu, max-pool 2, dense1 (320 ->
64), relu, head (64 -> 10); written here as pure functions so that each product takes its
configs, its PRNG key and its amax history explicitly.

Recipes (``RECIPES``): forward operands int8 per-tensor symmetric, dynamic (``amax / 127``);
gradients int8 / int4 per tensor with stochastic or round-to-nearest-even rounding, the reused
operands of the backward products int8; fp8: e4m3 forward, e5m2 gradients with Transformer
Engine's delayed scaling (amax history 16, margin 0, saturating casts) or current scaling.
Adam, cosine learning rate, the same for every recipe; 3 seeds, one compiled program per recipe.

``python papers/quantized_training/reproduce.py --out papers/quantized_training/results``
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jquant import ops
from jquant.data import load_mnist1d
from jquant.formats import fp8_e4m3, fp8_e5m2, int4, int8
from jquant.ops.scaling import delayed_scaling
from jquant.quant import QuantConfig
from jquant.reproduce import script_main, write_tables
from jquant.sweep import Table

LAYERS = ("conv1", "conv2", "dense1", "head")
CONV_DN = ("NWC", "WIO", "NWC")
DENSE_DN = (((1,), (0,)), ((), ()))


@dataclasses.dataclass(frozen=True)
class Recipe:
    """One training configuration: forward configs, backward config, scaling."""

    fwd: QuantConfig | None = None
    bwd: ops.BackwardConfig = ops.BackwardConfig()
    delayed: bool = False  # delayed scaling of every operand (fp8)


def _int_recipe(grad_fmt, rounding):
    q8 = QuantConfig(int8)
    return Recipe(q8, ops.BackwardConfig.uniform(QuantConfig(grad_fmt), q8, rounding))


# saturating casts (Transformer Engine's): a value past the delayed scale clips to +-max
_E4M3 = QuantConfig(dataclasses.replace(fp8_e4m3, saturate=True))
_E5M2 = QuantConfig(dataclasses.replace(fp8_e5m2, saturate=True))
RECIPES = {
    "float": Recipe(),
    "int8_grad_stochastic": _int_recipe(int8, "stochastic"),
    "int8_grad_nearest": _int_recipe(int8, "nearest_even"),
    "int4_grad_stochastic": _int_recipe(int4, "stochastic"),
    "int4_grad_nearest": _int_recipe(int4, "nearest_even"),
    "fp8_delayed": Recipe(_E4M3, ops.BackwardConfig.uniform(_E5M2), delayed=True),
    "fp8_current": Recipe(_E4M3, ops.BackwardConfig.uniform(_E5M2)),
}
HISTORY = delayed_scaling(history_len=16, margin=0)


@dataclasses.dataclass(frozen=True)
class Protocol:
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 800
    batch_size: int = 128
    learning_rate: float = 3e-3
    recipes: tuple[str, ...] = (
        "float",
        "int8_grad_stochastic",
        "int8_grad_nearest",
        "fp8_delayed",
        "int4_grad_stochastic",
        "int4_grad_nearest",
    )


QUICK = Protocol(steps=20, recipes=("float", "int8_grad_stochastic", "fp8_delayed"))


def init_params(key):
    shapes = {
        "conv1": (5, 1, 32),
        "conv2": (5, 32, 32),
        "dense1": (320, 64),
        "head": (64, 10),
    }
    params = {}
    for name, k in zip(LAYERS, jax.random.split(key, len(LAYERS)), strict=True):
        shape = shapes[name]
        fan_in = int(np.prod(shape[:-1]))
        w = jax.random.normal(k, shape) * jnp.sqrt(2.0 / fan_in)  # He init
        params[name] = {"kernel": w, "bias": jnp.zeros(shape[-1])}
    return params


def init_meta():
    """Amax histories (delayed scaling) of every operand: the model state."""
    return {n: {o: HISTORY.init() for o in ("lhs", "rhs", "grad")} for n in LAYERS}


def forward(recipe: Recipe, params, meta, sinks, x, key):
    """Logits and this step's forward amaxes ``{layer: {"lhs", "rhs"}}``."""
    keys = dict(zip(LAYERS, jax.random.split(key, len(LAYERS)), strict=True))
    amaxes = {}

    def product(name, a, w, op, **kw):
        amaxes[name] = {"lhs": jnp.max(jnp.abs(a)), "rhs": jnp.max(jnp.abs(w))}
        if recipe.fwd is None and recipe.bwd == ops.BackwardConfig():
            return op(a, w, **kw)
        q = {}
        if recipe.delayed:
            fmt = recipe.fwd.fmt
            gfmt = recipe.bwd.dlhs_grad.fmt
            q = dict(
                lhs_qparams=HISTORY.qparams(meta[name]["lhs"], fmt),
                rhs_qparams=HISTORY.qparams(meta[name]["rhs"], fmt),
                grad_qparams=HISTORY.qparams(meta[name]["grad"], gfmt),
            )
        return op(
            a,
            w,
            **kw,
            lhs_quant=recipe.fwd,
            rhs_quant=recipe.fwd,
            bwd=recipe.bwd,
            key=keys[name] if recipe.bwd.stochastic else None,
            grad_amax_sink=sinks[name],
            **q,
        )

    def conv(name, a):
        op = ops.train_conv_general_dilated
        if recipe.fwd is None and recipe.bwd == ops.BackwardConfig():
            op = jax.lax.conv_general_dilated
        kw = dict(window_strides=(1,), padding="SAME", dimension_numbers=CONV_DN)
        y = product(name, a, params[name]["kernel"], op, **kw) + params[name]["bias"]
        y = jax.nn.relu(y)
        return jax.lax.reduce_window(y, -jnp.inf, jax.lax.max, (1, 2, 1), (1, 2, 1), "VALID")

    def dense(name, a):
        op = ops.train_dot_general
        if recipe.fwd is None and recipe.bwd == ops.BackwardConfig():
            op = jax.lax.dot_general
        w = params[name]["kernel"]
        return product(name, a, w, op, dimension_numbers=DENSE_DN) + params[name]["bias"]

    h = conv("conv2", conv("conv1", x))
    h = jax.nn.relu(dense("dense1", h.reshape(h.shape[0], -1)))
    return dense("head", h), amaxes


def train_one(recipe: Recipe, protocol: Protocol, data, seed):
    """Trains one seed (``seed`` may be traced: vmapped); returns test accuracy and the loss."""
    k_init, k_data, k_round = jax.random.split(jax.random.key(seed), 3)
    params = init_params(k_init)
    opt = optax.adam(optax.cosine_decay_schedule(protocol.learning_rate, protocol.steps))
    opt_state = opt.init(params)
    sinks = {n: jnp.float32(0.0) for n in LAYERS}
    n = data.x_train.shape[0]

    def loss_fn(params, sinks, meta, x, y, key):
        logits, amaxes = forward(recipe, params, meta, sinks, x, key)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, amaxes

    def step(carry, t):
        params, opt_state, meta = carry
        idx = jax.random.choice(jax.random.fold_in(k_data, t), n, (protocol.batch_size,))
        x, y = data.x_train[idx], data.y_train[idx]
        (loss, amaxes), (g, g_amax) = jax.value_and_grad(loss_fn, (0, 1), has_aux=True)(
            params, sinks, meta, x, y, jax.random.fold_in(k_round, t)
        )
        updates, opt_state = opt.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        meta = {
            name: {
                "lhs": HISTORY.update(meta[name]["lhs"], amaxes[name]["lhs"]),
                "rhs": HISTORY.update(meta[name]["rhs"], amaxes[name]["rhs"]),
                "grad": HISTORY.update(meta[name]["grad"], g_amax[name]),
            }
            for name in LAYERS
        }
        return (params, opt_state, meta), loss

    (params, _, meta), losses = jax.lax.scan(
        step, (params, opt_state, init_meta()), jnp.arange(protocol.steps)
    )
    logits, _ = forward(recipe, params, meta, sinks, data.x_test, k_round)
    acc = jnp.mean(jnp.argmax(logits, -1) == data.y_test)
    final_loss = jnp.mean(losses[-100:])
    return acc, final_loss


def run(protocol: Protocol, out: pathlib.Path | None = None) -> dict:
    """Trains every recipe; writes ``out/quantized_training.json`` after each one (if set)."""
    data = load_mnist1d()
    runs = []
    for name in protocol.recipes:
        t0 = time.perf_counter()
        # The data is an argument, not a closed-over constant (XLA would fold it for minutes);
        # seeds run one after another in one compiled program: vmap over seeds turns each
        # conv into a grouped conv (one group per seed), several times slower on XLA:CPU.
        fn = jax.jit(lambda s, d, r=RECIPES[name]: train_one(r, protocol, d, s))
        acc, loss = np.array([jax.device_get(fn(s, data)) for s in protocol.seeds]).T
        for s, a, lo in zip(protocol.seeds, acc, loss, strict=True):
            runs.append({"recipe": name, "seed": s, "test_acc": float(a), "train_loss": float(lo)})
        print(f"{name}: acc {np.round(acc, 4)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        result = {"protocol": dataclasses.asdict(protocol), "runs": runs}
        result["summary"] = summarize(runs)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            (out / "quantized_training.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def summarize(runs: list[dict]) -> list[dict]:
    """Per recipe: mean / min / max test accuracy over seeds, and the gap to float's mean
    (in accuracy points, float minus recipe; positive = worse than float)."""
    names = list(dict.fromkeys(r["recipe"] for r in runs))
    acc = {n: np.array([r["test_acc"] for r in runs if r["recipe"] == n]) for n in names}
    float_mean = acc["float"].mean() if "float" in acc else np.nan
    return [
        {
            "recipe": n,
            "seeds": len(a),
            "acc_mean": float(a.mean()),
            "acc_min": float(a.min()),
            "acc_max": float(a.max()),
            "gap_points": float(100 * (float_mean - a.mean())),
        }
        for n, a in acc.items()
    ]


def main(out_dir, quick: bool = False) -> dict[str, Table]:
    """Runs the protocol (``QUICK`` when ``quick``) into ``out_dir``; returns the tables."""
    result = run(QUICK if quick else Protocol(), pathlib.Path(out_dir))
    tables = {
        "quantized_training_runs": Table.from_dicts(result["runs"]),
        "quantized_training_summary": Table.from_dicts(result["summary"]),
    }
    return write_tables(out_dir, tables)


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
