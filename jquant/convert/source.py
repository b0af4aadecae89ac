"""The model being converted: its graph, its quantized layers and its fake-quant forward.

Three kinds of models convert:

- a :class:`~jquant.nn.linen.QuantizedModel` (a plain Linen model quantized by rules);
- a Linen model built from jquant layers (:class:`~jquant.nn.linen.QDense`,
  :class:`~jquant.nn.linen.QConv`, :class:`~jquant.nn.bn_folding.QConvBN`), each carrying its
  own ``rule`` and ``phase`` (e.g. a QAT model with folded BatchNorm);
- an NNX model whose Linear / Conv layers are jquant's (:func:`jquant.nn.nnx.quantize_model`,
  or built from :class:`~jquant.nn.nnx.QLinear`, :class:`~jquant.nn.nnx.QConv`,
  :class:`~jquant.nn.bn_folding.NnxQConvBN`), any class; its variables are its own
  (``variables=None``) or :func:`jquant.convert.nnx.nnx_variables`-shaped.

Linen jquant layers inside a rule-quantized model keep their own rules. The graph is traced
with every jquant layer in phase ``float`` (plain lax products), the fake-quant forward runs
them in phase ``eval``, whatever phase the model was built with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jquant.convert.nnx import nnx_forward, nnx_variables
from jquant.convert.trace import Hook, Node, layer_kind, trace_calls, trace_layers
from jquant.formats import block_size_of, format_name
from jquant.nn import linen as ql
from jquant.nn import nnx as qnnx
from jquant.nn.bn_folding import QConvBN, fold_bn
from jquant.nn.state import STATS, QuantizedLayer, frozen_qparams, subtree

__all__ = [
    "JQUANT_LAYERS",
    "check_model",
    "model_variables",
    "layer_phase",
    "eval_forward",
    "trace",
    "layer_info",
]

JQUANT_LAYERS = (ql.QDense, ql.QConv, QConvBN, qnnx.QLinear, qnnx.QConv, qnnx.NnxQConvBN)
Model = ql.QuantizedModel | nn.Module | nnx.Module


def check_model(model: Any) -> None:
    """TypeError unless ``model`` is a QuantizedModel, a Linen module or an NNX module."""
    if not isinstance(model, ql.QuantizedModel | nn.Module | nnx.Module):
        raise TypeError(
            "qmodel must be a jquant.nn.linen.QuantizedModel or a Linen model built from jquant "
            "layers (QDense, QConv, QConvBN), or an NNX model with jquant layers "
            f"(jquant.nn.nnx.quantize_model), got {type(model).__name__}"
        )


def model_variables(model: Model, variables: Mapping[str, Any] | None) -> dict[str, Any]:
    """The variables the converter reads, as a new dict: ``variables`` itself, or for an NNX
    model given ``None`` its own (:func:`jquant.convert.nnx.nnx_variables`).

    Raises:
      TypeError: a model that does not convert (:func:`check_model`), or ``variables`` not a
        mapping (``None`` is allowed for an NNX model only).
    """
    check_model(model)
    if variables is None and isinstance(model, nnx.Module):
        return nnx_variables(model)
    if not isinstance(variables, Mapping):
        allowed = (
            "a mapping of collections or None"
            if isinstance(model, nnx.Module)
            else ("a mapping of collections")
        )
        raise TypeError(f"variables must be {allowed}, got {type(variables).__name__}")
    return dict(variables)


def _plain(model: Model) -> nn.Module:
    return model.model if isinstance(model, ql.QuantizedModel) else model


@contextlib.contextmanager
def layer_phase(phase: str) -> Iterator[None]:
    """Runs every jquant layer (QDense, QConv, QConvBN) called inside in ``phase``: a clone
    bound to the layer's own scope (same variables) with ``phase`` replaced."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            context.method_name != "__call__"
            or not isinstance(module, JQUANT_LAYERS)
            or module.phase == phase
        ):
            return next_fun(*args, **kwargs)
        clone = module.clone(parent=module.scope, phase=phase)
        return type(module).__call__(clone, *args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


def _linen_hooked(forward: Callable, paths, hook: Hook | None) -> Callable:
    """``forward`` with the outermost ``__call__`` of each Linen module at a path in ``paths``
    made through ``hook`` (the calls nested in it, e.g. a jquant layer's clones, run as
    they are)."""
    if hook is None:
        return forward

    def hooked(x: jax.Array) -> jax.Array:
        active: set[str] = set()

        def interceptor(next_fun, args, kwargs, context):
            path = "/".join(context.module.path)
            if context.method_name != "__call__" or path not in paths or path in active:
                return next_fun(*args, **kwargs)
            active.add(path)
            try:
                return hook(path, context.module, next_fun, args, kwargs)
            finally:
                active.discard(path)

        with nn.intercept_methods(interceptor):
            return forward(x)

    return hooked


def eval_forward(
    model: Model,
    variables: Mapping[str, Any],
    apply_kwargs: dict,
    *,
    hook: Hook | None = None,
    paths: frozenset[str] | set[str] = frozenset(),
    phase: str = "eval",
) -> Callable:
    """``x -> logits`` of the fake-quant model: rules and jquant layers in phase ``eval``
    (``phase="float"``: the float model, every product plain lax); each call of a layer at one
    of ``paths`` goes through ``hook(path, module, call, args, kwargs)``
    (:data:`jquant.convert.trace.Hook`), Linen or NNX alike."""
    if isinstance(model, nnx.Module):
        return nnx_forward(
            model, variables, apply_kwargs, phase=phase, select=lambda p, m: p in paths, hook=hook
        )
    evaluate = model.with_phase(phase) if isinstance(model, ql.QuantizedModel) else model

    def forward(x: jax.Array) -> jax.Array:
        with layer_phase(phase):
            return evaluate.apply(variables, x, **apply_kwargs)

    return _linen_hooked(forward, paths, hook)


def trace(model: Model, variables: Mapping[str, Any], x: jax.Array, apply_kwargs: dict):
    """The float model's graph (:func:`jquant.convert.trace.trace_layers` for Linen,
    :func:`jquant.convert.trace.trace_calls` of the NNX model's ``__call__``)."""
    if isinstance(model, nnx.Module):

        def run(x, hook):
            select = lambda p, m: layer_kind(m) is not None  # noqa: E731
            fwd = nnx_forward(
                model, variables, apply_kwargs, phase="float", select=select, hook=hook
            )
            return fwd(x)

        return trace_calls(run, x)
    with layer_phase("float"):
        return trace_layers(_plain(model), variables, x, **apply_kwargs)


def _jquant_layer(node: Node, variables: Mapping[str, Any]) -> QuantizedLayer:
    """The eval-time weights and QParams of a jquant layer; a QConvBN's kernel and bias are
    the folded ones its eval forward quantizes: ``W gamma / sigma_R`` and
    ``beta - gamma mu_R / sigma_R`` (:func:`jquant.nn.bn_folding.fold_bn`)."""
    module, path = node.module, node.path
    params = subtree(variables.get("params", {}), path)
    stats = subtree(variables.get(STATS, {}), path)
    if isinstance(module, QConvBN | qnnx.NnxQConvBN):
        bn = subtree(variables.get("batch_stats", {}), path)
        fold = jax.jit(fold_bn, static_argnames="eps")
        kernel, bias = fold(
            params["kernel"],
            None,
            params["scale"],
            params["bias"],
            bn["mean"],
            bn["var"],
            eps=module.epsilon,
        )
    else:
        kernel, bias = params["kernel"], params.get("bias")
    rule = module.rule
    if rule.keep_float:
        raise ValueError(f"layer {path!r} is not quantized (its rule keeps it float)")
    qa, qw = frozen_qparams(
        rule.act_config(), rule.weight_config(kernel.ndim), kernel, params, stats
    )
    return QuantizedLayer(path, rule, kernel, bias, qa, qw)


def layer_info(model: Model, variables: Mapping[str, Any], nodes: list[Node]):
    """The :class:`~jquant.nn.linen.QuantizedLayer` of each linear node (in order).

    Raises:
      ValueError: a layer that is not quantized, has dynamic activation scales, or has no
        input QParams.
    """
    by_rule = (
        {q.path: q for q in model.quantized_layers(variables) if q.has_kernel}
        if isinstance(model, ql.QuantizedModel)
        else {}
    )
    out = []
    for node in nodes:
        path = node.path
        if isinstance(node.module, JQUANT_LAYERS):
            q = _jquant_layer(node, variables)
        elif path in by_rule:
            q = by_rule[path]
        else:
            rule = (
                model.match.assignment.get(path) if isinstance(model, ql.QuantizedModel) else None
            )
            why = "no rule matches it" if rule is None else f"its rule {rule.pattern!r} keeps it"
            raise ValueError(
                f"layer {path!r} is not quantized ({why} float); an integer-only program "
                "needs every Conv / Dense quantized"
            )
        block_formats = [
            format_name(f) for f in (q.rule.weight, q.rule.act) if block_size_of(f) is not None
        ]
        if q.rule.rounding != "nearest_even":
            raise ValueError(
                f"layer {path!r} has QuantRule.rounding={q.rule.rounding!r}: the integer "
                "program's kernels round as the runtimes do; convert a model with the default "
                "rounding ('nearest_even')"
            )
        if block_formats:
            raise ValueError(
                f"layer {path!r} uses the block format(s) {block_formats}: the integer program "
                "has no kernel for them; convert an integer-format model"
            )
        if q.rule.blockwise():
            raise ValueError(
                f"layer {path!r} has {q.rule.blockwise()}: the integer program has no "
                "block-wise kernel; convert a per-channel model, or run this one with "
                "jquant.nn (mode='int' computes block-wise layers)"
            )
        if q.rule.scaling is not None:  # its histories are not read: no silent swap either
            raise ValueError(
                f"layer {path!r}: its rule uses {q.rule.scaling} scaling (per-tensor scales "
                "from the amax histories of the scaling_history collection), which the integer "
                "program does not read; convert a model whose rule has static calibrated "
                "ranges (the same rule without scaling, calibrated)"
            )
        if q.rule.act_scale != "static":  # no silent swap to the calibrated ranges
            raise ValueError(
                f"layer {path!r} has act_scale={q.rule.act_scale!r}: an integer program needs "
                "static activation ranges; quantize with act_scale='static' and calibrate"
            )
        if q.input_qparams is None:
            raise ValueError(
                f"layer {path!r} has no input QParams: calibrate the model (phase "
                "'calibrate') or quantize its activations (rule.act) before converting"
            )
        out.append(q)
    return out
