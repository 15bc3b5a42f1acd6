"""``TransposedLinear``: a Linear layer that stores its weight as (in, out), as GPT-2's
``Conv1D`` of Hugging Face ``transformers`` does (z = a W + b).

It is :class:`refngd.nn.Linear` with the weight block of θ read transposed: the rows,
the Gram and every product are the Linear layer's, with the weight's entries permuted
(the Gram does not depend on the order of the parameters; U v transposes the weight
block of v first, Uᵀ w, the per-row gradients and diag(UᵀU) transpose theirs after).
"""
from __future__ import annotations

from ..backend import namespace
from .linear import Linear

__all__ = ["TransposedLinear"]


class TransposedLinear(Linear):
    """``z = x W + b`` with W of shape (in_features, out_features) — transformers'
    ``Conv1D(nf=out_features, nx=in_features)``; parameters W (in, out) then b (out,).

    Initialisation: W ~ N(0, 0.02²), b = 0, as ``Conv1D``.  K-FAC is refused: its
    Kronecker factors act on the (out, in) weight matrix, and this layer's θ block is its
    transpose (docs/kfac.md, "Tied weights" lists what K-FAC factors).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias)
        self.param_shapes = ((self.in_features, self.out_features),) + self.param_shapes[1:]

    def __repr__(self) -> str:
        return f"TransposedLinear({self.in_features}, {self.out_features}, bias={self.bias})"

    def init_params(self, rng):
        out = [rng.normal(0.0, 0.02, size=self.param_shapes[0])]
        if self.bias:
            out.append(rng.normal(0.0, 0.0, size=(self.out_features,)))
        return out

    def forward(self, params, x):
        return super().forward([params[0].T] + list(params[1:]), x)

    def backward(self, params, cache, B):
        return super().backward([params[0].T] + list(params[1:]), cache, B)

    def kfac_refusal(self):
        return TypeError(f"{self!r} stores its weight as (in, out) (transformers' Conv1D); "
                         "K-FAC's factors act on the (out, in) matrix of a Linear layer: use "
                         "the exact curvatures, or select other parameters (params=).")

    def restrict(self, active):
        out = super().restrict(active)
        if isinstance(out, TransposedLinear):
            out.param_shapes = self.param_shapes[:1]
        return out

    def _swap(self, flat):
        """Per-row weight entries (out, in) → (in, out), then the bias as it is."""
        o, i = self.out_features, self.in_features
        w = flat[..., :o * i].reshape(flat.shape[:-1] + (o, i)).swapaxes(-1, -2)
        w = w.reshape(flat.shape[:-1] + (o * i,))
        if not self.bias:
            return w
        return namespace(flat).concatenate([w, flat[..., o * i:]], axis=-1)

    def row_dot(self, cache, B, V):
        return super().row_dot(cache, B, [V[0].T] + list(V[1:]))

    def row_sum(self, cache, B, w):
        blocks = super().row_sum(cache, B, w)
        return [blocks[0].T] + blocks[1:]

    def row_sum_into(self, cache, B, w, out):
        for o, b in zip(out, self.row_sum(cache, B, w)):
            o[...] = b

    def row_grads(self, cache, B):
        g = super().row_grads(cache, B)
        return self._swap(g)

    def row_sq_sum(self, cache, B):
        return self._swap(super().row_sq_sum(cache, B))
