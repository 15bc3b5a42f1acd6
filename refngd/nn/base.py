"""The layer protocol: explicit forward pass and back-propagation of *row cotangents*.

A layer maps a batch ``x`` of shape ``(N, *in_shape)`` to ``(N, *out_shape)``.  Instead of
the usual single vector-Jacobian product, :meth:`Layer.backward` propagates a whole set of
R = N·K cotangent rows at once, stored as an array ``B`` of shape ``(N, K, *out_shape)``:
row ``(n, k)`` belongs to sample ``n`` (docs/design.md §2).  One backward pass with these rows
yields every curvature quantity of refngd.

Layers with parameters (:class:`ParametricLayer`) also define the *row primitives* — the
per-layer contractions of the implicit row matrix U (R × P_layer), whose row ``(n, k)`` is
the parameter gradient of ⟨B[n, k], layer output of sample n⟩:

========================  ======================  ===========================================
primitive                  returns                 meaning
========================  ======================  ===========================================
``row_gram(cache, B)``     (R, R) float64          U Uᵀ, the layer's Gram contribution
``row_dot(cache, B, V)``   (N, K)                  U v for a parameter block list V
``row_sum(cache, B, w)``   list of blocks          Uᵀ w for row weights w of shape (N, K)
``row_grads(cache, B)``    (N, K, P_layer)         U itself, rows flattened in PyTorch order
``row_sq_sum(cache, B)``   (P_layer,)              diag(UᵀU) = Σ_r u_r ⊙ u_r
========================  ======================  ===========================================

Like HIPS autograd's primitives, each layer's derivatives sit right beside its forward.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..backend import Array


class Layer(ABC):
    """A layer without parameters (activations, reshapes)."""

    #: shapes of the parameter arrays, in PyTorch's ``parameters()`` order
    param_shapes: tuple[tuple[int, ...], ...] = ()

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample output shape for a per-sample input shape; raises on a mismatch."""
        return in_shape

    @abstractmethod
    def forward(self, params: list[Array], x: Array) -> tuple[Array, Any]:
        """Return ``(output, cache)``; ``cache`` holds what :meth:`backward` needs."""

    @abstractmethod
    def backward(self, params: list[Array], cache: Any, B: Array) -> Array:
        """Pull row cotangents ``B`` (N, K, *out_shape) back to (N, K, *in_shape)."""

    def init_params(self, rng) -> list:
        """Host (NumPy) initial parameters drawn with ``rng``; empty for this layer."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ParametricLayer(Layer):
    """A layer with parameters; adds the row primitives listed in the module docstring."""

    @abstractmethod
    def row_gram(self, cache: Any, B: Array) -> Array:
        """(R, R) float64 Gram matrix U Uᵀ of this layer's rows."""

    @abstractmethod
    def row_dot(self, cache: Any, B: Array, V: list[Array]) -> Array:
        """(N, K) products U v, for v given as this layer's parameter blocks V."""

    @abstractmethod
    def row_sum(self, cache: Any, B: Array, w: Array) -> list[Array]:
        """Uᵀ w as parameter blocks, for row weights w of shape (N, K)."""

    @abstractmethod
    def row_grads(self, cache: Any, B: Array) -> Array:
        """(N, K, P_layer) per-row gradients, flattened in PyTorch order."""

    @abstractmethod
    def row_sq_sum(self, cache: Any, B: Array) -> Array:
        """(P_layer,) diagonal of UᵀU, i.e. Σ_r u_r ⊙ u_r."""
