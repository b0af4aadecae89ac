"""Which requantization each deployment runtime uses, op by op, and a program retargeted to it.

Runtimes do not round alike, and not even alike across their own ops. Measured against the
golden vectors in ``tests/data`` (TensorFlow 2.21 converter, LiteRT 2.3 interpreter):

============================  ===========  =============  ========  ==========
runtime (``target``)          CONV_2D,     FULLY_         ADD       MEAN
                              DEPTHWISE    CONNECTED
============================  ===========  =============  ========  ==========
``litert_ref`` (reference)    ``double``   ``single``     ``double``  ``double``
``xnnpack`` (LiteRT default)  ``fp32``     ``fp32``       ``fp32``  ``fp32``
``onnxruntime`` (MLAS)        ``fp32``     ``fp32``       ``fp32``  ``fp32``
============================  ===========  =============  ========  ==========

``double`` is gemmlowp's two roundings (``SaturatingRoundingDoublingHighMul`` then
``RoundingDivideByPOT``), ``single`` one rounding of the 64-bit product
(``TFLITE_SINGLE_ROUNDING``; LiteRT's per-channel reference FULLY_CONNECTED), ``fp32`` the float32
multiplier ``(s_x s_w) / s_y`` with round half to even. The ADD golden case does not separate
the modes (0 differences in all three); LiteRT's reference ADD follows gemmlowp, so ``double``.
MEAN (:func:`jquant.integer.mean`): the reference kernel folds ``1 / n`` into the gemmlowp
multiplier (``double``, also with equal input and output QParams), XNNPACK
multiplies by ``float32(s_x / s_y) * float32(1 / n)`` and rounds the exact product (an FMA;
``fp32``); the golden case separates
them (99 of 512 codes differ). onnxruntime has no int8 MEAN: its QDQ ``ReduceMean`` runs in
float, so ``fp32`` is the nearest mode, not an exact one. CONCATENATION copies codes in every
runtime (no requantization).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from jquant import integer
from jquant.convert.program import Add, Conv, Dense, Mean, Program

__all__ = ["TARGETS", "requant_for", "retarget"]

TARGETS: dict[str, dict[str, str]] = {
    "litert_ref": {"conv": "double", "dense": "single", "add": "double", "mean": "double"},
    "xnnpack": {"conv": "fp32", "dense": "fp32", "add": "fp32", "mean": "fp32"},
    "onnxruntime": {"conv": "fp32", "dense": "fp32", "add": "fp32", "mean": "fp32"},
}
_KINDS = {Conv: "conv", Dense: "dense", Add: "add", Mean: "mean"}


def requant_for(layer: Conv | Dense | Add | Mean, mode: str):
    """The requantization constants of ``layer`` in ``mode``, from the layer's float32 scales
    (``M = s_x s_w / s_y`` for Conv / Dense, the three ADD multipliers for Add, ``s_x / s_y``
    with ``1 / n`` folded in for Mean)."""
    if isinstance(layer, Add):
        return integer.add_requant(layer.a_scale, layer.b_scale, layer.out_scale, mode)
    if isinstance(layer, Mean):
        return integer.mean_requant(
            layer.x_scale, layer.x_zp, layer.out_scale, layer.out_zp, layer.count, mode
        )
    return integer.requant_from_scales(layer.x_scale, layer.w_scale, layer.out_scale, mode)


def retarget(program: Program, target: str | Mapping[str, str]) -> Program:
    """``program`` with each Conv / Dense / Add / Mean requantized as ``target`` does it.

    Args:
      program: an integer program (:func:`jquant.convert.convert`).
      target: a runtime name in :data:`TARGETS` (``"litert_ref"``, ``"xnnpack"``,
        ``"onnxruntime"``), or an explicit mapping ``{"conv": mode, "dense": mode, "add":
        mode, "mean": mode}`` (modes ``double``, ``single``, ``fp32``; kinds left out keep
        their mode).

    Returns:
      A new program: the same weights, scales and zero points, and requantization constants
      recomputed from the scales in each layer's mode.

    Raises:
      ValueError: an unknown target, kind or mode.
    """
    if isinstance(target, str):
        if target not in TARGETS:
            raise ValueError(
                f"target must be one of {sorted(TARGETS)} or a mapping, got {target!r}"
            )
        modes = TARGETS[target]
    else:
        modes = dict(target)
        unknown = sorted(set(modes) - set(_KINDS.values()))
        if unknown:
            raise ValueError(f"target kinds must be among {sorted(_KINDS.values())}, got {unknown}")
    layers = []
    for layer in program.layers:
        mode = modes.get(_KINDS.get(type(layer), ""))
        if mode is not None:
            layer = dataclasses.replace(layer, requant=requant_for(layer, mode))
        layers.append(layer)
    return dataclasses.replace(program, layers=tuple(layers))
