"""The fake-quant model with the deployment's requantization: bit-exact with the program.

The fake-quant model (phase ``eval``) rounds each activation once, ``round(y / s_y)``, in
float. An integer program in mode ``double`` (gemmlowp, TFLite reference kernels) rounds
twice: ``SaturatingRoundingDoublingHighMul`` then ``RoundingDivideByPOT``, with a 31-bit
``M0`` in place of ``M``. Near a rounding tie the two disagree by one code, and a changed
code can move the next layer's near-ties, up to a flipped argmax where two logits were within
a code of each other. Rounding once can never reproduce a two-rounding deployment, so instead
of a looser tolerance :func:`simulation` gives the float model the deployment's arithmetic.

Every quantized Conv / Dense of the fake-quant model reads a float input ``x`` and is followed
by a float output ``y`` (after its BatchNorm, if any). :func:`simulation` replaces ``y`` by the
program layer's output on the codes of ``x``::

    q_x = clip(round(x / s_x) + z_x),   A = sum (q_x - z_x) q_w + b   (int32, exact)
    y  -> s_y (clamp(requantize(A) + z_y) - z_y)

and lets the float model go on (relu, pooling, reshape, the next layer's quantizer). The
accumulator is computed in int32 from the codes, not recovered as ``round(y / (s_x s_w))``
from the float output: the float32 sum's rounding error depends on the CPU's summation order
and moves a code now and then (1 in 10,000 logits on an AMD EPYC). What stays from the float
model is the graph between the linear layers (activations, pooling, reshapes, residual adds,
which follow the program's integer add): the program's output codes are
``quantize(simulation(...)(x), program.output_qparams)`` bit for bit, in every mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from jquant.convert import source
from jquant.convert.build import conversion_plan, convert
from jquant.convert.program import Add, Conv, Dense, Mean
from jquant.convert.trace import module_path
from jquant.formats import int8
from jquant.quant import QParams, quantize

__all__ = ["simulation"]


def _requantized(layer: Conv | Dense, x: jax.Array) -> jax.Array:
    """``s_y (q_y - z_y)`` with ``q_y`` the program layer's int8 output on the codes of the
    layer's float input ``x`` (int32 accumulator, the layer's requantization)."""
    codes = quantize(x, QParams(layer.x_scale, layer.x_zp), int8).astype(jnp.int8)
    return _on_grid(layer(codes), layer.out_scale, layer.out_zp)


def _on_grid(codes: jax.Array, scale, zp) -> jax.Array:
    """``s (q - z)`` in float32."""
    return jnp.asarray(scale, jnp.float32) * (codes.astype(jnp.int32) - zp).astype(jnp.float32)


def _codes(v: jax.Array, scale, zp) -> jax.Array:
    """int8 ``round(v / s) + z`` of a value on the grid ``s (q - z)``."""
    return (jnp.round(v / jnp.asarray(scale, jnp.float32)).astype(jnp.int32) + zp).astype(jnp.int8)


def _simulated_add(spec: Add, a: jax.Array, b: jax.Array) -> jax.Array:
    """The program's add of the codes of ``a`` and ``b``, back on the output grid."""
    codes = spec(_codes(a, spec.a_scale, spec.a_zp), _codes(b, spec.b_scale, spec.b_zp))
    return _on_grid(codes, spec.out_scale, spec.out_zp)


def _with_adds(fn: Callable, adds: list[Add]) -> Callable:
    """``fn`` evaluated equation by equation from its jaxpr, each residual add (an ``add`` of
    two values computed from the input, of one shape, in the module of the next ``adds``
    spec, in order) replaced by :func:`_simulated_add`."""

    def apply(x: jax.Array) -> jax.Array:
        closed = jax.make_jaxpr(fn)(jax.ShapeDtypeStruct(x.shape, x.dtype))
        jaxpr = closed.jaxpr
        env = dict(zip(jaxpr.constvars, closed.consts, strict=True))
        env[jaxpr.invars[0]] = x
        tainted = {jaxpr.invars[0]}
        pending = list(adds)

        def read(v):
            return v.val if isinstance(v, jex_core.Literal) else env[v]

        for eqn in jaxpr.eqns:
            args = [read(v) for v in eqn.invars]
            operands = [v for v in eqn.invars if not isinstance(v, jex_core.Literal)]
            if any(v in tainted for v in operands):
                tainted.update(eqn.outvars)
            if (
                pending
                and eqn.primitive.name == "add"
                and len(operands) == 2
                and all(v in tainted for v in operands)
                and operands[0].aval.shape == operands[1].aval.shape
                and module_path(eqn) == pending[0].path
            ):
                outs = [_simulated_add(pending.pop(0), *args)]
            else:
                outs = eqn.primitive.bind(*args, **eqn.primitive.get_bind_params(eqn.params))
                outs = outs if eqn.primitive.multiple_results else [outs]
            env.update(zip(eqn.outvars, outs, strict=True))
        if pending:
            raise ValueError(
                f"simulation found no residual add for layer {pending[0].path!r} in the "
                "fake-quant model's jaxpr"
            )
        return read(jaxpr.outvars[0])

    return apply


def simulation(
    qmodel: source.Model,
    variables: Mapping[str, Any] | None,
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    mode: str = "double",
    residual_qparams: Mapping[str, QParams] | None = None,
    **apply_kwargs,
) -> Callable[[jax.Array], jax.Array]:
    """The fake-quant model (phase ``eval``) with each layer's output requantized as the
    integer program ``convert(qmodel, variables, example_x, output_qparams=..., mode=mode)``
    does it (module docstring)::

        y_k -> s_{k+1} (clamp(MBQM(round(y_k / (s_x s_w)), M_k) + z_{k+1}) - z_{k+1})

    and each residual add ``a + b`` replaced by the program's integer add of the codes
    ``round(a / s_a) + z_a`` and ``round(b / s_b) + z_b`` (both operands are on their grids:
    requantized layer outputs, relus and max pools of them), back on the output grid.

    The constants are computed host-side here (``variables`` must be concrete); the returned
    function is pure and jit-able.

    Args:
      qmodel, variables, example_x, output_qparams, mode, residual_qparams, **apply_kwargs:
        as :func:`convert`.

    Returns:
      ``apply(x) -> float32 logits`` on the output grid ``output_scale (q - output_zp)``:
      ``quantize(apply(x), output_qparams, int8)`` equals the program's output codes.

    Raises:
      as :func:`convert`; ValueError for a model with a spatial mean (TFLite MEAN), which
      simulation does not model yet.
    """
    variables = source.model_variables(qmodel, variables)
    example_x = jnp.asarray(example_x)
    program = convert(
        qmodel,
        variables,
        example_x,
        output_qparams=output_qparams,
        mode=mode,
        residual_qparams=residual_qparams,
        **apply_kwargs,
    )
    means = [layer.path for layer in program.layers if isinstance(layer, Mean)]
    if means:  # the float mean is not the program's integer MEAN: refuse, never approximate
        raise ValueError(
            f"simulation does not model the integer MEAN of {means}; compare with "
            "run(convert(...)) directly"
        )
    plan = conversion_plan(qmodel, variables, example_x, apply_kwargs)
    linear = [layer for layer in program.layers if isinstance(layer, Conv | Dense)]
    # each layer reads its input at its module and ends at its BatchNorm, else at itself
    pairs = [(plan.ops[k], layer) for k, layer in zip(sorted(plan.layers), linear, strict=True)]
    starts = {op.node.path: op.node.path for op, _ in pairs}
    ends = {(op.bn or op.node).path: (op.node.path, layer) for op, layer in pairs}

    def apply(x: jax.Array) -> jax.Array:
        inputs: dict[str, jax.Array] = {}  # one forward's layer inputs, by layer path

        def hook(path, module, call, args, kwargs):
            # a layer reads its input at its own call and ends at its BatchNorm, else itself
            if path in starts:
                inputs[path] = args[0]
            y = call(*args, **kwargs)
            if path not in ends:
                return y
            start, layer = ends[path]
            return _requantized(layer, inputs.pop(start))

        paths = set(starts) | set(ends)
        return source.eval_forward(qmodel, variables, apply_kwargs, hook=hook, paths=paths)(x)

    adds = [layer for layer in program.layers if isinstance(layer, Add)]
    return _with_adds(apply, adds) if adds else apply
