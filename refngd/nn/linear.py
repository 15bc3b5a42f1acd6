"""Fully connected layer z = a Wᵀ + b, with its row primitives (docs/design.md §4).

Applied to (N, d_in) inputs it is the plain dense layer; applied to (N, *S, d_in) inputs
(sequences (N, T, d_in), or any extra axes S, T = ∏S) it acts on the last axis, as
``torch.nn.Linear`` does, and shares its weight over the T positions — the Linear layer of
a Transformer.  Its row primitives are then those of :mod:`refngd.nn.shared`.
"""
from __future__ import annotations

import copy
import math

from ..backend import namespace
from .base import BiasRows, ParametricLayer, layer_ints
from .shared import shared_gram, shared_row_grads, shared_row_sq_sum, weighted_row_sum


class Linear(ParametricLayer):
    """``Linear(in_features, out_features, bias=True)``, as :class:`torch.nn.Linear`.

    Parameters are ``W`` of shape (out_features, in_features) then ``b`` (out_features,),
    flattened row-major: exactly ``parameters_to_vector(torch_linear.parameters())``.
    Inputs are (N, in_features) or (N, *S, in_features) (weight sharing over the T = ∏S
    positions, e.g. tokens).  Initialisation follows PyTorch: W, b ~ U(−k, k) with
    k = 1/√in_features (``kaiming_uniform_(a=√5)``).

    Row primitives, for inputs ā_n = [a_n; 1] (the 1 only with bias) and rows b_r of
    sample n(r), where row r's gradient is b_r ā_{n(r)}ᵀ:

    * Gram:   K[r, r'] = ⟨b_r, b_r'⟩ · ⟨ā_n(r), ā_n(r')⟩  (two GEMMs and a Hadamard product)
    * U v:    r ↦ ⟨b_r, V ā_n(r)⟩                        (V Āᵀ once, then row-wise dots)
    * Uᵀ w:   Σ_n (Σ_k w_nk b_nk) ā_nᵀ                     (sum a sample's rows first)

    On sequences, with tokens ā_nt and rows b_rt (t = 1..T), row r's gradient is
    G_r = Σ_t b_rt ā_ntᵀ (Eschenhagen et al. 2023, eq. 5) and

    * Gram:   K[r, r'] = Σ_{t,t'} ⟨b_rt, b_r't'⟩ (⟨ā_nt, ā_mt'⟩ + 1_bias)  ("spatial"), or
      U_l U_lᵀ from materialised G_r ("materialise"), whichever costs fewer FLOPs
      (:func:`refngd.nn.shared.gram_flops`; ``gram_route`` forces one), as Conv2d;
    * U v:    r ↦ Σ_t ⟨b_rt, V ā_nt + v_b⟩;
    * Uᵀ w:   Σ_{n,t} (Σ_k w_nk b_nkt) ā_ntᵀ.

    References
    ----------
    R. Eschenhagen, A. Immer, R. Turner, F. Schneider, P. Hennig (2023).
    Kronecker-factored approximate curvature for modern neural network architectures.
    NeurIPS.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        self.in_features, self.out_features = layer_ints(
            {"in_features": in_features, "out_features": out_features}, "Linear",
            "Linear needs in_features >= 1 and out_features >= 1 (integers), got "
            f"{in_features!r} and {out_features!r}.")
        self.bias = bool(bias)
        shapes = [(self.out_features, self.in_features)]
        if self.bias:
            shapes.append((self.out_features,))
        self.param_shapes = tuple(shapes)
        self.gram_route: str | None = None  #: sequences: None (auto), "materialise", "spatial"

    def __repr__(self) -> str:
        return f"Linear({self.in_features}, {self.out_features}, bias={self.bias})"

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if not in_shape or in_shape[-1] != self.in_features or min(in_shape) < 1:
            raise ValueError(
                f"{self!r} expects per-sample input shape ({self.in_features},) (or "
                f"(T, {self.in_features}) for sequences), got {in_shape}; add a Flatten() "
                "before it or fix in_features."
            )
        return in_shape[:-1] + (self.out_features,)

    def init_params(self, rng):
        bound = 1.0 / math.sqrt(self.in_features)
        return [rng.uniform(-bound, bound, size=s) for s in self.param_shapes]

    # ----------------------------------------------------------------- forward/backward
    def forward(self, params, x):
        z = x @ params[0].T
        if self.bias:
            z = z + params[1]
        return z, x

    def backward(self, params, cache, B):
        # One (N·K·T × d_out) GEMM; ``B @ W`` on the 3-D array would run N small GEMMs,
        # each re-reading W from memory (6× slower at N = 128, K = 10).
        return (B.reshape(-1, B.shape[-1]) @ params[0]).reshape(B.shape[:-1] + (self.in_features,))

    # ------------------------------------------------------- the K-FAC protocol
    def kfac_refusal(self):
        return None

    @property
    def weight_matrix_shape(self):
        return (self.out_features, self.in_features)

    def weight_sharing(self, cache):
        """``"sequence"`` on (N, *S, d_in) inputs, None on (N, d_in)."""
        return "sequence" if cache.ndim > 2 else None

    def tokens(self, cache):
        """(N, T, d_in): the inputs, T = ∏S tokens (T = 1 on (N, d_in)); a view."""
        return cache.reshape(cache.shape[0], -1, self.in_features)

    def token_rows(self, B):
        """(N, K, d_out, T): the rows of each token (a transposed view)."""
        N, K = B.shape[:2]
        return B.reshape(N, K, -1, self.out_features).transpose(0, 1, 3, 2)

    # ------------------------------------------------------- sequences (weight sharing)
    def _seq(self, cache, B):
        """Tokens and rows for :mod:`refngd.nn.shared`."""
        return self.tokens(cache), self.token_rows(B)

    def _seq_row_dot(self, cache, B, V):
        N, K = B.shape[:2]
        M = cache @ V[0].T  # (N, *S, d_out): V ā_nt for every token, formed once
        if self.bias:
            M = M + V[1]
        return (B.reshape(N, K, -1) @ M.reshape(N, -1, 1))[..., 0]

    def _seq_row_sum(self, cache, B, w):
        v = weighted_row_sum(B, w).reshape(-1, self.out_features)  # (N·T, d_out)
        blocks = [v.T @ cache.reshape(-1, self.in_features)]
        if self.bias:
            blocks.append(v.sum(axis=0))
        return blocks

    def restrict(self, active):
        """Weight only: the same layer without bias (same cache); bias only: :class:`BiasRows`."""
        if len(active) != 2:
            raise ValueError(f"{self!r} has {len(self.param_shapes)} tensors, got a selection "
                             f"of {len(active)}.")
        if active[1]:
            return BiasRows(self, self.out_features, channels_last=True)
        weight_only = copy.copy(self)
        weight_only.bias = False
        weight_only.param_shapes = self.param_shapes[:1]
        return weight_only

    # ------------------------------------------------------------------ row primitives
    def _input_gram(self, a):
        """⟨ā_n, ā_m⟩ for all sample pairs, in float64."""
        xp = namespace(a)
        a64 = a.astype(xp.float64, copy=False)
        G = a64 @ a64.T
        return G + 1.0 if self.bias else G

    def row_gram(self, cache, B):
        if cache.ndim > 2:
            return shared_gram(*self._seq(cache, B), self.bias, self.gram_route)
        xp = namespace(B)
        N, K, d = B.shape
        Bf = B.reshape(N * K, d).astype(xp.float64, copy=False)
        G = Bf @ Bf.T  # NumPy dispatches X @ X.T to the symmetric rank-k update (syrk)
        G4 = G.reshape(N, K, N, K)
        G4 *= self._input_gram(cache)[:, None, :, None]
        return G

    def row_dot(self, cache, B, V):
        if cache.ndim > 2:
            return self._seq_row_dot(cache, B, V)
        M = cache @ V[0].T  # (N, d_out): V ā_n for every sample, formed once
        if self.bias:
            M = M + V[1]
        if B.shape[1] == 1:  # one row per sample: a plain row-wise dot, no batched GEMV
            return (B[:, 0, :] * M).sum(axis=1)[:, None]
        return (B @ M[:, :, None])[..., 0]

    def row_sum(self, cache, B, w):
        if cache.ndim > 2:
            return self._seq_row_sum(cache, B, w)
        v = weighted_row_sum(B, w)  # (N, d_out): Σ_k w_nk b_nk, before touching the inputs
        blocks = [v.T @ cache]
        if self.bias:
            blocks.append(v.sum(axis=0))
        return blocks

    def row_sum_into(self, cache, B, w, out):
        """:meth:`row_sum` written into the preallocated blocks ``out`` (views of Uᵀw).

        The weight block is one GEMM straight into the result vector — no (d_out × d_in)
        temporary and no copy of it (2 × 15 MB for the 1.86 M-parameter MLP).
        """
        if cache.ndim > 2:
            for o, b in zip(out, self.row_sum(cache, B, w)):
                o[...] = b
            return
        xp = namespace(B)
        v = weighted_row_sum(B, w)
        xp.matmul(v.T, cache, out=out[0])
        if self.bias:
            v.sum(axis=0, out=out[1])

    def row_grads(self, cache, B):
        if cache.ndim > 2:
            return shared_row_grads(*self._seq(cache, B), self.bias)
        xp = namespace(B)
        N, K, d = B.shape
        gW = (B[:, :, :, None] * cache[:, None, None, :]).reshape(N, K, -1)
        return xp.concatenate([gW, B], axis=2) if self.bias else gW

    def row_sq_sum(self, cache, B):
        if cache.ndim > 2:
            return shared_row_sq_sum(*self._seq(cache, B), self.bias)
        xp = namespace(B)
        B2 = (B * B).sum(axis=1)  # (N, d_out): Σ_k b_nk²
        out = [(B2.T @ (cache * cache)).reshape(-1)]
        if self.bias:
            out.append(B2.sum(axis=0))
        return xp.concatenate(out)
