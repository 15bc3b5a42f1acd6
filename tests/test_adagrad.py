"""refngd.optim.AdaGrad against its formula by hand and against torch.optim.Adagrad."""
from __future__ import annotations

import numpy as np
import pytest

import refngd
from refngd import nn, optim
from refngd.losses import CrossEntropy


def problem(seed=0, N=12, d=5, h=4, C=3):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C))
    X = rng.standard_normal((N, d))
    return model, model.init(rng), CrossEntropy(), X, rng.integers(0, C, N)


def batches(X, y, n=3):
    k = X.shape[0] // n
    return [(X[i * k:(i + 1) * k], y[i * k:(i + 1) * k]) for i in range(n)]


def run(opt, model, theta, loss, bs):
    state, out = opt.init(theta), []
    for X, y in bs:
        theta, state, _ = opt.step(theta, state, model, loss, X, y)
        out.append(theta)
    return out


@pytest.mark.parametrize("lr_decay,wd,s0", [(0.0, 0.0, 0.0), (0.5, 0.1, 0.3)])
def test_adagrad_formula(lr_decay, wd, s0):
    """Duchi et al. (2011), diagonal case, with PyTorch's lr decay, L2 and initial sum."""
    model, th, loss, X, y = problem()
    lr, eps = 0.2, 1e-6
    got = run(optim.AdaGrad(lr, lr_decay=lr_decay, weight_decay=wd, initial_accumulator_value=s0,
                            eps=eps), model, th, loss, batches(X, y))
    theta, s = th, np.full_like(th, s0)
    for t, ((Xb, yb), want) in enumerate(zip(batches(X, y), got), start=1):
        g = refngd.gradient(model, theta, loss, Xb, yb) + wd * theta
        s = s + g * g
        theta = theta - lr / (1 + (t - 1) * lr_decay) * g / (np.sqrt(s) + eps)
        np.testing.assert_allclose(want, theta, rtol=1e-12, atol=1e-12)


def test_first_step_is_sign_like():
    """s_1 = g², so the first step is lr·g/(|g| + ε): every coordinate moves by ≈ lr."""
    model, th, loss, X, y = problem(1)
    new = run(optim.AdaGrad(0.05, eps=0.0), model, th, loss, [(X, y)])[0]
    g = refngd.gradient(model, th, loss, X, y)
    np.testing.assert_allclose(th - new, 0.05 * np.sign(g), rtol=1e-12, atol=1e-15)


def test_matches_torch_adagrad():
    torch = pytest.importorskip("torch")
    model, th, loss, X, y = problem(2)
    tm = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).double()
    torch.nn.utils.vector_to_parameters(torch.tensor(th), tm.parameters())
    kw = dict(lr=0.1, lr_decay=0.2, weight_decay=0.05, initial_accumulator_value=0.1, eps=1e-10)
    topt = torch.optim.Adagrad(tm.parameters(), **kw)
    bs = batches(X, y)
    for (Xb, yb), want in zip(bs, run(optim.AdaGrad(**kw), model, th, loss, bs)):
        topt.zero_grad()
        torch.nn.functional.cross_entropy(tm(torch.tensor(Xb)), torch.tensor(yb)).backward()
        topt.step()
        got = torch.nn.utils.parameters_to_vector(tm.parameters()).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [dict(lr=0), dict(lr_decay=-1), dict(eps=-1.0),
                                 dict(initial_accumulator_value=-0.1), dict(weight_decay=-1)])
def test_bad_hyperparameters(bad):
    with pytest.raises((ValueError, TypeError)):
        optim.AdaGrad(**bad)


def test_state_from_another_optimizer_is_refused():
    model, th, loss, X, y = problem(3)
    with pytest.raises(ValueError, match="init"):
        optim.AdaGrad().step(th, optim.SGD().init(th), model, loss, X, y)
