"""K-FAC for Conv2d: the exact cases of expand and reduce, and the factors against oracles.

Eschenhagen et al. (2023), "Kronecker-factored approximate curvature for modern neural
network architectures", treat a convolution as a Linear layer shared over the T output
locations and give each approximation a setting in which it is exact for deep linear
networks (derivation in docs/kfac.md):

* expand — every location has its own output and loss term (here: convolutions, then a
  1×1 convolution and Flatten into the MSE), so the rows of a location never mix with
  other locations: A = 1/(N·T) Σ ā_nt ā_ntᵀ, G = c Σ b_nkt b_nktᵀ is exact;
* reduce — the shared dimension is summed before the rest of the (linear) network (here:
  a convolution whose kernel covers the whole map with spatially constant weights, i.e. a
  sum pooling followed by a 1×1 map): b_nkt does not depend on t, and A over the location
  means with G over the location sums is exact.

The oracles: the exact Fisher (per-parameter blocks for ``separate``, per-layer blocks for
``joint``), PyTorch's ``unfold`` for the patches, and the output rows written out by hand.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import nn
from refngd.curvature import KFAC, EmpiricalFisher, Fisher, SampledFisher
from refngd.losses import CrossEntropy, MSELoss
from kfac_helpers import block_mask, conv_reference_factors, rel_err

EXACT = 1e-10


def expand_net(rng, stride):
    """Deep linear net in the expand setting: per-location outputs, MSE over all of them."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=stride, padding=1), nn.Conv2d(3, 3, 1, bias=False),
                          nn.Conv2d(3, 2, 1), nn.Flatten())
    return model, model.init(rng), rng.standard_normal((3, 2, 5, 5))


def reduce_net(rng):
    """Deep linear net in the reduce setting: a sum pooling (constant 4×4 kernel) before the Linear."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(3, 4, 1),
                          nn.Conv2d(4, 2, 4), nn.Flatten(), nn.Linear(2, 3))
    theta = model.init(rng)
    w = model.unflatten(theta)[2][0]
    w[...] = w[:, :, :1, :1]  # spatially constant kernel: sum over the 4×4 locations, then 1×1
    return model, theta, rng.standard_normal((5, 2, 4, 4))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_expand_exact_in_the_expand_setting(stride, bias, reduction):
    rng = np.random.default_rng(stride)
    model, theta, X = expand_net(rng, stride)
    loss = MSELoss(reduction)
    y = rng.standard_normal(model.forward(theta, X).shape)
    F = Fisher(model, theta, loss, X, y).dense() * block_mask(model, bias)
    assert rel_err(KFAC(model, theta, loss, X, y, bias=bias).dense(), F) <= EXACT
    assert rel_err(KFAC(model, theta, loss, X, y, bias=bias, kfac_approx="reduce").dense(), F) > 1e-2


@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduce_exact_in_the_reduce_setting(bias, reduction):
    rng = np.random.default_rng(7)
    model, theta, X = reduce_net(rng)
    loss = MSELoss(reduction)
    y = rng.standard_normal((X.shape[0], 3))
    F = Fisher(model, theta, loss, X, y).dense() * block_mask(model, bias)
    assert rel_err(KFAC(model, theta, loss, X, y, bias=bias, kfac_approx="reduce").dense(), F) <= EXACT
    assert rel_err(KFAC(model, theta, loss, X, y, bias=bias, kfac_approx="expand").dense(), F) > 1e-2


def cnn(rng, N=4):
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=1), nn.Tanh(),
                          nn.Flatten(), nn.Linear(3 * 3 * 3, 4))
    return model, model.init(rng), rng.standard_normal((N, 2, 5, 5))


@pytest.mark.parametrize("fisher_type", ["type-2", "mc", "empirical"])
def test_conv_factors_against_oracles(fisher_type):
    """A from torch's unfold; G_expand from rows written out by hand; G_reduce = the
    conv bias block of the exact curvature (the bias gradient of row r is Σ_t b_rt)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    model, theta, X = cnn(rng)
    y = rng.integers(0, 4, len(X))
    loss = CrossEntropy()
    kw = dict(mc_samples=2, rng=5) if fisher_type == "mc" else {}
    exact = {"type-2": Fisher, "mc": SampledFisher, "empirical": EmpiricalFisher}[fisher_type]
    Fex = exact(model, theta, loss, X, y, **kw).dense()
    (Wc, bc), (Wl, _) = [p for p in model.unflatten(theta) if p]
    patches = torch.nn.functional.unfold(torch.from_numpy(X), 3, padding=1, stride=2).numpy()  # (N, D, T)
    N, D, T = patches.shape
    # output rows at the conv output: b_nk = (W_linᵀ s_nk) ⊙ tanh'(h_n), per location
    h = np.einsum("od,ndt->not", Wc.reshape(3, D), patches) + bc[:, None]
    Z = model.forward(theta, X)
    S = {"type-2": lambda: loss.hessian_sqrt(Z).transpose(0, 2, 1),
         "mc": lambda: loss.sampled_output_gradients(Z, np.random.default_rng(5), 2) / np.sqrt(2),
         "empirical": lambda: loss.output_gradient(Z, y)[:, None, :]}[fisher_type]()
    Bh = (S @ Wl).reshape(N, -1, 3, T) * (1 - np.tanh(h) ** 2)[:, None]  # (N, K, C_out, T)
    c = loss.scale(Z)
    for approx in ("expand", "reduce"):
        for bias in ("separate", "joint"):
            f = KFAC(model, theta, loss, X, y, fisher_type=fisher_type, kfac_approx=approx,
                     bias=bias, **kw).factors()[0]
            A, G = conv_reference_factors(patches.transpose(0, 2, 1), Bh, c, approx, bias)
            if approx == "reduce":
                s = f.stop - 3
                assert rel_err(f.G, Fex[s:f.stop, s:f.stop]) <= EXACT
            assert rel_err(f.A, A) <= EXACT and rel_err(f.G, G) <= EXACT
            assert f.approx == approx and f.A.shape == (D + (bias == "joint"),) * 2


def test_conv_operations_match_dense():
    rng = np.random.default_rng(4)
    model, theta, X = cnn(rng, N=2)
    y = rng.integers(0, 4, 2)
    v = rng.standard_normal(model.num_params)
    for approx in ("expand", "reduce"):  # reduce: 2 rows < D = 18 gives thin bases
        for bias in ("separate", "joint"):
            K = KFAC(model, theta, CrossEntropy(), X, y, kfac_approx=approx, bias=bias)
            D = K.dense()
            assert rel_err(K @ v, D @ v) <= EXACT
            assert rel_err(K.solve(v, 0.1), np.linalg.solve(D + 0.1 * np.eye(len(D)), v)) <= EXACT
            ld = np.linalg.slogdet(D + 0.1 * np.eye(len(D)))[1]
            assert abs(K.logdet(0.1) - ld) <= EXACT * abs(ld)
            assert abs(K.trace() - np.trace(D)) <= EXACT * np.trace(D)
