"""Layers with explicit forward passes and row back-propagation (PyTorch-compatible)."""
from .activations import GELU, Flatten, ReLU, Sigmoid, Tanh
from .base import Layer, ParametricLayer
from .conv import Conv2d
from .linear import Linear
from .sequential import Linearization, Sequential

__all__ = ["Layer", "ParametricLayer", "Linear", "Conv2d", "ReLU", "Tanh", "Sigmoid", "GELU",
           "Flatten", "Sequential", "Linearization"]
