"""Sweeps: what each bit costs, for tensors and for models.

- :func:`error_vs_bits`: error metrics of any pytree of arrays against width, format family,
  granularity and calibration, in one compiled program per curve (traced bits).
- :class:`Table`: the results type (dicts, CSV, JSON, pandas).
- :mod:`jquant.sweep.sharding`: chunked, device-sharded evaluation over bit widths.
- :mod:`jquant.sweep.plots`: matplotlib figures of the tables.
"""

from jquant.sweep.error_vs_bits import (
    CALIBRATIONS,
    GRANULARITIES,
    INT_FAMILIES,
    QuantSpec,
    error_vs_bits,
    fake_quant_tensor,
)
from jquant.sweep.results import Table
from jquant.sweep.sharding import bits_mesh, map_over_bits, peak_bytes
