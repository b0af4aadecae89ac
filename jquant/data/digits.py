"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set), no download.

1797 grey images with 17 levels (0..16), scaled to ``[0, 1]`` by ``x / 16``; a stratified
80/20 train/test split drawn with ``seed``.
"""

from __future__ import annotations

import numpy as np

from jquant.data.base import Dataset

__all__ = ["load_digits"]


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Loads the digits as ``(N, 8, 8, 1)`` images in ``[0, 1]`` with labels 0-9.

    Args:
      seed: seed of the stratified train/test split.
      test_fraction: fraction of examples held out, in ``(0, 1)``.

    Returns:
      A :class:`~jquant.data.base.Dataset` named ``"digits"``.
    """
    from sklearn.datasets import load_digits as _sk_load_digits
    from sklearn.model_selection import train_test_split

    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    bunch = _sk_load_digits()
    x = bunch.images[..., None] / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, bunch.target, test_size=test_fraction, random_state=int(seed), stratify=bunch.target
    )
    return Dataset.from_numpy(x_train, y_train, x_test, y_test, name="digits", num_classes=10)
