"""Quantized ``flax.nnx`` layers and rule-based quantization of plain NNX models.

:class:`QLinear` and :class:`QConv` are ``nnx.Linear`` / ``nnx.Conv`` whose injection point
(``dot_general`` / ``conv_general_dilated``) is a property returning a :class:`QuantOp` bound
to the layer's own variables, so Flax's own forward code runs with quantized products.
Statistics are :class:`QuantStat` variables (``nnx.state(model, QuantStat)``), learned scales
``nnx.Param``; ``phase`` and ``rule`` are static attributes.

:func:`quantize_model` walks the model graph (``nnx.iter_graph``), and replaces each
``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` / ``nnx.Einsum`` whose path matches a
rule by the quantized layer (:class:`QLinear`, :class:`QLinearGeneral`, :class:`QConv`,
:class:`QEinsum`) holding the same kernel and bias; the input model is left unchanged::

    qmodel, match = quantize_model(model, rules)
    calibrate(qmodel, batches)            # PTQ ranges (+ learned-scale init)
    set_phase(qmodel, "eval")
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from jquant.nn.einsum import QuantEinsum, einsum_dims, is_act_product
from jquant.nn.inject import QuantOp, pool_activation, quantize_activation
from jquant.nn.linen import QuantizedLayer
from jquant.nn.rules import (
    DEFAULT_RULE,
    QuantRule,
    RuleMatch,
    check_rules,
    match_rules,
    report_not_quantized,
    report_unused,
)
from jquant.nn.state import (
    QuantStat,
    check_phase,
    frozen_qparams,
    learned_from_stats,
    learned_placeholders,
)

__all__ = [
    "QuantStat",
    "NNXSlots",
    "QuantLayer",
    "QLinear",
    "QLinearGeneral",
    "QConv",
    "QEinsum",
    "ActQuant",
    "QAvgPool",
    "QMaxPool",
    "quantize_model",
    "set_phase",
    "calibrate",
    "learned_from_calibration",
    "quantized_layers",
]


class NNXSlots:
    """:class:`jquant.nn.state.Slots` over an NNX module's attributes. Learned scales exist
    from construction (:meth:`QuantLayer._init_learned`); statistics are created on use."""

    initializing = False

    def __init__(self, module: nnx.Module):
        self.module = module
        self.path = module.quant_path

    def get_stat(self, name):
        v = getattr(self.module, name, None)
        return None if v is None else v.value

    def set_stat(self, name, value):
        v = getattr(self.module, name, None)
        if v is None:
            setattr(self.module, name, QuantStat(value))
        else:
            v.value = value

    def param(self, name, init):
        v = getattr(self.module, name, None)
        if v is None:  # created now, the parameter tree would change under an optimizer
            raise ValueError(
                f"layer {self.path!r} has no learned parameter {name!r}: its rule was changed "
                "after construction; build the layer (or quantize_model) with the final rule "
                "so that learned scales exist before an optimizer is built"
            )
        return v.value


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

    def _kernel_channel_axes(self, ndim: int) -> tuple[int, ...] | None:
        """Per-channel axes of the kernel: None is the last axis (Linear, Conv)."""
        return None

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


def _injected(kind: str, default, wrap=None) -> property:
    """A property for Flax's injection attribute: reads give a QuantOp bound to the layer
    (``wrap(op)`` when given); Flax's constructor may only write the default into it."""

    def get(self):
        op = QuantOp(NNXSlots(self), self.rule, self.phase, kind)
        return op if wrap is None else wrap(op)

    def set_(self, value):
        if value is not default:
            raise TypeError(f"{type(self).__name__} quantizes its own product; got {value!r}")

    return property(get, set_)


class QLinear(nnx.Linear, QuantLayer):
    """``nnx.Linear`` whose product is quantized by ``rule``: ``fq_in(x) @ fq_w(W) + b``.

    Args: those of ``nnx.Linear`` plus ``rule`` (QuantRule), ``phase`` and ``quant_path``
    (the name used in messages).
    """

    dot_general = _injected("dot_general", lax.dot_general)

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
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)


class QConv(nnx.Conv, QuantLayer):
    """``nnx.Conv`` (depthwise through ``feature_group_count``) quantized by ``rule``.

    Args: those of ``nnx.Conv`` plus ``rule``, ``phase`` and ``quant_path``.
    """

    conv_general_dilated = _injected("conv", lax.conv_general_dilated)

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
        super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)


class QLinearGeneral(nnx.LinearGeneral, QuantLayer):
    """``nnx.LinearGeneral`` quantized by ``rule``: ``dot_general(fq_in(x), fq_w(W)) + b``;
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
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)

    def _kernel_channel_axes(self, ndim: int) -> tuple[int, ...]:
        n_batch = len(self.batch_axis)
        contracted = range(n_batch, n_batch + len(self.in_features))
        return tuple(d for d in range(ndim) if d not in contracted)


class QEinsum(nnx.Einsum, QuantLayer):
    """``nnx.Einsum`` quantized by ``rule``: ``einsum(fq_in(x), fq_w(W)) + b`` through
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
        einsum_dims(einsum_str.replace(" ", ""))  # a dot_general, or a ValueError now
        super().__init__(einsum_str, kernel_shape, bias_shape, rngs=rngs, **kwargs)
        self._init_quant(rule, phase, quant_path)

    def _kernel_channel_axes(self, ndim: int) -> tuple[int, ...]:
        return einsum_dims(self.einsum_str).rhs_kept


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
        return pool_activation(
            slots, self.rule, self.phase, kind, x, self.window, self.strides, self.padding
        )


class QAvgPool(_QPool):
    """TFLite average pooling of the quantized input (see ``jquant.ops.avg_pool``)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "avg")


class QMaxPool(_QPool):
    """Max pooling of the quantized input (see ``jquant.ops.max_pool``)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "max")


# exact plain type -> its quantized layer (a subclass, e.g. nnx.LoRALinear, is not replaced)
_REPLACEMENTS = {
    nnx.Linear: QLinear,
    nnx.LinearGeneral: QLinearGeneral,
    nnx.Conv: QConv,
    nnx.Einsum: QEinsum,
}
_INJECTED = ("dot_general", "dot_general_cls", "conv_general_dilated", "einsum_op")
_NOT_COPIED = ("self", "rngs", "kernel_metadata", "bias_metadata", *_INJECTED)


def _quantized_copy(layer: nnx.Module, rule: QuantRule, phase: str, path: str) -> nnx.Module:
    """The quantized layer with ``layer``'s hyperparameters and its kernel / bias variables.

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
    q = _REPLACEMENTS[base](**kwargs, rule=rule, phase=phase, quant_path=path, rngs=nnx.Rngs(0))
    q.kernel = layer.kernel
    q.bias = layer.bias
    q._init_learned()  # the kernel's learned scale from the real kernel
    return q


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _quant_layers(model: nnx.Module):
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, QuantLayer)]


def quantize_model(
    model: nnx.Module,
    rules: QuantRule | Iterable[QuantRule],
    *,
    phase: str = "float",
    on_unused: str = "warn",
) -> tuple[nnx.Module, RuleMatch]:
    """A copy of ``model`` whose ``nnx.Linear`` / ``nnx.LinearGeneral`` / ``nnx.Conv`` /
    ``nnx.Einsum`` layers are quantized by rules.

    Paths are the attribute paths joined by ``/`` (``"conv1"``, ``"blocks/0/linear"``); the
    first rule that fullmatches a path wins; ``keep_float`` rules leave the layer as it is.
    Learned scales (LSQ / LSQ+ / PACT) exist from now on (the input's as a placeholder that
    :func:`calibrate` sets), so an ``nnx.Optimizer`` may be built before calibration.

    Returns:
      ``(quantized copy, RuleMatch)``; rules that match nothing are warned about, raised on
      or ignored according to ``on_unused``. Any other module with a ``kernel`` parameter
      (``nnx.ConvTranspose``, a subclass such as ``nnx.LoRALinear``) that a rule matches stays
      float: it is listed in ``RuleMatch.not_quantized`` and warned about (UserWarning).
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    check_phase(phase)
    rules = check_rules(rules)
    model = nnx.clone(model)
    targets, unsupported = {}, {}
    for p, m in nnx.iter_graph(model):
        if not isinstance(m, nnx.Module) or isinstance(m, QuantLayer):
            continue
        if type(m) in _REPLACEMENTS:
            targets[_path_str(p)] = (p, m)
        elif isinstance(getattr(m, "kernel", None), nnx.Param) or is_act_product(m):
            # activation x activation einsums: quantized by the Linen rules only (for now)
            unsupported[_path_str(p)] = type(m).__name__
    match = match_rules(rules, targets, unsupported)
    report_unused(match, on_unused)
    report_not_quantized(match)
    for name, rule in match.assignment.items():
        if rule is None or rule.keep_float:
            continue
        path, layer = targets[name]
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        q = _quantized_copy(layer, rule, phase, name)
        if isinstance(path[-1], int):
            parent[path[-1]] = q
        else:
            setattr(parent, path[-1], q)
    return model, match


def set_phase(model: nnx.Module, phase: str) -> nnx.Module:
    """Sets the phase of every quantized layer of ``model`` (in place) and returns it.

    Raises:
      ValueError: for train / eval when a layer quantizing its input was never calibrated.
    """
    check_phase(phase)
    layers = _quant_layers(model)
    if phase in ("train", "eval"):
        missing = [
            m.quant_path or _path_str(p)
            for p, m in layers
            if m.rule.act_config() is not None and getattr(m, "input_qparams", None) is None
        ]
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
    model: nnx.Module, batches: Iterable[Any], *, max_batches: int | None = None, **call_kwargs
) -> nnx.Module:
    """Runs the calibrate phase (``nnx.jit``) over ``batches`` of inputs, in place, then sets
    learned scales from the calibrated ranges; the layers' phases are restored after.

    Raises:
      ValueError: when ``batches`` yields nothing.
    """
    before = {id(m): m.phase for _, m in _quant_layers(model)}
    set_phase(model, "calibrate")
    step = nnx.jit(lambda m, x: m(x, **call_kwargs))
    n = 0
    for batch in batches:
        if max_batches is not None and n >= max_batches:
            break
        step(model, batch)
        n += 1
    for _, m in _quant_layers(model):
        m.phase = before.get(id(m), "float")
    if n == 0:
        raise ValueError("calibrate needs data: batches yielded no batch")
    return learned_from_calibration(model)


def quantized_layers(model: nnx.Module) -> list[QuantizedLayer]:
    """The quantized Linear / Conv layers with paths, rules, weights and eval QParams."""
    out = []
    for p, m in _quant_layers(model):
        if not isinstance(m, QLinear | QConv) or m.rule.keep_float:
            continue
        kernel = m.kernel.value
        qa, qw = frozen_qparams(
            m.rule.act_config(),
            m.rule.weight_config(kernel.ndim),
            kernel,
            _variables(m, nnx.Param),
            _variables(m, QuantStat),
            m.rule.weight_scale_bound,
        )
        bias = None if m.bias is None else m.bias.value
        out.append(QuantizedLayer(m.quant_path or _path_str(p), m.rule, kernel, bias, qa, qw))
    return out
