"""benchmarks/train_step.py, suite ``quantized_backward``: every variant is a row (timed, or
``unsupported`` with its error), ratios against the model's own float."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jquant.models import train as T

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_mod():
    name = "jquant_bench_train_step"
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    yield mod
    del sys.modules[name]


def test_a_variant_that_fails_to_build_or_compile_is_an_unsupported_row(bench_mod):
    def fails_to_build():
        raise NotImplementedError("no such op")

    def fails_to_compile():
        def step(state, x, y):
            raise TypeError("does not lower")

        return step, None

    def compiles():
        return (lambda state, x, y: (state + x.sum(), {"loss": y.sum()})), 0.0

    def cuts_a_gradient():  # a real train step whose "b" parameter gets no gradient
        opt = optax.adam(1e-3)

        def apply_fn(params, state, x, train):
            return x[:, None] * params["a"] + jax.lax.stop_gradient(params["b"]), state

        params = {"a": jnp.ones(3), "b": jnp.ones(3)}
        return T.make_train_step(apply_fn, opt), T.TrainState.create(params, {}, opt)

    builders = {
        "a": compiles,
        "b": fails_to_build,
        "c": fails_to_compile,
        "d": cuts_a_gradient,
    }
    x, y = np.ones(2, np.float32), np.zeros(2, np.int32)
    steppers, unsupported = bench_mod.build_steppers(builders, x, y)
    assert list(steppers) == ["a"] and float(steppers["a"].state) == 2.0  # stepped once
    assert unsupported == {
        "b": "NotImplementedError: no such op",
        "c": "TypeError: does not lower",
        "d": "ValueError: one step left these parameters unchanged (zero gradient): ['b']",
    }


@pytest.mark.slow  # compiles 18 train steps (about a minute on a loaded machine)
def test_quantized_backward_suite_smoke(bench_mod, tmp_path):
    out = bench_mod.main(
        ["--suite", "quantized_backward", "--batch", "4", "--rounds", "2",
         "--out", str(tmp_path / "t.json")]
    )  # fmt: skip
    d = json.loads(out.read_text())
    assert d["meta"]["command"].startswith("python ") and d["config"]["batch"] == 4
    rows = {(r["model"], r["variant"]): r for r in d["rows"]}
    libs = ("jquant_simulate", "jquant_int", "aqt_int8", "qwix_int8")
    want = {"float"} | {f"{lib} {p}" for lib in libs for p in ("fwd", "fwd+bwd")}
    assert set(rows) == {(m, v) for m in bench_mod.MODELS for v in want}  # none dropped
    for (model, variant), row in rows.items():
        if row["status"] == "unsupported":
            assert row["error"] and "median_ms" not in row
            continue
        assert row["status"] == "ok" and 0 < row["min_ms"] <= row["median_ms"]
        times = np.array(d["times_ms"][f"{model}/{variant}"])
        base = np.array(d["times_ms"][f"{model}/float"])
        assert row["ratio"]["median"] == pytest.approx(np.median(times / base))
        lo, hi = row["ratio"]["ci95"]
        assert lo <= row["ratio"]["median"] <= hi
    for model in bench_mod.MODELS:  # jquant runs every variant
        assert all(rows[model, v]["status"] == "ok" for v in want if v.startswith(("j", "f")))
    assert "forward only" in rows["conv", "aqt_int8 fwd+bwd"]["error"]
    # aqtp 0.9.0's forward-quantized conv returns zero kernel and input gradients
    assert "unchanged (zero gradient)" in rows["conv", "aqt_int8 fwd"]["error"]
