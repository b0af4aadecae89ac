"""Peak arithmetic rates per operand format: published for common accelerators, measured on CPU.

A :class:`Peak` holds one device's dense (no structured sparsity) peak rate per operand format
in TFLOP/s (TOP/s for integer formats), where its rate comes from, and the memory bandwidth
that draws the sloped roof of a roofline. Vendors print sparse rates with an asterisk; the
table halves those to the dense rate. ``float32`` is the non-tensor-core FP32 rate (the grids
run float32 with ``precision=HIGHEST``, so no TF32); TPUs publish no float32 rate.

- :data:`PUBLISHED`: H100 (SXM and PCIe), H200, A100, L4, TPU v4, v5e, v5p, v6e, each naming
  its source document;
- :func:`published_peak` matches ``jax.devices()[0].device_kind`` against that table;
- :func:`measured_cpu_peak`: the best rate of a large float32 and int8 x int8 -> int32
  matmul on this machine, labelled ``"measured"`` (a floor on the true peak);
- :func:`given_peak`: ``--peak`` (``"400"``: one rate for every format, or
  ``"bfloat16=400,int8=800"``).

Percent of peak is ``100 * achieved / peak[format]``, where achieved is ``flops / median time``
and a ``K``-term dot product counts ``2 K`` operations.

>>> published_peak("NVIDIA H100 80GB HBM3").rate("bfloat16")
989.5
>>> given_peak("bfloat16=400,int8=800").rate("int8")
800.0
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
    "FORMATS",
    "KINDS",
    "PUBLISHED",
    "Peak",
    "best_of",
    "given_peak",
    "measured_cpu_peak",
    "peak_for_device",
    "published_peak",
]

# operand formats a peak can be given for (the grids' operand names)
FORMATS = ("float32", "bfloat16", "float16", "fp8_e4m3", "int8", "int4")
KINDS = ("published", "measured", "given", "none")


@dataclasses.dataclass(frozen=True)
class Peak:
    """One device's dense peak rate per operand format.

    Attributes:
      device: the device's name (as matched, or ``jax.devices()[0].device_kind``).
      rates: format -> TFLOP/s (TOP/s for integer formats); a format absent here has no peak.
      kind: ``"published"``, ``"measured"``, ``"given"`` (``--peak``) or ``"none"``.
      source: the document (URL) or the measurement behind the rates.
      bandwidth_gbs: memory bandwidth in GB/s (the roofline's slope), None if unknown.
    """

    device: str
    rates: Mapping[str, float]
    kind: str
    source: str
    bandwidth_gbs: float | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Peak.kind must be one of {KINDS}, got {self.kind!r}")
        bad = {k: v for k, v in self.rates.items() if k not in FORMATS}
        if bad:
            raise ValueError(f"Peak.rates has unknown formats {sorted(bad)}; allowed: {FORMATS}")
        for k, v in self.rates.items():
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                raise ValueError(f"Peak.rates[{k!r}] must be a positive finite number, got {v!r}")

    def rate(self, fmt: str) -> float | None:
        """The peak of ``fmt`` in TFLOP/s (TOP/s), or None when there is none."""
        v = self.rates.get(fmt)
        return None if v is None else float(v)

    def to_json(self) -> dict:
        """Plain JSON of the peak."""
        return dict(
            device=self.device,
            kind=self.kind,
            source=self.source,
            rates_tflops=dict(self.rates),
            bandwidth_gbs=self.bandwidth_gbs,
        )


_NVIDIA = "dense rates (sparse datasheet figures halved)"
# (pattern on device_kind, Peak); the first match wins, so specific patterns come first
PUBLISHED: tuple[tuple[str, Peak], ...] = (
    (
        r"h100.*pcie",
        Peak(
            "NVIDIA H100 PCIe",
            dict(float32=51.0, bfloat16=756.5, float16=756.5, fp8_e4m3=1513.0, int8=1513.0),
            "published",
            f"NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/"
            f"h100/ ({_NVIDIA})",
            2000.0,
        ),
    ),
    (
        r"h100",
        Peak(
            "NVIDIA H100 SXM",
            dict(float32=67.0, bfloat16=989.5, float16=989.5, fp8_e4m3=1979.0, int8=1979.0),
            "published",
            f"NVIDIA H100 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/"
            f"h100/ ({_NVIDIA})",
            3350.0,
        ),
    ),
    (
        r"h200",
        Peak(
            "NVIDIA H200 SXM",
            dict(float32=67.0, bfloat16=989.5, float16=989.5, fp8_e4m3=1979.0, int8=1979.0),
            "published",
            f"NVIDIA H200 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/"
            f"h200/ ({_NVIDIA})",
            4800.0,
        ),
    ),
    (
        r"a100",
        Peak(
            "NVIDIA A100",
            dict(float32=19.5, bfloat16=312.0, float16=312.0, int8=624.0, int4=1248.0),
            "published",
            "NVIDIA A100 Tensor Core GPU datasheet, https://www.nvidia.com/content/dam/en-zz/"
            "Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf"
            " (dense rates; bandwidth of the 80GB SXM)",
            2039.0,
        ),
    ),
    (
        r"\bl4\b",
        Peak(
            "NVIDIA L4",
            dict(float32=30.3, bfloat16=121.0, float16=121.0, fp8_e4m3=242.5, int8=242.5),
            "published",
            f"NVIDIA L4 Tensor Core GPU datasheet, https://www.nvidia.com/en-us/data-center/l4/"
            f" ({_NVIDIA})",
            300.0,
        ),
    ),
    (
        r"tpu v4",
        Peak(
            "TPU v4",
            dict(bfloat16=275.0, int8=275.0),
            "published",
            "Google Cloud TPU v4 system architecture, https://cloud.google.com/tpu/docs/v4",
            1200.0,
        ),
    ),
    (
        r"tpu v5 ?(lite|e)",
        Peak(
            "TPU v5e",
            dict(bfloat16=197.0, int8=394.0),
            "published",
            "Google Cloud TPU v5e, https://cloud.google.com/tpu/docs/v5e",
            819.0,
        ),
    ),
    (
        r"tpu v5p?$",
        Peak(
            "TPU v5p",
            dict(bfloat16=459.0, int8=918.0),
            "published",
            "Google Cloud TPU v5p, https://cloud.google.com/tpu/docs/v5p",
            2765.0,
        ),
    ),
    (
        r"tpu v6 ?(lite|e)|trillium",
        Peak(
            "TPU v6e",
            dict(bfloat16=918.0, int8=1836.0),
            "published",
            "Google Cloud TPU v6e (Trillium), https://cloud.google.com/tpu/docs/v6e",
            1640.0,
        ),
    ),
)


def published_peak(device_kind: str) -> Peak | None:
    """The :data:`PUBLISHED` peak whose pattern matches ``device_kind`` (case-insensitive,
    e.g. ``"NVIDIA H100 80GB HBM3"``, ``"TPU v5 lite"``), or None."""
    if not isinstance(device_kind, str):
        raise TypeError(f"device_kind must be a str, got {device_kind!r}")
    kind = device_kind.strip().lower()
    for pattern, peak in PUBLISHED:
        if re.search(pattern, kind):
            return peak
    return None


def given_peak(text: str, device: str = "given") -> Peak:
    """``--peak``: ``"400"`` (TFLOP/s for every format) or ``"bfloat16=400,int8=800"``.

    Raises ValueError naming the allowed formats for a bad format or a non-positive rate.
    """
    text = str(text).strip()
    try:
        if "=" not in text:
            rates = dict.fromkeys(FORMATS, float(text))
        else:
            rates = {}
            for part in text.split(","):
                name, _, value = part.partition("=")
                rates[name.strip()] = float(value)
    except ValueError:
        raise ValueError(
            f"--peak must be a rate in TFLOP/s ('400') or FORMAT=RATE pairs "
            f"('bfloat16=400,int8=800') with FORMAT in {FORMATS}; got {text!r}"
        ) from None
    return Peak(device, rates, "given", f"--peak {text}")


def _best_rate(fn, args, flops: float, reps: int) -> float:
    """``flops / min time`` over ``reps`` calls of the compiled ``fn`` (after one warm-up)."""
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e12


def measured_cpu_peak(size: int = 2048, reps: int = 5) -> Peak:
    """The best rate of float32 (``precision=HIGHEST``) and int8 x int8 -> int32 matmuls of
    ``n^3`` for ``n`` in ``size // 4, size // 2, size`` on ``jax.devices()[0]``: ``max_n 2 n^3
    / min_t`` over ``reps`` calls each.

    A floor on the machine's true peak (load and XLA's kernels limit it), labelled
    ``"measured"``; a grid cell measured at a calmer moment can exceed it. Other formats get
    no peak.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 4:
        raise ValueError(f"size must be an int >= 4, got {size!r}")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"reps must be a positive int, got {reps!r}")
    rng = np.random.default_rng(0)
    dn = (((1,), (0,)), ((), ()))
    f32 = jax.jit(lambda x, y: lax.dot_general(x, y, dn, precision=lax.Precision.HIGHEST))
    i8 = jax.jit(lambda x, y: lax.dot_general(x, y, dn, preferred_element_type=jnp.int32))
    rates = dict(float32=0.0, int8=0.0)
    for n in (size // 4, size // 2, size):
        a, b = rng.integers(-8, 8, (2, n, n))
        for name, fn, dtype in (("float32", f32, jnp.float32), ("int8", i8, jnp.int8)):
            args = (jnp.asarray(a, dtype), jnp.asarray(b, dtype))
            rates[name] = max(rates[name], _best_rate(fn, args, 2.0 * n**3, reps))
    device = jax.devices()[0]
    return Peak(
        f"{device.platform} ({device.device_kind})",
        rates,
        "measured",
        f"measured here: best of {reps} calls of n x n x n float32 (HIGHEST) and int8 x int8 -> "
        f"int32 lax.dot_general, n in {size // 4}, {size // 2}, {size}",
    )


def best_of(a: Peak, b: Peak) -> Peak:
    """Two measurements of one device merged: the higher rate per format, both sources."""
    if a.kind != b.kind or a.device != b.device:
        raise ValueError(f"can merge only peaks of one kind and device, got {a} and {b}")
    rates = {k: max(a.rates.get(k, 0.0), b.rates.get(k, 0.0)) for k in {*a.rates, *b.rates}}
    return Peak(
        a.device, rates, a.kind, f"{a.source}; best of two such measurements", a.bandwidth_gbs
    )


def peak_for_device(
    device: jax.Device | None = None, given: str | None = None, *, measure_size: int = 2048
) -> Peak:
    """The peak used for ``device`` (default ``jax.devices()[0]``): ``given`` (``--peak``) if
    set, else the published one, else on CPU :func:`measured_cpu_peak`, else no peak."""
    device = jax.devices()[0] if device is None else device
    if given is not None:
        return given_peak(given, device.device_kind)
    found = published_peak(device.device_kind)
    if found is not None:
        return found
    if device.platform == "cpu":
        return measured_cpu_peak(measure_size)
    return Peak(
        device.device_kind,
        {},
        "none",
        f"no published peak for {device.device_kind!r}: pass --peak to give one",
    )
