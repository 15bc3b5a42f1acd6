"""K-FAC for Linear layers: exact cases, factor oracles, Fisher types and the interface.

The oracles share no code with ``refngd.curvature.kfac``:

* the exact Fisher / SF / EF of ``refngd.curvature.exact`` (themselves checked against
  HIPS autograd in test_curvature_exact.py), restricted to K-FAC's block structure —
  per parameter tensor with ``bias="separate"`` (which drops the weight–bias cross terms),
  per layer with ``bias="joint"``;
* A = (1/N) Σ ā āᵀ from a forward pass written out by hand;
* G: the bias block of the exact curvature is c Σ_r b_r b_rᵀ, i.e. exactly G, for every
  Linear layer of any network (the bias gradient of row r is b_r itself);
* ``numpy.linalg.solve`` / ``slogdet`` on dense matrices built from the factors.
"""
from __future__ import annotations

import numpy as np
import pytest

import refngd
from refngd import nn, updates
from refngd.backend import SingularSystemError
from refngd.curvature import KFAC, EmpiricalFisher, Fisher, SampledFisher
from refngd.losses import CrossEntropy, MSELoss
from kfac_helpers import block_mask, rel_err

EXACT = 1e-10
BIAS = ["separate", "joint"]
RED = ["mean", "sum"]


def mlp(rng, widths, act=nn.Tanh, bias=True):
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b, bias=bias if i != 1 else False))
        if act is not None and i < len(widths) - 2:
            layers.append(act())
    model = nn.Sequential(*layers)
    return model, model.init(rng)


def ce_problem(seed=0, N=6, widths=(4, 5, 3)):
    rng = np.random.default_rng(seed)
    model, theta = mlp(rng, list(widths))
    return model, theta, rng.standard_normal((N, widths[0])), rng.integers(0, widths[-1], N)


# ----------------------------------------------------------------------- exact cases
@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("reduction", RED)
def test_exact_for_deep_linear_network_under_mse(bias, reduction):
    """Deep linear net (one layer without bias), MSE, N = 9: b_nk does not depend on n."""
    rng = np.random.default_rng(1)
    model, theta = mlp(rng, [4, 3, 5, 2], act=None)
    X, y = rng.standard_normal((9, 4)), rng.standard_normal((9, 2))
    loss = MSELoss(reduction)
    F = Fisher(model, theta, loss, X, y).dense()
    K = KFAC(model, theta, loss, X, y, bias=bias)
    assert rel_err(K.dense(), F * block_mask(model, bias)) <= EXACT


@pytest.mark.parametrize("bias", BIAS)
@pytest.mark.parametrize("reduction", RED)
def test_exact_for_single_datum_under_cross_entropy(bias, reduction):
    model, theta, X, y = ce_problem(N=1)
    loss = CrossEntropy(reduction)
    F = Fisher(model, theta, loss, X, y).dense()
    assert rel_err(KFAC(model, theta, loss, X, y, bias=bias).dense(),
                   F * block_mask(model, bias)) <= EXACT


def test_not_exact_in_general():
    """The exact-case tests can fail: for N > 1 under CE the approximation error is O(1)."""
    model, theta, X, y = ce_problem(N=8)
    F = Fisher(model, theta, CrossEntropy(), X, y).dense()
    assert rel_err(KFAC(model, theta, CrossEntropy(), X, y).dense(), F * block_mask(model, "separate")) > 1e-2


def test_joint_bias_permutation_by_hand():
    """joint: the block over [W | b] (row-major (d_out, d_in + 1)) is G ⊗ A, mapped to θ's W-then-b order."""
    model, theta, X, y = ce_problem(N=5)
    K = KFAC(model, theta, CrossEntropy(), X, y, bias="joint")
    f = K.factors()[0]
    layer = f.layer
    assert layer.bias
    d_out, d_in = layer.out_features, layer.in_features
    blk = np.kron(f.G, f.A)  # rows (o, j), j = d_in is the bias column
    order = [o * (d_in + 1) + j for o in range(d_out) for j in range(d_in)] + \
            [o * (d_in + 1) + d_in for o in range(d_out)]
    assert np.allclose(K.dense()[f.start:f.stop, f.start:f.stop], blk[np.ix_(order, order)], rtol=0, atol=1e-15)


# ----------------------------------------------------------------------- factor oracles
def hand_inputs(model, theta, X):
    """Inputs of every Linear layer by a forward pass written out here."""
    params, x, out = model.unflatten(theta), X, []
    for layer, p in zip(model.layers, params):
        if isinstance(layer, nn.Linear):
            out.append(x)
            x = x @ p[0].T + (p[1] if layer.bias else 0)
        else:
            x = np.tanh(x)
    return out


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
@pytest.mark.parametrize("reduction", RED)
def test_factors_against_oracles(fisher_type, reduction):
    """A = (1/N) Σ ā āᵀ; G = the bias block of the matching exact curvature (same rows)."""
    model, theta, X, y = ce_problem(N=7, widths=(4, 5, 6, 3))
    loss = CrossEntropy(reduction)
    kw = dict(mc_samples=3, rng=11) if fisher_type == "mc" else {}
    exact = {"type-2": lambda: Fisher(model, theta, loss, X, y),
             "mc": lambda: SampledFisher(model, theta, loss, X, y, mc_samples=3, rng=11),
             "empirical": lambda: EmpiricalFisher(model, theta, loss, X, y)}[fisher_type]().dense()
    for bias in BIAS:
        facs = KFAC(model, theta, loss, X, y, fisher_type=fisher_type, bias=bias, **kw).factors()
        for f, a in zip(facs, hand_inputs(model, theta, X)):
            abar = np.hstack([a, np.ones((len(a), 1))]) if f.bias == "joint" else a
            assert rel_err(f.A, abar.T @ abar / len(a)) <= EXACT
            assert f.bias == (bias if f.layer.bias else None)
            if f.layer.bias:
                assert rel_err(f.G, exact[f.stop - f.G.shape[0]:f.stop, f.stop - f.G.shape[0]:f.stop]) <= EXACT


@pytest.mark.parametrize("bias", BIAS)
def test_empirical_single_datum_equals_empirical_fisher_block(bias):
    model, theta, X, y = ce_problem(N=1)
    F = EmpiricalFisher(model, theta, CrossEntropy(), X, y).dense()
    K = KFAC(model, theta, CrossEntropy(), X, y, fisher_type="empirical", bias=bias)
    assert rel_err(K.dense(), F * block_mask(model, bias)) <= EXACT


def test_mc_converges_to_type2():
    """G_mc is unbiased with E‖G_mc − G‖²_F = V/K, V computed exactly by enumerating labels.

    For each sample, e(ŷ) = p − onehot(ŷ) with probability p_ŷ; back-propagating all C of
    them gives G_n = c Σ_j p_j b_j b_jᵀ (= the type-2 G_n) and V = Σ_n Σ_j p_j ‖c b_j b_jᵀ − G_n‖².
    Over S = 30 seeds the mean of X = K‖G_mc − G‖²/V must be 1 within 4 standard errors
    (a t-test at about 4σ: false alarm below 1e-3, deterministic with the fixed seeds), for
    K = 1 … 1000; a missing 1/√K would make X grow like K.  A is the same object for all.
    """
    model, theta, X, y = ce_problem(seed=3, N=6, widths=(3, 5, 4))
    X = 2 * X
    loss = CrossEntropy()
    lin = model.linearize(theta, X)
    k2 = KFAC(model, theta, loss, X, linearization=lin)
    Z = lin.outputs
    p = np.exp(Z - Z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    rows = lin.backprop(p[:, None, :] - np.eye(Z.shape[1])[None])
    c = loss.scale(Z)
    V = []
    for e, f in zip(rows.layers, k2.factors()):
        outer = c * np.einsum("nja,njb->njab", e.B, e.B)
        Gn = np.einsum("nj,njab->nab", p, outer)
        assert rel_err(Gn.sum(0), f.G) <= EXACT
        V.append(np.einsum("nj,nj->", p, ((outer - Gn[:, None]) ** 2).sum((2, 3))))
    errs = {}
    for K in (1, 10, 100, 1000):
        Xs = []
        for seed in range(30):
            km = KFAC(model, theta, loss, X, fisher_type="mc", mc_samples=K, rng=seed, linearization=lin)
            for a, b in zip(km.factors(), k2.factors()):
                assert a.A is b.A
            Xs.append([K * ((a.G - b.G) ** 2).sum() / v for a, b, v in zip(km.factors(), k2.factors(), V)])
        Xs = np.array(Xs)
        assert np.all(np.abs(Xs.mean(0) - 1) <= 4 * Xs.std(0, ddof=1) / np.sqrt(len(Xs))), (K, Xs.mean(0))
        errs[K] = np.sqrt(Xs[0] * np.array(V) / K)
    assert np.all(errs[1000] < errs[1] / 5)


# ----------------------------------------------------------------------- the interface
def interface_problem(N):
    """N = 3 < d_in (thin eigenbases of A) or N = 40 (full bases)."""
    rng = np.random.default_rng(N)
    model, theta = mlp(rng, [6, 5, 4, 3])
    return model, theta, rng.standard_normal((N, 6)), rng.integers(0, 3, N)


@pytest.mark.parametrize("N", [3, 40])
@pytest.mark.parametrize("bias", BIAS)
def test_operations_match_dense(N, bias):
    model, theta, X, y = interface_problem(N)
    K = KFAC(model, theta, CrossEntropy(), X, y, bias=bias)
    D = K.dense()
    assert np.allclose(D, D.T, rtol=0, atol=1e-15)
    v = np.random.default_rng(5).standard_normal((model.num_params, 2))
    assert rel_err(K @ v[:, 0], D @ v[:, 0]) <= EXACT
    assert rel_err(K @ v, D @ v) <= EXACT
    assert rel_err(K.to_linear_operator() @ v, D @ v) <= EXACT
    assert rel_err(K.diagonal(), np.diag(D)) <= EXACT
    assert abs(K.trace() - np.trace(D)) <= EXACT * np.trace(D)
    for lam in (1e-2, 1.0):
        Dl = D + lam * np.eye(len(D))
        assert rel_err(K.solve(v[:, 0], lam), np.linalg.solve(Dl, v[:, 0])) <= EXACT
        assert abs(K.logdet(lam) - np.linalg.slogdet(Dl)[1]) <= EXACT * abs(np.linalg.slogdet(Dl)[1])


def factored_dense(K, lam):
    """Martens & Grosse (2015, §6.3) written out: (G + √λ/π I) ⊗ (A + π√λ I) per block."""
    D = np.zeros((K.num_params,) * 2)
    s = np.sqrt(lam)
    for f in K.factors():
        parts = [(f.A, f.start, f.stop)]
        if f.bias == "separate":
            nb = f.G.shape[0]
            parts = [(f.A, f.start, f.stop - nb), (np.ones((1, 1)), f.stop - nb, f.stop)]
        for A, a, b in parts:
            pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(f.G) / len(f.G)))
            blk = np.kron(f.G + s / pi * np.eye(len(f.G)), A + pi * s * np.eye(len(A)))
            if f.bias == "joint":  # [W | b] row-major -> θ's W then b
                do, da = f.G.shape[0], A.shape[0]
                order = [o * da + j for o in range(do) for j in range(da - 1)] + [o * da + da - 1 for o in range(do)]
                blk = blk[np.ix_(order, order)]
            D[a:b, a:b] = blk
    return D


@pytest.mark.parametrize("N", [3, 40])
@pytest.mark.parametrize("bias", BIAS)
def test_factored_damping_matches_its_dense_formula(N, bias):
    model, theta, X, y = interface_problem(N)
    K = KFAC(model, theta, CrossEntropy(), X, y, bias=bias)
    g = refngd.gradient(model, theta, CrossEntropy(), X, y)
    for lam in (1e-3, 0.5):
        Df = factored_dense(K, lam)
        assert rel_err(K.solve(g, lam, damping_mode="factored"), np.linalg.solve(Df, g)) <= EXACT
        ld = np.linalg.slogdet(Df)[1]
        assert abs(K.logdet(lam, damping_mode="factored") - ld) <= EXACT * abs(ld)
    # factored and Tikhonov damping differ (they are different matrices)
    assert rel_err(K.solve(g, 0.5, damping_mode="factored"), K.solve(g, 0.5)) > 1e-3


def test_solve_never_forms_dense(monkeypatch):
    model, theta, X, y = interface_problem(3)
    K = KFAC(model, theta, CrossEntropy(), X, y)
    monkeypatch.setattr(KFAC, "dense", lambda self: pytest.fail("dense() called"))
    g = np.ones(model.num_params)
    K.solve(g, 0.1), K.solve(g, 0.1, damping_mode="factored"), K @ g, K.logdet(0.1)


def test_undamped_solve():
    """λ = 0 works when every factor is non-singular (MSE, N > d) and raises otherwise
    (N < d_in makes A singular; under CE, G of the last layer has the null vector 1)."""
    model, theta, X, _ = interface_problem(40)
    y = np.random.default_rng(0).standard_normal((40, 3))
    K = KFAC(model, theta, MSELoss(), X, y, bias="joint")
    g = refngd.gradient(model, theta, MSELoss(), X, y)
    D = K.dense()
    assert rel_err(K.solve(g, 0.0), np.linalg.solve(D, g)) <= 1e-16 * np.linalg.cond(D)
    model, theta, X, y = interface_problem(3)
    for loss, yy in ((MSELoss(), np.zeros((3, 3))), (CrossEntropy(), y)):
        with pytest.raises(SingularSystemError):
            KFAC(model, theta, loss, X, yy).solve(np.ones(model.num_params), 0.0)


@pytest.mark.parametrize("damping_mode", ["tikhonov", "factored"])
def test_updates_kfac(damping_mode):
    model, theta, X, y = ce_problem(N=5)
    loss = CrossEntropy()
    g = refngd.gradient(model, theta, loss, X, y)
    for kw in ({}, dict(fisher_type="mc", mc_samples=2, rng=3), dict(fisher_type="empirical", bias="joint")):
        d = updates.kfac(model, theta, loss, X, y, 0.1, damping_mode=damping_mode, **kw)
        ref = KFAC(model, theta, loss, X, y, **kw).solve(g, 0.1, damping_mode=damping_mode)
        assert rel_err(d, ref) <= EXACT


def test_linearization_shares_the_input_factors():
    model, theta, X, y = ce_problem(N=5)
    lin = model.linearize(theta, X)
    a = KFAC(model, theta, CrossEntropy(), X, y, linearization=lin).factors()
    b = KFAC(model, theta, CrossEntropy(), X, y, fisher_type="empirical", linearization=lin).factors()
    assert all(fa.A is fb.A for fa, fb in zip(a, b))
    c = KFAC(model, theta, CrossEntropy(), X, y, bias="joint", linearization=lin).factors()
    assert c[0].A.shape[0] == a[0].A.shape[0] + 1


def test_float32_model():
    model, theta, X, y = ce_problem(N=5)
    K64 = KFAC(model, theta, CrossEntropy(), X, y)
    K32 = KFAC(model, theta.astype(np.float32), CrossEntropy(), X.astype(np.float32), y)
    g = np.ones(model.num_params, dtype=np.float32)
    for f in (lambda K: K.dense(), lambda K: K @ g, lambda K: K.solve(g, 0.1)):
        out = f(K32)
        assert out.dtype == np.float32
        assert rel_err(out, f(K64)) <= 1e-5


def test_errors():
    model, theta, X, y = ce_problem(N=3)
    loss = CrossEntropy()
    with pytest.raises(ValueError, match="fisher_type"):
        KFAC(model, theta, loss, X, y, fisher_type="type2")
    with pytest.raises(ValueError, match="kfac_approx"):
        KFAC(model, theta, loss, X, y, kfac_approx="mean")
    with pytest.raises(ValueError, match="bias"):
        KFAC(model, theta, loss, X, y, bias="none")
    with pytest.raises(TypeError, match="rng"):
        KFAC(model, theta, loss, X, y, fisher_type="mc")
    with pytest.raises(ValueError, match="mc_samples"):
        KFAC(model, theta, loss, X, y, fisher_type="mc", mc_samples=0, rng=0)
    with pytest.raises(ValueError, match="labels"):
        KFAC(model, theta, loss, X, fisher_type="empirical")
    K = KFAC(model, theta, loss, X, y)
    with pytest.raises(ValueError, match="damping_mode"):
        K.solve(np.ones(model.num_params), 0.1, damping_mode="levenberg")
    with pytest.raises(ValueError, match="damping"):
        K.solve(np.ones(model.num_params), -1.0)
    with pytest.raises(ValueError, match="length"):
        K.solve(np.ones(3), 0.1)
    fm = refngd.FunctionModel(lambda th, x: x @ th.reshape(4, 3), np.zeros(12))
    with pytest.raises(TypeError, match="Sequential"):
        KFAC(fm, np.zeros(12), loss, X, y)


@pytest.mark.parametrize("loss_name, underflow", [("ce", False), ("ce", True), ("mse", False),
                                                   ("bce", False)])
def test_update_gradient_from_the_type2_rows(loss_name, underflow):
    """updates.kfac / ekfac write g = c Uᵀa in the type-2 rows (no second backward pass);
    the result equals the solve of the gradient from its own backward pass, also where a
    softmax probability underflowed (residual r ≠ 0: the gradient's own pass)."""
    from numerics import assert_close

    from refngd import losses
    from refngd.curvature import EKFAC

    rng = np.random.default_rng(11)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    theta = model.init(rng)
    X = rng.standard_normal((5, 4))
    loss, y = {"ce": (losses.CrossEntropy(), rng.integers(0, 3, 5)),
               "mse": (losses.MSELoss(), rng.standard_normal((5, 3))),
               "bce": (losses.BCEWithLogits(), (rng.random((5, 3)) < 0.5).astype(float))}[loss_name]
    if underflow:  # sample 0: label 2 gets probability exp(-800) = 0 in float64
        theta = theta.copy()
        theta[-3:] = [400.0, 0.0, -400.0]
        y = y.copy()
        y[0] = 2
        a, r = loss.gradient_in_factor(model.forward(theta, X), y)
        assert np.any(r != 0)
    g = refngd.gradient(model, theta, loss, X, y)
    for cls, update in ((KFAC, updates.kfac), (EKFAC, updates.ekfac)):
        expected = cls(model, theta, loss, X, y).solve(g, 1e-3)
        assert_close(update(model, theta, loss, X, y, 1e-3), expected, 1e-12)


@pytest.mark.parametrize("dtype, gap, tol", [(np.float64, 140.0, 1e-12), (np.float32, 40.0, 1e-5)])
def test_kfac_gradient_from_rows_when_a_label_is_improbable(dtype, gap, tol):
    """Saturated softmax, labels against it (p_y ~ e^{-gap}): the type-2 rows are aligned with
    the gradient, so g = c Uᵀa keeps the dtype's accuracy (an unaligned factor gave a
    relative error ε/√p_y: 47 in float32 at p_y = 1e-19, 1e11 in float64 at 1e-57)."""
    from numerics import assert_close

    from refngd import losses

    rng = np.random.default_rng(5)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    theta = model.init(rng)
    theta[-3:] += [gap, 0.0, 0.0]
    X = rng.standard_normal((6, 4))
    y = np.array([1, 2, 0, 1, 2, 0])
    loss = losses.CrossEntropy()
    g = refngd.gradient(model, theta, loss, X, y)
    ref = KFAC(model, theta, loss, X, y).solve(g, 1e-1)
    got = updates.kfac(model, theta.astype(dtype), loss, X.astype(dtype), y, 1e-1)
    assert got.dtype == dtype
    assert_close(got.astype(float), ref, tol)
