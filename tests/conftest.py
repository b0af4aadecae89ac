"""Shared test settings.

A hypothesis profile that keeps property tests fast and deterministic: few examples, no
per-example deadline (the first example of a jitted function includes its compilation).
Run with ``--hypothesis-profile=thorough`` for a longer search.

XLA's backend optimisation level is lowered to 0 for the test process (unless XLA_FLAGS
already sets it): the suite is dominated by compiling many small programs, and -O0 roughly
halves that CPU time. It changes code generation, not the HLO semantics the tests check
(the bit-exact suites pass at both levels); benchmarks run at XLA's default level.
"""

import os

if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

import hypothesis
import numpy as np
import pytest

hypothesis.settings.register_profile(
    "jquant",
    max_examples=25,
    deadline=None,
    derandomize=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.register_profile(
    "thorough",
    max_examples=500,
    deadline=None,
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
hypothesis.settings.load_profile("jquant")


@pytest.fixture
def rng() -> np.random.Generator:
    """A fresh, seeded NumPy generator per test."""
    return np.random.default_rng(0)
