"""Root-free RMSProp / Adam (Lin et al. 2024a): steps against Fig. 4 / Fig. 7 by hand,
the reparameterisation invariance, a planted constant, and the reference code's form."""
import numpy as np
import pytest

import refngd
from refngd import nn, optim
from refngd.losses import CrossEntropy

import handmlp

TOL = 1e-12


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def batches(X, y, sizes):
    """Consecutive batches of the given sizes (different N exercise the factor B = N)."""
    out, i = [], 0
    for n in sizes:
        out.append((X[i:i + n], y[i:i + n]))
        i += n
    return out


def hand_rfrmsprop(theta, bs, lr, beta2, lam, mom, wd, h=3, C=3, reduction="mean"):
    """Fig. 4 / Fig. 7 transcribed: s ← (1 − β₂)s + β₂ B g², b ← α₁ b + g/(s + λ) + γθ."""
    s, buf, out = np.ones_like(theta), np.zeros_like(theta), [theta]
    for X, y in bs:
        P = handmlp.pieces(theta, X, y, h, C, reduction)
        g = handmlp.grad_vector(P["grads"])
        B = X.shape[0] if reduction == "mean" else 1.0
        s = (1 - beta2) * s + beta2 * B * g * g
        buf = mom * buf + (g / (s + lam) + wd * theta)
        theta = theta - lr * buf
        out.append(theta)
    return out


def hand_rfadam(theta, bs, lr, b1, b2, lam, wd, bias_correction, h=3, C=3):
    """``rfadamw.py`` transcribed (its fixed ``batch_size`` B): v₀ = 1/B, v ← β₂ v + (1 − β₂) g²,
    θ ← θ(1 − lr γ) − lr m̂/(B v̂ + λ).  refngd keeps s = B v with the batch's own B inside
    the average (Fig. 4's form); the two agree for a constant batch size."""
    m, out, v = np.zeros_like(theta), [theta], None
    for t, (X, y) in enumerate(bs, start=1):
        B = X.shape[0]
        if v is None:
            v = np.ones_like(theta) / B
        P = handmlp.pieces(theta, X, y, h, C)
        g = handmlp.grad_vector(P["grads"])
        theta = theta * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        c1, c2 = (1 - b1**t, 1 - b2**t) if bias_correction else (1.0, 1.0)
        theta = theta - (lr / c1) * m / (v * B / c2 + lam)
        out.append(theta)
    return out


def run(opt, model, theta, loss, bs):
    state, out = opt.init(theta), [theta]
    for X, y in bs:
        theta, state, _ = opt.step(theta, state, model, loss, X, y)
        out.append(theta)
    return out


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("mom,wd", [(0.0, 0.0), (0.9, 0.01)])
def test_rfrmsprop_equals_fig4_by_hand(reduction, mom, wd):
    model, theta, _, X, y = handmlp.make(N=18, reduction=reduction)
    loss = CrossEntropy(reduction=reduction)
    bs = batches(X, y, (8, 4, 6))
    opt = optim.RFRMSProp(lr=0.05, beta2=0.3, damping=1e-3, momentum=mom, weight_decay=wd)
    for a, b in zip(run(opt, model, theta, loss, bs),
                    hand_rfrmsprop(theta, bs, 0.05, 0.3, 1e-3, mom, wd, reduction=reduction)):
        close(a, b)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_rfadam_equals_reference_form_by_hand(bias_correction):
    model, theta, loss, X, y = handmlp.make(N=18)
    bs = batches(X, y, (6, 6, 6))
    opt = optim.RFAdam(lr=0.02, betas=(0.8, 0.9), damping=1e-3, weight_decay=0.05,
                       bias_correction=bias_correction)
    hand = hand_rfadam(theta, bs, 0.02, 0.8, 0.9, 1e-3, 0.05, bias_correction)
    for a, b in zip(run(opt, model, theta, loss, bs), hand):
        close(a, b)


def test_first_rfrmsprop_step_with_beta2_one_is_diagonal_newton_on_the_ef():
    """β₂ = 1: s = B g², which is diag of the EF c Σ g_n g_nᵀ when N = 1 (the paper's estimate is exact)."""
    model, theta, loss, X, y = handmlp.make(N=1)
    ef = refngd.curvature.EmpiricalFisher(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    close(optim.RFRMSProp(beta2=1.0, damping=0.0).direction(theta, optim.RFRMSProp().init(theta),
                                                            model, loss, X, y), g / ef.diagonal())


def _rescaled(model, theta, kappa, d=4, h=3, C=3):
    W1, b1, W2, b2 = handmlp.unpack(theta, d, h, C)
    return handmlp.pack(W1 / kappa, b1, W2, b2)


@pytest.mark.parametrize("kappa", [10.0, 0.1])
def test_rootfree_invariant_to_rescaling_a_layers_inputs(kappa):
    """Inputs X → κX with W₁ → W₁/κ is the same network; the root-free step (λ = 0, s from the
    batch: β₂ = 1) moves it identically, step after step.  Adam's step does not."""
    model, theta, loss, X, y = handmlp.make(N=16)
    bs = batches(X, y, (8, 8, 8)[:2])
    opt = optim.RFRMSProp(lr=0.1, beta2=1.0, damping=0.0, momentum=0.9)
    plain = run(opt, model, theta, loss, bs)
    scaled = run(opt, model, _rescaled(model, theta, kappa), loss, [(kappa * Xb, yb) for Xb, yb in bs])
    for a, b in zip(plain, scaled):
        close(model.forward(b, kappa * X), model.forward(a, X), 1e-10)
        close(b, _rescaled(model, a, kappa), 1e-10)
    adam = optim.Adam(lr=0.1)
    pa, sa = run(adam, model, theta, loss, bs), run(adam, model, _rescaled(model, theta, kappa), loss,
                                                    [(kappa * Xb, yb) for Xb, yb in bs])
    assert np.abs(model.forward(sa[-1], kappa * X) - model.forward(pa[-1], X)).max() > 1e-3


def test_batch_factor_makes_mean_and_sum_reductions_agree():
    """Fig. 4's B (= 1/c): with it the root-free step is the same for a mean and a sum loss
    (MSE mean has c = 1/(N·C)), once s no longer remembers s₀ = 1 and λ = 0: then
    g/(B g ⊙ g) = 1/(B c g_sum) = 1/g_sum.  The planted test below shows it fails without B."""
    from refngd.losses import MSELoss

    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    theta, X, Y = model.init(rng), rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    for opt in (optim.RFRMSProp(beta2=1.0, damping=0.0), optim.RFAdam(betas=(0.9, 0.0), damping=0.0)):
        outs = [run(opt, model, theta, MSELoss(reduction=r), [(X, Y)] * 3)[-1] for r in ("mean", "sum")]
        close(outs[0], outs[1], 1e-10)


def test_planted_wrong_batch_factor_fails(monkeypatch):
    """Plant B = 1 instead of 1/c (the constant Fig. 4 marks in red): the hand check must fail."""
    from refngd.optim import rootfree

    monkeypatch.setattr(rootfree, "loss_count", lambda loss, Z: 1.0)
    with pytest.raises(AssertionError):
        test_rfrmsprop_equals_fig4_by_hand("mean", 0.0, 0.0)
    with pytest.raises(AssertionError):
        test_rfadam_equals_reference_form_by_hand(False)
    with pytest.raises(AssertionError):
        test_batch_factor_makes_mean_and_sum_reductions_agree()


def test_rootfree_bad_input():
    with pytest.raises(ValueError, match="beta2"):
        optim.RFRMSProp(beta2=0.0)
    with pytest.raises(ValueError, match="damping"):
        optim.RFAdam(damping=-1.0)
    with pytest.raises(ValueError, match="betas"):
        optim.RFAdam(betas=0.9)
    with pytest.raises(ValueError, match="lacks"):
        opt = optim.RFAdam()
        model, theta, loss, X, y = handmlp.make()
        opt.step(theta, optim.Adam().init(theta), model, loss, X, y)


def test_batch_estimate_is_the_ef_diagonal_only_for_zero_mean_independent_gradients():
    """B g⊙g = c (Σ_n g_n)⊙(Σ_n g_n) while diag EF = c Σ_n g_n⊙g_n (c = 1/N, B = N): they differ
    by the cross terms c Σ_{n≠m} g_n⊙g_m.  Averaged over independent zero-mean signs ε_n on the
    per-sample gradients (all 2^N patterns, exactly), c (Σ ε_n g_n)² is diag EF; on a real batch
    the cross terms do not vanish (the ratio spreads far from 1)."""
    import itertools

    N = 6
    model, theta, loss, X, y = handmlp.make(seed=4, N=N)
    gs = np.stack([refngd.gradient(model, theta, loss, X[n:n + 1], y[n:n + 1]) for n in range(N)])
    ef_diag = refngd.curvature.EmpiricalFisher(model, theta, loss, X, y).diagonal()
    close(ef_diag, (gs * gs).sum(0) / N)
    g = refngd.gradient(model, theta, loss, X, y)
    B = N
    close(B * g * g, gs.sum(0) ** 2 / N)
    signs = np.array(list(itertools.product((-1.0, 1.0), repeat=N)))
    close(np.mean([(e @ gs) ** 2 / N for e in signs], axis=0), ef_diag)
    ratio = (B * g * g) / ef_diag
    assert ratio.max() > 2.0 and ratio.min() < 0.5, (ratio.min(), np.median(ratio), ratio.max())
