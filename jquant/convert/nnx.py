"""NNX quantized models -> the same integer program as their Linen twins.

A jquant NNX model (:func:`jquant.nn.nnx.quantize_model`) holds the same variables as the
Linen one under the same paths: ``nnx.Param`` (kernels, biases, BatchNorm affine, learned
scales) = Linen ``params``, ``nnx.BatchStat`` = ``batch_stats``, :class:`QuantStat` =
``quant_stats``. :func:`linen_twin` rebuilds the Linen :class:`QuantizedModel` (one rule per
quantized layer, its path escaped as the pattern) and its variables; :func:`convert_nnx`
converts that, so an NNX model and its Linen twin give identical programs.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import flax.linen as nn
import jax
from flax import nnx

from jquant.convert.build import convert
from jquant.convert.program import Program
from jquant.nn import linen as ql
from jquant.nn import nnx as qnnx
from jquant.nn.state import STATS, QuantStat
from jquant.quant import QParams

__all__ = ["linen_twin", "convert_nnx"]


def _zoo_twin(model: nnx.Module) -> nn.Module:
    from jquant.models import linen as zoo
    from jquant.models.config import CNNConfig, MLPConfig

    config = getattr(model, "config", None)
    if isinstance(config, CNNConfig):
        return zoo.CNN(config)
    if isinstance(config, MLPConfig):
        return zoo.MLP(config)
    raise TypeError(
        "linen_model is required unless the NNX model is a jquant.models zoo model (with a "
        f"CNNConfig / MLPConfig .config), got {type(model).__name__}"
    )


def linen_twin(
    model: nnx.Module, example_x: jax.Array, *, linen_model: nn.Module | None = None
) -> tuple[ql.QuantizedModel, dict[str, Any]]:
    """``(Linen QuantizedModel, variables)`` computing what the quantized NNX ``model`` does.

    Args:
      model: an NNX model quantized by :func:`jquant.nn.nnx.quantize_model` (calibrated).
      example_x: an example input batch (traces the Linen model's paths).
      linen_model: the plain Linen module with the same structure and parameter paths;
        defaults to the zoo twin (:mod:`jquant.models.linen`) of a zoo model's ``config``.

    Raises:
      TypeError: not an NNX module, or no Linen twin known.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")
    linen_model = _zoo_twin(model) if linen_model is None else linen_model
    rules = [
        dataclasses.replace(q.rule, pattern=re.escape(q.path)) for q in qnnx.quantized_layers(model)
    ]
    if not rules:
        raise ValueError("the NNX model has no quantized layer (use jquant.nn.nnx.quantize_model)")
    qmodel, _ = ql.quantize_model(linen_model, rules, example_x, on_unused="ignore")
    params, stats, quant = nnx.state(model, nnx.Param, nnx.BatchStat, QuantStat)
    variables = {"params": params.to_pure_dict()}
    if stats := stats.to_pure_dict():
        variables["batch_stats"] = stats
    if quant := quant.to_pure_dict():
        variables[STATS] = quant
    return qmodel, variables


def convert_nnx(
    model: nnx.Module,
    example_x: jax.Array,
    *,
    output_qparams: QParams,
    mode: str = "double",
    linen_model: nn.Module | None = None,
) -> Program:
    """:func:`jquant.convert.convert` of a quantized NNX model, through :func:`linen_twin`
    (same program as the Linen model with the same variables)."""
    qmodel, variables = linen_twin(model, example_x, linen_model=linen_model)
    return convert(qmodel, variables, example_x, output_qparams=output_qparams, mode=mode)
