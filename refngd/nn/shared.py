"""Row primitives of a linear map shared over T positions (convolutions, sequences).

A layer z_nt = W ā_nt + b applied at T positions t of sample n (image locations of a
Conv2d, tokens of a Linear on (N, T, d)) gives row (n, k) with cotangents b_nkt the
parameter gradient summed over positions (Grosse & Martens 2016, eq. 10; Eschenhagen et
al. 2023, §2.2):

    G_r = Σ_t b_rt ā_ntᵀ  (C_out × D),     bias gradient  Σ_t b_rt.

Every function here takes the inputs as ``A`` (N, T, D) and the rows as ``Bm``
(N, K, C_out, T), so that Conv2d (im2col patches) and Linear on sequences share one
implementation.  Temporaries are bounded by ``chunk`` array elements.
"""
from __future__ import annotations

import math

from ..backend import Array, namespace

#: default bound (in array elements) on the temporaries of the chunked primitives
CHUNK_ELEMS = 1 << 22


def gram_flops(N: int, K: int, T: int, C_out: int, D: int, bias: bool = True):
    """FLOP counts ``(materialise, spatial)`` of the two routes of :func:`shared_gram`.

    With R = N·K rows and P_l = C_out·(D + bias) parameters, counting a multiply-add as
    2 FLOPs and only one triangle of every symmetric product (as both routes compute):

    * materialise: form U_l (R × P_l), then U_l U_lᵀ:    2·R·T·C_out·D + R²·P_l
    * spatial:     input Grams Ā_n Ā_mᵀ (m ≥ n), each contracted first with sample m's rows,
      then with sample n's:                           N²·T²·D + N·R·T²·C_out + R²·T·C_out
    """
    R, P = N * K, C_out * (D + int(bool(bias)))
    return (2 * R * T * C_out * D + R * R * P,
            N * N * T * T * D + N * R * T * T * C_out + R * R * T * C_out)


def gram_route(N: int, K: int, T: int, C_out: int, D: int, bias: bool = True) -> str:
    """The cheaper Gram route by :func:`gram_flops`: ``"materialise"`` or ``"spatial"``."""
    mat, spa = gram_flops(N, K, T, C_out, D, bias)
    return "spatial" if spa < mat else "materialise"


def channel_blocks(A: Array, Bm: Array, chunk: int = CHUNK_ELEMS):
    """Per-row weight gradients a block of output channels at a time.

    Yields G[n, k, o, :] = Σ_t b_nk,o,t ā_ntᵀ for o in a block, shape (N, K, block, D);
    each block has about ``chunk`` entries.
    """
    N, K, Co, T = Bm.shape
    step = max(1, chunk // max(1, N * K * A.shape[2]))
    for o0 in range(0, Co, step):
        yield Bm[:, :, o0:o0 + step] @ A[:, None]


def shared_row_grads(A: Array, Bm: Array, bias: bool) -> Array:
    """U_l (N, K, C_out·D [+ C_out]): weight gradients row-major (o, d), then the bias."""
    xp = namespace(Bm)
    N, K = Bm.shape[:2]
    gW = (Bm @ A[:, None]).reshape(N, K, -1)
    return xp.concatenate([gW, Bm.sum(axis=3)], axis=2) if bias else gW


def shared_row_sq_sum(A: Array, Bm: Array, bias: bool, chunk: int = CHUNK_ELEMS) -> Array:
    """Σ_r G_r ⊙ G_r from per-row gradients materialised a block of channels at a time."""
    xp = namespace(Bm)
    parts = [(G * G).sum(axis=(0, 1)).reshape(-1) for G in channel_blocks(A, Bm, chunk)]
    if bias:
        gb = Bm.sum(axis=3)
        parts.append((gb * gb).sum(axis=(0, 1)))
    return xp.concatenate(parts)


def shared_gram(A: Array, Bm: Array, bias: bool, route: str | None = None,
                chunk: int = CHUNK_ELEMS) -> Array:
    """(R, R) float64 Gram U_l U_lᵀ by the cheaper route (or the given ``route``)."""
    xp = namespace(Bm)
    N, K, Co, T = Bm.shape
    route = route or gram_route(N, K, T, Co, A.shape[2], bias)
    if route not in ("materialise", "spatial"):
        raise ValueError(f"gram_route must be None, 'materialise' or 'spatial', got {route!r}.")
    A = A.astype(xp.float64, copy=False)
    Bm = Bm.astype(xp.float64, copy=False)
    if route == "materialise":
        return _gram_materialise(xp, A, Bm, bias, chunk)
    return _gram_spatial(xp, A, Bm, bias, chunk)


def _gram_materialise(xp, A, Bm, bias, chunk):
    """Σ over channel blocks c of U_c U_cᵀ (each a symmetric rank-k update)."""
    N, K, Co, _ = Bm.shape
    R = N * K
    G = xp.zeros((R, R), dtype=xp.float64)
    for Gc in channel_blocks(A, Bm, chunk):
        U = Gc.reshape(R, -1)  # rows (n, k), columns (o, d) of this channel block
        G += U @ U.T
    if bias:
        U = Bm.sum(axis=3).reshape(R, Co)
        G += U @ U.T
    return G


def _gram_spatial(xp, A, Bm, bias, chunk):
    """K[(n,k), (m,j)] = Σ_{t,o} b_nkot Σ_u (Ā_n Ā_mᵀ + 1)_{tu} b_mjou, in sample blocks.

    Contracting the input Gram with one side's rows first costs N·R·T²·C_out (one
    triangle of block pairs) instead of the R²·T²·C_out of forming every B_r B_r'ᵀ;
    memory per block of S × S sample pairs is S²·T·(T + K·C_out).  At least 8 blocks
    a side, so that skipping the lower triangle of blocks saves nearly half the work.
    """
    N, K, Co, T = Bm.shape
    Q = Bm.transpose(0, 3, 2, 1).reshape(N, T, Co * K)   # Q[m][u, (o, j)] = b_mjou
    Bt = Bm.transpose(0, 1, 3, 2).reshape(N, K, T * Co)  # Bt[n][k, (t, o)] = b_nkot
    At = A.transpose(0, 2, 1)
    S = max(1, min(-(-N // 8), math.isqrt(max(1, chunk // (T * (T + Co * K))))))
    G = xp.empty((N, K, N, K), dtype=xp.float64)
    for n0 in range(0, N, S):
        n = slice(n0, min(N, n0 + S))
        for m0 in range(n0, N, S):  # upper triangle of blocks; the lower one mirrors it
            m = slice(m0, min(N, m0 + S))
            AA = A[n, None] @ At[None, m]  # (S, S, T, T) input Grams Ā_n Ā_mᵀ
            if bias:
                AA += 1.0
            Y = AA @ Q[None, m]  # (S, S, T, C_out·K)
            Y = Y.reshape(Y.shape[0], Y.shape[1], T * Co, K)
            G[n, :, m, :] = (Bt[n, None] @ Y).transpose(0, 2, 1, 3)
            if m0 != n0:
                G[m, :, n, :] = G[n, :, m, :].transpose(2, 3, 0, 1)
    G = G.reshape(N * K, N * K)
    return 0.5 * (G + G.T)  # diagonal blocks: the two triangles differ by round-off


def weighted_row_sum(B: Array, w: Array) -> Array:
    """Σ_k w_nk B[n, k] for rows B (N, K, …) and weights w (N, K), as (N, ·): the per-sample
    sum of every Uᵀw.  One row a sample is a broadcast product, not N 1 × 1 GEMMs."""
    N, K = B.shape[:2]
    if K == 1:
        return B.reshape(N, -1) * w
    return (w[:, None, :] @ B.reshape(N, K, -1))[:, 0, :]
