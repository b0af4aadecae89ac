"""Flax model (calibrated or QAT-trained, rules included) -> integer :class:`Program`.

For each quantized Conv / Dense, with input scale ``s_x``, per-channel weight scale ``s_w``
and the output scale ``s_y`` (the next layer's input quantizer, or ``output_qparams`` for the
last layer)::

    q_w = quantize(W, s_w)                     (the codes the fake-quant model uses)
    BatchNorm after the layer:  k = gamma / sqrt(var + eps),
        q_w[..., c] *= sign(k_c),  s_w[c] *= |k_c|,  b = (b - mu) k + beta
    b_int = round(b / (s_x s_w))               (int32)
    M = s_x s_w / s_y                          (Requant, per output channel)

Folding the BN factor into the scale instead of the weights keeps the weight codes equal to
those of the simulated layer, so the integer program computes what the fake-quant model
computes up to the rounding of the bias and of ``M``. Relu right after a layer (or its
BatchNorm) is fused as the output clamp; pooling and reshapes follow as their own steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import integer
from jquant.convert.program import Conv, Dense, Pool, Program, Reshape, validate
from jquant.convert.trace import Node, trace_layers
from jquant.formats import IntFormat
from jquant.integer.fixed_point import INT32_MAX, MULTIPLIER_MODES
from jquant.nn.linen import QuantizedLayer, QuantizedModel
from jquant.nn.state import STATS
from jquant.quant import QParams, qparams_from_range, quantize

__all__ = ["convert", "output_qparams_from_data", "with_quantized_bias"]


@dataclasses.dataclass(frozen=True)
class _Stage:
    """A linear layer with what follows it: optional BatchNorm, fused relu, pools/reshapes."""

    layer: Node
    bn: Node | None = None
    relu: bool = False
    after: tuple[Node, ...] = ()


def _stages(nodes: list[Node]) -> tuple[tuple[Node, ...], list[_Stage]]:
    """Splits the node list into the steps before the first layer and one stage per layer."""
    before: list[Node] = []
    stages: list[_Stage] = []
    for node in nodes:
        if node.kind in ("conv", "dense"):
            stages.append(_Stage(node))
            continue
        last = stages[-1] if stages else None
        if node.kind == "batch_norm":
            if last is None or last.bn is not None or last.relu or last.after:
                raise ValueError(
                    f"BatchNorm {node.path!r} must directly follow a Conv or Dense to be folded"
                )
            stages[-1] = dataclasses.replace(last, bn=node)
        elif node.kind == "relu":
            if last is None or last.relu or last.after:
                raise ValueError(
                    f"relu in {node.path!r} must directly follow a Conv / Dense (or its "
                    "BatchNorm) to be fused into its output clamp"
                )
            stages[-1] = dataclasses.replace(last, relu=True)
        elif last is None:
            before.append(node)
        else:
            stages[-1] = dataclasses.replace(last, after=(*last.after, node))
    if not stages:
        raise ValueError("the model has no Conv or Dense layer to convert")
    return tuple(before), stages


def _act_format(path: str, fmt) -> IntFormat:
    if not isinstance(fmt, IntFormat) or not fmt.is_static or fmt.bits > 8 or fmt.midrise:
        raise ValueError(
            f"layer {path!r}: the integer program needs static integer activation formats of "
            f"<= 8 bits, got {fmt}"
        )
    return fmt


def _signed(qp: QParams, fmt: IntFormat) -> tuple[np.float32, int, tuple[int, int]]:
    """Per-tensor ``(scale, zero_point, (qmin, qmax))`` on the signed int8 grid (unsigned
    formats are shifted down by ``2^(b-1)``: same values, codes minus the offset)."""
    scale, zp = np.asarray(qp.scale, np.float32), np.asarray(qp.zero_point, np.float64)
    if scale.size != 1 or zp.size != 1:
        raise ValueError(f"activation QParams must be per tensor, got scale shape {scale.shape}")
    shift = 0 if fmt.signed else 1 << (fmt.bits - 1)
    zp = float(zp.reshape(()))
    if zp != round(zp):
        raise ValueError(f"activation zero point must be an integer, got {zp}")
    return scale.reshape(()), int(zp) - shift, (fmt.qmin - shift, fmt.qmax - shift)


def _weight_codes(q: QuantizedLayer) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, per-channel scale)`` of the layer's kernel, as the fake-quant layer has them."""
    rule, kernel = q.rule, np.asarray(q.kernel)
    fmt = rule.weight
    if not isinstance(fmt, IntFormat) or not fmt.is_static or fmt.bits > 8 or not fmt.signed:
        raise ValueError(
            f"layer {q.path!r}: weights must use a static signed integer format of <= 8 bits, "
            f"got {fmt}"
        )
    if q.kernel_qparams is None:
        raise ValueError(f"layer {q.path!r}: the kernel is not quantized")
    channels = kernel.shape[-1]
    zp = np.asarray(q.kernel_qparams.zero_point)
    if np.any(zp != 0):
        raise ValueError(f"layer {q.path!r}: weights must be symmetric (zero point 0), got {zp}")
    cfg = rule.weight_config(kernel.ndim)
    codes = np.asarray(quantize(jnp.asarray(kernel), q.kernel_qparams, fmt, rounding=cfg.rounding))
    scale = np.broadcast_to(np.asarray(q.kernel_qparams.scale, np.float64).reshape(-1), channels)
    return codes.astype(np.int64), scale


def _fold_batch_norm(bn: Node, variables, codes, w_scale, bias):
    """BatchNorm ``y = k (z - mu) + beta`` into codes (sign), scales (``|k|``) and bias."""
    module, path = bn.module, bn.path
    axis = module.axis if isinstance(module.axis, int) else None
    use_running = bn.info.get("use_running_average", module.use_running_average)
    if not use_running or axis not in (-1, codes.ndim - 1):
        raise ValueError(
            f"BatchNorm {path!r}: only running statistics (use_running_average=True) over the "
            f"channel axis can be folded, got use_running_average={use_running}, axis={axis}"
        )
    params = _subtree(variables.get("params", {}), path)
    stats = _subtree(variables.get("batch_stats", {}), path)
    mean, var = (np.asarray(stats[k], np.float64) for k in ("mean", "var"))
    gamma = np.asarray(params.get("scale", np.ones_like(mean)), np.float64)
    beta = np.asarray(params.get("bias", np.zeros_like(mean)), np.float64)
    k = gamma / np.sqrt(var + module.epsilon)
    codes = codes * np.sign(k)
    if np.any(codes > 127):
        raise ValueError(
            f"BatchNorm {path!r}: a weight code -128 meets a negative BN factor and cannot be "
            "negated in int8; use a narrow weight format (IntFormat(8, narrow=True))"
        )
    w_scale = np.where(k == 0, w_scale, w_scale * np.abs(k))
    return codes, w_scale, (bias - mean) * k + beta


def _subtree(tree: Mapping, path: str) -> Mapping:
    for key in path.split("/"):
        tree = tree.get(key, {})
    return tree


def _folded(stage: _Stage, q: QuantizedLayer, variables, x_scale):
    """``(codes, w_scale float32, float bias, int bias)`` of a layer with its BN folded in."""
    codes, w_scale = _weight_codes(q)
    bias = np.zeros(codes.shape[-1]) if q.bias is None else np.asarray(q.bias, np.float64)
    if stage.bn is not None:
        codes, w_scale, bias = _fold_batch_norm(stage.bn, variables, codes, w_scale, bias)
    w_scale = w_scale.astype(np.float32)
    b_int = np.round(bias / (np.float64(x_scale) * w_scale.astype(np.float64)))
    return codes, w_scale, bias, b_int


def _linear_spec(
    stage: _Stage,
    q: QuantizedLayer,
    variables,
    x_qp: tuple,
    y_qp: tuple,
    mode: str,
) -> Conv | Dense:
    path, node = q.path, stage.layer
    (x_scale, x_zp, _), (y_scale, y_zp, clamp) = x_qp, y_qp
    codes, w_scale, _, b_int = _folded(stage, q, variables, x_scale)
    if np.any(np.abs(b_int) > INT32_MAX):
        raise ValueError(f"layer {path!r}: bias / (x_scale * w_scale) does not fit int32")
    w, b = codes.astype(np.int8), b_int.astype(np.int32)
    try:
        requant = integer.requant_from_scales(x_scale, w_scale, y_scale, mode)
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {path!r}: {e}") from None
    common = dict(
        path=path,
        b=b,
        x_zp=np.int32(x_zp),
        out_zp=np.int32(y_zp),
        requant=requant,
        x_scale=np.float32(x_scale),
        w_scale=w_scale,
        out_scale=np.float32(y_scale),
        activation="relu" if stage.relu else None,
        clamp=clamp,
    )
    if node.kind == "dense":
        return Dense(w=w, **common)
    info, spatial = node.info, w.ndim - 2
    pad = lambda v, one: (one, *v) if spatial == 1 else tuple(v)  # noqa: E731
    return Conv(
        w=w.reshape(1, *w.shape) if spatial == 1 else w,
        strides=pad(info["strides"], 1),
        padding=pad(info["padding"], (0, 0)),
        dilation=pad(info["dilation"], 1),
        groups=info["groups"],
        spatial=spatial,
        **common,
    )


def _glue_spec(node: Node) -> Pool | Reshape:
    if node.kind == "reshape":
        return Reshape(node.path, tuple(int(d) for d in node.info))
    info, spatial = node.info, len(node.info["window"])
    pad = lambda v, one: (one, *v) if spatial == 1 else tuple(v)  # noqa: E731
    return Pool(
        node.path,
        "max" if node.kind == "max_pool" else "avg",
        pad(info["window"], 1),
        pad(info["strides"], 1),
        pad(info["padding"], (0, 0)),
        spatial,
    )


def _quantized_layers(qmodel: QuantizedModel, variables, stages) -> list[QuantizedLayer]:
    layers = {q.path: q for q in qmodel.layers(variables)}
    out = []
    for stage in stages:
        path = stage.layer.path
        if path not in layers:
            rule = qmodel.match.assignment.get(path)
            why = "no rule matches it" if rule is None else f"its rule {rule.pattern!r} keeps it"
            raise ValueError(
                f"layer {path!r} is not quantized ({why} float); an integer-only program "
                "needs every Conv / Dense quantized"
            )
        q = layers[path]
        if q.input_qparams is None:
            raise ValueError(
                f"layer {path!r} has no input QParams: calibrate the model (phase "
                "'calibrate') or quantize its activations (rule.act) before converting"
            )
        out.append(q)
    return out


def _plan(qmodel, variables, example_x, apply_kwargs):
    """Traced stages, their quantized layers and each layer's input ``_signed`` QParams."""
    float_vars = {k: v for k, v in variables.items() if k != STATS}
    before, stages = _stages(trace_layers(qmodel.model, float_vars, example_x, **apply_kwargs))
    layers = _quantized_layers(qmodel, variables, stages)
    act_qps = [_signed(q.input_qparams, _act_format(q.path, q.rule.act)) for q in layers]
    return before, stages, layers, act_qps


def _check_model(qmodel) -> None:
    if not isinstance(qmodel, QuantizedModel):
        raise TypeError(
            f"qmodel must be a jquant.nn.linen.QuantizedModel, got {type(qmodel).__name__}"
        )


def convert(
    qmodel: QuantizedModel,
    variables: Mapping[str, Any],
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    mode: str = "double",
    **apply_kwargs,
) -> Program:
    """Converts a calibrated / QAT-trained quantized Linen model into an integer :class:`Program`.

    Weights become int8 codes (symmetric per output channel, as the rule quantizes them),
    biases int32 at ``s_x * s_w[c]``, BatchNorm is folded, relu fused; each layer's output is
    requantized to the next layer's input quantizer and the last layer's to
    ``output_qparams``. Every accumulator is checked: ``255 sum|w| + |b| <= 2^31 - 1``.

    Args:
      qmodel: the :class:`jquant.nn.linen.QuantizedModel` (rules included).
      variables: its variables, calibrated (``quant_stats``) and/or QAT-trained.
      example_x: an example input batch (its shape fixes the program's input shape).
      output_qparams: per-tensor int8 QParams of the logits, e.g. from
        :func:`output_qparams_from_data`.
      mode: requantization: ``"double"`` (TFLite reference), ``"single"`` or ``"fp32"``.
      **apply_kwargs: passed to ``model.apply`` (e.g. ``train=False``).

    Returns:
      A validated :class:`Program`.

    Raises:
      TypeError: wrong argument types.
      ValueError: unsupported layers or operations (naming the module path), unquantized or
        uncalibrated layers, bad scales / zero points, a possible int32 overflow.
    """
    _check_model(qmodel)
    if mode not in MULTIPLIER_MODES:
        raise ValueError(f"mode must be one of {MULTIPLIER_MODES}, got {mode!r}")
    if not isinstance(output_qparams, QParams):
        raise TypeError(
            f"output_qparams must be a jquant.QParams (see output_qparams_from_data), got "
            f"{type(output_qparams).__name__}"
        )
    variables = dict(variables)
    example_x = jnp.asarray(example_x)
    before, stages, layers, act_qps = _plan(qmodel, variables, example_x, apply_kwargs)
    act_qps.append(_signed(output_qparams, IntFormat(8)))
    specs: list = [_glue_spec(n) for n in before]
    for k, (stage, q) in enumerate(zip(stages, layers, strict=True)):
        specs.append(_linear_spec(stage, q, variables, act_qps[k], act_qps[k + 1], mode))
        specs.extend(_glue_spec(n) for n in stage.after)
    in_scale, in_zp, in_clamp = act_qps[0]
    out_scale, out_zp, _ = act_qps[-1]
    program = Program(
        layers=tuple(specs),
        input_scale=np.float32(in_scale),
        input_zp=np.int32(in_zp),
        output_scale=np.float32(out_scale),
        output_zp=np.int32(out_zp),
        input_shape=tuple(int(d) for d in example_x.shape[1:]),
        input_clamp=in_clamp,
        rounding=layers[0].rule.act_config().rounding,
    )
    return validate(program)


def output_qparams_from_data(
    qmodel: QuantizedModel,
    variables: Mapping[str, Any],
    batches: Iterable[jax.Array],
    **apply_kwargs,
) -> QParams:
    """Affine int8 QParams of the model's output (phase ``eval``) over ``batches``:
    ``qparams_from_range(min y, max y, int8)``, the output quantizer of the last layer."""
    ev = qmodel.with_phase("eval")
    fwd = jax.jit(lambda v, x: ev.apply(v, x, **apply_kwargs))
    lo, hi = np.inf, -np.inf
    for x in batches:
        y = np.asarray(fwd(variables, x))
        lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
    if not np.isfinite(lo):
        raise ValueError("output_qparams_from_data needs data: batches yielded no batch")
    qp = qparams_from_range(jnp.float32(lo), jnp.float32(hi), IntFormat(8))
    return QParams(jnp.asarray(qp.scale), jnp.asarray(qp.zero_point))


def _add(tree: Mapping, path: str, name: str, delta: np.ndarray) -> dict:
    """``tree`` (nested dicts) with ``delta`` added to the leaf ``path/name``."""
    head, _, rest = path.partition("/")
    out = dict(tree)
    if rest:
        out[head] = _add(tree[head], rest, name, delta)
    else:
        sub = dict(tree[head])
        sub[name] = (np.asarray(sub[name], np.float64) + delta).astype(np.float32)
        out[head] = sub
    return out


def with_quantized_bias(
    qmodel: QuantizedModel,
    variables: Mapping[str, Any],
    example_x: jax.Array,
    **apply_kwargs,
) -> dict[str, Any]:
    """Variables whose biases take the values of the program's int32 biases, so that the
    fake-quant model (phase ``eval``) simulates bias quantization as well.

    Each layer's folded bias ``b`` (BatchNorm included) becomes ``s_x s_w round(b / (s_x s_w))``
    by adding the difference to the layer's ``bias`` or, after a BatchNorm, to the BN's shift
    ``bias`` (beta). The fake-quant model then differs from the integer program only by the
    rounding of the requantization multipliers and float32 accumulation.

    Bias quantization needs no rule option for checking a conversion:
    :func:`jquant.convert.simulation` recovers ``acc + round(b / (s_x s_w))`` from the float
    output, so it simulates the int32 bias (and the requantization) of the plain variables bit
    for bit. This function serves the plain fake-quant model (phase ``eval``) and QAT
    fine-tuning that should see the int32-grid bias.

    Raises:
      ValueError: as :func:`convert`, or a layer whose bias has nowhere to go.
    """
    _check_model(qmodel)
    variables = dict(variables)
    _, stages, layers, act_qps = _plan(qmodel, variables, jnp.asarray(example_x), apply_kwargs)
    params = variables["params"]
    for stage, q, (x_scale, _, _) in zip(stages, layers, act_qps, strict=True):
        _, w_scale, bias, b_int = _folded(stage, q, variables, x_scale)
        delta = b_int * np.float64(x_scale) * w_scale.astype(np.float64) - bias
        owner = stage.bn.path if stage.bn is not None else q.path
        if "bias" not in _subtree(params, owner):
            if np.any(delta != 0):
                raise ValueError(f"layer {owner!r} has no bias parameter to carry the rounding")
            continue
        params = _add(params, owner, "bias", delta)
    variables["params"] = params
    return variables
