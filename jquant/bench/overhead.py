"""The ``int`` conv's quantize-and-rescale overhead over XLA's bare int8 conv, with a profile.

The case of ``benchmarks/ops.py``: a 3x3 conv, batch 32, 32x32, 64 -> 64 channels, SAME,
NHWC; activations affine int8 per tensor with calibrated (static) QParams, weights symmetric
int8 per output channel from the weights. In one interleaved :func:`jquant.bench.timing.measure`:

- ``float``: ``lax.conv_general_dilated`` in float32;
- ``lax_int8``: the bare int8 x int8 -> int32 conv on ready-made codes (SAME): the floor;
- ``int_static``: :func:`jquant.ops.conv_general_dilated` ``mode="int"`` with static
  activation QParams: the target is ``t_int_static / t_lax_int8 <= 1.2`` in the same round;

and the passes ``int_static`` runs, each timed alone (per-op timing):

- ``quantize``: ``x -> clip(round(x / s) + z)`` as int8;
- ``lax_int8``: the int8 conv on those codes with XLA's own (zero) padding, SAME;
- ``nan_check_sum``: ``isnan(sum(x))``, the predicate of the NaN branch (one read, no mask);
- ``rescale_with_checks``: ``s_l s_r (acc - z_l taps)`` to float32, ``taps`` the kernel's
  sums over each window's real (unpadded) taps, with ``s_r`` and the per-channel NaN flags
  computed from the weights in the same program, as ``int`` does;

the passes of the previous structure (before this profile's restructuring): ``quantize_pad``
(the codes padded with ``z``, real 0), ``lax_int8_prepadded`` (the int8 conv on them, VALID)
and ``nan_mask`` (``isnan(x)`` as an int8 mask and its ``any``); and ``rescale`` (the rescale
with precomputed per-channel vectors and the interior kernel sum).

The profile also lists the top-level operations of the compiled ``int_static`` program
(``compiled.as_text()``, entry computation).
"""

from __future__ import annotations

import functools
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jquant import ops
from jquant.bench import timing
from jquant.quant import QuantConfig, dynamic_qparams, nan_if_invalid, quantize

__all__ = ["TARGET", "entry_ops", "format_overhead", "int_overhead"]

TARGET = 1.2
_DN = ("NHWC", "HWIO", "NHWC")


def entry_ops(compiled_text: str) -> list[str]:
    """``name = shape kind`` of each fusion, convolution, conditional and custom call in the
    entry computation of an optimized HLO module's text."""
    entry = compiled_text[compiled_text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    found = []
    for line in entry.splitlines():
        m = re.match(
            r"\s*(?:ROOT )?%(\S+) = (\S+) (fusion|convolution|conditional|custom-call)\(", line
        )
        if m:
            kind = re.search(r'"kind":"(\w+)"', line) or re.search(r"kind=(\w+)", line)
            found.append(
                f"{m.group(1)} = {m.group(2)} {m.group(3)}"
                + (f" ({kind.group(1)})" if kind else "")
            )
    return found


def int_overhead(
    *, rounds: int = 9, batch: int = 32, size: int = 32, channels: int = 64, seed: int = 0
) -> dict[str, Any]:
    """Times the variants and passes of the module docstring; returns them as JSON with the
    ratio ``int_static / lax_int8`` (median, ``ci95``, verdict against :data:`TARGET`) and
    the entry operations of the compiled ``int_static``."""
    keys = jax.random.split(jax.random.key(seed), 2)
    x = jax.random.normal(keys[0], (batch, size, size, channels))
    w = jax.random.normal(keys[1], (3, 3, channels, channels)) / (3 * channels**0.5)
    lhs_quant, rhs_quant = QuantConfig(symmetric=False), QuantConfig(axis=-1)
    qp_x = dynamic_qparams(x, lhs_quant)  # calibrated once, ahead of time
    qp_w = dynamic_qparams(w, rhs_quant)
    q_x = quantize(x, qp_x, lhs_quant.fmt).astype(jnp.int8)
    q_w = quantize(w, qp_w, rhs_quant.fmt).astype(jnp.int8)
    z = qp_x.zero_point.reshape(())
    conv = functools.partial(lax.conv_general_dilated, window_strides=(1, 1), dimension_numbers=_DN)
    int_conv = functools.partial(conv, preferred_element_type=jnp.int32)

    def quantize_codes(x):
        return quantize(x, qp_x, lhs_quant.fmt).astype(jnp.int8)

    def quantize_pad(x):
        pads = [(0, 0, 0), (1, 1, 0), (1, 1, 0), (0, 0, 0)]
        return lax.pad(quantize_codes(x), z.astype(jnp.int8), pads)

    def nan_mask(x):
        mask = jnp.isnan(x).astype(jnp.int8)
        return mask, jnp.any(mask)

    def rescale(acc, q_w, scale_w=qp_w.scale, nan_w=None, correction=None):
        if correction is None:
            correction = jnp.sum(q_w, (0, 1, 2), jnp.int32)
        acc = acc - z.astype(jnp.int32) * correction
        out = (qp_x.scale.reshape(()) * scale_w.reshape(-1)) * acc.astype(jnp.float32)
        return out if nan_w is None else jnp.where(nan_w, jnp.nan, out)

    def rescale_with_checks(acc, w):
        qp = nan_if_invalid(dynamic_qparams(w, rhs_quant))
        q_w = quantize(w, qp, rhs_quant.fmt).astype(jnp.int8)
        nan_w = jnp.any(jnp.isnan(w), (0, 1, 2)) | jnp.isnan(qp.zero_point).reshape(-1)
        ksum = jnp.sum(q_w, 2, jnp.int32, keepdims=True)  # the kernel's sums over real taps:
        ones = jnp.ones((1, size, size, 1), jnp.int32)  # a conv of ones, one input channel
        taps = conv(ones, ksum, padding="SAME", preferred_element_type=jnp.int32)
        return rescale(acc, q_w, qp.scale, nan_w, taps)

    int_static = jax.jit(
        functools.partial(
            ops.conv_general_dilated,
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=_DN,
            lhs_quant=lhs_quant,
            rhs_quant=rhs_quant,
            lhs_qparams=qp_x,
            mode="int",
        )
    )
    valid = jax.jit(functools.partial(int_conv, padding="VALID"))
    padded = jax.jit(quantize_pad)(x)
    acc = valid(padded, q_w)
    acc_same = jax.jit(functools.partial(int_conv, padding="SAME"))(q_x, q_w)
    fns = dict(
        float=(jax.jit(functools.partial(conv, padding="SAME")), (x, w)),
        lax_int8=(jax.jit(functools.partial(int_conv, padding="SAME")), (q_x, q_w)),
        int_static=(int_static, (x, w)),
        quantize=(jax.jit(quantize_codes), (x,)),
        quantize_pad=(jax.jit(quantize_pad), (x,)),
        lax_int8_prepadded=(valid, (padded, q_w)),
        nan_mask=(jax.jit(nan_mask), (x,)),
        rescale_with_checks=(jax.jit(rescale_with_checks), (acc_same, w)),
        rescale=(jax.jit(rescale), (acc, q_w)),
        nan_check_sum=(jax.jit(lambda x: jnp.isnan(jnp.sum(x))), (x,)),
    )
    t = timing.measure(
        {name: functools.partial(f, *args) for name, (f, args) in fns.items()},
        baseline="float",
        rounds=rounds,
        seed=seed,
    )
    pair = t.pair_json("int_static", "lax_int8", TARGET)
    parts = ("quantize", "lax_int8", "nan_check_sum", "rescale_with_checks")
    previous = ("quantize_pad", "lax_int8_prepadded", "nan_mask", "rescale_with_checks")
    base = t.median("lax_int8")
    return dict(
        case=dict(
            lhs_shape=list(x.shape),
            rhs_shape=list(w.shape),
            padding="SAME",
            lhs="affine int8 per tensor, static (calibrated) QParams",
            rhs="symmetric int8 per output channel, from the weights",
        ),
        timing=t.to_json(),
        int_static_vs_lax_int8=pair,
        parts=list(parts),
        parts_over_lax_int8=sum(t.median(p) for p in parts) / base,
        parts_besides_the_conv_over_lax_int8=sum(t.median(p) for p in parts if p != "lax_int8")
        / base,
        previous_parts=list(previous),
        previous_parts_over_lax_int8=sum(t.median(p) for p in previous) / base,
        prepadded_vs_lax_int8=t.pair_json("lax_int8_prepadded", "lax_int8"),
        rescale_with_checks_vs_rescale=t.pair_json("rescale_with_checks", "rescale"),
        nan_mask_vs_nan_check_sum=t.pair_json("nan_mask", "nan_check_sum"),
        int_static_entry_ops=entry_ops(int_static.lower(x, w).compile().as_text()),
        finding=(
            "jquant's int conv pads the codes with 0 inside the int8 conv (XLA's own padding, "
            "as lax_int8, instead of a conv on codes padded with z_l: prepadded_vs_lax_int8) and "
            "subtracts z_l times the kernel's sums over each window's real taps (an einsum of "
            "static 0/1 tap matrices); its NaN test is isnan(sum(x)), one read, with the NaN "
            "mask only in the NaN branch (nan_mask_vs_nan_check_sum). Outputs are bit-identical "
            "to the previous structure (quantize_pad, lax_int8_prepadded, nan_mask). What is "
            "left beside the XNNPACK conv are kernels XLA:CPU does not fuse into it or into each "
            "other (int_static_entry_ops): the quantize loop fusion, the NaN predicate's "
            "reduction and conditional, the weight-side reductions (per-channel scales, kernel "
            "sums, NaN flags) and the rescale loop fusion; no elementwise epilogue is fused into "
            "the XNNPACK conv. On the loaded 2-core machine the ratio's interval is wide: the "
            "verdict is that of int_static_vs_lax_int8"
        ),
    )


def format_overhead(result: dict[str, Any]) -> str:
    """A few lines: each variant's median and ratio to float, and the target's verdict."""
    lines = ["int conv overhead (static activation QParams) vs the bare lax int8 conv:"]
    for name, row in result["timing"]["variants"].items():
        r = row["ratio"]
        lines.append(
            f"  {name:<20}{row['median_ms']:>9.3f} ms  x float {r['median']:.3f} "
            f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"
        )
    lines.append(
        f"  passes timed alone, summed: {result['parts_over_lax_int8']:.3f} x lax_int8 (besides "
        f"the conv: {result['parts_besides_the_conv_over_lax_int8']:.3f})"
    )
    p = result["int_static_vs_lax_int8"]
    lines.append(
        f"  int_static / lax_int8: {p['median']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] "
        f"(target <= {p['target']}: {p['verdict']})"
    )
    lines.append("  compiled int_static: " + "; ".join(result["int_static_entry_ops"]))
    return "\n".join(lines)
