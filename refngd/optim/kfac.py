"""K-FAC and EKFAC as optimizers: running factors, periodic inverses, damping, KL-clipping.

K-FAC (Martens & Grosse 2015, "Optimizing neural networks with Kronecker-factored
approximate curvature").  Each step, on the batch, :class:`refngd.curvature.KFAC` gives
per layer the factors Â, Ĝ (the Fisher type's rows; docs/design.md §3 for the scaling); then

    ε_t = min(1 − 1/t, ε)                                    (§5: running averages)
    A_t = ε_t A_{t−1} + (1 − ε_t) Â_t,   G_t likewise        (A_1 = Â_1)
    every T steps: eigendecompose A_t = U_A diag(a) U_Aᵀ, G_t = U_G diag(γ) U_Gᵀ   (§8)
    d_t = per layer (G ⊗ A + λI)⁻¹ g     ``damping_mode="tikhonov"``: eigenvalues γ_i a_j + λ
          or ((G + √λ/π I) ⊗ (A + π√λ I))⁻¹ g   ``"factored"`` (§6.3, π² = (tr A/d_A)/(tr G/d_G))
          or ((G + λ_G I) ⊗ (A + λ_A I))⁻¹ g    ``"per-factor"`` (every variant, ``pi`` and
          ``damping_split``: refngd.curvature.damping)
    ν_t = min(1, √(κ / (lr² d_tᵀ g_t)))                       (KL-clipping, ``kl_clip`` = κ)
    b_t = μ b_{t−1} + ν_t d_t,   θ_t = θ_{t−1} − lr · b_t

The inverse uses the eigendecomposition from the last refresh with the *current* λ, so a
damping change takes effect at once.  KL-clipping is not in Martens & Grosse (2015); it is
the step-size rule of Ba, Grosse & Martens (2017, "Distributed second-order optimization
using Kronecker-factored approximations", §5) as the common implementations apply it
(``kfac-pytorch``'s ``kl_clip``: ν = min(1, √(κ/(lr² Σ_l d_lᵀ g_l)))).

Levenberg–Marquardt adaptation (``adapt_damping=True``; Martens & Grosse 2015, §6.5):
every ``adapt_every`` = T₁ steps the reduction ratio of the step δ = θ_t − θ_{t−1} on the
batch,

    ρ = (L(θ_{t−1} + δ) − L(θ_{t−1})) / (gᵀδ + ½ δᵀ (F + λI) δ),

with F the exact Fisher of the batch, moves λ ← ω λ if ρ > 3/4 and λ ← λ/ω if ρ < 1/4,
ω = (19/20)^T₁.  (Martens & Grosse adapt a second constant γ for the factored inverse by a
small grid search; refngd uses one λ for both, as most implementations do.)

EKFAC (George et al. 2018, "Fast approximate natural gradient descent in a
Kronecker-factored eigenbasis", Algorithm 1): the eigenbasis U_G ⊗ U_A of the running
K-FAC factors is refreshed every T steps; every step the diagonal is re-estimated in
that basis from the per-row gradients G_r of the batch,

    ŝ_t = c Σ_r (U_Gᵀ G_r U_A)²,   s_t = ε_k s_{t−1} + (1 − ε_k) ŝ_t  (k = steps since refresh)
    d_t = U_G [(U_Gᵀ V U_A) / (s_t + λ)] U_Aᵀ   per block (Tikhonov damping),

and the rest (KL-clip, momentum, LM adaptation) is as K-FAC.  At a basis refresh the old
diagonal belongs to another basis, so s restarts from ŝ (ε_1 = 0).

With one batch in the averages (the first step) and T = 1 both reduce to
:func:`refngd.updates.kfac` / :func:`refngd.updates.ekfac` on that batch, which the tests check.
"""
from __future__ import annotations

import math

from ..options import (BIAS, BIAS_MODES, DAMPING_MODES, DAMPING_SPLIT, DAMPING_SPLITS,
                       FISHER_TYPES, KFAC_APPROX, KFAC_APPROX_DEFAULT, PI, BiasMode, DampingMode,
                       DampingSplit, FisherType, KfacApprox, Pi, check_kfac_damping, check_pi)
from ..backend import check_damping, eigh_psd, to_float
from ..curvature import EKFAC as EKFACCurvature
from ..curvature import KFAC as KFACCurvature
from ..curvature import Fisher
from .base import (
    Optimizer,
    apply_momentum,
    check_choice,
    check_int,
    check_lr,
    check_positive,
    check_unit_interval,
    evaluate_batch,
    norm,
)


class _KroneckerOptimizer(Optimizer):
    """Shared state machine of K-FAC and EKFAC (factors, damping, clipping, momentum).

    The optimizer keeps only running statistics; the preconditioner is the curvature
    library's operator on the batch with these put in place of the batch's factors
    (:meth:`refngd.curvature.KFAC.with_factors`), so the solves are the library's.
    """

    _hyper = ("lr", "damping", "ema_decay", "inverse_every", "fisher_type", "mc_samples",
              "kfac_approx", "bias", "kl_clip", "momentum", "adapt_damping", "adapt_every",
              "damping_mode", "pi", "damping_split")

    def __init__(self, lr, damping, ema_decay, inverse_every, fisher_type, mc_samples, kfac_approx,
                 bias, kl_clip, momentum, adapt_damping, adapt_every, damping_bounds,
                 damping_mode, pi, damping_split):
        self.lr = check_lr(lr)
        self.damping_mode = check_choice(damping_mode, "damping_mode", DAMPING_MODES)
        self.pi = check_pi(pi)
        self.damping_split = check_choice(damping_split, "damping_split", DAMPING_SPLITS)
        if isinstance(damping, (tuple, list)):  # (λ_A, λ_G): "per-factor", not adapted
            self.damping = check_kfac_damping(tuple(damping), self.damping_mode)
            if adapt_damping or min(self.damping) <= 0:
                raise ValueError("damping=(λ_A, λ_G) needs both > 0 and adapt_damping=False.")
        else:
            self.damping = check_damping(damping, allow_zero=False)
        self.ema_decay = check_unit_interval(ema_decay, "ema_decay")
        self.inverse_every = check_int(inverse_every, "inverse_every")
        self.fisher_type = check_choice(fisher_type, "fisher_type", FISHER_TYPES)
        self.mc_samples = check_int(mc_samples, "mc_samples")
        self.kfac_approx = check_choice(kfac_approx, "kfac_approx", KFAC_APPROX)
        self.bias = check_choice(bias, "bias", BIAS_MODES)
        self.kl_clip = None if kl_clip is None else check_positive(kl_clip, "kl_clip")
        self.momentum = check_unit_interval(momentum, "momentum")
        self.adapt_damping = bool(adapt_damping)
        self.adapt_every = check_int(adapt_every, "adapt_every")
        lo, hi = damping_bounds
        self.damping_bounds = (check_positive(lo, "damping_bounds[0]"), check_positive(hi, "damping_bounds[1]"))
        if self.damping_bounds[0] > self.damping_bounds[1]:
            raise ValueError(f"damping_bounds must be (low, high) with low <= high, got {damping_bounds!r}.")

    def init(self, theta):
        return {"step": 0, "factors": None, "eigen": None, "damping": self.damping,
                "momentum_buffer": None}

    # ------------------------------------------------------------------ pieces
    def _batch_factors(self, model, theta, loss, X, y, lin, rng):
        if self.fisher_type == "mc" and rng is None:
            raise TypeError(f"{type(self).__name__} with fisher_type='mc' draws labels: pass "
                            "rng=numpy.random.default_rng(seed) to step() (refngd.train does).")
        return KFACCurvature(model, theta, loss, X, y, fisher_type=self.fisher_type,
                             mc_samples=self.mc_samples, rng=rng, kfac_approx=self.kfac_approx,
                             bias=self.bias, linearization=lin)

    def _running(self, old, kf, t):
        """A_t = ε_t A_{t−1} + (1 − ε_t) Â_t with ε_t = min(1 − 1/t, ε)."""
        eps = min(1.0 - 1.0 / t, self.ema_decay)
        new = kf.factors()
        if old is None:
            return [(f.A, f.G) for f in new]
        return [(eps * A + (1 - eps) * f.A, eps * G + (1 - eps) * f.G) for (A, G), f in zip(old, new)]

    def _refreshing(self, state, t) -> bool:
        return state["eigen"] is None or (t - 1) % self.inverse_every == 0

    def _clip_factor(self, d, g) -> float:
        if self.kl_clip is None:
            return 1.0
        dg = to_float(d @ g) * self.lr**2
        return min(1.0, math.sqrt(self.kl_clip / dg)) if dg > 0 else 1.0

    def _adapt(self, lam, model, theta, new, loss, X, y, batch):
        """Levenberg–Marquardt rule on the reduction ratio ρ (module docstring)."""
        delta = new - theta
        F = Fisher(model, theta, loss, X, y, linearization=batch.lin)
        predicted = to_float(batch.g @ delta) + 0.5 * (F.quadratic_form(delta) + lam * to_float(delta @ delta))
        actual = to_float(loss(model.forward(new, X), y)) - batch.loss
        rho = actual / predicted if predicted < 0 else -math.inf
        omega = (19.0 / 20.0) ** self.adapt_every
        if rho > 0.75:
            lam *= omega
        elif rho < 0.25:
            lam /= omega
        return min(max(lam, self.damping_bounds[0]), self.damping_bounds[1]), rho

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "factors", "eigen", "damping", "momentum_buffer")
        batch = evaluate_batch(model, theta, loss, X, y)
        t = state["step"] + 1
        kf = self._batch_factors(model, theta, loss, X, y, batch.lin, rng)
        factors = self._running(state["factors"], kf, t)
        new_state = {"step": t, "factors": factors, "damping": state["damping"]}
        lam = state["damping"]
        d = self._direction(state, new_state, kf, factors, t, batch.g, lam, (model, theta, loss, X, y))
        nu = self._clip_factor(d, batch.g)
        step, buf = apply_momentum(state["momentum_buffer"], nu * d, self.momentum)
        new = theta - self.lr * step
        new_state["momentum_buffer"] = buf
        extra = {"damping": lam, "kl_scale": nu, "direction_norm": norm(d)}
        if self.adapt_damping and t % self.adapt_every == 0:
            new_state["damping"], extra["rho"] = self._adapt(lam, model, theta, new, loss, X, y, batch)
        return new, new_state, self._info(batch, theta, new, **extra)


class KFAC(_KroneckerOptimizer):
    """K-FAC optimizer (Martens & Grosse 2015); every formula is in the module docstring.

    Parameters
    ----------
    lr : learning rate.   damping : λ (initial value with ``adapt_damping``).
    damping_mode : ``"factored"`` (default, Martens & Grosse §6.3), ``"tikhonov"`` or
        ``"per-factor"`` (λ on each factor, or ``damping=(λ_A, λ_G)`` without
        ``adapt_damping``); ``pi`` (``"trace"`` or a number) and ``damping_split``
        (``"even"`` or ``"locations"``) as :meth:`refngd.curvature.KFAC.solve`, π computed
        from the running factors.
    ema_decay : ε of the running factors (0.95).   inverse_every : T (20).
    fisher_type : ``"mc"`` (default: one sampled label per input, as Martens & Grosse),
        ``"type-2"`` or ``"empirical"``.   mc_samples : K.
    kfac_approx, bias : as :class:`refngd.curvature.KFAC`.
    kl_clip : κ of the KL-clipping (10⁻³, the ``kfac-pytorch`` default); ``None`` = off.
    momentum : μ.   adapt_damping, adapt_every, damping_bounds : Levenberg–Marquardt rule.
    """

    name = "kfac"

    # Defaults that differ from refngd.options on purpose: the optimizer follows Martens &
    # Grosse (2015) — factored damping (§6.3) and sampled labels (the Fisher, not the
    # empirical Fisher, at the cost of one backward pass, §5) — as kfac-pytorch does.
    def __init__(self, lr: float = 0.1, damping: float = 1e-3,
                 damping_mode: DampingMode = "factored", ema_decay: float = 0.95,
                 inverse_every: int = 20, fisher_type: FisherType = "mc", mc_samples: int = 1,
                 kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT, bias: BiasMode = BIAS,
                 kl_clip: float | None = 1e-3, momentum: float = 0.0, adapt_damping: bool = False,
                 adapt_every: int = 5, damping_bounds=(1e-8, 1e2), pi: Pi = PI,
                 damping_split: DampingSplit = DAMPING_SPLIT):
        super().__init__(lr, damping, ema_decay, inverse_every, fisher_type, mc_samples, kfac_approx,
                         bias, kl_clip, momentum, adapt_damping, adapt_every, damping_bounds,
                         damping_mode, pi, damping_split)

    def _direction(self, state, new_state, kf, factors, t, g, lam, problem):
        """The running factors with the eigendecomposition of the last refresh (π from A_t, G_t)."""
        eigen = state["eigen"]
        if self._refreshing(state, t):
            eigen = [(eigh_psd(A), eigh_psd(G)) for A, G in factors]
        new_state["eigen"] = eigen
        return kf.with_factors(factors, eigen).solve(g, lam, self.damping_mode, self.pi,
                                                     self.damping_split)


class EKFAC(_KroneckerOptimizer):
    """EKFAC optimizer (George et al. 2018, Algorithm 1); formulas in the module docstring.

    Parameters as :class:`KFAC`; ``inverse_every`` is the eigenbasis refresh period T.
    ``damping_mode`` ``"tikhonov"`` (default: λ added to the re-estimated eigenvalues s,
    George et al. 2018), or ``"factored"`` / ``"per-factor"`` with ``pi`` and
    ``damping_split``: K-FAC's factor-damping term added instead
    (:meth:`refngd.curvature.EKFAC.solve`).
    """

    name = "ekfac"

    # fisher_type "mc" as K-FAC's optimizer (George et al. 2018 sample labels likewise)
    def __init__(self, lr: float = 0.1, damping: float = 1e-3, ema_decay: float = 0.95,
                 inverse_every: int = 20, fisher_type: FisherType = "mc", mc_samples: int = 1,
                 kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT, bias: BiasMode = BIAS,
                 kl_clip: float | None = 1e-3,
                 momentum: float = 0.0, adapt_damping: bool = False, adapt_every: int = 5,
                 damping_bounds=(1e-8, 1e2), damping_mode: DampingMode = "tikhonov",
                 pi: Pi = PI, damping_split: DampingSplit = DAMPING_SPLIT):
        super().__init__(lr, damping, ema_decay, inverse_every, fisher_type, mc_samples, kfac_approx,
                         bias, kl_clip, momentum, adapt_damping, adapt_every, damping_bounds,
                         damping_mode, pi, damping_split)

    def init(self, theta):
        return {**super().init(theta), "scalings": None, "since_refresh": 0}

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "scalings", "since_refresh")
        return super().step(theta, state, model, loss, X, y, rng)

    def _direction(self, state, new_state, kf, factors, t, g, lam, problem):
        """ŝ_t in the basis (U_A, U_G) of the last refresh, its running average s_t, the solve."""
        eigen, S, k = state["eigen"], state["scalings"], state["since_refresh"]
        if self._refreshing(state, t):
            eigen = [(eigh_psd(A), eigh_psd(G)) for A, G in factors]
            S, k = None, 0
        k += 1
        # the refresh's eigenvalues come along: they fix the clusters over which EKFAC's
        # diagonal is averaged (basis-invariant), the same at every step until the next refresh
        ek = EKFACCurvature(*problem, kfac=kf).with_factors(factors, eigen)
        starts = [f.start for f in ek.factors()]
        layer = [starts.index(b.start) for b in ek.blocks]  # each block's layer
        fresh = [{} for _ in factors]
        for i, blk, s in zip(layer, ek.blocks, ek.scalings()):
            fresh[i][blk.kind] = s
        if S is None:
            S = fresh
        else:
            eps = min(1.0 - 1.0 / k, self.ema_decay)
            S = [{kind: eps * old[kind] + (1 - eps) * new[kind] for kind in new}
                 for old, new in zip(S, fresh)]
        new_state.update(eigen=eigen, scalings=S, since_refresh=k)
        ek = ek.with_scalings([S[i][blk.kind] for i, blk in zip(layer, ek.blocks)])
        return ek.solve(g, lam, self.damping_mode, self.pi, self.damping_split)


__all__ = ["KFAC", "EKFAC"]
