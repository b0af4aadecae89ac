"""Quantized ``lax.dot_general`` (see :mod:`jquant.ops` for the modes, overflow and NaN)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.ops import _prepare as prep
from jquant.quant import QParams, QuantConfig, nan_if_invalid

__all__ = ["dot_general", "quantized_dot_general"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _DotStatic(prep.ProductStatic):
    dimension_numbers: tuple

    def op(self, lhs, rhs, **overrides):
        return lax.dot_general(lhs, rhs, self.dimension_numbers, **(self.lax_kwargs() | overrides))


def _dot_int(st: _DotStatic, lhs, rhs, qp_l, qp_r):
    qp_l, qp_r = nan_if_invalid(qp_l), nan_if_invalid(qp_r)  # bad traced QParams: NaN out
    (lc, rc), (lb, rb) = st.dimension_numbers
    lfree = [d for d in range(lhs.ndim) if d not in lc and d not in lb]
    rfree = [d for d in range(rhs.ndim) if d not in rc and d not in rb]

    def lhs_side(a):  # lhs-shaped (size 1 on lc) -> output layout (batch, lhs free, 1...)
        a = prep.expand_to(a, lhs.ndim)
        a = jnp.transpose(a, (*lb, *lfree, *lc))
        return a.reshape(a.shape[: len(lb) + len(lfree)] + (1,) * len(rfree))

    def rhs_side(a):  # rhs-shaped (size 1 on rc) -> output layout (batch, 1..., rhs free)
        a = prep.expand_to(a, rhs.ndim)
        a = jnp.transpose(a, (*rb, *rfree, *rc))
        return a.reshape(a.shape[: len(rb)] + (1,) * len(lfree) + a.shape[len(rb) :][: len(rfree)])

    q_l, z_l = prep.int8_codes(lhs, qp_l, st.lhs_quant)
    q_r, z_r = prep.int8_codes(rhs, qp_r, st.rhs_quant)
    acc = st.op(q_l, q_r, precision=None, preferred_element_type=jnp.int32)
    if z_l is not None:
        acc = acc - lhs_side(z_l) * rhs_side(jnp.sum(q_r, rc, jnp.int32, keepdims=True))
    if z_r is not None:
        acc = acc - rhs_side(z_r) * lhs_side(jnp.sum(q_l, lc, jnp.int32, keepdims=True))
    if z_l is not None and z_r is not None:
        k = int(np.prod([lhs.shape[d] for d in lc]))
        acc = acc + k * lhs_side(z_l) * rhs_side(z_r)
    scale = lhs_side(qp_l.scale) * rhs_side(qp_r.scale)
    out = scale * acc.astype(jnp.float32)
    # NaN has no int8 code: the outputs that contract over a NaN (operand or zero point) are NaN
    nan_l = jnp.any(jnp.isnan(lhs), lc, keepdims=True) | jnp.isnan(qp_l.zero_point)
    nan_r = jnp.any(jnp.isnan(rhs), rc, keepdims=True) | jnp.isnan(qp_r.zero_point)
    out = jnp.where(lhs_side(nan_l) | rhs_side(nan_r), jnp.nan, out)
    return out.astype(prep.out_dtype(lhs, rhs, st.preferred_element_type))


def _dot_int_blocks(lhs, rhs, dn, lhs_quant, rhs_quant, lhs_qparams, rhs_qparams, **kw):
    """``mode="int"`` with block-wise scales along a contracting axis: the axis is split into
    ``(n, B)``, ``n`` becomes a batch axis, each block's product is an int32 partial sum
    rescaled by its own scales, and the ``n`` partial products are summed in float32::

        out = sum_b s_l[b] s_r[b] (sum_{k in b} q_l q_r - zero-point terms)
    """
    (lc, rc), (lb, rb) = dn
    pos_l = prep.check_int_blocks("lhs", lhs_quant, lhs.ndim, lc, "contracting")
    pos_r = prep.check_int_blocks("rhs", rhs_quant, rhs.ndim, rc, "contracting")
    if pos_l is not None and pos_r is not None and pos_l != pos_r:
        raise ValueError(
            f"mode='int': lhs blocks ({lhs_quant.block_size} along axis {lhs_quant.block_axis}) "
            f"and rhs blocks ({rhs_quant.block_size} along axis {rhs_quant.block_axis}) must "
            "have the same size along paired contracting axes"
        )
    if kw.get("out_sharding") is not None:
        raise ValueError("mode='int' with block-wise scales does not take out_sharding")
    p, size = pos_l if pos_l is not None else pos_r
    al, ar = lc[p], rc[p]
    lhs_b, cfg_l, qp_l, sl = prep.split_blocks("lhs", lhs, lhs_quant, lhs_qparams, al, size)
    rhs_b, cfg_r, qp_r, sr = prep.split_blocks("rhs", rhs, rhs_quant, rhs_qparams, ar, size)
    dn_b = (
        (
            tuple(al + 1 if d == al else sl(d) for d in lc),
            tuple(ar + 1 if d == ar else sr(d) for d in rc),
        ),
        (tuple(sl(d) for d in lb) + (al,), tuple(sr(d) for d in rb) + (ar,)),
    )
    out = dot_general(
        lhs_b,
        rhs_b,
        dn_b,
        kw["precision"],
        kw["preferred_element_type"],
        lhs_quant=cfg_l,
        rhs_quant=cfg_r,
        lhs_qparams=qp_l,
        rhs_qparams=qp_r,
        mode="int",
        accumulator=kw["accumulator"],
    )
    return jnp.sum(out.astype(jnp.float32), axis=len(lb)).astype(out.dtype)


def dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers,
    precision=None,
    preferred_element_type=None,
    *,
    lhs_quant: QuantConfig | None = None,
    rhs_quant: QuantConfig | None = None,
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    mode: str = "simulate",
    out_sharding=None,
    accumulator: str = "int32",
    key: jax.Array | None = None,
) -> jax.Array:
    """``lax.dot_general(fq(lhs), fq(rhs), ...)`` with ``fq`` the fake quantizer of each side.

    ``mode="int"`` computes the same value as ``s_l s_r (sum q_l q_r - z_l sum q_r - z_r sum
    q_l + K z_l z_r)`` with int8 codes and an int32 accumulator, exact while the worst case
    ``K * max|q_l - z_l| * max|q_r - z_r|`` fits in int32 (larger ``K`` raise ValueError unless
    ``accumulator="int32_wrap"``; see the module docstring, also for NaN); it needs both
    configs, static integer formats of <= 8 bits, and QParams constant along the contracting
    axes (per tensor, per row of ``lhs``, per output column of ``rhs``).

    Args:
      lhs, rhs, dimension_numbers, precision, preferred_element_type: as ``lax.dot_general``
        (``precision`` is unused by the integer product).
      lhs_quant, rhs_quant: how each side is quantized; ``None`` leaves it in float
        (``"simulate"`` only).
      lhs_qparams, rhs_qparams: fixed or learned QParams (they receive the estimator's
        gradients); ``None`` computes them from the operand with :func:`dynamic_qparams`.
      mode: ``"simulate"`` or ``"int"``.
      out_sharding: as ``lax.dot_general`` (passed on when set).
      Block-wise configs (``QuantConfig(block_size=B)``; ``block_axis`` None means the single
        contracting axis) quantize each run of ``B`` elements with its own scale; in ``"int"``
        mode the block axis must be contracting (on both sides, with the same ``B``, when
        both are block-wise): one int32 partial sum per block, scaled and summed in float32.
      accumulator: ``"int32"`` (exact; a contraction whose worst case may overflow int32
        raises ValueError at trace time) or ``"int32_wrap"`` (accept two's-complement
        wrap-around modulo ``2^32``). Only ``"int"`` mode accumulates in integers.
      key: PRNG key for a config with ``rounding="stochastic"`` (``"simulate"`` only; a
        missing key, or a key that no config uses, raises ValueError): ``lhs`` rounds with
        ``jax.random.split(key)[0]``, ``rhs`` with ``[1]``, each as
        :func:`jquant.quant.fake_quant_config` (block formats: :func:`jquant.mx.fake_quant`).

    Returns:
      The float product; in ``"int"`` mode of dtype ``preferred_element_type`` or the
      operands' float type.
    """
    lhs, rhs = prep.check_operands(lhs, rhs, lhs_quant, rhs_quant, mode, accumulator, key)
    try:
        (lc, rc), (lb, rb) = dimension_numbers
        dn = ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb)))
    except (TypeError, ValueError):
        raise TypeError(
            f"dimension_numbers must be ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch)), "
            f"got {dimension_numbers!r}"
        ) from None

    lhs_quant = prep.default_block_axis("lhs", lhs_quant, dn[0][0], "contracting")
    rhs_quant = prep.default_block_axis("rhs", rhs_quant, dn[0][1], "contracting")
    if mode == "int" and (prep.is_blocked(lhs_quant) or prep.is_blocked(rhs_quant)):
        return _dot_int_blocks(
            lhs,
            rhs,
            dn,
            lhs_quant,
            rhs_quant,
            lhs_qparams,
            rhs_qparams,
            precision=precision,
            preferred_element_type=preferred_element_type,
            out_sharding=out_sharding,
            accumulator=accumulator,
        )

    def geometry() -> prep.IntGeometry:
        k = int(np.prod([lhs.shape[d] for d in dn[0][0]]))
        return prep.IntGeometry(k, dn[0][0], dn[0][1], "contracting axes", "contracting axes")

    st = _DotStatic(
        dimension_numbers=dn,
        precision=precision,
        preferred_element_type=preferred_element_type,
        lhs_quant=lhs_quant,
        rhs_quant=rhs_quant,
        out_sharding=out_sharding,
    )
    return prep.run(
        st, lhs, rhs, lhs_qparams, rhs_qparams, mode, accumulator, _dot_int, geometry, key
    )


quantized_dot_general = prep.config_factory(
    dot_general,
    "quantized_dot_general",
    """A ``lax.dot_general`` look-alike for ``flax.linen.Dense(dot_general=...)`` /
    ``nnx.Linear(dot_general=...)``: :func:`dot_general` with these configs bound.

    >>> import flax.linen as nn
    >>> layer = nn.Dense(4, dot_general=quantized_dot_general(QuantConfig(), QuantConfig()))
    """,
)
