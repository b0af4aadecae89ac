"""Ashkboos et al. (2024), QuaRot: W4A4 of a GPT after a Hadamard rotation of the residual.

Our version (the protocol of ``papers/gptq_frantar2022``: the zoo's small GPT, validation
perplexity; the seeds draw the random Hadamard's signs). W4A4: int4 weights (RTN, per output
channel) and int4 activations (symmetric, dynamic per token) at every block Dense input, with
and without ``jquant.ptq.rotate_model`` (RMSNorm gains absorbed, residual stream rotated by
``Q = diag(d) H / sqrt(n)``: the same float function), on the plain GPT and on the
outlier-injected one (``jquant.ptq.inject_outlier``, as in ``papers/smoothquant_xiao2022``).
Then with QuaRot's online Hadamard before ``down`` (``Recipe.online_hadamard``: ``"hadamard"``,
the paper's ``H``, or ``"random"``, ``diag(d) H``) and, in the full ``quarot`` config, the
per-head Hadamard of V and O (``Recipe.rotate_heads``). Not reproduced: the online Hadamard
across heads before ``out``, and the KV cache.

The claim checked: rotation beats no rotation at W4A4 (lower perplexity), on the outlier model;
reported also on the plain model, for each rotation config.
"""

from __future__ import annotations

import pathlib

from jquant import ptq
from jquant.reproduce import load_paper, script_main
from jquant.sweep import Table

# rotation configs: name prefix -> the Recipe's rotation options (all with transform="rotate")
ROTATIONS = {
    "rotate": {},
    "rotate_online": {"online_hadamard": "hadamard"},
    "rotate_online_random": {"online_hadamard": "random"},
    "quarot": {"online_hadamard": "random", "rotate_heads": True},
}


def configs(shared) -> list:
    """Float (plain, outlier), W4A4 without rotation and with each of ``ROTATIONS``, on both."""
    plain = ptq.Recipe("rtn", weight="int4", act="int4")
    out = [
        shared.Config("float", "plain", None),
        shared.Config("float_outlier", "outlier", None),
        shared.Config("w4a4", "plain", plain),
        shared.Config("w4a4_outlier", "outlier", plain),
    ]
    for name, options in ROTATIONS.items():
        recipe = ptq.Recipe("rtn", weight="int4", act="int4", transform="rotate", **options)
        out.append(shared.Config(f"{name}_w4a4", "plain", recipe))
        out.append(shared.Config(f"{name}_w4a4_outlier", "outlier", recipe))
    return out


def verdict(summary: Table) -> Table:
    """Per base model: W4A4 perplexity without rotation and with each of ``ROTATIONS``
    (``<name>_ppl``), and whether each wins (``holds``: the residual rotation alone,
    ``<name>_holds``: the others)."""
    rows = []
    for base, tag in (("plain", ""), ("outlier", "_outlier")):
        (no,) = summary.where(name=f"w4a4{tag}").to_dicts()
        row = {"base": base, "no_rotation_ppl": no["ppl_mean"]}
        for name in ROTATIONS:
            (rot,) = summary.where(name=f"{name}_w4a4{tag}").to_dicts()
            key = "rotation" if name == "rotate" else name
            row[f"{key}_ppl"] = rot["ppl_mean"]
            row["holds" if name == "rotate" else f"{name}_holds"] = bool(
                rot["ppl_mean"] < no["ppl_mean"]
            )
        rows.append(row)
    return Table.from_dicts(rows)


def main(out_dir: str | pathlib.Path, quick: bool = False) -> dict[str, Table]:
    """W4A4 without and with each rotation, plain and outlier GPT, 3 rotation seeds."""
    shared = load_paper("gptq_frantar2022")
    return shared.run_paper(
        out_dir, "quarot_ashkboos2024", "Ashkboos et al. 2024 (QuaRot)", configs(shared),
        "W4A4, rotation", verdict, quick,
    )  # fmt: skip


if __name__ == "__main__":
    script_main(main, __doc__.splitlines()[0])
