"""Layers with explicit forward passes and row back-propagation (PyTorch-compatible)."""
from .activations import GELU, Flatten, ReLU, Sigmoid, Tanh
from .base import BiasRows, CompositeLayer, Layer, ParametricLayer
from .conv import Conv2d
from .linear import Linear
from .peft import LoRALinear, PromptPrefix
from .sequential import Linearization, Sequential

__all__ = ["Layer", "ParametricLayer", "Linear", "Conv2d", "ReLU", "Tanh", "Sigmoid", "GELU",
           "Flatten", "Sequential", "Linearization", "LoRALinear", "PromptPrefix", "CompositeLayer",
           "BiasRows"]
