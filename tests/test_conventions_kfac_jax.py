"""The kfac-jax preset, tested against kfac-jax itself (float64).

kfac-jax 0.0.8 imports only with a JAX stack that tensorflow-probability's JAX substrate
supports (jax 0.4.38 with tensorflow-probability 0.25); CI's optional JAX stage installs
that pinned stack in an environment of its own (.ci/run).  Everywhere else these tests
skip.  kfac-jax's dense curvature (``BlockDiagonalCurvature.to_dense_matrix``) orders
each dense layer's block as its parameter leaves are flattened — bias, then the (in, out)
kernel row-major — so refngd's matrix is permuted into that order.
"""
from __future__ import annotations

import numpy as np
import pytest

kfac_jax = pytest.importorskip("kfac_jax")
jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)
jnp = jax.numpy

from refngd import losses, nn  # noqa: E402
from refngd.curvature import KFAC  # noqa: E402

N, D, H, C = 5, 3, 4, 3


def problem(lname, seed=0):
    rng = np.random.default_rng(seed)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
    theta = model.init(rng)
    X = rng.standard_normal((N, D))
    y = rng.integers(0, C, N) if lname == "ce" else rng.standard_normal((N, C))
    (W1, b1), _, (W2, b2) = model.unflatten(theta)
    params = {"l1": {"w": jnp.asarray(W1.T), "b": jnp.asarray(b1)},
              "l2": {"w": jnp.asarray(W2.T), "b": jnp.asarray(b2)}}

    def func(p, batch):
        x, t = batch
        h = jnp.tanh(x @ p["l1"]["w"] + p["l1"]["b"])
        z = h @ p["l2"]["w"] + p["l2"]["b"]
        if lname == "ce":
            kfac_jax.register_softmax_cross_entropy_loss(z, t)
            return -jnp.mean(jax.nn.log_softmax(z)[jnp.arange(z.shape[0]), t])
        kfac_jax.register_squared_error_loss(z, t)
        return jnp.sum((z - t) ** 2) / z.shape[0]

    return model, theta, X, y, params, func


def jax_order(model) -> list[int]:
    """θ positions in kfac-jax's order: per dense layer its bias, then the (in, out) kernel."""
    out = []
    for i, (d_in, d_out) in ((0, (D, H)), (2, (H, C))):
        start = model.slices[i][0]
        out += [start + d_out * d_in + o for o in range(d_out)]
        out += [start + o * d_in + k for k in range(d_in) for o in range(d_out)]
    return out


def kfac_jax_dense(func, params, X, y, mode):
    est = kfac_jax.BlockDiagonalCurvature(func)
    batch = (jnp.asarray(X), jnp.asarray(y))
    key = jax.random.PRNGKey(0)
    state = est.init(key, (params, batch), None, None)
    state = est.update_curvature_matrix_estimate(state, 0.0, 1.0, 0.0, N, key, (params, batch),
                                                 estimation_mode=mode)
    return np.asarray(est.to_dense_matrix(state))


@pytest.mark.parametrize("lname", ["ce", "mse"])
@pytest.mark.parametrize("red", ["mean", "sum"])
@pytest.mark.parametrize("mode, fisher_type", [("fisher_exact", "type-2"),
                                               ("fisher_empirical", "empirical")])
def test_kfac_jax_dense_layers(lname, red, mode, fisher_type):
    model, theta, X, y, params, func = problem(lname)
    loss = losses.CrossEntropy(red) if lname == "ce" else losses.MSELoss(red)
    theirs = kfac_jax_dense(func, params, X, y, mode)
    order = jax_order(model)
    ours = KFAC(model, theta, loss, X, y, fisher_type=fisher_type, bias="joint",
                convention="kfac-jax").dense()[np.ix_(order, order)]
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-14 * np.abs(theirs).max())
    if fisher_type == "empirical":  # the library's own rows c·e_n: 1/N of refngd's
        own = KFAC(model, theta, loss, X, y, fisher_type=fisher_type, bias="joint",
                   convention="kfac-jax")
        assert own.c == pytest.approx(1.0 / N ** 2)
