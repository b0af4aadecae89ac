"""Function-preserving weight transforms: per-channel scales and orthogonal rotations.

A linear layer ``y = x W`` (Flax kernel ``(in, out)``) computes the same function after

- input scales ``s > 0``: ``y = (x / s) (diag(s) W)``: :func:`scale_input` folds ``diag(s)``
  into ``W``; the caller divides the input by ``s`` (folded into the previous op: an RMSNorm
  gain or the previous layer's output channels, :func:`scale_output`). SmoothQuant and AWQ;
- an orthogonal ``Q`` (``Q Q^T = I``): ``y = (x Q) (Q^T W)`` (:func:`rotate_input`), and the
  previous layer emits ``x Q`` with :func:`rotate_output` ``W_prev Q``. Between the two, an
  RMSNorm without gain commutes with ``Q`` (``||x Q|| = ||x||``), so its gain is first absorbed
  into the next kernel (:func:`absorb_gain`): QuaRot's computational invariance (Ashkboos et
  al. 2024, arXiv:2404.00456, Section 4; SliceGPT, Theorem 1). A Hadamard ``Q`` spreads
  outlier channels over all channels, which is what makes 4-bit activations work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jquant.ptq.rtn import check_kernel

__all__ = [
    "absorb_gain",
    "hadamard",
    "random_hadamard",
    "rotate_input",
    "rotate_output",
    "scale_input",
    "scale_output",
]


def _check_vector(name: str, v, n: int, what: str) -> jax.Array:
    v = jnp.asarray(v, jnp.float32)
    if v.shape != (n,):
        raise ValueError(
            f"{name} must have shape ({n},) to match the kernel's {what}, got {v.shape}"
        )
    return v


def _check_rotation(q, n: int, what: str) -> jax.Array:
    q = jnp.asarray(q, jnp.float32)
    if q.shape != (n, n):
        raise ValueError(f"q must be ({n}, {n}) to match the kernel's {what}, got {q.shape}")
    return q


def hadamard(n: int) -> jax.Array:
    """The normalised Sylvester-Hadamard matrix ``H_n / sqrt(n)``, ``n`` a power of 2.

    ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]``; ``H_n H_n^T = n I``, so the returned
    matrix is orthogonal and symmetric.

    >>> jnp.round(hadamard(2) * 2**0.5).tolist()
    [[1.0, 1.0], [1.0, -1.0]]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1 or n & (n - 1):
        raise ValueError(f"n must be a power of 2 (Sylvester construction), got {n!r}")
    h = np.ones((1, 1), np.float32)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return jnp.asarray(h / np.sqrt(n), jnp.float32)


def random_hadamard(key: jax.Array, n: int) -> jax.Array:
    """``diag(d) H_n / sqrt(n)`` with i.i.d. random signs ``d``: QuaRot's randomised Hadamard."""
    signs = jax.random.rademacher(key, (n,), jnp.float32)
    return signs[:, None] * hadamard(n)


def scale_input(kernel: jax.Array, s: jax.Array) -> jax.Array:
    """``diag(s) W``: the kernel for inputs divided by ``s`` (``(x / s)(diag(s) W) = x W``)."""
    kernel = check_kernel(kernel)
    return _check_vector("s", s, kernel.shape[0], "inputs")[:, None] * kernel


def scale_output(kernel: jax.Array, s: jax.Array) -> jax.Array:
    """``W diag(1 / s)``: the previous layer's kernel whose outputs come divided by ``s``."""
    kernel = check_kernel(kernel)
    return kernel / _check_vector("s", s, kernel.shape[1], "outputs")[None, :]


def absorb_gain(gain: jax.Array, kernel: jax.Array) -> jax.Array:
    """``diag(g) W``: a norm's gain ``g`` moved into the next kernel (the norm then has gain 1)."""
    return scale_input(kernel, gain)


def rotate_input(kernel: jax.Array, q: jax.Array) -> jax.Array:
    """``Q^T W``: the kernel for rotated inputs ``x Q`` (``(x Q)(Q^T W) = x W``, Q orthogonal)."""
    kernel = check_kernel(kernel)
    q = _check_rotation(q, kernel.shape[0], "inputs")
    return jnp.matmul(q.T, kernel, precision=jax.lax.Precision.HIGHEST)


def rotate_output(kernel: jax.Array, q: jax.Array) -> jax.Array:
    """``W Q``: the kernel whose outputs come rotated (``x (W Q) = (x W) Q``)."""
    kernel = check_kernel(kernel)
    q = _check_rotation(q, kernel.shape[1], "outputs")
    return jnp.matmul(kernel, q, precision=jax.lax.Precision.HIGHEST)
