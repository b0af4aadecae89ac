"""The :class:`Dataset` container, the cache directory and the mini-batch iterator.

A data set is four arrays (``x_train``, ``y_train``, ``x_test``, ``y_test``) plus static
metadata; it is a pytree, so it can be passed through ``jax.jit`` as it is. Inputs are channels
last: ``(N, *spatial, C)``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Dataset", "batches", "cache_dir"]

CACHE_ENV = "JQUANT_CACHE"


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["x_train", "y_train", "x_test", "y_test"],
    meta_fields=["name", "num_classes", "input_shape"],
)
@dataclasses.dataclass(frozen=True)
class Dataset:
    """A classification data set: float32 inputs ``(N, *input_shape)``, int32 labels ``(N,)``.

    Attributes:
      x_train, y_train: training inputs and labels in ``[0, num_classes)``.
      x_test, y_test: held-out inputs and labels.
      name: the name :func:`jquant.data.load` knows it by.
      num_classes: number of classes.
      input_shape: shape of one example, channels last (``(40, 1)`` for MNIST-1D).
    """

    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    name: str
    num_classes: int
    input_shape: tuple[int, ...]

    @classmethod
    def from_numpy(
        cls, x_train, y_train, x_test, y_test, *, name: str, num_classes: int
    ) -> Dataset:
        """Builds a Dataset from NumPy arrays, casting to float32 inputs and int32 labels."""
        x_train, x_test = (jnp.asarray(x, jnp.float32) for x in (x_train, x_test))
        y_train, y_test = (jnp.asarray(y, jnp.int32) for y in (y_train, y_test))
        return cls(x_train, y_train, x_test, y_test, name, num_classes, tuple(x_train.shape[1:]))


def cache_dir(path: str | os.PathLike | None = None) -> pathlib.Path:
    """The cache directory: ``path`` if given, else ``$JQUANT_CACHE``, else ``~/.cache/jquant``."""
    if path is None:
        path = os.environ.get(CACHE_ENV) or "~/.cache/jquant"
    return pathlib.Path(path).expanduser()


def batches(
    x: jax.Array,
    y: jax.Array,
    batch_size: int,
    *,
    key: jax.Array | None = None,
    drop_remainder: bool = False,
) -> Iterator[tuple[jax.Array, jax.Array]]:
    """Iterates over ``(x[idx], y[idx])`` mini-batches of one epoch.

    The order is ``idx = permutation(key, N)`` when a key is given, else ``0 .. N-1``. Batch
    ``i`` holds ``idx[i * batch_size : (i + 1) * batch_size]``; the last, shorter batch is
    dropped when ``drop_remainder`` is set, so every example is visited exactly once otherwise.

    Args:
      x, y: arrays with the same leading dimension ``N``.
      batch_size: positive number of examples per batch.
      key: a PRNG key to shuffle with, or None to keep the order.
      drop_remainder: drop the last batch if it holds fewer than ``batch_size`` examples.

    Yields:
      ``(x_batch, y_batch)`` tuples.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x and y must have the same length, got len(x)={n}, len(y)={len(y)}")
    idx = np.arange(n) if key is None else np.asarray(jax.random.permutation(key, n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
        sel = idx[start : start + batch_size]
        yield x[sel], y[sel]
