"""Quantization state of one tensor of a layer, shared by the Linen and NNX layers.

A quantized layer quantizes two tensors: its input activation (``"input"``) and its weight
(``"kernel"``). What each needs, by phase:

========== ================================================= ===============================
phase      input activation                                  kernel
========== ================================================= ===============================
float      nothing: the float op                             nothing
calibrate  observer update; ``input_qparams`` = its result,   ``kernel_qparams`` = range of
           float op                                          the current kernel
train      fake-quant with ``input_qparams`` (or the learned  fake-quant with the kernel's own
           ``input_scale`` [, ``input_zero_point``])          range (or ``kernel_scale``)
eval       as train, frozen                                  as train
========== ================================================= ===============================

Statistics (observer state and calibrated QParams, stored as ``{"scale", "zero_point"}``
dicts so that plain serializers handle them) live in the ``quant_stats`` collection (Linen) or
in :class:`QuantStat` variables (NNX); learned scales of the ``lsq`` / ``lsq_plus`` / ``pact``
estimators are parameters. ``input_qparams`` exists only once calibration has run, which is
how train / eval detect a missing calibration (also under ``jit``: it is the tree's structure,
not a value). The weight's QParams are a function of the weight (``dynamic_qparams``), so
they stay exact while QAT moves the weights.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from jquant import calibration
from jquant.formats import format_name
from jquant.quant import QParams, QuantConfig, block_qparams, block_view, dynamic_qparams

if TYPE_CHECKING:
    from jquant.nn.rules import QuantRule

__all__ = [
    "PHASES",
    "STATS",
    "HISTORIES",
    "ScalingHistory",
    "TENSORS",
    "VARIABLE_KINDS",
    "QuantStat",
    "history_name",
    "QuantizedLayer",
    "Slots",
    "LinenSlots",
    "NNXSlots",
    "variable_key",
    "parse_variable_key",
    "subtree",
    "positive_scale",
    "check_phase",
    "make_observer",
    "tensor_qparams",
    "qparams_to_dict",
    "qparams_from_dict",
    "frozen_qparams",
    "learned_from_stats",
    "learned_placeholders",
    "ACT_SCALES",
    "LEARNED_INITS",
    "dynamic_act_qparams",
    "WEIGHT_SCALE_BOUNDS",
    "kernel_qparams",
]

PHASES = ("float", "calibrate", "train", "eval")
STATS = "quant_stats"
HISTORIES = "scaling_history"  # Linen collection of delayed scaling's amax histories
ACT_SCALES = ("static", "dynamic_per_tensor", "dynamic_per_example", "dynamic_per_token")
LEARNED_INITS = ("paper", "calibration")
WEIGHT_SCALE_BOUNDS = ("qmax", "qmax_plus_half")
TENSORS = ("input", "kernel")  # the quantized tensors of a layer
# what a layer stores per tensor: learned parameters, then statistics
VARIABLE_KINDS = ("scale", "zero_point", "qparams", "init", "observer", "abs_mean")


def variable_key(tensor: str, kind: str) -> str:
    """The name of a layer's variable of ``kind`` for ``tensor``: ``f"{tensor}_{kind}"``,
    e.g. ``variable_key("input", "qparams") == "input_qparams"``; the one place these names
    are built (:func:`parse_variable_key` reads them back).

    Raises:
      ValueError: ``tensor`` not in ``TENSORS`` or ``kind`` not in ``VARIABLE_KINDS``.
    """
    if tensor not in TENSORS:
        raise ValueError(f"tensor must be one of {TENSORS}, got {tensor!r}")
    if kind not in VARIABLE_KINDS:
        raise ValueError(f"kind must be one of {VARIABLE_KINDS}, got {kind!r}")
    return f"{tensor}_{kind}"


def parse_variable_key(key: str) -> tuple[str, str] | None:
    """``(tensor, kind)`` of a name built by :func:`variable_key`, else None."""
    tensor, _, kind = key.partition("_")
    return (tensor, kind) if tensor in TENSORS and kind in VARIABLE_KINDS else None


def subtree(tree: Mapping, path: str) -> Mapping:
    """The nested dict at the ``/``-joined module ``path`` of a variable tree (``{}`` if
    absent; ``""`` is the tree itself)."""
    for key in path.split("/") if path else ():
        tree = tree.get(key, {})
    return tree


class QuantizedLayer(NamedTuple):
    """A quantized layer as a converter, sweep or report sees it (eval-time, frozen
    QParams), from a Linen or an NNX model (``quantized_layers``).

    Two kinds of entries:

    - a layer with a kernel (Dense, Conv, DenseGeneral, Einsum): its ``kernel``, ``bias``,
      the calibrated (or learned) ``input_qparams`` and the ``kernel_qparams``;
    - an activation x activation einsum (attention's ``scores = q k^T``, ``mix = p v``):
      ``kernel``, ``bias``, ``input_qparams`` and ``kernel_qparams`` are None: it holds no
      weights, and each operand's QParams come from that operand at run time
      (``rule.act_scale``). ``has_kernel`` is False; count no weights for it.

    :attr:`operands` says, for both kinds, each operand's format and how its scales are
    chosen; :meth:`describe` prints it.
    """

    path: str
    rule: QuantRule
    kernel: jax.Array | None
    bias: jax.Array | None
    input_qparams: QParams | None
    kernel_qparams: QParams | None

    @property
    def has_kernel(self) -> bool:
        """Whether the layer holds weights (False: an activation x activation product)."""
        return self.kernel is not None

    @property
    def operands(self):
        """``(input, kernel)`` or, for a product, ``(lhs, rhs)``: each a
        :class:`jquant.nn.rules.Operand` (name, format, scale kind, block size) from
        :meth:`jquant.nn.rules.QuantRule.operands`."""
        return self.rule.operands(kernel=self.has_kernel)

    def describe(self) -> str:
        """One line for reports: path, each operand's format and scales, the kernel's shape
        (or ``no kernel``) and the rule, e.g. ``block1/attn/scores: lhs IntFormat(bits=8)
        dynamic_per_token, rhs IntFormat(bits=8) dynamic_per_token; no kernel; rule '.*'``."""

        def one(op) -> str:
            if op.fmt is None:
                return f"{op.name} float"
            block = "" if op.block_size is None else f" (blocks of {op.block_size})"
            return f"{op.name} {format_name(op.fmt)} {op.scale}{block}"

        weights = f"kernel {tuple(self.kernel.shape)}" if self.has_kernel else "no kernel"
        ops = ", ".join(one(op) for op in self.operands)
        return f"{self.path}: {ops}; {weights}; rule {self.rule.pattern!r}"


class QuantStat(nnx.Variable):
    """NNX variable type of calibration statistics: ``nnx.state(model, QuantStat)``."""


class ScalingHistory(nnx.Variable):
    """NNX variable type of delayed scaling's amax histories (``QuantRule(scaling="delayed")``):
    ``nnx.state(model, ScalingHistory)``. Updated as "overwrite with gradient": differentiate
    the loss with respect to them too, ``nnx.grad(loss, argnums=nnx.DiffState(0,
    nnx.Any(nnx.Param, ScalingHistory)))``, and ``nnx.update(model, grads.filter(ScalingHistory))``
    (their "gradients" are their next values; :mod:`jquant.ops.scaling`)."""


def history_name(tensor: str) -> str:
    """The NNX attribute of ``tensor``'s amax history (``"input"``, ``"kernel"``, ``"grad"``):
    ``f"{tensor}_amax_history"``; in Linen the variable ``scaling_history/<tensor>``."""
    return f"{tensor}_amax_history"


class Slots(Protocol):
    """Where a layer keeps its quantization variables (Linen scope or NNX attributes)."""

    path: str
    initializing: bool

    def get_stat(self, name: str) -> Any | None: ...

    def set_stat(self, name: str, value: Any) -> None: ...

    def param(self, name: str, init: Callable[[], jax.Array]) -> jax.Array: ...

    def history(self, tensor: str, length: int) -> jax.Array: ...


class LinenSlots:
    """:class:`Slots` over a bound Linen module's scope: statistics in the ``quant_stats``
    collection, learned scales in ``params``."""

    def __init__(self, module: nn.Module):
        self.module = module
        self.path = "/".join(module.path)
        self.initializing = module.is_initializing()

    def get_stat(self, name: str) -> Any | None:
        if self.module.has_variable(STATS, name):
            return self.module.get_variable(STATS, name)
        return None

    def set_stat(self, name: str, value: Any) -> None:
        if not self.module.is_mutable_collection(STATS):
            raise ValueError(
                f"layer {self.path!r} must write {STATS}/{name}: apply the model with "
                f"mutable=[{STATS!r}] (phase 'calibrate' updates statistics)"
            )
        self.module.put_variable(STATS, name, value)

    def param(self, name: str, init: Callable[[], jax.Array]) -> jax.Array:
        return self.module.param(name, lambda _: init())

    def history(self, tensor: str, length: int) -> jax.Array:
        """``scaling_history/<tensor>``, ``length`` zeros when ``init`` creates it."""
        if not self.initializing and not self.module.has_variable(HISTORIES, tensor):
            raise ValueError(
                f"layer {self.path!r} uses delayed scaling but its variables have no "
                f"{HISTORIES}/{tensor}: apply it with the {HISTORIES!r} collection that "
                "init (or QuantizedModel.attach) creates"
            )
        init = functools.partial(jnp.zeros, (length,), jnp.float32)
        return self.module.variable(HISTORIES, tensor, init).value


class NNXSlots:
    """:class:`Slots` over an NNX module's attributes: statistics are :class:`QuantStat`
    variables created on use; learned scales are ``nnx.Param`` that must exist from the
    layer's construction (an optimizer built before calibration keeps its tree)."""

    initializing = False

    def __init__(self, module: nnx.Module):
        self.module = module
        self.path = module.quant_path

    def get_stat(self, name: str) -> Any | None:
        v = getattr(self.module, name, None)
        return None if v is None else v.value

    def set_stat(self, name: str, value: Any) -> None:
        v = getattr(self.module, name, None)
        if v is None:
            setattr(self.module, name, QuantStat(value))
        else:
            v.value = value

    def history(self, tensor: str, length: int) -> jax.Array:
        """The :class:`ScalingHistory` the layer created at construction."""
        v = getattr(self.module, history_name(tensor), None)
        if v is None:
            raise ValueError(
                f"layer {self.path!r} has no amax history for its {tensor}: its rule was "
                "changed after construction; build the layer (or quantize_model) with the "
                "final rule"
            )
        return v.value

    def param(self, name: str, init: Callable[[], jax.Array]) -> jax.Array:
        v = getattr(self.module, name, None)
        if v is None:  # created now, the parameter tree would change under an optimizer
            raise ValueError(
                f"layer {self.path!r} has no learned parameter {name!r}: its rule was changed "
                "after construction; build the layer (or quantize_model) with the final rule "
                "so that learned scales exist before an optimizer is built"
            )
        return v.value


def check_phase(phase: str) -> None:
    """Raises ValueError unless ``phase`` is one of ``PHASES``."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")


def make_observer(name, cfg: QuantConfig | None = None) -> calibration.Observer:
    """The observer (``init`` / ``update`` / ``result``) of a rule's ``calibration``: a
    calibration method or its registered name; per tensor, or block-wise when ``cfg`` has
    ``block_size`` (:func:`jquant.calibration.method_block_observer`: one range per block
    along ``cfg.block_axis``)."""
    if cfg is None or cfg.block_size is None:
        return calibration.get_observer(name)
    return calibration.method_block_observer(name, cfg.block_size, block_axis=cfg.block_axis)


def qparams_to_dict(qp: QParams) -> dict[str, jax.Array]:
    return {"scale": jnp.asarray(qp.scale), "zero_point": jnp.asarray(qp.zero_point)}


def qparams_from_dict(d: dict[str, jax.Array], cfg: QuantConfig | None = None) -> QParams:
    """The QParams stored by :func:`qparams_to_dict`, block-wise when ``cfg`` is (the dict
    holds the block-shaped scales; the blocks are the config's)."""
    qp = QParams(d["scale"], d["zero_point"])
    if cfg is not None and cfg.block_size is not None:
        return block_qparams(qp, cfg.block_size, cfg.block_axis)
    return qp


def _per_tensor(qp: QParams, cfg: QuantConfig) -> QParams:
    """Drops the size-1 axes that ``dynamic_qparams`` keeps when the config is per tensor."""
    if cfg.axis is not None or cfg.block_size is not None:
        return qp
    return QParams(jnp.reshape(qp.scale, ()), jnp.reshape(qp.zero_point, ()))


def positive_scale(param: jax.Array) -> jax.Array:
    """The scale a learned step-size parameter stands for: ``|param| + tiny``.

    An optimizer step can push an LSQ / PACT parameter through zero. ``|.|`` keeps the grid
    valid while leaving the gradient's magnitude as the estimator defines it (its sign follows
    the parameter, so the step still moves ``|param|`` the right way); ``tiny`` (float32's
    smallest normal) only keeps an exact zero from dividing by zero.
    """
    param = jnp.asarray(param)
    return jnp.abs(param) + jnp.finfo(param.dtype).tiny


def _learned(slots: Slots, name: str, cfg: QuantConfig, init_qp: QParams, zp) -> QParams:
    """QParams whose scale (and, for LSQ+, zero point) are parameters, created from init_qp."""
    init_qp = jax.tree_util.tree_map(jax.lax.stop_gradient, init_qp)
    scale = slots.param(variable_key(name, "scale"), lambda: init_qp.scale)
    if cfg.estimator.learns_zero_point:
        zp = slots.param(variable_key(name, "zero_point"), lambda: init_qp.zero_point)
    return dataclasses.replace(init_qp, scale=positive_scale(scale), zero_point=zp)


def dynamic_act_qparams(x: jax.Array, cfg: QuantConfig, act_scale: str) -> QParams:
    """QParams from the activation's own min / max (``stop_gradient``-ed), reduced over
    every axis (``"dynamic_per_tensor"``), every axis but the first (``"dynamic_per_example"``,
    one range per example) or only the last, the features (``"dynamic_per_token"``, one range
    per example and position); reduced axes are kept as size 1 so the QParams broadcast.

    Affine: ``scale = (max - min) / (qmax - qmin)``; symmetric: ``max|x| / qmax``
    (``jquant.quant.qparams_from_range``, widened to include 0).
    """
    if act_scale not in ACT_SCALES[1:]:
        raise ValueError(f"act_scale must be one of {ACT_SCALES[1:]}, got {act_scale!r}")
    x = jnp.asarray(x)
    kept = {
        "dynamic_per_tensor": None,
        "dynamic_per_example": (0,) if x.ndim > 1 else None,
        "dynamic_per_token": tuple(range(x.ndim - 1)) or None,
    }[act_scale]
    qp = dynamic_qparams(x, dataclasses.replace(cfg, axis=kept))
    return _per_tensor(qp, dataclasses.replace(cfg, axis=kept))


def kernel_qparams(w: jax.Array, cfg: QuantConfig, scale_bound: str = "qmax") -> QParams:
    """A weight's QParams from its own range: ``dynamic_qparams`` (``scale = max|w| / qmax``
    symmetric), or with ``scale_bound="qmax_plus_half"`` ``scale = max|w| / (qmax + 1/2)``,
    Qwix's and AQT's symmetric bound: the largest weights round up to ``qmax + 1`` and clip to
    ``qmax``, so at 2 bits ``scale = max|w| / 1.5`` on the codes ``-2..1``.
    """
    own = _per_tensor(dynamic_qparams(w, cfg), cfg)
    if scale_bound == "qmax":
        return own
    if scale_bound != "qmax_plus_half":
        raise ValueError(f"scale_bound must be one of {WEIGHT_SCALE_BOUNDS}, got {scale_bound!r}")
    w = jax.lax.stop_gradient(jnp.asarray(w, jnp.float32))
    kept = cfg.axes(w.ndim)
    amax = jnp.max(jnp.abs(w), axis=tuple(a for a in range(w.ndim) if a not in kept), keepdims=True)
    scale = amax / (jnp.asarray(cfg.fmt.qmax, jnp.float32) + 0.5)  # as Qwix: exact ties at -2
    scale = jnp.where(amax > 0, scale, jnp.reshape(own.scale, scale.shape))  # zero range: finite
    return _per_tensor(QParams(scale, own.zero_point), cfg)


def _paper_weight_init(w: jax.Array, cfg: QuantConfig, own: QParams) -> QParams:
    """A learned weight step initialised by its paper (LSQ, LSQ+; PACT: its own range)."""
    init = cfg.estimator.weight_init
    if init is None:
        return own
    if own.block_size is not None:  # one step per block: initialise each from its block
        wb, own_b = block_view(w, own)
        ax = own.block_axis % w.ndim
        kept = tuple(sorted({ax} | {a + (a > ax) for a in cfg.axes(w.ndim)}))
        flat = dataclasses.replace(cfg, axis=kept, block_size=None, block_axis=None)
        scale = _paper_weight_init(wb, flat, own_b).scale
        return dataclasses.replace(own, scale=jnp.squeeze(scale, ax + 1))
    return init(w, cfg.fmt, cfg.axes(w.ndim) or None, own)


def _lsq_activation_init(slots: Slots, name: str, x: jax.Array, cfg: QuantConfig, phase: str):
    """Accumulates ``mean|x|`` over calibration batches and stores the estimator's initial
    step ``cfg.estimator.activation_init(<mean|x|>, fmt, zp)`` (LSQ: ``2 <mean|x|> /
    sqrt(qmax - zp)``; zero point: the calibrated one) as ``{name}_init``."""
    acc = slots.get_stat(variable_key(name, "abs_mean"))
    if acc is None:
        acc = {"sum": jnp.zeros((), jnp.float32), "count": jnp.zeros((), jnp.float32)}
        slots.set_stat(variable_key(name, "abs_mean"), acc)
    if phase != "calibrate" or slots.initializing:
        return
    batch_mean = jnp.mean(jnp.abs(jax.lax.stop_gradient(x).astype(jnp.float32)))
    acc = {"sum": acc["sum"] + batch_mean, "count": acc["count"] + 1.0}
    slots.set_stat(variable_key(name, "abs_mean"), acc)
    zp = jnp.asarray(slots.get_stat(variable_key(name, "qparams"))["zero_point"], jnp.float32)
    scale = cfg.estimator.activation_init(acc["sum"] / acc["count"], cfg.fmt, zp)
    slots.set_stat(variable_key(name, "init"), {"scale": scale, "zero_point": zp})


def tensor_qparams(
    slots: Slots,
    name: str,
    x: jax.Array,
    cfg: QuantConfig | None,
    phase: str,
    calibration_name: str | None,
    *,
    learned_init: str = "calibration",
    act_scale: str = "static",
    scale_bound: str = "qmax",
) -> QParams | None:
    """QParams to quantize ``x`` with in ``phase``, updating statistics on the way.

    Args:
      slots: the layer's variables.
      name: ``"input"`` or ``"kernel"``: prefix of the variable names.
      x: the tensor.
      cfg: its QuantConfig; None means it stays float (returns None, creates nothing).
      phase: one of ``PHASES``.
      calibration_name: observer of an activation; None for a weight, whose range is its own.
      learned_init: ``"paper"``: calibrate also stores ``{name}_init``, the learned step's
        initialisation by its paper (LSQ ``2 mean|v| / sqrt(Q_P)``, the activation's mean
        ``|x|`` averaged over the calibration batches; LSQ+ weights
        ``max(|mu -+ 3 sigma|) / 2^(b-1)``), which :func:`learned_from_stats` prefers over the
        calibrated range; ``"calibration"``: the learned step starts at the calibrated range.
      act_scale: ``"static"`` (calibrated) or a dynamic granularity of ``ACT_SCALES`` for an
        activation: :func:`dynamic_act_qparams` of ``x`` in train / eval (calibration still
        records the static range).
      scale_bound: a weight's scale bound (:func:`kernel_qparams`); with ``"qmax_plus_half"``
        the weight's QParams are returned (not derived by ``ops``).

    Returns:
      The QParams (None for a non-learned weight: ``ops`` derives them from the weight), or
      None in the float and calibrate phases, where the op runs in float.

    Raises:
      ValueError: train / eval of an activation that was never calibrated.
    """
    if cfg is None or cfg.scales_itself:  # a block format scales itself: no QParams
        return None
    learned = cfg.estimator.learned
    if calibration_name is None:  # a weight
        own = kernel_qparams(x, cfg, scale_bound)
        if phase == "calibrate" and not slots.initializing:
            slots.set_stat(variable_key(name, "qparams"), qparams_to_dict(own))
            if learned and learned_init == "paper":
                init = _paper_weight_init(x, cfg, own)
                slots.set_stat(variable_key(name, "init"), qparams_to_dict(_per_tensor(init, cfg)))
        if learned:
            qp = _learned(slots, name, cfg, own, own.zero_point)
        else:
            qp = own if scale_bound != "qmax" else None
        return qp if phase in ("train", "eval") else None

    obs = make_observer(calibration_name, cfg)
    state = slots.get_stat(variable_key(name, "observer"))
    if state is None:
        state = obs.init(x)
        slots.set_stat(variable_key(name, "observer"), state)
    if phase == "calibrate" and not slots.initializing:
        state = obs.update(x, state)
        slots.set_stat(variable_key(name, "observer"), state)
        qp = obs.result(state, cfg.fmt, symmetric=cfg.symmetric)
        slots.set_stat(variable_key(name, "qparams"), qparams_to_dict(_per_tensor(qp, cfg)))
    if learned and learned_init == "paper" and cfg.estimator.activation_init is not None:
        _lsq_activation_init(slots, name, x, cfg, phase)
    dynamic = act_scale != "static"
    if dynamic and phase in ("train", "eval"):
        return dynamic_act_qparams(x, cfg, act_scale)
    stored = slots.get_stat(variable_key(name, "qparams"))
    if stored is None:
        if phase in ("train", "eval") and not slots.initializing:
            raise ValueError(
                f"layer {slots.path!r}: phase={phase!r} needs calibrated ranges for its "
                f"{name}, but it was never calibrated; run the model in phase='calibrate' on "
                "representative data first"
            )
        qp = _per_tensor(dynamic_qparams(x, cfg), cfg)  # placeholder while initializing
    else:
        qp = qparams_from_dict(stored, cfg)
    if learned:
        qp = _learned(slots, name, cfg, qp, qp.zero_point)
    return qp if phase in ("train", "eval") else None


def frozen_qparams(
    cfg_input: QuantConfig | None,
    cfg_kernel: QuantConfig | None,
    kernel: jax.Array,
    params: dict[str, Any],
    stats: dict[str, Any],
    scale_bound: str = "qmax",
) -> tuple[QParams | None, QParams | None]:
    """The (input, kernel) QParams a layer uses in eval, from its parameters and statistics.

    Learned scales (``{t}_scale`` / ``{t}_zero_point`` in ``params``) win; otherwise the input
    has its calibrated ``input_qparams`` (None if never calibrated) and the kernel the range of
    ``kernel`` itself (:func:`kernel_qparams` with ``scale_bound``). None for a tensor that
    stays float.
    """

    def one(t, cfg, fallback):
        if cfg is None:
            return None
        scale_key = variable_key(t, "scale")
        if scale_key in params:
            base = fallback or QParams(params[scale_key], 0.0)
            zp = params.get(variable_key(t, "zero_point"), base.zero_point)
            scale = positive_scale(params[scale_key])
            return dataclasses.replace(base, scale=scale, zero_point=jnp.asarray(zp))
        return fallback

    stored = stats.get(variable_key("input", "qparams"))
    calibrated = None if stored is None else qparams_from_dict(stored, cfg_input)
    qa = one("input", cfg_input, calibrated)
    own = None
    if cfg_kernel is not None and not cfg_kernel.scales_itself:
        own = kernel_qparams(kernel, cfg_kernel, scale_bound)
    return qa, one("kernel", cfg_kernel, own)


def learned_from_stats(params: dict[str, Any], stats: dict[str, Any]) -> dict[str, Any]:
    """``params`` with each learned ``{t}_scale`` / ``{t}_zero_point`` set to
    ``stats["{t}_init"]`` (the paper's initialisation, when calibrate stored one) or else the
    calibrated ``stats["{t}_qparams"]`` (names: :func:`variable_key`), recursively over nested
    module dicts (Linen trees)."""
    out = dict(params)
    for key, value in stats.items():
        parsed = parse_variable_key(key)
        if parsed and parsed[1] in ("init", "qparams") and "scale" in value:
            t, kind = parsed
            if kind == "qparams" and variable_key(t, "init") in stats:
                continue  # the paper's initialisation wins over the calibrated range
            for field in ("scale", "zero_point"):
                name = variable_key(t, field)
                if name in out:
                    old = jnp.asarray(out[name])
                    out[name] = jnp.reshape(jnp.asarray(value[field]), old.shape).astype(old.dtype)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = learned_from_stats(out[key], value)
    return out


def learned_placeholders(
    cfg_input: QuantConfig | None, cfg_kernel: QuantConfig | None, kernel: jax.Array | None
) -> dict[str, jax.Array]:
    """The learned-scale parameters a layer needs, before any calibration.

    ``{t}_scale`` (and ``{t}_zero_point`` for ``lsq_plus``) for each tensor ``t`` whose
    config has a learned estimator: the kernel's from its own range (``dynamic_qparams``),
    the input's a finite placeholder (scale 1, zero point 0, per tensor) that calibration
    replaces (:func:`learned_from_stats`). Shapes and dtypes are those the layer uses, so a
    tree of parameters (an optimizer's state) built now stays valid after calibration.
    """
    out = {}
    for t, cfg in (("input", cfg_input), ("kernel", cfg_kernel)):
        if cfg is None or not cfg.estimator.learned:
            continue
        if t == "kernel":
            qp = _per_tensor(dynamic_qparams(kernel, cfg), cfg)
        else:
            qp = QParams(jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32))
        out[variable_key(t, "scale")] = jnp.asarray(qp.scale)
        if cfg.estimator.learns_zero_point:
            out[variable_key(t, "zero_point")] = jnp.asarray(qp.zero_point)
    return out
