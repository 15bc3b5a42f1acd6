"""K-FAC for Conv1d and grouped / depthwise convolutions (docs/kfac.md, "Grouped convolution").

* Conv1d is a Conv2d with a 1 × k kernel: expand is exact in the expand setting (every
  location its own output, deep linear, MSE), reduce in the reduce setting (a sum over
  the locations before the rest of a linear network) — as tests/test_kfac_conv.py.
* A grouped convolution's weight is g disjoint blocks; K-FAC has one Kronecker block per
  group (per group its weight and bias, ``separate``, or both, ``joint``).  The exact
  cases hold per group: K-FAC equals the exact Fisher on those blocks.  Its factors
  against PyTorch's ``unfold`` of the group's input channels and rows written out by
  hand; EKFAC's diagonal against diag(Qᵀ F Q) of the exact Fisher's group block; the
  Kronecker diagonal against K-FAC's.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import nn
from refngd.curvature import EKFAC, KFAC, Fisher, KroneckerDiagonal
from refngd.losses import CrossEntropy, MSELoss
from kfac_helpers import conv_reference_factors, rel_err

EXACT = 1e-10


def group_mask(model, bias):
    """K-FAC's blocks: per group its weight rows and its bias entries (one block, joint)."""
    M = np.zeros((model.num_params,) * 2, dtype=bool)
    for layer, (s, _) in zip(model.layers, model.slices):
        if not layer.param_shapes:
            continue
        g, Co = getattr(layer, "groups", 1), layer.param_shapes[0][0]
        per = int(np.prod(layer.param_shapes[0])) // g
        for j in range(g):
            w = np.arange(s + j * per, s + (j + 1) * per)
            b0 = s + g * per + j * Co // g
            b = np.arange(b0, b0 + Co // g) if len(layer.param_shapes) > 1 else np.arange(0)
            if bias == "joint":
                idx = np.concatenate([w, b])
                M[np.ix_(idx, idx)] = True
            else:
                M[np.ix_(w, w)] = True
                M[np.ix_(b, b)] = True
    return M


def expand_net(rng, one_d, groups):
    if one_d:
        layers = [nn.Conv1d(2, 4, 3, padding=1, groups=groups[0]), nn.Conv1d(4, 4, 1, groups=groups[1]),
                  nn.Conv1d(4, 2, 1), nn.Flatten()]
        X = rng.standard_normal((3, 2, 6))
    else:
        layers = [nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=groups[0]),
                  nn.Conv2d(4, 4, 1, groups=groups[1], bias=False), nn.Conv2d(4, 2, 1), nn.Flatten()]
        X = rng.standard_normal((3, 2, 5, 5))
    model = nn.Sequential(*layers)
    return model, model.init(rng), X


def reduce_net(rng, one_d, groups):
    """A sum over the locations (a spatially constant kernel covering the map), then linear."""
    if one_d:
        model = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, groups=groups), nn.Conv1d(4, 2, 5),
                              nn.Flatten(), nn.Linear(2, 3))
        X = rng.standard_normal((5, 2, 5))
    else:
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=groups), nn.Conv2d(4, 2, 4),
                              nn.Flatten(), nn.Linear(2, 3))
        X = rng.standard_normal((5, 2, 4, 4))
    theta = model.init(rng)
    w = model.unflatten(theta)[1][0]
    w[...] = w[..., :1] if one_d else w[:, :, :1, :1]
    return model, theta, X


@pytest.mark.parametrize("one_d", [True, False])
@pytest.mark.parametrize("groups", [(1, 1), (2, 4)])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_expand_exact_in_the_expand_setting(one_d, groups, bias):
    rng = np.random.default_rng(1)
    model, theta, X = expand_net(rng, one_d, groups)
    loss = MSELoss()
    y = rng.standard_normal(model.forward(theta, X).shape)
    F = Fisher(model, theta, loss, X, y).dense() * group_mask(model, bias)
    assert rel_err(KFAC(model, theta, loss, X, y, bias=bias).dense(), F) <= EXACT
    assert rel_err(KFAC(model, theta, loss, X, y, bias=bias, kfac_approx="reduce").dense(), F) > 1e-2


@pytest.mark.parametrize("one_d", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduce_exact_in_the_reduce_setting(one_d, groups, reduction):
    rng = np.random.default_rng(7)
    model, theta, X = reduce_net(rng, one_d, groups)
    loss = MSELoss(reduction)
    y = rng.standard_normal((X.shape[0], 3))
    for bias in ("separate", "joint"):
        F = Fisher(model, theta, loss, X, y).dense() * group_mask(model, bias)
        K = KFAC(model, theta, loss, X, y, bias=bias, kfac_approx="reduce")
        assert rel_err(K.dense(), F) <= EXACT
        assert rel_err(KFAC(model, theta, loss, X, y, bias=bias).dense(), F) > 1e-2


def grouped_cnn(rng, N=4):
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(6 * 3 * 3, 4))
    return model, model.init(rng), rng.standard_normal((N, 4, 5, 5))


def test_group_factors_against_unfold_and_hand_written_rows():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    model, theta, X = grouped_cnn(rng)
    y = rng.integers(0, 4, len(X))
    loss = CrossEntropy()
    Fex = Fisher(model, theta, loss, X, y).dense()
    (Wc, bc), (Wl, _) = [p for p in model.unflatten(theta) if p]
    Xt, Z = torch.from_numpy(X), model.forward(theta, X)
    h = torch.nn.functional.conv2d(Xt, torch.from_numpy(Wc), torch.from_numpy(bc), stride=2,
                                   padding=1, groups=2).numpy().reshape(len(X), 6, -1)
    S = loss.hessian_factor(Z, y).transpose(0, 2, 1)
    N, T, c = len(X), h.shape[2], loss.scale(Z)
    Bh = (S @ Wl).reshape(N, -1, 6, T) * (1 - np.tanh(h) ** 2)[:, None]   # (N, K, C_out, T)
    for approx in ("expand", "reduce"):
        for bias in ("separate", "joint"):
            fs = KFAC(model, theta, loss, X, y, kfac_approx=approx, bias=bias).factors()
            assert len(fs) == 3 and [f.start for f in fs] == [0, 54, 114]
            for j, f in enumerate(fs[:2]):
                a = torch.nn.functional.unfold(Xt[:, 2 * j:2 * j + 2], 3, padding=1,
                                               stride=2).numpy().transpose(0, 2, 1)
                A, G = conv_reference_factors(a, Bh[:, :, 3 * j:3 * j + 3], c, approx, bias)
                if approx == "reduce":
                    s = 108 + 3 * j                               # the group's bias entries
                    assert rel_err(f.G, Fex[s:s + 3, s:s + 3]) <= EXACT
                assert rel_err(f.A, A) <= EXACT and rel_err(f.G, G) <= EXACT


def test_grouped_operations_ekfac_and_diagonal():
    rng = np.random.default_rng(4)
    model, theta, X = grouped_cnn(rng, N=3)
    y = rng.integers(0, 4, 3)
    loss = CrossEntropy()
    v = rng.standard_normal(model.num_params)
    F = Fisher(model, theta, loss, X, y).dense()
    for approx in ("expand", "reduce"):
        K = KFAC(model, theta, loss, X, y, kfac_approx=approx)
        D = K.dense()
        assert not D[np.logical_not(group_mask(model, "separate"))].any()
        assert rel_err(K @ v, D @ v) <= EXACT
        assert rel_err(K.solve(v, 0.1), np.linalg.solve(D + 0.1 * np.eye(len(D)), v)) <= EXACT
        assert abs(K.trace() - np.trace(D)) <= EXACT * np.trace(D)
        kd = KroneckerDiagonal(model, theta, loss, X, y, kfac_approx=approx)
        assert rel_err(kd.diagonal(), np.diag(D)) <= EXACT
        ek = EKFAC(model, theta, loss, X, y, kfac_approx=approx)
        # s = diag(Qᵀ F Q) on the group's block, where every eigenvalue is simple (expand:
        # 27 patch rows for D = 18; reduce's A has rank N = 3, its diagonal is averaged over
        # the null space: docs/kfac.md, "A canonical EKFAC")
        for blk, s in zip(ek.blocks, ek.scalings() if approx == "expand" else []):
            (_, UG, _), (_, UA, _) = blk.eig()
            Q = np.kron(UG, UA)
            idx = blk.index(np).reshape(-1)
            Fb = F[np.ix_(idx, idx)]
            assert rel_err(s.reshape(-1), np.einsum("pi,pq,qi->i", Q, Fb, Q)) <= 1e-9
        E = ek.dense()
        assert rel_err(ek @ v, E @ v) <= EXACT
