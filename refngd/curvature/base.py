"""The shared curvature-operator interface and the row-Gram curvature c·UᵀU.

Every curvature in refngd is a symmetric P × P operator with the same interface
(``dense()``, ``@``/``matvec``, ``to_linear_operator()``, ``solve(g, damping)``,
``trace()``, ``diagonal()``).  The exact family (Fisher, sampled Fisher, empirical and
improved empirical Fisher) is ``c · UᵀU`` for a row matrix U (docs/design.md §2), which
:class:`RowCurvature` implements once through a :class:`refngd.rows.RowSet`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from ..options import CONVENTION
from ..backend import (Array, PSDFactor, SingularSystemError, check_damping, check_float_array,
                       eigh_psd, lstsq_ridge, namespace, numerical_range, one_host_read, prefetch,
                       require)
from ..derivatives import gradient_from
from ..memory import plan_dense, plan_rows
from ..nn.subsets import resolve_params
from ..losses.base import check_loss
from ..nn.protocols import linearization_for


class CurvatureOperator(ABC):
    """A symmetric positive semi-definite P × P curvature matrix, never formed unless asked.

    The interface every curvature of refngd has: ``matvec`` / ``@``, ``dense()``,
    ``solve(g, damping)``, ``trace()``, ``diagonal()`` (abstract), ``quadratic_form(v)``,
    ``shape`` and ``to_linear_operator()``.  The Kronecker-factored ones add ``factors()``
    and ``logdet(damping)``.
    """

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

    @abstractmethod
    def trace(self) -> float:
        """tr F."""

    @abstractmethod
    def diagonal(self) -> Array:
        """diag F as a (P,) vector in θ's order."""

    def quadratic_form(self, v: Array) -> float:
        """vᵀ F v (in float64); a curvature with a cheaper route overrides it."""
        self._check_vector("v", v)
        xp = namespace(v)
        return float(xp.dot(v.astype(xp.float64), self.matvec(v).astype(xp.float64)))

    def __matmul__(self, v: Array) -> Array:
        if not hasattr(v, "ndim") or not hasattr(v, "dtype"):
            raise TypeError(f"F @ v needs a NumPy or CuPy array v of shape (P,) or (P, k), got "
                            f"{type(v).__name__}; convert with numpy.asarray(v, dtype=float).")
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

    Subclasses define :meth:`cotangents`, the (N, K, C) output-space rows, and
    :meth:`gradient_coefficients`, the batch gradient written in those rows, and set
    ``label_based`` when the rows use the observed labels (EF, iEF; see conventions).
    Construction runs one forward pass (or reuses ``linearization``) and one backward pass
    of the rows.

    Parameters
    ----------
    model : refngd.nn.Sequential or refngd.FunctionModel
    theta : (P,) parameters
    loss : a refngd loss; its reduction fixes c (docs/design.md §2)
    X, y : the batch (``y`` is needed for gradients and natural gradients)
    linearization : optional result of ``model.linearize(theta, X)`` to reuse a forward pass
    params : the parameter subset S (docs/subsets.md; ``None``: the model's trainable
        parameters, all of θ unless a layer freezes some).  The operator is then the
        submatrix F[S, S] (P = |S|), every vector it takes or returns has length |S|, and
        no row work is spent on the other parameters.  ``self.subset`` holds the
        :class:`refngd.subsets.ParamSubset` (``None`` for all of θ).
    convention : ``"refngd"`` (default) or a library preset (:mod:`refngd.conventions`); it
        may rescale c by the library's α (its objective is α × the PyTorch loss)
    """

    label_based = False

    @one_host_read
    def __init__(self, model, theta: Array, loss, X: Array, y: Array, linearization=None,
                 params=None, convention=CONVENTION):
        from .. import conventions

        check_loss(loss)
        self.model, self.theta, self.loss, self.y = model, theta, loss, y
        self.lin = linearization_for(model, theta, X, linearization)
        self.outputs = self.lin.outputs
        self.convention = conventions.get(convention)
        self.c = float(loss.scale(self.outputs)) * self.convention.alpha(loss, self.outputs,
                                                                          self.label_based)
        self.subset = resolve_params(model, params)
        self.num_params = int(theta.shape[0]) if self.subset is None else self.subset.num_params
        self.dtype = theta.dtype
        cot = self.cotangents()
        plan_rows(self, X, cot.shape[1])  # refngd.memory: fail early, not in swap
        self.rows = self.lin.backprop(cot, params=self.subset)
        self._gram = self._gram_eig = None
        self._F64 = None

    @abstractmethod
    def cotangents(self) -> Array:
        """The output-space rows s_nk, shape (N, K, C)."""

    @abstractmethod
    def gradient_coefficients(self) -> tuple[Array, Array]:
        """The batch gradient in the rows: e_n = Σ_k a_nk s_nk + r_n, so g = c(Uᵀa + Σ_n J_nᵀ r_n).

        Returns ``a`` (N, K) and ``r`` (N, C); ``r`` is exactly zero when every e_n lies in
        the span of its sample's rows (then g = Uᵀ(c·a) lies in the rows' span).
        """

    # ---------------------------------------------------------------- basic operations
    def gram(self) -> Array:
        """The R × R Gram matrix U Uᵀ of the rows (float64; *without* the constant c)."""
        if self._gram is None:
            self._gram = self.rows.gram()
        return self._gram

    def _gram_eigh(self):
        """``eigh_psd`` of the Gram matrix, computed once (both sweeps use it)."""
        if self._gram_eig is None:
            self._gram_eig = eigh_psd(self.gram())
        return self._gram_eig

    def row_matrix(self) -> Array:
        """U as a dense (R, P) array (rows r = n·K + k) — small models only."""
        plan_dense(self, "rows")
        return self.rows.dense().reshape(self.rows.R, self.num_params)

    def dense(self) -> Array:
        plan_dense(self, "dense")
        U = self.row_matrix()
        return self.c * (U.T @ U)

    @one_host_read
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
            plan_dense(self, "factor")
            xp = namespace(self.outputs)
            U = self.row_matrix().astype(xp.float64, copy=False)
            self._F64 = self.c * (U.T @ U)
        return self._F64

    @one_host_read
    def solve(self, g: Array, damping: float) -> Array:
        """(F + λI)⁻¹ g for an arbitrary vector g, through the smaller of the R × R and P × P systems.

        R < P (the usual case): Woodbury on the Gram matrix, never a P × P solve.  With
        F = c UᵀU and K = U Uᵀ (R × R),

            (c UᵀU + λI)⁻¹ g = (1/λ) (g − Uᵀ (λ/c · I + K)⁻¹ U g)        (λ > 0),

        (the Woodbury identity; e.g. Ren & Goldfarb 2019, eq. 8).  For λ = 0 the result is
        the minimum-norm solution F⁺ g = (1/c) Uᵀ K⁻² U g; a singular K raises
        :class:`refngd.backend.SingularSystemError`.

        Accuracy: the subtraction g − Uᵀw cancels when λ is small against ‖F‖: the relative
        error is about ε·(‖F‖ + λ)/λ (measured 6e-5 at λ = 1e-12 on a small MLP).  The λ = 0
        route squares the condition number of K.  When g is a combination of the rows —
        the loss gradient for the Fisher, EF and iEF — use :meth:`natural_gradient` or
        :meth:`solve_row_space`, which are accurate to ε·cond(K) at every λ ≥ 0.

        P ≤ R: F itself (P × P, float64) is factored (Cholesky, eigh fallback), relative
        error ≈ ε·cond(F + λI); for λ = 0 a singular F raises ``SingularSystemError``.
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
        w = PSDFactor(self.gram(), shift=lam / self.c, projected=True).solve(Ug)
        Uw = self.rows.rmatvec(w.reshape(self.rows.N, self.rows.K).astype(self.dtype, copy=False))
        return ((g.astype(xp.float64) - Uw) / lam).astype(self.dtype, copy=False)

    @one_host_read
    def gradient(self) -> Array:
        """The loss gradient g = c Σ_n J_nᵀ e_n of this batch (needs ``y``).

        Under a convention, c includes its α: the gradient of the library's objective, the
        same g that :meth:`natural_gradient` preconditions.
        """
        g = gradient_from(self.lin, self.loss, self.y, params=self.subset)
        alpha = self.c / float(self.loss.scale(self.outputs))  # a convention's α, as in c
        return g if alpha == 1.0 else g * alpha

    @one_host_read
    def natural_gradient(self, damping: float) -> Array:
        """(F + λI)⁻¹ g for this batch's loss gradient g, accurate at every λ ≥ 0.

        The gradient is a combination of the curvature's own rows,
        g = c Σ_n J_nᵀ e_n = Uᵀ(c·a) (+ residual rows, :meth:`gradient_coefficients`), so the
        push-through identity (c UᵀU + λI) Uᵀ = Uᵀ (c K + λI) gives

            (F + λI)⁻¹ g = Uᵀ (K + (λ/c) I)⁻¹ a,

        one R × R factorisation and one Uᵀ·w, with no cancellation: the accuracy is that of
        K for every λ, and λ = 0 gives F⁺g from a single factorisation of K (a singular K
        raises :class:`refngd.backend.SingularSystemError`).  The part of e_n outside its
        rows' span (a curvature that underflowed to 0 in floating point) is rare and goes
        through :meth:`solve`.  docs/fisher.md, "Natural gradient in row space", derives it.
        """
        lam = check_damping(damping)
        xp = namespace(self.outputs)
        a, r = self.gradient_coefficients()
        has_residual = prefetch(xp.any(r != 0), r)  # read with the factorisation's stats
        d = self.solve_row_space(self.c * a, lam)
        h = self._residual_gradient(r, has_residual)
        d = d if h is None else d + self.solve(h, lam)
        # numerically singular relative to this gradient: the same error as a singular K
        require(xp.all(xp.isfinite(d)), lambda: SingularSystemError(
            f"the natural gradient at damping {lam:g} overflows {d.dtype} (the curvature "
            "is too small for the gradient, e.g. a saturated softmax); pass a larger "
            "damping."), d)
        return d

    def _residual_gradient(self, r: Array, has_residual=None):
        """c Σ_n J_nᵀ r_n, the gradient's part outside the rows' span (None when r = 0).

        One more backward pass, of one row per sample — only when a residual exists.
        ``has_residual``: a :func:`refngd.backend.prefetch` of ``any(r != 0)``.
        """
        xp = namespace(r)
        if has_residual is None:
            has_residual = prefetch(xp.any(r != 0), r)
        if not has_residual.value:
            return None
        rows_r = self.lin.backprop(r[:, None, :].astype(self.dtype, copy=False), params=self.subset)
        return self.c * rows_r.rmatvec(xp.ones((self.rows.N, 1), dtype=self.dtype))

    @one_host_read
    def solve_row_space(self, w0: Array, damping: float) -> Array:
        """(F + λI)⁻¹ Uᵀ w0 for a right-hand side given by row weights w0 (N, K).

        When the right-hand side is a combination g = Uᵀ w0 of the rows themselves, the
        push-through identity (c UᵀU + λI) Uᵀ = Uᵀ (c K + λI) gives

            (F + λI)⁻¹ Uᵀ w0 = Uᵀ (c K + λI)⁻¹ w0,

        one R × R solve and one Uᵀ·w: no U·g and no cancellation in g − Uᵀw, so the result
        is accurate to about ε·cond(K + λ/c·I) for every λ ≥ 0.  For λ = 0 it is the
        minimum-norm solution F⁺g; a singular K raises
        :class:`refngd.backend.SingularSystemError`.

        P ≤ R: K has rank ≤ P < R, so the R × R route cannot work near λ = 0; the same
        quantity is then the regularised least-squares solution
        argmin_d ‖U d − w0/c‖² + (λ/c)‖d‖², computed by a QR factorisation of
        [U; √(λ/c) I] ((R + P) × P), never the normal equations.  Because w0 is in general
        not in the range of U here (a least-squares residual), the relative error is
        about ε·cond(F + λI), not ε·cond(K): the float64 rows resolve F's small eigenvalues
        only to ε‖F‖.  Measured on a 9-parameter softmax model whose F is singular (shift
        invariance): 2e-15 at λ = 1e-2, 3e-11 at 1e-7, 9e-6 at 1e-12, 3 to 10 times better
        than a Cholesky solve of F + λI.  For λ = 0 a rank-deficient U raises
        :class:`refngd.backend.SingularSystemError`.
        """
        lam = check_damping(damping)
        N, K = self.rows.N, self.rows.K
        if getattr(w0, "shape", None) != (N, K):
            raise ValueError(f"w0 must have shape ({N}, {K}), got {getattr(w0, 'shape', w0)}.")
        check_float_array("w0", w0)
        xp = namespace(w0)
        if not self._uses_gram():
            plan_dense(self, "lstsq")
            U = self.row_matrix().astype(xp.float64, copy=False)
            return lstsq_ridge(U, w0.reshape(-1).astype(xp.float64) / self.c,
                               lam / self.c).astype(self.dtype, copy=False)
        fac = PSDFactor(self.gram(), shift=lam / self.c, projected=True)
        # σ·a, not a: a overflows for an undamped, saturated model whose Uᵀa does not
        a, scale = fac.solve_scaled(w0.reshape(-1).astype(xp.float64) / self.c)
        d = self.rows.rmatvec(a.reshape(N, K).astype(self.dtype, copy=False))
        if scale == 1.0:
            return d
        return (d.astype(xp.float64) / scale).astype(self.dtype, copy=False)  # 2^k: exact

    @one_host_read
    def natural_gradient_sweep(self, dampings) -> list[Array]:
        """:meth:`natural_gradient` for many λ > 0 from one ``eigh`` of the Gram matrix.

        With K = V diag(w) Vᵀ: d(λ) = Uᵀ V diag(1/(w + λ/c)) Vᵀ a — the row-space route,
        accurate at every λ: K's numerically null directions, which Uᵀ annihilates in exact
        arithmetic, are dropped (:func:`refngd.backend.eigh_range`) rather than divided by
        λ/c.  A residual (:meth:`gradient_coefficients`) is back-propagated once and swept
        with :meth:`solve_sweep`.  P ≤ R: one :meth:`natural_gradient` per λ.
        """
        lams = [check_damping(lam, allow_zero=False) for lam in dampings]
        if not self._uses_gram():
            return [self.natural_gradient(lam) for lam in lams]
        xp = namespace(self.outputs)
        a, r = self.gradient_coefficients()
        w, V = numerical_range(*self._gram_eigh())  # K's numerical null space: Uᵀ annihilates it
        Vta = V.T @ a.reshape(-1).astype(xp.float64)
        N, K = self.rows.N, self.rows.K
        out = [self.rows.rmatvec((V @ (Vta / (w + lam / self.c))).reshape(N, K).astype(self.dtype))
               for lam in lams]
        h = self._residual_gradient(r)
        if h is not None:
            out = [d + dh for d, dh in zip(out, self.solve_sweep(h, lams))]
        return out

    @one_host_read
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
        w, V = self._gram_eigh()
        VtUg = V.T @ self.rows.matvec(g.astype(self.dtype, copy=False)).reshape(-1).astype(xp.float64)
        out = []
        for lam in lams:
            coef = (V @ (VtUg / (lam / self.c + w))).reshape(self.rows.N, self.rows.K)
            Uw = self.rows.rmatvec(coef.astype(self.dtype, copy=False))
            out.append(((g.astype(xp.float64) - Uw) / lam).astype(self.dtype, copy=False))
        return out
