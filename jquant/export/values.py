"""Shapes and quantizers of an integer program's values, as the exporters lay out tensors."""

from __future__ import annotations

import jax
import numpy as np

from jquant.convert.program import Add, Concat, Conv, Dense, Mean, Program

__all__ = ["value_shapes", "value_qparams"]


def value_shapes(program: Program) -> list[tuple[int, ...]]:
    """Shape of every program value ``v_k`` for a batch of 1."""
    shapes = [(1, *program.input_shape)]
    for layer, reads in zip(program.layers, program.layer_inputs(), strict=True):
        args = [jax.ShapeDtypeStruct(shapes[i], np.int8) for i in reads]
        shapes.append(tuple(jax.eval_shape(layer, *args).shape))
    return shapes


def value_qparams(program: Program) -> list[tuple[float, int]]:
    """``(scale, zero point)`` of every program value: the producer's output quantizer."""
    qps = [(float(program.input_scale), int(program.input_zp))]
    for layer, reads in zip(program.layers, program.layer_inputs(), strict=True):
        if isinstance(layer, Conv | Dense | Add | Mean):
            qps.append((float(layer.out_scale), int(layer.out_zp)))
        elif isinstance(layer, Concat):
            qps.append((float(layer.scale), int(layer.zp)))
        else:  # pooling and reshape keep their input's quantizer
            qps.append(qps[reads[0]])
    return qps
