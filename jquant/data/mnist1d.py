"""MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package and cached as .npz.

The standard data set is ``make_dataset`` with its default arguments: 5000 signals of length 40
(10 digit templates padded, dilated, scaled, translated, sheared, with correlated and i.i.d.
noise), split 4000 train / 1000 test, seed 42. Nothing is downloaded: ``mnist1d.data.
get_dataset`` may fetch a pickle from the network, so we call the generator directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import warnings
import zipfile

import numpy as np

from jquant.data.base import Dataset, cache_dir

__all__ = ["DEFAULT_ARGS", "load_mnist1d"]

# The generator's defaults, minus the download URL (which never affects the data).
DEFAULT_ARGS = {
    "num_samples": 5000,
    "train_split": 0.8,
    "template_len": 12,
    "padding": [36, 60],
    "scale_coeff": 0.4,
    "max_translation": 48,
    "corr_noise_scale": 0.25,
    "iid_noise_scale": 2e-2,
    "shear_scale": 0.75,
    "shuffle_seq": False,
    "final_seq_length": 40,
    "seed": 42,
}


def _generate(args: dict) -> dict[str, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset
    from mnist1d.utils import ObjectView

    full = get_dataset_args(as_dict=True)
    full.update(args)
    # make_dataset reseeds the global `random` and `np.random` generators; restore them so
    # that loading data has no effect on the caller's random streams.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        ds = make_dataset(ObjectView(full))
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return {"x_train": ds["x"], "y_train": ds["y"], "x_test": ds["x_test"], "y_test": ds["y_test"]}


_KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_cache(path: pathlib.Path, args: dict) -> dict[str, np.ndarray]:
    """The arrays of a cache file, checked against ``args``: the four arrays, ``num_samples``
    examples of length ``final_seq_length`` split by ``train_split``, finite signals, labels
    0-9. ValueError saying what is wrong otherwise (the zip's CRC-32 catches flipped bytes)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(f"unreadable ({type(e).__name__}: {e})") from None
    if sorted(arrays) != sorted(_KEYS):
        raise ValueError(f"arrays {sorted(arrays)}, expected {sorted(_KEYS)}")
    n_train = int(args["num_samples"] * args["train_split"])
    length = args["final_seq_length"]
    want = {"x_train": (n_train, length), "x_test": (args["num_samples"] - n_train, length)}
    want |= {"y_train": want["x_train"][:1], "y_test": want["x_test"][:1]}
    for k in _KEYS:
        if arrays[k].shape != want[k]:
            raise ValueError(f"{k} has shape {arrays[k].shape}, expected {want[k]}")
    if not all(np.all(np.isfinite(arrays[k])) for k in ("x_train", "x_test")):
        raise ValueError("non-finite inputs")
    if not all(np.isin(arrays[k], np.arange(10)).all() for k in ("y_train", "y_test")):
        raise ValueError("labels outside 0..9")
    return arrays


def load_mnist1d(*, seed: int = 42, cache: str | os.PathLike | None = None, **overrides) -> Dataset:
    """Loads MNIST-1D, generating it once and caching the arrays under the cache directory.

    Inputs have shape ``(N, 40, 1)`` (a 1-D signal with one channel), standardised over the
    whole set by the generator (``x = (x - mean) / std``); labels are the digits 0-9.

    Args:
      seed: generator seed; 42 gives the standard data set.
      cache: cache directory (default ``$JQUANT_CACHE`` or ``~/.cache/jquant``).
      **overrides: other generator arguments (keys of :data:`DEFAULT_ARGS`), e.g.
        ``num_samples=500`` for a small set.

    Returns:
      A :class:`~jquant.data.base.Dataset` named ``"mnist1d"``.

    A cache file that cannot be read (e.g. truncated), fails its zip CRC-32, or holds arrays of
    the wrong shapes, non-finite signals or labels outside 0-9 is never used: a
    ``RuntimeWarning`` names it and the data are generated again and the file replaced
    (written to a temporary file, then renamed).
    """
    allowed = set(DEFAULT_ARGS) - {"seed"}
    if unknown := sorted(set(overrides) - allowed):
        raise ValueError(f"unknown mnist1d argument(s) {unknown}; allowed: {sorted(allowed)}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}")
    args = {**DEFAULT_ARGS, **overrides, "seed": int(seed)}
    digest = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir(cache) / f"mnist1d-{digest}.npz"
    arrays = None
    if path.exists():
        try:
            arrays = _read_cache(path, args)
        except ValueError as e:
            warnings.warn(f"{path}: corrupt data cache, regenerating: {e}", RuntimeWarning, 2)
    if arrays is None:
        arrays = _generate(args)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: concurrent loaders never see a partial file
    x_train, x_test = (arrays[k][..., None] for k in ("x_train", "x_test"))
    return Dataset.from_numpy(
        x_train, arrays["y_train"], x_test, arrays["y_test"], name="mnist1d", num_classes=10
    )
