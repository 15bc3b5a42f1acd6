"""Issue 9: every class of bad or extreme input gets a clear error or the right number.

One test (or one parametrised family) per class of problem, each fixed at its root:

* a reused ``linearization=`` for another θ / X / model   (refngd.nn.protocols, refngd.losses.check_loss)
* a FunctionModel written with plain numpy                (refngd.autodiff)
* loss class / string / plain function as arguments       (refngd.nn.protocols, refngd.losses.check_loss)
* masked arrays, ``np.matrix``, ``F @ list``              (refngd.backend, CurvatureOperator)
* metrics at extreme scales, zero g, a vanishing Fisher   (refngd.metrics, scaled form)
* overflowing losses                                      (refngd.losses)
* optimizers at eps = 0 / damping = 0                      (refngd.optim)
* train's data and checkpoints                            (refngd.optim.train)
* data files and standardisation                          (refngd.experiments.data)
* one default form for EF / iEF everywhere
"""
from __future__ import annotations

import inspect
import warnings

import autograd.numpy as anp
import numpy as np
import pytest

import refngd
from refngd import FunctionModel, losses, metrics, nn, optim, updates
from refngd.backend import SingularSystemError, check_float_array
from refngd.curvature import EKFAC, KFAC, EmpiricalFisher, Fisher, ImprovedEmpiricalFisher, SampledFisher
from refngd.experiments.data import DataError, load_npz, split_and_standardize


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    theta = model.init(rng)
    X = rng.standard_normal((6, 5))
    y = rng.integers(0, 3, 6)
    return model, theta, losses.CrossEntropy(), X, y


# ----------------------------------------------------------------- reused linearisation
CURVATURES = [Fisher, EmpiricalFisher, ImprovedEmpiricalFisher,
              lambda *a, **k: SampledFisher(*a, rng=0, **k), KFAC, EKFAC]
UPDATES = [lambda *a, **k: updates.ngd(*a, 1e-3, **k), lambda *a, **k: updates.ef(*a, 1e-3, **k),
           lambda *a, **k: updates.ief(*a, 1e-3, **k), lambda *a, **k: updates.kfac(*a, 1e-3, **k),
           lambda *a, **k: updates.ekfac(*a, 1e-3, **k), lambda *a, **k: updates.sgd(*a, **k),
           lambda *a, **k: updates.sf(*a, 1e-3, rng=0, **k)]


@pytest.mark.parametrize("build", CURVATURES + UPDATES)
def test_linearization_for_another_point_is_refused(problem, build):
    model, theta, loss, X, y = problem
    for lin, what in ((model.linearize(theta, X + 1.0), "another X"),
                      (model.linearize(theta * 1.01, X), "another theta"),
                      (nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).linearize(theta, X),
                       "another model")):
        with pytest.raises(ValueError, match=f"built for {what}"):
            build(model, theta, loss, X, y, linearization=lin)


def test_linearization_for_the_same_point_is_accepted(problem):
    # the check compares values, not identity: an equal copy of θ and X is the same point
    model, theta, loss, X, y = problem
    lin = model.linearize(theta, X)
    d = updates.ngd(model, theta.copy(), loss, X.copy(), y, 1e-3, linearization=lin)
    np.testing.assert_allclose(d, updates.ngd(model, theta, loss, X, y, 1e-3), rtol=1e-13, atol=0)


def test_function_model_linearization_is_checked(problem):
    _, _, loss, X, y = problem
    W0 = np.random.default_rng(1).standard_normal(15)
    fm = FunctionModel(lambda t, x: anp.dot(x, anp.reshape(t, (5, 3))), W0)
    with pytest.raises(ValueError, match="built for another theta"):
        Fisher(fm, W0 + 1.0, loss, X, y, linearization=fm.linearize(W0, X))


# ------------------------------------------------------------- FunctionModel with numpy
def test_function_model_with_plain_numpy_is_an_error(problem):
    _, _, loss, X, y = problem
    theta = np.random.default_rng(1).standard_normal(15)
    fm = FunctionModel(lambda t, x: np.dot(x, t.reshape(5, 3)), theta)  # plain numpy: untraceable
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no stray warning either
        with pytest.raises(TypeError, match="autograd.numpy"):
            refngd.gradient(fm, theta, loss, X, y)
    good = FunctionModel(lambda t, x: anp.dot(x, anp.reshape(t, (5, 3))), theta)
    g = refngd.gradient(good, theta, loss, X, y)
    # independent route: Z = X W, ∂L/∂W = Xᵀ E with E = (softmax − onehot)/N
    Z = X @ theta.reshape(5, 3)
    P = np.exp(Z - Z.max(1, keepdims=True))
    P /= P.sum(1, keepdims=True)
    E = (P - np.eye(3)[y]) / len(y)
    np.testing.assert_allclose(g, (X.T @ E).reshape(-1), rtol=1e-12, atol=1e-15)


# ------------------------------------------------------------- wrong argument kinds
@pytest.mark.parametrize("entry", [Fisher, KFAC, lambda *a: updates.ngd(*a, 1e-3),
                                   lambda *a: updates.ief(*a, 1e-3), lambda *a: updates.ef(*a, 1e-3)])
def test_wrong_kinds_of_arguments(problem, entry):
    model, theta, loss, X, y = problem
    with pytest.raises(TypeError, match=r"pass a loss instance, e.g. CrossEntropy\(\)"):
        entry(model, theta, losses.CrossEntropy, X, y)
    with pytest.raises(TypeError, match="loss must be a refngd.losses loss"):
        entry(model, theta, "cross_entropy", X, y)
    with pytest.raises(TypeError, match=r"wrap it: refngd.FunctionModel\(f, theta\)"):
        entry(lambda t, x: x, theta, loss, X, y)


def test_ekfac_of_something_else(problem):
    model, theta, loss, X, y = problem
    F = Fisher(model, theta, loss, X, y)
    with pytest.raises(TypeError, match="kfac must be a refngd.curvature.KFAC"):
        EKFAC(model, theta, loss, X, y, kfac=F)


# ------------------------------------------------------------- array look-alikes
@pytest.mark.filterwarnings("ignore::PendingDeprecationWarning")  # np.matrix itself warns
def test_masked_arrays_and_matrices_are_refused(problem):
    model, theta, loss, X, y = problem
    with pytest.raises(TypeError, match="masked array"):
        Fisher(model, theta, loss, np.ma.masked_array(X, mask=X > 1), y)
    with pytest.raises(TypeError, match="numpy.matrix"):
        Fisher(model, theta, loss, np.matrix(X), y)
    with pytest.raises(TypeError, match="numpy.matrix"):
        refngd.gradient(model, np.matrix(theta), loss, X, y)
    with pytest.raises(TypeError, match="must be an array, got list"):
        check_float_array("v", [1.0, 2.0])


def test_matmul_with_a_list(problem):
    model, theta, loss, X, y = problem
    F = Fisher(model, theta, loss, X, y)
    with pytest.raises(TypeError, match=r"F @ v needs a NumPy or CuPy array.*got list"):
        F @ [1.0] * model.num_params


def test_overflowing_damping_is_not_called_singular(problem):
    model, theta, loss, X, y = problem
    F = Fisher(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    with pytest.raises(ValueError, match="damping overflows") as exc:
        F.solve(g, 1e308)
    assert not isinstance(exc.value, SingularSystemError)


# ------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("scale", [1e-200, 1e-100, 1.0, 1e100, 1e200])
def test_metrics_are_scale_invariant_at_extreme_scales(problem, scale):
    model, theta, loss, X, y = problem
    F = Fisher(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    d = updates.ef(model, theta, loss, X, y, 1e-3)
    Fd = F.dense()
    # γ is invariant to d's scale and proportional to 1/|g|'s scale (exactly, by definition)
    ref = metrics.gamma(d, Fd, g)
    assert metrics.gamma(scale * d, F, g) == pytest.approx(ref, rel=1e-12)
    assert metrics.gamma(scale * d, Fd, g) == pytest.approx(ref, rel=1e-12)
    assert metrics.gamma(d, F, scale * g) == pytest.approx(ref / scale, rel=1e-12)
    assert metrics.gamma_ratio(scale * d, F, scale * g) == pytest.approx(metrics.gamma_ratio(d, F, g), rel=1e-12)
    cos = float(d @ g / (np.linalg.norm(d) * np.linalg.norm(g)))
    assert metrics.cosine_similarity(scale * d, g) == pytest.approx(cos, rel=1e-12)
    assert metrics.cosine_similarity(scale * d, scale * g) == pytest.approx(cos, rel=1e-12)
    rel = float(np.linalg.norm(d - g) / np.linalg.norm(g))
    assert metrics.relative_error(scale * d, scale * g) == pytest.approx(rel, rel=1e-12)


def test_metric_arguments_that_make_no_sense(problem):
    model, theta, loss, X, y = problem
    F = Fisher(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    with pytest.raises(ValueError, match="g is zero"):
        metrics.gamma_ratio(g, F, 0 * g)
    with pytest.raises(ValueError, match=r"fisher has shape \(3, 3\) but d and g have P = "):
        metrics.gamma(g, np.eye(3), g)
    with pytest.raises(TypeError, match="fisher must be a refngd curvature"):
        metrics.gamma(g, None, g)
    assert metrics.gamma(0 * g, F, g) == np.inf  # no descent at all


def test_gamma_ratio_with_a_vanishing_fisher():
    # saturated logits: p = one-hot to double precision, H_n = diag(p) − ppᵀ underflows to 0
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 2))
    theta = np.array([800.0, 0, 0, -800, 0, 0, 0, 0])
    X = np.abs(rng.standard_normal((4, 3))) + 1.0
    y = np.array([1, 1, 1, 1])  # wrong labels: gradient ≠ 0 but F = 0
    F = Fisher(model, theta, losses.CrossEntropy(), X, y)
    g = refngd.gradient(model, theta, losses.CrossEntropy(), X, y)
    assert np.linalg.norm(g) > 0 and F.quadratic_form(g) == 0
    with pytest.raises(ValueError, match="Fisher vanishes along the gradient"):
        metrics.gamma_ratio(g, F, g)


# ------------------------------------------------------------------------ losses
@pytest.mark.parametrize("loss, Z, y", [
    (losses.CrossEntropy(), np.array([[1e308, -1e308, 0.0]]), np.array([1])),
    (losses.MSELoss(), np.array([[1e200, 0.0]]), np.array([[0.0, 0.0]])),
    (losses.MSELoss(), np.array([[1e308, 0.0]]), np.array([[-1e308, 0.0]])),
])
def test_overflowing_losses_say_so(loss, Z, y):
    with np.errstate(over="ignore"), pytest.raises(ValueError, match="overflow float64"):
        loss(Z, y)


def test_large_but_representable_losses_are_exact():
    # logits ±1e300: l = 2e300 is representable and computed exactly (stable log-softmax)
    Z = np.array([[1e300, -1e300]])
    assert float(losses.CrossEntropy()(Z, np.array([1]))) == 2e300
    assert float(losses.CrossEntropy()(Z, np.array([0]))) == 0.0
    assert float(losses.MSELoss(reduction="sum")(np.array([[1e150]]), np.array([[0.0]]))) == pytest.approx(1e300, rel=1e-15)


# ------------------------------------------------------------------------ optimizers
@pytest.mark.parametrize("opt", [optim.Adam(0.1, eps=0.0), optim.AdamW(0.1, eps=0.0, weight_decay=0.0),
                                 optim.Adafactor(0.1, eps1=0.0), optim.Adafactor(0.1, eps1=0.0, beta1=0.9)])
def test_zero_eps_with_an_exactly_zero_gradient_coordinate(opt):
    # ReLU network whose first hidden unit is dead: its weights get exactly 0 gradient
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    theta = model.init(rng)
    theta[0:3], theta[12] = 0.0, -1.0  # unit 0: w = 0, b = −1 → always inactive
    X, y = rng.standard_normal((8, 3)), rng.integers(0, 2, 8)
    g = refngd.gradient(model, theta, losses.CrossEntropy(), X, y)
    zero = g == 0
    assert zero[[0, 1, 2, 12]].all() and (~zero).sum() > 10
    state = opt.init(theta)
    th = theta
    for _ in range(3):
        th, state, _ = opt.step(th, state, model, losses.CrossEntropy(), X, y)
    assert np.all(np.isfinite(th))
    np.testing.assert_array_equal(th[zero], theta[zero])  # no step there (was NaN)
    assert np.all(th[~zero] != theta[~zero])


def test_adam_at_zero_eps_matches_the_formula():
    # one step: d = m̂/√v̂ = g/|g| = sign(g) where g ≠ 0 (bias corrections cancel)
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 2))
    theta, X, y = model.init(rng), rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    g = refngd.gradient(model, theta, losses.CrossEntropy(), X, y)
    new, _, _ = optim.Adam(0.1, eps=0.0).step(theta, optim.Adam(0.1, eps=0.0).init(theta), model,
                                             losses.CrossEntropy(), X, y)
    np.testing.assert_allclose(new, theta - 0.1 * np.sign(g), rtol=0, atol=1e-15)


def test_adafisher_refuses_zero_damping():
    with pytest.raises(ValueError, match="damping must be > 0"):
        optim.AdaFisher(damping=0.0, gammas=(0.0, 1.0))


# ------------------------------------------------------------------------ train
def test_train_checks_its_inputs_first(problem):
    model, theta, loss, X, y = problem
    sgd = optim.SGD(0.1)
    Xn = X.copy()
    Xn[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"X contains NaN or Inf in 1 row\(s\) \(2\)"):
        refngd.train(model, theta, loss, Xn, y, sgd)
    with pytest.raises(ValueError, match="X_test contains NaN"):
        refngd.train(model, theta, loss, X, y, sgd, X_test=Xn, y_test=y)
    with pytest.raises(ValueError, match="X is empty"):
        refngd.train(model, theta, loss, X[:0], y[:0], sgd)
    for bad in ([2.5], ["a"], [-1], [True]):
        with pytest.raises(ValueError, match="checkpoints must be whole step numbers"):
            refngd.train(model, theta, loss, X, y, sgd, checkpoints=bad)
    res = refngd.train(model, theta, loss, X, y, sgd, epochs=3, batch_size=6, checkpoints=[0, 2.0, np.int64(3)])
    assert sorted(res.checkpoints) == [0, 2, 3]


# ------------------------------------------------------------------------ data
def test_data_files_that_cannot_be_used(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip archive" * 10)
    with pytest.raises(DataError, match="is not a NumPy .npz archive") as exc:
        load_npz(str(bad))
    assert "pickle" not in str(exc.value)  # never suggest unsafe loading
    pick = tmp_path / "pickled.npz"
    np.savez(pick, X=np.array([{"a": 1}] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(DataError, match="holds pickled Python objects; refngd never unpickles"):
        load_npz(str(pick))


@pytest.mark.parametrize("scale", [1e-200, 1e200, 1e307])
def test_standardisation_at_any_scale(scale):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 3)), rng.integers(0, 2, 40)
    ref = split_and_standardize("a", X, y)
    scaled = split_and_standardize("a", X * scale, y)
    np.testing.assert_allclose(scaled.X_train, ref.X_train, rtol=0, atol=1e-13)
    np.testing.assert_allclose(scaled.X_test, ref.X_test, rtol=0, atol=1e-13)
    # the definition, on unscaled data: zero mean and unit (population) std on the training set
    np.testing.assert_allclose(ref.X_train.mean(0), 0, atol=1e-14)
    np.testing.assert_allclose(ref.X_train.std(0), 1, rtol=1e-14)


# ------------------------------------------------------------------------ defaults agree
def test_ef_ief_default_form_is_the_papers_everywhere(problem):
    from refngd.experiments.compare import METHODS

    for fn, cls in ((updates.ef, optim.EF), (updates.ief, optim.IEF)):
        assert inspect.signature(fn).parameters["form"].default == "gram"
        assert inspect.signature(cls).parameters["form"].default == "gram"
    assert METHODS["ef"].make(0.1).form == "gram" and METHODS["ief"].make(0.1).form == "gram"
    model, theta, loss, X, y = problem
    for fn in (updates.ef, updates.ief):
        np.testing.assert_array_equal(fn(model, theta, loss, X, y, 1e-3),
                                      fn(model, theta, loss, X, y, 1e-3, form="gram"))


def test_embedding_indices_out_of_range_are_refused():
    """Token indices outside [0, V) get a clear error (queued like the label checks on a
    GPU, where an out-of-range index would only wrap: tests/test_host_reads.py reruns this)."""
    model = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    theta = model.init(np.random.default_rng(0))
    for bad in ([[0, 5]], [[-1, 2]]):
        with pytest.raises(ValueError, match=r"indices in X must lie in \[0, 5\)"):
            refngd.gradient(model, theta, losses.CrossEntropy(), np.array(bad * 2), np.array([0, 1]))
