"""Tests for refngd.losses: values, derivatives, factors, sampling and input checks.

Oracles are independent of the code under test: per-sample losses are rewritten with
``autograd.numpy`` (differentiated by HIPS autograd), reduced losses with SciPy special
functions, and compared with PyTorch when it is installed.
"""
from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
import scipy.special as sps
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss

LOSSES = {"cross_entropy": CrossEntropy, "mse": MSELoss, "bce_with_logits": BCEWithLogits}
SHAPES = [(1, 1), (1, 7), (5, 1), (3, 2), (4, 7)]
REDUCTIONS = ["mean", "sum"]
TOL = dict(rtol=1e-10, atol=1e-12)


def make_batch(name: str, N: int, C: int, seed: int = 0):
    """Logits Z (N, C) and targets of the right kind for loss ``name``."""
    rng = np.random.default_rng(seed)
    Z = 2.0 * rng.standard_normal((N, C))
    if name == "cross_entropy":
        y = rng.integers(0, C, size=N)
    elif name == "mse":
        y = rng.standard_normal((N, C))
    else:  # soft targets, with exact 0 and 1 mixed in
        y = rng.uniform(0.0, 1.0, size=(N, C))
        y.flat[:: 3] = rng.integers(0, 2, size=y.flat[:: 3].shape)
    return Z, y


# ----------------------------------------------------- independent per-sample oracles
def oracle_l(name: str, z, t):
    """l_n for one sample written with autograd.numpy (naive but exact for moderate z)."""
    if name == "cross_entropy":
        return anp.log(anp.sum(anp.exp(z))) - z[t]
    if name == "mse":
        return anp.sum((z - t) ** 2)
    sig = 1.0 / (1.0 + anp.exp(-z))
    return -anp.sum(t * anp.log(sig) + (1.0 - t) * anp.log(1.0 - sig))


def reference_reduced(name: str, Z, y, reduction: str) -> float:
    """L = c Σ_n l_n from SciPy special functions."""
    N, C = Z.shape
    if name == "cross_entropy":
        elems = sps.logsumexp(Z, axis=1) - Z[np.arange(N), y]
        count = N
    elif name == "mse":
        elems = (Z - y) ** 2
        count = N * C
    else:
        elems = -(y * sps.log_expit(Z) + (1.0 - y) * sps.log_expit(-Z))
        count = N * C
    total = float(np.sum(elems))
    return total / count if reduction == "mean" else total


# -------------------------------------------------------------------- exact values
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("N,C", SHAPES)
def test_per_sample_and_gradient_match_autograd(name, N, C):
    Z, y = make_batch(name, N, C)
    loss = LOSSES[name]()
    l = loss.per_sample(Z, y)
    E = loss.output_gradient(Z, y)
    assert l.shape == (N,) and E.shape == (N, C)
    for n in range(N):
        np.testing.assert_allclose(l[n], oracle_l(name, Z[n], y[n]), **TOL)
        g = autograd.grad(lambda z: oracle_l(name, z, y[n]))(Z[n])
        np.testing.assert_allclose(E[n], g, **TOL)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("N,C", SHAPES)
def test_hessian_matches_autograd_and_factor(name, N, C):
    Z, y = make_batch(name, N, C, seed=1)
    loss = LOSSES[name]()
    H = loss.output_hessian(Z)
    S = loss.hessian_sqrt(Z)
    assert H.shape == S.shape == (N, C, C)
    for n in range(N):
        Hn = autograd.hessian(lambda z: oracle_l(name, z, y[n]))(Z[n])
        np.testing.assert_allclose(H[n], Hn, **TOL)
    np.testing.assert_allclose(S @ S.transpose(0, 2, 1), H, **TOL)
    # Column k of S_n is a row cotangent: Σ_k S[:, k] S[:, k]ᵀ = H.
    cols = np.einsum("nik,njk->nij", S, S)
    np.testing.assert_allclose(cols, H, **TOL)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,C", SHAPES)
def test_reduced_value_and_scale(name, reduction, N, C):
    Z, y = make_batch(name, N, C, seed=2)
    loss = LOSSES[name](reduction)
    L = loss(Z, y)
    assert isinstance(L, np.ndarray) and L.shape == () and L.dtype == np.float64
    np.testing.assert_allclose(float(L), reference_reduced(name, Z, y, reduction), **TOL)
    # The constant c, spelled out so that a wrong N or C fails.
    expected_c = {"sum": 1.0, "mean": 1.0 / N if name == "cross_entropy" else 1.0 / (N * C)}
    assert loss.scale(Z) == pytest.approx(expected_c[reduction], rel=1e-15)
    assert isinstance(loss.scale(Z), float)
    np.testing.assert_allclose(float(L), loss.scale(Z) * loss.per_sample(Z, y).sum(), **TOL)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("N,C", SHAPES)
def test_matches_torch(name, reduction, N, C):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    Z, y = make_batch(name, N, C, seed=3)
    Zt = torch.tensor(Z, requires_grad=True)
    if name == "cross_entropy":
        Lt = F.cross_entropy(Zt, torch.tensor(y), reduction=reduction)
    elif name == "mse":
        Lt = F.mse_loss(Zt, torch.tensor(y), reduction=reduction)
    else:
        Lt = F.binary_cross_entropy_with_logits(Zt, torch.tensor(y), reduction=reduction)
    Lt.backward()
    loss = LOSSES[name](reduction)
    np.testing.assert_allclose(float(loss(Z, y)), Lt.item(), **TOL)
    # torch's gradient of the reduced loss is c · e_n.
    np.testing.assert_allclose(
        loss.scale(Z) * loss.output_gradient(Z, y), Zt.grad.numpy(), **TOL
    )


def test_cross_entropy_single_class_is_degenerate():
    Z = np.array([[3.0], [-1.5]])
    loss = CrossEntropy()
    y = np.zeros(2, dtype=int)
    assert np.all(loss.per_sample(Z, y) == 0.0)
    assert np.all(loss.output_gradient(Z, y) == 0.0)
    assert np.all(loss.output_hessian(Z) == 0.0)
    assert np.all(loss.hessian_sqrt(Z) == 0.0)
    assert np.all(loss.sample_targets(Z, np.random.default_rng(0), 5) == 0)


@pytest.mark.parametrize("big", [50.0, 800.0, 1e5])
def test_extreme_logits_are_stable(big):
    Z = np.array([[big, 0.0, -big]])
    ce = CrossEntropy()
    np.testing.assert_allclose(ce.per_sample(Z, np.array([1])), [big], rtol=1e-12)
    np.testing.assert_allclose(ce.per_sample(Z, np.array([0])), [0.0], atol=1e-12)
    np.testing.assert_allclose(ce.output_gradient(Z, np.array([0]))[0, 0], 0.0, atol=1e-12)
    bce = BCEWithLogits("sum")
    ones, zeros = np.ones_like(Z), np.zeros_like(Z)
    # l = softplus(z) − y z: (y=1) → softplus(−z); (y=0) → softplus(z).
    np.testing.assert_allclose(bce.per_sample(Z, ones), [big + np.log(2.0)], rtol=1e-12)
    np.testing.assert_allclose(bce.per_sample(Z, zeros), [big + np.log(2.0)], rtol=1e-12)
    H = bce.output_hessian(Z)[0].diagonal()
    np.testing.assert_allclose(H, sps.expit(Z[0]) * sps.expit(-Z[0]), rtol=1e-12, atol=0)
    for loss, t in [(ce, np.array([2])), (bce, ones), (MSELoss(), ones)]:
        for out in (loss.per_sample(Z, t), loss.output_gradient(Z, t), loss.hessian_sqrt(Z)):
            assert np.all(np.isfinite(out))


@pytest.mark.parametrize("name", LOSSES)
def test_float32_in_float32_out(name):
    Z, y = make_batch(name, 3, 4)
    Z = Z.astype(np.float32)
    loss = LOSSES[name]()
    rng = np.random.default_rng(0)
    outs = [loss(Z, y), loss.per_sample(Z, y), loss.output_gradient(Z, y),
            loss.output_hessian(Z), loss.hessian_sqrt(Z),
            loss.sampled_output_gradients(Z, rng, 2)]
    assert all(o.dtype == np.float32 for o in outs)
    t = loss.sample_targets(Z, rng, 2)
    assert t.dtype == (np.int64 if name == "cross_entropy" else np.float32)


def test_labels_may_be_a_list_and_unsigned():
    Z, y = make_batch("cross_entropy", 4, 3)
    ce = CrossEntropy()
    np.testing.assert_allclose(ce.per_sample(Z, list(y)), ce.per_sample(Z, y), **TOL)
    np.testing.assert_allclose(ce.per_sample(Z, y.astype(np.uint8)), ce.per_sample(Z, y), **TOL)


@pytest.mark.parametrize("cls,name", [(CrossEntropy, "cross_entropy"), (MSELoss, "mse"),
                                      (BCEWithLogits, "bce_with_logits")])
def test_name_repr_reduction(cls, name):
    assert cls().name == name
    assert repr(cls("sum")) == f"{cls.__name__}(reduction='sum')"
    assert cls().reduction == "mean"
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum'"):
        cls("none")


# -------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("name", LOSSES)
def test_sampled_gradients_have_mean_zero_and_covariance_H(name):
    """E[e] = 0 and E[e eᵀ] = H_n for ŷ ~ p(y | z_n) (Fisher = GGN, Martens 2020).

    Tolerance: each estimated entry is a sample mean of K i.i.d. terms, so its standard
    error is sd/√K with sd the per-entry sample standard deviation of those terms.  We
    allow 5 standard errors per entry; under the CLT a single entry exceeds that with
    probability ≈ 6e-7, i.e. < 1e-4 over the ≤ 3·4·(4+1) entries checked here, and the
    seed is fixed, so the test is deterministic.  A wrong factor (2 in the MSE, a missing
    √ in the sampling variance) shifts entries by O(1), i.e. by hundreds of standard errors.
    """
    N, C, K = 3, 4, 200_000
    Z, _ = make_batch(name, N, C, seed=4)
    loss = LOSSES[name]()
    G = loss.sampled_output_gradients(Z, np.random.default_rng(12345), mc_samples=K)
    assert G.shape == (N, K, C)
    H = loss.output_hessian(Z)
    for n in range(N):
        E = G[n]
        se_mean = E.std(axis=0) / np.sqrt(K)
        assert np.all(np.abs(E.mean(axis=0)) <= 5 * se_mean)
        prods = E[:, :, None] * E[:, None, :]
        se_cov = prods.std(axis=0) / np.sqrt(K)
        assert np.all(np.abs(prods.mean(axis=0) - H[n]) <= 5 * se_cov + 1e-15)


@pytest.mark.parametrize("name", LOSSES)
def test_sample_targets_shapes_support_and_seed(name):
    N, C, K = 4, 3, 50
    Z, _ = make_batch(name, N, C, seed=5)
    loss = LOSSES[name]()
    T1 = loss.sample_targets(Z, np.random.default_rng(7), K)
    T2 = loss.sample_targets(Z, np.random.default_rng(7), K)
    np.testing.assert_array_equal(T1, T2)
    if name == "cross_entropy":
        assert T1.shape == (N, K) and T1.dtype == np.int64
        assert T1.min() >= 0 and T1.max() < C
    else:
        assert T1.shape == (N, K, C) and T1.dtype == np.float64
    if name == "bce_with_logits":
        assert set(np.unique(T1)) <= {0.0, 1.0}
    # Default mc_samples is 1; rows of sampled gradients are output gradients at ŷ.
    assert loss.sample_targets(Z, np.random.default_rng(0)).shape[:2] == (N, 1)
    G = loss.sampled_output_gradients(Z, np.random.default_rng(7), K)
    for k in (0, K - 1):
        np.testing.assert_allclose(G[:, k], loss.output_gradient(Z, T1[:, k]), **TOL)


def test_mse_samples_are_gaussian_with_variance_half():
    K = 200_000
    Z = np.array([[0.5, -1.0, 3.0], [0.0, 2.0, -2.0]])
    T = MSELoss().sample_targets(Z, np.random.default_rng(1), K)
    # se of the mean is √(½/K) ≈ 1.6e-3; se of the variance is √(2·¼/K) ≈ 1.6e-3.
    np.testing.assert_allclose(T.mean(axis=1), Z, atol=5 * np.sqrt(0.5 / K))
    np.testing.assert_allclose(T.var(axis=1), 0.5, atol=5 * np.sqrt(0.5 / K))


def test_cross_entropy_never_samples_zero_probability_classes():
    Z = np.array([[-1000.0, 0.0, -1000.0], [0.0, -1000.0, -1000.0], [-1000.0, -1000.0, 0.0]])
    T = CrossEntropy().sample_targets(Z, np.random.default_rng(0), 1000)
    np.testing.assert_array_equal(T, np.array([1, 0, 2])[:, None] * np.ones((1, 1000), int))


@pytest.mark.parametrize("name", LOSSES)
def test_bad_rng_and_mc_samples(name):
    Z, _ = make_batch(name, 2, 3)
    loss = LOSSES[name]()
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator"):
        loss.sample_targets(Z, 0)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="mc_samples must be a positive integer"):
            loss.sampled_output_gradients(Z, np.random.default_rng(0), bad)


# ------------------------------------------------------------------ property tests
logits = arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(1, 6)),
                elements=st.floats(-40.0, 40.0, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(Z=logits)
def test_factor_reproduces_hessian_property(Z):
    for loss in (CrossEntropy(), BCEWithLogits(), MSELoss()):
        S, H = loss.hessian_sqrt(Z), loss.output_hessian(Z)
        np.testing.assert_allclose(S @ S.transpose(0, 2, 1), H, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(H, H.transpose(0, 2, 1), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(Z=logits, data=st.data())
def test_cross_entropy_gradient_sums_to_zero_property(Z, data):
    N, C = Z.shape
    y = np.array(data.draw(st.lists(st.integers(0, C - 1), min_size=N, max_size=N)))
    ce = CrossEntropy()
    E = ce.output_gradient(Z, y)
    np.testing.assert_allclose(E.sum(axis=1), 0.0, atol=1e-12)  # Σ_c (p_c − δ_cy) = 0
    np.testing.assert_allclose(ce.output_hessian(Z).sum(axis=2), 0.0, atol=1e-12)  # H 1 = 0
    assert np.all(ce.per_sample(Z, y) >= 0.0)


# ------------------------------------------------------------------------ bad inputs
def _targets_for(name, N, C):
    return make_batch(name, N, C)[1]


Y_METHODS = ["per_sample", "__call__", "output_gradient", "check_targets"]
Z_METHODS = ["output_hessian", "hessian_sqrt", "scale"]


def _call(loss, method, Z, y=None):
    if method in Z_METHODS:
        return getattr(loss, method)(Z)
    return getattr(loss, method)(Z, y)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("method", Y_METHODS + Z_METHODS + ["sample_targets"])
@pytest.mark.parametrize("Z,exc,match", [
    (np.ones(3), ValueError, "Z must be 2-dimensional"),
    (np.ones((3, 2, 1)), ValueError, "Z must be 2-dimensional"),
    (np.ones((3, 2), dtype=int), TypeError, r"Z has dtype int64.*astype\(float\)"),
    (np.array([[0.0, np.nan], [1.0, 2.0], [0.0, 0.0]]), ValueError, "NaN or Inf"),
    (np.array([[0.0, np.inf], [1.0, 2.0], [0.0, 0.0]]), ValueError, "NaN or Inf"),
    (np.ones((3, 0)), ValueError, r"N >= 1 and C >= 1"),
])
def test_bad_Z(name, method, Z, exc, match):
    loss = LOSSES[name]()
    y = _targets_for(name, 3, 2)
    with pytest.raises(exc, match=match):
        if method == "sample_targets":
            loss.sample_targets(Z, np.random.default_rng(0))
        else:
            _call(loss, method, Z, y)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("method", Y_METHODS)
def test_batch_size_mismatch(name, method):
    Z, _ = make_batch(name, 4, 3)
    y = _targets_for(name, 5, 3)
    with pytest.raises(ValueError, match="batch size mismatch: Z has N = 4"):
        _call(LOSSES[name](), method, Z, y)


@pytest.mark.parametrize("method", Y_METHODS)
@pytest.mark.parametrize("y,exc,match", [
    (np.array([0.0, 1.0, 2.0]), TypeError, r"labels must be integers, e\.g\. y\.astype\(int\)"),
    (np.array([True, False, True]), TypeError, "labels must be integers"),
    (np.eye(3, dtype=int), ValueError, r"shape \(N,\) = \(3,\).*argmax"),
    (np.array([0, 1, 3]), ValueError, r"labels must lie in \[0, C\) = \[0, 3\)"),
    (np.array([0, -1, 2]), ValueError, r"labels must lie in \[0, C\)"),
])
def test_cross_entropy_bad_labels(method, y, exc, match):
    Z, _ = make_batch("cross_entropy", 3, 3)
    with pytest.raises(exc, match=match):
        _call(CrossEntropy(), method, Z, y)


@pytest.mark.parametrize("name", ["mse", "bce_with_logits"])
@pytest.mark.parametrize("method", Y_METHODS)
@pytest.mark.parametrize("y,exc,match", [
    (np.zeros((3, 4)), ValueError, r"same shape as Z, \(3, 2\), got \(3, 4\)"),
    (np.zeros(3), ValueError, "same shape as Z"),
    (np.zeros((3, 2), dtype=int), TypeError, r"must be floats.*astype\(float\)"),
    (np.array([[0.0, np.nan], [0.0, 0.0], [1.0, 1.0]]), ValueError, "NaN or Inf"),
    (np.array([[0.0, np.inf], [0.0, 0.0], [1.0, 1.0]]), ValueError, "NaN or Inf"),
])
def test_float_targets_bad(name, method, y, exc, match):
    Z, _ = make_batch(name, 3, 2)
    with pytest.raises(exc, match=match):
        _call(LOSSES[name](), method, Z, y)


def test_mse_reshape_hint():
    with pytest.raises(ValueError, match=r"y\.reshape\(3, 1\)"):
        MSELoss()(np.zeros((3, 1)), np.zeros(3))


@pytest.mark.parametrize("method", Y_METHODS)
@pytest.mark.parametrize("bad", [1.5, -0.1])
def test_bce_targets_outside_unit_interval(method, bad):
    Z, y = make_batch("bce_with_logits", 3, 2)
    y = y.copy()
    y[1, 0] = bad
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 1\]"):
        _call(BCEWithLogits(), method, Z, y)


def test_mse_accepts_targets_outside_unit_interval():
    Z = np.zeros((2, 2))
    assert float(MSELoss("sum")(Z, np.full((2, 2), 3.0))) == pytest.approx(36.0)


@pytest.mark.parametrize("C", [1, 2, 3, 10])
def test_cross_entropy_hessian_factor_is_minimal_and_exact(C):
    """hessian_factor: F_n F_nᵀ = H_n with C − 1 columns, also for saturated softmax."""
    from refngd.losses import CrossEntropy

    rng = np.random.default_rng(C)
    Z = rng.standard_normal((6, C)) * 3
    Z[0, -1] = 60.0  # p ≈ e_C: the Householder vector q + e_C must stay well defined
    Z[1, 0] = 60.0   # p ≈ e_1
    loss = CrossEntropy()
    Fn = loss.hessian_factor(Z)
    H = loss.output_hessian(Z)
    assert Fn.shape == (6, C, max(C - 1, 1))
    np.testing.assert_allclose(Fn @ Fn.transpose(0, 2, 1), H, rtol=0, atol=1e-14)
    if C > 1:  # the columns are orthogonal to the null vector 1 of H_n
        np.testing.assert_allclose(Fn.sum(axis=1), 0, atol=1e-14)


@pytest.mark.parametrize("cls", ["MSELoss", "BCEWithLogits"])
def test_hessian_factor_is_the_square_root_for_full_rank_losses(cls):
    import refngd.losses as L

    Z = np.random.default_rng(0).standard_normal((4, 3))
    loss = getattr(L, cls)()
    np.testing.assert_array_equal(loss.hessian_factor(Z), loss.hessian_sqrt(Z))


def _mp_hessian(z):
    """H = diag(p) − ppᵀ of one float64 logit vector at 400 digits (as float64)."""
    import mpmath

    with mpmath.workdps(400):
        zz = [mpmath.mpf(float(v)) for v in z]
        m = max(zz)
        ex = [mpmath.exp(v - m) for v in zz]
        s = sum(ex)
        p = [v / s for v in ex]
        return np.array([[float((p[i] if i == j else 0) - p[i] * p[j]) for j in range(len(p))]
                         for i in range(len(p))])


@pytest.mark.parametrize("dtype, gaps, tol", [
    (np.float64, [0.0, 5.0, 40.0, 140.0, 600.0], 1e-13),
    (np.float32, [0.0, 5.0, 20.0, 35.0], 1e-5)])  # float32: p_c p_c' ≥ 1e-30 representable
@pytest.mark.parametrize("C", [2, 3, 5])
def test_cross_entropy_factors_relatively_accurate_when_saturated(dtype, gaps, tol, C):
    """Every entry of F Fᵀ (label-free and label-aligned factors), of output_hessian and of
    hessian_sqrt·hessian_sqrtᵀ matches a 400-digit H_n *relative to its own size*, for
    softmax outputs saturated on one class (p_j ≈ 1, the others ~e^{−gap}).  A Householder
    pivot at a fixed coordinate, or p_j − p_j², gets the entries of row j ~1e-30 wrong by
    ε = 1e-16 absolutely (relative error up to 1e14) — an atol test cannot see that."""
    from refngd.losses import CrossEntropy

    loss = CrossEntropy()
    rng = np.random.default_rng(C)
    Z = []
    for gap in gaps:
        for j in range(C):  # saturated on class j
            z = -gap + rng.standard_normal(C)
            z[j] = 0.0
            Z.append(z)
    Z = np.array(Z, dtype=dtype)
    ref = np.array([_mp_hessian(z.astype(float)) for z in Z])
    y = np.arange(len(Z)) % C
    Fu, Fa = loss.hessian_factor(Z), loss.hessian_factor(Z, y)
    S = loss.hessian_sqrt(Z)
    for name, got in (("label-free", Fu @ Fu.transpose(0, 2, 1)),
                      ("aligned", Fa @ Fa.transpose(0, 2, 1)),
                      ("output_hessian", loss.output_hessian(Z)),
                      ("hessian_sqrt", S @ S.transpose(0, 2, 1))):
        err = np.abs(got.astype(float) - ref)
        assert np.all(err <= tol * np.abs(ref) + 1e-300), (name, float((err / (np.abs(ref) + 1e-300)).max()))
    # the aligned factor's first column is −(q_y/s)·e_n: a scaled copy of the gradient
    e = loss.output_gradient(Z, y)
    P = np.exp(Z.astype(float) - Z.astype(float).max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    py = P[np.arange(len(y)), y]
    s2 = np.where(np.arange(C)[None, :] == y[:, None], 0, P).sum(1)  # 1 − p_y, no cancellation
    aligned = y != P.argmax(1)  # a label that is the most probable class keeps the free factor
    ok = aligned & (py > 0) & (s2 > 0)
    scaled = -np.sqrt(py / np.where(ok, s2, 1))[:, None] * e
    np.testing.assert_allclose(Fa[ok, :, 0], scaled[ok], rtol=10 * tol, atol=0)
    np.testing.assert_array_equal(Fa[~aligned], Fu[~aligned])
    a, r = loss.gradient_in_factor(Z, y)
    assert np.all(np.abs(a[~aligned]) <= 1) and not np.any(r[~aligned])
    implied = np.einsum("ncm,nm->nc", Fa, a) + r
    np.testing.assert_allclose(implied, e, rtol=10 * tol, atol=np.finfo(dtype).tiny)
