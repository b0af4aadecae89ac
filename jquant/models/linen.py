"""Plain ``flax.linen`` MLP and CNN (no quantization), built from :mod:`jquant.models.config`.

>>> import jax, jax.numpy as jnp
>>> model = make_model("cnn", (40, 1), 10)
>>> variables = model.init(jax.random.key(0), jnp.zeros((1, 40, 1)))
>>> sorted(variables["params"])
['conv1', 'conv2', 'dense1', 'head']
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jquant.models.config import CNNConfig, GPTConfig, MLPConfig, model_config
from jquant.models.gpt import GPT

__all__ = ["MLP", "CNN", "make_model"]


class MLP(nn.Module):
    """``head(relu(dense_K(... relu(dense1(flatten(x))))))``; see :class:`MLPConfig`."""

    config: MLPConfig = MLPConfig()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` of inputs ``(N, ...)``; ``train`` is unused."""
        del train
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(self.config.hidden, 1):
            x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
        return nn.Dense(self.config.num_classes, name="head")(x)


class CNN(nn.Module):
    """Conv blocks ``pool(relu([bn_i](conv_i(x))))``, flatten, dense layers, head.

    ``train=True`` normalises with the batch statistics and updates the running averages in
    the ``batch_stats`` collection (apply with ``mutable=["batch_stats"]``); ``train=False``
    uses the running averages.
    """

    config: CNNConfig = CNNConfig()

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` of inputs ``(N, *spatial, C)``."""
        cfg = self.config
        cfg.check_input_shape(x.shape[1:])
        pool = nn.avg_pool if cfg.pool == "avg" else nn.max_pool
        for i, channels in enumerate(cfg.features, 1):
            x = nn.Conv(channels, cfg.kernel_size, use_bias=not cfg.batch_norm, name=f"conv{i}")(x)
            if cfg.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train,
                    momentum=cfg.bn_momentum,
                    epsilon=cfg.bn_epsilon,
                    name=f"bn{i}",
                )(x)
            x = pool(nn.relu(x), cfg.window, strides=cfg.window, padding="VALID")
        x = x.reshape(x.shape[0], -1)
        for i, width in enumerate(cfg.dense, 1):
            x = nn.relu(nn.Dense(width, name=f"dense{i}")(x))
        return nn.Dense(cfg.num_classes, name="head")(x)


def make_model(name: str, input_shape: Sequence[int], num_classes: int) -> MLP | CNN | GPT:
    """The zoo's Linen model ``name`` (``"mlp"``, ``"cnn"``, ``"cnn_bn"``, ``"gpt"``)."""
    cfg = model_config(name, input_shape, num_classes)
    if isinstance(cfg, GPTConfig):
        return GPT(cfg)
    return MLP(cfg) if isinstance(cfg, MLPConfig) else CNN(cfg)
