"""Shared test settings.

A hypothesis profile that keeps property tests fast and deterministic: few examples, no
per-example deadline (the first example of a jitted function includes its compilation).
Run with ``--hypothesis-profile=thorough`` for a longer search.
"""

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
