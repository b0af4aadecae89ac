"""Shapes and quantizers of an integer program's values, as the exporters lay out tensors."""

from __future__ import annotations

import jax
import numpy as np

from jquant.convert.program import INT8_RANGE, Add, Concat, Conv, Dense, Mean, Program

__all__ = ["value_shapes", "value_qparams", "weight_scales", "check_int8_clamp"]


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


def weight_scales(layer: Conv | Dense) -> tuple[np.ndarray, np.ndarray]:
    """``(s_w, s_b)`` per output channel: the weight scales as float32 and the bias scales
    ``float32(float64(s_x) s_w)``, the scale of the int32 bias in the TFLite spec."""
    channels = np.asarray(layer.w).shape[-1]
    w_scale = np.broadcast_to(np.asarray(layer.w_scale, np.float32), (channels,))
    return w_scale, (np.float64(layer.x_scale) * w_scale.astype(np.float64)).astype(np.float32)


def check_int8_clamp(layer, runtime: str) -> None:
    """ValueError naming ``layer`` when its output clamp is narrower than int8 (a narrower
    activation format), which ``runtime``'s int8 ops cannot express."""
    clamp = tuple(int(c) for c in getattr(layer, "clamp", INT8_RANGE))
    if clamp != INT8_RANGE:
        raise ValueError(
            f"layer {layer.path!r}: output clamp {clamp} (a format narrower than int8) has no "
            f"{runtime} int8 equivalent; convert with int8 activations"
        )
