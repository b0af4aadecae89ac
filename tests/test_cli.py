"""Tests of the jquant command line: argument validation and an end-to-end tiny sweep."""

import csv
import json
import os
import pathlib
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


def _installed_layout(tmp_path, monkeypatch, *, scripts_in_cwd=()):
    """cli.py as an installed (non-editable) wheel has it: site-packages/jquant/cli.py with no
    pyproject.toml above it, and a stray site-packages/benchmarks/ of another distribution;
    the working directory a fresh folder, with ``benchmarks/<name>.py`` scripts if given."""
    site = tmp_path / "site-packages"
    (site / "jquant").mkdir(parents=True)
    (site / "benchmarks").mkdir()
    (site / "benchmarks" / "stray.py").write_text("raise SystemExit('must not run')\n")
    monkeypatch.setattr(cli, "__file__", str(site / "jquant" / "cli.py"))
    work = tmp_path / "work"
    work.mkdir()
    for name in scripts_in_cwd:
        (work / "benchmarks").mkdir(exist_ok=True)
        (work / "benchmarks" / f"{name}.py").write_text(
            "import pathlib, sys\npathlib.Path('ran.txt').write_text(' '.join(sys.argv))\n"
        )
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # a script run rewrites sys.argv
    return site, work


def test_bench_from_an_installed_wheel_without_scripts_exits_2_naming_where_it_looked(
    tmp_path, monkeypatch, capsys
):
    site, work = _installed_layout(tmp_path, monkeypatch)
    assert cli.main(["bench", "integer"]) == 2
    err = capsys.readouterr().err
    assert "no benchmark script 'integer'" in err
    assert str(work / "benchmarks") in err and str(site / "benchmarks") in err
    assert "checkout of jquant's source" in err and "matmul, conv, model" in err
    assert cli.main(["bench", "stray"]) == 2  # site-packages/benchmarks is not jquant's
    assert cli.main(["bench", "--list"]) == 0  # the grids only, and a note on stderr
    out, err = capsys.readouterr()
    assert out.split() == ["matmul", "conv", "model"] and "looked in" in err
    with pytest.raises(SystemExit) as e:  # the grids live in the package: they still run
        cli.main(["bench", "matmul", "--help"])
    assert e.value.code == 0 and "--quick" in capsys.readouterr().out


def test_bench_runs_scripts_from_the_working_directory(tmp_path, monkeypatch, capsys):
    _, work = _installed_layout(tmp_path, monkeypatch, scripts_in_cwd=("hello",))
    assert cli.main(["bench", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["matmul", "conv", "model", "hello"]
    assert cli.main(["bench", "hello", "--quick", "7"]) == 0
    assert (work / "ran.txt").read_text() == f"{work / 'benchmarks' / 'hello.py'} --quick 7"
    assert cli.main(["bench", "stray"]) == 2
    assert "NAME must be one of matmul, conv, model, hello" in capsys.readouterr().err


def test_bench_finds_the_source_checkout_of_an_editable_install(tmp_path, monkeypatch, capsys):
    """From any folder, an editable install (this checkout) finds its own benchmarks/."""
    monkeypatch.chdir(tmp_path)
    assert cli._benchmarks_dir() == pathlib.Path(cli.__file__).resolve().parents[1] / "benchmarks"
    assert cli.main(["bench", "--list"]) == 0
    assert {"integer", "ops"} <= set(capsys.readouterr().out.split())


# ------------------------------------------------------------------------- jquant convert


@pytest.mark.parametrize(
    "argv, option, message",
    [
        (["--weight", "int16"], "--weight", "signed integer format of 2 to 8 bits"),
        (["--weight", "uint4"], "--weight", "signed integer format of 2 to 8 bits"),
        (["--weight", "fp8_e4m3"], "--weight", "integer format of 2 to 8 bits"),
        (["--weight", "int9x"], "--weight", "unknown format 'int9x'"),
        (["--act", "int4"], "--act", "--format tflite needs 8-bit activations"),
        (["--format", "onnx", "--act", "int4"], "--act", "--format onnx needs 8-bit"),
        (["--target", "onnxruntime"], "--target", "choose xnnpack or litert_ref"),
        (["--format", "onnx", "--target", "xnnpack"], "--target", "choose onnxruntime"),
        (["--format", "program", "--target", "litert_ref"], "--target", "choose xnnpack or"),
        (["--onnx-form", "qdq"], "--onnx-form", "applies to --format onnx only"),
        (["--opset", "17"], "--opset", "applies to --format onnx only"),
        (["--format", "onnx", "--io", "float"], "--io", "applies to --format tflite only"),
        (["--format", "onnx", "--opset", "9"], "--opset", "must be in [13, 21]"),
        (["--calibration", "best"], "--calibration", "invalid choice: 'best'"),
        (["--output-range", "tflite"], "--output-range", "invalid choice: 'tflite'"),
        (["--format", "keras"], "--format", "invalid choice: 'keras'"),
    ],
)
def test_convert_bad_arguments_exit_2_before_any_work(argv, option, message, capsys, tmp_path):
    cache = tmp_path / "cache"
    argv = ["convert", *argv, "--out", str(tmp_path / "m.bin"), "--cache", str(cache)]
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own checks
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and f"argument {option}" in err and message in err, err
    assert sorted(os.listdir(tmp_path)) == []  # no model trained, no file, no cache


def test_convert_out_must_be_a_writable_file(capsys, tmp_path):
    for out, message in [(tmp_path, "is a folder"), (tmp_path / "no" / "m", "cannot be written")]:
        code = cli.main(["convert", "--out", str(out), "--cache", str(tmp_path / "cache")])
        assert code == 2 and message in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


_CONVERT_TINY = ["--model", "mlp", "--data", "digits", "--steps", "20", "--calib-examples", "128"]


@pytest.fixture(scope="module")
def convert_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("convert_cache")


def _convert(argv, out, cache, capsys):
    import re

    code = cli.main(["convert", *_CONVERT_TINY, *argv, "--out", str(out), "--cache", str(cache)])
    printed = capsys.readouterr().out
    accuracy = dict(re.findall(r"^  (\S.*?)\s+([\d.]+)%$", printed, re.M))
    return code, printed, {k: float(v) / 100 for k, v in accuracy.items()}


@pytest.mark.slow  # trains the tiny MLP once (~10 s), then ~5 s per format
@pytest.mark.parametrize(
    "argv, runtime",
    [
        (["--eval-examples", "300"], "LiteRT xnnpack"),
        (
            ["--eval-examples", "300", "--target", "litert_ref", "--io", "float"],
            "LiteRT litert_ref",
        ),
        (["--eval-examples", "300", "--format", "onnx"], "onnxruntime qoperator"),
        (["--eval-examples", "300", "--format", "program", "--weight", "int4"], "program file"),
    ],
)
def test_convert_end_to_end_tiny(argv, runtime, tmp_path, convert_cache, capsys):
    """The written file, run by the runtime itself here (not by the CLI), scores the accuracy
    the CLI printed for it; that equals the integer program's (0 codes differ)."""
    import re

    import numpy as np
    from ai_edge_litert import interpreter as litert

    from jquant import convert as C
    from jquant import data

    out = tmp_path / "model.bin"
    code, printed, accuracy = _convert(argv, out, convert_cache, capsys)
    assert code == 0, printed
    assert sorted(os.listdir(tmp_path)) == ["model.bin"]  # no temporary file left
    assert f"wrote {out}: {out.stat().st_size} bytes" in printed
    assert re.search(r"vs the integer program: 0 of 3000 output codes differ", printed), printed
    name = next(k for k in accuracy if k.startswith(runtime))
    program_acc = next(v for k, v in accuracy.items() if k.startswith("integer program"))
    assert accuracy[name] == program_acc and abs(accuracy["float"] - program_acc) <= 0.05
    ds = data.load("digits")
    x, y = ds.x_test[:300], np.asarray(ds.y_test[:300])
    if "--format" not in argv:  # .tflite
        interp = litert.Interpreter(model_path=str(out))
        inp = interp.get_input_details()[0]
        float_io = inp["dtype"] == np.float32
        if not float_io:
            scale, zp = inp["quantization"]
            x = np.clip(np.rint(x / scale) + zp, -128, 127).astype(np.int8)
        interp.resize_tensor_input(inp["index"], list(x.shape))
        interp.allocate_tensors()
        interp.set_tensor(inp["index"], x.astype(inp["dtype"]))
        interp.invoke()
        logits = interp.get_tensor(interp.get_output_details()[0]["index"])
        assert float_io == ("float" in argv)
    elif "onnx" in argv:
        import onnx
        import onnxruntime as ort

        onnx.checker.check_model(str(out))
        model = onnx.load(str(out))
        inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        first = next(n for n in model.graph.node if n.op_type == "QLinearConv")
        scale, zp = inits[first.input[1]], inits[first.input[2]]
        x = np.clip(np.rint(x / scale) + zp, -128, 127).astype(np.int8)
        sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        logits = sess.run(None, {"input": x})[0]
    else:
        program = C.load(out)
        logits = np.asarray(C.run(program, program.quantize_input(x)))
    assert np.mean(logits.reshape(len(y), -1).argmax(1) == y) == accuracy[name]


@pytest.mark.slow
def test_convert_failure_leaves_nothing(tmp_path, convert_cache, capsys, monkeypatch):
    from jquant import convert as C

    def broken(path):
        raise OSError("disk full")

    monkeypatch.setattr(C, "load", broken)  # fails after the program file is staged
    with pytest.raises(OSError, match="disk full"):
        _convert(["--format", "program", "--eval-examples", "50"], tmp_path / "m", convert_cache,
                 capsys)  # fmt: skip
    assert os.listdir(tmp_path) == []


# --- jquant reproduce: papers/ from the working directory, then the source checkout ---------


def _toy_paper(folder):
    (folder / "toy").mkdir(parents=True)
    (folder / "toy" / "reproduce.py").write_text(
        "def main(out_dir, quick=False):\n"
        "    (out_dir / 'ran.txt').write_text(f'quick={quick}')\n"
        "    return {}\n"
    )


def test_reproduce_from_an_installed_wheel_without_papers_exits_2_naming_where_it_looked(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("JQUANT_PAPERS", raising=False)
    site, work = _installed_layout(tmp_path, monkeypatch)
    _toy_paper(site / "papers")  # a stray site-packages/papers is not jquant's
    for argv in (["reproduce", "--list"], ["reproduce", "toy", "--quick"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "jquant reproduce: error: the paper scripts are not part of the installed" in err
        assert str(work / "papers") in err and str(site / "papers") in err
        assert "checkout of jquant's source" in err and "JQUANT_PAPERS" in err
    assert not (work / "jquant_out").exists()  # nothing written


def test_reproduce_runs_papers_from_the_working_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("JQUANT_PAPERS", raising=False)
    _, work = _installed_layout(tmp_path, monkeypatch)
    _toy_paper(work / "papers")
    assert cli.main(["reproduce", "--list"]) == 0
    assert capsys.readouterr().out.split() == ["toy"]
    assert cli.main(["reproduce", "toy", "--quick"]) == 0
    assert (work / "jquant_out" / "toy" / "ran.txt").read_text() == "quick=True"


def test_reproduce_finds_the_source_checkout_of_an_editable_install(tmp_path, monkeypatch):
    monkeypatch.delenv("JQUANT_PAPERS", raising=False)
    monkeypatch.chdir(tmp_path)
    source = pathlib.Path(cli.__file__).resolve().parents[1]
    assert cli._papers_root() == source / "papers"
    monkeypatch.setenv("JQUANT_PAPERS", str(tmp_path))  # the variable still wins
    assert cli._papers_root() == tmp_path


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
