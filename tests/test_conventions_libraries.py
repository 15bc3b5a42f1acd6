"""Presets of refngd.conventions against the installed libraries, number for number.

Each test runs the library itself (skipped when it is not installed; pin: the ``validate``
extra) on an MLP and a CNN — a Linear layer without bias, Conv2d layers with T > 1 output
locations — for CrossEntropyLoss, MSELoss and BCEWithLogitsLoss where the library supports
them, with both reductions, and requires agreement to 1e-10 in float64.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refngd  # noqa: E402
from refngd import conventions, interop  # noqa: E402
from refngd.curvature import EKFAC, KFAC, EmpiricalFisher, Fisher  # noqa: E402

RTOL = 1e-10


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make(kind, C=3):
    torch.manual_seed(0)
    if kind == "mlp":
        net = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4, bias=False),
                                  torch.nn.ReLU(), torch.nn.Linear(4, C))
        shape = (4,)
    else:
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(),
                                  torch.nn.Conv2d(3, 2, 2, stride=2, bias=False), torch.nn.ReLU(),
                                  torch.nn.Flatten(), torch.nn.Linear(2 * 2 * 2, C))
        shape = (2, 4, 4)
    return net.double(), shape


def batch(shape, lname, N=6, C=3, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N,) + shape)
    if lname == "CrossEntropyLoss":
        y = rng.integers(0, C, N)
    elif lname == "MSELoss":
        y = rng.standard_normal((N, C))
    else:  # binary targets: what curvlinops' BCE Hessian factor supports
        y = rng.integers(0, 2, (N, C)).astype(float)
    return X, y


CASES = [(k, l, r) for k in ("mlp", "cnn") for l in ("CrossEntropyLoss", "MSELoss", "BCEWithLogitsLoss")
         for r in ("mean", "sum")]


# --------------------------------------------------------------------------- curvlinops
@pytest.fixture(scope="module")
def curvlinops():
    return pytest.importorskip("curvlinops")


@pytest.mark.parametrize("kind,lname,red", CASES)
def test_curvlinops_exact_and_kfac(curvlinops, kind, lname, red):
    net, shape = make(kind)
    X, y = batch(shape, lname)
    model, theta = interop.from_torch(net)
    lm = getattr(torch.nn, lname)(reduction=red)
    loss = interop.from_torch_loss(lm)
    data = [(torch.tensor(X), torch.tensor(y))]
    params = list(net.parameters())
    eye = torch.eye(theta.size, dtype=torch.float64)
    kw = dict(convention="curvlinops")
    ggn = (curvlinops.GGNLinearOperator(net, lm, params, data) @ eye).numpy()
    assert rel(Fisher(model, theta, loss, X, y, **kw).dense(), ggn) < RTOL
    ef = (curvlinops.EFLinearOperator(net, lm, params, data) @ eye).numpy()
    assert rel(EmpiricalFisher(model, theta, loss, X, y, **kw).dense(), ef) < RTOL
    for ftype in ("type-2", "empirical"):
        for approx in ("expand", "reduce"):
            for sep in (True, False):
                op = curvlinops.KFACLinearOperator(net, lm, params, data, fisher_type=ftype,
                                                   kfac_approx=approx, separate_weight_and_bias=sep,
                                                   check_deterministic=False)
                ours = KFAC(model, theta, loss, X, y, fisher_type=ftype, kfac_approx=approx,
                            bias="separate" if sep else "joint", **kw)
                assert rel(ours.dense(), (op @ eye).numpy()) < RTOL, (ftype, approx, sep)
    # EKFAC (expand; see test_curvlinops_ekfac_reduce_is_basis_dependent for reduce)
    op = curvlinops.EKFACLinearOperator(net, lm, params, data, fisher_type="type-2")
    assert rel(EKFAC(model, theta, loss, X, y, **kw).dense(), (op @ eye).numpy()) < 1e-9


def test_curvlinops_ekfac_reduce_is_basis_dependent(curvlinops):
    """EKFAC with kfac_approx='reduce' on a Conv2d layer: the exact per-sample gradients have
    components outside the span of A_reduce's rows, where any eigenbasis is as good as any
    other — so when A_reduce is rank-deficient (N < D) the re-estimated diagonal depends on
    that arbitrary choice and refngd and curvlinops differ (by a few %).  With A_reduce of
    full rank the basis is unique up to degenerate eigenvalues and both agree to round-off."""
    net, shape = make("cnn")
    lm = torch.nn.CrossEntropyLoss()
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(lm)
    eye = torch.eye(theta.size, dtype=torch.float64)
    errs = {}
    for N in (4, 40):                           # D = 2·3·3 = 18 for the first Conv2d
        X, y = batch(shape, "CrossEntropyLoss", N=N)
        op = curvlinops.EKFACLinearOperator(net, lm, list(net.parameters()),
                                            [(torch.tensor(X), torch.tensor(y))],
                                            fisher_type="type-2", kfac_approx="reduce")
        errs[N] = rel(EKFAC(model, theta, loss, X, y, kfac_approx="reduce").dense(), (op @ eye).numpy())
    assert errs[40] < 1e-9 and errs[4] > 1e-4, errs


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_curvlinops_damped_inverses(curvlinops, kind):
    """use_exact_damping = refngd 'tikhonov'; heuristic damping = 'factored' under the preset
    (the bias block reuses the weight's π), which differs from refngd's own 'factored'."""
    net, shape = make(kind)
    X, y = batch(shape, "CrossEntropyLoss")
    model, theta = interop.from_torch(net)
    lm = torch.nn.CrossEntropyLoss()
    loss = interop.from_torch_loss(lm)
    data = [(torch.tensor(X), torch.tensor(y))]
    op = curvlinops.KFACLinearOperator(net, lm, list(net.parameters()), data, fisher_type="type-2")
    g = refngd.gradient(model, theta, loss, X, y)
    lam = 1e-2
    exact = (curvlinops.KFACInverseLinearOperator(op, damping=lam, use_exact_damping=True)
             @ torch.tensor(g)).numpy()
    heur = (curvlinops.KFACInverseLinearOperator(op, damping=lam, use_heuristic_damping=True)
            @ torch.tensor(g)).numpy()
    ours = KFAC(model, theta, loss, X, y, convention="curvlinops")
    assert rel(ours.solve(g, lam), exact) < RTOL
    assert rel(ours.solve(g, lam, damping_mode="factored"), heur) < RTOL
    default = KFAC(model, theta, loss, X, y).solve(g, lam, damping_mode="factored")
    assert rel(default, heur) > 1e-6   # refngd's own π for the bias: a real difference


@pytest.mark.parametrize("kind,lname", [("mlp", "CrossEntropyLoss"), ("cnn", "MSELoss")])
def test_curvlinops_monte_carlo_fisher_within_the_sample_size_tolerance(curvlinops, kind, lname):
    """FisherMCLinearOperator draws its own labels: it must lie within refngd.check's
    Monte-Carlo tolerance (from refngd's own estimates at the same N and K) of the exact
    Fisher, and twice it must not."""
    from refngd import check

    net, shape = make(kind)
    X, y = batch(shape, lname, N=8)
    lm = getattr(torch.nn, lname)()
    data = [(torch.tensor(X), torch.tensor(y))]
    K = 32
    op = curvlinops.FisherMCLinearOperator(net, lm, list(net.parameters()), data, mc_samples=K, seed=7)
    P = sum(p.numel() for p in net.parameters())
    F_mc = (op @ torch.eye(P, dtype=torch.float64)).numpy()
    r = check.validate(net, lm, X, y, "sampled_fisher", F_mc, convention="curvlinops", mc_samples=K)
    assert r.passed, str(r)
    assert not check.validate(net, lm, X, y, "sampled_fisher", 2 * F_mc, convention="curvlinops",
                              mc_samples=K).passed


# --------------------------------------------------------------------------- BackPACK
@pytest.fixture(scope="module")
def backpack():
    return pytest.importorskip("backpack")


@pytest.mark.parametrize("kind,lname,red", [c for c in CASES if c[1] != "BCEWithLogitsLoss"]
                         + [("mlp", "BCEWithLogitsLoss", "mean"), ("cnn", "BCEWithLogitsLoss", "sum")])
def test_backpack(backpack, kind, lname, red):
    from backpack.extensions import KFLR, BatchGrad, DiagGGNExact, SumGradSquared

    C = 1 if lname == "BCEWithLogitsLoss" else 3   # BackPACK's BCE: one output only
    net, shape = make(kind, C)
    X, y = batch(shape, lname, C=C)
    model, theta = interop.from_torch(net)
    lm = getattr(torch.nn, lname)(reduction=red)
    loss = interop.from_torch_loss(lm)
    net, lme = backpack.extend(net), backpack.extend(lm)
    with backpack.backpack(BatchGrad(), DiagGGNExact(), KFLR(), SumGradSquared()):
        lme(net(torch.tensor(X)), torch.tensor(y)).backward()
    N = X.shape[0]
    bg = torch.cat([p.grad_batch.reshape(N, -1) for p in net.parameters()], 1).numpy()
    Z = model.forward(theta, X)
    G = conventions.per_sample_gradients(refngd.per_sample_gradients(model, theta, loss, X, y),
                                         loss, Z, "backpack")
    assert rel(G, bg) < RTOL
    sgs = torch.cat([p.sum_grad_squared.reshape(-1) for p in net.parameters()]).numpy()
    c = loss.scale(Z)
    assert rel(c * EmpiricalFisher(model, theta, loss, X, y).diagonal(), sgs) < RTOL
    dg = torch.cat([p.diag_ggn_exact.reshape(-1) for p in net.parameters()]).numpy()
    assert rel(Fisher(model, theta, loss, X, y, convention="backpack").diagonal(), dg) < RTOL
    ours = KFAC(model, theta, loss, X, y, convention="backpack")
    mods = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for f, m in zip(ours.factors(), mods):
        Gb, Ab = (t.numpy() for t in m.weight.kflr)
        assert rel(f.G, Gb) < RTOL and rel(f.A, Ab) < RTOL
        if m.bias is not None:
            assert rel(f.G, m.bias.kflr[0].numpy()) < RTOL
    if kind == "cnn":  # neither of refngd's own Conv2d variants is BackPACK's
        conv0 = mods[0]
        for approx in ("expand", "reduce"):
            f = KFAC(model, theta, loss, X, y, kfac_approx=approx).factors()[0]
            kron = np.kron(f.G, f.A)
            theirs = np.kron(*(t.numpy() for t in conv0.weight.kflr))
            assert rel(kron, theirs) > 0.5


# --------------------------------------------------------------------------- tutorial
def tutorial_factors(net, X, y):
    """The simplified K-FAC as tutorials write it: hooks on weight.grad of the batch loss."""
    net.zero_grad()
    torch.nn.CrossEntropyLoss()(net(torch.tensor(X)), torch.tensor(y)).backward()
    out = []
    for m in net.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            gw = m.weight.grad.reshape(m.weight.shape[0], -1)
            out.append((gw @ gw.T / gw.shape[0], gw.T @ gw / gw.shape[0]))
    return out


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_tutorial_preset_matches_hand_written_code(kind):
    net, shape = make(kind)
    X, y = batch(shape, "CrossEntropyLoss")
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(torch.nn.CrossEntropyLoss())
    ours = KFAC(model, theta, loss, X, y, convention="tutorial").factors()
    for f, (G, A) in zip(ours, tutorial_factors(net, X, y)):
        assert rel(f.G, G.numpy()) < RTOL and rel(f.A, A.numpy()) < RTOL
    F = Fisher(model, theta, loss, X, y).dense()
    K = KFAC(model, theta, loss, X, y, convention="tutorial").dense()
    assert rel(K, F) > 0.5   # far from the Fisher it is meant to approximate


# --------------------------------------------------------------------------- registry
def test_describe_lists_every_preset_and_refuses_unknown_names():
    for name in ("refngd", "curvlinops", "backpack", "nngeometry", "asdl", "kfac-jax", "laplace",
                 "tutorial"):
        text = conventions.describe(name)
        assert name in text and ("verified" in text or "transcribed" in text)
    assert "[G_reduce, T·A_expand]" in conventions.describe("backpack")
    with pytest.raises(ValueError, match="unknown convention 'pytorch'.*curvlinops"):
        conventions.get("pytorch")


# --------------------------------------------------------------------------- nngeometry
@pytest.fixture()
def float64_default():
    """nngeometry's classif_logits builds a helper matrix in the default dtype."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


NNG_VARIANTS = {"CrossEntropyLoss": "classif_logits", "MSELoss": "regression",
                "BCEWithLogitsLoss": "classif_binary_logits"}


@pytest.mark.parametrize("kind,lname,red", CASES)
def test_nngeometry(float64_default, kind, lname, red):
    pytest.importorskip("nngeometry")
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDense, PMatEKFAC, PMatKFAC
    from torch.utils.data import DataLoader, TensorDataset

    net, shape = make(kind)
    X, y = batch(shape, lname)
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(getattr(torch.nn, lname)(reduction=red))
    loader = DataLoader(TensorDataset(torch.tensor(X), torch.tensor(y)), batch_size=len(X))
    F = FIM(net, loader, PMatDense, variant=NNG_VARIANTS[lname]).to_torch().numpy()
    assert rel(Fisher(model, theta, loss, X, y, convention="nngeometry").dense(), F) < RTOL
    K = FIM(net, loader, PMatKFAC, variant=NNG_VARIANTS[lname])
    ours = KFAC(model, theta, loss, X, y, bias="joint", convention="nngeometry")
    assert rel(ours.dense(), K.to_torch().numpy()) < RTOL
    M = 2 if lname == "CrossEntropyLoss" else 3       # rows per sample: C − 1 for CE, C otherwise
    T = {"mlp": [1, 1, 1], "cnn": [16, 4, 1]}[kind]
    for (a, g), f, t in zip(K.data.values(), ours.factors(), T):
        s = np.sqrt(M) * t
        assert rel(a.numpy(), s * f.A) < RTOL and rel(g.numpy(), f.G / s) < RTOL
    E = FIM(net, loader, PMatEKFAC, variant=NNG_VARIANTS[lname])
    E.update_diag(loader)                      # EKFAC's re-estimated diagonal
    ek = EKFAC(model, theta, loss, X, y, bias="joint", convention="nngeometry")
    assert rel(ek.dense(), E.to_torch().numpy()) < 1e-9


# --------------------------------------------------------------------------- asdl
@pytest.mark.parametrize("kind,lname,red", [c for c in CASES if c[1] != "BCEWithLogitsLoss"])
def test_asdl(float64_default, kind, lname, red):
    asdl = pytest.importorskip("asdl")
    import torch.nn.functional as tF

    net, shape = make(kind)
    X, y = batch(shape, lname)
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(getattr(torch.nn, lname)(reduction=red))
    lt, lf = ((asdl.LOSS_CROSS_ENTROPY, tF.cross_entropy) if lname == "CrossEntropyLoss"
              else (asdl.LOSS_MSE, tF.mse_loss))
    mods = [m for m in net.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    for ftype, cls, rtype in ((asdl.FISHER_EXACT, Fisher, "type-2"),
                              (asdl.FISHER_EMP, EmpiricalFisher, "empirical")):
        cfg = asdl.FisherConfig(fisher_type=ftype, fisher_shapes=[asdl.SHAPE_FULL, asdl.SHAPE_KRON],
                                loss_type=lt, data_size=len(X))
        maker = asdl.get_fisher_maker(net, cfg)
        out = maker.setup_model_call(net, torch.tensor(X))
        maker.setup_loss_call(lf, out, torch.tensor(y))
        maker.forward_and_backward()
        F = cls(model, theta, loss, X, y, convention="asdl").dense()
        assert rel(F, net.fisher.data.numpy()) < RTOL
        ours = KFAC(model, theta, loss, X, y, fisher_type=rtype, convention="asdl").factors()
        for m, f in zip(mods, ours):
            assert rel(f.A, m.fisher.kron.A.numpy()) < RTOL and rel(f.G, m.fisher.kron.B.numpy()) < RTOL


# --------------------------------------------------------------------------- laplace
@pytest.mark.parametrize("kind,red", [("mlp", "mean"), ("cnn", "sum")])
def test_laplace_classification_through_curvlinops_backend(float64_default, kind, red):
    """Needs float64 as torch's default dtype: laplace builds intermediates in it (with
    float32 the agreement is only ~3e-8)."""
    pytest.importorskip("laplace")
    from laplace.curvature import CurvlinopsEF, CurvlinopsGGN

    net, shape = make(kind)
    X, y = batch(shape, "CrossEntropyLoss")
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(torch.nn.CrossEntropyLoss(reduction=red))
    for backend, cls in ((CurvlinopsGGN, Fisher), (CurvlinopsEF, EmpiricalFisher)):
        _, H = backend(net, likelihood="classification").full(torch.tensor(X), torch.tensor(y))
        assert rel(cls(model, theta, loss, X, y, convention="laplace").dense(), H.detach().numpy()) < RTOL


def test_float32_library_output_passes_with_the_float32_tolerance(curvlinops):
    """A float32 model's GGN from curvlinops: judged against refngd's float64 reference
    with the float32 tolerance (1e-4), and a factor 2 is still caught."""
    from refngd import check

    net, shape = make("cnn")
    net = net.float()
    X, y = batch(shape, "CrossEntropyLoss")
    lm = torch.nn.CrossEntropyLoss()
    data = [(torch.tensor(X, dtype=torch.float32), torch.tensor(y))]
    P = sum(p.numel() for p in net.parameters())
    ggn = (curvlinops.GGNLinearOperator(net, lm, list(net.parameters()), data)
           @ torch.eye(P)).numpy()
    assert ggn.dtype == np.float32
    r = check.validate(net, lm, X, y, "fisher", ggn, convention="curvlinops")
    assert r.passed and r.rtol == 1e-4
    assert max(b.rel_error for b in r.blocks) > 1e-9          # float32 round-off is visible
    assert "factor 2" in check.validate(net, lm, X, y, "fisher", 2 * ggn).diagnosis


@pytest.mark.parametrize("lname,lik,red", [("CrossEntropyLoss", "classification", "mean"),
                                           ("MSELoss", "regression", "mean"),
                                           ("MSELoss", "regression", "sum")])
def test_laplace_through_backpack_backend(float64_default, lname, lik, red):
    """Regression: laplace's GGN and EF are ½ of refngd's MSE(sum) ones (its Gaussian has
    variance 1); its BackPACK backend needs ``model.output_size``."""
    pytest.importorskip("laplace")
    pytest.importorskip("backpack")
    from laplace.curvature import BackPackEF, BackPackGGN

    net, shape = make("mlp")
    net.output_size = 3
    X, y = batch(shape, lname)
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(getattr(torch.nn, lname)(reduction=red))
    for backend, cls in ((BackPackGGN, Fisher), (BackPackEF, EmpiricalFisher)):
        _, H = backend(net, likelihood=lik).full(torch.tensor(X), torch.tensor(y))
        assert rel(cls(model, theta, loss, X, y, convention="laplace").dense(), H.detach().numpy()) < RTOL
