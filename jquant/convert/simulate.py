"""The fake-quant model with the deployment's requantization: bit-exact with the program.

The fake-quant model (phase ``eval``) rounds each activation once, ``round(y / s_y)``, in
float. An integer program in mode ``double`` (gemmlowp, TFLite reference kernels) rounds
twice: ``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``, with a 31-bit
``M0`` in place of ``M``. Near a rounding tie the two disagree by one code, and a changed
code can move the next layer's near-ties, up to a flipped argmax where two logits were within
a code of each other. Rounding once can never reproduce a two-rounding deployment, so instead
of a looser tolerance :func:`simulation` gives the float model the deployment's requantization.

Every quantized Conv / Dense is followed in the fake-quant model by a float output ``y`` (after
its BatchNorm, if any). Its weights and input are on the quantization grids, so::

    y = s_x s_w (sum (q_x - z_x) q_w) + b,   A = round(y / (s_x s_w)) = acc + round(b / (s_x s_w))

is the program's int32 accumulator, bias included (recovered exactly while the float32
rounding error of ``y`` stays under half a unit of ``s_x s_w``). :func:`simulation` replaces
``y`` by ``s_y (requantize(A) - z_y)``, the program's requantized codes in the layer's mode,
and lets the float model go on (relu, pooling, reshape, the next fake-quant). The result is
the fake-quant model's forward with the program's requantization: the program's output codes
are ``quantize(simulation(...)(x), program.output_qparams)`` bit for bit, in every mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jquant import integer
from jquant.convert.build import _check_model, _plan, convert
from jquant.convert.program import Conv, Dense
from jquant.nn.inject import QuantOp
from jquant.nn.linen import QuantizedModel
from jquant.quant import QParams

__all__ = ["simulation"]

_FIELDS = ("dot_general", "conv_general_dilated")


def _requantized(layer: Conv | Dense, y: jax.Array) -> jax.Array:
    """``s_y (requantize(round(y / (s_x s_w))) - z_y)``: the layer's output, requantized."""
    acc_scale = jnp.asarray(layer.x_scale, jnp.float32) * jnp.asarray(layer.w_scale, jnp.float32)
    acc = jnp.round(y / acc_scale).astype(jnp.int32)
    lo, hi = integer.activation_range(layer.activation, layer.out_scale, layer.out_zp)
    lo = jnp.maximum(lo, layer.clamp[0])
    hi = jnp.minimum(hi, layer.clamp[1])
    codes = integer.requantize(acc, layer.requant, layer.out_zp, lo, hi).astype(jnp.int32)
    return jnp.asarray(layer.out_scale, jnp.float32) * (codes - layer.out_zp).astype(jnp.float32)


def simulation(
    qmodel: QuantizedModel,
    variables: Mapping[str, Any],
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    mode: str = "double",
    **apply_kwargs,
) -> Callable[[jax.Array], jax.Array]:
    """The fake-quant model (phase ``eval``) with each layer's output requantized as the
    integer program ``convert(qmodel, variables, example_x, output_qparams=..., mode=mode)``
    does it (module docstring)::

        y_k -> s_{k+1} (clamp(MBQM(round(y_k / (s_x s_w)), M_k) + z_{k+1}) - z_{k+1})

    The constants are computed host-side here (``variables`` must be concrete); the returned
    function is pure and jit-able.

    Args:
      qmodel, variables, example_x, output_qparams, mode, **apply_kwargs: as :func:`convert`.

    Returns:
      ``apply(x) -> float32 logits`` on the output grid ``output_scale (q - output_zp)``:
      ``quantize(apply(x), output_qparams, int8)`` equals the program's output codes.

    Raises:
      as :func:`convert`.
    """
    _check_model(qmodel)
    variables = dict(variables)
    example_x = jnp.asarray(example_x)
    program = convert(
        qmodel, variables, example_x, output_qparams=output_qparams, mode=mode, **apply_kwargs
    )
    _, stages, _, _ = _plan(qmodel, variables, example_x, apply_kwargs)
    linear = [layer for layer in program.layers if isinstance(layer, Conv | Dense)]
    # the module whose output is the stage's float result: the BatchNorm, else the layer
    ends = {
        (stage.bn or stage.layer).path: layer for stage, layer in zip(stages, linear, strict=True)
    }

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        y = next_fun(*args, **kwargs)
        layer = ends.get("/".join(module.path)) if context.method_name == "__call__" else None
        if layer is None:
            return y
        # a quantized Dense / Conv runs twice through the interceptors (the plain call and
        # the clone with the QuantOp injected): requantize once, the clone's output
        if isinstance(module, nn.Dense | nn.Conv) and not any(
            isinstance(getattr(module, f, None), QuantOp) for f in _FIELDS
        ):
            return y
        return _requantized(layer, y)

    evaluate = qmodel.with_phase("eval")

    def apply(x: jax.Array) -> jax.Array:
        with nn.intercept_methods(interceptor):
            return evaluate.apply(variables, x, **apply_kwargs)

    return apply
