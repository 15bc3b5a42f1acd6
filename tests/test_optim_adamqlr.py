"""AdamQLR (Clarke & Hernández-Lobato 2024): steps against the algorithm by hand (dense
GGN from HIPS autograd Jacobians), the exact quadratic case ρ = 1, the damping rule, and
a planted constant."""
import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from refngd import nn, optim
from refngd.losses import MSELoss
from refngd.optim.adamqlr import levenberg_marquardt

import handmlp

TOL = 1e-12
D_IN, H, C = 4, 3, 3


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(np.asarray(b)).max())))


def logits(theta, X):
    i, ps = 0, []
    for shape in ((H, D_IN), (H,), (C, H), (C,)):
        n = int(np.prod(shape))
        ps.append(anp.reshape(theta[i:i + n], shape))
        i += n
    W1, b1, W2, b2 = ps
    return anp.dot(anp.tanh(anp.dot(X, W1.T) + b1), W2.T) + b2


def ggn_quadratic(theta, X, d):
    """dᵀ F d, F = (1/N) Σ J_nᵀ (diag p − p pᵀ) J_n, J from autograd."""
    J = autograd.jacobian(logits)(theta, X)              # (N, C, P)
    Z = logits(theta, X)
    p = np.exp(Z - Z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    Jd = J @ d                                            # (N, C)
    return float(np.mean((Jd * (p * Jd)).sum(1) - (p * Jd).sum(1) ** 2))


def hand_adamqlr(theta, bs, lam, dec, inc, clip, b1=0.9, b2=0.999, eps=1e-8, wd=0.0, amp=1.0):
    m, v, out, rhos = np.zeros_like(theta), np.zeros_like(theta), [theta], []
    for t, (X, y) in enumerate(bs, start=1):
        P = handmlp.pieces(theta, X, y, H, C)
        g = handmlp.grad_vector(P["grads"])
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        d = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        q = ggn_quadratic(theta, X, d) + lam * d @ d
        step = -(g @ d) / q                                # the reference's sign: θ + step·d
        if clip is not None:
            step = np.clip(step, -clip, clip)
        step *= amp
        new = theta + step * d - wd * theta
        change = handmlp.pieces(new, X, y, H, C)["loss"] - P["loss"]
        rho = change / (0.5 * step**2 * q + step * (g @ d))
        lam = dec * lam if rho > 0.75 else (inc * lam if rho < 0.25 else lam)
        lam = max(lam, 1e-8)
        theta = new
        out.append(theta)
        rhos.append((rho, lam))
    return out, rhos


def problem():
    model, theta, loss, X, y = handmlp.make(seed=2, N=24, d=D_IN, h=H, C=C)
    return model, theta, loss, [(X[i:i + 8], y[i:i + 8]) for i in (0, 8, 16, 0, 8)]


@pytest.mark.parametrize("setting", ["untuned", "tuned_start", "unclipped", "clipped_earlier"])
def test_adamqlr_equals_algorithm_by_hand(setting):
    model, theta, loss, bs = problem()
    if setting == "untuned":
        opt, args = optim.AdamQLR.untuned(), (1e-3, 0.5, 2.0, None)
    elif setting == "tuned_start":
        opt, args = optim.AdamQLR.tuned_start(weight_decay=1e-3), (1.0, 0.95, 1.0526, None)
    elif setting == "clipped_earlier":   # the pre-camera-ready AdamQLR_NoHPO.yaml, α_max = 0.1
        opt, args = optim.AdamQLR.untuned(lr_clip=0.1), (1e-3, 0.5, 2.0, 0.1)
    else:
        opt, args = optim.AdamQLR(lr_clip=None, damping=0.3, lr_scale=0.7), (0.3, 0.5, 2.0, None)
    kw = dict(wd=1e-3) if setting == "tuned_start" else dict(amp=0.7) if setting == "unclipped" else {}
    want, rhos = hand_adamqlr(theta, bs, *args, **kw)
    state, th = opt.init(theta), theta
    for (X, y), w, (rho, lam) in zip(bs, want[1:], rhos):
        th, state, info = opt.step(th, state, model, loss, X, y)
        close(th, w)
        close(info["rho"], rho, 1e-9)   # a difference of two losses over a model change
        close(state["damping"], lam)


def test_published_defaults():
    """The camera-ready settings (reference code at its ICML 2024 commit, whose README names
    ``AdamQLR_NoHPO_NoLRClipping.yaml`` as AdamQLR (Untuned) and
    ``AdamQLR_Damped_NoLRClipping.yaml`` as AdamQLR (Tuned)): no learning-rate clipping."""
    from refngd.optim.adamqlr import SEARCH_SPACE, UNTUNED_BATCH_SIZE

    u = optim.AdamQLR.untuned()
    assert (u.damping, u.damping_decrease, u.damping_increase) == (1e-3, 0.5, 2.0)
    assert u.lr_clip is None and u.damping_bounds == (1e-8, None)
    assert (u.betas, u.eps, u.lr_scale, u.weight_decay) == ((0.9, 0.999), 1e-8, 1.0, 0.0)
    assert repr(optim.AdamQLR()) == repr(u)      # the defaults are the untuned setting
    assert UNTUNED_BATCH_SIZE == 3200
    t = optim.AdamQLR.tuned_start()
    assert (t.damping, t.damping_decrease, t.damping_increase) == (1.0, 0.95, 1.0526)
    assert t.lr_clip is None and t.betas == (0.9, 0.999) and t.eps == 1e-8
    # the search: λ₀, ω_dec, ω_inc and the batch size, each on its own; not Adam's β, ε
    assert SEARCH_SPACE == {
        "damping": ("loguniform", 1e-8, 1.0),
        "damping_decrease": ("loguniform", 0.5, 1.0),
        "damping_increase": ("loguniform", 1.0, 4.0),
        "batch_size": ("choice", (50, 100, 200, 400, 800, 1600, 3200))}
    assert not {"betas", "eps", "lr_clip"} & set(SEARCH_SPACE)
    assert optim.AdamQLR.tuned_start(lr_clip=0.03).lr_clip == 0.03   # the earlier config


def test_default_step_is_not_clipped():
    """A step whose model-optimal α exceeds the earlier 0.1 cap is taken in full by default."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 2))
    theta, X, Y = model.init(rng), rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    free = optim.AdamQLR().step(theta, optim.AdamQLR().init(theta), model, MSELoss(), X, Y)[2]
    capped = optim.AdamQLR(lr_clip=0.1)
    capped_info = capped.step(theta, capped.init(theta), model, MSELoss(), X, Y)[2]
    assert free["step_size"] > 0.1 and capped_info["step_size"] == 0.1


def test_exact_quadratic_has_unit_reduction_ratio():
    """Linear model + MSE: the GGN is the Hessian and the loss is its quadratic model, so with
    λ = 0 and no clipping ρ = 1 and α minimises L(θ − α d) exactly (dL/dα = 0 at the new θ)."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 2))
    theta, X, Y = model.init(rng), rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    opt = optim.AdamQLR(damping=0.0, lr_clip=None, damping_bounds=(0.0, None))
    state = opt.init(theta)
    for _ in range(3):
        d = opt.direction(theta, state, model, MSELoss(), X, Y)
        new, state, info = opt.step(theta, state, model, MSELoss(), X, Y)
        assert abs(info["rho"] - 1.0) < 1e-10
        from refngd import gradient

        assert abs(float(gradient(model, new, MSELoss(), X, Y) @ d)) < 1e-12
        theta = new


def test_levenberg_marquardt_rule():
    assert levenberg_marquardt(1.0, 0.8, 0.5, 2.0, (1e-8, None)) == 0.5
    assert levenberg_marquardt(1.0, 0.5, 0.5, 2.0, (1e-8, None)) == 1.0
    assert levenberg_marquardt(1.0, 0.1, 0.5, 2.0, (1e-8, None)) == 2.0
    assert levenberg_marquardt(1.0, float("nan"), 0.5, 2.0, (1e-8, None)) == 1.0
    assert levenberg_marquardt(1e-8, 0.9, 0.5, 2.0, (1e-8, None)) == 1e-8


def test_planted_wrong_curvature_scale_fails(monkeypatch):
    """Plant the sum-reduced Fisher (a missing c = 1/N) in the quadratic model: the check fails."""
    from refngd.optim import adamqlr

    class Doubled(adamqlr.Fisher):
        def quadratic_form(self, v):
            return 8 * super().quadratic_form(v)

    monkeypatch.setattr(adamqlr, "Fisher", Doubled)
    with pytest.raises(AssertionError):
        test_adamqlr_equals_algorithm_by_hand("unclipped")


def test_adamqlr_bad_input():
    with pytest.raises(ValueError, match="damping_decrease"):
        optim.AdamQLR(damping_decrease=2.0)
    with pytest.raises(ValueError, match="lr_clip"):
        optim.AdamQLR(lr_clip=0.0)
