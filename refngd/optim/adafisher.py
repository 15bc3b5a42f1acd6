"""AdaFisher: Adam-style momentum preconditioned by diagonal Kronecker factors (Gomes et al. 2024).

D. M. Gomes, Y. Zhang, E. Belilovsky, G. Wolf, M. S. Hosseini (2024), "AdaFisher:
Adaptive Second Order Optimization via Fisher Information", arXiv:2405.16397 (ICLR 2025).

For every Linear / Conv2d layer K-FAC approximates the Fisher block by G ⊗ A; AdaFisher
keeps only the *diagonals* of the two factors, so the preconditioner is a vector:

    Â = diag((1/N) Σ_n ā_n ā_nᵀ),   Ĝ = diag(c Σ_n b_n b_nᵀ)        (this batch)
    Â, Ĝ ← minmax(Â), minmax(Ĝ)     (``normalize=True``: (v − min v)/(max v − min v))
    A_t = γ_old A_{t−1} + γ_new Â,   G_t likewise                   (EMA, every T steps)
    F̃_t = G_t ⊗ A_t + λ                                             (one entry per weight)
    m_t = β m_{t−1} + (1 − β) g_t,   m̂_t = m_t / (1 − βᵗ)
    θ_t = θ_{t−1} − lr · m̂_t / F̃_t                                  (no square root)

ā_n = [a_n; 1] are the layer inputs with a 1 for the bias (Conv2d: the im2col patches,
averaged over the N·T locations, and Ĝ summed over them, K-FAC's "expand" scaling),
b_n = ∂l_n/∂(layer output) back-propagated from the *observed* labels, as the reference
code's hooks on ``loss.backward()`` do (an empirical-Fisher K-FAC diagonal; the batch
statistics are :class:`refngd.curvature.KroneckerDiagonal` with ``bias="joint"``).  The weight
entry (o, i) of F̃ is G[o]·A[i] and the bias entry o is G[o]·A[bias] (PyTorch order).
``weight_decay`` adds κθ to g (AdaFisher); ``decoupled=True`` is AdaFisherW,
θ_t = θ_{t−1} − lr (m̂_t/F̃_t + κ θ_{t−1}).

Where the public reference code differs, and what refngd does
--------------------------------------------------------------
``AtlasAnalyticsLab/AdaFisher`` (optimizers/AdaFisher.py):

* its EMA is ``H *= (1 − γ₁); H += γ₂ Ĥ`` with ``gammas=[0.92, 0.008]``: it keeps 8 % of
  the old factor and adds 0.8 % of the new one, so the factors shrink to ≈ 0.0087 Ĥ and
  F̃ ≈ λ = 10⁻³ dominates.  refngd's default is the convex K-FAC-style EMA
  γ_old = 0.92, γ_new = 0.08; ``gammas=(0.08, 0.008)`` reproduces the reference code.
* it refreshes the factors every ``TCov = 100`` steps; refngd's default is every step
  (``update_every=1``: cheap at refngd's sizes), ``update_every=100`` reproduces it.
* it initialises the factors to ones and min-max normalises each new batch estimate
  before the EMA; refngd does the same (``normalize=False`` switches this off and keeps
  the K-FAC scaling above).
* its gradient-side statistic is taken from PyTorch's ``grad_output`` of the *mean*
  loss (an extra constant factor); after min-max normalisation constants do not matter.
* layers it does not support get F̃ = 1; refngd's models have only Linear and Conv2d
  parameters, and :class:`refngd.curvature.KroneckerDiagonal` refuses anything else.
"""
from __future__ import annotations

from ..options import FISHER_TYPES, FisherType
from ..backend import namespace, to_float
from ..curvature import KroneckerDiagonal
from ..curvature.kron_diag import place_kronecker_diagonal
from .base import (
    Optimizer,
    check_choice,
    check_int,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    evaluate_batch,
    norm,
    zeros_like,
)


def minmax(v):
    """(v − min v)/(max v − min v + 10⁻¹²), the reference code's ``MinMaxNormalization``."""
    lo = v.min()
    return (v - lo) / (v.max() - lo + 1e-12)


def batch_factors(model, theta, loss, X, y, lin, fisher_type: str, rng) -> list:
    """Per parametric layer ``(Â, Ĝ)`` of this batch, from :class:`refngd.curvature.KroneckerDiagonal`.

    Â has the trailing bias entry (``bias="joint"``); Ĝ has one entry per output unit.
    """
    kd = KroneckerDiagonal(model, theta, loss, X, y, fisher_type=fisher_type, rng=rng,
                           bias="joint", linearization=lin)
    return [(f.A, f.G) for f in kd.factors()]


def precondition_vector(model, factors, damping: float, P: int, dtype, xp):
    """F̃ = G ⊗ A + λ as a (P,) vector in θ's order (weight (o, i): G[o]·A[i]; bias o: G[o]·A[−1])."""
    F = xp.ones(P, dtype=dtype)
    layers = [(layer, s) for layer, s in zip(model.layers, model.slices) if layer.param_shapes]
    for (layer, (start, _)), (A, G) in zip(layers, factors):
        place_kronecker_diagonal(F, start, G, A, bool(layer.bias))
    return F + damping


class AdaFisher(Optimizer):
    """AdaFisher / AdaFisherW (Gomes et al. 2024); formulas in the module docstring.

    Parameters
    ----------
    lr : step size.   beta : momentum β (0.9).   damping : λ (10⁻³).
    gammas : (γ_old, γ_new) of the factor EMA (default (0.92, 0.08), convex).
    update_every : T, refresh the factors every T steps (default 1).
    normalize : min-max normalise each new factor estimate (default True, as the code).
    weight_decay : κ.   decoupled : AdaFisherW's decoupled weight decay.
    fisher_type : rows of the factors: ``"empirical"`` (default: observed labels, as the
        reference code), ``"mc"`` (needs ``rng`` in :meth:`step`) or ``"type-2"``.

    Notes
    -----
    Needs a :class:`refngd.nn.Sequential` of Linear / Conv2d layers (the factors are per
    layer).  The state holds ``factors``: per parametric layer ``(A, G)``, A with its
    trailing bias entry.
    """

    name = "adafisher"
    _hyper = ("lr", "beta", "damping", "gammas", "update_every", "normalize", "weight_decay",
              "decoupled", "fisher_type")

    def __init__(self, lr: float = 1e-3, beta: float = 0.9, damping: float = 1e-3,
                 gammas=(0.92, 0.08), update_every: int = 1, normalize: bool = True,
                 weight_decay: float = 0.0, decoupled: bool = False,
                 fisher_type: FisherType = "empirical"):
        # fisher_type "empirical" (not refngd.options' "type-2"): the authors' code builds its
        # factors from loss.backward() on the observed labels (module docstring)
        self.lr = check_lr(lr)
        self.beta = check_unit_interval(beta, "beta")
        self.damping = check_positive(damping, "damping")  # F̃ = G⊗A + λ divides the step; its
        # min-max normalised factors are 0 at their smallest entries, so λ = 0 would divide by 0
        if not isinstance(gammas, (tuple, list)) or len(gammas) != 2:
            raise ValueError(f"gammas must be a pair (gamma_old, gamma_new), got {gammas!r}.")
        self.gammas = (check_nonnegative(gammas[0], "gamma_old"), check_nonnegative(gammas[1], "gamma_new"))
        self.update_every = check_int(update_every, "update_every")
        self.normalize = bool(normalize)
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.decoupled = bool(decoupled)
        self.fisher_type = check_choice(fisher_type, "fisher_type", FISHER_TYPES)

    def init(self, theta):
        return {"step": 0, "exp_avg": zeros_like(theta), "factors": None}

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "exp_avg", "factors")
        if not hasattr(model, "layers"):
            raise TypeError("AdaFisher needs a refngd.nn.Sequential: its Fisher factors are per layer.")
        xp = namespace(theta)
        batch = evaluate_batch(model, theta, loss, X, y)
        t = state["step"] + 1
        factors = state["factors"]
        refresh = (t - 1) % self.update_every == 0
        fresh = None
        if refresh or factors is None:
            fresh = batch_factors(model, theta, loss, X, y, batch.lin, self.fisher_type, rng)
        if factors is None:  # factors start at ones, as in the reference code
            factors = [(xp.ones_like(A), xp.ones_like(G)) for A, G in fresh]
        if refresh:
            g_old, g_new = self.gammas
            new_f = []
            for old, f in zip(factors, fresh):
                A, G = (minmax(f[0]), minmax(f[1])) if self.normalize else f
                new_f.append((g_old * old[0] + g_new * A, g_old * old[1] + g_new * G))
            factors = new_f
        F = precondition_vector(model, factors, self.damping, theta.shape[0], theta.dtype, xp)
        g = batch.g
        grad = g + self.weight_decay * theta if (self.weight_decay and not self.decoupled) else g
        m = self.beta * state["exp_avg"] + (1 - self.beta) * grad
        d = (m / (1 - self.beta**t)) / F
        if self.decoupled and self.weight_decay:
            d = d + self.weight_decay * theta
        new = theta - self.lr * d
        state = {"step": t, "exp_avg": m, "factors": factors}
        return new, state, self._info(batch, theta, new, min_fisher=to_float(F.min()),
                                      max_fisher=to_float(F.max()), direction_norm=norm(d))


__all__ = ["AdaFisher", "batch_factors", "minmax", "precondition_vector"]
