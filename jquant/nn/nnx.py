"""Quantized ``flax.nnx`` layers and rule-based quantization of plain NNX models.

:class:`QLinear` and :class:`QConv` are ``nnx.Linear`` / ``nnx.Conv`` whose injection point
(``dot_general`` / ``conv_general_dilated``) is a property returning a :class:`QuantOp` bound
to the layer's own variables, so Flax's own forward code runs with quantized products.
Statistics are :class:`QuantStat` variables (``nnx.state(model, QuantStat)``), learned scales
``nnx.Param``; ``phase`` and ``rule`` are static attributes.

:func:`quantize_model` walks the model graph (``nnx.iter_graph``), and replaces each
``nnx.Linear`` / ``nnx.Conv`` whose path matches a rule by the quantized layer holding the same
kernel and bias; the input model is left unchanged::

    qmodel, match = quantize_model(model, rules)
    calibrate(qmodel, batches)            # PTQ ranges (+ learned-scale init)
    set_phase(qmodel, "eval")
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import jax
from flax import nnx
from jax import lax

from jquant.nn.inject import QuantOp, pool_activation, quantize_activation
from jquant.nn.linen import QuantizedLayer
from jquant.nn.rules import QuantRule, RuleMatch, check_rules, match_rules, report_unused
from jquant.nn.state import QuantStat, check_phase, frozen_qparams, learned_from_stats

__all__ = [
    "QuantStat",
    "QLinear",
    "QConv",
    "ActQuant",
    "QAvgPool",
    "QMaxPool",
    "quantize_model",
    "set_phase",
    "calibrate",
    "learned_from_calibration",
    "quantized_layers",
]

DEFAULT_RULE = QuantRule(".*")


class _Slots:
    """:class:`jquant.nn.state.Slots` over an NNX module's attributes."""

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
        if v is None:
            v = nnx.Param(init())
            setattr(self.module, name, v)
        return v.value


class _QuantLayer(nnx.Module):
    """Mixin: the ``rule`` / ``phase`` / ``quant_path`` attributes of every quantized layer."""

    def _init_quant(self, rule: QuantRule, phase: str, path: str) -> None:
        if not isinstance(rule, QuantRule):
            raise TypeError(f"rule must be a QuantRule, got {type(rule).__name__}")
        check_phase(phase)
        self.rule = rule
        self.phase = phase
        self.quant_path = path


def _injected(kind: str, default) -> property:
    """A property for Flax's injection attribute: reads give a QuantOp bound to the layer;
    Flax's constructor may only write the lax default into it."""

    def get(self):
        return QuantOp(_Slots(self), self.rule, self.phase, kind)

    def set_(self, value):
        if value is not default:
            raise TypeError(f"{type(self).__name__} quantizes its own product; got {value!r}")

    return property(get, set_)


class QLinear(nnx.Linear, _QuantLayer):
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


class QConv(nnx.Conv, _QuantLayer):
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


class ActQuant(_QuantLayer):
    """Fake-quantizes an activation with calibrated (or learned) QParams: ``fq(x)``."""

    def __init__(self, *, rule: QuantRule = DEFAULT_RULE, phase: str = "float", quant_path=""):
        self._init_quant(rule, phase, quant_path)

    def __call__(self, x: jax.Array) -> jax.Array:
        return quantize_activation(_Slots(self), self.rule, self.phase, x)


class _QPool(_QuantLayer):
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
        slots = _Slots(self)
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


_REPLACEMENTS = ((nnx.Conv, QConv), (nnx.Linear, QLinear))
_NOT_COPIED = ("self", "rngs", "kernel_metadata", "bias_metadata", "dot_general")
_NOT_COPIED += ("conv_general_dilated",)


def _quantized_copy(layer: nnx.Module, rule: QuantRule, phase: str, path: str) -> nnx.Module:
    """The quantized layer with ``layer``'s hyperparameters and its kernel / bias variables."""
    base, cls = next((b, c) for b, c in _REPLACEMENTS if isinstance(layer, b))
    kwargs = {
        name: getattr(layer, name)
        for name in inspect.signature(base.__init__).parameters
        if name not in _NOT_COPIED and hasattr(layer, name)
    }
    q = cls(**kwargs, rule=rule, phase=phase, quant_path=path, rngs=nnx.Rngs(0))
    q.kernel = layer.kernel
    q.bias = layer.bias
    return q


def _path_str(path: tuple) -> str:
    return "/".join(str(k) for k in path)


def _quant_layers(model: nnx.Module):
    return [(p, m) for p, m in nnx.iter_graph(model) if isinstance(m, _QuantLayer)]


def quantize_model(
    model: nnx.Module,
    rules: QuantRule | Iterable[QuantRule],
    *,
    phase: str = "float",
    on_unused: str = "warn",
) -> tuple[nnx.Module, RuleMatch]:
    """A copy of ``model`` whose ``nnx.Linear`` / ``nnx.Conv`` layers are quantized by rules.

    Paths are the attribute paths joined by ``/`` (``"conv1"``, ``"blocks/0/linear"``); the
    first rule that fullmatches a path wins; ``keep_float`` rules leave the layer as it is.

    Returns:
      ``(quantized copy, RuleMatch)``; rules that match nothing are warned about, raised on
      or ignored according to ``on_unused``.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    check_phase(phase)
    rules = check_rules(rules)
    model = nnx.clone(model)
    targets = {
        _path_str(p): (p, m)
        for p, m in nnx.iter_graph(model)
        if isinstance(m, nnx.Linear | nnx.Conv) and not isinstance(m, _QuantLayer)
    }
    match = match_rules(rules, targets)
    report_unused(match, on_unused)
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
        )
        bias = None if m.bias is None else m.bias.value
        out.append(QuantizedLayer(m.quant_path or _path_str(p), m.rule, kernel, bias, qa, qw))
    return out
