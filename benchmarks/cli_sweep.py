"""Wall time of ``jquant sweep`` (default configuration) from a fresh cache, once.

Runs ``python -m jquant sweep --out DIR`` under ``/usr/bin/time`` with ``$JQUANT_CACHE``
pointing at a new empty folder, so the time includes generating MNIST-1D, training the CNN,
the tensor and model sweeps, the sensitivity and the mixed-precision sweeps. One run: there is
no interval, so the JSON gives the time and the target but no verdict. Writes
``benchmarks/results/cli_sweep.json``.

    python benchmarks/cli_sweep.py
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

from jquant import bench

TARGET_S = 180.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "cli_sweep.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        command = [sys.executable, "-m", "jquant", "sweep", "--out", str(tmp / "out")]
        env = {**os.environ, "JQUANT_CACHE": str(tmp / "cache")}
        timing = tmp / "time.txt"
        subprocess.run(
            ["/usr/bin/time", "-f", "%e %M", "-o", str(timing), *command], env=env, check=True
        )
        wall_s, max_rss_kb = timing.read_text().split()[-2:]
    result = dict(
        command="JQUANT_CACHE=<fresh dir> python -m jquant sweep",
        wall_s=float(wall_s),
        max_rss_mib=int(max_rss_kb) / 1024,
        target_s=TARGET_S,
        runs=1,
        verdict=None,
        note="one run, no interval: no verdict under the CI rule",
    )
    print(f"jquant sweep: {result['wall_s']:.0f} s wall, {result['max_rss_mib']:.0f} MiB peak RSS")
    meta = bench.results_meta(quick=False, load_before=load_before)
    print(f"wrote {bench.write_results(args.out, dict(meta=meta, result=result))}")


if __name__ == "__main__":
    main()
