"""One rule per layer type, shared by the per-sample engine, K-FAC and the projection
(:mod:`repif.layers.base`). Importing the package registers the built-in rules."""

from repif.layers.base import LayerBlock, LayerRule, names, register, rule_for, rules
from repif.layers.conv import Conv2dRule
from repif.layers.dense import Conv1DRule, LinearRule, is_conv1d
from repif.layers.embedding import EmbeddingRule
from repif.layers.local import GENERIC, GenericRule, MultiheadAttentionRule
from repif.layers.norm import BatchNormRule, LayerNormRule

__all__ = [
    "GENERIC", "BatchNormRule", "Conv1DRule", "Conv2dRule", "EmbeddingRule", "GenericRule",
    "LayerBlock", "LayerNormRule", "LayerRule", "LinearRule", "MultiheadAttentionRule",
    "is_conv1d", "names", "register", "rule_for", "rules",
]
