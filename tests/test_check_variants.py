"""``check.validate`` on the conventions of issue 19 (items 2, 4, 5 and the Conv2d bias).

* damping variants: a candidate damped per variant (written out with ``numpy.kron`` from
  the factors) passes under that variant's options and is named under the default;
* scalars that cancel between A and G are recognised per layer as the same K-FAC block;
  T is explained by the factor it multiplies, never as "expand vs reduce";
* a Conv2d with a bias under ``bias="separate"``: joint vs separate bias, also when the
  rest of the factor differs by a scalar;
* θ at the time of the candidate: ``theta=`` (vector or state_dict), and the note when the
  module's weights moved after the backward pass.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from refngd import check, updates
from refngd.cli import main
from refngd.curvature import KFAC

torch = pytest.importorskip("torch")
from refngd import interop  # noqa: E402

N = 6
CE = torch.nn.CrossEntropyLoss()


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(48, 3)).double()
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((N, 2, 4, 4)), rng.integers(0, 3, N)
    model, theta = interop.from_torch(net)
    return net, model, theta, X, y


def factors(K, names=("0", "3")):
    return {f"{n}.{s}": getattr(f, s) for f, n in zip(K.factors(), names) for s in "AG"}


def damped_update(K, g, shifts):
    """vec((G + γ_G I)⁻¹ V (A + γ_A I)⁻¹) per block, written out (bias separate)."""
    d = np.zeros_like(g)
    for f, T in zip(K.factors(), (16, 1)):
        nb = f.G.shape[0]
        for A, a, b in ((f.A, f.start, f.stop - nb), (np.ones((1, 1)), f.stop - nb, f.stop)):
            gA, gG = shifts(A, f.G, T)
            V = g[a:b].reshape(nb, -1)
            W = np.linalg.solve(f.G + gG * np.eye(nb), V)
            d[a:b] = np.linalg.solve(A + gA * np.eye(len(A)), W.T).T.reshape(-1)
    return d


def pi_trace(A, G):
    return np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))


LAM = 0.05
CASES = {
    "factored pi=1": (dict(damping_mode="factored", pi=1.0), lambda A, G, T: (LAM ** .5,) * 2,
                      "π = 1"),
    "locations pi=1": (dict(damping_mode="factored", pi=1.0, damping_split="locations"),
                       lambda A, G, T: ((LAM / T) ** .5, (LAM * T) ** .5), "λ/T per location"),
    "per-factor λ": (dict(damping_mode="per-factor"), lambda A, G, T: (LAM, LAM),
                     "λ on each factor"),
    "trace": (dict(damping_mode="factored"),
              lambda A, G, T: (pi_trace(A, G) * LAM ** .5, LAM ** .5 / pi_trace(A, G)),
              "trace-norm π"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_damping_variants_validate(cnn, name):
    net, model, theta, X, y = cnn
    kw, shifts, named = CASES[name]
    loss = interop.from_torch_loss(CE)
    K = KFAC(model, theta, loss, X, y)
    g = updates.sgd(model, theta, loss, X, y)
    d = damped_update(K, g, shifts)
    assert check.validate(net, CE, X, y, "kfac_update", d, damping=LAM, **kw).passed
    r = check.validate(net, CE, X, y, "kfac_update", d, damping=LAM)   # Tikhonov meant
    assert not r.passed and named in r.diagnosis and "Tikhonov damping was meant" in r.diagnosis


def test_per_factor_pair_validates(cnn):
    net, model, theta, X, y = cnn
    K = KFAC(model, theta, interop.from_torch_loss(CE), X, y)
    g = updates.sgd(model, theta, interop.from_torch_loss(CE), X, y)
    d = damped_update(K, g, lambda A, G, T: (0.02, 0.3))
    r = check.validate(net, CE, X, y, "kfac_update", d, damping=(0.02, 0.3),
                       damping_mode="per-factor")
    assert r.passed
    assert not check.validate(net, CE, X, y, "kfac_update", d, damping=(0.3, 0.02),
                              damping_mode="per-factor").passed
    with pytest.raises(ValueError, match="per-factor"):
        check.validate(net, CE, X, y, "kfac_update", d, damping=(0.02, 0.3))


def test_scalars_that_cancel_are_the_same_block(cnn):
    net, model, theta, X, y = cnn
    f = factors(KFAC(model, theta, interop.from_torch_loss(CE), X, y))
    moved = dict(f, **{"0.A": f["0.A"] / 16, "0.G": f["0.G"] * 16})
    d = check.validate(net, CE, X, y, "kfac_factors", moved).diagnosis
    assert d.startswith("layer '0': the same K-FAC block") and "T = 16 moved from A to G" in d
    assert d.count("layer '0'") == 1 and "expand" not in d
    # the K-FAC matrix of the moved factors is refngd's
    K = KFAC(model, theta, interop.from_torch_loss(CE), X, y)
    assert check.validate(net, CE, X, y, "kfac", K.dense()).passed
    # a scalar on one factor alone: explained by the factor, not as expand vs reduce
    for key, word in (("0.A", "A summed over the T locations"),
                      ("0.G", "G averaged over the T locations")):
        c = dict(f, **{key: f[key] * (16 if key == "0.G" else 1 / 16)})
        d = check.validate(net, CE, X, y, "kfac_factors", c).diagnosis
        assert "T = 16" in d.replace("1/T = 1/16", "T = 16") and word in d
        assert "expand vs reduce" not in d


def test_conv_bias_is_joint_vs_separate(cnn):
    net, model, theta, X, y = cnn
    J = factors(KFAC(model, theta, interop.from_torch_loss(CE), X, y, bias="joint"))
    J["0.A"] = J["0.A"] * 16          # and the conv's A summed over its 16 locations
    d = check.validate(net, CE, X, y, "kfac_factors", J).diagnosis
    assert "joint vs separate bias" in d and "where none belongs" not in d
    assert "without that column, a constant factor T = 16" in d


def test_theta_at_the_time_of_the_candidate(cnn):
    net0, model, theta, X, y = cnn
    net = copy.deepcopy(net0)
    saved_vec = torch.nn.utils.parameters_to_vector(net.parameters()).detach().clone()
    saved_sd = copy.deepcopy(net.state_dict())
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    opt.zero_grad()
    CE(net(torch.tensor(X)), torch.tensor(y)).backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).clone()
    assert check.validate(net, CE, X, y, "gradient", g).passed       # the safe order
    opt.step()                                                        # the weights move
    r = check.validate(net, CE, X, y, "gradient", g)
    assert not r.passed and "optimizer.step()" in str(r) and "theta=" in str(r)
    assert check.validate(net, CE, X, y, "gradient", g, theta=saved_vec).passed
    assert check.validate(net, CE, X, y, "gradient", g, theta=saved_sd).passed
    assert check.validate((model, net_theta(net)), CE, X, y, "gradient", g,
                          theta=saved_vec.numpy()).passed
    with pytest.raises(ValueError, match="state_dict"):
        check.validate(net, CE, X, y, "gradient", g, theta=saved_vec[:-1])
    with pytest.raises(ValueError, match="no"):
        check.validate(net, CE, X, y, "gradient", g, theta={"0.weight": saved_sd["0.weight"]})
    # no note when p.grad is this batch's gradient at the current weights
    opt.zero_grad()
    CE(net(torch.tensor(X)), torch.tensor(y)).backward()
    r = check.validate(net, CE, X, y, "gradient", 3 * g)
    assert not r.passed and "optimizer.step()" not in str(r)


def net_theta(net):
    return interop.from_torch(net)[1]


def write_check_files(tmp_path, theta, X, y):
    """The cnn fixture's architecture, weights and batch as `refngd check` reads them; the
    command line's first arguments."""
    arch = {"layers": [{"type": "Conv2d", "in_channels": 2, "out_channels": 3,
                        "kernel_size": 3, "padding": 1}, {"type": "ReLU"}, {"type": "Flatten"},
                       {"type": "Linear", "in_features": 48, "out_features": 3}],
            "loss": {"type": "CrossEntropyLoss", "reduction": "mean"}}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    np.savez(tmp_path / "w.npz", theta=theta)
    np.savez(tmp_path / "b.npz", X=X, y=y)
    return ["check", "--arch", str(tmp_path / "arch.json"), "--weights", str(tmp_path / "w.npz"),
            "--batch", str(tmp_path / "b.npz")]


def test_cli_damping_variants_and_labels(cnn, tmp_path, capsys):
    net, model, theta, X, y = cnn
    base = write_check_files(tmp_path, theta, X, y)
    loss = interop.from_torch_loss(CE)
    K = KFAC(model, theta, loss, X, y)
    g = updates.sgd(model, theta, loss, X, y)
    d = damped_update(K, g, lambda A, G, T: ((LAM / T) ** .5, (LAM * T) ** .5))
    np.savez(tmp_path / "d.npz", candidate=d)
    assert main(base + ["--candidate", str(tmp_path / "d.npz"), "--quantity", "kfac_update",
                        "--damping", str(LAM), "--damping-mode", "factored", "--pi", "1",
                        "--damping-split", "locations"]) == 0
    d2 = damped_update(K, g, lambda A, G, T: (0.02, 0.3))
    np.savez(tmp_path / "d2.npz", candidate=d2)
    assert main(base + ["--candidate", str(tmp_path / "d2.npz"), "--quantity", "kfac_update",
                        "--damping-mode", "per-factor", "--factor-damping", "0.02", "0.3"]) == 0
    labels = np.random.default_rng(4).integers(0, 3, (N, 2))
    Kmc = KFAC(model, theta, loss, X, y, fisher_type="mc", labels=labels)
    np.savez(tmp_path / "f.npz", **factors(Kmc))
    np.savez(tmp_path / "l.npz", labels=labels)
    assert main(base + ["--candidate", str(tmp_path / "f.npz"), "--quantity", "kfac_factors",
                        "--fisher-type", "mc", "--labels", str(tmp_path / "l.npz")]) == 0
    with pytest.raises(SystemExit) as exit_:  # argparse: a usage error is status 2
        main(base + ["--candidate", str(tmp_path / "d.npz"), "--quantity", "kfac_update",
                     "--pi", "norm", "--damping", "0.1"])
    assert exit_.value.code == 2 and "'trace' or a number" in capsys.readouterr().err


def test_cli_rejects_pi_under_tikhonov(cnn, tmp_path, capsys):
    """``--pi`` with the default Tikhonov damping: an error, not a silently unused option."""
    net, model, theta, X, y = cnn
    base = write_check_files(tmp_path, theta, X, y)
    d = updates.kfac(model, theta, interop.from_torch_loss(CE), X, y, LAM)
    np.savez(tmp_path / "d.npz", candidate=d)
    assert main(base + ["--candidate", str(tmp_path / "d.npz"), "--quantity", "kfac_update",
                        "--damping", str(LAM), "--pi", "1"]) == 2
    assert "does not use it" in capsys.readouterr().err
