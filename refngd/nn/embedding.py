"""Embedding: a lookup table, i.e. a Linear map without bias applied to one-hot tokens.

With indices i_nt (t = 1..T positions of sample n), z_nt = W[i_nt] = Wᵀ e_nt for the
one-hot vector e_nt ∈ R^V.  A row cotangent b_r (T × d) of sample n has the gradient

    G_r = Σ_t e_nt b_rtᵀ   (V × d: row v collects the b_rt of the tokens equal to v),

which is the weight-shared Linear layer's gradient (refngd.nn.shared) with inputs e_nt,
transposed.  Its Gram contribution is therefore
K[r, r'] = Σ_{t,t'} [i_nt = i_mt'] ⟨b_rt, b_r't'⟩, by the same two routes.
"""
from __future__ import annotations

import operator

from ..backend import namespace
from .base import ParametricLayer, layer_ints
from .shared import gram_route, shared_gram, weighted_row_sum


class Embedding(ParametricLayer):
    """``Embedding(num_embeddings, embedding_dim, padding_idx=None, max_norm=None,
    norm_type=2.0, scale_grad_by_freq=False, sparse=False)``, as :class:`torch.nn.Embedding`.

    Parameter: ``weight`` (num_embeddings, embedding_dim), init N(0, 1) with the
    ``padding_idx`` row zero, as PyTorch.  Input: integer indices of any per-sample shape S
    (e.g. (N, T) tokens); output (N, *S, embedding_dim).  It must be the first layer of a
    :class:`Sequential` (integer inputs carry no cotangent).

    ``padding_idx``: that row is read in the forward pass but its gradient is zero, as in
    PyTorch, so it contributes nothing to any curvature.  ``max_norm`` (renormalises W in
    the forward pass) and ``scale_grad_by_freq`` (a batch-dependent gradient rescaling)
    are refused; ``sparse`` only changes PyTorch's gradient storage and is ignored.

    The row primitives form the one-hot tokens E (N, T, V): memory N·T·V, meant for the
    small vocabularies of a reference computation.
    """

    integer_input = True

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 max_norm: float | None = None, norm_type: float = 2.0,
                 scale_grad_by_freq: bool = False, sparse: bool = False):
        self.num_embeddings, self.embedding_dim = layer_ints(
            {"num_embeddings": num_embeddings, "embedding_dim": embedding_dim}, "Embedding")
        if padding_idx is not None:
            V = self.num_embeddings
            if isinstance(padding_idx, bool) or not hasattr(padding_idx, "__index__") \
                    or not -V <= operator.index(padding_idx) < V:
                raise ValueError(f"Embedding padding_idx must be an integer in [-{V}, {V}), "
                                 f"got {padding_idx!r}.")
            padding_idx = operator.index(padding_idx) % V
        self.padding_idx = padding_idx
        if max_norm is not None:
            raise ValueError("Embedding(max_norm=...) renormalises the weight inside the forward "
                             "pass (an in-place, data-dependent change of θ); refngd does not "
                             "support it.  Use max_norm=None.")
        if scale_grad_by_freq:
            raise ValueError("Embedding(scale_grad_by_freq=True) rescales gradients by token counts "
                             "of the whole batch, which is not a per-sample gradient; refngd does "
                             "not support it.")
        self.sparse = bool(sparse)
        self.param_shapes = ((self.num_embeddings, self.embedding_dim),)
        self.gram_route: str | None = None  #: None (auto), "materialise" or "spatial"

    def __repr__(self) -> str:
        pad = "" if self.padding_idx is None else f", padding_idx={self.padding_idx}"
        return f"Embedding({self.num_embeddings}, {self.embedding_dim}{pad})"

    def out_shape(self, in_shape):
        return tuple(in_shape) + (self.embedding_dim,)

    def init_params(self, rng):
        W = rng.standard_normal(self.param_shapes[0])
        if self.padding_idx is not None:
            W[self.padding_idx] = 0.0
        return [W]

    def forward(self, params, x):
        return params[0][x], x

    def backward(self, params, cache, B):
        raise TypeError("Embedding reads integer indices, which have no cotangent; it must be "
                        "the first layer of a Sequential.")

    # ------------------------------------------------------------------ row primitives
    def _onehot(self, idx, dtype):
        """E (N, T, V) with E[n, t, v] = [i_nt = v], the padding column zeroed."""
        xp = namespace(idx)
        N = idx.shape[0]
        flat = idx.reshape(N, -1)
        E = (flat[:, :, None] == xp.arange(self.num_embeddings)[None, None, :]).astype(dtype)
        if self.padding_idx is not None:
            E[:, :, self.padding_idx] = 0.0
        return E

    def _tokens(self, cache, B):
        N, K = B.shape[:2]
        return B.reshape(N, K, -1, self.embedding_dim)  # (N, K, T, d)

    def row_grads(self, cache, B):
        Bt = self._tokens(cache, B)
        E = self._onehot(cache, B.dtype)
        N, K = Bt.shape[:2]
        return (E.transpose(0, 2, 1)[:, None] @ Bt).reshape(N, K, -1)  # (N, K, V·d)

    def row_sq_sum(self, cache, B):
        G = self.row_grads(cache, B)
        return (G * G).sum(axis=(0, 1))

    def row_dot(self, cache, B, V):
        W = V[0]
        if self.padding_idx is not None:
            W = W.copy()
            W[self.padding_idx] = 0.0
        N, K = B.shape[:2]
        M = W[cache].reshape(N, -1, 1)  # (N, T·d, 1): V[i_nt] for every token
        return (B.reshape(N, K, -1) @ M)[..., 0]

    def row_sum(self, cache, B, w):
        v = weighted_row_sum(B, w).reshape(-1, self.embedding_dim)  # (N·T, d)
        E = self._onehot(cache, B.dtype).reshape(-1, self.num_embeddings)
        return [E.T @ v]

    def row_gram(self, cache, B):
        Bt = self._tokens(cache, B)
        N, K, T, d = Bt.shape
        route = self.gram_route or gram_route(N, K, T, d, self.num_embeddings, bias=False)
        return shared_gram(self._onehot(cache, B.dtype), Bt.transpose(0, 1, 3, 2), False, route)
