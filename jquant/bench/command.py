"""``jquant bench matmul|conv|model [--quick] [--out DIR] [--peak TFLOPS] [--rounds N]``.

Runs one grid on ``jax.devices()[0]``, prints its table and writes into ``--out``:
``bench_<grid>_<device>.json`` (rows, peak, config and :func:`jquant.bench.timing.results_meta`),
``bench_<grid>_<device>.csv`` and, for ``matmul`` and ``conv``, ``..._speedup.png`` and
``..._roofline.png`` (:mod:`jquant.bench.report`). ``<device>`` is ``cpu`` or the device kind
in lower case (``nvidia_h100_80gb_hbm3``). ``conv`` also records ``int_overhead``
(:func:`jquant.bench.overhead.int_overhead`, at least 21 rounds). Every bad option exits with
status 2 before any work (argparse's convention).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tempfile
from collections.abc import Sequence

__all__ = ["GRIDS", "build_parser", "device_tag", "main", "output_paths"]

GRIDS = ("matmul", "conv", "model")


def _rounds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected an integer >= 2, got {text!r}")
    return value


def _peak(text: str) -> str:
    from jquant.bench.peaks import given_peak

    try:
        given_peak(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _out(text: str) -> pathlib.Path:
    """The folder, checked: it (or its nearest existing ancestor) must be a writable folder."""
    path = pathlib.Path(text).expanduser().absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {probe} is not a folder")
    try:  # a real write, not os.access: read-only mounts and /proc pass that
        tempfile.TemporaryDirectory(dir=probe).cleanup()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: {probe} is not writable ({e})") from None
    return path


def build_parser(grid: str) -> argparse.ArgumentParser:
    """The options of ``jquant bench <grid>``."""
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    p = argparse.ArgumentParser(
        prog=f"jquant bench {grid}",
        description=f"the {grid} benchmark grid on jax.devices()[0] (jquant.bench)",
    )
    p.add_argument(
        "--quick", action="store_true", help="a small grid that runs in minutes on a CPU"
    )
    p.add_argument(
        "--out", type=_out, default="jquant-bench", help="output folder (default: ./jquant-bench)"
    )
    p.add_argument(
        "--peak",
        type=_peak,
        default=None,
        help="peak TFLOP/s for every format ('400') or per format ('bfloat16=400,int8=800'); "
        "default: the published peak of the device, measured on CPU",
    )
    p.add_argument(
        "--rounds", type=_rounds, default=None, help="timed rounds (default 5 quick, 15)"
    )
    return p


def device_tag(device) -> str:
    """``cpu``, or the device kind in lower case with non-alphanumerics as ``_``."""
    if device.platform == "cpu":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device.device_kind.lower()).strip("_")


def output_paths(out: pathlib.Path, grid: str, tag: str) -> dict[str, pathlib.Path]:
    """The files ``jquant bench <grid>`` writes into ``out``."""
    stem = f"bench_{grid}_{tag}"
    paths = dict(json=out / f"{stem}.json", csv=out / f"{stem}.csv")
    if grid != "model":
        paths |= dict(speedup=out / f"{stem}_speedup.png", roofline=out / f"{stem}_roofline.png")
    return paths


def main(grid: str, argv: Sequence[str]) -> int:
    """Parses ``argv`` (status 2 on a bad option), runs ``grid`` and writes its files."""
    args = build_parser(grid).parse_args(list(argv))
    import jax

    from jquant.bench import grid as G
    from jquant.bench import report, timing
    from jquant.bench.peaks import best_of, peak_for_device

    load_before = timing.loadavg()
    device = jax.devices()[0]
    rounds = args.rounds or (5 if args.quick else 15)
    paths = output_paths(args.out, grid, device_tag(device))
    title = f"jquant bench {grid}{' --quick' if args.quick else ''} on {device.device_kind}"
    if grid == "model":
        from jquant.bench import model

        payload = model.run(quick=args.quick, rounds=rounds)
        print(model.format_summary(payload))
        rows = payload["rows"]
    else:
        from jquant.bench import conv, matmul

        peak_size = 1024 if args.quick else 2048
        peak = peak_for_device(device, args.peak, measure_size=peak_size)
        print(f"[jquant] peak: {peak.kind}, {dict(peak.rates)} ({peak.source})", flush=True)
        cases = (matmul if grid == "matmul" else conv).cases(args.quick)
        rows = []
        for i, case in enumerate(cases, 1):
            print(f"[jquant] {i}/{len(cases)} {case.name}", file=sys.stderr, flush=True)
            rows += G.run_case(case, peak=peak, platform=device.platform, rounds=rounds)
        if peak.kind == "measured":  # measured again after the grid: the better of the two
            peak = best_of(peak, peak_for_device(device, None, measure_size=peak_size))
            rows = G.with_peak(rows, peak)
            print(f"[jquant] peak measured again: {dict(peak.rates)}", flush=True)
        print(report.format_table(rows, title))
        payload = dict(
            peak=peak.to_json(),
            baseline=G.baseline_for(device.platform),
            operands=[o.to_json() for o in G.OPERANDS],
            jquant=(
                "jquant.ops in the baseline float type, int8 symmetric: activations per tensor, "
                "weights per output channel, QParams computed ahead of time (static)"
            ),
            rows=rows,
        )
        if grid == "conv":
            from jquant.bench import overhead

            payload["int_overhead"] = overhead.int_overhead(rounds=max(rounds, 21))
            print(overhead.format_overhead(payload["int_overhead"]))
    meta = timing.results_meta(
        quick=args.quick, load_before=load_before, command=["-m", "jquant", "bench", grid, *argv]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    timing.write_results(paths["json"], dict(meta=meta, grid=grid, rounds=rounds, **payload))
    if grid == "model":
        report.write_csv(rows, paths["csv"], model.CSV_COLUMNS)
    else:
        report.write_csv(rows, paths["csv"])
    if grid != "model":
        report.speedup_plot(rows, paths["speedup"], title)
        report.roofline_plot(rows, peak, paths["roofline"], title)
    print(f"[jquant] wrote {', '.join(p.name for p in paths.values())} to {args.out}")
    return 0
