"""Rules that say how each layer of a model is quantized, matched on module paths.

A rule is a frozen :class:`QuantRule`: a regular expression over the ``/``-joined module path
(``"Conv_0"``, ``"encoder/Dense_1"``, ``"layers/0"``; matched with ``re.fullmatch``) and what
to do with the layers it matches: weight and activation formats, granularity, calibration,
estimator and execution mode, or ``keep_float=True``. Rules are tried in order and the first
match wins, so specific rules (first and last layer in float) go before a catch-all ``".*"``.

>>> rules = (QuantRule("Conv_0", keep_float=True), QuantRule(".*", weight="int4", act="int4"))
>>> match_rules(rules, ["Conv_0", "Conv_1"]).assignment["Conv_1"].weight
IntFormat(bits=4)
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType
from typing import Any, NamedTuple

from jquant.calibration import get_observer, method_block_observer, observer_names
from jquant.estimators import Estimator, get_estimator
from jquant.formats import (
    Format,
    block_size_of,
    format_name,
    int8,
    is_int8_grid,
    rounding_modes_of,
)
from jquant.integer.fixed_point import MULTIPLIER_MODES
from jquant.nn.state import ACT_SCALES, LEARNED_INITS, WEIGHT_SCALE_BOUNDS
from jquant.ops.scaling import DelayedScaling, delayed_scaling
from jquant.ops.train import BackwardConfig
from jquant.quant import ROUNDING_MODES, QuantConfig, resolve_format

__all__ = [
    "ACT_SCALES",
    "LEARNED_INITS",
    "WEIGHT_SCALE_BOUNDS",
    "CALIBRATIONS",
    "DEFAULT_RULE",
    "GRANULARITIES",
    "MODES",
    "Operand",
    "REQUANT_MODES",
    "SCALINGS",
    "QuantRule",
    "RuleMatch",
    "match_rules",
    "parse_granularity",
    "report_not_quantized",
    "report_unused",
    "set_bits",
]

# The built-in streaming calibration names (the registry of jquant.calibration owns them).
CALIBRATIONS = observer_names(streams=True)
GRANULARITIES = ("per_channel", "per_tensor", "per_block")
MODES = ("simulate", "int")
# the integer program's requantization modes (jquant.integer.fixed_point owns the names)
REQUANT_MODES = (None, *MULTIPLIER_MODES)
# None: each tensor scaled as the other fields say; "delayed": Transformer Engine's recipe
SCALINGS = (None, "delayed")


def parse_granularity(granularity: str) -> tuple[str, int | None]:
    """``(name, block_size)`` of a granularity string: ``"per_channel"`` -> ``("per_channel",
    None)``, ``"per_block:32"`` -> ``("per_block", 32)`` (the spelling of sweeps and the CLI).

    >>> parse_granularity("per_block:128")
    ('per_block', 128)
    """
    if not isinstance(granularity, str):
        raise TypeError(f"granularity must be a str, got {granularity!r}")
    name, sep, size = granularity.partition(":")
    allowed = f"one of {GRANULARITIES[:2]} or 'per_block:<block size>'"
    if name not in GRANULARITIES or bool(sep) != (name == "per_block"):
        raise ValueError(f"granularity must be {allowed}, got {granularity!r}")
    if not sep:
        return name, None
    if not size.isdigit() or int(size) < 1:
        raise ValueError(f"the block size of {granularity!r} must be a positive integer")
    return name, int(size)


def _format_or_none(name: str, value) -> Format | None:
    return None if value is None else resolve_format(value, f"QuantRule.{name}")


def _check_choice(name: str, value, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"QuantRule.{name} must be one of {tuple(allowed)}, got {value!r}")


class Operand(NamedTuple):
    """How a rule quantizes one operand of a layer's product, as a report reads it
    (:meth:`QuantRule.operands`).

    Attributes:
      name: ``"input"`` or ``"kernel"`` (a layer with a kernel), ``"lhs"`` or ``"rhs"`` (an
        activation x activation einsum such as attention's ``q k^T``).
      fmt: its format; None: float.
      scale: how its scales are chosen; None when float. A kernel: its granularity,
        ``"per_channel"``, ``"per_tensor"`` or ``"per_block"``. An activation:
        ``QuantRule.act_scale``, ``"static"`` (one calibrated range) or
        ``"dynamic_per_tensor"`` / ``"dynamic_per_example"`` / ``"dynamic_per_token"`` (its
        own range at run time). ``"delayed"`` with ``QuantRule.scaling="delayed"``.
      block_size: elements per scale along the contracted axis when the scales are
        block-wise (``block_size``, ``act_block_size`` or a block format's own), else None.
    """

    name: str
    fmt: Format | None
    scale: str | None
    block_size: int | None


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """How to quantize the layers whose path matches ``pattern``.

    Args:
      pattern: regular expression, ``re.fullmatch``-ed against the module path.
      weight: weight format (name such as ``"int4"`` or a Format); None keeps weights float.
        The block formats of :mod:`jquant.mx` (``"mxfp8_e4m3"``, ``"mxfp8_e5m2"``,
        ``"mxfp6_e3m2"``, ``"mxfp6_e2m3"``, ``"mxfp4"``, ``"mxint8"``, ``"nvfp4"``, ``"nf4"``)
        work as weight and activation formats, blocks along the contracted axis, in
        ``mode="simulate"`` with the ``"ste"`` estimator (no calibration: their scales come
        from each block); ``jquant.convert`` refuses them.
      act: format of the layer's input activation; None keeps it float.
      weight_granularity: ``"per_channel"`` (one scale per output channel, the last kernel
        axis, TFLite's convention) or ``"per_tensor"``.
        ``"per_block"``: per output channel and per block of ``block_size`` consecutive
        inputs along the contracted axis (a Dense kernel's axis 0, a Conv's input features).
      block_size: elements per weight scale along the contracted axis; setting it makes the
        granularity ``"per_block"`` (``QuantRule(weight="int4", block_size=128)``). When it does
        not divide the layer's input features the last block is partial. Block-wise
        layers run in both modes (``"int"``: an int32 partial sum per block) but
        ``jquant.convert`` refuses them: the integer program has no block-wise kernel.
      act_block_size: elements per activation scale along the input's last axis (the
        features, which Dense and Conv contract): block-wise activations, one scale per
        ``act_block_size`` consecutive features, combined with ``act_scale``: ``"static"``
        (one calibrated range per block of features, over every token: the calibration's
        per-axis observer on each block, histograms included), ``"dynamic_per_token"`` (one
        range per token and block, Qwix's tiled activations), ``"dynamic_per_example"``,
        ``"dynamic_per_tensor"`` (one per block over the example / the tensor). Runs in both
        modes (``"int"``: an int32 partial sum per block, scaled by ``s_x[b] s_w`` and summed
        in float; with block-wise weights too, ``block_size`` must equal it). Activation
        scales are then not learned (estimator ``"ste"`` / ``"clipped_ste"``); pooling layers
        and ``jquant.convert`` / ``requant`` refuse block-wise activations. A partial last
        block is allowed, as for weights.
      weight_symmetric: symmetric weight grid (zero point 0), TFLite's convention.
      act_symmetric: symmetric activation grid; the default is affine, as TFLite.
      calibration: activation range estimator, a streaming calibration method of
        ``jquant.calibration`` (``Percentile(99.9)``, a user-defined observer) or a name of
        ``CALIBRATIONS``: ``"minmax"`` (running min/max), ``"ema"`` (exponential moving
        min/max), or a histogram observer choosing the range by ``"percentile"`` (99.99%),
        ``"mse"`` or ``"kl"``. Stored as the object.
      estimator: gradient estimator of both quantizers, a ``jquant.estimators.Estimator`` or
        a registered name (``jquant.estimators.ESTIMATORS``); learned ones (``lsq``,
        ``lsq_plus``, ``pact``) learn the scale (a parameter initialised from calibration).
        Stored as the object.
      act_estimator: overrides ``estimator`` for activations (e.g. ``"pact"``) when set.
      mode: ``"simulate"`` (fake-quant in float) or ``"int"`` (int8 x int8 -> int32).
      keep_float: leave the matched layers in float (first / last layer).
      act_scale: ``"static"`` (default: calibrated ranges, the deployable choice) or a
        dynamic range taken from each activation in train and eval (Qwix's and AQT's
        default): ``"dynamic_per_tensor"``, ``"dynamic_per_example"`` (one range per example,
        the first axis) or ``"dynamic_per_token"`` (one per example and position: all axes but
        the features). Dynamic ranges are not learned: the activation estimator must then be
        ``"ste"`` or ``"clipped_ste"`` (set ``act_estimator``). Calibration still records the
        static ranges, which is what ``jquant.convert`` deploys.
      learned_init: how learned steps start: ``"paper"`` (default; LSQ
        ``2 mean|v| / sqrt(Q_P)``, LSQ+ weights ``max(|mu -+ 3 sigma|) / 2^(b-1)``, see
        ``jquant.estimators``) or ``"calibration"`` (the calibrated range).
      weight_scale_bound: ``"qmax"`` (default, TFLite: ``scale = max|w| / qmax``) or
        ``"qmax_plus_half"`` (Qwix, AQT: ``scale = max|w| / (qmax + 1/2)``; 2 bits:
        ``max|w| / 1.5`` on the codes -2..1); symmetric integer weights only. The other 2-bit
        grids are formats and flags: ``IntFormat(2, midrise=True)`` (levels ``(q + 1/2) s``,
        no zero) and ``weight_symmetric=False`` (affine).
      grad: format of the output gradient ``g`` in both backward products (``dL/dinput =
        g x W^T``, ``dL/dkernel = x^T g``), per tensor with a dynamic scale
        (``jquant.ops.train_dot_general``); None (default) keeps the backward pass float.
      grad_rounding: rounding of ``g`` (``jquant.quant.ROUNDING_MODES``); ``"stochastic"``
        draws from the ``"quant"`` RNG stream (Linen ``apply(..., rngs={"quant": key})``;
        NNX: the layer's ``quant_rngs = nnx.Rngs(quant=key)``).
      grad_operands: format the reused input and kernel are requantized to (per tensor) in
        the backward products; None reuses them as the forward quantized them. Needed with
        ``mode="int"`` (int8 x int8 -> int32 backward products).
      requant: None (default: the fake-quant eval forward, one float rounding) or a
        requantization mode of the integer program, ``"double"`` (gemmlowp, TFLite
        reference), ``"single"`` (``TFLITE_SINGLE_ROUNDING``) or ``"fp32"`` (XNNPACK, ONNX
        Runtime). In phase ``eval`` the layer then computes what the integer kernel computes
        (:mod:`jquant.nn.requant`): ``q_y = clamp(MBQM(sum (q_x - z_x) q_w + b_int, M) + z_y)``
        in int32, returned as ``s_y (q_y - z_y)``; the constants ``b_int``, ``M``, ``s_y``,
        ``z_y`` come from :func:`jquant.convert.with_requant_constants`. Needs static
        integer formats of <= 8 bits, signed symmetric weights and static activation scales.
        Other phases are unchanged.
      backward: a :class:`jquant.ops.BackwardConfig` setting the two backward products
        separately (``dL/dlhs = Q_dlhs_grad(g) x Q_dlhs_rhs(W)^T``, ``dL/drhs =
        Q_drhs_lhs(x)^T x Q_drhs_grad(g)``, their rounding of ``g``), exactly as
        :func:`jquant.ops.train_dot_general` takes it; it replaces ``grad``,
        ``grad_rounding`` and ``grad_operands`` (set either, not both). None: from those.
      scaling: None (default: scales as the fields above say) or ``"delayed"``, Transformer
        Engine's delayed scaling (``DelayedScaling(margin, amax_history_len,
        amax_compute_algo="max")``; Micikevicius et al. 2022, "FP8 Formats for Deep
        Learning") of the input, the kernel and the gradient ``g``, each per tensor and
        symmetric::

            scale_t = max(h_{t-1}) * 2^margin / fmt.max      (1 while the history is all 0)
            h_t     = (amax_t, h_{t-1}[0], ..., h_{t-1}[H-2])

        so step ``t`` quantizes with the amaxes of steps ``< t`` (:mod:`jquant.ops.scaling`).
        The histories are model state (Linen: the ``scaling_history`` collection; NNX:
        :class:`jquant.nn.state.ScalingHistory` variables), updated as "overwrite with
        gradient": the gradient of the loss with respect to a history *is* its next value
        (the forward operands' amaxes and, from the backward pass, the amax of ``g``), so a
        training step differentiates with respect to them too and replaces them by their
        gradients. Calibration is not needed. Delayed scaling sets ``weight_granularity``
        to ``"per_tensor"`` and ``act_symmetric`` to True, and stores float formats with
        ``saturate=True`` (TE's saturating casts: a value past the delayed range clips to
        ``+-max`` instead of becoming inf / NaN). It needs element formats, non-learned
        estimators, ``act_scale="static"``, symmetric weights, ``requant=None`` and one
        gradient format for both backward products. Each layer must run once per step
        and reach the loss: the cotangents of two calls add up, and the history of a layer
        that does not reach the loss comes back as zeros.
      amax_history: ``H >= 1``, the length of each amax history (TE's
        ``amax_history_len``; 1 is the previous step's amax).
      margin: ``>= 0``; ``scale *= 2^margin`` (headroom against growth between steps).
      rounding: how weights and activations are rounded in the forward pass, one of the
        formats' rounding modes (``jquant.formats.rounding_modes_of``; block formats:
        ``"nearest_even"`` or ``"stochastic"``). ``"stochastic"`` draws from the ``"quant"``
        RNG stream as ``grad_rounding`` does (a fresh key per call: ``E[fq(x)] = x``), in
        ``mode="simulate"``, without ``grad`` and ``requant``; ``jquant.convert`` refuses it.
    """

    pattern: str
    weight: str | Format | None = "int8"
    act: str | Format | None = "int8"
    weight_granularity: str = "per_channel"
    weight_symmetric: bool = True
    act_symmetric: bool = False
    calibration: Any = "minmax"
    estimator: str | Estimator = "ste"
    act_estimator: str | Estimator | None = None
    mode: str = "simulate"
    keep_float: bool = False
    act_scale: str = "static"
    learned_init: str = "paper"
    weight_scale_bound: str = "qmax"
    block_size: int | None = None
    act_block_size: int | None = None
    grad: str | Format | None = None
    grad_rounding: str = "nearest_even"
    grad_operands: str | Format | None = None
    requant: str | None = None
    backward: BackwardConfig | None = None
    scaling: str | None = None
    amax_history: int = 16
    margin: float = 0
    rounding: str = "nearest_even"

    def __post_init__(self):
        if not isinstance(self.pattern, str):
            raise TypeError(f"QuantRule.pattern must be a str, got {type(self.pattern).__name__}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            msg = f"QuantRule.pattern {self.pattern!r} is not a valid regex: {e}"
            raise ValueError(msg) from None
        object.__setattr__(self, "weight", _format_or_none("weight", self.weight))
        object.__setattr__(self, "act", _format_or_none("act", self.act))
        object.__setattr__(self, "grad", _format_or_none("grad", self.grad))
        object.__setattr__(
            self, "grad_operands", _format_or_none("grad_operands", self.grad_operands)
        )
        _check_choice("grad_rounding", self.grad_rounding, ROUNDING_MODES)
        for name in ("grad", "grad_operands"):
            if block_size_of(getattr(self, name)) is not None:
                raise ValueError(
                    f"QuantRule.{name}={format_name(getattr(self, name))!r}: the quantized "
                    "backward products take element formats (int, fp8), not block formats"
                )
        if self.grad is not None and self.mode == "int" and self.grad_operands is None:
            raise ValueError(
                "QuantRule.grad_operands must be set with mode='int' and a grad format: the "
                "int8 backward products requantize the reused input and kernel per tensor"
            )
        _check_choice("weight_granularity", self.weight_granularity, GRANULARITIES)
        calibration = get_observer(self.calibration, "QuantRule.calibration")
        if not getattr(calibration, "streams", True):
            raise ValueError(
                f"QuantRule.calibration {calibration!r} has no streaming observer; choose one "
                f"of {observer_names(streams=True)} or an observer object"
            )
        object.__setattr__(self, "calibration", calibration)
        object.__setattr__(self, "estimator", get_estimator(self.estimator, "QuantRule.estimator"))
        self._check_blocks()
        if self.act_estimator is not None:
            act_est = get_estimator(self.act_estimator, "QuantRule.act_estimator")
            object.__setattr__(self, "act_estimator", act_est)
        _check_choice("mode", self.mode, MODES)
        _check_choice("act_scale", self.act_scale, ACT_SCALES)
        _check_choice("learned_init", self.learned_init, LEARNED_INITS)
        _check_choice("weight_scale_bound", self.weight_scale_bound, WEIGHT_SCALE_BOUNDS)
        if (
            self.weight_scale_bound != "qmax"
            and self.weight is not None
            and not (
                getattr(self.weight, "integer_grid", False)
                and self.weight.has_zero_point  # not midrise
                and self.weight_symmetric
            )
        ):
            raise ValueError(
                "QuantRule.weight_scale_bound='qmax_plus_half' needs symmetric integer "
                f"weights (weight_symmetric=True, not midrise), got {self.weight}"
            )
        if self.act_scale != "static" and self._estimator("act").learned:
            raise ValueError(
                f"QuantRule.act_scale={self.act_scale!r} takes each activation's own range, "
                f"which is not learned, but the activation estimator is "
                f"{self._estimator('act')!r}: set act_estimator='ste' or 'clipped_ste'"
            )
        for name in ("weight", "act"):
            fmt, est = getattr(self, name), self._estimator(name)
            if fmt is not None and est.learned and not getattr(fmt, "integer_grid", False):
                raise ValueError(
                    f"QuantRule.{name}: estimator {est.name!r} learns an integer step, "
                    f"so the format must be an IntFormat, got {fmt}"
                )
        self._check_act_blocks()
        self._check_requant()
        self._check_backward()
        self._check_scaling()
        self._check_rounding()
        if self.act is not None and self._estimator("act").learns_clip and self.act.signed:
            raise ValueError(
                f"QuantRule.act: PACT clips to [0, alpha] and needs an unsigned format, "
                f"got {self.act}"
            )

    def _check_blocks(self) -> None:
        b = self.block_size
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 1):
            raise ValueError(f"QuantRule.block_size must be None or a positive int, got {b!r}")
        if b is None and self.weight_granularity == "per_block":
            raise ValueError("QuantRule.weight_granularity='per_block' needs block_size")
        if b is not None and self.weight_granularity == "per_tensor":
            raise ValueError(
                f"QuantRule.block_size={b} asks for per-block scales, but weight_granularity "
                "is 'per_tensor': use 'per_block' (or leave the default)"
            )
        own = block_size_of(self.weight)
        if b is not None and own is not None:
            raise ValueError(
                f"QuantRule.block_size={b}: the weight format {format_name(self.weight)} has "
                f"its own blocks of {own}; leave block_size None"
            )
        for name in ("weight", "act"):
            fmt, est = getattr(self, name), self._estimator(name)
            if block_size_of(fmt) is None:
                continue
            if est != "ste":
                raise ValueError(
                    f"QuantRule.{name}={format_name(fmt)!r} fake-quantizes with "
                    "jquant.mx.fake_quant (straight-through gradient): its estimator must be "
                    f"'ste', got {est!r}"
                )
            if self.mode == "int":
                raise ValueError(
                    f"QuantRule.{name}={format_name(fmt)!r} has no integer kernel: use "
                    "mode='simulate'"
                )
        if block_size_of(self.act) is not None and self.act_scale != "static":
            raise ValueError(
                f"QuantRule.act={format_name(self.act)!r} scales each block itself: act_scale "
                f"must be 'static' (the default), got {self.act_scale!r}"
            )
        if b is not None:
            object.__setattr__(self, "weight_granularity", "per_block")

    def _check_act_blocks(self) -> None:
        """``act_block_size``: a positive int, for an integer-grid activation format whose
        scales are not learned, calibrated by a method with a per-axis observer."""
        b = self.act_block_size
        if b is None:
            return
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"QuantRule.act_block_size must be None or a positive int, got {b!r}")
        problem = None
        if self.act is None:
            problem = "act is None (float activations have no scales)"
        elif block_size_of(self.act) is not None:
            problem = f"the act format {self.act.name} has its own blocks of {self.act.block_size}"
        elif self._estimator("act").learned:
            problem = (
                f"the activation estimator {self._estimator('act')!r} learns one scale per "
                "tensor; use 'ste' or 'clipped_ste' (act_estimator)"
            )
        elif self.mode == "int" and self.block_size not in (None, b):
            problem = (
                f"mode='int' sums one int32 partial product per block, so the weight blocks "
                f"(block_size={self.block_size}) must be the same size"
            )
        if problem:
            raise ValueError(f"QuantRule.act_block_size={b}: {problem}")
        if self.act_scale == "static":
            method_block_observer(self.calibration, b, name="QuantRule.calibration")

    def blockwise(self) -> str | None:
        """Which scales of this rule's layers are block-wise (weight: ``block_size``,
        activation: ``act_block_size``), in words, or None; the integer program
        (``jquant.convert``, ``requant``) refuses them, having no block-wise kernel.

        >>> QuantRule(".*", act_block_size=32).blockwise()
        'block-wise activation scales (act_block_size=32)'
        """
        parts = []
        if self.block_size is not None:
            parts.append(f"block-wise weight scales (block_size={self.block_size})")
        if self.act_block_size is not None:
            parts.append(f"block-wise activation scales (act_block_size={self.act_block_size})")
        return " and ".join(parts) or None

    def _check_requant(self) -> None:
        """``requant`` needs what the integer program has: static integer formats of <= 8
        bits (signed, symmetric weights) and static activation scales."""
        _check_choice("requant", self.requant, REQUANT_MODES)
        if self.requant is None:
            return
        problem = None
        if self.keep_float:
            problem = "keep_float=True leaves nothing to requantize"
        elif self.act_scale != "static":
            problem = f"act_scale={self.act_scale!r}: the program needs static activation scales"
        elif self.blockwise():
            problem = f"{self.blockwise()}: the program has no block-wise kernel"
        elif not is_int8_grid(self.act):
            problem = f"act={self.act}: the program needs a static integer format of <= 8 bits"
        elif not is_int8_grid(self.weight, signed=True) or not self.weight_symmetric:
            problem = (
                f"weight={self.weight} (weight_symmetric={self.weight_symmetric}): the program "
                "needs symmetric signed static integer weights of <= 8 bits"
            )
        if problem:
            raise ValueError(f"QuantRule.requant={self.requant!r}: {problem}")

    def _check_backward(self) -> None:
        """``backward`` is a BackwardConfig that replaces the ``grad*`` shorthands."""
        if self.backward is None:
            return
        if not isinstance(self.backward, BackwardConfig):
            raise TypeError(
                "QuantRule.backward must be a jquant.ops.BackwardConfig or None, got "
                f"{type(self.backward).__name__}"
            )
        if (
            self.grad is not None
            or self.grad_operands is not None
            or self.grad_rounding != "nearest_even"
        ):
            raise ValueError(
                "QuantRule.backward sets both backward products; leave grad, grad_rounding "
                "and grad_operands at their defaults (or drop backward and use them)"
            )

    def _check_scaling(self) -> None:
        """``scaling``, ``amax_history`` and ``margin``; delayed scaling's requirements."""
        _check_choice("scaling", self.scaling, SCALINGS)
        h = self.amax_history
        if isinstance(h, bool) or not isinstance(h, int) or h < 1:
            raise ValueError(f"QuantRule.amax_history must be an int >= 1, got {h!r}")
        m = self.margin
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not m >= 0:
            raise ValueError(f"QuantRule.margin must be a real number >= 0, got {m!r}")
        if self.scaling is None:
            return
        problem = None
        bwd = self.backward_config()
        grads = [] if bwd is None else [c for c in (bwd.dlhs_grad, bwd.drhs_grad) if c]
        if block_size_of(self.weight) is not None or block_size_of(self.act) is not None:
            problem = "block formats scale each block themselves; use element formats"
        elif self.estimator.learned or self._estimator("act").learned:
            problem = "learned estimators learn the scale; use 'ste' or 'clipped_ste'"
        elif self.act_scale != "static":
            problem = f"act_scale={self.act_scale!r}: the history gives the activation scale"
        elif self.block_size is not None or not self.weight_symmetric:
            problem = "the kernel scale is one symmetric scale per tensor (no blocks)"
        elif self.requant is not None:
            problem = f"requant={self.requant!r} runs with calibrated static scales"
        elif len({c.fmt for c in grads}) > 1 or any(
            c.axis is not None or c.block_size is not None for c in grads
        ):
            problem = "one per-tensor gradient format serves both backward products"
        if problem:
            raise ValueError(f"QuantRule.scaling={self.scaling!r}: {problem}")
        object.__setattr__(self, "weight_granularity", "per_tensor")
        object.__setattr__(self, "act_symmetric", True)
        for name in ("weight", "act", "grad", "grad_operands"):
            fmt = getattr(self, name)
            if _saturates_not(fmt):  # TE's saturating casts
                object.__setattr__(self, name, dataclasses.replace(fmt, saturate=True))
        if self.backward is not None:
            object.__setattr__(self, "backward", _saturating_backward(self.backward))

    def scaling_recipe(self) -> DelayedScaling | None:
        """The :func:`jquant.ops.scaling.delayed_scaling` of ``scaling="delayed"`` (None
        otherwise)."""
        if self.scaling != "delayed":
            return None
        return delayed_scaling(self.amax_history, self.margin)

    def scaled_tensors(self) -> tuple[str, ...]:
        """The tensors with an amax history under delayed scaling, among ``"input"``,
        ``"kernel"`` and ``"grad"`` (empty without delayed scaling or with ``keep_float``).

        >>> QuantRule(".*", grad="fp8_e5m2", scaling="delayed").scaled_tensors()
        ('input', 'kernel', 'grad')
        """
        if self.scaling is None or self.keep_float:
            return ()
        bwd = self.backward_config()
        has_grad = bwd is not None and (bwd.dlhs_grad or bwd.drhs_grad) is not None
        present = {"input": self.act is not None, "kernel": self.weight is not None}
        return (*(t for t, on in present.items() if on), *(("grad",) if has_grad else ()))

    def grad_format(self) -> Format | None:
        """The format of ``g`` under delayed scaling (one for both backward products)."""
        bwd = self.backward_config()
        cfg = None if bwd is None else (bwd.dlhs_grad or bwd.drhs_grad)
        return None if cfg is None else cfg.fmt

    def _check_rounding(self) -> None:
        """``rounding`` is one the formats honour; ``"stochastic"`` only where a key reaches
        the quantizer (simulate forward, no quantized backward, no requantized eval)."""
        _check_choice("rounding", self.rounding, ROUNDING_MODES)
        for name in ("weight", "act"):
            fmt = getattr(self, name)
            if fmt is not None and self.rounding not in rounding_modes_of(fmt):
                raise ValueError(
                    f"QuantRule.rounding={self.rounding!r} is not a rounding mode of "
                    f"QuantRule.{name}={format_name(fmt)}: choose one of {rounding_modes_of(fmt)}"
                )
        if self.rounding != "nearest_even" and self.requant is not None:
            raise ValueError(
                f"QuantRule.rounding={self.rounding!r}: requant={self.requant!r} computes what "
                "the integer kernels compute, with their own rounding; use the default rounding"
            )
        if self.rounding != "stochastic":
            return
        checks = (
            ("mode", self.mode == "int"),
            ("grad", self.grad is not None),
            ("backward", self.backward is not None),
            ("scaling", self.scaling is not None),
        )
        for field, problem in checks:
            if problem:
                raise ValueError(
                    "QuantRule.rounding='stochastic' needs mode='simulate', grad=None, "
                    "backward=None and scaling=None (a key reaches only the simulated "
                    f"forward), got {field}={getattr(self, field)!r}"
                )

    def _estimator(self, which: str) -> Estimator:
        return self.act_estimator if which == "act" and self.act_estimator else self.estimator

    def weight_config(
        self, kernel_ndim: int, channel_axes: Sequence[int] | None = None
    ) -> QuantConfig | None:
        """The ``ops.QuantConfig`` of a kernel of ``kernel_ndim`` axes (None: float).

        Per channel, the scales run along ``channel_axes``: the kernel's output axes (those
        not contracted), by default its last axis (Dense, Conv).
        """
        if self.keep_float or self.weight is None:
            return None
        if self.weight_granularity == "per_tensor":
            axis = None
        elif channel_axes is None:
            axis = kernel_ndim - 1
        else:
            axis = tuple(channel_axes) or None
        block_axis = None
        own_blocks = block_size_of(self.weight) is not None
        if own_blocks:  # a block format: its blocks run along the contraction
            axis = None
        if self.block_size is not None or own_blocks:
            if channel_axes is None:
                contracted = [kernel_ndim - 2]
            else:
                contracted = [a for a in range(kernel_ndim) if a not in channel_axes]
            if len(contracted) != 1:
                raise ValueError(
                    f"QuantRule({self.pattern!r}): a kernel of rank {kernel_ndim} with "
                    f"output axes {tuple(channel_axes)} contracts {len(contracted)} axes; "
                    "block-wise weights need exactly one"
                )
            block_axis = contracted[0]
        return QuantConfig(
            fmt=self.weight,
            symmetric=self.weight_symmetric,
            axis=axis,
            estimator=self._estimator("weight"),
            rounding=self.rounding,
            block_size=self.block_size,
            block_axis=block_axis,
        )

    def act_config(self) -> QuantConfig | None:
        """The ``ops.QuantConfig`` of the input activation (None: float): per tensor, or
        with ``act_block_size`` block-wise along the last axis (the features).

        >>> QuantRule(".*", act_block_size=32).act_config().block_size
        32
        """
        if self.keep_float or self.act is None:
            return None
        symmetric = self.act_symmetric and not self._estimator("act").learns_clip
        blocks = {}
        if self.act_block_size is not None:
            blocks = dict(block_size=self.act_block_size, block_axis=-1)
        return QuantConfig(
            fmt=self.act,
            symmetric=symmetric,
            estimator=self._estimator("act"),
            rounding=self.rounding,
            **blocks,
        )

    def operands(self, kernel: bool = True) -> tuple[Operand, Operand]:
        """How this rule quantizes the two operands of a matched layer's product (a float
        operand has ``fmt=None``): ``(input, kernel)`` of a layer with a kernel, or with
        ``kernel=False`` ``(lhs, rhs)`` of an activation x activation einsum, which
        quantizes both operands as activations (``act``, ``act_scale``) and no weights.

        >>> lhs, rhs = QuantRule(".*", act_scale="dynamic_per_token").operands(kernel=False)
        >>> rhs.name, rhs.fmt.bits, rhs.scale
        ('rhs', 8, 'dynamic_per_token')
        """

        def operand(name: str, fmt, block: int | None, scale: str) -> Operand:
            if self.keep_float or fmt is None:
                return Operand(name, None, None, None)
            block = block or block_size_of(fmt)
            return Operand(name, fmt, self.scaling or scale, block)

        act = functools.partial(operand, fmt=self.act, block=self.act_block_size)
        if not kernel:
            return act("lhs", scale=self.act_scale), act("rhs", scale=self.act_scale)
        block = self.block_size or block_size_of(self.weight)
        granularity = "per_block" if block is not None else self.weight_granularity
        weight = operand("kernel", self.weight, block, granularity)
        return act("input", scale=self.act_scale), weight

    def backward_config(self) -> BackwardConfig | None:
        """The ``jquant.ops.BackwardConfig`` of the layer's product (None: float gradients).

        >>> QuantRule(".*", grad="fp8_e5m2").backward_config().dlhs_grad.fmt.name
        'fp8_e5m2'
        """
        if self.keep_float:
            return None
        if self.backward is not None:
            return self.backward
        if self.grad is None:
            return None
        operands = None if self.grad_operands is None else QuantConfig(self.grad_operands)
        return BackwardConfig.uniform(QuantConfig(self.grad), operands, self.grad_rounding)


def _saturates_not(fmt) -> bool:
    """Whether ``fmt`` is a float format that overflows to inf / NaN (``saturate=False``)."""
    return getattr(fmt, "saturate", None) is False


def _saturating_backward(bwd: BackwardConfig) -> BackwardConfig:
    """``bwd`` with each float format saturating (delayed scaling's casts)."""

    def sat(cfg):
        fmt = None if cfg is None else cfg.fmt
        if _saturates_not(fmt):
            return dataclasses.replace(cfg, fmt=dataclasses.replace(fmt, saturate=True))
        return cfg

    names = ("dlhs_grad", "dlhs_rhs", "drhs_lhs", "drhs_grad")
    return dataclasses.replace(bwd, **{n: sat(getattr(bwd, n)) for n in names})


DEFAULT_RULE = QuantRule(".*")


class RuleMatch(NamedTuple):
    """Result of :func:`match_rules`.

    ``assignment`` maps every quantizable path to its first matching rule (None: no rule,
    stays float); ``unused`` lists the rules that matched no path, in their original order;
    ``not_quantized`` maps the path of each layer that holds a kernel and that a rule asked to
    quantize, but whose type jquant cannot quantize, to that type's name: such a layer stays
    float, and :func:`report_not_quantized` warns about it.
    """

    assignment: dict[str, QuantRule | None]
    unused: tuple[QuantRule, ...]
    not_quantized: Mapping[str, str] = MappingProxyType({})


def check_rules(rules) -> tuple[QuantRule, ...]:
    """Returns ``rules`` as a tuple, raising TypeError for anything but QuantRules."""
    if isinstance(rules, QuantRule):
        rules = (rules,)
    rules = tuple(rules)
    for i, r in enumerate(rules):
        if not isinstance(r, QuantRule):
            raise TypeError(f"rules[{i}] must be a QuantRule, got {type(r).__name__}")
    return rules


def first_match(rules: Sequence[QuantRule], path: str) -> QuantRule | None:
    """The first rule whose pattern fullmatches ``path``, or None."""
    for r in rules:
        if re.fullmatch(r.pattern, path):
            return r
    return None


def match_rules(
    rules: Iterable[QuantRule],
    paths: Iterable[str],
    unsupported: Mapping[str, str] | None = None,
) -> RuleMatch:
    """Assigns each path its first matching rule and reports the rules that match nothing.

    Args:
      rules: QuantRules, first match wins.
      paths: paths of the layers jquant can quantize.
      unsupported: ``{path: type name}`` of layers with a kernel that jquant cannot quantize;
        those a rule would quantize (a match without ``keep_float``) go to
        ``RuleMatch.not_quantized``. A rule that matches only such layers counts as used.
    """
    rules = check_rules(rules)
    assignment = {p: first_match(rules, p) for p in paths}
    matched = {p: first_match(rules, p) for p in unsupported or {}}
    not_quantized = {
        p: unsupported[p] for p, r in matched.items() if r is not None and not r.keep_float
    }
    used = {id(r) for r in (*assignment.values(), *matched.values()) if r is not None}
    unused = tuple(r for r in rules if id(r) not in used)
    return RuleMatch(assignment, unused, not_quantized)


def set_bits(
    rules: Iterable[QuantRule],
    path: str,
    *,
    weight_bits: int | None = None,
    act_bits: int | None = None,
) -> tuple[QuantRule, ...]:
    """Rules where the layer at ``path`` gets new integer bit widths, the rest unchanged.

    A rule for exactly ``path`` (a copy of the rule that matched it, with the widths replaced)
    is put first, so it wins. Sensitivity sweeps call this once per layer.
    """
    rules = check_rules(rules)
    base = first_match(rules, path) or QuantRule(".*")
    if base.keep_float:
        base = dataclasses.replace(base, keep_float=False)
    changes = {}
    for name, bits in (("weight", weight_bits), ("act", act_bits)):
        if bits is None:
            continue
        old = getattr(base, name)
        old = old if callable(getattr(old, "with_bits", None)) else int8
        changes[name] = old.with_bits(bits)
    return (dataclasses.replace(base, pattern=re.escape(path), **changes), *rules)


def report_unused(match: RuleMatch, on_unused: str = "warn") -> None:
    """Warns about (``"warn"``), raises ValueError on (``"raise"``) or ignores rules that
    matched no layer, naming them and the layer paths that exist."""
    if on_unused not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_unused must be 'warn', 'raise' or 'ignore', got {on_unused!r}")
    if not match.unused or on_unused == "ignore":
        return
    msg = (
        f"quantization rules matched no layer: {[r.pattern for r in match.unused]}; "
        f"layer paths are {list(match.assignment)}"
    )
    if on_unused == "raise":
        raise ValueError(msg)
    warnings.warn(msg, stacklevel=3)


def report_not_quantized(match: RuleMatch) -> None:
    """Warns (UserWarning) about each layer a rule asked to quantize but that stays float
    because jquant cannot quantize its type, naming its path and type."""
    if match.not_quantized:
        layers = ", ".join(f"{p!r} ({t})" for p, t in match.not_quantized.items())
        warnings.warn(
            f"quantization rules matched layers that jquant cannot quantize, so they stay "
            f"float: {layers}; add QuantRule(<path>, keep_float=True) to keep them float "
            "knowingly, or replace them by a supported layer",
            UserWarning,
            stacklevel=3,
        )
