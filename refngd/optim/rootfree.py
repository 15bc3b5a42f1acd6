"""Root-free diagonal adaptive methods: RMSProp and Adam without the square root (Lin et al. 2024a).

W. Lin, F. Dangel, R. Eschenhagen, J. Bae, R. E. Turner, A. Makhzani (2024), "Can we remove
the square-root in adaptive gradient methods? A second-order perspective", ICML 2024,
arXiv:2402.03496.  Fig. 4 of the paper sets the diagonal root-free method beside RMSProp
for a loss averaged over a mini-batch; its appendix Fig. 7 adds damping, weight decay and
momentum.  The authors' reference code is ``yorkerlin/remove-the-square-root``
(``myoptim/rfrmsprop.py``, ``myoptim/rfadamw.py``); refngd follows it where the figure
leaves a choice open, and says so.

The curvature estimate.  With L = c Σ_n l_n (c = 1/N for a mean), the outer product of the
*batch* gradient underestimates the per-sample outer products by the number of averaged
terms: for independent zero-mean g_n, E[g gᵀ] = c² N E[g_n g_nᵀ] while the empirical
Fisher of L is c N E[g_n g_nᵀ].  Fig. 4 therefore multiplies g ⊙ g by the batch size B
(the paper's red B: "hyperparameters will be hard to tune if the scalar is not
included").  refngd writes B = 1/c, which is N for a mean and 1 for a sum, so that

    ŝ = (g ⊙ g) / c                      (estimate of diag of c Σ_n g_n g_nᵀ)
    s_t = (1 − β₂) s_{t−1} + β₂ ŝ_t,  s_0 = 1          (RMSProp form, Fig. 4)
    d_t = g_t / (s_t + λ)                no square root; λ is the damping

**RF-RMSProp** (Fig. 4 / Fig. 7; ``rfrmsprop.py``): weight decay is added to the
*preconditioned* direction and momentum acts on the result,

    b_t = α₁ b_{t−1} + (d_t + γ θ_{t−1}),   θ_t = θ_{t−1} − lr · b_t.

**RF-Adam** (``rfadamw.py``, the reference code's root-free AdamW): Adam's first moment and
decoupled weight decay around the root-free denominator,

    m_t = β₁ m_{t−1} + (1 − β₁) g_t,   v_t = β₂ v_{t−1} + (1 − β₂) g_t²,   v_0 = c (B v_0 = 1)
    θ_t = θ_{t−1}(1 − lr γ) − lr · (m_t / (1 − β₁ᵗ)) / (v_t / (c (1 − β₂ᵗ)) + λ)

with the bias corrections 1 − βᵗ only when ``bias_correction=True`` (the reference
code's default is off, so ``s = v/c`` starts at one as in Fig. 4).  Note the reading
of β₂: RF-RMSProp's β₂ is the *weight of the new estimate* (the paper's notation,
``lr_cov`` in the code), RF-Adam's is Adam's decay (``β₂ = 1 − lr_cov``).

Curvature approximated: the diagonal of the empirical Fisher c Σ_n g_n g_nᵀ
(:class:`refngd.curvature.EmpiricalFisher`), estimated from the batch gradient alone —
*under the assumption of the derivation above*, independent zero-mean per-sample gradients.
Exactly, B g ⊙ g = c (Σ_n g_n)⊙(Σ_n g_n) = diag EF + c Σ_{n≠m} g_n ⊙ g_m: the cross terms
average out only when the g_n are independent with zero mean; away from a stationary point
they do not (tests/test_optim_rootfree.py; on a small MLP batch the ratio B g²/diag EF
ranges from below 0.5 to above 2 across coordinates).  With N = 1 it is exact.

Defaults and their sources.  ``RFRMSProp``: β₂ = 0.01 is the reference code's default
(``models/CNNs/main_search.py``, ``--lr_cov`` 10⁻²; an earlier ``MyRmsProp`` defaulted to
``alpha=0.99``, i.e. β₂ = 1 − alpha = 0.01); the paper's tuned CNN runs
(``models/CNNs/best_run.sh``) use β₂ ≈ 6·10⁻⁴ – 1.2·10⁻³.  λ = 10⁻⁴ is the current
``MyRmsProp`` default ``eps=1e-4``.  ``lr`` = 10⁻³ is **refngd's choice**: the current class
requires ``lr``, the search script defaults to 10⁻², the tuned runs use 0.005 – 0.1; neither
the paper nor the code gives 10⁻³.  ``RFAdam``: lr = 10⁻³ and β = (0.9, 0.999) are the
defaults of ``rfadamw.py``; its λ = 10⁻⁴ is refngd's (the code's ``eps`` defaults to 10⁻⁸),
and so is weight decay 0 (the code's default is 10⁻²).

Invariance (the second-order motivation, tested in tests/test_optim_rootfree.py): a
Newton-type step g/s with s ∝ g² is invariant to any fixed diagonal rescaling of the
parameters, in particular to rescaling one layer's inputs by κ (W → W/κ gives g_W → κ g_W,
s_W → κ² s_W, step_W → step_W/κ: the network function moves identically).  The statement
is exact when λ = 0 and the initial s = 1 has been forgotten (β₂ = 1 in RF-RMSProp);
Adam's g/√v is instead invariant to rescaling the *loss* and not to this reparameterisation.
"""
from __future__ import annotations

from ..backend import namespace, to_float
from .base import (
    Optimizer,
    check_lr,
    check_nonnegative,
    check_unit_interval,
    evaluate_batch,
    momentum_step,
    norm,
)


def loss_count(loss, outputs) -> float:
    """B = 1/c, the number of per-sample losses the batch loss averages (N for a mean, 1 for a sum)."""
    return 1.0 / float(loss.scale(outputs))


def rootfree_second_moment(s, g, B: float, beta2: float):
    """s_t = (1 − β₂) s_{t−1} + β₂ B (g ⊙ g)  (Lin et al. 2024a, Fig. 4, β₂ the new estimate's weight)."""
    return (1.0 - beta2) * s + beta2 * (B * (g * g))


def rootfree_direction(g, s, damping: float):
    """d = g / (s + λ): the diagonal Newton-type step, no square root (Fig. 4)."""
    return g / (s + damping)


class RFRMSProp(Optimizer):
    """Root-free RMSProp (Lin et al. 2024a, Fig. 4 and Fig. 7); formulas in the module docstring.

    Parameters
    ----------
    lr : β₁ of the paper, the step size (default 10⁻³: refngd's choice, from neither the
        paper nor its code).   beta2 : β₂, weight of the new estimate B g²
        (``1 − alpha`` in ``torch.optim.RMSprop`` terms; default 0.01, the reference code's
        default — module docstring, "Defaults and their sources").
    damping : λ (the reference code's ``eps``, default 10⁻⁴).   momentum : α₁ (0).
    weight_decay : γ, added to the preconditioned direction.
    """

    name = "rfrmsprop"
    _hyper = ("lr", "beta2", "damping", "momentum", "weight_decay")

    def __init__(self, lr: float = 1e-3, beta2: float = 0.01, damping: float = 1e-4,
                 momentum: float = 0.0, weight_decay: float = 0.0):
        self.lr = check_lr(lr)
        self.beta2 = check_unit_interval(beta2, "beta2", closed_right=True)
        if self.beta2 == 0:
            raise ValueError("beta2 must be > 0: it is the weight of each new curvature estimate.")
        self.damping = check_nonnegative(damping, "damping")
        self.momentum = check_unit_interval(momentum, "momentum")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")

    def init(self, theta):
        # s_0 = 1 (Fig. 4: "we initialize s to 1"); the code stores s/B = 1/B.
        return {"step": 0, "s": namespace(theta).ones_like(theta), "momentum_buffer": None}

    def _precondition(self, theta, state, model, loss, X, y):
        self._check_state(state, "s", "momentum_buffer")
        batch = evaluate_batch(model, theta, loss, X, y)
        s = rootfree_second_moment(state["s"], batch.g, loss_count(loss, batch.lin.outputs), self.beta2)
        return batch, s, rootfree_direction(batch.g, s, self.damping)

    def direction(self, theta, state, model, loss, X, y, rng=None):
        """The preconditioned gradient g/(s_t + λ) of this batch (no momentum, no weight decay)."""
        return self._precondition(theta, state, model, loss, X, y)[2]

    def step(self, theta, state, model, loss, X, y, rng=None):
        batch, s, d = self._precondition(theta, state, model, loss, X, y)
        new, buf = momentum_step(theta, d, state["momentum_buffer"], self.lr, self.momentum,
                                 self.weight_decay)
        state = {"step": state["step"] + 1, "s": s, "momentum_buffer": buf}
        return new, state, self._info(batch, theta, new, direction_norm=norm(d),
                                      min_curvature=to_float(s.min()))


class RFAdam(Optimizer):
    """Root-free AdamW (Lin et al. 2024a; ``rfadamw.py``); formulas in the module docstring.

    Parameters
    ----------
    lr : step size.   betas : (β₁, β₂) as Adam's (β₂ = 1 − the paper's ``lr_cov``).
    damping : λ (the reference code's ``eps``, default 10⁻⁴).
    weight_decay : γ, decoupled (θ ← θ(1 − lr γ)).
    bias_correction : Adam's 1 − βᵗ corrections (default ``False``, as the reference code:
        then s_t = v_t/c starts at 1 as in Fig. 4).
    """

    name = "rfadam"
    _hyper = ("lr", "betas", "damping", "weight_decay", "bias_correction")

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), damping: float = 1e-4,
                 weight_decay: float = 0.0, bias_correction: bool = False):
        self.lr = check_lr(lr)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}.")
        self.betas = (check_unit_interval(betas[0], "beta1"), check_unit_interval(betas[1], "beta2"))
        self.damping = check_nonnegative(damping, "damping")
        self.weight_decay = check_nonnegative(weight_decay, "weight_decay")
        self.bias_correction = bool(bias_correction)

    def init(self, theta):
        # s = B v starts at 1; B = 1/c is only known with the first batch, so v is set there.
        xp = namespace(theta)
        return {"step": 0, "exp_avg": xp.zeros_like(theta), "s": xp.ones_like(theta)}

    def _precondition(self, theta, state, model, loss, X, y):
        self._check_state(state, "exp_avg", "s")
        batch = evaluate_batch(model, theta, loss, X, y)
        b1, b2 = self.betas
        t = state["step"] + 1
        g = batch.g
        m = b1 * state["exp_avg"] + (1 - b1) * g
        # B v_t = β₂ B v_{t−1} + (1 − β₂) B g²: the EMA kept directly in B-scaled form, s = B v.
        s = rootfree_second_moment(state["s"], g, loss_count(loss, batch.lin.outputs), 1 - b2)
        c1, c2 = (1 - b1**t, 1 - b2**t) if self.bias_correction else (1.0, 1.0)
        d = rootfree_direction(m / c1, s / c2, self.damping)
        return batch, m, s, d

    def direction(self, theta, state, model, loss, X, y, rng=None):
        """The step direction m̂_t/(ŝ_t + λ) of this batch (before weight decay)."""
        return self._precondition(theta, state, model, loss, X, y)[3]

    def step(self, theta, state, model, loss, X, y, rng=None):
        batch, m, s, d = self._precondition(theta, state, model, loss, X, y)
        base = theta * (1 - self.lr * self.weight_decay) if self.weight_decay else theta
        new = base - self.lr * d
        state = {"step": state["step"] + 1, "exp_avg": m, "s": s}
        return new, state, self._info(batch, theta, new, direction_norm=norm(d),
                                      min_curvature=to_float(s.min()))


__all__ = ["RFRMSProp", "RFAdam", "rootfree_second_moment", "rootfree_direction", "loss_count"]
