"""FAdam: Adam read as natural gradient with the diagonal empirical Fisher (Hwang 2024).

D. Hwang (2024), "FAdam: Adam is a natural gradient optimizer using diagonal empirical
Fisher information", arXiv:2405.12807, Algorithm 1.  With g_t the batch gradient and all
operations elementwise:

    β̂₂ = β₂ (1 − β₂^(t−1)) / (1 − β₂ᵗ)                 (bias correction moved into β₂)
    F̂_t = β̂₂ F̂_{t−1} + (1 − β̂₂) g_t²                  (diagonal empirical Fisher)
    ε̂_t = min(ε, ε₂ · RMS(g_t))                         (adaptive ε; ε̂ = ε if off)
    ḡ_t = g_t / (F̂_tᵖ + ε̂_t)                           (natural gradient, p = 1/2)
    ḡ_t ← ḡ_t / max(1, RMS(ḡ_t)/c)                      (clipping of the natural gradient)
    m_t = β₁ m_{t−1} + (1 − β₁) ḡ_t                      (momentum on the natural gradient)
    ḡ_w = θ_{t−1} / (F̂_tᵖ + ε̂_t),  ḡ_w ← ḡ_w / max(1, RMS(ḡ_w)/c)
    θ_t = θ_{t−1} − η (m_t + λ ḡ_w)                      (weight decay on the natural gradient)

β̂₂ makes F̂_t exactly Adam's bias-corrected v̂_t (1 − β̂₂ = (1 − β₂)/(1 − β₂ᵗ)), so
with β₁ = 0, no clipping (``clip=None``), λ = 0, p = 1/2 and a fixed ε, FAdam's step is
exactly Adam's step with β₁ = 0: lr · g/(√v̂ + ε).  (FAdam's m_t carries no 1/(1 − β₁ᵗ)
correction, so with β₁ > 0 the two differ in the first steps.)

Where the public reference code differs, and what refngd does
--------------------------------------------------------------
The PyTorch implementation ``lessw2020/FAdam_PyTorch`` (fadam.py):

* clips with ``ḡ / (max(1, RMS(ḡ)) / c)``, i.e. multiplies by c even when RMS(ḡ) < 1;
  the algorithm's ``ḡ / max(1, RMS(ḡ)/c)`` only shrinks.  They agree for c = 1 (the
  default).  **refngd follows the paper's formula.**
* realises the adaptive ε as ``min(ε, ε₂·RMS(g))`` with ε₂ = 10⁻³ per parameter tensor;
  refngd does the same (``eps2``; per parameter array of a :class:`refngd.nn.Sequential`,
  one RMS over θ for other models) and offers ``adaptive_eps=False`` for a fixed ε.
* initialises F̂ to ones; irrelevant, as β̂₂ = 0 at t = 1 makes F̂₁ = g₁².

RMS in the clipping is taken per parameter array (weight, bias), as in the reference code.
"""
from __future__ import annotations

from ..backend import namespace
from .base import (
    Optimizer,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    evaluate_batch,
    param_blocks,
    rms,
    zeros_like,
)


class FAdam(Optimizer):
    """Fisher Adam (Hwang 2024, Algorithm 1); see the module docstring for every formula.

    Parameters
    ----------
    lr : η.   betas : (β₁, β₂).   eps : ε.   eps2 : ε₂ of the adaptive ε.
    clip : c, or ``None`` to switch the clipping off.   p : the Fisher exponent (1/2).
    weight_decay : λ (the paper's default 0.1).   adaptive_eps : use ε̂_t (default) or ε.
    """

    name = "fadam"
    _hyper = ("lr", "betas", "eps", "eps2", "clip", "p", "weight_decay", "adaptive_eps")

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 eps2: float = 1e-3, clip: float | None = 1.0, p: float = 0.5,
                 weight_decay: float = 0.1, adaptive_eps: bool = True):
        self.lr = check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
        self.betas = (check_unit_interval(betas[0], "beta1"), check_unit_interval(betas[1], "beta2"))
        self.eps = check_nonnegative(eps, "eps")
        self.eps2 = check_nonnegative(eps2, "eps2")
        self.clip = None if clip is None else check_positive(clip, "clip")
        self.p = check_positive(p, "p")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.adaptive_eps = bool(adaptive_eps)

    def init(self, theta):
        return {"step": 0, "momentum": zeros_like(theta), "fim": zeros_like(theta)}

    def _clip(self, v):
        return v if self.clip is None else v / max(1.0, rms(v) / self.clip)

    def step(self, theta, state, model, loss, X, y, rng=None):
        self._check_state(state, "momentum", "fim")
        xp = namespace(theta)
        batch = evaluate_batch(model, theta, loss, X, y)
        g = batch.g
        b1, b2 = self.betas
        t = state["step"] + 1
        beta2_hat = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        fim = beta2_hat * state["fim"] + (1 - beta2_hat) * g * g
        nat, wd = [], []
        for start, stop, _ in param_blocks(model, theta.shape[0]):
            gb = g[start:stop]
            eps = min(self.eps, self.eps2 * rms(gb)) if self.adaptive_eps else self.eps
            denom = fim[start:stop] ** self.p + eps
            ok = denom > 0  # F̂ = 0 and ε̂ = 0 only where g = 0: no step there, not 0/0
            safe = xp.where(ok, denom, 1.0)
            nat.append(self._clip(xp.where(ok, gb / safe, 0.0)))
            if self.weight_decay:
                wd.append(self._clip(xp.where(ok, theta[start:stop] / safe, 0.0)))
        m = b1 * state["momentum"] + (1 - b1) * xp.concatenate(nat)
        step = m + self.weight_decay * xp.concatenate(wd) if self.weight_decay else m
        new = theta - self.lr * step
        state = {"step": t, "momentum": m, "fim": fim}
        return new, state, self._info(batch, theta, new)


__all__ = ["FAdam"]
