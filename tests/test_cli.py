"""Tests of the jquant command line: argument validation and an end-to-end tiny sweep."""

import csv
import json
import os
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


def _exit_code(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["sweep", "--bits", "1-40"], "widths must be integers in [2, 16]"),
        (["sweep", "--bits", "8-2"], "not a width list"),
        (["sweep", "--bits", "four"], "not a width list"),
        (["sweep", "--model", "resnet"], "invalid choice: 'resnet'"),
        (["sweep", "--data", "imagenet"], "invalid choice: 'imagenet'"),
        (["sweep", "--granularity", "per_row"], "choose from per_tensor, per_channel"),
        (["sweep", "--calibration", "best"], "choose from minmax"),
        (["sweep", "--steps", "0"], "positive integer"),
        ([], "required"),
    ],
)
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    code, err = _exit_code([*argv, "--out", str(tmp_path / "o")] if argv else argv, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "o").exists()


def test_unwritable_out_exits_2(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _exit_code(["sweep", "--out", str(blocker / "sub")], capsys)
    assert code == 2 and "cannot be written" in err
    code, err = _exit_code(["sweep", "--out", str(blocker)], capsys)
    assert code == 2 and "not a folder" in err
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


def test_sweep_end_to_end_tiny(tmp_path):
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
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
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
