"""AdamQLR: Adam's direction, K-FAC's step size and Levenberg–Marquardt damping.

R. M. Clarke, J. M. Hernández-Lobato (2024), "Studying K-FAC heuristics by viewing Adam
through a second-order lens", ICML 2024, arXiv:2310.14963.  Reference code:
``rmclarke/AdamThroughASecondOrderLens`` (``optimisers.py``: ``AdamQLROptimiser``,
``learning_rate_from_fisher``, ``kfac_update_damping``; settings in ``configs/``).

Each step, on the batch, with d_t Adam's bias-corrected direction m̂_t/(√v̂_t + ε)
(:meth:`refngd.optim.Adam.direction`) and C the curvature of the quadratic model:

    q_t = d_tᵀ (C + λ_t I) d_t                       (one exact curvature-vector product)
    α_t = clip(g_tᵀ d_t / q_t, −α_max, α_max)         (the minimiser of the damped model
                                                      M(−α d) = L − α gᵀd + ½ α² q; clipped
                                                      only if α_max is set, off by default)
    θ_t = θ_{t−1} − α_t d_t   (− γ θ_{t−1} with decoupled ``weight_decay`` γ)
    ρ_t = (L(θ_t) − L(θ_{t−1})) / (½ α_t² q_t − α_t g_tᵀ d_t)      (reduction ratio, same batch)
    λ_{t+1} = ω_dec λ_t if ρ_t > 3/4,   ω_inc λ_t if ρ_t < 1/4,   else λ_t;  λ ≥ λ_min

C is the exact Fisher = GGN of the batch (type-2, :class:`refngd.curvature.Fisher`;
the paper's default ``curvature_matrix: fisher``), with the loss's scale c, so
dᵀ C d = c Σ_n (J_n d)ᵀ H_n (J_n d) — for a mean, the batch average, as the reference's
``nanmean``.  Its Hessian option is not implemented here.  ρ uses the α actually taken
(clipped, when α_max is set), as the reference code does.

Settings.  The camera-ready code (the ICML 2024 commit of the reference repository, whose
README names them) uses the configurations **without learning-rate clipping** for both
settings; refngd follows them:

- **untuned** ("AdamQLR (Untuned)", ``configs/AdamQLR_NoHPO_NoLRClipping.yaml``):
  λ₀ = 10⁻³, ω_dec = 0.5, ω_inc = 2, λ_min = 10⁻⁸, no α clipping, Adam's β = (0.9, 0.999),
  ε = 10⁻⁸ (``AdamQLROptimiser``'s defaults; the AdamQLR configurations do not set them),
  and a fixed batch size of 3200 (:data:`UNTUNED_BATCH_SIZE`; the Penn Treebank variant
  leaves the dataset's own) — refngd's defaults, :meth:`AdamQLR.untuned`.  refngd's
  optimizers do not choose batches: pass batches of that size to reproduce the setting.
- **tuned** ("AdamQLR (Tuned)", ``configs/AdamQLR_Damped_NoLRClipping.yaml``, the starting
  point of the ASHA search): λ₀ = 1, ω_dec = 0.95, ω_inc = 1.0526 (≈ 1/0.95, as written in
  the file), no α clipping — :meth:`AdamQLR.tuned_start`.  The search
  (``hyperparameter_optimisation.py``, :data:`SEARCH_SPACE`) samples, each independently,
  λ₀ ~ log-uniform[10⁻⁸, 1], ω_dec ~ log-uniform[0.5, 1], ω_inc ~ log-uniform[1, 4] and
  the batch size from {50, 100, …, 3200}; α_max only for the clipped configurations
  (log-uniform[10⁻⁴, 10]).  Adam's β and ε are *not* searched.  The per-task tuned values
  are not reproduced.

The earlier configurations (``AdamQLR_NoHPO.yaml``: α_max = 0.1; ``AdamQLR_Damped.yaml``:
α_max = 0.03) are ``AdamQLR.untuned(lr_clip=0.1)`` and ``AdamQLR.tuned_start(lr_clip=0.03)``.

There is no learning rate: the step size is chosen by the model.  ``lr_scale`` (default 1)
multiplies α_t after clipping (the reference's ``update_amplification``), so that a
learning-rate grid can still be run; ρ then uses the amplified step.
"""
from __future__ import annotations

import math

from ..backend import to_float
from ..curvature import Fisher
from .base import (
    Optimizer,
    check_nonnegative,
    check_positive,
    evaluate_batch,
    norm,
    zeros_like,
)
from .baselines import Adam


#: The untuned setting's fixed batch size (``batch_size: 3200`` in its configuration).
UNTUNED_BATCH_SIZE = 3200

#: The tuned setting's search space (``construct_search_space`` of the reference code, for
#: ``AdamQLROptimiser`` on the non-text datasets): every entry sampled independently.
#: ``lr_clip`` is searched only in the clipped configurations, which the paper no longer uses.
SEARCH_SPACE = {
    "damping": ("loguniform", 1e-8, 1.0),
    "damping_decrease": ("loguniform", 0.5, 1.0),
    "damping_increase": ("loguniform", 1.0, 4.0),
    "batch_size": ("choice", (50, 100, 200, 400, 800, 1600, 3200)),
}


def quadratic_step_size(gd: float, q: float, clip: float | None) -> float:
    """α = gᵀd / (dᵀ(C + λI)d), clipped to [−α_max, α_max]; 0 if the model is not convex along d."""
    if not q > 0:
        return 0.0
    alpha = gd / q
    return max(-clip, min(clip, alpha)) if clip is not None else alpha


def levenberg_marquardt(damping: float, rho: float, decrease: float, increase: float,
                        bounds: tuple) -> float:
    """λ ← ω_dec λ if ρ > 3/4, ω_inc λ if ρ < 1/4, clipped to bounds (a NaN ρ keeps λ, as the
    reference's ``jnp.where``)."""
    if rho > 0.75:
        damping *= decrease
    elif rho < 0.25:
        damping *= increase
    lo, hi = bounds
    return min(max(damping, lo if lo is not None else 0.0), hi if hi is not None else math.inf)


class AdamQLR(Optimizer):
    """AdamQLR (Clarke & Hernández-Lobato 2024); formulas in the module docstring.

    Parameters
    ----------
    damping : λ₀ (10⁻³).   damping_decrease, damping_increase : ω_dec, ω_inc (0.5, 2).
    damping_bounds : (λ_min, λ_max) (10⁻⁸, None).
    lr_clip : α_max (``None``, the default = no clipping, as the camera-ready settings).
    betas, eps : Adam's (0.9, 0.999), 10⁻⁸.   weight_decay : γ, decoupled.
    lr_scale : multiplies the chosen step (1 = the paper's method).

    Notes
    -----
    Every step costs one extra forward pass (L(θ_t) for ρ) and one Jacobian-vector
    product (the rows of the exact Fisher applied to d).
    """

    name = "adamqlr"
    _hyper = ("damping", "damping_decrease", "damping_increase", "damping_bounds", "lr_clip",
              "betas", "eps", "weight_decay", "lr_scale")

    def __init__(self, damping: float = 1e-3, damping_decrease: float = 0.5,
                 damping_increase: float = 2.0, damping_bounds=(1e-8, None),
                 lr_clip: float | None = None, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, lr_scale: float = 1.0):
        self.damping = check_nonnegative(damping, "damping")
        self.damping_decrease = check_positive(damping_decrease, "damping_decrease")
        self.damping_increase = check_positive(damping_increase, "damping_increase")
        if self.damping_decrease > 1 or self.damping_increase < 1:
            raise ValueError("need damping_decrease <= 1 <= damping_increase, got "
                             f"{damping_decrease!r}, {damping_increase!r}.")
        lo, hi = damping_bounds
        self.damping_bounds = (None if lo is None else check_nonnegative(lo, "damping_bounds[0]"),
                               None if hi is None else check_positive(hi, "damping_bounds[1]"))
        self.lr_clip = None if lr_clip is None else check_positive(lr_clip, "lr_clip")
        self._adam = Adam(lr=1.0, betas=betas, eps=eps)
        self.betas, self.eps = self._adam.betas, self._adam.eps
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.lr_scale = check_positive(lr_scale, "lr_scale")

    @classmethod
    def untuned(cls, **kw) -> "AdamQLR":
        """The paper's untuned setting (``AdamQLR_NoHPO_NoLRClipping.yaml``): refngd's
        defaults (the setting also fixes the batch size, :data:`UNTUNED_BATCH_SIZE`)."""
        return cls(**kw)

    @classmethod
    def tuned_start(cls, **kw) -> "AdamQLR":
        """``AdamQLR_Damped_NoLRClipping.yaml``, the base the paper's search starts from."""
        args = dict(damping=1.0, damping_decrease=0.95, damping_increase=1.0526, lr_clip=None)
        return cls(**{**args, **kw})

    def init(self, theta):
        return {"step": 0, "exp_avg": zeros_like(theta), "exp_avg_sq": zeros_like(theta),
                "damping": self.damping}

    def _precondition(self, theta, state, model, loss, X, y):
        self._check_state(state, "exp_avg", "exp_avg_sq", "damping")
        batch = evaluate_batch(model, theta, loss, X, y)
        d, m, v = self._adam.direction(batch.g, state)
        return batch, d, m, v

    def direction(self, theta, state, model, loss, X, y, rng=None):
        """Adam's direction m̂_t/(√v̂_t + ε) on this batch (the step is −α_t times it)."""
        return self._precondition(theta, state, model, loss, X, y)[1]

    def step(self, theta, state, model, loss, X, y, rng=None):
        batch, d, m, v = self._precondition(theta, state, model, loss, X, y)
        lam = state["damping"]
        F = Fisher(model, theta, loss, X, y, linearization=batch.lin)
        gd = to_float(batch.g @ d)
        q = F.quadratic_form(d) + lam * to_float(d @ d)
        alpha = quadratic_step_size(gd, q, self.lr_clip) * self.lr_scale
        new = theta - alpha * d
        if self.weight_decay:
            new = new - self.weight_decay * theta
        predicted = 0.5 * alpha**2 * q - alpha * gd
        actual = to_float(loss(model.forward(new, X), y)) - batch.loss
        rho = actual / predicted if predicted != 0 else math.nan
        new_lam = levenberg_marquardt(lam, rho, self.damping_decrease, self.damping_increase,
                                      self.damping_bounds)
        new_state = {"step": state["step"] + 1, "exp_avg": m, "exp_avg_sq": v, "damping": new_lam}
        return new, new_state, self._info(batch, theta, new, step_size=alpha, damping=lam, rho=rho,
                                          curvature=q, direction_norm=norm(d))


__all__ = ["AdamQLR", "quadratic_step_size", "levenberg_marquardt", "UNTUNED_BATCH_SIZE",
           "SEARCH_SPACE"]
