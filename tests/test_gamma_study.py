"""refngd.experiments.gamma_study: the γ-ratio framework of Wu et al. (2024) against dense algebra."""
from __future__ import annotations

import numpy as np
import pytest

import refngd
from refngd import nn, updates
from refngd.curvature import EKFAC, KFAC, Fisher
from refngd.losses import CrossEntropy
from refngd.metrics import gamma
from refngd.experiments.gamma_study import DEFAULT_TAUS, average_gamma, gamma_ratios


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4))
    th = model.init(rng)
    X, y = rng.standard_normal((20, 6)), rng.integers(0, 4, 20)
    loss = CrossEntropy()
    table = gamma_ratios(model, th, loss, X, y, rng=np.random.default_rng(1))
    return model, th, loss, X, y, table


def test_ngd_reaches_the_optimum_and_bounds_every_method(setup):
    model, th, loss, X, y, table = setup
    F = Fisher(model, th, loss, X, y).dense()
    g = refngd.gradient(model, th, loss, X, y)
    Fp = np.linalg.pinv(F, rcond=1e-10, hermitian=True)
    optimum = (g @ g) / np.sqrt((g @ F @ g) * (g @ Fp @ g))  # γ(F⁺g)/γ(g)
    assert table["ngd"]["best_ratio"] == pytest.approx(optimum, rel=1e-6)
    assert table["gamma_sgd"] == pytest.approx(np.sqrt(g @ F @ g) / (g @ g))
    for m in ("ef", "ief", "sf", "kfac", "ekfac"):
        assert table[m]["best_ratio"] >= optimum * (1 - 1e-9)
        assert len(table[m]["ratios"]) == len(DEFAULT_TAUS)


def test_every_ratio_is_gamma_of_the_method_update(setup):
    model, th, loss, X, y, table = setup
    F = Fisher(model, th, loss, X, y)
    g = refngd.gradient(model, th, loss, X, y)
    gs = gamma(g, F, g)
    for i in (2, 6, 9):
        checks = {
            "ngd": updates.ngd(model, th, loss, X, y, table["ngd"]["dampings"][i]),
            "ef": updates.ef(model, th, loss, X, y, table["ef"]["dampings"][i], form="gram"),
            "ief": updates.ief(model, th, loss, X, y, table["ief"]["dampings"][i], form="gram"),
            "sf": updates.sf(model, th, loss, X, y, table["sf"]["dampings"][i], rng=np.random.default_rng(1)),
            "kfac": KFAC(model, th, loss, X, y).solve(g, table["kfac"]["dampings"][i]),
            "ekfac": EKFAC(model, th, loss, X, y).solve(g, table["ekfac"]["dampings"][i]),
        }
        for m, d in checks.items():
            assert table[m]["ratios"][i] == pytest.approx(gamma(d, F, g) / gs, rel=1e-6), (m, i)


def test_damping_scale_is_the_mean_eigenvalue(setup):
    model, th, loss, X, y, table = setup
    P = th.shape[0]
    F = Fisher(model, th, loss, X, y)
    assert table["ngd"]["dampings"][0] == pytest.approx(DEFAULT_TAUS[0] * F.trace() / P)
    G = refngd.per_sample_gradients(model, th, loss, X, y)
    assert table["ief"]["dampings"][0] == pytest.approx(DEFAULT_TAUS[0] * np.trace(G @ G.T) / 20)
    assert table["kfac"]["dampings"][0] == pytest.approx(DEFAULT_TAUS[0] * KFAC(model, th, loss, X, y).trace() / P)


def test_average_and_best(setup):
    *_, table = setup
    avg = average_gamma([table, table])
    for m in ("ngd", "ief"):
        assert avg[m]["ratios"] == pytest.approx(table[m]["ratios"])
        i = int(np.argmin(table[m]["ratios"]))
        assert avg[m]["best_ratio"] == pytest.approx(min(table[m]["ratios"]))
        assert avg[m]["best_tau"] == DEFAULT_TAUS[i]


def test_bad_arguments(setup):
    model, th, loss, X, y, _ = setup
    with pytest.raises(ValueError, match="unknown"):
        gamma_ratios(model, th, loss, X, y, methods=("adam",))
    with pytest.raises(TypeError, match="rng"):
        gamma_ratios(model, th, loss, X, y, methods=("sf",))
    with pytest.raises(ValueError, match="taus"):
        gamma_ratios(model, th, loss, X, y, methods=("ngd",), taus=(0.0,))
