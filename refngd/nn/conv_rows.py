"""Conv2d's row primitives (docs/design.md §4): Gram, U v, Uᵀw, per-row gradients.

:class:`ConvRows` is the half of :class:`refngd.nn.Conv2d` that contracts the rows with the
cached im2col patches; :mod:`refngd.nn.conv` holds the geometry, the forward and backward
passes and the K-FAC and memory entries of the layer protocol.  The methods read the
layer's ``groups``, ``D``, ``out_channels``, ``bias``, ``gram_route`` and its patch views
(``tokens``, ``token_rows``, ``_cols_matrix``, ``_weight_times``).
"""
from __future__ import annotations

from ..backend import namespace
from .shared import (shared_gram, shared_row_grads, shared_row_sq_sum,
                     weighted_row_sum)

#: rough bound (in array elements) on the temporaries of the chunked primitives
_CHUNK_ELEMS = 1 << 22
#: output locations per sample from which Uᵀw takes per-sample products (row_sum_into)
_PER_SAMPLE_T = 256


class ConvRows:
    """Row primitives of a (grouped) convolution over its im2col patches (a mixin)."""

    def _rows(self, cache, B):
        """Patches Ā (N, T, D) and rows (N, K, C_out, T), for :mod:`refngd.nn.shared`."""
        return self.tokens(cache), self.token_rows(B)

    def _groups(self, cache, B):
        """Per group j: its patches Ā_j (N, T, D) and rows (N, K, C_out/groups, T) (views)."""
        A, Bm = self._rows(cache, B)
        D, Cog = self.D, self.out_channels // self.groups
        return [(A[:, :, j * D:(j + 1) * D], Bm[:, :, j * Cog:(j + 1) * Cog])
                for j in range(self.groups)]

    def _bias_rows(self, B):
        """(N, K, C_out): each row summed over the output locations (the bias gradients)."""
        return self.token_rows(B).sum(axis=3)

    def row_grads(self, cache, B):
        if self.groups == 1:
            return shared_row_grads(*self._rows(cache, B), self.bias)
        xp = namespace(B)
        parts = [shared_row_grads(A, Bm, False) for A, Bm in self._groups(cache, B)]
        if self.bias:
            parts.append(self._bias_rows(B))
        return xp.concatenate(parts, axis=2)

    def row_dot(self, cache, B, V):
        xp = namespace(B)
        cols, (N, K) = cache[0], B.shape[:2]
        Co, T = self.out_channels, cols.shape[2]
        # V_W ā_nt for every (n, t): one GEMM (per group), then the (n, o, t) layout
        M = self._weight_times(V[0], self._cols_matrix(cols)).reshape(Co, N, T)
        M = xp.ascontiguousarray(M.transpose(1, 0, 2))
        if self.bias:
            M += V[1][:, None]
        return (B.reshape(N, K, -1) @ M.reshape(N, -1, 1))[..., 0]

    def _weight_block(self, vt, cols, out):
        """Σ_n v_n Ā_n into ``out`` (C_out, D): one (N·T)-long product, or one per group.

        Computed as Ā (vt)ᵀ, (D × N·T)(N·T × C_out), then transposed into place (C_out·D
        entries): OpenBLAS runs this orientation of the long inner dimension 1.3–1.8×
        faster than vt Āᵀ (the two Conv2d layers of benchmarks/vs_torch.py's CNN, 2 threads
        on the AVX-512 VM).
        """
        xp = namespace(vt)
        g, Co = self.groups, self.out_channels
        C = self._cols_matrix(cols).reshape(g, self.D, -1)
        res = xp.matmul(C, vt.reshape(g, Co // g, -1).transpose(0, 2, 1))  # (g, D, C_out/g)
        out.reshape(g, Co // g, self.D)[...] = res.transpose(0, 2, 1)  # C_out·D entries

    def _summed_rows(self, B, w):
        """Σ_k w_nk b_nk as (C_out, N·T), columns (n, t) as the patch columns'.

        One row per sample (K = 1, e.g. the gradient): the product with w and the
        transposition are one pass, written straight into that layout; otherwise the
        per-sample sum (a batched product) and then one transposing copy.
        """
        xp = namespace(B)
        N, K, Co = B.shape[0], B.shape[1], self.out_channels
        if K == 1:
            vt = xp.empty((Co, N, B.size // (N * Co)), dtype=xp.result_type(B.dtype, w.dtype))
            xp.multiply(B.reshape(N, Co, -1).transpose(1, 0, 2), w.reshape(1, N, 1), out=vt)
            return vt.reshape(Co, -1)
        v = weighted_row_sum(B, w).reshape(N, Co, -1)
        return xp.ascontiguousarray(v.transpose(1, 0, 2)).reshape(Co, -1)

    def _per_sample_sum(self, cache, B, w):
        """Σ_n v_n Ā_n as (C_out, D) and Σ_n Σ_t v_nt as (C_out,), v_n = Σ_k w_nk b_nk,
        from one (C_out/g × T)(T × D) product per sample and group on the rows' own
        (N, C_out, T) layout — no transposing copy — then the sum over samples (weighted
        by w when K = 1, so the rows are read only by the products).  Blocks of samples
        keep the products near ``_CHUNK_ELEMS`` entries."""
        xp = namespace(B)
        N, K, Co, g, D = B.shape[0], B.shape[1], self.out_channels, self.groups, self.D
        cols = cache[0]  # (N, g·D, T), a view of the (g·D, N, T) columns
        T = cols.shape[2]
        if K == 1:  # in the precision of the result (float32 rows, float64 w: float64)
            V = B.reshape(N, Co, T).astype(xp.result_type(B.dtype, w.dtype), copy=False)
            wn = w.reshape(N)  # weights the products' sum
        else:
            V, wn = weighted_row_sum(B, w).reshape(N, Co, T), None
        step = max(1, _CHUNK_ELEMS // (Co * D))
        weight = None
        for n0 in range(0, N, step):
            n1 = min(N, n0 + step)
            prod = xp.matmul(V[n0:n1].reshape(n1 - n0, g, Co // g, T),  # (n, g, C_out/g, D)
                             cols[n0:n1].reshape(n1 - n0, g, D, T).transpose(0, 1, 3, 2))
            prod = prod.reshape(n1 - n0, Co * D)
            part = prod.sum(axis=0) if wn is None else wn[n0:n1] @ prod
            weight = part if weight is None else weight + part
        bias = None
        if self.bias:
            per_sample = V.sum(axis=2)  # (N, C_out)
            bias = per_sample.sum(axis=0) if wn is None else wn @ per_sample
        return weight.reshape(Co, D), bias

    def row_sum(self, cache, B, w):
        """Uᵀw's weight and bias blocks, new arrays: :meth:`row_sum_into` (one route choice)."""
        xp = namespace(B)
        dtype = xp.result_type(B.dtype, w.dtype)
        out = [xp.empty(shape, dtype=dtype) for shape in self.param_shapes]
        self.row_sum_into(cache, B, w, out)
        return out

    def row_sum_into(self, cache, B, w, out):
        """Uᵀw's weight and bias blocks written into the preallocated ``out`` (views of Uᵀw).

        With T ≥ ``_PER_SAMPLE_T`` output locations per sample, per-sample products
        (:meth:`_per_sample_sum`); otherwise the rows summed over k into the columns'
        (C_out, N·T) layout and one (N·T)-long product.  On the 2-core AVX-512 VM the
        first was 3× faster for Conv2d(3, 16, 3, padding=1) on 16 × 16 inputs (T = 256,
        D = 27: 0.36 against 1.05 ms) and 1.1× slower with T = 64
        (``benchmarks/vs_torch.py``'s CNN, docs/benchmarks.md).
        """
        if cache[0].shape[2] >= _PER_SAMPLE_T:
            weight, bias = self._per_sample_sum(cache, B, w)
            out[0].reshape(self.out_channels, self.D)[...] = weight
            if self.bias:
                out[1][...] = bias
            return
        vt = self._summed_rows(B, w)
        self._weight_block(vt, cache[0], out=out[0].reshape(self.out_channels, self.D))
        if self.bias:
            vt.sum(axis=1, out=out[1])

    def row_sq_sum(self, cache, B):
        """Σ_r G_r ⊙ G_r from per-row gradients materialised a block of channels at a time."""
        if self.groups == 1:
            return shared_row_sq_sum(*self._rows(cache, B), self.bias, _CHUNK_ELEMS)
        xp = namespace(B)
        parts = [shared_row_sq_sum(A, Bm, False, _CHUNK_ELEMS) for A, Bm in self._groups(cache, B)]
        if self.bias:
            gb = self._bias_rows(B)
            parts.append((gb * gb).sum(axis=(0, 1)))
        return xp.concatenate(parts)

    def row_gram(self, cache, B):
        """(R, R) float64 Gram U_l U_lᵀ by the cheaper route (or ``self.gram_route``); with
        groups, the sum of the groups' Grams (their weights are disjoint) and the bias's."""
        if self.groups == 1:
            return shared_gram(*self._rows(cache, B), self.bias, self.gram_route, _CHUNK_ELEMS)
        xp = namespace(B)
        G = sum(shared_gram(A, Bm, False, self.gram_route, _CHUNK_ELEMS)
                for A, Bm in self._groups(cache, B))
        if self.bias:
            N, K = B.shape[:2]
            U = self._bias_rows(B).reshape(N * K, -1).astype(xp.float64, copy=False)
            G += U @ U.T
        return G
