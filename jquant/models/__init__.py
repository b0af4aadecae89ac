"""Plain Flax models (Linen and NNX) that know nothing of quantization, and float training.

>>> from jquant.models import MODEL_NAMES
>>> MODEL_NAMES
('mlp', 'cnn', 'cnn_bn')
"""

from jquant.models import gpt, linen, nnx, train
from jquant.models.config import (
    LM_MODEL_NAMES,
    MODEL_NAMES,
    CNNConfig,
    GPTConfig,
    MLPConfig,
    model_config,
)
from jquant.models.gpt import generate
from jquant.models.nnx import linen_to_nnx, nnx_to_linen
from jquant.models.train import (
    RECOMMENDED_STEPS,
    Trained,
    TrainState,
    evaluate,
    fit,
    linen_apply_fn,
    make_optimizer,
    make_train_step,
    nnx_apply_fn,
    split_linen,
    split_nnx,
    train_or_load,
)

__all__ = [
    "LM_MODEL_NAMES",
    "MODEL_NAMES",
    "RECOMMENDED_STEPS",
    "CNNConfig",
    "GPTConfig",
    "MLPConfig",
    "Trained",
    "TrainState",
    "evaluate",
    "fit",
    "generate",
    "gpt",
    "linen",
    "linen_to_nnx",
    "make_optimizer",
    "make_train_step",
    "model_config",
    "nnx",
    "nnx_apply_fn",
    "nnx_to_linen",
    "split_linen",
    "split_nnx",
    "train",
    "train_or_load",
]
