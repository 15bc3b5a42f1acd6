"""Tied and unused parameters of a :class:`refngd.nn.GraphModel`: their θ-layout entries
and their row primitives.

A tensor used by several call sites (a module called twice, an embedding reused as the
output layer) has, for every row r, the per-row gradient u_r = Σ_uses u_r^(use): the
sum of what each use alone would give.  Its Gram contribution is therefore
(Σ_a U^(a))(Σ_b U^(b))ᵀ — the uses' own Grams *and* their cross terms — and diag(UᵀU) is
the square of the sum, not the sum of squares.  :class:`TiedRows` gets every primitive
right by materialising the summed per-row gradients (R × P_t, as a
:class:`refngd.nn.SmallParametricLayer`); a tensor used once keeps its layer's fast
primitives.  A parameter no call site uses has zero rows (a :class:`TiedRows` without
uses), as PyTorch's zero gradient.
"""
from __future__ import annotations

import math

from ..backend import namespace
from ..rows import RowSet
from .base import Layer, ParametricLayer, SmallParametricLayer

__all__ = ["TensorGroup", "TiedRows", "DirectRows", "GraphRowSet"]


class TensorGroup(ParametricLayer):
    """Some tensors of a layer (or an unused parameter) as one entry of the θ layout.

    Used where a layer does not own all of its tensors in order (one is tied to an
    earlier layer's); its rows come from :class:`TiedRows`, never from itself.
    """

    def __init__(self, layer: Layer | None, tensors: tuple[int, ...], shapes, names):
        self.layer, self.local = layer, tuple(tensors)
        self.param_shapes, self._names = tuple(map(tuple, shapes)), tuple(names)

    @property
    def param_names(self):
        return self._names

    def __repr__(self) -> str:
        return f"TensorGroup({', '.join(self._names)})"

    def check_subset(self, active) -> None:  # tensor-wise rows: any selection
        return None

    def init_params(self, rng) -> list:
        if self.layer is None:
            return [[0.0] * math.prod(s) for s in self.param_shapes]
        own = self.layer.init_params(rng)
        return [own[t] for t in self.local]

    def kfac_refusal(self):
        return TypeError(f"{self!r} holds tied, unused or directly used parameters; K-FAC "
                         "does not factor them (docs/kfac.md, 'Tied weights').")

    def forward(self, params, x):  # pragma: no cover - a layout entry, never applied
        raise TypeError("a TensorGroup is an entry of the θ layout, not a layer.")

    backward = forward
    row_gram = row_dot = row_sum = row_grads = row_sq_sum = forward


class TiedRows(SmallParametricLayer):
    """Row primitives of one θ tensor used by several call sites (or by none).

    ``uses``: ``(primitives, cache, B, lo, hi)`` per call site: the tensor's per-row
    gradients are ``primitives.row_grads(cache, B)[:, :, lo:hi]``; they are summed over the
    uses (zero without uses) and every primitive is read off the sum
    (:class:`SmallParametricLayer`), which is computed once and kept.  ``cache`` and ``B``
    passed to the primitives only give N, K and the array module.
    """

    def __init__(self, shape: tuple, uses: list, name: str):
        self.param_shapes, self.uses, self.name = (tuple(shape),), list(uses), name
        self._sum = None

    def __repr__(self) -> str:
        return f"TiedRows({self.name!r}, {len(self.uses)} uses)"

    def kfac_refusal(self):
        return TypeError(f"parameter {self.name!r} is used by {len(self.uses)} call sites "
                         "(tied weights) or directly in forward: K-FAC factors the weight of a "
                         "layer used once (docs/kfac.md, 'Tied weights'); use the exact "
                         "curvatures, or pass params= without it.")

    def take(self, k0: int, k1: int) -> "TiedRows":
        return TiedRows(self.param_shapes[0], [(p, c, b[:, k0:k1], lo, hi)
                                               for p, c, b, lo, hi in self.uses], self.name)

    def row_grads(self, cache, B):
        if self._sum is None:
            N, K = B.shape[:2]
            size = math.prod(self.param_shapes[0])
            out = namespace(B).zeros((N, K, size), dtype=B.dtype)
            for prim, c, b, lo, hi in self.uses:
                out += prim.row_grads(c, b)[:, :, lo:hi]
            self._sum = out
        return self._sum

    def forward(self, params, x):  # pragma: no cover - row primitives only
        raise TypeError("TiedRows holds row primitives, not a layer.")

    backward = forward


class DirectRows:
    """The rows of a parameter used directly in ``forward`` (``x + self.pos``): the rows
    that reached it, (N, K, *shape), are its per-row gradients (a use of :class:`TiedRows`)."""

    def __init__(self, shape: tuple):
        self.param_shapes = (tuple(shape),)

    def row_grads(self, cache, B):
        return B.reshape(B.shape[0], B.shape[1], -1)


class GraphRowSet(RowSet):
    """A :class:`RowSet` whose tied tensors' records slice their uses in :meth:`take`."""

    def take(self, k0, k1):
        out = super().take(k0, k1)
        for e in out.layers:
            if isinstance(e.layer, TiedRows):
                e.layer = e.layer.take(k0, k1)
        return GraphRowSet(out.layers, out.N, out.K, out.P, out.dtype, out.subset)


