"""NNX models as conversion sources: their variables, their forward pass with call hooks.

An NNX model quantized by :func:`jquant.nn.nnx.quantize_model` (or built from the NNX
jquant layers) converts directly, whatever its class: its ``__call__`` is traced like a Linen
model's ``apply`` (:func:`jquant.convert.trace.trace_calls`), each layer call reached through
a :class:`~jquant.convert.trace.CallHook` placed in a copy of the model. Its variables, as the
converter reads them, are the Linen collections under the same ``/``-joined paths
(:func:`nnx_variables`): ``nnx.Param`` -> ``params``, ``nnx.BatchStat`` -> ``batch_stats``,
:class:`~jquant.nn.state.QuantStat` -> ``quant_stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
from flax import nnx

from jquant.convert.trace import Hook, with_call_hooks
from jquant.nn import nnx as qnnx
from jquant.nn.state import STATS, QuantStat

__all__ = ["COLLECTIONS", "GLUE_LAYERS", "nnx_variables", "nnx_forward"]

# the jquant NNX layers between products whose operations the program names by their path
GLUE_LAYERS = (qnnx.QAdd, qnnx.QMean, qnnx.QAvgPool, qnnx.QMaxPool)

# converter collection -> NNX variable type
COLLECTIONS: tuple[tuple[str, type], ...] = (
    ("params", nnx.Param),
    ("batch_stats", nnx.BatchStat),
    (STATS, QuantStat),
)


def _str_keys(tree: Any) -> Any:
    """A pure dict with every key a string (list items of NNX state are ints)."""
    if isinstance(tree, Mapping):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def nnx_variables(model: nnx.Module) -> dict[str, Any]:
    """``{"params": ..., "batch_stats": ..., "quant_stats": ...}``: the model's variables as
    nested dicts keyed by attribute name (list items by their index as a string); empty
    collections are left out.

    Raises:
      TypeError: ``model`` is not an ``nnx.Module``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    states = nnx.state(model, *(t for _, t in COLLECTIONS))
    out = {}
    for (name, _), state in zip(COLLECTIONS, states, strict=True):
        if pure := _str_keys(state.to_pure_dict()):
            out[name] = pure
    return out


def _lookup(tree: Mapping, path: tuple, what: str) -> Any:
    for key in path:
        if not isinstance(tree, Mapping) or str(key) not in tree:
            raise ValueError(f"variables has no {what} {'/'.join(map(str, path))!r}")
        tree = tree[str(key)]
    return tree


def nnx_forward(
    model: nnx.Module,
    variables: Mapping[str, Any],
    call_kwargs: Mapping[str, Any],
    *,
    phase: str,
    select: Callable[[str, nnx.Module], bool] | None = None,
    hook: Hook | None = None,
) -> Callable[[jax.Array], jax.Array]:
    """``x -> model(x, **call_kwargs)`` on ``variables`` (as :func:`nnx_variables` gives them,
    possibly traced), every jquant layer in ``phase``, with each submodule that ``select``
    picks called through ``hook`` (:func:`jquant.convert.trace.with_call_hooks`), and each
    :data:`GLUE_LAYERS` layer (a ``QAdd``, ``QMean``, pool) run in a named scope of its path,
    so that the program names its add, mean or pool by that path. ``model``
    itself is left unchanged: each call builds a fresh copy (``nnx.merge``), under a
    named scope of the model's class as Linen's ``apply`` has.
    """
    graphdef, *states, rest = nnx.split(model, *(t for _, t in COLLECTIONS), ...)
    flats = [nnx.to_flat_state(s) for s in states]
    name = type(model).__name__

    def forward(x: jax.Array) -> jax.Array:
        new = [
            nnx.from_flat_state(
                [(p, v.replace(_lookup(variables.get(c, {}), p, c))) for p, v in flat]
            )
            for (c, _), flat in zip(COLLECTIONS, flats, strict=True)
        ]
        copy = nnx.merge(graphdef, *new, rest)
        for _, m in nnx.iter_graph(copy):
            if isinstance(m, qnnx.QuantLayer):
                m.phase = phase
        copy = with_call_hooks(copy, lambda p, m: picked(p, m) or isinstance(m, GLUE_LAYERS), run)
        with jax.named_scope(name):
            return copy(x, **call_kwargs)

    def picked(path: str, module) -> bool:
        return hook is not None and select is not None and select(path, module)

    def run(path, module, call, args, kwargs):
        if picked(path, module):
            return hook(path, module, call, args, kwargs)
        with jax.named_scope(path):  # a glue layer: its operations carry its path
            return call(*args, **kwargs)

    return forward
