"""Whole-model golden files: jquant's programs against stored LiteRT and onnxruntime outputs.

``tests/data/export_golden.npz`` (made by ``tests/data/make_export_golden.py``; README beside
it) holds, for each conversion-test model of ``tests/test_export.py``, a program file, a fixed
int8 input and the outputs of its exported .tflite in LiteRT (reference kernels and XNNPACK)
and of its ONNX forms in onnxruntime. These tests need neither runtime: they check that the
program, retargeted to each runtime's per-op rounding, still computes what the runtime
computed, so a change to the integer kernels or to ``retarget`` that breaks deployment is
caught where LiteRT is not installed.
"""

import hashlib
import pathlib
import re

import jax
import numpy as np
import pytest

from jquant import convert as C

DATA = pathlib.Path(__file__).parent / "data"
GOLDEN = DATA / "export_golden.npz"
CASES = ("branch_gap", "cnn_1d", "cnn_2d", "depthwise", "mlp", "residual")
RUN = jax.jit(C.run)


@pytest.fixture(scope="module")
def golden():
    with np.load(GOLDEN) as f:
        return {k: f[k] for k in f.files}


def _program(golden, name, tmp_path):
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(golden[f"{name}/program"].tobytes())
    return C.load(path)


def _has_average(program) -> bool:
    return any(
        isinstance(s, C.Mean) or (isinstance(s, C.Pool) and s.kind == "avg") for s in program.layers
    )


def test_the_file_is_the_documented_one(golden):
    readme = (DATA / "README.md").read_text()
    want = re.search(r"export_golden\.npz.*?sha256 `([0-9a-f]{64})`", readme, re.S).group(1)
    assert hashlib.sha256(GOLDEN.read_bytes()).hexdigest() == want
    assert {k.split("/")[0] for k in golden if "/" in k} == set(CASES)


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("target", ["litert_ref", "xnnpack"])
def test_program_equals_litert_bit_for_bit(golden, name, target, tmp_path):
    program = C.retarget(_program(golden, name, tmp_path), target)
    x, want = golden[f"{name}/x"], golden[f"{name}/{target}"]
    got = np.asarray(RUN(program, x))
    np.testing.assert_array_equal(got, want.reshape(got.shape))


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("form", ["qoperator", "qdq"])
def test_program_against_onnxruntime(golden, name, form, tmp_path):
    """Equal bit for bit, except where onnxruntime averages in float (average pool, global
    mean: its own rounding, see ``tests/test_export.py``): there at most one code apart."""
    program = C.retarget(_program(golden, name, tmp_path), "onnxruntime")
    x, want = golden[f"{name}/x"], golden[f"{name}/onnxruntime_{form}"]
    got = np.asarray(RUN(program, x)).astype(np.int32)
    want = want.astype(np.int32).reshape(got.shape)
    if _has_average(program):
        assert np.abs(got - want).max() <= 1
    else:
        np.testing.assert_array_equal(got, want)


def test_litert_modes_differ_in_these_files(golden):
    """The golden outputs separate the runtimes: somewhere the reference kernels and XNNPACK
    give different codes (else the bit-exact checks above could not tell the modes apart)."""
    differ = sum(int(np.sum(golden[f"{n}/litert_ref"] != golden[f"{n}/xnnpack"])) for n in CASES)
    assert differ > 0
