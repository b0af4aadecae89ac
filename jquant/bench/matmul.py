"""The matmul grid: ``(M, K) x (K, N)`` products from 128 to 8192, aligned and not.

Each cell is :func:`jquant.bench.grid.run_case` of ``lax.dot_general`` (and
:func:`jquant.ops.dot_general`) at one ``(M, N, K)``; ``flops = 2 M N K``.

- :data:`FULL`: square sizes 128, 256, ..., 8192; unaligned squares (1000, 3000, 5000,
  8191) and skinny products (a few rows against a large weight, as in decoding;
  a large batch against a narrow layer);
- :data:`QUICK`: a few of those that run in seconds on a CPU.
"""

from __future__ import annotations

import functools

from jax import lax

from jquant import ops
from jquant.bench.grid import Case

__all__ = ["FULL", "QUICK", "cases", "matmul_case"]

_DN = (((1,), (0,)), ((), ()))
_SQUARE = tuple(2**i for i in range(7, 14))  # 128 .. 8192
FULL: tuple[tuple[int, int, int], ...] = (
    *((s, s, s) for s in _SQUARE),
    *((s, s, s) for s in (1000, 3000, 5000, 8191)),
    (128, 8192, 8192),
    (8192, 128, 8192),
    (8192, 8192, 128),
    (129, 4095, 1023),
)
QUICK: tuple[tuple[int, int, int], ...] = (
    (128, 128, 128),
    (256, 256, 256),
    (1000, 1000, 1000),
    (129, 1023, 511),
)


def _group(m: int, n: int, k: int) -> str:
    if m == n == k:
        return "square" if m & (m - 1) == 0 else "unaligned"
    return "rectangular"


def matmul_case(m: int, n: int, k: int) -> Case:
    """The cell ``(m, k) x (k, n)``; ``flops = 2 m n k``."""
    for name, v in dict(m=m, n=n, k=k).items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"matmul size {name} must be a positive int, got {v!r}")
    return Case(
        name=f"m{m}_n{n}_k{k}",
        group=_group(m, n, k),
        lhs_shape=(m, k),
        rhs_shape=(k, n),
        flops=2 * m * n * k,
        product=functools.partial(lax.dot_general, dimension_numbers=_DN),
        quantized=functools.partial(ops.dot_general, dimension_numbers=_DN),
    )


def cases(quick: bool) -> list[Case]:
    """The grid's cases (:data:`QUICK` or :data:`FULL`)."""
    return [matmul_case(*s) for s in (QUICK if quick else FULL)]
