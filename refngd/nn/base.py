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

Parameter subsets (docs/subsets.md) enter through :meth:`ParametricLayer.row_views`: it
returns the row-primitive objects of the layer's *selected* tensors only — the layer
itself when all are selected, a restriction of it (say its weight without its bias) when
some are, or several simpler layers when the layer is a sum of them (a LoRA layer is a
frozen Linear plus two trainable ones).  Frozen tensors thus never enter a row primitive.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import math
from typing import Any

from ..backend import Array, namespace


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
    """A layer with parameters; adds the row primitives listed in the module docstring.

    ``trainable`` (one bool per tensor of ``param_shapes``) is the layer's default
    selection when a curvature gets ``params=None`` — PyTorch's ``requires_grad``;
    every tensor unless a subclass or the user sets it otherwise.
    """

    @property
    def trainable(self) -> tuple[bool, ...]:
        return getattr(self, "_trainable", None) or (True,) * len(self.param_shapes)

    @trainable.setter
    def trainable(self, flags) -> None:
        flags = tuple(bool(f) for f in flags)
        if len(flags) != len(self.param_shapes):
            raise ValueError(f"{self!r}.trainable needs one bool per parameter tensor "
                             f"({len(self.param_shapes)}), got {len(flags)}.")
        self._trainable = flags

    def restrict(self, active: tuple[bool, ...]) -> "ParametricLayer":
        """Row primitives of the tensors with ``active[t]`` only (some, not all, selected).

        The returned object's ``param_shapes`` are the selected shapes, in order, and its
        row primitives take this layer's cache and rows.  Layers that do not override this
        refuse partial selections: select all of their tensors or none.
        """
        raise ValueError(f"{self!r} cannot restrict its curvature to some of its parameter "
                         "tensors; select all of them or none.")

    def check_subset(self, active: tuple[bool, ...]) -> None:
        """Raise ``ValueError`` unless :meth:`row_views` supports the selection ``active``."""
        if any(active) and not all(active):
            self.restrict(active)

    def row_views(self, cache: Any, B: Array, active: tuple[bool, ...]) -> list:
        """``[(primitives, cache, B)]`` covering the selected tensors, in θ order.

        Each ``primitives`` is a :class:`ParametricLayer` whose row primitives, called with
        the paired cache and rows, give the selected tensors' rows; the concatenation of
        their ``param_shapes`` is the selected tensors in θ order.  Nothing is computed for
        unselected tensors.
        """
        if all(active):
            return [(self, cache, B)]
        if not any(active):
            return []
        return [(self.restrict(active), cache, B)]

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


class BiasRows(ParametricLayer):
    """Row primitives of a bias alone, for a layer whose weight is frozen.

    A bias b (d_out,) added at every position of the output (one position for Linear,
    the T image locations for Conv2d) has per-row gradient β_r = Σ_t b_rt, the row summed
    over positions; the rows must have the channel axis right after (N, K):
    (N, K, d_out, *positions).  Gram β_r·β_r', U v = β_r·v, Uᵀ w = Σ_r w_r β_r.
    """

    def __init__(self, parent: ParametricLayer, d_out: int):
        self.parent, self.d_out = parent, int(d_out)
        self.param_shapes = ((self.d_out,),)

    def __repr__(self) -> str:
        return f"BiasRows({self.parent!r})"

    def forward(self, params, x):  # pragma: no cover - a view, never in a model
        raise TypeError("BiasRows is a view of a layer's rows, not a layer of a model.")

    def backward(self, params, cache, B):  # pragma: no cover
        raise TypeError("BiasRows is a view of a layer's rows, not a layer of a model.")

    def _beta(self, B):
        N, K = B.shape[:2]
        Bm = B.reshape(N, K, self.d_out, -1)
        return Bm[..., 0] if Bm.shape[3] == 1 else Bm.sum(axis=3)

    def row_gram(self, cache, B):
        xp = namespace(B)
        beta = self._beta(B)
        Bf = beta.reshape(-1, self.d_out).astype(xp.float64, copy=False)
        return Bf @ Bf.T

    def row_dot(self, cache, B, V):
        return self._beta(B) @ V[0]

    def row_sum(self, cache, B, w):
        beta = self._beta(B)
        return [w.reshape(-1) @ beta.reshape(-1, self.d_out)]

    def row_grads(self, cache, B):
        return self._beta(B)

    def row_sq_sum(self, cache, B):
        beta = self._beta(B)
        return (beta * beta).sum(axis=(0, 1))


class CompositeLayer(ParametricLayer):
    """A layer whose parameter gradients are those of several simpler layers together.

    Subclasses implement :meth:`row_views` (for any selection ``active``); the row
    primitives of the whole layer are the views' primitives, summed (Gram, U v) or
    concatenated in θ order (Uᵀ w, per-row gradients, diagonal).
    """

    def _all(self, cache, B):
        return self.row_views(cache, B, (True,) * len(self.param_shapes))

    def check_subset(self, active):
        pass  # row_views handles every selection; subclasses refuse what they cannot do

    def row_gram(self, cache, B):
        return sum(p.row_gram(c, b) for p, c, b in self._all(cache, B))

    def row_dot(self, cache, B, V):
        out, i = None, 0
        for p, c, b in self._all(cache, B):
            n = len(p.param_shapes)
            o = p.row_dot(c, b, V[i:i + n])
            out, i = (o if out is None else out + o), i + n
        return out

    def row_sum(self, cache, B, w):
        return [blk for p, c, b in self._all(cache, B) for blk in p.row_sum(c, b, w)]

    def row_grads(self, cache, B):
        return namespace(B).concatenate([p.row_grads(c, b) for p, c, b in self._all(cache, B)], axis=2)

    def row_sq_sum(self, cache, B):
        return namespace(B).concatenate([p.row_sq_sum(c, b) for p, c, b in self._all(cache, B)])


def num_elements(shapes) -> int:
    """Σ over ``shapes`` of the number of entries."""
    return sum(math.prod(s) for s in shapes)
