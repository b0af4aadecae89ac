"""Quantized lax ops: ``dot_general``, ``conv_general_dilated`` and pooling.

The products quantize ``lhs`` (activations) and ``rhs`` (weights), each with its own
:class:`QuantConfig`, and run in one of two modes that give the same numbers:

- ``"simulate"``: fake quantization in float, ``op(fq(lhs), fq(rhs))``; gradients come from the
  estimators of ``jquant.estimators`` (straight-through by default).
- ``"int"``: codes stored as int8, ``op(q_lhs, q_rhs)`` in ``lax`` with
  ``preferred_element_type=int32``, then rescaled. With ``x = s_x (q_x - z_x)`` and the scales
  constant along the contracted axes, a product over a contraction of ``K`` terms is::

      sum_k x_l x_r = s_l s_r (sum q_l q_r - z_l sum_k q_r - z_r sum_k q_l + K z_l z_r)

  The backward pass of ``"int"`` is the backward pass of ``"simulate"`` (same estimators).

Unsigned formats run in int8 too: a ``b``-bit unsigned code ``q`` equals the signed code
``q - 2^(b-1)`` with zero point ``z - 2^(b-1)``, so ``uint8`` activations become affine int8.

Pooling keeps the input's scale and zero point, as TFLite does; both modes work on the codes.

Overflow: ``"int"`` mode accumulates in int32. The worst case over a contraction of ``K``
terms is ``K * max|q_l - z_l| * max|q_r - z_r|`` (:func:`jquant.integer.checks.product_bound`;
255 for a side with a zero point, 128 for symmetric int8); when it can exceed ``2^31 - 1`` the
op raises ValueError at trace time, unless ``accumulator="int32_wrap"`` accepts wrap-around
modulo ``2^32`` (the result is then exact only where the true sum fits in int32). For
symmetric int8 on both sides ``K <= 2^17 - 1`` is accepted; affine activations with symmetric
int8 weights ``K <= 65793``.

NaN: under ``jit`` nothing can raise, so NaN flows as it does through the float op: a NaN in
``lhs`` makes NaN every output that contracts over it (its row of a product, every window
holding it in a conv, for all output channels of its group), a NaN in ``rhs`` every output
of its column / output channel, in both modes (``"int"`` masks its finite integer result).
A dynamic range is the range of the data: a NaN or +-inf in a per-tensor dynamic range makes
its scale NaN and hence *every* output NaN; per row / per channel (``QuantConfig(axis=...)``)
only the outputs of that row or channel.

All entry points keep ``lax``'s signatures, so ``functools.partial`` of them (see
:func:`quantized_dot_general`, :func:`quantized_conv_general_dilated`) drops into
``flax.linen.Dense(dot_general=...)``, ``flax.linen.Conv(conv_general_dilated=...)`` and their
NNX counterparts.

Modules: ``dot`` (dot_general), ``conv`` (conv_general_dilated, with the channels-last int8
layout), ``pool`` (avg_pool, max_pool) and the private ``_prepare``, the preamble and int / simulate
dispatch both products share. ``QuantConfig`` and ``dynamic_qparams`` live in the quant layer
(:mod:`jquant.quant`) and are re-exported here. ``train``: quantized backward products.
"""

from jquant.ops._prepare import ACCUMULATORS, MODES
from jquant.ops.conv import conv_general_dilated, quantized_conv_general_dilated
from jquant.ops.dot import dot_general, quantized_dot_general
from jquant.ops.pool import avg_pool, max_pool
from jquant.ops.train import BackwardConfig, train_conv_general_dilated, train_dot_general
from jquant.quant import QParams as QParams  # jquant.ops.QParams, as before
from jquant.quant import QuantConfig, dynamic_qparams

__all__ = [
    "MODES",
    "ACCUMULATORS",
    "QuantConfig",
    "dynamic_qparams",
    "dot_general",
    "conv_general_dilated",
    "quantized_dot_general",
    "quantized_conv_general_dilated",
    "avg_pool",
    "max_pool",
    "BackwardConfig",
    "train_dot_general",
    "train_conv_general_dilated",
]
