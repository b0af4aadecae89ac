"""An integer program -> an ONNX model, in the QOperator or the QDQ form.

Both forms take the program's int8 input codes and return its int8 output codes, in the
program's layout (``(N, L, C)`` / ``(N, H, W, C)`` / ``(N, F)``); ONNX's convolutions and
pools are channels-first, so each runs between two ``Transpose`` ops (1-D layers lifted to 2-D
with ``H = 1``, as the program runs them).

``form="qoperator"`` (integer operators; onnxruntime's MLAS kernels):

=============  ============================================================================
program spec   ONNX
=============  ============================================================================
Conv           ``QLinearConv`` (per-channel int8 weights, one zero point, int32 bias,
               ``group``); a fused relu as ``Clip(y, z_y, 127)`` (none if ``z_y = -128``)
Dense          ``QLinearConv`` with a 1x1 kernel on ``(N, in, 1, 1)``: ``QLinearMatMul``
               has no bias
Pool           ``MaxPool`` on int8; ``com.microsoft.QLinearAveragePool``
               (``count_include_pad=0``)
Reshape        ``Reshape``
Add            ``com.microsoft.QLinearAdd``, relu as above
Mean           ``com.microsoft.QLinearGlobalAveragePool`` (``channels_last=1``), then
               ``Reshape`` to ``(N, C)``
Concat         ``Concat`` of the int8 codes (inputs and output share one quantizer)
=============  ============================================================================

onnxruntime requantizes QLinearConv with the float32 multiplier: the program retargeted to
``"onnxruntime"`` (``fp32``) gives the same codes. Its QLinearAdd and QLinearAveragePool round
their own float formulas (the zero points folded into a float32 constant; the average in float
and rounded half to even, where TFLite rounds half away from zero), so they can differ by one
code from TFLite's integer ADD and AVERAGE_POOL_2D near ties; QLinearGlobalAveragePool
multiplies by ``float32(s_x / n / s_y)``, not XNNPACK's ``float32(s_x / s_y) float32(1 / n)``,
so a Mean can differ by one code from the ``fp32`` program near ties.

``form="qdq"``: float operators between ``DequantizeLinear`` and ``QuantizeLinear`` (the weights
and biases stored as int8 / int32 with per-channel ``DequantizeLinear(axis=0)`` and no zero
point, the default 0; a relu before a zero point of -128 left to ``QuantizeLinear``'s clamp;
a Mean as ``ReduceMean``, a Concat on the int8 codes as in the QOperator form), which a
runtime may fuse into integer kernels or run in float: the output is close to the program's,
not bit-exact (float accumulation, one rounding).

4-bit weights (``weight_type``): the program stores every weight code in int8, a 4-bit weight
format as codes in ``[-8, 7]``. In the QDQ form at opset 21 such a layer's weights can be
``INT4`` initializers of its ``DequantizeLinear`` (two codes per byte, the same values; no zero
point: the default 0): ``weight_type="auto"`` (default) does so for every Conv / Dense whose
codes all lie in ``[-8, 7]`` when ``form="qdq"`` and ``opset >= 21``, and stores int8 otherwise;
``"int8"`` always stores int8; ``"int4"`` stores every Conv / Dense as INT4 and refuses a
program, form or opset where that is impossible. The QOperator form has no INT4 (``QLinearConv``
takes int8 / uint8 weights).

Reference: the ONNX operator specification (opset 13 and 21) and onnxruntime's contrib ops.
"""

from __future__ import annotations

import os
import pathlib

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

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
from jquant.export.files import write_atomically
from jquant.export.values import check_int8_clamp, value_qparams, value_shapes, weight_scales

__all__ = ["INT4_RANGE", "ONNX_FORMS", "WEIGHT_TYPES", "onnx_model", "to_onnx"]

ONNX_FORMS = ("qoperator", "qdq")
WEIGHT_TYPES = ("auto", "int8", "int4")
INT4_RANGE = (-8, 7)
_MS = "com.microsoft"
_TO_NCHW, _TO_NHWC = (0, 3, 1, 2), (0, 2, 3, 1)


def _explicit(padding) -> list[int]:
    """ONNX ``pads``: all begins, then all ends."""
    pads = [tuple(int(p) for p in pad) for pad in padding]
    return [p[0] for p in pads] + [p[1] for p in pads]


class _Builder:
    """Nodes and initializers of one ONNX graph, with short fresh names.

    Only what onnxruntime needs is written: equal initializers are stored once (the scales
    and zero points that layers share, the reshape shapes), a reshape of a reshape reshapes
    the first one's input (or is that input when it has the shape), a value converted back to
    channels-first reuses the tensor it came from, and nodes whose outputs nothing reads are
    dropped (:meth:`live_nodes`)."""

    def __init__(self, form: str, opset: int = 21, weight_type: str = "int8") -> None:
        self.form, self.opset, self.weight_type = form, opset, weight_type
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n = 0
        self.consts: dict[tuple, str] = {}  # (dtype, shape, bytes) -> initializer name
        self.shapes: dict[str, tuple] = {}  # value -> its shape after the batch axis
        self.reshaped: dict[str, str] = {}  # Reshape output -> its input
        self.nchw: dict[str, str] = {}  # channels-last value -> the channels-first one

    def name(self, what: str) -> str:
        self.n += 1
        return f"{what}{self.n}"

    def const(self, what: str, value: np.ndarray) -> str:
        value = np.asarray(value)
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.consts:
            self.consts[key] = self.name("c")
            self.inits.append(numpy_helper.from_array(value, self.consts[key]))
        return self.consts[key]

    def const_int4(self, what: str, value: np.ndarray) -> str:
        """An ``INT4`` initializer of the int8 ``value`` (each code in ``[-8, 7]``)."""
        name = self.name("c")
        value = np.asarray(value)
        self.inits.append(
            helper.make_tensor(name, TensorProto.INT4, value.shape, value.reshape(-1).tolist())
        )
        return name

    def weight_consts(self, path: str, w: np.ndarray) -> list[str]:
        """The QDQ weight initializer: INT4 as ``weight_type`` asks (module docstring), else
        int8 (no zero point: ``DequantizeLinear``'s default 0, of the weight's type)."""
        fits = INT4_RANGE[0] <= int(w.min()) and int(w.max()) <= INT4_RANGE[1]
        if self.weight_type == "int4" and not fits:
            raise ValueError(
                f"layer {path!r}: weight codes in [{int(w.min())}, {int(w.max())}] do not fit "
                f"INT4 {list(INT4_RANGE)}; use weight_type='auto' or 'int8'"
            )
        if self.weight_type == "int8" or not fits:
            return self.const("w", w)
        return self.const_int4("w", w)

    def node(self, op: str, inputs: list[str], domain: str = "", **attrs) -> str:
        """A node with the attributes that differ from their defaults (``strides`` and
        ``dilations`` 1, ``pads`` 0, ``group`` 1 are left out)."""
        defaults = {"strides": 1, "dilations": 1, "pads": 0, "group": 1}
        attrs = {
            k: v
            for k, v in attrs.items()
            if k not in defaults or any(int(a) != defaults[k] for a in np.ravel(v))
        }
        out = self.name("v")
        self.nodes.append(helper.make_node(op, inputs, [out], domain=domain or None, **attrs))
        return out

    def live_nodes(self, output: str) -> list[onnx.NodeProto]:
        """The nodes ``output`` depends on, in order."""
        needed, live = {output}, []
        for n in reversed(self.nodes):
            if needed & set(n.output):
                needed |= set(n.input)
                live.append(n)
        return live[::-1]

    def qp(self, scale, zp) -> list[str]:
        return [self.const("scale", np.float32(scale)), self.const("zp", np.int8(zp))]

    def reshape(self, x: str, shape) -> str:
        x = self.reshaped.get(x, x)
        if self.shapes.get(x) == tuple(shape[1:]):
            return x
        y = self.node("Reshape", [x, self.const("shape", np.int64([-1, *shape[1:]]))])
        self.reshaped[y], self.shapes[y] = x, tuple(shape[1:])
        return y

    def to_nchw(self, x: str, shape, spatial: int) -> str:
        if x in self.nchw:
            return self.nchw[x]
        if spatial == 1:  # (N, L, C) -> (N, 1, L, C)
            x = self.reshape(x, (shape[0], 1, *shape[1:]))
        return self.node("Transpose", [x], perm=list(_TO_NCHW))

    def from_nchw(self, y: str, shape, spatial: int) -> str:
        t = self.node("Transpose", [y], perm=list(_TO_NHWC))
        out = self.reshape(t, shape) if spatial == 1 else t
        self.nchw[out] = y
        return out

    def relu(self, y: str, scale, zp) -> str:
        if self.form == "qdq" or int(zp) == INT8_RANGE[0]:
            return y  # the float Relu was applied before QuantizeLinear; Clip(-128, 127): none
        lo, hi = self.const("lo", np.int8(zp)), self.const("hi", np.int8(INT8_RANGE[1]))
        return self.node("Clip", [y, lo, hi])

    def float_relu(self, y: str, zp) -> str:
        """``Relu(y)`` before a QuantizeLinear with zero point ``zp``; none when ``zp`` is
        -128: QuantizeLinear then clamps every ``y <= 0`` to -128 itself."""
        return y if int(zp) == INT8_RANGE[0] else self.node("Relu", [y])

    def dq(self, x: str, scale, zp) -> str:
        return self.node("DequantizeLinear", [x, *self.qp(scale, zp)])

    def q(self, y: str, scale, zp) -> str:
        return self.node("QuantizeLinear", [y, *self.qp(scale, zp)])

    # -- layers ------------------------------------------------------------------------------

    def conv(self, x: str, x_qp, w: np.ndarray, layer: Conv | Dense, attrs: dict) -> str:
        """A QLinearConv (or its QDQ form) on NCHW ``x`` with OIHW int8 ``w``."""
        w_scale, b_scale = weight_scales(layer)
        b = np.asarray(layer.b, np.int32)
        relu = layer.activation == "relu"
        y_qp = (float(layer.out_scale), int(layer.out_zp))
        if self.form == "qoperator":
            w_in = [  # one zero point for all channels (QLinearConv takes a scalar)
                self.const("w", w),
                self.const("w_scale", w_scale),
                self.const("w_zp", np.int8(0)),
            ]
            y = self.node(
                "QLinearConv",
                [x, *self.qp(*x_qp), *w_in, *self.qp(*y_qp), self.const("b", b)],
                **attrs,
            )
            return self.relu(y, *y_qp) if relu else y
        w_name = self.weight_consts(layer.path, w)
        wf = self.node("DequantizeLinear", [w_name, self.const("w_scale", w_scale)], axis=0)
        bf = self.node(
            "DequantizeLinear", [self.const("b", b), self.const("b_scale", b_scale)], axis=0
        )
        y = self.node("Conv", [self.dq(x, *x_qp), wf, bf], **attrs)
        return self.q(self.float_relu(y, y_qp[1]) if relu else y, *y_qp)

    def pool(self, x: str, qp, layer: Pool) -> str:
        attrs = dict(kernel_shape=list(layer.window), strides=list(layer.strides),
                     pads=_explicit(layer.padding))  # fmt: skip
        if layer.kind == "max":
            return self.node("MaxPool", [x], **attrs)
        if self.form == "qoperator":
            qps = [*self.qp(*qp), *self.qp(*qp)]
            return self.node(
                "QLinearAveragePool", [x, *qps], domain=_MS, count_include_pad=0, **attrs
            )
        y = self.node("AveragePool", [self.dq(x, *qp)], count_include_pad=0, **attrs)
        return self.q(y, *qp)

    def mean(self, x: str, x_shape, layer: Mean) -> str:
        """Global average over the spatial axes of NHWC / NLC ``x``, then ``(N, C)``."""
        x_qp = (float(layer.x_scale), int(layer.x_zp))
        y_qp = (float(layer.out_scale), int(layer.out_zp))
        channels = x_shape[-1]
        if self.form == "qoperator":
            y = self.node("QLinearGlobalAveragePool", [x, *self.qp(*x_qp), *self.qp(*y_qp)],
                          domain=_MS, channels_last=1)  # fmt: skip
            return self.reshape(y, (1, channels))
        axes = list(layer.axes)
        xf = self.dq(x, *x_qp)
        if self.opset >= 18:
            y = self.node("ReduceMean", [xf, self.const("axes", np.int64(axes))], keepdims=0)
        else:
            y = self.node("ReduceMean", [xf], axes=axes, keepdims=0)
        return self.q(y, *y_qp)

    def add(self, a: str, b: str, a_qp, b_qp, layer: Add) -> str:
        y_qp = (float(layer.out_scale), int(layer.out_zp))
        relu = layer.activation == "relu"
        if self.form == "qoperator":
            y = self.node(
                "QLinearAdd", [a, *self.qp(*a_qp), b, *self.qp(*b_qp), *self.qp(*y_qp)], domain=_MS
            )
            return self.relu(y, *y_qp) if relu else y
        y = self.node("Add", [self.dq(a, *a_qp), self.dq(b, *b_qp)])
        return self.q(self.float_relu(y, y_qp[1]) if relu else y, *y_qp)


def _check(layer) -> None:
    check_int8_clamp(layer, "ONNX")
    if getattr(layer, "activation", None) not in (None, "relu"):
        raise ValueError(f"layer {layer.path!r}: activation {layer.activation!r} is not exported")


def onnx_model(
    program: Program, *, form: str = "qoperator", opset: int = 21, weight_type: str = "auto"
) -> onnx.ModelProto:
    """The ONNX model of ``program`` (module docstring), checked with ``onnx.checker``.

    Args:
      program: a valid integer program.
      form: ``"qoperator"`` or ``"qdq"``.
      opset: the default-domain opset (13 to 21).
      weight_type: ``"auto"`` (INT4 weights where the codes fit ``[-8, 7]``, in the QDQ form
        at opset 21; int8 elsewhere), ``"int8"`` or ``"int4"`` (QDQ, opset 21, every Conv /
        Dense in ``[-8, 7]``).

    Raises:
      ValueError: an unknown ``form``, ``opset`` or ``weight_type``, ``"int4"`` with the
        QOperator form, an opset below 21 or weight codes outside ``[-8, 7]`` (the layer named),
        or a layer ONNX int8 cannot express (its path named): an output clamp narrower than
        int8, an activation other than relu.
    """
    if form not in ONNX_FORMS:
        raise ValueError(f"form must be one of {ONNX_FORMS}, got {form!r}")
    if not 13 <= opset <= 21:
        raise ValueError(f"opset must be in [13, 21], got {opset}")
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES}, got {weight_type!r}")
    if weight_type == "int4" and (form != "qdq" or opset < 21):
        raise ValueError(
            f"weight_type='int4' needs form='qdq' and opset 21 (INT4 DequantizeLinear), got "
            f"form={form!r}, opset={opset}"
        )
    validate(program)
    if weight_type == "auto":
        weight_type = "auto" if form == "qdq" and opset >= 21 else "int8"
    g = _Builder(form, opset, weight_type)
    shapes, qps = value_shapes(program), value_qparams(program)
    values = ["input"]
    g.shapes["input"] = tuple(shapes[0][1:])
    for layer, reads in zip(program.layers, program.layer_inputs(), strict=True):
        _check(layer)
        x, x_shape, x_qp = values[reads[0]], shapes[reads[0]], qps[reads[0]]
        out_shape = shapes[len(values)]
        if isinstance(layer, Conv):
            w = np.ascontiguousarray(np.transpose(np.asarray(layer.w), (3, 2, 0, 1)))  # OIHW
            attrs = dict(strides=list(layer.strides), dilations=list(layer.dilation),
                         pads=_explicit(layer.padding), group=int(layer.groups))  # fmt: skip
            y = g.conv(g.to_nchw(x, x_shape, layer.spatial), x_qp, w, layer, attrs)
            y = g.from_nchw(y, out_shape, layer.spatial)
        elif isinstance(layer, Dense):
            w = np.asarray(layer.w).T[:, :, None, None]  # (out, in, 1, 1)
            y = g.conv(g.reshape(x, (*x_shape, 1, 1)), x_qp, np.ascontiguousarray(w), layer, {})
            g.shapes[y] = (w.shape[0], 1, 1)
            y = g.reshape(y, out_shape)
        elif isinstance(layer, Pool):
            y = g.pool(g.to_nchw(x, x_shape, layer.spatial), x_qp, layer)
            y = g.from_nchw(y, out_shape, layer.spatial)
        elif isinstance(layer, Reshape):
            y = g.reshape(x, out_shape)
        elif isinstance(layer, Mean):
            y = g.mean(x, x_shape, layer)
        elif isinstance(layer, Concat):
            y = g.node("Concat", [values[i] for i in reads], axis=int(layer.axis))
        else:
            y = g.add(x, values[reads[1]], x_qp, qps[reads[1]], layer)
        values.append(y)
    nodes = g.live_nodes(values[-1])
    for n in nodes:  # the graph's output value is named "output"
        for io in (n.input, n.output):
            io[:] = ["output" if name == values[-1] else name for name in io]
    read = {name for n in nodes for name in n.input}
    inits = [t for t in g.inits if t.name in read]
    int8_value = (
        lambda name, shape: helper.make_tensor_value_info(  # noqa: E731
            name, TensorProto.INT8, ["N", *shape[1:]]
        )
    )
    graph = helper.make_graph(
        nodes, "jquant", [int8_value("input", shapes[0])], [int8_value("output", shapes[-1])],
        initializer=inits,
    )  # fmt: skip
    opsets = [helper.make_opsetid("", opset)]
    if any(n.domain == _MS for n in nodes):
        opsets.append(helper.make_opsetid(_MS, 1))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="jquant")
    model.ir_version = 10 if opset <= 21 else model.ir_version
    onnx.checker.check_model(model)
    return model


def to_onnx(
    program: Program,
    path: str | os.PathLike,
    *,
    form: str = "qoperator",
    opset: int = 21,
    weight_type: str = "auto",
) -> int:
    """Writes :func:`onnx_model` to ``path`` (a temporary file, then renamed: nothing is left
    half-written); returns the file's size in bytes.

    Raises:
      ValueError: as :func:`onnx_model`, or ``path``'s folder does not exist.
    """
    data = onnx_model(program, form=form, opset=opset, weight_type=weight_type).SerializeToString()
    return write_atomically(pathlib.Path(path), data)
