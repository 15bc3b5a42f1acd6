"""K-FAC and EKFAC of Linear layers shared over tokens against curvlinops 3.0.1.

* A Linear on (N, T, d) inside a model with (N, C) outputs (tokens flattened into a
  classifier): K-FAC expand / reduce and EKFAC expand / reduce, separate or joint bias,
  mean or sum, CrossEntropyLoss and MSELoss, equal curvlinops' to 1e-10 — EKFAC reduce
  where A_reduce's eigenvalues are simple (N ≥ D); with a rank-deficient A_reduce the
  diagonal in its null space depends on an arbitrary basis (docs/kfac.md) and the two
  differ, as for Conv2d.
* Per-token cross-entropy (outputs (N, T, C); curvlinops takes them as (N, C, T)): the
  GGN and K-FAC expand agree.  K-FAC reduce differs from refngd's default by a
  convention (the ``curvlinops`` preset's ``factor_columns="stacked"`` reproduces it): curvlinops
  back-propagates, per sample and column k of the symmetric root diag(√p) − p√pᵀ, the
  k-th columns of all T tokens' roots together, so its G has cross-token products (which
  depend on the choice of root); refngd's PerToken keeps the T·M rows of the
  block-diagonal factor (those of the exact GGN) apart.  The test rebuilds curvlinops'
  matrix from refngd's own rows so combined, and the curvlinops preset
  (``factor_columns="stacked"``) equals it.  (curvlinops' EKFAC
  refuses outputs with more than 2 axes.)
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
curvlinops = pytest.importorskip("curvlinops")

from refngd import interop  # noqa: E402
from refngd.curvature import EKFAC, KFAC, Fisher  # noqa: E402
from refngd.losses import CrossEntropy, PerToken  # noqa: E402

T, C = 3, 4


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def seq_classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 4, bias=False), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(T * 4, C)).double()


def dense(op, P):
    return (op @ torch.eye(P, dtype=torch.float64)).numpy()


@pytest.mark.parametrize("lname", ["CrossEntropyLoss", "MSELoss"])
@pytest.mark.parametrize("red", ["mean", "sum"])
def test_kfac_and_ekfac_of_shared_linear_layers(lname, red):
    net = seq_classifier()
    model, theta = interop.from_torch(net)
    rng = np.random.default_rng(1)
    N = 12                                           # ≥ D + 1 = 6: A_reduce of full rank
    X = rng.standard_normal((N, T, 4))
    y = rng.integers(0, C, N) if lname == "CrossEntropyLoss" else rng.standard_normal((N, C))
    lm = getattr(torch.nn, lname)(reduction=red)
    loss = interop.from_torch_loss(lm)
    data, params = [(torch.tensor(X), torch.tensor(y))], list(net.parameters())
    for approx in ("expand", "reduce"):
        for sep in (True, False):
            kw = dict(fisher_type="type-2", kfac_approx=approx, separate_weight_and_bias=sep,
                      check_deterministic=False)
            ours = dict(kfac_approx=approx, bias="separate" if sep else "joint",
                        convention="curvlinops")
            K = dense(curvlinops.KFACLinearOperator(net, lm, params, data, **kw), theta.size)
            assert rel(KFAC(model, theta, loss, X, y, **ours).dense(), K) < 1e-10
            E = dense(curvlinops.EKFACLinearOperator(net, lm, params, data, **kw), theta.size)
            assert rel(EKFAC(model, theta, loss, X, y, **ours).dense(), E) < 1e-10, (approx, sep)


def test_ekfac_reduce_with_rank_deficient_inputs_is_basis_dependent():
    net = seq_classifier()
    model, theta = interop.from_torch(net)
    lm = torch.nn.CrossEntropyLoss()
    loss = interop.from_torch_loss(lm)
    errs = {}
    for N in (2, 12):                                 # D + 1 = 5 input columns, joint bias
        rng = np.random.default_rng(1)
        X, y = rng.standard_normal((N, T, 4)), rng.integers(0, C, N)
        op = curvlinops.EKFACLinearOperator(net, lm, list(net.parameters()),
                                            [(torch.tensor(X), torch.tensor(y))],
                                            fisher_type="type-2", kfac_approx="reduce",
                                            separate_weight_and_bias=False)
        errs[N] = rel(EKFAC(model, theta, loss, X, y, kfac_approx="reduce", bias="joint").dense(),
                      dense(op, theta.size))
    assert errs[12] < 1e-10 and errs[2] > 1e-4, errs


class _ClassFirst(torch.nn.Module):
    """(N, T, d) → (N, T, C) token logits, returned as (N, C, T) for CrossEntropyLoss."""

    def __init__(self, body):
        super().__init__()
        self.body = body

    def forward(self, x):
        return self.body(x).transpose(1, 2)


@pytest.mark.parametrize("red", ["mean", "sum"])
def test_per_token_cross_entropy(red):
    torch.manual_seed(2)
    body = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, C)).double()
    net = _ClassFirst(body)
    model, theta = interop.from_torch(torch.nn.Sequential(body, torch.nn.Flatten()))
    rng = np.random.default_rng(3)
    N = 6
    X, y = rng.standard_normal((N, T, 5)), rng.integers(0, C, (N, T))
    lm, loss = torch.nn.CrossEntropyLoss(reduction=red), PerToken(CrossEntropy(red), T)
    data, params = [(torch.tensor(X), torch.tensor(y))], list(net.parameters())
    P = theta.size
    ggn = dense(curvlinops.GGNLinearOperator(net, lm, params, data), P)
    assert rel(Fisher(model, theta, loss, X, y).dense(), ggn) < 1e-10
    kw = dict(fisher_type="type-2", check_deterministic=False)
    K = dense(curvlinops.KFACLinearOperator(net, lm, params, data, **kw), P)
    assert rel(KFAC(model, theta, loss, X, y, convention="curvlinops").dense(), K) < 1e-10
    Kr = dense(curvlinops.KFACLinearOperator(net, lm, params, data, kfac_approx="reduce", **kw), P)
    ours = KFAC(model, theta, loss, X, y, kfac_approx="reduce")
    assert rel(ours.dense(), Kr) > 1e-2                 # the convention difference
    # the curvlinops preset models it (factor_columns="stacked", main's issue 19 item 7)
    preset = KFAC(model, theta, loss, X, y, kfac_approx="reduce", convention="curvlinops")
    assert rel(preset.dense(), Kr) < 1e-10
    # curvlinops' rows: per sample and column k, the k-th columns of all tokens' factors
    lin = model.linearize(theta, X)
    Sn = loss.hessian_sqrt(lin.outputs)                 # (N, T·C, T·C): blockdiag of the
    S = Sn.reshape(N, T * C, T, C).sum(axis=2).transpose(0, 2, 1)   # symmetric roots
    rows = lin.backprop(S)
    c = loss.scale(lin.outputs)
    rebuilt = np.zeros((P, P))
    for f, e in zip(ours.factors(), rows.layers):
        Bt = e.layer.token_rows(e.B).sum(axis=3)        # (N, K, d_out): Σ_t b_nkt
        G = c * np.einsum("nko,nkp->op", Bt, Bt)
        w = G.shape[0] * f.A.shape[0]
        rebuilt[f.start:f.start + w, f.start:f.start + w] = np.kron(G, f.A)
        rebuilt[f.start + w:f.stop, f.start + w:f.stop] = G
    assert rel(rebuilt, Kr) < 1e-10
