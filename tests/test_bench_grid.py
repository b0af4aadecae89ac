"""jquant.bench grids (issue #19): cells, peaks, report files, the CLI, the int conv path.

Oracles: NumPy int64 products (int8 cells), ml_dtypes casts and the e4m3 rounding bound (fp8
cells), a peak measured on this machine (achieved rates), analytic byte counts (weights),
jquant's simulate mode and a NumPy conv (the int conv that item 4 profiles).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from figures import check_section, load
from jax import lax

from jquant import cli, ops
from jquant.bench import (
    command,
    conv,
    grid,
    matmul,
    model,
    overhead,
    peaks,
    report,
    timing,
    verdict,
)
from jquant.estimators import fake_quant
from jquant.models.config import GPTConfig, model_config

OPERAND = {o.name: o for o in grid.OPERANDS}


@pytest.fixture(scope="module")
def measured_peak():
    return peaks.measured_cpu_peak(size=512, reps=3)


@pytest.fixture(scope="module")
def smoke_rows(measured_peak):
    cases = [
        matmul.matmul_case(24, 17, 40),
        conv.conv_case(conv.ConvLayer("tiny.3x3_s2", "tiny", (9, 9), 4, (3, 3), 8, 2), 2),
        conv.conv_case(conv.MNIST1D_CNN[1], 2),
    ]
    rows = []
    for case in cases:
        rows += grid.run_case(case, peak=measured_peak, platform="cpu", rounds=2)
    return cases, rows


# --- the grid -------------------------------------------------------------------------------


def test_smoke_grid_runs_every_format_on_tiny_cells(smoke_rows, measured_peak, tmp_path):
    cases, rows = smoke_rows
    want = [o.name for o in grid.OPERANDS] + ["jquant_simulate", "jquant_int"]
    for case in cases:
        got = [r["variant"] for r in rows if r["case"] == case.name]
        assert got == want  # every format has a row: none is skipped
    for r in rows:
        if r["status"] == "unsupported":
            assert r["error"] and ":" in r["error"]
            continue
        assert r["status"] == "ok" and r["error"] is None
        assert r["median_ms"] > 0 and r["ci95_ms"][0] <= r["median_ms"] <= r["ci95_ms"][1]
        assert r["rate_tflops"] == pytest.approx(r["flops"] / r["median_ms"] / 1e9)
        assert r["speedup"] == pytest.approx(1 / r["time_ratio"]["median"])
        assert r["time_ratio"]["against"] == "float32"
        assert r["intensity"] == pytest.approx(r["flops"] / r["bytes"])
    # the baseline's ratio to itself is 1, and jquant int carries its ratio to raw int8
    assert all(r["time_ratio"]["median"] == 1 for r in rows if r["variant"] == "float32")
    assert all("ratio_to_raw_int8" in r for r in rows if r["variant"] == "jquant_int")
    # the files: CSV with one line per row, plots
    report.write_csv(rows, tmp_path / "g.csv")
    assert len((tmp_path / "g.csv").read_text().strip().splitlines()) == len(rows) + 1
    report.speedup_plot(rows, tmp_path / "s.png", "smoke")
    report.roofline_plot(rows, measured_peak, tmp_path / "r.png", "smoke")
    assert (tmp_path / "s.png").stat().st_size > 1000
    assert (tmp_path / "r.png").stat().st_size > 1000
    assert "unsupported" in report.format_table(rows) or all(r["status"] == "ok" for r in rows)


def test_achieved_rate_is_below_the_measured_peak(smoke_rows, measured_peak):
    _, rows = smoke_rows
    checked = 0
    for r in rows:
        if r["status"] != "ok":
            continue
        if r["format"] in ("float32", "int8"):
            assert r["peak_tflops"] == measured_peak.rate(r["format"])
            assert r["rate_tflops"] < r["peak_tflops"]
            assert 0 < r["percent_of_peak"] < 100
            checked += 1
        else:  # no measured peak for the other formats: none is made up
            assert r["peak_tflops"] is None and r["percent_of_peak"] is None
    assert checked >= 6
    assert measured_peak.kind == "measured" and "measured" in measured_peak.source


def test_int8_cells_equal_the_exact_product_on_integer_inputs():
    mm = matmul.matmul_case(33, 20, 257)
    x, w = grid.integer_inputs(mm)
    exact = x.astype(np.int64) @ w.astype(np.int64)
    got = grid.raw_product(mm, OPERAND["int8"])(jnp.asarray(x, jnp.int8), jnp.asarray(w, jnp.int8))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), exact)
    # conv: equal to the float32 conv (exact: |sums| < 2^24) on the same integer inputs
    cv = conv.conv_case(conv.ConvLayer("t", "t", (7, 6), 5, (3, 3), 4, 2), 2)
    x, w = grid.integer_inputs(cv)
    f32 = grid.raw_product(cv, OPERAND["float32"])(x, w)
    i8 = grid.raw_product(cv, OPERAND["int8"])(jnp.asarray(x, jnp.int8), jnp.asarray(w, jnp.int8))
    np.testing.assert_array_equal(np.asarray(i8), np.asarray(f32).astype(np.int64))
    assert np.abs(np.asarray(f32)).max() > 50  # not trivially zero


def test_grid_records_zero_error_for_exact_formats(smoke_rows):
    _, rows = smoke_rows
    for r in rows:
        if (
            r["status"] == "ok"
            and r["format"] in ("float32", "int8")
            and "jquant" not in r["variant"]
        ):
            assert r["max_rel_err"] == 0.0


def test_fp8_cell_is_within_the_e4m3_rounding_bound():
    case = matmul.matmul_case(16, 12, 64)
    rng = np.random.default_rng(3)
    # magnitudes in [0.5, 8]: normal e4m3 numbers, relative rounding error <= 2^-4
    x = rng.uniform(0.5, 8, case.lhs_shape) * rng.choice([-1, 1], case.lhs_shape)
    w = rng.uniform(0.5, 8, case.rhs_shape) * rng.choice([-1, 1], case.rhs_shape)
    fn = grid.raw_product(case, OPERAND["fp8_e4m3"])
    got = np.asarray(fn(jnp.asarray(x, jnp.float8_e4m3fn), jnp.asarray(w, jnp.float8_e4m3fn)))
    assert got.dtype == np.float32  # float32 accumulation
    xr = x.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    wr = w.astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    scale = np.abs(x) @ np.abs(w)
    # the product of the rounded operands, up to float32 accumulation
    np.testing.assert_allclose(got, xr @ wr, atol=float(64 * 2**-23 * scale.max()))
    # against the exact product: |fl(x) fl(w) - x w| <= (2u + u^2) |x| |w|, u = 2^-4
    u = 2.0**-4
    err = np.abs(got - x @ w)
    assert np.all(err <= (2 * u + u * u) * scale + 64 * 2**-23 * scale)
    assert err.max() > 0  # the bound is exercised: fp8 really rounds


def test_a_format_that_cannot_run_is_reported_unsupported_not_skipped():
    base = matmul.matmul_case(8, 8, 8)

    def product(lhs, rhs, **kw):
        if lhs.dtype == jnp.bfloat16:
            raise TypeError("no bfloat16 here")
        return base.product(lhs, rhs, **kw)

    case = base.__class__(**{**base.__dict__, "product": product})
    rows = grid.run_case(case, peak=peaks.given_peak("1"), platform="cpu", rounds=2)
    row = next(r for r in rows if r["variant"] == "bfloat16")
    assert row["status"] == "unsupported" and row["error"] == "TypeError: no bfloat16 here"
    assert "median_ms" not in row
    assert [r["variant"] for r in rows][:2] == ["float32", "bfloat16"]


def test_grid_case_lists():
    full = matmul.cases(quick=False)
    sizes = {s for c in full for s in c.lhs_shape + c.rhs_shape}
    assert min(sizes) == 128 and max(sizes) == 8192
    assert any(c.group == "unaligned" for c in full)
    assert all(c.flops == 2 * np.prod(c.lhs_shape) * c.rhs_shape[1] for c in full)
    names = [c.name for c in conv.cases(quick=False)]
    assert len(names) == len(conv.RESNET50) + len(conv.MNIST1D_CNN)
    stem = conv.RESNET50[0]
    assert stem.out_spatial() == (112, 112)  # ResNet-50's stem: 224 -> 112
    c = conv.conv_case(stem, 1)
    assert c.flops == 2 * 112 * 112 * 64 * 7 * 7 * 3
    with pytest.raises(ValueError, match="batch"):
        conv.conv_case(stem, 0)
    with pytest.raises(ValueError, match="matmul size m"):
        matmul.matmul_case(0, 1, 1)


# --- peaks ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, device",
    [
        ("NVIDIA H100 80GB HBM3", "NVIDIA H100 SXM"),
        ("NVIDIA H100 PCIe", "NVIDIA H100 PCIe"),
        ("NVIDIA H200", "NVIDIA H200 SXM"),
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100"),
        ("NVIDIA L4", "NVIDIA L4"),
        ("TPU v4", "TPU v4"),
        ("TPU v5 lite", "TPU v5e"),
        ("TPU v5", "TPU v5p"),
        ("TPU v5p", "TPU v5p"),
        ("TPU v6 lite", "TPU v6e"),
    ],
)
def test_published_peak_matches_device_kind(kind, device):
    peak = peaks.published_peak(kind)
    assert peak.device == device and peak.kind == "published"
    assert "https://" in peak.source
    assert peak.rate("int8") >= peak.rate("bfloat16") > 0
    assert peak.bandwidth_gbs > 0


def test_published_peaks_are_dense_rates():
    h100 = peaks.published_peak("H100 SXM5")
    assert (h100.rate("bfloat16"), h100.rate("fp8_e4m3")) == (989.5, 1979.0)  # 1979*/3958* / 2
    assert peaks.published_peak("NVIDIA L4").rate("int8") == 242.5  # 485* / 2
    assert peaks.published_peak("NVIDIA A100").rate("fp8_e4m3") is None  # no fp8 on A100
    assert peaks.published_peak("cpu") is None
    assert peaks.published_peak("NVIDIA L40S") is None  # 'l4' only as a word


def test_given_peak_and_bad_values():
    assert peaks.given_peak("400").rate("float16") == 400.0
    p = peaks.given_peak("bfloat16=400, int8=800")
    assert p.rate("int8") == 800.0 and p.rate("float32") is None and p.kind == "given"
    for bad, match in [("abc", "--peak must be"), ("0", "positive"), ("int9=3", "unknown")]:
        with pytest.raises(ValueError, match=match):
            peaks.given_peak(bad)
    with pytest.raises(ValueError, match="Peak.kind"):
        peaks.Peak("x", {}, "guessed", "")
    with pytest.raises(TypeError, match="device_kind"):
        peaks.published_peak(3)


# --- memory and weights -------------------------------------------------------------------


def test_weight_bytes_per_format_match_the_analytic_count():
    params = {"conv1": {"kernel": jnp.ones((5, 1, 32)), "bias": jnp.zeros(32)}}
    b = model.weight_bytes(params)
    n_k, n_b = 160, 32
    assert b["float32"] == 4 * (n_k + n_b) and b["bfloat16"] == 2 * (n_k + n_b)
    assert b["int8"] == n_k + 4 * 32 + 4 * n_b  # codes + per-channel scales + float32 bias
    assert b["int4_packed"] == n_k // 2 + 4 * 32 + 4 * n_b  # two codes per byte


def test_compiled_memory_counts_arguments_and_outputs():
    x = jnp.ones((256, 64))
    got = model.compiled_memory(lambda a: a @ a.T, x)
    assert got >= x.nbytes + 256 * 256 * 4


TINY_GPT = GPTConfig(vocab_size=13, context=8, num_layers=1, num_heads=2, width=16)


def test_gpt_weight_bytes_per_format_match_the_analytic_count():
    cfg = dataclasses.replace(TINY_GPT, num_layers=2)
    _, variables, source = model.gpt_model(cfg)
    assert source == "given GPTConfig, freshly initialised"
    w, h = cfg.width, cfg.mlp_ratio * cfg.width
    # per block: query, key, value, out (w x w), up (w x h), down (h x w); scales per column
    kernels = cfg.num_layers * (4 * w * w + 2 * w * h)
    channels = cfg.num_layers * (4 * w + h + w)
    others = cfg.vocab_size * w + cfg.context * w + (2 * cfg.num_layers + 1) * w
    b = model.weight_bytes(variables["params"])
    assert b["float32"] == 4 * (kernels + others)
    assert b["int8"] == kernels + 4 * channels + 4 * others
    assert b["int4_packed"] == kernels // 2 + 4 * channels + 4 * others


def test_zoo_gpt_without_cached_weights_is_freshly_initialised_and_says_so(tmp_path):
    gpt_model, variables, source = model.gpt_model(cache=tmp_path)
    assert "freshly initialised" in source and str(tmp_path) in source
    assert gpt_model.config == model_config("gpt", (128,), 103)
    assert variables["params"]["pos_embed"].shape == (128, gpt_model.config.width)


@pytest.mark.slow  # about 75 s on the loaded 2-core machine (six compiles and a convert)
def test_smoke_gpt_model_bench():
    part = model.run_gpt(quick=True, rounds=2, config=TINY_GPT, batch=2)
    rows = {(r["phase"], r["variant"]): r for r in part["rows"]}
    ok = [(p, v) for p in ("inference", "training") for v in ("float", "simulate", "int")]
    assert sorted(k for k, r in rows.items() if r["status"] == "ok") == sorted(ok)
    for key in ok:
        r = rows[key]
        assert r["model"] == "gpt" and r["median_ms"] > 0
        assert r["tokens_per_s"] == pytest.approx(2 * 8 / (r["median_ms"] / 1e3))
        assert r["samples_per_s"] == pytest.approx(2 / (r["median_ms"] / 1e3))
        assert r["compiled_memory_bytes"] > 0
        assert r["device_peak_bytes"] is None  # CPU: no memory_stats(), none made up
    assert rows[("inference", "float")]["time_ratio"]["median"] == 1
    # the integer program is reported, with convert's own refusal, not omitted
    program = rows[("inference", "program")]
    assert program["status"] == "unsupported" and ":" in program["error"]
    assert "freshly initialised" in part["description"]
    assert part["weights_bytes"]["int4_packed"] < part["weights_bytes"]["int8"]
    text = model.format_summary(
        dict(rows=part.pop("rows"), models=dict(gpt=part), device_memory_source="none")
    )
    assert "tokens/s" in text and "program      unsupported: " in text


@pytest.mark.slow
def test_smoke_model_bench(tmp_path):
    payload = model.run(quick=True, rounds=2, gpt_config=TINY_GPT)
    variants = {(r["model"], r["phase"], r["variant"]) for r in payload["rows"]}
    assert ("cnn", "inference", "program") in variants and ("cnn", "training", "int") in variants
    assert ("gpt", "training", "int") in variants
    assert all(r["samples_per_s"] > 0 for r in payload["rows"] if r["status"] == "ok")
    cnn = payload["models"]["cnn"]["weights_bytes"]
    assert cnn["int4_packed"] < cnn["int8"] < cnn["float32"]
    report.write_csv(payload["rows"], tmp_path / "m.csv", model.CSV_COLUMNS)
    lines = (tmp_path / "m.csv").read_text().strip().splitlines()
    assert len(lines) == len(payload["rows"]) + 1 and lines[0].startswith("model,phase")


# --- the CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["matmul", "--peak", "abc"],
        ["matmul", "--peak", "0"],
        ["conv", "--rounds", "1"],
        ["model", "--bogus"],
        ["conv", "--out", "/proc/nope"],
    ],
)
def test_bad_options_exit_2_before_any_work(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"jquant bench {argv[0]}: error: " in err and argv[1] in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_bench_list_names_grids_and_scripts(capsys):
    assert cli.main(["bench", "--list"]) == 0
    names = capsys.readouterr().out.split()
    assert names[:3] == ["matmul", "conv", "model"] and "ops" in names
    assert cli.main(["bench", "nosuch"]) == 2


def test_output_paths_and_device_tag():
    class Dev:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

    assert command.device_tag(Dev()) == "nvidia_h100_80gb_hbm3"
    paths = command.output_paths(pathlib.Path("o"), "matmul", "cpu")
    assert sorted(p.name for p in paths.values()) == [
        "bench_matmul_cpu.csv",
        "bench_matmul_cpu.json",
        "bench_matmul_cpu_roofline.png",
        "bench_matmul_cpu_speedup.png",
    ]
    assert len(command.output_paths(pathlib.Path("o"), "model", "cpu")) == 2


# --- the int conv path (item 4) -------------------------------------------------------------


def _conv(x, w, mode, **geometry):
    return ops.conv_general_dilated(
        x,
        w,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        lhs_quant=ops.QuantConfig(symmetric=False),
        rhs_quant=ops.QuantConfig(symmetric=False, axis=-1),
        mode=mode,
        **geometry,
    )


@pytest.mark.parametrize(
    "geometry",
    [
        dict(window_strides=(2, 1), padding=((2, 0), (1, 3)), rhs_dilation=(2, 1)),
        dict(window_strides=(1, 2), padding="SAME", feature_group_count=2),
        dict(window_strides=(2, 2), padding=((0, 2), (2, 1))),
    ],
)
def test_int_conv_padding_strides_groups_equal_simulate(geometry):
    keys = jax.random.split(jax.random.key(5))
    x = jax.random.uniform(keys[0], (2, 9, 8, 4), minval=0.2, maxval=3.0)  # zero point far off 0
    w = jax.random.normal(keys[1], (3, 3, 4 // geometry.get("feature_group_count", 1), 6)) + 0.3
    got = _conv(x, w, "int", **geometry)
    want = _conv(x, w, "simulate", **geometry)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


def _numpy_conv(x, w, strides, pads):
    """NHWC x HWIO conv in float64 from the definition; a negative pad crops."""
    x = np.asarray(x, np.float64)
    for axis, (lo, hi) in zip((1, 2), pads, strict=True):
        x = np.take(x, range(max(-lo, 0), x.shape[axis] - max(-hi, 0)), axis=axis)
        width = [(0, 0)] * 4
        width[axis] = (max(lo, 0), max(hi, 0))
        x = np.pad(x, width)
    kh, kw = w.shape[:2]
    oh, ow = (x.shape[1] - kh) // strides[0] + 1, (x.shape[2] - kw) // strides[1] + 1
    out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
    for i in range(oh):
        for j in range(ow):
            patch = x[:, i * strides[0] : i * strides[0] + kh, j * strides[1] : j * strides[1] + kw]
            out[:, i, j] = np.einsum("nhwc,hwco->no", patch, np.asarray(w, np.float64))
    return out


def test_int_conv_negative_padding_matches_numpy():
    # XLA:CPU's float conv crops wrongly with negative padding (so simulate is no oracle here)
    keys = jax.random.split(jax.random.key(6))
    x = jax.random.uniform(keys[0], (2, 9, 8, 4), minval=0.2, maxval=3.0)
    w = jax.random.normal(keys[1], (3, 3, 4, 6)) + 0.3
    pads = ((-1, 2), (1, -1))
    got = _conv(x, w, "int", window_strides=(3, 2), padding=pads)
    lq, rq = ops.QuantConfig(symmetric=False), ops.QuantConfig(symmetric=False, axis=-1)
    xq = fake_quant(x, ops.dynamic_qparams(x, lq), lq.fmt)
    wq = fake_quant(w, ops.dynamic_qparams(w, rq), rq.fmt)
    np.testing.assert_allclose(
        np.asarray(got), _numpy_conv(xq, wq, (3, 2), pads), rtol=1e-4, atol=1e-4
    )


def test_int_conv_infinities_saturate_and_a_nan_stays_in_its_windows():
    x = np.full((1, 6, 6, 2), 0.5, np.float32)
    x[0, 1, 1, 0], x[0, 4, 4, 1] = np.inf, -np.inf  # saturate, as in simulate
    w = np.ones((3, 3, 2, 3), np.float32)
    qp = ops.QParams(jnp.float32(0.05), jnp.float32(3.0))
    kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    lq, rq = ops.QuantConfig(symmetric=False), ops.QuantConfig(axis=-1)
    f = functools.partial(
        ops.conv_general_dilated, lhs_quant=lq, rhs_quant=rq, lhs_qparams=qp, **kw
    )
    got = np.asarray(jax.jit(functools.partial(f, mode="int"))(x, w))
    assert not np.isnan(got).any()
    np.testing.assert_allclose(got, np.asarray(f(x, w, mode="simulate")), rtol=1e-5)
    x[0, 2, 3, 1] = np.nan  # a NaN is still found: its windows only
    got = np.asarray(jax.jit(functools.partial(f, mode="int"))(x, w))
    assert np.isnan(got[0, 1:4, 2:5]).all() and np.isnan(got).sum() == 9 * 3


def test_smoke_int_overhead_profile():
    r = overhead.int_overhead(rounds=2, batch=2, size=6, channels=4)
    assert set(r["timing"]["variants"]) >= {
        "float",
        "lax_int8",
        "int_static",
        "quantize",
        "quantize_pad",
        "lax_int8_prepadded",
        "nan_mask",
        "rescale_with_checks",
        "rescale",
        "nan_check_sum",
    }
    assert r["parts_besides_the_conv_over_lax_int8"] < r["parts_over_lax_int8"]
    assert r["parts"] == ["quantize", "lax_int8", "nan_check_sum", "rescale_with_checks"]
    assert r["int_static_vs_lax_int8"]["verdict"] in timing.VERDICTS
    assert r["int_static_vs_lax_int8"]["target"] == overhead.TARGET
    ops_ = " ".join(r["int_static_entry_ops"])
    assert "fusion" in ops_ or "convolution" in ops_
    json.dumps(r)  # plain JSON


def test_entry_ops_reads_the_entry_computation():
    text = jax.jit(lambda a, b: lax.dot(a, b) + 1).lower(jnp.ones((4, 4)), jnp.ones((4, 4)))
    found = overhead.entry_ops(text.compile().as_text())
    assert found and all(" = " in f for f in found)


# --- README § Accelerator benchmarking ------------------------------------------------------


def _row(results: dict, case: str, variant: str) -> dict:
    return next(r for r in results["rows"] if r["case"] == case and r["variant"] == variant)


def _speedup(row: dict) -> str:
    """``speedup x [low, high]``: ``1 / time ratio`` and its inverted interval."""
    lo, hi = row["time_ratio"]["ci95"]
    return f"{row['speedup']:.2f}x [{1 / hi:.2f}, {1 / lo:.2f}]"


def _ratio(row: dict) -> str:
    """``time ratio x [low, high]``."""
    r = row["time_ratio"]
    return f"{r['median']:.2f}x [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]"


def _model_row(results: dict, name: str, phase: str, variant: str) -> dict:
    return next(
        r
        for r in results["rows"]
        if (r["model"], r["phase"], r["variant"]) == (name, phase, variant)
    )


def test_readme_accelerator_benchmarking_matches_the_results():
    mm = load("benchmarks/results/bench_matmul_cpu.json")
    cv = load("benchmarks/results/bench_conv_cpu.json")
    mo = load("benchmarks/results/bench_model_cpu.json")
    rates = mm["peak"]["rates_tflops"]
    over = cv["int_overhead"]
    pair = over["int_static_vs_lax_int8"]
    assert mm["peak"]["kind"] == "measured" and mm["meta"]["quick"] and cv["meta"]["quick"]
    assert mo["meta"]["quick"]
    gpt, cnn = mo["models"]["gpt"], mo["models"]["cnn"]
    program = _model_row(mo, "gpt", "inference", "program")
    assert program["status"] == "unsupported" and program["error"]
    weights = gpt["weights_bytes"]
    figures = {
        "float32 peak": f"{1e3 * rates['float32']:.1f} GFLOP/s",
        "int8 peak": f"{1e3 * rates['int8']:.1f} GOP/s",
        "int8 matmul": _speedup(_row(mm, "m1000_n1000_k1000", "int8")),
        "int8 resnet": _speedup(_row(cv, "resnet50.res4_3x3", "int8")),
        "int8 1-D conv": _speedup(_row(cv, "mnist1d_cnn.conv2.n128", "int8")),
        "int vs lax": f"{pair['median']:.2f}x [{pair['ci95'][0]:.2f}, {pair['ci95'][1]:.2f}]",
        "verdict": f"(target <= {pair['target']}: {pair['verdict']})",
        "passes": f"{over['parts_besides_the_conv_over_lax_int8']:.2f}x",
        "parts": f"{over['parts_over_lax_int8']:.2f}x",
        "previous parts": f"{over['previous_parts_over_lax_int8']:.2f}x",
        "prepadded": f"{over['prepadded_vs_lax_int8']['median']:.2f}x",
        "cnn batch": f"CNN batch {cnn['batch']}",
        "gpt batch": f"GPT {gpt['batch']} windows of {gpt['context']} tokens",
        "gpt source": "freshly initialised"
        if "freshly initialised" in gpt["description"]
        else "cached zoo weights",
        "cnn int": _ratio(_model_row(mo, "cnn", "inference", "int")),
        "cnn program": _ratio(_model_row(mo, "cnn", "inference", "program")),
        "gpt float": f"{_model_row(mo, 'gpt', 'inference', 'float')['tokens_per_s']:.0f} tokens/s",
        "gpt int": _ratio(_model_row(mo, "gpt", "inference", "int")),
        "gpt int training": _ratio(_model_row(mo, "gpt", "training", "int")),
        "gpt float32 weights": f"{weights['float32'] / 1e6:.2f} MB",
        "gpt int8 weights": f"{weights['int8'] / 1e6:.2f} MB",
        "gpt int4 weights": f"{weights['int4_packed'] / 1e6:.2f} MB",
    }
    assert pair["verdict"] == verdict(pair["ci95"], pair["target"])
    check_section(
        "README.md", "Accelerator benchmarking", figures, setup=["2", "1.2", "95", "50", "1"]
    )  # 2-core, target, 95% CI, ResNet-50, 1-D
