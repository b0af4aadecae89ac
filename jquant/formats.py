"""Number formats: integer grids, a binary grid and minifloats.

An :class:`IntFormat` is a pytree whose ``bits`` is a leaf: it may be a Python ``int`` (static,
real integer storage) or a JAX array (traced), so ``jax.vmap`` over
``IntFormat(bits=jnp.arange(2, 9))`` quantizes at every width in one compiled program.
``signed``, ``narrow`` and ``midrise`` are static: they change the program.

Integer grid, for ``b`` bits::

    signed:    qmin = -2^(b-1) (+1 if narrow),  qmax = 2^(b-1) - 1
    unsigned:  qmin = 0        (+1 if narrow),  qmax = 2^b - 1

A ``midrise`` grid has no zero level: its levels sit at ``(k + 1/2) * scale`` for
``k = qmin .. qmax`` (signed only), the even-level optimum uniform quantizer of Max (1960).

:class:`FloatFormat` emulates a minifloat with ``exponent_bits`` and ``mantissa_bits``: round
to nearest even, gradual underflow (subnormals), and either IEEE-style infinities or the
``fn`` convention (no infinities, all-ones exponent and mantissa is NaN) of the OCP FP8 E4M3.

Every format follows the :class:`Format` protocol: the quantizers of ``jquant.quant`` and
``jquant.estimators``, the ops and the sweeps ask the format (its grid, ``encode``, ``decode``,
``scale_for_range``) and never inspect its class, so a format written outside jquant works
wherever a built-in one does. The rounding rules the formats encode with live here too
(:func:`round_values`, :func:`round_to_float_format`).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ROUNDING_MODES",
    "RANGE_LIMIT",
    "FORMAT_MEMBERS",
    "IntFormat",
    "BinaryFormat",
    "FloatFormat",
    "Format",
    "int2",
    "int3",
    "int4",
    "int8",
    "int16",
    "uint4",
    "uint8",
    "binary",
    "fp8_e4m3",
    "fp8_e5m2",
    "fp16",
    "bf16",
    "NAMED_FORMATS",
    "get_format",
    "check_format",
    "block_size_of",
    "format_name",
    "is_int8_grid",
    "rounding_modes_of",
    "exact_divide",
    "round_values",
    "round_to_float_format",
]

MIN_BITS = 2
MAX_BITS = 16

ROUNDING_MODES = ("nearest_even", "half_away", "half_up", "floor", "stochastic")

# Integer grids reach past their range (by half a step for a rounded zero point, to twice the
# range end for the lowest code of a 2-bit symmetric grid): their ranges are clipped to
# +-2^126 so that every grid value is a finite float32. Float, binary and midrise grids end at
# +-max|r| and need no clip.
RANGE_LIMIT = 2.0**126


def round_values(v: jax.Array, rounding: str = "nearest_even", noise: jax.Array | None = None):
    """Rounds to integers with a named tie rule (all exact in float arithmetic).

    - ``nearest_even``: ties to even (``jnp.round``; ONNX, PyTorch, XNNPACK).
    - ``half_away``: ties away from zero (C ``round``; TFLite reference kernels).
    - ``half_up``: ties towards +inf, ``floor(v + 1/2)``.
    - ``floor``: towards -inf.
    - ``stochastic``: ``floor(v) + [u < v - floor(v)]`` with ``u = noise ~ U[0, 1)``, so
      ``E[round(v)] = v``.
    """
    if rounding == "nearest_even":
        return jnp.round(v)
    if rounding == "half_away":
        t = jnp.trunc(v)
        return t + jnp.where(jnp.abs(v - t) >= 0.5, jnp.sign(v), 0.0)
    if rounding == "half_up":
        f = jnp.floor(v)
        return f + (v - f >= 0.5)
    if rounding == "floor":
        return jnp.floor(v)
    if rounding == "stochastic":
        if noise is None:
            raise ValueError("rounding='stochastic' needs noise ~ U[0, 1) (or a key upstream)")
        f = jnp.floor(v)
        return f + (noise < v - f)
    raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")


def round_to_float_format(
    x: jax.Array,
    fmt: FloatFormat,
    rounding: str = "nearest_even",
    noise: jax.Array | None = None,
) -> jax.Array:
    """Rounds float32 ``x`` to a value of the minifloat ``fmt`` with a named rounding mode.

    ``|x| = 2^e * f`` with ``e = max(floor(log2|x|), emin)``; the grid spacing at ``x`` is
    ``ulp = 2^(e - M)``, the exponent unbounded above. With ``lo = trunc(|x| / ulp) * ulp``
    and ``hi = lo + ulp`` (the two grid neighbours of ``|x|``), the result is ``lo`` or ``hi``
    with the sign of ``x``:

    - ``nearest_even`` (default, as ``ml_dtypes`` casts): nearer one, ties to even mantissa;
    - ``half_away``: nearer one, ties to ``hi``; ``half_up``: nearer one, ties towards +inf;
    - ``floor``: the largest grid value ``<= x`` (``lo`` for ``x >= 0``, ``hi`` below 0);
    - ``stochastic``: ``hi`` with probability ``(|x| - lo) / ulp``, so ``E[result] = x``,
      given ``noise ~ U[0, 1)`` of ``x``'s shape.

    Overflow (a result above ``fmt.max``) gives inf for IEEE formats, NaN for ``fn`` formats,
    ``+-max`` when ``fmt.saturate``, as ``ml_dtypes`` casts do, except that ``floor`` of a
    finite positive ``x`` gives ``max`` (IEEE round-toward-negative). NaN passes through.

    Computed on the float32 bit pattern with integer arithmetic, so it is exact also where
    float32 subnormals would be flushed to zero (XLA on CPU flushes them).
    """
    if rounding not in ROUNDING_MODES:
        raise ValueError(f"rounding must be one of {ROUNDING_MODES}, got {rounding!r}")
    if rounding == "stochastic" and noise is None:
        raise ValueError(
            f"rounding='stochastic' to {fmt.name or fmt} needs noise ~ U[0, 1) (a key upstream)"
        )
    x = jnp.asarray(x, jnp.float32)
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    negative = bits < 0
    mag = bits & 0x7FFFFFFF
    biased = mag >> 23
    # |x| = sig * 2^e exactly, with sig < 2^24 (implicit leading bit added for normal numbers)
    sig = (mag & 0x7FFFFF) | jnp.where(biased > 0, 1 << 23, 0)
    e = jnp.maximum(biased, 1) - 150
    floor_log2 = 31 - jax.lax.clz(sig) + e
    shift = jnp.maximum(floor_log2, fmt.emin) - fmt.mantissa_bits - e  # bits of sig to drop
    s = jnp.clip(shift, 1, 31)
    kept = sig >> s
    rem = sig & ((1 << s) - 1)  # |x| - lo in units of 2^-s ulp (shift > 31: kept = 0, rem = sig)
    half = 1 << (s - 1)
    if rounding == "nearest_even":
        up = (rem > half) | ((rem == half) & ((kept & 1) == 1))
    elif rounding == "half_away":
        up = rem >= half
    elif rounding == "half_up":
        up = jnp.where(negative, rem > half, rem >= half)
    elif rounding == "floor":
        up = negative & (rem > 0)
    else:  # stochastic: up with probability rem / 2^shift, from 31 bits of the noise
        r = (jnp.asarray(noise, jnp.float32) * 2.0**31).astype(jnp.int32)
        frac = jnp.where(shift > 31, sig >> jnp.clip(shift - 31, 0, 31), rem)
        up = (r >> (31 - s)) < frac
    q = kept + up.astype(jnp.int32)
    sig_r = q << jnp.minimum(s, 24)  # <= 2^25: q > 0 with s > 24 only as the smallest subnormal
    # a carry to 2^24 moves into the exponent field, and a subnormal to the smallest normal
    mag_r = jnp.where(biased > 0, (biased << 23) + sig_r - (1 << 23), sig_r)
    mag_r = jnp.where(shift > 24, _f32_bits(fmt.smallest_subnormal), mag_r)
    mag_r = jnp.where(shift <= 0, mag, jnp.where(q == 0, 0, mag_r))
    if fmt.saturate:
        top = _f32_bits(fmt.max)
    elif fmt.inf == "ieee":
        top = 0x7F800000
    else:
        top = 0x7FC00000
    over = mag_r > _f32_bits(fmt.max)
    if rounding == "floor":  # largest grid value <= x: a finite positive x never overflows
        top = jnp.where(negative | (mag >= 0x7F800000), top, _f32_bits(fmt.max))
    mag_r = jnp.where(over, top, mag_r)
    y = jax.lax.bitcast_convert_type(mag_r | (bits & jnp.int32(-(1 << 31))), jnp.float32)
    return jnp.where(jnp.isnan(x), x, y)


def _f32_bits(v: float) -> int:
    return int(np.array(v, np.float32).view(np.int32))


def exact_divide(x: jax.Array, scale: jax.Array) -> jax.Array:
    """``x / scale`` correctly rounded, as ONNX Runtime and NumPy compute it.

    XLA rewrites a division by a broadcast operand into a multiplication by its reciprocal,
    which is off by one ulp often enough to move ties. A divisor that depends on ``x`` is never
    a broadcast (not under ``vmap`` either), so the division stays a division.
    """
    return x / jnp.where(jnp.isnan(x), 1.0, scale)


@runtime_checkable
class Format(Protocol):
    """What the quantizers ask of a number format (IntFormat, FloatFormat, BinaryFormat, or
    one written outside jquant).

    With ``v = x / scale`` (in units of the step) and ``zp`` the zero point::

        codes = fmt.encode(v, zp, rounding, noise)      # quantize: codes (or grid values)
        v_hat = fmt.decode(codes, zp)                   # dequantize: x_hat = scale * v_hat
        scale, zp = fmt.scale_for_range(rmin, rmax, symmetric)   # rmin <= 0 <= rmax

    Members:
      bits: the width (a Python int, or a traced array for sweepable formats).
      is_static: True when the format changes nothing under tracing (``bits`` a Python int).
      dtype: what ``quantize`` stores the codes as (a floating dtype: grid values).
      has_zero_point: whether an affine zero point applies (False: QParams' zero point is 0).
      grid_range(): ``(lo, hi)`` of ``v + zp`` that the grid covers, unclipped (clipped
        estimators pass gradients inside it).
      encode(v, zero_point, rounding, noise): codes of ``v``; ``rounding`` is one of
        ``ROUNDING_MODES``, ``noise ~ U[0, 1)`` of ``v``'s shape for ``"stochastic"``. NaN
        stays NaN, +-inf saturate.
      decode(codes, zero_point): ``v_hat`` with ``x_hat = scale * v_hat``.
      scale_for_range(rmin, rmax, symmetric): ``(scale, zero_point)`` arrays mapping the range
        (already widened to include 0) onto the grid; a zero range may give 0 (the caller
        replaces it by 1).

    Optional capabilities (absent means False / unsupported; callers raise, never guess):
      integer_grid: codes are the integers ``qmin..qmax`` on a uniform step (``qmin``,
        ``qmax``, ``signed`` and ``bits`` are then defined): learned-step estimators (LSQ,
        PACT), MSE / KL / ACIQ calibration and integer pooling need it.
      supports_int_kernel: int8 x int8 -> int32 execution (``mode="int"``) of the codes.
      with_bits(bits): the same format at another width (sweeps over ``bits``).
      rounding_modes: the names of ``ROUNDING_MODES`` that ``encode`` honours (absent: all);
        configs refuse the others up front.
      block_size and block_scales(amax): a *block format* (the MX, NVFP4 and NF4 formats of
        ``jquant.mx``, or one written outside jquant) scales itself: each run of
        ``block_size`` consecutive elements along a block axis shares one scale that the
        format derives from the data, so it takes no QParams (and no calibration)::

            amax = max |x| over each block              # NaN / inf for a non-finite block
            s = fmt.block_scales(amax)                  # all blocks at once, amax's shape
            x_hat = s * fmt.decode(fmt.encode(x / s, 0, rounding, noise), 0)

        ``block_scales`` sees every block's amax (NVFP4's scale also depends on the tensor's
        amax); it returns NaN for a non-finite block and may return 0 for a zero block (its
        elements are then 0). ``scale_for_range`` is the same rule for one block of range
        ``[rmin, rmax]``. See :func:`block_size_of`.
    """

    @property
    def bits(self): ...

    @property
    def is_static(self) -> bool: ...

    @property
    def dtype(self) -> jnp.dtype: ...

    @property
    def has_zero_point(self) -> bool: ...

    def grid_range(self) -> tuple: ...

    def encode(self, v, zero_point, rounding: str = "nearest_even", noise=None) -> jax.Array: ...

    def decode(self, codes, zero_point) -> jax.Array: ...

    def scale_for_range(self, rmin, rmax, symmetric: bool) -> tuple[jax.Array, jax.Array]: ...


FORMAT_MEMBERS = (
    "bits",
    "is_static",
    "dtype",
    "has_zero_point",
    "grid_range",
    "encode",
    "decode",
    "scale_for_range",
)


def block_size_of(fmt) -> int | None:
    """The ``block_size`` of a block format (one that scales its own blocks, see
    :class:`Format`), or None for a format that takes QParams.

    >>> block_size_of(int8) is None
    True
    """
    size = getattr(fmt, "block_size", None)
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
        raise TypeError(f"{fmt!r}.block_size must be None or a positive int, got {size!r}")
    if not callable(getattr(fmt, "block_scales", None)):
        raise TypeError(f"{fmt!r} has a block_size but no block_scales(amax) method")
    return int(size)


def format_name(fmt) -> str:
    """``fmt.name`` when the format has one (``"fp8_e4m3"``, ``"mxfp4"``), else its repr:
    how messages name a format.

    >>> format_name(fp8_e4m3), format_name(int4)
    ('fp8_e4m3', 'IntFormat(bits=4)')
    """
    return getattr(fmt, "name", None) or repr(fmt)


def is_int8_grid(fmt, *, signed: bool = False) -> bool:
    """Whether ``fmt``'s codes are integers ``qmin..qmax`` on a uniform step
    (``integer_grid``) that the int8 kernels run (``supports_int_kernel``: a static width of
    <= 8 bits with a zero level), and signed when ``signed``: what ``mode="int"`` backward
    products, the integer program and its requantization ask of a format.

    >>> is_int8_grid(int8), is_int8_grid(uint8, signed=True), is_int8_grid(fp8_e4m3)
    (True, False, False)
    """
    return (
        bool(getattr(fmt, "integer_grid", False))
        and bool(getattr(fmt, "supports_int_kernel", False))
        and (fmt.signed or not signed)
    )


def rounding_modes_of(fmt) -> tuple[str, ...]:
    """The rounding modes ``fmt.encode`` honours: ``fmt.rounding_modes``, else all of
    ``ROUNDING_MODES``."""
    return tuple(getattr(fmt, "rounding_modes", ROUNDING_MODES))


def check_format(fmt, name: str = "fmt") -> None:
    """TypeError unless ``fmt`` follows the :class:`Format` protocol, naming what it lacks."""
    missing = [m for m in FORMAT_MEMBERS if not hasattr(fmt, m)]
    if missing:
        raise TypeError(
            f"{name} must be a Format (IntFormat, FloatFormat, BinaryFormat or an object with "
            f"{', '.join(FORMAT_MEMBERS)}), got {type(fmt).__name__} lacking {missing}"
        )


def _decode(codes, zero_point, offset: float = 0.0) -> jax.Array:
    return codes + offset - jnp.round(zero_point)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_bits(bits) -> None:
    if isinstance(bits, bool):
        raise TypeError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got bool {bits!r}")
    if isinstance(bits, numbers.Integral):
        if not MIN_BITS <= bits <= MAX_BITS:
            raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        return
    if isinstance(bits, numbers.Real):
        raise ValueError(f"bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if not hasattr(bits, "dtype"):
        raise TypeError(f"bits must be an int or an integer array, got {type(bits).__name__}")
    if not _is_concrete(bits):
        return  # traced: invalid values make qmin / qmax NaN (see IntFormat.bits_valid)
    arr = np.asarray(bits)
    if arr.dtype == object or arr.dtype.kind not in "iuf":
        raise TypeError(f"bits must be an integer array, got dtype {arr.dtype}")
    if arr.size and (np.any(arr != np.round(arr)) or arr.min() < MIN_BITS or arr.max() > MAX_BITS):
        raise ValueError(
            f"bits must be integers in [{MIN_BITS}, {MAX_BITS}], got values {np.unique(arr)}"
        )


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["bits"],
    meta_fields=["signed", "narrow", "midrise"],
)
@dataclasses.dataclass(frozen=True)
class IntFormat:
    """A uniform integer grid of ``bits`` bits (2..16).

    Args:
      bits: the width, a Python int (static) or an integer array (traced, sweepable by vmap).
        Concrete widths outside [2, 16] or non-integer raise ValueError; a traced width cannot
        raise, so an invalid one makes ``qmin`` and ``qmax`` NaN and with them every scale,
        fake-quantized value and clip bound derived from the format (never a plausible number).
      signed: two's complement range if True, else ``[0, 2^b - 1]``.
      narrow: drop the lowest code (``[-127, 127]`` for int8, TFLite's weight range).
      midrise: levels at ``(q + 1/2) * scale`` (no zero level); signed, non-narrow only.

    >>> IntFormat(8).qmin, IntFormat(8).qmax
    (-128, 127)
    >>> IntFormat(4, signed=False).qmax
    15
    """

    bits: int | jax.Array
    signed: bool = True
    narrow: bool = False
    midrise: bool = False

    def __post_init__(self):
        # Unflattening inside jax transformations may pass placeholders (object(), None); only
        # validate what a user could have written.
        if self.bits is None or type(self.bits) is object:
            return
        _check_bits(self.bits)
        if self.midrise and (not self.signed or self.narrow):
            raise ValueError("midrise requires signed=True and narrow=False")

    @property
    def is_static(self) -> bool:
        """True when ``bits`` is a Python int (the program is specialised to one width)."""
        return isinstance(self.bits, numbers.Integral)

    @property
    def bits_valid(self):
        """True where ``bits`` is an integer in [2, 16] (always True for static widths)."""
        if self.is_static:
            return True
        b = jnp.asarray(self.bits)
        ok = (b >= MIN_BITS) & (b <= MAX_BITS)
        if jnp.issubdtype(b.dtype, jnp.floating):
            ok = ok & (b == jnp.round(b))
        return ok

    @property
    def qmin(self):
        """Smallest code: ``-2^(b-1) + narrow`` if signed else ``narrow`` (NaN for an invalid
        traced width)."""
        if self.is_static:
            base = -(1 << (int(self.bits) - 1)) if self.signed else 0
            return base + int(self.narrow)
        if self.signed:
            return float(self.narrow) - self._pow2(1)
        return jnp.where(self.bits_valid, float(self.narrow), jnp.nan).astype(jnp.float32)

    @property
    def qmax(self):
        """Largest code: ``2^(b-1) - 1`` if signed else ``2^b - 1`` (NaN for an invalid traced
        width)."""
        if self.is_static:
            return (1 << (int(self.bits) - int(self.signed))) - 1
        return self._pow2(int(self.signed)) - 1.0

    def _pow2(self, minus: int) -> jax.Array:
        """``2^(bits - minus)`` as float32 for traced bits, by an integer shift; NaN where the
        width is not an integer in [2, 16].

        ``jnp.exp2`` is not exact on every backend (XLA:CPU gives ``2^13 + 2^-8``).
        """
        b = jnp.asarray(self.bits)
        valid = self.bits_valid
        b = jnp.where(valid, b, MIN_BITS).astype(jnp.int32)
        p = jnp.left_shift(1, b - minus).astype(jnp.float32)
        return jnp.where(valid, p, jnp.nan)

    @property
    def levels(self):
        """Number of representable codes, ``qmax - qmin + 1``."""
        return self.qmax - self.qmin + 1

    @property
    def dtype(self) -> jnp.dtype:
        """Storage dtype: int8/uint8 up to 8 bits, int16/uint16 up to 16; int32 when traced."""
        if not self.is_static:
            return jnp.dtype(jnp.int32)
        if self.bits <= 8:
            return jnp.dtype(jnp.int8 if self.signed else jnp.uint8)
        return jnp.dtype(jnp.int16 if self.signed else jnp.uint16)

    # --- the Format protocol ---------------------------------------------------------------

    integer_grid = True

    @property
    def has_zero_point(self) -> bool:
        """An affine zero point applies, except on a midrise grid (levels at ``q + 1/2``)."""
        return not self.midrise

    @property
    def supports_int_kernel(self) -> bool:
        """int8 x int8 -> int32 execution: a static width of at most 8 bits, not midrise."""
        return self.is_static and self.bits <= 8 and not self.midrise

    def with_bits(self, bits) -> IntFormat:
        """The same grid at width ``bits`` (a Python int or a traced array)."""
        return dataclasses.replace(self, bits=bits)

    def grid_range(self) -> tuple:
        """``(qmin, qmax)``, or ``(qmin + 1/2, qmax + 1/2)`` for midrise levels."""
        if self.midrise:
            return self.qmin + 0.5, self.qmax + 0.5
        return self.qmin, self.qmax

    def encode(self, v, zero_point, rounding: str = "nearest_even", noise=None) -> jax.Array:
        """``clip(round(v) + round(zp), qmin, qmax)`` (midrise: ``round(v - 1/2)``), as floats."""
        if self.midrise:
            v = v - 0.5
        codes = round_values(v, rounding, noise) + jnp.round(zero_point)
        return jnp.clip(codes, self.qmin, self.qmax)

    def decode(self, codes, zero_point) -> jax.Array:
        """``q - round(zp)`` (midrise: ``q + 1/2``)."""
        return _decode(codes, zero_point, 0.5 if self.midrise else 0.0)

    def scale_for_range(self, rmin, rmax, symmetric: bool) -> tuple[jax.Array, jax.Array]:
        """affine: ``scale = (rmax - rmin) / (qmax - qmin)``,
        ``zp = clip(round(qmin - rmin / scale), qmin, qmax)``; symmetric: ``max|r| / qmax``,
        ``zp = 0``; midrise: ``max|r| / (qmax + 1/2)``. Range ends beyond ``+-RANGE_LIMIT``
        are clipped to it (not midrise) so that every grid value is a finite float32."""
        if not self.midrise:  # grids that reach past the range
            rmin, rmax = jnp.maximum(rmin, -RANGE_LIMIT), jnp.minimum(rmax, RANGE_LIMIT)
        amax = jnp.maximum(-rmin, rmax)
        zero = jnp.zeros_like(amax)
        if self.midrise:
            return exact_divide(amax, self.qmax + 0.5), zero
        if symmetric:
            return exact_divide(amax, self.qmax), zero
        scale = exact_divide(rmax - rmin, self.qmax - self.qmin)
        safe = jnp.where(scale > 0, scale, 1.0)
        zp = jnp.clip(jnp.round(self.qmin - exact_divide(rmin, safe)), self.qmin, self.qmax)
        return scale, zp

    def __repr__(self) -> str:
        extra = "".join(f", {k}=True" for k in ("narrow", "midrise") if getattr(self, k)) + (
            "" if self.signed else ", signed=False"
        )
        return f"IntFormat(bits={self.bits!r}{extra})"


@dataclasses.dataclass(frozen=True)
class BinaryFormat:
    """One-bit grid ``{-1, +1} * scale`` (sign, with ``sign(0) = +1``), as in BinaryConnect.

    It has no zero level and no zero point; ``quantize`` returns the sign as int8 (its codes
    ``-1`` and ``+1``, so ``qmin = -1``, ``qmax = 1``). Rounding modes do not apply.
    """

    bits = 1
    signed = True
    qmin = -1
    qmax = 1
    is_static = True
    has_zero_point = False
    supports_int_kernel = True

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.int8)

    def grid_range(self) -> tuple:
        return -1.0, 1.0

    def encode(self, v, zero_point, rounding: str = "nearest_even", noise=None) -> jax.Array:
        """``sign(v)`` with ``sign(0) = +1``; NaN stays NaN."""
        return jnp.where(jnp.isnan(v), jnp.nan, jnp.where(v >= 0, 1.0, -1.0))

    def decode(self, codes, zero_point) -> jax.Array:
        return _decode(codes, zero_point)

    def scale_for_range(self, rmin, rmax, symmetric: bool) -> tuple[jax.Array, jax.Array]:
        """``scale = max|r|``, ``zp = 0``."""
        amax = jnp.maximum(-rmin, rmax)
        return amax, jnp.zeros_like(amax)


jax.tree_util.register_static(BinaryFormat)


@dataclasses.dataclass(frozen=True)
class FloatFormat:
    """A minifloat with ``exponent_bits`` and ``mantissa_bits`` (plus a sign bit).

    Values: ``(-1)^s * 2^(e - bias) * (1 + m / 2^M)`` for normal exponents ``e >= 1`` and
    ``(-1)^s * 2^(1 - bias) * (m / 2^M)`` for subnormals (``e = 0``).

    Args:
      exponent_bits: E >= 1.
      mantissa_bits: M >= 0.
      bias: exponent bias, default ``2^(E-1) - 1``.
      inf: ``"ieee"`` (all-ones exponent encodes inf and NaN: fp16, bf16, fp8 E5M2) or
        ``"fn"`` (finite only; only all-ones exponent and mantissa is NaN: fp8 E4M3FN).
      saturate: clamp overflow to ``+-max`` instead of producing inf (ieee) or NaN (fn), as
        fp8 training recipes do. The default follows the format's own cast (``ml_dtypes``).
    """

    exponent_bits: int
    mantissa_bits: int
    bias: int | None = None
    inf: Literal["ieee", "fn"] = "ieee"
    saturate: bool = False
    name: str | None = None

    def __post_init__(self):
        e, m = self.exponent_bits, self.mantissa_bits
        if not isinstance(e, numbers.Integral) or not 1 <= e <= 8:
            raise ValueError(f"exponent_bits must be an integer in [1, 8], got {e!r}")
        if not isinstance(m, numbers.Integral) or not 0 <= m <= 23:
            raise ValueError(f"mantissa_bits must be an integer in [0, 23], got {m!r}")
        if self.inf not in ("ieee", "fn"):
            raise ValueError(f"inf must be 'ieee' or 'fn', got {self.inf!r}")

    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def exponent_bias(self) -> int:
        return (1 << (self.exponent_bits - 1)) - 1 if self.bias is None else self.bias

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal number, ``1 - bias``."""
        return 1 - self.exponent_bias

    @property
    def emax(self) -> int:
        """Exponent of the largest finite number."""
        top = (1 << self.exponent_bits) - 1
        return (top - 1 if self.inf == "ieee" else top) - self.exponent_bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        m = self.mantissa_bits
        if self.inf == "ieee":
            frac = 2.0 - 2.0**-m
        else:  # the all-ones mantissa at the top exponent is NaN
            frac = 2.0 - 2.0 ** (1 - m) if m > 0 else 1.0
        return frac * 2.0**self.emax

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mantissa_bits)

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.float32)

    @property
    def is_static(self) -> bool:
        return True

    # --- the Format protocol ---------------------------------------------------------------

    has_zero_point = False

    def grid_range(self) -> tuple:
        return -self.max, self.max

    def encode(self, v, zero_point, rounding: str = "nearest_even", noise=None) -> jax.Array:
        """The minifloat value of ``v`` (:func:`round_to_float_format`); no zero point."""
        return round_to_float_format(v, self, rounding, noise)

    def decode(self, codes, zero_point) -> jax.Array:
        return _decode(codes, zero_point)

    def scale_for_range(self, rmin, rmax, symmetric: bool) -> tuple[jax.Array, jax.Array]:
        """``scale = max|r| / fmt.max``, ``zp = 0``."""
        amax = jnp.maximum(-rmin, rmax)
        return exact_divide(amax, self.max), jnp.zeros_like(amax)


jax.tree_util.register_static(FloatFormat)

int2 = IntFormat(2)
int3 = IntFormat(3)
int4 = IntFormat(4)
int8 = IntFormat(8)
int16 = IntFormat(16)
uint4 = IntFormat(4, signed=False)
uint8 = IntFormat(8, signed=False)
binary = BinaryFormat()
fp8_e4m3 = FloatFormat(4, 3, inf="fn", name="fp8_e4m3")
fp8_e5m2 = FloatFormat(5, 2, name="fp8_e5m2")
fp16 = FloatFormat(5, 10, name="fp16")
bf16 = FloatFormat(8, 7, name="bf16")

NAMED_FORMATS: dict[str, Format] = {
    "int2": int2,
    "int3": int3,
    "int4": int4,
    "int8": int8,
    "int16": int16,
    "uint4": uint4,
    "uint8": uint8,
    "binary": binary,
    "fp8_e4m3": fp8_e4m3,
    "fp8_e5m2": fp8_e5m2,
    "fp16": fp16,
    "bf16": bf16,
}


def get_format(name: str | Format) -> Format:
    """Looks a format up by name (``"int8"``, ``"fp8_e4m3"``, ...); formats (any object that
    follows the :class:`Format` protocol) pass through."""
    if not isinstance(name, str):
        check_format(name, "format")
        return name
    try:
        return NAMED_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown format {name!r}; known formats: {', '.join(NAMED_FORMATS)}"
        ) from None
