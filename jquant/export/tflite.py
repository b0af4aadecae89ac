"""An integer program -> a ``.tflite`` flatbuffer that LiteRT runs (no TensorFlow needed).

The file is written with the TFLite schema's generated Python builders (``tflite`` package)
and ``flatbuffers``. Every program op maps to one TFLite builtin op, int8 in and int8 out:

=====================  =========================================================
program spec           TFLite op
=====================  =========================================================
:class:`Conv`          ``CONV_2D`` (``groups == 1``), ``DEPTHWISE_CONV_2D``
                       (``groups == C_in``); filters OHWI / 1HWO int8 per output
                       channel, bias int32 at ``s_x s_w[c]``, fused RELU
:class:`Dense`         ``FULLY_CONNECTED``: weights ``(out, in)`` int8 per channel
:class:`Pool`          ``MAX_POOL_2D`` / ``AVERAGE_POOL_2D`` (padding SAME or VALID)
:class:`Reshape`       ``RESHAPE`` (batch axis ``-1``)
:class:`Add`           ``ADD`` with fused RELU
:class:`Mean`          ``MEAN`` over the spatial axes, ``keep_dims=False``
:class:`Concat`        ``CONCATENATION`` (inputs and output share one quantizer)
=====================  =========================================================

1-D layers (``(N, L, C)`` activations) run as 2-D ones with ``H = 1``, between two
``RESHAPE`` ops, as the program runs them. The runtime computes each requantization multiplier
from the scales stored in the file (``M = s_x s_w / s_y``); which rounding it applies depends on
the runtime and the op (:mod:`jquant.convert.targets`): compare LiteRT's reference kernels with
``retarget(program, "litert_ref")`` and XNNPACK with ``retarget(program, "xnnpack")``.

With ``io="float"`` the model takes float32 and returns float32: ``QUANTIZE`` before the first
op and ``DEQUANTIZE`` after the last. LiteRT's QUANTIZE rounds as its kernel does (the
reference kernel half away from zero), which may differ from ``program.quantize_input`` at
exact ties.

Reference: the TFLite flatbuffer schema (``tensorflow/compiler/mlir/lite/schema/schema.fbs``)
and the TFLite 8-bit quantization specification.
"""

from __future__ import annotations

import importlib
import os
import pathlib
from collections.abc import Callable
from typing import Any

import flatbuffers
import numpy as np

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

__all__ = ["IO_TYPES", "to_tflite", "tflite_bytes"]

IO_TYPES = ("int8", "float")
_INT8, _INT32, _FLOAT32 = 9, 2, 0  # tflite.TensorType
_OPS = {  # tflite.BuiltinOperator code, op version
    "ADD": (0, 2),
    "CONCATENATION": (2, 2),
    "MEAN": (40, 2),
    "AVERAGE_POOL_2D": (1, 2),
    "CONV_2D": (3, 3),
    "DEPTHWISE_CONV_2D": (4, 3),
    "DEQUANTIZE": (6, 2),
    "FULLY_CONNECTED": (9, 4),
    "MAX_POOL_2D": (17, 2),
    "RESHAPE": (22, 1),
    "QUANTIZE": (114, 1),
}
_OPTIONS = {  # tflite.BuiltinOptions union tag of each options table
    "Conv2DOptions": 1,
    "DepthwiseConv2DOptions": 2,
    "Pool2DOptions": 5,
    "FullyConnectedOptions": 8,
    "AddOptions": 11,
    "ConcatenationOptions": 10,
    "ReducerOptions": 27,
    "ReshapeOptions": 17,
    "QuantizeOptions": 89,
    "DequantizeOptions": 38,
}
_ACTIVATIONS = {None: 0, "relu": 1, "relu6": 3}  # tflite.ActivationFunctionType
_SAME, _VALID = 0, 1  # tflite.Padding


def _schema(name: str):
    return importlib.import_module(f"tflite.{name}")


def _table(b: flatbuffers.Builder, name: str, **fields) -> int:
    """One flatbuffer table of the schema: ``fields`` in the builders' CamelCase, e.g.
    ``StrideW=1``; offsets of vectors and sub-tables must be built before."""
    mod = _schema(name)
    mod.Start(b)
    for field, value in fields.items():
        if value is not None:
            getattr(mod, "Add" + field)(b, value)
    return mod.End(b)


class _Vectors:
    """Each distinct vector (dtype and bytes) and table written once: tensors with the same
    quantization share one ``QuantizationParameters`` table, and equal vectors (the zero
    points of every layer of one width, equal shapes) one vector. A flatbuffer may point to
    an offset from several places; LiteRT reads through the offsets."""

    def __init__(self, b: flatbuffers.Builder) -> None:
        self.b = b
        self.memo: dict[tuple, int] = {}

    def __call__(self, values, dtype) -> int:
        data = np.ascontiguousarray(values, dtype)
        key = (data.dtype.str, data.tobytes())
        if key not in self.memo:
            self.memo[key] = self.b.CreateNumpyVector(data)
        return self.memo[key]

    def quantization(self, scale, zp, axis: int) -> int:
        key = ("quantization", np.float32(scale).tobytes(), np.int64(zp).tobytes(), axis)
        if key not in self.memo:
            scales, zps = self(scale, np.float32), self(zp, np.int64)
            self.memo[key] = _table(self.b, "QuantizationParameters", Scale=scales,
                                    ZeroPoint=zps, QuantizedDimension=axis)  # fmt: skip
        return self.memo[key]


class _Graph:
    """Tensors, buffers and operators of one subgraph, collected before serialising.

    Only what the runtimes need is written: tensors that no op reads and that are not the
    graph's output are dropped with their producers (a 1-D layer's ``RESHAPE`` back to
    ``(N, L, C)`` when the next layer reshapes it to ``(N, 1, L, C)`` again), ``RESHAPE``
    takes its new shape from its options (no shape tensor), activations carry a name only at
    the graph's edges and a shape signature (batch ``-1``) only at its input and output, and
    equal buffers, vectors and quantization tables are stored once."""

    def __init__(self) -> None:
        self.buffers: list[bytes] = [b""]  # buffer 0: the empty sentinel
        self.tensors: list[dict[str, Any]] = []
        self.ops: list[tuple[str, list[int], list[int], str | None, dict]] = []

    def tensor(self, name, shape, dtype, scale=None, zp=None, axis=0, data=None) -> int:
        buffer = 0
        if data is not None:
            data = np.ascontiguousarray(data).tobytes()
            if data not in self.buffers:
                self.buffers.append(data)
            buffer = self.buffers.index(data)
        self.tensors.append(
            dict(name=name, shape=list(shape), dtype=dtype, buffer=buffer, scale=scale, zp=zp,
                 axis=axis)
        )  # fmt: skip
        return len(self.tensors) - 1

    def activation(self, name, shape, scale, zp) -> int:
        return self.tensor(name, (1, *shape), _INT8, [scale], [zp])

    def op(self, kind: str, inputs, outputs, options: str | None = None, **fields) -> None:
        self.ops.append((kind, list(inputs), list(outputs), options, fields))

    def _live(self, outputs: list[int]) -> list[tuple]:
        """The ops the graph's ``outputs`` depend on, in order."""
        needed, live = set(outputs), []
        for op in reversed(self.ops):
            if needed & set(op[2]):
                needed |= set(op[1])
                live.append(op)
        return live[::-1]

    def serialise(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        ops = self._live(outputs)
        used = sorted({*inputs, *outputs, *(t for op in ops for t in (*op[1], *op[2]))})
        index = {t: k for k, t in enumerate(used)}
        buffers = [0, *sorted({self.tensors[t]["buffer"] for t in used} - {0})]
        b = flatbuffers.Builder(1024)
        vec = _Vectors(b)
        kinds = sorted({kind for kind, *_ in ops}, key=lambda k: _OPS[k][0])
        codes = [
            _table(b, "OperatorCode", DeprecatedBuiltinCode=min(_OPS[k][0], 127),
                   BuiltinCode=_OPS[k][0], Version=_OPS[k][1])
            for k in kinds
        ]  # fmt: skip
        data = [vec(np.frombuffer(self.buffers[k], np.uint8), np.uint8) if k else None
                for k in buffers]  # fmt: skip
        buffer_tables = [_table(b, "Buffer", Data=d) for d in data]
        edges = {*inputs, *outputs}
        tensors = [
            self._tensor(b, vec, self.tensors[t], buffers.index(self.tensors[t]["buffer"]),
                         edge=t in edges)
            for t in used
        ]  # fmt: skip
        op_tables = []
        for kind, ins, outs, options, fields in ops:
            lists = {k: vec(v, np.int32) for k, v in fields.items() if isinstance(v, list)}
            opts = _table(b, options, **{**fields, **lists}) if options else None
            op_tables.append(
                _table(b, "Operator", OpcodeIndex=kinds.index(kind),
                       Inputs=vec([index[t] for t in ins], np.int32),
                       Outputs=vec([index[t] for t in outs], np.int32),
                       BuiltinOptionsType=_OPTIONS[options] if options else None,
                       BuiltinOptions=opts)
            )  # fmt: skip
        subgraph = _table(
            b, "SubGraph", Tensors=_offsets(b, "SubGraph", "Tensors", tensors),
            Inputs=vec([index[t] for t in inputs], np.int32),
            Outputs=vec([index[t] for t in outputs], np.int32),
            Operators=_offsets(b, "SubGraph", "Operators", op_tables),
        )  # fmt: skip
        desc = b.CreateString(description)
        model = _table(
            b, "Model", Version=3,
            OperatorCodes=_offsets(b, "Model", "OperatorCodes", codes),
            Subgraphs=_offsets(b, "Model", "Subgraphs", [subgraph]),
            Description=desc, Buffers=_offsets(b, "Model", "Buffers", buffer_tables),
        )  # fmt: skip
        b.Finish(model, file_identifier=b"TFL3")
        return bytes(b.Output())

    @staticmethod
    def _tensor(b: flatbuffers.Builder, vec: _Vectors, t: dict, buffer: int, edge: bool) -> int:
        quant = None
        if t["scale"] is not None:
            quant = vec.quantization(t["scale"], t["zp"], t["axis"])
        shape = vec(t["shape"], np.int32)
        dynamic = edge and buffer == 0 and len(t["shape"]) > 0
        signature = vec([-1, *t["shape"][1:]], np.int32) if dynamic else None
        name = b.CreateSharedString(t["name"]) if edge else None
        return _table(
            b, "Tensor", Shape=shape, Type=t["dtype"], Buffer=buffer, Name=name,
            Quantization=quant, ShapeSignature=signature,
        )  # fmt: skip


def _offsets(b: flatbuffers.Builder, table: str, field: str, offsets: list[int]) -> int:
    getattr(_schema(table), f"Start{field}Vector")(b, len(offsets))
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def _padding(path: str, size, window, strides, dilation, padding) -> int:
    """``SAME`` or ``VALID`` for the explicit ``padding`` of one layer, else ValueError."""
    pads = [tuple(int(p) for p in pad) for pad in padding]
    if all(p == (0, 0) for p in pads):
        return _VALID
    same = []
    for n, k, s, d in zip(size, window, strides, dilation, strict=True):
        total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
        same.append((total // 2, total - total // 2))
    if pads == same:
        return _SAME
    raise ValueError(
        f"layer {path!r}: padding {pads} is neither VALID nor TFLite's SAME {same} for input "
        f"size {tuple(size)}; TFLite ops take only SAME or VALID"
    )


def _activation(path: str, activation) -> int:
    if activation not in _ACTIVATIONS:
        raise ValueError(f"layer {path!r}: activation {activation!r} has no TFLite fused form")
    return _ACTIVATIONS[activation]


class _Writer:
    """Emits the ops of one program layer into a :class:`_Graph`, tracking value shapes."""

    def __init__(self, graph: _Graph) -> None:
        self.g = graph
        self.n = 0
        self.source: dict[int, int] = {}  # RESHAPE output -> its input

    def name(self, what: str) -> str:
        self.n += 1
        return f"{what}_{self.n}"

    def reshape(self, x: int, shape, scale, zp) -> int:
        """``x`` as ``(N, *shape[1:])``: a RESHAPE of the tensor ``x`` was reshaped from, if
        any (that tensor itself when it has the shape), so that reshapes do not chain."""
        x = self.source.get(x, x)
        if self.g.tensors[x]["shape"][1:] == list(shape[1:]):
            return x
        new = [-1, *shape[1:]]
        y = self.g.activation(self.name("reshape"), shape[1:], scale, zp)
        self.g.op("RESHAPE", [x], [y], "ReshapeOptions", NewShape=new)
        self.source[y] = x
        return y

    def linear(self, layer: Conv | Dense, x: int, x_shape, out_shape) -> int:
        check_int8_clamp(layer, "TFLite")
        act = _activation(layer.path, layer.activation)
        w = np.asarray(layer.w)
        w_scale, b_scale = weight_scales(layer)
        zeros = [0] * w.shape[-1]
        out_scale, out_zp = float(layer.out_scale), int(layer.out_zp)
        bias = self.g.tensor(self.name("bias"), (w.shape[-1],), _INT32, list(b_scale), zeros,
                             data=np.asarray(layer.b, np.int32))  # fmt: skip
        if isinstance(layer, Dense):
            wt = self.g.tensor(self.name("weights"), w.T.shape, _INT8, list(w_scale), zeros, 0,
                               data=np.ascontiguousarray(w.T))  # fmt: skip
            y = self.g.activation(self.name(layer.path), out_shape[1:], out_scale, out_zp)
            self.g.op("FULLY_CONNECTED", [x, wt, bias], [y], "FullyConnectedOptions",
                      FusedActivationFunction=act)  # fmt: skip
            return y
        lift = layer.spatial == 1
        if lift:  # (N, L, C) -> (N, 1, L, C), as the program runs it
            x_shape = (x_shape[0], 1, *x_shape[1:])
            x = self.reshape(x, x_shape, float(layer.x_scale), int(layer.x_zp))
        y_shape = (out_shape[0], 1, *out_shape[1:]) if lift else tuple(out_shape)
        pad = _padding(layer.path, x_shape[1:3], w.shape[:2], layer.strides, layer.dilation,
                       layer.padding)  # fmt: skip
        geometry = dict(Padding=pad, StrideH=layer.strides[0], StrideW=layer.strides[1],
                        DilationHFactor=layer.dilation[0], DilationWFactor=layer.dilation[1],
                        FusedActivationFunction=act)  # fmt: skip
        c_in, groups = x_shape[-1], layer.groups
        y = self.g.activation(self.name(layer.path), y_shape[1:], out_scale, out_zp)
        if groups == 1:
            filt = np.ascontiguousarray(np.transpose(w, (3, 0, 1, 2)))  # HWIO -> OHWI
            wt = self.g.tensor(self.name("filter"), filt.shape, _INT8, list(w_scale), zeros, 0,
                               data=filt)  # fmt: skip
            self.g.op("CONV_2D", [x, wt, bias], [y], "Conv2DOptions", **geometry)
        elif groups == c_in and w.shape[2] == 1:
            filt = np.ascontiguousarray(w.reshape(1, *w.shape[:2], w.shape[-1]))  # 1HWO
            wt = self.g.tensor(self.name("filter"), filt.shape, _INT8, list(w_scale), zeros, 3,
                               data=filt)  # fmt: skip
            self.g.op("DEPTHWISE_CONV_2D", [x, wt, bias], [y], "DepthwiseConv2DOptions",
                      DepthMultiplier=w.shape[-1] // c_in, **geometry)  # fmt: skip
        else:
            raise ValueError(
                f"layer {layer.path!r}: grouped conv with {groups} groups of {c_in} channels; "
                "TFLite has CONV_2D (1 group) and DEPTHWISE_CONV_2D (one group per channel)"
            )
        return self.reshape(y, out_shape, out_scale, out_zp) if lift else y

    def pool(self, layer: Pool, x: int, x_shape, out_shape, scale, zp) -> int:
        lift = layer.spatial == 1
        if lift:
            x_shape = (x_shape[0], 1, *x_shape[1:])
            x = self.reshape(x, x_shape, scale, zp)
        y_shape = (out_shape[0], 1, *out_shape[1:]) if lift else tuple(out_shape)
        pad = _padding(layer.path, x_shape[1:3], layer.window, layer.strides, (1, 1),
                       layer.padding)  # fmt: skip
        y = self.g.activation(self.name(layer.path), y_shape[1:], scale, zp)
        kind = "MAX_POOL_2D" if layer.kind == "max" else "AVERAGE_POOL_2D"
        self.g.op(kind, [x], [y], "Pool2DOptions", Padding=pad, StrideH=layer.strides[0],
                  StrideW=layer.strides[1], FilterHeight=layer.window[0],
                  FilterWidth=layer.window[1], FusedActivationFunction=0)  # fmt: skip
        return self.reshape(y, out_shape, scale, zp) if lift else y

    def add(self, layer: Add, a: int, b: int, out_shape) -> int:
        check_int8_clamp(layer, "TFLite")
        act = _activation(layer.path, layer.activation)
        y = self.g.activation(
            self.name(layer.path), out_shape[1:], float(layer.out_scale), int(layer.out_zp)
        )
        self.g.op("ADD", [a, b], [y], "AddOptions", FusedActivationFunction=act)
        return y

    def mean(self, layer: Mean, x: int, out_shape) -> int:
        axes = self.g.tensor(self.name("axes"), (len(layer.axes),), _INT32,
                             data=np.int32(layer.axes))  # fmt: skip
        y = self.g.activation(
            self.name(layer.path), out_shape[1:], float(layer.out_scale), int(layer.out_zp)
        )
        self.g.op("MEAN", [x, axes], [y], "ReducerOptions", KeepDims=False)
        return y

    def concat(self, layer: Concat, xs: list[int], out_shape) -> int:
        y = self.g.activation(self.name(layer.path), out_shape[1:], float(layer.scale),
                              int(layer.zp))  # fmt: skip
        self.g.op("CONCATENATION", xs, [y], "ConcatenationOptions", Axis=int(layer.axis),
                  FusedActivationFunction=0)  # fmt: skip
        return y


def tflite_bytes(program: Program, *, io: str = "int8") -> bytes:
    """The ``.tflite`` flatbuffer of ``program`` (module docstring), as bytes.

    Args:
      program: a valid integer program (:func:`jquant.convert.convert`).
      io: ``"int8"`` (int8 codes in and out, the program's own quantizers) or ``"float"``
        (float32 in and out through QUANTIZE / DEQUANTIZE).

    Raises:
      ValueError: ``io`` unknown, or a layer TFLite cannot express (its path named): padding
        other than SAME / VALID, a grouped (not depthwise) conv, an output clamp narrower
        than int8, an input format narrower than int8.
    """
    if io not in IO_TYPES:
        raise ValueError(f"io must be one of {IO_TYPES}, got {io!r}")
    validate(program)
    if tuple(int(c) for c in program.input_clamp) != INT8_RANGE:
        raise ValueError(
            f"program input clamp {tuple(program.input_clamp)} is narrower than int8; TFLite's "
            "int8 input has the full range"
        )
    graph = _Graph()
    w = _Writer(graph)
    shapes, qps = value_shapes(program), value_qparams(program)
    x = graph.activation("input", shapes[0][1:], *qps[0])
    entry = x
    if io == "float":
        entry = graph.tensor("input_float", shapes[0], _FLOAT32)
        graph.op("QUANTIZE", [entry], [x], "QuantizeOptions")
    values = [x]
    emit: dict[type, Callable] = {
        Conv: lambda L, v, k: w.linear(L, v[0], shapes[k[0]], shapes[len(values)]),
        Dense: lambda L, v, k: w.linear(L, v[0], shapes[k[0]], shapes[len(values)]),
        Pool: lambda L, v, k: w.pool(L, v[0], shapes[k[0]], shapes[len(values)], *qps[k[0]]),
        Reshape: lambda L, v, k: w.reshape(v[0], shapes[len(values)], *qps[k[0]]),
        Add: lambda L, v, k: w.add(L, v[0], v[1], shapes[len(values)]),
        Mean: lambda L, v, k: w.mean(L, v[0], shapes[len(values)]),
        Concat: lambda L, v, k: w.concat(L, v, shapes[len(values)]),
    }
    for layer, reads in zip(program.layers, program.layer_inputs(), strict=True):
        values.append(emit[type(layer)](layer, [values[i] for i in reads], reads))
    out = values[-1]
    if io == "float":
        result = graph.tensor("output_float", shapes[-1], _FLOAT32)
        graph.op("DEQUANTIZE", [out], [result], "DequantizeOptions")
        out = result
    return graph.serialise([entry], [out], "jquant")


def to_tflite(program: Program, path: str | os.PathLike, *, io: str = "int8") -> int:
    """Writes ``program`` as a ``.tflite`` file (:func:`tflite_bytes`); returns its size.

    The bytes go to a temporary file beside ``path``, then renamed: nothing is left
    half-written.

    Raises:
      ValueError: as :func:`tflite_bytes`, or ``path``'s folder does not exist.
    """
    return write_atomically(pathlib.Path(path), tflite_bytes(program, io=io))
