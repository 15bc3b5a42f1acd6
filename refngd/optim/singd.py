"""Inverse-free K-FAC: INGD and IKFAC (Lin et al. 2024b, dense Kronecker factors).

W. Lin, F. Dangel, R. Eschenhagen, K. Neklyudov, A. Kristiadi, R. E. Turner, A. Makhzani
(2024), "Structured inverse-free natural gradient descent: memory-efficient &
numerically-stable KFAC", ICML 2024, arXiv:2312.05705.  Reference package: ``singd``
(``f-dangel/singd``, ``singd/optim/optimizer.py``; its ``kfac_like=True`` with α₁ = 0 — no
Riemannian momentum — is IKFAC; refngd's ``INGD(kfac_like=True)`` refuses α₁ ≠ 0).

Instead of inverting K-FAC's factors, each layer keeps K (d_A × d_A) and C (d_G × d_G)
with K Kᵀ ≈ A⁻¹ and C Cᵀ ≈ G⁻¹, and moves them by a Riemannian gradient step in local
normal coordinates: K is written K_t exp(M) around the current K_t, so M plays the role of
a matrix logarithm and the Riemannian gradient step is a plain gradient step on M at
M = 0 (what ``singd`` calls RGD reducing to GD); the matrix exponential is then truncated
to first order, K ← K(I − β₁ m_K).  No logarithm, root, inverse or decomposition is ever
computed — only matrix products, which is the point (low precision).
With the batch's K-FAC factors U = A (inputs, ``bias="joint"``: ā = [a; 1]) and G
(output gradients, carrying c) from :class:`refngd.curvature.KFAC`, every T steps:

    H_K = Kᵀ U K,   H_C = Cᵀ G C                                   (old K, C)

INGD (Fig. 4, left; ``kfac_like=False``), with d_K = dim K, d_C = dim C:

    m_K ← α₁ m_K + ½ [ (tr H_C / d_C) H_K + λ (tr CᵀC / d_C) KᵀK − I ]
    m_C ← α₁ m_C + ½ [ (tr H_K / d_K) H_C + λ (tr KᵀK / d_K) CᵀC − I ]

(the paper writes β₁/(2 d_o) [tr(H_C) H_K + c² KᵀK − d_o I] with c² = λ tr(CᵀC): the
same); IKFAC (``kfac_like=True``: no traces, no Riemannian momentum, α₁ = 0):

    m_K = ½ (H_K + λ KᵀK − I),   m_C = ½ (H_C + λ CᵀC − I)

then, both,

    K ← K (I − β₁ m_K),   C ← C (I − β₁ m_C)
    d = vec(C Cᵀ [∇W | ∇b] K Kᵀ)                 (the preconditioned gradient, per layer)
    b ← α₂ b + (d + γ θ),   θ ← θ − β₂ b         (momentum α₂ on the weight-decayed d)

(β₁ scales the step on K, as in the package; scaling m instead gives the same iterates
for a constant β₁), with K = C = I, m = 0 at the start and the factors updated *before*
the direction at steps 1, T + 1, 2T + 1, … (the package's ``steps % T == 0``).  refngd's
names: ``lr`` = β₂, ``momentum`` = α₂, ``lr_cov`` = β₁, ``alpha1`` = α₁,
``weight_decay`` = γ, ``update_every`` = T.

Why IKFAC is K-FAC (the paper's correspondence, derived and tested here): if
K Kᵀ = (S + λI)⁻¹, one IKFAC step gives K' K'ᵀ = ((1 − β₁) S + β₁ U + λI)⁻¹ + O(β₁²) —
K-FAC's running average with weight β₁, inverted, without inverting anything
(tests/test_optim_singd.py checks the β₁² scaling of the difference).  On a fixed batch
IKFAC stops moving exactly when K Kᵀ = (U + λI)⁻¹ and C Cᵀ = (G + λI)⁻¹, where its
direction is K-FAC's ((G + λI) ⊗ (U + λI))⁻¹ g (tested).

Invariance (tested, with a non-symmetric D): with λ = 0, mapping a layer's inputs
ā → D ā (D invertible; an affine map x → Mx + v of the inputs is D = [[M, v], [0, 1]])
and its weights W̄ → W̄ D⁻¹, K → D⁻ᵀ K leaves H_K = KᵀUK (U → D U Dᵀ), the traces
tr H_K and every update of the network function unchanged: the new direction is
C Cᵀ (∇W̄ Dᵀ) D⁻ᵀ K Kᵀ D⁻¹, the old one times D⁻¹.  For a diagonal (symmetric) D this is
K → D⁻¹ K; for a general D, K → D⁻¹ K is not an invariance.
(With K₀ = I the rescaled run starts from another K, and λ tr KᵀK is not invariant:
the invariance is of the update rule, not of the defaults.)

Curvature approximated: the Kronecker-factored Fisher of the chosen ``fisher_type``
(default ``"empirical"``, the observed-label gradients, as the reference package).
Not implemented: SINGD's structured (diagonal, block-diagonal, Toeplitz, hierarchical)
factors — refngd's K and C are dense — and mixed-precision handling.
"""
from __future__ import annotations

from ..options import FISHER_TYPES, KFAC_APPROX, KFAC_APPROX_DEFAULT, FisherType, KfacApprox
from ..backend import namespace
from ..curvature import KFAC as KFACCurvature
from .base import (
    Optimizer,
    check_choice,
    check_int,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    evaluate_batch,
    momentum_step,
    norm,
)


def average_trace(M) -> float:
    """tr(M) / dim M (the reference's ``average_trace``)."""
    return float(namespace(M).trace(M)) / M.shape[0]


def ingd_momentum(K, C, U, G, m_K, m_C, damping: float, alpha1: float, kfac_like: bool):
    """The new (m_K, m_C) of INGD (Fig. 4) or IKFAC (``kfac_like``); module docstring."""
    xp = namespace(K)
    H_K, H_C = K.T @ U @ K, C.T @ G @ C
    KtK, CtC = K.T @ K, C.T @ C
    I_K, I_C = xp.eye(K.shape[0], dtype=K.dtype), xp.eye(C.shape[0], dtype=C.dtype)
    if kfac_like:
        new_K = 0.5 * (H_K + damping * KtK - I_K)
        new_C = 0.5 * (H_C + damping * CtC - I_C)
    else:
        new_K = 0.5 * (average_trace(H_C) * H_K + damping * average_trace(CtC) * KtK - I_K)
        new_C = 0.5 * (average_trace(H_K) * H_C + damping * average_trace(KtK) * CtC - I_C)
    if alpha1 and m_K is not None:
        new_K, new_C = alpha1 * m_K + new_K, alpha1 * m_C + new_C
    return new_K, new_C


def riemannian_step(K, m_K, lr_cov: float):
    """K ← K (I − β₁ m_K): a first-order (truncated-exponential) step in normal coordinates."""
    return K - lr_cov * (K @ m_K)


class INGD(Optimizer):
    """Inverse-free natural gradient descent (Lin et al. 2024b, Fig. 4 left, dense factors).

    Parameters
    ----------
    lr : β₂, the step size (reference default 10⁻³).   momentum : α₂ (0.9).
    damping : λ (10⁻³).   alpha1 : α₁, Riemannian momentum of m_K, m_C (0.5).
    lr_cov : β₁, step size of the factor updates (10⁻²).   weight_decay : γ.
    update_every : T, factors updated every T steps (reference default 10).
    kfac_like : IKFAC's update (no traces; α₁ must be 0) — see :class:`IKFAC`.
    fisher_type : rows of the K-FAC factors: ``"empirical"`` (default, as ``singd``),
        ``"type-2"`` or ``"mc"`` (needs ``rng``).   kfac_approx : Conv2d ``"expand"``/``"reduce"``.

    Notes
    -----
    Needs a :class:`refngd.nn.Sequential` of Linear / Conv2d layers.  The state holds per
    parametric layer ``K``, ``C``, ``m_K``, ``m_C`` (lists, in layer order).
    """

    name = "ingd"
    _hyper = ("lr", "momentum", "damping", "alpha1", "lr_cov", "weight_decay", "update_every",
              "kfac_like", "fisher_type", "kfac_approx")

    def __init__(self, lr: float = 1e-3, momentum: float = 0.9, damping: float = 1e-3,
                 alpha1: float = 0.5, lr_cov: float = 1e-2, weight_decay: float = 0.0,
                 update_every: int = 10, kfac_like: bool = False,
                 fisher_type: FisherType = "empirical",
                 kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT):
        # fisher_type "empirical" (not refngd.options' "type-2"): the reference package
        # `singd` updates K and C from the observed labels' gradients (module docstring)
        self.lr = check_lr(lr)
        self.momentum = check_unit_interval(momentum, "momentum")
        self.damping = check_nonnegative(damping, "damping")
        self.alpha1 = check_unit_interval(alpha1, "alpha1")
        self.lr_cov = check_positive(lr_cov, "lr_cov")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.update_every = check_int(update_every, "update_every")
        self.kfac_like = bool(kfac_like)
        if self.kfac_like and self.alpha1 != 0:
            raise ValueError("kfac_like=True (IKFAC) has no Riemannian momentum: pass alpha1=0.")
        self.fisher_type = check_choice(fisher_type, "fisher_type", FISHER_TYPES)
        self.kfac_approx = check_choice(kfac_approx, "kfac_approx", KFAC_APPROX)

    def init(self, theta):
        # K, C are sized from the model at the first step (init only sees θ).
        return {"step": 0, "K": None, "C": None, "m_K": None, "m_C": None, "momentum_buffer": None}

    def _precondition(self, theta, state, model, loss, X, y, rng):
        self._check_state(state, "K", "C", "m_K", "m_C", "momentum_buffer")
        if not hasattr(model, "layers"):
            raise TypeError(f"{type(self).__name__} needs a refngd.nn.Sequential of Linear / "
                            "Conv2d layers: its Kronecker factors are per layer.")
        if self.fisher_type == "mc" and rng is None:
            raise TypeError(f"{type(self).__name__} with fisher_type='mc' draws labels: pass "
                            "rng=numpy.random.default_rng(seed) to step() (refngd.train does).")
        batch = evaluate_batch(model, theta, loss, X, y)
        kf = KFACCurvature(model, theta, loss, X, y, fisher_type=self.fisher_type, rng=rng,
                           kfac_approx=self.kfac_approx, bias="joint", linearization=batch.lin)
        layers = kf.factors()
        Ks, Cs, mKs, mCs = state["K"], state["C"], state["m_K"], state["m_C"]
        if Ks is None:  # K = I, C = I, m = 0
            xp = namespace(layers[0].A)
            Ks = [xp.eye(f.A.shape[0], dtype=xp.float64) for f in layers]
            Cs = [xp.eye(f.G.shape[0], dtype=xp.float64) for f in layers]
            mKs, mCs = [None] * len(layers), [None] * len(layers)
        if state["step"] % self.update_every == 0:
            new = [self._update_layer(K, C, f.A, f.G, mK, mC)
                   for K, C, f, mK, mC in zip(Ks, Cs, layers, mKs, mCs)]
            Ks, Cs, mKs, mCs = (list(z) for z in zip(*new))
        # d = vec(C Cᵀ Ḡ K Kᵀ): K-FAC's block product with (A, G) := (K Kᵀ, C Cᵀ).
        d = kf.with_factors([(K @ K.T, C @ C.T) for K, C in zip(Ks, Cs)]) @ batch.g
        return batch, d, {"K": Ks, "C": Cs, "m_K": mKs, "m_C": mCs}

    def _update_layer(self, K, C, U, G, m_K, m_C):
        mK, mC = ingd_momentum(K, C, U, G, m_K, m_C, self.damping, self.alpha1, self.kfac_like)
        K, C = riemannian_step(K, mK, self.lr_cov), riemannian_step(C, mC, self.lr_cov)
        keep = self.alpha1 != 0  # the momenta are state only with Riemannian momentum
        return K, C, (mK if keep else None), (mC if keep else None)

    def direction(self, theta, state, model, loss, X, y, rng=None):
        """The preconditioned gradient vec(C Cᵀ [∇W | ∇b] K Kᵀ) of this batch, with K, C
        after this step's factor update (no momentum, no weight decay)."""
        return self._precondition(theta, state, model, loss, X, y, rng)[1]

    def step(self, theta, state, model, loss, X, y, rng=None):
        batch, d, factors = self._precondition(theta, state, model, loss, X, y, rng)
        new, buf = momentum_step(theta, d, state["momentum_buffer"], self.lr, self.momentum,
                                 self.weight_decay)
        new_state = {"step": state["step"] + 1, **factors, "momentum_buffer": buf}
        return new, new_state, self._info(batch, theta, new, direction_norm=norm(d))


class IKFAC(INGD):
    """IKFAC (Lin et al. 2024b): INGD without traces and Riemannian momentum (``kfac_like``).

    m_K = ½(Kᵀ U K + λ KᵀK − I), K ← K(I − β₁ m_K) (likewise C): K Kᵀ tracks K-FAC's
    (EMA(A) + λI)⁻¹ to first order in β₁ (module docstring).  Parameters as :class:`INGD`
    without ``alpha1`` / ``kfac_like``.
    """

    name = "ikfac"
    _hyper = tuple(h for h in INGD._hyper if h not in ("alpha1", "kfac_like"))

    def __init__(self, lr: float = 1e-3, momentum: float = 0.9, damping: float = 1e-3,
                 lr_cov: float = 1e-2, weight_decay: float = 0.0, update_every: int = 10,
                 fisher_type: FisherType = "empirical",
                 kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT):
        super().__init__(lr, momentum, damping, 0.0, lr_cov, weight_decay, update_every, True,
                         fisher_type, kfac_approx)


__all__ = ["INGD", "IKFAC", "ingd_momentum", "riemannian_step", "average_trace"]
