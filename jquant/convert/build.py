"""Flax model (calibrated or QAT-trained, rules included) -> integer :class:`Program`.

Every activation of the program is one int8 tensor with one scale and zero point. Its
QParams are, in this order: the input quantizer of the Conv / Dense layers that read it
(which must agree; pools and reshapes keep their input's QParams), ``output_qparams`` for the
model's output, or, for a value read only by residual adds, the add's output QParams. A
residual block ``relu(conv2(h) + h) -> dense`` thus requantizes ``conv2``'s output to the
dense layer's input scale, and the add rescales both inputs to that scale (TFLite ``ADD``).
The fake-quant model carries floats here (``conv2``'s output and the skip ``h`` are not
quantized until the dense layer's input quantizer), so the program differs from it by the
rounding of ``h`` and of ``conv2``'s output; :func:`jquant.convert.simulation` reproduces the
program bit for bit.

For each quantized Conv / Dense, with input scale ``s_x``, per-channel weight scale ``s_w``
and the output scale ``s_y``::

    q_w = quantize(W, s_w)                     (the codes the fake-quant model uses)
    BatchNorm after the layer:  k = gamma / sqrt(var + eps),
        q_w[..., c] *= sign(k_c),  s_w[c] *= |k_c|,  b = (b - mu) k + beta
    b_int = round(b / (s_x s_w))               (int32)
    M = s_x s_w / s_y                          (Requant, per output channel)

Folding the BN factor into the scale instead of the weights keeps the weight codes equal to
those of the simulated layer, so the integer program computes what the fake-quant model
computes up to the rounding of the bias and of ``M``. A :class:`~jquant.nn.bn_folding.QConvBN`
is converted from the folded kernel and bias its eval forward quantizes. Relu right after a
layer (or its BatchNorm, or an add) is fused as the output clamp; pooling and reshapes follow
as their own steps.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import integer
from jquant.convert import source
from jquant.convert.program import (
    INT8_RANGE,
    Add,
    Concat,
    Conv,
    Dense,
    Mean,
    Pool,
    Program,
    Reshape,
    validate,
)
from jquant.convert.trace import Node
from jquant.formats import IntFormat, is_int8_grid
from jquant.integer.fixed_point import INT32_MAX, MULTIPLIER_MODES
from jquant.nn.state import QuantizedLayer, subtree
from jquant.quant import QParams, qparams_from_range, quantize

__all__ = [
    "OUTPUT_RANGES",
    "convert",
    "convert_nnx",
    "output_qparams_from_data",
    "residual_qparams_from_data",
    "with_quantized_bias",
]


OUTPUT_RANGES = ("fake_quant", "float")  # output_qparams_from_data: whose logits' range
_LINEAR = ("conv", "dense", "conv_bn")
_SCALE_KEEPING = ("max_pool", "avg_pool", "reshape", "concat")
_REQUANTIZING = ("add", "mean")  # glue steps with their own output QParams


@dataclasses.dataclass(frozen=True)
class _Op:
    """One program step: a linear layer with its folded BatchNorm and fused relu, an add with
    its fused relu, a pool or a reshape. ``inputs`` / ``out``: graph values (trace numbers)."""

    node: Node
    inputs: tuple[int, ...]
    out: int
    bn: Node | None = None
    relu: bool = False


def _ops(nodes: list[Node]) -> list[_Op]:
    """Fuses each BatchNorm into the Conv / Dense it follows and each relu into the layer or
    add it follows; each fused node must be the only consumer of what it follows."""
    consumers: dict[int, list[int]] = {}
    for k, node in enumerate(nodes):
        for v in node.inputs:
            consumers.setdefault(v, []).append(k)

    def sole(v: int, kind: str) -> int | None:
        c = consumers.get(v, [])
        return c[0] if len(c) == 1 and nodes[c[0]].kind == kind else None

    ops, fused = [], set()
    for k, node in enumerate(nodes):
        if k in fused:
            continue
        if node.kind == "batch_norm":
            raise ValueError(
                f"BatchNorm {node.path!r} must directly follow a Conv or Dense, as the only "
                "consumer of its output, to be folded"
            )
        if node.kind == "relu":
            raise ValueError(
                f"relu in {node.path!r} must directly follow a Conv / Dense (or its BatchNorm) "
                "or an add, as the only consumer of its output, to be fused into its clamp"
            )
        out, bn, relu = k + 1, None, False
        if node.kind in ("conv", "dense") and (j := sole(out, "batch_norm")) is not None:
            bn, out = nodes[j], j + 1
            fused.add(j)
        if node.kind in (*_LINEAR, "add") and (j := sole(out, "relu")) is not None:
            relu, out = True, j + 1
            fused.add(j)
        ops.append(_Op(node, node.inputs, out, bn, relu))
    if not any(op.node.kind in _LINEAR for op in ops):
        raise ValueError("the model has no Conv or Dense layer to convert")
    return ops


def _act_format(path: str, fmt) -> IntFormat:
    if not is_int8_grid(fmt):
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
    if not is_int8_grid(fmt, signed=True):
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
    params = subtree(variables.get("params", {}), path)
    stats = subtree(variables.get("batch_stats", {}), path)
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


def _folded(op: _Op, q: QuantizedLayer, variables, x_scale):
    """``(codes, w_scale float32, float bias, int bias)`` of a layer with its BN folded in."""
    codes, w_scale = _weight_codes(q)
    bias = np.zeros(codes.shape[-1]) if q.bias is None else np.asarray(q.bias, np.float64)
    if op.bn is not None:
        codes, w_scale, bias = _fold_batch_norm(op.bn, variables, codes, w_scale, bias)
    w_scale = w_scale.astype(np.float32)
    b_int = np.round(bias / (np.float64(x_scale) * w_scale.astype(np.float64)))
    return codes, w_scale, bias, b_int


def _wrapped(path: str, fn, *args):
    """``fn(*args)``, its TypeError / ValueError prefixed with the layer's path."""
    try:
        return fn(*args)
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {path!r}: {e}") from None


def _linear_spec(op: _Op, q: QuantizedLayer, variables, x_qp: tuple, y_qp: tuple, mode: str):
    path, node = q.path, op.node
    (x_scale, x_zp, _), (y_scale, y_zp, clamp) = x_qp, y_qp
    codes, w_scale, _, b_int = _folded(op, q, variables, x_scale)
    if np.any(np.abs(b_int) > INT32_MAX):
        raise ValueError(f"layer {path!r}: bias / (x_scale * w_scale) does not fit int32")
    w, b = codes.astype(np.int8), b_int.astype(np.int32)
    requant = _wrapped(path, integer.requant_from_scales, x_scale, w_scale, y_scale, mode)
    common = dict(
        path=path,
        b=b,
        x_zp=np.int32(x_zp),
        out_zp=np.int32(y_zp),
        requant=requant,
        x_scale=np.float32(x_scale),
        w_scale=w_scale,
        out_scale=np.float32(y_scale),
        activation="relu" if op.relu else None,
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


def _add_spec(op: _Op, a_qp: tuple, b_qp: tuple, y_qp: tuple, mode: str) -> Add:
    (sa, za, _), (sb, zb, _), (sy, zy, clamp) = a_qp, b_qp, y_qp
    path = op.node.path
    return Add(
        path=path,
        a_zp=np.int32(za),
        b_zp=np.int32(zb),
        out_zp=np.int32(zy),
        requant=_wrapped(path, integer.add_requant, sa, sb, sy, mode),
        a_scale=np.float32(sa),
        b_scale=np.float32(sb),
        out_scale=np.float32(sy),
        activation="relu" if op.relu else None,
        clamp=clamp,
    )


def _mean_spec(node: Node, x_qp: tuple, y_qp: tuple, mode: str) -> Mean:
    (sx, zx, _), (sy, zy, clamp) = x_qp, y_qp
    if tuple(clamp) != INT8_RANGE:
        raise ValueError(f"mean {node.path!r}: its output must be int8, got the range {clamp}")
    sx, zx, sy, zy = np.float32(sx), np.int32(zx), np.float32(sy), np.int32(zy)
    axes, count = tuple(node.info["axes"]), int(node.info["count"])
    requant = _wrapped(node.path, integer.mean_requant, sx, zx, sy, zy, count, mode)
    return Mean(node.path, zx, zy, requant, sx, sy, axes=axes, count=count)


def _glue_spec(node: Node, qp: tuple) -> Pool | Reshape | Concat:
    """The spec of a scale-keeping step; ``qp``: the ``_signed`` QParams its inputs and output
    share."""
    if node.kind == "reshape":
        return Reshape(node.path, tuple(int(d) for d in node.info))
    if node.kind == "concat":
        zp, scale = np.int32(qp[1]), np.float32(qp[0])
        return Concat(node.path, zp, scale, axis=int(node.info), arity=len(node.inputs))
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


@dataclasses.dataclass(frozen=True)
class _Plan:
    """The program's steps; per linear step its QuantizedLayer; per graph value its
    ``_signed`` QParams (``value_qp``)."""

    ops: list[_Op]
    layers: dict[int, QuantizedLayer]
    value_qp: Callable[[int], tuple]
    first: QuantizedLayer  # the layer whose input quantizer quantizes the program's input
    residual: tuple[str, ...]  # layers whose output only residual adds read


class _Groups:
    """Union-find over graph values: pools and reshapes keep their input's scale."""

    def __init__(self):
        self.parent: dict[int, int] = {}

    def find(self, v: int) -> int:
        while self.parent.get(v, v) != v:
            v = self.parent[v]
        return v

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(b)] = self.find(a)


def _producer(ops: list[_Op], v: int) -> str:
    return next((op.node.path for op in ops if op.out == v), "<input>")


def _symmetric_over(qp: tuple) -> tuple:
    """Symmetric int8 ``_signed`` QParams covering the range of ``qp``'s grid:
    ``scale = max(|lo|, |hi|) / 127``, zero point 0."""
    scale, zp, (qmin, qmax) = qp
    top = max(abs(float(scale) * (qmin - zp)), abs(float(scale) * (qmax - zp)))
    return np.float32(top / 127.0), 0, (-128, 127)


def _value_qps(
    ops: list[_Op], layers: dict, out_qp: tuple | None, given: Mapping[str, tuple]
) -> tuple[Callable[[int], tuple], tuple[str, ...]]:
    """Each graph value's QParams (module docstring): the input quantizer of the Conv / Dense
    layers it feeds (they must agree), else ``out_qp`` for the model's output, else, for a
    value only residual adds read, ``given[producer path]`` or symmetric int8 over the range
    of the add's output. Also returns the paths of the layers whose outputs only adds read."""
    groups = _Groups()
    for op in ops:
        if op.node.kind in _SCALE_KEEPING:
            groups.union(op.inputs[0], op.out)
            for v in op.inputs[1:]:  # a concat's inputs all share its output's QParams
                groups.union(op.inputs[0], v)
    feeds: dict[int, list[tuple[str, tuple]]] = {}
    adds: dict[int, list[_Op]] = {}
    for k, op in enumerate(ops):
        if op.node.kind in _LINEAR:
            q = layers[k]
            qp = _signed(q.input_qparams, _act_format(q.path, q.rule.act))
            feeds.setdefault(groups.find(op.inputs[0]), []).append((q.path, qp))
        elif op.node.kind in _REQUANTIZING:
            for v in op.inputs:
                adds.setdefault(groups.find(v), []).append(op)
    final = groups.find(ops[-1].out)
    producers: dict[int, list[str]] = {}  # group -> the layers whose outputs it holds
    for op in ops:
        if op.node.kind not in _SCALE_KEEPING:
            producers.setdefault(groups.find(op.out), []).append(op.node.path)
    unfed = [g for g in adds if g not in feeds and g != final and g != 0]
    residual = tuple(p for g in unfed for p in producers.get(g, []))
    memo: dict[int, tuple] = {}

    def measured(g: int) -> tuple | None:
        """``given`` QParams of the group's producers (their ranges merged), else None."""
        qps = [given[p] for p in producers.get(g, []) if p in given]
        if not qps or len(qps) != len(producers[g]):
            return None
        if len(qps) == 1:
            return qps[0]
        lo = min(float(s) * (q[0] - z) for s, z, q in qps)
        hi = max(float(s) * (q[1] - z) for s, z, q in qps)
        return _signed(qparams_from_range(jnp.float32(lo), jnp.float32(hi), IntFormat(8)),
                       IntFormat(8))  # fmt: skip

    def resolve(g: int) -> tuple:
        if g in memo:
            return memo[g]
        if g in feeds:
            (path, qp), *rest = feeds[g]
            for other, qp2 in rest:
                if (float(qp[0]), *qp[1:]) != (float(qp2[0]), *qp2[1:]):
                    raise ValueError(
                        f"layers {path!r} and {other!r} read the same activation with different "
                        f"input QParams (scale, zero point, range) {qp} and {qp2}: the integer "
                        "program holds one int8 tensor per activation"
                    )
            if g == final and out_qp is not None:
                raise ValueError(f"the model's output also feeds layer {path!r}")
            memo[g] = qp
        elif g == final and out_qp is not None:
            memo[g] = out_qp
        elif g in adds and measured(g) is not None:
            memo[g] = measured(g)
        elif g in adds and any(op.node.kind == "mean" for op in adds[g]):
            raise ValueError(
                f"the output of {_producer(ops, g)!r} is read by a mean ({adds[g][0].node.path!r}) "
                "and by no quantized layer: pass its range as residual_qparams (see "
                "residual_qparams_from_data); the mean's output range would saturate it"
            )
        elif g in adds:
            memo[g] = _symmetric_over(resolve(groups.find(adds[g][0].out)))
        else:
            raise ValueError(
                f"the output of {_producer(ops, g)!r} feeds no quantized Conv / Dense, add or "
                "the model's output: no quantizer gives its scale"
            )
        return memo[g]

    return (lambda v: resolve(groups.find(v))), residual


def conversion_plan(
    qmodel, variables, example_x, apply_kwargs, out_qp: tuple | None = None, given=None
) -> _Plan:
    """The conversion's plan (shared by :func:`convert` and :func:`jquant.convert.simulation`):
    traced and fused steps, their quantized layers, the QParams of every value."""
    nodes = source.trace(qmodel, variables, example_x, apply_kwargs)
    ops = _ops(nodes)
    linear = [k for k, op in enumerate(ops) if op.node.kind in _LINEAR]
    infos = source.layer_info(qmodel, variables, [ops[k].node for k in linear])
    layers = dict(zip(linear, infos, strict=True))
    at_input = {0}  # the input and its pools / reshapes: one scale
    for op in ops:
        if op.node.kind in _SCALE_KEEPING and op.inputs[0] in at_input:
            at_input.add(op.out)
    first = next((layers[k] for k in linear if ops[k].inputs[0] in at_input), None)
    if first is None:
        raise ValueError(
            "the model's input must feed a quantized Conv / Dense directly: its input "
            "quantizer quantizes the program's input"
        )
    given = {
        path: _signed(_checked_qparams(f"residual_qparams[{path!r}]", qp), IntFormat(8))
        for path, qp in (given or {}).items()
    }
    value_qp, residual = _value_qps(ops, layers, out_qp, given)
    unknown = sorted(set(given) - set(residual))
    if unknown:
        raise ValueError(
            f"residual_qparams names {unknown}, but only the outputs of {list(residual)} are "
            "read by residual adds alone"
        )
    return _Plan(ops, layers, value_qp, first, residual)


def _checked_qparams(name: str, qp) -> QParams:
    if not isinstance(qp, QParams):
        raise TypeError(f"{name} must be a jquant.QParams, got {type(qp).__name__}")
    return qp


def convert(
    qmodel: source.Model,
    variables: Mapping[str, Any] | None,
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    mode: str = "double",
    residual_qparams: Mapping[str, QParams] | None = None,
    **apply_kwargs,
) -> Program:
    """Converts a calibrated / QAT-trained quantized Linen or NNX model into an integer
    :class:`Program`.

    Weights become int8 codes (symmetric per output channel, as the rule quantizes them),
    biases int32 at ``s_x * s_w[c]``, BatchNorm is folded (a :class:`QConvBN`'s exactly as its
    eval forward folds it), relu fused; each value is requantized to the input quantizer of
    the layers it feeds, the model's output to ``output_qparams`` and a value feeding only
    residual adds to the add's output scale (module docstring). Every accumulator is
    checked: ``255 sum|w| + |b| <= 2^31 - 1``.

    Args:
      qmodel: a :class:`jquant.nn.linen.QuantizedModel` (rules included), a Linen model
        built from jquant layers (``QDense``, ``QConv``, ``QConvBN``; any phase), or an NNX
        model whose Linear / Conv layers are jquant's (:func:`jquant.nn.nnx.quantize_model`).
      variables: its variables, calibrated (``quant_stats``) and/or QAT-trained; for an NNX
        model ``None`` (its own) or :func:`jquant.convert.nnx.nnx_variables`-shaped.
      example_x: an example input batch (its shape fixes the program's input shape).
      output_qparams: per-tensor int8 QParams of the logits, e.g. from
        :func:`output_qparams_from_data`.
      mode: requantization: ``"double"`` (TFLite reference), ``"single"`` or ``"fp32"``.
      residual_qparams: QParams of the outputs of layers (by path) that only residual adds
        read, e.g. from :func:`residual_qparams_from_data`; default: symmetric int8 over the
        range of the add's output.
      **apply_kwargs: passed to ``model.apply`` (NNX: ``model(x, ...)``), e.g. ``train=False``.

    Returns:
      A validated :class:`Program`.

    Raises:
      TypeError: wrong argument types.
      ValueError: unsupported layers or operations (naming the module path), unquantized or
        uncalibrated layers, bad scales / zero points, a possible int32 overflow.
    """
    variables = source.model_variables(qmodel, variables)
    if mode not in MULTIPLIER_MODES:
        raise ValueError(f"mode must be one of {MULTIPLIER_MODES}, got {mode!r}")
    if not isinstance(output_qparams, QParams):
        raise TypeError(
            f"output_qparams must be a jquant.QParams (see output_qparams_from_data), got "
            f"{type(output_qparams).__name__}"
        )
    example_x = jnp.asarray(example_x)
    out_qp = _signed(output_qparams, IntFormat(8))
    plan = conversion_plan(qmodel, variables, example_x, apply_kwargs, out_qp, residual_qparams)
    qp = plan.value_qp
    values, specs, reads = {0: 0}, [], []
    for k, op in enumerate(plan.ops):
        reads.append(tuple(values[v] for v in op.inputs))
        kind = op.node.kind
        if kind in _LINEAR:
            q = plan.layers[k]
            specs.append(_linear_spec(op, q, variables, qp(op.inputs[0]), qp(op.out), mode))
        elif kind == "add":
            specs.append(_add_spec(op, *(qp(v) for v in (*op.inputs, op.out)), mode))
        elif kind == "mean":
            specs.append(_mean_spec(op.node, qp(op.inputs[0]), qp(op.out), mode))
        else:
            specs.append(_glue_spec(op.node, qp(op.out)))
        values[op.out] = len(specs)
    inputs = tuple(reads)
    in_scale, in_zp, in_clamp = qp(0)
    out_scale, out_zp, _ = qp(plan.ops[-1].out)
    program = Program(
        layers=tuple(specs),
        input_scale=np.float32(in_scale),
        input_zp=np.int32(in_zp),
        output_scale=np.float32(out_scale),
        output_zp=np.int32(out_zp),
        input_shape=tuple(int(d) for d in example_x.shape[1:]),
        input_clamp=in_clamp,
        rounding=plan.first.rule.act_config().rounding,
        inputs=None if inputs == tuple((k,) for k in range(len(specs))) else inputs,
    )
    return validate(program)


def convert_nnx(
    model: nnx.Module,
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    mode: str = "double",
    residual_qparams: Mapping[str, QParams] | None = None,
    linen_model: Any = None,
    **call_kwargs,
) -> Program:
    """``convert(model, None, example_x, ...)``: a quantized NNX model (any class made of
    supported layers) read directly, with its own variables.

    ``linen_model`` is deprecated and unused (conversion no longer goes through a Linen twin).
    """
    if linen_model is not None:
        warnings.warn(
            "convert_nnx(linen_model=...) is deprecated and unused: NNX models convert directly",
            DeprecationWarning,
            stacklevel=2,
        )
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    return convert(
        model,
        None,
        example_x,
        output_qparams=output_qparams,
        mode=mode,
        residual_qparams=residual_qparams,
        **call_kwargs,
    )


def output_qparams_from_data(
    qmodel: source.Model,
    variables: Mapping[str, Any] | None,
    batches: Iterable[jax.Array],
    *,
    output_range: str = "fake_quant",
    **apply_kwargs,
) -> QParams:
    """Affine int8 QParams of the model's output over ``batches``:
    ``qparams_from_range(min y, max y, int8)``, the output quantizer of the last layer.

    Args:
      qmodel, variables: as :func:`convert`.
      batches: the representative data.
      output_range: whose logits ``y`` are: ``"fake_quant"`` (default) the fake-quant model's
        (phase ``eval``: what the program's last layer computes before its output
        quantizer), ``"float"`` the float model's (every rule and jquant layer in phase
        ``float``), TFLiteConverter's rule: it calibrates every range on the float model.
      **apply_kwargs: passed to ``model.apply``.

    Raises:
      ValueError: ``output_range`` not in :data:`OUTPUT_RANGES`, or no batch.
    """
    if output_range not in OUTPUT_RANGES:
        raise ValueError(f"output_range must be one of {OUTPUT_RANGES}, got {output_range!r}")
    variables = source.model_variables(qmodel, variables)
    phase = "eval" if output_range == "fake_quant" else "float"
    fwd = jax.jit(lambda v, x: source.eval_forward(qmodel, v, apply_kwargs, phase=phase)(x))
    lo, hi = np.inf, -np.inf
    for x in batches:
        y = np.asarray(fwd(variables, x))
        lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
    if not np.isfinite(lo):
        raise ValueError("output_qparams_from_data needs data: batches yielded no batch")
    qp = qparams_from_range(jnp.float32(lo), jnp.float32(hi), IntFormat(8))
    return QParams(jnp.asarray(qp.scale), jnp.asarray(qp.zero_point))


def residual_qparams_from_data(
    qmodel: source.Model,
    variables: Mapping[str, Any] | None,
    batches: Iterable[jax.Array],
    **apply_kwargs,
) -> dict[str, QParams]:
    """Affine int8 QParams of the output of each layer that only residual adds read, from its
    range in the fake-quant model (phase ``eval``) over ``batches``:
    ``qparams_from_range(min y, max y, int8)`` (the output observer such a value lacks).

    Returns ``{layer path: QParams}`` for :func:`convert`'s ``residual_qparams`` (empty for a
    model without such layers)."""
    variables = source.model_variables(qmodel, variables)
    batches = list(batches)
    if not batches:
        raise ValueError("residual_qparams_from_data needs data: batches yielded no batch")
    plan = conversion_plan(qmodel, variables, jnp.asarray(batches[0][:1]), apply_kwargs)
    # the module whose output is the value: the BatchNorm folded into the layer, else it
    ends = {
        (plan.ops[k].bn or plan.ops[k].node).path: plan.ops[k].node.path
        for k in plan.layers
        if plan.ops[k].node.path in plan.residual
    }

    def ranges(x):
        found: dict[str, tuple] = {}

        def hook(path, module, call, args, kwargs):
            y = call(*args, **kwargs)
            found[ends[path]] = (jnp.min(y), jnp.max(y))
            return y

        source.eval_forward(qmodel, variables, apply_kwargs, hook=hook, paths=set(ends))(x)
        return found

    step = jax.jit(ranges)
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    for x in batches:
        for path, (a, b) in step(x).items():
            lo[path] = min(lo.get(path, np.inf), float(a))
            hi[path] = max(hi.get(path, -np.inf), float(b))
    out = {}
    for path in lo:
        qp = qparams_from_range(jnp.float32(lo[path]), jnp.float32(hi[path]), IntFormat(8))
        out[path] = QParams(jnp.asarray(qp.scale), jnp.asarray(qp.zero_point))
    return out


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
    qmodel: source.Model,
    variables: Mapping[str, Any] | None,
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
    variables = source.model_variables(qmodel, variables)
    plan = conversion_plan(qmodel, variables, jnp.asarray(example_x), apply_kwargs)
    params = variables["params"]
    for k, q in plan.layers.items():
        op = plan.ops[k]
        _, w_scale, bias, b_int = _folded(op, q, variables, plan.value_qp(op.inputs[0])[0])
        delta = (
            b_int * np.float64(plan.value_qp(op.inputs[0])[0]) * w_scale.astype(np.float64) - bias
        )
        owner = op.bn.path if op.bn is not None else q.path
        if "bias" not in subtree(params, owner):
            if np.any(delta != 0):
                raise ValueError(f"layer {owner!r} has no bias parameter to carry the rounding")
            continue
        params = _add(params, owner, "bias", delta)
    variables["params"] = params
    return variables
