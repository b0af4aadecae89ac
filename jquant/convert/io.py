"""Saving and loading integer programs in the safetensors layout (no pickle, no code).

File layout (the safetensors format, written and read with NumPy only)::

    u64 little-endian n | n bytes of JSON header | raw little-endian tensor bytes

The header maps each tensor name to ``{"dtype", "shape", "data_offsets"}`` and carries
``"__metadata__": {"jquant_program": <JSON>}``, the program's static structure (layer kinds,
paths, geometry, requantization mode). int8 weights are stored as int8.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import numpy as np

from jquant import integer
from jquant.convert.program import SPECS, Program, spec_name, validate

__all__ = ["save", "load", "write_tensors", "read_tensors"]

_DTYPES = {"I8": np.int8, "U8": np.uint8, "I32": np.int32, "F32": np.float32, "F64": np.float64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_META_KEY = "jquant_program"
_VERSION = 1


def write_tensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> int:
    """Writes ``tensors`` (int8, uint8, int32, float32, float64) and string ``metadata`` in the
    safetensors layout. Returns the file size in bytes."""
    header: dict = {"__metadata__": dict(metadata)}
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


def save(program: Program, path: str | os.PathLike) -> int:
    """Writes ``program`` to ``path`` (safetensors layout); returns the file size in bytes."""
    validate(program)
    tensors = {}
    for name in ("input_scale", "input_zp", "output_scale", "output_zp"):
        tensors[name] = np.asarray(getattr(program, name))
    layers = []
    for i, layer in enumerate(program.layers):
        entry = {"type": spec_name(layer)}
        entry.update({f: getattr(layer, f) for f in layer.meta_fields})
        for f in layer.data_fields:
            value = getattr(layer, f)
            if isinstance(value, integer.Requant):
                entry["requant_mode"] = value.mode
                tensors[f"layers.{i}.{f}.multiplier"] = np.asarray(value.multiplier)
                tensors[f"layers.{i}.{f}.shift"] = np.asarray(value.shift)
            else:
                tensors[f"layers.{i}.{f}"] = np.asarray(value)
        layers.append(entry)
    meta = {
        "version": _VERSION,
        "input_shape": program.input_shape,
        "input_clamp": program.input_clamp,
        "rounding": program.rounding,
        "layers": layers,
    }
    return write_tensors(path, tensors, {_META_KEY: json.dumps(meta)})


def load(path: str | os.PathLike) -> Program:
    """Reads a program written by :func:`save` and validates it (:func:`validate`).

    Raises:
      ValueError: not a jquant program file, an unknown version or layer type, missing
        tensors, or a program that fails validation.
    """
    tensors, metadata = read_tensors(path)
    if _META_KEY not in metadata:
        raise ValueError(f"{path}: no {_META_KEY!r} metadata: not a saved jquant program")
    meta = json.loads(metadata[_META_KEY])
    if meta.get("version") != _VERSION:
        raise ValueError(f"{path}: program version {meta.get('version')}, expected {_VERSION}")

    def tensor(name):
        if name not in tensors:
            raise ValueError(f"{path}: missing tensor {name!r}")
        return tensors[name]

    layers = []
    for i, entry in enumerate(meta["layers"]):
        cls = SPECS.get(entry.get("type"))
        if cls is None:
            raise ValueError(f"{path}: unknown layer type {entry.get('type')!r}")
        kwargs = {f: _tuples(entry[f]) for f in cls.meta_fields}
        for f in cls.data_fields:
            if f == "requant":
                kwargs[f] = integer.Requant(
                    tensor(f"layers.{i}.{f}.multiplier"),
                    tensor(f"layers.{i}.{f}.shift"),
                    entry["requant_mode"],
                )
            else:
                kwargs[f] = tensor(f"layers.{i}.{f}")
        layers.append(cls(**kwargs))
    program = Program(
        layers=tuple(layers),
        **{n: tensor(n) for n in ("input_scale", "input_zp", "output_scale", "output_zp")},
        input_shape=_tuples(meta["input_shape"]),
        input_clamp=_tuples(meta["input_clamp"]),
        rounding=meta["rounding"],
    )
    return validate(program)
