"""EKFAC has one answer, whichever eigenbasis LAPACK returns inside a degenerate eigenspace.

Every symmetric eigendecomposition refngd calls goes through ``numpy.linalg.eigh``.  The
test replaces it by one whose eigenvectors are rotated by random orthogonal matrices
inside every cluster of equal eigenvalues — an equally valid answer, as another LAPACK or
a GPU may return — and requires the same EKFAC matrix, solve and 3-step optimizer
trajectory to 1e-9.  Without the canonical (cluster-averaged) diagonal the same rotations
change them by several per cent (checked below, so the test would notice a regression).
"""
from __future__ import annotations

import numpy as np
import pytest
from devices import gpu_available

from refngd import nn, optim
from refngd.curvature import EKFAC
from refngd.curvature.ekfac import cluster_indicator
from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss

REAL_EIGH = np.linalg.eigh


def rotating_eigh(seed: int, rtol: float = 1e-12):
    """``eigh`` with each cluster's eigenvectors rotated by a random orthogonal matrix."""
    rng = np.random.default_rng(seed)

    def eigh(M, *args, **kwargs):
        w, V = REAL_EIGH(M, *args, **kwargs)
        V = V.copy()
        tol = rtol * np.abs(w).max() if w.size else 0.0
        start = 0
        for i in range(1, w.size + 1):  # w ascending: clusters are runs of close neighbours
            if i == w.size or w[i] - w[i - 1] > tol:
                if i - start > 1:
                    Q, _ = np.linalg.qr(rng.standard_normal((i - start, i - start)))
                    V[:, start:i] = V[:, start:i] @ Q
                start = i
        return w, V
    return eigh


def _loss(name):
    return {"ce": CrossEntropy(), "mse": MSELoss(), "bce": BCEWithLogits()}[name]


def _targets(name, rng, N, C):
    if name == "ce":
        return rng.integers(0, C, N)
    if name == "mse":
        return rng.standard_normal((N, C))
    return (rng.random((N, C)) < 0.5).astype(float)


def _problem(kind, loss_name, seed=0):
    """Rank-deficient factors: batch 3 < layer widths (MLP); Conv2d with padding (CNN)."""
    rng = np.random.default_rng(seed)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        X = rng.standard_normal((3, 6))
    else:
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 3 * 3, 3))
        X = rng.standard_normal((3, 1, 3, 3))
    theta = model.init(rng)
    return model, theta, _loss(loss_name), X, _targets(loss_name, rng, 3, 3)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ekfac_outputs(model, theta, loss, X, y, approx):
    E = EKFAC(model, theta, loss, X, y, kfac_approx=approx)
    g = np.random.default_rng(7).standard_normal(theta.size)
    return E.dense(), E.solve(g, 1e-3)


def _trajectory(model, theta, loss, X, y, approx):
    opt = optim.EKFAC(lr=0.1, damping=1e-3, inverse_every=2, fisher_type="type-2",
                      kfac_approx=approx, kl_clip=None)
    state = opt.init(theta)
    for _ in range(3):
        theta, state, _ = opt.step(theta, state, model, loss, X, y)
    return theta


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
@pytest.mark.parametrize("kind,approx", [("mlp", "expand"), ("cnn", "expand"), ("cnn", "reduce")])
def test_ekfac_independent_of_eigenbasis(monkeypatch, kind, approx, loss_name):
    problem = _problem(kind, loss_name)
    D0, s0 = _ekfac_outputs(*problem, approx)
    th0 = _trajectory(*problem, approx)
    for seed in (1, 2):
        with monkeypatch.context() as m:
            m.setattr(np.linalg, "eigh", rotating_eigh(seed))
            D1, s1 = _ekfac_outputs(*problem, approx)
            th1 = _trajectory(*problem, approx)
        assert _rel(D1, D0) <= 1e-9
        assert _rel(s1, s0) <= 1e-9
        assert _rel(th1 - problem[1], th0 - problem[1]) <= 1e-9


def test_rotation_would_change_the_basis_dependent_diagonal(monkeypatch):
    """The check has teeth: George et al.'s diag(QᵀFQ) in the raw basis does change."""
    model, theta, loss, X, y = _problem("cnn", "ce")
    monkeypatch.setattr(EKFAC, "_canonical", lambda self, blk, S: S)
    D0 = EKFAC(model, theta, loss, X, y, kfac_approx="reduce").dense()
    monkeypatch.setattr(np.linalg, "eigh", rotating_eigh(1))
    D1 = EKFAC(model, theta, loss, X, y, kfac_approx="reduce").dense()
    assert _rel(D1, D0) > 1e-3


def test_cluster_indicator():
    w = np.array([3.0, 1e-17, 1.0, -2e-17, 1.0 + 1e-13, 0.0])
    M = cluster_indicator(w)
    assert M.shape == (6, 3)
    groups = sorted(tuple(np.flatnonzero(col)) for col in M.T)
    assert groups == [(0,), (1, 3, 5), (2, 4)]




@pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
@pytest.mark.parametrize("kind,approx", [("mlp", "expand"), ("cnn", "reduce")])
def test_ekfac_optimizer_cpu_and_cupy_agree(kind, approx, loss_name):
    """cuSOLVER returns other bases inside degenerate eigenspaces; the canonical EKFAC does not care."""
    import cupy

    model, theta, loss, X, y = _problem(kind, loss_name)
    want = _trajectory(model, theta, loss, X, y, approx)
    got = _trajectory(model, cupy.asarray(theta), loss, cupy.asarray(X), cupy.asarray(y), approx)
    assert _rel(cupy.asnumpy(got) - theta, want - theta) <= 1e-9
