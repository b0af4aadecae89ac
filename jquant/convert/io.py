"""Saving and loading integer programs as safetensors files (no pickle, no code).

Files are written and read with the ``safetensors`` package (``safetensors.numpy.save`` and
``safe_open``). A program is stored compactly, as a few packed tensors and its static
structure (file format version 6):

- ``i8``: the int8 weight codes of the layers stored at 8 bits, flattened and concatenated;
- ``u8``: the weight codes of every other layer, flattened and packed by
  :func:`jquant.integer.packing.pack` in the narrowest storage that holds them
  (:func:`~jquant.integer.packing.narrowest_storage`: ``int2`` / ``uint2`` four codes per
  byte, ``int4`` / ``uint4`` two), concatenated. A layer quantized to 4 bits (codes in
  ``[-8, 7]``) thus takes half the bytes; the codes are int8 again after :func:`load`
  (bit-exact round trip);
- ``i32``: the program's input / output zero points, then per linear layer its int32 bias,
  ``x_zp`` and ``out_zp``, per add ``a_zp``, ``b_zp`` and ``out_zp``, per mean ``x_zp`` and
  ``out_zp``, per concat ``zp``;
- ``f32``: the program's input / output scales, then per linear layer ``x_scale``,
  ``w_scale`` (per channel) and ``out_scale``, per add ``a_scale``, ``b_scale``, ``out_scale``,
  per mean ``x_scale`` and ``out_scale``, per concat ``scale``;
- ``"__metadata__": {"jquant_program": <JSON>}``: the input shape, clamp and rounding, for a
  program that is not a plain sequence ``inputs`` (the values each layer reads), and per layer
  ``[kind, path, {static fields that differ from their defaults}, {stored}]``, ``stored``
  holding the layer's requantization ``mode`` (Conv / Dense / Add / Mean: each layer its own,
  so a program retargeted to a runtime, :func:`jquant.convert.retarget`, round-trips) and, for
  Conv / Dense, ``w_shape`` and ``w_storage`` (``"int8"`` or a packed storage name).
- ``"__metadata__": {"jquant_sha256": <hex>}``: sha256 of the canonical JSON
  ``{"metadata": <the other metadata>, "tensors": {name: [dtype, shape]}}`` (keys sorted, no
  spaces) followed by each tensor's little-endian bytes in name order, so a flipped or
  missing byte anywhere is caught at load, whatever the byte layout the package chose.

The requantization constants are not stored: :func:`load` recomputes them host-side from the
stored float32 scales in each layer's mode (:func:`jquant.convert.requant_for`:
``quantize_multiplier`` in float64 for ``double`` / ``single``), exactly as
:func:`jquant.convert.convert` computed them, so a loaded program runs bit for bit like the
saved one. :func:`save` checks this and refuses a program whose constants do not follow from
its scales.

Older files (written by hand in the same safetensors layout) still load: version 5 (``mean``
and ``concat`` layers), 4 (its sha256 over the canonical header and data section), 3
(residual adds, ``inputs``, no checksum) and 2 (sequences); they store every weight in
``i8``, one program-wide ``mode`` and the weight shape as the fourth item of a linear entry.

Every malformed file (truncated or flipped bytes, a header the package refuses, metadata of
the wrong type, missing keys, a checksum mismatch) raises ValueError naming the file and what
is wrong.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import pathlib
import secrets
import struct
from collections.abc import Mapping

import jax
import numpy as np
import safetensors.numpy
from safetensors import SafetensorError, safe_open

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
from jquant.integer.packing import STORAGES, narrowest_storage, pack, packed_length, unpack

__all__ = ["save", "load", "write_tensors", "read_tensors"]

_DTYPES = {"I8": np.int8, "U8": np.uint8, "I32": np.int32, "F32": np.float32, "F64": np.float64}
_META_KEY = "jquant_program"
_SUM_KEY = "jquant_sha256"
_VERSION = 6
_READS = (2, 3, 4, 5, 6)
_CHECKSUM_FROM = 4  # first version whose files must carry a checksum
_INT8_STORAGE = "int8"
# packed tensors: name -> dtype
_PACKS = {"i8": np.int8, "u8": np.uint8, "i32": np.int32, "f32": np.float32}
# per layer kind, in file order after the weights: (pack, field)
_LINEAR_FIELDS = (
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
_FIELDS = {Conv: _LINEAR_FIELDS, Dense: _LINEAR_FIELDS, Add: _ADD_FIELDS, Mean: _MEAN_FIELDS,
           Concat: _CONCAT_FIELDS}  # fmt: skip
_REQUANTIZED = (Conv, Dense, Add, Mean)
_PROGRAM_FIELDS = (
    ("i32", "input_zp"),
    ("i32", "output_zp"),
    ("f32", "input_scale"),
    ("f32", "output_scale"),
)


def write_tensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
) -> int:
    """Writes ``tensors`` (int8, uint8, int32, float32, float64) and string ``metadata`` as a
    safetensors file (``safetensors.numpy.save``), written to a temporary file beside ``path``
    and then renamed, so nothing is half-written. Returns the file size in bytes.

    Raises:
      TypeError: a tensor of another dtype, or metadata that is not ``str -> str``.
    """
    arrays = {}
    for name, a in tensors.items():
        a = np.asarray(a)
        if a.dtype not in map(np.dtype, _DTYPES.values()):
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} not in {sorted(_DTYPES)}")
        arrays[name] = np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False))
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str")
    data = safetensors.numpy.save(arrays, metadata=dict(metadata) or None)
    path = pathlib.Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:  # a new file, with the umask's permissions
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(data)


def read_tensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file (``safetensors.safe_open``).

    Raises:
      ValueError: a file the package refuses (truncated, a malformed header, ...) or a tensor
        of a dtype other than int8, uint8, int32, float32, float64; the message names the file.
    """
    try:
        with safe_open(path, framework="numpy") as f:
            metadata = dict(f.metadata() or {})
            tensors = {}
            for name in f.keys():
                dtype = f.get_slice(name).get_dtype()
                if dtype not in _DTYPES:
                    raise ValueError(
                        f"{path}: tensor {name!r} has dtype {dtype}, not in {sorted(_DTYPES)}"
                    )
                tensors[name] = np.array(f.get_tensor(name), _DTYPES[dtype])
    except SafetensorError as e:
        raise ValueError(f"{path}: not a valid safetensors file ({e})") from None
    return tensors, metadata


def _digest(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> str:
    """Version 6 checksum: sha256 of the canonical JSON of the metadata (without
    :data:`_SUM_KEY`) and of each tensor's dtype and shape, then the tensors' little-endian
    bytes in name order."""
    layout = {
        "metadata": {k: v for k, v in metadata.items() if k != _SUM_KEY},
        "tensors": {k: [a.dtype.name, list(a.shape)] for k, a in tensors.items()},
    }
    h = hashlib.sha256(json.dumps(layout, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        a = tensors[name]
        h.update(np.ascontiguousarray(a.astype(a.dtype.newbyteorder("<"), copy=False)).tobytes())
    return h.hexdigest()


def _legacy_digest(path) -> str:
    """Version 4 / 5 checksum (files whose layout jquant wrote by hand): sha256 of the raw
    header's canonical JSON (keys sorted, no spaces, :data:`_SUM_KEY` left out) followed by
    the data section. Called on a file ``safe_open`` has accepted."""
    data = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = {k: v for k, v in header["__metadata__"].items() if k != _SUM_KEY}
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(text + data[8 + n :]).hexdigest()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


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


def _store_weights(w: np.ndarray, packs: Mapping[str, list[np.ndarray]]) -> str:
    """Appends ``w``'s codes to ``i8`` or, packed in their narrowest storage, to ``u8``;
    returns the storage name."""
    codes = np.asarray(w).reshape(-1)
    storage = narrowest_storage(codes)
    if storage is None:
        packs["i8"].append(codes)
        return _INT8_STORAGE
    bits, signed = STORAGES[storage]
    packs["u8"].append(pack(codes, bits, signed=signed))
    return storage


def save(program: Program, path: str | os.PathLike) -> int:
    """Writes ``program`` to ``path`` (safetensors, version 6, see the module docstring):
    weights in the narrowest storage that holds their codes (2, 4 or 8 bits), each layer's
    requantization mode, scales and zero points, and a sha256; returns the file size in bytes.

    Raises:
      ValueError / TypeError: the program fails :func:`validate`, or a layer's requantization
        constants are not :func:`~jquant.convert.requant_for` of its scales in its mode.
    """
    validate(program)
    packs: dict[str, list[np.ndarray]] = {k: [] for k in _PACKS}
    for pack_name, name in _PROGRAM_FIELDS:
        packs[pack_name].append(np.asarray(getattr(program, name)).reshape(-1))
    layers = []
    for layer in program.layers:
        stored: dict = {}
        if isinstance(layer, _REQUANTIZED):
            _check_recomputable(layer)
            stored["mode"] = layer.requant.mode
        if isinstance(layer, Conv | Dense):
            stored["w_shape"] = list(np.shape(layer.w))
            stored["w_storage"] = _store_weights(layer.w, packs)
        for pack_name, name in _FIELDS.get(type(layer), ()):
            packs[pack_name].append(np.asarray(getattr(layer, name)).reshape(-1))
        layers.append([spec_name(layer), layer.path, _non_default_meta(layer), stored])
    meta = {
        "version": _VERSION,
        "input_shape": program.input_shape,
        "input_clamp": program.input_clamp,
        "rounding": program.rounding,
        "layers": layers,
    }
    if program.inputs is not None:
        meta["inputs"] = program.inputs
    tensors = {k: np.concatenate(v).astype(_PACKS[k]) for k, v in packs.items() if v}
    metadata = {_META_KEY: json.dumps(meta, separators=(",", ":"))}
    metadata[_SUM_KEY] = _digest(tensors, metadata)
    return write_tensors(path, tensors, metadata)


class _Reader:
    """Consumes the packed tensors in file order."""

    def __init__(self, path, tensors: Mapping[str, np.ndarray]):
        self.path, self.tensors = path, tensors
        self.offsets = dict.fromkeys(_PACKS, 0)

    def take(self, pack_name: str, shape: tuple[int, ...]) -> np.ndarray:
        a = self.tensors.get(pack_name)
        if a is None or a.dtype != _PACKS[pack_name] or a.ndim != 1:
            raise ValueError(f"{self.path}: missing or malformed packed tensor {pack_name!r}")
        begin = self.offsets[pack_name]
        end = begin + math.prod(shape)
        if end > a.size:
            raise ValueError(f"{self.path}: packed tensor {pack_name!r} is too short")
        self.offsets[pack_name] = end
        return a[begin:end].reshape(shape)

    def check_done(self) -> None:
        extra = sorted(set(self.tensors) - set(_PACKS))
        if extra:
            raise ValueError(f"{self.path}: unexpected tensors {extra}")
        for pack_name, used in self.offsets.items():
            size = self.tensors[pack_name].size if pack_name in self.tensors else 0
            if used != size:
                raise ValueError(
                    f"{self.path}: packed tensor {pack_name!r} has {size - used} extra"
                )


def _read_weights(reader: _Reader, w_shape: tuple[int, ...], storage: str) -> np.ndarray:
    """A layer's int8 weight codes of shape ``w_shape``, unpacked from ``storage``."""
    if storage == _INT8_STORAGE:
        return reader.take("i8", w_shape)
    bits, signed = STORAGES[storage]
    n = math.prod(w_shape)
    raw = reader.take("u8", (packed_length(n, bits),))
    return unpack(raw, bits, n, signed=signed).reshape(w_shape)


def _read_requantized(cls, reader: _Reader, stored: dict, kwargs: dict):
    """A Conv / Dense / Add / Mean spec from the packed tensors, its constants recomputed in
    the layer's mode."""
    shapes = {}
    if cls in (Conv, Dense):
        kwargs["w"] = _read_weights(reader, stored["w_shape"], stored["w_storage"])
        shapes = {"b": stored["w_shape"][-1:], "w_scale": stored["w_shape"][-1:]}
    for pack_name, name in _FIELDS[cls]:
        a = reader.take(pack_name, shapes.get(name, (1,)))
        kwargs[name] = a if name in shapes else a.reshape(())
    kwargs["requant"] = None
    try:
        kwargs["requant"] = requant_for(cls(**kwargs), stored["mode"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{reader.path}: layer {kwargs['path']!r}: {e}") from None
    return cls(**kwargs)


def _meta_error(path, what: str, value) -> ValueError:
    return ValueError(f"{path}: program metadata: {what}, got {value!r:.200}")


def _parse_meta(path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> dict:
    """The program metadata of a file, its checksum verified and its structure checked."""
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
        digest = _digest(tensors, metadata) if version >= 6 else _legacy_digest(path)
        if metadata[_SUM_KEY] != digest:
            raise ValueError(
                f"{path}: sha256 checksum mismatch: the file is corrupt (flipped or missing bytes)"
            )
    elif version >= _CHECKSUM_FROM:
        raise ValueError(f"{path}: version {version} file without its {_SUM_KEY!r} checksum")
    required = {
        "input_shape": lambda v: isinstance(v, list),
        "input_clamp": lambda v: isinstance(v, list),
        "rounding": lambda v: isinstance(v, str),
        "layers": lambda v: isinstance(v, list) and v,
    }
    if version < 6:  # one program-wide requantization mode
        required["mode"] = lambda v: v in integer.MULTIPLIER_MODES
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


def _check_stored(path, cls, kind: str, layer_path: str, stored) -> dict:
    """A version 6 entry's ``stored`` dict: ``mode`` for a requantized layer, ``w_shape`` and
    ``w_storage`` for Conv / Dense, nothing else."""
    keys = {"mode"} if cls in _REQUANTIZED else set()
    keys |= {"w_shape", "w_storage"} if cls in (Conv, Dense) else set()
    where = f"stored fields of {kind!r} {layer_path!r}"
    if not isinstance(stored, dict) or set(stored) != keys:
        raise _meta_error(path, f"{where} must be exactly {sorted(keys)}", stored)
    if "mode" in keys and stored["mode"] not in integer.MULTIPLIER_MODES:
        raise _meta_error(path, f"{where}: mode must be in {integer.MULTIPLIER_MODES}", stored)
    storages = (_INT8_STORAGE, *STORAGES)
    if "w_storage" in keys and stored["w_storage"] not in storages:
        raise _meta_error(path, f"{where}: w_storage must be in {storages}", stored)
    return stored


def _check_w_shape(path, cls, layer_path: str, w_shape) -> tuple[int, ...]:
    rank = 4 if cls is Conv else 2
    if not (
        isinstance(w_shape, list)
        and len(w_shape) == rank
        and all(_is_int(d) and d >= 1 for d in w_shape)
    ):
        raise ValueError(
            f"{path}: layer {layer_path!r}: weight shape must be {rank} positive integers, "
            f"got {w_shape!r:.200}"
        )
    return tuple(w_shape)


def _parse_entry(path, entry, meta: Mapping) -> tuple[type, str, dict, dict]:
    """``(spec class, path, static fields, stored fields)`` of one ``layers`` entry; the
    stored fields of an old version's entry (one program-wide mode, int8 weights) are spelled
    out as version 6 has them."""
    if not isinstance(entry, list) or len(entry) < 3:
        raise _meta_error(path, "a layer entry must be [kind, path, {fields}, ...]", entry)
    kind, layer_path, static = entry[:3]
    cls = SPECS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ValueError(f"{path}: unknown layer type {kind!r:.50}; known: {sorted(SPECS)}")
    if not isinstance(layer_path, str):
        raise _meta_error(path, "a layer path must be a string", layer_path)
    linear = cls in (Conv, Dense)
    items = 4 if meta["version"] >= 6 else 3 + linear
    if len(entry) != items:
        raise _meta_error(path, f"a {kind!r} entry has {items} items", entry)
    allowed = set(cls.meta_fields) - {"path"}
    if not isinstance(static, dict) or not set(static) <= allowed:
        raise _meta_error(
            path, f"fields of {kind!r} {layer_path!r} must be among {sorted(allowed)}", static
        )
    if meta["version"] >= 6:
        stored = dict(_check_stored(path, cls, kind, layer_path, entry[3]))
    else:
        stored = {"mode": meta["mode"]} if cls in _REQUANTIZED else {}
        if linear:
            stored |= {"w_shape": entry[3], "w_storage": _INT8_STORAGE}
    if linear:
        stored["w_shape"] = _check_w_shape(path, cls, layer_path, stored["w_shape"])
    return cls, layer_path, static, stored


def load(path: str | os.PathLike) -> Program:
    """Reads a program written by :func:`save` (any version in ``(2, ..., 6)``), verifies its
    checksum, unpacks its low-bit weights to int8 codes, recomputes its requantization
    constants from the stored scales in each layer's mode, and validates it (:func:`validate`).

    Raises:
      ValueError: not a safetensors file or not a jquant program, a checksum mismatch (flipped
        or missing bytes), an unknown version or layer type, malformed metadata or tensors, or
        a program that fails validation; always ValueError, naming the file.
    """
    tensors, metadata = read_tensors(path)
    meta = _parse_meta(path, tensors, metadata)
    reader = _Reader(path, tensors)
    top = {name: reader.take(pack_name, (1,)).reshape(()) for pack_name, name in _PROGRAM_FIELDS}
    layers = []
    try:
        for entry in meta["layers"]:
            cls, layer_path, static, stored = _parse_entry(path, entry, meta)
            kwargs = {"path": layer_path, **{k: _tuples(v) for k, v in static.items()}}
            if cls in _REQUANTIZED:
                layers.append(_read_requantized(cls, reader, stored, kwargs))
                continue
            for pack_name, name in _FIELDS.get(cls, ()):
                kwargs[name] = reader.take(pack_name, (1,)).reshape(())
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
