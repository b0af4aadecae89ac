"""Plain ``flax.nnx`` MLP and CNN, the same networks as :mod:`jquant.models.linen`.

NNX layers need their input sizes up front, so constructors take ``input_shape`` (one
example, channels last). Attribute names, parameter names and shapes equal the Linen ones
(``conv1.kernel``, ``bn1.mean``, ``head.bias``, ...), which is what :func:`linen_to_nnx` and
:func:`nnx_to_linen` rely on.

>>> import jax.numpy as jnp
>>> from flax import nnx
>>> model = make_model("cnn", (40, 1), 10, rngs=nnx.Rngs(0))
>>> model(jnp.zeros((2, 40, 1))).shape
(2, 10)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx

from jquant.models.config import CNNConfig, GPTConfig, MLPConfig, model_config
from jquant.models.gpt import NNXGPT

__all__ = ["MLP", "CNN", "make_model", "linen_to_nnx", "nnx_to_linen"]


def _dense_stack(widths: Sequence[int], in_features: int, num_classes: int, rngs: nnx.Rngs):
    sizes = [in_features, *widths]
    hidden = [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return hidden, nnx.Linear(sizes[-1], num_classes, rngs=rngs)


class MLP(nnx.Module):
    """``head(relu(dense_K(... relu(dense1(flatten(x))))))``; see :class:`MLPConfig`."""

    def __init__(self, config: MLPConfig, input_shape: Sequence[int], *, rngs: nnx.Rngs):
        self.config = config
        hidden, self.head = _dense_stack(
            config.hidden, math.prod(input_shape), config.num_classes, rngs
        )
        for i, layer in enumerate(hidden, 1):
            setattr(self, f"dense{i}", layer)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` of inputs ``(N, *input_shape)``; ``train`` is unused."""
        del train
        x = x.reshape(x.shape[0], -1)
        for i in range(1, len(self.config.hidden) + 1):
            x = nnx.relu(getattr(self, f"dense{i}")(x))
        return self.head(x)


class CNN(nnx.Module):
    """Conv blocks ``pool(relu([bn_i](conv_i(x))))``, flatten, dense layers, head.

    ``train=True`` normalises with batch statistics and updates the running averages (the
    ``nnx.BatchStat`` variables ``bn_i.mean`` / ``bn_i.var``); ``train=False`` uses them.
    """

    def __init__(self, config: CNNConfig, input_shape: Sequence[int], *, rngs: nnx.Rngs):
        config.check_input_shape(input_shape)
        self.config = config
        in_channels = [input_shape[-1], *config.features[:-1]]
        for i, (c_in, c_out) in enumerate(zip(in_channels, config.features, strict=True), 1):
            use_bias = not config.batch_norm
            conv = nnx.Conv(c_in, c_out, config.kernel_size, use_bias=use_bias, rngs=rngs)
            setattr(self, f"conv{i}", conv)
            if config.batch_norm:
                bn = nnx.BatchNorm(
                    c_out, momentum=config.bn_momentum, epsilon=config.bn_epsilon, rngs=rngs
                )
                setattr(self, f"bn{i}", bn)
        hidden, self.head = _dense_stack(
            config.dense, config.flat_features(input_shape), config.num_classes, rngs
        )
        for i, layer in enumerate(hidden, 1):
            setattr(self, f"dense{i}", layer)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` of inputs ``(N, *spatial, C)``."""
        cfg = self.config
        pool = nnx.avg_pool if cfg.pool == "avg" else nnx.max_pool
        for i in range(1, len(cfg.features) + 1):
            x = getattr(self, f"conv{i}")(x)
            if cfg.batch_norm:
                x = getattr(self, f"bn{i}")(x, use_running_average=not train)
            x = pool(nnx.relu(x), cfg.window, strides=cfg.window, padding="VALID")
        x = x.reshape(x.shape[0], -1)
        for i in range(1, len(cfg.dense) + 1):
            x = nnx.relu(getattr(self, f"dense{i}")(x))
        return self.head(x)


def make_model(
    name: str, input_shape: Sequence[int], num_classes: int, *, rngs: nnx.Rngs
) -> MLP | CNN | NNXGPT:
    """The zoo's NNX model ``name`` (``"mlp"``, ``"cnn"``, ``"cnn_bn"``, ``"gpt"``)."""
    cfg = model_config(name, input_shape, num_classes)
    if isinstance(cfg, GPTConfig):
        return NNXGPT(cfg, rngs=rngs)
    return (MLP if isinstance(cfg, MLPConfig) else CNN)(cfg, input_shape, rngs=rngs)


def _leaf_paths(tree: Any) -> dict[tuple, Any]:
    return {
        tuple(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def linen_to_nnx(variables: dict, model: nnx.Module) -> nnx.Module:
    """Returns a copy of the NNX ``model`` holding the Linen ``variables``' values.

    ``variables["params"]`` go to the ``nnx.Param`` s and ``variables["batch_stats"]`` (if any)
    to the ``nnx.BatchStat`` s, matched by path (``params/conv1/kernel`` -> ``conv1.kernel``).
    The input model is not modified.

    Raises:
      ValueError: if the paths or shapes differ.
    """
    linen_tree: dict = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in _leaf_paths(variables.get(collection, {})).items():
            linen_tree[path] = leaf
    new = nnx.clone(model)
    state = nnx.state(new, nnx.Param, nnx.BatchStat)
    nnx_paths = {p: v for s in state for p, v in _leaf_paths(s.to_pure_dict()).items()}
    if set(linen_tree) != set(nnx_paths):
        raise ValueError(
            "variables do not match the model: only in variables "
            f"{sorted(set(linen_tree) - set(nnx_paths))}, only in the model "
            f"{sorted(set(nnx_paths) - set(linen_tree))}"
        )
    for path, leaf in linen_tree.items():
        if leaf.shape != nnx_paths[path].shape:
            raise ValueError(
                f"shape of {'/'.join(map(str, path))}: variables {leaf.shape}, "
                f"model {nnx_paths[path].shape}"
            )
    for sub in state:
        pure = jax.tree_util.tree_map_with_path(
            lambda p, _: linen_tree[tuple(k.key for k in p)], sub.to_pure_dict()
        )
        sub.replace_by_pure_dict(pure)
    nnx.update(new, *state)
    return new


def nnx_to_linen(model: nnx.Module) -> dict:
    """The Linen variables ``{"params": ..., ["batch_stats": ...]}`` of an NNX ``model``."""
    params, stats = nnx.state(model, nnx.Param, nnx.BatchStat)
    variables = {"params": params.to_pure_dict()}
    if stats := stats.to_pure_dict():
        variables["batch_stats"] = stats
    return variables
