"""K-FAC's and EKFAC's damping variants (issue 19, item 2) against dense constructions.

Every variant damps the factors, (G + γ_G I) ⊗ (A + γ_A I) per block; the oracle writes
that block out with ``numpy.kron`` from the factors of ``K.factors()``, computes γ_A and
γ_G from each variant's equation *here* (not through refngd.curvature.damping), and solves
with ``numpy.linalg.solve``.  The layer's T (positions sharing a Conv2d weight) is counted
from its output shape by hand.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import refngd
from refngd import nn, optim, updates
from refngd.curvature import EKFAC, KFAC
from refngd.losses import CrossEntropy
from kfac_helpers import rel_err

EXACT = 1e-12
LAM = (1e-2, 0.3)


def problem(kind: str, N: int = 5):
    rng = np.random.default_rng(11)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        X, Ts = rng.standard_normal((N, 4)), [1, 1]
    else:  # Conv2d 2 → 3 channels on 4 × 4, stride 2: T = 2 · 2 = 4 locations
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(12, 3))
        X, Ts = rng.standard_normal((N, 2, 4, 4)), [4, 1]
    theta = model.init(rng)
    return model, theta, X, rng.integers(0, 3, N), Ts


def trace_pi(A, G):
    return math.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))


#: γ_A, γ_G of each variant written out: (A, G, λ, T) -> (γ_A, γ_G)
VARIANTS = {
    "factored, pi=trace": (dict(damping_mode="factored"),
                           lambda A, G, lam, T: (trace_pi(A, G) * lam ** .5,
                                                 lam ** .5 / trace_pi(A, G))),
    "factored, pi=1": (dict(damping_mode="factored", pi=1),
                       lambda A, G, lam, T: (lam ** .5, lam ** .5)),
    "factored, pi=2.5": (dict(damping_mode="factored", pi=2.5),
                         lambda A, G, lam, T: (2.5 * lam ** .5, lam ** .5 / 2.5)),
    "factored, pi=1, locations": (dict(damping_mode="factored", pi=1, damping_split="locations"),
                                  lambda A, G, lam, T: ((lam / T) ** .5, (lam * T) ** .5)),
    "factored, pi=trace, locations": (
        dict(damping_mode="factored", damping_split="locations"),
        # their π from (A, G/T) on the block T·(A ⊗ G/T) damped with λ/T
        lambda A, G, lam, T: (trace_pi(A, G / T) * (lam / T) ** .5,
                              T * (lam / T) ** .5 / trace_pi(A, G / T))),
    "per-factor, λ on each": (dict(damping_mode="per-factor"), lambda A, G, lam, T: (lam, lam)),
}


def damped_dense(K, shifts, Ts, lam):
    """Per block (G + γ_G I) ⊗ (A + γ_A I), in θ's order (a joint block permuted)."""
    D = np.zeros((K.num_params,) * 2)
    for f, T in zip(K.factors(), Ts):
        parts = [(f.A, f.start, f.stop)]
        if f.bias == "separate":
            nb = f.G.shape[0]
            parts = [(f.A, f.start, f.stop - nb), (np.ones((1, 1)), f.stop - nb, f.stop)]
        for A, a, b in parts:
            gA, gG = shifts(A, f.G, lam, T)
            blk = np.kron(f.G + gG * np.eye(len(f.G)), A + gA * np.eye(len(A)))
            if f.bias == "joint":  # [W | b] row-major -> θ's W then b
                do, da = f.G.shape[0], A.shape[0]
                order = ([o * da + j for o in range(do) for j in range(da - 1)]
                         + [o * da + da - 1 for o in range(do)])
                blk = blk[np.ix_(order, order)]
            D[a:b, a:b] = blk
    return D


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_kfac_variant_matches_dense(kind, bias, name):
    kw, shifts = VARIANTS[name]
    model, theta, X, y, Ts = problem(kind)
    K = KFAC(model, theta, CrossEntropy(), X, y, bias=bias)
    g = refngd.gradient(model, theta, CrossEntropy(), X, y)
    for lam in LAM:
        D = damped_dense(K, shifts, Ts, lam)
        assert rel_err(K.solve(g, lam, **kw), np.linalg.solve(D, g)) <= EXACT
        ld = np.linalg.slogdet(D)[1]
        assert abs(K.logdet(lam, **kw) - ld) <= EXACT * abs(ld)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("lams", [(1e-3, 0.2), (0.5, 1e-4)])
def test_per_factor_pair_matches_dense(kind, bias, lams):
    """(A + λ_A I)⁻¹ ⊗ (G + λ_G I)⁻¹ with λ_A and λ_G given independently."""
    model, theta, X, y, Ts = problem(kind)
    K = KFAC(model, theta, CrossEntropy(), X, y, bias=bias)
    g = refngd.gradient(model, theta, CrossEntropy(), X, y)
    D = damped_dense(K, lambda A, G, lam, T: lams, Ts, None)
    assert rel_err(K.solve(g, lams, damping_mode="per-factor"), np.linalg.solve(D, g)) <= EXACT
    ld = np.linalg.slogdet(D)[1]
    assert abs(K.logdet(lams, damping_mode="per-factor") - ld) <= EXACT * abs(ld)


@pytest.mark.parametrize("kind,N", [("mlp", 5), ("mlp", 2), ("cnn", 5)])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_ekfac_variant_matches_dense(kind, N, name):
    """EKFAC adds K-FAC's factor-damping term: EKFAC + (G + γ_G) ⊗ (A + γ_A) − G ⊗ A.

    N = 2 gives thin eigenbases (fewer rows than the factors' dimensions): the diagonal
    is then re-estimated in full bases."""
    kw, shifts = VARIANTS[name]
    model, theta, X, y, Ts = problem(kind, N)
    E = EKFAC(model, theta, CrossEntropy(), X, y)
    thin = any(not e[2] for b in E.blocks for e in b.eig())  # a thin basis somewhere
    assert thin == (N == 2 or kind == "cnn")  # (the CNN's Linear(12, 3): 5 rows < 12)
    K = E.kfac
    g = refngd.gradient(model, theta, CrossEntropy(), X, y)
    for lam in LAM:
        D = E.dense() + damped_dense(K, shifts, Ts, lam) - K.dense()
        assert rel_err(E.solve(g, lam, **kw), np.linalg.solve(D, g)) <= EXACT
        ld = np.linalg.slogdet(D)[1]
        assert abs(E.logdet(lam, **kw) - ld) <= EXACT * abs(ld)
    # with K-FAC's own eigenvalues, EKFAC's factored solve is K-FAC's
    Ek = E.with_factors([(f.A, f.G) for f in K.factors()])
    Ek = Ek.with_scalings(Ek.kronecker_eigenvalues())
    assert rel_err(Ek.solve(g, 0.1, **kw), K.solve(g, 0.1, **kw)) <= 1e-10


def test_variant_identities():
    """pi="trace" is invariant under the T split; per-factor λ is (λ, λ); pi=1 is (√λ, √λ);
    the split changes nothing without weight sharing and differs with it."""
    for kind in ("mlp", "cnn"):
        model, theta, X, y, _ = problem(kind)
        K = KFAC(model, theta, CrossEntropy(), X, y)
        g = refngd.gradient(model, theta, CrossEntropy(), X, y)
        f = K.solve(g, 0.1, "factored")
        assert rel_err(K.solve(g, 0.1, "factored", damping_split="locations"), f) <= EXACT
        assert rel_err(K.solve(g, 0.1, "per-factor"), K.solve(g, (0.1, 0.1), "per-factor")) == 0
        assert rel_err(K.solve(g, 0.09, "factored", pi=1), K.solve(g, 0.3, "per-factor")) <= EXACT
        split = K.solve(g, 0.1, "factored", pi=1, damping_split="locations")
        even = K.solve(g, 0.1, "factored", pi=1)
        assert (rel_err(split, even) <= EXACT) == (kind == "mlp")


def test_bad_damping_options():
    model, theta, X, y, _ = problem("mlp")
    K = KFAC(model, theta, CrossEntropy(), X, y)
    g = np.ones(model.num_params)
    with pytest.raises(ValueError, match="per-factor"):
        K.solve(g, (0.1, 0.2), "factored")
    with pytest.raises(ValueError, match="damping_split"):
        K.solve(g, 0.1, "factored", damping_split="spatial")
    with pytest.raises(ValueError, match="pi"):
        K.solve(g, 0.1, "factored", pi=0)
    with pytest.raises(ValueError, match="pi"):
        K.solve(g, 0.1, "factored", pi="norm")
    with pytest.raises(ValueError, match="λ_G"):
        K.solve(g, (0.1, -1.0), "per-factor")


@pytest.mark.parametrize("kw", [dict(damping_mode="factored", pi=1, damping_split="locations"),
                                dict(damping_mode="per-factor"), dict(damping_mode="factored")])
def test_updates_and_optimizers_take_the_variants(kw):
    model, theta, X, y, _ = problem("cnn")
    loss = CrossEntropy()
    K = KFAC(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    d = updates.kfac(model, theta, loss, X, y, 0.1, **kw)
    assert rel_err(d, K.solve(g, 0.1, **kw)) <= 1e-10
    E = EKFAC(model, theta, loss, X, y)
    d_ek = updates.ekfac(model, theta, loss, X, y, 0.1, **kw)
    assert rel_err(d_ek, E.solve(g, 0.1, **kw)) <= 1e-10
    # one step, T = 1 and one batch in the averages: the optimizers' direction is the update's
    for opt, ref in ((optim.KFAC(lr=1.0, damping=0.1, inverse_every=1, kl_clip=None,
                                 fisher_type="type-2", **kw), d),
                     (optim.EKFAC(lr=1.0, damping=0.1, inverse_every=1, kl_clip=None,
                                  fisher_type="type-2", **kw), E.solve(g, 0.1, **kw))):
        new, _, _ = opt.step(theta, opt.init(theta), model, loss, X, y)
        assert rel_err(theta - new, ref) <= 1e-10
