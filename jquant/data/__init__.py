"""Embedded data sets: MNIST-1D generated locally, scikit-learn's 8x8 digits and a character
corpus from CPython's ``pydoc_data``.

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
from jquant.data.text import TextDataset, load_text

__all__ = [
    "DATASETS",
    "TEXT_DATASETS",
    "Dataset",
    "TextDataset",
    "batches",
    "cache_dir",
    "load",
    "load_digits",
    "load_mnist1d",
    "load_text",
]

# Classification data sets (what the model sweeps and the CLI take) and language-modelling ones.
DATASETS: dict[str, Callable[..., Dataset]] = {"mnist1d": load_mnist1d, "digits": load_digits}
TEXT_DATASETS: dict[str, Callable[..., TextDataset]] = {"text": load_text}


def load(name: str, **kwargs) -> Dataset | TextDataset:
    """Loads the data set called ``name`` (one of :data:`DATASETS` or :data:`TEXT_DATASETS`),
    passing ``kwargs`` on."""
    loaders = {**DATASETS, **TEXT_DATASETS}
    if name not in loaders:
        raise ValueError(f"unknown data set name {name!r}; allowed: {sorted(loaders)}")
    return loaders[name](**kwargs)
