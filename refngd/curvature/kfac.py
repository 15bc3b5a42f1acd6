"""K-FAC: Kronecker-factored approximate curvature (docs/kfac.md, docs/design.md §3).

Martens & Grosse (2015), "Optimizing neural networks with Kronecker-factored approximate
curvature", §3–4: the Fisher block of a layer with inputs ā and back-propagated output
rows b is E[(b bᵀ) ⊗ (ā āᵀ)] ≈ E[b bᵀ] ⊗ E[ā āᵀ].  refngd's factors, for a Linear layer
with inputs ā_n (N × d_A) and R = N·K rows b_nk (the Fisher type's rows, docs/design.md §2):

    A = (1/N) Σ_n ā_n ā_nᵀ                  (input factor, no c)
    G = c Σ_n Σ_k b_nk b_nkᵀ                (output-gradient factor, carries c)
    F_W ≈ G ⊗ A   in row-major vec(W)        (vec(b āᵀ) = b ⊗ ā).

Conv2d (Grosse & Martens 2016; Eschenhagen et al. 2023, "Kronecker-factored approximate
curvature for modern neural network architectures", §3) on im2col patches ā_nt — and a
Linear layer on sequences on its tokens ā_nt (t = 1..T), Eschenhagen et al.'s main case:

    expand: A = 1/(N·T) Σ_{n,t} ā_nt ā_ntᵀ,       G = c Σ_{n,k,t} b_nkt b_nktᵀ
    reduce: A = (1/N) Σ_n ā_n ā_nᵀ, ā_n = (1/T) Σ_t ā_nt,   G = c Σ_{n,k} b_nk b_nkᵀ, b_nk = Σ_t b_nkt

Every factor is ``scale · MᵀM`` for a row matrix M (one GEMM); all factors of one
Fisher type come from one backward pass, and A (which depends only on the forward pass)
is shared between K-FAC objects built on the same ``linearization``.
"""
from __future__ import annotations

from .. import conventions
from ..losses.base import check_loss
from ..memory import plan_square
from ..nn.protocols import linearization_for
from ..nn.subsets import resolve_params
from ..options import (BIAS, CONVENTION, DAMPING_MODE, DAMPING_SPLIT, FISHER_TYPE,
                       KFAC_APPROX_DEFAULT, PI, BiasMode, DampingMode, DampingSplit, FisherType,
                       KfacApprox, Pi)
from ..backend import Array, namespace
from .damping import check_damping_options
from .kfac_factors import (INPUT_FACTORS, LayerFactors, build_blocks, check_mode, check_options,
                           fisher_cotangents, input_rows, output_rows, parametric_rows,
                           shares_weights)
from .kronecker import KroneckerOperator, KronFactor, _factor_inv, _log_sum, eig_solve
from .preset_factors import preset_factors

class KFAC(KroneckerOperator):
    """K-FAC approximation of the Fisher type ``fisher_type``, block-diagonal over layers.

    Parameters
    ----------
    model, theta, loss, X, y : as the exact curvatures (``y`` only for ``"empirical"``)
    fisher_type : ``"type-2"`` (the columns of a factor of H_n: exact GGN/Fisher), ``"mc"`` (K sampled
        output gradients / √K, needs ``rng``), ``"empirical"`` (rows e_n).
    mc_samples, rng : K and the NumPy Generator (or int seed) for ``"mc"``.
    kfac_approx : ``"expand"`` or ``"reduce"`` for layers that share weights (Conv2d, Linear on
        sequences; Eschenhagen et al. 2023, §3); ignored for Linear layers on (N, d).
    bias : ``"separate"`` or ``"joint"`` (see :class:`LayerFactors`).
    linearization : a ``model.linearize(theta, X)`` to reuse (and share A between objects).
    params : the parameter subset S (docs/subsets.md; ``None``: the model's trainable
        parameters).  The blocks of unselected layers are dropped, so this operator is the
        submatrix of the full K-FAC on S, acting on subset-length vectors.  A layer with its
        weight selected and its bias not gets the weight block G ⊗ A (with ``bias="joint"``
        too: the submatrix of the joint block); a bias without its weight is refused.
    convention : ``"refngd"`` (default) or another library's preset, e.g. ``"backpack"``
        (:mod:`refngd.conventions`; ``refngd.conventions.describe(name)`` lists the differences).
    labels : for ``"mc"``, the sampled targets to use instead of drawing them — another
        implementation's own draws, shape (N, K) (or (N, K, C) for MSE / BCE; one draw per
        sample may drop the K axis); then ``rng`` and ``mc_samples`` are not used.

    Notes
    -----
    Apart from ``dense()``, nothing forms a P × P matrix or a Kronecker product: ``@`` is
    vec(G V A) per block, ``solve``/``logdet`` use the factors' cached eigendecompositions.
    The arrays of :meth:`factors` may be shared with other K-FAC objects on the same
    ``linearization`` (A is): treat them as read-only.
    """

    def __init__(self, model, theta: Array, loss, X: Array, y=None,
                 fisher_type: FisherType = FISHER_TYPE, mc_samples: int = 1, rng=None,
                 kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT, bias: BiasMode = BIAS,
                 linearization=None, params=None, convention=CONVENTION, labels=None):
        rng = check_options(fisher_type, kfac_approx, bias, y, mc_samples, rng, labels)
        self.convention = conventions.get(convention)
        self.fisher_type, self.kfac_approx, self.bias = fisher_type, kfac_approx, bias
        self.mc_samples = int(mc_samples)
        check_loss(loss)
        self.lin = linearization_for(model, theta, X, linearization)
        Z = self.lin.outputs
        self.c = float(loss.scale(Z)) * self.convention.alpha(loss, Z, fisher_type == "empirical")
        if fisher_type == "empirical" and self.convention.empirical_kfac_rows == "c*e_n":
            self.c *= self.c  # rows c·e_n: the library's loss constant enters G twice
        self.subset = resolve_params(model, params)
        S = fisher_cotangents(loss, Z, y, fisher_type, mc_samples, rng,
                              self.convention.factor_columns, labels)
        if labels is not None:
            self.mc_samples = int(S.shape[1])
        self.rows = self.lin.backprop(S, params=self.subset)
        self.num_params, self.dtype = self.rows.P, theta.dtype
        cache = INPUT_FACTORS.setdefault(self.lin, {})
        xp = namespace(Z)
        self.blocks, self._pending, self._factor_list = [], [], None
        for idx, e in parametric_rows(model, self.rows):
            joint = bias == "joint" and e.layer.bias
            approx = kfac_approx if shares_weights(e.layer, e.cache) else None
            # (layer index, part): the (sub-)layer whose input forms A, stable whatever
            # else the subset selects — a LoRA adapter, an attention projection alike
            key = (idx, e.part, getattr(e.layer, "group", None), approx, joint)
            if key not in cache:
                cache[key] = KronFactor(*input_rows(e.layer, e.cache, approx, joint))
            A = cache[key]
            G = KronFactor(output_rows(e.layer, e.B, approx), self.c)
            self.blocks += build_blocks(e, A, G, bias, True, xp)
            self._pending.append((idx, e, A, G, bias if e.layer.bias else None, approx))
        # another library's factors (refngd.conventions): new blocks and factors, computed
        # from the ones above; refngd's own convention keeps them
        preset = preset_factors(self.convention, self.blocks, self._layer_factors, self.lin,
                                self.c, loss, y)
        if preset is not None:
            self.blocks, self._factor_list = preset

    def _layer_factors(self) -> list:
        """refngd's own :class:`LayerFactors` of every layer (d × d matrices formed here)."""
        return [LayerFactors(i, e.layer, e.start, e.stop, A.F, G.F, b, ap)
                for i, e, A, G, b, ap in self._pending]

    # The LayerFactors are formed on first use (KroneckerOperator._factors): a solve with
    # thin bases never needs the d × d matrices A and G (KronFactor.F).
    _build_factors = _layer_factors

    # ------------------------------------------------------------------ products
    def matvec(self, v: Array) -> Array:
        """F v blockwise: vec(G V A) for every block matrix V (two GEMMs per block)."""
        return self._map(v, lambda b, V: b.G.F @ V @ b.A.F)

    def dense(self) -> Array:
        xp = self._xp()
        plan_square(self.num_params, xp, f"the dense {type(self).__name__} matrix",
                    max(b.size for b in self.blocks))  # refngd.memory: fail early
        out = xp.zeros((self.num_params, self.num_params), dtype=xp.float64)
        for blk in self.blocks:
            i = blk.index(xp).reshape(-1)
            out[xp.ix_(i, i)] = xp.kron(blk.G.F, blk.A.F)
        return out.astype(self.dtype, copy=False)

    def diagonal(self) -> Array:
        """diag(G ⊗ A) = diag(G) ⊗ diag(A) per block."""
        xp = self._xp()
        out = xp.zeros(self.num_params, dtype=xp.float64)
        for blk in self.blocks:
            blk.scatter(out, xp.outer(xp.diagonal(blk.G.F), xp.diagonal(blk.A.F)))
        return out.astype(self.dtype, copy=False)

    def trace(self) -> float:
        """Σ_blocks tr(G) · tr(A)."""
        xp = self._xp()
        return float(sum(xp.trace(b.G.F) * xp.trace(b.A.F) for b in self.blocks))

    def with_factors(self, factors: list, eigen: list | None = None) -> "KFAC":
        if eigen is not None and any(e[0] is None for pair in eigen for e in pair):
            raise ValueError("K-FAC's solves need eigenvalues: eigen = [((w_A, U_A), (w_G, U_G))].")
        return super().with_factors(factors, eigen)

    with_factors.__doc__ = KroneckerOperator.with_factors.__doc__

    # ------------------------------------------------------------------ damping
    def solve(self, g: Array, damping, damping_mode: DampingMode = DAMPING_MODE, pi: Pi = PI,
              damping_split: DampingSplit = DAMPING_SPLIT) -> Array:
        """Blockwise inverse of the damped K-FAC matrix applied to g, from cached ``eigh``.

        ``"tikhonov"``: (G ⊗ A + λI)⁻¹ — exact damping of every block, eigenvalues
        g_i a_j + λ (:func:`eig_solve`).  ``"factored"`` (Martens & Grosse 2015, §6.3) and
        ``"per-factor"``: ((G + γ_G I) ⊗ (A + γ_A I))⁻¹ = vec((G + γ_G I)⁻¹ V (A + γ_A I)⁻¹)
        with

        * ``"factored"``: γ_A = π√λ, γ_G = √λ/π; ``pi="trace"`` π² = (tr A/d_A)/(tr G/d_G),
          or ``pi=p`` a fixed number; ``damping_split="locations"``: γ_A = π√(λ/T),
          γ_G = √(λT)/π for a layer sharing its weight over T positions (identical for
          ``pi="trace"``);
        * ``"per-factor"``: γ_A = λ_A, γ_G = λ_G for ``damping=(λ_A, λ_G)``, or λ on each
          factor for a single λ.

        :mod:`refngd.curvature.damping` derives each variant and names the code that uses it.
        """
        lam = check_mode(damping, damping_mode)
        pi = check_damping_options(pi, damping_split)
        xp = self._xp()
        self._check_vector("g", g)

        def tik(blk, V):
            eG, eA = blk.eig()
            return eig_solve(V, eG, eA, xp.outer(eG[0], eA[0]), lam)

        def fac(blk, V):
            eG, eA = blk.eig()
            gG, gA = self._factor_shifts(blk, lam, damping_mode, pi, damping_split)
            return _factor_inv(_factor_inv(V, eG, gG, True), eA, gA, False)

        return self._map(g, tik if damping_mode == "tikhonov" else fac)

    def logdet(self, damping, damping_mode: DampingMode = DAMPING_MODE, pi: Pi = PI,
               damping_split: DampingSplit = DAMPING_SPLIT) -> float:
        """log det of the damped matrix: Σ_blocks Σ_ij log(g_i a_j + λ) (Tikhonov), or
        Σ_blocks [d_A Σ_i log(g_i + γ_G) + d_G Σ_j log(a_j + γ_A)] (the factor dampings,
        γ as :meth:`solve`)."""
        lam = check_mode(damping, damping_mode)
        pi = check_damping_options(pi, damping_split)
        xp = self._xp()
        total = 0.0
        for blk in self.blocks:
            (wG, _, _), (wA, _, _) = blk.eig()
            if damping_mode == "tikhonov":
                total += _log_sum(xp, xp.outer(wG, wA), lam, blk.size)
            else:
                gG, gA = self._factor_shifts(blk, lam, damping_mode, pi, damping_split)
                total += (blk.A.dim * _log_sum(xp, wG, gG, blk.G.dim)
                          + blk.G.dim * _log_sum(xp, wA, gA, blk.A.dim))
        return total
