"""Writes ``program_v5.safetensors`` and ``program_v5_expected.npz`` (tests/data/README.md).

A hand-built integer program of every layer kind (1-D conv + relu, 1x1 conv, residual add,
max and average pool, concat, mean, reshape, dense with a narrow clamp), its constants drawn
by NumPy ``default_rng(5)``, double requantization, saved by ``jquant.convert.save`` at file
format version 5 (the hand-written safetensors layout, before the ``safetensors`` package and
packed low-bit weights). The ``.npz`` holds 16 float inputs ``x`` and the int8 output codes
``y = run(program, program.quantize_input(x))`` that this code computed.

Run from the repository root: ``PYTHONPATH=$PWD python tests/data/make_program_v5.py``.
"""

import json
import pathlib

import jax
import numpy as np

from jquant import convert as C
from jquant import integer

HERE = pathlib.Path(__file__).parent


def build() -> C.Program:
    """The program (see the module docstring)."""
    rng = np.random.default_rng(5)
    f32 = np.float32

    def linear(cls, path, w_shape, x_scale, x_zp, out_scale, out_zp, **kw):
        out = w_shape[-1]
        w_scale = rng.uniform(0.01, 0.05, out).astype(f32)
        return cls(
            path=path,
            w=rng.integers(-127, 128, w_shape).astype(np.int8),
            b=rng.integers(-500, 500, out).astype(np.int32),
            x_zp=np.int32(x_zp),
            out_zp=np.int32(out_zp),
            requant=integer.requant_from_scales(f32(x_scale), w_scale, f32(out_scale), "double"),
            x_scale=f32(x_scale),
            w_scale=w_scale,
            out_scale=f32(out_scale),
            **kw,
        )

    s_in, s1, s2, s3, s4 = 0.05, 0.8, 1.0, 1.2, 0.4
    add_scales = (f32(s1), f32(s2), f32(s3))
    layers = (
        linear(C.Conv, "conv1", (1, 3, 2, 4), s_in, 3, s1, -5, activation="relu",
               padding=((0, 0), (1, 1)), spatial=1),                       # v1 (8, 4)
        linear(C.Conv, "conv2", (1, 1, 4, 4), s1, -5, s2, 2, spatial=1),   # v2 (8, 4)
        C.Add("add", np.int32(-5), np.int32(2), np.int32(1),
              integer.add_requant(*add_scales, "double"), *add_scales),    # v3 (8, 4)
        C.Pool("max_pool", "max", (1, 2), (1, 2), spatial=1),              # v4 (4, 4)
        C.Pool("avg_pool", "avg", (1, 2), (1, 2), spatial=1),              # v5 (4, 4)
        C.Concat("concat", np.int32(1), f32(s3), axis=2, arity=2),         # v6 (4, 8)
        C.Mean("mean", np.int32(1), np.int32(-3),
               integer.mean_requant(f32(s3), np.int32(1), f32(s4), np.int32(-3), 4, "double"),
               f32(s3), f32(s4), axes=(1,), count=4),                      # v7 (8,)
        C.Reshape("flatten", (8,)),                                        # v8 (8,)
        linear(C.Dense, "head", (8, 3), s4, -3, 60.0, -1, clamp=(-8, 7)),   # v9 (3,)
    )  # fmt: skip
    return C.Program(
        layers=layers,
        input_scale=f32(s_in),
        input_zp=np.int32(3),
        output_scale=f32(60.0),
        output_zp=np.int32(-1),
        input_shape=(8, 2),
        inputs=((0,), (1,), (1, 2), (3,), (3,), (4, 5), (6,), (7,), (8,)),
    )


def main() -> None:
    program = build()
    path = HERE / "program_v5.safetensors"
    C.save(program, path)
    _, metadata = C.read_tensors(path)
    assert json.loads(metadata["jquant_program"])["version"] == 5
    x = np.random.default_rng(6).normal(0.0, 1.5, (16, 8, 2)).astype(np.float32)
    y = np.asarray(jax.jit(C.run)(program, program.quantize_input(x)))
    np.savez(HERE / "program_v5_expected.npz", x=x, y=y)
    print(path, path.stat().st_size, "bytes; output codes", np.unique(y).size, "distinct")


if __name__ == "__main__":
    main()
