"""Quantized ``flax.linen`` layers and rule-based quantization of plain Linen models.

Hand-built layers :class:`QDense` and :class:`QConv` are ``nn.Dense`` / ``nn.Conv`` with a
``rule`` and a ``phase``; they run Flax's own Dense / Conv code with a :class:`QuantOp`
injected through ``dot_general=`` / ``conv_general_dilated=`` (depthwise convs through
``feature_group_count``). :class:`ActQuant`, :class:`QAvgPool` and :class:`QMaxPool` quantize
activations and pool them the TFLite way (the output keeps the input's scale and zero point).

:func:`quantize_model` quantizes a plain model (one that knows nothing of jquant) through
Flax's ``nn.intercept_methods``: every ``nn.Dense`` / ``nn.DenseGeneral`` / ``nn.Conv`` /
``nn.Einsum`` call whose module path matches a rule runs as the corresponding jquant layer,
on the same scope, so the variables are the plain model's plus ``quant_stats`` and any
learned scales. An activation x activation einsum module (attention's products, see
:func:`jquant.nn.einsum.is_act_product`) gets a :class:`~jquant.nn.einsum.QuantActEinsum`
injected into its ``einsum`` attribute (dynamic ranges on both operands). Any other layer
with a ``kernel`` that a rule matches cannot be quantized: it stays float, is listed in
``RuleMatch.not_quantized`` and warned about. Hand-built jquant layers inside the model
(QDense, QEinsum, ActQuant, ...) run in the model's phase, so
:meth:`QuantizedModel.calibrate` calibrates them too. Pooling in a plain model
is a function call (``nn.max_pool`` / ``nn.avg_pool``), which no Flax mechanism intercepts, so
it stays float: max pooling is unchanged by that (a max of grid values is a grid value, and
the next layer's input quantizer rounds it the same way), while TFLite's integer average
pooling rounds the mean code once more; use :class:`QAvgPool` in the model for that, and
:func:`jquant.convert.convert` gives the deployed integer average in any case. Nothing global
changes::

    qmodel, match = quantize_model(CNN(), rules, x)   # match.unused: rules that hit nothing
    variables = qmodel.attach(float_variables, x)    # adds quant_stats / learned scales
    variables = qmodel.calibrate(variables, batches)  # PTQ ranges (+ learned-scale init)
    logits = qmodel.with_phase("eval").apply(variables, x)

Delayed scaling (``QuantRule(scaling="delayed")``, Transformer Engine's recipe) keeps each
layer's amax histories in the ``scaling_history`` collection, which ``init`` / ``attach``
create; a training step differentiates with respect to it as well and takes the gradient
as its next value ("overwrite with gradient", :mod:`jquant.ops.scaling`)::

    def loss_fn(params, hist):
        return loss(qmodel.apply({"params": params, "scaling_history": hist}, x), y)
    (g, hist) = jax.grad(loss_fn, (0, 1))(params, hist)   # hist: the next histories
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.calibration import calibration_loop
from jquant.nn.bn_folding import folded_batch_norm, folded_kernel
from jquant.nn.einsum import (
    QEinsum,
    QuantActEinsum,
    check_act_rule,
    einsum_dims,
    is_act_product,
    product_layer,
)
from jquant.nn.inject import QuantOp, quantize_activation
from jquant.nn.requant import (
    REQUANT_STAT,
    RequantOp,
    check_no_constants,
    pooled,
    requantized_add,
    requantized_mean,
    requantizes,
)
from jquant.nn.rules import (
    DEFAULT_RULE,
    QuantRule,
    RuleMatch,
    check_rules,
    first_match,
    match_rules,
    report_not_quantized,
    report_unused,
)
from jquant.nn.state import (
    STATS,
    LinenSlots,
    QuantizedLayer,
    check_phase,
    frozen_qparams,
    learned_from_stats,
    subtree,
)

__all__ = [
    "DEFAULT_RULE",
    "QDense",
    "QConv",
    "ActQuant",
    "QAvgPool",
    "QMaxPool",
    "QAdd",
    "QMean",
    "QuantizedModel",
    "QuantizedLayer",
    "quantize_model",
    "learned_from_calibration",
]

# module class -> (its injection field, QuantOp kind); nn.Einsum runs as QEinsum
_TARGETS: dict[type, tuple[str, str]] = {
    nn.Dense: ("dot_general", "dot_general"),
    nn.DenseGeneral: ("dot_general", "dot_general"),
    nn.Conv: ("conv_general_dilated", "conv"),
}
_QUANTIZABLE = (*_TARGETS, nn.Einsum)
_LAX_OPS = {"dot_general": jax.lax.dot_general, "conv": jax.lax.conv_general_dilated}


def _is_jquant_layer(module: nn.Module) -> bool:
    """A quantized layer (QDense, QEinsum, ActQuant, QConvBN, ...): a ``rule`` and a ``phase``."""
    return isinstance(getattr(module, "rule", None), QuantRule) and isinstance(
        getattr(module, "phase", None), str
    )


def _quantizable(module: nn.Module) -> bool:
    return isinstance(module, _QUANTIZABLE) and not _is_jquant_layer(module)


def _owns_kernel(module: nn.Module) -> bool:
    """Whether the module's own parameters include an array ``kernel`` (not a submodule)."""
    return module.has_variable("params", "kernel") and not isinstance(
        module.get_variable("params", "kernel"), Mapping
    )


def _channel_axes(module: nn.Module, kernel_ndim: int, args, kwargs) -> tuple[int, ...] | None:
    """The kernel's output axes (per-channel scales) of a DenseGeneral / Einsum call (the
    axes its dot_general does not contract); None for Dense / Conv (the last axis)."""
    if isinstance(module, nn.Einsum):
        einsum_str = kwargs.get("einsum_str", args[1] if len(args) > 1 else None)
        einsum_str = nn.merge_param("einsum_str", module.einsum_str, einsum_str)
        return einsum_dims(einsum_str.replace(" ", "")).rhs_kept
    if isinstance(module, nn.DenseGeneral):
        n_batch = len(_as_tuple(module.batch_dims))
        contracted = range(n_batch, n_batch + len(_as_tuple(module.axis)))
        return tuple(d for d in range(kernel_ndim) if d not in contracted)
    return None


def _as_tuple(v) -> tuple:
    return tuple(v) if isinstance(v, Iterable) else (v,)


def _check_no_custom_op(module: nn.Module) -> None:
    """Raises ValueError if a Dense / DenseGeneral / Conv brings its own product op
    (``dot_general`` / ``dot_general_cls`` / ``conv_general_dilated``), which Flax would run
    instead of the injected QuantOp."""
    field, kind = next((t for cls, t in _TARGETS.items() if isinstance(module, cls)), (0, 0))
    for name in (field, "dot_general_cls") if field else ():
        if getattr(module, name, None) not in (None, _LAX_OPS[kind]):
            raise ValueError(
                f"layer {'/'.join(module.path)!r} ({type(module).__name__}) sets its own "
                f"{name}; jquant quantizes the product by injecting it there: drop the "
                "custom op, or keep the layer float with QuantRule(<path>, keep_float=True)"
            )


def _quantized_call(module: nn.Module, rule: QuantRule, phase: str, call: Callable, *args, **kw):
    """Runs ``call`` (e.g. ``nn.Dense.__call__``) as ``module`` with a QuantOp injected.

    The clone is bound to ``module``'s own scope, so it reads and creates the same variables.
    An ``nn.Einsum`` runs as a :class:`~jquant.nn.einsum.QEinsum` on that scope.

    Raises:
      ValueError: the module brings its own product (``dot_general`` / ``dot_general_cls`` /
        ``conv_general_dilated``), which jquant would have to replace.
    """
    check_phase(phase)
    if isinstance(module, nn.Einsum):
        fields = {f.name: getattr(module, f.name) for f in dataclasses.fields(nn.Einsum)}
        fields = {k: v for k, v in fields.items() if k not in ("parent", "name")}
        return QEinsum(**fields, rule=rule, phase=phase, parent=module.scope)(*args, **kw)
    _check_no_custom_op(module)
    field, kind = next(t for cls, t in _TARGETS.items() if isinstance(module, cls))
    if requantizes(rule, phase):
        return _requantized_call(module, rule, call, field, kind, *args, **kw)
    op = QuantOp(LinenSlots(module), rule, phase, kind)
    clone = module.clone(parent=module.scope, **{field: op})
    return call(clone, *args, **kw)


def _requantized_call(module: nn.Module, rule: QuantRule, call, field: str, kind: str, *args, **kw):
    """The eval forward of a Dense / Conv with ``rule.requant``: the integer program's layer
    (:mod:`jquant.nn.requant`), its int32 bias included (the clone runs without Flax's)."""
    if isinstance(module, nn.DenseGeneral) or getattr(module, "padding", "") == "CIRCULAR":
        raise ValueError(
            f"layer {'/'.join(module.path)!r}: QuantRule.requant={rule.requant!r} supports "
            "nn.Dense and nn.Conv (zero padding) only"
        )
    op = RequantOp(LinenSlots(module), rule, kind)
    clone = module.clone(parent=module.scope, use_bias=False, **{field: op})
    return call(clone, *args, **kw)


class Fold(NamedTuple):
    """A bias-free Conv whose output goes straight into a BatchNorm, by module path."""

    conv: str
    bn: str
    epsilon: float


class BatchNormConstants(NamedTuple):
    """A BatchNorm's ``gamma``, ``beta`` and running ``mean`` / ``var`` (defaults if absent)."""

    gamma: jax.Array
    beta: jax.Array
    mean: jax.Array
    var: jax.Array

    @classmethod
    def of(cls, bn: Mapping, features: int) -> BatchNormConstants:
        """From a BatchNorm's variables ``{"params": ..., "batch_stats": ...}``."""
        params, stats = bn.get("params", {}), bn["batch_stats"]
        gamma = params.get("scale", jnp.ones((features,)))
        beta = params.get("bias", jnp.zeros((features,)))
        return cls(gamma, beta, stats["mean"], stats["var"])


@dataclasses.dataclass(frozen=True, eq=False)
class _FoldedOp:
    """The conv op of a Conv whose BatchNorm is folded: ``op(x, W gamma / sigma_R)``
    (:func:`jquant.nn.bn_folding.folded_kernel`)."""

    op: QuantOp
    bn: BatchNormConstants
    eps: float

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
        w = folded_kernel(rhs, self.bn.gamma, self.bn.mean, self.bn.var, self.eps)
        return self.op(lhs, w, *args, **kwargs)


class _FoldedConv(NamedTuple):
    """A folded Conv's outputs for its BatchNorm: the float ``conv(x, W)`` (the BN's input
    and batch statistics) and the quantized conv of the folded kernel."""

    y_float: jax.Array
    y_quant: jax.Array


class _Interception:
    """One ``init`` / ``apply`` of a :class:`QuantizedModel`: Flax's method interceptor.

    A folded Conv returns its float output, which its BatchNorm reads, and leaves its
    quantized output in ``folded`` under the BatchNorm's path; the BatchNorm's call takes it
    (:meth:`QuantizedModel._folded_bn`). Nothing outlives the call.
    """

    def __init__(self, qmodel: QuantizedModel):
        self.qmodel = qmodel
        self.folded: dict[str, _FoldedConv] = {}
        self.requantized: list[jax.Array] = []  # outputs of layers with requant (eval)

    def __call__(self, next_fun, args, kwargs, context):
        return self.qmodel._intercept(self, next_fun, args, kwargs, context)


class QDense(nn.Dense):
    """jquant: ``nn.Dense`` whose product is quantized by ``rule`` (formats, estimator, mode).

    ``y = fq_in(x) @ fq_w(W) + b`` in train / eval; ``x @ W + b`` in float / calibrate.

    Attributes: those of ``nn.Dense`` plus ``rule`` (:class:`~jquant.nn.rules.QuantRule`) and
    ``phase`` (float, calibrate, train, eval); statistics in the ``quant_stats`` collection.
    """

    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``fq_in(x) @ fq_w(W) + b`` (train / eval) or ``x @ W + b`` (float / calibrate,
        which also updates the input's observer)."""
        return _quantized_call(self, self.rule, self.phase, nn.Dense.__call__, inputs)


class QConv(nn.Conv):
    """jquant: ``nn.Conv`` (depthwise with ``feature_group_count``) quantized by ``rule``.

    ``y = conv(fq_in(x), fq_w(W)) + b``; per-channel weight scales are per output channel.

    Attributes: those of ``nn.Conv`` plus ``rule`` (:class:`~jquant.nn.rules.QuantRule`) and
    ``phase`` (float, calibrate, train, eval); statistics in the ``quant_stats`` collection.
    """

    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """``conv(fq_in(x), fq_w(W)) + b`` (train / eval) or the float conv (float /
        calibrate, which also updates the input's observer)."""
        return _quantized_call(self, self.rule, self.phase, nn.Conv.__call__, inputs)


class ActQuant(nn.Module):
    """Fake-quantizes an activation with calibrated (or learned) QParams: ``fq(x)``.

    Uses the rule's ``act`` format, ``calibration`` and activation estimator.
    """

    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_phase(self.phase)
        return quantize_activation(LinenSlots(self), self.rule, self.phase, x)


class _QPool(nn.Module):
    window: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: str | tuple[tuple[int, int], ...] = "VALID"
    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.nowrap  # not a scoped method: the pool's operations carry the layer's own path
    def _pool(self, x, kind: str):
        check_phase(self.phase)
        slots = LinenSlots(self)
        return pooled(
            slots, self.rule, self.phase, kind, x, self.window, self.strides, self.padding
        )


class QAvgPool(_QPool):
    """TFLite average pooling of the quantized input: the mean code of the valid (unpadded)
    elements, rounded half away from zero; output keeps the input's scale and zero point.
    With ``rule.requant`` in phase ``eval``: the program's average pool of its input's codes
    on the grid :func:`jquant.convert.with_requant_constants` stores
    (:func:`jquant.nn.requant.requantized_avg_pool`)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "avg")


class QMaxPool(_QPool):
    """Max pooling of the quantized input; output keeps the input's scale and zero point."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "max")


class QAdd(nn.Module):
    """A residual add ``a + b`` that the integer program runs as TFLite's ``ADD``.

    Put it in a plain model where a residual ``+`` is (``QAdd(name="add")(conv2(h), h)``):
    without a rule, and in every phase but ``eval`` with ``rule.requant`` set, it is
    ``a + b``, so the float model, training and calibration are those of the ``+``. In phase
    ``eval`` with ``rule.requant=m`` it computes the program's integer add of the operands'
    codes (:func:`jquant.nn.requant.requantized_add`):
    ``s_y (ADD_m(q_a, q_b) - z_y)``. Inside a :class:`QuantizedModel` the first rule that
    matches its path is its rule (a rule given here wins).
    """

    rule: QuantRule | None = None
    phase: str = "float"

    @nn.compact
    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        check_phase(self.phase)
        if not requantizes(self.rule, self.phase):
            check_no_constants(LinenSlots(self), self.rule, self.phase, "add")
            return a + b
        return requantized_add(LinenSlots(self), self.rule, a, b)


class QMean(nn.Module):
    """A spatial mean (global average pooling) that the integer program runs as TFLite's
    ``MEAN``: ``mean(x, axis=(1, ..., ndim - 2))`` of channels-last ``x``.

    Put it in a plain model where ``jnp.mean(x, axis=(1, 2))`` is (``QMean(name="gap")(h)``):
    without a rule, and in every phase but ``eval`` with ``rule.requant`` set, it is that
    float mean. In phase ``eval`` with ``rule.requant=m`` it computes the program's integer
    mean of its input's codes (:func:`jquant.nn.requant.requantized_mean`):
    ``s_y (MEAN_m(q_x) - z_y)``. Inside a :class:`QuantizedModel` the first rule that matches
    its path is its rule (a rule given here wins).
    """

    rule: QuantRule | None = None
    phase: str = "float"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        check_phase(self.phase)
        if not requantizes(self.rule, self.phase):
            check_no_constants(LinenSlots(self), self.rule, self.phase, "mean")
            return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        return requantized_mean(LinenSlots(self), self.rule, x)


def learned_from_calibration(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables whose learned scales / zero points are set to their calibrated QParams.

    For every ``quant_stats/.../{t}_qparams`` with a ``params/.../{t}_scale`` (LSQ, LSQ+,
    PACT) the parameter takes the calibrated value; :meth:`QuantizedModel.calibrate` calls it.
    """
    variables = dict(variables)
    if STATS in variables and "params" in variables:
        variables["params"] = learned_from_stats(variables["params"], variables[STATS])
    return variables


def _deep_merge(base: Mapping, override: Mapping) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _call(qmodel: QuantizedModel, kind: str, kwargs: tuple, *args):
    """``qmodel.init(*args, **kwargs)`` (``kind="init"``) or the new ``quant_stats`` of one
    calibrate-phase ``apply(variables, batch)`` (``kind="calibrate"``)."""
    if kind == "init":
        return qmodel.init(*args, **dict(kwargs))
    variables, batch = args
    calibrating = qmodel.with_phase("calibrate")
    return calibrating.apply(variables, batch, mutable=[STATS], **dict(kwargs))[1].get(STATS, {})


# one compiled program per (model, kind, keyword arguments): jit's own cache, keyed on the
# static arguments (a QuantizedModel hashes by identity)
_jitted = jax.jit(_call, static_argnums=(0, 1, 2))


def _jitted_call(qmodel: QuantizedModel, kind: str, kwargs: Mapping[str, Any]) -> Callable:
    """``(*args) -> _call(qmodel, kind, kwargs, *args)`` under ``jax.jit``; compiled once per
    model, ``kind`` and hashable keyword arguments (unhashable ones: a fresh ``jax.jit``)."""
    key = tuple(sorted(kwargs.items()))
    try:
        hash(key)
    except TypeError:
        return jax.jit(functools.partial(_call, qmodel, kind, key))
    return functools.partial(_jitted, qmodel, kind, key)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedModel:
    """A plain Linen model run with quantization rules (see :func:`quantize_model`).

    ``init`` / ``apply`` are the model's, run inside ``nn.intercept_methods`` so that every
    matched Dense / Conv is quantized; the variable tree is the plain model's plus the
    ``quant_stats`` collection and learned-scale parameters.
    """

    model: nn.Module
    rules: tuple[QuantRule, ...]
    match: RuleMatch
    phase: str = "float"
    folds: tuple[Fold, ...] = ()  # Conv -> BatchNorm pairs trained folded
    channel_axes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # DenseGeneral / Einsum kernels
    products: tuple[str, ...] = ()  # paths of the activation x activation einsums

    def __post_init__(self):
        check_phase(self.phase)

    def _intercept(self, state: _Interception, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if isinstance(module, nn.BatchNorm) and path in state.folded:
            return self._folded_bn(module, state.folded.pop(path), args, kwargs)
        if (
            isinstance(module, nn.BatchNorm)
            and self.phase == "eval"
            and module.has_variable(STATS, REQUANT_STAT)
        ):
            return self._requant_folded_bn(state, path, args, kwargs)
        if is_act_product(module):  # an activation x activation einsum (attention)
            rule = first_match(self.rules, path)
            if rule is None:
                return next_fun(*args, **kwargs)
            clone = module.clone(parent=module.scope, einsum=QuantActEinsum(rule, self.phase))
            return clone(*args, **kwargs)
        if isinstance(module, QAdd | QMean) and module.rule is None:  # the rule of its path
            rule = first_match(self.rules, path)
            if rule is None:  # a plain ``a + b``
                return next_fun(*args, **kwargs)
            clone = module.clone(parent=module.scope, rule=rule, phase=self.phase)
            return clone(*args, **kwargs)
        if _is_jquant_layer(module):  # hand-built (or our own QEinsum): the model's phase
            if module.phase == self.phase:
                return next_fun(*args, **kwargs)
            clone = module.clone(parent=module.scope, phase=self.phase)
            return getattr(clone, context.method_name)(*args, **kwargs)
        if not _quantizable(module) or any(
            isinstance(getattr(module, f, None), QuantOp | _FoldedOp | RequantOp)
            for f, _ in _TARGETS.values()
        ):
            return next_fun(*args, **kwargs)  # not ours to quantize, or our own clone
        rule = first_match(self.rules, path)
        if rule is None:
            return next_fun(*args, **kwargs)
        fold = next((f for f in self.folds if f.conv == path), None)
        if requantizes(rule, self.phase):  # folded as convert folds it (the BN passes through)
            fold = None
        if fold is not None and self.phase != "float" and not module.is_initializing():
            y_float, y_quant = self._folded_conv(module, rule, fold, next_fun, args, kwargs)
            state.folded[fold.bn] = _FoldedConv(y_float, y_quant)
            return y_float
        y = _quantized_call(module, rule, self.phase, type(module).__call__, *args, **kwargs)
        if requantizes(rule, self.phase):
            state.requantized.append(y)
        return y

    def _requant_folded_bn(self, state: _Interception, path: str, args, kwargs) -> jax.Array:
        """A BatchNorm folded into the requantization constants of the layer it follows
        (:func:`jquant.convert.with_requant_constants`): its input, unchanged."""
        x = args[0] if args else kwargs["x"]
        if not any(x is y for y in state.requantized):
            raise ValueError(
                f"BatchNorm {path!r} is folded into the requantization constants of the layer "
                "before it, but its input does not come from a layer with QuantRule.requant: "
                "recompute the variables with jquant.convert.with_requant_constants for these "
                "rules"
            )
        return x

    def _folded_conv(self, conv, rule, fold: Fold, next_fun, args, kwargs):
        """``(conv(x, W), conv_q(x, W gamma / sigma_R))``: Jacob et al. (2018) sec. 3.2, as
        :class:`jquant.nn.bn_folding.QConvBN`; its BatchNorm (:meth:`_folded_bn`) finishes."""
        root = conv.scope.root.variables()
        bn = BatchNormConstants.of(
            {c: subtree(root.get(c, {}), fold.bn) for c in ("params", "batch_stats")},
            conv.features,
        )
        op = _FoldedOp(QuantOp(LinenSlots(conv), rule, self.phase, "conv"), bn, fold.epsilon)
        y_float = next_fun(*args, **kwargs)
        # the same variables again: a rewound scope (its names' reservations emptied)
        clone = conv.clone(parent=conv.scope.rewound(), conv_general_dilated=op)
        return y_float, type(conv).__call__(clone, *args, **kwargs)

    def _folded_bn(self, bn: nn.BatchNorm, folded: _FoldedConv, args, kwargs):
        """The BatchNorm after a folded conv: :func:`jquant.nn.bn_folding.folded_batch_norm`
        (running statistics in calibrate / eval, or when the call asks for them)."""
        x = args[0] if args else kwargs["x"]
        if x is not folded.y_float:  # something ran between the conv and its BatchNorm
            raise ValueError(
                f"fold_bn: BatchNorm {'/'.join(bn.path)!r} no longer reads its conv's output"
            )
        flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
        running = self.phase in ("calibrate", "eval") or bool(
            nn.merge_param("use_running_average", bn.use_running_average, flag)
        )
        c = BatchNormConstants.of(bn.variables, x.shape[-1])
        y, mean, var = folded_batch_norm(
            folded.y_quant, x, c.gamma, c.beta, c.mean, c.var, bn.epsilon, bn.momentum, running
        )
        if not running and not bn.is_initializing():
            bn.put_variable("batch_stats", "mean", mean)
            bn.put_variable("batch_stats", "var", var)
        return y

    def with_phase(self, phase: str) -> QuantizedModel:
        """The same model in another phase: float, calibrate, train or eval."""
        return dataclasses.replace(self, phase=phase)

    def init(self, rngs, *args, **kwargs) -> dict[str, Any]:
        """``model.init`` with the rules applied (creates ``quant_stats`` and learned scales)."""
        with nn.intercept_methods(_Interception(self)):
            return self.model.init(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        """``model.apply`` with the rules applied in this model's phase."""
        with nn.intercept_methods(_Interception(self)):
            return self.model.apply(variables, *args, **kwargs)

    def attach(self, variables: Mapping[str, Any], *args, rng=None, **kwargs) -> dict[str, Any]:
        """``variables`` of the plain model plus fresh quantization state (stats, scales)."""
        rng = jax.random.key(0) if rng is None else rng
        return _deep_merge(_jitted_call(self, "init", kwargs)(rng, *args), variables)

    def calibrate(
        self,
        variables: Mapping[str, Any],
        batches: Iterable[Any],
        *,
        max_batches: int | None = None,
        progress: bool = False,
        **apply_kwargs,
    ) -> dict[str, Any]:
        """Runs the calibrate phase (jitted) over ``batches`` of inputs
        (:func:`jquant.calibration.calibration_loop`: ``max_batches``, a progress bar with
        ``progress``), then sets learned scales from the calibrated ranges
        (:func:`learned_from_calibration`).

        Raises:
          ValueError: when ``batches`` yields nothing, or ``max_batches`` is not None or an
            int >= 1.
        """
        stats = _jitted_call(self, "calibrate", apply_kwargs)

        def step(variables, batch):
            return {**variables, STATS: stats(variables, batch)}

        variables = calibration_loop(
            step, dict(variables), batches, max_batches=max_batches, progress=progress
        )
        return learned_from_calibration(variables)

    def layers(self, variables: Mapping[str, Any]) -> list[QuantizedLayer]:
        """Deprecated alias of :meth:`quantized_layers` (the NNX function's name)."""
        warnings.warn(
            "QuantizedModel.layers is deprecated; use QuantizedModel.quantized_layers",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.quantized_layers(variables)

    def quantized_layers(self, variables: Mapping[str, Any]) -> list[QuantizedLayer]:
        """The layers the rules quantize, in call order: each layer with a kernel with its
        path, rule, weights and eval-time QParams, and each activation x activation einsum
        (attention's ``scores`` / ``mix``) with its path and rule and no kernel
        (:func:`jquant.nn.einsum.product_layer`). Layers kept float (no rule,
        ``keep_float``, a product with ``act=None``) are left out; so the list is the same as
        NNX's :func:`jquant.nn.nnx.quantized_layers` of the same model and rules (up to
        order), and ``QuantizedLayer.operands`` gives each entry's formats and scales."""
        out = []
        for path, rule in self.match.assignment.items():
            if rule is None or rule.keep_float:
                continue
            if path in self.products:
                if (product := product_layer(path, rule)) is not None:
                    out.append(product)
                continue
            params = subtree(variables["params"], path)
            stats = subtree(variables.get(STATS, {}), path)
            kernel = params["kernel"]
            axes = dict(self.channel_axes).get(path)
            qa, qw = frozen_qparams(
                rule.act_config(),
                rule.weight_config(kernel.ndim, axes),
                kernel,
                params,
                stats,
                rule.weight_scale_bound,
            )
            out.append(QuantizedLayer(path, rule, kernel, params.get("bias"), qa, qw))
        return out


def quantize_model(
    model: nn.Module,
    rules: QuantRule | Iterable[QuantRule],
    *example_args,
    phase: str = "float",
    on_unused: str = "warn",
    fold_bn: bool = False,
    **example_kwargs,
) -> tuple[QuantizedModel, RuleMatch]:
    """Quantizes a plain Linen model by rules matched on its Dense / DenseGeneral / Conv /
    Einsum module paths.

    Kernels are quantized per output channel (the axes their product does not contract:
    Conv's last axis, DenseGeneral's batch and feature axes, an einsum's free and batch
    axes) or per tensor, activations per tensor, in ``"simulate"`` or ``"int"`` mode.

    Linen builds submodules lazily, so the paths are found by tracing ``model.init`` on the
    example inputs (shapes only, ``jax.eval_shape``).

    With ``fold_bn=True`` every quantized bias-free ``nn.Conv`` whose output goes straight
    into an ``nn.BatchNorm`` (over the channel axis) trains with the BN folded into its
    quantized weights, exactly as :class:`jquant.nn.bn_folding.QConvBN` (Jacob et al. 2018,
    sec. 3.2): in the train, calibrate and eval phases, and with the plain model's variables.

    Args:
      model: any ``flax.linen`` module.
      rules: QuantRules, first match wins.
      *example_args, **example_kwargs: example inputs of ``model.__call__``.
      phase: initial phase.
      on_unused: ``"warn"``, ``"raise"`` (ValueError) or ``"ignore"`` rules that match nothing.

    Returns:
      ``(QuantizedModel, RuleMatch)``: the match maps every Dense / DenseGeneral / Conv /
      Einsum path to its rule (None: no rule, stays float), lists the unused rules and, in
      ``not_quantized``, the layers with a kernel that a rule matched but jquant cannot
      quantize (e.g. ``nn.ConvTranspose``), which are also warned about (UserWarning).

    Residual adds: a plain model's ``a + b`` is a ``jax.numpy`` operation, which no Flax
    mechanism intercepts (and jquant patches nothing), so it stays a float add in every
    phase; the integer program (:func:`jquant.convert.convert`) runs it as TFLite's ``ADD``
    of int8 codes. To have the eval forward compute that integer add too (with
    ``QuantRule.requant``), write the residual as a :class:`QAdd` module in the model,
    ``QAdd(name="add")(conv2(h), h)``: it is ``a + b`` outside that case, and takes the rule
    matching its path. Likewise a spatial mean ``jnp.mean(h, axis=(1, 2))`` as
    ``QMean(name="gap")(h)`` and an average pool as a :class:`QAvgPool` whose own rule sets
    ``requant`` (:func:`jquant.convert.with_requant_constants` refuses the function calls).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a flax.linen.Module, got {type(model).__name__}")
    check_phase(phase)
    rules = check_rules(rules)
    if not example_args and not example_kwargs:
        raise TypeError("quantize_model(linen_model, rules, *example_args): pass example inputs")
    if not isinstance(fold_bn, bool):
        raise TypeError(f"fold_bn must be a bool, got {fold_bn!r}")
    paths: list[str] = []
    unsupported: dict[str, str] = {}  # path -> type of a layer with a kernel jquant can't run
    channel_axes: dict[str, tuple[int, ...]] = {}
    products: list[str] = []  # activation x activation einsums
    conv_outputs: list[tuple[str, jax.Array]] = []  # (path, output) of bias-free Convs
    folds: list[Fold] = []

    def record(next_fun, args, kwargs, context):
        module, out = context.module, next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        path = "/".join(module.path)
        if _quantizable(module):
            if (rule := first_match(rules, path)) is not None and not rule.keep_float:
                _check_no_custom_op(module)
            paths.append(path)
            kernel_ndim = jnp.ndim(module.get_variable("params", "kernel"))
            axes = _channel_axes(module, kernel_ndim, args, kwargs)
            if axes is not None:
                channel_axes[path] = axes
            if isinstance(module, nn.Conv) and not module.use_bias:
                conv_outputs.append((path, out))
        elif is_act_product(module):
            if (rule := first_match(rules, path)) is not None:
                check_act_rule(rule, path)
            paths.append(path)
            products.append(path)
        elif not _is_jquant_layer(module) and _owns_kernel(module):
            unsupported[path] = type(module).__name__
        elif isinstance(module, nn.BatchNorm) and args:
            # the Conv whose output (the very value, not a copy) this BatchNorm reads
            conv = next((p for p, y in conv_outputs if y is args[0]), None)
            if conv is not None and module.axis == -1 and module.axis_name is None:
                folds.append(Fold(conv, path, float(module.epsilon)))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args, **example_kwargs))
    match = match_rules(rules, dict.fromkeys(paths), unsupported)
    report_unused(match, on_unused)
    report_not_quantized(match)
    if fold_bn:
        folds = [f for f in folds if (r := match.assignment.get(f.conv)) and not r.keep_float]
    folds = tuple(folds) if fold_bn else ()
    qmodel = QuantizedModel(
        model, rules, match, phase, folds, tuple(channel_axes.items()), tuple(products)
    )
    return qmodel, match
