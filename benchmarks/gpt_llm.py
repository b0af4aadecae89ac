"""LLM benchmarks on the zoo GPT: whole-model GPTQ time, and generation tokens/s with a float
against an int8 KV cache (per token and per channel).

The GPT is :func:`jquant.bench.model.gpt_model`'s (the zoo GPT, 4 layers, width 128, context
128, from the weights cache when trained there, else freshly initialised: neither time
depends on the weights; the JSON says which). Calibration: 32 training windows of
``jquant.data.load("text")`` (seed 0) in batches of 8, the LLM papers' protocol.

1. GPTQ: wall time of ``jquant.ptq.quantize_model(model, variables, calib,
   Recipe(method="gptq", weight="int4"))`` (int4 per output channel, all 24 block kernels,
   Hessians captured from the calibration batches) until its kernels are ready. The first
   run (trace + compile) is reported apart; then the median (and min, max) of ``--runs``
   further runs.
2. Generation: ``jquant.models.gpt.generate`` of ``NEW`` tokens after a ``PROMPT``-token
   prompt, batch ``BATCH``, greedy, jitted once per variant; ``float``, ``int8_per_token``
   (``kv_fake_quant(int8)``: one scale per head and token) and ``int8_per_channel`` (scales per
   layer, head and channel from ``kv_ranges`` on the calibration batches), timed in one
   interleaved run (``jquant.bench.timing.measure``: shuffled rounds, median paired ratio to
   ``float`` with a bootstrap 95% CI). ``tokens_per_s = BATCH * NEW / median``; the prefill is
   inside the timed call. The int8 KV cache is simulated (fake-quantized keys and values in
   float32), so it measures the quantizer's overhead, not an int8 memory saving.

JSON goes to ``benchmarks/results/gpt_llm.json``.

    python benchmarks/gpt_llm.py            # 3 GPTQ runs, 7 generation rounds
    python benchmarks/gpt_llm.py --quick    # 2 GPTQ runs, 3 rounds
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jquant import bench, data, ptq
from jquant.bench.model import gpt_model
from jquant.formats import int8
from jquant.models import gpt

CALIB_WINDOWS, CALIB_BATCH = 32, 8
BATCH, PROMPT, NEW = 8, 16, 112


def _calibration(x_train: np.ndarray) -> list[np.ndarray]:
    idx = np.sort(np.random.default_rng(0).choice(len(x_train), CALIB_WINDOWS, replace=False))
    x = np.asarray(x_train)[idx]
    return [x[s : s + CALIB_BATCH] for s in range(0, CALIB_WINDOWS, CALIB_BATCH)]


def time_gptq(model, variables, calib, runs: int) -> dict:
    """Wall seconds of whole-model GPTQ: the first run, then ``runs`` more."""
    recipe = ptq.Recipe(method="gptq", weight="int4")

    def once() -> float:
        start = time.perf_counter()
        out = ptq.quantize_model(model, variables, calib, recipe)
        jax.block_until_ready(out.variables)
        return time.perf_counter() - start

    first = once()
    times = [once() for _ in range(runs)]
    return dict(
        recipe=dict(method=recipe.method, weight="int4", group_size=recipe.group_size),
        first_run_seconds=first,
        runs=runs,
        times_seconds=times,
        median_seconds=statistics.median(times),
        min_seconds=min(times),
        max_seconds=max(times),
    )


def generation_variants(model, variables, calib) -> dict:
    """name -> zero-argument jitted generation (float, int8 KV per token / per channel)."""
    ranges = ptq.kv_ranges(model, [jnp.asarray(b) for b in calib], variables=variables)
    kvs = {
        "float": None,
        "int8_per_token": ptq.kv_fake_quant(int8),
        "int8_per_channel": ptq.kv_fake_quant(int8, granularity="per_channel", ranges=ranges),
    }
    prompt = jax.random.randint(jax.random.key(1), (BATCH, PROMPT), 0, model.config.vocab_size)

    def variant(kv):
        run = jax.jit(lambda v, p: gpt.generate(model, p, NEW, variables=v, kv_transform=kv).tokens)
        return lambda: run(variables, prompt)

    return {name: variant(kv) for name, kv in kvs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 GPTQ runs, 3 rounds")
    parser.add_argument("--runs", type=int, default=None, help="GPTQ runs after the first")
    parser.add_argument("--rounds", type=int, default=None, help="generation rounds")
    parser.add_argument(
        "--out", default=str(pathlib.Path(__file__).parent / "results" / "gpt_llm.json")
    )
    args = parser.parse_args()
    load_before = bench.loadavg()
    runs = args.runs or (2 if args.quick else 3)
    rounds = args.rounds or (3 if args.quick else 7)
    model, variables, source = gpt_model()
    calib = _calibration(data.load("text").x_train)

    gptq = time_gptq(model, variables, calib, runs)
    print(
        f"whole-model GPTQ (int4 per channel): median {gptq['median_seconds']:.2f} s over "
        f"{runs} runs, first run {gptq['first_run_seconds']:.2f} s"
    )

    timings = bench.measure(
        generation_variants(model, variables, calib), baseline="float", rounds=rounds, warmup=1
    )
    timing = timings.to_json()
    for row in timing["variants"].values():
        row["tokens_per_s"] = BATCH * NEW / (row["median_ms"] / 1e3)
    print(timings.format(f"generate {NEW} tokens after {PROMPT}, batch {BATCH}"))
    for name, row in timing["variants"].items():
        print(f"  {name}: {row['tokens_per_s']:.0f} tokens/s")
    out = bench.write_results(
        args.out,
        dict(
            meta=bench.results_meta(quick=args.quick, load_before=load_before),
            model=dict(source=source, config=dataclasses.asdict(model.config)),
            calibration=dict(windows=CALIB_WINDOWS, batch=CALIB_BATCH, seed=0),
            gptq=gptq,
            generation=dict(batch=BATCH, prompt=PROMPT, new_tokens=NEW, timing=timing),
        ),
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
