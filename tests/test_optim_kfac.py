"""refngd.optim.KFAC / EKFAC: running factors, inverse refresh, damping, KL-clip, LM rule.

The reference for a step is the curvature library: with one batch in the running averages
and T = 1, a K-FAC step must equal ``refngd.updates.kfac`` (and EKFAC ``updates.ekfac``)
on that batch — two independent implementations of the same inverse.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from test_kfac_ekfac import cluster_mean

import refngd
from refngd import nn, optim, updates
from refngd.curvature import KFAC as KFACCurvature
from refngd.curvature import Fisher
from refngd.losses import CrossEntropy


def problem(kind="mlp", seed=0, N=16):
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
        X = rng.standard_normal((N, 5))
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Conv2d(2, 3, 3, stride=2),
                              nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3))
        X = rng.standard_normal((N, 1, 5, 5))
    return model, model.init(rng), CrossEntropy(), X, rng.integers(0, 3, N)


def close(a, b, tol=1e-9):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode", ["tikhonov", "factored"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_first_kfac_step_equals_update(kind, mode, bias, fisher_type):
    model, th, loss, X, y = problem(kind)
    lr, lam = 0.7, 1e-2
    opt = optim.KFAC(lr, damping=lam, damping_mode=mode, bias=bias, fisher_type=fisher_type,
                     inverse_every=1, kl_clip=None)
    new, _, info = opt.step(th, opt.init(th), model, loss, X, y, rng=np.random.default_rng(4))
    d = updates.kfac(model, th, loss, X, y, lam, fisher_type=fisher_type, rng=np.random.default_rng(4),
                     bias=bias, damping_mode=mode)
    close(new, th - lr * d)
    assert info["kl_scale"] == 1.0 and info["damping"] == lam


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_first_ekfac_step_equals_update(kind, bias):
    model, th, loss, X, y = problem(kind, 1)
    lr, lam = 0.5, 1e-2
    opt = optim.EKFAC(lr, damping=lam, bias=bias, fisher_type="type-2", inverse_every=1, kl_clip=None)
    new, _, _ = opt.step(th, opt.init(th), model, loss, X, y)
    d = updates.ekfac(model, th, loss, X, y, lam, fisher_type="type-2", bias=bias)
    close(new, th - lr * d)


def batches(X, y, n):
    k = X.shape[0] // n
    return [(X[i * k:(i + 1) * k], y[i * k:(i + 1) * k]) for i in range(n)]


def test_running_factors_and_inverse_refresh():
    """A_t = ε_t A_{t−1} + (1 − ε_t) Â_t, ε_t = min(1 − 1/t, ε); eigh only every T steps."""
    model, th, loss, X, y = problem("mlp", 2, N=32)
    eps, T = 0.6, 2
    opt = optim.KFAC(0.1, ema_decay=eps, inverse_every=T, fisher_type="type-2", kl_clip=None)
    state, theta, ref = opt.init(th), th, None
    eig_prev = None
    for t, (Xb, yb) in enumerate(batches(X, y, 4), start=1):
        fac = KFACCurvature(model, theta, loss, Xb, yb, fisher_type="type-2").factors()
        e = min(1 - 1 / t, eps)
        ref = [(f.A, f.G) for f in fac] if ref is None else \
            [(e * A + (1 - e) * f.A, e * G + (1 - e) * f.G) for (A, G), f in zip(ref, fac)]
        theta, state, _ = opt.step(theta, state, model, loss, Xb, yb)
        for (A, G), (Ar, Gr) in zip(state["factors"], ref):
            close(A, Ar, 1e-12)
            close(G, Gr, 1e-12)
        refreshed = (t - 1) % T == 0
        if eig_prev is not None:
            same = all(np.array_equal(a[0][1], b[0][1]) for a, b in zip(state["eigen"], eig_prev))
            assert same != refreshed
        eig_prev = state["eigen"]


def test_stale_inverse_is_used_between_refreshes():
    """Step 2 with T = 2 uses step 1's eigenbasis with step 2's running factors' traces."""
    model, th, loss, X, y = problem("mlp", 3, N=32)
    (X1, y1), (X2, y2) = batches(X, y, 2)
    lam = 1e-2
    opt = optim.KFAC(1.0, damping=lam, damping_mode="tikhonov", inverse_every=2, ema_decay=0.5,
                     fisher_type="type-2", kl_clip=None)
    th1, s1, _ = opt.step(th, opt.init(th), model, loss, X1, y1)
    th2, s2, _ = opt.step(th1, s1, model, loss, X2, y2)
    g = refngd.gradient(model, th1, loss, X2, y2)
    d = np.zeros_like(g)
    start = 0
    for (A1, G1) in s1["factors"]:  # the eigenbasis (and eigenvalues) of step 1
        wA, UA = np.linalg.eigh(A1)
        wG, UG = np.linalg.eigh(G1)
        d_out, D = G1.shape[0], A1.shape[0]
        W = g[start:start + d_out * D].reshape(d_out, D)
        d[start:start + d_out * D] = (UG @ ((UG.T @ W @ UA) / (np.outer(np.maximum(wG, 0), np.maximum(wA, 0)) + lam)) @ UA.T).ravel()
        b = g[start + d_out * D:start + d_out * D + d_out]
        d[start + d_out * D:start + d_out * (D + 1)] = UG @ ((UG.T @ b) / (np.maximum(wG, 0) + lam))
        start += d_out * (D + 1)
    close(th2, th1 - d, 1e-8)


def test_kl_clip_scale():
    model, th, loss, X, y = problem("mlp", 4)
    lr, kappa, lam = 2.0, 1e-4, 1e-3
    opt = optim.KFAC(lr, damping=lam, kl_clip=kappa, inverse_every=1, fisher_type="type-2")
    new, _, info = opt.step(th, opt.init(th), model, loss, X, y)
    d = updates.kfac(model, th, loss, X, y, lam, fisher_type="type-2", damping_mode="factored")
    g = refngd.gradient(model, th, loss, X, y)
    nu = min(1.0, math.sqrt(kappa / (lr**2 * d @ g)))
    assert nu < 1 and info["kl_scale"] == pytest.approx(nu)
    close(new, th - lr * nu * d)


def test_momentum_and_levenberg_marquardt():
    model, th, loss, X, y = problem("mlp", 5)
    lam = 1e-2
    omega = (19 / 20) ** 1
    # tiny steps: the quadratic model is accurate, ρ ≈ 1 > 3/4, λ shrinks by ω
    opt = optim.KFAC(1e-4, damping=lam, adapt_damping=True, adapt_every=1, kl_clip=None,
                     fisher_type="type-2")
    _, s, info = opt.step(th, opt.init(th), model, loss, X, y)
    assert info["rho"] == pytest.approx(1.0, abs=0.05)
    assert s["damping"] == pytest.approx(lam * omega)
    # an absurd step increases the loss: ρ < 1/4, λ grows by 1/ω
    opt = optim.KFAC(1e3, damping=lam, adapt_damping=True, adapt_every=1, kl_clip=None,
                     fisher_type="type-2")
    _, s, info = opt.step(th, opt.init(th), model, loss, X, y)
    assert info["rho"] < 0.25 and s["damping"] == pytest.approx(lam / omega)
    # ρ by hand for the tiny step
    lr = 1e-4
    d = updates.kfac(model, th, loss, X, y, lam, fisher_type="type-2", damping_mode="factored")
    delta = -lr * d
    F = Fisher(model, th, loss, X, y).dense()
    g = refngd.gradient(model, th, loss, X, y)
    pred = g @ delta + 0.5 * (delta @ F @ delta + lam * delta @ delta)
    actual = refngd.loss_value(model, th + delta, loss, X, y) - refngd.loss_value(model, th, loss, X, y)
    opt = optim.KFAC(lr, damping=lam, adapt_damping=True, adapt_every=1, kl_clip=None, fisher_type="type-2")
    _, _, info = opt.step(th, opt.init(th), model, loss, X, y)
    assert info["rho"] == pytest.approx(actual / pred, rel=1e-6)
    # heavy-ball momentum on the (clipped) direction
    opt = optim.KFAC(0.1, momentum=0.5, kl_clip=None, inverse_every=1, ema_decay=0.0, fisher_type="type-2")
    s = opt.init(th)
    t1, s, _ = opt.step(th, s, model, loss, X, y)
    t2, s, _ = opt.step(t1, s, model, loss, X, y)
    d1 = updates.kfac(model, th, loss, X, y, 1e-3, fisher_type="type-2", damping_mode="factored")
    d2 = updates.kfac(model, t1, loss, X, y, 1e-3, fisher_type="type-2", damping_mode="factored")
    close(t2, t1 - 0.1 * (0.5 * d1 + d2), 1e-8)


def test_ekfac_scalings_follow_ema_within_a_basis():
    """s_t = ε_k s_{t−1} + (1 − ε_k) ŝ_t in the fixed basis; at a refresh s restarts from ŝ."""
    model, th, loss, X, y = problem("mlp", 6, N=36)
    eps = 0.5
    opt = optim.EKFAC(0.05, ema_decay=eps, inverse_every=2, fisher_type="type-2", kl_clip=None)
    state, theta = opt.init(th), th
    ks, prev = [], None
    for t, (Xb, yb) in enumerate(batches(X, y, 3), start=1):
        theta_before = theta
        theta, state, _ = opt.step(theta, state, model, loss, Xb, yb)
        # ŝ by hand in the state's basis, from dense per-row gradients (type-2 rows)
        UA_UG = state["eigen"]
        lin = model.linearize(theta_before, Xb)
        rows = lin.backprop(loss.hessian_sqrt(lin.outputs).transpose(0, 2, 1))
        U = rows.dense()  # (N, K, P)
        c = 1 / Xb.shape[0]
        shat, start = [], 0
        for ((wA, UA), (wG, UG)), f in zip(UA_UG, [(6, 5), (3, 6)]):
            d_out, D = f
            Wg = U[:, :, start:start + d_out * D].reshape(-1, d_out, D)
            bg = U[:, :, start + d_out * D:start + d_out * (D + 1)].reshape(-1, d_out)
            # the canonical diagonal: averaged over clusters of the refresh's eigenvalues
            shat.append({"w": cluster_mean(c * ((UG.T @ Wg @ UA) ** 2).sum(0), wG, wA),
                         "b": cluster_mean(c * ((bg @ UG) ** 2).sum(0)[:, None], wG, np.ones(1))})
            start += d_out * (D + 1)
        k = state["since_refresh"]
        ks.append(k)
        e = min(1 - 1 / k, eps)
        want = shat if k == 1 else [{kk: e * o[kk] + (1 - e) * n[kk] for kk in n}
                                    for o, n in zip(prev, shat)]
        for got, w in zip(state["scalings"], want):
            close(got["w"], w["w"])
            close(got["b"], w["b"])
        prev = state["scalings"]
    assert ks == [1, 2, 1]  # T = 2: a fresh basis at steps 1 and 3


def test_mc_needs_rng_and_options_are_checked():
    model, th, loss, X, y = problem()
    opt = optim.KFAC(0.1)
    with pytest.raises(TypeError, match="rng"):
        opt.step(th, opt.init(th), model, loss, X, y)
    with pytest.raises(ValueError, match="damping_mode"):
        optim.KFAC(0.1, damping_mode="adaptive")
    with pytest.raises(ValueError, match="damping"):
        optim.EKFAC(0.1, damping=0.0)
    with pytest.raises(ValueError, match="inverse_every"):
        optim.KFAC(0.1, inverse_every=0)
    with pytest.raises(ValueError, match="damping_bounds"):  # swapped bounds: min(max(λ, lo), hi) = hi
        optim.KFAC(0.1, adapt_damping=True, damping_bounds=(1.0, 1e-3))


def test_kfac_trains_a_cnn():
    model, th, loss, X, y = problem("cnn", 7, N=24)
    r = optim.train(model, th, loss, X, y, optim.KFAC(0.1), epochs=4, batch_size=8, progress=False)
    assert not r.diverged and r.evals["train_loss"][-1] < r.evals["train_loss"][0]
