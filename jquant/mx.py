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

from jquant.formats import block_size_of, check_format, rounding_modes_of

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


ROUNDINGS = ("nearest_even", "stochastic")


def _xp(a):
    """``jax.numpy`` for JAX arrays (and tracers), NumPy for host arrays: the host path keeps
    float32 subnormals, which XLA:CPU flushes."""
    return jnp if isinstance(a, jax.Array) else np


@dataclasses.dataclass(frozen=True)
class BlockFormat:
    """A block format: its element format, block size and scale rule.

    It follows the :class:`jquant.formats.Format` protocol as a block format (``block_size``
    and ``block_scales``): it scales each block itself and takes no QParams, so configs, ops
    and rules use it like any other format. With ``v = x / s`` (``s`` the block's scale),
    ``encode(v, 0, rounding, noise)`` gives the element (a float32 grid value; NF4: the
    level index) and ``decode`` its value; ``x_hat = s * decode(encode(v))``.

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

    # --- the Format protocol ---------------------------------------------------------------

    is_static = True
    has_zero_point = False
    rounding_modes = ROUNDINGS

    @property
    def bits(self) -> int:
        """Bits per element: ``1 + E + M`` for minifloats, 8 for MXINT8, 4 for NF4."""
        if self.kind == "nf4":
            return 4
        if self.element is np.int8:
            return 8
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def dtype(self) -> jnp.dtype:
        """``jquant.quantize`` stores elements as float32 grid values (NF4: level indices)."""
        return jnp.dtype(jnp.float32)

    def grid_range(self) -> tuple:
        """``(-max, max)`` of the elements ``v = x / s``."""
        return -self.max, self.max

    def encode(self, v, zero_point, rounding: str = "nearest_even", noise=None):
        """The element of ``v = x / s``: the nearest minifloat value, ties to even, saturated
        at ``+-max`` (MXINT8: ``clip(round(64 v), -127, 127) / 64``; NF4: the index of the
        nearest level); ``"stochastic"`` (with ``noise ~ U[0, 1)``): one of the two grid
        neighbours, ``E[decode(encode(v))] = v`` inside the range. NaN stays NaN."""
        if rounding not in self.rounding_modes:
            raise ValueError(
                f"rounding must be one of {self.rounding_modes} for {self.name}, got {rounding!r}"
            )
        if rounding == "stochastic" and noise is None:
            raise ValueError(f"rounding='stochastic' to {self.name} needs noise (a key upstream)")
        noise = noise if rounding == "stochastic" else None
        xp = _xp(v)
        v = xp.asarray(v, xp.float32)
        if self.kind == "nf4":
            return _nf4_index(v, noise, xp)
        if self.element is np.int8:
            return xp.clip(_round(xp.clip(v * 64, -127, 127), noise, xp), -127, 127) / 64
        return round_to_minifloat(v, self.exponent_bits, self.mantissa_bits, self.max, xp, noise)

    def decode(self, codes, zero_point):
        """The element's value: ``codes`` (grid values), NF4 ``NF4_LEVELS[codes]``."""
        if self.kind != "nf4":
            return codes
        xp = _xp(codes)
        levels = xp.asarray(NF4_LEVELS)[xp.nan_to_num(codes).astype(xp.int32)]
        return xp.where(xp.isnan(codes), xp.nan, levels)

    def block_scales(self, amax):
        """Each block's scale from every block's ``amax`` (module docstring): MX
        ``2^(floor(log2 amax) - emax)``, NVFP4 ``e4m3(amax / (6 t)) t``, NF4 ``amax``; NaN
        for a non-finite block (NVFP4: every block of a non-finite tensor)."""
        xp = _xp(amax)
        bad = ~xp.isfinite(amax)
        if self.kind == "nvfp4":
            t_amax = xp.max(amax)
            block, tensor = self.nvfp4_scales(amax, t_amax)
            return xp.where(bad | ~xp.isfinite(t_amax), xp.nan, block * tensor)
        if self.kind == "nf4":
            return xp.where(bad, xp.nan, amax)
        _, e = xp.frexp(xp.where(amax > 0, amax, 1.0))
        exp = xp.where(amax > 0, xp.clip(e - 1 - self.emax, -127, 127), -127)
        return xp.where(bad, xp.nan, _pow2(xp, exp))

    def nvfp4_scales(self, amax, t_amax):
        """NVFP4's ``(block, tensor)`` scales: ``t = t_amax / (448 * 6)`` (1 for a zero
        tensor) and ``e4m3(amax / (6 t))``, as float32."""
        xp = _xp(amax)
        tensor = xp.where(t_amax > 0, t_amax / xp.float32(448.0 * 6.0), 1.0).astype(xp.float32)
        return round_to_minifloat(amax / (6.0 * tensor), 4, 3, 448.0, xp), tensor

    def scale_for_range(self, rmin, rmax, symmetric: bool):
        """The scale of one block of range ``[rmin, rmax]`` (NVFP4: a tensor of one block),
        zero point 0."""
        amax = jnp.maximum(-jnp.asarray(rmin, jnp.float32), jnp.asarray(rmax, jnp.float32))
        if self.kind == "nvfp4":
            block, tensor = self.nvfp4_scales(amax, amax)
            scale = block * tensor
        else:
            scale = self.block_scales(amax)
        return scale, jnp.zeros_like(amax)


jax.tree_util.register_static(BlockFormat)


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


def get_block_format(fmt):
    """``fmt`` itself when it is a block format (any object with ``block_size`` and
    ``block_scales``, see :class:`jquant.formats.Format`), or the named format of
    :data:`FORMATS`."""
    if isinstance(fmt, str) and fmt in FORMATS:
        return FORMATS[fmt]
    if not isinstance(fmt, str) and block_size_of(fmt) is not None:
        check_format(fmt)
        return fmt
    raise ValueError(f"fmt must be a BlockFormat or one of {sorted(FORMATS)}, got {fmt!r}")


def _stored_format(fmt) -> BlockFormat:
    """The jquant block format of :func:`quantize` / :func:`dequantize`, whose storage dtypes
    (``ml_dtypes`` elements, E8M0 / E4M3 scales) are defined only for :data:`FORMATS`."""
    fmt = get_block_format(fmt)
    if not isinstance(fmt, BlockFormat):  # a type check on input: storage is ours only
        raise TypeError(
            f"quantize / dequantize store the formats of jquant.mx.FORMATS in ml_dtypes, got "
            f"{fmt!r}; use fake_quant for a block format of your own"
        )
    return fmt


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


def _nf4_index(v, noise, xp):
    """The nearest NormalFloat level's index of ``v`` in [-1, 1] (midpoints between sorted
    levels), as float32; with noise, the upper of the two neighbouring levels
    ``lo <= v < hi`` with probability ``(v - lo) / (hi - lo)``, so that ``E[level] = v``.
    NaN stays NaN."""
    if noise is None:
        mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
        idx = xp.searchsorted(xp.asarray(mids), v, side="left")
    else:
        levels = xp.asarray(NF4_LEVELS)
        lo = xp.clip(xp.searchsorted(levels, v, side="right") - 1, 0, 14)
        frac = (v - levels[lo]) / (levels[lo + 1] - levels[lo])
        idx = lo + (noise < frac)
    return xp.where(xp.isnan(v), xp.nan, idx.astype(xp.float32))


def _blocked(x, axis: int, size: int, xp):
    """``x`` with ``axis`` moved last and split into ``(n_blocks, size)``."""
    x = xp.moveaxis(x, axis, -1)
    if x.shape[-1] % size:
        raise ValueError(
            f"x's axis {axis} has {x.shape[-1]} elements, not a multiple of the block size "
            f"{size}; pad it (e.g. jnp.pad with zeros) or choose another axis"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // size, size)


def _encode(x, fmt, axis: int, rounding: str, noise=None):
    """``(codes, scales, amax)`` of a block format, through its protocol (blocked:
    ``(..., n, B)`` codes, ``(..., n, 1)`` scales and amax); NumPy for host arrays, JAX
    otherwise. ``noise`` (``x``'s shape, U[0, 1)) rounds the elements stochastically."""
    xp = _xp(x)
    if not xp.issubdtype(x.dtype, xp.floating):
        raise TypeError(f"x must be a float array, got {x.dtype}")
    size = block_size_of(fmt)
    b = _blocked(x.astype(xp.float32), axis, size, xp)
    if noise is not None:
        noise = _blocked(noise, axis, size, xp)
    amax = xp.max(xp.abs(b), axis=-1, keepdims=True)  # NaN / inf for a non-finite block
    scale = xp.asarray(fmt.block_scales(amax), xp.float32)
    v = b / xp.where(scale == 0, 1.0, scale)  # a zero scale: a block of zeros
    return fmt.encode(v, 0.0, rounding, noise), scale, amax


def _decode(codes, scales, fmt):
    """``x_hat = s * fmt.decode(codes)`` per block."""
    return scales * fmt.decode(codes, 0.0)


def _unblocked(b, shape, axis: int, xp):
    moved = list(shape)
    moved.append(moved.pop(axis))
    return xp.moveaxis(b.reshape(moved), -1, axis)


def _noise(key, shape, rounding: str, fmt):
    """U[0, 1) noise of ``shape`` from ``key`` for stochastic rounding, else None."""
    modes = rounding_modes_of(fmt)
    if rounding not in modes:
        raise ValueError(f"rounding must be one of {modes}, got {rounding!r}")
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
      TypeError: ``x`` is not a float array; ``fmt`` a block format of another package.
    """
    fmt = _stored_format(fmt)
    x = np.asarray(x)
    noise = _noise(key, x.shape, rounding, fmt)
    noise = None if noise is None else np.asarray(noise)
    with np.errstate(over="ignore", invalid="ignore"):  # NaN / Inf blocks are NaN by design
        elems, scales, amax = _encode(x, fmt, axis, rounding, noise)
    elems = _unblocked(elems, x.shape, axis, np)
    if fmt.element is np.int8:
        elements = np.rint(elems * 64).astype(np.int8)
    elif fmt.kind == "nf4":
        elements = elems.astype(np.uint8)
    else:
        elements = elems.astype(fmt.element)
    if fmt.kind == "nvfp4":
        block, tensor = fmt.nvfp4_scales(amax, np.max(amax))
        block = np.where(np.isfinite(amax), block, np.nan)[..., 0]
        return Blocks(elements, NVScales(block.astype(ml_dtypes.float8_e4m3fn), tensor))
    scales = scales[..., 0]
    dtype = ml_dtypes.float8_e8m0fnu if fmt.kind == "mx" else np.float32
    return Blocks(elements, scales.astype(dtype))


def dequantize(blocks: Blocks, fmt: str | BlockFormat, *, axis: int = -1) -> np.ndarray:
    """float32 values of :func:`quantize`'s ``blocks``: ``element * scale`` per block
    (NVFP4: ``element * (block * tensor)``)."""
    fmt = _stored_format(fmt)
    elements, scales = blocks
    shape = elements.shape
    e = np.asarray(elements)
    if fmt.element is np.int8:
        e = e.astype(np.float32) / 64
    e = _blocked(e.astype(np.float32), axis, fmt.block_size, np)
    if fmt.kind == "nvfp4":
        sc = np.asarray(scales.block, np.float32)[..., None] * np.float32(scales.tensor)
    else:
        sc = np.asarray(scales, np.float32)[..., None]
    return _unblocked(_decode(e, sc, fmt), shape, axis, np)


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
    (``d/dx = 1`` everywhere: block scales are not differentiated). ``fmt`` may be any block
    format (:class:`jquant.formats.Format` with ``block_size`` and ``block_scales``):
    ``x_hat = s * fmt.decode(fmt.encode(x / s))`` with ``s = fmt.block_scales(amax)``.
    ``rounding`` and ``key`` as in :func:`quantize` (stochastic rounding:
    ``E[fake_quant(x)] = x`` inside the range).
    ``pad=True`` accepts an axis that is not a multiple of the block size: it is padded with
    zeros (which change no block's amax) and cropped again, so the last block is partial.

    Equal to :func:`dequantize` of :func:`quantize` (which run in NumPy on the host), except
    that XLA:CPU flushes float32 subnormals (``|v| < 2^-126``) to zero."""
    fmt = get_block_format(fmt)
    x = jnp.asarray(x)
    n = x.shape[axis] if x.ndim else 0
    size = block_size_of(fmt)
    if pad and n % size:
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, -n % size)
        y = fake_quant(jnp.pad(x, widths), fmt, axis=axis, rounding=rounding, key=key)
        return jax.lax.slice_in_dim(y, 0, n, axis=axis)
    codes, scales, _ = _encode(x, fmt, axis, rounding, _noise(key, x.shape, rounding, fmt))
    y = _unblocked(_decode(codes, scales, fmt), x.shape, axis, jnp)
    return _ste(x.astype(jnp.float32), jax.lax.stop_gradient(y))
