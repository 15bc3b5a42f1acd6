"""INGD / IKFAC (Lin et al. 2024b): steps against Fig. 4 by hand, IKFAC's first-order
agreement with K-FAC, the input-rescaling invariance, a planted constant, and (optional)
the authors' ``singd`` package on a twin PyTorch model."""
import numpy as np
import pytest

from refngd import nn, optim
from refngd.losses import CrossEntropy

import handmlp

TOL = 1e-12
D_IN, H, C = 4, 3, 3


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def hand_ingd(theta, bs, lr, mom, lam, alpha1, beta1, wd, T, kfac_like):
    """Fig. 4 (left) of Lin et al. (2024b), one layer at a time, dense NumPy."""
    Ks = [np.eye(D_IN + 1), np.eye(H + 1)]
    Cs = [np.eye(H), np.eye(C)]
    mK = [np.zeros_like(K) for K in Ks]
    mC = [np.zeros_like(Cm) for Cm in Cs]
    buf, out = np.zeros_like(theta), [theta]
    for t, (X, y) in enumerate(bs):
        P = handmlp.pieces(theta, X, y, H, C)
        if t % T == 0:
            for i, (U, G) in enumerate(handmlp.kfac_factors(P)):
                K, Cm = Ks[i], Cs[i]
                dK, dC = K.shape[0], Cm.shape[0]
                HK, HC = K.T @ U @ K, Cm.T @ G @ Cm
                if kfac_like:
                    stepK = 0.5 * (HK + lam * K.T @ K - np.eye(dK))
                    stepC = 0.5 * (HC + lam * Cm.T @ Cm - np.eye(dC))
                else:  # β₁/(2 d_o)(Tr(H_C) H_K + c² KᵀK − d_o I), c² = λ Tr(CᵀC), and the mirror
                    stepK = (np.trace(HC) * HK + lam * np.trace(Cm.T @ Cm) * K.T @ K - dC * np.eye(dK)) / (2 * dC)
                    stepC = (np.trace(HK) * HC + lam * np.trace(K.T @ K) * Cm.T @ Cm - dK * np.eye(dC)) / (2 * dK)
                mK[i] = alpha1 * mK[i] + stepK
                mC[i] = alpha1 * mC[i] + stepC
                Ks[i] = K @ (np.eye(dK) - beta1 * mK[i])
                Cs[i] = Cm @ (np.eye(dC) - beta1 * mC[i])
        nat = [Cm @ Cm.T @ Gr @ K @ K.T for K, Cm, Gr in zip(Ks, Cs, P["grads"])]
        d = handmlp.grad_vector(nat)
        buf = mom * buf + (d + wd * theta)
        theta = theta - lr * buf
        out.append(theta)
    return out


def run(opt, model, theta, loss, bs, state=None):
    state, out = (opt.init(theta) if state is None else state), [theta]
    for X, y in bs:
        theta, state, _ = opt.step(theta, state, model, loss, X, y)
        out.append(theta)
    return out, state


def problem(seed=0):
    model, theta, loss, X, y = handmlp.make(seed=seed, N=24, d=D_IN, h=H, C=C)
    return model, theta, loss, [(X[i:i + 8], y[i:i + 8]) for i in (0, 8, 16, 0)]


@pytest.mark.parametrize("kfac_like", [False, True])
@pytest.mark.parametrize("T", [1, 2])
def test_ingd_equals_fig4_by_hand(kfac_like, T):
    model, theta, loss, bs = problem()
    alpha1 = 0.0 if kfac_like else 0.5
    kw = dict(lr=0.1, momentum=0.9, damping=1e-2, lr_cov=0.3, weight_decay=0.01, update_every=T)
    opt = optim.IKFAC(**kw) if kfac_like else optim.INGD(alpha1=alpha1, **kw)
    got, _ = run(opt, model, theta, loss, bs)
    want = hand_ingd(theta, bs, 0.1, 0.9, 1e-2, alpha1, 0.3, 0.01, T, kfac_like)
    for a, b in zip(got, want):
        close(a, b)


def test_ikfac_tracks_kfac_to_first_order_in_beta1():
    """If K Kᵀ = (S + λI)⁻¹, one IKFAC update gives K Kᵀ = ((1 − β₁)S + β₁U + λI)⁻¹ + O(β₁²):
    the error falls by 4 when β₁ halves (the paper's IKFAC–K-FAC correspondence)."""
    model, theta, loss, bs = problem()
    X, y = bs[0]
    rng = np.random.default_rng(1)
    lam = 0.1
    state = optim.IKFAC().init(theta)
    Ss, Ks, Cs = [], [], []
    for dim in (D_IN + 1, H + 1):
        M = rng.standard_normal((dim, dim))
        S = M @ M.T / dim
        Ss.append(S)
        Ks.append(np.linalg.cholesky(np.linalg.inv(S + lam * np.eye(dim))))
    Cs = [np.linalg.cholesky(np.linalg.inv(np.eye(d) * 0.5 + lam * np.eye(d))) for d in (H, C)]
    state.update(K=Ks, C=Cs, m_K=[None, None], m_C=[None, None])
    P = handmlp.pieces(theta, X, y, H, C)
    Us = [U for U, _ in handmlp.kfac_factors(P)]
    errs = []
    for beta1 in (1e-2, 5e-3):
        opt = optim.IKFAC(lr_cov=beta1, damping=lam, update_every=1)
        _, new, _ = opt.step(theta, state, model, loss, X, y)
        err = max(np.abs(K @ K.T - np.linalg.inv((1 - beta1) * S + beta1 * U + lam * np.eye(len(S)))).max()
                  for K, S, U in zip(new["K"], Ss, Us))
        errs.append(err)
    assert 3.5 < errs[0] / errs[1] < 4.5, errs


def test_ingd_invariant_to_rescaling_a_layers_inputs():
    """λ = 0: ā → Dā (κ on the inputs, 1 on the bias), W̄ → W̄D⁻¹, K → D⁻¹K move the network
    identically — INGD's traces tr(H_K) are invariant too."""
    model, theta, loss, bs = problem()
    kappa = 7.0
    Dinv = np.diag(np.r_[np.full(D_IN, 1 / kappa), 1.0])
    W1, b1, W2, b2 = handmlp.unpack(theta, D_IN, H, C)
    theta_s = handmlp.pack(W1 / kappa, b1, W2, b2)
    for opt in (optim.INGD(lr=0.2, damping=0.0, lr_cov=0.3, update_every=1),
                optim.IKFAC(lr=0.2, damping=0.0, lr_cov=0.3, update_every=1)):
        st = opt.init(theta)
        st.update(K=[np.eye(D_IN + 1), np.eye(H + 1)], C=[np.eye(H), np.eye(C)], m_K=[None] * 2,
                  m_C=[None] * 2)
        st_s = dict(st, K=[Dinv, np.eye(H + 1)])
        plain, _ = run(opt, model, theta, loss, bs, st)
        scaled, _ = run(opt, model, theta_s, loss, [(kappa * Xb, yb) for Xb, yb in bs], st_s)
        X = bs[0][0]
        for a, b in zip(plain, scaled):
            close(model.forward(b, kappa * X), model.forward(a, X), 1e-10)


def _affine_input_run(opt, K_first):
    """The plain run and the run on inputs x → M x + v, W̄ → W̄ D⁻¹ with the first layer's K
    replaced by ``K_first(D)``; D = [[M, v], [0, 1]] acts on ā = [x; 1] and is not symmetric."""
    model, theta, loss, bs = problem()
    rng = np.random.default_rng(3)
    M = np.eye(D_IN) + 0.6 * rng.standard_normal((D_IN, D_IN))
    v = rng.standard_normal(D_IN)
    D = np.block([[M, v[:, None]], [np.zeros((1, D_IN)), np.ones((1, 1))]])
    assert np.abs(D - D.T).max() > 0.5
    W1, b1, W2, b2 = handmlp.unpack(theta, D_IN, H, C)
    Wbar = np.hstack([W1, b1[:, None]]) @ np.linalg.inv(D)
    theta_s = handmlp.pack(Wbar[:, :D_IN], Wbar[:, D_IN], W2, b2)
    st = opt.init(theta)
    st.update(K=[np.eye(D_IN + 1), np.eye(H + 1)], C=[np.eye(H), np.eye(C)], m_K=[None] * 2,
              m_C=[None] * 2)
    st_s = dict(st, K=[K_first(D), np.eye(H + 1)])
    plain, _ = run(opt, model, theta, loss, bs, st)
    scaled, _ = run(opt, model, theta_s, loss, [(Xb @ M.T + v, yb) for Xb, yb in bs], st_s)
    X = bs[0][0]
    return [(model.forward(a, X), model.forward(b, X @ M.T + v)) for a, b in zip(plain, scaled)]


@pytest.mark.parametrize("kfac_like", [False, True])
def test_invariance_to_a_general_input_map_is_K_to_D_inverse_transpose_K(kfac_like):
    """λ = 0, ā → Dā with a non-symmetric D (an affine map of the inputs), W̄ → W̄D⁻¹: the
    update rule is invariant with K → D⁻ᵀK (then KᵀUK is unchanged, since U → DUDᵀ, and
    C Cᵀ ∇W̄ Dᵀ K'K'ᵀ = C Cᵀ ∇W̄ K Kᵀ D⁻¹, the old step carried to the new weights).
    K → D⁻¹K, correct only for a symmetric D, moves the network differently."""
    kw = dict(lr=0.2, damping=0.0, lr_cov=0.3, update_every=1)
    opt = optim.IKFAC(**kw) if kfac_like else optim.INGD(**kw)
    for a, b in _affine_input_run(opt, lambda D: np.linalg.inv(D).T):
        close(b, a, 1e-10)
    wrong = _affine_input_run(opt, lambda D: np.linalg.inv(D))
    assert max(np.abs(b - a).max() for a, b in wrong[1:]) > 1e-2


def test_planted_wrong_trace_normalisation_fails(monkeypatch):
    """Plant Tr instead of Tr/d (drop the paper's 1/d_o): the hand check must fail."""
    from refngd.optim import singd

    monkeypatch.setattr(singd, "average_trace", lambda M: float(np.trace(M)))
    with pytest.raises(AssertionError):
        test_ingd_equals_fig4_by_hand(False, 1)


def test_ingd_conv_runs_and_uses_kfac_factors():
    """A CNN step: K, C sized by K-FAC's (expand) factors; the first update equals the formula."""
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4))
    theta = model.init(rng)
    X, y = rng.standard_normal((5, 2, 4, 4)), rng.integers(0, 4, 5)
    opt = optim.IKFAC(lr=0.1, lr_cov=0.5, damping=1e-3, update_every=1)
    _, st, info = opt.step(theta, opt.init(theta), model, CrossEntropy(), X, y)
    from refngd.curvature import KFAC

    f = KFAC(model, theta, CrossEntropy(), X, y, fisher_type="empirical", bias="joint").factors()
    for K, Cm, fac in zip(st["K"], st["C"], f):
        close(K, np.eye(len(fac.A)) - 0.25 * (fac.A + 1e-3 * np.eye(len(fac.A)) - np.eye(len(fac.A))))
        close(Cm, np.eye(len(fac.G)) - 0.25 * (fac.G + 1e-3 * np.eye(len(fac.G)) - np.eye(len(fac.G))))
    assert np.isfinite(info["update_norm"])


def test_ingd_bad_input():
    with pytest.raises(ValueError, match="alpha1"):
        optim.INGD(kfac_like=True, alpha1=0.5)
    with pytest.raises(ValueError, match="lr_cov"):
        optim.IKFAC(lr_cov=0.0)
    model, theta, loss, X, y = handmlp.make()
    with pytest.raises(TypeError, match="rng"):
        opt = optim.IKFAC(fisher_type="mc")
        opt.step(theta, opt.init(theta), model, loss, X, y)


# ------------------------------------------------------------------ the singd package
@pytest.mark.parametrize("kfac_like", [False, True])
def test_against_singd_package(kfac_like):
    """Twin PyTorch model, same weights and batches: refngd's θ after 3 steps equals singd's."""
    torch = pytest.importorskip("torch")
    singd = pytest.importorskip("singd.optim.optimizer")
    model, theta, loss, bs = problem(seed=4)
    alpha1 = 0.0 if kfac_like else 0.5
    kw = dict(lr=0.1, momentum=0.9, damping=1e-2, lr_cov=0.3, weight_decay=0.01, update_every=2)
    opt = optim.IKFAC(**kw) if kfac_like else optim.INGD(alpha1=alpha1, **kw)
    got, _ = run(opt, model, theta, loss, bs)

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(theta.copy()), net.parameters())
    topt = singd.SINGD(net, lr=0.1, momentum=0.9, damping=1e-2, alpha1=alpha1, weight_decay=0.01,
                       T=2, lr_cov=0.3, kfac_like=kfac_like, loss_average="batch",
                       structures=("dense", "dense"))
    for X, y in bs:
        topt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        topt.step()
    close(torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy(), got[-1], 1e-10)


def test_ikfac_fixed_point_is_kfac_with_damped_factors():
    """On a fixed batch the IKFAC update stops when K Kᵀ = (U + λI)⁻¹, C Cᵀ = (G + λI)⁻¹: its
    direction is then K-FAC's ((G + λI) ⊗ (U + λI))⁻¹ g, checked against np.kron and a solve."""
    model, theta, loss, bs = problem()
    X, y = bs[0]
    lam = 0.1
    opt = optim.IKFAC(lr_cov=0.5, damping=lam, update_every=1)
    st = opt.init(theta)
    for _ in range(200):
        d = opt.direction(theta, st, model, loss, X, y)
        _, st, _ = opt.step(theta, st, model, loss, X, y)  # θ fixed: only the factors move
    P = handmlp.pieces(theta, X, y, H, C)
    want = []
    for (U, G), Gr in zip(handmlp.kfac_factors(P), P["grads"]):
        M = np.kron(G + lam * np.eye(len(G)), U + lam * np.eye(len(U)))
        want.append(np.linalg.solve(M, Gr.ravel()).reshape(Gr.shape))
    close(d, handmlp.grad_vector(want), 1e-10)
