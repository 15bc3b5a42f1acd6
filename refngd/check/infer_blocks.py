"""The eigenblocks of :func:`refngd.check.infer`'s update fits: refngd's curvature per block of θ.

:func:`kronecker_blocks` (K-FAC / EKFAC, one :class:`~refngd.check.infer_damping.EigenBlock`
per factor pair) and :func:`row_blocks` (exact NGD / EF / iEF, from the thin SVD of the
rows) are built once per option set by :mod:`refngd.check.infer_search`;
:func:`reproduce` maps a named hypothesis back to θ order.  Host float64, like the fits.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from ..backend import to_numpy
from ..curvature.damping import trace_pi
from .infer_damping import EigenBlock, Evaluated


def kronecker_blocks(F, grad, names: dict, ekfac=None) -> list:
    """:class:`EigenBlock` of every K-FAC (or EKFAC) block, full eigenbases, no candidate yet.

    ``F``: a :class:`refngd.curvature.KFAC`; ``grad``: the gradient its update
    preconditions; ``names``: θ start of a layer → its PyTorch name; ``ekfac``: an
    :class:`refngd.curvature.EKFAC` with full bases (``with_factors``), whose diagonal
    replaces g aᵀ.
    """
    from ..curvature.kronecker import _positions

    g = to_numpy(grad).astype(np.float64)
    out = []
    pairs = zip(ekfac.blocks, ekfac.scalings()) if ekfac is not None else \
        ((b, None) for b in F.blocks)
    for blk, S in pairs:
        (wG, UG, _), (wA, UA, _) = blk.G.eig(False), blk.A.eig(False)
        wG, UG, wA, UA = (to_numpy(x).astype(np.float64) for x in (wG, UG, wA, UA))
        idx = to_numpy(blk.index(np)).astype(np.int64)
        layer = names[blk.start]
        kind = {"w": "weight", "b": "bias", "wb": "weight+bias"}[blk.kind]
        S = np.outer(wG, wA) if S is None else to_numpy(S).astype(np.float64)
        A = to_numpy(blk.A.F).astype(np.float64)
        G = to_numpy(blk.G.F).astype(np.float64)
        out.append(EigenBlock(
            f"{layer}.{kind}", layer, idx, (UG, UA), UG.T @ g[idx] @ UA, None, S, wG, wA,
            trace_pi(A, G), _positions(blk), blk.kind == "b"))
    return out


def row_blocks(U: np.ndarray, c: float, rhs: np.ndarray) -> list:
    """One :class:`EigenBlock` for an exact update d = κ (M + μI)⁻¹ r, M = c UᵀU.

    From the thin SVD U = L Σ Vᵀ (R × P rows, R ≤ P): M = V (cΣ²) Vᵀ, so the eigenbasis of
    the row space costs O(R²P), not the O(P³) of ``eigh(M)``; outside it M is 0 and the
    update is κ r_⊥/μ (the two extra coordinates of :meth:`EigenBlock.coords`).
    """
    U = np.asarray(U, dtype=np.float64)
    rhs = np.asarray(rhs, dtype=np.float64)
    P = U.shape[1]
    if U.shape[0] >= P:  # more rows than parameters: the full eigendecomposition
        w, V = np.linalg.eigh(c * (U.T @ U))
        return [EigenBlock("all", "all", np.arange(P), (V,), V.T @ rhs, None,
                           np.maximum(w, 0.0))]
    _, sv, Vt = np.linalg.svd(U, full_matrices=False)
    keep = sv > (sv.max() if sv.size else 0.0) * 1e-13
    V, w = Vt[keep].T, c * sv[keep] ** 2
    rest = rhs - V @ (V.T @ rhs)
    nr = float(np.linalg.norm(rest))
    perp = rest / nr if nr > 1e-14 * max(float(np.linalg.norm(rhs)), 1e-300) else None
    b = EigenBlock("all", "all", np.arange(P), (V,), np.zeros(0), None,
                   np.concatenate([w, [0.0, 0.0]]), perp=perp)
    return [dataclasses.replace(b, W=b.coords(rhs))]


def reproduce(blocks: list, ev: Evaluated, P: int) -> np.ndarray:
    """The update a named hypothesis gives (κ_b per block), in θ order."""
    out = np.zeros(P)
    for b in blocks:
        out[b.idx.reshape(-1)] = b.back(ev.kappa[b.name] * ev.coords[b.name]).reshape(-1)
    return out
