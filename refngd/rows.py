"""Row cotangents and the implicit row matrix U — the central abstraction (docs/design.md §2).

Every curvature matrix in refngd is ``c · UᵀU`` for a row matrix U (R × P) whose row
``(n, k)`` is ``J_nᵀ s_nk`` for an output-space cotangent ``s_nk`` tied to sample n:

============================  =====================================  ==========
curvature                      cotangent rows s_nk                    K per sample
============================  =====================================  ==========
Fisher / GGN (type-2)          columns of S_n, S_n S_nᵀ = H_n         rank H_n
sampled Fisher (MC)            ∂ℓ(z_n, ŷ_nk)/∂z_n / √K, ŷ ~ p(y|z_n)   K
empirical Fisher               e_n                                    1
improved empirical Fisher      e_n / ‖e_n‖                            1
============================  =====================================  ==========

A :class:`RowSet` holds the result of *one* backward pass of these R = N·K rows and
offers every contraction of U without forming it: the Gram matrix U Uᵀ, U v, Uᵀ w, the
diagonal of UᵀU, and (for small models) U itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .backend import Array, is_cupy, namespace


@dataclass
class LayerRows:
    """One row view's share of a backward pass: a parametric layer, a restriction of it to
    its selected tensors, or a sub-layer of a :class:`refngd.nn.Composite`.

    ``layer`` holds the row primitives, ``B`` (N, K, *out_shape) are the rows arriving at
    its output, ``cache`` its forward cache (its inputs), ``params`` the parameter blocks
    of ``model.layers[index]`` and ``start:stop`` the view's slice of the parameter vector
    (of θ, or of θ[S] for a parameter subset S).  ``index`` is the position in
    ``model.layers`` of the layer the view belongs to; ``part`` tells the views of one
    layer apart (:meth:`refngd.nn.Layer.backward_views`): the position, among that
    layer's tensors, of the view's first tensor (0 for a plain layer).
    """

    layer: Any
    params: list
    cache: Any
    B: Array
    start: int
    stop: int
    index: int = -1
    part: int = 0

    def blocks(self, v: Array) -> list[Array]:
        """Split this layer's slice of a parameter vector into its parameter blocks."""
        out, i = [], self.start
        for shape in self.layer.param_shapes:
            size = 1
            for s in shape:
                size *= s
            out.append(v[i:i + size].reshape(shape))
            i += size
        return out


class RowSet:
    """The implicit row matrix U (R × P), R = N·K, of one backward pass through layers.

    Parameters
    ----------
    layers : list of LayerRows, in θ order.
    N, K, P : sizes; rows are ordered sample-major, r = n·K + k.
    dtype : the model's dtype (results of ``matvec``/``rmatvec``/``dense``).

    subset : the :class:`refngd.subsets.ParamSubset` the rows cover (P = its size), or
        None for all of θ.
    """

    def __init__(self, layers: list[LayerRows], N: int, K: int, P: int, dtype, subset=None):
        self.layers, self.N, self.K, self.P, self.dtype = layers, N, K, P, dtype
        self.subset = subset

    @property
    def R(self) -> int:
        return self.N * self.K

    def _xp(self):
        return namespace(self.layers[0].B)

    def take(self, k0: int, k1: int) -> "RowSet":
        """The rows k0 ≤ k < k1 of every sample, as a RowSet of views (no copy)."""
        layers = [LayerRows(e.layer, e.params, e.cache, e.B[:, k0:k1], e.start, e.stop, e.index, e.part)
                  for e in self.layers]
        return RowSet(layers, self.N, k1 - k0, self.P, self.dtype, self.subset)

    def gram(self) -> Array:
        """K = U Uᵀ, (R, R) float64, summed over layers without forming U (docs/design.md §4).

        On the host, layers with ``row_gram_lower_into`` (Linear) add their share to the
        lower triangle only (``dsyrk``), and the triangle is mirrored once at the end
        (:func:`refngd.backend.lapack.symmetrize_lower`); the others add full matrices.
        """
        xp = self._xp()
        G, work, lower = None, None, False
        for e in self.layers:
            into = getattr(e.layer, "row_gram_lower_into", None)
            if into is not None and not is_cupy(e.B):
                if G is None:  # the first layer writes into the zero matrix itself
                    G = xp.zeros((self.R, self.R), dtype=xp.float64)
                    into(e.cache, e.B, G)
                else:
                    if work is None:
                        work = xp.zeros((self.R, self.R), dtype=xp.float64)
                    into(e.cache, e.B, G, work)
                lower = True
                continue
            Gl = e.layer.row_gram(e.cache, e.B)
            G = Gl if G is None else G.__iadd__(Gl)
        if lower:
            from .backend.lapack import symmetrize_lower

            symmetrize_lower(G)
        return G

    def _check_v(self, v: Array) -> None:
        if getattr(v, "shape", None) != (self.P,):
            raise ValueError(f"v must be a parameter vector of shape ({self.P},), got {getattr(v, 'shape', v)}.")

    def _check_w(self, w: Array) -> None:
        if getattr(w, "shape", None) != (self.N, self.K):
            raise ValueError(f"w must hold one weight per row, shape ({self.N}, {self.K}), "
                             f"got {getattr(w, 'shape', w)}.")

    def matvec(self, v: Array) -> Array:
        """U v for a parameter vector v (P,); returns (N, K)."""
        self._check_v(v)
        out = None
        for e in self.layers:
            o = e.layer.row_dot(e.cache, e.B, e.blocks(v))
            out = o if out is None else out + o
        return out

    def rmatvec(self, w: Array) -> Array:
        """Uᵀ w for row weights w (N, K); returns (P,)."""
        self._check_w(w)
        xp = self._xp()
        out = xp.empty(self.P, dtype=xp.result_type(self.layers[0].B.dtype, w.dtype))
        for e in self.layers:
            i = e.start
            into = getattr(e.layer, "row_sum_into", None)
            if into is not None and out.dtype == e.B.dtype:
                # the layer's blocks written in place: no temporary and no copy per block
                into(e.cache, e.B, w, e.blocks(out))
                continue
            for b in e.layer.row_sum(e.cache, e.B, w):
                out[i:i + b.size] = b.reshape(-1)
                i += b.size
        return out

    def dense(self) -> Array:
        """U itself as (N, K, P): per-row gradients.  Memory N·K·P — small models only."""
        xp = self._xp()
        # One preallocated (N, K, P) array: concatenating per-layer blocks would copy U,
        # which is the whole point of the memory cost here, a second time.
        U = xp.empty((self.N, self.K, self.P), dtype=self.layers[0].B.dtype)
        for e in self.layers:
            U[:, :, e.start:e.stop] = e.layer.row_grads(e.cache, e.B)
        return U

    def sq_sum(self) -> Array:
        """diag(UᵀU) = Σ_r u_r ⊙ u_r, (P,)."""
        xp = self._xp()
        return xp.concatenate([e.layer.row_sq_sum(e.cache, e.B) for e in self.layers])


class DenseRowSet(RowSet):
    """A :class:`RowSet` backed by an explicit U (N, K, P), e.g. from HIPS autograd."""

    def __init__(self, U: Array, subset=None):
        self.U = U
        self.layers = []
        self.N, self.K, self.P = U.shape
        self.dtype = U.dtype
        self.subset = subset

    def _xp(self):
        return namespace(self.U)

    def take(self, k0: int, k1: int) -> "DenseRowSet":
        return DenseRowSet(self.U[:, k0:k1], self.subset)

    def gram(self):
        xp = self._xp()
        Uf = self.U.reshape(self.R, self.P).astype(xp.float64, copy=False)
        return Uf @ Uf.T

    def matvec(self, v):
        self._check_v(v)
        return self.U @ v

    def rmatvec(self, w):
        self._check_w(w)
        return w.reshape(-1) @ self.U.reshape(self.R, self.P)

    def dense(self):
        return self.U

    def sq_sum(self):
        return (self.U * self.U).sum(axis=(0, 1))
