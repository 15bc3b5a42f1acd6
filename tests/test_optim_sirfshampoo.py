"""SIRFShampoo (Lin et al. 2024a; ``sirfshampoo``): steps against the update written with
plain matrices, the input-rescaling invariance of the rule, a planted constant, and
(optional) the authors' package on a twin PyTorch model."""
import numpy as np
import pytest

from refngd import optim

import handmlp

TOL = 1e-12
D_IN, H, C = 4, 3, 3


def close(a, b, tol=TOL):
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * max(1.0, float(np.abs(b).max())))


def hand_sirf(theta, bs, lr, beta2, a1, a2, lam, kappa, T, B=8):
    """The module docstring's update with matrices: a weight G (d₀ × d₁) has factors (C, K),
    Ĝ = Cᵀ G K; a bias g has one factor K, ĝ = Kᵀ g."""
    W1, b1, W2, b2 = handmlp.unpack(theta, D_IN, H, C)
    F = [[np.eye(H), np.eye(D_IN)], [np.eye(H)], [np.eye(C), np.eye(H)], [np.eye(C)]]
    M = [[np.zeros_like(K) for K in f] for f in F]
    buf, out = np.zeros_like(theta), [theta]

    def stepK(K, m, mu):
        m = a2 * m + (1 - a2) * mu
        return K @ (np.eye(len(K)) - beta2 * m / max(1.0, np.linalg.norm(m))), m

    for t, (X, y) in enumerate(bs):
        P = handmlp.pieces(theta, X, y, H, C)
        gr = P["grads"]
        Gs = [gr[0][:, :-1], gr[0][:, -1], gr[1][:, :-1], gr[1][:, -1]]
        if t % T == 0:
            for i, G in enumerate(Gs):
                if G.ndim == 2:
                    (Cf, K), (mC, mK) = F[i], M[i]
                    d0, d1 = G.shape
                    Gh = Cf.T @ G @ K
                    muC = 0.5 * (B / d1 * Gh @ Gh.T + lam * np.trace(K.T @ K) / d1 * Cf.T @ Cf - np.eye(d0))
                    muK = 0.5 * (B / d0 * Gh.T @ Gh + lam * np.trace(Cf.T @ Cf) / d0 * K.T @ K - np.eye(d1))
                    (Cf, mC), (K, mK) = stepK(Cf, mC, muC), stepK(K, mK, muK)
                    F[i], M[i] = [Cf, K], [mC, mK]
                else:
                    (K,), (mK,) = F[i], M[i]
                    gh = K.T @ G
                    mu = 0.5 * (B * np.outer(gh, gh) + lam * K.T @ K - np.eye(len(K)))
                    K, mK = stepK(K, mK, mu)
                    F[i], M[i] = [K], [mK]
        ds = []
        for G, f in zip(Gs, F):
            ds.append(f[0] @ f[0].T @ G @ f[1] @ f[1].T if G.ndim == 2 else f[0] @ f[0].T @ G)
        d = handmlp.pack(*ds)
        buf = a1 * buf + (d + kappa * theta)
        theta = theta - lr * buf
        out.append(theta)
    return out


def problem(seed=0):
    model, theta, loss, X, y = handmlp.make(seed=seed, N=24, d=D_IN, h=H, C=C)
    return model, theta, loss, [(X[i:i + 8], y[i:i + 8]) for i in (0, 8, 16, 0)]


def run(opt, model, theta, loss, bs, state=None):
    state, out = (opt.init(theta) if state is None else state), [theta]
    for X, y in bs:
        theta, state, _ = opt.step(theta, state, model, loss, X, y)
        out.append(theta)
    return out


KW = dict(lr=0.1, lr_cov=0.3, momentum=0.9, alpha2=0.5, damping=1e-2, weight_decay=0.01)


@pytest.mark.parametrize("T", [1, 2])
def test_sirfshampoo_equals_update_by_hand(T):
    model, theta, loss, bs = problem()
    got = run(optim.SIRFShampoo(update_every=T, **KW), model, theta, loss, bs)
    want = hand_sirf(theta, bs, 0.1, 0.3, 0.9, 0.5, 1e-2, 0.01, T)
    for a, b in zip(got, want):
        close(a, b)


def test_sirfshampoo_invariant_to_rescaling_a_layers_inputs():
    """λ = 0: X → κX, W₁ → W₁/κ and W₁'s two factors K → K/√κ (so ⊗ K Kᵀ, the inverse
    curvature, scales by 1/κ² as B vec(G)vec(G)ᵀ's inverse must) follow the same network."""
    model, theta, loss, bs = problem()
    kappa = 5.0
    W1, b1, W2, b2 = handmlp.unpack(theta, D_IN, H, C)
    opt = optim.SIRFShampoo(lr=0.1, lr_cov=0.3, damping=0.0)
    st = opt.init(theta)
    eye = lambda d: np.eye(d)
    st.update(K=[[eye(H), eye(D_IN)], [eye(H)], [eye(C), eye(H)], [eye(C)]],
              m=[[0 * eye(H), 0 * eye(D_IN)], [0 * eye(H)], [0 * eye(C), 0 * eye(H)], [0 * eye(C)]])
    st_s = dict(st, K=[[eye(H) / kappa**0.5, eye(D_IN) / kappa**0.5]] + st["K"][1:])
    plain = run(opt, model, theta, loss, bs, st)
    scaled = run(opt, model, handmlp.pack(W1 / kappa, b1, W2, b2), loss,
                 [(kappa * Xb, yb) for Xb, yb in bs], st_s)
    X = bs[0][0]
    for a, b in zip(plain, scaled):
        close(model.forward(b, kappa * X), model.forward(a, X), 1e-10)


def test_planted_missing_batch_factor_fails(monkeypatch):
    from refngd.optim import sirfshampoo

    monkeypatch.setattr(sirfshampoo, "loss_count", lambda loss, Z: 1.0)
    with pytest.raises(AssertionError):
        test_sirfshampoo_equals_update_by_hand(1)


def test_sirfshampoo_conv_and_function_model_run():
    from refngd import FunctionModel, nn
    from refngd.losses import CrossEntropy

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    theta = model.init(rng)
    X, y = rng.standard_normal((5, 2, 4, 4)), rng.integers(0, 4, 5)
    opt = optim.SIRFShampoo(lr=0.1)
    new, st, info = opt.step(theta, opt.init(theta), model, CrossEntropy(), X, y)
    assert [K.shape for K in st["K"][0]] == [(3, 3), (2, 2), (3, 3), (3, 3)]  # Conv2d weight: 4 axes
    assert np.isfinite(new).all()
    import autograd.numpy as anp

    fm = FunctionModel(lambda th, X: anp.dot(X, anp.reshape(th, (3, 2))), np.zeros(6))
    new, st, _ = opt.step(np.ones(6), opt.init(np.ones(6)), fm, CrossEntropy(), rng.standard_normal((4, 3)),
                          rng.integers(0, 2, 4))
    assert [K.shape for K in st["K"][0]] == [(6, 6)]


def test_against_sirfshampoo_package():
    torch = pytest.importorskip("torch")
    pkg = pytest.importorskip("sirfshampoo")
    model, theta, loss, bs = problem(seed=4)
    got = run(optim.SIRFShampoo(update_every=2, **KW), model, theta, loss, bs)
    net = torch.nn.Sequential(torch.nn.Linear(D_IN, H), torch.nn.Tanh(), torch.nn.Linear(H, C)).double()
    torch.nn.utils.vector_to_parameters(torch.from_numpy(theta.copy()), net.parameters())
    topt = pkg.SIRFShampoo(net, lr=0.1, beta2=0.3, alpha1=0.9, alpha2=0.5, lam=1e-2, kappa=0.01, T=2)
    for X, y in bs:
        topt.zero_grad()
        torch.nn.functional.cross_entropy(net(torch.from_numpy(X)), torch.from_numpy(y)).backward()
        topt.step()
    close(torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy(), got[-1], 1e-10)
