"""First-order baselines: SGD (momentum, Nesterov), AdaGrad, Adam, AdamW and Adafactor.

Each class states its update and source; the formulas and defaults are PyTorch's
(``torch.optim.SGD``, ``torch.optim.Adagrad``, ``torch.optim.Adam``, ``torch.optim.AdamW``)
and, for Adafactor,
Shazeer & Stern (2018), Algorithms 4 and 5.
"""
from __future__ import annotations

import math

from ..backend import namespace
from .base import (
    Optimizer,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    evaluate_batch,
    momentum_step,
    param_blocks,
    rms,
    zeros_like,
)


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum and Nesterov, as ``torch.optim.SGD``.

    With g the batch gradient (plus ``weight_decay``·θ, coupled L2 as PyTorch):

        b_t = μ b_{t−1} + g_t    (b_1 = g_1)
        d_t = g_t + μ b_t  (Nesterov)   or   b_t   (heavy ball)   or   g_t  (μ = 0)
        θ_t = θ_{t−1} − lr · d_t
    """

    name = "sgd"
    _hyper = ("lr", "momentum", "nesterov", "weight_decay")

    def __init__(self, lr: float = 0.1, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        self.lr = check_lr(lr)
        self.momentum = check_unit_interval(momentum, "momentum")
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov=True needs momentum > 0.")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")

    def init(self, theta):
        return {"step": 0, "momentum_buffer": None}

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "momentum_buffer")
        batch = evaluate_batch(model, theta, loss, X, y)
        new, buf = momentum_step(theta, batch.g, state["momentum_buffer"], self.lr, self.momentum,
                                 self.weight_decay, self.nesterov)
        return new, {"step": state["step"] + 1, "momentum_buffer": buf}, self._info(batch, theta, new)


class AdaGrad(Optimizer):
    """AdaGrad with a diagonal preconditioner (Duchi, Hazan & Singer 2011, JMLR 12,
    "Adaptive subgradient methods", Figure 1, the diagonal case), as ``torch.optim.Adagrad``.

    With g the batch gradient (plus ``weight_decay``·θ, coupled L2 as PyTorch) and t the step:

        s_t = s_{t−1} + g_t²                 (s_0 = ``initial_accumulator_value``)
        θ_t = θ_{t−1} − lr_t · g_t / (√s_t + ε),   lr_t = lr / (1 + (t − 1)·lr_decay)

    The accumulated squares are never forgotten (unlike Adam's moving average), so the
    per-coordinate step only shrinks.  Defaults are PyTorch's (lr 0.01, ε = 1e-10).
    """

    name = "adagrad"
    _hyper = ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")

    def __init__(self, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10):
        self.lr = check_lr(lr)
        self.lr_decay = check_nonnegative(lr_decay, "lr_decay")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.initial_accumulator_value = check_nonnegative(initial_accumulator_value,
                                                           "initial_accumulator_value")
        self.eps = check_nonnegative(eps, "eps")

    def init(self, theta):
        return {"step": 0, "sum": zeros_like(theta) + self.initial_accumulator_value}

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "sum")
        batch = evaluate_batch(model, theta, loss, X, y)
        g = batch.g + self.weight_decay * theta if self.weight_decay else batch.g
        xp = namespace(g)
        t = state["step"] + 1
        s = state["sum"] + g * g
        lr_t = self.lr / (1 + (t - 1) * self.lr_decay)
        new = theta - lr_t * g / (xp.sqrt(s) + self.eps)
        return new, {"step": t, "sum": s}, self._info(batch, theta, new)


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1), as ``torch.optim.Adam``.

        m_t = β₁ m_{t−1} + (1 − β₁) g_t,   v_t = β₂ v_{t−1} + (1 − β₂) g_t²
        m̂_t = m_t / (1 − β₁ᵗ),              v̂_t = v_t / (1 − β₂ᵗ)
        θ_t = θ_{t−1} − lr · m̂_t / (√v̂_t + ε)

    ``weight_decay`` adds λθ to g (coupled L2, as ``torch.optim.Adam``); use
    :class:`AdamW` for decoupled weight decay.  ``eps = 0`` is allowed: a coordinate whose
    gradients have all been exactly 0 has m = v = 0 and takes no step (0, not 0/0 = NaN).
    """

    name = "adam"
    _hyper = ("lr", "betas", "eps", "weight_decay")
    _decoupled = False

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        self.lr = check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
        self.betas = (check_unit_interval(betas[0], "beta1"), check_unit_interval(betas[1], "beta2"))
        self.eps = check_nonnegative(eps, "eps")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")

    def init(self, theta):
        return {"step": 0, "exp_avg": zeros_like(theta), "exp_avg_sq": zeros_like(theta)}

    def direction(self, g, state):
        """The bias-corrected Adam direction m̂/(√v̂ + ε) and the new moments."""
        xp = namespace(g)
        b1, b2 = self.betas
        t = state["step"] + 1
        m = b1 * state["exp_avg"] + (1 - b1) * g
        v = b2 * state["exp_avg_sq"] + (1 - b2) * g * g
        denom = xp.sqrt(v / (1 - b2**t)) + self.eps
        ok = denom > 0  # false only where v = 0, hence m = 0: no step there, not 0/0
        d = xp.where(ok, (m / (1 - b1**t)) / xp.where(ok, denom, 1.0), 0.0)
        return d, m, v

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "exp_avg", "exp_avg_sq")
        batch = evaluate_batch(model, theta, loss, X, y)
        g = batch.g
        if self.weight_decay and not self._decoupled:
            g = g + self.weight_decay * theta
        d, m, v = self.direction(g, state)
        base = theta * (1 - self.lr * self.weight_decay) if self._decoupled else theta
        new = base - self.lr * d
        state = {"step": state["step"] + 1, "exp_avg": m, "exp_avg_sq": v}
        return new, state, self._info(batch, theta, new)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019), as ``torch.optim.AdamW``: decoupled weight decay.

        θ_t = θ_{t−1}(1 − lr·λ) − lr · m̂_t / (√v̂_t + ε)

    with m̂, v̂ of the *plain* gradient (see :class:`Adam`).  Default λ = 0.01, as PyTorch.
    """

    name = "adamw"
    _decoupled = True

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(lr, betas, eps, weight_decay)


class Adafactor(Optimizer):
    """Adafactor (Shazeer & Stern 2018, Algorithms 4 (matrices) and 5 (vectors)).

    For every parameter array X (biases are vectors; a weight is viewed as the matrix
    (out, rest), so a Conv2d kernel (out, in, kh, kw) is factored as (out, in·kh·kw)):

        β̂₂ₜ = 1 − t^(−decay_rate),  ρ_t = lr  or, with ``lr=None``, min(10⁻², 1/√t)
        matrix:  R_t = β̂₂ₜ R_{t−1} + (1 − β̂₂ₜ)(G_t² + ε₁) 1_m        (row sums)
                 C_t = β̂₂ₜ C_{t−1} + (1 − β̂₂ₜ) 1_nᵀ(G_t² + ε₁)      (column sums)
                 V̂_t = R_t C_t / (1_nᵀ R_t)
        vector:  V̂_t = β̂₂ₜ V̂_{t−1} + (1 − β̂₂ₜ)(G_t² + ε₁)
        U_t = G_t / √V̂_t,   Û_t = U_t / max(1, RMS(U_t)/d)
        α_t = max(ε₂, RMS(X_{t−1})) ρ_t   (``scale_parameter``; else α_t = ρ_t)
        X_t = X_{t−1} − α_t Û_t

    Defaults are the paper's: ε₁ = 10⁻³⁰, ε₂ = 10⁻³, d = 1, decay_rate = 0.8, no
    momentum; ``eps1 = 0`` is allowed (a coordinate with V̂ = 0 has G = 0 and takes no step,
    not 0/0).  ``beta1`` > 0 adds the optional first moment of the clipped, scaled step,
    m_t = β₁ m_{t−1} + (1 − β₁) α_t Û_t (m₀ = 0), and then X_t = X_{t−1} − m_t.  A
    :class:`refngd.FunctionModel` has no parameter shapes: θ is one vector block.
    """

    name = "adafactor"
    _hyper = ("lr", "eps1", "eps2", "clip_threshold", "decay_rate", "beta1", "scale_parameter")

    def __init__(self, lr: float | None = None, eps1: float = 1e-30, eps2: float = 1e-3,
                 clip_threshold: float = 1.0, decay_rate: float = 0.8, beta1: float = 0.0,
                 scale_parameter: bool = True):
        self.lr = None if lr is None else check_lr(lr)
        self.eps1 = check_nonnegative(eps1, "eps1")
        self.eps2 = check_nonnegative(eps2, "eps2")
        self.clip_threshold = check_positive(clip_threshold, "clip_threshold")
        self.decay_rate = check_positive(decay_rate, "decay_rate")
        self.beta1 = check_unit_interval(beta1, "beta1")
        self.scale_parameter = bool(scale_parameter)

    def init(self, theta):
        # moment statistics are created on the first step, when the model's shapes are known
        return {"step": 0, "factors": None, "exp_avg": None}

    def _rho(self, t: int) -> float:
        return self.lr if self.lr is not None else min(1e-2, 1.0 / math.sqrt(t))

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "factors", "exp_avg")
        xp = namespace(theta)
        batch = evaluate_batch(model, theta, loss, X, y)
        t = state["step"] + 1
        beta2 = 1.0 - t ** (-self.decay_rate)  # β̂₂₁ = 0: the first step uses G₁² alone
        rho = self._rho(t)
        blocks = param_blocks(model, theta.shape[0])
        old = state["factors"] or [None] * len(blocks)
        factors, parts = [], []
        for (start, stop, shape), prev in zip(blocks, old):
            G = batch.g[start:stop]
            G2 = G * G + self.eps1
            if len(shape) >= 2:
                G2 = G2.reshape(shape[0], -1)
                r, c = G2.sum(axis=1), G2.sum(axis=0)
                if prev is not None:
                    r, c = beta2 * prev[0] + (1 - beta2) * r, beta2 * prev[1] + (1 - beta2) * c
                V = xp.outer(r, c).reshape(-1) / r.sum()
                factors.append((r, c))
            else:
                V = G2 if prev is None else beta2 * prev[0] + (1 - beta2) * G2
                factors.append((V,))
            ok = V > 0  # V = 0 (possible with eps1 = 0) only where G = 0: U = 0 there, not 0/0
            U = xp.where(ok, G / xp.sqrt(xp.where(ok, V, 1.0)), 0.0)
            U = U / max(1.0, rms(U) / self.clip_threshold)
            alpha = max(self.eps2, rms(theta[start:stop])) * rho if self.scale_parameter else rho
            parts.append(alpha * U)
        step = xp.concatenate(parts) if parts else zeros_like(theta)
        m = None
        if self.beta1:
            prev_m = state["exp_avg"] if state["exp_avg"] is not None else zeros_like(theta)
            m = self.beta1 * prev_m + (1 - self.beta1) * step
            step = m
        new = theta - step
        state = {"step": t, "factors": factors, "exp_avg": m}
        return new, state, self._info(batch, theta, new, rho=rho)


__all__ = ["SGD", "Adam", "AdamW", "Adafactor"]
