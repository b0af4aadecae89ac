"""Tests of jquant.sweep.mixed_precision against NumPy-quantized kernels and brute force.

Oracles: the accuracy of each configuration from the float model with its kernels quantized
in NumPy (``test_sweep._numpy_fake_quant``), the size from the parameter shapes, the Pareto
front from a pairwise dominance loop, and the greedy choice re-derived from the sensitivity
table's numbers.
"""

import itertools
import math

import numpy as np
import pytest
from test_sweep import _numpy_fake_quant, _tiny_mlp

from jquant.sweep import Table
from jquant.sweep.mixed_precision import bits_column, mixed_precision
from jquant.sweep.model_sweep import PTQ

WIDTHS = (2, 4, 8)
LAYERS = ("dense1", "head")


@pytest.fixture(scope="module")
def mlp():
    return _tiny_mlp()


@pytest.fixture(scope="module")
def ptq(mlp):
    model, variables, x, _ = mlp
    return PTQ.calibrated(model, variables, x)


# Costs chosen by hand so that the greedy order, from the rate (cost increase / bytes saved;
# dense1 has 48 weights, head 24), is head 8->4 (0.01 / 12 B), dense1 8->4 (0.1 / 24 B),
# dense1 4->2 (0.9 / 12 B), head 4->2 (4.99 / 6 B).
COSTS = {("dense1", 8): 0.0, ("dense1", 4): 0.1, ("dense1", 2): 1.0}
COSTS |= {("head", 8): 0.0, ("head", 4): 0.01, ("head", 2): 5.0}
SENS = Table.from_dicts([{"layer": p, "bits": b, "kl": c} for (p, b), c in COSTS.items()])
ORDER = [None, "head", "dense1", "dense1", "head"]


def _size(variables, bits):
    """Kernels at ``bits[layer]`` bits, everything else (biases) at 32 bits, in bytes."""
    total = 0
    for layer, p in variables["params"].items():
        for name, v in p.items():
            total += np.size(v) * (bits[layer] if name == "kernel" else 32)
    return total / 8


def _oracle_logits(mlp, bits, axis=-1):
    """Float model with NumPy-quantized kernels (``bits[layer]``; a missing layer: float)."""
    model, variables, x, _ = mlp
    params = {
        k: {**v, "kernel": _numpy_fake_quant(np.asarray(v["kernel"]), bits[k], axis, True)}
        if k in bits
        else v
        for k, v in variables["params"].items()
    }
    return np.asarray(model.apply({"params": params}, x), np.float64)


def _oracle_accuracy(mlp, bits, axis=-1):
    return float(np.mean(np.argmax(_oracle_logits(mlp, bits, axis), -1) == mlp[3]))


def _bits(row):
    return {p: row[bits_column(p)] for p in LAYERS}


def _dominated(points, i):
    s, a = points[i]
    return any(t <= s and b >= a and (t < s or b > a) for t, b in points)


def test_greedy_path_follows_sensitivity_and_respects_budget(mlp, ptq):
    model, variables, x, y = mlp
    float_bytes = _size(variables, dict.fromkeys(LAYERS, 32))
    budget = 85.0  # between the sizes of the path's points, not on one
    t = mixed_precision(
        model,
        variables,
        x,
        y,
        budget_fraction=budget / float_bytes,
        target="weights",
        full_path=True,
        sensitivity_table=SENS,
        ptq=ptq,
    )
    rows = t.to_dicts()
    assert len(rows) == len(LAYERS) * (len(WIDTHS) - 1) + 1
    assert _bits(rows[0]) == dict.fromkeys(LAYERS, 8) and _bits(rows[-1]) == dict.fromkeys(
        LAYERS, 2
    )
    assert t.meta["budget_bytes"] == pytest.approx(budget)
    assert t.column("changed") == ORDER
    for prev, row in itertools.pairwise(rows):
        before, after = _bits(prev), _bits(row)
        assert [p for p in LAYERS if after[p] != before[p]] == [row["changed"]]
        p = row["changed"]
        assert WIDTHS.index(after[p]) == WIDTHS.index(before[p]) - 1  # one candidate down
    for r in rows:
        assert r["size_bytes"] == _size(variables, _bits(r))
        assert r["fits"] == (r["size_bytes"] <= budget)
        assert r["accuracy"] == pytest.approx(_oracle_accuracy(mlp, _bits(r)), abs=1e-6)
    points = [(r["size_bytes"], r["accuracy"]) for r in rows]
    assert [r["pareto"] for r in rows] == [not _dominated(points, i) for i in range(len(rows))]
    # the chosen point is the first that fits, and it fits
    chosen = [i for i, r in enumerate(rows) if r["chosen"]]
    assert len(chosen) == 1 and rows[chosen[0]]["size_bytes"] <= budget
    assert all(r["size_bytes"] > budget for r in rows[: chosen[0]])
    assert t.meta["chosen_bits"] == _bits(rows[chosen[0]])


def test_infinite_and_smallest_budgets(mlp, ptq):
    model, variables, x, y = mlp
    common = dict(target="weights", sensitivity_table=SENS, ptq=ptq)
    t = mixed_precision(model, variables, x, y, budget_bytes=math.inf, **common)
    assert len(t) == 1 and t.meta["chosen_bits"] == dict.fromkeys(LAYERS, 8)
    smallest = _size(variables, dict.fromkeys(LAYERS, 2))
    t = mixed_precision(
        model, variables, x, y, budget_bytes=smallest, candidate_bits=(2, 8), **common
    )
    assert t.meta["chosen_bits"] == dict.fromkeys(LAYERS, 2)
    assert t.meta["chosen_size_bytes"] == smallest and t.column("chosen")[-1] is True


@pytest.mark.slow  # two calibrations (sensitivity's and ours) + 6 compiled evaluations
def test_greedy_lowers_the_less_sensitive_layer_first(mlp):
    model, variables, x, y = mlp
    # One outlier in dense1's kernel: per tensor, at 4 bits its other weights round to 0.
    kernel = np.asarray(variables["params"]["dense1"]["kernel"]).copy()
    kernel[0, 0] = 50 * np.abs(kernel).max()
    params = {**variables["params"], "dense1": {**variables["params"]["dense1"], "kernel": kernel}}
    variables = {"params": params}
    # dense1 (48 weights) saves twice head's (24) bytes: bytes alone would lower dense1 first.
    all8 = _size(variables, dict.fromkeys(LAYERS, 8))
    t = mixed_precision(
        model,
        variables,
        x,
        y,
        candidate_bits=(4, 8),
        budget_bytes=all8 - 1,
        target="weights",
        granularity="per_tensor",
    )
    assert t.column("changed") == [None, "head"]
    assert t.meta["chosen_bits"] == {"dense1": 8, "head": 4}
    mlp_outlier = (model, variables, x, y)
    for r in t.to_dicts():
        want = _oracle_accuracy(mlp_outlier, _bits(r), axis=None)
        assert r["accuracy"] == pytest.approx(want, abs=1e-6)
    # the real sensitivity table behind it: dense1's KL rises more per byte saved
    kl = {(r["layer"], r["bits"]): r["kl"] for r in t.meta["sensitivity"]}
    assert (kl["dense1", 4] - kl["dense1", 8]) / 24 > (kl["head", 4] - kl["head", 8]) / 12


def test_pareto_method_matches_brute_force(mlp, ptq):
    model, variables, x, y = mlp
    budget = 90.0
    t = mixed_precision(
        model, variables, x, y, budget_bytes=budget, target="weights", method="pareto", ptq=ptq
    )
    rows = t.to_dicts()
    assignments = [dict(zip(LAYERS, c, strict=True)) for c in itertools.product(WIDTHS, repeat=2)]
    assert sorted(map(lambda r: tuple(_bits(r).values()), rows)) == sorted(
        tuple(a.values()) for a in assignments
    )
    points = [(_size(variables, _bits(r)), _oracle_accuracy(mlp, _bits(r))) for r in rows]
    for r, (size, acc) in zip(rows, points, strict=True):
        assert r["size_bytes"] == size and r["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert [r["pareto"] for r in rows] == [not _dominated(points, i) for i in range(len(rows))]
    fits = [p for p in points if p[0] <= budget]
    best = max(fits, key=lambda p: (p[1], -p[0]))
    chosen = [p for p, r in zip(points, rows, strict=True) if r["chosen"]]
    assert chosen == [best]


def test_bad_input(mlp):
    model, variables, x, y = mlp
    with pytest.raises(ValueError, match="exactly one of budget_bytes and budget_fraction"):
        mixed_precision(model, variables, x, y)
    with pytest.raises(ValueError, match="exactly one"):
        mixed_precision(model, variables, x, y, budget_bytes=100, budget_fraction=0.5)
    for bad in (0, -1.0, math.nan):
        with pytest.raises(ValueError, match="budget_bytes must be > 0"):
            mixed_precision(model, variables, x, y, budget_bytes=bad)
    with pytest.raises(ValueError, match="budget_fraction must be > 0"):
        mixed_precision(model, variables, x, y, budget_fraction=-0.1)
    with pytest.raises(TypeError, match="budget_bytes"):
        mixed_precision(model, variables, x, y, budget_bytes="100")
    smallest = _size(variables, dict.fromkeys(LAYERS, 2))
    with pytest.raises(ValueError, match=r"budget_bytes=.* below the smallest size, 62 bytes"):
        mixed_precision(model, variables, x, y, budget_bytes=smallest - 0.5)
    with pytest.raises(ValueError, match="budget_fraction=0.01"):
        mixed_precision(model, variables, x, y, budget_fraction=0.01)
    with pytest.raises(ValueError, match="method"):
        mixed_precision(model, variables, x, y, budget_fraction=1, method="anneal")
    with pytest.raises(ValueError, match="metric"):
        mixed_precision(model, variables, x, y, budget_fraction=1, metric="sqnr")
    with pytest.raises(ValueError, match="candidate_bits"):
        mixed_precision(model, variables, x, y, budget_fraction=1, candidate_bits=(1, 8))
    with pytest.raises(ValueError, match="granularity"):
        mixed_precision(model, variables, x, y, budget_fraction=1, granularity="per_row")
    with pytest.raises(ValueError, match="max_configs=4"):
        mixed_precision(model, variables, x, y, budget_fraction=1, method="pareto", max_configs=4)
    partial = Table.from_dicts([{"layer": "dense1", "bits": 8, "kl": 0.0}])
    with pytest.raises(ValueError, match=r"sensitivity_table lacks rows .*'head', 2"):
        mixed_precision(model, variables, x, y, budget_fraction=1, sensitivity_table=partial)
