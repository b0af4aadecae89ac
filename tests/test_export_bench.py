"""benchmarks/export.py's size sweep: widening, the closed-form ratio model, and merging a
``--sizes-only`` run into the results without losing their timing (no compiles: fast)."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from jquant.models import CNNConfig

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_mod():
    name = "jquant_bench_export"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "export.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[name]


def test_widened_multiplies_every_width_but_the_head(bench_mod):
    cfg = bench_mod.widened(CNNConfig(features=(3, 5), dense=(7,), num_classes=4), 3)
    assert (cfg.features, cfg.dense, cfg.num_classes, cfg.kernel_size) == ((9, 15), (21,), 4, (5,))
    for k in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="width multiplier"):
            bench_mod.widened(CNNConfig(), k)


def test_channel_counts_of_a_param_tree(bench_mod):
    params = {
        "conv1": {"kernel": np.zeros((5, 1, 4)), "bias": np.zeros(4)},
        "conv2": {"kernel": np.zeros((5, 4, 4)), "bias": np.zeros(4)},
        "head": {"kernel": np.zeros((8, 3)), "bias": np.zeros(3)},
    }
    assert bench_mod.channel_counts(params) == dict(W=20 + 80 + 24, C=11, D=7)


def test_ratio_model_by_hand(bench_mod):
    # W = 1000 weights, C = 10 channels, D = 10, a 100-byte float header: 4140 float bytes
    counts = dict(W=1000, C=10, D=10)
    files = {"tflite": 1000 + 120 + 80 + 50, "onnx_qoperator": 1000 + 80 + 30,
             "onnx_qdq": 1000 + 120 + 40}  # fmt: skip
    size = dict(target=0.27, float32_bytes=4140, files={k: dict(bytes=n) for k, n in files.items()})
    m = bench_mod.ratio_model(counts, size)
    assert (m["tflite"]["floor"], m["tflite"]["rest"]) == (1200, 50)
    assert m["tflite"]["ratio"] == pytest.approx(1250 / 4140)
    # F >= 12.5 (12 - 1.08 + 8 * 10 / 10 + (50 - 0.27 * 100) / 10) = 265.25; F = 100
    assert m["tflite"]["min_fan_in"] == pytest.approx(265.25)
    assert not m["tflite"]["met"] and 1250 / 4140 > 0.27
    # QOperator: 12.5 (8 - 1.08 + (30 - 27) / 10) = 90.25 <= 100, ratio 1110 / 4140 = 0.268
    assert (m["onnx_qoperator"]["floor"], m["onnx_qoperator"]["rest"]) == (1080, 30)
    assert m["onnx_qoperator"]["min_fan_in"] == pytest.approx(90.25)
    assert m["onnx_qoperator"]["met"] and 1110 / 4140 <= 0.27


def test_merge_sizes_keeps_the_timing_and_refuses_changed_sizes(bench_mod, tmp_path):
    size = dict(float32_bytes=10, files={"tflite": dict(bytes=3, ratio=0.3)}, target=0.27)
    stored = dict(meta={"command": "python benchmarks/export.py"}, size=size, timing={"a": 1},
                  accuracy={"float": 0.9})  # fmt: skip
    path = tmp_path / "export.json"
    path.write_text(json.dumps(stored))
    bench_mod.merge_sizes(path, size, {"rows": [1]})
    assert json.loads(path.read_text()) == stored | {"size_vs_width": {"rows": [1]}}

    changed = size | {"float32_bytes": 11}
    with pytest.raises(ValueError, match="differ from the stored ones"):
        bench_mod.merge_sizes(path, changed, {"rows": [2]})
    path.write_text(json.dumps({k: v for k, v in stored.items() if k != "timing"}))
    with pytest.raises(ValueError, match="no full run"):
        bench_mod.merge_sizes(path, size, {"rows": [2]})
