"""Kronecker-factored operators: factors F = scale·MᵀM, their eigenbases, blockwise solves.

The machinery shared by :class:`refngd.curvature.KFAC` and :class:`refngd.curvature.EKFAC`.
A curvature block over a (d_G, d_A) parameter matrix V is Q diag(S) Qᵀ in the Kronecker
eigenbasis Q = U_G ⊗ U_A (row-major vec, so (G ⊗ A) vec(V) = vec(G V A)); K-FAC has
S = λ_G λ_Aᵀ, EKFAC re-estimates S.  Nothing P × P is formed except by ``dense()``.
"""
from __future__ import annotations

import copy
import dataclasses
import math

from ..backend import Array, SingularSystemError, is_cupy, namespace
from .base import CurvatureOperator
from .damping import factor_shifts

#: host LAPACK for eigh / QR: "numpy" shares OpenBLAS's thread pool with the GEMMs around
#: it (NumPy and SciPy wheels ship separate OpenBLAS copies whose idle threads spin and
#: compete on a small machine); "scipy" selects SciPy's divide-and-conquer driver.
HOST_LAPACK = "numpy"


def eigh(M: Array):
    """Symmetric eigendecomposition (float64)."""
    if is_cupy(M) or HOST_LAPACK == "numpy":
        return namespace(M).linalg.eigh(M)
    import scipy.linalg

    return scipy.linalg.eigh(M, driver="evd", check_finite=False)


def _qr(M: Array):
    if is_cupy(M) or HOST_LAPACK == "numpy":
        return namespace(M).linalg.qr(M, mode="reduced")
    import scipy.linalg

    return scipy.linalg.qr(M, mode="economic", check_finite=False)


class KronFactor:
    """One Kronecker factor F = scale · MᵀM (d × d) of a row matrix M (m × d), float64.

    :meth:`eig` returns ``(w, U, full)`` with F = U diag(w) Uᵀ.  With m < d and ``thin``
    the basis is thin (d × m): QR of Mᵀ = QR gives F = Q (scale·R Rᵀ) Qᵀ, so one m × m
    ``eigh`` suffices and every direction outside span(U) has eigenvalue exactly 0.
    """

    def __init__(self, M: Array, scale: float):
        self.M, self.scale = M, float(scale)
        self.dim = M.shape[1]
        self._F = None
        self._eig: dict = {}

    @property
    def F(self) -> Array:
        """scale · MᵀM (d × d), formed on first use (one symmetric rank-k update).

        Lazy because a solve with a thin basis never needs it: a Linear(2048, 10) input
        factor from 64 rows costs 2048²·64 multiply-adds to form and its thin basis 16×
        fewer — forming it eagerly made K-FAC slower than exact NGD on a small CNN
        (docs/benchmarks.md).
        """
        if self._F is None:
            self._F = self.scale * (self.M.T @ self.M)
        return self._F

    @classmethod
    def from_matrix(cls, F: Array, eig=None) -> "KronFactor":
        """A factor given as its matrix F (no rows, so its basis is full), e.g. a running average.

        ``eig`` = (w, U) is used as its eigendecomposition instead of ``eigh(F)`` — one
        computed earlier and kept; ``w`` may be ``None`` where only the basis is used.
        """
        self = cls.__new__(cls)
        self.M, self.scale, self._F, self.dim, self._eig = None, 1.0, F, F.shape[0], {}
        if eig is not None:
            self._eig[False] = (eig[0], eig[1], True)
        return self

    def eig(self, thin: bool = True):
        thin = bool(thin) and self.M is not None and self.M.shape[0] < self.dim
        if thin not in self._eig:
            xp = namespace(self.M if self.M is not None else self.F)
            if thin:
                Q, R = _qr(self.M.T)
                w, V = eigh(self.scale * (R @ R.T))
                U = Q @ V
            else:
                w, U = eigh(self.F)
            self._eig[thin] = (xp.maximum(w, 0.0), U, not thin)
        return self._eig[thin]


def _sandwich_t(L: Array, V: Array, R: Array) -> Array:
    """Lᵀ V R, multiplying in the cheaper order."""
    if L.shape[1] * V.shape[1] * (L.shape[0] + R.shape[1]) <= V.shape[0] * R.shape[1] * (V.shape[1] + L.shape[1]):
        return (L.T @ V) @ R
    return L.T @ (V @ R)


def _sandwich(L: Array, W: Array, R: Array) -> Array:
    """L W Rᵀ, multiplying in the cheaper order."""
    if L.shape[0] * W.shape[1] * (W.shape[0] + R.shape[0]) <= W.shape[0] * R.shape[0] * (W.shape[1] + L.shape[0]):
        return (L @ W) @ R.T
    return L @ (W @ R.T)


def eig_solve(V: Array, eG, eA, S: Array, lam: float) -> Array:
    """(Q diag(S) Qᵀ + λI)⁻¹ vec(V) for the basis Q = U_G ⊗ U_A, as a (d_G, d_A) matrix.

    Full bases: U_G [(U_Gᵀ V U_A) / (S + λ)] U_Aᵀ (four GEMMs).  A thin basis carries
    eigenvalue 0 outside its span, where the inverse is 1/λ:
    V/λ − U_G [(U_Gᵀ V U_A) ⊙ S/(λ(S + λ))] U_Aᵀ.
    """
    (_, UG, fullG), (_, UA, fullA) = eG, eA
    W = _sandwich_t(UG, V, UA)
    if fullG and fullA:
        smin, smax = float(S.min()) + lam, float(S.max()) + lam
        if smin <= S.size * 2.2e-16 * max(smax, 1e-300):
            raise SingularSystemError("the K-FAC block is singular; pass damping > 0.")
        return _sandwich(UG, W / (S + lam), UA)
    if lam == 0:
        raise SingularSystemError("the K-FAC block is rank deficient (fewer rows than its "
                                  "dimension); pass damping > 0.")
    return V / lam - _sandwich(UG, W * (S / (lam * (S + lam))), UA)


def _factor_inv(X: Array, e, gamma: float, left: bool) -> Array:
    """(F + γI)⁻¹ X (left) or X (F + γI)⁻¹ (right) from F's eigendecomposition."""
    w, U, full = e
    if not left:
        return _factor_inv(X.T, e, gamma, True).T
    if full:
        if float(w.min()) + gamma <= 0:
            raise SingularSystemError("a K-FAC factor is singular; pass damping > 0.")
        return U @ ((U.T @ X) / (w + gamma)[:, None])
    if gamma == 0:
        raise SingularSystemError("a K-FAC factor is rank deficient; pass damping > 0.")
    return X / gamma - U @ ((U.T @ X) * (w / (gamma * (w + gamma)))[:, None])


def _log_sum(xp, S: Array, lam: float, dim: int) -> float:
    """Σ log(S + λ) over S's entries, plus log λ for the (dim − S.size) missing eigenvalues."""
    rest = dim - S.size
    if rest and lam == 0:
        return -math.inf
    return float(xp.log(S + lam).sum()) + (rest * math.log(lam) if rest else 0.0)


class Block:
    """One Kronecker block G ⊗ A on θ entries laid out as a (d_out, d_A) matrix.

    ``kind``: ``"w"`` the weight (d_A = D), ``"b"`` the bias (A = [1]), ``"wb"`` weight
    and bias jointly (d_A = D + 1, last column the bias) — θ stores W row-major *then* b,
    so this block's vec order differs from θ's: :meth:`gather` / :meth:`scatter` permute.
    ``entry`` is the layer's LayerRows (EKFAC re-reads inputs and rows from it).
    """

    def __init__(self, kind, G: KronFactor, A: KronFactor, start: int, d_out: int, D: int, thin: bool,
                 entry=None, bias_start: int | None = None):
        self.kind, self.G, self.A, self.thin, self.entry = kind, G, A, thin, entry
        self.start, self.d_out, self.D = start, d_out, D
        #: θ position of the bias: right after the weight, or a group's own place
        self.bias_start = start + d_out * D if bias_start is None else bias_start
        self.size = d_out * A.dim

    def replace(self, G: KronFactor, A: KronFactor, thin: bool) -> "Block":
        """The same block with other factors (a bias block keeps its A = [1])."""
        return Block(self.kind, G, self.A if self.kind == "b" else A, self.start, self.d_out, self.D,
                     thin, self.entry, self.bias_start)

    def _w(self, v):
        return v[self.start:self.start + self.d_out * self.D].reshape(self.d_out, self.D)

    def _b(self, v):
        return v[self.bias_start:self.bias_start + self.d_out]

    def gather(self, v: Array) -> Array:
        xp = namespace(v)
        if self.kind == "w":
            return self._w(v)
        if self.kind == "b":
            return self._b(v)[:, None]
        return xp.concatenate([self._w(v), self._b(v)[:, None]], axis=1)

    def scatter(self, out: Array, M: Array) -> None:
        if self.kind == "b":
            self._b(out)[...] = M[:, 0]
            return
        self._w(out)[...] = M[:, :self.D]
        if self.kind == "wb":
            self._b(out)[...] = M[:, self.D]

    def index(self, xp) -> Array:
        """θ positions of the block's (d_out, d_A) entries."""
        return self.gather(xp.arange(max(self.start + self.d_out * self.D,
                                         self.bias_start + self.d_out)))

    def eig(self):
        return self.G.eig(self.thin), self.A.eig(self.thin)


def _positions(blk: Block) -> int:
    """T, the positions that share the block's weight (1 for a layer without sharing)."""
    e = blk.entry
    if e is None or e.layer.weight_sharing(e.cache) is None:
        return 1
    return int(e.layer.tokens(e.cache).shape[1])


class KroneckerOperator(CurvatureOperator):
    """Shared machinery of K-FAC and EKFAC: block-diagonal in θ, blocks in a Kronecker basis."""

    blocks: list
    #: the LayerFactors, or None until :meth:`_build_factors` forms them on first use
    _factor_list: list | None = None

    def _build_factors(self) -> list:
        raise NotImplementedError  # pragma: no cover - every subclass sets or builds them

    @property
    def _factors(self) -> list:
        if self._factor_list is None:
            self._factor_list = self._build_factors()
        return self._factor_list

    def factors(self) -> list:
        """Per parametric layer its :class:`LayerFactors` (A, G and conventions)."""
        return list(self._factors)

    def _xp(self):
        G = self.blocks[0].G
        return namespace(G.M if G.M is not None else G.F)

    def _map(self, v: Array, fn) -> Array:
        """Apply ``fn(block, V)`` to every block of v (as float64 matrices); returns (P,)."""
        xp = self._xp()
        self._check_vector("v", v)
        out = xp.zeros(self.num_params, dtype=xp.float64)
        v = v.astype(xp.float64, copy=False)
        for blk in self.blocks:
            blk.scatter(out, fn(blk, blk.gather(v)))
        return out.astype(self.dtype, copy=False)

    def with_factors(self, factors: list, eigen: list | None = None):
        """A copy with the factors ``[(A, G)]`` (one pair per layer, as :meth:`factors`).

        The θ layout, the batch's rows and every option stay; only the Kronecker factors
        change — the K-FAC / EKFAC optimizers precondition with running averages this way.
        ``eigen``: per layer ``((w_A, U_A), (w_G, U_G))`` to use instead of ``eigh`` of A
        and G (say from an earlier refresh: products then use A and G, solves that basis);
        ``w`` may be ``None`` where only the basis is used (EKFAC).  Bases are full.
        """
        own = self.factors()
        if len(factors) != len(own) or any(A.shape != f.A.shape or G.shape != f.G.shape
                                           for (A, G), f in zip(factors, own)):
            raise ValueError("factors must match factors() in number and shapes.")
        if eigen is not None and len(eigen) != len(own):
            raise ValueError("eigen must have one ((w_A, U_A), (w_G, U_G)) per layer.")
        kron = {}
        for i, (f, (A, G)) in enumerate(zip(own, factors)):
            eA, eG = (None, None) if eigen is None else eigen[i]
            kron[f.start] = (KronFactor.from_matrix(G, eG), KronFactor.from_matrix(A, eA))
        new = copy.copy(self)
        new._factor_list = [dataclasses.replace(f, A=A, G=G) for f, (A, G) in zip(own, factors)]
        new.blocks = [b.replace(*kron[b.start], thin=False) for b in self.blocks]
        return new

    def _factor_shifts(self, blk: Block, damping, damping_mode: str, pi, damping_split: str):
        """(γ_G, γ_A) of ``blk`` under a factor damping (:func:`factor_shifts`).

        Under a convention with ``bias_damping="weight"`` (curvlinops) a separate bias block
        of the factored damping is (G + √λ/π_W I) ⊗ [1], π_W the π of its layer's weight block.
        """
        conv = getattr(self, "convention", None)
        if blk.kind == "b" and damping_mode == "factored" and conv is not None \
                and conv.bias_damping == "weight":
            w = next(b for b in self.blocks if b.kind == "w" and b.start == blk.start)
            return factor_shifts(w.A.F, w.G.F, damping, damping_mode, pi, damping_split,
                                 _positions(w))[0], 0.0
        T = _positions(blk) if damping_split == "locations" and pi != "trace" else 1
        return factor_shifts(blk.A.F, blk.G.F, damping, damping_mode, pi, damping_split, T)

    def eigendecompose(self):
        """Compute (and cache) the eigendecompositions of every factor; returns self."""
        for blk in self.blocks:
            blk.eig()
        return self
