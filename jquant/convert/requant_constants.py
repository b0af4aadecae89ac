"""The program's requantization constants, stored in the layers that ``QuantRule.requant``
makes compute the integer program in their eval forward (:mod:`jquant.nn.requant`).

The constants a layer cannot derive from its own variables under ``jit`` come from the
program :func:`jquant.convert.convert` builds (one source of truth, no second copy of the
choice of QParams): per Conv / Dense, its int32 bias ``b_int = round(b / (s_x s_w))``, the
multipliers of ``M = s_x s_w / s_y`` in the layer's mode
(:func:`jquant.convert.requant_for`, host-side, float64 for ``double`` / ``single``), and
the output's scale, zero point and clamp, i.e. the QParams ``convert`` gives the layer's
output (the next layer's input quantizer, the model's ``output_qparams``, or a residual
add's); per residual add (a ``QAdd``, whose rule may be its own), its operands' and output's
QParams and the ``ADD`` multipliers of every mode, by mode name; per spatial mean (a
``QMean``) likewise its input's and output's QParams and the ``MEAN`` multipliers of every
mode; per average pool (a ``QAvgPool``) the QParams of the pooled value (input and output
share them); a ``QMaxPool`` a marker (its max of grid values needs nothing, but without
``requant`` it would round onto its own grid). A BatchNorm after a Conv / Dense is folded as
``convert`` folds it: the layer's constants carry the folded bias and scales and ``w_sign =
sign(gamma)`` (the sign ``convert`` moves into the weight codes), and the BatchNorm passes
its input through in phase ``eval``: a Linen BatchNorm gets the marker ``requant =
{"folded": 1}``, an NNX ``nnx.BatchNorm`` is replaced (same variables) by a
:class:`~jquant.nn.nnx.RequantBatchNorm`. A ``QConvBN`` / ``NnxQConvBN`` gets the constants
of its folded kernel and bias (no sign: ``convert`` quantizes the folded kernel).

Linen models get new variables; an NNX model (``variables=None``) a copy holding the
constants as :class:`~jquant.nn.state.QuantStat` attributes ``requant`` of its layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.convert import source
from jquant.convert.build import conversion_plan, convert
from jquant.convert.nnx import GLUE_LAYERS
from jquant.convert.program import Add, Conv, Dense, Mean, Pool
from jquant.convert.targets import requant_for
from jquant.integer.fixed_point import MULTIPLIER_MODES
from jquant.nn import linen as ql
from jquant.nn import nnx as qnnx
from jquant.nn.requant import REQUANT_STAT
from jquant.nn.state import STATS, NNXSlots, subtree
from jquant.quant import QParams

__all__ = ["with_requant_constants"]


def _requant_dict(rq) -> dict[str, np.ndarray]:
    return {"multiplier": np.asarray(rq.multiplier), "shift": np.asarray(rq.shift, np.int32)}


def _grid(scale, zp, clamp) -> dict[str, np.ndarray]:
    return {
        "out_scale": np.float32(scale),
        "out_zp": np.int32(zp),
        "clamp": np.asarray(clamp, np.int32),
    }


def _output(layer) -> dict[str, np.ndarray]:
    return _grid(layer.out_scale, layer.out_zp, layer.clamp)


def _linear_constants(layer: Conv | Dense, mode: str) -> dict[str, np.ndarray]:
    return {"b": np.asarray(layer.b, np.int32), **_requant_dict(requant_for(layer, mode)),
            **_output(layer)}  # fmt: skip


def _add_constants(layer: Add, mode: str) -> dict[str, Any]:
    rq = requant_for(layer, mode)
    operand = lambda s, z, r: {"scale": np.float32(s), "zero_point": np.int32(z),  # noqa: E731
                               **_requant_dict(r)}  # fmt: skip
    return {
        "a": operand(layer.a_scale, layer.a_zp, rq.a),
        "b": operand(layer.b_scale, layer.b_zp, rq.b),
        "out": _requant_dict(rq.out),
        **_output(layer),
    }


def _mean_constants(layer: Mean, mode: str) -> dict[str, Any]:
    mr = requant_for(layer, mode)
    x = {"x_scale": np.float32(layer.x_scale), "x_zp": np.int32(layer.x_zp)}
    return {**x, **_requant_dict(mr.rq), **_grid(layer.out_scale, layer.out_zp, (-128, 127))}


# Linen glue layers (the NNX ones: jquant.convert.nnx.GLUE_LAYERS), by program step
_LINEN_GLUE = {Add: ql.QAdd, Mean: ql.QMean, Pool: ql.QAvgPool}
_NNX_GLUE = {Add: qnnx.QAdd, Mean: qnnx.QMean, Pool: qnnx.QAvgPool}


def _glue_paths(qmodel, variables, example_x, apply_kwargs) -> dict[str, type]:
    """``{path: class}`` of the jquant glue layers (``QAdd``, ``QMean``, pools) the model
    calls, from one abstract trace (Linen) or its graph (NNX)."""
    if isinstance(qmodel, nnx.Module):
        return {
            "/".join(map(str, p)): type(m)
            for p, m in nnx.iter_graph(qmodel)
            if isinstance(m, GLUE_LAYERS)
        }
    found: dict[str, type] = {}
    glue = (ql.QAdd, ql.QMean, ql.QAvgPool, ql.QMaxPool)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, glue):
            found["/".join(context.module.path)] = type(context.module)
        return next_fun(*args, **kwargs)

    model = qmodel.with_phase("float") if isinstance(qmodel, ql.QuantizedModel) else qmodel
    with nn.intercept_methods(interceptor), source.layer_phase("float"):
        jax.eval_shape(lambda x: model.apply(variables, x, **apply_kwargs), example_x)
    return found


def _check_glue(layer, glue: dict[str, type], nnx_model: bool) -> None:
    """ValueError unless the program step ``layer`` (an add, a mean, an average pool) comes
    from the jquant layer that computes it in requant eval: a function call (``a + b``,
    ``jnp.mean``, ``nn.avg_pool``) would silently stay float."""
    want = (_NNX_GLUE if nnx_model else _LINEN_GLUE)[type(layer)]
    if glue.get(layer.path) is want:
        return
    what = {Add: "residual add", Mean: "spatial mean", Pool: "average pool"}[type(layer)]
    raise ValueError(
        f"the {what} at {layer.path!r} is a function call, which the eval forward cannot "
        f"compute as the program does: write it as a {want.__name__} layer in the model "
        f"(jquant.nn.{'nnx' if nnx_model else 'linen'}.{want.__name__}) for QuantRule.requant"
    )


def _bn_sign(variables: Mapping[str, Any], bn_path: str, channels: int) -> np.ndarray:
    """``sign(k)`` of the BatchNorm factor ``k = gamma / sqrt(var + eps)``, i.e.
    ``sign(gamma)``: ``convert`` folds it into the weight codes (``q_w sign(k)``), so the
    program's accumulator is the layer's own times it, per output channel."""
    gamma = subtree(variables.get("params", {}), bn_path).get("scale", np.ones(channels))
    return np.sign(np.asarray(gamma, np.float64)).astype(np.int32)


def _put(tree: Mapping, path: str, name: str, value) -> dict:
    """``tree`` (nested dicts) with ``tree[path...][name] = value``."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    sub = dict(out.get(head, {}))
    out[head] = _put(sub, rest, name, value) if rest else {**sub, name: value}
    return out


def with_requant_constants(
    qmodel: ql.QuantizedModel | Any,
    variables: Mapping[str, Any] | None,
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    residual_qparams: Mapping[str, QParams] | None = None,
    **apply_kwargs,
) -> Any:
    """The requantization constants (module docstring) of each Conv / Dense (and folded
    conv + BN layer) whose rule sets ``requant``, each residual add, spatial mean and average
    pool, from ``convert(qmodel, variables, example_x, ...)``: Linen ``variables`` with them
    under ``quant_stats/<path>/requant``, or a copy of an NNX model holding them.

    Then ``qmodel.with_phase("eval").apply(returned, x)`` (NNX: ``with_phase(returned,
    "eval")(x)``), quantized with ``output_qparams``, equals ``run(convert(..., mode=m), x)``
    bit for bit when every layer's rule has ``requant=m``. Run it again after the weights or
    ranges change.

    Args:
      qmodel, variables, example_x, output_qparams, residual_qparams, **apply_kwargs: as
        :func:`jquant.convert.convert`. A Linen model built from jquant layers (``QDense``,
        ``QConv``, ``QConvBN``, ``QAdd`` with their own rules) is passed in phase ``float``,
        as ``convert`` traces it, with the rules it runs with. An NNX model (its rules fixed
        by :func:`jquant.nn.nnx.quantize_model` or its layers) is passed with
        ``variables=None``.

    Returns:
      New Linen variables, or a new NNX model (the input is not modified).

    Raises:
      TypeError: an NNX model with ``variables`` other than None.
      ValueError: as :func:`convert`; a residual add, spatial mean or average pool that is a
        function call instead of a ``QAdd`` / ``QMean`` / ``QAvgPool`` layer, naming it.
    """
    nnx_model = isinstance(qmodel, nnx.Module)
    if nnx_model and variables is not None:
        raise TypeError(
            "with_requant_constants of an NNX model reads the model's own variables: pass "
            f"variables=None, got {type(variables).__name__}"
        )
    variables = source.model_variables(qmodel, variables)
    example_x = jnp.asarray(example_x)
    program = convert(
        qmodel,
        variables,
        example_x,
        output_qparams=output_qparams,
        residual_qparams=residual_qparams,
        **apply_kwargs,
    )
    plan = conversion_plan(qmodel, variables, example_x, apply_kwargs)
    rules = {q.path: q.rule for q in plan.layers.values()}
    ops = [plan.ops[k] for k in plan.layers]
    bns = {op.node.path: op.bn.path for op in ops if op.bn is not None}
    glue = _glue_paths(qmodel, variables, example_x, apply_kwargs)
    found: dict[str, dict] = {}  # path -> constants
    folded: dict[str, str] = {}  # BatchNorm path -> the path of the layer it is folded into
    for layer, op in zip(program.layers, plan.ops, strict=True):
        if isinstance(layer, Conv | Dense):
            mode = rules[layer.path].requant
            if mode is None:
                continue
            constants = _linear_constants(layer, mode)
            if layer.path in bns and not isinstance(qmodel, ql.QuantizedModel | nnx.Module):
                raise ValueError(
                    f"layer {layer.path!r}: QuantRule.requant={mode!r} before BatchNorm "
                    f"{bns[layer.path]!r} needs a quantize_model model, whose eval forward "
                    "folds the BatchNorm as convert does"
                )
            if layer.path in bns:  # BN folded into the constants; the BN module passes through
                constants["w_sign"] = _bn_sign(variables, bns[layer.path], layer.b.shape[0])
                folded[bns[layer.path]] = layer.path
            found[layer.path] = constants
        elif isinstance(layer, Add | Mean) or (isinstance(layer, Pool) and layer.kind == "avg"):
            _check_glue(layer, glue, nnx_model)
            if isinstance(layer, Pool):  # mode-free: the pooled value's grid
                found[layer.path] = _grid(*plan.value_qp(op.out))
            else:  # a QAdd's / QMean's rule may be its own: every mode, by name
                of = _add_constants if isinstance(layer, Add) else _mean_constants
                found[layer.path] = {mode: of(layer, mode) for mode in MULTIPLIER_MODES}
        elif isinstance(layer, Pool) and glue.get(layer.path) in (ql.QMaxPool, qnnx.QMaxPool):
            # a marker: a QMaxPool whose rule lacks requant (its own grid) refuses to run
            found[layer.path] = {"max_pool": np.int32(1)}
    found = jax.tree.map(jnp.asarray, found)
    if nnx_model:
        return _nnx_with_constants(qmodel, found, folded, rules)
    stats = variables.get(STATS, {})
    for path, constants in found.items():
        stats = _put(stats, path, REQUANT_STAT, constants)
    for bn in folded:
        stats = _put(stats, bn, REQUANT_STAT, {"folded": jnp.int32(1)})
    return {**variables, STATS: stats}


def _nnx_with_constants(model: nnx.Module, found: dict, folded: dict, rules: dict) -> nnx.Module:
    """A copy of ``model`` with ``found[path]`` stored in the layer at each path and each
    plain ``nnx.BatchNorm`` in ``folded`` replaced by a :class:`RequantBatchNorm`."""
    model = nnx.clone(model)
    modules = {"/".join(map(str, p)): (p, m) for p, m in nnx.iter_graph(model) if p}
    for path, constants in found.items():
        NNXSlots(modules[path][1]).set_stat(REQUANT_STAT, constants)
    for bn_path, layer_path in folded.items():
        p, bn = modules[bn_path]
        if type(bn) is nnx.BatchNorm:  # a FoldedBatchNorm passes through by itself
            twin = qnnx.requant_batch_norm(bn, rules[layer_path], bn_path)
            twin.phase = modules[layer_path][1].phase  # the phase of the model's layers
            qnnx.set_submodule(model, p, twin)
    return model
