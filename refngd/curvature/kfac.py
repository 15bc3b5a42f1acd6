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

import math
import weakref
from dataclasses import dataclass

from .. import conventions
from ..backend import Array, as_generator, check_damping, namespace
from ..memory import plan_square
from ..nn.conv import Conv2d
from ..nn.base import BiasRows
from ..validation import check_loss, linearization_for
from ..nn.linear import Linear
from ..subsets import resolve_params
from .convention_rules import apply_convention
from .kronecker import Block, KroneckerOperator, KronFactor, _factor_inv, _log_sum, eig_solve

FISHER_TYPES = ("type-2", "mc", "empirical")
KFAC_APPROX = ("expand", "reduce")
BIAS_MODES = ("separate", "joint")
DAMPING_MODES = ("tikhonov", "factored")

#: input factors per forward pass: {linearization: {(layer index, part, approx, joint): KronFactor}}
#: (``part``: LayerRows.part, the (sub-)layer within model.layers[index] whose input forms A)
_INPUT_FACTORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- factor rows
def shares_weights(layer, cache) -> bool:
    """True for layers whose weight is shared over T positions: Conv2d, and Linear applied
    to sequences (N, *S, d), T = ∏S.  These get ``kfac_approx`` expand / reduce."""
    return isinstance(layer, Conv2d) or (isinstance(layer, Linear) and cache.ndim > 2)


def _tokens(layer, cache):
    """Inputs of a weight-sharing layer as (N, T, D): im2col patches or sequence tokens."""
    if isinstance(layer, Conv2d):
        return cache[0].transpose(0, 2, 1)  # (N, D, T) im2col columns
    return cache.reshape(cache.shape[0], -1, layer.in_features)


def _refuse_unshared(layer, approx):
    if approx is None:
        raise TypeError(f"{layer!r} is applied to sequences (weight sharing): its K-FAC needs "
                        "kfac_approx='expand' or 'reduce' (EKFAC does not support it yet).")


def input_rows(layer, cache, approx: str, joint: bool):
    """Rows M and scale of the input factor A = scale · MᵀM, in float64."""
    if not shares_weights(layer, cache):
        a, scale = cache, 1.0 / cache.shape[0]
    else:
        _refuse_unshared(layer, approx)
        A3 = _tokens(layer, cache)
        N, T, D = A3.shape
        if approx == "expand":
            a, scale = A3.reshape(N * T, D), 1.0 / (N * T)
        else:
            a, scale = A3.mean(axis=1), 1.0 / N
    xp = namespace(a)
    a = a.astype(xp.float64, copy=False)
    if joint:
        a = xp.concatenate([a, xp.ones((a.shape[0], 1), dtype=xp.float64)], axis=1)
    return xp.ascontiguousarray(a), scale


def output_rows(layer, B: Array, approx: str) -> Array:
    """Rows of the output factor G = c · MᵀM: b_nk (Linear), b_nkt (expand), Σ_t b_nkt (reduce)."""
    xp = namespace(B)
    N, K = B.shape[:2]
    if isinstance(layer, Linear) and B.ndim == 3:
        M = B.reshape(N * K, -1)
    elif isinstance(layer, Linear):  # sequences: rows (N, K, *S, d_out)
        _refuse_unshared(layer, approx)
        Bm = B.reshape(N * K, -1, layer.out_features)
        M = Bm.reshape(-1, layer.out_features) if approx == "expand" else Bm.sum(axis=1)
    else:
        Bm = B.reshape(N * K, layer.out_channels, -1)
        M = Bm.transpose(0, 2, 1).reshape(-1, layer.out_channels) if approx == "expand" else Bm.sum(axis=2)
    return xp.ascontiguousarray(M.astype(xp.float64, copy=False))


def fisher_cotangents(loss, Z: Array, y, fisher_type: str, mc_samples: int, rng) -> Array:
    """The output-space rows of each Fisher type (as :mod:`refngd.curvature.exact`)."""
    if fisher_type == "type-2":  # the columns of F_n F_nᵀ = H_n (C − 1 of them for CE);
        # with labels the CE factor is aligned with the gradient (updates.kfac writes g in it)
        F = loss.hessian_factor(Z) if y is None else loss.hessian_factor(Z, y)
        return F.transpose(0, 2, 1)
    if fisher_type == "mc":
        return loss.sampled_output_gradients(Z, rng, mc_samples) / mc_samples ** 0.5
    return loss.output_gradient(Z, y)[:, None, :]


def check_options(fisher_type, kfac_approx, bias, y, mc_samples, rng):
    for name, val, opts in (("fisher_type", fisher_type, FISHER_TYPES),
                            ("kfac_approx", kfac_approx, KFAC_APPROX), ("bias", bias, BIAS_MODES)):
        if val not in opts:
            raise ValueError(f"{name} must be one of {opts}, got {val!r}.")
    if fisher_type == "empirical" and y is None:
        raise ValueError("fisher_type='empirical' needs the labels y.")
    if fisher_type == "mc":
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")
        return as_generator(rng)
    return None


def parametric_rows(model, rows):
    """(index in model.layers, LayerRows) of every parametric layer; refuses other models.

    A Linear inside a composite layer (an attention's in- and out-projection) gets the
    index of the composite that holds it; its factors are its own.
    """
    if not getattr(rows, "layers", None):
        raise TypeError("K-FAC needs a refngd.nn.Sequential of Linear / Conv2d layers "
                        f"(got {type(model).__name__}); use the exact curvatures for FunctionModel.")
    out = []
    for e in rows.layers:
        if isinstance(e.layer, BiasRows):
            raise ValueError(
                f"K-FAC needs a layer's weight: the subset selects the bias of "
                f"{e.layer.parent!r} without its weight (layer {e.index}); select the whole "
                "layer, or use the exact curvatures, which support bias-only subsets.")
        if not isinstance(e.layer, (Linear, Conv2d)):
            raise TypeError(f"K-FAC supports Linear and Conv2d layers (also the projections "
                            f"inside MultiheadAttention), not {e.layer!r}.")
        out.append((e.index, e))
    return out


def _check_mode(damping, damping_mode: str) -> float:
    if damping_mode not in DAMPING_MODES:
        raise ValueError(f"damping_mode must be one of {DAMPING_MODES}, got {damping_mode!r}.")
    return check_damping(damping)


# --------------------------------------------------------------------------- blocks
@dataclass
class LayerFactors:
    """K-FAC factors of one layer: its Fisher block ≈ G ⊗ A in row-major vec(W).

    Attributes
    ----------
    index : the layer's position in ``model.layers`` (for a projection inside attention, the
        attention's);  layer : the layer itself
    start, stop : its slice of θ
    A : input factor (d_A, d_A), no c.  Linear: (1/N) Σ ā ā ᵀ; Conv2d: see ``approx``.
        d_A = D (in_features, or C_in·kh·kw) — or D + 1 with ``bias="joint"`` (ā = [a; 1]).
    G : output-gradient factor (d_out, d_out), c Σ b bᵀ over the Fisher type's rows.
    bias : ``"separate"`` (weight block G ⊗ A, bias block G, cross terms dropped),
           ``"joint"`` (one block G ⊗ A over [W | b]), or ``None`` (no bias).
    approx : ``"expand"`` / ``"reduce"`` for Conv2d and Linear on sequences, ``None`` for
        Linear on (N, d).
    """

    index: int
    layer: object
    start: int
    stop: int
    A: Array
    G: Array
    bias: str | None
    approx: str | None


def build_blocks(e, A: KronFactor, G: KronFactor, bias: str, thin: bool, xp):
    """The blocks of one layer: [w] (no bias), [w, b] (separate) or [wb] (joint)."""
    layer = e.layer
    D = layer.in_features if isinstance(layer, Linear) else layer.D
    d_out = G.dim
    if not layer.bias:
        return [Block("w", G, A, e.start, d_out, D, thin, e)]
    if bias == "joint":
        return [Block("wb", G, A, e.start, d_out, D, thin, e)]
    one = KronFactor(xp.ones((1, 1), dtype=xp.float64), 1.0)
    return [Block("w", G, A, e.start, d_out, D, thin, e), Block("b", G, one, e.start, d_out, D, thin, e)]


def pi_correction(A: Array, G: Array) -> float:
    """Martens & Grosse (2015, §6.3) π = √((tr A / dim A) / (tr G / dim G)); 1 if a trace is 0.

    Factored damping (A + π√λ I) ⊗ (G + √λ/π I) splits λ between the factors in
    proportion to their average eigenvalues.
    """
    xp = namespace(A)
    ta, tg = float(xp.trace(A)) / A.shape[0], float(xp.trace(G)) / G.shape[0]
    return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0


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

    Notes
    -----
    Apart from ``dense()``, nothing forms a P × P matrix or a Kronecker product: ``@`` is
    vec(G V A) per block, ``solve``/``logdet`` use the factors' cached eigendecompositions.
    The arrays of :meth:`factors` may be shared with other K-FAC objects on the same
    ``linearization`` (A is): treat them as read-only.
    """

    def __init__(self, model, theta: Array, loss, X: Array, y=None, fisher_type: str = "type-2",
                 mc_samples: int = 1, rng=None, kfac_approx: str = "expand", bias: str = "separate",
                 linearization=None, params=None, convention="refngd"):
        rng = check_options(fisher_type, kfac_approx, bias, y, mc_samples, rng)
        self.convention = conventions.get(convention)
        self.fisher_type, self.kfac_approx, self.bias = fisher_type, kfac_approx, bias
        self.mc_samples = int(mc_samples)
        check_loss(loss)
        self.lin = linearization_for(model, theta, X, linearization)
        Z = self.lin.outputs
        self.c = float(loss.scale(Z)) * self.convention.alpha(loss, Z, fisher_type == "empirical")
        self.subset = resolve_params(model, params)
        self.rows = self.lin.backprop(fisher_cotangents(loss, Z, y, fisher_type, mc_samples, rng),
                                      params=self.subset)
        self.num_params, self.dtype = self.rows.P, theta.dtype
        cache = _INPUT_FACTORS.setdefault(self.lin, {})
        xp = namespace(Z)
        self.blocks, self._pending, self._factor_list = [], [], None
        for idx, e in parametric_rows(model, self.rows):
            joint = bias == "joint" and e.layer.bias
            approx = kfac_approx if shares_weights(e.layer, e.cache) else None
            # (layer index, part): the (sub-)layer whose input forms A, stable whatever
            # else the subset selects — a LoRA adapter, an attention projection alike
            key = (idx, e.part, approx, joint)
            if key not in cache:
                cache[key] = KronFactor(*input_rows(e.layer, e.cache, approx, joint))
            A = cache[key]
            G = KronFactor(output_rows(e.layer, e.B, approx), self.c)
            self.blocks += build_blocks(e, A, G, bias, True, xp)
            self._pending.append((idx, e, A, G, bias if e.layer.bias else None, approx))
        apply_convention(self, self.convention, model, loss, y)

    @property
    def _factors(self) -> list:
        """The :class:`LayerFactors`, formed on first use: a solve with thin bases never
        needs the d × d matrices A and G (:attr:`KronFactor.F`)."""
        if self._factor_list is None:
            self._factor_list = [LayerFactors(i, e.layer, e.start, e.stop, A.F, G.F, b, ap)
                                 for i, e, A, G, b, ap in self._pending]
        return self._factor_list

    @_factors.setter
    def _factors(self, value: list) -> None:
        self._factor_list = value

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
    def _pi(self, blk: Block) -> float:
        return pi_correction(blk.A.F, blk.G.F)

    def _factored_damping(self, blk: Block, damping: float):
        """(γ_G, γ_A) = (√λ/π, π√λ): the block becomes (G + γ_G I) ⊗ (A + γ_A I).

        Under a convention with ``bias_damping="weight"`` (curvlinops) a separate bias block
        is (G + √λ/π_W I) ⊗ [1], π_W the π of its layer's weight block.
        """
        if blk.kind == "b" and getattr(self, "convention", None) is not None \
                and self.convention.bias_damping == "weight":
            w = next(b for b in self.blocks if b.kind == "w" and b.start == blk.start)
            return math.sqrt(damping) / self._pi(w), 0.0
        p, s = self._pi(blk), math.sqrt(damping)
        return s / p, s * p

    def solve(self, g: Array, damping: float, damping_mode: str = "tikhonov") -> Array:
        """Blockwise inverse of the damped K-FAC matrix applied to g, from cached ``eigh``.

        ``"tikhonov"``: (G ⊗ A + λI)⁻¹ — exact damping of every block, eigenvalues
        g_i a_j + λ (:func:`eig_solve`).  ``"factored"``: Martens & Grosse (2015, §6.3),
        ((G + (√λ/π) I) ⊗ (A + π√λ I))⁻¹ = vec((G + γ_G I)⁻¹ V (A + γ_A I)⁻¹).
        """
        lam = _check_mode(damping, damping_mode)
        xp = self._xp()
        self._check_vector("g", g)

        def tik(blk, V):
            eG, eA = blk.eig()
            return eig_solve(V, eG, eA, xp.outer(eG[0], eA[0]), lam)

        def fac(blk, V):
            (eG, eA), (gG, gA) = blk.eig(), self._factored_damping(blk, lam)
            return _factor_inv(_factor_inv(V, eG, gG, True), eA, gA, False)

        return self._map(g, tik if damping_mode == "tikhonov" else fac)

    def logdet(self, damping: float, damping_mode: str = "tikhonov") -> float:
        """log det of the damped matrix: Σ_blocks Σ_ij log(g_i a_j + λ) (Tikhonov), or
        Σ_blocks [d_A Σ_i log(g_i + γ_G) + d_G Σ_j log(a_j + γ_A)] (factored)."""
        lam = _check_mode(damping, damping_mode)
        xp = self._xp()
        total = 0.0
        for blk in self.blocks:
            (wG, _, _), (wA, _, _) = blk.eig()
            if damping_mode == "tikhonov":
                total += _log_sum(xp, xp.outer(wG, wA), lam, blk.size)
            else:
                gG, gA = self._factored_damping(blk, lam)
                total += (blk.A.dim * _log_sum(xp, wG, gG, blk.G.dim)
                          + blk.G.dim * _log_sum(xp, wA, gA, blk.A.dim))
        return total
