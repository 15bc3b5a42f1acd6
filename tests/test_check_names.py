"""The names ``refngd.check`` gives K-FAC blocks: the layer's own, never a position.

Before, K-FAC units were named by their position among the names of all parametric
layers, so a frozen LayerNorm between two Linear layers gave the second one the
LayerNorm's name, and attention's two projections took two layers' names.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import check, losses, nn
from refngd.check import quantities
from refngd.check.validate import make_twin

torch = pytest.importorskip("torch")


def _kfac_names(twin):
    return list(quantities._factors(quantities._kfac(twin), twin))


def test_a_frozen_layer_between_does_not_shift_the_names():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm(6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    net[1].requires_grad_(False)
    X, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
    twin = make_twin(net, torch.nn.CrossEntropyLoss(), X, y)
    assert twin.prefixes == ["0", "1", "3"]
    assert _kfac_names(twin) == ["0.A", "0.G", "3.A", "3.G"]
    assert list(twin.layouts()) == ["0.weight", "3.weight"]
    assert set(twin.context()["has_bias"]) == {"0.A", "0.G", "3.A", "3.G"}


def test_a_transformer_layer_is_one_name():
    """One refngd layer filled by many PyTorch tensors: named by their common prefix."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 8),
        torch.nn.TransformerEncoderLayer(8, 2, 12, dropout=0.0, batch_first=True),
        torch.nn.Flatten(), torch.nn.Linear(24, 3)).double().eval()
    X, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    twin = make_twin(net, torch.nn.CrossEntropyLoss(), X, y)
    assert twin.prefixes == ["0", "1", "3"]


def test_attention_projections_are_named_after_their_tensors():
    m = nn.Sequential(nn.Linear(4, 6), nn.MultiheadAttention(6, 2), nn.Flatten(), nn.Linear(30, 3))
    theta = m.init(0)
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((3, 5, 4)), rng.integers(0, 3, 3)
    loss = losses.CrossEntropy()
    twin = make_twin((m, theta), loss, X, y, kfac_approx="expand")
    f = quantities._factors(quantities._kfac(twin), twin)
    assert list(f) == ["0.A", "0.G", "1.in_proj.A", "1.in_proj.G", "1.out_proj.A",
                       "1.out_proj.G", "3.A", "3.G"]
    assert check.validate((m, theta), loss, X, y, "kfac_factors", f, kfac_approx="expand").passed
    f["1.out_proj.G"] = 2 * f["1.out_proj.G"]
    bad = check.validate((m, theta), loss, X, y, "kfac_factors", f, kfac_approx="expand")
    assert not bad.passed and "1.out_proj.G" in str(bad)
