"""Saving and loading integer programs in the safetensors layout (no pickle, no code).

File layout (the safetensors format, written and read with NumPy only)::

    u64 little-endian n | n bytes of JSON header | raw little-endian tensor bytes

A program is stored compactly, as three packed tensors and its static structure:

- ``i8``: every layer's int8 weights, flattened and concatenated (int8 stays int8);
- ``i32``: the program's input / output zero points, then per linear layer its int32 bias,
  ``x_zp`` and ``out_zp``, per add ``a_zp``, ``b_zp`` and ``out_zp``, per mean ``x_zp`` and
  ``out_zp``, per concat ``zp``;
- ``f32``: the program's input / output scales, then per linear layer ``x_scale``,
  ``w_scale`` (per channel) and ``out_scale``, per add ``a_scale``, ``b_scale``, ``out_scale``,
  per mean ``x_scale`` and ``out_scale``, per concat ``scale``;
- ``"__metadata__": {"jquant_program": <JSON>}``: layer kinds, paths, weight shapes, the
  geometry fields that differ from their defaults, the requantization mode and, for a
  program that is not a plain sequence, ``inputs`` (the values each layer reads).

The requantization constants are not stored: :func:`load` recomputes them host-side from the
stored float32 scales with :func:`jquant.integer.requant_from_scales` /
:func:`jquant.integer.add_requant` (``quantize_multiplier`` in float64 for ``double`` /
``single``), exactly as :func:`jquant.convert.convert` computed them, so a loaded program runs
bit for bit like the saved one. :func:`save` checks this and refuses a program whose
constants do not follow from its scales.

Version 4 adds ``"__metadata__": {"jquant_sha256": <hex>}``: the sha256 of the header's
canonical JSON (keys sorted, no spaces, this field left out) followed by the data section, so
a flipped or missing byte anywhere is caught at load. Version 5 adds the ``mean`` and
``concat`` layers (the mean's constants recomputed by
:func:`jquant.integer.mean_requant`). Version 5 reads version 4, version 3 (residual adds,
``inputs``, no checksum) and version 2 files (sequences without adds) as well; a checksum
present in any version is verified.

Every malformed file (a truncated or flipped one, a header that is not a JSON object, entries
of the wrong type, missing keys, nesting too deep) raises ValueError naming the file and
what is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import struct
from collections.abc import Mapping

import jax
import numpy as np

from jquant import integer
from jquant.convert.program import (
    SPECS,
    Add,
    Concat,
    Conv,
    Dense,
    Mean,
    Program,
    spec_name,
    validate,
)
from jquant.convert.targets import requant_for

__all__ = ["save", "load", "write_tensors", "read_tensors"]

_DTYPES = {"I8": np.int8, "U8": np.uint8, "I32": np.int32, "F32": np.float32, "F64": np.float64}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_META_KEY = "jquant_program"
_SUM_KEY = "jquant_sha256"
_VERSION = 5  # written for programs with a Mean or Concat; the others are written as version 4
_READS = (2, 3, 4, 5)
_CHECKSUM_FROM = 4  # first version whose files must carry a checksum
_ENTRY_KEYS = ("shape", "data_offsets")
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
_MEAN_FIELDS = (
    ("i32", "x_zp"),
    ("i32", "out_zp"),
    ("f32", "x_scale"),
    ("f32", "out_scale"),
)
_CONCAT_FIELDS = (("i32", "zp"), ("f32", "scale"))
_REQUANTIZED = (Conv, Dense, Add, Mean)
_PROGRAM_FIELDS = (
    ("i32", "input_zp"),
    ("i32", "output_zp"),
    ("f32", "input_scale"),
    ("f32", "output_scale"),
)


def _layout(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> tuple[dict, bytes]:
    """The safetensors header (a dict) and data section of ``tensors`` and ``metadata``."""
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
    return header, b"".join(blobs)


def write_tensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> int:
    """Writes ``tensors`` (int8, uint8, int32, float32, float64) and string ``metadata`` in the
    safetensors layout. Returns the file size in bytes."""
    header, body = _layout(tensors, metadata)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + body
    with open(path, "wb") as f:
        f.write(data)
    return len(data)


def _digest(header: Mapping, body: bytes) -> str:
    """sha256 hex of the header's canonical JSON (without :data:`_SUM_KEY`) and ``body``."""
    header = dict(header)
    if isinstance(header.get("__metadata__"), dict):
        header["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k != _SUM_KEY}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(text + body).hexdigest()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_entry(path, name: str, entry, size: int) -> None:
    """A tensor entry ``{"dtype", "shape", "data_offsets"}`` whose bytes lie within the
    ``size`` data bytes and hold exactly ``shape``; ValueError otherwise."""
    dtype = entry.get("dtype") if isinstance(entry, dict) else None
    shape, offsets = (entry.get(k) if isinstance(entry, dict) else None for k in _ENTRY_KEYS)
    if not (
        isinstance(dtype, str)
        and dtype in _DTYPES
        and isinstance(shape, list)
        and all(_is_int(d) and d >= 0 for d in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(_is_int(o) for o in offsets)
        and 0 <= offsets[0] <= offsets[1] <= size
    ):
        raise ValueError(
            f"{path}: bad entry for tensor {name!r} (needs dtype in {sorted(_DTYPES)}, "
            f"shape and data_offsets within the {size} data bytes): {entry!r:.200}"
        )
    if offsets[1] - offsets[0] != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:
        raise ValueError(f"{path}: tensor {name!r}: bytes {offsets} do not hold shape {shape}")


def _read_raw(path: str | os.PathLike) -> tuple[dict, bytes]:
    """``(header, data section)`` of a safetensors file, the header checked to be a JSON
    object of well-formed entries; ValueError naming the file otherwise."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > len(data):
        raise ValueError(f"{path}: header length {n} exceeds the file size {len(data)}")
    try:
        header = json.loads(data[8 : 8 + n])
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"{path}: header is not JSON ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header must be a JSON object, got {type(header).__name__}")
    body = data[8 + n :]
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError(f"{path}: __metadata__ must map names to strings")
    for name, entry in header.items():
        if name != "__metadata__":
            _check_entry(path, name, entry, len(body))
    return header, body


def _tensors(header: Mapping, body: bytes) -> dict[str, np.ndarray]:
    tensors = {}
    for name, entry in header.items():
        if name != "__metadata__":
            dtype = _DTYPES[entry["dtype"]]
            begin, end = entry["data_offsets"]
            a = np.frombuffer(body[begin:end], np.dtype(dtype).newbyteorder("<"))
            tensors[name] = a.astype(dtype).reshape(entry["shape"])
    return tensors


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; ValueError on a malformed file."""
    header, body = _read_raw(path)
    return _tensors(header, body), dict(header.get("__metadata__", {}))


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


def _check_recomputable(layer: Conv | Dense | Add | Mean) -> None:
    rq = layer.requant
    again = requant_for(layer, rq.mode)
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
        if isinstance(layer, _REQUANTIZED):
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
        "version": _VERSION if any(isinstance(L, Mean | Concat) for L in program.layers) else 4,
        "mode": modes.pop() if modes else "double",
        "input_shape": program.input_shape,
        "input_clamp": program.input_clamp,
        "rounding": program.rounding,
        "layers": layers,
    }
    if program.inputs is not None:
        meta["inputs"] = program.inputs
    tensors = {k: np.concatenate(v).astype(_PACKS[k]) for k, v in packs.items() if v}
    metadata = {_META_KEY: json.dumps(meta, separators=(",", ":"))}
    metadata[_SUM_KEY] = _digest(*_layout(tensors, metadata))
    return write_tensors(path, tensors, metadata)


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
        end = begin + math.prod(shape)
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
    cls = layer if isinstance(layer, type) else type(layer)
    packed = {Conv: _LINEAR_FIELDS, Dense: _LINEAR_FIELDS, Add: _ADD_FIELDS,
              Mean: _MEAN_FIELDS, Concat: _CONCAT_FIELDS}  # fmt: skip
    return packed.get(cls, ())


def _read_requantized(cls, reader: _Reader, w_shape, mode: str, kwargs: dict):
    """A Conv / Dense / Add spec from the packed tensors, its constants recomputed."""
    shapes = {}
    if w_shape is not None:
        rank = 4 if cls is Conv else 2
        if not (
            isinstance(w_shape, list)
            and len(w_shape) == rank
            and all(_is_int(d) and d >= 1 for d in w_shape)
        ):
            raise ValueError(
                f"{reader.path}: layer {kwargs['path']!r}: weight shape must be {rank} "
                f"positive integers, got {w_shape!r:.200}"
            )
        channels = w_shape[-1]
        shapes = {"w": tuple(w_shape), "b": (channels,), "w_scale": (channels,)}
    for pack, name in _fields(cls):
        a = reader.take(pack, shapes.get(name, (1,)))
        kwargs[name] = a if name in shapes else a.reshape(())
    kwargs["requant"] = None
    try:
        kwargs["requant"] = requant_for(cls(**kwargs), mode)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{reader.path}: layer {kwargs['path']!r}: {e}") from None
    return cls(**kwargs)


def _meta_error(path, what: str, value) -> ValueError:
    return ValueError(f"{path}: program metadata: {what}, got {value!r:.200}")


def _parse_meta(path, header: Mapping, body: bytes) -> dict:
    """The program metadata of a file, its checksum verified and its structure checked."""
    metadata = header.get("__metadata__", {})
    if _META_KEY not in metadata:
        raise ValueError(f"{path}: no {_META_KEY!r} metadata: not a saved jquant program")
    try:
        meta = json.loads(metadata[_META_KEY])
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{path}: {_META_KEY!r} metadata is not JSON ({e})") from None
    if not isinstance(meta, dict):
        raise _meta_error(path, "must be a JSON object", meta)
    version = meta.get("version")
    if not _is_int(version) or version not in _READS:
        raise ValueError(f"{path}: program version {version!r:.50}, expected one of {_READS}")
    if _SUM_KEY in metadata:
        if metadata[_SUM_KEY] != _digest(header, body):
            raise ValueError(
                f"{path}: sha256 checksum mismatch: the file is corrupt (flipped or missing bytes)"
            )
    elif version >= _CHECKSUM_FROM:
        raise ValueError(f"{path}: version {version} file without its {_SUM_KEY!r} checksum")
    required = {
        "mode": lambda v: v in integer.MULTIPLIER_MODES,
        "input_shape": lambda v: isinstance(v, list),
        "input_clamp": lambda v: isinstance(v, list),
        "rounding": lambda v: isinstance(v, str),
        "layers": lambda v: isinstance(v, list) and v,
    }
    for key, ok in required.items():
        if key not in meta:
            raise _meta_error(path, f"missing key {key!r}", sorted(meta))
        if not ok(meta[key]):
            raise _meta_error(path, f"bad {key!r}", meta[key])
    inputs = meta.get("inputs")
    if inputs is not None and not (
        isinstance(inputs, list) and all(isinstance(r, list) for r in inputs)
    ):
        raise _meta_error(path, "'inputs' must be a list of lists", inputs)
    return meta


def _parse_entry(path, entry) -> tuple[type, str, dict, list | None]:
    """``(spec class, path, static fields, weight shape)`` of one ``layers`` entry."""
    if not isinstance(entry, list) or len(entry) < 3:
        raise _meta_error(path, "a layer entry must be [kind, path, {fields}, ...]", entry)
    kind, layer_path, static = entry[:3]
    cls = SPECS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{path}: unknown layer type {kind!r:.50}; known: {sorted(SPECS)}")
    if not isinstance(layer_path, str):
        raise _meta_error(path, "a layer path must be a string", layer_path)
    linear = cls in (Conv, Dense)
    if len(entry) != 3 + linear:
        raise _meta_error(path, f"a {kind!r} entry has {3 + linear} items", entry)
    allowed = set(cls.meta_fields) - {"path"}
    if not isinstance(static, dict) or not set(static) <= allowed:
        raise _meta_error(
            path, f"fields of {kind!r} {layer_path!r} must be among {sorted(allowed)}", static
        )
    return cls, layer_path, static, entry[3] if linear else None


def load(path: str | os.PathLike) -> Program:
    """Reads a program written by :func:`save`, verifies its checksum (version 4), recomputes
    its requantization constants from the stored scales, and validates it (:func:`validate`).

    Raises:
      ValueError: not a jquant program file, a checksum mismatch (flipped or missing bytes),
        an unknown version or layer type, a malformed header, metadata or tensor, or a
        program that fails validation; always ValueError, naming the file.
    """
    header, body = _read_raw(path)
    meta = _parse_meta(path, header, body)
    reader = _Reader(path, _tensors(header, body))
    top = {name: reader.take(pack, (1,)).reshape(()) for pack, name in _PROGRAM_FIELDS}
    layers = []
    try:
        for entry in meta["layers"]:
            cls, layer_path, static, w_shape = _parse_entry(path, entry)
            kwargs = {"path": layer_path, **{k: _tuples(v) for k, v in static.items()}}
            if cls in _REQUANTIZED:
                layers.append(_read_requantized(cls, reader, w_shape, meta["mode"], kwargs))
            elif cls is Concat:
                for pack, name in _CONCAT_FIELDS:
                    kwargs[name] = reader.take(pack, (1,)).reshape(())
                layers.append(cls(**kwargs))
            else:
                layers.append(cls(**kwargs))
        reader.check_done()
        program = Program(
            layers=tuple(layers),
            **top,
            input_shape=_tuples(meta["input_shape"]),
            input_clamp=_tuples(meta["input_clamp"]),
            rounding=meta["rounding"],
            inputs=_tuples(meta["inputs"]) if meta.get("inputs") is not None else None,
        )
        return validate(program)
    except RecursionError:
        raise ValueError(f"{path}: program metadata nested too deeply") from None
    except TypeError as e:
        raise ValueError(f"{path}: {e}") from None
    except ValueError as e:
        raise ValueError(e if str(path) in str(e) else f"{path}: {e}") from None
