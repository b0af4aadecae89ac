"""Xiao et al. (2022), SmoothQuant: W8A8 of a GPT with activation outliers.

Our version (the protocol of ``papers/gptq_frantar2022``: the zoo's small GPT, validation
perplexity, 3 calibration seeds). Tiny models lack LLMs' activation outliers, so they are
injected without changing the float function (``jquant.ptq.inject_outlier`` at every block's
``norm1`` and ``norm2``, the protocol's channels and factor). Then W8A8: int8 weights (RTN, per
output channel) and int8 activations (symmetric, dynamic per token) at every block Dense input,
naive or after SmoothQuant (``s_j = max|x_j|^alpha / max|W_j|^(1 - alpha)``, alpha 0.5, folded
into the RMSNorm gains and the kernels). The plain model's W8A8 is the reference.

The claim checked: SmoothQuant recovers most (more than half) of naive W8A8's perplexity loss
on the outlier-injected model: ``recovered = 1 - increase(smooth) / increase(naive) > 0.5``.
"""

from __future__ import annotations

import pathlib

from jquant import ptq
from jquant.reproduce import load_paper, script_main
from jquant.sweep import Table

ALPHA = 0.5


def configs(shared) -> list:
    """Float (plain, outlier), naive W8A8 on both, SmoothQuant W8A8 on both."""
    naive = ptq.Recipe("rtn", weight="int8", act="int8")
    smooth = ptq.Recipe("rtn", weight="int8", act="int8", transform="smoothquant", alpha=ALPHA)
    return [
        shared.Config("float", "plain", None),
        shared.Config("float_outlier", "outlier", None),
        shared.Config("w8a8", "plain", naive),
        shared.Config("w8a8_outlier", "outlier", naive),
        shared.Config("smooth_w8a8", "plain", smooth),
        shared.Config("smooth_w8a8_outlier", "outlier", smooth),
    ]


def recovered(shared, summary: Table) -> Table:
    """On the outlier model: naive and smoothed increases and ``1 - smooth / naive``."""
    naive = shared.increase(summary, "w8a8_outlier")
    smooth = shared.increase(summary, "smooth_w8a8_outlier")
    frac = 1.0 - smooth / naive
    return Table.from_dicts(
        [{"naive_increase": naive, "smooth_increase": smooth, "recovered": frac,
          "holds": bool(frac > 0.5)}]
    )  # fmt: skip


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """Naive vs SmoothQuant W8A8 on the plain and the outlier-injected GPT, 3 seeds."""
    shared = load_paper("gptq_frantar2022")
    return shared.run_paper(
        out_dir, "smoothquant_xiao2022", "Xiao et al. 2022 (SmoothQuant)", configs(shared),
        "W8A8, SmoothQuant", lambda summary: recovered(shared, summary), quick,
    )  # fmt: skip


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
