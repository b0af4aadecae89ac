"""Sweeps: what each bit costs, for tensors and for models.

- :func:`error_vs_bits`: error metrics of any pytree of arrays against width, format family,
  granularity and calibration, in one compiled program per curve (traced bits).
- :func:`check_options`: validates a tensor sweep's options at every width before any work.
- :class:`Table`: the results type (dicts, CSV, JSON, pandas).
- :func:`model_vs_bits` (in :mod:`jquant.sweep.model_sweep`), :mod:`~jquant.sweep.sensitivity`,
  :mod:`~jquant.sweep.mixed_precision`: a Flax model's accuracy (or any metric: perplexity,
  output SQNR) against width, per layer, and per-layer widths under a size budget, each one
  compiled program over traced widths; :func:`ptq_vs_bits`: a GPT's perplexity against width
  for the ``jquant.ptq`` recipes (RTN, GPTQ, AWQ; weight-only and W/A).
- :mod:`jquant.sweep.sharding`: chunked evaluation over bit widths, sharded over a Mesh of all
  devices (several hosts through ``jax.distributed``).
- :mod:`jquant.sweep.plots`: matplotlib figures of the tables.
"""

from jquant.sweep.error_vs_bits import (
    CALIBRATIONS,
    GRANULARITIES,
    INT_FAMILIES,
    QuantSpec,
    check_options,
    error_vs_bits,
    fake_quant_tensor,
)
from jquant.sweep.model_sweep import model_vs_bits, ptq_vs_bits
from jquant.sweep.results import Table
from jquant.sweep.sharding import (
    bits_mesh,
    compiled_sweep,
    is_main_process,
    map_over_bits,
    peak_bytes,
    sweep_mesh,
)
