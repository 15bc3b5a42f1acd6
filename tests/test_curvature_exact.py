"""The exact curvature family: Fisher / GGN, sampled Fisher, empirical and improved EF.

Every dense matrix is checked against two constructions that share no code with
``refngd.curvature``:

1. refngd's own dense Jacobians (``refngd.jacobian``) and the loss's H_n, e_n and sampled
   output gradients, summed by hand with the constant c written out by hand;
2. the same network written with ``autograd.numpy`` and differentiated by HIPS autograd
   (Jacobians, and Hessians / gradients of the per-sample loss written with autograd
   too), so neither the layers nor the losses of refngd are involved.

Then every operation of the operator interface (``@``, ``gram``, ``trace``, ``diagonal``,
``quadratic_form``, ``to_linear_operator``, ``solve``, ``solve_sweep``) is checked against
the dense matrix, and the sampled Fisher against the exact one (unbiasedness, 1/√K).
"""
from __future__ import annotations

import itertools
import math

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from numerics import assert_close, unpack

import refngd
from refngd import nn
from refngd.backend import SingularSystemError
from refngd.curvature import EmpiricalFisher, Fisher, ImprovedEmpiricalFisher, SampledFisher
from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss

EXACT = 1e-10  # relative tolerance for exact float64 quantities
LOSSES = {"cross_entropy": CrossEntropy, "mse": MSELoss, "bce_with_logits": BCEWithLogits}
LOSS_RED = [(name, red) for name in LOSSES for red in ("mean", "sum")]
CLASSES = [Fisher, SampledFisher, EmpiricalFisher, ImprovedEmpiricalFisher]
SF_SEED, SF_K = 123, 3

HAS_CONV = hasattr(nn, "Conv2d")
needs_conv = pytest.mark.skipif(not HAS_CONV, reason="refngd.nn.Conv2d not available")
MODELS = ["mlp", pytest.param("cnn", marks=needs_conv)]


# ------------------------------------------------------------------------- the oracle
def c_by_hand(name: str, reduction: str, N: int, C: int) -> float:
    """c of L = c Σ l_n, written out independently of ``loss.scale`` (PyTorch's rules)."""
    if reduction == "sum":
        return 1.0
    return 1.0 / N if name == "cross_entropy" else 1.0 / (N * C)


def loss_oracle(name: str, z, t):
    """Per-sample loss l(z, t) with autograd.numpy (PyTorch's definitions, no ½ on the MSE)."""
    if name == "cross_entropy":
        m = anp.max(z)
        return anp.log(anp.sum(anp.exp(z - m))) + m - z[t]
    if name == "mse":
        return anp.sum((z - t) ** 2)
    return anp.sum(anp.logaddexp(0.0, z) - t * z)


def make_targets(name, rng, N, C):
    if name == "cross_entropy":
        return rng.integers(0, C, size=N)
    if name == "mse":
        return rng.standard_normal((N, C))
    y = rng.uniform(0, 1, size=(N, C))
    y[0] = rng.integers(0, 2, size=C)  # hard targets mixed with soft ones
    return y


def mlp_problem(N=6, d=4, h=5, C=3, seed=0):
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, C))
    shapes = [(h, d), (h,), (C, h), (C,)]

    def f(theta, X):  # PyTorch order: W1 (h, d), b1, W2 (C, h), b2
        W1, b1, W2, b2 = unpack(theta, shapes)
        return anp.dot(anp.tanh(anp.dot(X, W1.T) + b1), W2.T) + b2

    rng = np.random.default_rng(seed)
    theta = model.init(rng)
    X = rng.standard_normal((N, d))
    return model, f, theta, X


def cnn_problem(N=4, cin=2, cout=3, k=3, HW=5, C=3, seed=0):
    Ho = HW - k + 1
    model = nn.Sequential(nn.Conv2d(cin, cout, k), nn.Tanh(), nn.Flatten(),
                          nn.Linear(cout * Ho * Ho, C))
    shapes = [(cout, cin, k, k), (cout,), (C, cout * Ho * Ho), (C,)]

    def f(theta, X):  # cross-correlation, stride 1, no padding, written out per kernel offset
        W, b, W2, b2 = unpack(theta, shapes)
        out = b[None, :, None, None]
        for a in range(k):
            for e in range(k):
                out = out + anp.einsum("oc,ncij->noij", W[:, :, a, e], X[:, :, a:a + Ho, e:e + Ho])
        hid = anp.reshape(anp.tanh(out), (X.shape[0], -1))
        return anp.dot(hid, W2.T) + b2

    rng = np.random.default_rng(seed)
    theta = model.init(rng)
    X = rng.standard_normal((N, cin, HW, HW))
    return model, f, theta, X


def problem(kind, name, reduction="mean", seed=0, **kw):
    model, f, theta, X = (mlp_problem if kind == "mlp" else cnn_problem)(seed=seed, **kw)
    N = X.shape[0]
    C = model.forward(theta, X).shape[1]
    y = make_targets(name, np.random.default_rng(seed + 1000), N, C)
    return model, f, theta, X, y, LOSSES[name](reduction)


def build(cls, model, theta, loss, X, y, seed=SF_SEED, K=SF_K):
    if cls is SampledFisher:
        return cls(model, theta, loss, X, y, mc_samples=K, rng=np.random.default_rng(seed))
    return cls(model, theta, loss, X, y)


def autograd_oracle(name, reduction, f, theta, X, y):
    """Everything from HIPS autograd alone: J_n, e_n, H_n, g_n and c (by hand)."""
    Z = f(theta, X)
    N, C = Z.shape
    J = autograd.jacobian(lambda t: f(t, X))(theta)  # (N, C, P)

    def per_sample(t):
        Zt = f(t, X)
        return anp.stack([loss_oracle(name, Zt[n], y[n]) for n in range(N)])

    G = autograd.jacobian(per_sample)(theta)  # (N, P): gradients of the unreduced l_n
    E = np.stack([autograd.grad(lambda z, n=n: loss_oracle(name, z, y[n]))(Z[n]) for n in range(N)])
    H = np.stack([autograd.hessian(lambda z, n=n: loss_oracle(name, z, y[n]))(Z[n]) for n in range(N)])
    return dict(Z=Z, J=J, G=G, E=E, H=H, c=c_by_hand(name, reduction, N, C))


# ================================================== dense matrices vs independent oracles
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_dense_equals_jacobian_construction(kind, name, reduction):
    """F = c Σ J_nᵀH_nJ_n, SF = c Σ (1/K) Σ_k J_nᵀ ê êᵀ J_n, EF = c Σ g g ᵀ, iEF = EF/‖e_n‖²."""
    model, _, theta, X, y, loss = problem(kind, name, reduction)
    J = refngd.jacobian(model, theta, X)
    Z = model.forward(theta, X)
    N, C, P = J.shape
    c = c_by_hand(name, reduction, N, C)
    H, E = loss.output_hessian(Z), loss.output_gradient(Z, y)
    g = np.einsum("ncp,nc->np", J, E)
    F = c * np.einsum("nap,nab,nbq->pq", J, H, J)
    EF = c * g.T @ g
    iEF = c * (g / (E * E).sum(1, keepdims=True)).T @ g
    Ehat = loss.sampled_output_gradients(Z, np.random.default_rng(SF_SEED), SF_K)  # (N, K, C)
    ghat = np.einsum("ncp,nkc->nkp", J, Ehat)
    SF = c / SF_K * np.einsum("nkp,nkq->pq", ghat, ghat)
    for cls, ref in [(Fisher, F), (EmpiricalFisher, EF), (ImprovedEmpiricalFisher, iEF),
                     (SampledFisher, SF)]:
        A = build(cls, model, theta, loss, X, y).dense()
        assert A.shape == (P, P)
        assert_close(A, ref)
    # the batch gradient carries the same c
    assert_close(refngd.gradient(model, theta, loss, X, y), c * g.sum(0))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_dense_equals_autograd(kind, name, reduction):
    """The same matrices from HIPS autograd on the network and the loss written anew."""
    model, f, theta, X, y, loss = problem(kind, name, reduction)
    o = autograd_oracle(name, reduction, f, theta, X, y)
    J, G, E, H, c = o["J"], o["G"], o["E"], o["H"], o["c"]
    assert_close(model.forward(theta, X), o["Z"])
    assert_close(np.einsum("ncp,nc->np", J, E), G)  # chain rule, as a sanity check of the oracle
    F = c * np.einsum("nap,nab,nbq->pq", J, H, J)
    assert_close(Fisher(model, theta, loss, X, y).dense(), F)
    assert_close(EmpiricalFisher(model, theta, loss, X, y).dense(), c * G.T @ G)
    s = (E * E).sum(1)
    assert_close(ImprovedEmpiricalFisher(model, theta, loss, X, y).dense(), c * (G / s[:, None]).T @ G)
    assert_close(refngd.gradient(model, theta, loss, X, y), c * G.sum(0))

    # SF: the same draws ŷ (same seed), output gradients at ŷ from autograd, weight c/K.
    Yhat = loss.sample_targets(model.forward(theta, X), np.random.default_rng(SF_SEED), SF_K)
    N = X.shape[0]
    SF = np.zeros_like(F)
    for n in range(N):
        for k in range(SF_K):
            e = autograd.grad(lambda z: loss_oracle(name, z, Yhat[n, k]))(o["Z"][n])
            gh = J[n].T @ e
            SF += np.outer(gh, gh)
    assert_close(build(SampledFisher, model, theta, loss, X, y).dense(), c / SF_K * SF)


@pytest.mark.parametrize("name", ["cross_entropy", "bce_with_logits"])
def test_fisher_is_expected_empirical_fisher(name):
    """F = E_{ŷ ~ p(y|z_n)} [c Σ_n g_n(ŷ_n) g_n(ŷ_n)ᵀ], the expectation by exact enumeration.

    For CE every class, for BCE every ŷ ∈ {0, 1}^C, weighted by its model probability:
    this checks that the type-2 rows (S_n) give the Fisher of the predictive distribution.
    """
    model, _, theta, X, _, loss = problem("mlp", name, "mean")
    Z = model.forward(theta, X)
    N, C = Z.shape
    if name == "cross_entropy":
        prob = np.exp(Z - Z.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        outcomes = [(np.full(N, k), prob[:, k]) for k in range(C)]
    else:
        sig = 1 / (1 + np.exp(-Z))
        outcomes = []
        for bits in itertools.product([0.0, 1.0], repeat=C):
            t = np.tile(np.array(bits), (N, 1))
            outcomes.append((t, np.prod(np.where(t == 1, sig, 1 - sig), axis=1)))
    expected = 0
    for yk, w in outcomes:
        G = refngd.per_sample_gradients(model, theta, loss, X, yk)
        expected = expected + loss.scale(Z) * (G * w[:, None]).T @ G
    assert_close(Fisher(model, theta, loss, X).dense(), expected)


@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_fisher_equals_hessian_for_linear_model(name, reduction):
    """For a model linear in θ the GGN is the Hessian of L (autograd, no refngd involved)."""
    rng = np.random.default_rng(3)
    N, d, C = 5, 3, 2
    model = nn.Sequential(nn.Linear(d, C))
    theta = model.init(rng)
    X = rng.standard_normal((N, d))
    y = make_targets(name, rng, N, C)
    c = c_by_hand(name, reduction, N, C)

    def L(t):
        W, b = unpack(t, [(C, d), (C,)])
        Zt = anp.dot(X, W.T) + b
        return c * sum(loss_oracle(name, Zt[n], y[n]) for n in range(N))

    assert_close(Fisher(model, theta, LOSSES[name](reduction), X, y).dense(), autograd.hessian(L)(theta))


@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_function_model_route(name, reduction):
    """FunctionModel (autograd Jacobians) gives the same four matrices, gram and solves."""
    model, f, theta, X, y, loss = problem("mlp", name, reduction)
    fm = refngd.FunctionModel(f, theta)
    g = refngd.gradient(model, theta, loss, X, y)
    assert_close(refngd.gradient(fm, theta, loss, X, y), g)
    for cls in CLASSES:
        A, B = build(cls, model, theta, loss, X, y), build(cls, fm, theta, loss, X, y)
        assert_close(B.dense(), A.dense())
        assert_close(B.gram(), A.gram())
        assert_close(B @ g, A @ g)
        assert_close(B.diagonal(), A.diagonal())
        assert math.isclose(B.trace(), A.trace(), rel_tol=EXACT)
        assert_close(B.solve(g, 0.1), A.solve(g, 0.1))


# ============================================================ the operator interface
@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_operator_interface(kind, cls, name, reduction):
    model, _, theta, X, y, loss = problem(kind, name, reduction)
    F = build(cls, model, theta, loss, X, y)
    D = F.dense()
    P = theta.shape[0]
    N, C = model.forward(theta, X).shape
    fisher_rows = C - 1 if (name == "cross_entropy" and C > 1) else C  # rank of H_n
    R = N * {Fisher: fisher_rows, SampledFisher: SF_K, EmpiricalFisher: 1, ImprovedEmpiricalFisher: 1}[cls]
    rng = np.random.default_rng(7)
    v, M = rng.standard_normal(P), rng.standard_normal((P, 3))
    assert F.shape == (P, P) and D.dtype == np.float64
    assert_close(D, D.T, tol=1e-14)
    assert_close(F @ v, D @ v)
    assert_close(F.matvec(v), D @ v)
    assert_close(F @ M, D @ M)
    assert math.isclose(F.quadratic_form(v), v @ D @ v, rel_tol=EXACT)
    assert math.isclose(F.trace(), np.trace(D), rel_tol=EXACT)
    assert_close(F.diagonal(), np.diag(D))
    U = F.row_matrix()
    assert U.shape == (R, P)
    assert_close(F.c * U.T @ U, D)
    K = F.gram()
    assert K.shape == (R, R) and K.dtype == np.float64
    assert_close(K, U @ U.T)
    assert math.isclose(F.trace(), F.c * np.trace(K), rel_tol=EXACT)  # the cached-Gram branch
    op = F.to_linear_operator()
    assert op.shape == (P, P)
    assert_close(op @ v, D @ v)
    assert_close(op.matvec(v[:, None]), (D @ v)[:, None])
    assert_close(op @ M, D @ M)
    assert_close(op.rmatvec(v), D @ v)
    assert math.isclose(F.c, c_by_hand(name, reduction, N, C))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name,reduction", LOSS_RED)
def test_damped_solve_and_sweep(kind, cls, name, reduction):
    """solve(g, λ) = numpy.linalg.solve(dense + λI, g); solve_sweep = solve for each λ."""
    model, _, theta, X, y, loss = problem(kind, name, reduction)
    F = build(cls, model, theta, loss, X, y)
    D = F.dense()
    P = D.shape[0]
    g = refngd.gradient(model, theta, loss, X, y)
    v = np.random.default_rng(1).standard_normal(P)  # a vector outside the row space too
    scale = np.linalg.norm(D, 2)
    lams = [1e-3 * scale, 0.1 * scale, 10.0 * scale]
    for rhs in (g, v):
        for lam in lams:
            assert_close(F.solve(rhs, lam), np.linalg.solve(D + lam * np.eye(P), rhs), tol=1e-9)
        for lam, d in zip(lams, F.solve_sweep(rhs, lams)):
            assert_close(d, F.solve(rhs, lam), tol=1e-9)


# (The CE Fisher is absent: its Gram matrix is singular, see the raising test below.)
@pytest.mark.parametrize("cls,name,reduction", [
    (cls, name, red) for cls in (EmpiricalFisher, ImprovedEmpiricalFisher, Fisher)
    for name, red in [("mse", "mean"), ("mse", "sum"), ("bce_with_logits", "mean"),
                      ("cross_entropy", "sum")]
    if not (cls is Fisher and name == "cross_entropy")], ids=lambda v: getattr(v, "__name__", v))
def test_undamped_solve_is_pseudo_inverse(cls, name, reduction):
    """λ = 0 with a nonsingular Gram matrix (R < P) gives F⁺ g, for g and for any vector."""
    model, _, theta, X, y, loss = problem("mlp", name, reduction)
    F = build(cls, model, theta, loss, X, y)
    D = F.dense()
    g = refngd.gradient(model, theta, loss, X, y)
    v = np.random.default_rng(2).standard_normal(D.shape[0])
    Dpinv = np.linalg.pinv(D, rcond=1e-12, hermitian=True)
    for rhs in (g, v):
        d = F.solve(rhs, 0.0)
        assert_close(d, Dpinv @ rhs, tol=1e-8)
        # d is the minimum-norm least-squares solution: it lies in the row space of U
        U = F.row_matrix()
        assert_close(U.T @ np.linalg.lstsq(U.T, d, rcond=1e-12)[0], d, tol=1e-8)
    assert_close(D @ F.solve(g, 0.0), g, tol=1e-8)  # g ∈ range F: an exact solution


def test_undamped_solve_singular_raises():
    """Singular Gram matrices are refused at λ = 0 and solved fine at λ > 0."""
    # (a) duplicate samples: two equal rows of U
    model, _, theta, X, y, loss = problem("mlp", "mse", "mean")
    X2, y2 = np.concatenate([X, X[:1]]), np.concatenate([y, y[:1]])
    for cls in (EmpiricalFisher, ImprovedEmpiricalFisher, Fisher):
        F = cls(model, theta, loss, X2, y2)
        g = refngd.gradient(model, theta, loss, X2, y2)
        with pytest.raises(SingularSystemError):
            F.solve(g, 0.0)
        D = F.dense()
        assert_close(F.solve(g, 1e-3), np.linalg.solve(D + 1e-3 * np.eye(len(g)), g), tol=1e-9)
    # (b) CE Fisher: H_n 1 = 0 has rank C − 1, and Fisher uses exactly C − 1 rows per
    # sample, so its Gram matrix is non-singular and the undamped solve is F⁺ g.
    model, _, theta, X, y, loss = problem("mlp", "cross_entropy", "mean")
    F = Fisher(model, theta, loss, X, y)
    N, C = model.forward(theta, X).shape
    assert F.gram().shape == (N * (C - 1),) * 2
    assert np.linalg.matrix_rank(F.gram()) == N * (C - 1)
    g = refngd.gradient(model, theta, loss, X, y)
    assert_close(F.solve(g, 0.0), np.linalg.pinv(F.dense(), rcond=1e-10, hermitian=True) @ g, tol=1e-8)
    # (c) P ≤ R: the P × P matrix is factored; the CE Fisher is singular there too (its
    # output-bias direction 1 is in the null space of every H_n) and is refused.
    model, theta, X, y, loss = small_overdetermined("cross_entropy")
    F = Fisher(model, theta, loss, X, y)
    assert np.linalg.matrix_rank(F.dense()) < theta.shape[0]
    with pytest.raises(SingularSystemError):
        F.solve(refngd.gradient(model, theta, loss, X, y), 0.0)


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), -np.inf])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_bad_damping_raises(cls, bad):
    model, _, theta, X, y, loss = problem("mlp", "mse", "mean")
    F = build(cls, model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    with pytest.raises(ValueError):
        F.solve(g, bad)
    with pytest.raises(ValueError):
        F.solve_sweep(g, [1.0, bad])
    with pytest.raises(ValueError):
        F.solve_sweep(g, [0.0])  # the sweep's eigen-route needs λ > 0
    with pytest.raises(TypeError):
        F.solve(g, "big")


def test_bad_vectors_raise():
    model, _, theta, X, y, loss = problem("mlp", "mse", "mean")
    F = Fisher(model, theta, loss, X, y)
    with pytest.raises(ValueError):
        F.solve(np.ones(theta.shape[0] + 1), 1.0)
    with pytest.raises(ValueError):
        F.matvec(np.full(theta.shape[0], np.nan))
    with pytest.raises(ValueError):
        SampledFisher(model, theta, loss, X, y, mc_samples=0, rng=0)
    with pytest.raises(TypeError):
        SampledFisher(model, theta, loss, X, y, mc_samples=2, rng=None)


# ======================================================== sampled Fisher → Fisher
def _sf_errors(name, Ks, seed=0):
    model, _, theta, X, y, loss = problem("mlp", name, "mean", N=4)
    F = Fisher(model, theta, loss, X, y).dense()
    out = []
    for K in Ks:
        SF = SampledFisher(model, theta, loss, X, y, mc_samples=K, rng=seed)
        out.append((K, SF, np.linalg.norm(SF.dense() - F)))
    return F, out


@pytest.mark.parametrize("name", list(LOSSES))
def test_sampled_fisher_converges_like_one_over_sqrt_k(name):
    """‖F̂_K − F‖_F shrinks like σ/√K.

    F̂_K = (1/K) Σ_k X_k with i.i.d. X_k = c Σ_n ĝ_nk ĝ_nkᵀ and E[X_k] = F, hence
    E‖F̂_K − F‖²_F = σ²/K, σ² = E‖X − F‖²_F.  σ² is estimated from the K = 10⁴ draws
    themselves (X_k recovered from the rows, ‖X_k‖²_F = c² Σ_nm ⟨ĝ_nk, ĝ_mk⟩²).  The squared
    error is a sum of P² ≈ 1800 weakly dependent squares, so it concentrates around σ²/K;
    we allow a factor 3 either way (Markov alone gives P(err > 3σ/√K) ≤ 1/9) and require the
    fitted log-log slope to be −½ ± 0.15.  The seed is fixed, so the test is deterministic.
    """
    Ks = [10, 100, 1000, 10000]
    F, runs = _sf_errors(name, Ks)
    K_big, SF_big, _ = runs[-1]
    N = 4
    ghat = SF_big.row_matrix().reshape(N, K_big, -1) * math.sqrt(K_big)  # ĝ_nk
    inner = np.einsum("nkp,mkp->knm", ghat, ghat)
    sq_norms = SF_big.c ** 2 * (inner ** 2).sum(axis=(1, 2))  # ‖X_k‖²_F
    Fhat = SF_big.dense()
    sigma2 = (sq_norms.sum() - K_big * np.linalg.norm(Fhat) ** 2) / (K_big - 1)
    sigma = math.sqrt(sigma2)
    errs = np.array([e for _, _, e in runs])
    for K, err in zip(Ks, errs):
        assert sigma / (3 * math.sqrt(K)) < err < 3 * sigma / math.sqrt(K), (K, err, sigma)
    slope = np.polyfit(np.log(Ks), np.log(errs), 1)[0]
    assert -0.65 < slope < -0.35, slope
    assert errs[-1] / np.linalg.norm(F) < 3 * sigma / (100 * np.linalg.norm(F))
    assert np.all(np.diff(errs) < 0)


@pytest.mark.parametrize("name", list(LOSSES))
def test_sampled_fisher_is_unbiased(name):
    """Mean of S = 400 independent F̂ (K = 2) is within 3 standard errors of F (Frobenius).

    E‖F̄ − F‖²_F = v/S with v = E‖F̂ − F‖²_F, estimated by the sample variance of the S
    draws.  A wrong scale (missing 1/K, MSE sampling variance 1 instead of ½, c) would put F̄
    many standard errors away: F̄ − F would then be of the order of ‖F‖ itself.
    """
    model, _, theta, X, y, loss = problem("mlp", name, "mean", N=4)
    F = Fisher(model, theta, loss, X, y).dense()
    S = 400
    draws = np.stack([SampledFisher(model, theta, loss, X, y, mc_samples=2, rng=s).dense()
                      for s in range(S)])
    mean = draws.mean(0)
    v = ((draws - mean) ** 2).sum(axis=(1, 2)).sum() / (S - 1)
    se = math.sqrt(v / S)
    err = np.linalg.norm(mean - F)
    assert err < 3 * se, (err, se)
    assert se < 0.2 * np.linalg.norm(F)  # the test has power against O(‖F‖) biases
    # a doubled Fisher (e.g. a lost factor ½ in the MSE sampling variance) is rejected
    assert np.linalg.norm(mean - 2 * F) > 3 * se


def test_sampled_fisher_rng_reproducible():
    model, _, theta, X, y, loss = problem("mlp", "cross_entropy", "mean")
    A = SampledFisher(model, theta, loss, X, y, mc_samples=4, rng=5).dense()
    B = SampledFisher(model, theta, loss, X, y, mc_samples=4, rng=np.random.default_rng(5)).dense()
    C_ = SampledFisher(model, theta, loss, X, y, mc_samples=4, rng=6).dense()
    np.testing.assert_array_equal(A, B)
    assert not np.allclose(A, C_)


# ============================================================== degenerate inputs
def small_overdetermined(name, N=20, seed=0):
    """P = 17 parameters, N = 20 samples, C = 2: R = 40 > P Fisher rows."""
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2))
    theta = model.init(rng)
    X = rng.standard_normal((N, 2))
    return model, theta, X, make_targets(name, rng, N, 2), LOSSES[name]("mean")


@pytest.mark.parametrize("name", list(LOSSES))
def test_more_rows_than_parameters(name):
    """P < R: the operator interface and damped solves still agree with the dense matrix."""
    model, theta, X, y, loss = small_overdetermined(name)
    g = refngd.gradient(model, theta, loss, X, y)
    for cls in CLASSES:
        F = build(cls, model, theta, loss, X, y)
        D = F.dense()
        assert F.rows.R > D.shape[0]
        assert_close(F @ g, D @ g)
        assert math.isclose(F.trace(), np.trace(D), rel_tol=EXACT)
        lam = 1e-2 * np.linalg.norm(D, 2)
        assert_close(F.solve(g, lam), np.linalg.solve(D + lam * np.eye(len(g)), g), tol=1e-9)


@pytest.mark.parametrize("name", ["mse", "bce_with_logits"])
def test_more_rows_than_parameters_tiny_and_zero_damping(name):
    """P < R with an invertible F: solve stays accurate as λ → 0, and λ = 0 gives F⁻¹ g.

    Regression test: the Woodbury route lost ~log10(‖F‖/λ) digits here (relative error
    1e-4 at λ = 1e-12‖F‖) because λ/c·I + K is then nearly singular (rank K = P < R); the
    P × P route is as accurate as numpy's dense solve.
    """
    model, theta, X, y, loss = small_overdetermined(name, N=200, seed=1)
    g = refngd.gradient(model, theta, loss, X, y)
    for cls in (Fisher, EmpiricalFisher, SampledFisher):
        F = build(cls, model, theta, loss, X, y)
        D = F.dense()
        assert np.linalg.cond(D) < 1e5  # a well-posed system: the only difficulty is λ
        top = np.linalg.norm(D, 2)
        lams = [1e-8 * top, 1e-10 * top, 1e-12 * top]
        for lam, swept in zip(lams, F.solve_sweep(g, lams)):
            ref = np.linalg.solve(D + lam * np.eye(len(g)), g)
            assert_close(F.solve(g, lam), ref, tol=1e-9)
            assert_close(swept, ref, tol=1e-9)
        assert_close(F.solve(g, 0.0), np.linalg.solve(D, g), tol=1e-9)


def test_perfectly_learnt_sample():
    """e_n = 0 for one sample (MSE target = output): its iEF row is 0, nothing is NaN."""
    model, _, theta, X, y, loss = problem("mlp", "mse", "sum")
    y = y.copy()
    y[2] = model.forward(theta, X)[2]
    F = ImprovedEmpiricalFisher(model, theta, loss, X, y)
    U = F.row_matrix()
    assert np.all(np.isfinite(U)) and np.all(U[2] == 0)
    assert np.all(F.output_grad_sq_norms()[2] == 0)
    D = F.dense()
    G = refngd.per_sample_gradients(model, theta, loss, X, y)
    s = F.output_grad_sq_norms()
    keep = s > 0
    assert_close(D, (G[keep] / s[keep, None]).T @ G[keep])
    g = refngd.gradient(model, theta, loss, X, y)
    d = F.solve(g, 1e-2)
    assert np.all(np.isfinite(d))
    assert_close(d, np.linalg.solve(D + 1e-2 * np.eye(len(g)), g), tol=1e-9)
    with pytest.raises(SingularSystemError):  # the zero row makes the Gram matrix singular
        F.solve(g, 0.0)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", list(LOSSES))
def test_single_sample(cls, name):
    model, _, theta, X, y, loss = problem("mlp", name, "mean", N=1)
    F = build(cls, model, theta, loss, X, y)
    J = refngd.jacobian(model, theta, X)
    Z = model.forward(theta, X)
    assert math.isclose(F.c, c_by_hand(name, "mean", 1, Z.shape[1]))
    D = F.dense()
    if cls is Fisher:
        assert_close(D, F.c * J[0].T @ loss.output_hessian(Z)[0] @ J[0])
    g = refngd.gradient(model, theta, loss, X, y)
    assert_close(F.solve(g, 0.5), np.linalg.solve(D + 0.5 * np.eye(len(g)), g), tol=1e-9)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name", list(LOSSES))
def test_float32_model(cls, name):
    """A float32 model gives float32 results within ~1e-4 of float64; Gram in float64."""
    model, _, theta, X, y, loss = problem("mlp", name, "mean")
    y32 = y if name == "cross_entropy" else y.astype(np.float32)
    F64 = build(cls, model, theta, loss, X, y)
    F32 = build(cls, model, theta.astype(np.float32), loss, X.astype(np.float32), y32)
    D64, D32 = F64.dense(), F32.dense()
    assert D32.dtype == np.float32 and F32.gram().dtype == np.float64
    assert_close(D32, D64, tol=1e-5)
    assert_close(F32.gram(), F64.gram(), tol=1e-5)
    g = refngd.gradient(model, theta, loss, X, y)
    lam = 1e-2 * np.linalg.norm(D64, 2)
    d32 = F32.solve(g.astype(np.float32), lam)
    assert d32.dtype == np.float32
    assert_close(d32, F64.solve(g, lam), tol=1e-4)
    assert_close(F32 @ g.astype(np.float32), D64 @ g, tol=1e-5)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("lam", [1e-3, 0.5, 0.0])
def test_solve_row_space_equals_dense_solve(cls, lam):
    """(F + λI)⁻¹ Uᵀw0 through the push-through identity equals the dense solve."""
    model, _, theta, X, y, loss = problem("mlp", "mse", "mean")
    F = build(cls, model, theta, loss, X, y)
    rng = np.random.default_rng(3)
    w0 = rng.standard_normal((F.rows.N, F.rows.K))
    U = F.row_matrix()
    g = U.T @ w0.reshape(-1)
    D = F.dense()
    d = F.solve_row_space(w0, lam)
    if lam == 0:  # minimum-norm solution: F d = g with d in the row space of U
        assert_close(D @ d, g, tol=1e-8)
        assert_close(U.T @ np.linalg.lstsq(U.T, d, rcond=1e-12)[0], d, tol=1e-8)
    else:
        assert_close(d, np.linalg.solve(D + lam * np.eye(len(g)), g))
    with pytest.raises(ValueError, match="w0 must have shape"):
        F.solve_row_space(w0[:, :0], lam)
