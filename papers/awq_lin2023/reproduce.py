"""Lin et al. (2023), AWQ: activation-aware weight quantization of a GPT, against RTN.

Our version (the protocol of ``papers/gptq_frantar2022``: the zoo's small GPT, validation
perplexity, 3 calibration seeds): block kernels at 3 and 4 bits in groups of 32 inputs,
weight-only, by RTN, by AWQ (``jquant.ptq.awq``: per-input-channel scales
``s = mean|x|^a`` with ``a`` grid-searched on the layer's output error, folded into the RMSNorm
gain or the value projection; ``mlp/down`` reads ``gelu(.)`` and stays RTN) and by AWQ with its
weight-clipping search (``Recipe.awq_clip``: per output channel and group, a max-clip ratio in
``1, 0.95, ..., 0.55`` minimising the layer's output error, after the scale search; ``mlp/down``
clipped alone).

The claim checked: AWQ's perplexity <= RTN's at 3 and 4 bits, group 32 (with and without the
clipping search).
"""

from __future__ import annotations

import pathlib

import jquant as jq
from jquant import ptq
from jquant.reproduce import load_paper, script_main
from jquant.sweep import Table

BITS = (3, 4)
GROUP = 32


def configs(shared) -> list:
    """Float, then RTN, AWQ and AWQ with clipping at each width, group 32 (weight-only,
    asymmetric)."""
    out = [shared.Config("float", "plain", None)]
    for b in BITS:
        for name, clip in (("rtn", False), ("awq", False), ("awq_clip", True)):
            method = "rtn" if name == "rtn" else "awq"
            recipe = ptq.Recipe(method, weight=jq.IntFormat(b), group_size=GROUP, awq_clip=clip)
            out.append(shared.Config(f"{name}_w{b}g{GROUP}", "plain", recipe))
    return out


def verdict(shared, summary: Table) -> Table:
    """Per width: RTN's, AWQ's and AWQ-with-clipping's mean perplexity, and whether each AWQ
    is <= RTN."""
    rows = []
    for b in BITS:
        (rtn,) = summary.where(name=f"rtn_w{b}g{GROUP}").to_dicts()
        (awq,) = summary.where(name=f"awq_w{b}g{GROUP}").to_dicts()
        (clip,) = summary.where(name=f"awq_clip_w{b}g{GROUP}").to_dicts()
        rows.append(
            {"bits": b, "rtn_ppl": rtn["ppl_mean"], "awq_ppl": awq["ppl_mean"],
             "awq_minus_rtn": awq["ppl_mean"] - rtn["ppl_mean"],
             "holds": bool(awq["ppl_mean"] <= rtn["ppl_mean"]),
             "awq_clip_ppl": clip["ppl_mean"],
             "awq_clip_minus_rtn": clip["ppl_mean"] - rtn["ppl_mean"],
             "clip_holds": bool(clip["ppl_mean"] <= rtn["ppl_mean"])}
        )  # fmt: skip
    return Table.from_dicts(rows)


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """RTN vs AWQ (with and without clipping) at 3 and 4 bits, group 32, 3 calibration
    seeds."""
    shared = load_paper("gptq_frantar2022")
    return shared.run_paper(
        out_dir, "awq_lin2023", "Lin et al. 2023 (AWQ)", configs(shared),
        "RTN vs AWQ (+ clipping), group 32", lambda summary: verdict(shared, summary), quick,
    )  # fmt: skip


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
