"""benchmarks/vs_torch.py: its PyTorch twins compute refngd's gradient (run on tiny models).

No timing is asserted: each function runs once.
"""
import os

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def vs_torch(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.syspath_prepend(BENCH)
    import vs_torch

    return vs_torch


def test_twins_agree_and_the_timer_runs(vs_torch):
    from _common import mlp
    from kfac import problem, small_cnn

    from refngd import losses

    loss = losses.CrossEntropy()
    model = mlp([6, 5, 4])
    rng = np.random.default_rng(0)
    theta = model.init(rng)
    X, y = rng.standard_normal((3, 6)), rng.integers(0, 4, 3)
    t = vs_torch.timed_against_torch(model, theta, loss, X, y, 1, 1, {"more": lambda: None})
    assert set(t) == {"torch gradient", "refngd gradient", "more"}
    model, shape = small_cnn(4)
    theta, X, y = problem(model, shape, 2)
    t = vs_torch.timed_against_torch(model, theta, loss, X, y, 1, 1)
    assert all(v > 0 for v in t.values())
