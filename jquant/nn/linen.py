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
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant.nn.einsum import (
    QEinsum,
    QuantActEinsum,
    check_act_rule,
    einsum_dims,
    is_act_product,
)
from jquant.nn.inject import QuantOp, pool_activation, quantize_activation
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
    check_phase,
    frozen_qparams,
    learned_from_stats,
)
from jquant.quant import QParams

__all__ = [
    "DEFAULT_RULE",
    "QDense",
    "QConv",
    "ActQuant",
    "QAvgPool",
    "QMaxPool",
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
    op = QuantOp(LinenSlots(module), rule, phase, kind)
    clone = module.clone(parent=module.scope, **{field: op})
    return call(clone, *args, **kw)


@dataclasses.dataclass(eq=False)
class _FoldedOp:
    """The conv op of a Conv whose BatchNorm is folded: ``op(x, W * gamma / sigma_R)``; it
    also keeps the float ``conv(x, W)`` (the BatchNorm's batch statistics) in ``float_out``."""

    op: QuantOp
    factor: jax.Array  # gamma / sigma_R per output channel, the kernel's last axis
    float_out: list = dataclasses.field(default_factory=list)

    def __call__(self, lhs: jax.Array, rhs: jax.Array, *args, **kwargs) -> jax.Array:
        kw = {k: v for k, v in kwargs.items() if k != "out_sharding" or v is not None}
        self.float_out.append(jax.lax.conv_general_dilated(lhs, rhs, *args, **kw))
        return self.op(lhs, rhs * self.factor, *args, **kwargs)


class _Folding(NamedTuple):
    """A folded Conv's results, kept for its BatchNorm: the float conv output (the BN's
    input), the quantized conv of the folded kernel, and the BN constants it used."""

    y_float: jax.Array
    y_quant: jax.Array
    factor: jax.Array


def _bn_constants(bn: Mapping, features: int):
    """``(gamma, beta, mean_R, var_R)`` of a BatchNorm's variables (defaults if absent)."""
    params, stats = bn.get("params", {}), bn["batch_stats"]
    gamma = params.get("scale", jnp.ones((features,)))
    beta = params.get("bias", jnp.zeros((features,)))
    return gamma, beta, stats["mean"], stats["var"]


class QDense(nn.Dense):
    """``nn.Dense`` whose product is quantized by ``rule`` (formats, estimator, mode).

    ``y = fq_in(x) @ fq_w(W) + b`` in train / eval; ``x @ W + b`` in float / calibrate.
    """

    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        return _quantized_call(self, self.rule, self.phase, nn.Dense.__call__, inputs)


class QConv(nn.Conv):
    """``nn.Conv`` (depthwise with ``feature_group_count``) quantized by ``rule``.

    ``y = conv(fq_in(x), fq_w(W)) + b``; per-channel weight scales are per output channel.
    """

    rule: QuantRule = DEFAULT_RULE
    phase: str = "float"

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
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

    def _pool(self, x, kind: str):
        check_phase(self.phase)
        slots = LinenSlots(self)
        return pool_activation(
            slots, self.rule, self.phase, kind, x, self.window, self.strides, self.padding
        )


class QAvgPool(_QPool):
    """TFLite average pooling of the quantized input: the mean code of the valid (unpadded)
    elements, rounded half away from zero; output keeps the input's scale and zero point."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "avg")


class QMaxPool(_QPool):
    """Max pooling of the quantized input; output keeps the input's scale and zero point."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return self._pool(x, "max")


def learned_from_calibration(variables: Mapping[str, Any]) -> dict[str, Any]:
    """Variables whose learned scales / zero points are set to their calibrated QParams.

    For every ``quant_stats/.../{t}_qparams`` with a ``params/.../{t}_scale`` (LSQ, LSQ+,
    PACT) the parameter takes the calibrated value; :meth:`QuantizedModel.calibrate` calls it.
    """
    variables = dict(variables)
    if STATS in variables and "params" in variables:
        variables["params"] = learned_from_stats(variables["params"], variables[STATS])
    return variables


class QuantizedLayer(NamedTuple):
    """A quantized layer as a converter or sweep sees it (eval-time, frozen QParams)."""

    path: str
    rule: QuantRule
    kernel: jax.Array
    bias: jax.Array | None
    input_qparams: QParams | None
    kernel_qparams: QParams | None


def _subtree(tree: Mapping, path: str) -> Mapping:
    for key in path.split("/") if path else ():
        tree = tree.get(key, {})
    return tree


def _deep_merge(base: Mapping, override: Mapping) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


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
    folds: tuple[tuple[str, str, float], ...] = ()  # (conv path, its BatchNorm's, epsilon)
    channel_axes: tuple[tuple[str, tuple[int, ...]], ...] = ()  # DenseGeneral / Einsum kernels

    def __post_init__(self):
        check_phase(self.phase)

    def _interceptor(self, stash: dict, next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(module.path)
        if isinstance(module, nn.BatchNorm) and path in stash:
            return self._folded_bn(module, stash.pop(path), next_fun, args, kwargs)
        if is_act_product(module):  # an activation x activation einsum (attention)
            rule = first_match(self.rules, path)
            if rule is None:
                return next_fun(*args, **kwargs)
            clone = module.clone(parent=module.scope, einsum=QuantActEinsum(rule, self.phase))
            return clone(*args, **kwargs)
        if _is_jquant_layer(module):  # hand-built (or our own QEinsum): the model's phase
            if module.phase == self.phase:
                return next_fun(*args, **kwargs)
            clone = module.clone(parent=module.scope, phase=self.phase)
            return getattr(clone, context.method_name)(*args, **kwargs)
        if not _quantizable(module) or any(
            isinstance(getattr(module, f, None), QuantOp | _FoldedOp) for f, _ in _TARGETS.values()
        ):
            return next_fun(*args, **kwargs)  # not ours to quantize, or our own clone
        rule = first_match(self.rules, path)
        if rule is None:
            return next_fun(*args, **kwargs)
        fold = next((f for f in self.folds if f[0] == path), None)
        if fold is not None and self.phase != "float" and not module.is_initializing():
            return self._folded_conv(module, rule, fold, stash, next_fun, args, kwargs)
        return _quantized_call(module, rule, self.phase, type(module).__call__, *args, **kwargs)

    def _folded_conv(self, conv, rule, fold, stash, next_fun, args, kwargs):
        """Jacob et al. (2018) sec. 3.2, as :class:`jquant.nn.bn_folding.QConvBN`: the conv
        runs with ``fq(W gamma / sigma_R)``; its BatchNorm (:meth:`_folded_bn`) finishes."""
        _, bn_path, eps = fold
        root = conv.scope.root.variables()
        bn = {c: _subtree(root.get(c, {}), bn_path) for c in ("params", "batch_stats")}
        gamma, _, _, var_r = _bn_constants(bn, conv.features)
        factor = gamma * jax.lax.rsqrt(var_r + eps)
        op = _FoldedOp(QuantOp(LinenSlots(conv), rule, self.phase, "conv"), factor)
        y_quant = type(conv).__call__(
            conv.clone(parent=conv.scope, conv_general_dilated=op), *args, **kwargs
        )
        # conv(x, W), laid out as the Conv's output (a bias-free Conv only reshapes): the BN's
        # input and its batch statistics
        y_float = op.float_out[0].reshape(y_quant.shape)
        stash[bn_path] = _Folding(y_float, y_quant, factor)
        return y_float

    def _folded_bn(self, bn: nn.BatchNorm, folding: _Folding, next_fun, args, kwargs):
        """The BatchNorm after a folded conv (:class:`jquant.nn.bn_folding.QConvBN`'s formula)::

        running: y = conv_q + beta - gamma mu_R / sigma_R
        batch:   y = conv_q sigma_R / sigma_B + beta - gamma mu_B / sigma_B
        """
        x = args[0] if args else kwargs["x"]
        if x is not folding.y_float:  # something ran between the conv and its BatchNorm
            raise ValueError(
                f"fold_bn: BatchNorm {'/'.join(bn.path)!r} no longer reads its conv's output"
            )
        flag = kwargs.get("use_running_average", args[1] if len(args) > 1 else None)
        running = self.phase in ("calibrate", "eval") or bool(
            nn.merge_param("use_running_average", bn.use_running_average, flag)
        )
        eps = bn.epsilon
        gamma, beta, mean_r, var_r = _bn_constants(bn.variables, x.shape[-1])
        if running:
            return folding.y_quant + (beta - mean_r * folding.factor)
        axes = tuple(range(x.ndim - 1))
        mu_b, var_b = jnp.mean(x, axis=axes), jnp.var(x, axis=axes)
        if not bn.is_initializing():
            m = bn.momentum
            stop = jax.lax.stop_gradient
            bn.put_variable("batch_stats", "mean", m * mean_r + (1 - m) * stop(mu_b))
            bn.put_variable("batch_stats", "var", m * var_r + (1 - m) * stop(var_b))
        sigma_r = jnp.sqrt(var_r + eps)
        inv_b = jax.lax.rsqrt(var_b + eps)
        return folding.y_quant * (sigma_r * inv_b) + (beta - mu_b * gamma * inv_b)

    def with_phase(self, phase: str) -> QuantizedModel:
        """The same model in another phase: float, calibrate, train or eval."""
        return dataclasses.replace(self, phase=phase)

    def init(self, rngs, *args, **kwargs) -> dict[str, Any]:
        """``model.init`` with the rules applied (creates ``quant_stats`` and learned scales)."""
        with nn.intercept_methods(functools.partial(self._interceptor, {})):
            return self.model.init(rngs, *args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        """``model.apply`` with the rules applied in this model's phase."""
        with nn.intercept_methods(functools.partial(self._interceptor, {})):
            return self.model.apply(variables, *args, **kwargs)

    def attach(self, variables: Mapping[str, Any], *args, rng=None, **kwargs) -> dict[str, Any]:
        """``variables`` of the plain model plus fresh quantization state (stats, scales)."""
        rng = jax.random.key(0) if rng is None else rng
        init = self._jitted("init", lambda: functools.partial(self.init, **kwargs), kwargs)
        return _deep_merge(init(rng, *args), variables)

    def calibrate(
        self,
        variables: Mapping[str, Any],
        batches: Iterable[Any],
        *,
        max_batches: int | None = None,
        **apply_kwargs,
    ) -> dict[str, Any]:
        """Runs the calibrate phase (jitted) over ``batches`` of inputs, then sets learned
        scales from the calibrated ranges (:func:`learned_from_calibration`).

        Raises:
          ValueError: when ``batches`` yields nothing.
        """
        step = self._calibrate_step(apply_kwargs)
        variables, n = dict(variables), 0
        for batch in batches:
            if max_batches is not None and n >= max_batches:
                break
            variables[STATS] = step(variables, batch)
            n += 1
        if n == 0:
            raise ValueError("calibrate needs data: batches yielded no batch")
        return learned_from_calibration(variables)

    def _calibrate_step(self, apply_kwargs: dict) -> Callable:
        """The jitted calibrate step, compiled once per model and keyword arguments."""
        calib = self.with_phase("calibrate")

        def step(v, batch):
            return calib.apply(v, batch, mutable=[STATS], **apply_kwargs)[1][STATS]

        return self._jitted("calibrate", lambda: step, apply_kwargs)

    def _jitted(self, kind: str, make: Callable[[], Callable], kwargs: dict) -> Callable:
        """``jax.jit(make())``, kept per model, ``kind`` and keyword arguments so that repeated
        calls reuse one compiled program (a fresh ``jax.jit`` object would compile again)."""
        try:
            key = (kind, tuple(sorted(kwargs.items())))
            hash(key)
        except TypeError:  # unhashable keyword values: no caching
            return jax.jit(make())
        cache = self.__dict__.setdefault("_jit_cache", {})
        if key not in cache:
            cache[key] = jax.jit(make())
        return cache[key]

    def layers(self, variables: Mapping[str, Any]) -> list[QuantizedLayer]:
        """The quantized layers with their paths, rules, weights and eval-time QParams."""
        out = []
        for path, rule in self.match.assignment.items():
            if rule is None or rule.keep_float:
                continue
            params = _subtree(variables["params"], path)
            if "kernel" not in params:  # an activation x activation einsum: nothing to deploy
                continue
            stats = _subtree(variables.get(STATS, {}), path)
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
    conv_outputs: dict[int, str] = {}  # id of a bias-free Conv's output -> its path
    folds: list[tuple[str, str, float]] = []

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
                conv_outputs[id(out)] = path
        elif is_act_product(module):
            if (rule := first_match(rules, path)) is not None:
                check_act_rule(rule, path)
            paths.append(path)
        elif not _is_jquant_layer(module) and _owns_kernel(module):
            unsupported[path] = type(module).__name__
        elif isinstance(module, nn.BatchNorm) and args and id(args[0]) in conv_outputs:
            if module.axis == -1 and module.axis_name is None:
                folds.append((conv_outputs.pop(id(args[0])), path, float(module.epsilon)))
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: model.init(jax.random.key(0), *example_args, **example_kwargs))
    match = match_rules(rules, dict.fromkeys(paths), unsupported)
    report_unused(match, on_unused)
    report_not_quantized(match)
    if fold_bn:
        folds = [f for f in folds if (r := match.assignment.get(f[0])) and not r.keep_float]
    folds = tuple(folds) if fold_bn else ()
    qmodel = QuantizedModel(model, rules, match, phase, folds, tuple(channel_axes.items()))
    return qmodel, match
