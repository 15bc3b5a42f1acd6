"""A new parametric layer, defined in this one file, gets the Gram matrix, K-FAC, EKFAC,
the Kronecker diagonal, a memory estimate and a θ layout — with no edit anywhere else.

``Affine`` is a fully connected layer written from scratch on the layer protocol
(docs/design.md §6): forward, backward and ``row_grads`` (a :class:`SmallParametricLayer`
derives every other row primitive from it), the four K-FAC entries and nothing else.  Its
curvatures must equal those of the built-in :class:`refngd.nn.Linear` on the same θ — an
independent implementation of the same layer.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import memory, nn
from refngd.curvature import EKFAC, KFAC, Fisher, KroneckerDiagonal
from refngd.losses import CrossEntropy
from refngd.nn import SmallParametricLayer


class Affine(SmallParametricLayer):
    """z = x Wᵀ + b with W (d_out, d_in), b (d_out,): PyTorch's Linear, from scratch."""

    def __init__(self, d_in: int, d_out: int):
        self.d_in, self.d_out = d_in, d_out
        self.bias = True
        self.param_shapes = ((d_out, d_in), (d_out,))

    def out_shape(self, in_shape):
        if tuple(in_shape) != (self.d_in,):
            raise ValueError(f"Affine expects ({self.d_in},), got {tuple(in_shape)}.")
        return (self.d_out,)

    def init_params(self, rng):
        return [rng.uniform(-0.5, 0.5, size=s) for s in self.param_shapes]

    def forward(self, params, x):
        W, b = params
        return x @ W.T + b, x

    def backward(self, params, cache, B):
        return B @ params[0]

    def row_grads(self, cache, B):
        N, K = B.shape[:2]
        gW = np.einsum("nko,ni->nkoi", B, cache).reshape(N, K, -1)
        return np.concatenate([gW, B], axis=2)

    # the K-FAC entries of the protocol
    def kfac_refusal(self):
        return None

    @property
    def weight_matrix_shape(self):
        return (self.d_out, self.d_in)

    def weight_sharing(self, cache):
        return None

    def tokens(self, cache):
        return cache[:, None, :]

    def token_rows(self, B):
        return B[..., None]


def models():
    ours = nn.Sequential(Affine(4, 5), nn.Tanh(), Affine(5, 3))
    ref = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    rng = np.random.default_rng(0)
    theta = ours.init(rng)
    X, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    return ours, ref, theta, X, y


def test_theta_layout():
    ours, ref, *_ = models()
    assert ours.layout.keys() == ref.layout.keys() == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [(s.start, s.stop, s.shape) for s in ours.layout] == \
        [(s.start, s.stop, s.shape) for s in ref.layout]


def test_gram_and_fisher():
    ours, ref, theta, X, y = models()
    loss = CrossEntropy()
    F, G = Fisher(ours, theta, loss, X, y), Fisher(ref, theta, loss, X, y)
    np.testing.assert_allclose(F.gram(), G.gram(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F.dense(), G.dense(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC, KroneckerDiagonal])
def test_kronecker_curvatures(cls, bias):
    ours, ref, theta, X, y = models()
    loss = CrossEntropy()
    a = cls(ours, theta, loss, X, y, bias=bias).dense()
    b = cls(ref, theta, loss, X, y, bias=bias).dense()
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)
    assert np.abs(a).max() > 0


def test_memory_estimate():
    ours, ref, theta, X, y = models()
    for model in (ours, ref):
        est = memory.gram_route_estimate(model, (4,), K=2, itemsize=8,
                                         P=model.num_params)(6)
        assert est["rows' per-layer buffers"] == 6 * 2 * (5 + 3) * 8
    a = memory.gram_route_estimate(ours, (4,), 2, 8, ours.num_params)(6)
    b = memory.gram_route_estimate(ref, (4,), 2, 8, ref.num_params)(6)
    assert a == b  # the defaults of the protocol are a dense layer's


def test_a_layer_without_kfac_entries_is_refused_by_name():
    class Plain(Affine):
        kfac_refusal = SmallParametricLayer.kfac_refusal

    model = nn.Sequential(Plain(4, 3))
    rng = np.random.default_rng(1)
    theta, X, y = model.init(rng), rng.standard_normal((3, 4)), rng.integers(0, 3, 3)
    with pytest.raises(TypeError, match=r"layer 0: K-FAC supports .* not Plain\(\)"):
        KFAC(model, theta, CrossEntropy(), X, y)
    Fisher(model, theta, CrossEntropy(), X, y).dense()  # the exact curvatures still work
