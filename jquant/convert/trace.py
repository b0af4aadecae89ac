"""Reads a model's layer graph from its jaxpr (Linen or NNX).

The model is traced once (``jax.make_jaxpr``) with every Conv / Dense / BatchNorm /
folded conv + BN call (Linen ``nn.Conv``, ``nn.Dense``, ``nn.BatchNorm``,
:class:`~jquant.nn.bn_folding.QConvBN`; NNX ``nnx.Conv``, ``nnx.Linear``, ``nnx.BatchNorm``,
:class:`~jquant.nn.bn_folding.NnxQConvBN`, and the jquant layers derived from them) run in a
named scope ``jquant_layer_<i>``, so each equation knows which layer call (if any) it
belongs to. Linen calls are found by ``nn.intercept_methods``; an NNX model is traced as a
copy whose layers sit inside :class:`CallHook` modules (:func:`with_call_hooks`). Equations
outside those scopes are the glue between layers and must be one of:
relu (``jax.nn.relu`` / ``max(x, 0)``), max or average pooling (``reduce_window``), reshape,
no-op casts, the elementwise ``add`` of two activations of one shape (a residual
connection), the mean over all spatial axes (``jnp.mean(x, axis=(1, 2))``, global average
pooling) or the concatenation of activations (``jnp.concatenate``, not along the batch).
The result is a list of :class:`Node` s in execution order, each naming the
values it reads (a small DAG); anything else (a layer norm, a softmax) raises ValueError
naming the module path it came from (Linen; NNX glue has no module path).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
from flax import nnx
from jax.extend import core as jex_core

from jquant.nn.bn_folding import QConvBN
from jquant.nn.nnx import CallHook, Hook, NnxQConvBN, with_call_hooks

__all__ = [
    "CallHook",
    "Hook",
    "Node",
    "layer_kind",
    "module_path",
    "trace_calls",
    "trace_layers",
    "with_call_hooks",
]

_MARK = "jquant_layer_"
# layer classes -> node kind (jquant's quantized layers are subclasses of these)
_KINDS: tuple[tuple[type, str], ...] = (
    (QConvBN, "conv_bn"),
    (NnxQConvBN, "conv_bn"),
    (nn.BatchNorm, "batch_norm"),
    (nnx.BatchNorm, "batch_norm"),
    (nn.Dense, "dense"),
    (nnx.Linear, "dense"),
    (nn.Conv, "conv"),
    (nnx.Conv, "conv"),
)
_NOOPS = ("copy", "copy_p")


def layer_kind(module: Any) -> str | None:
    """The graph node kind of a Linen or NNX layer (``conv``, ``dense``, ``batch_norm``,
    ``conv_bn``), None for any other module."""
    return next((kind for cls, kind in _KINDS if isinstance(module, cls)), None)


class Node(NamedTuple):
    """One step of the model's graph.

    ``kind``: ``conv`` | ``dense`` | ``batch_norm`` (with ``module``, the bound Flax module,
    and ``info``: the conv's lax parameters, or BatchNorm's call kwargs) | ``conv_bn`` (a
    :class:`QConvBN`; ``info`` as ``conv``) | ``relu`` | ``max_pool`` / ``avg_pool``
    (``info``: window, strides, padding of the spatial axes) | ``reshape`` (``info``: the new
    per-example shape) | ``add`` (two inputs) | ``mean`` (``info``: the averaged ``axes`` and
    their element ``count``) | ``concat`` (``info``: the axis; two or more inputs).

    ``inputs``: the values the node reads: ``0`` is the model's input, ``k + 1`` the output
    of node ``k``.
    """

    kind: str
    path: str
    module: Any = None
    info: Any = None
    inputs: tuple[int, ...] = ()


def module_path(eqn) -> str:
    """The module path of an equation, from its name stack (root class and markers removed)."""
    parts = [p for p in str(eqn.source_info.name_stack).split("/") if p]
    parts = [p for p in parts[1:] if not p.startswith(_MARK)]
    return "/".join(parts) or "<top level>"


def _marker(eqn) -> int | None:
    found = re.findall(_MARK + r"(\d+)", str(eqn.source_info.name_stack))
    return int(found[-1]) if found else None


def _single_inner(eqn):
    """The only equation inside a call-like equation (relu is ``custom_jvp(jit(max))``)."""
    for key in ("call_jaxpr", "jaxpr"):
        inner = eqn.params.get(key)
        if inner is not None:
            inner = getattr(inner, "jaxpr", inner)
            return inner.eqns[0] if len(inner.eqns) == 1 else None
    return None


def _is_zero(v) -> bool:
    return isinstance(v, jex_core.Literal) and np.all(np.asarray(v.val) == 0)


def _is_relu(eqn) -> bool:
    while eqn is not None and eqn.primitive.name != "max":
        eqn = _single_inner(eqn)
    return eqn is not None and sum(_is_zero(v) for v in eqn.invars) == 1


def _unsupported(eqn, what: str = "") -> ValueError:
    return ValueError(
        f"unsupported operation {eqn.primitive.name!r}{what} in module {module_path(eqn)!r}: the "
        "integer program supports Conv / Dense (+ BatchNorm, relu), max / average pooling, "
        "reshape, the add of two activations of one shape, the spatial mean and concatenation"
    )


def _window(eqn, ndim: int) -> dict:
    """Spatial window, strides and padding of a channels-last ``reduce_window``."""
    p = eqn.params
    dims, strides, pads = p["window_dimensions"], p["window_strides"], p["padding"]
    outer = (0, ndim - 1)
    if (
        any(dims[a] != 1 or strides[a] != 1 or tuple(pads[a]) != (0, 0) for a in outer)
        or any(d != 1 for d in p["base_dilation"])
        or any(d != 1 for d in p["window_dilation"])
        or ndim not in (3, 4)
    ):
        raise _unsupported(eqn, " (only spatial, undilated NWC / NHWC pooling)")
    return {
        "window": tuple(dims[1:-1]),
        "strides": tuple(strides[1:-1]),
        "padding": tuple(tuple(q) for q in pads[1:-1]),
    }


def _check_conv(eqn, path: str) -> dict:
    p = eqn.params
    dn, nd = p["dimension_numbers"], len(eqn.invars[0].aval.shape)
    channels_last = (0, nd - 1, *range(1, nd - 1))
    if (
        tuple(dn.lhs_spec) != channels_last
        or tuple(dn.out_spec) != channels_last
        or tuple(dn.rhs_spec) != (nd - 1, nd - 2, *range(nd - 2))
        or any(d != 1 for d in p["lhs_dilation"])
        or p["batch_group_count"] != 1
        or nd not in (3, 4)
    ):
        raise ValueError(
            f"layer {path!r}: only 1-D / 2-D channels-last convolutions without input "
            f"dilation are supported, got dimension numbers {dn} on a rank-{nd} input"
        )
    return {
        "strides": tuple(p["window_strides"]),
        "padding": tuple(tuple(q) for q in p["padding"]),
        "dilation": tuple(p["rhs_dilation"]),
        "groups": int(p["feature_group_count"]),
    }


def _layer_node(path: str, module, kwargs, group, values: dict) -> tuple[Node, Any]:
    """The node of one intercepted layer call and the variable holding its output."""
    uses = {values[v] for e in group for v in e.invars if _known(v, values)}
    if len(uses) != 1:
        raise ValueError(
            f"layer {path!r} must consume exactly one activation of the model, got {len(uses)}"
        )
    kind = layer_kind(module)
    if kind == "batch_norm":
        return Node("batch_norm", path, module, dict(kwargs), tuple(uses)), group[-1].outvars[0]
    prim = "dot_general" if kind == "dense" else "conv_general_dilated"
    core = [e for e in group if e.primitive.name == prim]
    if len(core) != 1 or not _known(core[0].invars[0], values):
        raise ValueError(
            f"layer {path!r}: expected one {prim} applied to the layer input directly "
            "(circular / causal padding and input transforms are not supported)"
        )
    current = core[0].invars[0]
    info = None if kind == "dense" else _check_conv(core[0], path)
    if kind == "dense":
        ((lc, rc), (lb, rb)) = core[0].params["dimension_numbers"]
        if lb or rb or tuple(rc) != (0,) or tuple(lc) != (len(current.aval.shape) - 1,):
            raise ValueError(f"layer {path!r}: only x @ kernel over the last axis is supported")
    return Node(kind, path, module, info, (values[current],)), group[-1].outvars[0]


def _known(v, values: dict) -> bool:
    return not isinstance(v, jex_core.Literal) and v in values


def _glue_node(eqns, i: int, values: dict, batch: int) -> tuple[Node, Any, int]:
    """The node of the glue equation ``eqns[i]`` (kind ``noop``: a cast that keeps the value),
    its output variable and the index of the next equation."""
    eqn = eqns[i]
    name, path = eqn.primitive.name, module_path(eqn)
    operands = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
    known = [v for v in operands if v in values]
    if name == "concatenate" and len(eqn.outvars) == 1 and len(known) == len(operands) >= 2:
        axis = int(eqn.params["dimension"])
        if axis == 0:
            raise _unsupported(eqn, " along the batch axis")
        ins = tuple(values[v] for v in known)
        return Node("concat", path, info=axis, inputs=ins), eqn.outvars[0], i + 1
    if len(eqn.outvars) == 1 and name == "add" and len(known) == 2 == len(operands):
        a, b = known
        if a.aval.shape != b.aval.shape:
            raise _unsupported(eqn, f" of shapes {a.aval.shape} and {b.aval.shape} (no broadcast)")
        return Node("add", path, inputs=(values[a], values[b])), eqn.outvars[0], i + 1
    if len(eqn.outvars) != 1 or len(known) != 1 or len(operands) != 1:
        if known:
            raise _unsupported(eqn)
        raise ValueError(
            f"operation {name!r} in module {path!r} does not act on the model's activations "
            "alone (constants computed from the input are not supported)"
        )
    current = known[0]
    out, ndim = eqn.outvars[0], len(current.aval.shape)
    one = (values[current],)
    if name in _NOOPS or (
        name == "convert_element_type" and eqn.params["new_dtype"] == current.aval.dtype
    ):
        return Node("noop", path, inputs=(values[current],)), out, i + 1
    if name == "reshape":
        shape = tuple(eqn.params["new_sizes"])
        if shape[0] != batch or eqn.params.get("dimensions") is not None:
            raise ValueError(f"reshape in module {path!r} must keep the batch axis, got {shape}")
        return Node("reshape", path, info=shape[1:], inputs=one), out, i + 1
    if _is_relu(eqn):
        return Node("relu", path, inputs=one), out, i + 1
    if name == "reduce_window_max":
        return Node("max_pool", path, info=_window(eqn, ndim), inputs=one), out, i + 1
    if name == "reduce_sum" and i + 1 < len(eqns):
        axes, div = tuple(int(a) for a in eqn.params["axes"]), eqns[i + 1]
        n = math.prod(current.aval.shape[a] for a in axes)
        divisor = [v for v in div.invars if isinstance(v, jex_core.Literal)]
        if (
            axes == tuple(range(1, ndim - 1))
            and ndim in (3, 4)
            and div.primitive.name == "div"
            and div.invars[0] is out
            and len(divisor) == 1
            and float(np.asarray(divisor[0].val)) == n
        ):
            info = {"axes": axes, "count": n}
            return Node("mean", path, info=info, inputs=one), div.outvars[0], i + 2
        raise _unsupported(eqn, " (only the mean over all spatial axes of NWC / NHWC)")
    if name == "reduce_window_sum" and i + 1 < len(eqns):
        geo, div = _window(eqn, ndim), eqns[i + 1]
        n = math.prod(geo["window"])
        divisor = [v for v in div.invars if isinstance(v, jex_core.Literal)]
        if (
            div.primitive.name == "div"
            and div.invars[0] is out
            and len(divisor) == 1
            and float(np.asarray(divisor[0].val)) == n
            and all(p == (0, 0) for p in geo["padding"])
        ):
            return Node("avg_pool", path, info=geo, inputs=one), div.outvars[0], i + 2
        raise _unsupported(eqn, " (only unpadded average pooling, sum / window size)")
    raise _unsupported(eqn)


def trace_layers(model: nn.Module, variables, x: jax.Array, **apply_kwargs) -> list[Node]:
    """The Linen model's graph, in execution order, from one trace of
    ``model.apply(variables, x)`` (:func:`trace_calls`)."""

    def run(x, hook: Hook):
        def interceptor(next_fun, args, kwargs, context):
            module = context.module
            if context.method_name != "__call__" or not module.path or layer_kind(module) is None:
                return next_fun(*args, **kwargs)
            return hook("/".join(module.path), module, next_fun, args, kwargs)

        with nn.intercept_methods(interceptor):
            return model.apply(variables, x, **apply_kwargs)

    return trace_calls(run, x)


def trace_calls(run: Callable[[jax.Array, Hook], jax.Array], x: jax.Array) -> list[Node]:
    """The graph of ``run(x, hook)``, a forward pass that calls ``hook(path, module, call,
    args, kwargs)`` for each Conv / Dense / BatchNorm call (:func:`layer_kind`), in execution
    order.

    Each node's ``inputs`` names the values it reads (:class:`Node`); the model's output is
    the last node's.

    Raises:
      ValueError: an operation other than the supported ones, naming its module path, or an
        output that is not the last node's.
    """
    records: list[tuple[str, Any, dict]] = []

    def hook(path, module, call, args, kwargs):
        records.append((path, module, dict(kwargs)))
        with jax.named_scope(f"{_MARK}{len(records) - 1}"):
            return call(*args, **kwargs)

    jaxpr = jax.make_jaxpr(lambda x: run(x, hook))(x).jaxpr
    if len(jaxpr.invars) != 1 or len(jaxpr.outvars) != 1:
        raise ValueError("the model must map one input array to one output array")
    # values: jaxpr variable -> value number (0: the input, k + 1: node k's output)
    values, batch, nodes, eqns, i = {jaxpr.invars[0]: 0}, x.shape[0], [], jaxpr.eqns, 0
    while i < len(eqns):
        mark = _marker(eqns[i])
        if mark is None:
            if not any(_known(v, values) for v in eqns[i].invars):
                i += 1  # computes on constants only (e.g. folded parameters)
                continue
            node, out, i = _glue_node(eqns, i, values, batch)
        else:
            j = i
            while j < len(eqns) and _marker(eqns[j]) == mark:
                j += 1
            node, out = _layer_node(*records[mark], eqns[i:j], values)
            i = j
        if node.kind == "noop":  # the output is the same value
            values[out] = node.inputs[0]
            continue
        nodes.append(node)
        values[out] = len(nodes)
    if values.get(jaxpr.outvars[0]) != len(nodes) or not nodes:
        raise ValueError("the model's output is not the result of its last layer")
    return nodes
