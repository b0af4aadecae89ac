"""Tests of the jquant command line: argument validation and an end-to-end tiny sweep."""

import csv
import json
import os
import socket
import subprocess
import sys

import matplotlib.image
import pytest

from jquant import cli, data
from jquant.models.config import MODEL_NAMES


def test_choices_match_the_zoo():
    assert set(cli.MODELS) == set(MODEL_NAMES)
    assert set(cli.DATASETS) == set(data.DATASETS)


@pytest.mark.parametrize(
    "text, want",
    [("2-8", list(range(2, 9))), ("8,4,2", [2, 4, 8]), ("16", [16]), ("2-3,8", [2, 3, 8])],
)
def test_parse_bits(text, want):
    assert cli.parse_bits(text) == want


@pytest.mark.parametrize(
    "text, want",
    [("0.5", (0.5, "fraction")), ("1.25", (1.25, "fraction")), ("3000B", (3000.0, "bytes"))],
)
def test_parse_budget(text, want):
    assert cli.parse_budget(text) == cli.Budget(*want)


def test_budget_bytes_from_parameter_shapes():
    from test_sweep import _tiny_mlp

    _, variables, _, _ = _tiny_mlp()
    layers = ["dense1", "head"]
    # by hand: kernels 6x8 + 8x3 = 72 weights at b bits; biases 8 + 3 at 32 bits
    size_8bit = 72 + 11 * 4
    assert cli.budget_bytes(cli.Budget(0.75, "fraction"), variables, layers, [3, 8]) == (
        0.75 * size_8bit
    )
    assert cli.budget_bytes(cli.Budget(100.0, "bytes"), variables, layers, [3, 8]) == 100.0
    assert cli.budget_bytes(None, variables, layers, [3, 8]) == float("inf")
    smallest = 72 * 3 / 8 + 11 * 4  # 71 bytes with every layer at 3 bits
    assert cli.budget_bytes(cli.Budget(smallest, "bytes"), variables, layers, [3, 8]) == 71.0
    with pytest.raises(ValueError, match="below the smallest size of this model, 71 bytes"):
        cli.budget_bytes(cli.Budget(70.9, "bytes"), variables, layers, [3, 8])
    with pytest.raises(ValueError, match="every layer at 3 bits"):
        cli.budget_bytes(cli.Budget(0.6, "fraction"), variables, layers, [3, 8])


def test_only_process_zero_writes(tmp_path, monkeypatch):
    import jax

    from jquant.sweep import Table
    from jquant.sweep.sharding import is_main_process

    tables = {"model": Table.from_dicts([{"bits": 8, "accuracy": 0.5}])}

    def draw(folder):
        (folder / "figure.png").write_bytes(b"png")

    assert is_main_process()
    with monkeypatch.context() as m:  # pretend to be the second process of a multi-host run
        m.setattr(jax, "process_index", lambda *a, **k: 1)
        assert not is_main_process()
        assert cli.write_results(tmp_path / "out", tables, draw) == []
    assert os.listdir(tmp_path) == []
    written = cli.write_results(tmp_path / "out", tables, draw)
    assert written == ["figure.png", "model.csv", "model.json"]
    assert sorted(os.listdir(tmp_path / "out")) == written
    assert (tmp_path / "out" / "model.csv").read_text().splitlines() == ["bits,accuracy", "8,0.5"]

    def broken(folder):
        draw(folder)
        raise RuntimeError("plot failed")

    with pytest.raises(RuntimeError, match="plot failed"):
        cli.write_results(tmp_path / "again", tables, broken)
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing half-written, no staging left


def _dead_pid() -> int:
    """The id of a process that has exited."""
    code = "import os; print(os.getpid())"
    proc = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return int(proc.stdout)


def _strict_json(path):
    """``json.loads`` that refuses NaN / Infinity (not JSON)."""

    def refuse(name):
        raise ValueError(f"{path.name}: {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "--bits", "1-40"], "widths must be integers in [2, 16]"),
        (["sweep", "--bits", "8-2"], "'8-2' is descending; write it ascending, '2-8'"),
        (["sweep", "--bits", "2-3,9-4"], "'9-4' is descending"),
        (["sweep", "--bits", "four"], "not a width list"),
        (["sweep", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["sweep", "--data", "imagenet"], "invalid choice: 'imagenet'"),
        (["sweep", "--granularity", "per_row"], "choose from per_tensor, per_channel"),
        (["sweep", "--calibration", "best"], "choose from minmax"),
        (["sweep", "--steps", "0"], "positive integer"),
        (["sweep", "--budget", "0"], "is not a budget"),
        (["sweep", "--budget", "-0.5"], "is not a budget"),
        (["sweep", "--budget", "nan"], "is not a budget"),
        (["sweep", "--budget", "inf"], "is not a budget"),
        (["sweep", "--budget", "half"], "is not a budget"),
        (["sweep", "--budget", "0B"], "is not a budget"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    code, err = _exit_code([*argv, "--out", str(tmp_path / "o")] if argv else argv, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_calibration_out_of_range_exits_2_before_training(capsys, tmp_path):
    """KL is refused above 12 bits: checked at every width before any training or data."""
    cache = tmp_path / "cache"
    argv = ["sweep", "--bits", "2-16", "--calibration", "kl", "--cache", str(cache)]
    code = cli.main([*argv, "--out", str(tmp_path / "o")])
    assert code == 2 and "argument --calibration" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert not cache.exists() or not any(cache.rglob("*.msgpack")), "trained before refusing"


def test_unwritable_out_exits_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _exit_code(["sweep", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot be written" in err
    code, err = _exit_code(["sweep", "--out", str(blocker)], capsys)
    assert code == 2 and "not a folder" in err
    for cache in (blocker, blocker / "sub"):
        code, err = _exit_code(["sweep", "--cache", str(cache), "--out", str(tmp_path)], capsys)
        assert code == 2 and "argument --cache" in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_help_lists_options(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for opt in ("--model", "--data", "--bits", "--granularity", "--calibration", "--out"):
        assert opt in out


def test_console_script_bad_bits_subprocess(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "jquant", "sweep", "--bits", "1-40", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "--bits" in out.stderr and "[2, 16]" in out.stderr
    assert os.listdir(tmp_path) == []


def test_sweep_end_to_end_tiny(tmp_path, capsys):
    out_dir = tmp_path / "results"
    cmd = [
        sys.executable,
        "-m",
        "jquant",
        "sweep",
        "--model",
        "mlp",
        "--data",
        "digits",
        "--steps",
        "20",
        "--bits",
        "3,8",
        "--granularity",
        "per_tensor",
        "--eval-examples",
        "64",
        "--calib-examples",
        "32",
        "--cache",
        str(tmp_path / "cache"),
        "--out",
        str(out_dir),
        "--no-progress",
    ]
    run = subprocess.run([*cmd, "--budget", "0.8"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    names = sorted(os.listdir(out_dir))
    assert names == sorted(
        [
            "tensors.csv",
            "tensors.json",
            "model.csv",
            "model.json",
            "sqnr_vs_bits.png",
            "accuracy_vs_bits.png",
            "sensitivity.csv",
            "sensitivity.json",
            "sensitivity.png",
            "mixed_precision.csv",
            "mixed_precision.json",
            "pareto_front.png",
        ]
    )
    assert [p for p in os.listdir(tmp_path) if p.startswith(".results")] == []  # no staging left
    for png in ("sqnr_vs_bits.png", "accuracy_vs_bits.png", "sensitivity.png", "pareto_front.png"):
        img = matplotlib.image.imread(out_dir / png)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    with open(out_dir / "model.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["bits"] for r in rows] == ["32", "3", "8"]
    acc = {r["bits"]: float(r["accuracy"]) for r in rows}
    assert all(0 <= a <= 1 for a in acc.values())
    assert abs(acc["8"] - acc["32"]) <= 0.05  # 8-bit PTQ keeps the float accuracy
    tensors = json.loads((out_dir / "tensors.json").read_text())
    kinds = {r["kind"] for r in tensors["rows"]}
    assert kinds == {"weight", "activation"} and tensors["meta"]["peak_bytes"] > 0
    sqnr = {(r["kind"], r["tensor"], r["bits"]): r["sqnr_db"] for r in tensors["rows"]}
    for (kind, name, bits), value in sqnr.items():
        if bits == 8:
            assert value > sqnr[(kind, name, 3)] + 20  # 5 more bits: about 30 dB
    assert "accuracy" in run.stdout and "sqnr_db" in run.stdout
    sens = json.loads((out_dir / "sensitivity.json").read_text())["rows"]
    assert sorted({r["bits"] for r in sens}) == [3, 8] and len(sens) == 2 * len(
        {r["layer"] for r in sens}
    )
    mixed = json.loads((out_dir / "mixed_precision.json").read_text())
    sizes = [r["size_bytes"] for r in mixed["rows"]]
    # the greedy path: one layer lowered from 8 to 3 bits per step, all widest to all narrowest
    assert len(sizes) == len(mixed["meta"]["layers"]) + 1 and sizes == sorted(sizes, reverse=True)
    # --budget 0.8: 80% of the all-8-bit size (the path's first row); the chosen configuration
    # is the first on the path that fits, and the only row marked
    budget = 0.8 * sizes[0]
    assert mixed["meta"]["budget_bytes"] == pytest.approx(budget)
    chosen = [r["chosen"] for r in mixed["rows"]]
    first_fit = next(i for i, s in enumerate(sizes) if s <= budget)
    assert 0 < first_fit and chosen == [i == first_fit for i in range(len(sizes))]
    assert f"{mixed['meta']['chosen_size_bytes']:g} bytes" in run.stdout and "chosen" in run.stdout

    # a budget below the all-3-bit size: exit 2 once the (cached) model is loaded, nothing written
    argv = [*cmd[3:], "--budget", "1B"]
    argv[argv.index("--out") + 1] = str(tmp_path / "other")
    assert cli.main(argv) == 2
    assert "--budget" in capsys.readouterr().err and not (tmp_path / "other").exists()


@pytest.mark.slow
def test_sweep_without_budget_chooses_nothing_and_cleans_up(tmp_path):
    """In process (one training and one sweep, ~30 s): no --budget, --retrain, a stale staging
    folder."""
    out_dir = tmp_path / "results"
    cmd = ["sweep", "--model", "mlp", "--data", "digits", "--steps", "20", "--bits", "3,8",
           "--granularity", "per_tensor", "--eval-examples", "64", "--calib-examples", "32",
           "--cache", str(tmp_path / "cache"), "--out", str(out_dir), "--no-progress"]  # fmt: skip
    stale = tmp_path / f".results.staging.{socket.gethostname()}.{_dead_pid()}.x1y2"
    stale.mkdir()
    (stale / "model.csv").write_text("half-written")
    from jquant.models import train

    train.train_or_load("mlp", data.load("digits"), 0, 20, cache=tmp_path / "cache")
    (cache_file,) = (tmp_path / "cache" / "models").glob("*.msgpack")
    before = cache_file.stat().st_mtime_ns
    assert cli.main([*cmd, "--retrain"]) == 0
    assert not stale.exists() and cache_file.stat().st_mtime_ns > before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".results")] == []
    mixed = _strict_json(out_dir / "mixed_precision.json")
    sizes = [r["size_bytes"] for r in mixed["rows"]]
    assert len(sizes) == len(mixed["meta"]["layers"]) + 1 and sizes == sorted(sizes, reverse=True)
    assert not any(r["chosen"] for r in mixed["rows"])  # the all-8-bit start is dominated
    assert mixed["meta"]["budget_bytes"] is None and mixed["meta"]["chosen_bits"] is None
    with open(out_dir / "mixed_precision.csv") as f:
        assert {r["chosen"] for r in csv.DictReader(f)} == {"False"}
    for name in ("tensors", "model", "sensitivity"):
        _strict_json(out_dir / f"{name}.json")


def test_no_budget_chooses_no_row():
    from jquant.sweep import Table

    # the shape of a mixed_precision table under an infinite budget: the first row chosen
    rows = [{"step": i, "size_bytes": 100.0 - 30 * i, "chosen": i == 0} for i in range(3)]
    meta = {"budget_bytes": float("inf"), "chosen_bits": {"a": 8}, "chosen_accuracy": 0.9}
    table = cli._choose_none(Table.from_dicts(rows).with_meta(**meta, layers=["a"]))
    assert table.column("chosen") == [False] * 3
    assert table.column("size_bytes") == [100.0, 70.0, 40.0]
    assert table.meta == {"budget_bytes": float("inf"), "chosen_bits": None,
                          "chosen_accuracy": None, "layers": ["a"]}  # fmt: skip


def test_reproduce_and_bench_commands(capsys):
    from jquant import cli, reproduce

    assert cli.main(["reproduce", "--list"]) == 0
    listed = capsys.readouterr().out.split()
    assert listed == reproduce.list_papers() and "max1960" in listed
    assert cli.main(["reproduce", "no_such_paper"]) == 2
    assert "NAME must be one of" in capsys.readouterr().err
    assert cli.main(["bench", "--list"]) == 0
    assert {"ops", "sweep", "integer"} <= set(capsys.readouterr().out.split())
    assert cli.main(["bench", "no_such_bench"]) == 2
    assert cli.main(["bench"]) == 2
    assert "a NAME is required; choose one of " in capsys.readouterr().err


def test_reproduce_without_name_or_with_bad_out_exits_2(capsys, tmp_path, monkeypatch):
    from jquant import reproduce

    papers = reproduce.list_papers()
    assert cli.main(["reproduce"]) == 2
    err = capsys.readouterr().err
    assert "a NAME is required; choose one of " + ", ".join(papers) in err and "None" not in err
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "sub"):
        code, err = _exit_code(["reproduce", "max1960", "--quick", "--out", str(out)], capsys)
        assert code == 2 and "argument --out" in err and str(blocker) in err
    # the default output folder jquant_out/NAME is checked too
    monkeypatch.chdir(tmp_path)
    (tmp_path / "jquant_out").write_text("a file")
    assert cli.main(["reproduce", "max1960", "--quick"]) == 2
    assert "argument --out" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["file", "jquant_out"]


def _deny_writes(monkeypatch, *denied):
    """``os.access`` that reports ``denied`` folders as not writable (tests may run as root)."""
    real = os.access

    def access(path, mode, **kwargs):
        if mode & os.W_OK and os.path.abspath(path) in {str(d) for d in denied}:
            return False
        return real(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)


def test_staging_location_is_checked_before_work(tmp_path, monkeypatch, capsys):
    from jquant.sweep import Table

    tables = {"model": Table.from_dicts([{"bits": 8, "accuracy": 0.5}])}
    parent, out = tmp_path / "parent", tmp_path / "parent" / "out"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("kept")
    _deny_writes(monkeypatch, parent)
    # out exists and is writable, its parent is not: stage inside out
    assert cli.staging_parent(out) == out
    assert cli.write_results(out, tables) == ["model.csv", "model.json"]
    assert sorted(os.listdir(out)) == ["model.csv", "model.json", "old.txt"]
    assert sorted(os.listdir(parent)) == ["out"]
    # a missing out under a read-only parent, or an out that is not writable: exit 2 at once
    code, err = _exit_code(["sweep", "--out", str(parent / "new")], capsys)
    assert code == 2 and "cannot be written" in err and str(parent) in err
    _deny_writes(monkeypatch, parent, out)
    code, err = _exit_code(["sweep", "--out", str(out)], capsys)
    assert code == 2 and "is not a writable folder" in err
    with pytest.raises(ValueError, match="not a writable folder"):
        cli.write_results(out, tables)
    assert sorted(os.listdir(out)) == ["model.csv", "model.json", "old.txt"]


def test_stale_staging_folders_are_removed(tmp_path):
    out = tmp_path / "res"
    host = socket.gethostname()
    dead = tmp_path / f".res.staging.{host}.{_dead_pid()}.abc"
    live = tmp_path / f".res.staging.{host}.{os.getpid()}.abc"  # this process: running
    other_host = tmp_path / f".res.staging.{host}x.{_dead_pid()}.abc"
    other_out = tmp_path / f".resx.staging.{host}.{_dead_pid()}.abc"
    for p in (dead, live, other_host, other_out):
        p.mkdir()
        (p / "f.csv").write_text("x")
    assert cli.remove_stale_staging(out) == [dead]
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in (live, other_host, other_out))


def test_results_json_is_strict(tmp_path):
    from jquant.sweep import Table

    nan, inf = float("nan"), float("inf")
    t = Table.from_dicts([{"a": 1.5, "b": inf}, {"a": nan, "b": -inf}]).with_meta(
        budget_bytes=inf, nested={"x": [1.0, nan]}, ok=2
    )
    t.to_json(str(tmp_path / "t.json"))
    doc = _strict_json(tmp_path / "t.json")
    assert doc["rows"] == [{"a": 1.5, "b": None}, {"a": None, "b": None}]
    assert doc["meta"] == {"budget_bytes": None, "nested": {"x": [1.0, None]}, "ok": 2}
    assert Table.from_json(t.to_json()).to_dicts() == doc["rows"]
    assert t.to_csv().splitlines()[1:] == ["1.5,inf", "nan,-inf"]  # CSV keeps them


def test_granularity_option_takes_block_sizes(capsys, tmp_path):
    assert cli.parse_granularities("per_channel, per_block:32,per_block:32") == [
        "per_channel",
        "per_block:32",
    ]
    for bad in ("per_block", "per_block:0", "per_block:x", "per_channel:4"):
        code, err = _exit_code(["sweep", "--granularity", bad, "--out", str(tmp_path)], capsys)
        assert code == 2 and "per_block:<block size>" in err


@pytest.mark.slow
def test_sweep_per_block_end_to_end(tmp_path):
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "jquant", "sweep", "--model", "mlp", "--data", "digits"]
    cmd += ["--steps", "20", "--bits", "3,8", "--granularity", "per_channel,per_block:16"]
    cmd += ["--eval-examples", "64", "--calib-examples", "32", "--no-progress"]
    cmd += ["--cache", str(tmp_path / "cache"), "--out", str(out_dir)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads((out_dir / "tensors.json").read_text())["rows"]
    sqnr = {
        (r["tensor"], r["granularity"], r["bits"]): r["sqnr_db"]
        for r in rows
        if r["kind"] == "weight"
    }
    blocks = [k for k in sqnr if k[1] == "per_block:16"]
    assert blocks
    for name, _, bits in blocks:  # finer scales never lose to per channel
        assert sqnr[(name, "per_block:16", bits)] >= sqnr[(name, "per_channel", bits)] - 1e-3
    model = json.loads((out_dir / "model.json").read_text())["rows"]
    assert {r["granularity"] for r in model} >= {"per_channel", "per_block:16"}
