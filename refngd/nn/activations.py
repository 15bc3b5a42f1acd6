"""Elementwise activations and Flatten.

Each activation caches its derivative σ'(x) in the forward pass; the backward pass
multiplies every cotangent row by it (broadcast over the K rows of a sample).
"""
from __future__ import annotations

import math

from ..backend import erf, namespace
from .base import Layer


class _Elementwise(Layer):
    def backward(self, params, cache, B):
        return B * cache[:, None]


class ReLU(_Elementwise):
    """max(x, 0); derivative 1[x > 0] (0 at x = 0, as PyTorch)."""

    def forward(self, params, x):
        mask = x > 0
        return x * mask, mask.astype(x.dtype)


class Tanh(_Elementwise):
    """tanh(x); derivative 1 − tanh²(x)."""

    def forward(self, params, x):
        t = namespace(x).tanh(x)
        return t, 1 - t * t


class Sigmoid(_Elementwise):
    """σ(x) = 1/(1 + e^−x); derivative σ(1 − σ)."""

    def forward(self, params, x):
        xp = namespace(x)
        s = 0.5 * (1 + xp.tanh(0.5 * x))  # overflow-free form of 1/(1 + e^-x)
        return s, s * (1 - s)


class GELU(_Elementwise):
    """x·Φ(x) (``approximate="none"``) or PyTorch's tanh approximation (``"tanh"``).

    Derivatives: Φ(x) + x φ(x) for the exact form; for the tanh form with
    u = √(2/π)(x + 0.044715 x³): ½(1 + tanh u) + ½ x (1 − tanh² u) u'.
    """

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}.")
        self.approximate = approximate

    def __repr__(self) -> str:
        return f"GELU(approximate={self.approximate!r})"

    def forward(self, params, x):
        xp = namespace(x)
        if self.approximate == "none":
            cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
            pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
            return x * cdf, cdf + x * pdf
        c = math.sqrt(2 / math.pi)
        t = xp.tanh(c * (x + 0.044715 * x**3))
        dt = (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * dt


class Flatten(Layer):
    """Flatten all but the batch axis (``torch.nn.Flatten()``), row-major like PyTorch."""

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

    def forward(self, params, x):
        return x.reshape(x.shape[0], -1), x.shape[1:]

    def backward(self, params, cache, B):
        return B.reshape(B.shape[:2] + tuple(cache))
