"""Spatial window arguments and TFLite padding for NHWC conv and pooling.

TFLite ``SAME`` (``ComputePaddingHeightWidth``), per spatial axis, with the dilated window
``k_eff = (k - 1) * d + 1``::

    out = ceil(in / stride)
    total = max((out - 1) * stride + k_eff - in, 0)
    before = total // 2,  after = total - before

``VALID`` pads nothing; explicit padding is ``((top, bottom), (left, right))``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["pair", "explicit_padding"]


def pair(name: str, v, minimum: int = 1) -> tuple[int, int]:
    """``v`` (an int or a pair of ints, each ``>= minimum``) as a pair of Python ints."""
    vals = (v, v) if isinstance(v, int) and not isinstance(v, bool) else v
    if (
        not isinstance(vals, Sequence)
        or len(vals) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) and i >= minimum for i in vals)
    ):
        raise ValueError(f"{name} must be an int or a pair of ints >= {minimum}, got {v!r}")
    return int(vals[0]), int(vals[1])


def explicit_padding(
    in_hw: Sequence[int],
    window: tuple[int, int],
    strides: tuple[int, int],
    dilation: tuple[int, int],
    padding,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((top, bottom), (left, right))`` for ``padding`` = ``"SAME"``, ``"VALID"`` or explicit."""
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return (0, 0), (0, 0)
        if mode != "SAME":
            raise ValueError(
                f"padding must be 'SAME', 'VALID' or ((t, b), (l, r)), got {padding!r}"
            )
        pads = []
        for n, k, s, d in zip(in_hw, window, strides, dilation, strict=True):
            out = -(-n // s)
            total = max((out - 1) * s + (k - 1) * d + 1 - n, 0)
            pads.append((total // 2, total - total // 2))
        return tuple(pads)
    try:
        (t, b), (lft, r) = padding
        pads = ((int(t), int(b)), (int(lft), int(r)))
    except (TypeError, ValueError):
        raise ValueError(
            f"padding must be 'SAME', 'VALID' or ((t, b), (l, r)), got {padding!r}"
        ) from None
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"explicit padding must be >= 0, got {padding!r}")
    return pads
