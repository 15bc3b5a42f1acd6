"""K-FAC-expand and K-FAC-reduce for Linear layers on sequences (Eschenhagen et al. 2023,
"Kronecker-factored approximate curvature for modern neural network architectures").

Their exact cases (§3, deep linear networks with a squared loss): in the *expand* setting
(one loss term per token, the shared dimension acts like a batch dimension) K-FAC-expand
equals the exact GGN blocks; in the *reduce* setting (the tokens are averaged before the
loss) K-FAC-reduce does.  The reason in both: the rows b reaching a layer do not depend on
the sample (the network above is linear, H = 2I), so E[(b bᵀ) ⊗ (a aᵀ)] factorises —
over (n, t) for expand, over n with ā_n = mean_t a_nt for reduce.  Each is checked to
1e-10 against the exact Fisher, and the *other* approximation against the same matrix,
to show that it is off in that setting.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import nn
from refngd.curvature import EKFAC, KFAC, Fisher, KroneckerDiagonal, SampledFisher
from refngd.losses import CrossEntropy, MSELoss
from refngd.losses import PerToken

from kfac_helpers import block_mask, rel_err

N, T, D, H, C = 5, 4, 3, 4, 2


def expand_setting(seed=0):
    """Deep linear network on tokens with a per-token squared loss."""
    model = nn.Sequential(nn.Linear(D, H), nn.Linear(H, C), nn.Flatten())
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, T, D))
    y = rng.standard_normal((N, T, C))
    return model, model.init(rng), PerToken(MSELoss(), T), X, y


def reduce_setting(seed=0):
    """Deep linear network on tokens, tokens averaged (AdaptiveAvgPool2d over T), then MSE."""
    model = nn.Sequential(nn.Linear(D, H), nn.Linear(H, C), nn.AdaptiveAvgPool2d((1, None)),
                          nn.Flatten())
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N, 1, T, D))  # per sample (1, T, D): one "channel" of T tokens
    y = rng.standard_normal((N, C))
    return model, model.init(rng), MSELoss(), X, y


@pytest.mark.parametrize("bias", ["separate", "joint"])
@pytest.mark.parametrize("setting, exact, other", [
    (expand_setting, "expand", "reduce"), (reduce_setting, "reduce", "expand")])
def test_exact_case_and_the_other_approximation(setting, exact, other, bias):
    model, theta, loss, X, y = setting()
    F = Fisher(model, theta, loss, X, y).dense()
    mask = block_mask(model, bias)
    exact_K = KFAC(model, theta, loss, X, y, kfac_approx=exact, bias=bias).dense()
    other_K = KFAC(model, theta, loss, X, y, kfac_approx=other, bias=bias).dense()
    assert rel_err(exact_K[mask], F[mask]) < 1e-10
    assert np.all(exact_K[~mask] == 0)
    assert rel_err(other_K[mask], F[mask]) > 1e-2  # the other approximation is off


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_kronecker_diagonal_is_the_diagonal_of_kfac(approx):
    model, theta, loss, X, y = expand_setting()
    kd = KroneckerDiagonal(model, theta, loss, X, y, kfac_approx=approx).diagonal()
    for bias in ("separate", "joint"):
        K = KFAC(model, theta, loss, X, y, kfac_approx=approx, bias=bias).dense()
        assert rel_err(kd, np.diagonal(K)) < 1e-12


def test_nonlinear_network_is_not_exact_but_factors_follow_definition():
    """With a nonlinearity neither is exact; the factors are the definitions' sums."""
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C), nn.Flatten())
    rng = np.random.default_rng(3)
    theta, X = model.init(rng), rng.standard_normal((N, T, D))
    loss = PerToken(CrossEntropy(), T)
    y = rng.integers(0, C, (N, T))
    K = KFAC(model, theta, loss, X, y, kfac_approx="expand")
    f0 = K.factors()[0]
    assert np.allclose(f0.A, np.einsum("ntd,nte->de", X, X) / (N * T), rtol=1e-12, atol=0)
    R = KFAC(model, theta, loss, X, y, kfac_approx="reduce").factors()[0]
    Xm = X.mean(axis=1)
    assert np.allclose(R.A, Xm.T @ Xm / N, rtol=1e-12, atol=0)
    # G: c Σ over rows (and tokens) of the rows reaching layer 0, from refngd's rows
    lin = model.linearize(theta, X)
    rows = lin.backprop(loss.hessian_factor(lin.outputs).transpose(0, 2, 1))
    B = rows.layers[0].B  # (N, K, T, H)
    c = loss.scale(lin.outputs)
    assert np.allclose(f0.G, c * np.einsum("nkth,nkti->hi", B, B), rtol=1e-12, atol=0)
    Bs = B.sum(axis=2)
    assert np.allclose(R.G, c * np.einsum("nkh,nki->hi", Bs, Bs), rtol=1e-12, atol=0)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_ekfac_on_sequences_is_its_definition(approx):
    """EKFAC on Linear layers over tokens (read off the layer protocol, as Conv2d's): in
    K-FAC's eigenbasis Q = U_G ⊗ U_A the diagonal is c Σ_r (Qᵀ u_r)², u_r the exact
    per-row gradient Σ_t b_rt ā_ntᵀ (George et al. 2018, §3), whatever ``kfac_approx``
    chose the basis — checked against the dense row matrix, block by block."""
    model, theta, loss, X, y = expand_setting()
    ek = EKFAC(model, theta, loss, X, y, kfac_approx=approx)
    U = ek.rows.dense().reshape(-1, model.num_params)           # (R, P) per-row gradients
    for blk, S in zip(ek.blocks, ek.scalings()):
        (_, UG, _), (_, UA, _) = blk.eig()
        assert UG.shape[1] == UG.shape[0] and UA.shape[1] == UA.shape[0]  # full bases
        Ub = U[:, blk.index(np).reshape(-1)]                     # (R, d_out·d_A)
        proj = Ub @ np.kron(UG, UA)
        assert np.allclose(S.reshape(-1), ek.c * (proj ** 2).sum(axis=0),
                           rtol=1e-10, atol=1e-14 * np.abs(S).max())


def test_unsupported_layers_are_refused():
    model, theta, loss, X, y = expand_setting()
    tf = nn.Sequential(nn.Linear(D, 4), nn.TransformerEncoderLayer(4, 2, 6), nn.Flatten(),
                       nn.Linear(T * 4, C))
    th = tf.init(np.random.default_rng(0))
    with pytest.raises(TypeError, match="not LayerNorm"):  # the block's LayerNorms
        KFAC(tf, th, CrossEntropy(), X, np.zeros(N, dtype=int))
    ln = nn.Sequential(nn.Linear(D, 4), nn.LayerNorm(4), nn.Flatten(), nn.Linear(T * 4, C))
    with pytest.raises(TypeError, match="supports Linear and Conv2d"):
        KFAC(ln, ln.init(np.random.default_rng(0)), CrossEntropy(), X, np.zeros(N, dtype=int))


def test_attention_projections():
    """K-FAC on MultiheadAttention's in- and out-projections (weight-shared Linears).

    Per-token MSE on the attention output: above the out-projection the network is the
    identity, so its rows do not depend on the sample and K-FAC-expand is exact for its
    block (Eschenhagen et al.'s expand case); the in-projection's rows pass through the
    softmax attention, so its block is an approximation — its factors are still the sums
    of the definition.
    """
    E = 4
    model = nn.Sequential(nn.Linear(D, E), nn.MultiheadAttention(E, 2), nn.Flatten())
    rng = np.random.default_rng(7)
    theta, X = model.init(rng), rng.standard_normal((N, T, D))
    y, loss = rng.standard_normal((N, T, E)), PerToken(MSELoss(), T)
    F = Fisher(model, theta, loss, X, y).dense()
    K = KFAC(model, theta, loss, X, y, kfac_approx="expand", bias="joint")
    starts = [f.start for f in K.factors()]
    assert starts == [0, D * E + E, D * E + E + 3 * E * (E + 1)]  # first Linear, in_proj, out_proj
    Kd = K.dense()
    out = slice(starts[2], model.num_params)
    assert rel_err(Kd[out, out], F[out, out]) < 1e-10
    inp = slice(starts[1], starts[2])
    assert rel_err(Kd[inp, inp], F[inp, inp]) > 1e-3
    lin = model.linearize(theta, X)
    rows = lin.backprop(loss.hessian_factor(lin.outputs).transpose(0, 2, 1))
    e_in = rows.layers[1]
    B = e_in.B.reshape(-1, 3 * E)  # rows at the packed q|k|v, all tokens
    f_in = K.factors()[1]
    assert rel_err(f_in.G, loss.scale(lin.outputs) * B.T @ B) < 1e-12
    a = np.concatenate([e_in.cache.reshape(-1, E), np.ones((N * T, 1))], axis=1)
    assert rel_err(f_in.A, a.T @ a / (N * T)) < 1e-12


@pytest.mark.parametrize("base", ["ce", "mse"])
def test_per_token_losses_in_the_exact_step_and_kfac(base):
    """Sequence losses (PerToken) write their gradient in the Fisher's rows token by token:
    updates.ngd and the sampled Fisher's natural gradient equal the dense solves (F + λI)⁻¹g,
    and updates.kfac equals K-FAC's solve of the gradient (all raised AttributeError before)."""
    from numerics import assert_close

    import refngd
    from refngd import updates

    rng = np.random.default_rng(4)
    model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, 3), nn.Flatten())
    theta = model.init(rng)
    X = rng.standard_normal((N, T, D))
    if base == "ce":
        loss, y = PerToken(CrossEntropy(), T), rng.integers(0, 3, (N, T))
        theta[-3:] += [30.0, 0.0, 0.0]  # saturated tokens: p_y ~ e^-30 where y ≠ 0
    else:
        loss, y = PerToken(MSELoss(), T), rng.standard_normal((N, T, 3))
    F = Fisher(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    assert_close(F.gradient(), g, 1e-12)
    for lam in (1e-2, 1e-6):
        ref = np.linalg.solve(F.dense() + lam * np.eye(theta.size), g)
        assert_close(updates.ngd(model, theta, loss, X, y, lam), ref, 1e-8)
    # the sampled Fisher: rows at per-token draws (the draws of the tokens as N·T rows)
    rng_draws = np.random.default_rng(3)
    base = loss.base.sampled_output_gradients(model.forward(theta, X).reshape(N * T, 3),
                                              rng_draws, 2)
    expect_rows = base.reshape(N, T, 2, 3).transpose(0, 2, 1, 3).reshape(N, 2, T * 3)
    assert_close(loss.sampled_output_gradients(model.forward(theta, X), np.random.default_rng(3), 2),
                 expect_rows, 1e-15)
    SF = SampledFisher(model, theta, loss, X, y, mc_samples=2, rng=5)
    assert_close(SF.natural_gradient(1e-2),
                 np.linalg.solve(SF.dense() + 1e-2 * np.eye(theta.size), g), 1e-8)
    # (EKFAC does not take Linear layers on sequences yet)
    assert_close(updates.kfac(model, theta, loss, X, y, 1e-3),
                 KFAC(model, theta, loss, X, y).solve(g, 1e-3), 1e-11)
