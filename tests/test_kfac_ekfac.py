"""EKFAC and KroneckerDiagonal against K-FAC, the exact Fisher and their own dense forms.

EKFAC (George et al. 2018) keeps K-FAC's eigenbasis Q = U_G ⊗ U_A and sets the diagonal to
s = diag(Qᵀ F_block Q), the Frobenius-optimal diagonal for that basis.  Hence:

* with the Kronecker eigenvalue products λ_G λ_Aᵀ in place of s it *is* K-FAC;
* s equals diag(Qᵀ F Q) computed from the dense exact Fisher;
* ‖EKFAC − F‖_F ≤ ‖KFAC − F‖_F on K-FAC's block structure, for any network.
"""
from __future__ import annotations

import numpy as np
import pytest

import refngd
from refngd import nn, updates
from refngd.curvature import EKFAC, KFAC, EmpiricalFisher, Fisher, KroneckerDiagonal
from refngd.losses import CrossEntropy, MSELoss
from kfac_helpers import block_mask, rel_err

EXACT = 1e-10


def random_net(kind, seed, N=None):
    """Small random MLPs and CNNs: widths, depth, activation and batch drawn from the seed."""
    rng = np.random.default_rng(seed)
    act = [nn.Tanh, nn.ReLU, nn.Sigmoid][seed % 3]
    N = N if N is not None else int(rng.integers(2, 9))
    if kind == "mlp":
        w = [int(v) for v in rng.integers(2, 6, size=int(rng.integers(3, 5)))]
        layers = []
        for i, (a, b) in enumerate(zip(w[:-1], w[1:])):
            layers += [nn.Linear(a, b, bias=bool(i % 2 == 0 or seed % 2))] + ([act()] if i < len(w) - 2 else [])
        X = rng.standard_normal((N, w[0]))
        C = w[-1]
    else:
        c1 = int(rng.integers(2, 4))
        layers = [nn.Conv2d(2, c1, 3, stride=int(rng.integers(1, 3)), padding=1), act(), nn.Flatten()]
        X = rng.standard_normal((N, 2, 4, 4))
        C = 3
    model = nn.Sequential(*layers)
    if kind == "cnn":
        d = int(np.prod(model.forward(model.init(rng), X).shape[1:]))
        model = nn.Sequential(*layers, nn.Linear(d, C))
    theta = model.init(rng)
    return model, theta, X, rng.integers(0, C, N)


CASES = [(k, s) for k in ("mlp", "cnn") for s in range(6)]


@pytest.mark.parametrize("kind,seed", CASES)
def test_ekfac_with_kronecker_eigenvalues_is_kfac(kind, seed):
    model, theta, X, y = random_net(kind, seed)
    bias = ["separate", "joint"][seed % 2]
    approx = ["expand", "reduce"][(seed // 2) % 2]
    K = KFAC(model, theta, CrossEntropy(), X, y, bias=bias, kfac_approx=approx)
    E = EKFAC(model, theta, CrossEntropy(), X, y, kfac=K).with_scalings(
        EKFAC(model, theta, CrossEntropy(), X, y, kfac=K).kronecker_eigenvalues())
    assert rel_err(E.dense(), K.dense()) <= EXACT
    g = np.random.default_rng(seed).standard_normal(model.num_params)
    assert rel_err(E.solve(g, 0.1), K.solve(g, 0.1)) <= EXACT


@pytest.mark.parametrize("kind,seed", CASES)
def test_ekfac_closer_to_fisher_than_kfac(kind, seed):
    """Frobenius distance to the exact Fisher on K-FAC's block structure, for type-2 (vs the
    Fisher) and empirical (vs the empirical Fisher) factors; and s = diag(Qᵀ F Q)."""
    model, theta, X, y = random_net(kind, seed)
    loss = CrossEntropy()
    for fisher_type, exact in (("type-2", Fisher), ("empirical", EmpiricalFisher)):
        for bias in ("separate", "joint"):
            F = exact(model, theta, loss, X, y).dense() * block_mask(model, bias)
            approx = ["expand", "reduce"][seed % 2]
            K = KFAC(model, theta, loss, X, y, fisher_type=fisher_type, bias=bias, kfac_approx=approx)
            E = EKFAC(model, theta, loss, X, y, kfac=K)
            dk, de = np.linalg.norm(K.dense() - F), np.linalg.norm(E.dense() - F)
            assert de <= dk * (1 + 1e-12), (fisher_type, bias, de, dk)
            for blk, s in zip(E.blocks, E.scalings()):
                (wG, UG, _), (wA, UA, _) = blk.eig()
                i = blk.index(np).reshape(-1)
                Q = np.kron(UG, UA)
                diag = np.einsum("pi,pq,qi->i", Q, F[np.ix_(i, i)], Q).reshape(len(wG), len(wA))
                assert rel_err(s, cluster_mean(diag, wG, wA)) <= 1e-9


def _clusters(w, rtol=1e-10):
    """Groups of indices of equal eigenvalues (written independently of refngd's helper)."""
    order = np.argsort(w)
    groups, tol = [[order[0]]], rtol * np.abs(w).max()
    for a, b in zip(order[:-1], order[1:]):
        if w[b] - w[a] > tol:
            groups.append([])
        groups[-1].append(b)
    return groups


def cluster_mean(diag, wG, wA):
    """diag(Qᵀ F Q) averaged over every pair of eigenvalue clusters (the canonical EKFAC s)."""
    out = np.empty_like(diag)
    for gi in _clusters(wG):
        for aj in _clusters(wA):
            out[np.ix_(gi, aj)] = diag[np.ix_(gi, aj)].mean()
    return out


def test_ekfac_interface():
    model, theta, X, y = random_net("mlp", 1, N=3)
    E = EKFAC(model, theta, CrossEntropy(), X, y, bias="joint")
    D = E.dense()
    v = np.random.default_rng(0).standard_normal(model.num_params)
    assert rel_err(E @ v, D @ v) <= EXACT
    assert rel_err(E.diagonal(), np.diag(D)) <= EXACT
    assert abs(E.trace() - np.trace(D)) <= EXACT * np.trace(D)
    Dl = D + 0.05 * np.eye(len(D))
    assert rel_err(E.solve(v, 0.05), np.linalg.solve(Dl, v)) <= EXACT
    assert abs(E.logdet(0.05) - np.linalg.slogdet(Dl)[1]) <= EXACT * abs(np.linalg.slogdet(Dl)[1])
    with pytest.raises(ValueError, match="damping_mode"):  # issue 19: factored is an option now
        E.solve(v, 0.1, damping_mode="factorised")
    with pytest.raises(ValueError, match="scalings"):
        E.with_scalings(E.scalings()[:-1])
    g = refngd.gradient(model, theta, CrossEntropy(), X, y)
    assert rel_err(updates.ekfac(model, theta, CrossEntropy(), X, y, 0.05, bias="joint"), E.solve(g, 0.05)) <= EXACT


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_kronecker_diagonal(kind, fisher_type):
    """diag(G) ⊗ diag(A) per block = the diagonal of K-FAC, in both bias modes."""
    model, theta, X, y = random_net(kind, 2)
    kw = dict(mc_samples=2, rng=1) if fisher_type == "mc" else {}
    for bias in ("separate", "joint"):
        K = KFAC(model, theta, CrossEntropy(), X, y, fisher_type=fisher_type, bias=bias, **kw)
        Dg = KroneckerDiagonal(model, theta, CrossEntropy(), X, y, fisher_type=fisher_type, bias=bias, **kw)
        d = np.diag(K.dense())
        assert rel_err(Dg.dense(), np.diag(d)) <= EXACT
        for fk, fd in zip(K.factors(), Dg.factors()):
            assert rel_err(fd.A, np.diag(fk.A)) <= EXACT and rel_err(fd.G, np.diag(fk.G)) <= EXACT
        v = np.random.default_rng(0).standard_normal(model.num_params)
        assert rel_err(Dg @ v, d * v) <= EXACT
        assert rel_err(Dg.solve(v, 0.1), v / (d + 0.1)) <= EXACT
        assert abs(Dg.trace() - d.sum()) <= EXACT * d.sum()
        assert abs(Dg.logdet(0.1) - np.log(d + 0.1).sum()) <= EXACT * abs(np.log(d + 0.1).sum())


def test_mse_ekfac_exact_for_deep_linear():
    """Where K-FAC is exact, EKFAC is too (s = λ_G λ_A then)."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    theta = model.init(rng)
    X, y = rng.standard_normal((6, 3)), rng.standard_normal((6, 2))
    F = Fisher(model, theta, MSELoss(), X, y).dense() * block_mask(model, "joint")
    assert rel_err(EKFAC(model, theta, MSELoss(), X, y, bias="joint").dense(), F) <= EXACT


def test_ekfac_refuses_options_that_contradict_a_given_kfac():
    """EKFAC(..., kfac=k) takes k's factors; a clashing option is an error, not ignored."""
    from refngd.curvature import EKFAC, KFAC
    from refngd import nn

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    theta, X, y = model.init(rng), rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    loss = CrossEntropy()
    k = KFAC(model, theta, loss, X, y, fisher_type="mc", mc_samples=2, rng=0)
    EKFAC(model, theta, loss, X, y, kfac=k)  # fine: everything comes from k
    EKFAC(model, theta, loss, X, y, fisher_type="mc", mc_samples=2, kfac=k)  # consistent
    with pytest.raises(ValueError, match="fisher_type='type-2'"):
        EKFAC(model, theta, loss, X, y, fisher_type="type-2", kfac=k)
    with pytest.raises(ValueError, match="mc_samples=3"):
        EKFAC(model, theta, loss, X, y, mc_samples=3, kfac=k)
    with pytest.raises(ValueError, match="rng="):
        EKFAC(model, theta, loss, X, y, rng=1, kfac=k)
    # without kfac= the documented defaults still apply
    e = EKFAC(model, theta, loss, X, y)
    assert (e.fisher_type, e.kfac_approx, e.bias) == ("type-2", "expand", "separate")


@pytest.mark.parametrize("kind,seed", CASES[::3])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_with_factors_replaces_the_kronecker_factors(kind, seed, bias):
    """``with_factors`` keeps the θ layout and rows and swaps A, G (the optimizers' running averages)."""
    model, theta, X, y = random_net(kind, seed)
    K = KFAC(model, theta, CrossEntropy(), X, y, bias=bias)
    own = [(f.A, f.G) for f in K.factors()]
    g = np.random.default_rng(seed).standard_normal(theta.shape[0])
    same = K.with_factors(own)  # full bases of the same factors: the same operator
    for mode in ("tikhonov", "factored"):
        np.testing.assert_allclose(same.solve(g, 0.1, mode), K.solve(g, 0.1, mode), rtol=1e-10, atol=1e-12)
    scaled = K.with_factors([(A, 3 * G) for A, G in own])  # every block (bias too) is 3×
    np.testing.assert_allclose(scaled.dense(), 3 * K.dense(), rtol=1e-12, atol=1e-14)
    assert all(np.array_equal(f.G, 3 * G) for f, (_, G) in zip(scaled.factors(), own))
    # a stale eigendecomposition: products use the factors, solves that basis
    eig = [(np.linalg.eigh(A), np.linalg.eigh(3 * G)) for A, G in own]
    stale = K.with_factors(own, eig)
    np.testing.assert_allclose(stale.matvec(g), K.matvec(g), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(stale.solve(g, 0.1), scaled.solve(g, 0.1), rtol=1e-10, atol=1e-12)
    E = EKFAC(model, theta, CrossEntropy(), X, y, kfac=K)
    np.testing.assert_allclose(E.with_factors(own).dense(), E.dense(), rtol=1e-9, atol=1e-12)
    bases = [((None, eA[1]), (None, eG[1])) for eA, eG in eig]  # EKFAC needs only the basis
    np.testing.assert_allclose(E.with_factors(own, bases).dense(), E.dense(), rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="factors"):
        K.with_factors(own[:-1])
    with pytest.raises(ValueError, match="eigenvalues"):
        K.with_factors(own, bases)
