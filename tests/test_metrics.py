"""refngd.metrics: the γ indicator (Wu et al. 2024, eq. 15), cosine similarity, relative error."""
from __future__ import annotations

import math

import numpy as np
import pytest

import refngd
from refngd import metrics, nn, updates
from refngd.curvature import Fisher
from refngd.losses import CrossEntropy


def spd(P, seed=0):
    A = np.random.default_rng(seed).standard_normal((P, P))
    return A @ A.T + 0.1 * np.eye(P)


def test_gamma_definition_and_scale_invariance():
    rng = np.random.default_rng(1)
    F, g, d = spd(7), rng.standard_normal(7), rng.standard_normal(7)
    expected = math.sqrt(d @ F @ d) / abs(d @ g)
    assert math.isclose(metrics.gamma(d, F, g), expected, rel_tol=1e-13)
    for a in (1e-8, 0.3, 7.0, -2.0, -1e5):
        assert math.isclose(metrics.gamma(a * d, F, g), expected, rel_tol=1e-12)
    # invariant to the scale of F and g only jointly as √a/|b|: γ(d; aF, bg) = √a/|b| · γ
    assert math.isclose(metrics.gamma(d, 4.0 * F, -2.0 * g), expected, rel_tol=1e-12)


def test_gamma_of_natural_gradient():
    """γ(F⁻¹g) = 1/√(gᵀF⁻¹g) and nothing beats it (Cauchy–Schwarz in the F inner product)."""
    rng = np.random.default_rng(2)
    F, g = spd(6, seed=3), rng.standard_normal(6)
    nat = np.linalg.solve(F, g)
    best = metrics.gamma(nat, F, g)
    assert math.isclose(best, 1 / math.sqrt(g @ nat), rel_tol=1e-12)
    for _ in range(200):
        assert metrics.gamma(rng.standard_normal(6), F, g) >= best * (1 - 1e-12)
    assert math.isclose(metrics.gamma_ratio(g, F, g), 1.0, rel_tol=1e-14)
    assert metrics.gamma_ratio(nat, F, g) <= 1.0


def test_gamma_orthogonal_direction_is_inf():
    F, g = np.eye(3), np.array([1.0, 0.0, 0.0])
    assert metrics.gamma(np.array([0.0, 1.0, 0.0]), F, g) == math.inf


def test_gamma_accepts_operators_and_arrays():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    theta = model.init(rng)
    X, y = rng.standard_normal((5, 3)), rng.integers(0, 3, 5)
    loss = CrossEntropy()
    F = Fisher(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    d = updates.ef(model, theta, loss, X, y, 1e-3)
    a = metrics.gamma(d, F, g)
    assert math.isclose(a, metrics.gamma(d, F.dense(), g), rel_tol=1e-10)
    assert math.isclose(a, metrics.gamma(d, F.to_linear_operator(), g), rel_tol=1e-10)
    assert math.isclose(metrics.gamma_ratio(d, F, g),
                        a / metrics.gamma(g, F.dense(), g), rel_tol=1e-10)


def test_cosine_similarity():
    a = np.array([1.0, 2.0, -2.0])
    assert math.isclose(metrics.cosine_similarity(a, 3 * a), 1.0, rel_tol=1e-15)
    assert math.isclose(metrics.cosine_similarity(a, -0.5 * a), -1.0, rel_tol=1e-15)
    assert metrics.cosine_similarity(a, np.array([2.0, -1.0, 0.0])) == 0.0
    b = np.array([1.0, 0.0, 0.0])
    assert math.isclose(metrics.cosine_similarity(a, b), 1 / 3, rel_tol=1e-15)
    with pytest.raises(ValueError):
        metrics.cosine_similarity(a, np.zeros(3))
    with pytest.raises(ValueError):
        metrics.cosine_similarity(np.zeros(3), a)


def test_relative_error():
    ref = np.array([3.0, 4.0])
    assert metrics.relative_error(ref, ref) == 0.0
    assert math.isclose(metrics.relative_error(np.array([3.0, 5.0]), ref), 0.2, rel_tol=1e-15)
    assert math.isclose(metrics.relative_error(np.zeros(2), ref), 1.0, rel_tol=1e-15)
    # not symmetric: the reference sets the scale
    assert math.isclose(metrics.relative_error(ref, np.array([3.0, 5.0])), 1 / math.sqrt(34),
                        rel_tol=1e-15)
    with pytest.raises(ValueError):
        metrics.relative_error(ref, np.zeros(2))


def test_bad_inputs_raise_instead_of_returning_a_wrong_number():
    rng = np.random.default_rng(4)
    F, g, d = spd(5), rng.standard_normal(5), rng.standard_normal(5)
    # an indefinite matrix (e.g. a Hessian) has dᵀFd < 0: γ would have been clipped to 0
    H = np.diag([1.0, -1.0, 1.0, -1.0, 1.0])
    e = np.array([0.0, 1.0, 0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="positive semi-definite"):
        metrics.gamma(e, H, np.ones(5))
    assert metrics.gamma(d, F, g) > 0  # PSD: unchanged
    with pytest.raises(ValueError, match="NaN"):
        metrics.gamma(d * np.nan, F, g)
    with pytest.raises(ValueError, match="NaN"):
        metrics.gamma_ratio(d, F, g * np.nan)
    with pytest.raises(ValueError, match="same shape"):
        metrics.gamma(d, F, g[:4])
    with pytest.raises(ValueError, match="NaN"):
        metrics.cosine_similarity(d * np.nan, g)
    # (P, 1) against (P,) used to broadcast to a (P, P) difference and give a wrong number
    with pytest.raises(ValueError):
        metrics.relative_error(d[:, None], d)
    with pytest.raises(ValueError, match="same shape"):
        metrics.cosine_similarity(d, g[:4])
    # matrices are still compared in the Frobenius norm
    assert math.isclose(metrics.relative_error(2 * F, F), 1.0, rel_tol=1e-14)
