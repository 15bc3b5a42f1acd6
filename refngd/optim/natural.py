"""The exact natural-gradient family as optimizers: NGD, SF, EF and iEF.

Each step computes the exact (damped) update direction of :mod:`refngd.updates` on the
batch — one forward pass shared by the gradient and the curvature — and then

    d_t = direction(θ_{t−1}; batch, λ)                    (sign of the gradient)
    d_t ← d_t · ‖g_t‖ / ‖d_t‖      if normalize="grad"    (‖d_t‖ = ‖g_t‖)
    d_t ← d_t / ‖d_t‖              if normalize="unit"
    b_t = μ b_{t−1} + d_t          (heavy-ball momentum, μ = ``momentum``; b_t = d_t if μ = 0)
    θ_t = θ_{t−1} − lr · b_t

The normalised update
---------------------
EF and SF directions have an ill-conditioned scale: with the EF, G Δ = 1 (every
sample's loss is asked to change by one unit, whatever its size: the "inversely-scaled
projection" of Wu et al. 2024, §4), and with the SF, components of g outside the span of
the K·N sampled gradients are multiplied by 1/λ.  Wu et al. (2024) therefore train their
EF and SF baselines with a normalised update (their Appendix algorithms for exact EF and
SF).  refngd offers the two common normalisations; ``"grad"`` — the step keeps the
direction of d and the length of the gradient, so that lr has SGD's meaning — is the
default of :class:`EF` and :class:`SF`; NGD and iEF are not normalised by default.
"""
from __future__ import annotations

from abc import abstractmethod

from .. import updates
from ..options import FORM, FORMS, Form
from ..backend import check_damping
from .base import (
    Optimizer,
    apply_momentum,
    check_choice,
    check_int,
    check_lr,
    check_unit_interval,
    evaluate_batch,
    norm,
    require_rng,
)

_NORMALIZE = (None, "grad", "unit")


class _ExactNatural(Optimizer):
    """Shared step of NGD, SF, EF and iEF; subclasses define :meth:`direction`."""

    _hyper = ("lr", "damping", "momentum", "normalize")
    _default_normalize = None

    def __init__(self, lr: float = 1.0, damping: float = 1e-3, momentum: float = 0.0,
                 normalize: str | None = "default"):
        self.lr = check_lr(lr)
        self.damping = check_damping(damping)
        self.momentum = check_unit_interval(momentum, "momentum")
        if normalize == "default":
            normalize = self._default_normalize
        self.normalize = check_choice(normalize, "normalize", _NORMALIZE)

    def init(self, theta):
        return {"step": 0, "momentum_buffer": None}

    @abstractmethod
    def direction(self, model, theta, loss, X, y, lin, rng):
        """The method's (P,) direction at θ on the batch, sharing the forward pass ``lin``."""

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "momentum_buffer")
        batch = evaluate_batch(model, theta, loss, X, y)
        d = self.direction(model, theta, loss, X, y, batch.lin, rng)
        d_norm = norm(d)
        if self.normalize is not None and d_norm > 0:
            d = d * ((norm(batch.g) if self.normalize == "grad" else 1.0) / d_norm)
        step, buf = apply_momentum(state["momentum_buffer"], d, self.momentum)
        new = theta - self.lr * step
        info = self._info(batch, theta, new, direction_norm=d_norm, damping=self.damping)
        return new, {"step": state["step"] + 1, "momentum_buffer": buf}, info


class NGD(_ExactNatural):
    """Exact natural gradient descent: d = (F + λI)⁻¹ g (Amari 1998; :func:`refngd.updates.ngd`).

    F is the exact Fisher / GGN of the batch, solved through its NC × NC Gram matrix.
    With ``lr=1`` and λ → 0 on a linear least-squares problem, one step is the
    Gauss–Newton (here: Newton) step and lands on the least-squares solution.
    """

    name = "ngd"

    def direction(self, model, theta, loss, X, y, lin, rng):
        return updates.ngd(model, theta, loss, X, y, self.damping, linearization=lin)


class SF(_ExactNatural):
    """Sampled-Fisher natural gradient: d = (F̂ + λI)⁻¹ g, K = ``mc_samples`` labels per input.

    See :func:`refngd.updates.sf`.  Needs ``rng`` in :meth:`step`.  Normalised update
    (``normalize="grad"``) by default — see the module docstring.
    """

    name = "sf"
    _hyper = _ExactNatural._hyper + ("mc_samples",)
    _default_normalize = "grad"

    def __init__(self, lr: float = 0.1, damping: float = 1e-3, momentum: float = 0.0,
                 normalize: str | None = "default", mc_samples: int = 1):
        super().__init__(lr, damping, momentum, normalize)
        self.mc_samples = check_int(mc_samples, "mc_samples")

    def direction(self, model, theta, loss, X, y, lin, rng):
        rng = require_rng(rng, "SF")
        return updates.sf(model, theta, loss, X, y, self.damping, mc_samples=self.mc_samples,
                          rng=rng, linearization=lin)


class EF(_ExactNatural):
    """Empirical-Fisher update (Kunstner et al. 2019; Wu et al. 2024, eq. 4 Tikhonov form, eq. 5 Gram form).

    ``form="gram"`` (default, the paper's): Δ_EF = Gᵀ(GGᵀ + λI)⁻¹ 1 with G the
    per-sample gradients of the unreduced losses; ``form="tikhonov"``: (F̃ + λI)⁻¹ g.
    They coincide for λ_gram = λ_tikhonov / c (:mod:`refngd.updates`).  Normalised update
    (``normalize="grad"``) by default — see the module docstring.
    """

    name = "ef"
    _hyper = _ExactNatural._hyper + ("form",)
    _default_normalize = "grad"

    def __init__(self, lr: float = 0.1, damping: float = 1e-3, momentum: float = 0.0,
                 normalize: str | None = "default", form: Form = FORM):
        super().__init__(lr, damping, momentum, normalize)
        self.form = check_choice(form, "form", FORMS)

    def direction(self, model, theta, loss, X, y, lin, rng):
        return updates.ef(model, theta, loss, X, y, self.damping, form=self.form, linearization=lin)


class IEF(_ExactNatural):
    """Improved-empirical-Fisher update (Wu et al. 2024, eq. 8; its matrix is eq. 14; Algorithm 1 there).

    ``form="gram"`` (default, the paper's): Δ_iEF = Gᵀ(GGᵀ + λI)⁻¹ s, s_n = ‖e_n‖², so
    that to first order every sample's loss decreases by lr·‖e_n‖²;
    ``form="tikhonov"``: (F̃* + λI)⁻¹ g.  Not normalised by default.
    """

    name = "ief"
    _hyper = _ExactNatural._hyper + ("form",)

    def __init__(self, lr: float = 1.0, damping: float = 1e-3, momentum: float = 0.0,
                 normalize: str | None = "default", form: Form = FORM):
        super().__init__(lr, damping, momentum, normalize)
        self.form = check_choice(form, "form", FORMS)

    def direction(self, model, theta, loss, X, y, lin, rng):
        return updates.ief(model, theta, loss, X, y, self.damping, form=self.form, linearization=lin)


__all__ = ["NGD", "SF", "EF", "IEF"]
