"""Layers with explicit forward passes and row back-propagation (PyTorch-compatible).

The layer protocol (:mod:`refngd.nn.base`), the layers, :class:`Sequential` with its θ
layout, the model and linearisation protocols (:mod:`refngd.nn.protocols`) and parameter
subsets (:mod:`refngd.nn.subsets`, also importable as ``refngd.subsets``).
"""
from .activations import (ELU, GELU, Dropout, Flatten, Hardsigmoid, Hardswish, Hardtanh,
                          Identity, LeakyReLU, ReLU, ReLU6, Sigmoid, SiLU, Softplus, Tanh)
from .attention import MultiheadAttention, ScaledDotProductAttention
from .base import BiasRows, Layer, ParametricLayer, SmallParametricLayer
from .layout import ParamLayout, TensorSlot
from .composite import Composite
from .conv import Conv2d
from .conv1d import Conv1d
from .embedding import Embedding
from .graph import GraphModel
from .linear import Linear
from .norm import BatchNorm1d, BatchNorm2d, LayerNorm
from .peft import LoRALinear, PromptPrefix
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d
from .pooling1d import AdaptiveAvgPool1d, AvgPool1d, MaxPool1d
from .resample import Mean, Upsample
from .protocols import Linearization as LinearizationProtocol
from .protocols import Model
from .sequential import Linearization, Sequential
from .transformer import TransformerEncoderLayer
from .transposed import TransposedLinear
from . import subsets

__all__ = ["Layer", "ParametricLayer", "SmallParametricLayer", "Composite", "BiasRows", "Linear",
           "Conv2d", "Conv1d", "ReLU", "Tanh", "Sigmoid", "GELU", "LeakyReLU", "ELU", "SiLU",
           "Softplus", "Hardtanh", "ReLU6", "Hardsigmoid", "Hardswish", "Identity", "Dropout", "Flatten", "Sequential", "Linearization",
           "LayerNorm", "BatchNorm1d", "BatchNorm2d", "Embedding", "AvgPool2d", "MaxPool2d",
           "AdaptiveAvgPool2d", "AvgPool1d", "MaxPool1d", "AdaptiveAvgPool1d", "Upsample", "Mean",
           "MultiheadAttention", "ScaledDotProductAttention",
           "TransformerEncoderLayer", "LoRALinear", "PromptPrefix", "ParamLayout", "TensorSlot",
           "Model", "LinearizationProtocol", "subsets", "GraphModel", "TransposedLinear"]
