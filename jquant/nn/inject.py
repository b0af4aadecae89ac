"""Stateful quantized ops that drop into Flax's ``dot_general=`` / ``conv_general_dilated=``.

:class:`QuantOp` has ``lax.dot_general``'s (or ``lax.conv_general_dilated``'s) signature. It
is built per call by a quantized layer, bound to that layer's variables (:class:`Slots`), and
handed to Flax's own Dense / Linear / Conv code through their injection points, so jquant
reuses Flax's shape, padding and bias logic instead of copying it. On each call it computes the
QParams of both operands for the current phase (:func:`tensor_qparams`) and runs
``jquant.ops`` (simulate or int), or the float lax op in the float and calibrate phases::

    y = op(fq_input(x), fq_kernel(w))      (train / eval)
    y = op(x, w)                           (float / calibrate)

With ``QuantRule(scaling="delayed")`` the QParams of the input, the kernel and the gradient
come from the layer's amax histories (:func:`delayed_operands`), and the product is wrapped
in :func:`jquant.ops.scaling.record_amax` / :func:`~jquant.ops.scaling.record_grad_amax`, so
the gradient with respect to each history is its next value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
from jax import lax

from jquant import ops
from jquant.formats import format_name
from jquant.nn.rules import QuantRule
from jquant.nn.state import Slots, tensor_qparams
from jquant.ops.scaling import AmaxHistory, record_amax, record_grad_amax
from jquant.quant import QParams, QuantConfig, fake_quant_config

__all__ = [
    "KINDS",
    "QuantOp",
    "kernel_config",
    "operand_qparams",
    "DelayedOperands",
    "delayed_operands",
    "quantize_activation",
    "pool_activation",
]

_FLOAT_OPS = {"dot_general": lax.dot_general, "conv": lax.conv_general_dilated}
_QUANT_OPS = {"dot_general": ops.dot_general, "conv": ops.conv_general_dilated}
_TRAIN_OPS = {"dot_general": ops.train_dot_general, "conv": ops.train_conv_general_dilated}
KINDS = tuple(_FLOAT_OPS)
GRAD_RNG = "quant"  # the RNG stream of stochastic rounding (gradients and forward)


def _quant_rng_key(slots, what: str = "gradients") -> jax.Array:
    """A key for stochastic rounding of ``what`` from the layer's ``"quant"`` RNG stream:
    Linen ``apply(..., rngs={"quant": key})``, NNX ``layer.quant_rngs = nnx.Rngs(quant=k)``."""
    module = slots.module
    if isinstance(module, nn.Module):
        if not module.has_rng(GRAD_RNG):
            raise ValueError(
                f"layer {slots.path!r} rounds {what} stochastically: apply the model with "
                f"rngs={{{GRAD_RNG!r}: key}}"
            )
        return module.make_rng(GRAD_RNG)
    rngs = getattr(module, "quant_rngs", None)
    if rngs is None:
        raise ValueError(
            f"layer {slots.path!r} rounds {what} stochastically: set its quant_rngs = "
            f"nnx.Rngs({GRAD_RNG}=key)"
        )
    return getattr(rngs, GRAD_RNG)()


def _forward_key(slots, rule: QuantRule) -> jax.Array | None:
    """The key of ``rule.rounding="stochastic"`` (weights and activations), else None."""
    return (
        _quant_rng_key(slots, "weights and activations") if rule.rounding == "stochastic" else None
    )


def kernel_config(
    rule: QuantRule, kind: str, rhs_ndim: int, dimension_numbers=None
) -> QuantConfig | None:
    """The kernel's QuantConfig: per channel along its output axes, i.e. the last axis of a
    conv kernel (HWIO) and every non-contracted axis of a ``dot_general`` kernel (Dense's
    ``(in, out)``, DenseGeneral's batch and feature axes, an einsum's free and batch axes)."""
    if kind != "dot_general":
        return rule.weight_config(rhs_ndim)
    (_, rhs_contract), _ = dimension_numbers
    contracted = {d % rhs_ndim for d in rhs_contract}
    return rule.weight_config(rhs_ndim, tuple(d for d in range(rhs_ndim) if d not in contracted))


def operand_qparams(
    slots: Slots,
    rule: QuantRule,
    phase: str,
    lhs: jax.Array,
    rhs: jax.Array,
    rhs_cfg: QuantConfig | None,
) -> tuple[QParams | None, QParams | None]:
    """QParams of the input (``lhs``) and the kernel (``rhs``, quantized by ``rhs_cfg``) of
    a layer in ``phase``."""
    qa = _act_qparams(slots, rule, phase, lhs)
    qw = tensor_qparams(
        slots,
        "kernel",
        rhs,
        rhs_cfg,
        phase,
        None,
        learned_init=rule.learned_init,
        scale_bound=rule.weight_scale_bound,
    )
    return qa, qw


@dataclasses.dataclass(frozen=True)
class DelayedOperands:
    """A product's operands under delayed scaling: ``lhs`` / ``rhs`` wrapped in
    :func:`~jquant.ops.scaling.record_amax`, their QParams and the gradient's (None: that
    tensor stays float), and ``finish(y)``, which wraps the product's output in
    :func:`~jquant.ops.scaling.record_grad_amax` (the identity without a gradient format)."""

    lhs: jax.Array
    rhs: jax.Array
    lhs_qparams: QParams | None
    rhs_qparams: QParams | None
    grad_qparams: QParams | None
    finish: Callable[[jax.Array], jax.Array]


def delayed_operands(
    slots: Slots, rule: QuantRule, lhs: jax.Array, rhs: jax.Array
) -> DelayedOperands:
    """Transformer Engine's delayed scaling of one product (``rule.scaling == "delayed"``).

    For each tensor ``t`` of ``rule.scaled_tensors()`` with history ``h_{t-1}`` (the layer's
    variable): ``scale = max(h_{t-1}) * 2^margin / fmt.max`` (1 while all zero), symmetric;
    under ``jax.grad`` the history's cotangent is ``(amax_t, h_{t-1}[:-1])`` with ``amax_t``
    the forward operand's ``max|.|`` or, for ``"grad"``, ``max|dL/dy|`` at the output.
    """
    recipe = rule.scaling_recipe()
    hist = {t: AmaxHistory(slots.history(t, rule.amax_history)) for t in rule.scaled_tensors()}
    qp = {}
    fmts = {"input": rule.act, "kernel": rule.weight, "grad": rule.grad_format()}
    for t, h in hist.items():
        qp[t] = recipe.qparams(h, fmts[t])
    if "input" in hist:
        lhs = record_amax(lhs, hist["input"])
    if "kernel" in hist:
        rhs = record_amax(rhs, hist["kernel"])

    def finish(y: jax.Array) -> jax.Array:
        return record_grad_amax(y, hist["grad"]) if "grad" in hist else y

    return DelayedOperands(lhs, rhs, qp.get("input"), qp.get("kernel"), qp.get("grad"), finish)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantOp:
    """``lax.dot_general`` / ``lax.conv_general_dilated`` look-alike with layer state.

    Args:
      slots: the layer's variables.
      rule: the layer's rule (formats, estimator, calibration, mode).
      phase: one of ``jquant.nn.state.PHASES``.
      kind: ``"dot_general"`` or ``"conv"``.
    """

    slots: Any
    rule: QuantRule
    phase: str
    kind: str

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
        if kwargs.get("out_sharding", 0) is None:  # nnx.Conv passes it; ops has no sharding
            del kwargs["out_sharding"]
        if self.rule.keep_float:
            return _FLOAT_OPS[self.kind](lhs, rhs, *args, **kwargs)
        dn = args[0] if args else kwargs.get("dimension_numbers")
        rhs_cfg = kernel_config(self.rule, self.kind, rhs.ndim, dn)
        delayed = None
        if self.rule.scaling == "delayed":  # reads (at init: creates) the histories
            delayed = delayed_operands(self.slots, self.rule, lhs, rhs)
        if delayed is None or self.phase in ("float", "calibrate"):
            qa, qw = operand_qparams(self.slots, self.rule, self.phase, lhs, rhs, rhs_cfg)
        if self.phase in ("float", "calibrate"):
            return _FLOAT_OPS[self.kind](lhs, rhs, *args, **kwargs)
        if self.phase == "eval" and self.rule.requant is not None:
            raise ValueError(
                f"layer {self.slots.path!r}: QuantRule.requant={self.rule.requant!r} is "
                "supported on Conv / Dense layers (Linen QDense, QConv, QConvBN and "
                "rule-quantized nn.Dense / nn.Conv; NNX QLinear, QConv, NnxQConvBN) only, not "
                "on this layer (an einsum, DenseGeneral / LinearGeneral: the integer program "
                "has no such layer): set requant=None for it"
            )
        bwd = self.rule.backward_config()
        train = {}
        if delayed is not None:
            lhs, rhs, qa, qw = delayed.lhs, delayed.rhs, delayed.lhs_qparams, delayed.rhs_qparams
        if bwd is not None:  # quantized backward products
            key = _quant_rng_key(self.slots) if bwd.stochastic else None
            qg = None if delayed is None else delayed.grad_qparams
            train = dict(bwd=bwd, key=key, grad_qparams=qg)
        elif rhs_cfg is not None or self.rule.act_config() is not None:  # stochastic forward?
            key = _forward_key(self.slots, self.rule)
            train = {} if key is None else dict(key=key)
        y = (_QUANT_OPS if bwd is None else _TRAIN_OPS)[self.kind](
            lhs,
            rhs,
            *args,
            lhs_quant=self.rule.act_config(),
            rhs_quant=rhs_cfg,
            lhs_qparams=qa,
            rhs_qparams=qw,
            mode=self.rule.mode,
            **train,
            **kwargs,
        )
        return y if delayed is None else delayed.finish(y)


def _check_no_scaling(slots: Slots, rule: QuantRule) -> None:
    if rule.scaling is not None and not rule.keep_float:
        raise ValueError(
            f"layer {slots.path!r}: QuantRule.scaling={rule.scaling!r} scales the products "
            "of Dense / Conv / Einsum layers; activation quantizers and pooling use "
            "calibrated ranges: give this layer a rule without scaling"
        )


def _act_qparams(slots: Slots, rule: QuantRule, phase: str, x: jax.Array) -> QParams | None:
    if rule.keep_float:
        return None
    return tensor_qparams(
        slots,
        "input",
        x,
        rule.act_config(),
        phase,
        rule.calibration,
        learned_init=rule.learned_init,
        act_scale=rule.act_scale,
    )


def quantize_activation(slots: Slots, rule: QuantRule, phase: str, x: jax.Array) -> jax.Array:
    """``fq(x)`` with the activation's calibrated or learned QParams (train / eval), else x; a
    block format (``jquant.mx``) quantizes its blocks along the last axis (the features).
    ``rule.rounding="stochastic"`` draws its key from the ``"quant"`` RNG stream."""
    _check_no_scaling(slots, rule)
    cfg = rule.act_config()
    qp = _act_qparams(slots, rule, phase, x)  # records calibration statistics
    if cfg is None or phase not in ("train", "eval"):
        return x
    cfg = cfg.with_block_axis(x.ndim - 1)
    return fake_quant_config(x, cfg, qp, key=_forward_key(slots, rule))


def pool_activation(
    slots: Slots, rule: QuantRule, phase: str, kind: str, x: jax.Array, window, strides, padding
) -> jax.Array:
    """TFLite pooling (``kind`` ``"avg"`` or ``"max"``) of the quantized ``x`` in train / eval:
    the output keeps the input's QParams, the average divides by the count of valid elements.
    Float pooling in the float and calibrate phases."""
    _check_no_scaling(slots, rule)
    cfg = rule.act_config()
    if cfg is not None and cfg.scales_itself:
        raise ValueError(
            f"layer {slots.path!r}: pooling keeps its input's QParams, but the rule's activation "
            f"format {format_name(cfg.fmt)} has none (its blocks scale themselves); keep the "
            "pooling layer float (QuantRule(<path>, keep_float=True)) or give it an integer act "
            "format"
        )
    if cfg is not None and cfg.rounding != "nearest_even":
        raise ValueError(
            f"layer {slots.path!r}: pooling quantizes its input as TFLite does (round half to "
            f"even), not with QuantRule.rounding={rule.rounding!r}; give the pooling layer a "
            "rule with the default rounding"
        )
    if cfg is not None and cfg.block_size is not None:
        raise ValueError(
            f"layer {slots.path!r}: pooling keeps its input's per-tensor QParams (TFLite), but "
            f"the rule has block-wise activation scales (act_block_size={cfg.block_size}); "
            "give the pooling layer a rule without act_block_size, or keep it float"
        )
    qp = _act_qparams(slots, rule, phase, x)
    if qp is None:
        float_pool = nn.avg_pool if kind == "avg" else nn.max_pool
        return float_pool(x, tuple(window), strides=strides, padding=padding)
    pool = ops.avg_pool if kind == "avg" else ops.max_pool
    return pool(x, qp, rule.act_config().fmt, window, strides, padding, mode="simulate")
