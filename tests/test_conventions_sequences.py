"""curvlinops on sequence outputs, reproduced by its preset (refngd.conventions).

With outputs (N, T, C) — (N, C, T) for CrossEntropyLoss — curvlinops flattens the token
axis into the batch: its empirical Fisher has one row per token, and its type-2 K-FAC
back-propagates column m of every token's Hessian factor at once, so G carries
cross-token terms (with 'reduce' always; with 'expand' below a layer that mixes tokens,
here self-attention).  refngd's own convention keeps one EF row per sequence and the
block-diagonal factor (docs/conventions.md); the preset reproduces curvlinops, and both
are checked against the installed library in float64.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
curvlinops = pytest.importorskip("curvlinops")

from refngd import nn  # noqa: E402
from refngd.curvature import KFAC, EmpiricalFisher, Fisher  # noqa: E402
from refngd.interop import from_torch, self_attention_module  # noqa: E402
from refngd.losses import CrossEntropy, MSELoss, PerToken  # noqa: E402

N, T, D, H, C = 4, 3, 3, 4, 3


class ClassAxisFirst(torch.nn.Module):
    """(N, T, C) → (N, C, T): the layout CrossEntropyLoss expects (curvlinops' side only)."""

    def forward(self, x):
        return x.transpose(1, 2)


def problem(lname, red, mixing):
    torch.manual_seed(0)
    layers = [torch.nn.Linear(D, H), torch.nn.Tanh()]
    if mixing:
        attn = self_attention_module(H, 2)
        # need_weights=True takes PyTorch's explicit softmax(QKᵀ)V path: the fused CPU
        # attention kernel has no forward-mode derivative, which curvlinops' products use
        attn.forward = lambda x, a=attn.attn: a(x, x, x, need_weights=True)[0]
        layers.append(attn)
    layers.append(torch.nn.Linear(H, C))
    net = torch.nn.Sequential(*layers).double()
    model, theta = from_torch(net)
    model = nn.Sequential(*model.layers, nn.Flatten())        # refngd: (N, T·C) outputs
    rng = np.random.default_rng(1)
    X = rng.standard_normal((N, T, D))
    if lname == "ce":
        y = rng.integers(0, C, (N, T))
        theirs = torch.nn.Sequential(net, ClassAxisFirst())
        lm, loss = torch.nn.CrossEntropyLoss(reduction=red), PerToken(CrossEntropy(red), T)
    else:
        y = rng.standard_normal((N, T, C))
        theirs = net
        lm, loss = torch.nn.MSELoss(reduction=red), PerToken(MSELoss(red), T)
    data = [(torch.tensor(X), torch.tensor(y))]
    linears = [i for i, m in enumerate(net) if isinstance(m, torch.nn.Linear)]
    params = [p for i in linears for p in net[i].parameters()]
    return model, theta, loss, X, y, theirs, lm, params, data, linears


def dense(op, P):
    return (op @ torch.eye(P, dtype=torch.float64)).numpy()


kfac_op = curvlinops.KFACLinearOperator


def subset_matrix(F, model, linears):
    """refngd's dense matrix restricted to the Linear layers' parameters."""
    idx = np.concatenate([np.arange(*model.slices[i]) for i in linears])
    return F[np.ix_(idx, idx)]


@pytest.mark.parametrize("lname", ["ce", "mse"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_empirical_fisher_has_one_row_per_token(lname, red):
    model, theta, loss, X, y, theirs, lm, _, data, _ = problem(lname, red, mixing=True)
    params = list(theirs.parameters())
    P = sum(p.numel() for p in params)
    ef = dense(curvlinops.EFLinearOperator(theirs, lm, params, data), P)
    ours = EmpiricalFisher(model, theta, loss, X, y, convention="curvlinops").dense()
    np.testing.assert_allclose(ours, ef, rtol=1e-10, atol=1e-13 * np.abs(ef).max())
    own = EmpiricalFisher(model, theta, loss, X, y).dense()       # one row per sequence
    assert np.abs(own - ef).max() > 1e-3 * np.abs(ef).max()
    # the token rows of a sample sum to its sequence row: same gradient, other EF
    tok = EmpiricalFisher(model, theta, loss, X, y, convention="curvlinops")
    np.testing.assert_allclose(tok.rows.rmatvec(np.ones((N, T))),
                               EmpiricalFisher(model, theta, loss, X, y).rows.rmatvec(
                                   np.ones((N, 1))), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("lname", ["ce", "mse"])
@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("mixing", [False, True])
def test_type2_kfac_stacks_factor_columns_over_tokens(lname, approx, mixing):
    model, theta, loss, X, y, theirs, lm, params, data, linears = problem(lname, "mean", mixing)
    P = sum(p.numel() for p in params)
    op = kfac_op(theirs, lm, params, data, fisher_type="type-2", kfac_approx=approx)
    theirs_dense = dense(op, P)
    sel = [i for i in linears]
    ours = KFAC(model, theta, loss, X, y, kfac_approx=approx, convention="curvlinops",
                params=sel).dense()
    np.testing.assert_allclose(ours, theirs_dense, rtol=1e-10,
                               atol=1e-13 * np.abs(theirs_dense).max())
    own = KFAC(model, theta, loss, X, y, kfac_approx=approx, params=sel).dense()
    differs = np.abs(own - theirs_dense).max() > 1e-6 * np.abs(theirs_dense).max()
    # cross-token terms: reduce sums rows of all tokens; expand meets them below the mixing
    assert differs == (approx == "reduce" or mixing)


@pytest.mark.parametrize("lname", ["ce", "mse"])
def test_ggn_and_empirical_kfac_are_refngds(lname):
    """The exact GGN and K-FAC's 'empirical' rows need no preset: they agree either way."""
    model, theta, loss, X, y, theirs, lm, params, data, linears = problem(lname, "mean", True)
    allp = list(theirs.parameters())
    ggn = dense(curvlinops.GGNLinearOperator(theirs, lm, allp, data),
                sum(p.numel() for p in allp))
    for conv in ("refngd", "curvlinops"):
        F = Fisher(model, theta, loss, X, y, convention=conv).dense()
        np.testing.assert_allclose(F, ggn, rtol=1e-10, atol=1e-13 * np.abs(ggn).max())
    P = sum(p.numel() for p in params)
    op = kfac_op(theirs, lm, params, data, fisher_type="empirical")
    for conv in ("refngd", "curvlinops"):
        ours = KFAC(model, theta, loss, X, y, fisher_type="empirical", convention=conv,
                    params=linears).dense()
        np.testing.assert_allclose(ours, dense(op, P), rtol=1e-10, atol=1e-14)


def test_token_layout_helpers_are_identities_for_one_term_per_sample():
    loss = CrossEntropy()
    E = np.arange(6.0).reshape(2, 3)
    assert loss.split_tokens(E).shape == (2, 1, 3)
    F = np.ones((2, 3, 2))
    assert loss.stack_token_columns(F) is F
    seq = PerToken(MSELoss(), 2)
    E2 = np.arange(8.0).reshape(2, 4)
    S = seq.split_tokens(E2)
    np.testing.assert_array_equal(S.sum(axis=1), E2)
    np.testing.assert_array_equal(S[:, 0, 2:], 0)
