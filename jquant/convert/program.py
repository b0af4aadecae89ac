"""The integer program: a small DAG of layer specs (a pytree) and its interpreter :func:`run`.

A converted model is data. Each layer spec holds its integer constants as leaves (int8
weights, int32 bias, zero points, :class:`~jquant.integer.Requant` multipliers, and the float32
scales they came from, kept for inspection) and its geometry as static fields. :func:`run`
folds the specs over an int8 batch with the kernels of :mod:`jquant.integer`::

    x_0 = program.quantize_input(x)          # q = clip(round(x / s_in) + z_in)
    v_{k+1} = layer_k(v_i, ...)              # i in inputs[k]; int8 -> int8, int32 inside
    y = program.dequantize_output(v_L)       # s_out (q - z_out)

Values are numbered: ``v_0`` is the input, ``v_{k+1}`` the output of ``layers[k]``, which
reads the values named by ``program.inputs[k]`` (``None``: the sequence ``inputs[k] = (k,)``).
An :class:`Add` (residual connection) reads two values, a :class:`Concat` ``arity`` values;
every other spec reads one.

Linear layers compute ``clamp(requant(sum (x - x_zp) w + b) + out_zp)`` (TFLite int8 spec);
pooling keeps the input's scale and zero point; reshape only moves codes. 1-D convolutions
and pools (``(N, L, C)`` activations) run as 2-D ones with ``H = 1``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant import integer
from jquant.formats import int8
from jquant.integer.fixed_point import INT32_MAX
from jquant.quant import ROUNDING_MODES, QParams, dequantize, quantize

__all__ = [
    "Conv",
    "Dense",
    "Pool",
    "Reshape",
    "Add",
    "Mean",
    "Concat",
    "Program",
    "LayerSpec",
    "AccumulatorInfo",
    "run",
    "accumulator_report",
    "validate",
]

INT8_RANGE = (-128, 127)
# Exponents ``shift`` of ``M = M0 * 2^(shift - 31)`` that the fixed-point kernels support
# (jquant.integer.fixed_point.multiply_by_quantized_multiplier), per requantization mode.
SHIFT_RANGE = {"double": (-31, 31), "single": (-31, 30)}
# Rounding modes of the input quantizer a program can use (``stochastic`` needs a key).
INPUT_ROUNDINGS = tuple(r for r in ROUNDING_MODES if r != "stochastic")


def _spec(data: tuple[str, ...], meta: tuple[str, ...]):
    """Frozen dataclass registered as a pytree: ``data`` fields are leaves, ``meta`` static."""

    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True)(cls)
        cls = jax.tree_util.register_dataclass(cls, data_fields=list(data), meta_fields=list(meta))
        cls.data_fields, cls.meta_fields = data, meta
        return cls

    return wrap


def _clamp(y: jax.Array, clamp: tuple[int, int]) -> jax.Array:
    """Clamps int8 codes to a narrower format's range (no-op for int8)."""
    if tuple(clamp) == INT8_RANGE:
        return y
    return jnp.clip(y, jnp.int8(clamp[0]), jnp.int8(clamp[1]))


_LINEAR_DATA = ("w", "b", "x_zp", "out_zp", "requant", "x_scale", "w_scale", "out_scale")


@dataclasses.dataclass(frozen=True)
class _Linear:
    """The fields :class:`Conv` and :class:`Dense` share (see :class:`Conv`)."""

    path: str
    w: jax.Array
    b: jax.Array
    x_zp: jax.Array
    out_zp: jax.Array
    requant: integer.Requant
    x_scale: jax.Array
    w_scale: jax.Array
    out_scale: jax.Array
    activation: str | None = None
    clamp: tuple[int, int] = INT8_RANGE


def _as_2d(fn, x: jax.Array, spatial: int) -> jax.Array:
    """``fn`` of a 2-D (NHWC) kernel applied to ``(N, L, C)`` activations as ``H = 1``."""
    return fn(x[:, None])[:, 0] if spatial == 1 else fn(x)


@_spec(
    _LINEAR_DATA,
    ("path", "activation", "clamp", "strides", "padding", "dilation", "groups", "spatial"),
)
class Conv(_Linear):
    """int8 convolution (TFLite ``CONV_2D``), NHWC x HWIO, requantized to ``out_scale``.

    Attributes:
      path: module path in the source model (for reports and errors).
      w: int8 ``(KH, KW, C / groups, O)``; a 1-D conv has ``KH = 1``.
      b: int32 ``(O,)`` at scale ``x_scale * w_scale``.
      x_zp, out_zp: int32 zero points of the input and output codes.
      requant: multipliers ``M[o] = x_scale * w_scale[o] / out_scale``.
      x_scale, w_scale, out_scale: float32 scales (``w_scale`` per output channel).
      activation: fused ``None`` or ``"relu"``.
      clamp: ``(qmin, qmax)`` of the output format (``(-128, 127)`` for int8).
      strides, dilation: pairs; padding: ``((t, b), (l, r))``; groups: feature groups.
      spatial: 1 (``(N, L, C)`` activations) or 2 (``(N, H, W, C)``).
    """

    strides: tuple[int, int] = (1, 1)
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    spatial: int = 2

    def __call__(self, x: jax.Array) -> jax.Array:
        def conv(x4):
            return integer.conv2d(
                x4,
                self.w,
                self.b,
                x_zp=self.x_zp,
                out_zp=self.out_zp,
                strides=self.strides,
                padding=self.padding,
                dilation=self.dilation,
                groups=self.groups,
                activation=self.activation,
                requant=self.requant,
            )

        return _clamp(_as_2d(conv, x, self.spatial), self.clamp)


@_spec(_LINEAR_DATA, ("path", "activation", "clamp"))
class Dense(_Linear):
    """int8 dense layer (TFLite ``FULLY_CONNECTED``): ``w`` int8 ``(in, out)``; the other
    fields as :class:`Conv`."""

    def __call__(self, x: jax.Array) -> jax.Array:
        y = integer.dense(
            x,
            self.w,
            self.b,
            x_zp=self.x_zp,
            out_zp=self.out_zp,
            activation=self.activation,
            requant=self.requant,
        )
        return _clamp(y, self.clamp)


POOL_KINDS = ("max", "avg")


@_spec((), ("path", "kind", "window", "strides", "padding", "spatial"))
class Pool:
    """TFLite int8 max / average pooling: the output keeps the input's scale and zero point.

    ``avg``: ``round_half_away(sum / n)`` over the ``n`` valid elements of each window.
    """

    path: str
    kind: str
    window: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]] = ((0, 0), (0, 0))
    spatial: int = 2

    def __call__(self, x: jax.Array) -> jax.Array:
        pool = integer.max_pool if self.kind == "max" else integer.avg_pool
        return _as_2d(lambda x4: pool(x4, self.window, self.strides, self.padding), x, self.spatial)


@_spec((), ("path", "shape"))
class Reshape:
    """``x.reshape(N, *shape)``: moves codes, keeps scale and zero point (e.g. flatten)."""

    path: str
    shape: tuple[int, ...]

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape(x.shape[0], *self.shape)


@_spec(
    ("a_zp", "b_zp", "out_zp", "requant", "a_scale", "b_scale", "out_scale"),
    ("path", "activation", "clamp"),
)
class Add:
    """int8 elementwise add of two values (TFLite ``ADD``): each input rescaled to
    ``out_scale`` (:func:`jquant.integer.add`, ``requant`` from
    :func:`jquant.integer.add_requant`)::

        y = clamp(round((s_a (a - a_zp) + s_b (b - b_zp)) / s_y) + y_zp)

    Attributes:
      a_zp, b_zp, out_zp: int32 zero points; a_scale, b_scale, out_scale: float32 scales.
      requant: the :class:`~jquant.integer.AddRequant` of the three scales.
      activation, clamp, path: as :class:`Conv`.
    """

    path: str
    a_zp: jax.Array
    b_zp: jax.Array
    out_zp: jax.Array
    requant: integer.AddRequant
    a_scale: jax.Array
    b_scale: jax.Array
    out_scale: jax.Array
    activation: str | None = None
    clamp: tuple[int, int] = INT8_RANGE

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        y = integer.add(
            a,
            b,
            a_zp=self.a_zp,
            b_zp=self.b_zp,
            out_scale=self.out_scale,
            out_zp=self.out_zp,
            activation=self.activation,
            requant=self.requant,
        )
        return _clamp(y, self.clamp)


@_spec(("x_zp", "out_zp", "requant", "x_scale", "out_scale"), ("path", "axes", "count"))
class Mean:
    """int8 mean over the spatial axes with a new scale (TFLite ``MEAN``, ``keep_dims=False``;
    Keras GlobalAveragePooling): ``(N, *spatial, C) -> (N, C)`` by :func:`jquant.integer.mean`::

        y = clamp(round(s_x sum (x - x_zp) / (n s_y)) + y_zp)   (rounded as ``requant.mode``)

    Attributes:
      x_zp, out_zp: int32 zero points; x_scale, out_scale: float32 scales.
      requant: the :class:`~jquant.integer.MeanRequant` (:func:`jquant.integer.mean_requant`).
      axes: the averaged axes of the batched value, ``(1,)`` or ``(1, 2)``.
      count: ``n``, the number of averaged elements per output.
    """

    path: str
    x_zp: jax.Array
    out_zp: jax.Array
    requant: integer.MeanRequant
    x_scale: jax.Array
    out_scale: jax.Array
    axes: tuple[int, ...] = (1, 2)
    count: int = 1

    def __call__(self, x: jax.Array) -> jax.Array:
        return integer.mean(
            x, x_zp=self.x_zp, out_zp=self.out_zp, axis=self.axes, requant=self.requant
        )


@_spec(("zp", "scale"), ("path", "axis", "arity"))
class Concat:
    """int8 concatenation of ``arity`` values along ``axis`` (TFLite ``CONCATENATION``): every
    input and the output share one scale and zero point (TFLite's int8 kernel requires it),
    so the codes are copied (:func:`jquant.integer.concatenate`).

    Attributes:
      zp, scale: the shared int32 zero point and float32 scale.
      axis: the axis of the batched values (``>= 1``; the batch axis is 0).
      arity: the number of inputs (``>= 2``).
    """

    path: str
    zp: jax.Array
    scale: jax.Array
    axis: int = 1
    arity: int = 2

    def __call__(self, *xs: jax.Array) -> jax.Array:
        n = len(xs)
        return integer.concatenate(
            xs, scales=[self.scale] * n, zero_points=[self.zp] * n, out_scale=self.scale,
            out_zp=self.zp, axis=self.axis,
        )  # fmt: skip


LayerSpec = Conv | Dense | Pool | Reshape | Add | Mean | Concat
SPECS: dict[str, type] = {
    "conv": Conv,
    "dense": Dense,
    "pool": Pool,
    "reshape": Reshape,
    "add": Add,
    "mean": Mean,
    "concat": Concat,
}


@_spec(
    ("layers", "input_scale", "input_zp", "output_scale", "output_zp"),
    ("input_shape", "input_clamp", "rounding", "inputs"),
)
class Program:
    """An integer-only program: layer specs plus the input and output quantizers.

    Attributes:
      layers: tuple of :class:`Conv` / :class:`Dense` / :class:`Pool` / :class:`Reshape` /
        :class:`Add` / :class:`Mean` / :class:`Concat`.
      input_scale, input_zp: quantizer of the float input (float32 / int32 scalars).
      output_scale, output_zp: scale and zero point of the int8 output codes.
      input_shape: shape of one example (without the batch axis).
      input_clamp: ``(qmin, qmax)`` of the input format.
      rounding: rounding of the input quantizer (``jquant.quant.ROUNDING_MODES``).
      inputs: per layer, the numbers of the values it reads (module docstring); None for a
        sequence.
    """

    layers: tuple
    input_scale: jax.Array
    input_zp: jax.Array
    output_scale: jax.Array
    output_zp: jax.Array
    input_shape: tuple[int, ...]
    input_clamp: tuple[int, int] = INT8_RANGE
    rounding: str = "nearest_even"
    inputs: tuple[tuple[int, ...], ...] | None = None

    def layer_inputs(self) -> tuple[tuple[int, ...], ...]:
        """``inputs``, with the sequence ``((0,), (1,), ...)`` spelled out when None."""
        if self.inputs is None:
            return tuple((k,) for k in range(len(self.layers)))
        return self.inputs

    def quantize_input(self, x: jax.Array) -> jax.Array:
        """int8 ``clip(round(x / input_scale) + input_zp, qmin, qmax)``."""
        qp = QParams(self.input_scale, jnp.asarray(self.input_zp, jnp.float32))
        q = quantize(x, qp, int8, rounding=self.rounding)
        return _clamp(q, self.input_clamp)

    def dequantize_output(self, q: jax.Array) -> jax.Array:
        """float32 ``output_scale * (q - output_zp)``."""
        return dequantize(q, self.output_qparams)

    @property
    def output_qparams(self) -> QParams:
        """QParams of the output codes (int8 format)."""
        return QParams(self.output_scale, jnp.asarray(self.output_zp, jnp.float32))


def run(program: Program, x: jax.Array) -> jax.Array:
    """Runs the integer program on int8 inputs: ``v_{k+1} = layer_k(v_i, ...)`` over the
    values named by ``program.inputs`` (module docstring); returns the last value, int8.

    Pure and jit-able (``jax.jit(run)(program, x)``); every arithmetic step is integer.

    Args:
      program: a :class:`Program` (from :func:`jquant.convert.convert` or :func:`load`).
      x: int8 codes of shape ``(N, *program.input_shape)``, e.g. ``program.quantize_input(x)``.

    Returns:
      int8 output codes ``(N, ...)``; :meth:`Program.dequantize_output` gives floats.

    Raises:
      TypeError: ``program`` is not a Program or ``x`` is not int8 (at trace time).
      ValueError: ``x`` has the wrong shape.
    """
    if not isinstance(program, Program):
        raise TypeError(f"program must be a jquant.convert.Program, got {type(program).__name__}")
    dtype = getattr(x, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.int8:
        raise TypeError(
            f"x must be an int8 array (use program.quantize_input(x) on float inputs), "
            f"got {dtype if dtype is not None else type(x).__name__}"
        )
    if tuple(x.shape[1:]) != tuple(program.input_shape):
        raise ValueError(
            f"x must have shape (N, *{tuple(program.input_shape)}), got {tuple(x.shape)}"
        )
    values = [x]
    for layer, reads in zip(program.layers, program.layer_inputs(), strict=True):
        values.append(layer(*(values[i] for i in reads)))
    return values[-1]


class AccumulatorInfo(NamedTuple):
    """Worst-case int32 accumulator of one linear layer: ``bound = max_c 255 sum|w| + |b|``
    and ``bits``, the signed width that holds it (``ceil(log2(bound + 1)) + 1``)."""

    path: str
    bound: int
    bits: int


def _accumulator_info(layer: Conv | Dense) -> AccumulatorInfo:
    bound = int(np.max(integer.accumulator_bound(np.asarray(layer.w), np.asarray(layer.b))))
    return AccumulatorInfo(layer.path, bound, bound.bit_length() + 1)


def accumulator_report(program: Program) -> list[AccumulatorInfo]:
    """Per conv / dense layer, the worst-case accumulator (see :class:`AccumulatorInfo`);
    a program that passed :func:`validate` has every ``bits <= 32``."""
    return [_accumulator_info(layer) for layer in program.layers if isinstance(layer, Conv | Dense)]


def _is_int(v) -> bool:
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _check_int(where: str, name: str, v, lo: int, hi: int | None = None) -> None:
    if not _is_int(v) or v < lo or (hi is not None and v > hi):
        allowed = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{where}: {name} must be an integer {allowed}, got {v!r}")


def _check_ints(where: str, name: str, v, n: int | None, lo: int) -> None:
    """``v`` is a tuple of ``n`` (any number if None) integers ``>= lo``."""
    if (
        not isinstance(v, tuple)
        or (n is not None and len(v) != n)
        or not all(_is_int(i) and i >= lo for i in v)
    ):
        count = f"{n} " if n is not None else ""
        raise ValueError(f"{where}: {name} must be a tuple of {count}integers >= {lo}, got {v!r}")


def _check_clamp(where: str, name: str, clamp) -> None:
    if (
        not isinstance(clamp, tuple)
        or len(clamp) != 2
        or not all(_is_int(c) for c in clamp)
        or not INT8_RANGE[0] <= clamp[0] <= clamp[1] <= INT8_RANGE[1]
    ):
        raise ValueError(
            f"{where}: {name} must be a pair (lo, hi) of integers with {INT8_RANGE[0]} <= lo "
            f"<= hi <= {INT8_RANGE[1]}, got {clamp!r}"
        )


def _check_zp(where: str, name: str, zp, clamp=INT8_RANGE) -> None:
    zp = np.asarray(zp)
    if zp.shape != () or zp.dtype.kind not in "iu" or not clamp[0] <= int(zp) <= clamp[1]:
        raise ValueError(
            f"{where}: {name} must be an integer scalar in [{clamp[0]}, {clamp[1]}], got {zp!r}"
        )


def _check_scales(where: str, name: str, s, shapes=((),)) -> None:
    s = np.asarray(s)
    if s.dtype.kind != "f" or not np.all(np.isfinite(s) & (s > 0)):
        raise ValueError(f"{where}: {name} must be finite float(s) > 0, got {s!r}")
    if s.shape not in shapes:
        raise ValueError(f"{where}: {name} must have shape in {list(shapes)}, got {s.shape}")


def _check_dtype(where: str, name: str, a, dtype) -> None:
    if np.asarray(a).dtype != np.dtype(dtype):
        raise TypeError(f"{where}: {name} must be {np.dtype(dtype)}, got {np.asarray(a).dtype}")


def _check_requant(where: str, name: str, rq, channels: int | None = None) -> None:
    """Constants the kernels support: double / single ``M0`` int32 in ``[2^30, 2^31)`` and
    ``shift`` in :data:`SHIFT_RANGE` (or ``(0, 0)``: a multiplier below ``2^-32``); fp32 a
    finite float32 ``>= 0``. Shapes ``()`` or ``(channels,)``."""
    if not isinstance(rq, integer.Requant):
        raise TypeError(f"{where}: {name} must be a jquant.integer.Requant, got {rq!r}")
    m, shift = np.asarray(rq.multiplier), np.asarray(rq.shift)
    shapes = [()] if channels is None else [(), (channels,)]
    if m.shape not in shapes or shift.shape not in shapes:
        raise ValueError(
            f"{where}: {name} multiplier / shift shapes {m.shape} / {shift.shape} not in {shapes}"
        )
    if rq.mode == "fp32":
        if m.dtype != np.float32 or not np.all(np.isfinite(m) & (m >= 0)):
            raise ValueError(f"{where}: {name}.multiplier must be finite float32 >= 0, got {m}")
        return
    if m.dtype != np.int32 or shift.dtype != np.int32:
        raise TypeError(f"{where}: {name} multiplier and shift must be int32 in mode {rq.mode!r}")
    lo, hi = SHIFT_RANGE[rq.mode]
    zero = (m == 0) & (shift == 0)
    if not np.all(zero | ((shift >= lo) & (shift <= hi))):
        raise ValueError(
            f"{where}: {name}.shift must be in [{lo}, {hi}] in mode {rq.mode!r} (the range the "
            f"fixed-point kernels support), got {shift}: the multiplier is out of range (check "
            "the scales)"
        )
    if not np.all(zero | ((m >= 2**30) & (m <= INT32_MAX))):
        raise ValueError(f"{where}: {name}.multiplier must be in [2^30, 2^31) or 0, got {m}")


def _validate_linear(layer: Conv | Dense) -> None:
    where = f"layer {layer.path!r}"
    _check_dtype(where, "w", layer.w, np.int8)
    _check_dtype(where, "b", layer.b, np.int32)
    w_shape = np.shape(layer.w)
    rank = 4 if isinstance(layer, Conv) else 2
    if len(w_shape) != rank or 0 in w_shape:
        raise ValueError(f"{where}: w must be a non-empty {rank}-D array, got shape {w_shape}")
    out = w_shape[-1]
    if np.shape(layer.b) != (out,):
        raise ValueError(f"{where}: b must have shape ({out},), got {np.shape(layer.b)}")
    _check_clamp(where, "clamp", layer.clamp)
    _check_zp(where, "x_zp", layer.x_zp)
    _check_zp(where, "out_zp", layer.out_zp, layer.clamp)
    _check_scales(where, "x_scale", layer.x_scale)
    _check_scales(where, "w_scale", layer.w_scale, ((), (out,)))
    _check_scales(where, "out_scale", layer.out_scale)
    _check_requant(where, "requant", layer.requant, out)
    if layer.activation not in (None, "relu"):
        raise ValueError(f"{where}: activation must be None or 'relu', got {layer.activation!r}")
    if isinstance(layer, Conv):
        _check_ints(where, "strides", layer.strides, 2, 1)
        _check_ints(where, "dilation", layer.dilation, 2, 1)
        _check_padding(where, layer.padding)
        _check_int(where, "spatial", layer.spatial, 1, 2)
        _check_int(where, "groups", layer.groups, 1)
        if out % layer.groups:
            raise ValueError(f"{where}: groups={layer.groups} must divide the {out} outputs")
        if layer.spatial == 1 and w_shape[0] != 1:
            raise ValueError(f"{where}: a 1-D conv (spatial=1) needs w of shape (1, KW, I, O)")
    try:
        integer.check_accumulator(np.asarray(layer.w), np.asarray(layer.b))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _check_padding(where: str, padding) -> None:
    if not (
        isinstance(padding, tuple)
        and len(padding) == 2
        and all(isinstance(p, tuple) and len(p) == 2 for p in padding)
        and all(_is_int(i) and i >= 0 for p in padding for i in p)
    ):
        raise ValueError(
            f"{where}: padding must be ((top, bottom), (left, right)) of integers >= 0, "
            f"got {padding!r}"
        )


def _validate_pool(layer: Pool) -> None:
    where = f"layer {layer.path!r}"
    if layer.kind not in POOL_KINDS:
        raise ValueError(f"{where}: pool kind must be in {POOL_KINDS}, got {layer.kind!r}")
    _check_ints(where, "window", layer.window, 2, 1)
    _check_ints(where, "strides", layer.strides, 2, 1)
    _check_padding(where, layer.padding)
    _check_int(where, "spatial", layer.spatial, 1, 2)


def _validate_add(layer: Add) -> None:
    where = f"layer {layer.path!r}"
    _check_clamp(where, "clamp", layer.clamp)
    for name in ("a_zp", "b_zp"):
        _check_zp(where, name, getattr(layer, name))
    _check_zp(where, "out_zp", layer.out_zp, layer.clamp)
    for name in ("a_scale", "b_scale", "out_scale"):
        _check_scales(where, name, getattr(layer, name))
    rq = layer.requant
    if not isinstance(rq, integer.AddRequant):
        raise TypeError(f"{where}: requant must be a jquant.integer.AddRequant, got {rq!r}")
    for name in ("a", "b", "out"):
        _check_requant(where, f"requant.{name}", getattr(rq, name))
    if len({rq.a.mode, rq.b.mode, rq.out.mode}) != 1:
        raise ValueError(f"{where}: requant.a, .b and .out must share one mode")
    _check_int(where, "requant.left_shift", rq.left_shift, 0, 30)
    if layer.activation not in (None, "relu"):
        raise ValueError(f"{where}: activation must be None or 'relu', got {layer.activation!r}")


def _validate_mean(layer: Mean) -> None:
    where = f"layer {layer.path!r}"
    _check_zp(where, "x_zp", layer.x_zp)
    _check_zp(where, "out_zp", layer.out_zp)
    _check_scales(where, "x_scale", layer.x_scale)
    _check_scales(where, "out_scale", layer.out_scale)
    if layer.axes not in ((1,), (1, 2)):
        raise ValueError(
            f"{where}: axes must be (1,) or (1, 2) (the spatial axes), got {layer.axes!r}"
        )
    _check_int(where, "count", layer.count, 1)
    mr = layer.requant
    if not isinstance(mr, integer.MeanRequant):
        raise TypeError(f"{where}: requant must be a jquant.integer.MeanRequant, got {mr!r}")
    want = integer.mean_requant(
        layer.x_scale, layer.x_zp, layer.out_scale, layer.out_zp, layer.count, mr.mode
    )
    same = jax.tree.leaves(mr) + [mr.count]
    if any(
        np.asarray(a).dtype != np.asarray(b).dtype or not np.array_equal(a, b)
        for a, b in zip(same, jax.tree.leaves(want) + [want.count], strict=True)
    ):
        raise ValueError(
            f"{where}: requant does not follow from the scales, zero points and count "
            f"(jquant.integer.mean_requant in mode {mr.mode!r})"
        )  # fmt: skip


def _validate_concat(layer: Concat) -> None:
    where = f"layer {layer.path!r}"
    _check_zp(where, "zp", layer.zp)
    _check_scales(where, "scale", layer.scale)
    _check_int(where, "axis", layer.axis, 1)
    _check_int(where, "arity", layer.arity, 2)


def _arity(layer) -> int:
    return 2 if isinstance(layer, Add) else layer.arity if isinstance(layer, Concat) else 1


def _validate_inputs(program: Program) -> None:
    """Each layer reads earlier values only: two for an Add, ``arity`` for a Concat, one
    otherwise."""
    inputs = program.inputs
    if inputs is not None and (
        not isinstance(inputs, tuple) or not all(isinstance(r, tuple) for r in inputs)
    ):
        raise ValueError(f"program.inputs must be None or a tuple of tuples, got {inputs!r}")
    if inputs is not None and len(inputs) != len(program.layers):
        raise ValueError(
            f"program.inputs names the inputs of {len(inputs)} layers, but there are "
            f"{len(program.layers)} layers"
        )
    for k, (layer, reads) in enumerate(zip(program.layers, program.layer_inputs(), strict=True)):
        arity = _arity(layer)
        if len(reads) != arity or not all(_is_int(i) and 0 <= i <= k for i in reads):
            raise ValueError(
                f"layer {layer.path!r} (number {k}) must read {arity} earlier value(s) among "
                f"0..{k}, got inputs {reads!r}"
            )


def _validate_shapes(program: Program) -> None:
    """Runs the program abstractly (``jax.eval_shape``, nothing computed) on one example:
    every layer accepts the shapes it reads and returns int8."""
    values = [jax.ShapeDtypeStruct((1, *program.input_shape), jnp.int8)]
    for layer, reads in zip(program.layers, program.layer_inputs(), strict=True):
        try:
            out = jax.eval_shape(layer, *(values[i] for i in reads))
        except (TypeError, ValueError) as e:
            shapes = [values[i].shape for i in reads]
            raise ValueError(
                f"layer {layer.path!r} cannot read inputs of shape {shapes}: {e}"
            ) from None
        if out.dtype != jnp.int8:
            raise ValueError(f"layer {layer.path!r} returns {out.dtype}, not int8")
        values.append(out)


def validate(program: Program) -> Program:
    """Checks a concrete program; returns it, or raises ValueError / TypeError naming the layer
    and the field.

    Checked: dtypes; scales finite and ``> 0``; zero points within their clamp; clamps
    ``(lo, hi)`` with ``-128 <= lo <= hi <= 127``; requantization constants within the range
    of the fixed-point kernels (``M0`` in ``[2^30, 2^31)`` and ``-31 <= shift <= 31`` in
    ``double``, ``<= 30`` in ``single``; see :data:`SHIFT_RANGE`); int32-safe accumulators
    (``255 sum|w| + |b| < 2^31``); geometry (windows, strides, dilations, groups ``>= 1``,
    paddings ``>= 0``); inputs naming earlier values; and shapes flowing from ``input_shape``
    through every layer (abstract evaluation, nothing computed).
    """
    if not isinstance(program, Program):
        raise TypeError(f"program must be a jquant.convert.Program, got {type(program).__name__}")
    _check_ints("program", "input_shape", program.input_shape, None, 1)
    _check_clamp("program", "input_clamp", program.input_clamp)
    if program.rounding not in INPUT_ROUNDINGS:
        raise ValueError(
            f"program: rounding must be one of {INPUT_ROUNDINGS}, got {program.rounding!r}"
        )
    _check_scales("program", "input_scale", program.input_scale)
    _check_scales("program", "output_scale", program.output_scale)
    _check_zp("program", "input_zp", program.input_zp, program.input_clamp)
    _check_zp("program", "output_zp", program.output_zp)
    if not isinstance(program.layers, tuple) or not program.layers:
        raise ValueError(f"program.layers must be a non-empty tuple, got {program.layers!r}")
    for layer in program.layers:
        if isinstance(layer, LayerSpec) and not isinstance(layer.path, str):
            raise ValueError(f"layer path must be a str, got {layer.path!r}")
        if isinstance(layer, Conv | Dense):
            _validate_linear(layer)
        elif isinstance(layer, Add):
            _validate_add(layer)
        elif isinstance(layer, Pool):
            _validate_pool(layer)
        elif isinstance(layer, Reshape):
            _check_ints(f"layer {layer.path!r}", "shape", layer.shape, None, 1)
        elif isinstance(layer, Mean):
            _validate_mean(layer)
        elif isinstance(layer, Concat):
            _validate_concat(layer)
        else:
            raise TypeError(f"program.layers holds a {type(layer).__name__}, not a layer spec")
    _validate_inputs(program)
    _validate_shapes(program)
    return program


def spec_name(layer: Any) -> str:
    """The registry name (``"conv"``, ...) of a layer spec."""
    for name, cls in SPECS.items():
        if isinstance(layer, cls):
            return name
    raise TypeError(f"not a layer spec: {type(layer).__name__}")
