"""Quantized ``flax.nnx`` layers and rule-based quantization of plain NNX models.

:class:`QLinear` and :class:`QConv` are ``nnx.Linear`` / ``nnx.Conv`` whose injection point
(``dot_general`` / ``conv_general_dilated``) is a property returning a :class:`QuantOp` bound
to the layer's own variables, so Flax's own forward code runs with quantized products.
Statistics are :class:`QuantStat` variables (``nnx.state(model, QuantStat)``), learned scales
``nnx.Param``, delayed scaling's amax histories :class:`ScalingHistory` variables (a training
step differentiates with respect to them and writes their "gradients" back, see
:class:`~jquant.nn.state.ScalingHistory`); ``phase`` and ``rule`` are static attributes.

:func:`quantize_model` walks the model graph (``nnx.iter_graph``), and replaces each
``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` / ``nnx.Einsum`` whose path matches a
rule by the quantized layer (:class:`QLinear`, :class:`QLinearGeneral`, :class:`QConv`,
:class:`QEinsum`) holding the same kernel and bias. An activation x activation einsum
module (attention's ``q k^T`` and ``softmax(.) v``, :func:`jquant.nn.einsum.is_act_product`)
whose path matches a rule keeps its class: a :class:`QActEinsum` is injected into its
``einsum`` attribute, which quantizes both operands with their own dynamic ranges exactly as
the Linen rules do. The input model is left unchanged::

    qmodel, match = quantize_model(model, rules)
    calibrate(qmodel, batches)            # PTQ ranges (+ learned-scale init)
    with_phase(qmodel, "eval")

With ``QuantRule.requant`` the eval forward computes the integer program
(:mod:`jquant.nn.requant`, shared with Linen): :class:`QLinear`, :class:`QConv` and
:class:`NnxQConvBN` run its int32 layers, :class:`QAdd` / :class:`QMean` /
:class:`QAvgPool` (written in the model where ``a + b``, a spatial mean, an average pool
are) its ``ADD``, ``MEAN`` and ``AVERAGE_POOL_2D``, on the constants
:func:`jquant.convert.with_requant_constants` stores in a copy of the model (a BatchNorm it
folds becomes a :class:`RequantBatchNorm`). ``quantize_model`` gives each :class:`QAdd` /
:class:`QMean` without a rule the rule of its path.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jquant.calibration import calibration_loop
from jquant.calibration.driver import check_max_batches
from jquant.nn.bn_folding import (
    KERNEL_INIT,
    conv_bn,
    conv_keywords,
    folded_batch_norm,
    folded_kernel,
    running_statistics,
)
from jquant.nn.einsum import (
    QuantActEinsum,
    QuantEinsum,
    check_act_rule,
    einsum_dims,
    is_act_product,
    product_layer,
)
from jquant.nn.inject import QuantOp, quantize_activation
from jquant.nn.requant import (
    check_no_constants,
    pooled,
    product_op,
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
    NNXSlots,
    QuantizedLayer,
    QuantStat,
    ScalingHistory,
    check_phase,
    frozen_qparams,
    history_name,
    learned_from_stats,
    learned_placeholders,
    variable_key,
)

__all__ = [
    "QuantStat",
    "ScalingHistory",
    "NNXSlots",
    "QuantLayer",
    "QLinear",
    "QLinearGeneral",
    "QConv",
    "QEinsum",
    "QActEinsum",
    "ActQuant",
    "QAvgPool",
    "QMaxPool",
    "QAdd",
    "QMean",
    "RequantBatchNorm",
    "requant_batch_norm",
    "set_submodule",
    "NnxQConvBN",
    "quantize_model",
    "with_phase",
    "set_phase",
    "calibrate",
    "learned_from_calibration",
    "quantized_layers",
    "FoldLink",
    "FoldedQConv",
    "FoldedBatchNorm",
    "fold_pairs",
    "CallHook",
    "Hook",
    "with_call_hooks",
]


class QuantLayer(nnx.Module):
    """Mixin: the ``rule`` / ``phase`` / ``quant_path`` attributes of every quantized layer,
    and its learned scales (LSQ / LSQ+ / PACT ``nnx.Param``), which exist from construction
    so that an optimizer built before :func:`calibrate` keeps the same parameter tree."""

    def _init_quant(self, rule: QuantRule, phase: str, path: str) -> None:
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rule must be a QuantRule, got {type(rule).__name__}")
        check_phase(phase)
        self.rule = rule
        self.phase = phase
        self.quant_path = path
        self._init_learned()
        self._init_histories()

    def _init_histories(self) -> None:
        """Creates the amax histories of delayed scaling (zeros, ``rule.amax_history`` long)
        of a layer with a product (one holding a ``kernel``): :class:`ScalingHistory`."""
        if getattr(self, "kernel", None) is None:
            return
        for t in self.rule.scaled_tensors():
            zeros = jnp.zeros((self.rule.amax_history,), jnp.float32)
            setattr(self, history_name(t), ScalingHistory(zeros))

    def _kernel_channel_axes(self, ndim: int) -> tuple[int, ...] | None:
        """Per-channel axes of the kernel: None is the last axis (Linear, Conv)."""
        return None

    def _uncalibrated(self) -> bool:
        """Whether the layer quantizes its input with static ranges but holds no calibrated
        range yet (the train / eval phases need one; dynamic ranges come from each input;
        delayed scaling takes its ranges from the amax histories)."""
        return (
            self.rule.act_config() is not None
            and self.rule.act_scale == "static"
            and self.rule.scaling is None
            and getattr(self, variable_key("input", "qparams"), None) is None
        )

    def _init_learned(self) -> None:
        """Creates (or resets) the learned scales: the kernel's from its current range, the
        input's a placeholder that :func:`calibrate` sets (:func:`learned_placeholders`)."""
        kernel = getattr(self, "kernel", None)
        cfg_kernel = None
        if kernel is not None:
            ndim = kernel.value.ndim
            cfg_kernel = self.rule.weight_config(ndim, self._kernel_channel_axes(ndim))
        new = learned_placeholders(
            self.rule.act_config(), cfg_kernel, None if kernel is None else kernel.value
        )
        for name, value in new.items():
            if getattr(self, name, None) is None:
                setattr(self, name, nnx.Param(value))
            else:
                getattr(self, name).value = value


def _injected(kind: str, default, wrap=None, requant: bool = False) -> property:
    """A property for Flax's injection attribute: reads give a QuantOp bound to the layer
    (``wrap(op)`` when given), or with ``requant`` the layer's
    :func:`~jquant.nn.requant.product_op` (a RequantOp in requant eval); Flax's constructor
    may only write the default into it."""

    def get(self):
        if requant:
            return product_op(NNXSlots(self), self.rule, self.phase, kind)
        op = QuantOp(NNXSlots(self), self.rule, self.phase, kind)
        return op if wrap is None else wrap(op)

    def set_(self, value):
        if value is not default:
            raise TypeError(f"{type(self).__name__} quantizes its own product; got {value!r}")

    return property(get, set_)


class QLinear(nnx.Linear, QuantLayer):
    """jquant: ``nnx.Linear`` whose product is quantized by ``rule``: ``fq_in(x) @ fq_w(W) + b``.
    With ``rule.requant`` in phase ``eval``: the integer program's ``FULLY_CONNECTED``
    (:class:`jquant.nn.requant.RequantOp`, its int32 bias in place of ``b``).

    Args: those of ``nnx.Linear`` plus ``rule`` (QuantRule), ``phase`` and ``quant_path``
    (the name used in messages).
    """

    dot_general = _injected("dot_general", lax.dot_general, requant=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rule: QuantRule = DEFAULT_RULE,
        phase: str = "float",
        quant_path: str = "",
        rngs: nnx.Rngs,
        **kwargs,
    ):
        """A ``nnx.Linear`` (same arguments) quantized by ``rule`` in ``phase``; ``quant_path``
        names it in messages. Learned scales (LSQ / LSQ+ / PACT) exist from now on."""
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """``fq_in(x) @ fq_w(W) + b``; the program's layer in requant eval (class docstring)."""
        if not requantizes(self.rule, self.phase):
            return super().__call__(inputs, out_sharding)
        dims = (((inputs.ndim - 1,), (0,)), ((), ()))  # nnx.Linear's, the int32 bias inside
        return self.dot_general(inputs, self.kernel[...], dims)


class QConv(nnx.Conv, QuantLayer):
    """jquant: ``nnx.Conv`` (depthwise through ``feature_group_count``) quantized by ``rule``.
    With ``rule.requant`` in phase ``eval``: the integer program's ``CONV_2D``
    (:class:`jquant.nn.requant.RequantOp`, its int32 bias in place of Flax's float bias).

    Args: those of ``nnx.Conv`` plus ``rule``, ``phase`` and ``quant_path``.
    """

    conv_general_dilated = _injected("conv", lax.conv_general_dilated, requant=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size,
        strides=1,
        *,
        rule: QuantRule = DEFAULT_RULE,
        phase: str = "float",
        quant_path: str = "",
        rngs: nnx.Rngs,
        **kwargs,
    ):
        """A ``nnx.Conv`` (same arguments) quantized by ``rule`` in ``phase``; ``quant_path``
        names it in messages. Learned scales (LSQ / LSQ+ / PACT) exist from now on."""
        super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)

    def __call__(self, inputs: jax.Array, out_sharding=None) -> jax.Array:
        """``conv(fq_in(x), fq_w(W)) + b``; the program's layer in requant eval (class
        docstring), which runs ``nnx.Conv``'s forward without its float bias.

        Raises:
          ValueError: requant eval with padding other than zero padding (the program's).
        """
        if not requantizes(self.rule, self.phase):
            return super().__call__(inputs, out_sharding)
        if isinstance(self.padding, str) and self.padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
            raise ValueError(
                f"layer {self.quant_path!r}: QuantRule.requant={self.rule.requant!r} supports "
                f"zero padding only (the program's), got padding={self.padding!r}"
            )
        use_bias, self.use_bias = self.use_bias, False  # RequantOp adds the int32 bias
        try:
            return super().__call__(inputs, out_sharding)
        finally:
            self.use_bias = use_bias


class QLinearGeneral(nnx.LinearGeneral, QuantLayer):
    """jquant: ``nnx.LinearGeneral`` quantized by ``rule``: ``dot_general(fq_in(x), fq_w(W)) + b``;
    per-channel kernel scales along its batch and output-feature axes (those not contracted).

    Args: those of ``nnx.LinearGeneral`` plus ``rule``, ``phase`` and ``quant_path``.
    """

    dot_general = _injected("dot_general", None)

    def __init__(
        self,
        in_features,
        out_features,
        *,
        rule: QuantRule = DEFAULT_RULE,
        phase: str = "float",
        quant_path: str = "",
        rngs: nnx.Rngs,
        **kwargs,
    ):
        """A ``nnx.LinearGeneral`` (same arguments) quantized by ``rule`` in ``phase``;
        ``quant_path`` names it in messages. Learned scales (LSQ / LSQ+ / PACT) exist from now
        on."""
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)

    def _kernel_channel_axes(self, ndim: int) -> tuple[int, ...]:
        n_batch = len(self.batch_axis)
        contracted = range(n_batch, n_batch + len(self.in_features))
        return tuple(d for d in range(ndim) if d not in contracted)


class QEinsum(nnx.Einsum, QuantLayer):
    """jquant: ``nnx.Einsum`` quantized by ``rule``: ``einsum(fq_in(x), fq_w(W)) + b`` through
    :class:`jquant.nn.einsum.QuantEinsum` (two operands, no ellipsis); per-channel kernel
    scales along its non-contracted axes.

    Args: those of ``nnx.Einsum`` plus ``rule``, ``phase`` and ``quant_path``.
    """

    einsum_op = _injected("dot_general", jnp.einsum, QuantEinsum)

    def __init__(
        self,
        einsum_str: str,
        kernel_shape,
        bias_shape=None,
        *,
        rule: QuantRule = DEFAULT_RULE,
        phase: str = "float",
        quant_path: str = "",
        rngs: nnx.Rngs,
        **kwargs,
    ):
        """An ``nnx.Einsum`` (same arguments) quantized by ``rule`` in ``phase``; ``quant_path``
        names it in messages. Learned scales (LSQ / LSQ+ / PACT) exist from now on."""
        einsum_dims(einsum_str.replace(" ", ""))  # a dot_general, or a ValueError now
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)

    def _kernel_channel_axes(self, ndim: int) -> tuple[int, ...]:
        return einsum_dims(self.einsum_str).rhs_kept


class QActEinsum(QuantLayer):
    """jquant: ``jnp.einsum(einsum_str, a, b)`` look-alike of two activations, the op that
    :func:`quantize_model` injects into an activation x activation product module (its
    ``einsum`` attribute, e.g. ``jquant.models.gpt.NNXProduct``).

    In train / eval ``einsum(fq(a, qp_a), fq(b, qp_b))``, each operand with its own dynamic
    range (``rule.act_scale``), else the float einsum: the Linen rules' op
    (:class:`jquant.nn.einsum.QuantActEinsum`) run in this layer's current ``phase``, which
    :func:`with_phase` sets. It keeps no statistics and needs no calibration.

    Raises:
      ValueError: the rule asks for static (calibrated) activation ranges.
    """

    def __init__(self, *, rule: QuantRule = DEFAULT_RULE, phase: str = "float", quant_path=""):
        """The quantized einsum of the product at ``quant_path`` (named in messages)."""
        if isinstance(rule, QuantRule):
            check_act_rule(rule, quant_path or rule.pattern)
        self._init_quant(rule, phase, quant_path)

    def _uncalibrated(self) -> bool:
        return False  # dynamic ranges only: nothing to calibrate

    def __call__(self, einsum_str: str, a: jax.Array, b: jax.Array, **kwargs) -> jax.Array:
        """``einsum(fq(a), fq(b))`` in train / eval, ``einsum(a, b)`` otherwise."""
        return QuantActEinsum(self.rule, self.phase)(einsum_str, a, b, **kwargs)


class ActQuant(QuantLayer):
    """Fake-quantizes an activation with calibrated (or learned) QParams: ``fq(x)``."""

    def __init__(self, *, rule: QuantRule = DEFAULT_RULE, phase: str = "float", quant_path=""):
        self._init_quant(rule, phase, quant_path)

    def __call__(self, x: jax.Array) -> jax.Array:
        return quantize_activation(NNXSlots(self), self.rule, self.phase, x)


class _QPool(QuantLayer):
    def __init__(
        self,
        window,
        strides=None,
        padding="VALID",
        *,
        rule: QuantRule = DEFAULT_RULE,
        phase: str = "float",
        quant_path: str = "",
    ):
        self.window = tuple(window)
        self.strides = None if strides is None else tuple(strides)
        self.padding = padding
        self._init_quant(rule, phase, quant_path)

    def _pool(self, x, kind):
        slots = NNXSlots(self)
        return pooled(
            slots, self.rule, self.phase, kind, x, self.window, self.strides, self.padding
        )


class QAvgPool(_QPool):
    """TFLite average pooling of the quantized input (see ``jquant.ops.avg_pool``); with
    ``rule.requant`` in phase ``eval`` the program's average pool of its input's codes
    (:func:`jquant.nn.requant.requantized_avg_pool`), as the Linen ``QAvgPool``."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "avg")


class QMaxPool(_QPool):
    """Max pooling of the quantized input (see ``jquant.ops.max_pool``)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "max")


class _Glue(QuantLayer):
    """Mixin of the layers between products that requantize only in requant eval (no
    statistics, no learned scales; ``rule`` may be None: :func:`quantize_model` gives them
    the rule of their path)."""

    def _init_glue(self, rule: QuantRule | None, phase: str, path: str) -> None:
        if rule is not None and not isinstance(rule, QuantRule):
            raise TypeError(f"rule must be a QuantRule or None, got {type(rule).__name__}")
        check_phase(phase)
        self.rule, self.phase, self.quant_path = rule, phase, path

    def _uncalibrated(self) -> bool:
        return False


class QAdd(_Glue):
    """NNX twin of :class:`jquant.nn.linen.QAdd`: a residual ``a + b`` that, in phase ``eval``
    with ``rule.requant=m``, computes the program's TFLite ``ADD`` of the operands' codes
    (:func:`jquant.nn.requant.requantized_add`): ``s_y (ADD_m(q_a, q_b) - z_y)``."""

    def __init__(self, *, rule: QuantRule | None = None, phase: str = "float", quant_path=""):
        self._init_glue(rule, phase, quant_path)

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        if not requantizes(self.rule, self.phase):
            check_no_constants(NNXSlots(self), self.rule, self.phase, "add")
            return a + b
        return requantized_add(NNXSlots(self), self.rule, a, b)


class QMean(_Glue):
    """NNX twin of :class:`jquant.nn.linen.QMean`: the spatial mean of channels-last ``x``
    (global average pooling) that, in phase ``eval`` with ``rule.requant=m``, computes the
    program's TFLite ``MEAN`` of its input's codes (:func:`jquant.nn.requant.requantized_mean`)."""

    def __init__(self, *, rule: QuantRule | None = None, phase: str = "float", quant_path=""):
        self._init_glue(rule, phase, quant_path)

    def __call__(self, x: jax.Array) -> jax.Array:
        if not requantizes(self.rule, self.phase):
            check_no_constants(NNXSlots(self), self.rule, self.phase, "mean")
            return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))
        return requantized_mean(NNXSlots(self), self.rule, x)


class RequantBatchNorm(nnx.BatchNorm, _Glue):
    """An ``nnx.BatchNorm`` folded into the requantization constants of the QConv / QLinear
    before it (:func:`jquant.convert.with_requant_constants` puts it in place of the plain
    one, with the same variables): in phase ``eval`` it passes its input through (the layer
    before it already computed the folded program layer), otherwise it is the BatchNorm.

    Args: those of ``nnx.BatchNorm`` plus ``rule`` (its layer's), ``phase``, ``quant_path``.
    """

    def __init__(self, num_features: int, *, rule=None, phase="float", quant_path="", **kwargs):
        """An ``nnx.BatchNorm`` (same arguments) that passes through in phase ``eval``."""
        super().__init__(num_features, **kwargs)
        self._init_glue(rule, phase, quant_path)

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None):
        """``x`` in phase ``eval``, else the BatchNorm."""
        if self.phase == "eval":
            return x
        return super().__call__(x, use_running_average, mask=mask)


def requant_batch_norm(bn: nnx.BatchNorm, rule: QuantRule, path: str) -> RequantBatchNorm:
    """A :class:`RequantBatchNorm` with ``bn``'s hyperparameters and variables."""
    return _bn_copy(bn, RequantBatchNorm, rule=rule, quant_path=path)


class NnxQConvBN(QuantLayer):
    """jquant: NNX twin of :class:`jquant.nn.bn_folding.QConvBN` (same formulas): ``kernel``
    (``HWIO``), ``scale``, ``bias`` are ``nnx.Param``; running ``mean`` / ``var`` are
    ``nnx.BatchStat``; input statistics are ``QuantStat`` attributes. ``use_running_average``
    (None: by phase) and the call's argument choose running or batch statistics as in the
    Linen layer.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: Sequence[int],
        *,
        strides: int | Sequence[int] = 1,
        padding: str | Sequence[tuple[int, int]] = "SAME",
        feature_group_count: int = 1,
        use_running_average: bool | None = None,
        momentum: float = 0.99,
        epsilon: float = 1e-5,
        kernel_init: Callable = KERNEL_INIT,
        rule: QuantRule = DEFAULT_RULE,
        phase: str = "float",
        quant_path: str = "",
        rngs: nnx.Rngs,
    ):
        shape = (*kernel_size, in_features // feature_group_count, out_features)
        self.kernel = nnx.Param(kernel_init(rngs.params(), shape))
        self._init_quant(rule, phase, quant_path)
        self.scale = nnx.Param(jnp.ones((out_features,)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))
        self.mean = nnx.BatchStat(jnp.zeros((out_features,)))
        self.var = nnx.BatchStat(jnp.ones((out_features,)))
        self.kernel_size = tuple(kernel_size)
        self.strides, self.padding = strides, padding
        self.feature_group_count = feature_group_count
        self.use_running_average = use_running_average
        self.momentum, self.epsilon = momentum, epsilon

    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        check_phase(self.phase)
        conv_kw = conv_keywords(
            x, self.kernel_size, self.strides, self.padding, self.feature_group_count
        )
        running = running_statistics(self.phase, use_running_average, self.use_running_average)
        y, mean, var = conv_bn(
            product_op(NNXSlots(self), self.rule, self.phase, "conv"),
            x,
            self.kernel.value,
            self.scale.value,
            self.bias.value,
            self.mean.value,
            self.var.value,
            conv_kw,
            self.epsilon,
            self.momentum,
            running,
        )
        if not running:
            self.mean.value, self.var.value = mean, var
        return y


class FoldLink:
    """The channel of one folded Conv -> BatchNorm pair within a forward pass.

    The :class:`FoldedQConv` returns its float output ``conv(x, W)`` (what its BatchNorm
    reads) and leaves here, for the :class:`FoldedBatchNorm` that reads that very value, a
    function computing its quantized output from a kernel transform; the BatchNorm takes it at
    once. A static attribute of both layers (no variable); it is empty between calls.
    """

    def __init__(self, conv: str, bn: str):
        self.conv = conv
        self.bn = bn
        self._pending: tuple[jax.Array, Callable, str] | None = None

    def put(self, y_float: jax.Array, quantized: Callable, phase: str) -> None:
        """Leaves the conv's float output, ``quantized(kernel_fn) -> y`` and its phase."""
        self._pending = (y_float, quantized, phase)

    def take(self, x: jax.Array) -> tuple[Callable, str] | None:
        """``(quantized, phase)`` left by the conv whose output ``x`` is; None when nothing
        is pending (phase float: the BatchNorm runs as it is).

        Raises:
          ValueError: the BatchNorm reads something other than its conv's output.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending[0] is not x:
            raise ValueError(
                f"fold_bn: BatchNorm {self.bn!r} no longer reads the output of {self.conv!r}"
            )
        return pending[1], pending[2]


class FoldedQConv(QConv):
    """jquant: a :class:`QConv` whose BatchNorm (a :class:`FoldedBatchNorm`) is folded into
    its quantized weights (Jacob et al. 2018, sec. 3.2), as
    :class:`jquant.nn.bn_folding.QConvBN` with the plain model's variables. In phase float it
    is the float conv; otherwise it returns ``conv(x, W)`` for its BatchNorm, which computes
    ``conv(fq(x), fq(W gamma / sigma_R))`` through ``fold_link`` and finishes with
    :func:`jquant.nn.bn_folding.folded_batch_norm`.

    Args: those of :class:`QConv` plus ``fold_link`` (:class:`FoldLink`).
    """

    def __init__(self, *args, fold_link: FoldLink, **kwargs):
        """A :class:`QConv` (same arguments) paired with a BatchNorm through ``fold_link``."""
        super().__init__(*args, **kwargs)
        self.fold_link = fold_link
        self.op_override = None

    @property
    def conv_general_dilated(self):
        op = getattr(self, "op_override", None)
        return QConv.conv_general_dilated.fget(self) if op is None else op

    @conv_general_dilated.setter
    def conv_general_dilated(self, value):
        QConv.conv_general_dilated.fset(self, value)

    def _with_op(self, op: Callable, x: jax.Array) -> jax.Array:
        """``nnx.Conv``'s forward with ``op`` as its ``conv_general_dilated``."""
        self.op_override = op
        try:
            return nnx.Conv.__call__(self, x)
        finally:
            self.op_override = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``conv(x, W)`` (phase float: the BatchNorm runs plain; otherwise the BatchNorm
        finishes the folded layer)."""
        if self.phase == "float":
            return super().__call__(x)
        if requantizes(self.rule, self.phase):  # the program's conv, its BatchNorm folded in
            y = super().__call__(x)
            self.fold_link.put(y, None, self.phase)  # the BatchNorm passes it through
            return y
        y_float = self._with_op(lax.conv_general_dilated, x)
        op = QuantOp(NNXSlots(self), self.rule, self.phase, "conv")

        def quantized(kernel_fn: Callable) -> jax.Array:
            return self._with_op(lambda lhs, rhs, *a, **k: op(lhs, kernel_fn(rhs), *a, **k), x)

        self.fold_link.put(y_float, quantized, self.phase)
        return y_float


class FoldedBatchNorm(nnx.BatchNorm):
    """jquant: the ``nnx.BatchNorm`` of a :class:`FoldedQConv` (same variables): plain in
    phase float; otherwise :func:`jquant.nn.bn_folding.folded_batch_norm` of the conv's
    quantized output with the folded kernel ``W gamma / sigma_R``, running statistics in the
    calibrate and eval phases or when the call (or ``use_running_average``) asks for them.

    Args: those of ``nnx.BatchNorm`` plus ``fold_link`` (:class:`FoldLink`).
    """

    def __init__(self, num_features: int, *, fold_link: FoldLink, **kwargs):
        """An ``nnx.BatchNorm`` (same arguments) paired with a conv through ``fold_link``."""
        super().__init__(num_features, **kwargs)
        self.fold_link = fold_link

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *, mask=None):
        """The folded conv + BN output (the plain BatchNorm in phase float)."""
        pending = self.fold_link.take(x)
        if pending is None:
            return super().__call__(x, use_running_average, mask=mask)
        quantized, phase = pending
        if quantized is None:  # requant eval: the conv computed the folded program layer
            return x
        if mask is not None:
            raise ValueError(f"fold_bn: BatchNorm {self.fold_link.bn!r} cannot take a mask")
        flag = self.use_running_average if use_running_average is None else use_running_average
        if flag is None and phase not in ("calibrate", "eval"):
            raise ValueError("No `use_running_average` argument was provided to BatchNorm")
        running = phase in ("calibrate", "eval") or bool(flag)
        n = x.shape[-1]
        gamma = jnp.ones((n,)) if self.scale is None else self.scale.value
        beta = jnp.zeros((n,)) if self.bias is None else self.bias.value
        mean_r, var_r = self.mean.value, self.var.value
        y_quant = quantized(lambda w: folded_kernel(w, gamma, mean_r, var_r, self.epsilon))
        y, mean, var = folded_batch_norm(
            y_quant, x, gamma, beta, mean_r, var_r, self.epsilon, self.momentum, running
        )
        if not running:
            self.mean.value, self.var.value = mean, var
        return y


def fold_pairs(model: nnx.Module, *example_args, **example_kwargs) -> list[tuple[str, str]]:
    """``(conv path, BatchNorm path)`` of each bias-free ``nnx.Conv`` whose output (the very
    value) goes straight into an ``nnx.BatchNorm`` over the channel axis, from one forward
    pass of a copy of ``model`` on the example inputs (:func:`with_call_hooks`)."""
    outputs: list[tuple[str, jax.Array]] = []
    pairs: list[tuple[str, str]] = []

    def hook(path, module, call, args, kwargs):
        y = call(*args, **kwargs)
        if not isinstance(module, nnx.BatchNorm):
            outputs.append((path, y))
        elif args and module.axis in (-1, args[0].ndim - 1) and module.axis_name is None:
            conv = next((p for p, out in outputs if out is args[0]), None)
            if conv is not None:
                pairs.append((conv, path))
        return y

    def select(path, m):
        return (type(m) is nnx.Conv and not m.use_bias) or type(m) is nnx.BatchNorm

    probe = with_call_hooks(nnx.clone(model), select, hook)
    probe(*example_args, **example_kwargs)
    return pairs


def set_submodule(model: nnx.Module, path: tuple, value: nnx.Module) -> None:
    """Puts ``value`` at the attribute / list-index ``path`` (non-empty) of ``model``, in
    place."""
    parent = model
    for key in path[:-1]:
        parent = parent[key] if isinstance(key, int) else getattr(parent, key)
    if isinstance(path[-1], int):
        parent[path[-1]] = value
    else:
        setattr(parent, path[-1], value)


def _bn_copy(bn: nnx.BatchNorm, cls: type, **extra) -> nnx.BatchNorm:
    """A ``cls(..., **extra)`` (a BatchNorm subclass) with ``bn``'s hyperparameters and
    variables."""
    params = inspect.signature(nnx.BatchNorm.__init__).parameters
    skip = ("self", "num_features", "rngs", "bias_metadata", "scale_metadata")
    kwargs = {n: getattr(bn, n) for n in params if n not in skip and hasattr(bn, n)}
    q = cls(bn.num_features, **extra, rngs=nnx.Rngs(0), **kwargs)
    q.scale, q.bias, q.mean, q.var = bn.scale, bn.bias, bn.mean, bn.var
    return q


def _folded_bn_copy(bn: nnx.BatchNorm, link: FoldLink) -> FoldedBatchNorm:
    """A :class:`FoldedBatchNorm` with ``bn``'s hyperparameters and variables."""
    return _bn_copy(bn, FoldedBatchNorm, fold_link=link)


# exact plain type -> its quantized layer (a subclass, e.g. nnx.LoRALinear, is not replaced)
_REPLACEMENTS = {
    nnx.Linear: QLinear,
    nnx.LinearGeneral: QLinearGeneral,
    nnx.Conv: QConv,
    nnx.Einsum: QEinsum,
}
_INJECTED = ("dot_general", "dot_general_cls", "conv_general_dilated", "einsum_op")
_NOT_COPIED = ("self", "rngs", "kernel_metadata", "bias_metadata", *_INJECTED)


def _quantized_copy(
    layer: nnx.Module, rule: QuantRule, phase: str, path: str, cls: type | None = None, **extra
) -> nnx.Module:
    """The quantized layer (``cls(..., **extra)``, default by type) with ``layer``'s
    hyperparameters and its kernel / bias variables.

    Raises:
      ValueError: the layer brings its own product op, which jquant would have to replace.
    """
    base = type(layer)
    params = inspect.signature(base.__init__).parameters
    for name in _INJECTED:
        if name in params and getattr(layer, name, None) is not params[name].default:
            raise ValueError(
                f"layer {path!r} ({base.__name__}) sets its own {name}; jquant quantizes the "
                "product by injecting it there: drop the custom op, or keep the layer float "
                "with QuantRule(<path>, keep_float=True)"
            )
    kwargs = {
        name: getattr(layer, name)
        for name in params
        if name not in _NOT_COPIED and hasattr(layer, name)
    }
    cls = _REPLACEMENTS[base] if cls is None else cls
    q = cls(**kwargs, **extra, rule=rule, phase=phase, quant_path=path, rngs=nnx.Rngs(0))
    q.kernel = layer.kernel
    q.bias = layer.bias
    q._init_learned()  # the kernel's learned scale from the real kernel
    return q


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _quant_layers(model: nnx.Module):
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, QuantLayer)]


# hook(path, module, call, args, kwargs) -> output; call(*args, **kwargs) runs the layer
Hook = Callable[[str, Any, Callable, tuple, dict], Any]


class CallHook(nnx.Module):
    """An NNX layer whose calls go through ``hook(path, layer, layer.__call__, args, kwargs)``
    (:func:`with_call_hooks`); its variables are the layer's, one level down (``layer``)."""

    def __init__(self, layer: nnx.Module, path: str, hook: Hook):
        self.layer = layer
        self.path = path
        self.hook = hook

    def __call__(self, *args, **kwargs):
        return self.hook(self.path, self.layer, self.layer.__call__, args, kwargs)


def with_call_hooks(
    model: nnx.Module, select: Callable[[str, nnx.Module], bool], hook: Hook
) -> nnx.Module:
    """``model`` itself (changed in place: pass a copy) with each submodule ``m`` at ``path``
    for which ``select(path, m)`` replaced by ``CallHook(m, path, hook)``: the NNX counterpart
    of ``nn.intercept_methods`` for one forward pass, made by graph surgery on a copy instead
    of interception. Paths are attribute paths joined by ``/`` (list items by index)."""
    found = [
        (p, m)
        for p, m in nnx.iter_graph(model)
        if p and isinstance(m, nnx.Module) and select(_path_str(p), m)
    ]
    for p, m in found:
        parent = model
        for key in p[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        wrapped = CallHook(m, _path_str(p), hook)
        if isinstance(p[-1], int):
            parent[p[-1]] = wrapped
        else:
            setattr(parent, p[-1], wrapped)
    return model


def quantize_model(
    model: nnx.Module,
    rules: QuantRule | Iterable[QuantRule],
    *example_args,
    phase: str = "float",
    on_unused: str = "warn",
    fold_bn: bool = False,
    **example_kwargs,
) -> tuple[nnx.Module, RuleMatch]:
    """A copy of ``model`` whose ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` /
    ``nnx.Einsum`` layers and activation x activation einsums (a :class:`QActEinsum`
    injected into the module's ``einsum``) are quantized by rules.

    Paths are the attribute paths joined by ``/`` (``"conv1"``, ``"blocks/0/linear"``); the
    first rule that fullmatches a path wins; ``keep_float`` rules leave the layer as it is.
    Learned scales (LSQ / LSQ+ / PACT) exist from now on (the input's as a placeholder that
    :func:`calibrate` sets), so an ``nnx.Optimizer`` may be built before calibration.

    With ``fold_bn=True`` (and example inputs of ``model.__call__``, which find the pairs:
    :func:`fold_pairs`) every quantized bias-free ``nnx.Conv`` whose output goes straight into
    an ``nnx.BatchNorm`` trains with the BN folded into its quantized weights, exactly as the
    Linen ``quantize_model(..., fold_bn=True)`` and :class:`jquant.nn.bn_folding.QConvBN`
    (Jacob et al. 2018, sec. 3.2): the pair becomes a :class:`FoldedQConv` and a
    :class:`FoldedBatchNorm` holding the same variables under the same paths.

    Returns:
      ``(quantized copy, RuleMatch)``; rules that match nothing are warned about, raised on
      or ignored according to ``on_unused``. Any other module with a ``kernel`` parameter
      (``nnx.ConvTranspose``, a subclass such as ``nnx.LoRALinear``) that a rule matches stays
      float: it is listed in ``RuleMatch.not_quantized`` and warned about (UserWarning).

    Raises:
      ValueError: a rule asks for static activation ranges on an activation x activation
        einsum (:func:`jquant.nn.einsum.check_act_rule`), which has only dynamic ones.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    check_phase(phase)
    rules = check_rules(rules)
    if not isinstance(fold_bn, bool):
        raise TypeError(f"fold_bn must be a bool, got {fold_bn!r}")
    if fold_bn and not example_args and not example_kwargs:
        raise TypeError(
            "quantize_model(nnx_model, rules, *example_args, fold_bn=True): pass example "
            "inputs (they show which BatchNorm reads which conv's output)"
        )
    pairs = dict(fold_pairs(model, *example_args, **example_kwargs)) if fold_bn else {}
    model = nnx.clone(model)
    targets, products, unsupported = {}, {}, {}
    paths = []  # the quantizable ones, in graph order
    for p, m in nnx.iter_graph(model):
        if not isinstance(m, nnx.Module) or isinstance(m, QuantLayer):
            continue
        if type(m) in _REPLACEMENTS:
            targets[_path_str(p)] = (p, m)
            paths.append(_path_str(p))
        elif is_act_product(m):
            products[_path_str(p)] = m
            paths.append(_path_str(p))
        elif isinstance(getattr(m, "kernel", None), nnx.Param):
            unsupported[_path_str(p)] = type(m).__name__
    match = match_rules(rules, paths, unsupported)
    for name in products:
        if (rule := match.assignment[name]) is not None:
            check_act_rule(rule, name)
    report_unused(match, on_unused)
    report_not_quantized(match)
    for name, rule in match.assignment.items():
        if rule is None or rule.keep_float:
            continue
        if name in products:
            op = QActEinsum(rule=rule, phase=phase, quant_path=name)
            products[name].einsum = nnx.data(op)  # a graph node (was a static function)
            continue
        path, layer = targets[name]
        if name in pairs:
            link = FoldLink(name, pairs[name])
            q = _quantized_copy(layer, rule, phase, name, FoldedQConv, fold_link=link)
        else:
            q = _quantized_copy(layer, rule, phase, name)
        if path:
            set_submodule(model, path, q)
        else:  # the model is itself the layer (path ""): its quantized copy is the model
            model = q
    bns = {
        _path_str(p): (p, m)
        for p, m in nnx.iter_graph(model)
        if type(m) is nnx.BatchNorm and _path_str(p) in pairs.values()
    }
    for _, m in nnx.iter_graph(model):
        if isinstance(m, FoldedQConv):
            bn_path, bn = bns[m.fold_link.bn]
            set_submodule(model, bn_path, _folded_bn_copy(bn, m.fold_link))
    for p, m in nnx.iter_graph(model):
        if isinstance(m, QAdd | QMean):  # the rule of its path (a rule given to it wins)
            m.rule = first_match(rules, _path_str(p)) if m.rule is None else m.rule
            m.quant_path, m.phase = m.quant_path or _path_str(p), phase
    return model, match


def set_phase(model: nnx.Module, phase: str) -> nnx.Module:
    """Deprecated alias of :func:`with_phase` (the Linen ``QuantizedModel``'s name)."""
    warnings.warn(
        "jquant.nn.nnx.set_phase is deprecated; use jquant.nn.nnx.with_phase",
        DeprecationWarning,
        stacklevel=2,
    )
    return with_phase(model, phase)


def with_phase(model: nnx.Module, phase: str) -> nnx.Module:
    """``model`` in another phase (float, calibrate, train or eval), as Linen's
    :meth:`~jquant.nn.linen.QuantizedModel.with_phase`: an NNX model is mutable, so this sets
    the phase of every quantized layer in place and returns the model.

    Raises:
      ValueError: for train / eval when a layer quantizing its input with static ranges was
        never calibrated.
    """
    check_phase(phase)
    layers = _quant_layers(model)
    if phase in ("train", "eval"):
        missing = [m.quant_path or _path_str(p) for p, m in layers if m._uncalibrated()]
        if missing:
            raise ValueError(
                f"phase={phase!r} needs calibrated ranges, but these layers were never "
                f"calibrated: {missing}; run calibrate(model, batches) first"
            )
    for _, m in layers:
        m.phase = phase
    return model


def _variables(layer: nnx.Module, kind) -> dict[str, Any]:
    return {k: v.value for k, v in vars(layer).items() if isinstance(v, kind)}


def learned_from_calibration(model: nnx.Module) -> nnx.Module:
    """Sets every learned scale / zero point to its calibrated QParams (in place)."""
    for _, m in _quant_layers(model):
        new = learned_from_stats(_variables(m, nnx.Param), _variables(m, QuantStat))
        for k, v in new.items():
            getattr(m, k).value = v
    return model


def calibrate(
    model: nnx.Module,
    batches: Iterable[Any],
    *,
    max_batches: int | None = None,
    progress: bool = False,
    **call_kwargs,
) -> nnx.Module:
    """Runs the calibrate phase (``nnx.jit``) over ``batches`` of inputs, in place
    (:func:`jquant.calibration.calibration_loop`: ``max_batches``, a progress bar with
    ``progress``), then sets learned scales from the calibrated ranges; the layers' phases are
    restored after.

    Raises:
      ValueError: when ``batches`` yields nothing, or ``max_batches`` is not None or an
        int >= 1.
    """
    check_max_batches(max_batches)
    before = {path: m.phase for path, m in _quant_layers(model)}
    with_phase(model, "calibrate")
    step = nnx.jit(lambda m, x: m(x, **call_kwargs))

    def run(m, batch):
        step(m, batch)
        return m

    try:
        calibration_loop(run, model, batches, max_batches=max_batches, progress=progress)
    finally:
        for path, m in _quant_layers(model):
            m.phase = before.get(path, "float")
    return learned_from_calibration(model)


def quantized_layers(model: nnx.Module) -> list[QuantizedLayer]:
    """The layers the rules quantize, in graph order: each Linear / LinearGeneral / Conv /
    Einsum with its path, rule, weights and eval QParams, and each activation x activation
    einsum (a :class:`QActEinsum`, attention's ``scores`` / ``mix``) with its path and rule
    and no kernel (:func:`jquant.nn.einsum.product_layer`). Layers kept float are left out,
    as in Linen's :meth:`jquant.nn.linen.QuantizedModel.quantized_layers`."""
    out = []
    for p, m in _quant_layers(model):
        path = m.quant_path or _path_str(p)
        if isinstance(m, QActEinsum):
            if (product := product_layer(path, m.rule)) is not None:
                out.append(product)
            continue
        if not isinstance(m, QLinear | QConv | QLinearGeneral | QEinsum) or m.rule.keep_float:
            continue
        kernel = m.kernel.value
        qa, qw = frozen_qparams(
            m.rule.act_config(),
            m.rule.weight_config(kernel.ndim, m._kernel_channel_axes(kernel.ndim)),
            kernel,
            _variables(m, nnx.Param),
            _variables(m, QuantStat),
            m.rule.weight_scale_bound,
        )
        bias = None if m.bias is None else m.bias.value
        out.append(QuantizedLayer(path, m.rule, kernel, bias, qa, qw))
    return out
