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

Where no weight can absorb ``Q`` (the MLP's hidden activation ``gelu(x W_up)``: no rotation
passes through ``gelu``), QuaRot rotates online: the model computes ``h H`` at run time
(:class:`OnlineHadamard`, injected as the GPT's ``mlp_transform``) and the next kernel is
``H^T W`` (:func:`rotate_input`), offline.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jquant.ptq.rtn import check_kernel

__all__ = [
    "OnlineHadamard",
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


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _paley(m: int) -> np.ndarray | None:
    """An unnormalised ``m x m`` Hadamard matrix by Paley's construction I (``m = q + 1``,
    ``q`` a prime ``= 3 mod 4``) or II (``m = 2 (q + 1)``, ``q`` a prime ``= 1 mod 4``), from
    the Jacobsthal matrix ``Q_ij = chi(j - i)`` (``chi`` the Legendre symbol mod ``q``);
    None when ``m`` is neither."""

    def jacobsthal(q: int) -> np.ndarray:
        squares = {(k * k) % q for k in range(1, q)}
        chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)])
        return chi[(np.arange(q)[None, :] - np.arange(q)[:, None]) % q]

    q = m - 1
    if _is_prime(q) and q % 4 == 3:  # H = I + [[0, 1^T], [-1, Q]] (Q skew)
        s = np.zeros((m, m), np.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
        return np.eye(m, dtype=np.int64) + s
    q = m // 2 - 1
    if m % 2 == 0 and _is_prime(q) and q % 4 == 1:  # C (x) [[1,-1],[-1,-1]] + I (x) H_2
        c = np.zeros((q + 1, q + 1), np.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
        return np.kron(c, [[1, -1], [-1, -1]]) + np.kron(np.eye(q + 1, dtype=np.int64), _H2)
    return None


_H2 = np.array([[1, 1], [1, -1]], np.int64)


def hadamard(n: int) -> jax.Array:
    """A normalised Hadamard matrix ``H_n / sqrt(n)``: orthogonal, entries ``+-1 / sqrt(n)``.

    ``n = 2^k``: Sylvester's ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]`` (symmetric).
    Otherwise ``n = 2^k m`` with ``H_n = H_{2^k} (x) H_m`` (Kronecker product), ``H_m`` by
    Paley's construction I (``m = q + 1``, ``q`` prime, ``q = 3 mod 4``: 12, 20, 24, 32, 44,
    ...) or II (``m = 2 (q + 1)``, ``q`` prime, ``q = 1 mod 4``: 12, 28, 36, 60, ...), the
    smallest such ``m``. QuaRot (Ashkboos et al. 2024) handles widths that are not powers of
    2 the same way, ``H_{2^k} (x) H_m``, its code storing ``H_m`` for a few ``m`` (e.g. 172
    for LLaMA's 11008 = 64 * 172, which Paley does not give). ``H_n H_n^T = n I``.

    >>> jnp.round(hadamard(2) * 2**0.5).tolist()
    [[1.0, 1.0], [1.0, -1.0]]

    Raises:
      ValueError: ``n`` is not ``2^k`` times such an ``m`` (e.g. 6, 92, 172).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    two = n & -n  # the largest power of 2 dividing n
    for p in range(two.bit_length()):  # m = odd part * 2^p, smallest first
        m = n // two * 2**p
        h_m = np.ones((1, 1), np.int64) if m == 1 else _paley(m)
        if h_m is not None:
            break
    else:
        raise ValueError(
            f"n must be a power of 2 times a Paley size (q + 1, q prime = 3 mod 4, or "
            f"2 (q + 1), q prime = 1 mod 4), got {n!r}"
        )
    h = np.ones((1, 1), np.int64)
    while h.shape[0] < n // m:
        h = np.kron(_H2, h)
    return jnp.asarray(np.kron(h, h_m) / np.sqrt(n), jnp.float32)


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


@dataclasses.dataclass(frozen=True)
class OnlineHadamard:
    """QuaRot's online Hadamard: ``t(h, layer) = h M`` over the last axis, the same for every
    layer, with ``M = H_n`` (:func:`hadamard`, ``seed=None``: the paper's online transform) or
    ``M = diag(d) H_n`` with random signs ``d`` drawn by ``seed`` (:func:`random_hadamard`,
    QuaRot's randomised Hadamard). The kernel reading ``h`` is ``M^T W``
    (:func:`rotate_input` with :meth:`matrix`), so ``t(h) (M^T W) = h W``.

    ``H_n``'s first column is constant, so ``h H_n`` carries ``sqrt(n) mean(h)`` in channel 0:
    after a ``gelu`` (mean > 0) that channel becomes an outlier, which the random signs avoid.

    A frozen dataclass (equal and hashed by ``n`` and ``seed``), so a model holding it
    compiles once. Called as a GPT's ``mlp_transform`` (``jquant.models.gpt.MLPTransform``).

    Raises:
      ValueError: ``n`` has no :func:`hadamard`; ``seed`` not None or an int (at construction).
    """

    n: int
    seed: int | None = None

    def __post_init__(self):
        try:
            hadamard(self.n)
        except ValueError as e:
            raise ValueError(f"OnlineHadamard.n: {e}") from None
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, int)
        ):
            raise ValueError(f"OnlineHadamard.seed must be None or an int, got {self.seed!r}")

    def matrix(self) -> jax.Array:
        """``M`` ``(n, n)``, orthogonal."""
        if self.seed is None:
            return hadamard(self.n)
        return random_hadamard(jax.random.key(self.seed), self.n)

    def __call__(self, h: jax.Array, layer: int = 0) -> jax.Array:
        del layer
        if h.shape[-1] != self.n:
            raise ValueError(f"OnlineHadamard(n={self.n}) got an activation of width {h.shape[-1]}")
        m = self.matrix().astype(h.dtype)
        return jnp.matmul(h, m, precision=jax.lax.Precision.HIGHEST)
