"""Quantized training of the small GPT from scratch: fp8 (e4m3 forward, e5m2 gradients, current
and delayed scaling) and int4 gradients against float, on the character corpus
(``jquant.data.load("text")``).

The GPT of ``jquant.models.gpt`` (pre-RMSNorm blocks, 4 heads, tied embeddings; its size in
:class:`Protocol`) is quantized by :class:`jquant.QuantRule` s (``jquant.nn.linen.quantize_model``)
in phase ``train`` and trained with the float recipe's optimizer and batch order
(``jquant.models.train``). Every Dense product (``query``, ``key``, ``value``, ``out``, ``up``,
``down`` of every block) is quantized in its forward product and, through ``QuantRule.grad``
(``jquant.ops.train_dot_general``), in both backward products:

- ``fp8_current``: e4m3 weights and input activations, e5m2 output gradients, each scaled per
  tensor from its own amax in the same step (current scaling, ``scale = amax / fmt.max``:
  weights ``weight_granularity="per_tensor"``, activations ``act_scale="dynamic_per_tensor"``,
  gradients ``QuantRule.grad``'s dynamic per-tensor scale).
- ``fp8_delayed``: the same formats with Transformer Engine's delayed scaling
  (``QuantRule(scaling="delayed", amax_history=16, margin=0)``: ``scale_t = max(h_{t-1}) /
  fmt.max``, per tensor, from the amaxes of the 16 previous steps, saturating casts). The
  histories live in the ``scaling_history`` collection; the train step
  (:func:`make_train_step`) differentiates the loss with respect to them too and replaces
  them by their gradients, their next values ("overwrite with gradient",
  ``jquant.ops.scaling``).
- ``int4_grad_nearest``: int8 weights and activations (symmetric per tensor, dynamic), int4
  output gradients (dynamic per tensor) rounded to nearest even: the recipe that failed on the
  MNIST-1D CNN (``reproduce.py``).

Not quantized: the attention's activation x activation products (``scores``, ``mix``), the
tied embedding lookup and the logits (``embed.attend``), RMSNorm, softmax, the loss and the
optimizer state. The validation loss (nats per character) is measured with the same quantized
forward the model was trained with (phase ``eval``, with ``fp8_delayed``'s final histories;
float for ``float``).

``python papers/quantized_training/gpt.py --out papers/quantized_training/results``; or one
process per seed (``--seeds 1 --out DIR1``, ...) or per recipe (``--recipes fp8_delayed``)
joined by ``--merge DIR0/... DIR1/... --out``.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

import jax
import numpy as np

from jquant import data as data_lib
from jquant.data import text as text_lib
from jquant.models import gpt
from jquant.models import train as T
from jquant.models.config import GPTConfig
from jquant.nn import QuantRule
from jquant.nn import linen as ql
from jquant.nn.state import HISTORIES

ATTENTION_FLOAT = QuantRule(r".*/(scores|mix)$", keep_float=True)
RECIPES: dict[str, tuple[QuantRule, ...] | None] = {
    "float": None,
    "fp8_current": (
        ATTENTION_FLOAT,
        QuantRule(
            ".*",
            weight="fp8_e4m3",
            act="fp8_e4m3",
            weight_granularity="per_tensor",
            act_symmetric=True,
            act_scale="dynamic_per_tensor",
            grad="fp8_e5m2",
        ),
    ),
    "fp8_delayed": (
        ATTENTION_FLOAT,
        QuantRule(
            ".*",
            weight="fp8_e4m3",
            act="fp8_e4m3",
            grad="fp8_e5m2",
            scaling="delayed",
            amax_history=16,
            margin=0,
        ),
    ),
    "int4_grad_nearest": (
        ATTENTION_FLOAT,
        QuantRule(
            ".*",
            weight="int8",
            act="int8",
            weight_granularity="per_tensor",
            act_symmetric=True,
            act_scale="dynamic_per_tensor",
            grad="int4",
            grad_rounding="nearest_even",
        ),
    ),
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Model size and training schedule, the same for every recipe (Adam, cosine learning
    rate from ``learning_rate``): by default the zoo GPT (``GPTConfig()``: 4 blocks of width
    128, 4 heads, context 128) and its float recipe (``gpt.TRAIN_RECIPE``: 1200 steps of 16
    windows, learning rate 3e-3), so ``float`` is the zoo's own training run.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = gpt.TRAIN_RECIPE["steps"]
    batch_size: int = gpt.TRAIN_RECIPE["batch_size"]
    learning_rate: float = gpt.TRAIN_RECIPE["learning_rate"]
    context: int = GPTConfig.context
    num_layers: int = GPTConfig.num_layers
    width: int = GPTConfig.width
    recipes: tuple[str, ...] = ("float", "fp8_current", "fp8_delayed", "int4_grad_nearest")


QUICK = Protocol(seeds=(0,), steps=4, batch_size=2, context=16, num_layers=1, width=32)


def _model(protocol: Protocol, ds) -> gpt.GPT:
    cfg = GPTConfig(
        vocab_size=ds.num_classes,
        context=protocol.context,
        num_layers=protocol.num_layers,
        width=protocol.width,
    )
    return gpt.GPT(cfg)


def make_train_step(train_fn: T.ApplyFn, opt, model_state: dict):
    """``jquant.models.train.make_train_step`` carrying delayed scaling's amax histories when
    the model has them (``fp8_delayed``): the loss is differentiated with respect to the
    ``scaling_history`` collection too and each history is replaced by its gradient, its next
    value ``h_t = (amax_t, h_{t-1}[0], ..., h_{t-1}[H-2])`` ("overwrite with gradient")."""
    carried = (HISTORIES,) if HISTORIES in model_state else ()
    return T.make_train_step(train_fn, opt, overwrite_with_gradient=carried)


def prepare(recipe: str, model: gpt.GPT, x0, key) -> tuple[T.ApplyFn, T.ApplyFn, dict, dict]:
    """``(train_fn, eval_fn, params, model_state)``: ``model`` quantized by
    ``RECIPES[recipe]`` in phases ``train`` and ``eval`` (both float for ``float``), its
    variables initialised from ``key`` (``model_state``: the quantization collections)."""
    if recipe not in RECIPES:
        raise ValueError(f"recipe must be one of {list(RECIPES)}, got {recipe!r}")
    variables = jax.jit(model.init)(key, x0)
    rules = RECIPES[recipe]
    if rules is None:
        apply_fn = T.linen_apply_fn(model)
        return apply_fn, apply_fn, *T.split_linen(variables)
    qmodel, _ = ql.quantize_model(model, rules, x0, on_unused="raise")
    params, state = T.split_linen(qmodel.attach(variables, x0))
    train_fn = T.linen_apply_fn(qmodel.with_phase("train"))
    return train_fn, T.linen_apply_fn(qmodel.with_phase("eval")), params, state


def train_one(recipe: str, protocol: Protocol, ds, seed: int) -> dict:
    """Trains one seed of ``recipe``; returns the validation loss and the final train loss."""
    init_key, data_key = jax.random.split(jax.random.key(seed))
    train_fn, eval_fn, params, state = prepare(
        recipe, _model(protocol, ds), ds.x_train[:1], init_key
    )
    opt = T.make_optimizer(protocol.learning_rate, protocol.steps)
    start = time.perf_counter()
    final, history = T.fit(
        make_train_step(train_fn, opt, state),
        T.TrainState.create(params, state, opt),
        ds.x_train,
        ds.y_train,
        steps=protocol.steps,
        batch_size=protocol.batch_size,
        key=data_key,
    )
    jax.block_until_ready(final.params)
    seconds = time.perf_counter() - start
    val = T.evaluate(eval_fn, final.params, final.model_state, ds.x_test, ds.y_test)
    return {
        "recipe": recipe,
        "seed": seed,
        "val_loss": val["loss"],
        "train_loss": history[-1]["loss"],
        "train_seconds": seconds,
    }


def references(ds) -> dict:
    """Losses of character statistics alone, in nats per character, to read the GPT's
    against: the unigram entropy of the validation text and the bigram conditional entropy of
    the training text (``jquant.data.text``; ``tests/test_gpt.py`` uses the same baseline)."""
    return {
        "unigram_entropy_val": text_lib.unigram_entropy(ds.ids_test, ds.num_classes),
        "bigram_entropy_train": text_lib.bigram_entropy(ds.ids_train, ds.num_classes),
    }


def summarize(runs: list[dict]) -> list[dict]:
    """Per recipe: mean / min / max validation loss over seeds and the relative gap to float's
    mean, ``100 (mean_recipe / mean_float - 1)`` percent (positive: worse than float)."""
    names = list(dict.fromkeys(r["recipe"] for r in runs))
    loss = {n: np.array([r["val_loss"] for r in runs if r["recipe"] == n]) for n in names}
    float_mean = loss["float"].mean() if "float" in loss else np.nan
    return [
        {
            "recipe": n,
            "seeds": len(v),
            "val_loss_mean": float(v.mean()),
            "val_loss_min": float(v.min()),
            "val_loss_max": float(v.max()),
            "gap_percent": float(100 * (v.mean() / float_mean - 1)),
        }
        for n, v in loss.items()
    ]


def run(protocol: Protocol, out: pathlib.Path | None = None) -> dict:
    """Trains every recipe and seed; writes ``out/quantized_training_gpt.json`` after each run."""
    ds = data_lib.load("text", context=protocol.context)
    runs = []
    result = {}
    for seed in protocol.seeds:  # seed-major: a cut-off run still has all recipes of a seed
        for name in protocol.recipes:
            row = train_one(name, protocol, ds, seed)
            runs.append(row)
            print(
                f"{name} seed {seed}: val {row['val_loss']:.4f} ({row['train_seconds']:.0f} s)",
                flush=True,
            )
            result = {
                "protocol": dataclasses.asdict(protocol),
                "command": " ".join(["python", *sys.argv]),
                "reference": references(ds),
                "runs": runs,
                "summary": summarize(runs),
            }
            if out is not None:
                out.mkdir(parents=True, exist_ok=True)
                path = out / "quantized_training_gpt.json"
                path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def merge(paths: list[pathlib.Path], out: pathlib.Path | None = None) -> dict:
    """One result from runs written by separate processes (one seed each, or some recipes
    each; the same protocol otherwise): their runs concatenated and sorted by seed, then in
    the order of :data:`RECIPES`; the protocol's seeds and recipes those of the runs; the
    summary recomputed; every command kept. Raises ValueError when the protocols differ beyond
    their seeds and recipes, the references differ (not the same data) or a (recipe, seed) run
    repeats."""
    parts = [json.loads(pathlib.Path(p).read_text()) for p in paths]
    protocols = [
        {k: v for k, v in d["protocol"].items() if k not in ("seeds", "recipes")} for d in parts
    ]
    if any(pr != protocols[0] for pr in protocols):
        raise ValueError(f"paths: protocols differ beyond their seeds and recipes: {protocols}")
    if any(d.get("reference") != parts[0].get("reference") for d in parts):
        raise ValueError("paths: the references differ (runs on different data)")
    rank = {name: i for i, name in enumerate(RECIPES)}
    runs = sorted(
        (r for d in parts for r in d["runs"]),
        key=lambda r: (r["seed"], rank.get(r["recipe"], len(rank))),
    )
    if len({(r["recipe"], r["seed"]) for r in runs}) != len(runs):
        raise ValueError("paths: a (recipe, seed) run appears twice")
    protocol = {**parts[0]["protocol"], "seeds": sorted({r["seed"] for r in runs})}
    if "recipes" in protocol:
        in_order = sorted(runs, key=lambda r: rank.get(r["recipe"], len(rank)))
        protocol["recipes"] = list(dict.fromkeys(r["recipe"] for r in in_order))
    commands = [d["command"] for d in parts]
    result = {
        "protocol": protocol,
        "command": [c for cs in commands for c in (cs if isinstance(cs, list) else [cs])],
        "reference": parts[0].get("reference"),
        "runs": runs,
        "summary": summarize(runs),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "quantized_training_gpt.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def main(argv: list[str] | None = None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="output folder (default: print only)")
    p.add_argument("--quick", action="store_true", help="a few steps of a short context")
    p.add_argument("--steps", type=int, default=None, help="override Protocol.steps")
    p.add_argument("--recipes", default=None, help="comma-separated subset of RECIPES")
    p.add_argument("--seeds", default=None, help="comma-separated seeds")
    p.add_argument(
        "--learning-rate", type=float, default=None, help="override Protocol.learning_rate"
    )
    p.add_argument(
        "--merge", nargs="+", default=None, help="merge these result JSONs (one seed each)"
    )
    args = p.parse_args(argv)
    out = None if args.out is None else pathlib.Path(args.out)
    if args.merge is not None:
        return merge([pathlib.Path(m) for m in args.merge], out)
    protocol = QUICK if args.quick else Protocol()
    if args.steps is not None:
        protocol = dataclasses.replace(protocol, steps=args.steps)
    if args.recipes is not None:
        protocol = dataclasses.replace(protocol, recipes=tuple(args.recipes.split(",")))
    if args.seeds is not None:
        protocol = dataclasses.replace(protocol, seeds=tuple(map(int, args.seeds.split(","))))
    if args.learning_rate is not None:
        protocol = dataclasses.replace(protocol, learning_rate=args.learning_rate)
    return run(protocol, out)


if __name__ == "__main__":
    main()
