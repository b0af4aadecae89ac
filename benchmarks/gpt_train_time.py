"""Float training time of the zoo GPT against the issue's 5-minute target.

``jquant.models.train.train_or_load("gpt", jquant.data.load("text"), 0,
**jquant.models.gpt.TRAIN_RECIPE)`` (the trainer with the GPT's default recipe) into an empty
temporary weights cache (``JQUANT_CACHE`` set to a fresh directory), so the model is really
trained. Records the wall time of the whole call (data loading excluded; trace, compile, the
steps, the test evaluation and the cache write included), the trainer's own ``train_seconds``
(``fit`` alone, compilation included), the test loss, and the 1-minute load average sampled
every 10 s while it runs (the machine is shared: a high load makes it slower). Target: wall
time <= 300 s. JSON goes to ``benchmarks/results/gpt_train_time.json``.

    nice -n 5 python benchmarks/gpt_train_time.py
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import statistics
import tempfile
import threading
import time

from jquant import bench, data
from jquant.models import gpt, train

TARGET_SECONDS = 300.0
SAMPLE_SECONDS = 10.0


def _sample_load(stop: threading.Event, out: list[float]) -> None:
    """Appends the 1-minute load average every SAMPLE_SECONDS until ``stop`` is set."""
    while not stop.wait(SAMPLE_SECONDS):
        out.append(os.getloadavg()[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "gpt_train_time.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    ds = data.load("text")
    samples: list[float] = []
    stop = threading.Event()
    sampler = threading.Thread(target=_sample_load, args=(stop, samples), daemon=True)
    with tempfile.TemporaryDirectory() as cache:
        os.environ[train.CACHE_ENV] = cache  # an empty cache: the model is trained
        sampler.start()
        start = time.perf_counter()
        trained = train.train_or_load("gpt", ds, 0, **gpt.TRAIN_RECIPE)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        cached = sorted(p.name for p in pathlib.Path(cache, "models").iterdir())
    metrics = {k: float(v) for k, v in trained.metrics.items()}
    result = dict(
        wall_seconds=wall,
        train_seconds=metrics["train_seconds"],
        target_seconds=TARGET_SECONDS,
        meets_target=wall <= TARGET_SECONDS,
        recipe=dict(gpt.TRAIN_RECIPE),
        config=dataclasses.asdict(trained.model.config),
        test_loss=metrics["test_loss"],
        load_average_1min_during=dict(
            samples=samples,
            median=statistics.median(samples) if samples else None,
            every_seconds=SAMPLE_SECONDS,
        ),
        nice=os.nice(0),
        cache_files_written=cached,
    )
    print(
        f"gpt float training ({gpt.TRAIN_RECIPE}): wall {wall:.1f} s "
        f"(fit {result['train_seconds']:.1f} s), "
        f"target <= {TARGET_SECONDS:.0f} s: {'met' if result['meets_target'] else 'missed'}; "
        f"load 1-min median {result['load_average_1min_during']['median']}, nice {result['nice']}"
    )
    out = bench.write_results(
        args.out, dict(meta=bench.results_meta(quick=False, load_before=load_before), **result)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
