"""Block formats: OCP Microscaling (MX v1.0), NVIDIA's NVFP4 and QLoRA's NF4.

A block format splits ``x`` along ``axis`` into blocks of ``block_size`` consecutive
elements; each block shares one scale and each element is stored in a narrow format.

**MX** (OCP Microscaling Formats Specification v1.0, section 6.3): blocks of 32, the shared
scale a power of two stored as E8M0::

    X = 2^(floor(log2(amax)) - emax_elem)     (exponent clipped to [-127, 127])
    P_i = cast(x_i / X)                       (round to nearest even, saturate at +-max)

with ``emax_elem`` the exponent of the element format's largest normal: 8 (FP8 E4M3), 15
(E5M2), 4 (FP6 E3M2), 2 (FP6 E2M3), 2 (FP4 E2M1), 0 (MXINT8, whose int8 elements carry an
implicit 2^-6: ``P_i = clip(round(64 x_i / X), -127, 127)``). A block of zeros gets the smallest
scale 2^-127 and zero elements. A block holding NaN or +-Inf gets the NaN scale (E8M0 0xFF)
and decodes to NaN: the spec leaves such blocks to the implementation; we never return a
finite number for them.

**NVFP4** (NVIDIA Blackwell): blocks of 16 E2M1 elements, an E4M3 scale per block and a float32
scale per tensor::

    t = amax(x) / (448 * 6),   s_b = e4m3(amax_b / (6 t)),   P_i = e2m1(x_i / (s_b t))

**NF4** (Dettmers et al. 2023, QLoRA): blocks of 64, an absmax scale per block (float32) and
4-bit indices into the 16 NormalFloat levels (quantiles of N(0, 1), normalised to [-1, 1],
with an exact 0); each element goes to its nearest level.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

__all__ = [
    "BlockFormat",
    "Blocks",
    "NVScales",
    "FORMATS",
    "ROUNDINGS",
    "NF4_LEVELS",
    "get_block_format",
    "quantize",
    "dequantize",
    "fake_quant",
    "round_to_minifloat",
]

# QLoRA's NF4 levels (bitsandbytes ``create_normal_map(0.9677083)``); tests/test_mx.py
# rebuilds them from the normal quantiles.
NF4_LEVELS = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    np.float32,
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A block format: its element format, block size and scale rule.

    Attributes:
      name: the format's name (``"mxfp4"``, ...).
      kind: ``"mx"`` (power-of-two E8M0 scale), ``"nvfp4"`` (E4M3 block scale and float32
        tensor scale) or ``"nf4"`` (absmax scale, NormalFloat levels).
      element: the ``ml_dtypes`` element dtype (``int8`` for MXINT8, ``uint8`` NF4 indices).
      exponent_bits, mantissa_bits: of a minifloat element (0 for integer elements).
      emax: exponent of the element's largest normal (``emax_elem``).
      max: the element's largest value (after the implicit scale of MXINT8).
      block_size: elements per scale.
    """

    name: str
    kind: str
    element: type
    exponent_bits: int
    mantissa_bits: int
    emax: int
    max: float
    block_size: int


def _mx(name, dtype, e, m, emax, block=32) -> BlockFormat:
    top = float(ml_dtypes.finfo(dtype).max) if dtype is not np.int8 else 127 / 64
    return BlockFormat(name, "mx", dtype, e, m, emax, top, block)


FORMATS: dict[str, BlockFormat] = {
    f.name: f
    for f in (
        _mx("mxfp8_e4m3", ml_dtypes.float8_e4m3fn, 4, 3, 8),
        _mx("mxfp8_e5m2", ml_dtypes.float8_e5m2, 5, 2, 15),
        _mx("mxfp6_e3m2", ml_dtypes.float6_e3m2fn, 3, 2, 4),
        _mx("mxfp6_e2m3", ml_dtypes.float6_e2m3fn, 2, 3, 2),
        _mx("mxfp4", ml_dtypes.float4_e2m1fn, 2, 1, 2),
        _mx("mxint8", np.int8, 0, 0, 0),
        BlockFormat("nvfp4", "nvfp4", ml_dtypes.float4_e2m1fn, 2, 1, 2, 6.0, 16),
        BlockFormat("nf4", "nf4", np.uint8, 0, 0, 0, 1.0, 64),
    )
}


def get_block_format(fmt: str | BlockFormat) -> BlockFormat:
    """``fmt`` itself, or the named format of :data:`FORMATS`."""
    if isinstance(fmt, BlockFormat):
        return fmt
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    raise ValueError(f"fmt must be a BlockFormat or one of {sorted(FORMATS)}, got {fmt!r}")


ROUNDINGS = ("nearest_even", "stochastic")


class NVScales(NamedTuple):
    """NVFP4's two scales: E4M3 per block and float32 per tensor."""

    block: np.ndarray
    tensor: np.ndarray


class Blocks(NamedTuple):
    """``quantize``'s result: the elements (``x``'s shape, ``axis`` last) and one scale per
    block (``(..., n_blocks)``; :class:`NVScales` for NVFP4)."""

    elements: np.ndarray
    scales: np.ndarray | NVScales


def _pow2(xp, n):
    """Exact float32 ``2^n`` for integer ``n`` (XLA:CPU's ``exp2`` is not exact): NumPy's
    ``ldexp``; in JAX, the exponent field written directly (``n`` clipped to the normal
    range [-126, 127], as XLA:CPU flushes subnormals anyway)."""
    if xp is np:
        return np.ldexp(np.float32(1), np.asarray(n, np.int32)).astype(np.float32)
    n = jnp.clip(jnp.asarray(n, jnp.int32), -126, 127)
    return jax.lax.bitcast_convert_type((n + 127) << 23, jnp.float32)


def round_to_minifloat(v, exponent_bits: int, mantissa_bits: int, top: float, xp=jnp, noise=None):
    """``v`` rounded to the nearest value (ties to even) of a minifloat with the given field
    widths, bias ``2^(E-1) - 1``, subnormals, and no Inf/NaN encodings, saturated at
    ``+-top``: ``step = 2^(max(floor(log2|v|), 1 - bias) - M)``, ``rint(v / step) step``.
    ``xp``: ``jax.numpy`` (jit-able) or ``numpy`` (host; keeps float32 subnormals).

    With ``noise ~ U[0, 1)`` of ``v``'s shape, stochastic rounding instead:
    ``floor(v / step + noise) step``, one of the two grid neighbours of ``v`` with
    probabilities that make ``E[result] = v`` for ``|v| <= top`` (larger ``|v|`` saturate)."""
    bias = (1 << (exponent_bits - 1)) - 1
    v = xp.clip(v, -top, top)
    _, e = xp.frexp(v)  # |v| = f 2^e with f in [0.5, 1): floor(log2|v|) = e - 1
    step = _pow2(xp, xp.maximum(e - 1, 1 - bias) - mantissa_bits)
    return xp.clip(_round(v / step, noise, xp) * step, -top, top)


def _round(v, noise, xp):
    """Round half to even, or stochastically (``floor(v + noise)``) when noise is given."""
    return xp.round(v) if noise is None else xp.floor(v + noise)


def _blocked(x, axis: int, size: int, xp):
    """``x`` with ``axis`` moved last and split into ``(n_blocks, size)``."""
    x = xp.moveaxis(x, axis, -1)
    if x.shape[-1] % size:
        raise ValueError(
            f"x's axis {axis} has {x.shape[-1]} elements, not a multiple of the block size "
            f"{size}; pad it (e.g. jnp.pad with zeros) or choose another axis"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _encode(x, fmt: BlockFormat, axis: int, xp, noise=None):
    """``(element values as float32, scales as float32 (a pair for NVFP4))``, blocked;
    ``noise`` (``x``'s shape, U[0, 1)) rounds the elements stochastically."""
    if not xp.issubdtype(x.dtype, xp.floating):
        raise TypeError(f"x must be a float array, got {x.dtype}")
    b = _blocked(x.astype(xp.float32), axis, fmt.block_size, xp)
    if noise is not None:
        noise = _blocked(noise, axis, fmt.block_size, xp)
    amax = xp.max(xp.abs(b), axis=-1, keepdims=True)
    bad = ~xp.isfinite(amax)
    if fmt.kind == "mx":
        _, e = xp.frexp(xp.where(amax > 0, amax, 1.0))
        exp = xp.where(amax > 0, xp.clip(e - 1 - fmt.emax, -127, 127), -127)
        scale = xp.where(bad, xp.nan, _pow2(xp, exp))
        v = xp.where(bad, 0.0, b * _pow2(xp, -exp))  # b / X, exact, X never subnormal here
        if fmt.element is np.int8:
            elems = xp.clip(_round(xp.clip(v * 64, -127, 127), noise, xp), -127, 127) / 64
        else:
            elems = round_to_minifloat(v, fmt.exponent_bits, fmt.mantissa_bits, fmt.max, xp, noise)
        return xp.where(bad, xp.nan, elems), scale
    if fmt.kind == "nvfp4":
        t_amax = xp.max(xp.abs(b))
        tensor = xp.where(t_amax > 0, t_amax / xp.float32(448.0 * 6.0), 1.0).astype(xp.float32)
        block = round_to_minifloat(amax / (6.0 * tensor), 4, 3, 448.0, xp)  # E4M3 (finite)
        eff = block * tensor
        elems = round_to_minifloat(b / xp.where(eff > 0, eff, 1.0), 2, 1, 6.0, xp, noise)
        elems = xp.where(bad | ~xp.isfinite(t_amax), xp.nan, elems)  # t flows everywhere
        return elems, (xp.where(bad, xp.nan, block), tensor)
    # nf4: nearest NormalFloat level of x / absmax (midpoints between sorted levels); with
    # noise, the upper of the two neighbouring levels lo <= v < hi with probability
    # (v - lo) / (hi - lo), so that E[level] = v
    scale = xp.where(bad, xp.nan, amax)
    v = xp.where(bad, 0.0, b / xp.where(amax > 0, amax, 1.0))
    if noise is None:
        mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
        idx = xp.searchsorted(xp.asarray(mids), v, side="left")
    else:
        levels = xp.asarray(NF4_LEVELS)
        lo = xp.clip(xp.searchsorted(levels, v, side="right") - 1, 0, 14)
        frac = (v - levels[lo]) / (levels[lo + 1] - levels[lo])
        idx = lo + (noise < frac)
    return xp.where(bad, xp.nan, idx.astype(xp.float32)), scale


def _decode(elems, scales, fmt: BlockFormat, xp):
    if fmt.kind == "nvfp4":
        block, tensor = scales
        return elems * block * tensor
    if fmt.kind == "nf4":
        levels = xp.asarray(NF4_LEVELS)[xp.nan_to_num(elems).astype(xp.int32)]
        return xp.where(xp.isnan(elems), xp.nan, levels * scales)
    return elems * scales


def _unblocked(b, shape, axis: int, xp):
    moved = list(shape)
    moved.append(moved.pop(axis))
    return xp.moveaxis(b.reshape(moved), -1, axis)


def _noise(key, shape, rounding: str):
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    if rounding == "nearest_even":
        return None
    if key is None:
        raise ValueError("rounding='stochastic' needs a PRNG key: pass key=jax.random.key(...)")
    return jax.random.uniform(key, shape, jnp.float32)


def quantize(
    x, fmt: str | BlockFormat, *, axis: int = -1, rounding: str = "nearest_even", key=None
) -> Blocks:
    """Encodes ``x`` in a block format (module docstring).

    Args:
      x: float array; ``x.shape[axis]`` a multiple of the block size.
      fmt: a :class:`BlockFormat` or its name (``mxfp8_e4m3``, ``mxfp8_e5m2``, ``mxfp6_e3m2``,
        ``mxfp6_e2m3``, ``mxfp4``, ``mxint8``, ``nvfp4``, ``nf4``).
      axis: the axis the blocks run along.
      rounding: ``"nearest_even"`` (the spec) or ``"stochastic"`` (needs ``key``): each
        element goes to one of its two grid neighbours (NF4: neighbouring levels) with
        ``E[element] = x / scale``; block scales are unchanged.
      key: PRNG key for stochastic rounding.

    Returns:
      :class:`Blocks`: ``elements`` in ``x``'s shape as the element dtype (``ml_dtypes``
      ``float4_e2m1fn``, ``float6_*``, ``float8_*``; int8 for MXINT8 with its implicit 2^-6;
      uint8 NF4 indices), and ``scales`` with ``axis`` last, one per block (``float8_e8m0fnu``
      for MX, :class:`NVScales` of ``float8_e4m3fn`` and float32 for NVFP4, float32 for NF4).

    Raises:
      ValueError: an unknown format, or an axis that is not a multiple of the block size.
      TypeError: ``x`` is not a float array.
    """
    fmt = get_block_format(fmt)
    x = np.asarray(x)
    noise = _noise(key, x.shape, rounding)
    noise = None if noise is None else np.asarray(noise)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN / Inf blocks are NaN by design
        elems, scales = _encode(x, fmt, axis, np, noise)
    elems = _unblocked(elems, x.shape, axis, np)
    if fmt.element is np.int8:
        elements = np.rint(elems * 64).astype(np.int8)
    elif fmt.kind == "nf4":
        elements = elems.astype(np.uint8)
    else:
        elements = elems.astype(fmt.element)
    if fmt.kind == "nvfp4":
        block, tensor = scales
        block = block[..., 0].astype(ml_dtypes.float8_e4m3fn)
        return Blocks(elements, NVScales(block, np.float32(tensor)))
    scales = scales[..., 0]
    dtype = ml_dtypes.float8_e8m0fnu if fmt.kind == "mx" else np.float32
    return Blocks(elements, scales.astype(dtype))


def dequantize(blocks: Blocks, fmt: str | BlockFormat, *, axis: int = -1) -> np.ndarray:
    """float32 values of :func:`quantize`'s ``blocks``: ``element * scale`` per block."""
    fmt = get_block_format(fmt)
    elements, scales = blocks
    shape = elements.shape
    e = np.asarray(elements)
    if fmt.element is np.int8:
        e = e.astype(np.float32) / 64
    e = _blocked(e.astype(np.float32), axis, fmt.block_size, np)
    if fmt.kind == "nvfp4":
        sc = (np.asarray(scales.block, np.float32)[..., None], np.float32(scales.tensor))
    else:
        sc = np.asarray(scales, np.float32)[..., None]
    return _unblocked(_decode(e, sc, fmt, np), shape, axis, np)


@jax.custom_vjp
def _ste(x, y):
    return y


_ste.defvjp(lambda x, y: (y, None), lambda _, g: (g, None))


def fake_quant(
    x: jax.Array,
    fmt: str | BlockFormat,
    *,
    axis: int = -1,
    rounding: str = "nearest_even",
    key: jax.Array | None = None,
    pad: bool = False,
) -> jax.Array:
    """``dequantize(quantize(x))`` in float32, jit-able, with the straight-through gradient
    (``d/dx = 1`` everywhere: block scales are not differentiated). ``rounding`` and ``key``
    as in :func:`quantize` (stochastic rounding: ``E[fake_quant(x)] = x`` inside the range).
    ``pad=True`` accepts an axis that is not a multiple of the block size: it is padded with
    zeros (which change no block's amax) and cropped again, so the last block is partial.

    Equal to :func:`dequantize` of :func:`quantize` (which run in NumPy on the host), except
    that XLA:CPU flushes float32 subnormals (``|v| < 2^-126``) to zero."""
    fmt = get_block_format(fmt)
    x = jnp.asarray(x)
    n = x.shape[axis] if x.ndim else 0
    if pad and n % fmt.block_size:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, -n % fmt.block_size)
        y = fake_quant(jnp.pad(x, widths), fmt, axis=axis, rounding=rounding, key=key)
        return jax.lax.slice_in_dim(y, 0, n, axis=axis)
    elems, scales = _encode(x, fmt, axis, jnp, _noise(key, x.shape, rounding))
    y = _unblocked(_decode(elems, scales, fmt, jnp), x.shape, axis, jnp)
    return _ste(x.astype(jnp.float32), jax.lax.stop_gradient(y))
