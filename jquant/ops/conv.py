"""Quantized ``lax.conv_general_dilated`` (see :mod:`jquant.ops` for the modes, overflow and
NaN); ``mode="int"`` runs in the channels-last layout XLA:CPU's int8 kernel takes."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.ops import _prepare as prep
from jquant.quant import QParams, QuantConfig, nan_if_invalid

__all__ = ["conv_general_dilated", "quantized_conv_general_dilated"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class _ConvStatic(prep.ProductStatic):
    window_strides: tuple
    padding: str | tuple
    lhs_dilation: tuple | None
    rhs_dilation: tuple | None
    dimension_numbers: lax.ConvDimensionNumbers
    feature_group_count: int
    batch_group_count: int

    def op(self, lhs, rhs, **overrides):
        kw = dict(
            window_strides=self.window_strides,
            padding=self.padding,
            lhs_dilation=self.lhs_dilation,
            rhs_dilation=self.rhs_dilation,
            dimension_numbers=self.dimension_numbers,
            feature_group_count=self.feature_group_count,
            batch_group_count=self.batch_group_count,
        )
        return lax.conv_general_dilated(lhs, rhs, **(kw | self.lax_kwargs() | overrides))


def _explicit_pads(st: _ConvStatic, lhs_shape, rhs_shape) -> list[tuple[int, int]]:
    """``padding`` as (low, high) pairs per spatial axis (strings resolved as lax does)."""
    if not isinstance(st.padding, str):
        return list(st.padding)
    lhs_spec, rhs_spec, _ = st.dimension_numbers
    window = [rhs_shape[d] for d in rhs_spec[2:]]
    dil = st.rhs_dilation or (1,) * len(window)
    window = [(k - 1) * r + 1 for k, r in zip(window, dil, strict=True)]
    spatial = [lhs_shape[d] for d in lhs_spec[2:]]
    return list(lax.padtype_to_pads(spatial, window, st.window_strides, st.padding))


def _real_taps(st: _ConvStatic, lhs_shape, rhs_shape) -> list[np.ndarray]:
    """Per spatial axis, the 0/1 matrix ``R[j, t] = 1`` where tap ``t`` of output ``j``'s
    window reads a real input, not padding: ``0 <= j * stride - low + t * dilation < size``
    (no input dilation)."""
    lhs_spec, rhs_spec, _ = st.dimension_numbers
    pads = _explicit_pads(st, lhs_shape, rhs_shape)
    dilation = st.rhs_dilation or (1,) * len(pads)
    spatial = zip(lhs_spec[2:], rhs_spec[2:], pads, st.window_strides, dilation, strict=True)
    real = []
    for d_l, d_r, (lo, hi), stride, dil in spatial:
        size, k = lhs_shape[d_l], rhs_shape[d_r]
        n_out = max((size + lo + hi - (k - 1) * dil - 1) // stride + 1, 0)
        index = np.arange(n_out)[:, None] * stride - lo + np.arange(k)[None, :] * dil
        real.append(((index >= 0) & (index < size)).astype(np.int32))
    return real


def _sum_over_real_taps(ksum, real: list[np.ndarray]):
    """``out[j..., o] = sum_t prod_d R_d[j_d, t_d] ksum[t..., o]``: per output position and
    feature, the sum of ``ksum`` (window axes, then features) over the real taps."""
    n = len(real)
    taps, outs = "abcdef"[:n], "ghijkl"[:n]
    spec = ",".join(o + t for o, t in zip(outs, taps, strict=True)) + f",{taps}z->{outs}z"
    return jnp.einsum(spec, *real, ksum)


@dataclasses.dataclass(frozen=True)
class Int8ConvLayout:
    """The layout XLA:CPU's int8 conv kernel takes, for a conv with ``dimension_numbers``:
    channels last (NHWC / HWIO) and at least 2 spatial axes (a 1-D conv gains a unit axis after
    its spatial one: ``(N, W, C) -> (N, W, 1, C)``, ``(W, I, O) -> (W, 1, I, O)``, window
    stride / dilation 1 and padding ``(0, 0)`` along it). Same numbers, bit for bit.

    Otherwise XLA:CPU upcasts the codes to int32 and takes a generic path: about 7x the float
    conv on the MNIST-1D CNN's 1-D layers and 40x on an NCHW 3x3 conv (``benchmarks/ops.py``);
    the backward int8 convs of :mod:`jquant.ops.train` (``dL/dlhs``: rhs ``WOI``, ``dL/drhs``:
    batch and features swapped) likewise.
    """

    dimension_numbers: lax.ConvDimensionNumbers

    @property
    def lifted(self) -> bool:
        """Whether the conv is 1-D and gains a unit spatial axis."""
        return len(self.dimension_numbers.lhs_spec) == 3

    def _to(self, a, perm, unit_axis: int):
        a = jnp.transpose(prep.expand_to(a, len(perm)), perm)
        return jnp.expand_dims(a, unit_axis) if self.lifted else a

    def lhs(self, a: jax.Array) -> jax.Array:
        """``a``, the lhs or an array broadcastable to it (QParams), as NHWC."""
        spec = self.dimension_numbers.lhs_spec
        return self._to(a, (spec[0], *spec[2:], spec[1]), 2)

    def rhs(self, a: jax.Array) -> jax.Array:
        """``a``, the kernel or an array broadcastable to it (QParams), as HWIO."""
        spec = self.dimension_numbers.rhs_spec
        return self._to(a, (*spec[2:], spec[1], spec[0]), 1)

    def conv_params(self, window_strides, padding, lhs_dilation, rhs_dilation) -> dict:
        """The conv's spatial arguments and ``dimension_numbers`` in this layout."""

        def with_unit(t, value):  # per-spatial-axis parameters gain the unit axis's
            return (*t, value) if self.lifted and t is not None else t

        n = len(self.dimension_numbers.lhs_spec) + int(self.lifted)  # rank in this layout
        nhwc = (0, n - 1, *range(1, n - 1))
        hwio = (n - 1, n - 2, *range(n - 2))
        return dict(
            window_strides=with_unit(window_strides, 1),
            padding=padding if isinstance(padding, str) else with_unit(tuple(padding), (0, 0)),
            lhs_dilation=with_unit(lhs_dilation, 1),
            rhs_dilation=with_unit(rhs_dilation, 1),
            dimension_numbers=lax.ConvDimensionNumbers(nhwc, hwio, nhwc),
        )

    def restore(self, out: jax.Array) -> jax.Array:
        """A conv output in this layout back in the conv's own ``out_spec``."""
        out = jnp.squeeze(out, 2) if self.lifted else out
        spec = self.dimension_numbers.out_spec
        return jnp.transpose(out, np.argsort((spec[0], *spec[2:], spec[1])))


def int8_conv(
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
) -> jax.Array:
    """``lax.conv_general_dilated(lhs, rhs, ..., preferred_element_type=int32)`` of int8 codes,
    ``out = sum q_lhs q_rhs`` exactly in int32, run in :class:`Int8ConvLayout` (XLA:CPU's fast
    int8 kernel) and returned in the conv's own layout: the same integers, bit for bit.
    Arguments as ``lax.conv_general_dilated``; used by :mod:`jquant.ops.train`'s ``"int"``
    backward products.

    >>> q, k = jnp.arange(5, dtype=jnp.int8).reshape(1, 5, 1), jnp.ones((3, 1, 1), jnp.int8)
    >>> int8_conv(q, k, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))[0, :, 0].tolist()
    [3, 6, 9]
    """
    if lhs.dtype != jnp.int8 or rhs.dtype != jnp.int8:
        raise TypeError(f"int8_conv needs int8 lhs and rhs, got {lhs.dtype} and {rhs.dtype}")
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    layout = Int8ConvLayout(dn)
    out = lax.conv_general_dilated(
        layout.lhs(lhs),
        layout.rhs(rhs),
        **layout.conv_params(window_strides, padding, lhs_dilation, rhs_dilation),
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count,
        precision=precision,
        preferred_element_type=jnp.int32,
    )
    return layout.restore(out)


def _int_layout(st: _ConvStatic, lhs, rhs, qp_l, qp_r):
    """The conv in :class:`Int8ConvLayout`: the new ``(st, lhs, rhs, qp_l, qp_r)`` and a
    function that maps the output back."""
    layout = Int8ConvLayout(st.dimension_numbers)
    spatial = layout.conv_params(st.window_strides, st.padding, st.lhs_dilation, st.rhs_dilation)
    st2 = dataclasses.replace(st, **spatial)
    qp_l = QParams(*(layout.lhs(a) for a in (qp_l.scale, qp_l.zero_point)))
    qp_r = QParams(*(layout.rhs(a) for a in (qp_r.scale, qp_r.zero_point)))
    return (st2, layout.lhs(lhs), layout.rhs(rhs), qp_l, qp_r), layout.restore


def _conv_int(st: _ConvStatic, lhs, rhs, qp_l, qp_r):
    qp_l, qp_r = nan_if_invalid(qp_l), nan_if_invalid(qp_r)  # bad traced QParams: NaN out
    args, restore = _int_layout(st, lhs, rhs, qp_l, qp_r)
    return restore(_conv_int_channels_last(*args))


def _conv_int_channels_last(st: _ConvStatic, lhs, rhs, qp_l, qp_r):
    lhs_spec, rhs_spec, out_spec = st.dimension_numbers
    out_ndim = lhs.ndim

    def along(a, src_ndim, src_dim, out_dim):  # a per-axis vector -> output layout
        a = prep.expand_to(a, src_ndim)
        shape = [1] * out_ndim
        shape[out_dim] = a.shape[src_dim]
        return a.reshape(shape)

    q_l, z_l = prep.int8_codes(lhs, qp_l, st.lhs_quant)
    q_r, z_r = prep.int8_codes(rhs, qp_r, st.rhs_quant)
    int_conv = functools.partial(st.op, preferred_element_type=jnp.int32, precision=None)
    groups, n_out = st.feature_group_count, rhs.shape[rhs_spec[0]]

    def window_sums(q):  # sum of q over each window and input group, per output channel
        ones = jnp.ones((*rhs.shape[:-1], groups), jnp.int8)  # channels last: HWIO
        return jnp.repeat(int_conv(q, ones), n_out // groups, axis=out_spec[1])

    # NaN has no int8 code: every window that holds a NaN input (for the output channels of its
    # group), every output channel with a NaN weight, and NaN zero points give NaN outputs
    # (the window count is a conv as costly as a depthwise one: skipped unless a NaN is there)
    def count_nan_windows(nan_l):
        if st.batch_group_count == 1:
            return window_sums(nan_l) > 0
        # one output feature per kernel: count the NaN taps with an all-ones kernel
        return int_conv(nan_l, jnp.ones(rhs.shape, jnp.int8)) > 0

    # (the predicate isnan(sum(x)) reads x once and writes no mask; it is also true for +-inf
    # summing to NaN, where the branch finds no NaN window: the same outputs)
    def nan_windows_of(x):
        return count_nan_windows(jnp.isnan(x).astype(jnp.int8))

    no_nan = jax.eval_shape(nan_windows_of, lhs)
    nan_windows = lax.cond(
        jnp.isnan(jnp.sum(lhs)),
        nan_windows_of,
        lambda _: jnp.zeros(no_nan.shape, no_nan.dtype),
        lhs,
    )
    z_r = None if z_r is None else along(z_r, rhs.ndim, rhs_spec[0], out_spec[1])
    lhs_dilated = st.lhs_dilation is not None and any(d != 1 for d in st.lhs_dilation)
    if z_l is None:
        acc = int_conv(q_l, q_r)
        if z_r is not None:
            acc = acc - z_r * window_sums(q_l)
    elif z_l.size == 1 and not lhs_dilated:
        # Real padding is 0, i.e. the code z_l, but the conv pads the codes with 0 (XLA's own
        # padding: faster than a conv on codes padded with z_l). So z_l is subtracted over the
        # taps of each window that hit real inputs only: the kernel sums over those taps.
        z = z_l.reshape(())
        real = _real_taps(st, lhs.shape, rhs.shape)
        ksum = jnp.sum(q_r, rhs_spec[1], jnp.int32)  # (*window, out features)
        acc = int_conv(q_l, q_r) - z * _sum_over_real_taps(ksum, real)
        if z_r is not None:  # window sums of (q_l - z_l): z_l times the real taps' count
            count = functools.reduce(np.multiply.outer, [r.sum(1) for r in real])
            count = (count * rhs.shape[rhs_spec[1]]).astype(np.int32)[..., None]
            acc = acc - z_r * (window_sums(q_l) - z * count)
    else:
        # Per-sample zero points or input dilation: the corrections count, per output position,
        # only the kernel taps that hit real (not padded, not inserted) inputs: convs of ones.
        ones_shape = list(lhs.shape)
        ones_shape[lhs_spec[0]] = st.batch_group_count
        ones_l = jnp.ones(ones_shape, jnp.int8)
        z_l = along(z_l, lhs.ndim, lhs_spec[0], out_spec[0])
        acc = int_conv(q_l, q_r) - z_l * int_conv(ones_l, q_r)
        if z_r is not None:
            acc = acc - z_r * (window_sums(q_l) - z_l * window_sums(ones_l))
    scale = along(qp_l.scale, lhs.ndim, lhs_spec[0], out_spec[0]) * along(
        qp_r.scale, rhs.ndim, rhs_spec[0], out_spec[1]
    )
    out = scale * acc.astype(jnp.float32)
    nan_zl = along(jnp.isnan(qp_l.zero_point), lhs.ndim, lhs_spec[0], out_spec[0])
    rhs_axes = tuple(d for d in range(rhs.ndim) if d != rhs_spec[0])
    nan_r = jnp.any(jnp.isnan(rhs), rhs_axes) | jnp.isnan(qp_r.zero_point).reshape(-1)
    nan_r = along(nan_r, 1, 0, out_spec[1])
    out = jnp.where(nan_windows | nan_zl | nan_r, jnp.nan, out)
    return out.astype(prep.out_dtype(lhs, rhs, st.preferred_element_type))


def _slice_qparams(qp: QParams, axis: int, ndim: int, i: int) -> QParams:
    """Block ``i``'s (ordinary) QParams of a block-wise ``qp`` along ``axis``."""
    if qp.block_size is None:
        return qp

    def take(a):
        a = prep.expand_to(a, ndim)
        return a if a.shape[axis] == 1 else jax.lax.slice_in_dim(a, i, i + 1, axis=axis)

    return QParams(take(qp.scale), take(qp.zero_point))


def _conv_int_blocks(st: _ConvStatic, lhs, rhs, qp_l, qp_r, accumulator):
    """``mode="int"`` with block-wise scales along the input features: one int8 conv per
    block of ``B`` input channels (an int32 partial sum), rescaled and summed in float32."""
    ls, rs = st.dimension_numbers.lhs_spec[1], st.dimension_numbers.rhs_spec[1]
    prep.check_int_blocks("lhs", st.lhs_quant, lhs.ndim, (ls,), "input-feature")
    prep.check_int_blocks("rhs", st.rhs_quant, rhs.ndim, (rs,), "input-feature")
    sizes = {c.block_size for c in (st.lhs_quant, st.rhs_quant) if prep.is_blocked(c)}
    if len(sizes) != 1:
        raise ValueError(f"mode='int': lhs and rhs blocks must have the same size, got {sizes}")
    if st.feature_group_count != 1 or st.batch_group_count != 1:
        raise ValueError(
            "mode='int' with block-wise scales needs feature_group_count = batch_group_count "
            f"= 1, got {st.feature_group_count} and {st.batch_group_count}"
        )
    (size,) = sizes
    qp_l = prep.resolve_qparams(
        lhs, st.lhs_quant, prep.given_qparams("lhs", lhs, st.lhs_quant, qp_l)
    )
    qp_r = prep.resolve_qparams(
        rhs, st.rhs_quant, prep.given_qparams("rhs", rhs, st.rhs_quant, qp_r)
    )
    unblocked = {
        f"{k}_quant": dataclasses.replace(
            getattr(st, f"{k}_quant"), block_size=None, block_axis=None
        )
        for k in ("lhs", "rhs")
    }
    kw = {f.name: getattr(st, f.name) for f in dataclasses.fields(st)} | unblocked
    kw.pop("out_sharding")
    out = 0.0
    n_in = lhs.shape[ls]
    for i in range(-(-n_in // size)):  # the last block may be partial
        part = conv_general_dilated(
            lax.slice_in_dim(lhs, i * size, min((i + 1) * size, n_in), axis=ls),
            lax.slice_in_dim(rhs, i * size, min((i + 1) * size, n_in), axis=rs),
            lhs_qparams=_slice_qparams(qp_l, ls, lhs.ndim, i),
            rhs_qparams=_slice_qparams(qp_r, rs, rhs.ndim, i),
            mode="int",
            accumulator=accumulator,
            **kw,
        )
        out = out + part.astype(jnp.float32)
    return out.astype(part.dtype)


def conv_general_dilated(
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
    mode: str = "simulate",
    accumulator: str = "int32",
    lhs_quant: QuantConfig | None = None,
    rhs_quant: QuantConfig | None = None,
    lhs_qparams: QParams | None = None,
    rhs_qparams: QParams | None = None,
    out_sharding=None,
    key: jax.Array | None = None,
) -> jax.Array:
    """``lax.conv_general_dilated(fq(lhs), fq(rhs), ...)`` with per-side fake quantizers.

    ``mode="int"`` computes ``s_l s_r conv(q_l - z_l, q_r)`` with int8 codes and an int32
    accumulator. Padding is 0 in the real domain, i.e. the code ``z_l``: the conv pads the
    codes with 0 and ``z_l`` times the kernel's sum over each window's real (unpadded) taps is
    subtracted (per-sample zero points and input dilation subtract ``z_l * conv(1, q_r)``
    instead). A weight zero point ``z_r`` subtracts ``z_r * (window sums of q_l - z_l *
    real taps)``, the window sums being a conv with an all-ones kernel (one output per feature
    group). It needs both configs, static integer formats of
    <= 8 bits, ``lhs`` QParams constant except along the batch axis, ``rhs`` QParams constant
    except along the output features, and a symmetric signed ``rhs`` if ``batch_group_count >
    1``.

    Block-wise configs (``QuantConfig(block_size=B)``) default their ``block_axis`` to the
    input-feature axis; ``"int"`` mode then runs one int8 conv per block of ``B`` input
    channels (``feature_group_count = 1``) and sums the rescaled partial results in float32.

    Arguments are those of ``lax.conv_general_dilated`` plus ``lhs_quant``, ``rhs_quant``,
    ``lhs_qparams``, ``rhs_qparams``, ``mode``, ``accumulator`` and ``key`` as in
    :func:`dot_general`;
    the contraction size of the overflow bound is ``K = rhs.size / out_features`` (the taps of
    one output). Gradients in
    both modes are those of ``"simulate"``; grouped and depthwise convs
    (``feature_group_count``) work in both.
    """
    lhs, rhs = prep.check_operands(lhs, rhs, lhs_quant, rhs_quant, mode, accumulator, key)
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
    st = _ConvStatic(
        window_strides=prep.tuple_or_none("window_strides", window_strides),
        padding=padding,
        lhs_dilation=prep.tuple_or_none("lhs_dilation", lhs_dilation),
        rhs_dilation=prep.tuple_or_none("rhs_dilation", rhs_dilation),
        dimension_numbers=dn,
        feature_group_count=int(feature_group_count),
        batch_group_count=int(batch_group_count),
        precision=precision,
        preferred_element_type=preferred_element_type,
        lhs_quant=lhs_quant,
        rhs_quant=rhs_quant,
        out_sharding=out_sharding,
    )

    st = dataclasses.replace(
        st,
        lhs_quant=prep.default_block_axis("lhs", lhs_quant, (dn.lhs_spec[1],), "feature"),
        rhs_quant=prep.default_block_axis("rhs", rhs_quant, (dn.rhs_spec[1],), "feature"),
    )
    lhs_quant, rhs_quant = st.lhs_quant, st.rhs_quant
    if mode == "int" and (prep.is_blocked(lhs_quant) or prep.is_blocked(rhs_quant)):
        if out_sharding is not None:
            raise ValueError("mode='int' with block-wise scales does not take out_sharding")
        return _conv_int_blocks(st, lhs, rhs, lhs_qparams, rhs_qparams, accumulator)

    def geometry() -> prep.IntGeometry:
        if prep.has_zero_point(rhs_quant) and batch_group_count != 1:
            raise ValueError(
                f"mode='int' conv with batch_group_count={batch_group_count} needs rhs "
                f"(weights) without zero point: symmetric with a signed format, got {rhs_quant}"
            )
        lhs_varying = (dn.lhs_spec[0],) if st.batch_group_count == 1 else ()
        return prep.IntGeometry(
            rhs.size // rhs.shape[dn.rhs_spec[0]],
            tuple(d for d in range(lhs.ndim) if d not in lhs_varying),
            tuple(d for d in range(rhs.ndim) if d != dn.rhs_spec[0]),
            "axes other than the batch axis",
            "axes other than the output-feature axis",
        )

    return prep.run(
        st, lhs, rhs, lhs_qparams, rhs_qparams, mode, accumulator, _conv_int, geometry, key
    )


quantized_conv_general_dilated = prep.config_factory(
    conv_general_dilated,
    "quantized_conv_general_dilated",
    """A ``lax.conv_general_dilated`` look-alike for ``flax.linen.Conv(conv_general_dilated=
    ...)`` / ``nnx.Conv``: :func:`conv_general_dilated` with these configs bound.""",
)
