"""Layers with explicit forward passes and row back-propagation (PyTorch-compatible).

The layer protocol (:mod:`refngd.nn.base`), the layers, :class:`Sequential` with its θ
layout, the model and linearisation protocols (:mod:`refngd.nn.protocols`) and parameter
subsets (:mod:`refngd.nn.subsets`, also importable as ``refngd.subsets``).
"""
from .activations import GELU, Flatten, ReLU, Sigmoid, Tanh
from .attention import MultiheadAttention, ScaledDotProductAttention
from .base import BiasRows, Layer, ParametricLayer, SmallParametricLayer
from .layout import ParamLayout, TensorSlot
from .composite import Composite
from .conv import Conv2d
from .embedding import Embedding
from .graph import GraphModel
from .linear import Linear
from .norm import BatchNorm1d, BatchNorm2d, LayerNorm
from .peft import LoRALinear, PromptPrefix
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .protocols import Linearization as LinearizationProtocol
from .protocols import Model
from .sequential import Linearization, Sequential
from .transformer import TransformerEncoderLayer
from . import subsets

__all__ = ["Layer", "ParametricLayer", "SmallParametricLayer", "Composite", "BiasRows", "Linear",
           "Conv2d", "ReLU", "Tanh", "Sigmoid", "GELU", "Flatten", "Sequential", "Linearization",
           "LayerNorm", "BatchNorm1d", "BatchNorm2d", "Embedding", "AvgPool2d", "MaxPool2d",
           "AdaptiveAvgPool2d", "MultiheadAttention", "ScaledDotProductAttention",
           "TransformerEncoderLayer", "LoRALinear", "PromptPrefix", "ParamLayout", "TensorSlot",
           "Model", "LinearizationProtocol", "subsets", "GraphModel"]
