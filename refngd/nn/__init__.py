"""Layers with explicit forward passes and row back-propagation (PyTorch-compatible)."""
from .activations import GELU, Flatten, ReLU, Sigmoid, Tanh
from .base import Layer, ParametricLayer
from .linear import Linear
from .sequential import Linearization, Sequential

__all__ = ["Layer", "ParametricLayer", "Linear", "ReLU", "Tanh", "Sigmoid", "GELU",
           "Flatten", "Sequential", "Linearization"]
