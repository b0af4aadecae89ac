"""Benchmark support shared by ``benchmarks/`` and ``jquant bench``.

:mod:`jquant.bench.timing`: interleaved rounds, paired ratios with bootstrap intervals,
target verdicts, cold (compile) timing, and the metadata every results file carries.
"""

from jquant.bench.timing import (
    VERDICTS,
    Ratio,
    Timings,
    bootstrap_median_ci,
    cold,
    loadavg,
    machine_info,
    measure,
    paired_ratio,
    results_meta,
    verdict,
    write_results,
)
