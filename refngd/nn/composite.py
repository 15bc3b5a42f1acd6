"""Composite layers: a layer built from named sub-layers (LoRA, attention, Transformer blocks).

A composite's parameters are its parametric sub-layers' parameters, one contiguous block
each, registered in PyTorch's ``parameters()`` order; its forward and backward passes wire
the sub-layers into a graph (sums, residual connections, the attention's three uses of one
projection).  Its rows are therefore the rows of its sub-layers, each with the input it saw
and the rows that reached *its* output: one backward pass through the graph hands every
parametric sub-layer on to :class:`refngd.rows.RowSet` as a view of its own
(:meth:`Composite.backward_views`), and every row primitive of the whole composite is the
sum (Gram, U v) or the concatenation in θ order (Uᵀ w, per-row gradients, diagonal) of
its sub-layers'.

Parameter subsets (docs/subsets.md) split along the sub-layers: a sub-layer with none of
its tensors selected gets no view (it is only back-propagated through), one with some
selected gets its own restriction (:meth:`refngd.nn.ParametricLayer.row_views`), and a
selection a sub-layer cannot restrict to is refused by :meth:`Composite.check_subset`
naming the sub-layer.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any

from ..backend import Array, namespace
from .base import Layer, ParametricLayer, num_elements


class _Pass:
    """State of one backward pass through a composite: its parameters, the selection of
    each sub-layer, and the views collected so far (per sub-layer, θ order within it)."""

    def __init__(self, params: list, active: dict[str, tuple[bool, ...]]):
        self.params, self.active, self.views = params, active, {}


class Composite(ParametricLayer):
    """A layer built from named sub-layers (:mod:`refngd.nn.composite`).

    Subclasses call :meth:`_register` with ``[(name, layer), ...]`` in PyTorch's
    ``parameters()`` order — which fixes the layer's slice of θ; the order in which the
    forward pass applies them may differ (a post-norm Transformer block applies ``norm1``
    right after the attention, yet PyTorch lists it after ``linear2``) — and implement

    * :meth:`compose` ``(params, x) -> (y, inner)``: the forward graph, each sub-layer
      applied with :meth:`_fwd`;
    * :meth:`pull_back` ``(ctx, inner, B) -> B_in``: the backward graph, each sub-layer
      pulled back with :meth:`_back`, which also records its rows.

    ``trainable`` is the concatenation of the sub-layers' flags (setting it sets theirs).
    The cache of :meth:`forward` holds the parameters, so the whole layer's row primitives
    take ``(cache, B)`` as every layer's do.
    """

    def _register(self, children: list[tuple[str, Layer]]) -> None:
        self.children: dict[str, Layer] = {}
        self._offsets: dict[str, tuple[int, int, int]] = {}  # name -> (block, element, size)
        shapes, block, elem = [], 0, 0
        for name, child in children:
            size = num_elements(child.param_shapes)
            self.children[name] = child
            self._offsets[name] = (block, elem, size)
            shapes.extend(child.param_shapes)
            block += len(child.param_shapes)
            elem += size
        self.param_shapes = tuple(shapes)

    @property
    def param_names(self) -> tuple[str, ...]:
        """``state_dict`` names: each sub-layer's names under its registered name."""
        return tuple(f"{name}.{n}" for name, child in self.children.items()
                     for n in child.param_names)

    @property
    def peft_tensors(self) -> tuple[bool, ...]:
        return tuple(f for child in self.children.values() for f in child.peft_tensors)

    # ------------------------------------------------------------------ selection
    @property
    def trainable(self) -> tuple[bool, ...]:
        return tuple(f for c in self.children.values() if c.param_shapes for f in c.trainable)

    @trainable.setter
    def trainable(self, flags) -> None:
        for name, sub in self._split(self._trainable_flags(flags)).items():
            self.children[name].trainable = sub

    def _split(self, active) -> dict[str, tuple[bool, ...]]:
        """The selection ``active`` (one bool per tensor) per parametric sub-layer."""
        if len(active) != len(self.param_shapes):
            raise ValueError(f"{self!r} has {len(self.param_shapes)} parameter tensors, got a "
                             f"selection of {len(active)}.")
        out = {}
        for name, child in self.children.items():
            if child.param_shapes:
                block = self._offsets[name][0]
                out[name] = tuple(active[block:block + len(child.param_shapes)])
        return out

    def check_subset(self, active) -> None:
        for name, sub in self._split(tuple(active)).items():
            if any(sub) and not all(sub):
                try:
                    self.children[name].check_subset(sub)
                except ValueError as err:
                    raise ValueError(f"{self!r}, sub-layer {name!r}: {err}") from None

    def restrict(self, active):  # pragma: no cover - row_views handles every selection
        raise TypeError("a Composite restricts through row_views, not restrict().")

    # ------------------------------------------------------------------ passes
    def _sub(self, params: list, name: str) -> list:
        block = self._offsets[name][0]
        return params[block:block + len(self.children[name].param_shapes)]

    def _fwd(self, name: str, params: list, x: Array):
        """Forward pass of sub-layer ``name``: ``(output, cache)``."""
        return self.children[name].forward(self._sub(params, name), x)

    def _back(self, ctx: _Pass, name: str, cache: Any, B: Array) -> Array:
        """Pull rows B back through sub-layer ``name``, recording its selected tensors' views."""
        child = self.children[name]
        views, B_in = child.backward_views(self._sub(ctx.params, name), cache, B,
                                           ctx.active.get(name, ()))
        if views:
            ctx.views[name] = views
        return B_in

    def _fwd_chain(self, names: tuple, params: list, x: Array):
        """Sub-layers ``names`` applied in order: ``(output, their caches)``."""
        caches = []
        for name in names:
            x, cache = self._fwd(name, params, x)
            caches.append(cache)
        return x, tuple(caches)

    def _back_chain(self, ctx: _Pass, names: tuple, caches: tuple, B: Array) -> Array:
        """Rows B pulled back through the chain ``names`` (the reverse of :meth:`_fwd_chain`)."""
        for name, cache in zip(reversed(names), reversed(caches)):
            B = self._back(ctx, name, cache, B)
        return B

    @abstractmethod
    def compose(self, params: list, x: Array) -> tuple[Array, Any]:
        """The forward graph: ``(output, inner cache)``."""

    @abstractmethod
    def pull_back(self, ctx: _Pass, inner: Any, B: Array) -> Array:
        """The backward graph: rows B at the output → rows at the input, every sub-layer
        pulled back with :meth:`_back`."""

    def init_params(self, rng) -> list:
        """The sub-layers' initial parameters in θ order (subclasses may override)."""
        return [p for child in self.children.values() for p in child.init_params(rng)]

    def forward(self, params, x):
        y, inner = self.compose(params, x)
        return y, (list(params), inner)

    def backward_views(self, params, cache, B, active, need_input=True):
        """One pass through the graph: the selected sub-layers' views (θ order) and B_in."""
        ctx = _Pass(params, self._split(tuple(active)))
        B_in = self.pull_back(ctx, cache[1], B)
        views = [v for name in self.children for v in ctx.views.get(name, ())]
        return views, B_in

    def backward(self, params, cache, B):
        return self.backward_views(params, cache, B, (False,) * len(self.param_shapes))[1]

    def row_views(self, cache, B, active):
        if not any(active):
            return []
        return self.backward_views(cache[0], cache, B, active, need_input=False)[0]

    # ------------------------------------------------------------------ row primitives
    def _all(self, cache, B):
        return self.row_views(cache, B, (True,) * len(self.param_shapes))

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
        return namespace(B).concatenate([p.row_grads(c, b) for p, c, b in self._all(cache, B)],
                                        axis=2)

    def row_sq_sum(self, cache, B):
        return namespace(B).concatenate([p.row_sq_sum(c, b) for p, c, b in self._all(cache, B)])
