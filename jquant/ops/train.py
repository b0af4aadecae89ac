"""Quantized training: the forward product and both backward products of a layer quantized,
each operand with its own :class:`~jquant.quant.QuantConfig`.

A bilinear op ``y = op(x, w)`` (``dot_general``, ``conv_general_dilated``) has three products
per training step. With ``Q_*`` the quantizers of each operand and ``g = dL/dy``::

    forward      y       = op(Q_l(x), Q_r(w))                  (jquant.ops, simulate | int)
    dL/dlhs      dx_hat  = op_lhs^T(Q_dlhs_grad(g), Q_dlhs_rhs(Q_r(w)))
    dL/drhs      dw_hat  = op_rhs^T(Q_drhs_lhs(Q_l(x)), Q_drhs_grad(g))

``op_lhs^T(g, w)`` is the transpose of the linear map ``x -> op(x, w)`` (``g x w^T`` for a
matmul, the transposed conv for a conv), ``op_rhs^T(x, g)`` that of ``w -> op(x, w)`` (``x^T
g``, the kernel-gradient conv). Both are derived with :func:`jax.linear_transpose` of the float
op, so every ``dot_general`` and every conv (any rank, grouped, dilated, strided) gets exactly
the products JAX's own backward pass runs, applied to quantized operands. ``dx_hat`` and
``dw_hat`` then pass through the forward quantizers' estimators (straight-through by default),
so ``dL/dx = dx_hat`` inside the range.

Gradient scales are dynamic per tensor (``amax(g) / fmt.max``, or per axis with
``QuantConfig(axis=...)``) unless ``grad_qparams`` are given (delayed scaling,
:mod:`jquant.ops.scaling`). ``grad_amax_sink``, a float32 scalar input, receives ``max|g|``
as its cotangent: ``jax.grad`` with respect to it reads the gradient's amax out of the
backward pass (Flax's fp8 ops use the same "overwrite with gradient" trick), with no state.

Rounding of ``g``: any of ``jquant.quant.ROUNDING_MODES``; ``"stochastic"`` rounds up with
probability ``v - floor(v)`` (``E[Q(g)] = g``), drawing ``U[0, 1)`` noise from ``key`` (split
once per backward product). No key: ValueError at trace time.

``mode="int"``: the forward product as :func:`jquant.ops.dot_general`, and each backward
product on int8 codes with an int32 accumulator, ``s_g s_o * T(q_g, q_o)``: the jaxpr of the
transpose is evaluated on the codes with ``preferred_element_type=int32``, a conv in the
layout of XLA:CPU's int8 kernel as the forward's (:class:`jquant.ops.conv.Int8ConvLayout`:
channels last, 1-D lifted to 2-D). It needs all four backward configs set to static, signed,
symmetric integer formats of <= 8 bits and per-tensor scales (``axis=None``), so that both
scales factor out of the sum; anything else raises.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core

from jquant.formats import is_int8_grid
from jquant.ops import _prepare as prep
from jquant.ops.conv import conv_general_dilated, int8_conv
from jquant.ops.dot import dot_general
from jquant.quant import (
    ROUNDING_MODES,
    QParams,
    QuantConfig,
    check_config,
    dynamic_qparams,
    fake_quant_forward,
    quantize,
    stochastic_noise,
)

__all__ = ["BackwardConfig", "train_dot_general", "train_conv_general_dilated"]

_PRODUCTS = ("dot_general", "conv_general_dilated")


@dataclasses.dataclass(frozen=True)
class BackwardConfig:
    """How the two backward products of a quantized op are quantized.

    ``dL/dlhs = op_lhs^T(g, rhs)`` uses ``dlhs_grad`` for ``g`` and ``dlhs_rhs`` for the
    reused ``rhs``; ``dL/drhs = op_rhs^T(lhs, g)`` uses ``drhs_lhs`` and ``drhs_grad``. A
    reused operand whose config is None is taken as the forward product saw it (forward
    quantized or float); a gradient config None leaves ``g`` float in that product.

    Args:
      dlhs_grad, dlhs_rhs, drhs_lhs, drhs_grad: QuantConfigs or None (see above).
      grad_rounding: rounding of ``g`` in both products, one of
        ``jquant.quant.ROUNDING_MODES``; ``"stochastic"`` needs a ``key`` at the op. It
        replaces the gradient configs' own ``rounding``.

    >>> from jquant.formats import fp8_e5m2
    >>> BackwardConfig.uniform(QuantConfig(fp8_e5m2)).drhs_grad.fmt.name
    'fp8_e5m2'
    """

    dlhs_grad: QuantConfig | None = None
    dlhs_rhs: QuantConfig | None = None
    drhs_lhs: QuantConfig | None = None
    drhs_grad: QuantConfig | None = None
    grad_rounding: str = "nearest_even"

    def __post_init__(self):
        for name in ("dlhs_grad", "dlhs_rhs", "drhs_lhs", "drhs_grad"):
            check_config(f"BackwardConfig.{name}", getattr(self, name))
        if self.grad_rounding not in ROUNDING_MODES:
            raise ValueError(
                f"BackwardConfig.grad_rounding must be one of {ROUNDING_MODES}, "
                f"got {self.grad_rounding!r}"
            )

    @classmethod
    def uniform(
        cls,
        grad: QuantConfig | None,
        operands: QuantConfig | None = None,
        grad_rounding: str = "nearest_even",
    ) -> BackwardConfig:
        """The same ``grad`` config in both products, and ``operands`` for both reused
        operands."""
        return cls(grad, operands, operands, grad, grad_rounding)

    @property
    def stochastic(self) -> bool:
        """Whether ``g`` is rounded stochastically (the op then needs a key)."""
        quantized = self.dlhs_grad is not None or self.drhs_grad is not None
        return quantized and self.grad_rounding == "stochastic"


@dataclasses.dataclass(frozen=True)
class _Static:
    """The hashable part of one call: which lax op with which parameters, and the configs."""

    product: str
    params: tuple  # sorted (name, value) pairs of the lax op's keyword arguments
    lhs_quant: QuantConfig | None
    rhs_quant: QuantConfig | None
    bwd: BackwardConfig
    mode: str
    accumulator: str

    def float_op(self, lhs, rhs):
        fn = lax.dot_general if self.product == "dot_general" else lax.conv_general_dilated
        return fn(lhs, rhs, **dict(self.params))

    def quant_op(self, lhs, rhs, qp_l, qp_r):
        fn = dot_general if self.product == "dot_general" else conv_general_dilated
        return fn(
            lhs,
            rhs,
            **dict(self.params),
            lhs_quant=self.lhs_quant,
            rhs_quant=self.rhs_quant,
            lhs_qparams=qp_l,
            rhs_qparams=qp_r,
            mode=self.mode,
            accumulator=self.accumulator,
        )


def _check_int_backward(bwd: BackwardConfig) -> None:
    """ValueError unless every backward operand can run as per-tensor symmetric int8."""
    for name in ("dlhs_grad", "dlhs_rhs", "drhs_lhs", "drhs_grad"):
        cfg = getattr(bwd, name)
        fmt = None if cfg is None else cfg.fmt
        ok = is_int8_grid(fmt, signed=True) and cfg.symmetric and cfg.axis is None
        if not ok:
            raise ValueError(
                f"mode='int' runs the backward products as int8 x int8 -> int32, so "
                f"bwd.{name} must be a per-tensor (axis=None), symmetric QuantConfig with a "
                f"static signed integer format of <= 8 bits, got {cfg}; use mode='simulate' "
                f"for other formats (fp8, wider or traced widths, per-channel scales)"
            )


def _contraction(name: str, params: dict, a, b) -> int:
    """``K``, the number of terms summed into one output of the product ``name(a, b)``."""
    if name == "dot_general":
        (a_contract, _), _ = params["dimension_numbers"]
        return int(np.prod([a.shape[d] for d in a_contract]))
    out_features = b.shape[params["dimension_numbers"].rhs_spec[0]]
    return b.size // out_features


def _int_eval(fn, a_codes: jax.Array, b_codes: jax.Array, check_k) -> jax.Array:
    """``fn(a, b)``, a bilinear float function of one product, evaluated on int8 codes.

    The jaxpr of ``fn`` holds one ``dot_general`` / ``conv_general_dilated`` and data
    movement (``rev``, ``transpose``, ``reshape``); the product runs with
    ``preferred_element_type=int32``, so it is int8 x int8 -> int32 and exact
    (``check_k(K)`` raises when a contraction of ``K`` terms may overflow int32).
    """
    spec = [jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (a_codes, b_codes)]
    closed = jax.make_jaxpr(fn)(*spec)
    env = dict(zip(closed.jaxpr.constvars, closed.consts, strict=True))
    env.update(zip(closed.jaxpr.invars, (a_codes, b_codes), strict=True))
    products = 0
    for eqn in closed.jaxpr.eqns:
        vals = [v.val if isinstance(v, jex_core.Literal) else env[v] for v in eqn.invars]
        params = dict(eqn.params)
        name = eqn.primitive.name
        if name in _PRODUCTS:
            if any(v.dtype != jnp.int8 for v in vals):
                raise ValueError(f"mode='int': the backward {name} got non-int8 operands")
            params["preferred_element_type"] = jnp.dtype(jnp.int32)
            check_k(_contraction(name, params, *vals))
            products += 1
        elif name not in ("rev", "transpose", "reshape", "squeeze", "expand_dims"):
            raise ValueError(
                f"mode='int': the backward product contains {name!r}, which jquant cannot run "
                "on integer codes; use mode='simulate'"
            )
        outs = _bind(eqn.primitive, vals, params)
        outs = outs if eqn.primitive.multiple_results else [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    if products != 1:
        raise ValueError(f"mode='int': expected one backward product, found {products}")
    (out,) = [env[v] for v in closed.jaxpr.outvars]
    return out


def _bind(primitive, vals: list, params: dict):
    """``primitive.bind(*vals, **params)``; an int8 conv runs as
    :func:`jquant.ops.conv.int8_conv` (channels last, a 1-D conv lifted to 2-D: XLA:CPU's fast
    int8 kernel), which gives the same integers. Under ``out_sharding`` (a layout of its own)
    it is bound as it is."""
    if primitive.name != "conv_general_dilated" or params.get("out_sharding") is not None:
        return primitive.bind(*vals, **params)
    skip = ("out_sharding", "preferred_element_type")  # int8_conv accumulates in int32
    return int8_conv(*vals, **{k: v for k, v in params.items() if k not in skip})


def _grad_qparams(g, cfg: QuantConfig, qp_g: QParams | None) -> QParams:
    return dynamic_qparams(g, cfg) if qp_g is None else qp_g


def _quantize_grad(g, cfg: QuantConfig | None, qp_g, rounding: str, key):
    """``Q(g)`` in float (fake quantization), with ``rounding`` (stochastic: from ``key``)."""
    if cfg is None:
        return g
    noise = stochastic_noise(key, g.shape) if rounding == "stochastic" else None
    return fake_quant_forward(g, _grad_qparams(g, cfg, qp_g), cfg.fmt, rounding, noise)


def _requantize(x, cfg: QuantConfig | None):
    if cfg is None:
        return x
    return fake_quant_forward(x, dynamic_qparams(x, cfg), cfg.fmt, cfg.rounding)


def _backward_product(st: _Static, which: str, g, other, spec, qp_g, key):
    """``dL/d<which>`` (``which`` ``"lhs"`` or ``"rhs"``) of ``st``'s product: ``g`` and the
    reused operand ``other`` quantized by ``st.bwd``, then the transposed product."""
    bwd = st.bwd
    g_cfg, o_cfg = (
        (bwd.dlhs_grad, bwd.dlhs_rhs) if which == "lhs" else (bwd.drhs_grad, bwd.drhs_lhs)
    )

    def transpose(gg, oo):
        if which == "lhs":
            return jax.linear_transpose(lambda x: st.float_op(x, oo), spec)(gg)[0]
        return jax.linear_transpose(lambda w: st.float_op(oo, w), spec)(gg)[0]

    if st.mode == "simulate":
        g_hat = _quantize_grad(g, g_cfg, qp_g, bwd.grad_rounding, key)
        return transpose(g_hat, _requantize(other, o_cfg)).astype(spec.dtype)
    qp_gg = _grad_qparams(g, g_cfg, qp_g)
    qp_o = dynamic_qparams(other, o_cfg)
    q_g = quantize(g, qp_gg, g_cfg.fmt, rounding=bwd.grad_rounding, key=key).astype(jnp.int8)
    q_o = quantize(other, qp_o, o_cfg.fmt, rounding=o_cfg.rounding).astype(jnp.int8)

    def check_k(k: int) -> None:
        prep.check_overflow(k, g_cfg, o_cfg, st.accumulator)

    acc = _int_eval(transpose, q_g, q_o, check_k)
    return ((qp_gg.scale * qp_o.scale) * acc.astype(jnp.float32)).astype(spec.dtype)


def _fake_quant_operands(st: _Static, lhs, rhs, qp_l, qp_r):
    return (
        prep.fake_quant_operand(lhs, qp_l, st.lhs_quant),
        prep.fake_quant_operand(rhs, qp_r, st.rhs_quant),
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train_product(st: _Static, lhs, rhs, qp_l, qp_r, qp_g, key, sink):
    return st.quant_op(lhs, rhs, qp_l, qp_r)


def _train_fwd(st: _Static, lhs, rhs, qp_l, qp_r, qp_g, key, sink):
    return st.quant_op(lhs, rhs, qp_l, qp_r), (lhs, rhs, qp_l, qp_r, qp_g, key, sink)


def _train_bwd(st: _Static, res, g):
    lhs, rhs, qp_l, qp_r, qp_g, key, sink = res
    (l_hat, r_hat), fq_vjp = jax.vjp(
        functools.partial(_fake_quant_operands, st), lhs, rhs, qp_l, qp_r
    )
    k_l, k_r = (None, None) if key is None else jax.random.split(key)
    spec_l = jax.ShapeDtypeStruct(lhs.shape, l_hat.dtype)
    spec_r = jax.ShapeDtypeStruct(rhs.shape, r_hat.dtype)
    d_lhat = _backward_product(st, "lhs", g, r_hat, spec_l, qp_g, k_l)
    d_rhat = _backward_product(st, "rhs", g, l_hat, spec_r, qp_g, k_r)
    d_lhs, d_rhs, d_ql, d_qr = fq_vjp((d_lhat, d_rhat))
    zeros = functools.partial(jax.tree_util.tree_map, jnp.zeros_like)
    d_sink = None if sink is None else jnp.max(jnp.abs(g)).astype(sink.dtype)
    return d_lhs, d_rhs, d_ql, d_qr, zeros(qp_g), None, d_sink


_train_product.defvjp(_train_fwd, _train_bwd)


def _check_train_args(st: _Static, lhs, rhs, grad_qparams, key, grad_amax_sink) -> None:
    if not isinstance(st.bwd, BackwardConfig):
        raise TypeError(f"bwd must be a jquant.ops.BackwardConfig, got {st.bwd!r}")
    for side, cfg in (("lhs", st.lhs_quant), ("rhs", st.rhs_quant)):
        if cfg is not None and cfg.rounding == "stochastic":
            raise ValueError(
                f"{side}_quant.rounding='stochastic': the quantized backward products redo the "
                "forward quantization without its key, so their forward rounds "
                "deterministically; use jquant.ops.dot_general / conv_general_dilated(key=...)"
            )
    if st.bwd.stochastic and key is None:
        raise ValueError(
            "bwd.grad_rounding='stochastic' needs key= (a jax.random key; split it per step)"
        )
    if grad_qparams is not None and not isinstance(grad_qparams, QParams):
        raise TypeError(f"grad_qparams must be a jquant.QParams or None, got {grad_qparams!r}")
    if grad_amax_sink is not None and jnp.shape(grad_amax_sink) != ():
        raise ValueError(
            f"grad_amax_sink must be a float scalar, got shape {jnp.shape(grad_amax_sink)}"
        )
    if st.mode == "int":
        _check_int_backward(st.bwd)
        if grad_qparams is not None and jnp.shape(grad_qparams.scale) != ():
            raise ValueError("mode='int' needs per-tensor grad_qparams (scale of shape ())")


def _run(st: _Static, lhs, rhs, lhs_qparams, rhs_qparams, grad_qparams, key, grad_amax_sink):
    lhs, rhs = prep.check_operands(lhs, rhs, st.lhs_quant, st.rhs_quant, st.mode, st.accumulator)
    _check_train_args(st, lhs, rhs, grad_qparams, key, grad_amax_sink)
    qp_l = prep.resolve_qparams(lhs, st.lhs_quant, lhs_qparams)
    qp_r = prep.resolve_qparams(rhs, st.rhs_quant, rhs_qparams)
    if grad_amax_sink is not None:
        grad_amax_sink = jnp.asarray(grad_amax_sink, jnp.float32)
    return _train_product(st, lhs, rhs, qp_l, qp_r, grad_qparams, key, grad_amax_sink)


def train_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_quant: QuantConfig | None = None,
    rhs_quant: QuantConfig | None = None,
    bwd: BackwardConfig = BackwardConfig(),  # noqa: B008 (frozen, immutable)
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    grad_qparams: QParams | None = None,
    key: jax.Array | None = None,
    grad_amax_sink: jax.Array | None = None,
    mode: str = "simulate",
    accumulator: str = "int32",
) -> jax.Array:
    """:func:`jquant.ops.dot_general` forward with quantized backward products.

    Forward ``y = dot_general(Q_l(lhs), Q_r(rhs))``; backward (see the module docstring)
    ``dL/dlhs = Q(g) x Q(rhs)^T`` and ``dL/drhs = Q(lhs)^T x Q(g)``, contracted as JAX's
    own ``dot_general`` transpose rules do, then through the forward estimators.

    Args:
      lhs, rhs, dimension_numbers, precision, preferred_element_type, lhs_quant, rhs_quant,
        lhs_qparams, rhs_qparams, mode, accumulator: as :func:`jquant.ops.dot_general`.
      bwd: the :class:`BackwardConfig` (default: float gradients).
      grad_qparams: fixed QParams of ``g`` (delayed scaling); None: dynamic, from ``g``.
      key: PRNG key for ``bwd.grad_rounding="stochastic"``.
      grad_amax_sink: a float32 scalar whose cotangent is ``max|g|`` (None: not reported).

    >>> x, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    >>> cfg = QuantConfig()
    >>> f = lambda w: train_dot_general(x, w, (((1,), (0,)), ((), ())), lhs_quant=cfg,
    ...     rhs_quant=cfg, bwd=BackwardConfig.uniform(cfg)).sum()
    >>> jax.grad(f)(w)[0].tolist()
    [2.0, 2.0, 2.0, 2.0]
    """
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    except (TypeError, ValueError):
        raise TypeError(
            "dimension_numbers must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), "
            f"got {dimension_numbers!r}"
        ) from None
    params = (
        ("dimension_numbers", dn),
        ("precision", precision),
        ("preferred_element_type", preferred_element_type),
    )
    st = _Static("dot_general", params, lhs_quant, rhs_quant, bwd, mode, accumulator)
    return _run(st, lhs, rhs, lhs_qparams, rhs_qparams, grad_qparams, key, grad_amax_sink)


def train_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_quant: QuantConfig | None = None,
    rhs_quant: QuantConfig | None = None,
    bwd: BackwardConfig = BackwardConfig(),  # noqa: B008 (frozen, immutable)
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    grad_qparams: QParams | None = None,
    key: jax.Array | None = None,
    grad_amax_sink: jax.Array | None = None,
    mode: str = "simulate",
    accumulator: str = "int32",
) -> jax.Array:
    """:func:`jquant.ops.conv_general_dilated` forward with quantized backward products.

    ``dL/dlhs`` is the transposed conv of ``Q(g)`` with the flipped ``Q(rhs)`` (input
    dilation = forward strides), ``dL/drhs`` the kernel-gradient conv of ``Q(lhs)`` with
    ``Q(g)``; both as JAX derives them (:func:`jax.linear_transpose`), so every rank, feature
    and batch grouping, dilation, stride and padding is covered. Arguments as
    :func:`train_dot_general` and ``lax.conv_general_dilated``.
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    if lhs.ndim != rhs.ndim or lhs.ndim < 3:
        raise ValueError(
            f"lhs and rhs must have the same rank >= 3, got shapes {lhs.shape} and {rhs.shape}"
        )
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if not isinstance(padding, str):
        try:
            padding = tuple((int(lo), int(hi)) for lo, hi in padding)
        except (TypeError, ValueError):
            raise TypeError(
                f"padding must be a string or a sequence of (low, high) pairs, got {padding!r}"
            ) from None
    params = (
        ("window_strides", prep.tuple_or_none("window_strides", window_strides)),
        ("padding", padding),
        ("lhs_dilation", prep.tuple_or_none("lhs_dilation", lhs_dilation)),
        ("rhs_dilation", prep.tuple_or_none("rhs_dilation", rhs_dilation)),
        ("dimension_numbers", dn),
        ("feature_group_count", int(feature_group_count)),
        ("batch_group_count", int(batch_group_count)),
        ("precision", precision),
        ("preferred_element_type", preferred_element_type),
    )
    st = _Static("conv_general_dilated", params, lhs_quant, rhs_quant, bwd, mode, accumulator)
    return _run(st, lhs, rhs, lhs_qparams, rhs_qparams, grad_qparams, key, grad_amax_sink)
