"""The shared curvature-operator interface and the row-Gram curvature c·UᵀU.

Every curvature in refngd is a symmetric P × P operator with the same interface
(``dense()``, ``@``/``matvec``, ``to_linear_operator()``, ``solve(g, damping)``,
``trace()``, ``diagonal()``).  The exact family (Fisher, sampled Fisher, empirical and
improved empirical Fisher) is ``c · UᵀU`` for a row matrix U (docs/design.md §2), which
:class:`RowCurvature` implements once through a :class:`refngd.rows.RowSet`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..backend import Array, PSDFactor, check_damping, check_float_array, eigh_psd, namespace
from ..derivatives import gradient_from


class CurvatureOperator(ABC):
    """A symmetric positive semi-definite P × P curvature matrix, never formed unless asked."""

    num_params: int
    dtype: object

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    @abstractmethod
    def matvec(self, v: Array) -> Array:
        """F v for a parameter vector v (P,)."""

    @abstractmethod
    def dense(self) -> Array:
        """F as a dense (P, P) array in θ's (PyTorch) order — small models only."""

    @abstractmethod
    def solve(self, g: Array, damping: float) -> Array:
        """(F + damping·I)⁻¹ g."""

    def __matmul__(self, v: Array) -> Array:
        if v.ndim == 2:
            xp = namespace(v)
            return xp.stack([self.matvec(v[:, j]) for j in range(v.shape[1])], axis=1)
        return self.matvec(v)

    def to_linear_operator(self):
        """This curvature as a :class:`scipy.sparse.linalg.LinearOperator` (NumPy only)."""
        from scipy.sparse.linalg import LinearOperator

        # SciPy hands matvec a (P,) or a (P, 1) column (its default matmat does the latter);
        # flatten so that ``op @ M`` and ``op.matvec(column)`` work, SciPy restores the shape.
        def mv(v):
            return self.matvec(v.reshape(-1))

        return LinearOperator(self.shape, matvec=mv, rmatvec=mv, matmat=self.__matmul__,
                              dtype=self.dtype)

    def _check_vector(self, name: str, v: Array) -> Array:
        check_float_array(name, v, ndim=1)
        if v.shape[0] != self.num_params:
            raise ValueError(f"{name} must have length P = {self.num_params}, got {v.shape[0]}.")
        return v


class RowCurvature(CurvatureOperator):
    """F = c · UᵀU for R = N·K row cotangents back-propagated once (docs/design.md §2).

    Subclasses define :meth:`cotangents`, the (N, K, C) output-space rows, and set
    ``label_based`` when the rows use the observed labels (EF, iEF; see conventions).
    Construction runs one forward pass (or reuses ``linearization``) and one backward pass
    of the rows.

    Parameters
    ----------
    model : refngd.nn.Sequential or refngd.FunctionModel
    theta : (P,) parameters
    loss : a refngd loss; its reduction fixes c (docs/design.md §2)
    X, y : the batch
    linearization : optional result of ``model.linearize(theta, X)`` to reuse a forward pass
    with_gradient : also back-propagate each sample's loss gradient e_n as one extra row in
        the same pass, for :meth:`natural_gradient` (needs ``y``)
    convention : ``"refngd"`` (default) or a library preset (:mod:`refngd.conventions`); it
        may rescale c by the library's α (its objective is α × the PyTorch loss)
    """

    label_based = False

    def __init__(self, model, theta: Array, loss, X: Array, y: Array, linearization=None,
                 with_gradient: bool = False, convention="refngd"):
        from .. import conventions

        self.model, self.theta, self.loss, self.y = model, theta, loss, y
        self.lin = linearization if linearization is not None else model.linearize(theta, X)
        self.outputs = self.lin.outputs
        self.convention = conventions.get(convention)
        self.c = float(loss.scale(self.outputs)) * self.convention.alpha(loss, self.outputs,
                                                                          self.label_based)
        self.num_params = int(theta.shape[0])
        self.dtype = theta.dtype
        S = self.cotangents()
        self._K = S.shape[1]
        self._joint = None
        if with_gradient:
            xp = namespace(S)
            e = loss.output_gradient(self.outputs, y).astype(S.dtype, copy=False)
            self._joint = self.lin.backprop(xp.concatenate([S, e[:, None, :]], axis=1))
            self.rows = self._joint.take(0, self._K)
        else:
            self.rows = self.lin.backprop(S)
        self._gram = None
        self._F64 = None

    @abstractmethod
    def cotangents(self) -> Array:
        """The output-space rows s_nk, shape (N, K, C)."""

    # ---------------------------------------------------------------- basic operations
    def gram(self) -> Array:
        """The R × R Gram matrix U Uᵀ of the rows (float64; *without* the constant c)."""
        if self._gram is None:
            if self._joint is not None:
                self._joint_gram()
            else:
                self._gram = self.rows.gram()
        return self._gram

    def _joint_gram(self) -> None:
        """From the Gram matrix of the joint rows [U; G]: K = U Uᵀ and U g = c (U Gᵀ) 1."""
        N, K = self.rows.N, self._K
        G4 = self._joint.gram().reshape(N, K + 1, N, K + 1)
        self._gram = G4[:, :K, :, :K].reshape(N * K, N * K)  # copy of the F-rows block
        self._Ug = self.c * G4[:, :K, :, K].sum(axis=2).reshape(-1)

    def row_matrix(self) -> Array:
        """U as a dense (R, P) array (rows r = n·K + k) — small models only."""
        return self.rows.dense().reshape(self.rows.R, self.num_params)

    def dense(self) -> Array:
        U = self.row_matrix()
        return self.c * (U.T @ U)

    def matvec(self, v: Array) -> Array:
        """F v = c Uᵀ(U v): one pass down and one up the rows, no P × P matrix."""
        self._check_vector("v", v)
        v = v.astype(self.dtype, copy=False)
        return self.c * self.rows.rmatvec(self.rows.matvec(v))

    def quadratic_form(self, v: Array) -> float:
        """vᵀ F v = c ‖U v‖²."""
        self._check_vector("v", v)
        u = self.rows.matvec(v.astype(self.dtype, copy=False))
        return self.c * float((u * u).sum())

    def trace(self) -> float:
        """tr F = c Σ_r ‖u_r‖² (the trace of the Gram matrix)."""
        xp = namespace(self.outputs)
        G = self._gram
        return self.c * float(xp.trace(G) if G is not None else self.rows.sq_sum().sum())

    def diagonal(self) -> Array:
        """diag F = c Σ_r u_r ⊙ u_r, (P,)."""
        return self.c * self.rows.sq_sum()

    # ---------------------------------------------------------------- solves
    def _uses_gram(self) -> bool:
        """Solve through the R × R Gram matrix (R < P) or the P × P matrix (P ≤ R)?"""
        return self.rows.R < self.num_params

    def _dense64(self) -> Array:
        """F = c UᵀU in float64 for the P ≤ R route (cached; U has R·P ≤ R² entries)."""
        if self._F64 is None:
            xp = namespace(self.outputs)
            U = self.row_matrix().astype(xp.float64, copy=False)
            self._F64 = self.c * (U.T @ U)
        return self._F64

    def solve(self, g: Array, damping: float) -> Array:
        """(F + λI)⁻¹ g, through whichever of the R × R and P × P systems is smaller.

        R < P (the usual case): Woodbury on the Gram matrix, never a P × P solve.  With
        F = c UᵀU and K = U Uᵀ (R × R),

            (c UᵀU + λI)⁻¹ g = (1/λ) (g − Uᵀ (λ/c · I + K)⁻¹ U g)        (λ > 0),

        the push-through identity (Woodbury; see e.g. Ren & Goldfarb 2019, eq. 8).  For
        λ = 0 the result is the minimum-norm solution F⁺ g = (1/c) Uᵀ K⁻¹ K⁻¹ U g, exact
        when g lies in the row space of U; it needs a non-singular K and raises
        :class:`refngd.backend.SingularSystemError` otherwise.

        P ≤ R: F itself (P × P, float64) is factored.  It is the smaller system, and the
        Woodbury route would lose accuracy here: K then has rank ≤ P < R, so
        λ/c·I + K has condition number ~ c‖K‖/λ and the error of the Woodbury result
        grows like ε·‖F‖/λ, while that of the P × P solve is ε·cond(F + λI).  For λ = 0
        this returns F⁻¹ g when F is non-singular and raises ``SingularSystemError``
        otherwise.

        Cost: the Gram matrix (cached), one R × R Cholesky, one U·g and one Uᵀ·w; or, for
        P ≤ R, U (R × P), UᵀU (cached) and one P × P Cholesky.
        """
        lam = check_damping(damping)
        self._check_vector("g", g)
        xp = namespace(g)
        if not self._uses_gram():
            d = PSDFactor(self._dense64(), shift=lam).solve(g.astype(xp.float64))
            return d.astype(self.dtype, copy=False)
        Ug = self.rows.matvec(g.astype(self.dtype, copy=False)).reshape(-1)
        if lam == 0:
            fac = PSDFactor(self.gram())
            w = fac.solve(fac.solve(Ug)) / self.c
            return self.rows.rmatvec(w.reshape(self.rows.N, self.rows.K).astype(self.dtype))
        w = PSDFactor(self.gram(), shift=lam / self.c).solve(Ug)
        Uw = self.rows.rmatvec(w.reshape(self.rows.N, self.rows.K).astype(self.dtype, copy=False))
        return ((g.astype(xp.float64) - Uw) / lam).astype(self.dtype, copy=False)

    def gradient(self) -> Array:
        """The loss gradient g = c Σ_n J_nᵀ e_n of this batch (from the extra rows if present).

        Under a convention, c includes its α: the gradient of the library's objective, the
        same g that :meth:`natural_gradient` preconditions.
        """
        xp = namespace(self.outputs)
        if self._joint is not None:
            ones = xp.ones((self.rows.N, 1), dtype=self.dtype)
            return self.c * self._joint.take(self._K, self._K + 1).rmatvec(ones)
        g = gradient_from(self.lin, self.loss, self.y)
        alpha = self.c / float(self.loss.scale(self.outputs))  # a convention's α, as in c
        return g if alpha == 1.0 else g * alpha

    def natural_gradient(self, damping: float) -> Array:
        """(F + λI)⁻¹ g for this batch's loss gradient g, from one joint backward pass.

        Built with ``with_gradient=True``, the rows of F and one row e_n per sample went
        through the network together: rows Û = [U; G] with g = Gᵀ(c·1).  Their joint Gram
        matrix holds K = U Uᵀ and the cross block U Gᵀ, so U g = c·(U Gᵀ)·1 needs no
        product with g, and the Woodbury result (1/λ)(g − Uᵀw) is a single Ûᵀ·[−w; c·1]/λ.
        One backward pass, one Gram matrix, one R × R Cholesky and one Ûᵀ·v in all.
        Without the joint rows this is ``solve(gradient(), damping)``.
        """
        lam = check_damping(damping)
        if self._joint is None or not self._uses_gram():
            return self.solve(self.gradient(), lam)
        xp = namespace(self.outputs)
        N, K = self.rows.N, self._K
        self.gram()  # also sets self._Ug from the joint Gram matrix
        coef = xp.zeros((N, K + 1), dtype=xp.float64)
        if lam == 0:
            fac = PSDFactor(self._gram)
            coef[:, :K] = (fac.solve(fac.solve(self._Ug)) / self.c).reshape(N, K)
        else:
            w = PSDFactor(self._gram, shift=lam / self.c).solve(self._Ug)
            coef[:, :K] = -w.reshape(N, K) / lam
            coef[:, K] = self.c / lam
        return self._joint.rmatvec(coef.astype(self.dtype, copy=False))

    def solve_row_space(self, w0: Array, damping: float) -> Array:
        """(F + λI)⁻¹ Uᵀ w0 for a right-hand side given by row weights w0 (N, K).

        When the right-hand side is a combination g = Uᵀ w0 of the rows themselves, the
        push-through identity (c UᵀU + λI) Uᵀ = Uᵀ (c K + λI) gives

            (F + λI)⁻¹ Uᵀ w0 = Uᵀ (c K + λI)⁻¹ w0,

        one R × R solve and one Uᵀ·w: no U·g, no second backward pass and no cancellation
        in g − Uᵀw.  The empirical Fisher's gradient is g = Uᵀ(c·1) and the improved
        empirical Fisher's is g = Uᵀ(c‖e_n‖) (refngd.updates.ef / ief).  For λ = 0 the
        result Uᵀ (cK)⁻¹ w0 is the minimum-norm solution F⁺g; a singular K raises
        :class:`refngd.backend.SingularSystemError`.  For P ≤ R this falls back to
        :meth:`solve` on the smaller P × P system.
        """
        lam = check_damping(damping)
        N, K = self.rows.N, self.rows.K
        if getattr(w0, "shape", None) != (N, K):
            raise ValueError(f"w0 must have shape ({N}, {K}), got {getattr(w0, 'shape', w0)}.")
        check_float_array("w0", w0)
        if not self._uses_gram():
            return self.solve(self.rows.rmatvec(w0.astype(self.dtype, copy=False)), lam)
        a = PSDFactor(self.gram(), shift=lam / self.c).solve(w0.reshape(-1)) / self.c
        return self.rows.rmatvec(a.reshape(N, K).astype(self.dtype, copy=False))

    def solve_sweep(self, g: Array, dampings) -> list[Array]:
        """(F + λI)⁻¹ g for many λ > 0 from one ``eigh`` of the Gram matrix.

        With K = V diag(w) Vᵀ: (F + λI)⁻¹ g = (1/λ)(g − Uᵀ V diag(1/(λ/c + w)) Vᵀ U g).
        For P ≤ R one ``eigh`` of F = V diag(w) Vᵀ instead: V diag(1/(w + λ)) Vᵀ g.
        """
        lams = [check_damping(lam, allow_zero=False) for lam in dampings]
        self._check_vector("g", g)
        xp = namespace(g)
        if not self._uses_gram():
            w, V = eigh_psd(self._dense64())
            Vtg = V.T @ g.astype(xp.float64)
            return [(V @ (Vtg / (w + lam))).astype(self.dtype, copy=False) for lam in lams]
        w, V = xp.linalg.eigh(self.gram())
        w = xp.maximum(w, 0.0)
        VtUg = V.T @ self.rows.matvec(g.astype(self.dtype, copy=False)).reshape(-1).astype(xp.float64)
        out = []
        for lam in lams:
            coef = (V @ (VtUg / (lam / self.c + w))).reshape(self.rows.N, self.rows.K)
            Uw = self.rows.rmatvec(coef.astype(self.dtype, copy=False))
            out.append(((g.astype(xp.float64) - Uw) / lam).astype(self.dtype, copy=False))
        return out
