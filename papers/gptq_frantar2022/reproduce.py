"""Frantar, Ashkboos, Hoefler, Alistarh (2022), GPTQ: weight-only 3/4-bit PTQ of a GPT.

Our version: the zoo's small GPT (``jquant.models.gpt``, trained once on the embedded
character corpus ``jquant.data.load("text")`` with ``gpt.TRAIN_RECIPE``), its block kernels
quantized by :func:`jquant.ptq.quantize_model` (sequential, layer by layer) with RTN or GPTQ
(``H = 2 X^T X``, damp 0.01, Algorithm 1) at 3 and 4 bits, per output channel and in groups
of 32 inputs; embeddings and attention products stay float. Metric: validation perplexity
``exp(mean -log p(next char))``. Seeds draw the calibration windows (one trained GPT: training
three is too slow on 2 cores). RTN uses no data, so it has one run.

The claim checked: GPTQ's perplexity increase over float at 3 bits is at most half of RTN's.

This script also holds the protocol the other LLM papers (``awq_lin2023``,
``smoothquant_xiao2022``, ``quarot_ashkboos2024``) share: :class:`Protocol`,
:func:`load_gpt`, :func:`calibration`, :func:`perplexity`, :func:`run_grid` and
:func:`summarize` (they load it with ``jquant.reproduce.load_paper``).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant import data, ptq
from jquant.models import gpt, train
from jquant.reproduce import save_figure, script_main, write_tables
from jquant.sweep import Table

FLOAT_BITS = 32
DETERMINISTIC = -1  # the seed column of a run that uses no random draw (RTN, no transform)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """The shared protocol of the LLM papers.

    Args:
      seeds: calibration draws (and random Hadamard signs for ``"rotate"``).
      calib_windows: training windows drawn per seed (``calib_windows * context`` tokens).
      calib_batch: windows per calibration batch.
      eval_windows: validation windows scored (the first ones), a multiple of ``eval_batch``.
      eval_batch: windows per evaluation batch (one compiled program).
      train_steps: GPT training steps (None: ``gpt.TRAIN_RECIPE``'s).
      outlier_channels: residual channels made outliers by :func:`outlier_model`.
      outlier_factor: the factor ``c`` of ``jquant.ptq.inject_outlier``.
    """

    seeds: tuple[int, ...] = (0, 1, 2)
    calib_windows: int = 32
    calib_batch: int = 8
    eval_windows: int = 256
    eval_batch: int = 64
    train_steps: int | None = None
    outlier_channels: tuple[int, ...] = (5, 77)
    outlier_factor: float = 32.0

    def __post_init__(self):
        if not self.seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise ValueError(
                f"Protocol.seeds must be a non-empty tuple of ints, got {self.seeds!r}"
            )
        for name in ("calib_windows", "calib_batch", "eval_windows", "eval_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Protocol.{name} must be a positive int, got {v!r}")
        if self.eval_windows % self.eval_batch:
            raise ValueError(
                f"Protocol.eval_windows ({self.eval_windows}) must be a multiple of "
                f"Protocol.eval_batch ({self.eval_batch})"
            )
        if self.train_steps is not None and (
            isinstance(self.train_steps, bool)
            or not isinstance(self.train_steps, int)
            or self.train_steps < 1
        ):
            raise ValueError(
                f"Protocol.train_steps must be None or an int >= 1, got {self.train_steps!r}"
            )
        if not isinstance(self.outlier_factor, int | float) or not self.outlier_factor > 0:
            raise ValueError(f"Protocol.outlier_factor must be > 0, got {self.outlier_factor!r}")


QUICK = Protocol(seeds=(0, 1), calib_windows=8, eval_windows=32, eval_batch=32, train_steps=30)


def load_gpt(protocol: Protocol) -> tuple[gpt.GPT, dict, data.TextDataset, dict]:
    """The zoo GPT trained (or loaded from the cache) on ``jquant.data.load("text")`` with
    ``gpt.TRAIN_RECIPE`` (``protocol.train_steps`` replacing its steps), seed 0.

    Returns ``(model, variables, dataset, train_metrics)``.
    """
    ds = data.load("text")
    recipe = dict(gpt.TRAIN_RECIPE)
    if protocol.train_steps is not None:
        recipe["steps"] = protocol.train_steps
    trained = train.train_or_load("gpt", ds, 0, **recipe)
    return trained.model, trained.variables, ds, {**trained.metrics, "train_steps": recipe["steps"]}


def calibration(x_train: np.ndarray, seed: int, protocol: Protocol) -> list[np.ndarray]:
    """``protocol.calib_windows`` training windows drawn without replacement by ``seed``
    (``numpy.random.default_rng``), in batches of ``protocol.calib_batch``."""
    x_train = np.asarray(x_train)
    if protocol.calib_windows > len(x_train):
        raise ValueError(
            f"Protocol.calib_windows={protocol.calib_windows} exceeds the {len(x_train)} "
            "training windows"
        )
    idx = np.sort(np.random.default_rng(seed).choice(len(x_train), protocol.calib_windows, False))
    x = x_train[idx]
    return [x[s : s + protocol.calib_batch] for s in range(0, len(x), protocol.calib_batch)]


def outlier_model(model: gpt.GPT, variables: dict, protocol: Protocol) -> dict:
    """``jquant.ptq.inject_outlier`` at every block's ``norm1`` and ``norm2``, on each of
    ``protocol.outlier_channels``, by ``protocol.outlier_factor``: the same float function,
    with activation outlier channels at every quantized layer's input."""
    for i in range(1, model.config.num_layers + 1):
        for norm in ("norm1", "norm2"):
            for c in protocol.outlier_channels:
                variables = ptq.inject_outlier(
                    model, variables, f"block{i}/{norm}", c, protocol.outlier_factor
                )
    return variables


@functools.lru_cache(maxsize=16)
def _jit_apply(model):
    # Linen modules (and QuantizedModel) hash by their fields: one compile per model config.
    return jax.jit(model.apply)


def perplexity(model, variables: dict, x: np.ndarray, y: np.ndarray, batch: int) -> float:
    """``exp(mean_{b,i} -log softmax(model(x)_{b,i})[y_{b,i}])`` over every position, in
    batches of ``batch`` windows (``len(x)`` a multiple of ``batch``)."""
    if len(x) % batch:
        raise ValueError(f"len(x)={len(x)} must be a multiple of batch={batch}")
    fn = _jit_apply(model)
    total = 0.0
    for s in range(0, len(x), batch):
        logp = jax.nn.log_softmax(fn(variables, jnp.asarray(x[s : s + batch])).astype(jnp.float32))
        nll = -jnp.take_along_axis(logp, jnp.asarray(y[s : s + batch])[..., None], -1)
        total += float(jnp.sum(nll))
    return float(np.exp(total / np.asarray(y).size))


@dataclasses.dataclass(frozen=True)
class Config:
    """One row family of a paper's grid: a name, the base model (``"plain"`` or
    ``"outlier"``) and the :class:`jquant.ptq.Recipe` (None: the float model)."""

    name: str
    base: str
    recipe: ptq.Recipe | None

    def __post_init__(self):
        if self.base not in ("plain", "outlier"):
            raise ValueError(f"Config.base must be 'plain' or 'outlier', got {self.base!r}")
        if self.recipe is not None and not isinstance(self.recipe, ptq.Recipe):
            raise TypeError(
                f"Config.recipe must be a jquant.ptq.Recipe or None, got {self.recipe!r}"
            )

    @property
    def seeded(self) -> bool:
        """Whether the run draws anything: calibration data or a random rotation."""
        r = self.recipe
        return r is not None and (r.method != "rtn" or r.transform is not None)


def _bits(fmt) -> int:
    return FLOAT_BITS if fmt is None else int(fmt.bits)


def run_grid(
    configs: Sequence[Config],
    protocol: Protocol,
    model: gpt.GPT,
    variables: dict,
    ds,
    *,
    progress: bool = True,
) -> Table:
    """Perplexity of every config: seeded ones once per ``protocol.seeds`` (the seed drawing
    the calibration windows and ``Recipe.seed``), the rest once (``seed = -1``).

    Returns a Table ``name, base, method, group_size, bits, act_bits, transform, seed,
    perplexity``.
    """
    x = np.asarray(ds.x_test[: protocol.eval_windows])
    y = np.asarray(ds.y_test[: protocol.eval_windows])
    if len(x) < protocol.eval_windows:
        raise ValueError(
            f"Protocol.eval_windows={protocol.eval_windows} exceeds the {len(ds.x_test)} "
            "validation windows"
        )
    bases = {"plain": variables}
    if any(c.base == "outlier" for c in configs):
        bases["outlier"] = outlier_model(model, variables, protocol)
    rows = []
    for c in configs:
        seeds = protocol.seeds if c.seeded else (DETERMINISTIC,)
        for seed in seeds:
            r = c.recipe
            if r is None:
                m, v = model, bases[c.base]
            else:
                recipe = dataclasses.replace(r, seed=max(seed, 0))
                calib = calibration(ds.x_train, max(seed, 0), protocol)
                m, v = ptq.quantize_model(model, bases[c.base], calib, recipe).runner(
                    jnp.asarray(x[:1])
                )
            ppl = perplexity(m, v, x, y, protocol.eval_batch)
            row = {
                "name": c.name,
                "base": c.base,
                "method": "float" if r is None else r.method,
                "group_size": 0 if r is None or r.group_size is None else r.group_size,
                "bits": FLOAT_BITS if r is None else _bits(r.weight),
                "act_bits": FLOAT_BITS if r is None else _bits(r.act),
                "transform": "none" if r is None or r.transform is None else r.transform,
                "seed": seed,
                "perplexity": ppl,
            }
            rows.append(row)
            if progress:
                print(f"[{c.name} seed {seed}] perplexity {ppl:.4f}", flush=True)
    return Table.from_dicts(rows)


def summarize(runs: Table) -> Table:
    """Per config name: mean and sample std (ddof 1; 0 for one run) of the perplexity and of
    its increase over the float model of the same base, and the number of runs."""
    rows = runs.to_dicts()
    floats = {r["base"]: r["perplexity"] for r in rows if r["method"] == "float"}
    out = []
    for name in dict.fromkeys(r["name"] for r in rows):
        group = [r for r in rows if r["name"] == name]
        p = np.array([r["perplexity"] for r in group])
        d = p - floats[group[0]["base"]]
        sd = lambda a: float(a.std(ddof=1)) if len(a) > 1 else 0.0
        keep = {
            k: group[0][k]
            for k in ("base", "method", "group_size", "bits", "act_bits", "transform")
        }
        out.append(
            {"name": name, **keep, "runs": len(p), "ppl_mean": float(p.mean()), "ppl_std": sd(p),
             "increase_mean": float(d.mean()), "increase_std": sd(d)}
        )  # fmt: skip
    return Table.from_dicts(out)


def increase(summary: Table, name: str) -> float:
    """The mean perplexity increase over float of config ``name``."""
    (row,) = summary.where(name=name).to_dicts()
    return row["increase_mean"]


def bar_plot(summary: Table, title: str):
    """A ``save_figure`` drawer: mean perplexity (with std) per config."""

    def draw(fig):
        ax = fig.add_subplot(1, 1, 1)
        rows = summary.to_dicts()
        ax.bar(range(len(rows)), [r["ppl_mean"] for r in rows], yerr=[r["ppl_std"] for r in rows])
        ax.set_xticks(
            range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right", fontsize=7
        )
        ax.set_ylabel("validation perplexity")
        ax.set_title(title)

    return draw


# --- GPTQ ------------------------------------------------------------------------------------


def configs(
    bits: Sequence[int] = (3, 4), groups: Sequence[int | None] = (None, 32)
) -> list[Config]:
    """Float, then RTN and GPTQ at each width and grouping (weight-only, asymmetric)."""
    out = [Config("float", "plain", None)]
    for b in bits:
        for g in groups:
            tag = f"w{b}" + (f"g{g}" if g else "")
            for method in ("rtn", "gptq"):
                recipe = ptq.Recipe(method, weight=jq.IntFormat(b), group_size=g)
                out.append(Config(f"{method}_{tag}", "plain", recipe))
    return out


def verdict(summary: Table, bits: Sequence[int] = (3, 4), groups=("", "g32")) -> Table:
    """Per width and grouping: GPTQ's and RTN's mean increase and their ratio; the claim
    (``ratio <= 0.5``) is checked at 3 bits."""
    rows = []
    for b in bits:
        for g in groups:
            rtn_inc, gptq_inc = (
                increase(summary, f"rtn_w{b}{g}"),
                increase(summary, f"gptq_w{b}{g}"),
            )
            rows.append(
                {"bits": b, "grouping": g or "per-channel", "rtn_increase": rtn_inc,
                 "gptq_increase": gptq_inc, "ratio": gptq_inc / rtn_inc,
                 "holds": bool(gptq_inc <= 0.5 * rtn_inc) if b == 3 else None}
            )  # fmt: skip
    return Table.from_dicts(rows)


def write(out_dir: str | pathlib.Path, runs: Table, protocol: Protocol, metrics: dict):
    """Writes the runs, their summary, the verdict and the plot into ``out_dir``."""
    meta = {"paper": "Frantar et al. 2022 (GPTQ)", "protocol": repr(protocol), **metrics}
    runs = runs.with_meta(**meta)
    summary = summarize(runs).with_meta(**meta)
    save_figure(out_dir, "gptq_frantar2022", bar_plot(summary, "RTN vs GPTQ, small GPT"))
    return write_tables(
        out_dir,
        {
            "gptq_frantar2022_runs": runs,
            "gptq_frantar2022": summary,
            "gptq_frantar2022_verdict": verdict(summary).with_meta(**meta),
        },
    )


def run_paper(
    out_dir: str | pathlib.Path,
    name: str,
    paper: str,
    grid: Sequence[Config],
    plot_title: str,
    verdict_of: Callable[[Table], Table],
    quick: bool = False,
) -> dict[str, Table]:
    """The LLM PTQ papers' driver: ``grid`` on the zoo GPT under this module's protocol,
    then ``<name>_runs``, ``<name>`` (the summary), ``<name>_verdict`` and a bar plot."""
    protocol = QUICK if quick else Protocol()
    model, variables, ds, metrics = load_gpt(protocol)
    meta = {"paper": paper, "protocol": repr(protocol), **metrics}
    runs = run_grid(grid, protocol, model, variables, ds).with_meta(**meta)
    summary = summarize(runs).with_meta(**meta)
    save_figure(out_dir, name, bar_plot(summary, plot_title))
    tables = {
        f"{name}_runs": runs,
        name: summary,
        f"{name}_verdict": verdict_of(summary).with_meta(**meta),
    }
    return write_tables(out_dir, tables)


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """RTN vs GPTQ at 3 and 4 bits, per channel and group 32, 3 calibration seeds."""
    protocol = QUICK if quick else Protocol()
    model, variables, ds, metrics = load_gpt(protocol)
    return write(out_dir, run_grid(configs(), protocol, model, variables, ds), protocol, metrics)


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
