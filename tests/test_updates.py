"""Update directions (``refngd.updates``) against hand-built linear algebra and theory.

* every update equals a dense solve built from ``refngd.jacobian`` / ``per_sample_gradients``
  and the loss's e_n, H_n with c written out by hand;
* the two damping forms of EF and iEF and the relations between them;
* the undamped paper identities G Δ_EF = 1 and G Δ_iEF = s;
* linear least squares, where NGD is Newton's method and iEF coincides with it;
* NGD minimises the γ indicator and is invariant under linear reparameterisation.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from numerics import assert_close

import refngd
from refngd import metrics, nn, updates
from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss

LOSSES = {"cross_entropy": CrossEntropy, "mse": MSELoss, "bce_with_logits": BCEWithLogits}
LOSS_RED = [(name, red) for name in LOSSES for red in ("mean", "sum")]
SEED, K = 11, 3


def c_by_hand(name, reduction, N, C):
    if reduction == "sum":
        return 1.0
    return 1.0 / N if name == "cross_entropy" else 1.0 / (N * C)


def targets(name, rng, N, C):
    if name == "cross_entropy":
        return rng.integers(0, C, size=N)
    if name == "mse":
        return rng.standard_normal((N, C))
    return rng.uniform(0, 1, size=(N, C))


def problem(name, reduction="mean", N=6, d=4, h=5, C=3, seed=0):
    """A tanh MLP; with the defaults N·C = 18 < P = 43 (Gram matrices nonsingular)."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C))
    theta = model.init(rng)
    X = rng.standard_normal((N, d))
    return model, theta, X, targets(name, rng, N, C), LOSSES[name](reduction)


def by_hand(model, theta, loss, X, y, name, reduction):
    """G (N, P), e (N, C), s = ‖e_n‖², J, H, c and g = c Gᵀ1, all without refngd.curvature."""
    Z = model.forward(theta, X)
    N, C = Z.shape
    J = refngd.jacobian(model, theta, X)
    e = loss.output_gradient(Z, y)
    G = np.einsum("ncp,nc->np", J, e)
    assert_close(refngd.per_sample_gradients(model, theta, loss, X, y), G)
    c = c_by_hand(name, reduction, N, C)
    return dict(Z=Z, J=J, e=e, G=G, s=(e * e).sum(1), H=loss.output_hessian(Z), c=c,
                g=c * G.sum(0))


def dense_solve(A, b, lam):
    return np.linalg.solve(A + lam * np.eye(A.shape[0]), b)


# ============================================================ updates = dense solves
@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_updates_are_dense_solves(name, reduction):
    model, theta, X, y, loss = problem(name, reduction)
    o = by_hand(model, theta, loss, X, y, name, reduction)
    G, c, g, s, J = o["G"], o["c"], o["g"], o["s"], o["J"]
    assert_close(updates.sgd(model, theta, loss, X, y), g)
    F = c * np.einsum("nap,nab,nbq->pq", J, o["H"], J)
    EF = c * G.T @ G
    iEF = c * (G / s[:, None]).T @ G
    Eh = loss.sampled_output_gradients(o["Z"], np.random.default_rng(SEED), K)
    gh = np.einsum("ncp,nkc->nkp", J, Eh)
    SF = c / K * np.einsum("nkp,nkq->pq", gh, gh)
    for rel in (1e-3, 1.0):
        lam = rel * np.linalg.norm(F, 2)
        assert_close(updates.ngd(model, theta, loss, X, y, lam), dense_solve(F, g, lam), 1e-9)
        assert_close(updates.sf(model, theta, loss, X, y, lam, mc_samples=K,
                                rng=np.random.default_rng(SEED)), dense_solve(SF, g, lam), 1e-9)
        assert_close(updates.ef(model, theta, loss, X, y, lam, form="tikhonov"), dense_solve(EF, g, lam), 1e-9)
        assert_close(updates.ief(model, theta, loss, X, y, lam, form="tikhonov"), dense_solve(iEF, g, lam), 1e-9)


@pytest.mark.parametrize("name,reduction", LOSS_RED)
@pytest.mark.parametrize("lam", [1e-4, 0.1, 10.0])
def test_gram_forms_by_hand(name, reduction, lam):
    """Δ_EF = Gᵀ(GGᵀ + λI)⁻¹1 and Δ_iEF = Gᵀ(GGᵀ + λI)⁻¹s (Wu et al. 2024, eq. 4 and 8)."""
    model, theta, X, y, loss = problem(name, reduction)
    o = by_hand(model, theta, loss, X, y, name, reduction)
    G, s = o["G"], o["s"]
    lam = lam * np.linalg.norm(G @ G.T, 2)
    N = G.shape[0]
    assert_close(updates.ef(model, theta, loss, X, y, lam, form="gram"),
                 G.T @ dense_solve(G @ G.T, np.ones(N), lam), 1e-9)
    assert_close(updates.ief(model, theta, loss, X, y, lam, form="gram"),
                 G.T @ dense_solve(G @ G.T, s, lam), 1e-9)


@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_damping_forms_relations(name, reduction):
    """EF: gram(λ) = tikhonov(c·λ).  iEF: tikhonov(λ) = Gᵀ(GGᵀ + (λ/c)·diag(s))⁻¹ s.

    Both from the push-through identity (cGᵀBG + λI)⁻¹ cGᵀB = Gᵀ(GGᵀ + (λ/c)B⁻¹)⁻¹ with
    g = cGᵀB·b: B = I, b = 1 (EF) and B = diag(s)⁻¹, b = s (iEF, as D⁻¹s = 1);
    docs/empirical_fisher.md has the derivation.
    """
    model, theta, X, y, loss = problem(name, reduction)
    o = by_hand(model, theta, loss, X, y, name, reduction)
    G, s, c = o["G"], o["s"], o["c"]
    for lam in (1e-3, 1.0, 30.0):
        assert_close(updates.ef(model, theta, loss, X, y, lam, form="gram"),
                     updates.ef(model, theta, loss, X, y, c * lam, form="tikhonov"), 1e-9)
        assert_close(updates.ief(model, theta, loss, X, y, lam, form="tikhonov"),
                     G.T @ np.linalg.solve(G @ G.T + (lam / c) * np.diag(s), s), 1e-9)
    if reduction == "mean":  # the two forms really differ at equal λ when c ≠ 1
        a = updates.ef(model, theta, loss, X, y, 1.0, form="gram")
        b = updates.ef(model, theta, loss, X, y, 1.0, form="tikhonov")
        assert np.linalg.norm(a - b) > 1e-3 * np.linalg.norm(a)


@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_undamped_identities(name, reduction):
    """λ = 0, N < P: G Δ_EF = 1 and G Δ_iEF = s; Δ is the minimum-norm solution (Δ ∈ row G);
    the Tikhonov forms give the same minimum-norm directions at λ = 0."""
    model, theta, X, y, loss = problem(name, reduction)
    o = by_hand(model, theta, loss, X, y, name, reduction)
    G, s = o["G"], o["s"]
    N = G.shape[0]
    d_ef = updates.ef(model, theta, loss, X, y, 0.0, form="gram")
    d_ief = updates.ief(model, theta, loss, X, y, 0.0, form="gram")
    assert_close(G @ d_ef, np.ones(N), 1e-9)
    assert_close(G @ d_ief, s, 1e-9)
    Gp = np.linalg.pinv(G, rcond=1e-12)  # explicit: never a library default
    assert_close(d_ef, Gp @ np.ones(N), 1e-8)
    assert_close(d_ief, Gp @ s, 1e-8)
    assert_close(updates.ef(model, theta, loss, X, y, 0.0, form="tikhonov"), d_ef, 1e-8)
    assert_close(updates.ief(model, theta, loss, X, y, 0.0, form="tikhonov"), d_ief, 1e-8)
    # first-order loss change of each sample along −Δ: −⟨g_n, Δ⟩ = −1 resp. −‖e_n‖²
    eps = 1e-6
    l0 = loss.per_sample(model.forward(theta, X), y)
    l1 = loss.per_sample(model.forward(theta - eps * d_ief, X), y)
    np.testing.assert_allclose((l0 - l1) / eps, s, rtol=1e-4, atol=1e-6 * s.max())


def test_update_argument_errors():
    model, theta, X, y, loss = problem("mse")
    for f in (updates.ef, updates.ief):
        with pytest.raises(ValueError):
            f(model, theta, loss, X, y, 1.0, form="bogus")
        for form in ("gram", "tikhonov"):
            with pytest.raises(ValueError):
                f(model, theta, loss, X, y, -1.0, form=form)
            with pytest.raises(ValueError):
                f(model, theta, loss, X, y, float("nan"), form=form)
    with pytest.raises(ValueError):
        updates.ngd(model, theta, loss, X, y, -1e-3)
    with pytest.raises(ValueError):
        updates.sf(model, theta, loss, X, y, float("nan"), rng=0)
    with pytest.raises(TypeError):
        updates.sf(model, theta, loss, X, y, 1.0, rng=None)


def test_shared_linearization():
    model, theta, X, y, loss = problem("cross_entropy")
    lin = model.linearize(theta, X)
    for f, kw in [(updates.ngd, {}), (updates.ef, {"form": "gram"}), (updates.ief, {}),
                  (updates.sf, {"rng": 3, "mc_samples": 2})]:
        np.testing.assert_array_equal(f(model, theta, loss, X, y, 0.1, linearization=lin, **kw),
                                      f(model, theta, loss, X, y, 0.1, **kw))


def test_undamped_gram_form_singular():
    """A perfectly learnt sample (e_n = 0) or a duplicate sample makes GGᵀ singular."""
    from refngd.backend import SingularSystemError

    model, theta, X, y, loss = problem("mse", "sum")
    y = y.copy()
    y[1] = model.forward(theta, X)[1]
    for f in (updates.ef, updates.ief):
        with pytest.raises(SingularSystemError):
            f(model, theta, loss, X, y, 0.0, form="gram")
        assert np.all(np.isfinite(f(model, theta, loss, X, y, 1e-3, form="gram")))
    d = updates.ief(model, theta, loss, X, y, 1e-3, form="tikhonov")
    assert np.all(np.isfinite(d))


# ============================================================ linear least squares
def linear_problem(N, d, C, reduction, seed=4):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(d, C))
    theta = model.init(rng)
    X = rng.standard_normal((N, d))
    Y = rng.standard_normal((N, C))
    return model, theta, X, Y, MSELoss(reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_least_squares_ief_equals_twice_ngd(reduction):
    """Single-output linear model z = āᵀθ, MSE, N < P (interpolation possible).

    With r = Āθ − y: e_n = 2 r_n, g_n = 2 r_n ā_n, s_n = ‖e_n‖² = 4 r_n², F = 2c ĀᵀĀ and
    g = 2c Āᵀr.  Hence (exact identities, for either reduction):

    * NGD (λ = 0, minimum norm): d = F⁺g = (ĀᵀĀ)⁺Āᵀr = Ā⁺r, so θ − d interpolates:
      Ā(θ − d) = y (Newton = Gauss–Newton: F is the Hessian of this quadratic loss);
    * iEF (gram form, λ = 0): G Δ = s reads 2 r_n ā_nᵀΔ = 4 r_n², i.e. ĀΔ = 2r, and the
      minimum-norm solution is Δ = 2Ā⁺r.  So Δ_iEF = 2·d_NGD: iEF with step ½ solves the
      problem (the 2 is PyTorch's MSE factor: l = r², e = 2r);
    * EF (gram form, λ = 0) gives ĀΔ = 1/(2r) instead, which does *not* interpolate.
    """
    model, theta, X, y, loss = linear_problem(N=4, d=6, C=1, reduction=reduction)
    A = np.hstack([X, np.ones((4, 1))])  # Ā; θ = [w; b]
    r = A @ theta - y[:, 0]
    d_ngd = updates.ngd(model, theta, loss, X, y, 0.0)
    assert_close(d_ngd, np.linalg.pinv(A, rcond=1e-12) @ r, 1e-9)
    assert_close(model.forward(theta - d_ngd, X), y, 1e-9)
    d_ief = updates.ief(model, theta, loss, X, y, 0.0, form="gram")
    assert_close(d_ief, 2 * d_ngd, 1e-9)
    assert_close(model.forward(theta - 0.5 * d_ief, X), y, 1e-9)
    d_ef = updates.ef(model, theta, loss, X, y, 0.0, form="gram")
    assert_close(A @ d_ef, 1 / (2 * r), 1e-9)
    assert np.abs(model.forward(theta - d_ef, X) - y).max() > 1e-2
    # the iEF direction as λ → 0 in the gram form approaches the undamped one
    assert_close(updates.ief(model, theta, loss, X, y, 1e-10, form="gram"), d_ief, 1e-6)


def test_least_squares_multi_output_ief_differs():
    """With C > 1 outputs the identity above fails: G Δ = s constrains only e_nᵀ V ā_n (one
    number per sample) and the minimum-norm Δ ∈ span{e_n ā_nᵀ} is not 2·NGD, which is
    Σ_mk [(ĀĀᵀ)⁻¹]_mk r_m ā_kᵀ with cross terms m ≠ k.  Recorded so that nobody 'fixes' it."""
    model, theta, X, y, loss = linear_problem(N=4, d=6, C=2, reduction="mean")
    d_ngd = updates.ngd(model, theta, loss, X, y, 0.0)
    d_ief = updates.ief(model, theta, loss, X, y, 0.0, form="gram")
    assert_close(model.forward(theta - d_ngd, X), y, 1e-9)  # NGD still interpolates
    assert np.linalg.norm(d_ief - 2 * d_ngd) > 1e-2 * np.linalg.norm(d_ngd)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_least_squares_ngd_solves_normal_equations(reduction):
    """N ≥ P: F = 2c ĀᵀĀ is invertible and θ − F⁻¹g = (ĀᵀĀ)⁻¹Āᵀ Y, the least-squares fit
    (one Newton step on a quadratic), independent of c; also as λ → 0."""
    N, d, C = 30, 3, 2
    model, theta, X, Y, loss = linear_problem(N, d, C, reduction)
    A = np.hstack([X, np.ones((N, 1))])
    Wb = np.linalg.lstsq(A, Y, rcond=1e-12)[0]  # (d + 1, C)
    theta_ls = np.concatenate([Wb[:d].T.reshape(-1), Wb[d]])  # PyTorch order: W (C, d), b
    assert_close(theta - updates.ngd(model, theta, loss, X, Y, 0.0), theta_ls, 1e-10)
    F = refngd.curvature.Fisher(model, theta, loss, X, Y).dense()
    lam = 1e-12 * np.linalg.norm(F, 2)
    assert_close(theta - updates.ngd(model, theta, loss, X, Y, lam), theta_ls, 1e-9)
    # the normal equations Āᵀ(ĀW − Y) = 0 hold at the new parameters
    Z = model.forward(theta - updates.ngd(model, theta, loss, X, Y, 0.0), X)
    assert np.abs(A.T @ (Z - Y)).max() < 1e-10 * np.abs(A.T @ Y).max()


# ============================================================ γ and invariance
def overdetermined(name, reduction="sum", N=200, seed=1):
    """P = 17 < R = 2N: F is invertible (cond ≈ 10³) for MSE and BCE."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    theta = 2 * model.init(rng)
    X = rng.standard_normal((N, 2))
    y = targets(name, rng, N, 2)
    return model, theta, X, y, LOSSES[name](reduction)


def _competitors(model, theta, loss, X, y, F):
    rng = np.random.default_rng(0)
    top = np.linalg.norm(F, 2)
    out = [rng.standard_normal(theta.shape[0]) for _ in range(20)]
    out.append(updates.sgd(model, theta, loss, X, y))
    for rel in (1e-6, 1e-3, 1e-1):
        lam = rel * top
        out += [updates.ef(model, theta, loss, X, y, lam), updates.ief(model, theta, loss, X, y, lam),
                updates.sf(model, theta, loss, X, y, lam, mc_samples=2, rng=1),
                updates.ngd(model, theta, loss, X, y, lam)]
    return out


@pytest.mark.parametrize("name", ["mse", "bce_with_logits"])
def test_ngd_minimises_gamma_invertible(name):
    """P < R, F invertible: γ(d) ≥ γ(F⁻¹g) = 1/√(gᵀF⁻¹g) for every d (Cauchy–Schwarz)."""
    model, theta, X, y, loss = overdetermined(name)
    Fop = refngd.curvature.Fisher(model, theta, loss, X, y)
    F = Fop.dense()
    g = updates.sgd(model, theta, loss, X, y)
    d_ngd = updates.ngd(model, theta, loss, X, y, 0.0)
    best = metrics.gamma(d_ngd, Fop, g)
    assert math.isclose(best, 1 / math.sqrt(g @ np.linalg.solve(F, g)), rel_tol=1e-9)
    for d in _competitors(model, theta, loss, X, y, F):
        assert metrics.gamma(d, Fop, g) >= best * (1 - 1e-12)
        assert metrics.gamma(d, F, g) >= best * (1 - 1e-12)
    assert metrics.gamma_ratio(d_ngd, Fop, g) < 1


@pytest.mark.parametrize("name", ["mse", "cross_entropy"])
def test_ngd_minimises_gamma_singular(name):
    """R < P, F singular: the minimiser is F⁺g (g ∈ range F); for MSE that is solve(g, 0),
    for CE (singular Gram) a slightly damped NGD is within 1e-8 of the minimum."""
    model, theta, X, y, loss = problem(name, "mean")
    Fop = refngd.curvature.Fisher(model, theta, loss, X, y)
    F = Fop.dense()
    g = updates.sgd(model, theta, loss, X, y)
    Fp = np.linalg.pinv(F, rcond=1e-10, hermitian=True)
    assert_close(F @ (Fp @ g), g, 1e-8)  # g lies in the range of F
    best = metrics.gamma(Fp @ g, F, g)
    assert math.isclose(best, 1 / math.sqrt(g @ Fp @ g), rel_tol=1e-8)
    lam0 = 0.0 if name == "mse" else 1e-10 * np.linalg.norm(F, 2)
    d_ngd = updates.ngd(model, theta, loss, X, y, lam0)
    assert math.isclose(metrics.gamma(d_ngd, Fop, g), best, rel_tol=1e-8)
    for d in _competitors(model, theta, loss, X, y, F):
        assert metrics.gamma(d, Fop, g) >= best * (1 - 1e-10)


def _reparameterised(model, theta, X):
    """x' = Mᵀx + t with W' = W M⁻ᵀ, b' = b − W't gives identical outputs: θ' = S θ."""
    M = np.array([[2.0, 1.0], [0.5, 1.5]])
    t = np.array([0.3, -0.7])
    (W1, b1), act, (W2, b2) = model.unflatten(theta)
    W1p = W1 @ np.linalg.inv(M).T
    theta_p = model.flatten([[W1p, b1 - W1p @ t], act, [W2, b2]])
    h, d = W1.shape
    Minv = np.linalg.inv(M)
    S = np.eye(theta.shape[0])
    S[:h * d, :h * d] = np.kron(np.eye(h), Minv)              # w'_i = M⁻¹ w_i
    S[h * d:h * d + h, :h * d] = -np.kron(np.eye(h), t @ Minv)  # b'_i = b_i − tᵀM⁻¹w_i
    assert_close(S @ theta, theta_p, 1e-14)
    return X @ M + t, theta_p, S


@pytest.mark.parametrize("name", ["mse", "bce_with_logits"])
def test_ngd_reparameterisation_invariance(name):
    """Model B(θ') = A(S⁻¹θ') on transformed inputs: J_B = J_A S⁻¹, g_B = S⁻ᵀ g_A,
    F_B = S⁻ᵀ F_A S⁻¹, so F_B⁻¹ g_B = S F_A⁻¹ g_A: the NGD step maps by S.  Exact at λ = 0,
    to O(λ/λ_min(F)) for tiny λ.  SGD's step is not invariant (S is not orthogonal)."""
    model, theta, X, y, loss = overdetermined(name)
    Xp, theta_p, S = _reparameterised(model, theta, X)
    assert_close(model.forward(theta_p, Xp), model.forward(theta, X), 1e-13)
    F = refngd.curvature.Fisher(model, theta, loss, X, y).dense()
    top = np.linalg.norm(F, 2)
    for lam, tol in [(0.0, 1e-9), (1e-12 * top, 1e-8), (1e-10 * top, 1e-6)]:
        d = updates.ngd(model, theta, loss, X, y, lam)
        dp = updates.ngd(model, theta_p, loss, Xp, y, lam)
        assert_close(S @ d, dp, tol)
    g, gp = updates.sgd(model, theta, loss, X, y), updates.sgd(model, theta_p, loss, Xp, y)
    assert_close(S.T @ gp, g, 1e-12)  # the gradient is a covector
    assert np.linalg.norm(S @ g - gp) > 1e-2 * np.linalg.norm(gp)
    # with damping the step is not invariant: λI is not a metric that transforms with S
    lam = 1e-1 * top
    d, dp = updates.ngd(model, theta, loss, X, y, lam), updates.ngd(model, theta_p, loss, Xp, y, lam)
    assert np.linalg.norm(S @ d - dp) > 1e-3 * np.linalg.norm(dp)
