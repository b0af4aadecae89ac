"""Saving and loading integer programs in the safetensors layout (no pickle, no code).

File layout (the safetensors format, written and read with NumPy only)::

    u64 little-endian n | n bytes of JSON header | raw little-endian tensor bytes

A program is stored compactly, as three packed tensors and its static structure:

- ``i8``: every layer's int8 weights, flattened and concatenated (int8 stays int8);
- ``i32``: the program's input / output zero points, then per linear layer its int32 bias,
  ``x_zp`` and ``out_zp``, per add ``a_zp``, ``b_zp`` and ``out_zp``;
- ``f32``: the program's input / output scales, then per linear layer ``x_scale``,
  ``w_scale`` (per channel) and ``out_scale``, per add ``a_scale``, ``b_scale``, ``out_scale``;
- ``"__metadata__": {"jquant_program": <JSON>}``: layer kinds, paths, weight shapes, the
  geometry fields that differ from their defaults, the requantization mode and, for a
  program that is not a plain sequence, ``inputs`` (the values each layer reads).

The requantization constants are not stored: :func:`load` recomputes them host-side from the
stored float32 scales with :func:`jquant.integer.requant_from_scales` /
:func:`jquant.integer.add_requant` (``quantize_multiplier`` in float64 for ``double`` /
``single``), exactly as :func:`jquant.convert.convert` computed them, so a loaded program runs
bit for bit like the saved one. :func:`save` checks this and refuses a program whose
constants do not follow from its scales.

Version 3 (residual adds, ``inputs``) reads version 2 files (sequences without adds) as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Mapping

import jax
import numpy as np

from jquant import integer
from jquant.convert.program import SPECS, Add, Conv, Dense, Program, spec_name, validate

__all__ = ["save", "load", "write_tensors", "read_tensors"]

_DTYPES = {"I8": np.int8, "U8": np.uint8, "I32": np.int32, "F32": np.float32, "F64": np.float64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_META_KEY = "jquant_program"
_VERSION = 3
_READS = (2, 3)
# packed tensors: name -> dtype
_PACKS = {"i8": np.int8, "i32": np.int32, "f32": np.float32}
# per linear layer, in file order: (pack, field)
_LINEAR_FIELDS = (
    ("i8", "w"),
    ("i32", "b"),
    ("i32", "x_zp"),
    ("i32", "out_zp"),
    ("f32", "x_scale"),
    ("f32", "w_scale"),
    ("f32", "out_scale"),
)
_ADD_FIELDS = (
    ("i32", "a_zp"),
    ("i32", "b_zp"),
    ("i32", "out_zp"),
    ("f32", "a_scale"),
    ("f32", "b_scale"),
    ("f32", "out_scale"),
)
_PROGRAM_FIELDS = (
    ("i32", "input_zp"),
    ("i32", "output_zp"),
    ("f32", "input_scale"),
    ("f32", "output_scale"),
)


def write_tensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> int:
    """Writes ``tensors`` (int8, uint8, int32, float32, float64) and string ``metadata`` in the
    safetensors layout. Returns the file size in bytes."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name, a in tensors.items():
        a = np.asarray(a)
        a = a if a.flags.c_contiguous else a.copy(order="C")
        if a.dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} not in {sorted(_DTYPES)}")
        raw = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + b"".join(blobs)
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; ValueError on a malformed file."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} exceeds the file size {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except ValueError as e:
        raise ValueError(f"{path}: header is not JSON ({e})") from None
    metadata = header.pop("__metadata__", {}) or {}
    body, tensors = data[8 + n :], {}
    for name, entry in header.items():
        dtype = _DTYPES.get(entry.get("dtype"))
        begin, end = entry.get("data_offsets", (0, -1))
        shape = tuple(entry.get("shape", ()))
        if dtype is None or not 0 <= begin <= end <= len(body):
            raise ValueError(f"{path}: bad entry for tensor {name!r}: {entry}")
        a = np.frombuffer(body[begin:end], np.dtype(dtype).newbyteorder("<"))
        if a.size != int(np.prod(shape)):
            raise ValueError(f"{path}: tensor {name!r} has {a.size} elements, shape {shape}")
        tensors[name] = a.astype(dtype).reshape(shape)
    return tensors, metadata


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _non_default_meta(layer) -> dict:
    """The static fields of ``layer`` other than ``path`` that differ from their defaults."""
    out = {}
    for f in dataclasses.fields(layer):
        if f.name in layer.meta_fields and f.name != "path":
            value = getattr(layer, f.name)
            if f.default is dataclasses.MISSING or value != f.default:
                out[f.name] = value
    return out


def _requant_again(layer: Conv | Dense | Add, mode: str):
    """The requantization constants :func:`load` computes from the layer's scales."""
    if isinstance(layer, Add):
        return integer.add_requant(layer.a_scale, layer.b_scale, layer.out_scale, mode)
    return integer.requant_from_scales(layer.x_scale, layer.w_scale, layer.out_scale, mode)


def _check_recomputable(layer: Conv | Dense | Add) -> None:
    rq = layer.requant
    again = _requant_again(layer, rq.mode)
    for (name, a), b in zip(
        jax.tree_util.tree_leaves_with_path(rq), jax.tree.leaves(again), strict=True
    ):
        a, b = np.asarray(a), np.asarray(b)
        if a.dtype != b.dtype or not np.array_equal(np.broadcast_to(a, b.shape), b):
            raise ValueError(
                f"layer {layer.path!r}: requant{jax.tree_util.keystr(name)} does not follow "
                "from the layer's scales (requant_from_scales / add_requant of its scales and "
                "mode); save stores only the scales and recomputes the constants at load"
            )


def save(program: Program, path: str | os.PathLike) -> int:
    """Writes ``program`` to ``path`` (safetensors layout, packed, see the module docstring);
    returns the file size in bytes.

    Raises:
      ValueError / TypeError: the program fails :func:`validate`, or a layer's requantization
        constants are not ``requant_from_scales`` of its scales.
    """
    validate(program)
    packs: dict[str, list[np.ndarray]] = {k: [] for k in _PACKS}
    for pack, name in _PROGRAM_FIELDS:
        packs[pack].append(np.asarray(getattr(program, name)).reshape(-1))
    layers, modes = [], set()
    for layer in program.layers:
        entry: list = [spec_name(layer), layer.path, _non_default_meta(layer)]
        if isinstance(layer, Conv | Dense | Add):
            _check_recomputable(layer)
            modes.add(layer.requant.mode)
        if isinstance(layer, Conv | Dense):
            entry.append(list(np.shape(layer.w)))
        for pack, name in _fields(layer):
            packs[pack].append(np.asarray(getattr(layer, name)).reshape(-1))
        layers.append(entry)
    if len(modes) > 1:
        raise ValueError(f"save needs one requantization mode for all layers, got {sorted(modes)}")
    meta = {
        "version": _VERSION,
        "mode": modes.pop() if modes else "double",
        "input_shape": program.input_shape,
        "input_clamp": program.input_clamp,
        "rounding": program.rounding,
        "layers": layers,
    }
    if program.inputs is not None:
        meta["inputs"] = program.inputs
    tensors = {k: np.concatenate(v).astype(_PACKS[k]) for k, v in packs.items() if v}
    return write_tensors(path, tensors, {_META_KEY: json.dumps(meta, separators=(",", ":"))})


class _Reader:
    """Consumes the packed tensors in file order."""

    def __init__(self, path, tensors: Mapping[str, np.ndarray]):
        self.path, self.tensors = path, tensors
        self.offsets = dict.fromkeys(_PACKS, 0)

    def take(self, pack: str, shape: tuple[int, ...]) -> np.ndarray:
        a = self.tensors.get(pack)
        if a is None or a.dtype != _PACKS[pack] or a.ndim != 1:
            raise ValueError(f"{self.path}: missing or malformed packed tensor {pack!r}")
        begin = self.offsets[pack]
        end = begin + int(np.prod(shape))
        if end > a.size:
            raise ValueError(f"{self.path}: packed tensor {pack!r} is too short")
        self.offsets[pack] = end
        return a[begin:end].reshape(shape)

    def check_done(self) -> None:
        for pack, used in self.offsets.items():
            size = self.tensors[pack].size if pack in self.tensors else 0
            if used != size:
                raise ValueError(f"{self.path}: packed tensor {pack!r} has {size - used} extra")


def _fields(layer) -> tuple[tuple[str, str], ...]:
    """The packed fields of a layer spec, in file order."""
    if isinstance(layer, Conv | Dense) or layer in (Conv, Dense):
        return _LINEAR_FIELDS
    return _ADD_FIELDS if isinstance(layer, Add) or layer is Add else ()


def _read_requantized(cls, reader: _Reader, w_shape, mode: str, kwargs: dict):
    """A Conv / Dense / Add spec from the packed tensors, its constants recomputed."""
    shapes = {}
    if w_shape is not None:
        channels = w_shape[-1]
        shapes = {"w": tuple(w_shape), "b": (channels,), "w_scale": (channels,)}
    for pack, name in _fields(cls):
        a = reader.take(pack, shapes.get(name, (1,)))
        kwargs[name] = a if name in shapes else a.reshape(())
    kwargs["requant"] = None
    try:
        kwargs["requant"] = _requant_again(cls(**kwargs), mode)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{reader.path}: layer {kwargs['path']!r}: {e}") from None
    return cls(**kwargs)


def load(path: str | os.PathLike) -> Program:
    """Reads a program written by :func:`save`, recomputes its requantization constants from
    the stored scales, and validates it (:func:`validate`).

    Raises:
      ValueError: not a jquant program file, an unknown version or layer type, missing or
        malformed tensors, or a program that fails validation.
    """
    tensors, metadata = read_tensors(path)
    if _META_KEY not in metadata:
        raise ValueError(f"{path}: no {_META_KEY!r} metadata: not a saved jquant program")
    try:
        meta = json.loads(metadata[_META_KEY])
    except ValueError as e:
        raise ValueError(f"{path}: {_META_KEY!r} metadata is not JSON ({e})") from None
    if meta.get("version") not in _READS:
        raise ValueError(f"{path}: program version {meta.get('version')}, expected one of {_READS}")
    reader = _Reader(path, tensors)
    top = {name: reader.take(pack, (1,)).reshape(()) for pack, name in _PROGRAM_FIELDS}
    layers = []
    for entry in meta["layers"]:
        kind, layer_path, static = entry[0], entry[1], entry[2]
        cls = SPECS.get(kind)
        if cls is None:
            raise ValueError(f"{path}: unknown layer type {kind!r}")
        kwargs = {"path": layer_path, **{k: _tuples(v) for k, v in static.items()}}
        if cls in (Conv, Dense, Add):
            w_shape = entry[3] if cls in (Conv, Dense) else None
            layers.append(_read_requantized(cls, reader, w_shape, meta["mode"], kwargs))
        else:
            layers.append(cls(**kwargs))
    reader.check_done()
    program = Program(
        layers=tuple(layers),
        **top,
        input_shape=_tuples(meta["input_shape"]),
        input_clamp=_tuples(meta["input_clamp"]),
        rounding=meta["rounding"],
        inputs=_tuples(meta["inputs"]) if "inputs" in meta else None,
    )
    return validate(program)
