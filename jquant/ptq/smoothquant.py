"""SmoothQuant's migration scales (Xiao et al. 2022, arXiv:2211.10438, Eq. 4)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["smoothquant_scales"]

MIN_RANGE = 1e-5  # the paper's code clamps both ranges and the scales at 1e-5


def smoothquant_scales(x_absmax: jax.Array, w_absmax: jax.Array, alpha: float = 0.5) -> jax.Array:
    """Per-input-channel smoothing scales ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    The layer then computes ``(X diag(s)^-1)(diag(s) W)`` (fold with
    :func:`jquant.ptq.transforms.scale_input` and the previous op's
    :func:`~jquant.ptq.transforms.scale_output` or norm gain): activation outliers migrate
    into the weights. With ``alpha = 0.5`` both factors end with the same per-channel range,
    ``max|X_j / s_j| = max|s_j W_j| = sqrt(max|X_j| max|W_j|)``. Ranges and scales are
    clamped at ``1e-5`` (the paper's code), so a dead channel gets a finite scale.

    Args:
      x_absmax: ``(in,)`` calibration maxima of ``|x|`` per input channel.
      w_absmax: ``(in,)`` maxima of ``|W|`` over each input channel's weights (kernel row).
      alpha: migration strength in ``[0, 1]``.
    """
    x_absmax, w_absmax = jnp.asarray(x_absmax, jnp.float32), jnp.asarray(w_absmax, jnp.float32)
    if x_absmax.ndim != 1 or x_absmax.shape != w_absmax.shape:
        raise ValueError(
            "x_absmax and w_absmax must be 1-D with one entry per input channel, got shapes "
            f"{x_absmax.shape} and {w_absmax.shape}"
        )
    if not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    x_absmax, w_absmax = (jnp.maximum(a, MIN_RANGE) for a in (x_absmax, w_absmax))
    return jnp.maximum(x_absmax**alpha / w_absmax ** (1.0 - alpha), MIN_RANGE)
