"""refngd.optim: every optimizer's step against its formula, computed here by hand.

The hand computations use only NumPy, dense matrices (refngd.jacobian / Fisher.dense on
tiny models, or HIPS autograd gradients) and the formulas of the papers; the optimizers
are run through their public ``init`` / ``step``.  PyTorch's own optimizers are a second
reference where they exist (skipped without torch).
"""
from __future__ import annotations

import math

import autograd
import autograd.numpy as anp
from autograd.scipy.special import logsumexp
import numpy as np
import pytest
from devices import gpu_available

import refngd
from refngd import nn, optim, updates
from refngd.curvature import EmpiricalFisher, Fisher, KroneckerDiagonal
from refngd.losses import CrossEntropy, MSELoss

TOL = 1e-10


def small_problem(seed=0, N=12, d=5, h=4, C=3):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C))
    theta = model.init(rng)
    X = rng.standard_normal((N, d))
    y = rng.integers(0, C, N)
    return model, theta, CrossEntropy(), X, y


def grad(model, theta, loss, X, y):
    return refngd.gradient(model, theta, loss, X, y)


def run(opt, model, theta, loss, batches, rng=None):
    """Apply ``opt`` to a list of (X, y) batches; returns the list of θ's (θ₀ first)."""
    state = opt.init(theta)
    out = [theta]
    for X, y in batches:
        theta, state, info = opt.step(theta, state, model, loss, X, y, rng=rng)
        out.append(theta)
    return out


def batches_of(X, y, n=2):
    k = X.shape[0] // n
    return [(X[i * k:(i + 1) * k], y[i * k:(i + 1) * k]) for i in range(n)]


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


# ----------------------------------------------------------------------------- SGD
@pytest.mark.parametrize("momentum,nesterov", [(0.0, False), (0.9, False), (0.9, True)])
def test_sgd_formula(momentum, nesterov):
    model, th, loss, X, y = small_problem()
    bs = batches_of(X, y, 3)
    lr, wd = 0.3, 0.01
    got = run(optim.SGD(lr, momentum=momentum, nesterov=nesterov, weight_decay=wd), model, th, loss, bs)
    theta, buf = th, None
    for (Xb, yb), want in zip(bs, got[1:]):
        g = grad(model, theta, loss, Xb, yb) + wd * theta
        buf = g if buf is None else momentum * buf + g
        d = (g + momentum * buf if nesterov else buf) if momentum else g
        theta = theta - lr * d
        close(want, theta)


# ----------------------------------------------------------------------------- Adam
@pytest.mark.parametrize("cls,wd", [(optim.Adam, 0.0), (optim.Adam, 0.1), (optim.AdamW, 0.1)])
def test_adam_formula(cls, wd):
    model, th, loss, X, y = small_problem(1)
    bs = batches_of(X, y, 3)
    lr, (b1, b2), eps = 0.01, (0.8, 0.95), 1e-6
    got = run(cls(lr, betas=(b1, b2), eps=eps, weight_decay=wd), model, th, loss, bs)
    theta, m, v = th, 0.0, 0.0
    for t, ((Xb, yb), want) in enumerate(zip(bs, got[1:]), start=1):
        g = grad(model, theta, loss, Xb, yb)
        if cls is optim.Adam:
            g = g + wd * theta
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        step = (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        theta = (theta * (1 - lr * wd) if cls is optim.AdamW else theta) - lr * step
        close(want, theta)


def _torch_params(model, theta):
    torch = pytest.importorskip("torch")
    tm = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    torch.nn.utils.vector_to_parameters(torch.tensor(theta), tm.parameters())
    return torch, tm


@pytest.mark.parametrize("name", ["sgd", "nesterov", "adam", "adamw"])
def test_matches_torch_optimizers(name):
    model, th, loss, X, y = small_problem(2)
    torch, tm = _torch_params(model, th)
    make = {
        "sgd": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, weight_decay=0.01),
                optim.SGD(0.2, momentum=0.9, weight_decay=0.01)),
        "nesterov": (lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.9, nesterov=True),
                     optim.SGD(0.2, momentum=0.9, nesterov=True)),
        "adam": (lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1), optim.Adam(0.01, weight_decay=0.1)),
        "adamw": (lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1), optim.AdamW(0.01, weight_decay=0.1)),
    }[name]
    topt = make[0](tm.parameters())
    bs = batches_of(X, y, 3)
    for (Xb, yb), want in zip(bs, run(make[1], model, th, loss, bs)[1:]):
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tm(torch.tensor(Xb)), torch.tensor(yb)).backward()
        topt.step()
        close(torch.nn.utils.parameters_to_vector(tm.parameters()).detach().numpy(), want, 1e-9)


# ------------------------------------------------------------------------ Adafactor
def test_adafactor_formula():
    """Shazeer & Stern (2018), Alg. 4 (weights, factored) and 5 (biases), two steps."""
    model, th, loss, X, y = small_problem(3)
    bs = batches_of(X, y, 2)
    eps1, eps2, d = 1e-30, 1e-3, 1.0
    got = run(optim.Adafactor(), model, th, loss, bs)  # relative step ρ_t = min(1e-2, 1/√t)
    blocks = [(0, 20, (4, 5)), (20, 24, (4,)), (24, 36, (3, 4)), (36, 39, (3,))]
    theta, stats = th, {}
    for t, ((Xb, yb), want) in enumerate(zip(bs, got[1:]), start=1):
        g = grad(model, theta, loss, Xb, yb)
        beta = 1 - t ** -0.8
        rho = min(1e-2, 1 / math.sqrt(t))
        new = theta.copy()
        for s, e, shape in blocks:
            G = g[s:e].reshape(shape)
            G2 = G * G + eps1
            if len(shape) == 2:
                R, Cc = G2.sum(axis=1), G2.sum(axis=0)
                if t > 1:
                    R = beta * stats[s][0] + (1 - beta) * R
                    Cc = beta * stats[s][1] + (1 - beta) * Cc
                stats[s] = (R, Cc)
                V = np.outer(R, Cc) / R.sum()
            else:
                V = G2 if t == 1 else beta * stats[s] + (1 - beta) * G2
                stats[s] = V
            U = G / np.sqrt(V)
            U = U / max(1.0, np.sqrt(np.mean(U * U)) / d)
            alpha = max(eps2, np.sqrt(np.mean(theta[s:e] ** 2))) * rho
            new[s:e] = theta[s:e] - alpha * U.reshape(-1)
        theta = new
        close(want, theta)


# ------------------------------------------------------------------ the exact family
def test_ngd_formula_with_momentum():
    model, th, loss, X, y = small_problem(4)
    bs = batches_of(X, y, 2)
    lr, lam, mu = 0.5, 1e-2, 0.7
    got = run(optim.NGD(lr, damping=lam, momentum=mu), model, th, loss, bs)
    theta, buf = th, None
    for (Xb, yb), want in zip(bs, got[1:]):
        F = Fisher(model, theta, loss, Xb, yb).dense()
        d = np.linalg.solve(F + lam * np.eye(F.shape[0]), grad(model, theta, loss, Xb, yb))
        buf = d if buf is None else mu * buf + d
        theta = theta - lr * buf
        close(want, theta, 1e-8)


def test_ngd_one_step_solves_linear_least_squares():
    """lr = 1, λ → 0: the Gauss–Newton step of a linear model is the least-squares solution."""
    rng = np.random.default_rng(5)
    N, d, C = 30, 4, 2
    model = nn.Sequential(nn.Linear(d, C))
    theta = model.init(rng)
    X = rng.standard_normal((N, d))
    Y = rng.standard_normal((N, C))
    loss = MSELoss()
    new, _, _ = optim.NGD(lr=1.0, damping=1e-12).step(theta, optim.NGD(1.0).init(theta), model, loss, X, Y)
    Xb = np.hstack([X, np.ones((N, 1))])
    sol = np.linalg.lstsq(Xb, Y, rcond=1e-12)[0]  # (d + 1, C): weights then bias
    W, b = sol[:d].T, sol[d]
    close(new, np.concatenate([W.reshape(-1), b]), 1e-8)
    assert refngd.loss_value(model, new, loss, X, Y) <= refngd.loss_value(model, theta, loss, X, Y)


def per_sample_grads(model, theta, loss, X, y):
    return refngd.per_sample_gradients(model, theta, loss, X, y)


@pytest.mark.parametrize("normalize", [None, "grad", "unit"])
def test_ef_and_ief_gram_formula(normalize):
    """Δ_EF = Gᵀ(GGᵀ + λI)⁻¹1, Δ_iEF = Gᵀ(GGᵀ + λI)⁻¹s (Wu et al. 2024, eq. 4, 8)."""
    model, th, loss, X, y = small_problem(6)
    lr, lam = 0.3, 1e-2
    G = per_sample_grads(model, th, loss, X, y)
    e = loss.output_gradient(model.forward(th, X), y)
    g = grad(model, th, loss, X, y)
    for cls, rhs in ((optim.EF, np.ones(len(y))), (optim.IEF, (e * e).sum(1))):
        d = G.T @ np.linalg.solve(G @ G.T + lam * np.eye(len(y)), rhs)
        if normalize == "grad":
            d = d * np.linalg.norm(g) / np.linalg.norm(d)
        elif normalize == "unit":
            d = d / np.linalg.norm(d)
        opt = cls(lr, damping=lam, normalize=normalize)
        new, _, info = opt.step(th, opt.init(th), model, loss, X, y)
        close(new, th - lr * d, 1e-8)
        assert info["loss"] == pytest.approx(refngd.loss_value(model, th, loss, X, y))


def test_ef_ief_tikhonov_forms_and_defaults():
    model, th, loss, X, y = small_problem(7)
    lam = 1e-2
    g = grad(model, th, loss, X, y)
    F = EmpiricalFisher(model, th, loss, X, y).dense()
    d = np.linalg.solve(F + lam * np.eye(F.shape[0]), g)
    new, _, _ = optim.EF(1.0, damping=lam, form="tikhonov", normalize=None).step(th, {"step": 0, "momentum_buffer": None}, model, loss, X, y)
    close(new, th - d, 1e-8)
    assert optim.EF(0.1).normalize == "grad" and optim.SF(0.1).normalize == "grad"
    assert optim.IEF(0.1).normalize is None and optim.NGD(0.1).normalize is None


def test_sf_equals_update_and_needs_rng():
    model, th, loss, X, y = small_problem(8)
    opt = optim.SF(0.2, damping=1e-2, normalize=None, mc_samples=3)
    new, _, _ = opt.step(th, opt.init(th), model, loss, X, y, rng=np.random.default_rng(3))
    d = updates.sf(model, th, loss, X, y, 1e-2, mc_samples=3, rng=np.random.default_rng(3))
    close(new, th - 0.2 * d)
    with pytest.raises(TypeError, match="rng"):
        opt.step(th, opt.init(th), model, loss, X, y)
    # normalised to the gradient's length
    opt = optim.SF(1.0, damping=1e-2)
    new, _, _ = opt.step(th, opt.init(th), model, loss, X, y, rng=np.random.default_rng(3))
    assert np.linalg.norm(new - th) == pytest.approx(np.linalg.norm(grad(model, th, loss, X, y)))


# ---------------------------------------------------------------------------- FAdam
def test_fadam_reduces_to_adam_direction():
    """β₁ = 0, no clipping, no weight decay, fixed ε: FAdam's step is Adam's (β₁ = 0)."""
    model, th, loss, X, y = small_problem(9)
    bs = batches_of(X, y, 4)
    a = run(optim.Adam(0.01, betas=(0.0, 0.99), eps=1e-8), model, th, loss, bs)
    f = run(optim.FAdam(0.01, betas=(0.0, 0.99), eps=1e-8, clip=None, weight_decay=0.0,
                        adaptive_eps=False), model, th, loss, bs)
    for ta, tf in zip(a, f):
        close(tf, ta, 1e-12)


def test_fadam_formula_with_clip_and_weight_decay():
    model, th, loss, X, y = small_problem(10)
    bs = batches_of(X, y, 3)
    lr, (b1, b2), eps, eps2, c, lam = 0.05, (0.9, 0.999), 1e-8, 1e-3, 0.5, 0.1
    got = run(optim.FAdam(lr, betas=(b1, b2), eps=eps, eps2=eps2, clip=c, weight_decay=lam),
              model, th, loss, bs)
    blocks = [(0, 20), (20, 24), (24, 36), (36, 39)]
    rms = lambda v: np.sqrt(np.mean(v * v))  # noqa: E731
    theta, Fh, m = th, np.zeros_like(th), np.zeros_like(th)
    for t, ((Xb, yb), want) in enumerate(zip(bs, got[1:]), start=1):
        g = grad(model, theta, loss, Xb, yb)
        bh = b2 * (1 - b2 ** (t - 1)) / (1 - b2**t)
        Fh = bh * Fh + (1 - bh) * g * g
        nat, wd = np.zeros_like(g), np.zeros_like(g)
        for s, e in blocks:
            den = np.sqrt(Fh[s:e]) + min(eps, eps2 * rms(g[s:e]))
            v = g[s:e] / den
            nat[s:e] = v / max(1, rms(v) / c)
            w = theta[s:e] / den
            wd[s:e] = w / max(1, rms(w) / c)
        m = b1 * m + (1 - b1) * nat
        theta = theta - lr * (m + lam * wd)
        close(want, theta)


# ------------------------------------------------------------------------ AdaFisher
def manual_diag_factors(theta, X, y, layer_sizes=(5, 4, 3)):
    """Â, Ĝ of a Linear–Tanh–Linear net by hand (A with the trailing bias 1)."""
    d, h, C = layer_sizes
    W1, b1 = theta[:d * h].reshape(h, d), theta[d * h:d * h + h]
    o = d * h + h
    W2, b2 = theta[o:o + h * C].reshape(C, h), theta[o + h * C:]
    N = X.shape[0]
    a1 = np.tanh(X @ W1.T + b1)
    Z = a1 @ W2.T + b2
    p = np.exp(Z - Z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    e2 = p - np.eye(C)[y]                       # ∂l_n/∂z (observed labels)
    e1 = (e2 @ W2) * (1 - a1 * a1)              # back through Linear and Tanh
    c = 1.0 / N
    A1 = np.append((X * X).mean(0), 1.0)
    A2 = np.append((a1 * a1).mean(0), 1.0)
    return [(A1, c * (e1 * e1).sum(0)), (A2, c * (e2 * e2).sum(0))]


def minmax(v):
    return (v - v.min()) / (v.max() - v.min() + 1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_adafisher_factors_follow_ema(normalize):
    model, th, loss, X, y = small_problem(11)
    bs = batches_of(X, y, 3)
    go, gn = 0.7, 0.3
    opt = optim.AdaFisher(1e-3, gammas=(go, gn), normalize=normalize)
    state, theta = opt.init(th), th
    ref = None
    for Xb, yb in bs:
        fresh = manual_diag_factors(theta, Xb, yb)
        if normalize:
            fresh = [(minmax(A), minmax(G)) for A, G in fresh]
        if ref is None:
            ref = [(np.ones_like(A), np.ones_like(G)) for A, G in fresh]
        ref = [(go * A0 + gn * A, go * G0 + gn * G) for (A0, G0), (A, G) in zip(ref, fresh)]
        theta, state, _ = opt.step(theta, state, model, loss, Xb, yb)
        for (A, G), (Ar, Gr) in zip(state["factors"], ref):
            close(A, Ar)
            close(G, Gr)


def test_adafisher_step_formula_and_refresh_period():
    model, th, loss, X, y = small_problem(12)
    bs = batches_of(X, y, 3)
    lr, beta, lam, wd = 1e-2, 0.8, 1e-2, 0.05
    opt = optim.AdaFisher(lr, beta=beta, damping=lam, update_every=2, weight_decay=wd)
    state, theta, m = opt.init(th), th, 0.0
    for t, (Xb, yb) in enumerate(bs, start=1):
        before = state["factors"]
        new, state, _ = opt.step(theta, state, model, loss, Xb, yb)
        if t == 2:  # no refresh at t = 2 (T = 2)
            for (A, G), (A0, G0) in zip(state["factors"], before):
                close(A, A0)
        (A1, G1), (A2, G2) = state["factors"]
        Fv = np.concatenate([np.outer(G1, A1[:-1]).ravel(), G1 * A1[-1],
                             np.outer(G2, A2[:-1]).ravel(), G2 * A2[-1]]) + lam
        g = grad(model, theta, loss, Xb, yb) + wd * theta
        m = beta * m + (1 - beta) * g
        close(new, theta - lr * (m / (1 - beta**t)) / Fv)
        theta = new


def test_adafisher_factors_are_kronecker_diagonal():
    """Without normalisation and with (γ_old, γ_new) = (0, 1) the factors are the batch's."""
    model, th, loss, X, y = small_problem(13)
    opt = optim.AdaFisher(1e-3, gammas=(0.0, 1.0), normalize=False)
    _, state, _ = opt.step(th, opt.init(th), model, loss, X, y)
    kd = KroneckerDiagonal(model, th, loss, X, y, fisher_type="empirical", bias="joint")
    for (A, G), f in zip(state["factors"], kd.factors()):
        close(A, f.A)
        close(G, f.G)


# ------------------------------------------------------------- functional protocol
ALL = [lambda: optim.SGD(0.1, momentum=0.9), lambda: optim.Adam(1e-2), lambda: optim.AdamW(1e-2),
       lambda: optim.Adafactor(), lambda: optim.NGD(0.5, momentum=0.5), lambda: optim.SF(0.1),
       lambda: optim.EF(0.1), lambda: optim.IEF(1.0), lambda: optim.KFAC(0.1),
       lambda: optim.EKFAC(0.1), lambda: optim.AdaFisher(1e-2), lambda: optim.FAdam(1e-2)]


@pytest.mark.parametrize("make", ALL)
def test_step_is_functional_and_reports_info(make):
    model, th, loss, X, y = small_problem(14)
    opt = make()
    state = opt.init(th)
    th1, s1, info = opt.step(th, state, model, loss, X, y, rng=np.random.default_rng(0))
    th_copy = th.copy()
    th2, s2, _ = opt.step(th1, s1, model, loss, X, y, rng=np.random.default_rng(1))
    # replaying from the old state gives the same θ: nothing was modified in place
    th1b, _, _ = opt.step(th, state, model, loss, X, y, rng=np.random.default_rng(0))
    close(th1b, th1, 0)
    close(th, th_copy, 0)
    assert s1["step"] == 1 and s2["step"] == 2
    for key in ("loss", "accuracy", "grad_norm", "update_norm"):
        assert isinstance(info[key], float)
    assert info["update_norm"] == pytest.approx(np.linalg.norm(th1 - th))
    assert opt.hyperparameters()["lr"] == pytest.approx(opt.lr)
    assert repr(opt).startswith(type(opt).__name__ + "(")


@pytest.mark.parametrize("bad", [dict(lr=0), dict(lr=-1), dict(lr="0.1"), dict(lr=float("nan"))])
def test_bad_learning_rates(bad):
    with pytest.raises((TypeError, ValueError), match="lr"):
        optim.SGD(**bad)


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(0.1, nesterov=True)
    with pytest.raises(ValueError, match="normalize"):
        optim.EF(0.1, normalize="l2")
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(betas=0.9)
    with pytest.raises(ValueError, match="momentum"):
        optim.NGD(0.1, momentum=1.0)
    with pytest.raises(TypeError, match="damping"):
        optim.NGD(0.1, damping="big")
    model, th, loss, X, y = small_problem()
    with pytest.raises(ValueError, match="state lacks"):
        optim.Adam().step(th, optim.SGD().init(th), model, loss, X, y)
    with pytest.raises(TypeError, match="Sequential"):
        optim.AdaFisher().step(th, optim.AdaFisher().init(th),
                               refngd.FunctionModel(lambda t, x: anp.dot(x, t.reshape(5, 3)), np.zeros(15)),
                               loss, X, y)


def test_function_model_works_with_exact_family():
    """FunctionModel (HIPS autograd) has no layers: NGD and Adafactor treat θ as one block."""
    rng = np.random.default_rng(15)
    X, y = rng.standard_normal((10, 3)), rng.integers(0, 2, 10)

    def f(t, x):
        return anp.tanh(anp.dot(x, t[:6].reshape(3, 2))) * t[6]

    theta = rng.standard_normal(7)
    model = refngd.FunctionModel(f, theta)
    for opt in (optim.NGD(0.5, damping=1e-3), optim.Adafactor(), optim.FAdam(1e-2)):
        new, _, info = opt.step(theta, opt.init(theta), model, CrossEntropy(), X, y)
        assert np.all(np.isfinite(new)) and info["loss"] > 0
    def ce(t):
        Z = f(t, X)
        return anp.mean(logsumexp(Z, axis=1) - Z[np.arange(10), y])

    g = autograd.grad(ce)(theta)
    close(grad(model, theta, CrossEntropy(), X, y), g, 1e-10)




@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("make", ALL)
def test_optimizers_run_on_cupy(make):
    """Same step on CuPy arrays as on NumPy (docs/design.md §5): optimizers follow θ's device."""
    import cupy

    model, th, loss, X, y = small_problem(16)
    opt = make()
    want, _, _ = opt.step(th, opt.init(th), model, loss, X, y, rng=np.random.default_rng(0))
    thc = cupy.asarray(th)
    got, _, info = opt.step(thc, opt.init(thc), model, loss, cupy.asarray(X), cupy.asarray(y),
                            rng=np.random.default_rng(0))
    assert isinstance(got, cupy.ndarray) and isinstance(info["loss"], float)
    close(cupy.asnumpy(got), want, 1e-8)
