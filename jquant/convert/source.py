"""The model being converted: its graph, its quantized layers and its fake-quant forward.

Two kinds of models convert:

- a :class:`~jquant.nn.linen.QuantizedModel` (a plain Linen model quantized by rules);
- a Linen model built from jquant layers (:class:`~jquant.nn.linen.QDense`,
  :class:`~jquant.nn.linen.QConv`, :class:`~jquant.nn.bn_folding.QConvBN`), each carrying its
  own ``rule`` and ``phase`` (e.g. a QAT model with folded BatchNorm).

The two may mix: jquant layers inside a rule-quantized model keep their own rules. The graph
is traced with every jquant layer in phase ``float`` (plain lax products), the fake-quant
forward runs them in phase ``eval``, whatever phase the model was built with.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax

from jquant.convert.trace import Node, trace_layers
from jquant.nn import linen as ql
from jquant.nn.bn_folding import QConvBN, fold_bn
from jquant.nn.state import STATS, frozen_qparams

__all__ = ["JQUANT_LAYERS", "check_model", "layer_phase", "eval_forward", "trace", "layer_info"]

JQUANT_LAYERS = (ql.QDense, ql.QConv, QConvBN)
Model = ql.QuantizedModel | nn.Module


def check_model(model: Any) -> None:
    """TypeError unless ``model`` is a QuantizedModel or a Linen module."""
    if not isinstance(model, ql.QuantizedModel | nn.Module):
        raise TypeError(
            "qmodel must be a jquant.nn.linen.QuantizedModel or a Linen model built from jquant "
            f"layers (QDense, QConv, QConvBN), got {type(model).__name__}"
        )


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


def eval_forward(model: Model, variables: Mapping[str, Any], apply_kwargs: dict) -> Callable:
    """``x -> logits`` of the fake-quant model: rules and jquant layers in phase ``eval``."""
    evaluate = model.with_phase("eval") if isinstance(model, ql.QuantizedModel) else model

    def forward(x: jax.Array) -> jax.Array:
        with layer_phase("eval"):
            return evaluate.apply(variables, x, **apply_kwargs)

    return forward


def trace(model: Model, variables: Mapping[str, Any], x: jax.Array, apply_kwargs: dict):
    """The float model's graph (:func:`jquant.convert.trace.trace_layers`)."""
    with layer_phase("float"):
        return trace_layers(_plain(model), variables, x, **apply_kwargs)


def _subtree(tree: Mapping, path: str) -> Mapping:
    for key in path.split("/"):
        tree = tree.get(key, {})
    return tree


def _jquant_layer(node: Node, variables: Mapping[str, Any]) -> ql.QuantizedLayer:
    """The eval-time weights and QParams of a jquant layer; a QConvBN's kernel and bias are
    the folded ones its eval forward quantizes: ``W gamma / sigma_R`` and
    ``beta - gamma mu_R / sigma_R`` (:func:`jquant.nn.bn_folding.fold_bn`)."""
    module, path = node.module, node.path
    params = _subtree(variables.get("params", {}), path)
    stats = _subtree(variables.get(STATS, {}), path)
    if isinstance(module, QConvBN):
        bn = _subtree(variables.get("batch_stats", {}), path)
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
    return ql.QuantizedLayer(path, rule, kernel, bias, qa, qw)


def layer_info(model: Model, variables: Mapping[str, Any], nodes: list[Node]):
    """The :class:`~jquant.nn.linen.QuantizedLayer` of each linear node (in order).

    Raises:
      ValueError: a layer that is not quantized, has dynamic activation scales, or has no
        input QParams.
    """
    by_rule = (
        {q.path: q for q in model.layers(variables)} if isinstance(model, ql.QuantizedModel) else {}
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
        block_formats = [f.name for f in (q.rule.weight, q.rule.act) if hasattr(f, "block_size")]
        if block_formats:
            raise ValueError(
                f"layer {path!r} uses the block format(s) {block_formats}: the integer program "
                "has no kernel for them; convert an integer-format model"
            )
        if q.rule.block_size is not None:
            raise ValueError(
                f"layer {path!r} has block-wise weight scales (block_size={q.rule.block_size}): "
                "the integer program has no block-wise kernel; convert a per-channel model, or "
                "run this one with jquant.nn (mode='int' computes block-wise layers)"
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
