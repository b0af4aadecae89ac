"""Quantized einsums: both operands (input and kernel) quantized by a rule.

A two-operand einsum without ellipsis, repeated letters or letters summed inside one operand
is a ``dot_general`` followed by a transpose (:func:`einsum_dims`), so it runs through a
:class:`~jquant.nn.inject.QuantOp` and :func:`jquant.ops.dot_general` (``"simulate"`` or
``"int"`` mode)::

    y = transpose(dot_general(fq_in(x), fq_w(W), dims)) + b      (train / eval)
    y = einsum(x, W) + b                                          (float / calibrate)

The kernel's per-channel scales are along its non-contracted axes (those whose letters reach
the output), whatever their position, e.g. ``"bd,hd->bh"`` has one scale per ``h``.
:class:`QuantEinsum` is the op with ``jnp.einsum``'s signature that NNX's ``einsum_op=``
takes; :class:`QEinsum` is the quantized ``flax.linen.Einsum``.

An einsum of two activations (attention's ``q k^T`` and ``softmax(.) v``) has no kernel and
no calibrated range: :class:`QuantActEinsum` quantizes both operands with each one's own
dynamic range (``QuantRule.act_scale``, e.g. ``"dynamic_per_token"``: one scale per vector
along the last axis, the head features of ``q``, ``k``, ``v`` and the keys of the attention
probabilities)::

    y = einsum(fq(a, qp(a)), fq(b, qp(b)))       (train / eval)
    y = einsum(a, b)                             (float / calibrate)

A model exposes such a product as a parameter-free module with an ``einsum_str`` and an
``einsum`` attribute holding ``jnp.einsum`` (:func:`is_act_product`, e.g.
``jquant.models.gpt.Product``); ``quantize_model`` injects the quantized einsum there.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.estimators import fake_quant
from jquant.nn.inject import QuantOp
from jquant.nn.rules import DEFAULT_RULE, QuantRule
from jquant.nn.state import LinenSlots, QuantizedLayer, check_phase, dynamic_act_qparams

__all__ = [
    "EinsumDims",
    "einsum_dims",
    "QuantEinsum",
    "QEinsum",
    "QuantActEinsum",
    "check_act_rule",
    "is_act_product",
    "product_layer",
]


class EinsumDims(NamedTuple):
    """``lax.dot_general`` form of a two-operand einsum.

    ``dimension_numbers`` for ``dot_general(lhs, rhs, ...)``, whose output (batch axes, lhs
    free axes, rhs free axes) becomes the einsum's output by ``transpose(perm)``;
    ``rhs_kept`` are the rhs axes that are not contracted (per-channel axes of a kernel).
    """

    dimension_numbers: tuple
    perm: tuple[int, ...]
    rhs_kept: tuple[int, ...]


def einsum_dims(einsum_str: str) -> EinsumDims:
    """Parses ``"lhs,rhs->out"`` into :class:`EinsumDims`.

    Letters in both operands and not in the output are contracted, in both and in the output
    are batch axes, in one operand are free and must reach the output.

    >>> einsum_dims("bd,hd->bh").dimension_numbers
    (((1,), (1,)), ((), ()))

    Raises:
      ValueError: not of the form ``"lhs,rhs->out"``, ellipsis, a letter repeated within an
        operand or in the output, a letter summed inside one operand, or an output letter
        found in neither operand.
    """
    if not isinstance(einsum_str, str):
        raise TypeError(f"einsum_str must be a str, got {type(einsum_str).__name__}")
    s = einsum_str.replace(" ", "")
    if "..." in s or s.count("->") != 1 or s.count(",") != 1:
        raise ValueError(
            f"einsum_str must be 'lhs,rhs->out' with explicit letters (no ellipsis), "
            f"got {einsum_str!r}"
        )
    operands, out = s.split("->")
    lhs, rhs = operands.split(",")
    for name, term in (("lhs", lhs), ("rhs", rhs), ("output", out)):
        if not term.isalpha() and term:
            raise ValueError(f"einsum_str {einsum_str!r}: {name} {term!r} must be letters")
        if len(set(term)) != len(term):
            raise ValueError(
                f"einsum_str {einsum_str!r}: {name} {term!r} repeats a letter (traces and "
                "diagonals are not a dot_general)"
            )
    for name, term, other in (("lhs", lhs, rhs), ("rhs", rhs, lhs)):
        summed = [c for c in term if c not in other and c not in out]
        if summed:
            raise ValueError(
                f"einsum_str {einsum_str!r}: letters {summed} of the {name} are summed within "
                "it; sum them before the einsum"
            )
    missing = [c for c in out if c not in lhs and c not in rhs]
    if missing:
        raise ValueError(f"einsum_str {einsum_str!r}: output letters {missing} are in no operand")
    contract = [c for c in lhs if c in rhs and c not in out]
    batch = [c for c in lhs if c in rhs and c in out]
    lhs_free = [c for c in lhs if c not in rhs]
    rhs_free = [c for c in rhs if c not in lhs]
    dn = (
        (tuple(lhs.index(c) for c in contract), tuple(rhs.index(c) for c in contract)),
        (tuple(lhs.index(c) for c in batch), tuple(rhs.index(c) for c in batch)),
    )
    produced = batch + lhs_free + rhs_free
    perm = tuple(produced.index(c) for c in out)
    rhs_kept = tuple(i for i, c in enumerate(rhs) if c not in contract)
    return EinsumDims(dn, perm, rhs_kept)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantEinsum:
    """``jnp.einsum(einsum_str, x, W)`` look-alike that runs ``op``, a dot_general
    :class:`~jquant.nn.inject.QuantOp`: ``transpose(op(x, W, dims), perm)``."""

    op: QuantOp

    def __call__(
        self,
        einsum_str: str,
        lhs: jax.Array,
        rhs: jax.Array,
        *,
        precision=None,
        preferred_element_type=None,
        out_sharding=None,
    ) -> jax.Array:
        dims = einsum_dims(einsum_str)
        y = self.op(
            lhs,
            rhs,
            dims.dimension_numbers,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
        )
        return jnp.transpose(y, dims.perm)


class QEinsum(nn.Einsum):
    """jquant: ``nn.Einsum`` (input ``x`` as lhs, kernel ``W`` of ``shape`` as rhs) quantized by
    ``rule``: ``y = einsum(fq_in(x), fq_w(W)) + b`` in train / eval, float otherwise.

    Activations use the rule's calibrated (or learned) per-tensor QParams, the kernel its own
    range, per channel along its non-contracted axes when the rule says ``per_channel``.
    ``rule.mode="int"`` runs int8 x int8 -> int32 (:func:`jquant.ops.dot_general`).

    >>> layer = QEinsum((5, 6, 7), "abc,cde->abde", rule=QuantRule(".*"), phase="float")
    """

    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, inputs: jax.Array, einsum_str: str | None = None) -> jax.Array:
        """``einsum(fq_in(x), fq_w(W)) + b`` (train / eval) or the float einsum."""
        check_phase(self.phase)
        einsum_str = nn.merge_param("einsum_str", self.einsum_str, einsum_str).replace(" ", "")
        einsum_dims(einsum_str)  # validates before any variable is created
        kernel = self.param("kernel", self.kernel_init, self.shape, self.param_dtype)
        bias = None
        if self.use_bias:
            bias_shape, broadcast_shape = self._get_bias_shape(einsum_str, inputs, kernel)
            bias = self.param("bias", self.bias_init, bias_shape, self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        einsum = QuantEinsum(QuantOp(LinenSlots(self), self.rule, self.phase, "dot_general"))
        y = einsum(
            einsum_str,
            inputs,
            kernel,
            precision=self.precision,
            preferred_element_type=self.preferred_element_type,
        )
        if bias is not None:
            y = y + jnp.reshape(bias, broadcast_shape)
        return y


def is_act_product(module) -> bool:
    """Whether ``module`` is an activation x activation einsum open to quantization: it has
    a str ``einsum_str``, its ``einsum`` attribute is ``jnp.einsum`` (not yet injected) and it
    holds no ``kernel``."""
    return (
        isinstance(getattr(module, "einsum_str", None), str)
        and getattr(module, "einsum", None) is jnp.einsum
        and getattr(module, "kernel", None) is None
    )


def check_act_rule(rule: QuantRule, path: str) -> None:
    """Raises ValueError if ``rule`` asks to quantize the activation product at ``path``
    with static (calibrated) ranges, which such a product does not record, or with delayed
    scaling, which it does not keep."""
    if rule.scaling is not None and not rule.keep_float and rule.act is not None:
        raise ValueError(
            f"QuantRule.scaling={rule.scaling!r}: the activation x activation einsum {path!r} "
            "keeps no amax history; give it a rule with a dynamic act_scale, or keep it float "
            f"with QuantRule({path!r}, keep_float=True)"
        )
    if rule.keep_float or rule.act is None or rule.act_scale != "static":
        return
    raise ValueError(
        f"QuantRule.act_scale: the activation x activation einsum {path!r} quantizes both "
        "operands with their own dynamic ranges; set act_scale to one of "
        "'dynamic_per_tensor', 'dynamic_per_example', 'dynamic_per_token' (with "
        "act_estimator 'ste' or 'clipped_ste'), or keep it float with "
        f"QuantRule({path!r}, keep_float=True)"
    )


def product_layer(path: str, rule: QuantRule) -> QuantizedLayer | None:
    """The ``quantized_layers`` entry (Linen and NNX) of the activation x activation einsum
    at ``path`` matched by ``rule``: ``QuantizedLayer(path, rule, None, None, None, None)``,
    no kernel, bias or frozen QParams (both operands take their QParams from their own values
    at run time, ``rule.act_scale``; ``operands`` gives their formats). None when the product
    stays float, as a kept-float Dense is left out: ``keep_float`` or ``act=None``, for which
    :class:`QuantActEinsum` runs the float einsum.

    >>> product_layer("attn/scores", QuantRule(".*", act=None)) is None
    True
    """
    if rule.act_config() is None:
        return None
    return QuantizedLayer(path, rule, None, None, None, None)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantActEinsum:
    """``jnp.einsum(einsum_str, a, b)`` look-alike with both activations fake-quantized.

    In train / eval: ``einsum(fq(a, qp_a), fq(b, qp_b))`` with ``qp_x`` from ``x``'s own
    range (``rule.act_scale``; :func:`jquant.nn.state.dynamic_act_qparams`), format, symmetry
    and estimator of ``rule.act``; in float / calibrate (and with ``keep_float`` or
    ``act=None``) the float einsum. The weight fields of ``rule`` do not apply.

    >>> import jquant as jq
    >>> rule = QuantRule(".*", act="int8", act_scale="dynamic_per_token")
    >>> op = QuantActEinsum(rule, "eval")
    >>> op("ij,jk->ik", jnp.ones((2, 3)), jnp.ones((3, 4))).shape
    (2, 4)
    """

    rule: QuantRule
    phase: str

    def __post_init__(self):
        if not isinstance(self.rule, QuantRule):
            raise TypeError(f"rule must be a QuantRule, got {type(self.rule).__name__}")
        check_phase(self.phase)
        check_act_rule(self.rule, self.rule.pattern)

    def _fq(self, x: jax.Array) -> jax.Array:
        cfg = self.rule.act_config()
        qp = dynamic_act_qparams(x, cfg, self.rule.act_scale)
        return fake_quant(x, qp, cfg.fmt, rounding=cfg.rounding, estimator=cfg.estimator)

    def __call__(self, einsum_str: str, a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
        if self.phase in ("float", "calibrate") or self.rule.act_config() is None:
            return jnp.einsum(einsum_str, a, b, **kwargs)
        return jnp.einsum(einsum_str, self._fq(a), self._fq(b), **kwargs)
