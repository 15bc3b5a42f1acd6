"""PerToken(..., class_dim=1): PyTorch's class axis at dimension 1, as a permutation.

For outputs laid out (C, T) per sample, every output-space quantity must be the
token-major (T, C) one with its output axes permuted; the loss itself (and c) against
PyTorch's CrossEntropyLoss on (N, C, d1, d2).
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd.losses import CrossEntropy, MSELoss, PerToken
from numerics import assert_close

N, C, T = 4, 3, 6
rng = np.random.default_rng(0)
Zcf = rng.standard_normal((N, C * T))                      # class-first: z[c·T + t]
perm = (np.arange(C)[None, :] * T + np.arange(T)[:, None]).reshape(-1)   # token-major index
Ztm = Zcf[:, perm]                                           # z_tm[t·C + c] = z_cf[c·T + t]
y = rng.integers(0, C, (N, T))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_quantity_is_the_permuted_token_major_one(reduction):
    cf = PerToken(CrossEntropy(reduction), T, class_dim=1)
    tm = PerToken(CrossEntropy(reduction), T)
    assert cf.scale(Zcf) == tm.scale(Ztm) == (1 / (N * T) if reduction == "mean" else 1)
    assert_close(cf.per_sample(Zcf, y), tm.per_sample(Ztm, y), 1e-14)
    assert_close(cf.output_gradient(Zcf, y)[:, perm], tm.output_gradient(Ztm, y), 1e-14)
    assert_close(cf.output_hessian(Zcf)[:, perm][:, :, perm], tm.output_hessian(Ztm), 1e-14)
    assert_close(cf.hessian_sqrt(Zcf)[:, perm], tm.hessian_sqrt(Ztm), 1e-14)
    assert_close(cf.hessian_factor(Zcf, y)[:, perm], tm.hessian_factor(Ztm, y), 1e-14)
    a1, r1 = cf.gradient_in_factor(Zcf, y)
    a2, r2 = tm.gradient_in_factor(Ztm, y)
    assert_close(a1, a2, 1e-14)
    assert np.array_equal(r1[:, perm], r2)
    s1 = cf.sampled_output_gradients(Zcf, np.random.default_rng(3), 2)
    s2 = tm.sampled_output_gradients(Ztm, np.random.default_rng(3), 2)
    assert_close(s1[:, :, perm], s2, 1e-14)


def test_against_torch_and_refusals():
    torch = pytest.importorskip("torch")
    y4 = rng.integers(0, C, (N, 2, 3))                       # PyTorch's (N, d1, d2) labels
    for red in ("mean", "sum"):
        ours = PerToken(CrossEntropy(red), T, class_dim=1)
        ref = torch.nn.CrossEntropyLoss(reduction=red)(
            torch.tensor(Zcf.reshape(N, C, 2, 3)), torch.tensor(y4))
        assert abs(float(ours(Zcf, y4)) - ref.item()) <= 1e-13 * abs(ref.item())
    with pytest.raises(ValueError, match="class_dim must be -1"):
        PerToken(CrossEntropy(), T, class_dim=0)
    with pytest.raises(ValueError, match="elementwise"):
        PerToken(MSELoss(), T, class_dim=1)
    assert "class_dim=1" in repr(PerToken(CrossEntropy(), T, class_dim=1))


def test_split_tokens_in_the_class_first_layout():
    """Loss.split_tokens (the EF rows of ef_rows="token", from main) reads token t at
    z[t·C:(t+1)·C]; with class_dim=1 row t must hold z[c·T + t] alone (merge of 'layers')."""
    cf = PerToken(CrossEntropy(), T, class_dim=1)
    tm = PerToken(CrossEntropy(), T)
    E = cf.output_gradient(Zcf, y)
    S = cf.split_tokens(E)
    assert S.shape == (N, T, C * T)
    assert_close(S.sum(axis=1), E, 1e-15)
    assert_close(S[:, :, perm], tm.split_tokens(E[:, perm]), 0)
    assert np.array_equal(cf.split_tokens(Zcf)[:, :, perm], tm.split_tokens(Ztm))
    assert np.array_equal(cf.split_tokens(Zcf).sum(axis=1), Zcf)
