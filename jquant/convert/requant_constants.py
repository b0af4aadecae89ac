"""The program's requantization constants, stored in the layers that ``QuantRule.requant``
makes compute the integer program in their eval forward (:mod:`jquant.nn.requant`).

The constants a layer cannot derive from its own variables under ``jit`` come from the
program :func:`jquant.convert.convert` builds (one source of truth, no second copy of the
choice of QParams): per Conv / Dense, its int32 bias ``b_int = round(b / (s_x s_w))``, the
multipliers of ``M = s_x s_w / s_y`` in the layer's mode (:func:`jquant.convert.requant_for`,
host-side, float64 for ``double`` / ``single``), and the output's scale, zero point and clamp,
i.e. the QParams ``convert`` gives the layer's output (the next layer's input quantizer, the
model's ``output_qparams``, or a residual add's); per residual add (a
:class:`~jquant.nn.linen.QAdd`, whose rule may be its own), its operands' and output's QParams
and the ``ADD`` multipliers of every mode, by mode name. A BatchNorm after a Conv / Dense is
folded as ``convert`` folds it: the layer's constants carry the folded bias and scales and
``w_sign = sign(gamma)`` (the sign ``convert`` moves into the weight codes), and the
BatchNorm gets the marker ``requant = {"folded": 1}``, with which it passes its input
through in phase ``eval``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.convert import source
from jquant.convert.build import conversion_plan, convert
from jquant.convert.program import Add, Conv, Dense
from jquant.convert.targets import requant_for
from jquant.integer.fixed_point import MULTIPLIER_MODES
from jquant.nn import linen as ql
from jquant.nn.requant import REQUANT_STAT
from jquant.nn.state import STATS, subtree
from jquant.quant import QParams

__all__ = ["with_requant_constants"]


def _requant_dict(rq) -> dict[str, np.ndarray]:
    return {"multiplier": np.asarray(rq.multiplier), "shift": np.asarray(rq.shift, np.int32)}


def _output(layer) -> dict[str, np.ndarray]:
    return {
        "out_scale": np.float32(layer.out_scale),
        "out_zp": np.int32(layer.out_zp),
        "clamp": np.asarray(layer.clamp, np.int32),
    }


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
    variables: Mapping[str, Any],
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    residual_qparams: Mapping[str, QParams] | None = None,
    **apply_kwargs,
) -> dict[str, Any]:
    """``variables`` with, under ``quant_stats/<path>/requant``, the requantization constants
    of each Conv / Dense whose rule sets ``requant`` and of each residual add (module
    docstring), from ``convert(qmodel, variables, example_x, ...)``.

    Then ``qmodel.with_phase("eval").apply(returned, x)``, quantized with
    ``output_qparams``, equals ``run(convert(..., mode=m), x)`` bit for bit when every layer's
    rule has ``requant=m``. Run it again after the weights or ranges change.

    Args:
      qmodel, variables, example_x, output_qparams, residual_qparams, **apply_kwargs: as
        :func:`jquant.convert.convert` (a Linen model: NNX is not supported yet). A model
        built from jquant layers (``QDense``, ``QConv``, ``QAdd`` with their own rules) is
        passed in phase ``float``, as ``convert`` traces it, with the rules it runs with.

    Returns:
      New variables (the input is not modified).

    Raises:
      TypeError: an NNX model.
      ValueError: as :func:`convert`; a folded conv + BN layer (``QConvBN``,
        ``fold_bn=True``) with ``requant``, naming it.
    """
    if isinstance(qmodel, nnx.Module):
        raise TypeError(
            "with_requant_constants supports Linen models; QuantRule.requant on NNX models is "
            "not implemented yet"
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
    conv_bn = {op.node.path for op in ops if op.node.kind == "conv_bn"}
    stats = variables.get(STATS, {})
    for layer in program.layers:
        if isinstance(layer, Conv | Dense):
            mode = rules[layer.path].requant
            if mode is None:
                continue
            if layer.path in conv_bn:
                raise ValueError(
                    f"layer {layer.path!r}: QuantRule.requant={mode!r} is not supported on a "
                    "folded conv + BN layer (QConvBN, fold_bn=True)"
                )
            constants = _linear_constants(layer, mode)
            if layer.path in bns and not isinstance(qmodel, ql.QuantizedModel):
                raise ValueError(
                    f"layer {layer.path!r}: QuantRule.requant={mode!r} before BatchNorm "
                    f"{bns[layer.path]!r} needs a quantize_model model, whose eval forward "
                    "folds the BatchNorm as convert does"
                )
            if layer.path in bns:  # BN folded into the constants; the BN module passes through
                constants["w_sign"] = _bn_sign(variables, bns[layer.path], layer.b.shape[0])
                stats = _put(stats, bns[layer.path], REQUANT_STAT, {"folded": np.int32(1)})
            stats = _put(stats, layer.path, REQUANT_STAT, constants)
        elif isinstance(layer, Add):  # a QAdd's rule may be its own: every mode, by name
            by_mode = {mode: _add_constants(layer, mode) for mode in MULTIPLIER_MODES}
            stats = _put(stats, layer.path, REQUANT_STAT, by_mode)
    return {**variables, STATS: jax.tree.map(jnp.asarray, stats)}
