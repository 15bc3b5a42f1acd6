"""SIRFShampoo: inverse-free, root-free Shampoo (Lin et al. 2024a, dense Kronecker factors).

The non-diagonal root-free method of Lin, Dangel, Eschenhagen, Bae, Turner & Makhzani
(2024), "Can we remove the square-root in adaptive gradient methods? A second-order
perspective", ICML 2024, arXiv:2402.03496 ("IF-Shampoo" in their code,
``yorkerlin/remove-the-square-root/myoptim/ifshampoo.py``), as the authors' package
``sirfshampoo`` (``f-dangel/sirfshampoo``, ``sirfshampoo/optimizer.py``) implements it with
dense factors.  That package rescales K inside the update for float16 stability ("the update
reads differently to the version in the paper"); refngd writes the same update with the
scalings cancelled, which is what the tests check against the package.

Shampoo's curvature is the empirical Fisher of one parameter array P (shape d_1 × … × d_N)
approximated from its batch gradient G as B vec(G) vec(G)ᵀ (B = 1/c, as the diagonal
root-free method, :mod:`refngd.optim.rootfree`), in Kronecker form.  Each array keeps one
factor K_n (d_n × d_n) per axis with ⊗_n K_n K_nᵀ approximating the *inverse* of that
curvature — no root (Shampoo takes the −1/(2N)-th power of its factors) and no inverse.
Every T steps, with all K from before the update:

    Ĝ = G ×_1 K_1ᵀ ×_2 … ×_N K_Nᵀ,   H_n = Ĝ_(n) Ĝ_(n)ᵀ   (Ĝ_(n): axis n unfolded, d_n × rest)
    t_m = tr(K_mᵀ K_m) / d_m
    μ_n = ½ [ B / (Π_{m≠n} d_m) · H_n + λ (Π_{m≠n} t_m) K_nᵀ K_n − I ]
    m_n ← α₂ m_n + (1 − α₂) μ_n                              (Riemannian momentum)
    K_n ← K_n (I − β₂ m_n / max(1, ‖m_n‖_F))                 (normalised first-order step)

then, every step,

    d = G ×_1 K_1 K_1ᵀ ×_2 … ×_N K_N K_Nᵀ,   b ← α₁ b + (d + κ θ),   θ ← θ − lr · b

with K_n = I, m_n = 0 at the start and weights and biases preconditioned separately (the
package's default: a Linear weight has two factors, its bias one, a Conv2d weight four).
refngd's names: ``lr`` (β₁ in the paper), ``lr_cov`` (β₂), ``momentum`` (α₁),
``alpha2`` (α₂), ``damping`` (λ), ``weight_decay`` (κ), ``update_every`` (T).

The structure mirrors INGD (:mod:`refngd.optim.singd`): H_n plays H_K, the trace products
the adaptive damping; INGD's curvature is K-FAC's (inputs × output gradients), this one
Shampoo's (the gradient's own axes).  Not implemented: structured factors.
"""
from __future__ import annotations

import math

from ..backend import namespace, to_float
from .base import (
    Optimizer,
    check_int,
    check_lr,
    check_nonnegative,
    check_positive,
    check_unit_interval,
    evaluate_batch,
    momentum_step,
    norm,
    param_blocks,
)
from .rootfree import loss_count


def mode_product(T, M, n: int):
    """T ×_n M: M (e × d_n) applied to axis n of T."""
    xp = namespace(T)
    return xp.moveaxis(xp.tensordot(M, T, axes=(1, n)), 0, n)


def unfold_gram(T, n: int):
    """T_(n) T_(n)ᵀ: the Gram matrix of axis n against all the others."""
    xp = namespace(T)
    Tn = xp.moveaxis(T, n, 0).reshape(T.shape[n], -1)
    return Tn @ Tn.T


def factor_steps(G, Ks, B: float, damping: float) -> list:
    """μ_n of every axis from the gradient array G and the current factors (module docstring)."""
    xp = namespace(G)
    Ghat = G
    for n, K in enumerate(Ks):
        Ghat = mode_product(Ghat, K.T, n)
    dims = G.shape
    t = [to_float(xp.sum(K * K)) / d for K, d in zip(Ks, dims)]  # tr(KᵀK)/d
    out = []
    for n, K in enumerate(Ks):
        others = [m for m in range(len(Ks)) if m != n]
        rest = math.prod(dims[m] for m in others)
        trace = math.prod(t[m] for m in others)
        mu = 0.5 * ((B / rest) * unfold_gram(Ghat, n) + damping * trace * (K.T @ K)
                    - xp.eye(dims[n], dtype=K.dtype))
        out.append(mu)
    return out


class SIRFShampoo(Optimizer):
    """Inverse-free, root-free Shampoo with dense factors (Lin et al. 2024a; ``sirfshampoo``).

    Parameters
    ----------
    lr : step size (β₁; package default 10⁻³).   lr_cov : β₂, factor step size (10⁻²).
    momentum : α₁ (0.9).   alpha2 : α₂, Riemannian momentum of the factors (0.5).
    damping : λ (10⁻³).   weight_decay : κ (0).   update_every : T (1).

    Notes
    -----
    Works for any model: every parameter array of :func:`refngd.optim.base.param_blocks`
    (a :class:`refngd.FunctionModel` is one vector, one factor) gets its own factors.
    The state holds per array the list of factors ``K`` and momenta ``m``.
    """

    name = "sirfshampoo"
    _hyper = ("lr", "lr_cov", "momentum", "alpha2", "damping", "weight_decay", "update_every")

    def __init__(self, lr: float = 1e-3, lr_cov: float = 1e-2, momentum: float = 0.9,
                 alpha2: float = 0.5, damping: float = 1e-3, weight_decay: float = 0.0,
                 update_every: int = 1):
        self.lr = check_lr(lr)
        self.lr_cov = check_positive(lr_cov, "lr_cov")
        self.momentum = check_unit_interval(momentum, "momentum")
        self.alpha2 = check_unit_interval(alpha2, "alpha2")
        self.damping = check_nonnegative(damping, "damping")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.update_every = check_int(update_every, "update_every")

    def init(self, theta):
        return {"step": 0, "K": None, "m": None, "momentum_buffer": None}

    def _precondition(self, theta, state, model, loss, X, y):
        self._check_state(state, "K", "m", "momentum_buffer")
        xp = namespace(theta)
        batch = evaluate_batch(model, theta, loss, X, y)
        blocks = param_blocks(model, theta.shape[0])
        Ks, ms = state["K"], state["m"]
        if Ks is None:
            Ks = [[xp.eye(d, dtype=xp.float64) for d in shape] for _, _, shape in blocks]
            ms = [[xp.zeros((d, d), dtype=xp.float64) for d in shape] for _, _, shape in blocks]
        grads = [batch.g[a:b].reshape(shape).astype(xp.float64) for a, b, shape in blocks]
        if state["step"] % self.update_every == 0:
            B = loss_count(loss, batch.lin.outputs)
            newK, newm = [], []
            for G, K_arr, m_arr in zip(grads, Ks, ms):
                mus = factor_steps(G, K_arr, B, self.damping)
                m_arr = [self.alpha2 * m + (1 - self.alpha2) * mu for m, mu in zip(m_arr, mus)]
                K_arr = [K - (self.lr_cov / max(1.0, to_float(xp.linalg.norm(m)))) * (K @ m)
                         for K, m in zip(K_arr, m_arr)]
                newK.append(K_arr)
                newm.append(m_arr)
            Ks, ms = newK, newm
        d = xp.zeros_like(theta)
        for (a, b, _), G, K_arr in zip(blocks, grads, Ks):
            for n, K in enumerate(K_arr):
                G = mode_product(G, K @ K.T, n)
            d[a:b] = G.reshape(-1).astype(theta.dtype)
        return batch, d, {"K": Ks, "m": ms}

    def direction(self, theta, state, model, loss, X, y, rng=None):
        """The preconditioned gradient G ×_n K_n K_nᵀ of this batch (after this step's factor
        update; no momentum, no weight decay)."""
        return self._precondition(theta, state, model, loss, X, y)[1]

    def step(self, theta, state, model, loss, X, y, rng=None):
        batch, d, factors = self._precondition(theta, state, model, loss, X, y)
        new, buf = momentum_step(theta, d, state["momentum_buffer"], self.lr, self.momentum,
                                 self.weight_decay)
        new_state = {"step": state["step"] + 1, **factors, "momentum_buffer": buf}
        return new, new_state, self._info(batch, theta, new, direction_norm=norm(d))


__all__ = ["SIRFShampoo", "factor_steps", "mode_product", "unfold_gram"]
