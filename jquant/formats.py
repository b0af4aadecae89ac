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
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
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
]

MIN_BITS = 2
MAX_BITS = 16


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

    def __repr__(self) -> str:
        extra = "".join(f", {k}=True" for k in ("narrow", "midrise") if getattr(self, k)) + (
            "" if self.signed else ", signed=False"
        )
        return f"IntFormat(bits={self.bits!r}{extra})"


@dataclasses.dataclass(frozen=True)
class BinaryFormat:
    """One-bit grid ``{-1, +1} * scale`` (sign, with ``sign(0) = +1``), as in BinaryConnect.

    It has no zero level and no zero point; ``quantize`` returns the sign as int8.
    """

    bits: int = 1
    signed: bool = True
    narrow: bool = False
    midrise: bool = False
    qmin: int = -1
    qmax: int = 1

    @property
    def is_static(self) -> bool:
        return True

    @property
    def dtype(self) -> jnp.dtype:
        return jnp.dtype(jnp.int8)


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


jax.tree_util.register_static(FloatFormat)

Format = IntFormat | BinaryFormat | FloatFormat

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
    """Looks a format up by name (``"int8"``, ``"fp8_e4m3"``, ...); formats pass through."""
    if isinstance(name, IntFormat | BinaryFormat | FloatFormat):
        return name
    if not isinstance(name, str):
        raise TypeError(f"format must be a name or a Format, got {type(name).__name__}")
    try:
        return NAMED_FORMATS[name]
    except KeyError:
        raise ValueError(
            f"unknown format {name!r}; known formats: {', '.join(NAMED_FORMATS)}"
        ) from None
