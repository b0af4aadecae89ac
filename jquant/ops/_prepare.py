"""The preamble and dispatch that :func:`jquant.ops.dot_general` and
:func:`jquant.ops.conv_general_dilated` share: argument checks, the int8 requirements (static
<= 8-bit formats, QParams constant where they must factor out, int32 overflow), given or
dynamic QParams, int8 codes, and the int forward with the simulate mode's gradient.

Private to ``jquant.ops``: its modules import these names; nothing outside the package does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jquant.formats import format_name
from jquant.integer.checks import centered_code_bound, check_int32_bound, product_bound
from jquant.quant import (
    QParams,
    QuantConfig,
    block_qparams,
    block_view,
    check_config,
    check_qparams,
    dynamic_qparams,
    fake_quant_config,
    quantize,
    to_blocks,
)

MODES = ("simulate", "int")
# "int32": exact int32 accumulation, refused at trace time when the worst case can exceed
# 2^31 - 1; "int32_wrap": the user accepts two's-complement wrap-around (modulo 2^32).
ACCUMULATORS = ("int32", "int32_wrap")


def check_mode(mode) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def check_accumulator_name(accumulator) -> None:
    if accumulator not in ACCUMULATORS:
        raise ValueError(f"accumulator must be one of {ACCUMULATORS}, got {accumulator!r}")


def check_operand(name: str, x, cfg: QuantConfig | None) -> None:
    """TypeError unless a quantized operand is a float array (integers would be truncated by
    nothing and complex values would lose their imaginary part)."""
    if cfg is not None and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"{name} is quantized ({name}_quant is set), so it must be a float array "
            f"(float16, bfloat16, float32, ...), got dtype {x.dtype}"
        )


def check_overflow(k: int, lhs_quant: QuantConfig, rhs_quant: QuantConfig, accumulator) -> None:
    """ValueError unless ``K * max|q_l - z_l| * max|q_r - z_r|`` fits in int32 (or the user
    accepted wrap-around with ``accumulator="int32_wrap"``)."""
    if accumulator == "int32_wrap":
        return
    cl = centered_code_bound(lhs_quant.fmt, zero_point=has_zero_point(lhs_quant))
    cr = centered_code_bound(rhs_quant.fmt, zero_point=has_zero_point(rhs_quant))
    try:
        check_int32_bound(
            product_bound(k, cl, cr),
            f"K * max|q_l - z_l| * max|q_r - z_r| = {k} * {cl} * {cr} (contraction size "
            f"K = {k}, lhs {lhs_quant.fmt}, rhs {rhs_quant.fmt})",
        )
    except ValueError as e:
        raise ValueError(
            f"mode='int': {e}; pass accumulator='int32_wrap' to accept wrap-around modulo "
            f"2^32, split the contraction, or use mode='simulate'"
        ) from None


def given_qparams(name: str, x, cfg: QuantConfig | None, qp: QParams | None):
    """Validated given QParams (float32 arrays), or None (dynamic, or not quantized)."""
    if cfg is None:
        if qp is not None:
            raise ValueError(f"{name}_qparams was given but {name}_quant is None")
        return None
    if qp is None:
        return None
    if not isinstance(qp, QParams):
        raise TypeError(f"{name}_qparams must be a jquant.QParams or None, got {qp!r}")
    if cfg.scales_itself:
        raise ValueError(
            f"{name}_quant.fmt is the block format {format_name(cfg.fmt)}, which computes its "
            f"own block scales: {name}_qparams must be None"
        )
    if cfg.block_size is not None:
        qp = given_block_qparams(name, x, cfg, qp)
    check_qparams(x, qp, cfg.fmt)
    qp = dataclasses.replace(
        qp,
        scale=jnp.asarray(qp.scale, jnp.float32),
        zero_point=jnp.asarray(qp.zero_point, jnp.float32),
    )
    if cfg.symmetric:
        zp = qp.zero_point
        if not isinstance(zp, jax.core.Tracer) and np.any(np.asarray(zp) != 0):
            raise ValueError(
                f"{name}_quant is symmetric, so {name}_qparams.zero_point must be 0, got {zp}"
            )
    return qp


# --- block-wise operands ----------------------------------------------------------------------


def default_block_axis(name: str, cfg: QuantConfig | None, axes: tuple[int, ...], what: str):
    """``cfg`` with ``block_axis`` set to the op's single ``axes`` entry (its contracting or
    input-feature axis) when the config is block-wise (or a block format) and leaves it None."""
    if cfg is None or cfg.block_axis is not None or not cfg.is_blockwise:
        return cfg
    if len(axes) != 1:
        raise ValueError(
            f"{name}_quant.block_size is set but block_axis is None and the op has {len(axes)} "
            f"{what} axes {axes}: set {name}_quant.block_axis"
        )
    return cfg.with_block_axis(axes[0])


def given_block_qparams(name: str, x, cfg: QuantConfig, qp: QParams) -> QParams:
    """A given QParams for a block-wise config: block-shaped scales gain the config's block;
    a QParams that is block-wise already must agree with it."""
    axis = cfg.block_axis_for(x.ndim)
    if qp.block_size is None:
        return block_qparams(qp, cfg.block_size, axis)
    if qp.block_size != cfg.block_size or qp.block_axis % x.ndim != axis:
        raise ValueError(
            f"{name}_qparams has blocks of {qp.block_size} along axis {qp.block_axis} but "
            f"{name}_quant asks for blocks of {cfg.block_size} along axis {axis}"
        )
    return qp


def is_blocked(cfg: QuantConfig | None) -> bool:
    return cfg is not None and cfg.block_size is not None


def split_blocks(name: str, x, cfg: QuantConfig | None, qp: QParams | None, axis: int, size: int):
    """The int-mode view of one operand of a block-wise product: ``x`` with ``axis`` split
    into ``(n, size)`` (:func:`jquant.quant.to_blocks`), its config without blocks but kept
    along the new block-index axis ``axis`` (when it was block-wise), and its QParams (given
    ones reshaped by :func:`jquant.quant.block_view`; None stays dynamic). A partial last
    block is padded with zeros: their centred codes are 0, so they add nothing to the sums.

    Returns ``(xb, cfg, qp, shift)``, ``shift(d)`` the new index of the old axis ``d``.
    """

    def shift(d: int) -> int:
        return d + (d > axis)

    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, -x.shape[axis] % size)  # a partial last block: zeros add nothing
    padded = jnp.pad(x, pad)
    if cfg is None:
        return to_blocks(padded, axis, size), None, None, shift
    kept = tuple(shift(d) for d in cfg.axes(x.ndim))
    if cfg.block_size is not None:
        new_axis = kept + (axis,)
    else:
        new_axis = kept or None
    new_cfg = dataclasses.replace(cfg, block_size=None, block_axis=None, axis=new_axis)
    if qp is not None and qp.block_size is None:
        qp = block_qparams(qp, size, axis)  # constant along the axis: the same in every block
    if qp is None:
        xb = to_blocks(padded, axis, size)
    else:
        xb, qp = block_view(x, qp)
    return xb, new_cfg, qp, shift


def check_int_blocks(name: str, cfg: QuantConfig | None, ndim: int, axes, what: str):
    """``(position in axes, block size)`` of a block-wise operand in ``"int"`` mode, or None;
    ValueError unless its block axis is one of the op's ``axes`` (the contraction)."""
    if not is_blocked(cfg):
        return None
    ax = cfg.block_axis_for(ndim)
    if ax not in axes:
        raise ValueError(
            f"mode='int' sums an int32 partial product per block: {name}_quant.block_axis "
            f"{cfg.block_axis} must be a {what} axis {tuple(axes)}"
        )
    return list(axes).index(ax), cfg.block_size


def qparams_shape(x, cfg: QuantConfig, qp: QParams | None) -> tuple[int, ...]:
    """Shape of the QParams that ``x`` will use (dynamic ones: size 1 on the reduced axes)."""
    if qp is not None:
        return qp.shape
    kept = cfg.axes(x.ndim)
    return tuple(n if a in kept else 1 for a, n in enumerate(x.shape))


def resolve_qparams(x, cfg: QuantConfig | None, qp: QParams | None):
    """Given QParams, else dynamic ones (None: float, or a block format's own scales)."""
    if cfg is None or cfg.scales_itself:
        return None
    return dynamic_qparams(x, cfg) if qp is None else qp


def fake_quant_operand(x, qp: QParams | None, cfg: QuantConfig | None, key=None):
    """``fq(x)`` as ``cfg`` says (:func:`jquant.quant.fake_quant_config`); x if None."""
    if cfg is None:
        return x
    return fake_quant_config(x, cfg, qp, key=key)


def operand_keys(key, lhs_quant: QuantConfig | None, rhs_quant: QuantConfig | None):
    """``(k_lhs, k_rhs)`` for stochastic rounding: ``jax.random.split(key)``, None for a side
    that does not round stochastically; ValueError for a missing key or one nobody uses."""
    stochastic = [c is not None and c.rounding == "stochastic" for c in (lhs_quant, rhs_quant)]
    if key is None:
        if any(stochastic):
            side = "lhs" if stochastic[0] else "rhs"
            raise ValueError(
                f"{side}_quant.rounding='stochastic' needs key= (a jax.random key; split it "
                "per step)"
            )
        return None, None
    if not any(stochastic):
        raise ValueError(
            "key is given but neither lhs_quant nor rhs_quant has rounding='stochastic'"
        )
    k_l, k_r = jax.random.split(key)
    return (k_l if stochastic[0] else None), (k_r if stochastic[1] else None)


# --- int8 operands ----------------------------------------------------------------------------


def check_int_config(name: str, cfg: QuantConfig | None) -> None:
    if cfg is None:
        raise ValueError(
            f"mode='int' quantizes both operands: {name}_quant must be a QuantConfig, got None"
        )
    fmt = cfg.fmt
    if cfg.scales_itself:
        raise ValueError(
            f"mode='int' has no integer kernel for the block format {format_name(fmt)} of "
            f"{name}_quant.fmt: use mode='simulate' (jquant.mx.fake_quant)"
        )
    if cfg.rounding == "stochastic":
        raise ValueError(
            f"mode='int' rounds deterministically: {name}_quant.rounding='stochastic' needs "
            "mode='simulate'"
        )
    if not fmt.is_static:
        raise ValueError(
            f"mode='int' needs a static bit width (a Python int) for {name}_quant.fmt, got "
            f"traced bits {fmt.bits!r}; sweep traced widths with mode='simulate'"
        )
    if not getattr(fmt, "supports_int_kernel", False):
        raise ValueError(
            f"mode='int' needs a static integer format of <= 8 bits (not midrise) for "
            f"{name}_quant.fmt, got {fmt}; use mode='simulate'"
        )


def has_zero_point(cfg: QuantConfig) -> bool:
    """Whether the int8 codes of this operand carry a (possibly) non-zero zero point."""
    return not (cfg.symmetric and cfg.fmt.signed)


def int8_codes(x, qp: QParams, cfg: QuantConfig):
    """``(q, z)``: int8 codes and the int32 zero point (or None) with ``x ~ s (q - z)``.

    Unsigned grids are shifted by ``2^(b-1)`` onto the signed grid of the same width.
    """
    fmt = cfg.fmt
    if not fmt.signed:  # an int-kernel format: an integer grid
        half = float(1 << (fmt.bits - 1))
        qp = QParams(qp.scale, qp.zero_point - half)
        fmt = dataclasses.replace(fmt, signed=True)
    q = quantize(x, qp, fmt, rounding=cfg.rounding).astype(jnp.int8)
    z = jnp.round(qp.zero_point).astype(jnp.int32) if has_zero_point(cfg) else None
    return q, z


def expand_to(a, ndim: int):
    """Left-pads ``a``'s shape with ones up to rank ``ndim``."""
    a = jnp.asarray(a)
    return a.reshape((1,) * (ndim - a.ndim) + a.shape)


def check_constant_along(name: str, qp_shape, ndim: int, axes, what: str) -> None:
    """Raises unless scale and zero point have size 1 along ``axes`` (they must factor out)."""
    shape = (1,) * (ndim - len(qp_shape)) + tuple(qp_shape)
    bad = [a for a in axes if shape[a] != 1]
    if bad:
        raise ValueError(
            f"mode='int' needs {name}'s scale/zero point to be constant along {what} {bad} "
            f"(got shape {tuple(qp_shape)}); quantize per tensor or per non-contracting axis"
        )


def out_dtype(lhs, rhs, preferred_element_type):
    if preferred_element_type is None:
        return jnp.result_type(lhs, rhs)
    dtype = jnp.dtype(preferred_element_type)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"preferred_element_type must be a float dtype or None for quantized ops, got {dtype}"
        )
    return dtype


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def int_with_simulated_grad(int_fn, sim_fn, static, lhs, rhs, qp_l, qp_r):
    """``int_fn(...)`` forward, ``sim_fn``'s vjp backward (the simulate mode's estimators)."""
    return int_fn(static, lhs, rhs, qp_l, qp_r)


def _int_fwd(int_fn, sim_fn, static, lhs, rhs, qp_l, qp_r):
    return int_fn(static, lhs, rhs, qp_l, qp_r), (lhs, rhs, qp_l, qp_r)


def _int_bwd(int_fn, sim_fn, static, res, g):
    # The primal output of this vjp is unused, so XLA drops the float product from backward.
    _, vjp = jax.vjp(functools.partial(sim_fn, static), *res)
    return vjp(g)


int_with_simulated_grad.defvjp(_int_fwd, _int_bwd)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProductStatic:
    """The static (hashable) part of a quantized product that its two ops share: the lax
    arguments every product takes and both sides' configs. A subclass adds its op's geometry
    and ``op(lhs, rhs, **overrides)``, the lax call."""

    precision: object
    preferred_element_type: object
    lhs_quant: QuantConfig | None
    rhs_quant: QuantConfig | None
    out_sharding: object = None

    def lax_kwargs(self) -> dict:
        """``precision``, ``preferred_element_type`` and, when set, ``out_sharding``."""
        kw = dict(precision=self.precision, preferred_element_type=self.preferred_element_type)
        # Passed only when set: older jax releases have no out_sharding argument.
        return kw if self.out_sharding is None else kw | {"out_sharding": self.out_sharding}


def tuple_or_none(name: str, v):
    if v is None:
        return None
    try:
        return tuple(int(i) for i in v)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of ints or None, got {v!r}") from None


# --- the shared preamble ----------------------------------------------------------------------


def check_operands(lhs, rhs, lhs_quant, rhs_quant, mode, accumulator, key=None):
    """The checks every quantized product starts with; ``(lhs, rhs)`` as arrays."""
    check_mode(mode)
    if mode == "int" and key is not None:
        raise ValueError("key is given but mode='int' rounds deterministically")
    check_accumulator_name(accumulator)
    check_config("lhs_quant", lhs_quant)
    check_config("rhs_quant", rhs_quant)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    check_operand("lhs", lhs, lhs_quant)
    check_operand("rhs", rhs, rhs_quant)
    return lhs, rhs


@dataclasses.dataclass(frozen=True)
class IntGeometry:
    """What ``mode="int"`` asks of one product's geometry.

    ``contraction`` is ``K``, the number of terms summed into one output (the int32 bound is
    ``K * max|q_l - z_l| * max|q_r - z_r|``); each side's scale and zero point must have size 1
    along its ``*_constant`` axes (described by ``*_what`` in errors) so that they factor out.
    """

    contraction: int
    lhs_constant: tuple[int, ...]
    rhs_constant: tuple[int, ...]
    lhs_what: str
    rhs_what: str


def simulate(st: ProductStatic, lhs, rhs, qp_l, qp_r, key=None):
    """``st.op(fq(lhs), fq(rhs))``: the float op on fake-quantized operands (stochastic
    rounding: ``lhs`` from ``jax.random.split(key)[0]``, ``rhs`` from ``[1]``)."""
    k_l, k_r = operand_keys(key, st.lhs_quant, st.rhs_quant)
    return st.op(
        fake_quant_operand(lhs, qp_l, st.lhs_quant, k_l),
        fake_quant_operand(rhs, qp_r, st.rhs_quant, k_r),
    )


def run(
    st: ProductStatic,
    lhs,
    rhs,
    lhs_qparams: QParams | None,
    rhs_qparams: QParams | None,
    mode: str,
    accumulator: str,
    int_fn: Callable,
    int_geometry: Callable[[], IntGeometry],
    key=None,
):
    """Checks the QParams (and, in ``"int"`` mode, the int8 requirements), resolves dynamic
    QParams and runs :func:`simulate` or ``int_fn`` (with the simulate mode's gradient).

    ``st`` is the op's :class:`ProductStatic`; ``key`` the PRNG key of stochastic rounding.
    ``int_geometry`` is called in ``"int"`` mode only, after the configs are checked (it may
    raise for requirements of its own).
    """
    lhs_quant, rhs_quant = st.lhs_quant, st.rhs_quant
    if mode == "int":
        check_int_config("lhs", lhs_quant)
        check_int_config("rhs", rhs_quant)
        geometry = int_geometry()
        out_dtype(lhs, rhs, st.preferred_element_type)
        check_overflow(geometry.contraction, lhs_quant, rhs_quant, accumulator)
    qp_l = given_qparams("lhs", lhs, lhs_quant, lhs_qparams)
    qp_r = given_qparams("rhs", rhs, rhs_quant, rhs_qparams)
    if mode == "int":
        check_constant_along(
            "lhs",
            qparams_shape(lhs, lhs_quant, qp_l),
            lhs.ndim,
            geometry.lhs_constant,
            geometry.lhs_what,
        )
        check_constant_along(
            "rhs",
            qparams_shape(rhs, rhs_quant, qp_r),
            rhs.ndim,
            geometry.rhs_constant,
            geometry.rhs_what,
        )
    qp_l, qp_r = resolve_qparams(lhs, lhs_quant, qp_l), resolve_qparams(rhs, rhs_quant, qp_r)
    if mode == "simulate":
        return simulate(st, lhs, rhs, qp_l, qp_r, key)
    return int_with_simulated_grad(int_fn, simulate, st, lhs, rhs, qp_l, qp_r)


def config_factory(op: Callable[..., jax.Array], name: str, doc: str) -> Callable:
    """A drop-in factory named ``name``: ``factory(lhs, rhs, mode, ...)`` checks its arguments
    and returns ``functools.partial(op, lhs_quant=lhs, rhs_quant=rhs, ...)``, which keeps
    ``op``'s ``lax`` signature (for ``flax.linen.Dense(dot_general=...)`` and the like)."""

    def factory(
        lhs: QuantConfig | None,
        rhs: QuantConfig | None,
        mode: str = "simulate",
        lhs_qparams: QParams | None = None,
        rhs_qparams: QParams | None = None,
        accumulator: str = "int32",
    ) -> Callable[..., jax.Array]:
        check_mode(mode)
        check_accumulator_name(accumulator)
        check_config("lhs", lhs)
        check_config("rhs", rhs)
        return functools.partial(
            op,
            lhs_quant=lhs,
            rhs_quant=rhs,
            lhs_qparams=lhs_qparams,
            rhs_qparams=rhs_qparams,
            mode=mode,
            accumulator=accumulator,
        )

    factory.__name__ = factory.__qualname__ = name
    factory.__module__ = op.__module__
    factory.__doc__ = doc
    return factory
