"""Quantization error of tensors against bit width, format family, granularity and calibration.

For every array ``x`` in a pytree and every combination of the options, each width ``b`` gives::

    fmt      = IntFormat(b)                      (family "int"; "midrise": no zero level)
    rmin, rmax = calibrate(x)                    over all axes (per_tensor) or all but the
                                                 channel axis (per_channel)
    qp       = qparams_from_range(rmin, rmax, fmt, symmetric=symmetric)
    y        = scale * (clip(round(x / scale) + zp, qmin, qmax) - zp)
    row      = mse, rmse, sqnr_db, cosine, max_abs of (x, y)        (jquant.metrics)

``per_block`` keeps one range per block of ``block_size`` consecutive elements along
``block_axis`` (and per channel): block-wise QParams. The block formats of :mod:`jquant.mx`
(``"mxfp4"``, ``"mxfp8_e4m3"``, ..., ``"nvfp4"``, ``"nf4"``) are families too: one width each
(their element bits), their own blocks and scales (``jquant.mx.fake_quant`` along
``block_axis``), so granularity and calibration do not apply to them.

Integer widths are swept in one compiled program per (tensor shape, options) with traced
``bits`` (:func:`jquant.sweep.sharding.map_over_bits`: chunked, sharded over local devices).
Named float formats (``"fp8_e4m3"``, ...) are families too; they have one width each.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jquant import calibration, metrics, mx
from jquant.formats import NAMED_FORMATS, Format, IntFormat, check_format
from jquant.nn.rules import parse_granularity
from jquant.quant import QParams, block_qparams, fake_quant_forward, qparams_from_range
from jquant.sweep.results import Table
from jquant.sweep.sharding import check_bits_list, map_over_bits, peak_bytes

__all__ = [
    "CALIBRATIONS",
    "GRANULARITIES",
    "INT_FAMILIES",
    "QuantSpec",
    "check_options",
    "error_vs_bits",
    "fake_quant_tensor",
    "tensor_items",
]

GRANULARITIES = ("per_tensor", "per_channel", "per_block")
INT_FAMILIES = ("int", "midrise")
FLOAT_FAMILIES = tuple(k for k, v in NAMED_FORMATS.items() if jnp.issubdtype(v.dtype, jnp.floating))
BLOCK_FAMILIES = tuple(mx.FORMATS)


def element_bits(fmt: mx.BlockFormat) -> int:
    """Bits per element of a block format (scales not counted): ``1 + E + M`` for a
    minifloat, 8 for MXINT8, 4 for NF4's level index."""
    if fmt.exponent_bits:
        return 1 + fmt.exponent_bits + fmt.mantissa_bits
    return 8 if fmt.element is np.int8 else 4


METRIC_NAMES = ("mse", "rmse", "sqnr_db", "cosine", "max_abs")


# The built-in one-shot calibration names (the registry of jquant.calibration owns them).
CALIBRATIONS = calibration.observer_names(one_shot=True)


def calibrated_range(method, x: jax.Array, fmt: Format, axis: int | None, symmetric: bool):
    """``(rmin, rmax)`` of ``x`` by ``method`` (a calibration method or its name); ``axis``
    keeps its own range (None: tensor)."""
    return calibration.observed_range(method, x, fmt, axis=axis, symmetric=symmetric)


def _family_label(family) -> str:
    return family if isinstance(family, str) else getattr(family, "name", None) or repr(family)


def _check_choice(name: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized, apart from the width (hashable: static under jit).

    Args:
      family: ``"int"`` (signed integer grid), ``"midrise"`` (no zero level, symmetric), a
        float format name from ``jquant.NAMED_FORMATS`` (``"fp8_e4m3"``, ...) or a format
        object (any ``jquant.formats.Format``; swept over ``bits`` through its ``with_bits``,
        else one width). A block format of :mod:`jquant.mx` (``"mxfp4"``, ``"nvfp4"``,
        ``"nf4"``, ...) has its own blocks and scales: its granularity is ``"per_block"`` with
        the format's block size, and ``calibration`` is not used.
      granularity: ``"per_tensor"``, ``"per_channel"`` (one range per index of
        ``channel_axis``) or ``"per_block"`` (per channel and per block of ``block_size``
        elements along ``block_axis``); ``"per_block:32"`` sets ``block_size`` too.
      calibration: range estimator, a calibration method of ``jquant.calibration`` (an object
        with ``init`` / ``update`` / ``result`` / ``bounds``) or a name of ``CALIBRATIONS``;
        stored as the object.
      symmetric: ``zero_point = 0`` and ``scale = max|r| / qmax``; else affine.
      channel_axis: the axis that keeps its own range for ``per_channel`` (Flax kernels keep
        their output features last: ``-1``).
      block_size: elements per range along ``block_axis`` for ``per_block``.
      block_axis: the axis blocks run along (Flax kernels' input features: ``-2``; a
        vector's only axis when the tensor has rank 1). When ``block_size`` does not divide
        it the last block is partial (block formats too: zero padding, cropped).
    """

    family: str | Format = "int"
    granularity: str = "per_tensor"
    calibration: Any = "minmax"
    symmetric: bool = True
    channel_axis: int = -1
    block_size: int = 32
    block_axis: int = -2

    def __post_init__(self):
        if isinstance(self.family, str):
            _check_choice("family", self.family, INT_FAMILIES + FLOAT_FAMILIES + BLOCK_FAMILIES)
        else:
            check_format(self.family, "family")
        name, size = parse_granularity(self.granularity) if ":" in self.granularity else (None, 0)
        if size:  # "per_block:32"
            object.__setattr__(self, "granularity", name)
            object.__setattr__(self, "block_size", size)
        _check_choice("granularity", self.granularity, GRANULARITIES)
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"block_size must be a positive int, got {b!r}")
        if isinstance(self.block_axis, bool) or not isinstance(self.block_axis, int):
            raise TypeError(f"block_axis must be an int, got {self.block_axis!r}")
        if self.is_block_format and (self.granularity, b) != (
            "per_block",
            self.block_format.block_size,
        ):
            raise ValueError(
                f"family {self.family!r} has its own blocks: granularity must be 'per_block' "
                f"with block_size {self.block_format.block_size}, got {self.granularity!r}, {b}"
            )
        method = calibration.get_observer(self.calibration)
        if not getattr(method, "one_shot", True):
            raise ValueError(
                f"calibration must be one of {CALIBRATIONS} or an observer, got {method!r} "
                "(it does not calibrate whole tensors)"
            )
        object.__setattr__(self, "calibration", method)
        if not isinstance(self.symmetric, bool):
            raise TypeError(f"symmetric must be a bool, got {self.symmetric!r}")
        if isinstance(self.channel_axis, bool) or not isinstance(self.channel_axis, int):
            raise TypeError(f"channel_axis must be an int, got {self.channel_axis!r}")

    @property
    def is_float(self) -> bool:
        """True for a family of one width (a float format, or a format without ``with_bits``)."""
        if isinstance(self.family, str):
            return self.family in FLOAT_FAMILIES
        return not hasattr(self.family, "with_bits")

    @property
    def is_block_format(self) -> bool:
        return isinstance(self.family, str) and self.family in BLOCK_FAMILIES

    @property
    def block_format(self) -> mx.BlockFormat:
        return mx.FORMATS[self.family]

    @property
    def fixed_width(self) -> int | None:
        """The one width of a float or block-format family (None: integer, swept)."""
        if self.is_float:
            return self.format(None).bits
        if self.is_block_format:
            return element_bits(self.block_format)
        return None

    def format(self, bits) -> Format:
        """The number format at width ``bits`` (ignored by one-width families)."""
        if not isinstance(self.family, str):
            return self.family if self.is_float else self.family.with_bits(bits)
        if self.is_float:
            return NAMED_FORMATS[self.family]
        return IntFormat(bits, midrise=self.family == "midrise")

    def block_axis_of(self, ndim: int) -> int:
        """The axis ``per_block`` blocks run along, as an int >= 0 (axis 0 of a vector)."""
        if ndim == 1:
            return 0
        if not -ndim <= self.block_axis < ndim:
            raise ValueError(f"block_axis {self.block_axis} is out of range for rank {ndim}")
        return self.block_axis % ndim

    def kept_axis(self, ndim: int) -> int | None:
        """The axis with its own range: None per tensor, else the channel axis (>= 0)."""
        if self.granularity == "per_tensor" or ndim == 0:
            return None
        if not -ndim <= self.channel_axis < ndim:
            raise ValueError(
                f"channel_axis {self.channel_axis} is out of range for a tensor of rank {ndim}"
            )
        return self.channel_axis % ndim

    def qparams(self, x: jax.Array, bits) -> QParams:
        """Calibrated QParams of ``x`` at width ``bits`` (shape broadcastable against ``x``)."""
        fmt = self.format(bits)
        symmetric = self.symmetric or self.is_float
        kept = self.kept_axis(x.ndim)
        if self.granularity == "per_block":
            ax = self.block_axis_of(x.ndim)
            kept = None if kept == ax else kept

            def estimator(xb, axis):
                return calibrated_range(self.calibration, xb, fmt, axis, symmetric)

            rmin, rmax = calibration.block_ranges(
                estimator, x, self.block_size, block_axis=ax, axis=kept
            )
            qp = qparams_from_range(rmin, rmax, fmt, symmetric=symmetric)
            return block_qparams(qp, self.block_size, ax)
        rmin, rmax = calibrated_range(self.calibration, x, fmt, kept, symmetric)
        return qparams_from_range(rmin, rmax, fmt, symmetric=symmetric)

    def check_width(self, bits: int | None) -> None:
        """Raises what calibrating at the static width ``bits`` would raise (e.g. KL needs
        ``qmax + 1 <= 2048`` levels, ACIQ and KL an integer grid), without data or compiling.

        A sweep traces the width, and an estimator can only check a traced width's limits
        once it runs; this checks each width of the sweep, statically, before it runs.
        """
        if self.is_block_format:
            return
        n = self.block_size if self.granularity == "per_block" else 2
        example = jax.ShapeDtypeStruct((n, 2), jnp.float32)
        jax.eval_shape(lambda x: self.qparams(x, bits), example)

    def __call__(self, bits, x: jax.Array) -> dict[str, jax.Array]:
        """Error metrics of ``x`` quantized at width ``bits``."""
        y = fake_quant_tensor(x, bits, self)
        out = {name: metrics.METRICS[name](x, y) for name in METRIC_NAMES}
        return out


def fake_quant_tensor(x: jax.Array, bits, spec: QuantSpec) -> jax.Array:
    """``x`` through the quantizer ``spec`` at width ``bits`` (forward only, no estimator)."""
    x = jnp.asarray(x, jnp.float32)
    if spec.is_block_format:
        return mx.fake_quant(x, spec.block_format, axis=spec.block_axis_of(x.ndim), pad=True)
    return fake_quant_forward(x, spec.qparams(x, bits), spec.format(bits))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _static_width(spec: QuantSpec, bits: int, x: jax.Array) -> dict[str, jax.Array]:
    return spec(bits, x)


_TRACE_ERRORS = (
    jax.errors.ConcretizationTypeError,
    jax.errors.TracerBoolConversionError,
    jax.errors.TracerIntegerConversionError,
    jax.errors.TracerArrayConversionError,
)


def tensor_items(tree: Any) -> list[tuple[str, jax.Array]]:
    """``(name, array)`` for every float array leaf; names are key paths joined by ``/``."""
    items = []
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path, simple=True, separator="/") or "x"
        arr = jnp.asarray(leaf)
        if jnp.issubdtype(arr.dtype, jnp.floating):
            items.append((name, arr))
    if not items:
        raise ValueError("tensors must contain at least one float array leaf, found none")
    return items


def _as_tuple(name: str, value: Any) -> tuple[Any, ...]:
    one = isinstance(value, str) or not isinstance(value, Iterable)
    out = (value,) if one else tuple(value)
    if not out:
        raise ValueError(f"{name} must name at least one choice, got {value!r}")
    return out


def check_options(
    bits: Sequence[int] = tuple(range(2, 9)),
    *,
    families: str | Sequence[str] = ("int",),
    granularities: str | Sequence[str] = ("per_tensor",),
    calibrations: str | Sequence[str] = ("minmax",),
    symmetric: bool = True,
    channel_axis: int = -1,
    block_size: int = 32,
) -> tuple[np.ndarray, list[QuantSpec]]:
    """Validates :func:`error_vs_bits`' options, every combination at the narrowest and the
    widest width, before any data is seen (cheap: abstract evaluation, nothing compiled); call
    it before expensive work such as training a model.

    Returns:
      ``(widths, specs)``: the widths as int32 and one :class:`QuantSpec` per combination.

    Raises:
      ValueError / TypeError: a bad width, option, or combination (``calibrations="kl"`` at
        more than 12 bits; ``"kl"`` or ``"aciq"`` with a float family).
    """
    widths = check_bits_list(bits)
    families = _as_tuple("families", families)
    calibrations = _as_tuple("calibrations", calibrations)
    specs = [
        QuantSpec(f, g, c, symmetric, channel_axis, block_size)
        for f in families
        if f not in BLOCK_FAMILIES
        for g in _as_tuple("granularities", granularities)
        for c in calibrations
    ]
    specs = list({s: None for s in specs})  # "per_block:32" twice, or with block_size=32
    specs += [  # their own blocks and scales: one curve each
        QuantSpec(
            f, "per_block", calibrations[0], symmetric, channel_axis, mx.FORMATS[f].block_size
        )
        for f in families
        if f in BLOCK_FAMILIES
    ]
    # the limits estimators put on a width are bounds: the narrowest and widest widths suffice
    ends = sorted({int(widths.min()), int(widths.max())})
    for spec in specs:
        for b in [None] if spec.fixed_width else ends:
            spec.check_width(b)
    return widths, specs


def error_vs_bits(
    tensors: Any,
    bits: Sequence[int] = tuple(range(2, 9)),
    *,
    families: str | Sequence[str] = ("int",),
    granularities: str | Sequence[str] = ("per_tensor",),
    calibrations: str | Sequence[str] = ("minmax",),
    symmetric: bool = True,
    channel_axis: int = -1,
    block_size: int = 32,
    chunk_size: int | None = None,
    mesh: Mesh | None = None,
    progress: bool = False,
) -> Table:
    """Error metrics of every tensor at every width, family, granularity and calibration.

    Args:
      tensors: an array or any pytree of arrays (weights, captured activations); non-float
        leaves are skipped.
      bits: integer widths in ``[2, 16]``.
      families, granularities, calibrations: the options to cross (see :class:`QuantSpec`):
        names, or format objects and calibration methods (user-defined ones too).
      symmetric: symmetric (``zp = 0``) or affine integer grids.
      channel_axis: channel axis for ``per_channel``; tensors of rank < 2 are skipped there.
      block_size: elements per range for a bare ``per_block`` (``"per_block:N"`` in
        ``granularities`` sets its own; blocks along axis -2, the input
        features of Flax kernels; rank-1 tensors along their axis); the last block may be
        partial.
      chunk_size: widths vmapped at once (memory bound); None: all at once.
      mesh: ``jquant.sweep.sharding.bits_mesh()`` to shard the widths over devices.
      progress: show a tqdm progress bar.

    Returns:
      A :class:`Table` with columns ``tensor, shape, family, granularity, calibration,
      symmetric, bits, mse, rmse, sqnr_db, cosine, max_abs``; ``meta["peak_bytes"]`` is the
      largest compiled sweep program's memory high-water mark.

    >>> t = error_vs_bits(jnp.linspace(-1, 1, 1001), bits=[4, 8])
    >>> [round(v) for v in t.column("sqnr_db")]
    [23, 48]
    """
    widths, specs = check_options(
        bits,
        families=families,
        granularities=granularities,
        calibrations=calibrations,
        symmetric=symmetric,
        channel_axis=channel_axis,
        block_size=block_size,
    )
    items = tensor_items(tensors)
    jobs = [
        (name, x, spec)
        for name, x in items
        for spec in specs
        if not (spec.granularity == "per_channel" and x.ndim < 2)
    ]
    if progress:
        from tqdm.auto import tqdm

        jobs = tqdm(jobs, desc="error_vs_bits", unit="curve")
    rows, peak = [], 0
    for name, x, spec in jobs:
        x = jnp.asarray(x, jnp.float32)
        curve_bits = np.array([spec.fixed_width]) if spec.fixed_width else widths
        values, curve_peak = _curve(spec, curve_bits, x, chunk_size, mesh)
        peak = max(peak, curve_peak)
        for i, b in enumerate(curve_bits):
            rows.append(
                {
                    "tensor": name,
                    "shape": "x".join(map(str, x.shape)) or "scalar",
                    "family": _family_label(spec.family),
                    "granularity": spec.granularity
                    + (f":{spec.block_size}" if spec.granularity == "per_block" else ""),
                    "calibration": calibration.calibration_label(spec.calibration),
                    "symmetric": spec.symmetric,
                    "bits": int(b),
                    **{k: float(values[k][i]) for k in METRIC_NAMES},
                }
            )
    return Table.from_dicts(rows).with_meta(peak_bytes=peak)


def _curve(spec: QuantSpec, widths: np.ndarray, x: jax.Array, chunk_size, mesh):
    """Metrics at every width: one traced-bits program, or a loop when ``spec`` needs static
    bits (a float format, or a calibration method that branches on the width in Python)."""
    if spec.fixed_width is None:
        try:
            out = map_over_bits(spec, widths, (x,), chunk_size=chunk_size, mesh=mesh)
            return out, peak_bytes(spec, widths, (x,), chunk_size=chunk_size, mesh=mesh)
        except _TRACE_ERRORS:
            pass
    per_width = [_static_width(spec, int(b), x) for b in widths]
    out = {k: np.stack([np.asarray(d[k]) for d in per_width]) for k in METRIC_NAMES}
    return out, 0
