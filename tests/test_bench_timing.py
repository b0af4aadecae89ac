"""jquant.bench.timing on fake clocks: interleaving, paired ratios, bootstrap CI, verdicts, meta."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jquant.bench import timing


class FakeClock:
    """A clock that only moves when a fake variant 'runs' for a set duration."""

    def __init__(self):
        self.now = 0.0
        self.log: list[str] = []

    def __call__(self) -> float:
        return self.now

    def variant(self, name: str, durations):
        it = iter(durations)

        def run():
            self.log.append(name)
            self.now += next(it)

        return run


def _lognormal_times(rng, mean_s: float, n: int, load=None) -> np.ndarray:
    noise = rng.lognormal(0.0, 0.1, n)
    return mean_s * noise * (1.0 if load is None else load)


def test_measure_records_each_variants_own_durations_in_shuffled_rounds():
    clock = FakeClock()
    a, b = [1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]
    t = timing.measure(
        {"a": clock.variant("a", a), "b": clock.variant("b", b)},
        baseline="a",
        rounds=3,
        warmup=1,
        clock=clock,
    )
    assert t.times == {"a": (2.0, 3.0, 4.0), "b": (20.0, 30.0, 40.0)}  # warm-up untimed
    assert (t.min("b"), t.median("b")) == (20.0, 30.0)
    r = t.ratio("b")
    assert r.per_round == (10.0, 10.0, 10.0) and r.median == 10.0 and r.ci == (10.0, 10.0)
    rounds = [set(clock.log[i : i + 2]) for i in range(2, 8, 2)]
    assert rounds == [{"a", "b"}] * 3  # every round runs every variant once


def test_settle_idles_before_each_timed_call_outside_the_timing(monkeypatch):
    clock = FakeClock()
    slept = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: (slept.append(s), clock.log.append("z")))
    fns = {"a": clock.variant("a", [1.0] * 3), "b": clock.variant("b", [2.0] * 3)}
    t = timing.measure(fns, baseline="a", rounds=2, warmup=1, clock=clock, settle=0.25)
    assert slept == [0.25] * 4  # before each timed call, not the warm-up
    assert clock.log[2::2] == ["z"] * 4 and t.times == {"a": (1.0, 1.0), "b": (2.0, 2.0)}


def test_round_order_is_shuffled_and_seeded():
    def order(seed):
        clock = FakeClock()
        fns = {k: clock.variant(k, [1.0] * 30) for k in "abc"}
        timing.measure(fns, baseline="a", rounds=30, warmup=0, seed=seed, clock=clock)
        return clock.log

    assert order(1) == order(1)
    firsts = {tuple(order(1)[i : i + 3]) for i in range(0, 90, 3)}
    assert len(firsts) > 1  # not always the same order: drift hits all variants alike


def test_paired_ratio_cancels_load_that_hits_both_sides_of_a_round():
    # a load spike multiplies both sides of round 3; the paired ratio does not see it
    base = np.array([1.0, 1.0, 5.0, 1.0, 1.0])
    r = timing.paired_ratio(1.5 * base, base)
    assert r.median == pytest.approx(1.5) and r.ci == pytest.approx((1.5, 1.5))


def test_bootstrap_ci_covers_the_true_ratio():
    """Coverage over independent experiments with a known ratio (1.3): close to 95%."""
    rng = np.random.default_rng(0)
    true, covered, trials = 1.3, 0, 200
    for trial in range(trials):
        load = rng.uniform(1.0, 3.0, 15)  # shared per round
        base = _lognormal_times(rng, 0.01, 15, load)
        var = _lognormal_times(rng, 0.01 * true, 15, load)
        lo, hi = timing.paired_ratio(var, base, seed=trial).ci
        assert lo <= hi
        covered += lo <= true <= hi
    assert 0.85 <= covered / trials <= 1.0


def test_bootstrap_ci_of_the_median_against_numpy():
    v = np.array([1.0, 3.0, 2.0, 5.0, 4.0, 9.0, 7.0])
    lo, hi = timing.bootstrap_median_ci(v, resamples=500, seed=3)
    rng = np.random.default_rng(3)
    medians = np.median(v[rng.integers(0, 7, size=(500, 7))], axis=1)
    assert (lo, hi) == tuple(np.quantile(medians, [0.025, 0.975]))
    assert lo < np.median(v) < hi
    # more rounds, narrower interval
    rng = np.random.default_rng(1)
    widths = [np.diff(timing.bootstrap_median_ci(rng.normal(1, 0.1, n))) for n in (5, 500)]
    assert widths[1] < widths[0] / 3


@pytest.mark.parametrize(
    ("ci", "target", "lower", "want"),
    [
        ((0.9, 1.1), 1.15, True, "met"),
        ((1.2, 1.3), 1.15, True, "not met"),
        ((1.1, 1.2), 1.15, True, "inconclusive"),
        ((1.0, 1.15), 1.15, True, "met"),  # touching the target from below still meets it
        ((12.0, 14.0), 10.0, False, "met"),  # a speed-up: higher is better
        ((8.0, 9.0), 10.0, False, "not met"),
        ((9.0, 11.0), 10.0, False, "inconclusive"),
    ],
)
def test_verdict_follows_the_interval(ci, target, lower, want):
    assert timing.verdict(ci, target, lower_is_better=lower) == want


def test_to_json_carries_min_median_ratio_ci_and_verdict():
    clock = FakeClock()
    rng = np.random.default_rng(0)
    base = list(_lognormal_times(rng, 1.0, 9))
    t = timing.measure(
        {
            "float": clock.variant("float", base),
            "slow": clock.variant("slow", [2 * b for b in base]),
            "same": clock.variant("same", list(_lognormal_times(rng, 1.0, 9))),
        },
        baseline="float",
        rounds=9,
        warmup=0,
        clock=clock,
    )
    out = json.loads(json.dumps(t.to_json({"slow": 1.5, "same": 10.0})))
    assert out["baseline"] == "float" and out["rounds"] == 9
    slow = out["variants"]["slow"]
    assert slow["ratio"]["median"] == pytest.approx(2.0)
    assert slow["verdict"] == "not met" and slow["target"] == 1.5
    assert slow["min_ms"] == pytest.approx(2e3 * min(base))
    assert slow["median_ms"] == pytest.approx(2e3 * float(np.median(base)))
    assert out["variants"]["same"]["verdict"] == "met"
    assert "verdict" not in out["variants"]["float"]
    assert out["variants"]["float"]["ratio"] == {"median": 1.0, "ci95": [1.0, 1.0]}
    assert "float" in t.format() and "2.000 [2.000, 2.000]" in t.format()


def test_cold_clears_the_jit_cache_so_every_call_compiles():
    import jax
    import jax.numpy as jnp

    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return x + 1

    x = jnp.ones(3)
    f(x)
    f(x)
    assert len(traces) == 1
    run = timing.cold(lambda: f(x))
    run()
    run()
    assert len(traces) == 3


def test_results_meta_keys():
    meta = timing.results_meta(quick=True, load_before=[1.0, 2.0, 3.0], command=["b.py", "-q"])
    assert meta["quick"] is True and meta["command"] == "python b.py -q"
    assert meta["load_average_before"] == [1.0, 2.0, 3.0]
    assert meta["load_average_after"] is None or len(meta["load_average_after"]) == 3
    assert {"date", "machine"} <= set(meta)
    m = meta["machine"]
    assert {"platform", "cpu", "cpu_count", "jax", "jaxlib", "backend", "devices"} <= set(m)
    json.dumps(meta)  # plain JSON


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: timing.measure({"a": int}, baseline="b", rounds=3), "baseline"),
        (lambda: timing.measure({"a": int}, baseline="a", rounds=1), "rounds"),
        (lambda: timing.measure({"a": int}, baseline="a", rounds=3, warmup=-1), "warmup"),
        (lambda: timing.measure({"a": int}, baseline="a", rounds=3, settle=-0.1), "settle"),
        (lambda: timing.verdict((2.0, 1.0), 1.0), "ci"),
        (lambda: timing.bootstrap_median_ci([]), "values"),
        (lambda: timing.bootstrap_median_ci([1.0], confidence=1.0), "confidence"),
        (lambda: timing.paired_ratio([1.0, 2.0], [1.0]), "paired"),
        (lambda: timing.results_meta(quick="yes", load_before=None), "quick"),
        (lambda: timing.write_results("/nonexistent/x.json", {}), "meta"),
    ],
)
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_pair_json_compares_two_variants_that_are_not_the_baseline():
    clock = FakeClock()
    fns = {k: clock.variant(k, [m] * 4) for k, m in (("float", 1.0), ("a", 3.0), ("b", 2.0))}
    t = timing.measure(fns, baseline="float", rounds=4, warmup=0, clock=clock)
    out = t.pair_json("b", "a", target=1.0)
    assert out["median"] == pytest.approx(2 / 3) and out["verdict"] == "met"
    assert out["against"] == "a" and "verdict" not in t.pair_json("a", "b")
