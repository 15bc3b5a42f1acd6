"""EKFAC: K-FAC's eigenbasis with a re-estimated diagonal (George et al. 2018).

George, Laurent, Bouthillier, Ballas & Vincent (2018), "Fast approximate natural gradient
descent in a Kronecker-factored eigenbasis", §3: with the eigendecompositions
G = U_G Λ_G U_Gᵀ and A = U_A Λ_A U_Aᵀ, K-FAC is Q diag(λ_G ⊗ λ_A) Qᵀ in the basis
Q = U_G ⊗ U_A.  EKFAC keeps Q and replaces the Kronecker eigenvalue products by

    s = diag(Qᵀ F Q) = c Σ_r (Qᵀ u_r)²,      u_r = vec(per-row gradient of the layer),

the second moments of the per-row gradients in that basis — for a fixed basis the diagonal
that minimises the Frobenius distance to F's block (George et al., §3), so EKFAC is
never farther from the Fisher block than K-FAC.  In the basis, a row's gradient matrix
b_r āᵀ becomes (U_Gᵀ b_r)(U_Aᵀ ā)ᵀ; for Linear layers the sum of its squares is one GEMM,
S = c (Σ_k (B_nk U_G)²)ᵀ (Ā U_A)²; for layers that share their weight over T positions
(Conv2d, Linear on sequences) each row's gradient Σ_t b_rt ā_ntᵀ is formed in the rotated
basis (B_r U_G)ᵀ (Ā_n U_A), a chunk of samples at a time.
"""
from __future__ import annotations

import copy

from .. import conventions
from ..backend import Array, SingularSystemError, namespace
from ..memory import plan_square
from ..options import (BIAS, CONVENTION, DAMPING_MODE, DAMPING_SPLIT, FISHER_TYPE,
                       KFAC_APPROX_DEFAULT, PI, DampingMode, DampingSplit, Pi)
from .damping import check_damping_options
from .kfac import KFAC
from .kfac_factors import check_mode, input_rows, output_rows, shares_weights
from .preset_factors import block_scale
from .kronecker import KroneckerOperator, _log_sum, eig_solve

_CHUNK_ELEMS = 1 << 22


#: eigenvalues within this fraction of the largest belong to one cluster (equal to working
#: precision: a null space's computed eigenvalues scatter over ~d·ε·max; real gaps are larger)
CLUSTER_RTOL = 1e-10


def cluster_indicator(w: Array, rtol: float = CLUSTER_RTOL) -> Array:
    """(d, k) 0/1 matrix assigning each eigenvalue to its cluster of equal values.

    Sorted eigenvalues closer than ``rtol·max|w|`` to their neighbour share a cluster;
    the assignment does not depend on the eigenvectors, only on the values.
    """
    xp = namespace(w)
    order = xp.argsort(w)
    ws = w[order]
    tol = rtol * float(xp.abs(w).max()) if w.size else 0.0
    labels_sorted = xp.concatenate([xp.zeros(1, dtype=xp.int64),
                                    xp.cumsum(xp.diff(ws) > tol).astype(xp.int64)])
    labels = xp.empty_like(labels_sorted)
    labels[order] = labels_sorted
    k = int(labels_sorted[-1]) + 1 if w.size else 0
    return (labels[:, None] == xp.arange(k)[None, :]).astype(xp.float64)


def _rayleigh(f, U: Array) -> Array:
    """diag(Uᵀ F U): the eigenvalues of a basis given without them."""
    xp = namespace(U)
    return xp.einsum("ij,ij->j", U, f.F @ U)


class EKFAC(KroneckerOperator):
    """Eigenvalue-corrected K-FAC with the same arguments and interface as :class:`KFAC`.

    Pass ``kfac=`` an existing :class:`KFAC` to reuse its factors and eigendecompositions
    (and its parameter subset; ``params=`` otherwise, as :class:`KFAC`).
    :meth:`scalings` returns the re-estimated diagonals S (one (r_G, r_A) array per
    block), :meth:`kronecker_eigenvalues` K-FAC's λ_G λ_Aᵀ, and :meth:`with_scalings`
    a copy with other diagonals (``ek.with_scalings(ek.kronecker_eigenvalues())`` is K-FAC);
    :meth:`with_factors` a copy in the eigenbasis of other factors (the EKFAC optimizer's
    running averages), its diagonal re-estimated there from this batch's rows.
    Linear layers use thin eigenbases when a factor has fewer rows than its dimension —
    the per-row gradients have no component outside them, so s = 0 there exactly.

    Where a factor has repeated eigenvalues (a rank-deficient factor's null space, say)
    the diagonal is averaged over each cluster pair, so that it does not depend on the
    eigenbasis LAPACK happens to return (:meth:`_canonical`, docs/kfac.md).
    """

    def __init__(self, model, theta: Array, loss, X: Array, y=None, fisher_type: str | None = None,
                 mc_samples: int | None = None, rng=None, kfac_approx: str | None = None,
                 bias: str | None = None, linearization=None, kfac: KFAC | None = None,
                 params=None, convention=None, labels=None):
        options = {"fisher_type": fisher_type, "mc_samples": mc_samples, "kfac_approx": kfac_approx,
                   "bias": bias, "convention": convention}
        if kfac is None:
            defaults = {"fisher_type": FISHER_TYPE, "mc_samples": 1,
                        "kfac_approx": KFAC_APPROX_DEFAULT, "bias": BIAS, "convention": CONVENTION}
            kw = {k: defaults[k] if v is None else v for k, v in options.items()}
            kfac = KFAC(model, theta, loss, X, y, rng=rng, linearization=linearization,
                        params=params, labels=labels, **kw)
        else:
            if not isinstance(kfac, KFAC):
                raise TypeError(f"kfac must be a refngd.curvature.KFAC (whose factors EKFAC reuses), "
                                f"got {type(kfac).__name__}; build one with KFAC(model, theta, loss, X, y).")
            # The factors come from ``kfac``: an option that contradicts them is an error,
            # not something to ignore silently.
            have = {k: getattr(kfac, k, v) for k, v in options.items()}
            if options["convention"] is not None:  # compare presets by name
                options["convention"] = conventions.get(options["convention"]).name
                have["convention"] = kfac.convention.name
            clash = [f"{k}={v!r} (kfac has {have[k]!r})" for k, v in options.items()
                     if v is not None and v != have[k]]
            if clash or rng is not None or linearization is not None or params is not None \
                    or labels is not None:
                raise ValueError(
                    "EKFAC(..., kfac=k) reuses k's factors; do not also pass "
                    + (", ".join(clash) if clash else "rng=, labels=, linearization= or params=")
                    + ". Build the KFAC with the options you want instead.")
        self.kfac = kfac
        for name in ("c", "num_params", "dtype", "lin", "rows", "fisher_type", "kfac_approx", "bias",
                     "subset", "convention"):
            setattr(self, name, getattr(kfac, name))
        self._factor_list = kfac.factors()
        # thin bases where the per-row gradients lie in the span of A's and G's rows: a layer
        # without weight sharing (its rows are exactly the factors' rows)
        self.blocks = [b.replace(b.G, b.A, not shares_weights(b.entry.layer, b.entry.cache))
                       for b in kfac.blocks]
        self._scal = None  # the diagonals, estimated on first use
        self._scal_given = False  # set by with_scalings: not re-estimated in another basis
        self._full: dict = {}  # block index -> (full-basis block, its diagonal): factor damping

    @property
    def _S(self) -> list:
        if self._scal is None:
            rotated: dict = {}  # Σ_k (U_Gᵀ b_nk)², shared by a layer's weight and bias blocks
            self._scal = [self._canonical(blk, self._estimate(blk, rotated)) for blk in self.blocks]
        return self._scal

    # ---------------------------------------------------------------- canonical diagonal
    def _canonical(self, blk, S: Array) -> Array:
        """Average s over every pair of eigenvalue clusters of G and A (basis-invariant).

        Inside a cluster of equal eigenvalues (a rank-deficient factor's null space, or
        any repeated eigenvalue) the eigenbasis is not unique, and diag(Qᵀ F Q) depends on
        which basis LAPACK returns.  Its *sum* over a cluster pair (i, j) is not:
        Σ_{a∈i, b∈j} (u_aᵀ M u_b)² = ‖P_i M P_j‖²_F for the orthogonal projectors P onto
        the two eigenspaces.  So refngd defines EKFAC's diagonal as that sum divided by
        the pair's size — the Frobenius-closest operator to the Fisher block among those
        constant on each eigenspace pair (docs/kfac.md, "A canonical EKFAC").  With simple
        eigenvalues this is George et al.'s diag(Qᵀ F Q) unchanged.
        """
        (wG, UG, _), (wA, UA, _) = blk.eig()
        wG = wG if wG is not None else _rayleigh(blk.G, UG)
        wA = wA if wA is not None else _rayleigh(blk.A, UA)
        MG, MA = cluster_indicator(wG), cluster_indicator(wA)
        if MG.shape[1] == MG.shape[0] and MA.shape[1] == MA.shape[0]:
            return S  # every eigenvalue simple: nothing to average
        sums = MG.T @ S @ MA                                          # (k_G, k_A)
        sizes = MG.sum(axis=0)[:, None] * MA.sum(axis=0)[None, :]
        return MG @ (sums / sizes) @ MA.T

    # ---------------------------------------------------------------- the diagonal
    def _estimate(self, blk, rotated: dict | None = None) -> Array:
        """s = c Σ_r (U_Gᵀ G_r U_A)² for the layer's per-row gradient matrices G_r."""
        (_, UG, _), (_, UA, _) = blk.eig()
        e = blk.entry
        xp = namespace(UG)
        N, K = e.B.shape[:2]
        if not shares_weights(e.layer, e.cache):
            rotated = {} if rotated is None else rotated
            if id(blk.G) not in rotated:
                Bq = output_rows(e.layer, e.B, None) @ UG
                rotated[id(blk.G)] = (Bq * Bq).reshape(N, K, -1).sum(axis=1)  # (N, r_G)
            B2 = rotated[id(blk.G)]  # Σ_k (U_Gᵀ b_nk)²
            if blk.kind == "b":
                a = xp.ones((N, 1), dtype=xp.float64)
            else:
                a = input_rows(e.layer, e.cache, None, blk.kind == "wb")[0]
            Aq = a @ UA
            return self._c_of(blk) * (B2.T @ (Aq * Aq))
        P = e.layer.tokens(e.cache).astype(xp.float64)               # (N, T, D)
        T = P.shape[1]
        if blk.kind == "b":
            P = xp.ones((N, T, 1), dtype=xp.float64)
        elif blk.kind == "wb":
            P = xp.concatenate([P, xp.ones((N, T, 1), dtype=xp.float64)], axis=2)
        Pq = P @ UA                                                    # (N, T, r_A)
        Bq = e.layer.token_rows(e.B).astype(xp.float64).transpose(0, 1, 3, 2) @ UG
        S = xp.zeros((UG.shape[1], UA.shape[1]), dtype=xp.float64)
        step = max(1, _CHUNK_ELEMS // max(1, K * S.size))
        for n0 in range(0, N, step):
            Gq = Bq[n0:n0 + step].transpose(0, 1, 3, 2) @ Pq[n0:n0 + step, None]  # (n, K, r_G, r_A)
            S += (Gq * Gq).sum(axis=(0, 1))
        return self._c_of(blk) * S

    def _c_of(self, blk) -> float:
        """c, times the block's s_A·s_G under a convention's ``factor_scale``: the diagonal
        estimates the same rescaled Fisher block as the factors (George et al.'s s_ij =
        g_i a_j case stays K-FAC's eigenvalues)."""
        return self.c * block_scale(self.convention, blk.entry, self.c,
                                    self.lin.outputs.shape[0], self.kfac_approx)

    def scalings(self) -> list:
        """The re-estimated diagonal of every block, (r_G, r_A) in the basis U_G ⊗ U_A."""
        return list(self._S)

    def kronecker_eigenvalues(self) -> list:
        """K-FAC's eigenvalues λ_G λ_Aᵀ of every block, in the same layout as :meth:`scalings`."""
        xp = self._xp()

        def values(f, thin):  # a basis given without eigenvalues (with_factors): U_iᵀ F U_i
            w, U, _ = f.eig(thin)
            return w if w is not None else _rayleigh(f, U)
        return [xp.outer(values(blk.G, blk.thin), values(blk.A, blk.thin)) for blk in self.blocks]

    def with_scalings(self, scalings: list) -> "EKFAC":
        """A copy of this operator with the diagonals ``scalings`` (same layout)."""
        if len(scalings) != len(self._S) or any(s.shape != t.shape for s, t in zip(scalings, self._S)):
            raise ValueError("scalings must match EKFAC.scalings() in number and shapes.")
        new = copy.copy(self)
        new._scal, new._scal_given, new._full = list(scalings), True, {}
        return new

    def with_factors(self, factors: list, eigen: list | None = None) -> "EKFAC":
        new = super().with_factors(factors, eigen)
        # re-estimated in the new basis (this batch)
        new._scal, new._scal_given, new._full = None, False, {}
        return new

    with_factors.__doc__ = KroneckerOperator.with_factors.__doc__

    # ---------------------------------------------------------------- operations
    def _pairs(self):
        return zip(self.blocks, self._S)

    def matvec(self, v: Array) -> Array:
        S = {id(b): s for b, s in self._pairs()}

        def fn(blk, V):
            (_, UG, _), (_, UA, _) = blk.eig()
            return UG @ (((UG.T @ V) @ UA) * S[id(blk)]) @ UA.T
        return self._map(v, fn)

    def dense(self) -> Array:
        xp = self._xp()
        plan_square(self.num_params, xp, f"the dense {type(self).__name__} matrix",
                    max(b.size for b in self.blocks))  # refngd.memory: fail early
        out = xp.zeros((self.num_params, self.num_params), dtype=xp.float64)
        for blk, s in self._pairs():
            (_, UG, _), (_, UA, _) = blk.eig()
            Q = xp.kron(UG, UA)
            i = blk.index(xp).reshape(-1)
            out[xp.ix_(i, i)] = (Q * s.reshape(-1)) @ Q.T
        return out.astype(self.dtype, copy=False)

    def diagonal(self) -> Array:
        xp = self._xp()
        out = xp.zeros(self.num_params, dtype=xp.float64)
        for blk, s in self._pairs():
            (_, UG, _), (_, UA, _) = blk.eig()
            blk.scatter(out, (UG * UG) @ s @ (UA * UA).T)
        return out.astype(self.dtype, copy=False)

    def trace(self) -> float:
        return float(sum(float(s.sum()) for s in self._S))

    def _damped(self, damping, damping_mode: str, pi, damping_split: str) -> list:
        """(block, eigenbases, D, λ) per block: the damped eigenvalues are D + λ, and λ also
        fills the directions outside a thin basis.

        Tikhonov: D = s.  A factor damping (γ as :meth:`KFAC.solve`): D = s + γ_A g_i
        + γ_G a_j + γ_A γ_G and λ = None, which needs full bases — a thin block's diagonal is then
        re-estimated in the full eigenbases of its factors (zero outside the thin span).
        """
        lam = check_mode(damping, damping_mode)
        if damping_mode == "tikhonov":
            return [(blk, blk.eig(), s, lam) for blk, s in self._pairs()]
        pi = check_damping_options(pi, damping_split)
        out = []
        for i, (blk, s) in enumerate(self._pairs()):
            if blk.thin:
                if self._scal_given:
                    raise ValueError("with_scalings on thin eigenbases supports damping_mode="
                                     "'tikhonov' only; build EKFAC from with_factors instead.")
                if i not in self._full:
                    full = blk.replace(blk.G, blk.A, False)
                    self._full[i] = (full, self._canonical(full, self._estimate(full, {})))
                blk, s = self._full[i]
            eG, eA = blk.eig()
            wG = eG[0] if eG[0] is not None else _rayleigh(blk.G, eG[1])
            wA = eA[0] if eA[0] is not None else _rayleigh(blk.A, eA[1])
            gG, gA = self._factor_shifts(blk, lam, damping_mode, pi, damping_split)
            out.append((blk, (eG, eA), s + gA * wG[:, None] + gG * wA[None, :] + gA * gG,
                        None))
        return out

    def solve(self, g: Array, damping, damping_mode: DampingMode = DAMPING_MODE, pi: Pi = PI,
              damping_split: DampingSplit = DAMPING_SPLIT) -> Array:
        """(Q diag(D) Qᵀ)⁻¹ g blockwise, D the damped diagonal in the basis Q = U_G ⊗ U_A.

        ``"tikhonov"`` (George et al. 2018, §3): D = s + λ, the matrix Q diag(s) Qᵀ + λI.
        ``"factored"`` / ``"per-factor"`` (refngd's extension, :mod:`~refngd.curvature.damping`):
        K-FAC's factor-damping term (G + γ_G I) ⊗ (A + γ_A I) − G ⊗ A is added, so
        D_ij = s_ij + γ_A g_i + γ_G a_j + γ_A γ_G (g, a the factors' eigenvalues) — with
        s = g aᵀ this is K-FAC's factored solve; γ_A, γ_G, ``pi`` and ``damping_split`` as
        :meth:`refngd.curvature.KFAC.solve`.
        """
        self._check_vector("g", g)
        damped = self._damped(damping, damping_mode, pi, damping_split)
        if damping_mode == "tikhonov":
            S = {id(b): s for b, s in self._pairs()}
            lam = damped[0][3] if damped else 0.0
            return self._map(g, lambda blk, V: eig_solve(V, *blk.eig(), S[id(blk)], lam))
        by_block = {id(b): (e, D) for b, (_, e, D, _) in zip(self.blocks, damped)}

        def fn(b, V):
            ((_, UG, _), (_, UA, _)), D = by_block[id(b)]
            if float(D.min()) <= D.size * 2.2e-16 * max(float(D.max()), 1e-300):
                raise SingularSystemError("the damped EKFAC block is singular; pass damping > 0.")
            return UG @ (((UG.T @ V) @ UA) / D) @ UA.T
        return self._map(g, fn)

    def logdet(self, damping, damping_mode: DampingMode = DAMPING_MODE, pi: Pi = PI,
               damping_split: DampingSplit = DAMPING_SPLIT) -> float:
        """Σ_blocks Σ log D (+ log λ for each direction outside a thin basis, Tikhonov), D as
        :meth:`solve`."""
        xp = self._xp()
        return float(sum(_log_sum(xp, D, lam, blk.size) if lam is not None
                         else float(xp.log(D).sum())
                         for blk, _, D, lam in self._damped(damping, damping_mode, pi,
                                                              damping_split)))
