"""The presets of public research code (:mod:`refngd.conventions.public`) against candidates
written to each convention by hand.

Every candidate below is built the way the cited code builds it — from the layer inputs
and output gradients a forward/backward hook sees, or from per-sample gradients taken with
autograd — in explicit NumPy, never through refngd's K-FAC machinery.  Each must pass
``refngd.check.validate(..., convention=<preset>)`` to 1e-10 (float64), and the same
candidate with one planted factor 2 must fail.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import check, conventions
from refngd.curvature.preset_factors import factor_scalars

torch = pytest.importorskip("torch")
F_ = torch.nn.functional

N, T_CONV = 8, 16
CE = torch.nn.CrossEntropyLoss()
PUBLIC = ("kfac-pytorch", "alecwangcq", "ekfac-pytorch", "ief-authors")


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Flatten(), torch.nn.Linear(48, 3)).double()
    rng = np.random.default_rng(0)
    X = torch.tensor(rng.standard_normal((N, 2, 4, 4)))
    y = torch.tensor(rng.integers(0, 3, N))
    return net, X, y


def hooked(net, X, labels, loss=CE):
    """Per layer (layer, input, grad_output) of loss(net(X), labels) — what every
    hook-based code sees — and the joint gradient matrices [∇W | ∇b]."""
    seen = {}
    layers = [m for m in net if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    hs = [m.register_forward_hook(lambda m, i, o: seen.__setitem__((m, "in"), i[0].detach()))
          for m in layers]
    hs += [m.register_full_backward_hook(
        lambda m, gi, go: seen.__setitem__((m, "gout"), go[0].detach())) for m in layers]
    net.zero_grad()
    loss(net(X), labels).backward()
    for h in hs:
        h.remove()
    out = []
    for m in layers:
        V = torch.cat([m.weight.grad.reshape(m.weight.shape[0], -1), m.bias.grad[:, None]], 1)
        out.append((m, seen[(m, "in")], seen[(m, "gout")], V.numpy().copy()))
    return out


def rows(m, x, g):
    """(ā rows (N·T, D+1), output-gradient rows (N·T, d_out), T) of one layer."""
    if isinstance(m, torch.nn.Conv2d):
        P = F_.unfold(x, m.kernel_size, padding=m.padding, stride=m.stride)   # (N, D, T)
        a = P.transpose(1, 2).reshape(-1, P.shape[1]).numpy()
        gr = g.permute(0, 2, 3, 1).reshape(-1, g.shape[1]).numpy()
        T = P.shape[2]
    else:
        a, gr, T = x.numpy(), g.numpy(), 1
    return np.concatenate([a, np.ones((a.shape[0], 1))], 1), gr, T


def to_theta(blocks):
    """[W | b] matrices → θ in parameters_to_vector order."""
    return np.concatenate([np.concatenate([U[:, :-1].reshape(-1), U[:, -1]]) for U in blocks])


def eig_update(G, A, V, lam, clamp=0.0):
    dg, Qg = np.linalg.eigh(G)
    da, Qa = np.linalg.eigh(A)
    dg, da = np.where(dg > clamp, dg, 0.0), np.where(da > clamp, da, 0.0)
    return Qg @ ((Qg.T @ V @ Qa) / (np.outer(dg, da) + lam)) @ Qa.T


def planted(factors, key):
    out = dict(factors)
    out[key] = 2 * out[key]
    return out


def scales(factors):
    """Per layer the product of its factors' mean eigenvalues (the size of its G ⊗ A)."""
    tr = [np.trace(factors[k]) / len(factors[k]) for k in factors]
    return [tr[i] * tr[i + 1] for i in range(0, len(tr), 2)]


def typical(factors):
    """A damping of the size of the layers' curvature (a factor 2 shows in the update)."""
    return 0.1 * max(scales(factors))


def layer_passed(report, name):
    return all(b.passed for b in report.blocks if b.name.startswith(name + "."))


# --------------------------------------------------------------------------- kfac-pytorch
def kfac_pytorch(net, X, y, plant=None):
    """Factors as kfac/layers/modules.py: A from (patches/T, ones/T), G from grad_output/T,
    each averaged over its N·T rows (get_cov)."""
    facs, grads = {}, []
    for name, (m, x, g, V) in zip(("0", "3"), hooked(net, X, y)):
        a, gr, T = rows(m, x, g)
        if isinstance(m, torch.nn.Conv2d):
            a, gr = a / T, gr / T
        facs[f"{name}.A"] = a.T @ a / a.shape[0]
        facs[f"{name}.G"] = gr.T @ gr / gr.shape[0]
        grads.append(V)
    return (planted(facs, plant) if plant else facs), grads


def test_kfac_pytorch_factors_and_updates(cnn):
    """Under kfac-pytorch the convolution's block is ~10⁶ × smaller than the Linear one's
    (1/(N²T⁵)): at a λ of the Linear layer's size a factor 2 there shows; at a λ of the
    convolution's size only the convolution is compared — the Linear layer's update is
    then dominated by round-off in its G's null space (Σ_c e_nc = 0 for the cross-entropy)
    divided by λ, in the candidate and in refngd alike."""
    net, X, y = cnn
    opts = dict(conventions.get("kfac-pytorch").options)
    facs, V = kfac_pytorch(net, X, y)
    r = check.validate(net, CE, X, y, "kfac_factors", facs, convention="kfac-pytorch", **opts)
    assert r.passed, str(r)
    assert not check.validate(net, CE, X, y, "kfac_factors", kfac_pytorch(net, X, y, "0.G")[0],
                              convention="kfac-pytorch", **opts).passed

    def inverse(lam):
        def upd(G, A, W):
            Gi = np.linalg.solve(G + lam * np.eye(len(G)), W)
            return Gi @ np.linalg.inv(A + lam * np.eye(len(A)))
        return upd

    def lam_for(mode, layer):   # λ on each factor (per-factor) or on their product
        mean = [np.trace(facs[f"{layer}.{k}"]) / len(facs[f"{layer}.{k}"]) for k in "AG"]
        return 0.1 * (min(mean) if mode == "per-factor" else mean[0] * mean[1])

    for layer in ("3", "0"):
        for mode in ("tikhonov", "per-factor"):
            lam = lam_for(mode, layer)
            upd = inverse(lam) if mode == "per-factor" else \
                (lambda G, A, W, lam=lam: eig_update(G, A, W, lam))
            for plant in (None, f"{layer}.G"):
                f, _ = kfac_pytorch(net, X, y, plant)
                d = to_theta([upd(f[f"{n}.G"], f[f"{n}.A"], W) for n, W in zip(("0", "3"), V)])
                r = check.validate(net, CE, X, y, "kfac_update", d, convention="kfac-pytorch",
                                   damping=lam, **{**opts, "damping_mode": mode})
                ok = r.passed if layer == "3" else layer_passed(r, "0")
                assert ok != bool(plant), (lam, mode, plant, str(r))


def test_kfac_pytorch_scalars_are_the_derived_monomials(cnn):
    """1/N² on a dense G of a mean cross-entropy, 1/(N²T³) and 1/T² on a convolution's."""
    assert factor_scalars("kfac-pytorch", 1 / N, N, 1, False) == (1.0, 1 / N ** 2)
    sA, sG = factor_scalars("kfac-pytorch", 1 / N, N, T_CONV, True)
    assert np.isclose(sA, T_CONV ** -2) and np.isclose(sG, 1 / (N ** 2 * T_CONV ** 3))


# --------------------------------------------------------------------------- alecwangcq
def sampled_labels(net, X, seed=1):
    with torch.no_grad():
        p = torch.softmax(net(X), 1).numpy()
    rng = np.random.default_rng(seed)
    return torch.tensor([rng.choice(3, p=pi / pi.sum()) for pi in p])


def alecwangcq(net, X, y, labels, plant=False):
    """utils/kfac_utils.py: A = (a/T)ᵀ(a/T)/N; G = (g·N·T)ᵀ(g·N·T)/(N·T) for Conv2d,
    gᵀ(g·N) for Linear — from the sampled labels' backward; the update's gradient from y."""
    facs = {}
    for name, (m, x, g, _) in zip(("0", "3"), hooked(net, X, labels)):
        a, gr, T = rows(m, x, g)
        if isinstance(m, torch.nn.Conv2d):
            a, gr = a / T, gr * N * T
            facs[f"{name}.A"], facs[f"{name}.G"] = a.T @ (a / N), gr.T @ (gr / gr.shape[0])
        else:
            facs[f"{name}.A"], facs[f"{name}.G"] = a.T @ (a / N), gr.T @ (gr * N)
    if plant:
        facs = planted(facs, "3.A")
    return facs, [V for *_, V in hooked(net, X, y)]


def test_alecwangcq_factors_and_update(cnn):
    net, X, y = cnn
    opts = dict(conventions.get("alecwangcq").options)
    labels = sampled_labels(net, X)
    facs, V = alecwangcq(net, X, y, labels)
    kw = dict(convention="alecwangcq", labels=labels.numpy(), **opts)
    assert check.validate(net, CE, X, y, "kfac_factors", facs, **kw).passed
    assert not check.validate(net, CE, X, y, "kfac_factors",
                              alecwangcq(net, X, y, labels, True)[0], **kw).passed
    lam = typical(facs)
    for plant in (False, True):
        f, _ = alecwangcq(net, X, y, labels, plant)
        d = to_theta([eig_update(f[f"{n}.G"], f[f"{n}.A"], W, lam, clamp=1e-10)
                      for n, W in zip(("0", "3"), V)])
        r = check.validate(net, CE, X, y, "kfac_update", d, damping=lam, **kw)
        assert r.passed != plant, (plant, str(r))


def test_alecwangcq_conv_block_is_refngds_expand_block(cnn):
    """A/T and G·T: the scalars cancel, the K-FAC matrix is refngd's (docs/conventions.md)."""
    net, X, y = cnn
    labels = sampled_labels(net, X)
    facs, _ = alecwangcq(net, X, y, labels)
    K = np.kron(facs["0.G"], facs["0.A"])
    ours = check.validate(net, CE, X, y, "kfac_factors", facs, fisher_type="mc",
                          labels=labels.numpy(), bias="joint")
    assert not ours.passed                      # the factors differ from refngd's by T …
    from refngd.check.interop import from_torch, from_torch_loss
    from refngd.curvature import KFAC
    model, theta = from_torch(net)
    f0 = KFAC(model, theta, from_torch_loss(CE), X.numpy(), y.numpy(),
              fisher_type="mc", labels=labels.numpy(), bias="joint").factors()[0]
    assert np.allclose(K, np.kron(f0.G, f0.A), rtol=1e-12, atol=0)  # … their product not


# --------------------------------------------------------------------------- EKFAC-pytorch
def thrandis_covs(net, X, y, loss=CE):
    """kfac.py _compute_covs: gy = grad_output·N; xxt, ggt averaged over the N·T rows."""
    out = []
    for name, (m, x, g, V) in zip(("0", "3"), hooked(net, X, y, loss)):
        a, gr, T = rows(m, x, g)
        gr = gr * N
        out.append((name, a, gr, T, a.T @ a / a.shape[0], gr.T @ gr / gr.shape[0], V))
    return out


def thrandis_kfac_update(net, X, y, lam, pi, plant=False):
    """kfac.py _inv_covs and _precond: eps = λ/T, π = 1 or tr-ratio, then 1/T."""
    blocks = []
    for name, a, gr, T, xxt, ggt, V in thrandis_covs(net, X, y):
        if plant and name == "0":
            ggt = 2 * ggt
        p = 1.0 if not pi else (np.trace(xxt) * len(ggt)) / (np.trace(ggt) * len(xxt))
        eps = lam / T
        ix = np.linalg.inv(xxt + np.sqrt(eps * p) * np.eye(len(xxt)))
        ig = np.linalg.inv(ggt + np.sqrt(eps / p) * np.eye(len(ggt)))
        blocks.append(ig @ V @ ix / T)
    return to_theta(blocks)


@pytest.mark.parametrize("pi", [False, True])
def test_ekfac_pytorch_kfac(cnn, pi):
    net, X, y = cnn
    opts = dict(conventions.get("ekfac-pytorch").options)
    if pi:
        opts["pi"] = "trace"
    covs = thrandis_covs(net, X, y)
    facs = {}
    for name, a, gr, T, xxt, ggt, V in covs:   # the block _precond inverts: T·ggt ⊗ xxt
        facs[f"{name}.A"], facs[f"{name}.G"] = xxt, T * ggt
    assert check.validate(net, CE, X, y, "kfac_factors", facs, convention="ekfac-pytorch",
                          **opts).passed
    assert not check.validate(net, CE, X, y, "kfac_factors", planted(facs, "0.G"),
                              convention="ekfac-pytorch", **opts).passed
    lam = typical(facs)
    for plant in (False, True):
        d = thrandis_kfac_update(net, X, y, lam, pi, plant)
        r = check.validate(net, CE, X, y, "kfac_update", d, convention="ekfac-pytorch",
                           damping=lam, **opts)
        assert r.passed != plant, (pi, plant, str(r))


def thrandis_ekfac_update(net, X, y, lam, plant=False, loss=CE, ra=False):
    """ekfac.py _compute_kfe and _precond_intra: per-sample gradients Σ_t gy ā ᵀ in the
    eigenbases of xxt and ggt, m2 their mean square, g_kfe the mean, / (m2 + λ).  With
    ``ra`` (_precond_ra, alpha=1): m2 stays T·(eigenvalue products) of _compute_kfe."""
    blocks = []
    for name, a, gr, T, xxt, ggt, V in thrandis_covs(net, X, y, loss):
        Ex, QA = np.linalg.eigh(xxt)
        Eg, QG = np.linalg.eigh(ggt)
        per = np.einsum("ntc,ntd->ncd", gr.reshape(N, T, -1), a.reshape(N, T, -1))
        kfe = np.einsum("ci,ncd,dj->nij", QG, per, QA)
        m2 = T * np.outer(Eg, Ex) if ra else (kfe ** 2).mean(0)
        m2 = m2 * (2 if plant and name == "3" else 1)
        g_kfe = QG.T @ V @ QA if ra else kfe.mean(0)   # weight.grad, or from the hooks
        blocks.append(QG @ (g_kfe / (m2 + lam)) @ QA.T)
    return to_theta(blocks)


def _without_factored(options) -> dict:
    """A preset's options less π and the damping split (factored damping's only)."""
    return {k: v for k, v in dict(options).items() if k not in ("pi", "damping_split")}


@pytest.mark.parametrize("lossname", ["ce-mean", "mse-mean"])
def test_ekfac_pytorch_ekfac(cnn, lossname):
    """Intra-batch EKFAC (ra=False) for a mean cross-entropy (N·c = 1) and a mean MSE
    (N·c = 1/C: the diagonal carries the block's scalar)."""
    net, X, y = cnn
    loss, target = CE, y
    if lossname == "mse-mean":
        target = torch.tensor(np.random.default_rng(2).standard_normal((N, 3)))
        loss = torch.nn.MSELoss()
    opts = dict(_without_factored(conventions.get("ekfac-pytorch").options),
                damping_mode="tikhonov")
    lam = 1e-3
    for plant in (False, True):
        d = thrandis_ekfac_update(net, X, target, lam, plant, loss)
        r = check.validate(net, loss, X, target, "ekfac_update", d, convention="ekfac-pytorch",
                           damping=lam, **opts)
        assert r.passed != plant, (plant, str(r))


def test_ekfac_pytorch_running_average_at_alpha_one_is_kfac(cnn):
    """ra=True, alpha=1 keeps m2 = T·E_g E_xᵀ: the K-FAC update, damped on the eigenvalues."""
    net, X, y = cnn
    opts = dict(_without_factored(conventions.get("ekfac-pytorch").options),
                damping_mode="tikhonov")
    for plant in (False, True):
        d = thrandis_ekfac_update(net, X, y, 1e-3, plant, ra=True)
        r = check.validate(net, CE, X, y, "kfac_update", d, convention="ekfac-pytorch",
                           damping=1e-3, **opts)
        assert r.passed != plant, (plant, str(r))


# --------------------------------------------------------------------------- iEF authors
def ief_rows(net, X, y):
    """J_n = ∂(ℓ_n/N)/∂θ (rows of the mean loss's backward) and ‖∂L/∂z_n‖."""
    params = list(net.parameters())
    J = []
    for n in range(N):
        net.zero_grad()
        (CE(net(X[n:n + 1]), y[n:n + 1]) / N).backward()
        J.append(np.concatenate([p.grad.reshape(-1).numpy() for p in params]))
    Z = net(X).detach().requires_grad_(True)
    e, = torch.autograd.grad(CE(Z, y), Z)
    return np.array(J), np.linalg.norm(e.numpy(), axis=1)


@pytest.mark.parametrize("quantity", ["ief_update", "ef_update"])
def test_ief_authors_updates(cnn, quantity):
    net, X, y = cnn
    opts = dict(conventions.get("ief-authors").options)
    J, lgn = ief_rows(net, X, y)
    C = J @ J.T
    lam = 1e-3 * np.trace(C) / N
    t = lgn ** 2 if quantity == "ief_update" else np.ones(N)   # opt_flag iEFlg2 / iEF0
    for plant in (False, True):
        d = J.T @ np.linalg.solve(C + lam * np.eye(N), t * (2 if plant else 1))
        r = check.validate(net, CE, X, y, quantity, d, convention="ief-authors", damping=lam,
                           **opts)
        assert r.passed != plant, (quantity, plant, str(r))


def test_ief_authors_rows_are_the_reduced_losses(cnn):
    net, X, y = cnn
    J, _ = ief_rows(net, X, y)
    assert check.validate(net, CE, X, y, "per_sample_gradients", J,
                          convention="ief-authors").passed
    assert not check.validate(net, CE, X, y, "per_sample_gradients", J).passed


# --------------------------------------------------------------------------- registry
def test_public_presets_cite_file_and_commit():
    for name in PUBLIC:
        conv = conventions.get(name)
        text = conventions.describe(name)
        assert name in text and "transcribed" in text and "test_conventions_public" in text
        assert all(len(s.rsplit("@ ", 1)[-1]) == 40 for s in conv.sources), conv.sources
        assert "options its code uses" in text
        assert name in conventions.names()



# --------------------------------------------------------------------------- other losses
def code_factors(name, net, X, y, loss):
    """Each K-FAC code's factor formulas, for any loss (N·c ≠ 1 shows what a mean
    cross-entropy hides): kfac-pytorch get_cov, alecwangcq ComputeCov*, EKFAC-pytorch
    _compute_covs (G reported as T·ggt)."""
    facs = {}
    for lname, (m, x, g, _) in zip(("0", "3"), hooked(net, X, y, loss)):
        a, gr, T = rows(m, x, g)
        conv = isinstance(m, torch.nn.Conv2d)
        if name == "kfac-pytorch":
            a, gr = (a / T, gr / T) if conv else (a, gr)
            A, G = a.T @ a / len(a), gr.T @ gr / len(gr)
        elif name == "alecwangcq":
            A = (a / T).T @ (a / T) / N if conv else a.T @ a / N
            G = (gr * N * T).T @ (gr * N * T) / len(gr) if conv else gr.T @ (gr * N)
        else:
            A, G = a.T @ a / len(a), T * ((gr * N).T @ (gr * N) / len(gr))
        facs[f"{lname}.A"], facs[f"{lname}.G"] = A, G
    return facs


@pytest.mark.parametrize("name", ["kfac-pytorch", "alecwangcq", "ekfac-pytorch"])
@pytest.mark.parametrize("lossname", ["mse-mean", "ce-sum"])
def test_factor_scalars_carry_c(cnn, name, lossname):
    """The scalars are monomials in N, T and c: with MSELoss('mean') (c = 1/(N·C)) and
    CrossEntropyLoss('sum') (c = 1) they are not the mean cross-entropy's."""
    net, X, y = cnn
    if lossname == "mse-mean":
        target = torch.tensor(np.random.default_rng(2).standard_normal((N, 3)))
        loss = torch.nn.MSELoss()
    else:
        loss, target = torch.nn.CrossEntropyLoss(reduction="sum"), y
    facs = code_factors(name, net, X, target, loss)
    kw = dict(convention=name, fisher_type="empirical", bias="joint")
    r = check.validate(net, loss, X, target, "kfac_factors", facs, **kw)
    assert r.passed, str(r)
    assert not check.validate(net, loss, X, target, "kfac_factors", planted(facs, "3.G"),
                              **kw).passed
    K = check.validate(net, loss, X, target, "kfac", _block_diag(facs), **kw)
    assert K.passed, str(K)     # the P × P K-FAC matrix: a dense construction of the same


def _block_diag(facs):
    """diag(G₀ ⊗ A₀, G₃ ⊗ A₃) reordered from the joint [W | b] layout to θ's (W then b)."""
    mats = []
    for n in ("0", "3"):
        G, A = facs[f"{n}.G"], facs[f"{n}.A"]
        d_out, d_a = len(G), len(A)
        idx = np.arange(d_out * d_a).reshape(d_out, d_a)
        perm = np.concatenate([idx[:, :-1].reshape(-1), idx[:, -1]])
        mats.append(np.kron(G, A)[np.ix_(perm, perm)])
    P = sum(len(m) for m in mats)
    out, i = np.zeros((P, P)), 0
    for m in mats:
        out[i:i + len(m), i:i + len(m)] = m
        i += len(m)
    return out


def test_kfac_pytorch_linear_on_sequences():
    """kfac-pytorch flattens a Linear layer's leading axes (N·T rows) and averages over them:
    A is refngd's expand A, G = c/(N·T) × refngd's expand G (no 1/T on the rows)."""
    from refngd import nn
    from refngd.losses import MSELoss, PerToken

    n, T, D, H, C = 5, 4, 3, 4, 2
    model = nn.Sequential(nn.Linear(D, H), nn.Linear(H, C), nn.Flatten())
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((n, T, D)), rng.standard_normal((n, T, C))
    theta, loss = model.init(rng), PerToken(MSELoss(), T)
    W1, b1 = theta[:H * D].reshape(H, D), theta[H * D:H * D + H]
    W2 = theta[16:16 + C * H].reshape(C, H)
    h = X @ W1.T + b1
    Z = model.forward(theta, X)
    g2 = (loss.scale(Z) * loss.output_gradient(Z, y)).reshape(n, T, C)  # the hook's grad_output
    g1 = g2 @ W2
    facs = {}
    for name, a, g in (("0", X, g1), ("1", h, g2)):
        a = np.concatenate([a.reshape(n * T, -1), np.ones((n * T, 1))], 1)
        g = g.reshape(n * T, -1)
        facs[f"{name}.A"], facs[f"{name}.G"] = a.T @ a / (n * T), g.T @ g / (n * T)
    kw = dict(convention="kfac-pytorch", fisher_type="empirical", bias="joint")
    assert check.validate((model, theta), loss, X, y, "kfac_factors", facs, **kw).passed
    assert not check.validate((model, theta), loss, X, y, "kfac_factors",
                              planted(facs, "1.G"), **kw).passed
