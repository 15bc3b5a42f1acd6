"""refngd.experiments.gamma_study: Wu et al. (2024)'s protocols against dense algebra.

The central check: at every damping λ of the grid, each method's γ is that of its
direction computed *densely* as (M + λI)⁻¹(right-hand side) with the method's P × P
matrix M and the *same* λ — so the test fails if any method's damping were normalised
differently (a per-method scale, a Gram-form λ not divided by c, …).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import refngd
from refngd import nn
from refngd.curvature import EKFAC, KFAC, EmpiricalFisher, Fisher, SampledFisher
from refngd.experiments.gamma_study import (DEFAULT_DAMPINGS, GAMMA_METHODS, batch_gammas, e1_summary,
                                            e3_summary, gradient_norm_imbalance)
from refngd.losses import CrossEntropy, MSELoss
from refngd.metrics import gamma

DAMPINGS = (1e-6, 1e-3, 1e-1, 10.0)


def _setup(loss):
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4))
    th = model.init(rng)
    X = rng.standard_normal((20, 6))
    y = rng.integers(0, 4, 20) if isinstance(loss, CrossEntropy) else rng.standard_normal((20, 4))
    return model, th, loss, X, y


@pytest.mark.parametrize("loss", [CrossEntropy("mean"), CrossEntropy("sum"), MSELoss("mean")],
                         ids=["ce-mean", "ce-sum", "mse-mean"])
def test_one_damping_convention_for_every_method(loss):
    model, th, loss, X, y = _setup(loss)
    out = batch_gammas(model, th, loss, X, y, dampings=DAMPINGS, rng=np.random.default_rng(1))
    assert out["dampings"] == list(DAMPINGS)
    Fop = Fisher(model, th, loss, X, y)
    F = Fop.dense()
    g = refngd.gradient(model, th, loss, X, y)
    c = loss.scale(model.forward(th, X))
    G = refngd.per_sample_gradients(model, th, loss, X, y)            # unreduced g_n, (N, P)
    e = loss.output_gradient(model.forward(th, X), y)
    s = (e * e).sum(axis=1)
    EFd = c * G.T @ G
    SFd = SampledFisher(model, th, loss, X, y, rng=np.random.default_rng(1)).dense()
    Kd = KFAC(model, th, loss, X, y).dense()
    Ed = EKFAC(model, th, loss, X, y).dense()
    I = np.eye(th.size)
    for i, lam in enumerate(DAMPINGS):
        dense = {"ngd": np.linalg.solve(F + lam * I, g),
                 "ef": np.linalg.solve(EFd + lam * I, g),
                 "ief": np.linalg.solve(EFd + lam * I, c * G.T @ s),   # Gram form = Gᵀ(GGᵀ + λ/c)⁻¹s
                 "sf": np.linalg.solve(SFd + lam * I, g),
                 "kfac": np.linalg.solve(Kd + lam * I, g),
                 "ekfac": np.linalg.solve(Ed + lam * I, g)}
        for m, d in dense.items():
            assert out[m][i] == pytest.approx(gamma(d, Fop, g), rel=1e-7), (m, lam)


def test_gamma_star_is_the_optimum():
    model, th, loss, X, y = _setup(CrossEntropy())
    out = batch_gammas(model, th, loss, X, y, rng=np.random.default_rng(1))
    F = Fisher(model, th, loss, X, y).dense()
    g = refngd.gradient(model, th, loss, X, y)
    w, V = np.linalg.eigh(F)
    keep = w > 1e-10 * w.max()                       # explicit threshold, no library default
    Fp = (V[:, keep] / w[keep]) @ V[:, keep].T
    assert out["gamma_star"] == pytest.approx(1 / math.sqrt(g @ Fp @ g), rel=1e-8)
    assert out["gamma_sgd"] == pytest.approx(math.sqrt(g @ F @ g) / (g @ g), rel=1e-10)
    for m in GAMMA_METHODS:
        assert min(out[m]) >= out["gamma_star"] * (1 - 1e-9)
    assert len(out["ngd"]) == len(DEFAULT_DAMPINGS)
    assert out["ngd"][0] == pytest.approx(out["gamma_star"], rel=1e-6)  # λ = 1e-10 → F⁺g


def test_ief_gram_form_tends_to_a_reweighted_gradient_not_g():
    """docs claim (c): at large λ, iEF's Gram form → cGᵀs = c Σ‖e_n‖² g_n, not g."""
    model, th, loss, X, y = _setup(CrossEntropy())
    from refngd import updates

    lam = 1e8
    d = updates.ief(model, th, loss, X, y, lam, form="gram")
    G = refngd.per_sample_gradients(model, th, loss, X, y)
    e = loss.output_gradient(model.forward(th, X), y)
    target = G.T @ (e * e).sum(axis=1)
    assert np.allclose(d * lam, target, rtol=1e-5)
    g = refngd.gradient(model, th, loss, X, y)
    cos = g @ target / np.linalg.norm(g) / np.linalg.norm(target)
    assert cos < 0.999


def test_gradient_norm_imbalance():
    model, th, loss, X, y = _setup(CrossEntropy())
    G = refngd.per_sample_gradients(model, th, loss, X, y)
    sq = (G * G).sum(axis=1)
    EF = EmpiricalFisher(model, th, loss, X, y)
    assert gradient_norm_imbalance(EF) == pytest.approx(sq.max() / sq.mean(), rel=1e-10)


def _fake(gs, gsgd, gstar, dampings=(1e-8, 1.0)):
    return {"dampings": list(dampings), "gamma_sgd": gsgd, "gamma_star": gstar, "imbalance": 1.0,
            "ngd": gs}


def test_e1_ratio_of_means_and_delta_method_stderr():
    b = [_fake([2.0, 1.0], 4.0, 1.0), _fake([3.0, 1.0], 5.0, 2.0), _fake([7.0, 1.0], 9.0, 3.0)]
    out = e1_summary(b, 1e-8)["ngd"]
    x, y = np.array([2.0, 3.0, 7.0]), np.array([4.0, 5.0, 9.0])
    R = x.mean() / y.mean()
    se = np.sqrt(np.var(x - R * y, ddof=1) / 3) / y.mean()
    assert out["mean_ratio"] == pytest.approx(R)
    assert out["stderr"] == pytest.approx(se)
    assert out["optimal_ratio"] == pytest.approx(x.mean() / 2.0)
    assert out["damping"] == 1e-8
    assert e1_summary(b[:1], 1e-8)["ngd"]["stderr"] is None
    with pytest.raises(ValueError, match="not evaluated"):
        e1_summary(b, 1e-3)


def test_e3_curve_best_and_grid_edge():
    b = [_fake([2.0, 1.0], 4.0, 1.0), _fake([4.0, 3.0], 4.0, 1.0)]
    out = e3_summary(b)["ngd"]
    assert out["ratios"] == pytest.approx([0.75, 0.5])
    assert out["best_ratio"] == pytest.approx(0.5) and out["best_damping"] == 1.0
    assert out["best_on_grid_edge"]  # still falling at the largest damping


def test_bad_arguments():
    model, th, loss, X, y = _setup(CrossEntropy())
    with pytest.raises(ValueError, match="unknown"):
        batch_gammas(model, th, loss, X, y, methods=("adam",))
    with pytest.raises(TypeError, match="rng"):
        batch_gammas(model, th, loss, X, y, methods=("sf",))
    with pytest.raises(ValueError, match="dampings"):
        batch_gammas(model, th, loss, X, y, methods=("ngd",), dampings=(0.0,))


def test_gamma_depends_on_the_reduction_ratios_do_not():
    """γ_mean = √N · γ_sum (F and g both scale by c = 1/N); the reported ratios are invariant."""
    model, th, _, X, y = _setup(CrossEntropy())
    N = X.shape[0]
    mean = batch_gammas(model, th, CrossEntropy("mean"), X, y, methods=("ngd", "ief"), dampings=(1e-3,))
    summ = batch_gammas(model, th, CrossEntropy("sum"), X, y, methods=("ngd", "ief"), dampings=(1e-3 * N,))
    assert mean["gamma_sgd"] == pytest.approx(math.sqrt(N) * summ["gamma_sgd"], rel=1e-10)
    for m in ("ngd", "ief"):  # λ_sum = N λ_mean: the same directions, the same ratios
        assert mean[m][0] / mean["gamma_sgd"] == pytest.approx(summ[m][0] / summ["gamma_sgd"], rel=1e-8)


def test_best_over_damping_flags_the_edge_of_the_valid_region():
    from refngd.experiments.gamma_study import best_over_damping

    out = best_over_damping([1e-8, 1e-6, 1e-4], [math.inf, 0.5, 0.7])
    assert out["best_damping"] == 1e-6 and out["best_on_grid_edge"]
    assert not best_over_damping([1e-8, 1e-6, 1e-4], [0.6, 0.5, 0.7])["best_on_grid_edge"]


def test_seed_statistics_never_drop_a_failed_seed():
    from refngd.experiments.compare import _stats

    assert _stats([1.0, 3.0])["mean"] == 2.0 and _stats([1.0, 3.0])["sd"] == pytest.approx(math.sqrt(2))
    assert _stats([1.0, math.inf])["mean"] == math.inf
    assert _stats([1.0, None])["mean"] is None


def test_params_subset_is_the_study_of_the_submatrix():
    """``params=S``: every γ is that of the subset problem — F[S, S], g[S] from the full
    dense matrices, directions (M[S, S] + λI)⁻¹ g[S] — and params=None follows the
    model's default selection (the frozen LoRA base is left out)."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.LoRALinear(7, 5, 2, 4.0), nn.Tanh(),
                          nn.Linear(5, 4))
    th = model.init(rng) + 0.3 * rng.standard_normal(model.num_params)
    X, y, loss = rng.standard_normal((20, 6)), rng.integers(0, 4, 20), CrossEntropy()
    m = refngd.subsets.peft_mask(model) | (np.arange(model.num_params) >= model.slices[4][0])
    out = batch_gammas(model, th, loss, X, y, dampings=DAMPINGS, rng=np.random.default_rng(1),
                       params=m)
    F = Fisher(model, th, loss, X, y, params="all").dense()[np.ix_(m, m)]
    g = refngd.gradient(model, th, loss, X, y)[m]
    G = refngd.per_sample_gradients(model, th, loss, X, y)[:, m]
    c = loss.scale(model.forward(th, X))
    Kd = KFAC(model, th, loss, X, y, params=m).dense()
    Fop = Fisher(model, th, loss, X, y, params=m)
    eye = np.eye(int(m.sum()))
    for i, lam in enumerate(DAMPINGS):
        for name, M in (("ngd", F), ("ef", c * G.T @ G), ("kfac", Kd)):
            d = np.linalg.solve(M + lam * eye, g)
            assert math.isclose(out[name][i], gamma(d, Fop, g), rel_tol=1e-7), (name, lam)
    assert math.isclose(out["gamma_sgd"], float(np.sqrt(g @ F @ g) / (g @ g)), rel_tol=1e-10)
    default = batch_gammas(model, th, loss, X, y, methods=("ngd",), dampings=DAMPINGS)
    trainable = model.trainable_mask()
    assert not trainable.all()  # the LoRA base is frozen
    assert default == batch_gammas(model, th, loss, X, y, methods=("ngd",), dampings=DAMPINGS,
                                   params=trainable)


def test_gamma_star_without_a_solve_where_the_gram_matrix_is_singular():
    """Duplicate samples make K singular: γ* = 1/√(c·aᵀΠa) equals 1/√(gᵀF⁺g) from a dense
    pseudo-inverse with an explicit threshold."""
    rng = np.random.default_rng(5)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4))
    th = model.init(rng)
    X = rng.standard_normal((10, 6))
    X[-1] = X[0]
    y = rng.integers(0, 4, 10)
    y[-1] = y[0]
    out = batch_gammas(model, th, CrossEntropy(), X, y, methods=("ngd",), dampings=(1e-6,))
    F = Fisher(model, th, CrossEntropy(), X, y).dense()
    g = refngd.gradient(model, th, CrossEntropy(), X, y)
    w, V = np.linalg.eigh(F)
    keep = w > 1e-10 * w.max()
    Fp = (V[:, keep] / w[keep]) @ V[:, keep].T
    assert out["gamma_star"] == pytest.approx(1 / math.sqrt(g @ Fp @ g), rel=1e-8)


# ------------------------------------------------------- Wu et al.'s Fig. 5 set, E1 spreads
def _dense_wu_kfac(theta, X, y, weighted):
    """Empirical (eq. 42) or iEF-weighted (eq. 43) K-FAC of Wu et al. App. D.2.2, densely, from
    the hand-written MLP: per layer G = c Σ_n w_n b_n b_nᵀ (w_n = 1 or 1/‖e_n‖²), A = (1/N) Σ a aᵀ;
    bias="separate": the weight block is G ⊗ A_w, the bias block G ⊗ (1/N)Σ 1 = G."""
    import handmlp
    from scipy.linalg import block_diag

    P = handmlp.pieces(theta, X, y, 3, 3)
    N = X.shape[0]
    e = P["b"][1]                                   # ∂l_n/∂z at the output: the iEF weights
    w = 1.0 / (e * e).sum(axis=1) if weighted else np.ones(N)
    blocks = []
    for abar, b in zip(P["abar"], P["b"]):
        a = abar[:, :-1]
        G = P["c"] * (b * w[:, None]).T @ b
        blocks += [np.kron(G, a.T @ a / N), G]
    return block_diag(*blocks)


def test_wu_fig5_kfacs_against_dense_construction():
    """kfac_emp = the paper's eKFAC (empirical K-FAC), kfac_ief = its ieKFAC (App. D.2.2, eq. 43),
    kfac_mc = its KFAC (MC-sampled), each at every damping of the shared absolute grid."""
    import handmlp
    from refngd.experiments.gamma_study import PAPER_NAMES, WU_FIG5_METHODS

    model, th, loss, X, y = handmlp.make(seed=3, N=8)
    out = batch_gammas(model, th, loss, X, y, methods=WU_FIG5_METHODS, dampings=DAMPINGS,
                       rng=np.random.default_rng(1))
    mc = batch_gammas(model, th, loss, X, y, methods=("kfac_mc",), dampings=DAMPINGS,
                      rng=np.random.default_rng(5))
    Fop = Fisher(model, th, loss, X, y)
    g = refngd.gradient(model, th, loss, X, y)
    I = np.eye(th.size)
    emp, ief = _dense_wu_kfac(th, X, y, False), _dense_wu_kfac(th, X, y, True)
    MCd = KFAC(model, th, loss, X, y, fisher_type="mc", rng=np.random.default_rng(5)).dense()
    assert np.abs(emp - ief).max() > 0.1 * np.abs(emp).max()     # the weights matter here
    for i, lam in enumerate(DAMPINGS):
        for m, M, rec in (("kfac_emp", emp, out), ("kfac_ief", ief, out), ("kfac_mc", MCd, mc)):
            d = np.linalg.solve(M + lam * I, g)
            assert rec[m][i] == pytest.approx(gamma(d, Fop, g), rel=1e-7), (m, lam)
    assert [PAPER_NAMES[m] for m in WU_FIG5_METHODS] == ["iEF", "KFAC", "eKFAC", "ieKFAC"]
    assert "ekfac" not in PAPER_NAMES       # refngd's EKFAC is George et al.'s, not the paper's


def test_e1_record_carries_the_papers_sd_beside_refngds_stderr():
    """E1: ``sd`` = 1-σ sample sd over batches of γ_X/γ_SGD (the paper's error bars), ``stderr``
    = delta-method standard error of the ratio of means (refngd's), each with its label."""
    b = [_fake([2.0, 1.0], 4.0, 1.0), _fake([3.0, 1.0], 5.0, 2.0), _fake([7.0, 1.0], 9.0, 3.0)]
    out = e1_summary(b, 1e-8)["ngd"]
    r = np.array([2 / 4, 3 / 5, 7 / 9])
    assert out["sd"] == pytest.approx(np.std(r, ddof=1), rel=1e-12)
    assert "1-σ" in out["sd_label"] and "Wu et al." in out["sd_label"]
    assert "refngd's" in out["stderr_label"] and "not the paper's" in out["stderr_label"]
    assert out["sd"] != pytest.approx(out["stderr"], rel=1e-3)
    assert e1_summary(b[:1], 1e-8)["ngd"]["sd"] is None


def test_papers_imbalance_statistic_beside_refngds():
    """Wu et al. Fig. 2: mean over batches of max_n ‖g_n‖ / min_n ‖g_n‖ (norms, not squares)."""
    from refngd.experiments.gamma_study import checkpoint_imbalance, max_min_norm_ratio

    model, th, loss, X, y = _setup(CrossEntropy())
    vals = []
    for sl in (slice(0, 10), slice(10, 20)):
        G = refngd.per_sample_gradients(model, th, loss, X[sl], y[sl])
        norms = np.linalg.norm(G, axis=1)
        want = norms.max() / norms.min()
        EF = EmpiricalFisher(model, th, loss, X[sl], y[sl])
        assert max_min_norm_ratio(EF) == pytest.approx(want, rel=1e-10)
        out = batch_gammas(model, th, loss, X[sl], y[sl], methods=("ngd",), dampings=DAMPINGS)
        assert out["imbalance_paper"] == pytest.approx(want, rel=1e-10)
        vals.append(out)
    both = checkpoint_imbalance(vals)
    assert both["imbalance_paper"] == pytest.approx(np.mean([v["imbalance_paper"] for v in vals]))
    assert both["imbalance"] == pytest.approx(np.mean([v["imbalance"] for v in vals]))
    assert both["imbalance_paper"] != pytest.approx(both["imbalance"], rel=1e-2)
