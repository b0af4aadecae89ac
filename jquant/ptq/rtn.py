"""Round-to-nearest weight quantization, and the weight grouping every PTQ algorithm shares.

Kernels are in Flax layout ``(in, out)``: ``y = x W``. A weight quantizer has one scale (and
zero point) per output channel, or per group of ``group_size`` consecutive inputs of each
output channel. Its :class:`~jquant.QParams` have the shape that broadcasts against the
kernel, or against ``jquant.to_blocks(kernel, 0, group_size)``::

    per channel:  scale (1, out)            w_q = fake_quant(W, qp)
    per group:    scale (in / g, 1, out)    w_q = from_blocks(fake_quant(to_blocks(W, 0, g), qp), 0)

Ranges are each channel's (group's) ``[min w, max w]`` (affine, the default of GPTQ's and AWQ's
code) or ``max |w|`` with ``symmetric=True``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jquant.formats import Format
from jquant.quant import QParams, fake_quant_forward, from_blocks, qparams_from_range, to_blocks

__all__ = [
    "Quantized",
    "check_group_size",
    "check_kernel",
    "fake_quant_kernel",
    "kernel_qparams",
    "rtn",
]


class Quantized(NamedTuple):
    """A fake-quantized kernel ``(in, out)`` (float values on the grid) and its QParams."""

    kernel: jax.Array
    qparams: QParams


def check_kernel(kernel) -> jax.Array:
    """``kernel`` as a float32 ``(in, out)`` array; TypeError / ValueError otherwise."""
    if not hasattr(kernel, "dtype") or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise TypeError(f"kernel must be a float array (in, out), got {type(kernel).__name__}")
    if kernel.ndim != 2 or 0 in kernel.shape:
        raise ValueError(f"kernel must be a non-empty 2-D array (in, out), got {kernel.shape}")
    return jnp.asarray(kernel, jnp.float32)


def check_group_size(group_size: int | None, n_in: int) -> None:
    """None (per channel) or a positive int dividing the kernel's input width ``n_in``."""
    if group_size is None:
        return
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    if n_in % group_size:
        raise ValueError(
            f"group_size must divide the kernel's input width {n_in}, got {group_size}"
        )


def _range_qparams(w: jax.Array, fmt: Format, axis: int, symmetric: bool) -> QParams:
    rmin, rmax = jnp.min(w, axis, keepdims=True), jnp.max(w, axis, keepdims=True)
    return qparams_from_range(rmin, rmax, fmt, symmetric=symmetric)


def kernel_qparams(
    kernel: jax.Array, fmt: Format, *, group_size: int | None = None, symmetric: bool = False
) -> QParams:
    """Min-max QParams of ``kernel`` per output channel or per input group (module docstring).

    ``scale = (max w - min w) / (qmax - qmin)`` over each channel (group), see
    :func:`jquant.qparams_from_range`.
    """
    kernel = check_kernel(kernel)
    check_group_size(group_size, kernel.shape[0])
    if group_size is None:
        return _range_qparams(kernel, fmt, 0, symmetric)
    return _range_qparams(to_blocks(kernel, 0, group_size), fmt, 1, symmetric)


def fake_quant_kernel(
    kernel: jax.Array, qparams: QParams, fmt: Format, *, group_size: int | None = None
) -> jax.Array:
    """``dequantize(quantize(W))`` with per-channel or per-group ``qparams`` (nearest even)."""
    if group_size is None:
        return fake_quant_forward(kernel, qparams, fmt)
    return from_blocks(fake_quant_forward(to_blocks(kernel, 0, group_size), qparams, fmt), 0)


def rtn(
    kernel: jax.Array, fmt: Format, *, group_size: int | None = None, symmetric: bool = False
) -> Quantized:
    """Round to nearest: ``W_q = s (clip(round(W / s) + z, qmin, qmax) - z)`` per channel/group.

    The baseline of GPTQ (Frantar et al. 2022) and AWQ (Lin et al. 2023): every weight rounds
    independently with min-max QParams from :func:`kernel_qparams`.

    Args:
      kernel: ``(in, out)`` float weights.
      fmt: the weight format (``jquant.int4``, ``IntFormat(3)``, a float format, ...).
      group_size: inputs per group (dividing ``in``), or None for one range per output channel.
      symmetric: zero point 0 and range ``max |w|``.

    >>> import jquant as jq
    >>> w = jnp.array([[0.0, 1.0], [0.3, -1.0], [1.0, 0.2]])
    >>> rtn(w, jq.IntFormat(2, signed=False)).kernel[:, 0].tolist()
    [0.0, 0.3333333432674408, 1.0]
    """
    kernel = check_kernel(kernel)
    qp = kernel_qparams(kernel, fmt, group_size=group_size, symmetric=symmetric)
    return Quantized(fake_quant_kernel(kernel, qp, fmt, group_size=group_size), qp)
