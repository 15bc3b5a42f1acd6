"""CuPy parity: the core quantities on the GPU equal the NumPy reference (docs/design.md §5).

Skipped unless CuPy and a CUDA device are present.  Every compute function derives its
array module from its inputs, so the same calls run on both; results are compared after
moving the GPU ones back to the host.
"""
import numpy as np
import pytest
from devices import gpu_available

import refngd
from refngd import losses, nn, updates
from refngd.backend import to_numpy
from refngd.curvature import KFAC, EmpiricalFisher, Fisher, SampledFisher



pytestmark = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a GPU")
TOL = dict(rtol=1e-9, atol=1e-12)


def _problem(kind):
    rng = np.random.default_rng(0)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 4))
        X = rng.standard_normal((7, 6))
    elif kind == "cnn":
        model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                              nn.Linear(3 * 3 * 3, 4))
        X = rng.standard_normal((7, 2, 5, 5))
    elif kind == "transformer":  # sequence Linear, attention, LayerNorm, GELU, residuals
        model = nn.Sequential(nn.Linear(3, 4), nn.TransformerEncoderLayer(
            4, 2, 6, activation="gelu", norm_first=True), nn.LayerNorm(4), nn.Flatten(),
            nn.Linear(3 * 4, 4))
        X = rng.standard_normal((7, 3, 3))
    elif kind == "pooling":  # BatchNorm (eval), max / average / adaptive pooling
        bn = nn.BatchNorm2d(3)
        bn.set_running_stats(rng.standard_normal(3), rng.uniform(0.5, 2, 3))
        model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn, nn.MaxPool2d(2, ceil_mode=True),
                              nn.AvgPool2d(2, stride=1, padding=1), nn.AdaptiveAvgPool2d(3),
                              nn.Flatten(), nn.Linear(27, 4))
        X = rng.standard_normal((7, 2, 5, 5))
    else:  # integer tokens into an Embedding, then attention
        model = nn.Sequential(nn.Embedding(10, 4, padding_idx=0), nn.MultiheadAttention(4, 2),
                              nn.Flatten(), nn.Linear(5 * 4, 4))
        X = rng.integers(0, 10, (7, 5))
    return model, model.init(rng), X, rng.integers(0, 4, 7)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "transformer", "pooling", "embedding"])
def test_core_quantities_match_numpy(kind):
    import cupy

    model, th, X, y = _problem(kind)
    thc, Xc, yc = cupy.asarray(th), cupy.asarray(X), cupy.asarray(y)
    loss = losses.CrossEntropy()

    def both(f):
        a, b = f(th, X, y), f(thc, Xc, yc)
        assert isinstance(b, cupy.ndarray) or np.isscalar(b)
        np.testing.assert_allclose(to_numpy(b), a, **TOL)

    both(lambda t, X, y: model.forward(t, X))
    both(lambda t, X, y: refngd.jacobian(model, t, X))
    both(lambda t, X, y: refngd.gradient(model, t, loss, X, y))
    both(lambda t, X, y: refngd.per_sample_gradients(model, t, loss, X, y))
    both(lambda t, X, y: Fisher(model, t, loss, X, y).gram())
    both(lambda t, X, y: EmpiricalFisher(model, t, loss, X, y).diagonal())
    both(lambda t, X, y: updates.ngd(model, t, loss, X, y, damping=1e-3))
    both(lambda t, X, y: updates.ef(model, t, loss, X, y, damping=1e-3, form="gram"))
    both(lambda t, X, y: updates.ief(model, t, loss, X, y, damping=1e-3))
    # the same host Generator draws the same labels on both devices
    both(lambda t, X, y: SampledFisher(model, t, loss, X, y, mc_samples=3,
                                       rng=np.random.default_rng(1)).gram())
    if kind in ("mlp", "cnn"):  # K-FAC covers Linear / Conv2d layers only
        both(lambda t, X, y: KFAC(model, t, loss, X, y).solve(refngd.gradient(model, t, loss, X, y), 1e-3))
