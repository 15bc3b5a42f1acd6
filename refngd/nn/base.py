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

import math
from abc import ABC, abstractmethod
from typing import Any

from ..backend import Array, namespace, to_numpy
from ..rows import LayerRows


def host_full(shape: tuple[int, ...], value: float):
    """A host float64 array of ``shape`` filled with ``value`` (for ``init_params``)."""
    return to_numpy([float(value)] * math.prod(shape)).reshape(shape)


class Layer(ABC):
    """A layer without parameters (activations, reshapes)."""

    #: True for layers that read integer indices (Embedding): only first in a Sequential
    integer_input: bool = False

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


class Composite(Layer):
    """A layer built from named sub-layers (attention, Transformer blocks).

    The sub-layers are registered with :meth:`_register` in PyTorch's ``parameters()``
    order, which fixes the layer's slice of θ; the order in which :meth:`forward` applies
    them may differ (a post-norm Transformer block applies ``norm1`` after the attention,
    yet PyTorch lists it after ``linear2``).  Each parametric sub-layer owns a contiguous
    part of the slice, so a backward pass can hand it on to :class:`refngd.rows.RowSet` as
    a layer of its own: :meth:`backward_rows` appends one :class:`refngd.rows.LayerRows`
    per parametric sub-layer, with the rows arriving at that sub-layer's output, and
    every row primitive of the composite is the sum (Gram, U v) or the concatenation
    (Uᵀ w, diagonal) of its sub-layers' — the graph's structure (residual connections,
    the attention's three uses of one projection) lives only in the backward pass.
    """

    def _register(self, children: list[tuple[str, Layer]]) -> None:
        self.children: dict[str, Layer] = {}
        self._offsets: dict[str, tuple[int, int, int]] = {}  # name -> (block, element, size)
        shapes, block, elem = [], 0, 0
        for name, child in children:
            size = sum(math.prod(s) for s in child.param_shapes)
            self.children[name] = child
            self._offsets[name] = (block, elem, size)
            shapes.extend(child.param_shapes)
            block += len(child.param_shapes)
            elem += size
        self.param_shapes = tuple(shapes)

    def _sub(self, params: list, name: str) -> list:
        block = self._offsets[name][0]
        return params[block:block + len(self.children[name].param_shapes)]

    def _fwd(self, name: str, params: list, x: Array):
        """Forward pass of sub-layer ``name``: ``(output, cache)``."""
        return self.children[name].forward(self._sub(params, name), x)

    def _back(self, name: str, params: list, cache: Any, B: Array, start: int,
              records: list | None) -> Array:
        """Pull rows B back through sub-layer ``name``, recording its rows when parametric."""
        _, elem, size = self._offsets[name]
        return backward_rows(self.children[name], self._sub(params, name), cache, B,
                             start + elem, records)

    @abstractmethod
    def backward_rows(self, params: list, cache: Any, B: Array, start: int,
                      records: list | None) -> Array:
        """Pull rows B back to the input; append the parametric sub-layers' LayerRows
        (θ offsets relative to ``start``) to ``records`` unless it is None."""

    def backward(self, params, cache, B):
        return self.backward_rows(params, cache, B, 0, None)


def backward_rows(layer: Layer, params: list, cache: Any, B: Array, start: int,
                  records: list | None, need_input: bool = True):
    """Back-propagate rows B through any layer, recording parametric layers' rows.

    Returns the rows at the layer's input (None when ``need_input`` is False and the
    layer is not a :class:`Composite`, whose inner layers need the pass anyway).
    """
    if isinstance(layer, Composite):
        return layer.backward_rows(params, cache, B, start, records)
    if layer.param_shapes and records is not None:
        size = sum(math.prod(s) for s in layer.param_shapes)
        records.append(LayerRows(layer, params, cache, B, start, start + size))
    return layer.backward(params, cache, B) if need_input else None


class SmallParametricLayer(ParametricLayer):
    """A layer with few parameters per output (normalisation layers' scale and shift).

    Its per-row gradients U_l (R × P_l) cost no more than its backward pass, so every row
    primitive is read off the materialised U_l: the Gram U_l U_lᵀ (R²·P_l), U_l v, U_lᵀ w
    and Σ_r u_r ⊙ u_r.  Subclasses implement :meth:`row_grads` only.
    """

    def _U(self, cache, B):
        N, K = B.shape[:2]
        return self.row_grads(cache, B).reshape(N * K, -1)

    def row_gram(self, cache, B):
        xp = namespace(B)
        U = self._U(cache, B).astype(xp.float64, copy=False)
        return U @ U.T

    def row_dot(self, cache, B, V):
        xp = namespace(B)
        v = xp.concatenate([b.reshape(-1) for b in V])
        return (self._U(cache, B) @ v).reshape(B.shape[:2])

    def row_sum(self, cache, B, w):
        flat = w.reshape(-1) @ self._U(cache, B)
        out, i = [], 0
        for shape in self.param_shapes:
            size = math.prod(shape)
            out.append(flat[i:i + size].reshape(shape))
            i += size
        return out

    def row_sq_sum(self, cache, B):
        U = self._U(cache, B)
        return (U * U).sum(axis=0)
