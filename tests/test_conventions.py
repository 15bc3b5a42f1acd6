"""refngd.conventions without the libraries: the scalings α, the plumbing, the errors.

The α of each preset is checked against its closed form (docs: refngd.conventions), and
``convention=`` must act on every quantity carrying c alike (dense, matvec, solve, the
gradient) and never change refngd's default.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import conventions, losses, nn, updates
from refngd.curvature import EKFAC, KFAC, EmpiricalFisher, Fisher

N, C = 5, 3


@pytest.fixture(scope="module")
def setup():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, C))
    theta = model.init(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    X = rng.standard_normal((N, 4))
    return model, theta, X, rng.integers(0, C, N), rng.standard_normal((N, C))


@pytest.mark.parametrize("name,loss,empirical,alpha", [
    ("refngd", losses.MSELoss("mean"), False, 1.0),
    ("curvlinops", losses.CrossEntropy("sum"), False, 1.0),
    ("nngeometry", losses.MSELoss("mean"), False, C / 2),          # (1/N)·½ / (1/(N·C))
    ("nngeometry", losses.MSELoss("sum"), False, 1 / (2 * N)),
    ("nngeometry", losses.CrossEntropy("sum"), False, 1 / N),
    ("asdl", losses.MSELoss("mean"), True, C),                     # EF: no ½
    ("laplace", losses.CrossEntropy("mean"), False, N),
    ("laplace", losses.MSELoss("sum"), True, 0.5),                 # ½ on the EF too
    ("kfac-jax", losses.MSELoss("mean"), False, C),                # batch mean of Σ_c
])
def test_alpha_closed_forms(name, loss, empirical, alpha):
    Z = np.zeros((N, C))
    assert conventions.get(name).alpha(loss, Z, empirical) == pytest.approx(alpha, rel=1e-15)


def test_convention_scales_everything_that_carries_c(setup):
    model, theta, X, _, Y = setup
    loss = losses.MSELoss()
    ref, nng = Fisher(model, theta, loss, X, Y), Fisher(model, theta, loss, X, Y, convention="nngeometry")
    a = C / 2
    v = np.random.default_rng(2).standard_normal(theta.size)
    np.testing.assert_allclose(nng.dense(), a * ref.dense(), rtol=1e-13)
    np.testing.assert_allclose(nng @ v, a * (ref @ v), rtol=1e-13)
    np.testing.assert_allclose(nng.solve(v, 0.1), ref.solve(v / a, 0.1 / a), rtol=1e-10)
    ef = EmpiricalFisher(model, theta, loss, X, Y, convention="nngeometry")
    np.testing.assert_allclose(ef.dense(), C * EmpiricalFisher(model, theta, loss, X, Y).dense(), rtol=1e-13)
    np.testing.assert_allclose(ef.gradient(), C * ref.gradient(), rtol=1e-13)
    np.testing.assert_allclose(nng.gradient(), a * ref.gradient(), rtol=1e-13)  # ½-MSE objective
    joint = Fisher(model, theta, loss, X, Y, convention="nngeometry")
    np.testing.assert_allclose(joint.natural_gradient(0.1), nng.solve(nng.gradient(), 0.1), rtol=1e-9)
    k = KFAC(model, theta, loss, X, Y, convention="nngeometry")
    np.testing.assert_allclose(k.dense(), a * KFAC(model, theta, loss, X, Y).dense(), rtol=1e-13)


def test_backpack_equals_refngd_on_linear_layers_and_updates_accept_conventions(setup):
    model, theta, X, y, _ = setup
    loss = losses.CrossEntropy()
    np.testing.assert_array_equal(KFAC(model, theta, loss, X, y, convention="backpack").dense(),
                                  KFAC(model, theta, loss, X, y).dense())
    d = updates.kfac(model, theta, loss, X, y, 1e-2, convention="curvlinops")
    np.testing.assert_allclose(d, updates.kfac(model, theta, loss, X, y, 1e-2), rtol=1e-13)
    d = updates.ngd(model, theta, loss, X, y, 1e-2, convention="laplace")   # α = N on F and g
    np.testing.assert_allclose(d, updates.ngd(model, theta, loss, X, y, 1e-2 / N), rtol=1e-9)
    for upd in (updates.ef, updates.ief):
        np.testing.assert_allclose(upd(model, theta, loss, X, y, 1e-2, form="tikhonov", convention="laplace"),
                                   upd(model, theta, loss, X, y, 1e-2 / N, form="tikhonov"), rtol=1e-9)
        # the paper's Gram form has no c, so no convention changes it
        np.testing.assert_allclose(upd(model, theta, loss, X, y, 1e-2, form="gram", convention="laplace"),
                                   upd(model, theta, loss, X, y, 1e-2, form="gram"), rtol=1e-12)
    np.testing.assert_allclose(updates.sf(model, theta, loss, X, y, 1e-2, rng=3, convention="laplace"),
                               updates.sf(model, theta, loss, X, y, 1e-2 / N, rng=3), rtol=1e-9)
    e = updates.ekfac(model, theta, loss, X, y, 1e-2, convention="laplace")
    np.testing.assert_allclose(e, updates.ekfac(model, theta, loss, X, y, 1e-2 / N), rtol=1e-9)


def test_errors(setup):
    model, theta, X, y, _ = setup
    loss = losses.CrossEntropy()
    with pytest.raises(ValueError, match="unknown convention 'torch'"):
        Fisher(model, theta, loss, X, y, convention="torch")
    with pytest.raises(ValueError, match="pass y"):
        KFAC(model, theta, loss, X, convention="tutorial")
    k = KFAC(model, theta, loss, X, y)
    EKFAC(model, theta, loss, X, y, kfac=k, convention="refngd")       # consistent: fine
    with pytest.raises(ValueError, match="convention='backpack'"):
        EKFAC(model, theta, loss, X, y, kfac=k, convention="backpack")
    assert conventions.get(conventions.PRESETS["asdl"]) is conventions.PRESETS["asdl"]
    assert set(conventions.names()) >= {"refngd", "curvlinops", "backpack", "nngeometry", "asdl",
                                         "kfac-jax", "laplace", "tutorial"}
