"""The conv grid: the convolutions of ResNet-50 and of the MNIST-1D CNN.

Each cell is :func:`jquant.bench.grid.run_case` of ``lax.conv_general_dilated`` (and
:func:`jquant.ops.conv_general_dilated`), channels last (NHWC / HWIO; NWC / WIO for 1-D);
``flops = 2 * N * prod(out spatial) * C_out * prod(kernel) * C_in``.

- ResNet-50 v1.5 (He et al. 2016, the torchvision / MLPerf variant with the stride on the
  3x3): the stem, and per stage its 1x1 reduce, 3x3, 1x1 expand, the strided 3x3 and the
  strided 1x1 projection, at 224x224 inputs;
- the MNIST-1D CNN of :mod:`jquant.models` (``"cnn"``): its two 1-D convs (width 5, 32
  channels) on 40-step signals.

:data:`QUICK` takes batch 1 for ResNet-50 and one layer per stage; the full grid batch 32.
"""

from __future__ import annotations

import dataclasses
import functools
import math

from jax import lax

from jquant import ops
from jquant.bench.grid import Case

__all__ = ["FULL", "QUICK", "ConvLayer", "RESNET50", "MNIST1D_CNN", "cases", "conv_case"]


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A conv layer: input ``spatial + (c_in,)``, kernel ``kernel``, ``c_out`` features,
    ``stride`` on every spatial axis, ``padding`` (low, high) per spatial axis."""

    name: str
    group: str
    spatial: tuple[int, ...]
    c_in: int
    kernel: tuple[int, ...]
    c_out: int
    stride: int = 1

    @property
    def padding(self) -> tuple[tuple[int, int], ...]:
        """``(k - 1) // 2`` on both sides (SAME at stride 1; torchvision's at stride 2)."""
        return tuple(((k - 1) // 2, (k - 1) // 2) for k in self.kernel)

    def out_spatial(self) -> tuple[int, ...]:
        """``floor((n + pads - k) / stride) + 1`` per spatial axis."""
        return tuple(
            (n + lo + hi - k) // self.stride + 1
            for n, k, (lo, hi) in zip(self.spatial, self.kernel, self.padding, strict=True)
        )


def _resnet(name, size, c_in, k, c_out, stride=1):
    return ConvLayer(f"resnet50.{name}", "resnet50", (size, size), c_in, (k, k), c_out, stride)


RESNET50: tuple[ConvLayer, ...] = (
    _resnet("conv1_7x7_s2", 224, 3, 7, 64, 2),
    _resnet("res2_1x1_reduce", 56, 256, 1, 64),
    _resnet("res2_3x3", 56, 64, 3, 64),
    _resnet("res2_1x1_expand", 56, 64, 1, 256),
    _resnet("res3_3x3_s2", 56, 128, 3, 128, 2),
    _resnet("res3_proj_1x1_s2", 56, 256, 1, 512, 2),
    _resnet("res3_1x1_reduce", 28, 512, 1, 128),
    _resnet("res3_3x3", 28, 128, 3, 128),
    _resnet("res3_1x1_expand", 28, 128, 1, 512),
    _resnet("res4_3x3_s2", 28, 256, 3, 256, 2),
    _resnet("res4_1x1_reduce", 14, 1024, 1, 256),
    _resnet("res4_3x3", 14, 256, 3, 256),
    _resnet("res4_1x1_expand", 14, 256, 1, 1024),
    _resnet("res5_3x3_s2", 14, 512, 3, 512, 2),
    _resnet("res5_1x1_reduce", 7, 2048, 1, 512),
    _resnet("res5_3x3", 7, 512, 3, 512),
    _resnet("res5_1x1_expand", 7, 512, 1, 2048),
)
MNIST1D_CNN: tuple[ConvLayer, ...] = (
    ConvLayer("mnist1d_cnn.conv1", "mnist1d_cnn", (40,), 1, (5,), 32),
    ConvLayer("mnist1d_cnn.conv2", "mnist1d_cnn", (20,), 32, (5,), 32),
)
# (layers, batch) per grid
FULL = ((RESNET50, 32), (MNIST1D_CNN, 256))
_QUICK_NAMES = ("conv1_7x7_s2", "res2_3x3", "res3_1x1_reduce", "res4_3x3", "res5_1x1_expand")
QUICK = (
    (tuple(c for c in RESNET50 if c.name.split(".")[1] in _QUICK_NAMES), 1),
    (MNIST1D_CNN, 128),
)
_DN = {1: ("NWC", "WIO", "NWC"), 2: ("NHWC", "HWIO", "NHWC")}


def conv_case(layer: ConvLayer, batch: int) -> Case:
    """The cell of ``layer`` at ``batch`` examples."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    rank = len(layer.spatial)
    if rank not in _DN or len(layer.kernel) != rank:
        raise ValueError(f"{layer.name}: 1 or 2 spatial axes with one kernel size each")
    geometry = dict(
        window_strides=(layer.stride,) * rank, padding=layer.padding, dimension_numbers=_DN[rank]
    )
    flops = 2 * batch * math.prod(layer.out_spatial()) * layer.c_out
    flops *= math.prod(layer.kernel) * layer.c_in
    return Case(
        name=layer.name + ("" if batch == 1 else f".n{batch}"),
        group=layer.group,
        lhs_shape=(batch, *layer.spatial, layer.c_in),
        rhs_shape=(*layer.kernel, layer.c_in, layer.c_out),
        flops=flops,
        product=functools.partial(lax.conv_general_dilated, **geometry),
        quantized=functools.partial(ops.conv_general_dilated, **geometry),
    )


def cases(quick: bool) -> list[Case]:
    """The grid's cases (:data:`QUICK` or :data:`FULL`)."""
    return [
        conv_case(layer, batch) for layers, batch in (QUICK if quick else FULL) for layer in layers
    ]
