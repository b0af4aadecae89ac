"""Packed low-bit storage: 4-bit codes two per byte, 2-bit codes four per byte.

Layout (ONNX's INT4 / UINT4 packing, extended to 2 bits): along the last axis, element ``i``
goes to byte ``i // k`` at bits ``(i % k) * bits`` (``k = 8 // bits``), the first element in the
lowest bits; a last axis whose length ``k`` does not divide is padded with zero codes, and
:func:`unpack` takes the length back. Signed codes are stored in two's complement.

:data:`STORAGES` names the packed storages (``int2``, ``uint2``, ``int4``, ``uint4``);
:func:`narrowest_storage` picks the smallest that holds given codes (the integer program file
stores each layer's int8 weight codes so: :mod:`jquant.convert.io`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "PACKABLE_BITS",
    "STORAGES",
    "code_range",
    "narrowest_storage",
    "pack",
    "packed_length",
    "unpack",
]

PACKABLE_BITS = (2, 4)
# name -> (bits, signed), narrowest first (signed before unsigned at each width)
STORAGES: dict[str, tuple[int, bool]] = {
    "int2": (2, True),
    "uint2": (2, False),
    "int4": (4, True),
    "uint4": (4, False),
}


def _check(bits: int, signed: bool) -> tuple[int, int, int]:
    if bits not in PACKABLE_BITS:
        raise ValueError(f"bits must be one of {PACKABLE_BITS}, got {bits!r}")
    return (8 // bits, *code_range(bits, signed))


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """``(lo, hi)`` of ``bits``-bit codes: ``[-2^(b-1), 2^(b-1) - 1]`` signed, ``[0, 2^b - 1]``
    unsigned."""
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def narrowest_storage(codes: np.ndarray) -> str | None:
    """The first of :data:`STORAGES` (narrowest first) whose range holds every code, or None
    when none does (the codes need 8 bits or more)::

        min(codes) >= lo(bits, signed)  and  max(codes) <= hi(bits, signed)

    >>> narrowest_storage(np.array([-8, 3, 7])), narrowest_storage(np.array([0, 15]))
    ('int4', 'uint4')

    Raises:
      TypeError: ``codes`` is not an integer array.
    """
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"codes must be an integer array, got {codes.dtype}")
    lo, hi = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
    for name, (bits, signed) in STORAGES.items():
        qmin, qmax = code_range(bits, signed)
        if qmin <= lo and hi <= qmax:
            return name
    return None


def packed_length(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take: ``ceil(n / (8 // bits))``."""
    k, _, _ = _check(bits, True)
    return -(-n // k)


def pack(codes: np.ndarray, bits: int, *, signed: bool = True) -> np.ndarray:
    """``codes`` (integers in the ``bits``-bit range) packed along the last axis into uint8.

    Raises:
      ValueError: ``bits`` not 2 or 4, or a code outside ``[-2^(b-1), 2^(b-1) - 1]``
        (signed) / ``[0, 2^b - 1]`` (unsigned).
      TypeError: ``codes`` is not an integer array.
    """
    k, lo, hi = _check(bits, signed)
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise TypeError(f"codes must be an integer array, got {codes.dtype}")
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(
            f"codes must lie in [{lo}, {hi}] for {'signed' if signed else 'unsigned'} "
            f"{bits}-bit storage, got [{codes.min()}, {codes.max()}]"
        )
    n = codes.shape[-1]
    pad = (-n) % k
    u = (codes.astype(np.int64) & ((1 << bits) - 1)).astype(np.uint8)
    u = np.pad(u, [(0, 0)] * (u.ndim - 1) + [(0, pad)])
    u = u.reshape(*u.shape[:-1], -1, k)
    shifts = (np.arange(k) * bits).astype(np.uint8)
    return np.bitwise_or.reduce(u << shifts, axis=-1).astype(np.uint8)


def unpack(packed: np.ndarray, bits: int, n: int, *, signed: bool = True) -> np.ndarray:
    """The ``n`` codes per row of :func:`pack`'s output, as int8 (bit-exact round trip).

    Raises:
      ValueError: ``bits`` not 2 or 4, or ``n`` not what the packed length holds.
      TypeError: ``packed`` is not uint8.
    """
    k, _, _ = _check(bits, signed)
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise TypeError(f"packed must be a uint8 array, got {packed.dtype}")
    if packed.shape[-1] != packed_length(n, bits):
        raise ValueError(
            f"n={n} codes of {bits} bits take {packed_length(n, bits)} bytes, but the last "
            f"axis holds {packed.shape[-1]}"
        )
    shifts = (np.arange(k) * bits).astype(np.uint8)
    u = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    u = u.reshape(*packed.shape[:-1], -1)[..., :n].astype(np.int8)
    if signed:  # two's complement: codes >= 2^(b-1) are negative
        u = np.where(u >= (1 << (bits - 1)), u - (1 << bits), u).astype(np.int8)
    return u
