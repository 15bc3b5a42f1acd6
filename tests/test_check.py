"""refngd.check: a correct candidate passes; each planted bug is named by compare / validate.

The planted bugs are the ones users of curvature libraries report: the MSE's factor 2, a
sum where a mean was meant (N), a mean-reduced backward averaged again (N²), a transposed
vec / swapped Kronecker order, a missing or extra bias column, expand vs reduce, the EF
where the Fisher was meant, the tutorial's simplified K-FAC, a sign flip, and one wrong
block among right ones.  Candidates are built with torch where that is how the bug arises.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import check, losses, nn
from refngd.curvature import KFAC, Fisher, SampledFisher

torch = pytest.importorskip("torch")
from refngd import interop, testing  # noqa: E402

N = 6


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(48, 3)).double()
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((N, 2, 4, 4)), rng.integers(0, 3, N)
    model, theta = interop.from_torch(net)
    return net, model, theta, X, y


@pytest.fixture(scope="module")
def mlp_mse():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((N, 4)), rng.standard_normal((N, 2))
    model, theta = interop.from_torch(net)
    return net, model, theta, X, y


CE = torch.nn.CrossEntropyLoss()


def factors(K, names=("0", "3")):
    out = {}
    for f, n in zip(K.factors(), names):
        out[f"{n}.A"], out[f"{n}.G"] = f.A, f.G
    return out


def test_correct_candidates_pass(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    K = KFAC(model, theta, loss, X, y)
    for quantity, cand in [("kfac", K.dense()), ("kfac_factors", factors(K)),
                           ("fisher", Fisher(model, theta, loss, X, y).dense())]:
        report = check.validate(net, CE, X, y, quantity, cand)
        assert report.passed and report.diagnosis is None and "PASSED" in str(report)
    # gradient from torch itself
    net.zero_grad()
    CE(net(torch.tensor(X)), torch.tensor(y)).backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    assert check.validate(net, CE, torch.tensor(X), torch.tensor(y), "gradient", g).passed


def test_factor_two_of_the_mse(mlp_mse):
    """A user's GGN with the ½‖z − y‖² convention: H = I instead of 2I."""
    net, model, theta, X, y = mlp_mse
    mse = torch.nn.MSELoss(reduction="sum")
    params = {k: v.detach() for k, v in net.named_parameters()}
    J = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (torch.tensor(X),)))(params)
    Jm = torch.cat([J[k].reshape(N, 2, -1) for k in params], dim=2)
    user = torch.einsum("ncp,ncq->pq", Jm, Jm)                   # Σ Jᵀ J: the ½ convention
    report = check.validate(net, mse, X, y, "fisher", user)
    assert not report.passed
    assert "1/2" in report.diagnosis and "MSE" in report.diagnosis
    assert check.validate(net, mse, X, y, "fisher", 2 * user).passed


def test_sum_vs_mean_and_double_mean(cnn):
    net, model, theta, X, y = cnn
    net.zero_grad()
    torch.nn.CrossEntropyLoss(reduction="sum")(net(torch.tensor(X)), torch.tensor(y)).backward()
    g_sum = torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    d = check.validate(net, CE, X, y, "gradient", g_sum).diagnosis
    assert "factor N = 6" in d and "sum vs mean" in d
    loss = interop.from_torch_loss(CE)
    f = factors(KFAC(model, theta, loss, X, y))
    bad = {k: (v / N if k.endswith("G") else v) for k, v in f.items()}   # G/N² · N: averaged again
    d = check.validate(net, CE, X, y, "kfac_factors", bad).diagnosis
    assert "1/N = 1/6" in d


def test_transposed_vec_and_swapped_kronecker(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    K = KFAC(model, theta, loss, X, y)
    swapped = K.dense().copy()
    for f in K.factors():       # weight blocks as A ⊗ G
        d_out, D = f.G.shape[0], f.A.shape[0]
        s = slice(f.start, f.start + d_out * D)
        swapped[s, s] = np.kron(f.A, f.G)
    report = check.validate(net, CE, X, y, "kfac", swapped)
    assert "A ⊗ G in place of G ⊗ A" in report.diagnosis and "column-major" in report.diagnosis
    assert "for each weight" in report.diagnosis and "0.weight, 3.weight" in report.diagnosis
    g = check.validate(net, CE, X, y, "gradient", np.zeros(theta.size)).blocks  # shapes only
    assert len(g) == 4
    grad = Fisher(model, theta, loss, X, y).gradient()
    col = grad.copy()
    col[57:201] = grad[57:201].reshape(3, 48).T.reshape(-1)   # the Linear weight, column-major
    report = check.validate(net, CE, X, y, "gradient", col)
    assert "only block '3.weight'" in report.diagnosis and "column-major" in report.diagnosis


def test_bias_column_missing_or_extra(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    joint = factors(KFAC(model, theta, loss, X, y, bias="joint"))
    sep = factors(KFAC(model, theta, loss, X, y))
    d = check.validate(net, CE, X, y, "kfac_factors", sep, bias="joint").diagnosis
    assert "bias row/column is missing" in d
    d = check.validate(net, CE, X, y, "kfac_factors", joint).diagnosis
    assert "too many" in d and "joint bias" in d
    d = check.validate(net, CE, X, y, "kfac", KFAC(model, theta, loss, X, y, bias="joint").dense()).diagnosis
    assert "bias='joint' where 'separate' was meant" in d


def test_expand_reduce_ef_tutorial_backpack_named(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    cases = {
        "kfac_approx='reduce' where 'expand'": KFAC(model, theta, loss, X, y, kfac_approx="reduce"),
        "empirical-Fisher K-FAC": KFAC(model, theta, loss, X, y, fisher_type="empirical"),
        "tutorial's simplified K-FAC": KFAC(model, theta, loss, X, y, convention="tutorial"),
        "BackPACK's Conv2d factors": KFAC(model, theta, loss, X, y, convention="backpack"),
    }
    for phrase, K in cases.items():
        d = check.validate(net, CE, X, y, "kfac", K.dense()).diagnosis
        assert phrase in d, (phrase, d)
    from refngd.curvature import EmpiricalFisher
    d = check.validate(net, CE, X, y, "fisher", EmpiricalFisher(model, theta, loss, X, y).dense()).diagnosis
    assert "empirical Fisher (EF, observed labels) where the Fisher was meant" in d


def test_sign_flip_and_unrecognised(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    from refngd import updates
    d = updates.kfac(model, theta, loss, X, y, 1e-3)
    r = check.validate(net, CE, X, y, "kfac_update", -d, damping=1e-3)
    assert "sign flip" in r.diagnosis
    noise = d + 1e-3 * np.random.default_rng(5).standard_normal(d.size)
    r = check.validate(net, CE, X, y, "kfac_update", noise, damping=1e-3)
    assert not r.passed and "no recognisable cause" in str(r)


def test_float32_candidates_get_a_float32_tolerance(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    F = Fisher(model, theta, loss, X, y).dense()
    r = check.validate(net, CE, X, y, "fisher", F.astype(np.float32))
    assert r.passed and r.rtol == 1e-4 and "float32" in str(r)
    r = check.validate(net, CE, X, y, "fisher", (2 * F).astype(np.float32))
    assert not r.passed and "factor 2" in r.diagnosis


def test_sampled_fisher_tolerance_from_the_sample_size(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    F_hat = SampledFisher(model, theta, loss, X, y, mc_samples=64, rng=123).dense()
    r = check.validate(net, CE, X, y, "sampled_fisher", F_hat, mc_samples=64)
    assert r.passed and "Monte-Carlo" in str(r) and 0.01 < r.rtol < 1
    r = check.validate(net, CE, X, y, "sampled_fisher", 2 * F_hat, mc_samples=64)
    assert not r.passed


def test_compare_standalone_and_bad_input():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((4, 4))
    r = check.compare(3 * A, A, context={"C": 3})
    assert "C = 3" in r.diagnosis
    assert check.compare(A.T, A).diagnosis.startswith("the transpose")
    with pytest.raises(ValueError, match="missing"):
        check.compare({"a": A}, {"a": A, "b": A})
    with pytest.raises(ValueError, match="NaN"):
        check.compare(A * np.nan, A)
    with pytest.raises(TypeError, match="float64 or float32"):
        check.compare(A.astype(int), A)
    r = check.compare(np.ones(3), np.ones(4))
    assert not r.passed and "shape" in r.diagnosis


def test_assert_matches_raises_with_the_report(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    F = Fisher(model, theta, loss, X, y).dense()
    assert testing.assert_matches(net, CE, X, y, "fisher", F).passed
    with pytest.raises(AssertionError, match="factor N = 6"):
        testing.assert_matches(net, CE, X, y, "fisher", N * F)
    with pytest.raises(ValueError, match="unknown quantity"):
        check.validate(net, CE, X, y, "hessian", F)
    with pytest.raises(ValueError, match="damping="):
        check.validate(net, CE, X, y, "ngd_update", F[0])


def test_refngd_pair_instead_of_torch_model():
    model = nn.Sequential(nn.Linear(3, 2))
    theta = model.init(np.random.default_rng(0))
    X, y = np.random.default_rng(1).standard_normal((4, 3)), np.array([0, 1, 1, 0])
    F = Fisher(model, theta, losses.CrossEntropy(), X, y).dense()
    assert check.validate((model, theta), losses.CrossEntropy(), X, y, "fisher", F).passed


def test_block_diagonal_where_the_full_fisher_was_meant(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    F = Fisher(model, theta, loss, X, y).dense()
    blockdiag = np.zeros_like(F)
    for s in (slice(0, 54), slice(54, 57), slice(57, 201), slice(201, 204)):
        blockdiag[s, s] = F[s, s]
    d = check.validate(net, CE, X, y, "fisher", blockdiag).diagnosis
    assert "only block 'off-diagonal'" in d and "block-diagonal where the full matrix was meant" in d


def test_gamma_of_a_direction(cnn):
    """γ(d) for the K-FAC direction: the candidate computed with torch's Fisher quadratic form."""
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    from refngd import updates
    d = updates.kfac(model, theta, loss, X, y, 1e-2)
    F = Fisher(model, theta, loss, X, y)
    g = F.gradient()
    gam = float(np.sqrt(d @ F.dense() @ d) / abs(d @ g))
    assert check.validate(net, CE, X, y, "gamma", gam, v=d).passed
    r = check.validate(net, CE, X, y, "gamma", gam * np.sqrt(2), v=d)
    assert "√2" in r.diagnosis


def test_full_matrix_where_a_block_diagonal_was_meant(cnn):
    net, model, theta, X, y = cnn
    loss = interop.from_torch_loss(CE)
    d = check.validate(net, CE, X, y, "kfac", Fisher(model, theta, loss, X, y).dense()).diagnosis
    assert "the exact Fisher (no Kronecker factorisation)" in d
    K = KFAC(model, theta, loss, X, y).dense()
    K[0, 60] = K[60, 0] = 1.0                 # one cross-layer entry
    d = check.validate(net, CE, X, y, "kfac", K).diagnosis
    assert "only block 'off-diagonal'" in d and "reference is zero here" in d
