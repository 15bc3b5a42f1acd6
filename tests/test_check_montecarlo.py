"""Monte-Carlo quantities in ``check.validate`` (issue 19, item 3).

The candidates are built with torch autograd from labels torch samples itself (no refngd
code): K-FAC factors A = (1/N) Σ ā āᵀ and G = (1/(N·K)) Σ_{n,k} b̂_nk b̂_nkᵀ, with b̂ the
gradient of the summed loss at the sampled labels with respect to each layer's output,
and the sampled Fisher from the Jacobian.

* with ``labels=`` (the candidate's own draws) the comparison is exact;
* without them a correct candidate passes at the stated false-alarm rate — measured here
  on fixed seeds: 0 of 100 correct factor candidates and 0 of 40 correct updates (20 K-FAC,
  20 EKFAC) fail (the bound the report states is Cantelli's 1/(1 + 6²) ≈ 2.7%) — and a
  planted factor 2 fails.
"""
from __future__ import annotations

import numpy as np
import pytest

from refngd import check, updates
from refngd.check.montecarlo import TRIALS, Z

torch = pytest.importorskip("torch")
from refngd import interop  # noqa: E402

N, K = 32, 4
CE = torch.nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(),
                              torch.nn.Linear(6, 3)).double()
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((N, 4)), rng.integers(0, 3, N)
    return net, X, y


def draw_labels(net, X, K, seed):
    """K labels per input from the model's softmax, drawn by torch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        p = torch.softmax(net(torch.tensor(X)), dim=1)
    return torch.multinomial(p, K, replacement=True, generator=g).numpy()


def torch_mc_factors(net, X, labels):
    """MC K-FAC factors of the two Linear layers (bias separate) from torch autograd."""
    x = torch.tensor(X)
    a1 = x
    s1 = net[0](a1)
    a2 = net[1](s1)
    s2 = net[2](a2)
    n, k = labels.shape
    G1, G2 = torch.zeros(6, 6, dtype=x.dtype), torch.zeros(3, 3, dtype=x.dtype)
    for j in range(k):
        loss = torch.nn.functional.cross_entropy(s2, torch.tensor(labels[:, j]),
                                                 reduction="sum")
        b1, b2 = torch.autograd.grad(loss, [s1, s2], retain_graph=True)
        G1 += b1.T @ b1
        G2 += b2.T @ b2
    A1 = (a1.T @ a1) / n
    A2 = (a2.T @ a2).detach() / n
    return {"0.A": A1.numpy(), "0.G": (G1 / (n * k)).numpy(),
            "2.A": A2.numpy(), "2.G": (G2 / (n * k)).numpy()}


def test_labels_make_the_mc_comparison_exact(mlp):
    net, X, y = mlp
    labels = draw_labels(net, X, K, seed=0)
    cand = torch_mc_factors(net, X, labels)
    r = check.validate(net, CE, X, y, "kfac_factors", cand, fisher_type="mc", labels=labels)
    assert r.passed and r.rtol == 1e-10 and "Monte-Carlo" not in str(r)
    bad = dict(cand, **{"2.G": 2 * cand["2.G"]})
    r = check.validate(net, CE, X, y, "kfac_factors", bad, fisher_type="mc", labels=labels)
    assert not r.passed and "2.G" in r.diagnosis and "factor 2" in r.diagnosis
    # one draw per sample may drop the K axis
    one = labels[:, :1]
    cand1 = torch_mc_factors(net, X, one)
    assert check.validate(net, CE, X, y, "kfac_factors", cand1, fisher_type="mc",
                          labels=one[:, 0]).passed
    # the sampled Fisher at the same draws, from torch's Jacobian
    params = {k: v.detach() for k, v in net.named_parameters()}
    J = torch.func.jacrev(lambda p: torch.func.functional_call(net, p, (torch.tensor(X),)))(params)
    Jm = torch.cat([J[k].reshape(N, 3, -1) for k in params], dim=2).numpy()
    with torch.no_grad():
        P = torch.softmax(net(torch.tensor(X)), dim=1).numpy()
    E = P[:, None, :] - np.eye(3)[labels]                            # (N, K, C)
    U = np.einsum("nkc,ncp->nkp", E, Jm).reshape(N * K, -1)
    F_hat = U.T @ U / (N * K)
    assert check.validate(net, CE, X, y, "sampled_fisher", F_hat, labels=labels).passed
    # an update at the candidate's draws is exact too
    model, theta = interop.from_torch(net)
    d = updates.kfac(model, theta, interop.from_torch_loss(CE), X, y, 0.1, fisher_type="mc",
                     labels=labels)
    assert check.validate(net, CE, X, y, "kfac_update", d, fisher_type="mc", labels=labels,
                          damping=0.1).passed


def test_correct_mc_factors_pass_at_the_stated_rate(mlp):
    """100 independent correct candidates (torch's draws, seeds 1..100): none fails."""
    net, X, y = mlp
    fails = 0
    for seed in range(1, 101):
        cand = torch_mc_factors(net, X, draw_labels(net, X, K, seed))
        r = check.validate(net, CE, X, y, "kfac_factors", cand, fisher_type="mc", mc_samples=K)
        fails += not r.passed
    assert fails == 0
    text = str(r)
    assert "Monte-Carlo" in text and f"mean + {Z:g} sd" in text and f"own {TRIALS}" in text
    assert "tolerance per block" in text and "labels=" in text


def test_planted_factor_two_fails(mlp):
    net, X, y = mlp
    for seed in range(1, 11):
        cand = torch_mc_factors(net, X, draw_labels(net, X, K, seed))
        for key in ("0.G", "2.G", "0.A"):
            bad = dict(cand, **{key: 2 * cand[key]})
            r = check.validate(net, CE, X, y, "kfac_factors", bad, fisher_type="mc",
                               mc_samples=K)
            assert not r.passed and r.failed[0].name == key
            assert "factor 2" in r.diagnosis


def test_mc_updates(mlp):
    """20 correct MC updates (refngd's estimator at seeds the check does not use) pass, the
    same updates doubled fail; the tolerance comes from the update's own spread."""
    net, X, y = mlp
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(CE)
    fails = caught = 0
    for seed in range(1000, 1020):
        labels = draw_labels(net, X, K, seed)
        for method in ("kfac", "ekfac"):
            d = getattr(updates, method)(model, theta, loss, X, y, 0.1, fisher_type="mc",
                                         labels=labels)
            kw = dict(fisher_type="mc", mc_samples=K, damping=0.1)
            fails += not check.validate(net, CE, X, y, f"{method}_update", d, **kw).passed
            caught += not check.validate(net, CE, X, y, f"{method}_update", 2 * d, **kw).passed
    assert fails == 0 and caught == 40


def test_planted_factor_two_in_an_mc_update_fails():
    """The docs' MLP, N = 32, K = 1, factored damping π = 1: a hook-style update with G of
    the last layer doubled moves that block by ≈ 0.4 relative, inside the error test's
    tolerance (≈ 0.77); the scalar test catches it (measured 98/100; here ≥ 18/20), and the
    correct updates pass."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, lam = 32, 1e-2
    net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 4)).double()
    X, y = torch.tensor(rng.standard_normal((n, 6))), torch.tensor(rng.integers(0, 4, n))
    net.zero_grad()
    CE(net(X), y).backward()
    grads = [p.grad.clone() for p in net.parameters()]

    def update(labels, double):
        a1, s1 = X, net[0](X)
        a2 = net[1](s1)
        s2 = net[2](a2)
        loss = torch.nn.functional.cross_entropy(s2, labels, reduction="sum")
        b1, b2 = torch.autograd.grad(loss, [s1, s2])
        out = []
        for i, (a, b) in enumerate([(a1, b1), (a2.detach(), b2)]):
            A, G = a.T @ a / n, b.T @ b / n * (2 if double and i == 1 else 1)
            eG, eA = (torch.eye(len(M), dtype=M.dtype) * lam ** .5 for M in (G, A))
            gW, gb = grads[2 * i], grads[2 * i + 1]
            out += [(torch.linalg.solve(G + eG, gW) @ torch.linalg.inv(A + eA)).reshape(-1),
                    torch.linalg.solve(G + eG, gb) / (1 + lam ** .5)]
        return torch.cat(out).detach()

    kw = dict(damping=lam, fisher_type="mc", damping_mode="factored", pi=1.0)
    fails = caught = 0
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            labels = torch.multinomial(torch.softmax(net(X), 1), 1, generator=g)[:, 0]
        fails += not check.validate(net, CE, X, y, "kfac_update", update(labels, False),
                                    **kw).passed
        r = check.validate(net, CE, X, y, "kfac_update", update(labels, True), **kw)
        caught += not r.passed
    assert fails == 0 and caught >= 18
    assert r.passed or "scale against the expectation" in r.diagnosis
