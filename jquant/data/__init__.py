"""Embedded data sets: MNIST-1D generated locally and scikit-learn's 8x8 digits.

>>> from jquant import data
>>> ds = data.load("digits")
>>> ds.input_shape, ds.num_classes
((8, 8, 1), 10)
"""

from __future__ import annotations

from collections.abc import Callable

from jquant.data.base import Dataset, batches, cache_dir
from jquant.data.digits import load_digits
from jquant.data.mnist1d import load_mnist1d

__all__ = ["DATASETS", "Dataset", "batches", "cache_dir", "load", "load_digits", "load_mnist1d"]

DATASETS: dict[str, Callable[..., Dataset]] = {"mnist1d": load_mnist1d, "digits": load_digits}


def load(name: str, **kwargs) -> Dataset:
    """Loads the data set called ``name`` (one of :data:`DATASETS`), passing ``kwargs`` on."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set name {name!r}; allowed: {sorted(DATASETS)}")
    return DATASETS[name](**kwargs)
