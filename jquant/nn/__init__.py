"""Quantized Flax layers (Linen and NNX) and rule-based quantization of whole models."""

from jquant.nn import linen, nnx
from jquant.nn.bn_folding import QConvBN, fold_bn
from jquant.nn.einsum import QEinsum
from jquant.nn.rules import QuantRule, RuleMatch, match_rules, set_bits
from jquant.nn.state import PHASES, STATS, QuantStat
