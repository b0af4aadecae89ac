"""The ``jquant`` command line: ``jquant <command> [options]`` (also ``python -m jquant``).

Commands are entries of :data:`COMMANDS`, each a :class:`Command` with a name, a help line, a
function that adds its options to an ``argparse`` subparser and a function that runs it; a new
subcommand is one more entry. Bad options exit with status 2 and a message naming the option
(argparse's convention), before any work starts.

``jquant sweep`` (the default configuration needs no arguments): train (or load the cached
weights of) a zoo model on a data set, then

- sweep its weights and its layers' activations over the widths, granularities and
  calibration methods (:func:`jquant.sweep.error_vs_bits`; one compiled program per curve);
- evaluate the post-training-quantized model with weights and activations at each width
  (:func:`jquant.sweep.model_vs_bits`; one compiled program per granularity, traced widths);
- quantize one layer at a time (:func:`jquant.sweep.sensitivity`) and walk the greedy
  mixed-precision path from every layer at the widest to every layer at the narrowest width
  (:func:`jquant.sweep.mixed_precision`, ``full_path=True``), both at the first granularity;
  with ``--budget`` the first configuration on the path that fits the model-size budget is
  the chosen one (column ``chosen``, a star in ``pareto_front.png``, a line printed);
  without it no configuration is chosen (every ``chosen`` is false, ``chosen_*`` meta null);
- print the tables and write ``tensors.{csv,json}``, ``model.{csv,json}``,
  ``sensitivity.{csv,json}``, ``mixed_precision.{csv,json}``, ``sqnr_vs_bits.png``,
  ``accuracy_vs_bits.png``, ``sensitivity.png`` (per layer, at the width closest to 4) and
  ``pareto_front.png`` (accuracy against model size) into ``--out``. Files are written into a
  staging folder ``.<out name>.staging.<host>.<pid>.<random>`` beside ``--out`` (inside it when
  ``--out`` exists and its parent is not writable) and moved into place at the end, so a failed
  run leaves nothing half-written; where the staging folder goes is checked writable before any
  work, and staging folders left by killed runs (their process gone) are removed at the next
  start. JSON files hold strict JSON: non-finite numbers are ``null``
  (:meth:`jquant.sweep.Table.to_json`).

The trained weights come from the cache of :func:`jquant.models.train.train_or_load`; a
corrupt cache file is reported (a warning naming it) and retrained; ``--retrain`` retrains
and overwrites it regardless.

``--budget`` is the model-size budget for mixed precision, in the size
``sum_L params_L * b_L / 8 + 4 * (other parameters)`` bytes of
:func:`jquant.sweep.mixed_precision.model_size_bytes`: a plain number is a fraction of the
size with every quantized layer at 8 bits (``--budget 0.5``: half the int8 model), a number
followed by ``B`` is bytes (``--budget 3000B``). A value that is not a positive finite number
exits with status 2 before any work; a budget below the size with every layer at the
narrowest ``--bits`` width exits with status 2 once the model is loaded, before the sweeps
and before anything is written.

Several hosts: after ``jax.distributed.initialize()`` every process runs the same command; the
sweeps shard their widths over all processes' devices (:mod:`jquant.sweep.sharding`) and only
process 0 prints the tables and writes ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import NamedTuple

from jquant.calibration import observer_names
from jquant.formats import MAX_BITS, MIN_BITS

__all__ = [
    "COMMANDS",
    "Budget",
    "Command",
    "budget_bytes",
    "build_parser",
    "main",
    "parse_bits",
    "parse_budget",
    "parse_choices",
    "remove_stale_staging",
    "staging_parent",
    "write_results",
]

MODELS = ("mlp", "cnn", "cnn_bn")  # jquant.models.config.MODEL_NAMES (checked in a test)
DATASETS = ("mnist1d", "digits")  # jquant.data.DATASETS (checked in a test)
LM_MODELS = ("gpt",)  # jquant.models.config.LM_MODEL_NAMES: the PTQ perplexity sweep
LM_DATASETS = ("text",)  # jquant.data.TEXT_DATASETS
# --model gpt defaults (the zoo GPT's recipe is jquant.models.gpt.TRAIN_RECIPE)
LM_DEFAULTS = {"bits": [3, 4, 8], "eval_examples": 64, "calib_examples": 32}
CLASSIFIER_DEFAULTS = {"bits": list(range(2, 9)), "eval_examples": 1000, "calib_examples": 1024}
GRANULARITIES = ("per_tensor", "per_channel")
# Calibration names from the registry of jquant.calibration: those that calibrate whole
# tensors (the tensor sweep), and of those the ones that stream (the model sweep's rules).
CALIBRATIONS = observer_names(one_shot=True)
MODEL_CALIBRATIONS = observer_names(one_shot=True, streams=True)


class Command(NamedTuple):
    """A subcommand: ``configure(parser)`` adds options; ``run(args) -> exit status``."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def parse_bits(text: str) -> list[int]:
    """``"2-8"`` -> ``[2, ..., 8]``; ``"2,4,8"`` -> ``[2, 4, 8]``; each in ``[2, 16]``; a range
    ``A-B`` needs ``A <= B``."""
    try:
        widths: list[int] = []
        for part in text.split(","):
            lo, sep, hi = part.strip().partition("-")
            if sep:
                a, b = int(lo), int(hi)
                if a > b:
                    raise argparse.ArgumentTypeError(
                        f"{text!r}: the range {part.strip()!r} is descending; write it "
                        f"ascending, '{b}-{a}'"
                    )
                widths.extend(range(a, b + 1))
            else:
                widths.append(int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a width list: use a range 'A-B' or a list 'A,B,C' of integers"
        ) from None
    bad = [b for b in widths if not MIN_BITS <= b <= MAX_BITS]
    if bad:
        raise argparse.ArgumentTypeError(
            f"widths must be integers in [{MIN_BITS}, {MAX_BITS}], got {text!r} ({bad} outside)"
        )
    return sorted(set(widths))


class Budget(NamedTuple):
    """A model-size budget: ``value`` bytes, or ``value`` times the all-8-bit size."""

    value: float
    unit: str  # "fraction" (of the size with every quantized layer at 8 bits) or "bytes"

    def to_bytes(self, size_8bit: float) -> float:
        """The budget in bytes, given the size with every quantized layer at 8 bits."""
        return self.value * size_8bit if self.unit == "fraction" else self.value


def parse_budget(text: str) -> Budget:
    """``"0.5"`` -> half the all-8-bit model size; ``"3000B"`` -> 3000 bytes; each > 0, finite."""
    number, unit = (text[:-1], "bytes") if text.strip().endswith("B") else (text, "fraction")
    try:
        value = float(number)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a budget: use a positive fraction of the 8-bit model size "
            "(e.g. 0.5) or a positive number of bytes followed by B (e.g. 3000B)"
        )
    return Budget(value, unit)


def parse_granularities(text: str) -> list[str]:
    """An argparse type for comma-separated weight granularities: ``per_tensor``,
    ``per_channel`` and ``per_block:<block size>`` (``per_block:32``)."""
    from jquant.nn.rules import parse_granularity

    names = [t.strip() for t in text.split(",") if t.strip()]
    for n in names or [""]:
        try:
            parse_granularity(n)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from per_tensor, per_channel, per_block:<block size> "
                "(a positive integer; comma-separated)"
            ) from None
    return list(dict.fromkeys(names))


def parse_choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated list of names from ``allowed``."""

    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        bad = [n for n in names if n not in allowed]
        if not names or bad:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(allowed)} (comma-separated)"
            )
        return list(dict.fromkeys(names))

    return parse


def _writable_ancestor(path: pathlib.Path) -> pathlib.Path | None:
    """The nearest existing ancestor of ``path`` (itself included) if it is a writable folder
    (so ``path`` can be created below it), else None."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    return probe if probe.is_dir() and os.access(probe, os.W_OK | os.X_OK) else None


def staging_parent(out: pathlib.Path) -> pathlib.Path:
    """The folder :func:`write_results` stages ``out``'s files in: ``out``'s parent when it is
    (or can be created) writable, else ``out`` itself when it is an existing writable folder.

    Raises:
      ValueError: ``out`` exists and is not a folder, or neither place is writable.
    """
    out = pathlib.Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{str(out)!r} exists and is not a folder")
    if out.exists() and not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"{str(out)!r} cannot be written: it is not a writable folder")
    if _writable_ancestor(out.parent) is not None:
        return out.parent
    if out.exists():
        return out
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    raise ValueError(f"{str(out)!r} cannot be written: {str(probe)!r} is not a writable folder")


def _check_out(out: str) -> pathlib.Path:
    """``out`` as an absolute path that :func:`write_results` can write (staging included)."""
    path = pathlib.Path(out).expanduser().absolute()
    try:
        staging_parent(path)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def _check_cache(cache: str) -> pathlib.Path:
    """``cache`` as a path that is, or can be created as, a writable folder."""
    path = pathlib.Path(cache).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{cache!r} exists and is not a folder")
    if _writable_ancestor(path) is None:
        raise argparse.ArgumentTypeError(f"{cache!r} cannot be written")
    return path


_STAGING = ".{name}.staging.{host}.{pid}."


def _staging_prefix(out: pathlib.Path) -> str:
    return _STAGING.format(name=out.name, host=socket.gethostname(), pid=os.getpid())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_staging(out: pathlib.Path) -> list[pathlib.Path]:
    """Removes the staging folders of ``out`` left by killed runs on this host (their process
    no longer exists); returns them. Folders of live runs and other hosts are kept."""
    out = pathlib.Path(out).expanduser().absolute()
    folder = staging_parent(out)
    pattern = re.compile(
        re.escape(f".{out.name}.staging.{socket.gethostname()}.") + r"(\d+)\.[^.]+"
    )
    removed = []
    for p in sorted(folder.iterdir()) if folder.is_dir() else ():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _configure_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        choices=MODELS + LM_MODELS,
        default="cnn",
        help="zoo model (default: cnn); gpt (with --data text) runs the PTQ perplexity sweep",
    )
    p.add_argument(
        "--data",
        choices=DATASETS + LM_DATASETS,
        default="mnist1d",
        help="data set (default: mnist1d)",
    )
    p.add_argument(
        "--bits",
        type=parse_bits,
        default=None,
        help="widths: '2-8' or '2,4,8' (default: 2-8; 3,4,8 for --model gpt)",
    )
    p.add_argument(
        "--methods",
        type=parse_choices(("rtn", "rtn_g32", "gptq", "gptq_g32", "awq", "awq_g32")),
        default="rtn,rtn_g32,gptq,awq_g32",
        help="--model gpt: PTQ recipes, comma-separated (default: rtn,rtn_g32,gptq,awq_g32)",
    )
    p.add_argument(
        "--act-bits",
        type=_positive,
        default=8,
        help="--model gpt: activation width of the W/A rows (default: 8)",
    )
    p.add_argument(
        "--granularity",
        type=parse_granularities,
        default=",".join(GRANULARITIES),
        help="per_tensor, per_channel and/or per_block:<size> (one weight scale per block of "
        "<size> inputs and output channel), comma-separated (default: per_tensor,per_channel)",
    )
    p.add_argument(
        "--calibration",
        type=parse_choices(CALIBRATIONS),
        default="minmax",
        help=f"range estimators for the tensor sweep, from {', '.join(CALIBRATIONS)}; the "
        "model sweep uses the first (minmax if the layers have no such observer)",
    )
    p.add_argument(
        "--out",
        type=_check_out,
        default="jquant-sweep",
        help="output folder (default: ./jquant-sweep)",
    )
    p.add_argument(
        "--budget",
        type=parse_budget,
        default=None,
        help="model-size budget for mixed precision: a fraction of the size with every layer "
        "at 8 bits (0.5) or bytes (3000B); the table and pareto_front.png mark the chosen "
        "configuration (default: no budget)",
    )
    p.add_argument(
        "--steps",
        type=_positive,
        default=None,
        help="training steps if not cached (default: 600; gpt: its TRAIN_RECIPE)",
    )
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument(
        "--eval-examples",
        type=_positive,
        default=None,
        help="test examples (gpt: windows) to score (default: 1000; gpt: 64)",
    )
    p.add_argument(
        "--calib-examples",
        type=_positive,
        default=None,
        help="calibration examples (default: 1024; gpt: 32 windows)",
    )
    _add_cache_args(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _activations(model, variables, x) -> dict:
    """Outputs of every submodule (Flax's ``capture_intermediates``), by module path."""
    _, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
    acts = {}
    for key, value in _flat(state["intermediates"]).items():
        name = key.removesuffix("/__call__")
        if name != "__call__":  # the model's own output: the logits
            acts[name] = value[0] if isinstance(value, tuple) else value
    return acts


def budget_bytes(budget: Budget | None, variables, layers: Sequence[str], bits: Sequence[int]):
    """``budget`` in bytes for a model whose quantized layers are ``layers`` (``inf``: None).

    Raises ValueError when it is below the size with every layer at the narrowest width.
    """
    from jquant.sweep.mixed_precision import model_size_bytes

    if budget is None:
        return math.inf
    size_8bit = model_size_bytes(variables, dict.fromkeys(layers, 8))
    value = budget.to_bytes(size_8bit)
    smallest = model_size_bytes(variables, dict.fromkeys(layers, min(bits)))
    if value < smallest:
        raise ValueError(
            f"{value:g} bytes is below the smallest size of this model, {smallest:g} bytes with "
            f"every layer at {min(bits)} bits (the 8-bit size is {size_8bit:g} bytes)"
        )
    return value


def _defaults(args: argparse.Namespace, defaults: dict) -> argparse.Namespace:
    """``args`` with the options left at None set from ``defaults``."""
    values = {k: (defaults[k] if v is None and k in defaults else v) for k, v in vars(args).items()}
    return argparse.Namespace(**values)


def _run_lm_sweep(args: argparse.Namespace) -> int:
    """``jquant sweep --model gpt --data text``: perplexity against bits for the PTQ recipes."""
    import dataclasses

    from jquant import data
    from jquant.models.gpt import TRAIN_RECIPE
    from jquant.models.train import train_or_load
    from jquant.sweep import ptq_vs_bits
    from jquant.sweep.sharding import is_main_process

    args = _defaults(args, LM_DEFAULTS)
    progress = not args.no_progress and is_main_process()
    say = print if progress else (lambda *a, **k: None)
    if is_main_process():
        for stale in remove_stale_staging(args.out):
            say(f"[jquant] removed {stale}, left by a killed run")
    recipe = {**TRAIN_RECIPE, **({"steps": args.steps} if args.steps else {})}
    ds = data.load(args.data)
    say(f"[jquant] gpt on {args.data}: training ({recipe['steps']} steps) or loading cache")
    trained = train_or_load("gpt", ds, args.seed, cache=args.cache, retrain=args.retrain, **recipe)
    table = ptq_vs_bits(
        trained.model,
        trained.variables,
        ds.x_test[: args.eval_examples],
        ds.y_test[: args.eval_examples],
        args.bits,
        calib_x=ds.x_train[: args.calib_examples],
        methods=args.methods,
        act_bits=args.act_bits,
        progress=progress,
    )
    config = dataclasses.asdict(trained.model.config)
    table = table.with_meta(model="gpt", data=args.data, config=config, **trained.metrics)
    if not is_main_process():
        return 0
    print(table.format())

    def draw(folder: pathlib.Path) -> None:
        from jquant.sweep import plots

        float_ppl = table.to_dicts()[0]["perplexity"]
        plots.metric_vs_bits(
            _quantized_rows(table),
            str(folder / "perplexity_vs_bits.png"),
            "perplexity",
            group_by=("method", "target"),
            title=f"gpt on {args.data}: perplexity vs weight bits (float {float_ppl:.3f})",
        )

    written = write_results(args.out, {"ptq": table}, draw)
    print(f"\n[jquant] wrote {', '.join(written)} to {args.out}")
    return 0


def _quantized_rows(table):
    """``table`` without its float row (``method == "float"``)."""
    rows = [r for r in table.to_dicts() if r["method"] != "float"]
    return type(table).from_dicts(rows, table.columns)


def _run_sweep(args: argparse.Namespace) -> int:
    lm = (args.model in LM_MODELS, args.data in LM_DATASETS)
    if any(lm) and not all(lm):
        print(
            f"jquant sweep: error: argument --model: --model {args.model} needs "
            f"--data {'text' if lm[0] else 'mnist1d or digits'}, got --data {args.data}",
            file=sys.stderr,
        )
        return 2
    if all(lm):
        return _run_lm_sweep(args)
    args = _defaults(args, {**CLASSIFIER_DEFAULTS, "steps": 600})
    from jquant import data
    from jquant.models.train import train_or_load
    from jquant.nn.rules import QuantRule
    from jquant.sweep import Table, check_options, error_vs_bits
    from jquant.sweep.mixed_precision import mixed_precision
    from jquant.sweep.model_sweep import check_rules, model_vs_bits
    from jquant.sweep.sensitivity import layer_paths, sensitivity
    from jquant.sweep.sharding import is_main_process

    calib = next((c for c in args.calibration if c in MODEL_CALIBRATIONS), "minmax")
    try:  # every width and calibration checked before any training
        check_options(args.bits, granularities=args.granularity, calibrations=args.calibration)
        check_rules((QuantRule(".*", calibration=calib),), args.bits, "weights+acts")
    except ValueError as e:
        print(f"jquant sweep: error: argument --calibration: {e}", file=sys.stderr)
        return 2
    main_process = is_main_process()
    progress = not args.no_progress and main_process
    say = print if progress else (lambda *a, **k: None)
    if main_process:
        for stale in remove_stale_staging(args.out):
            say(f"[jquant] removed {stale}, left by a killed run")
    ds = data.load(args.data)
    say(f"[jquant] {args.model} on {args.data}: training ({args.steps} steps) or loading cache")
    trained = train_or_load(
        args.model, ds, args.seed, args.steps, cache=args.cache, retrain=args.retrain
    )
    x_eval, y_eval = ds.x_test[: args.eval_examples], ds.y_test[: args.eval_examples]
    x_cal = ds.x_train[: args.calib_examples]
    evaluation = dict(calib_x=x_cal, rules=(QuantRule(".*", calibration=calib),))
    layers = layer_paths(trained.model, evaluation["rules"], x_cal[:1])
    try:
        budget = budget_bytes(args.budget, trained.variables, layers, args.bits)
    except ValueError as e:
        print(f"jquant sweep: error: argument --budget: {e}", file=sys.stderr)
        return 2

    kernels = {k: v for k, v in _flat(trained.variables["params"]).items() if k.endswith("kernel")}
    acts = _activations(trained.model, trained.variables, x_cal[:256])
    common = dict(
        bits=args.bits,
        granularities=args.granularity,
        calibrations=args.calibration,
        progress=progress,
        chunk_size=4,
    )
    tw = error_vs_bits(kernels, **common)
    ta = error_vs_bits(acts, **common)
    tensors = Table.from_dicts(
        [{"kind": "weight", **r} for r in tw.to_dicts()]
        + [{"kind": "activation", **r} for r in ta.to_dicts()]
    ).with_meta(peak_bytes=max(tw.meta["peak_bytes"], ta.meta["peak_bytes"]))

    model_args = (trained.model, trained.variables, x_eval, y_eval)
    model_table = model_vs_bits(
        *model_args, args.bits, granularities=args.granularity, progress=progress, **evaluation
    ).with_meta(model=args.model, data=args.data, **trained.metrics)
    per_layer = dict(target="weights+acts", granularity=args.granularity[0], **evaluation)
    sens = sensitivity(*model_args, args.bits, progress=progress, **per_layer)
    mixed = mixed_precision(
        *model_args,
        candidate_bits=args.bits,
        budget_bytes=budget,
        full_path=True,
        sensitivity_table=sens,
        **per_layer,
    )
    if args.budget is None:
        mixed = _choose_none(mixed)
    if not main_process:
        return 0
    print(tensors.where(granularity=args.granularity[0]).format())
    print()
    print(model_table.format())
    if args.budget is not None:
        m = mixed.meta
        print(
            f"\n[jquant] mixed precision under {m['budget_bytes']:g} bytes: chosen "
            f"{m['chosen_bits']}, {m['chosen_size_bytes']:g} bytes, "
            f"accuracy {m['chosen_accuracy']:.4f} (row `chosen` of mixed_precision.csv)"
        )
    tables = {"tensors": tensors, "model": model_table, "sensitivity": sens}
    tables["mixed_precision"] = mixed
    written = write_results(args.out, tables, functools.partial(_draw, args, tables))
    print(f"\n[jquant] wrote {', '.join(written)} to {args.out}")
    return 0


def _choose_none(table):
    """``table`` with no row chosen (``chosen`` false everywhere, ``chosen_*`` meta None): the
    sweep without ``--budget`` has nothing to choose."""
    rows = [{**r, "chosen": False} for r in table.to_dicts()]
    meta = {k: (None if k.startswith("chosen_") else v) for k, v in table.meta.items()}
    return type(table).from_dicts(rows, table.columns).with_meta(**meta)


def _draw(args: argparse.Namespace, tables: dict, folder: pathlib.Path) -> None:
    """The sweep's PNG figures, drawn into ``folder``."""
    from jquant.sweep import plots

    sens = tables["sensitivity"]
    sens_bits = min(args.bits, key=lambda b: (abs(b - 4), b))
    plots.sensitivity_bars(
        sens.where(bits=sens_bits),
        str(folder / "sensitivity.png"),
        title=f"per-layer sensitivity, one layer at {sens_bits} bits",
    )
    plots.pareto_front(tables["mixed_precision"], str(folder / "pareto_front.png"))
    plots.sqnr_vs_bits(
        tables["tensors"].where(calibration=args.calibration[0]),
        str(folder / "sqnr_vs_bits.png"),
        group_by=("kind", "tensor", "granularity"),
    )
    quantized = tables["model"].where(target="weights+acts")
    plots.metric_vs_bits(
        quantized, str(folder / "accuracy_vs_bits.png"), "accuracy", group_by=("granularity",)
    )


def write_results(
    out: pathlib.Path, tables: dict, draw: Callable[[pathlib.Path], None] | None = None
) -> list[str]:
    """Writes ``<name>.csv`` and ``<name>.json`` of each table and ``draw(folder)``'s figures
    into ``out``, on process 0 only (:func:`jquant.sweep.sharding.is_main_process`); returns
    the names written (none on other processes).

    Files go into a staging folder in :func:`staging_parent` (beside ``out``, or inside it when
    only ``out`` is writable), moved into place at the end, so a failed run leaves nothing
    half-written.
    """
    from jquant.sweep.sharding import is_main_process

    if not is_main_process():
        return []
    out = pathlib.Path(out).expanduser().absolute()
    parent = staging_parent(out)
    parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=_staging_prefix(out), dir=parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the results are for sharing
    try:
        for name, table in tables.items():
            table.to_csv(str(staging / f"{name}.csv"))
            table.to_json(str(staging / f"{name}.json"))
        if draw is not None:
            draw(staging)
        names = sorted(p.name for p in staging.iterdir())
        _move_into_place(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return names


def _flat(tree) -> dict:
    import flax

    return flax.traverse_util.flatten_dict(dict(tree), sep="/")


def _move_into_place(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Renames ``staging`` to ``out`` (atomic) or, if ``out`` exists, moves each file in."""
    if not out.exists():
        os.replace(staging, out)
        return
    for f in staging.iterdir():
        os.replace(f, out / f.name)


def _list_or_check(command: str, args: argparse.Namespace, names: list[str]) -> int | None:
    """``--list`` prints ``names`` (status 0); a missing or unknown NAME is a usage error
    (status 2) that lists the choices."""
    if args.list:
        print("\n".join(names))
        return 0
    if args.name is None:
        print(
            f"jquant {command}: error: a NAME is required; choose one of {', '.join(names)}",
            file=sys.stderr,
        )
        return 2
    if args.name not in names:
        print(
            f"jquant {command}: error: NAME must be one of {', '.join(names)}; got {args.name!r}",
            file=sys.stderr,
        )
        return 2
    return None


def _configure_reproduce(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="paper folder under papers/ (see --list)")
    p.add_argument("--list", action="store_true", help="list the reproducible papers and exit")
    p.add_argument(
        "--out", type=_check_out, default=None, help="output folder (default: jquant_out/NAME)"
    )
    p.add_argument("--quick", action="store_true", help="reduced-size run")


def _papers_root() -> pathlib.Path | None:
    """``$JQUANT_PAPERS`` if set, else ``papers/`` with ``*/reproduce.py`` scripts in the
    current directory, then the source checkout (:func:`_checkout_folder`), or None."""
    from jquant.reproduce import PAPERS_ENV

    env = os.environ.get(PAPERS_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    return _checkout_folder("papers", "*/reproduce.py")


def _run_reproduce(args: argparse.Namespace) -> int:
    from jquant import reproduce

    root = _papers_root()
    if root is None:
        looked = " and ".join(str(f) for f in _checkout_folders("papers"))
        print(
            "jquant reproduce: error: the paper scripts are not part of the installed package, "
            f"and no papers/ folder with <name>/reproduce.py was found (looked in {looked}). "
            "Run from a checkout of jquant's source, copy its papers/ folder into the current "
            f"directory, or set ${reproduce.PAPERS_ENV} to such a folder.",
            file=sys.stderr,
        )
        return 2
    status = _list_or_check("reproduce", args, reproduce.list_papers(root))
    if status is not None:
        return status
    out = args.out
    if out is None:
        try:
            out = _check_out(str(pathlib.Path("jquant_out") / args.name))
        except argparse.ArgumentTypeError as e:
            print(f"jquant reproduce: error: argument --out: {e}", file=sys.stderr)
            return 2
    reproduce.run_paper(args.name, out, quick=args.quick, root=root)
    return 0


def _checkout_folders(name: str) -> tuple[pathlib.Path, pathlib.Path]:
    """Where the CLI looks for the source-tree folder ``name`` (``benchmarks``, ``papers``),
    in order: the current working directory, then the source checkout the package was
    imported from (an editable install)."""
    source = pathlib.Path(__file__).resolve().parents[1]
    return pathlib.Path.cwd() / name, source / name


def _checkout_folder(name: str, pattern: str) -> pathlib.Path | None:
    """The first of :func:`_checkout_folders` holding a file matching ``pattern``, or None.

    ``benchmarks/`` and ``papers/`` are not part of the package: an installed (non-editable)
    wheel has neither. The source tree counts only where it is a checkout (``pyproject.toml``
    beside ``jquant/``), so an unrelated folder of that name in site-packages is never used.
    """
    cwd, source = _checkout_folders(name)
    if any(cwd.glob(pattern)):
        return cwd
    if (source.parent / "pyproject.toml").is_file() and any(source.glob(pattern)):
        return source
    return None


def _benchmarks_dir() -> pathlib.Path | None:
    """``benchmarks/`` with ``*.py`` scripts (:func:`_checkout_folder`), or None."""
    return _checkout_folder("benchmarks", "*.py")


def _no_scripts_message(name: str | None) -> str:
    from jquant.bench.command import GRIDS

    looked = " and ".join(str(f) for f in _checkout_folders("benchmarks"))
    what = f"no benchmark script {name!r}: " if name else ""
    return (
        f"jquant bench: {what}the benchmark scripts are not part of the installed package, and "
        f"no benchmarks/ folder with scripts was found (looked in {looked}). Run from a "
        "checkout of jquant's source (its benchmarks/ folder), or copy that folder into the "
        f"current directory. The grids ({', '.join(GRIDS)}) need no scripts."
    )


def _configure_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "name",
        nargs="?",
        help="a grid (matmul, conv, model: jquant bench NAME --help) or a benchmark script "
        "under benchmarks/ (looked for in the current directory, then the source checkout; "
        "see --list)",
    )
    p.add_argument("--list", action="store_true", help="list the grids and benchmarks and exit")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options passed to the benchmark")


def _run_bench(args: argparse.Namespace) -> int:
    import runpy

    from jquant.bench.command import GRIDS
    from jquant.bench.command import main as run_grid

    folder = _benchmarks_dir()
    if folder is None and (args.list or args.name not in (None, *GRIDS)):
        print(_no_scripts_message(None if args.list else args.name), file=sys.stderr)
        if not args.list:
            return 2
    scripts = sorted(f.stem for f in folder.glob("*.py")) if folder is not None else []
    status = _list_or_check("bench", args, [*GRIDS, *scripts])
    if status is not None:
        return status
    if args.name in GRIDS:
        return run_grid(args.name, args.rest)
    sys.argv = [args.name, *args.rest]
    runpy.run_path(str(folder / f"{args.name}.py"), run_name="__main__")
    return 0


CONVERT_FORMATS = ("tflite", "onnx", "program")
# the runtimes that run each format, the first being the default --target
CONVERT_TARGETS = {
    "tflite": ("xnnpack", "litert_ref"),
    "onnx": ("onnxruntime",),
    "program": ("xnnpack", "onnxruntime"),  # a program file holds one requantization mode
}
_RUNTIME_MODULES = {"tflite": "ai_edge_litert.interpreter", "onnx": "onnxruntime"}


def _configure_convert(p: argparse.ArgumentParser) -> None:
    from jquant.convert import OUTPUT_RANGES, TARGETS
    from jquant.nn.rules import CALIBRATIONS
    from jquant.nn.rules import GRANULARITIES as WEIGHT_GRANULARITIES

    p.add_argument("--model", choices=MODELS, default="cnn", help="zoo model (default: cnn)")
    p.add_argument(
        "--data", choices=DATASETS, default="mnist1d", help="data set (default: mnist1d)"
    )
    p.add_argument(
        "--weight", default="int8", help="weight format: a signed integer format of 2 to 8 "
        "bits (int8, int4, ...), stored as int8 codes (default: int8)"
    )  # fmt: skip
    p.add_argument(
        "--act", default="int8", help="activation format: an integer format of 2 to 8 bits; "
        ".tflite and ONNX need 8 (default: int8)"
    )  # fmt: skip
    p.add_argument(
        "--granularity",
        # the integer program has no block-wise kernel
        choices=[g for g in WEIGHT_GRANULARITIES if g != "per_block"],
        default="per_channel",
        help="weight scales (default: per_channel, TFLite's convention)",
    )
    p.add_argument(
        "--calibration",
        choices=CALIBRATIONS,
        default="minmax",
        help="activation range estimator on the representative data (default: minmax)",
    )
    p.add_argument(
        "--output-range",
        choices=OUTPUT_RANGES,
        default="fake_quant",
        help="the logits' range on the representative data: of the fake-quant model "
        "(default) or of the float model (TFLiteConverter's rule); "
        "jquant.convert.output_qparams_from_data",
    )
    p.add_argument(
        "--format",
        choices=CONVERT_FORMATS,
        default="tflite",
        help="tflite (LiteRT), onnx (onnxruntime) or program (jquant's program file; "
        "jquant.convert.load) (default: tflite)",
    )
    p.add_argument(
        "--target",
        choices=sorted(TARGETS),
        default=None,
        help="the runtime whose per-op requantization the program takes "
        "(jquant.convert.targets); tflite: xnnpack (default) or litert_ref; onnx: "
        "onnxruntime; program: xnnpack (default) or onnxruntime",
    )
    p.add_argument(
        "--onnx-form", choices=("qoperator", "qdq"), default=None,
        help="ONNX only: QLinear operators or float ops between Q / DQ (default: qoperator)",
    )  # fmt: skip
    p.add_argument(
        "--opset", type=int, default=None, help="ONNX only: opset, 13 to 21 (default: 21)"
    )
    p.add_argument(
        "--io", choices=("int8", "float"), default=None,
        help="tflite only: int8 codes in and out (default) or float32 through QUANTIZE / "
        "DEQUANTIZE",
    )  # fmt: skip
    p.add_argument(
        "--out", required=True, help="the file to write (written to a temporary file beside it, "
        "then renamed)"
    )  # fmt: skip
    p.add_argument(
        "--no-verify",
        action="store_true",
        help="do not run the written model in its runtime (LiteRT / onnxruntime)",
    )
    p.add_argument("--steps", type=_positive, default=600, help="training steps if not cached")
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--eval-examples", type=_positive, default=1000, help="test examples to score")
    p.add_argument("--calib-examples", type=_positive, default=1024, help="representative examples")
    _add_cache_args(p)


def _add_cache_args(p: argparse.ArgumentParser) -> None:
    """``--cache`` and ``--retrain``: where trained weights are cached, and overwriting them."""
    p.add_argument(
        "--cache",
        type=_check_cache,
        default=None,
        help="weights cache (default: $JQUANT_CACHE or ~/.cache/jquant)",
    )
    p.add_argument(
        "--retrain", action="store_true", help="retrain and overwrite the cached weights"
    )


def check_convert_args(args: argparse.Namespace) -> tuple[str, str] | None:
    """The first bad ``jquant convert`` option as ``(option, message)``, or None; fills in
    the per-format defaults of ``--target``, ``--onnx-form``, ``--opset`` and ``--io``.
    Checks only the options: nothing is trained, loaded or written."""
    from jquant.formats import get_format, is_int8_grid

    formats = {}
    for option, name in (("--weight", args.weight), ("--act", args.act)):
        try:
            fmt = get_format(name)
        except (ValueError, TypeError) as e:
            return option, str(e)
        signed = option == "--weight"
        if not is_int8_grid(fmt, signed=signed):
            kind = "a signed integer format" if signed else "an integer format"
            return option, f"{name!r}: the integer program needs {kind} of 2 to 8 bits"
        formats[option] = fmt
    if args.format != "program" and formats["--act"].bits != 8:
        return "--act", (
            f"{args.act!r}: --format {args.format} needs 8-bit activations (its int8 ops); "
            "narrower ones fit only --format program"
        )
    allowed = CONVERT_TARGETS[args.format]
    args.target = args.target or allowed[0]
    if args.target not in allowed:
        return "--target", (
            f"{args.target!r} does not run --format {args.format}; choose {' or '.join(allowed)}"
        )
    per_format = {"--onnx-form": ("onnx", "onnx_form", "qoperator"),
                  "--opset": ("onnx", "opset", 21), "--io": ("tflite", "io", "int8")}  # fmt: skip
    for option, (fmt_name, attr, default) in per_format.items():
        if getattr(args, attr) is not None and args.format != fmt_name:
            return option, f"applies to --format {fmt_name} only, not {args.format}"
        if getattr(args, attr) is None:
            setattr(args, attr, default)
    if not 13 <= args.opset <= 21:
        return "--opset", f"must be in [13, 21], got {args.opset}"
    out = pathlib.Path(args.out).expanduser().absolute()
    if out.is_dir():
        return "--out", f"{args.out!r} is a folder; give a file name"
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        return (
            "--out",
            f"{args.out!r} cannot be written: {str(out.parent)!r} is not a writable folder",
        )
    args.out = out
    if not args.no_verify and args.format in _RUNTIME_MODULES:
        from jquant.export.runtimes import require

        try:
            require(_RUNTIME_MODULES[args.format])
        except ImportError as e:
            return "--format", f"{e}; or pass --no-verify"
    return None


def _accuracy(predictions, labels) -> float:
    import numpy as np

    return float(np.mean(np.asarray(predictions).reshape(len(labels), -1).argmax(1) == labels))


def _run_convert(args: argparse.Namespace) -> int:
    bad = check_convert_args(args)
    if bad is not None:
        print(f"jquant convert: error: argument {bad[0]}: {bad[1]}", file=sys.stderr)
        return 2
    import jax
    import numpy as np

    from jquant import convert as C
    from jquant import data
    from jquant.models.train import train_or_load
    from jquant.nn import QuantRule
    from jquant.nn import linen as ql

    ds = data.load(args.data)
    print(f"[jquant] {args.model} on {args.data}: training ({args.steps} steps) or loading cache")
    trained = train_or_load(
        args.model, ds, args.seed, args.steps, cache=args.cache, retrain=args.retrain
    )
    rule = QuantRule(
        ".*", weight=args.weight, act=args.act, calibration=args.calibration,
        weight_granularity=args.granularity,
    )  # fmt: skip
    x0 = ds.x_train[:2]
    qmodel, _ = ql.quantize_model(trained.model, rule, x0)
    x_cal = ds.x_train[: args.calib_examples]
    calib = [x_cal[i : i + 128] for i in range(0, len(x_cal), 128)]
    variables = qmodel.calibrate(qmodel.attach(trained.variables, x0), calib)
    try:
        program = C.convert(
            qmodel,
            variables,
            x0,
            output_qparams=C.output_qparams_from_data(
                qmodel, variables, calib, output_range=args.output_range
            ),
        )
        program = C.retarget(program, args.target)
    except ValueError as e:
        print(f"jquant convert: error: {e}", file=sys.stderr)
        return 1
    x, y = ds.x_test[: args.eval_examples], np.asarray(ds.y_test[: args.eval_examples])
    xq = np.asarray(program.quantize_input(x))
    codes = np.asarray(jax.jit(C.run)(program, xq))
    accuracy = {
        "float": _accuracy(trained.model.apply(trained.variables, x), y),
        "fake-quant": _accuracy(qmodel.with_phase("eval").apply(variables, x), y),
        f"integer program ({args.target})": _accuracy(codes, y),
    }
    runtime = {"tflite": f"LiteRT {args.target}", "onnx": f"onnxruntime {args.onnx_form}"}.get(
        args.format, "program file, loaded"
    )
    try:
        got, size = _export(args, program, x, xq)
    except (ValueError, TypeError) as e:
        print(f"jquant convert: error: {e}", file=sys.stderr)
        return 1
    if got is not None:
        got = got.astype(np.int32).reshape(codes.shape)
        accuracy[runtime] = _accuracy(got, y)
    float_bytes = 4 * sum(int(np.size(w)) for w in jax.tree.leaves(trained.variables))
    print(f"[jquant] test accuracy on {len(y)} examples:")
    for name, acc in accuracy.items():
        print(f"  {name:<34} {100 * acc:6.2f}%")
    if got is not None:
        differ = int(np.sum(got != codes))
        print(
            f"[jquant] {runtime} vs the integer program: {differ} of {codes.size} output codes "
            f"differ (max {int(np.abs(got - codes).max())}), argmax agreement "
            f"{100 * np.mean(got.argmax(1) == codes.argmax(1)):.2f}%"
        )
    print(
        f"[jquant] wrote {args.out}: {size} bytes; float32 weights {float_bytes} bytes "
        f"(ratio {size / float_bytes:.3f})"
    )
    return 0


def _export(args: argparse.Namespace, program, x, xq):
    """Writes ``program`` in ``args.format`` to ``args.out`` (atomically) and, unless
    ``--no-verify``, runs what was written in its runtime on the test inputs ``x`` (float) /
    ``xq`` (their int8 codes): ``(output codes or None, file size)``."""
    import jax
    import numpy as np

    from jquant import convert as C
    from jquant import export as E
    from jquant.export.files import staged_path, write_atomically

    verify = not args.no_verify
    if args.format == "tflite":
        data = E.tflite_bytes(program, io=args.io)
        got = None
        if verify and args.io == "float":  # float32 out: back to the output codes
            y = E.run_tflite(data, np.asarray(x, np.float32), target=args.target)
            got = np.rint(y / np.float32(program.output_scale)) + int(program.output_zp)
        elif verify:
            got = E.run_tflite(data, xq, target=args.target)
        return got, write_atomically(args.out, data)
    if args.format == "onnx":
        model = E.onnx_model(program, form=args.onnx_form, opset=args.opset)
        data = model.SerializeToString()
        got = E.run_onnx(data, xq) if verify else None
        return got, write_atomically(args.out, data)
    with staged_path(args.out) as tmp:
        size = C.save(program, tmp)
        got = np.asarray(jax.jit(C.run)(C.load(tmp), xq)) if verify else None
    return got, size


COMMANDS: tuple[Command, ...] = (
    Command(
        "sweep",
        "what each bit costs: tensor SQNR and model accuracy against bit width",
        _configure_sweep,
        _run_sweep,
    ),
    Command(
        "reproduce", "reproduce a published table (papers/)", _configure_reproduce, _run_reproduce
    ),
    Command(
        "bench",
        "accelerator benchmark grids (matmul, conv, model) or a benchmark script (benchmarks/)",
        _configure_bench,
        _run_bench,
    ),
    Command(
        "convert",
        "a zoo model -> PTQ on a representative dataset -> .tflite, ONNX or a program file",
        _configure_convert,
        _run_convert,
    ),
)


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    """The ``jquant`` parser with one subparser per command."""
    parser = argparse.ArgumentParser(
        prog="jquant", description="jquant: quantization research in JAX"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in commands:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jquant`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    return args._run(args)


if __name__ == "__main__":
    sys.exit(main())
