"""Runs a model over a representative dataset so that its observers see the activations.

:func:`calibration_loop` is the one loop (validation, progress bar, early stop, the empty
dataset check) behind :func:`calibrate` (any Flax ``apply``), the Linen
``QuantizedModel.calibrate`` and the NNX ``jquant.nn.nnx.calibrate``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import jax
from tqdm.auto import tqdm

__all__ = ["calibrate", "calibration_loop", "check_max_batches"]

State = TypeVar("State")


def check_max_batches(max_batches: int | None) -> None:
    """Raises ValueError unless ``max_batches`` is None or an int >= 1."""
    if max_batches is not None and (
        not isinstance(max_batches, int) or isinstance(max_batches, bool) or max_batches < 1
    ):
        raise ValueError(f"max_batches must be None or an int >= 1, got {max_batches!r}")


def calibration_loop(
    step: Callable[[State, Any], State],
    state: State,
    data: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool = True,
) -> State:
    """``state = step(state, batch)`` for each batch of ``data`` (the first ``max_batches``),
    with a tqdm progress bar when ``progress``.

    Args:
      step: the (jitted) calibration step.
      state: the initial state (variables, or a model updated in place).
      data: an iterable of batches, consumed once, lazily.
      max_batches: stop after this many batches (``None``: the whole iterable).
      progress: show a progress bar (its total is ``len(data)`` when known).

    Returns:
      The final state.

    Raises:
      TypeError: ``data`` is not iterable.
      ValueError: ``max_batches`` is not None or a positive int; ``data`` yields no batch.
    """
    check_max_batches(max_batches)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be an iterable of batches, got {type(data).__name__}")
    total = max_batches
    if hasattr(data, "__len__"):
        total = len(data) if max_batches is None else min(len(data), max_batches)
    seen = 0
    batches = itertools.islice(data, max_batches)
    for batch in tqdm(batches, total=total, disable=not progress, desc="calibrate"):
        state = step(state, batch)
        seen += 1
    if seen == 0:
        raise ValueError("calibration needs data: the batches yielded no batch (an empty dataset)")
    return state


def calibrate(
    apply_fn: Callable[..., Any],
    variables: Mapping[str, Any],
    data: Iterable[Any],
    *,
    collection: str = "quant_stats",
    max_batches: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Folds every batch of ``data`` into the ``collection`` of ``variables``.

    For each batch, under one ``jax.jit``::

        _, updated = apply_fn(variables, batch, mutable=[collection])
        variables = {**variables, collection: updated[collection]}

    which is how Flax linen layers that keep :class:`~jquant.calibration.Observer` state in
    ``collection`` (and call ``observer.update`` when it is mutable) accumulate statistics,
    as TFLite's converter does with its representative dataset. ``data`` is any iterable or
    generator of batches (consumed once, lazily); pass ``apply_fn=lambda v, b, **kw:
    model.apply(v, b[0], **kw)`` to adapt other batch layouts. Other collections are returned
    unchanged. The jitted step retraces only when a batch's shape changes.

    Args:
      apply_fn: ``model.apply``-like ``(variables, batch, mutable=[...]) -> (out, updates)``.
      variables: the model's variables, holding an initialised ``collection``.
      data: the representative dataset, an iterable of batches.
      collection: the variable collection holding observer states.
      max_batches: stop after this many batches (``None``: the whole iterable).
      progress: show a tqdm progress bar.

    Returns:
      ``variables`` as a dict with ``collection`` replaced by the accumulated statistics.

    Raises:
      ValueError: ``variables`` has no ``collection``, ``data`` yields no batch, or
        ``max_batches`` is not a positive int.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn must be callable, got {type(apply_fn).__name__}")
    if not isinstance(variables, Mapping):
        raise TypeError(f"variables must be a mapping of collections, got {type(variables)}")
    if not isinstance(collection, str):
        raise TypeError(f"collection must be a str, got {collection!r}")
    if collection not in variables:
        raise ValueError(
            f"variables has no {collection!r} collection (has {sorted(variables)}): initialise "
            "the model with layers that keep observer state there"
        )
    check_max_batches(max_batches)

    @jax.jit
    def stats(variables, batch):
        _, updates = apply_fn(variables, batch, mutable=[collection])
        return updates[collection]

    def step(variables, batch):
        return {**variables, collection: stats(variables, batch)}

    return calibration_loop(step, dict(variables), data, max_batches=max_batches, progress=progress)
