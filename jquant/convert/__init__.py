"""Model conversion: a quantized Flax model -> an integer-only program (data + interpreter).

The model: a rule-quantized ``QuantizedModel``, a Linen model built from jquant layers
(``QDense``, ``QConv``, ``QConvBN``) or an NNX model with jquant layers (pass
``variables=None``); Conv / Dense (+ BatchNorm, relu), pooling, reshape and residual adds
(the program is then a small DAG: ``program.inputs``).

program = convert(qmodel, variables, x[:1], output_qparams=qp)
    # qp = output_qparams_from_data(qmodel, variables, batches)  (output_range="float":
    # the float model's logits, TFLiteConverter's rule)
    # residual blocks: residual_qparams=residual_qparams_from_data(qmodel, variables, batches)
codes = jax.jit(run)(program, program.quantize_input(x))     # int8 in, int8 out
logits = program.dequantize_output(codes)
save(program, "model.safetensors"); program = load("model.safetensors")
accumulator_report(program)     # worst-case accumulator width per layer
sim = simulation(qmodel, variables, x[:1], output_qparams=qp, mode="double")  # fake-quant
    # model with the program's requantization: quantize(sim(x)) == run(...) bit for bit
v = with_requant_constants(qmodel, variables, x[:1], output_qparams=qp)  # rules with
    # requant=m: qmodel.with_phase("eval").apply(v, x) is the program's output, bit for bit
"""

from jquant.convert.build import (
    OUTPUT_RANGES,
    convert,
    convert_nnx,
    output_qparams_from_data,
    residual_qparams_from_data,
    with_quantized_bias,
)
from jquant.convert.io import load, read_tensors, save, write_tensors
from jquant.convert.nnx import nnx_variables
from jquant.convert.program import (
    AccumulatorInfo,
    Add,
    Concat,
    Conv,
    Dense,
    LayerSpec,
    Mean,
    Pool,
    Program,
    Reshape,
    accumulator_report,
    run,
    validate,
)
from jquant.convert.requant_constants import with_requant_constants
from jquant.convert.simulate import simulation
from jquant.convert.targets import TARGETS, requant_for, retarget
from jquant.convert.trace import Node, trace_layers

__all__ = [
    "OUTPUT_RANGES",
    "TARGETS",
    "AccumulatorInfo",
    "Add",
    "Concat",
    "Conv",
    "Dense",
    "LayerSpec",
    "Mean",
    "Node",
    "Pool",
    "Program",
    "Reshape",
    "accumulator_report",
    "convert",
    "convert_nnx",
    "load",
    "nnx_variables",
    "output_qparams_from_data",
    "read_tensors",
    "residual_qparams_from_data",
    "requant_for",
    "retarget",
    "run",
    "save",
    "simulation",
    "trace_layers",
    "validate",
    "with_quantized_bias",
    "with_requant_constants",
    "write_tensors",
]
