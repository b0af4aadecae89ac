"""Post-training quantization algorithms for linear layers, as pure functions over arrays.

Kernels are in Flax layout ``(in, out)``; calibration inputs ``x`` are ``(n, in)``.

- :func:`rtn`: round to nearest, per channel or per group of inputs;
- :func:`gptq`: GPTQ (Frantar et al. 2022), Algorithm 1;
- :func:`awq`: AWQ's activation-aware scale search (Lin et al. 2023);
- :func:`smoothquant_scales`: SmoothQuant's migration scales (Xiao et al. 2022);
- :func:`hadamard`, :func:`rotate_input`, :func:`rotate_output`, :func:`absorb_gain`:
  QuaRot's computational invariance (Ashkboos et al. 2024), and the scale folds;
  :class:`OnlineHadamard`, :func:`rotate_mlp`, :func:`rotate_heads`: its online Hadamard
  before the down projection and its per-head rotation of V and O;
- :func:`quantize_model`: a whole GPT by a :class:`Recipe` (sequential, layer by layer), and
  :func:`inject_outlier`;
- :func:`kv_fake_quant`, :func:`kv_ranges`: a KV-cache quantizer per head and token, or per
  calibrated channel, for ``generate`` and ``perplexity``.

>>> import jax.numpy as jnp, jquant as jq
>>> w = jnp.linspace(-1.0, 1.0, 32).reshape(8, 4)
>>> q = rtn(w, jq.int4, group_size=4)
>>> q.kernel.shape, q.qparams.scale.shape
((8, 4), (2, 1, 4))
"""

from jquant.ptq.awq import AWQResult, awq
from jquant.ptq.gptq import gptq, gptq_from_hessian, hessian
from jquant.ptq.kv import KV_GRANULARITIES, KVRanges, kv_fake_quant, kv_ranges
from jquant.ptq.model import (
    METHODS,
    ONLINE,
    TRANSFORMS,
    PTQModel,
    Recipe,
    act_rules,
    inject_outlier,
    quantize_model,
    rotate_heads,
    rotate_mlp,
    rotate_model,
    smooth_model,
)
from jquant.ptq.rtn import Quantized, fake_quant_kernel, kernel_qparams, rtn
from jquant.ptq.smoothquant import smoothquant_scales
from jquant.ptq.transforms import (
    OnlineHadamard,
    absorb_gain,
    hadamard,
    random_hadamard,
    rotate_input,
    rotate_output,
    scale_input,
    scale_output,
)

__all__ = [
    "AWQResult",
    "METHODS",
    "ONLINE",
    "OnlineHadamard",
    "PTQModel",
    "Recipe",
    "TRANSFORMS",
    "act_rules",
    "inject_outlier",
    "quantize_model",
    "rotate_heads",
    "rotate_mlp",
    "rotate_model",
    "smooth_model",
    "KVRanges",
    "KV_GRANULARITIES",
    "Quantized",
    "absorb_gain",
    "awq",
    "fake_quant_kernel",
    "gptq",
    "gptq_from_hessian",
    "hadamard",
    "hessian",
    "kernel_qparams",
    "kv_fake_quant",
    "kv_ranges",
    "random_hadamard",
    "rotate_input",
    "rotate_output",
    "rtn",
    "scale_input",
    "scale_output",
    "smoothquant_scales",
]
