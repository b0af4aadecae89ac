"""Tests of jquant.sweep: the results table, error_vs_bits, sharding over bits, plots."""

import csv
import functools
import io
import json
import logging
import os
import socket
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jquant.sweep import CALIBRATIONS, GRANULARITIES, Table, error_vs_bits, plots
from jquant.sweep.error_vs_bits import QuantSpec, _static_width
from jquant.sweep.sharding import bits_mesh, map_over_bits, peak_bytes

# --- Table ------------------------------------------------------------------------------------

_RECORDS = [
    {"tensor": "a", "bits": 4, "sqnr_db": 25.5, "ok": True},
    {"tensor": "b", "bits": 8, "sqnr_db": float("inf"), "ok": False},
    {"tensor": "c", "bits": np.int32(2), "sqnr_db": np.float32(1.5), "ok": None},
]


def test_table_round_trips():
    t = Table.from_dicts(_RECORDS).with_meta(peak_bytes=123)
    assert t.columns == ("tensor", "bits", "sqnr_db", "ok")
    assert t.to_dicts()[2] == {"tensor": "c", "bits": 2, "sqnr_db": 1.5, "ok": None}
    assert type(t.to_dicts()[2]["bits"]) is int  # NumPy scalars become Python scalars
    # JSON, parsed by the json module, and back
    doc = json.loads(t.to_json())
    assert doc["columns"] == list(t.columns) and doc["meta"] == {"peak_bytes": 123}
    assert doc["rows"][1]["sqnr_db"] is None  # strict JSON: non-finite floats as null
    back = Table.from_json(t.to_json())
    assert back.to_dicts()[1]["sqnr_db"] is None and back.to_dicts()[::2] == t.to_dicts()[::2]
    assert back.meta == t.meta
    # CSV, parsed by the csv module
    rows = list(csv.DictReader(io.StringIO(t.to_csv())))
    assert [r["tensor"] for r in rows] == ["a", "b", "c"]
    assert float(rows[1]["sqnr_db"]) == float("inf") and rows[2]["ok"] == ""
    # pandas
    df = t.to_pandas()
    assert list(df.columns) == list(t.columns) and df["bits"].tolist() == [4, 8, 2]


def test_table_select_and_concat():
    t = Table.from_dicts(_RECORDS)
    assert t.where(bits=8).column("tensor") == ["b"]
    assert len(t.where(bits=5)) == 0
    u = Table.concat([t, Table.from_dicts([{"tensor": "d", "extra": 1.0}])])
    assert u.columns == ("tensor", "bits", "sqnr_db", "ok", "extra")
    assert u.column("extra") == [None, None, None, 1.0]
    text = str(t)
    assert text.splitlines()[0].split() == list(t.columns) and "inf" in text


def test_table_bad_input():
    with pytest.raises(ValueError, match="row 0"):
        Table(("a", "b"), ((1,),))
    with pytest.raises(TypeError, match="column 'a'"):
        Table(("a",), ((np.ones(3),),))
    with pytest.raises(ValueError, match="distinct"):
        Table(("a", "a"))
    with pytest.raises(KeyError, match="nope"):
        Table.from_dicts(_RECORDS).column("nope")


# --- error_vs_bits: analytic and independent oracles --------------------------------------------

_X_UNIFORM = np.random.default_rng(0).uniform(-1, 1, 50_000).astype(np.float32)
_X_GAUSS = np.random.default_rng(1).normal(size=50_000).astype(np.float32)


def test_sqnr_rises_6db_per_bit_on_uniform_data():
    bits = np.arange(4, 13)
    t = error_vs_bits({"gauss": _X_GAUSS, "uniform": _X_UNIFORM}, bits=bits)
    uni = np.array(t.where(tensor="uniform").column("sqnr_db"))
    # Analytic: step s = a / qmax on U(-a, a): SQNR = 10 log10((a^2 / 3) / (s^2 / 12)).
    amax = np.abs(_X_UNIFORM).max()
    qmax = 2.0 ** (bits - 1) - 1
    np.testing.assert_allclose(uni, 20 * np.log10(2 * qmax / amax), atol=0.1)
    slope = np.polyfit(bits, uni, 1)[0]
    assert abs(slope - 6.02) <= 0.3, slope
    # N(0, 1) reported beside it: the min-max range wastes levels on the tails, so lower SQNR.
    gauss = np.array(t.where(tensor="gauss").column("sqnr_db"))
    assert gauss.shape == uni.shape and np.all(gauss < uni - 3)


def _numpy_fake_quant(x, bits, axis, symmetric):
    """float64 NumPy re-implementation of the min-max quantizer (round half to even)."""
    x = x.astype(np.float64)
    red = None if axis is None else tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    lo = np.minimum(x.min(axis=red, keepdims=axis is not None), 0)
    hi = np.maximum(x.max(axis=red, keepdims=axis is not None), 0)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if symmetric:
        scale, zp = np.maximum(-lo, hi) / qmax, 0.0
    else:
        scale = (hi - lo) / (qmax - qmin)
        zp = np.clip(np.round(qmin - lo / scale), qmin, qmax)
    return scale * (np.clip(np.round(x / scale) + zp, qmin, qmax) - zp)


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rows_match_numpy_quantizer(granularity, symmetric):
    x = np.random.default_rng(2).normal(0.3, 1.0, (24, 6)).astype(np.float32)
    bits = [2, 3, 5, 8]
    t = error_vs_bits(x, bits=bits, granularities=granularity, symmetric=symmetric)
    axis = -1 if granularity == "per_channel" else None
    for b, row in zip(bits, t.to_dicts(), strict=True):
        y = _numpy_fake_quant(x, b, axis, symmetric)
        err = x - y
        assert row["bits"] == b and row["granularity"] == granularity
        np.testing.assert_allclose(row["mse"], np.mean(err**2), rtol=1e-4)
        np.testing.assert_allclose(row["max_abs"], np.abs(err).max(), rtol=1e-4)
        want_sqnr = 10 * np.log10(np.sum(x.astype(float) ** 2) / np.sum(err**2))
        np.testing.assert_allclose(row["sqnr_db"], want_sqnr, atol=1e-3)


def test_float_family_matches_ml_dtypes():
    t = error_vs_bits(_X_GAUSS[:4096], families=["fp8_e4m3", "fp8_e5m2"])
    for name, dtype in (("fp8_e4m3", ml_dtypes.float8_e4m3fn), ("fp8_e5m2", ml_dtypes.float8_e5m2)):
        row = t.where(family=name).to_dicts()[0]
        x = _X_GAUSS[:4096]
        scale = np.float32(np.abs(x).max() / float(ml_dtypes.finfo(dtype).max))
        y = (x / scale).astype(dtype).astype(np.float32) * scale
        assert row["bits"] == 8
        np.testing.assert_allclose(row["mse"], np.mean((x - y) ** 2), rtol=1e-5)


def test_mse_calibration_beats_minmax():
    x = _X_GAUSS[:512].reshape(16, 32)
    t = error_vs_bits(x, bits=[3, 4, 6], calibrations=["minmax", "mse"])
    mm = np.array(t.where(calibration="minmax").column("mse"))
    best = np.array(t.where(calibration="mse").column("mse"))
    assert np.all(best <= mm)  # the MSE search includes the min-max range (alpha = 1)


@pytest.mark.slow
def test_smoke_every_calibration_runs():
    """Smoke test: every calibration name runs through ``error_vs_bits`` and gives finite
    errors (each calibration's range is checked against its oracle in test_calibration.py)."""
    x = _X_GAUSS[:2048].reshape(64, 32)
    t = error_vs_bits(x, bits=[3, 4], calibrations=["minmax", "mse", "aciq", "percentile", "kl"])
    assert len(t) == 10 and np.all(np.isfinite(t.column("sqnr_db")))


# --- the traced sweep: one program, chunked, sharded ---------------------------------------------


class _CountingSpec(QuantSpec):
    traces = 0  # class attribute: counts traces of __call__ (test-only bookkeeping)

    def __call__(self, bits, x):
        type(self).traces += 1
        return super().__call__(bits, x)


def test_vmapped_sweep_equals_static_widths_and_compiles_once():
    spec = _CountingSpec(granularity="per_channel", symmetric=False)
    x = jnp.asarray(_X_GAUSS[:1024].reshape(32, 32))
    bits = [2, 5, 8, 16]
    got = {c: map_over_bits(spec, bits, (x,), chunk_size=c) for c in (None, 1)}
    traced_before = _CountingSpec.traces
    again = map_over_bits(spec, [3, 6, 9, 12], (x,), chunk_size=1)  # same shapes
    assert _CountingSpec.traces == traced_before  # cached: no new trace, no new compile
    assert again["sqnr_db"].shape == (4,) and np.all(np.diff(again["sqnr_db"]) > 0)
    for k in got[None]:
        # chunked and unchunked programs may sum in another order: float32 rounding only
        np.testing.assert_allclose(got[1][k], got[None][k], rtol=1e-5, err_msg=k)
    for i in (0, 3):  # a static-bits program per width, as an independent compilation
        want = _static_width(QuantSpec(granularity="per_channel", symmetric=False), bits[i], x)
        for k in want:
            np.testing.assert_allclose(got[None][k][i], want[k], rtol=1e-5, err_msg=k)


def test_chunking_bounds_peak_memory():
    spec = QuantSpec()
    x = (jnp.asarray(_X_GAUSS),)
    one = peak_bytes(spec, [8], x)
    chunked = peak_bytes(spec, np.arange(2, 17), x, chunk_size=1)
    full = peak_bytes(spec, np.arange(2, 17), x)
    assert 0 < one <= chunked <= 2 * one < full


def test_bad_input():
    with pytest.raises(ValueError, match=r"bits must be integers in \[2, 16\]"):
        error_vs_bits(_X_UNIFORM, bits=[1, 4])
    with pytest.raises(ValueError, match="bits"):
        error_vs_bits(_X_UNIFORM, bits=[17])
    with pytest.raises(ValueError, match="family"):
        error_vs_bits(_X_UNIFORM, families="int5")
    with pytest.raises(ValueError, match="granularity"):
        error_vs_bits(_X_UNIFORM, granularities="per_row")
    with pytest.raises(ValueError, match="calibration"):
        error_vs_bits(_X_UNIFORM, calibrations="best")
    with pytest.raises(ValueError, match="float array leaf"):
        error_vs_bits({"i": jnp.arange(3)})
    with pytest.raises(ValueError, match="chunk_size"):
        map_over_bits(QuantSpec(), [4], (jnp.ones(3),), chunk_size=0)
    with pytest.raises(ValueError, match="devices"):
        bits_mesh([])


def test_options_checked_at_every_width_before_any_work():
    from jquant.nn.rules import QuantRule
    from jquant.sweep import check_options
    from jquant.sweep.model_sweep import check_rules, model_vs_bits

    # KL with 2048 bins serves qmax + 1 <= 2048 levels: 12 bits; a traced 13-bit width used
    # to give a meaningless threshold (SQNR ~0 dB) where a static one raises
    levels = r"qmax \+ 1 = 4096 for kl calibration of IntFormat\(bits=13\)"
    with pytest.raises(ValueError, match=levels):
        error_vs_bits(_X_UNIFORM[:64], bits=[8, 13], calibrations=["minmax", "kl"])
    widths, specs = check_options([2, 12], granularities=GRANULARITIES, calibrations=CALIBRATIONS)
    assert widths.tolist() == [2, 12] and len(specs) == len(GRANULARITIES) * len(CALIBRATIONS)
    with pytest.raises(ValueError, match="aciq needs a uniform integer grid"):
        check_options([4], families=("int", "fp8_e4m3"), calibrations="aciq")
    kl_rules = (QuantRule(".*", calibration="kl"),)
    assert check_rules(kl_rules, [2, 16], "weights").tolist() == [2, 16]  # activations float
    with pytest.raises(ValueError, match=levels):
        check_rules(kl_rules, [8, 13], ["weights", "acts"])
    model, variables, x, y = _tiny_mlp()
    with pytest.raises(ValueError, match=levels):  # before calibrating or compiling anything
        model_vs_bits(model, variables, x, y, bits=[8, 13], rules=kl_rules)


_SHARDED = textwrap.dedent(
    """
    import json, sys
    import jax, numpy as np
    from jquant.sweep import error_vs_bits, bits_mesh
    assert jax.device_count() == 4, jax.devices()
    x = np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32)
    t = error_vs_bits({"w": x}, bits=list(range(2, 9)), granularities="per_channel",
                      chunk_size=1, mesh=bits_mesh())
    print(json.dumps(t.column("mse") + t.column("sqnr_db")))
    """
)


def _host_devices_env(devices: int, xla_flags: str = "") -> dict:
    """The environment of a fresh process with ``devices`` forced CPU devices (XLA reads
    ``XLA_FLAGS`` when jax is imported, hence a subprocess)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = f"--xla_force_host_platform_device_count={devices} {xla_flags}"
    env["XLA_FLAGS"] = flags.strip()
    return env


def _last_json(out: subprocess.CompletedProcess) -> dict | list:
    """The last printed line of a finished script, decoded as JSON (stderr shown on failure)."""
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _on_four_host_devices(script: str, xla_flags: str = "") -> dict | list:
    """Runs ``script`` in a fresh process with 4 forced CPU devices; its last printed line
    (JSON) decoded."""
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=_host_devices_env(4, xla_flags),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return _last_json(out)


def test_sharded_over_four_devices_matches_one_device():
    sharded = _on_four_host_devices(_SHARDED)
    x = np.random.default_rng(3).normal(size=(16, 8)).astype(np.float32)
    t = error_vs_bits({"w": x}, bits=list(range(2, 9)), granularities="per_channel")
    # the sharded program may reduce in another order: equal up to float32 rounding
    np.testing.assert_allclose(sharded, t.column("mse") + t.column("sqnr_db"), rtol=1e-5)


_SHARDED_MODEL = textwrap.dedent(
    """
    import functools, json
    import flax.linen as nn
    import jax, jax.numpy as jnp, numpy as np
    from jquant.nn.rules import QuantRule
    from jquant.sweep.model_sweep import (PTQ, QuantizedLogits, _batches, model_vs_bits,
                                            uniform_rules)
    from jquant.sweep.sharding import bits_mesh, compiled_sweep, map_over_bits

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3,), name="conv")(x))
            return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))

    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(11)
    x = rng.normal(size=(32, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 32).astype(np.int32)
    model = Net()
    variables = model.init(jax.random.key(2), jnp.asarray(x[:1]))
    bits = [2, 3, 4, 8]
    table = model_vs_bits(model, variables, x, y, bits, batch_size=16)  # default mesh
    # the same sweep program model_vs_bits compiles, built here to read its logits and shardings
    ptq = PTQ.calibrated(model, variables, x, batch_size=16)
    rules_at = functools.partial(uniform_rules, (QuantRule(".*"),), "weights+acts", "per_channel")
    fn = QuantizedLogits(model, ptq.example, rules_at)
    args = (ptq.variables, np.stack(_batches(x, 16)[0]))
    sharded = map_over_bits(fn, bits, args)
    spec = compiled_sweep(fn, bits, args).input_shardings[0][0]
    one_mesh = bits_mesh(jax.devices()[:1])
    one = map_over_bits(fn, bits, args, mesh=one_mesh)
    one_spec = compiled_sweep(fn, bits, args, mesh=one_mesh).input_shardings[0][0]
    print(json.dumps({
        "accuracy": table.column("accuracy")[1:], "bits": table.column("bits")[1:],
        "devices": table.meta["devices"], "spec": str(spec.spec),
        "spec_devices": len(spec.device_set), "one_devices": len(one_spec.device_set),
        "y": y.tolist(), "sharded": sharded.tolist(), "one": one.tolist()}))
    """
)


def test_model_sweep_sharded_over_four_devices_matches_one_device():
    got = _on_four_host_devices(_SHARDED_MODEL, "--xla_backend_optimization_level=0")
    # the sharding is real: the widths' axis of the compiled program spans the 4 devices
    assert got["devices"] == 4 and got["spec"] == "P('bits',)" and got["spec_devices"] == 4
    assert got["one_devices"] == 1
    sharded, one, y = np.asarray(got["sharded"]), np.asarray(got["one"]), np.asarray(got["y"])
    assert sharded.shape == one.shape == (4, 2, 16, 3)  # (bits, batch, batch_size, classes)
    sharded, one = sharded.reshape(4, 32, 3), one.reshape(4, 32, 3)
    assert got["bits"] == [2, 3, 4, 8]
    np.testing.assert_allclose(sharded, one, rtol=1e-5, atol=1e-6)
    # model_vs_bits (sharded) scores exactly the one-device logits' accuracy, counted in NumPy
    assert got["accuracy"] == [float(np.mean(np.argmax(z, -1) == y)) for z in one]


# --- every calibration and every sweep: the same numbers on 1, 2, 3, 4 devices, 2 processes ----

# Runs every sweep with the default mesh (``mesh=None``: all devices) and prints its tables as
# JSON. argv: mode ("quick": min-max, MSE and ACIQ tensor sweeps, the model sweep and the
# Pareto mixed precision with MSE histograms; "full": every tensor calibration, every model
# calibration, sensitivity and greedy mixed precision too), the expected device count, then
# optionally a port and a process id to join two processes with jax.distributed (CPU, gloo).
_EVERY_SWEEP = textwrap.dedent(
    """
    import json, sys
    import jax
    mode, devices = sys.argv[1], int(sys.argv[2])
    if len(sys.argv) > 3:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=f"127.0.0.1:{sys.argv[3]}", num_processes=2,
            process_id=int(sys.argv[4]), initialization_timeout=120)
    import jax.numpy as jnp, numpy as np
    from jquant.models.config import MLPConfig
    from jquant.models.linen import MLP
    from jquant.nn.rules import CALIBRATIONS as MODEL_CALIBRATIONS, QuantRule
    from jquant.sweep import CALIBRATIONS, error_vs_bits
    from jquant.sweep.mixed_precision import mixed_precision
    from jquant.sweep.model_sweep import model_vs_bits
    from jquant.sweep.sensitivity import sensitivity

    assert jax.device_count() == devices, jax.devices()
    full = mode == "full"
    rng = np.random.default_rng(0)
    w = rng.normal(size=(16, 6)).astype(np.float32)
    w[0, 0] = 6.0  # an outlier: the clipping methods differ from min / max
    acts = rng.laplace(size=(64,)).astype(np.float32)
    bits = list(range(2, 9))  # 7 widths: 2, 3, 4 devices split them unevenly (padded)
    tensors = {"w": w, "a": acts}
    out = {}
    calibrations = CALIBRATIONS if full else ("minmax", "mse", "aciq")
    out["per_tensor"] = error_vs_bits(tensors, bits, calibrations=calibrations, chunk_size=2)
    out["per_channel"] = error_vs_bits(
        tensors, bits, granularities="per_channel", calibrations=calibrations[1:])
    out["affine"] = error_vs_bits(w, bits, calibrations="mse", symmetric=False)

    x = rng.normal(size=(48, 6)).astype(np.float32)
    y = rng.integers(0, 3, 48).astype(np.int32)
    model = MLP(MLPConfig(num_classes=3, hidden=(8,)))
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    common = dict(batch_size=32)
    for cal in MODEL_CALIBRATIONS if full else ("mse",):
        rules = (QuantRule(".*", calibration=cal),)
        out[f"model/{cal}"] = model_vs_bits(model, variables, x, y, bits, rules=rules, **common)
    rules = (QuantRule(".*", calibration="mse"),)
    mixed = dict(candidate_bits=(2, 4, 8), budget_fraction=0.5, rules=rules, **common)
    # 3 widths ** 2 layers = 9 configurations, one (configs, layers) array of widths
    out["mixed/pareto"] = mixed_precision(model, variables, x, y, method="pareto", **mixed)
    if full:
        sens = sensitivity(model, variables, x, y, [2, 4, 8], rules=rules, **common)
        out["sensitivity"] = sens
        out["mixed/greedy"] = mixed_precision(
            model, variables, x, y, target="weights+acts", full_path=True,
            sensitivity_table=sens, **mixed)
    print(json.dumps({k: t.to_dicts() for k, t in out.items()}))
    """
)


def _start_every_sweep(mode: str, devices: int, *distributed: int) -> subprocess.Popen:
    """Starts :data:`_EVERY_SWEEP` in a fresh process with ``devices`` forced CPU devices
    (``distributed``: port and process id)."""
    args = [sys.executable, "-c", _EVERY_SWEEP, mode, str(devices), *map(str, distributed)]
    # -O0: the programs are tiny, compiling dominates (as in tests/conftest.py)
    env = _host_devices_env(1 if distributed else devices, "--xla_backend_optimization_level=0")
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise AssertionError(f"timed out after {timeout} s: {stderr[-3000:]}") from None
    return _last_json(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


_RUNS: dict[tuple[str, int], dict] = {}  # (mode, devices) -> tables, run once per test process


def _every_sweep(mode: str, devices: tuple[int, ...]) -> dict[int, dict]:
    """Tables of :data:`_EVERY_SWEEP` for each device count, new runs side by side."""
    procs = {n: _start_every_sweep(mode, n) for n in devices if (mode, n) not in _RUNS}
    try:
        for n, proc in procs.items():
            _RUNS[mode, n] = _finish(proc)
    finally:
        for proc in procs.values():
            proc.kill()  # no-op on a finished process; stops the others if one failed
    return {n: _RUNS[mode, n] for n in devices}


def _assert_same_sweeps(got: dict, want: dict, where: str) -> None:
    """Same tables, rows and columns: strings, ints and bools equal, floats to 1e-6.

    The numbers are in fact bit for bit equal on this machine: each width's work is the same
    program on every device, and nothing reduces across widths. The 1e-6 allows for a CPU
    whose vectorised code rounds a batch of 3 widths differently from a batch of 7.
    """
    assert got.keys() == want.keys(), where
    for name, rows in want.items():
        assert len(got[name]) == len(rows), (where, name)
        for i, (g, w) in enumerate(zip(got[name], rows, strict=True)):
            assert g.keys() == w.keys(), (where, name, i)
            for k, v in w.items():
                msg = f"{where}: table {name}, row {i} {w}, column {k}"
                if isinstance(v, float):
                    np.testing.assert_allclose(g[k], v, rtol=1e-6, atol=1e-9, err_msg=msg)
                else:
                    assert g[k] == v, msg


def _assert_sqnr_rises(tables: dict) -> None:
    """Each tensor curve's SQNR rises with the width (ACIQ's stopped rising when sharded).

    Not KL's: it matches distributions, not errors, and on 96 samples its 8-bit threshold
    clips the 6-sigma outlier of ``w`` (22 dB below 7 bits, on one device as on four).
    """
    for name in ("per_tensor", "per_channel", "affine"):
        rows = [r for r in tables[name] if r["calibration"] != "kl"]
        for key in {(r["tensor"], r["calibration"]) for r in rows}:
            curve = [r["sqnr_db"] for r in rows if (r["tensor"], r["calibration"]) == key]
            assert len(curve) == 7 and np.all(np.diff(curve) > 0), (name, key, curve)


@pytest.mark.slow  # two 3-device subprocesses (about 2.5 min on a loaded machine)
def test_every_sweep_on_three_devices_matches_one_device():
    # 7 widths on 3 devices: 3, 3 and 1 plus 2 padding copies; 9 mixed-precision configs
    runs = _every_sweep("quick", (1, 3))
    _assert_same_sweeps(runs[3], runs[1], "3 devices")
    _assert_sqnr_rises(runs[3])
    # ACIQ (Gaussian) per tensor in float64 NumPy: range mu +- t* sigma, symmetric int grid
    from jquant.calibration import aciq_clip  # t* checked against SciPy in test_calibration

    w = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)  # as in the script
    w[0, 0] = 6.0
    x = w.astype(np.float64)
    rows = [r for r in runs[3]["per_tensor"] if (r["tensor"], r["calibration"]) == ("w", "aciq")]
    for r in rows:
        t, qmax = float(aciq_clip(r["bits"])), 2.0 ** (r["bits"] - 1) - 1
        scale = max(abs(x.mean() - t * x.std()), x.mean() + t * x.std()) / qmax
        y = np.clip(np.round(x / scale), -qmax - 1, qmax) * scale
        want = 10 * np.log10(np.sum(x**2) / np.sum((x - y) ** 2))
        np.testing.assert_allclose(r["sqnr_db"], want, atol=1e-3, err_msg=str(r))


@pytest.mark.slow
def test_every_sweep_and_calibration_on_one_to_four_devices():
    runs = _every_sweep("full", (1, 2, 3, 4))
    for n in (2, 3, 4):
        _assert_same_sweeps(runs[n], runs[1], f"{n} devices")
    _assert_sqnr_rises(runs[4])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process():
    port = _free_port()
    procs = [_start_every_sweep("quick", 2, port, i) for i in range(2)]
    try:
        one = _every_sweep("quick", (1,))[1]
        both = [_finish(p, timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, got in enumerate(both):  # every process holds the whole gathered result
        _assert_same_sweeps(got, one, f"process {i} of 2")


@pytest.mark.slow
def test_cli_sweep_mse_and_aciq_on_two_devices_matches_one_device(tmp_path):
    # `jquant sweep --calibration mse` crashed after training on several devices (the MSE
    # search's scan carry), and ACIQ was wrong there; both now equal the one-device run
    def sweep(devices: int) -> dict:
        out = tmp_path / f"out{devices}"
        argv = ["sweep", "--model", "mlp", "--data", "digits", "--steps", "20", "--bits", "3,8"]
        argv += ["--granularity", "per_tensor", "--calibration", "mse,aciq,minmax"]
        argv += ["--eval-examples", "64", "--calib-examples", "32", "--no-progress"]
        argv += ["--cache", str(tmp_path / "cache"), "--out", str(out)]
        run = subprocess.run(
            [sys.executable, "-m", "jquant", *argv],
            env=_host_devices_env(devices, "--xla_backend_optimization_level=0"),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        names = ("tensors", "model", "sensitivity", "mixed_precision")
        return {n: json.loads((out / f"{n}.json").read_text())["rows"] for n in names}

    two = sweep(2)  # trains and caches the model
    one = sweep(1)
    _assert_same_sweeps(two, one, "jquant sweep on 2 devices")
    keys = ("kind", "tensor", "calibration", "bits")
    sqnr = {tuple(r[k] for k in keys): r["sqnr_db"] for r in two["tensors"]}
    assert {k[2] for k in sqnr} == {"mse", "aciq", "minmax"}
    for (kind, name, calibration, bits), value in sqnr.items():
        if bits == 8:  # 5 more bits: about 30 dB, for every calibration
            assert value > sqnr[kind, name, calibration, 3] + 20, (kind, name, calibration)


# --- plots --------------------------------------------------------------------------------------


def _is_png(path, min_width=100):
    import matplotlib.image

    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[1] >= min_width
    return img


def test_plots_write_pngs(tmp_path):
    t = error_vs_bits(_X_UNIFORM[:1000], bits=[2, 4, 8])
    _is_png(plots.sqnr_vs_bits(t, str(tmp_path / "sqnr.png")))
    acc = Table.from_dicts([{"bits": b, "accuracy": 0.1 * b} for b in (2, 4, 8)])
    _is_png(plots.metric_vs_bits(acc, str(tmp_path / "acc.png"), "accuracy"))
    sens = Table.from_dicts(
        [{"layer": n, "accuracy_drop": d, "sqnr_db": s} for n, d, s in [("a", 0.1, 9.0)]]
    )
    _is_png(plots.sensitivity_bars(sens, str(tmp_path / "sens.png")))
    mp = Table.from_dicts([{"size_bytes": s, "accuracy": a} for s, a in [(1, 0.5), (2, 0.7)]])
    plain = _is_png(plots.pareto_front(mp, str(tmp_path / "pareto.png")))
    picked = Table.from_dicts(
        [
            {"size_bytes": s, "accuracy": a, "chosen": c}
            for s, a, c in [(1, 0.5, True), (2, 0.7, False)]
        ]
    ).with_meta(budget_bytes=1.5)
    marked = _is_png(plots.pareto_front(picked, str(tmp_path / "chosen.png")))

    def gold(img):  # the chosen star is filled with matplotlib's "gold" (1, 0.843, 0)
        return np.sum(np.all(np.abs(img[..., :3] - [1.0, 0.843, 0.0]) < 0.02, axis=-1))

    assert gold(plain) == 0 and gold(marked) > 20
    with pytest.raises(ValueError, match="lacks columns"):
        plots.metric_vs_bits(acc, str(tmp_path / "x.png"), "loss")


def test_pareto_mask_matches_brute_force():
    rng = np.random.default_rng(4)
    size, score = rng.integers(0, 6, 40).astype(float), rng.integers(0, 6, 40).astype(float)
    mask = plots.pareto_mask(size, score)
    for i in range(40):
        dominated = any(
            size[j] <= size[i]
            and score[j] >= score[i]
            and (size[j] < size[i] or score[j] > score[i])
            for j in range(40)
        )
        assert mask[i] == (not dominated)


# --- model sweeps: PTQ through jquant.nn against float models with NumPy-quantized kernels -----


def _tiny_mlp():
    from jquant.models.config import MLPConfig
    from jquant.models.linen import MLP

    rng = np.random.default_rng(5)
    x = rng.normal(size=(48, 6)).astype(np.float32)
    y = rng.integers(0, 3, 48).astype(np.int32)
    model = MLP(MLPConfig(num_classes=3, hidden=(8,)))
    variables = model.init(jax.random.key(0), jnp.asarray(x[:1]))
    return model, variables, x, y


def _logit_sqnr(model, variables, x, quantize_layers, bits):
    params = {
        k: {**v, "kernel": _numpy_fake_quant(np.asarray(v["kernel"]), bits, -1, True)}
        if k in quantize_layers
        else v
        for k, v in variables["params"].items()
    }
    ref = np.asarray(model.apply(variables, x), np.float64)
    got = np.asarray(model.apply({"params": params}, x), np.float64)
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - got) ** 2)), got


def test_model_vs_bits_and_sensitivity_match_numpy_quantized_kernels():
    from jquant.sweep.model_sweep import model_vs_bits
    from jquant.sweep.sensitivity import sensitivity

    model, variables, x, y = _tiny_mlp()
    t = model_vs_bits(model, variables, x, y, bits=[3], targets="weights")
    assert t.column("target") == ["float", "weights"] and t.column("bits") == [32, 3]
    want_sqnr, logits = _logit_sqnr(model, variables, x, {"dense1", "head"}, 3)
    row = t.to_dicts()[1]
    assert t.meta["peak_bytes"] > 0
    np.testing.assert_allclose(row["sqnr_db"], want_sqnr, atol=0.02)
    assert row["accuracy"] == pytest.approx(np.mean(np.argmax(logits, -1) == y), abs=1e-6)

    s = sensitivity(model, variables, x, y, bits=3, target="weights")
    assert s.column("layer") == ["dense1", "head"] and s.column("params") == [48, 24]
    for r in s.to_dicts():
        want, _ = _logit_sqnr(model, variables, x, {r["layer"]}, 3)
        np.testing.assert_allclose(r["sqnr_db"], want, atol=0.02)
        kernel = np.asarray(variables["params"][r["layer"]]["kernel"])
        err = kernel - _numpy_fake_quant(kernel, 3, -1, True)
        want_w = 10 * np.log10(np.sum(kernel.astype(float) ** 2) / np.sum(err**2))
        np.testing.assert_allclose(r["weight_sqnr_db"], want_w, atol=1e-3)
        assert r["accuracy_drop"] == pytest.approx(s.meta["float_accuracy"] - r["accuracy"])


class _CountingNet(nn.Module):
    """Conv -> relu -> Dense; counts how often it is traced (test-only bookkeeping)."""

    traces = [0]

    @nn.compact
    def __call__(self, x):
        self.traces[0] += 1
        x = nn.relu(nn.Conv(4, (3,), name="conv")(x))
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


def test_model_sweep_is_one_program_equal_to_static_widths(caplog):
    from jquant.nn.rules import QuantRule
    from jquant.sweep.model_sweep import PTQ, logits_vs_bits, score, uniform_rules

    rng = np.random.default_rng(7)
    x = rng.normal(size=(40, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 40).astype(np.int32)
    model = _CountingNet()
    variables = model.init(jax.random.key(1), jnp.asarray(x[:1]))
    rules = (QuantRule(".*", calibration="percentile"),)
    ptq = PTQ.calibrated(model, variables, x, rules, batch_size=16)  # 3 batches, last padded
    ref = ptq.logits(None, x)
    static = {}
    for b in (2, 8):  # the oracle: one static-width program per width
        before = _CountingNet.traces[0]
        static[b] = ptq.logits(uniform_rules(rules, "weights+acts", "per_channel", b), x)
        one_width = _CountingNet.traces[0] - before
    rules_at = functools.partial(uniform_rules, rules, "weights+acts", "per_channel")
    before = _CountingNet.traces[0]
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        swept, peak = logits_vs_bits(ptq, rules_at, np.arange(2, 9), x)
    compiles = [r for r in caplog.messages if "compilation of jit(_sweep_body)" in r]
    # seven widths are traced like a single width, and compiled once (host transfers aside)
    assert _CountingNet.traces[0] - before == one_width and len(compiles) == 1
    assert swept.shape == (7, 40, 3) and peak > 0
    for b, want in static.items():
        np.testing.assert_allclose(swept[b - 2], want, rtol=1e-5, atol=1e-5)
        assert score(swept[b - 2], y, ref) == pytest.approx(score(want, y, ref), rel=1e-4)
        assert score(swept[b - 2], y, ref)["accuracy"] == score(want, y, ref)["accuracy"]


# --------------------------------------------------------- metrics other than accuracy; the GPT


def _tiny_gpt():
    from jquant.models import config as config_lib
    from jquant.models import gpt

    cfg = config_lib.GPTConfig(vocab_size=13, context=16, num_layers=2, num_heads=2, width=32)
    model = gpt.GPT(cfg)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))
    x = np.asarray(jax.random.randint(jax.random.key(1), (8, 16), 0, 13))
    y = np.asarray(jax.random.randint(jax.random.key(2), (8, 16), 0, 13))
    return model, variables, x, y


def _numpy_perplexity(logits, y):
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(np.exp(-np.take_along_axis(logp, np.asarray(y)[..., None], -1).mean()))


def test_model_vs_bits_is_the_function_and_metrics_are_checked():
    import jquant.sweep
    from jquant.sweep import model_sweep

    assert jquant.sweep.model_vs_bits is model_sweep.model_vs_bits and callable(
        jquant.sweep.model_vs_bits
    )
    ppl = model_sweep.PERPLEXITY
    logits = np.random.default_rng(0).normal(size=(3, 4, 5)).astype(np.float32)
    y = np.arange(12).reshape(3, 4) % 5
    row = ppl(logits, y, logits)
    assert row["perplexity"] == pytest.approx(_numpy_perplexity(logits, y), rel=1e-5)
    assert ppl.drop_column == "perplexity_increase" and ppl.drop({"perplexity": 2.0}, row) > 0
    assert model_sweep.SQNR(logits, y, logits)["sqnr_db"] == np.inf
    assert model_sweep.ACCURACY.drop_column == "accuracy_drop"
    with pytest.raises(TypeError, match="metric must be"):
        model_sweep.model_vs_bits(None, {}, logits, y, metric=lambda *a: {})
    with pytest.raises(ValueError, match="without its key"):
        model_sweep.Metric(lambda *a: {"x": 1.0}, "perplexity")(logits, y, logits)


@pytest.mark.slow  # compiles the GPT's sweep program (215 s measured at load average ~30)
def test_model_vs_bits_reports_the_perplexity_of_a_gpt():
    from jquant.nn.rules import QuantRule
    from jquant.sweep import model_vs_bits
    from jquant.sweep.model_sweep import PERPLEXITY

    model, variables, x, y = _tiny_gpt()
    rules = (QuantRule(r"block\d+/(attn/(query|key|value|out)|mlp/(up|down))"),)
    table = model_vs_bits(
        model, variables, x, y, bits=[2, 8], rules=rules, metric=PERPLEXITY, batch_size=8
    )
    rows = {r["bits"]: r for r in table.to_dicts()}
    want = _numpy_perplexity(model.apply(variables, x), y)
    assert rows[32]["perplexity"] == pytest.approx(want, rel=1e-5)
    assert abs(rows[8]["perplexity"] - want) < 0.01 * want < abs(rows[2]["perplexity"] - want)


@pytest.mark.slow  # four PTQ runs with GPTQ on a tiny GPT (376 s measured at load ~30)
def test_ptq_vs_bits_perplexity_of_rtn_and_gptq():
    from jquant.sweep import ptq_vs_bits

    model, variables, x, y = _tiny_gpt()
    table = ptq_vs_bits(
        model, variables, x, y, bits=[2, 8], calib_x=x, methods=("rtn", "gptq_g8"), batch_size=8
    )
    rows = table.to_dicts()
    want = _numpy_perplexity(model.apply(variables, x), y)
    assert rows[0]["method"] == "float" and rows[0]["perplexity"] == pytest.approx(want, rel=1e-5)
    assert len(rows) == 1 + 2 * 2 * 2
    for r in rows[1:]:
        assert r["act_bits"] == (8 if r["target"] == "weights+acts" else 32)
        gap = abs(r["perplexity"] - want) / want
        assert gap < 0.01 if r["bits"] == 8 else gap > 0.001
    with pytest.raises(ValueError, match="methods"):
        ptq_vs_bits(model, variables, x, y, calib_x=x, methods=("nearest",))


@pytest.mark.slow  # zoo GPT, 2 training steps, RTN and GPTQ at 4 bits (563 s at load ~30)
def test_cli_sweep_gpt_prints_perplexity_and_writes_the_plot(tmp_path, capsys):
    from jquant import cli

    out = tmp_path / "out"
    argv = ["sweep", "--model", "gpt", "--data", "text", "--steps", "2", "--bits", "4",
            "--methods", "rtn,gptq", "--eval-examples", "4", "--calib-examples", "4",
            "--cache", str(tmp_path / "cache"), "--out", str(out), "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    assert {"ptq.csv", "ptq.json", "perplexity_vs_bits.png"} <= set(os.listdir(out))
    rows = json.loads((out / "ptq.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["float", "rtn", "rtn", "gptq", "gptq"]
    assert cli.main(["sweep", "--model", "gpt", "--data", "digits"]) == 2


# --- block-wise granularity and block formats ---------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False])
def test_per_block_rows_match_numpy_block_quantizer(symmetric):
    """per_block:8 on a (24, 6) kernel: one range per output column and block of 8 rows (the
    Flax kernel's input axis, -2), NumPy quantizer per block; bits traced in one program."""
    x = np.random.default_rng(3).standard_t(3, (24, 6)).astype(np.float32)
    bits = [2, 4, 8]
    t = error_vs_bits(x, bits=bits, granularities="per_block:8", symmetric=symmetric)
    blocks = x.reshape(3, 8, 6)
    for b, row in zip(bits, t.to_dicts(), strict=True):
        y = np.stack([_numpy_fake_quant(blk, b, -1, symmetric) for blk in blocks]).reshape(24, 6)
        assert row["granularity"] == "per_block:8" and row["bits"] == b
        np.testing.assert_allclose(row["mse"], np.mean((x - y) ** 2), rtol=1e-4)
    per_channel = error_vs_bits(x, bits=bits, granularities="per_channel", symmetric=symmetric)
    assert all(  # finer scales: never worse
        a >= c - 1e-3
        for a, c in zip(t.column("sqnr_db"), per_channel.column("sqnr_db"), strict=True)
    )


def test_block_format_families_match_jquant_mx_on_the_host():
    from jquant import mx

    x = np.random.default_rng(4).standard_t(3, (64, 8)).astype(np.float32)
    families = ["mxfp4", "mxint8", "nvfp4", "nf4"]
    t = error_vs_bits({"w": x}, bits=[4], families=families, granularities="per_channel")
    assert [r["family"] for r in t.to_dicts()] == families  # one curve each, own blocks
    for row in t.to_dicts():
        name = row["family"]
        y = mx.dequantize(mx.quantize(x, name, axis=0), name, axis=0)  # blocks along axis -2
        fmt = mx.FORMATS[name]
        assert row["granularity"] == f"per_block:{fmt.block_size}"
        assert row["bits"] == {"mxfp4": 4, "mxint8": 8, "nvfp4": 4, "nf4": 4}[name]
        np.testing.assert_allclose(row["mse"], np.mean((x - y) ** 2), rtol=1e-4)
    with pytest.raises(ValueError, match="must be a positive integer"):
        error_vs_bits(x, granularities="per_block:-1")
