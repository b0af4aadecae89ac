"""Architecture configs shared by the Linen and NNX models, and the named model zoo.

Both frameworks build the same network from one frozen config, so their parameters have the
same names and shapes and can be copied across (:func:`jquant.models.nnx.linen_to_nnx`).
Module names are stable for path-matched quantization rules::

    MLP:  dense1 .. denseK -> head
    CNN:  conv1 [bn1] -> relu -> pool -> ... -> convL [bnL] -> relu -> pool -> flatten
          -> dense1 .. denseK -> head
    GPT:  embed + pos_embed -> block1 .. blockL -> norm -> embed.attend | head, each block
          x + attn(norm1(x)) with attn/{query, key, value, out}, then x + mlp(norm2(x)) with
          mlp/{up, down}
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

__all__ = [
    "MLPConfig",
    "CNNConfig",
    "GPTConfig",
    "MODEL_NAMES",
    "LM_MODEL_NAMES",
    "model_config",
]

POOLS = ("avg", "max")


def _check_sizes(name: str, value: Sequence[int], *, allow_empty: bool) -> None:
    if not isinstance(value, tuple) or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value
    ):
        raise TypeError(f"{name} must be a tuple of positive ints, got {value!r}")
    if not allow_empty and not value:
        raise ValueError(f"{name} must not be empty, got {value!r}")


def _check_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")


@dataclasses.dataclass(frozen=True)
class MLPConfig:
    """Flatten, then ``dense_i: x -> relu(x W_i + b_i)`` for each hidden width, then ``head``.

    Attributes:
      num_classes: width of the ``head`` layer (logits).
      hidden: widths of ``dense1``, ``dense2``, ...
    """

    num_classes: int = 10
    hidden: tuple[int, ...] = (128, 128)

    def __post_init__(self):
        _check_classes(self.num_classes)
        _check_sizes("hidden", self.hidden, allow_empty=True)


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Conv blocks ``conv_i -> [bn_i] -> relu -> pool``, then an MLP head.

    Convolutions use 'SAME' padding and stride 1; pooling takes windows of ``pool_size`` with
    the same stride and 'VALID' padding, so each block divides the spatial size by
    ``pool_size`` (floor). ``len(kernel_size)`` is the number of spatial dimensions: ``(5,)``
    for 1-D signals ``(N, L, C)``, ``(3, 3)`` for images ``(N, H, W, C)``.

    Attributes:
      num_classes: width of the ``head`` layer (logits).
      features: output channels of ``conv1``, ``conv2``, ...
      kernel_size: convolution window, one entry per spatial dimension.
      dense: widths of ``dense1``, ... between the flattened features and ``head``.
      pool: ``"avg"`` or ``"max"``.
      pool_size: pooling window and stride along each spatial dimension.
      batch_norm: insert ``bn_i`` (BatchNorm over the channel axis) after each conv; the convs
        then have no bias, as BN's shift replaces it: ``y = gamma (conv(x) - mu) / sqrt(var +
        eps) + beta``.
      bn_momentum: running-average momentum of the batch statistics.
      bn_epsilon: ``eps`` above.
    """

    num_classes: int = 10
    features: tuple[int, ...] = (32, 32)
    kernel_size: tuple[int, ...] = (5,)
    dense: tuple[int, ...] = (64,)
    pool: str = "max"
    pool_size: int = 2
    batch_norm: bool = False
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5

    def __post_init__(self):
        _check_classes(self.num_classes)
        _check_sizes("features", self.features, allow_empty=False)
        _check_sizes("kernel_size", self.kernel_size, allow_empty=False)
        _check_sizes("dense", self.dense, allow_empty=True)
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        _check_sizes("pool_size", (self.pool_size,), allow_empty=False)

    @property
    def window(self) -> tuple[int, ...]:
        """Pooling window (and stride), one entry per spatial dimension."""
        return (self.pool_size,) * len(self.kernel_size)

    def check_input_shape(self, input_shape: Sequence[int]) -> None:
        """Raises ValueError unless ``input_shape`` is ``(*spatial, C)`` and survives pooling."""
        spatial = len(self.kernel_size)
        if len(input_shape) != spatial + 1:
            raise ValueError(
                f"input_shape must be (*spatial, channels) with {spatial} spatial dim(s) to "
                f"match kernel_size={self.kernel_size}, got {tuple(input_shape)}"
            )
        if min(input_shape[:-1]) < self.pool_size ** len(self.features):
            raise ValueError(
                f"input_shape {tuple(input_shape)} is too small for {len(self.features)} "
                f"pooling stage(s) of size {self.pool_size}"
            )

    def flat_features(self, input_shape: Sequence[int]) -> int:
        """Size of the flattened conv output: ``prod(floor(s / pool^L)) * features[-1]``."""
        self.check_input_shape(input_shape)
        shrink = self.pool_size ** len(self.features)
        return math.prod(s // shrink for s in input_shape[:-1]) * self.features[-1]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    """A decoder-only transformer on token ids (pre-RMSNorm, causal attention, GELU MLP).

    ``h_0 = embed[t] + pos_embed[p]``; each block ``h += attn(norm1(h))``, ``h += mlp(norm2(h))``;
    logits ``norm(h) E^T`` with the embedding ``E`` (tied) or ``norm(h) W_head`` (untied).
    Attention per head ``softmax(q k^T / sqrt(d) + causal mask) v`` with ``d = width / heads``;
    ``mlp(x) = gelu(x W_up) W_down`` with hidden width ``mlp_ratio * width``. No biases.

    Attributes:
      vocab_size: number of tokens (input ids and output logits).
      context: longest sequence (learned positional embeddings ``(context, width)``).
      num_layers: transformer blocks.
      num_heads: attention heads; must divide ``width``.
      width: residual stream width.
      mlp_ratio: MLP hidden width over ``width``.
      tied_embeddings: logits from the input embedding (``embed.attend``) instead of ``head``.
      rms_epsilon: ``eps`` of RMSNorm ``x / sqrt(mean(x^2) + eps) * gain``.
    """

    vocab_size: int = 103
    context: int = 128
    num_layers: int = 4
    num_heads: int = 4
    width: int = 128
    mlp_ratio: int = 4
    tied_embeddings: bool = True
    rms_epsilon: float = 1e-6

    def __post_init__(self):
        _check_classes(self.vocab_size)
        for name in ("context", "num_layers", "num_heads", "width", "mlp_ratio"):
            _check_sizes(name, (getattr(self, name),), allow_empty=False)
        if self.width % self.num_heads:
            raise ValueError(
                f"num_heads must divide width, got num_heads={self.num_heads}, width={self.width}"
            )
        if not isinstance(self.tied_embeddings, bool):
            raise TypeError(f"tied_embeddings must be a bool, got {self.tied_embeddings!r}")
        if not self.rms_epsilon > 0:
            raise ValueError(f"rms_epsilon must be > 0, got {self.rms_epsilon!r}")

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``width // num_heads``."""
        return self.width // self.num_heads


MODEL_NAMES = ("mlp", "cnn", "cnn_bn")  # classifiers (what the sweeps and the CLI take)
LM_MODEL_NAMES = ("gpt",)  # language models on token ids


def model_config(
    name: str, input_shape: Sequence[int], num_classes: int
) -> MLPConfig | CNNConfig | GPTConfig:
    """The zoo's config for model ``name`` (one of :data:`MODEL_NAMES` or
    :data:`LM_MODEL_NAMES`) on inputs of this shape.

    ``cnn_bn`` is ``cnn`` with BatchNorm after each conv. CNNs on 1-D signals use kernel 5,
    on images 3x3. ``gpt`` takes ``input_shape = (context,)`` and ``num_classes`` the
    vocabulary size; the rest is :class:`GPTConfig`'s defaults.
    """
    if name not in MODEL_NAMES + LM_MODEL_NAMES:
        raise ValueError(f"unknown model name {name!r}; allowed: {MODEL_NAMES + LM_MODEL_NAMES}")
    if name == "gpt":
        if len(input_shape) != 1:
            raise ValueError(f"a GPT needs input_shape (context,), got {tuple(input_shape)}")
        return GPTConfig(vocab_size=num_classes, context=input_shape[0])
    if name == "mlp":
        return MLPConfig(num_classes=num_classes)
    spatial = len(input_shape) - 1
    if spatial < 1:
        raise ValueError(f"a CNN needs input_shape (*spatial, channels), got {tuple(input_shape)}")
    kernel = (5,) if spatial == 1 else (3,) * spatial
    cfg = CNNConfig(num_classes=num_classes, kernel_size=kernel, batch_norm=name == "cnn_bn")
    cfg.check_input_shape(input_shape)
    return cfg
