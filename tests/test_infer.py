"""``check.infer``: named conventions, planted bugs, the report's words, bad input, the CLI.

The synthetic suite (test_infer_synthetic.py) draws 200+ conventions at random; here each
behaviour the issue names is pinned on one hand-built case:

* the tutorial's aggregated-gradient factors with an EMA's (1 − β) are recognised as the
  "tutorial" convention; a preset whose value *is* the candidate is named (asdl);
* several option differences at once (empirical Fisher, joint bias, factored damping with
  π = 1, factors N² × smaller) come back as one convention with "damping": "N^2*lambda";
* scalars named per layer (a factor T moved from A to G of a convolution);
* float32 arithmetic inside a float64 candidate;
* planted bugs — the preconditioner applied to the transposed gradient, factors of the
  wrong layer, a missing EMA bias-correction — fail with the nearest convention and the
  differing blocks by layer;
* the scalar names (refngd.check.scalars) against hand-computed values.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from infer_helpers import N, cnn, mlp, rel
from refngd import check, conventions, updates
from refngd.check import Inference, infer, scalars
from refngd.cli import main
from refngd.curvature import KFAC

LAM = 0.1


@pytest.fixture(scope="module")
def small():
    model, theta, loss, X, y, names = mlp()
    return model, theta, loss, X, y, names, Inference((model, theta), loss, X, y)


def factors(K, names, sA=1.0, sG=1.0):
    return {f"{n}.{s}": getattr(f, s) * (sA if s == "A" else sG)
            for f, n in zip(K.factors(), names) for s in "AG"}


# ------------------------------------------------------------------------- scalars
def test_monomial_names():
    ctx = scalars.sizes(N=32, C=4, T=16)
    assert str(scalars.name(1 / 32 ** 2, ctx, 1e-9)[0]) == "1/N^2"
    assert str(scalars.name(1 / (32 ** 2 * 16 ** 3), ctx, 1e-9)[0]) == "1/(N^2*T^3)"
    assert str(scalars.name(0.01, ctx, 1e-9)[0]) == "(1-0.99)"
    assert {str(m) for m in scalars.name(16 ** -0.5, ctx, 1e-9, half=True)} >= {"1/C",
                                                                               "1/T^0.5"}
    assert scalars.name(1.37, ctx, 1e-9) == []
    assert scalars.name(-1.0, ctx, 1e-9) == []
    m = scalars.name(32 * 16 / 4, ctx, 1e-12)[0]
    assert abs(m.value - 128) < 1e-12


# ------------------------------------------------------------------------- conventions
def test_tutorial_with_ema_is_named_tutorial(small):
    model, theta, loss, X, y, names, inf = small
    K = KFAC(model, theta, loss, X, y, convention="tutorial")
    r = inf.infer("kfac_factors", factors(K, names, 0.01, 0.01))
    assert r.passed and r.convention["convention"] == "tutorial"
    assert r.convention["scale"] == "(1-0.99)"
    assert "tutorial" in r.summary
    K95 = factors(K, names, 0.05, 0.05)
    r = infer((model, theta), loss, X, y, "kfac_factors", K95, ema_beta=0.95)
    assert r.passed and r.convention["scale"] == "(1-0.95)"


def test_backpack_per_sample_gradients_are_named(small):
    model, theta, loss, X, y, names, inf = small
    from refngd.derivatives import per_sample_gradients

    r = inf.infer("per_sample_gradients", per_sample_gradients(model, theta, loss, X, y) / N)
    assert r.passed and r.convention["convention"] == "backpack"   # BatchGrad: c·g_n
    with pytest.raises(ValueError, match="labels="):
        inf.infer("sampled_fisher", np.eye(theta.size))


def test_several_differences_at_once(small):
    model, theta, loss, X, y, names, inf = small
    d = N ** 2 * updates.kfac(model, theta, loss, X, y, N ** 2 * LAM, fisher_type="empirical",
                              bias="joint", damping_mode="factored", pi=1.0)
    r = inf.infer("kfac_update", d, LAM)
    assert r.passed, r.summary
    c = r.convention
    assert (c["fisher_type"], c["bias"], c["damping_mode"], c["pi"]) == \
        ("empirical", "joint", "factored", 1.0)
    assert c["scale"] == "N^2" and c["damping"] == "N^2*lambda"
    assert r.residual <= 1e-10 and "N^2*lambda" in r.summary
    assert "empirical Fisher" in r.summary and "joint bias" in r.summary


def test_per_factor_pair_and_named_preset(small):
    model, theta, loss, X, y, names, inf = small
    d = updates.kfac(model, theta, loss, X, y, (LAM, 2 * LAM), damping_mode="per-factor")
    r = inf.infer("kfac_update", d, (LAM, 2 * LAM))
    assert r.passed and r.convention["damping_mode"] == "per-factor"
    assert r.convention["damping"] == "(lambda_A, lambda_G)"
    model, theta, mse, X, Y, names = mlp("mse")                # asdl's Fisher: C/2 × refngd's
    asdl = KFAC(model, theta, mse, X, Y, convention="asdl").dense()
    r = infer((model, theta), mse, X, Y, "kfac", asdl)
    assert r.passed and r.convention["scale"] == "1"             # relative to the preset
    assert r.convention["convention"] in ("asdl", "nngeometry")  # the same α = ½/(N·c)
    assert "C/2 × refngd's" in r.summary
    assert "'asdl'" in r.summary and conventions.get("asdl").loss_scale == "per-example-mean"


def test_moved_scalar_per_layer_in_a_cnn():
    model, theta, loss, X, y, names = cnn()
    K = KFAC(model, theta, loss, X, y)
    f = factors(K, names)
    f["0.A"], f["0.G"] = f["0.A"] / 16, f["0.G"] * 16     # A averaged over T, G summed
    r = infer((model, theta), loss, X, y, "kfac_factors", f)
    assert r.passed
    # the public preset 'alecwangcq' divides A by T and multiplies G by T for convolutions:
    # infer names it, and says what the scalars are relative to refngd's own convention
    if r.convention.get("convention") == "alecwangcq":
        assert r.convention["scale"] == "1"
    else:
        assert r.convention["scale"] == {"0.A": "1/T", "0.G": "T", "3.A": "1", "3.G": "1"}
    assert "layer '0': the same K-FAC block G ⊗ A — a factor T moved from A to G" in r.summary


def test_float32_arithmetic_in_a_float64_candidate(small):
    model, theta, loss, X, y, names, inf = small
    d = updates.kfac(model, theta, loss, X, y, LAM)
    d32 = d.astype(np.float32).astype(np.float64)
    r = inf.infer("kfac_update", d32, LAM)
    assert r.passed and r.convention["arithmetic"] == "float32"
    assert "float32" in r.summary and r.residual > 1e-10


def test_alternatives_when_the_data_cannot_tell(small):
    model, theta, loss, X, y, names, inf = small
    # EF's Gram form at λ is its Tikhonov form at c·λ (push-through): the same numbers
    d = updates.ef(model, theta, loss, X, y, LAM, form="gram")
    r = inf.infer("ef_update", d, LAM)
    assert r.passed and r.convention["form"] == "gram" and r.convention["damping"] == "lambda"
    assert {"form": "tikhonov", "damping": "lambda/N", "scale": "1"}.items() <= \
        r.alternatives[0].items()
    assert "cannot tell" in r.summary
    K = KFAC(model, theta, loss, X[:1], y[:1], fisher_type="empirical")
    one = infer((model, theta), loss, X[:1], y[:1], "kfac_factors", factors(K, names))
    assert one.passed and "N = 1" in one.summary


# ------------------------------------------------------------------------- planted bugs
def test_transposed_gradient_fails(small):
    model, theta, loss, X, y, names, inf = small
    F = KFAC(model, theta, loss, X, y)
    g = updates.sgd(model, theta, loss, X, y)
    gt = g.copy()
    gt[:12] = g[:12].reshape(3, 4).T.reshape(-1)   # layer 0's (4, 3) weight read as (3, 4)ᵀ
    r = inf.infer("kfac_update", F.solve(gt, LAM), LAM)
    assert not r.passed
    assert "0.weight" in r.differing and "2.weight" not in r.differing
    assert r.convention["fisher_type"] == "type-2"    # the nearest: the right options
    assert "0.weight" in r.summary and "nearest" in r.summary


def test_factors_of_the_wrong_layer_fail():
    from refngd import nn
    from refngd.losses import CrossEntropy

    rng = np.random.default_rng(3)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
    theta, loss = model.init(rng), CrossEntropy()
    X, y = rng.standard_normal((N, 4)), rng.integers(0, 4, N)
    f = factors(KFAC(model, theta, loss, X, y), ("0", "2"))
    f["0.G"], f["2.G"] = f["2.G"], f["0.G"]
    r = infer((model, theta), loss, X, y, "kfac_factors", f)
    assert not r.passed
    assert set(r.differing) == {"0.G", "2.G"}
    assert r.convention["fisher_type"] == "type-2" and r.convention["bias"] == "separate"


def test_missing_ema_bias_correction_fails(small):
    model, theta, loss, X, y, names, inf = small
    K = KFAC(model, theta, loss, X, y, fisher_type="empirical")
    beta, steps = 0.9, 3
    ema = {k: (1 - beta ** steps) * v for k, v in factors(K, names).items()}  # no ÷(1 − β^t)
    r = inf.infer("kfac_factors", ema)
    assert not r.passed
    assert r.convention["fisher_type"] == "empirical"
    assert set(r.differing) == set(ema)
    assert "0.271" in r.summary


# ------------------------------------------------------------------------- bad input
def test_bad_input(small):
    model, theta, loss, X, y, names, inf = small
    with pytest.raises(TypeError, match="known options"):
        Inference((model, theta), loss, X, y, dampng_mode="factored")
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        Inference((model, theta), loss, X, y, damping_mode="factorised")
    with pytest.raises(ValueError, match="pass damping="):
        inf.infer("kfac_update", np.zeros(theta.size))
    with pytest.raises(ValueError, match="gamma"):
        inf.infer("gamma", 1.0)
    with pytest.raises(ValueError, match="labels="):
        Inference((model, theta), loss, X, y, fisher_type="mc")
    with pytest.raises(ValueError, match=r"\(P,\) vector"):
        inf.infer("kfac_update", np.zeros(3), LAM)
    with pytest.raises(ValueError, match="shapes"):
        inf.infer("fisher", np.zeros((3, 3)))


def test_known_options_are_kept(small):
    model, theta, loss, X, y, names, inf = small
    d = updates.kfac(model, theta, loss, X, y, LAM, damping_mode="factored")
    r = infer((model, theta), loss, X, y, "kfac_update", d, LAM, damping_mode="tikhonov")
    assert not r.passed and r.convention["damping_mode"] == "tikhonov"
    d = updates.kfac(model, theta, loss, X, y, LAM, damping_mode="factored", pi=0.5)
    r = infer((model, theta), loss, X, y, "kfac_update", d, LAM, pi=0.5)
    assert r.passed and r.convention["pi"] == 0.5
    assert not infer((model, theta), loss, X, y, "kfac_update", d, LAM, pi=2.0).passed


def test_torch_module_and_mc_labels():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3)).double()
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((N, 3)), rng.integers(0, 3, N)
    ce = torch.nn.CrossEntropyLoss()
    from refngd import interop

    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(ce)
    labels = rng.integers(0, 3, N)
    K = KFAC(model, theta, loss, X, y, fisher_type="mc", labels=labels, bias="joint")
    r = infer(net, ce, X, y, "kfac_factors", factors(K, ("0", "2")), labels=labels)
    assert r.passed and r.convention["fisher_type"] == "mc" and r.convention["bias"] == "joint"


# ------------------------------------------------------------------------- CLI
def test_cli_infer(tmp_path, capsys):
    arch = {"layers": [{"type": "Linear", "in_features": 3, "out_features": 4},
                       {"type": "Tanh"},
                       {"type": "Linear", "in_features": 4, "out_features": 3}],
            "loss": {"type": "CrossEntropyLoss", "reduction": "mean"}}
    model, theta, loss, X, y, names = mlp()
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    np.savez(tmp_path / "w.npz", theta=theta)
    np.savez(tmp_path / "b.npz", X=X, y=y)
    d = N * updates.kfac(model, theta, loss, X, y, N * LAM, fisher_type="empirical",
                         damping_mode="factored")
    np.savez(tmp_path / "c.npz", candidate=d)
    args = ["check", "--arch", str(tmp_path / "arch.json"), "--weights", str(tmp_path / "w.npz"),
            "--batch", str(tmp_path / "b.npz"), "--candidate", str(tmp_path / "c.npz"),
            "--quantity", "kfac_update", "--damping", str(LAM), "--infer"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "PASSED" in out and "N*lambda" in out
    assert main(args + ["--fisher-type", "type-2"]) == 1   # a known option is kept
    assert "FAILED" in capsys.readouterr().out


def test_reference_reproduces(small):
    model, theta, loss, X, y, names, inf = small
    d = updates.ekfac(model, theta, loss, X, y, LAM, damping_mode="factored")
    r = inf.infer("ekfac_update", d, LAM)
    assert r.passed and rel(r.reference, d) <= 1e-10
    assert r.convention["damping_mode"] == "factored" and r.convention["pi"] == "trace"
    assert isinstance(str(r), str) and "PASSED" in str(r)
    assert check.infer is infer


def test_sequences_search_kfac_approx():
    from refngd import nn
    from refngd.losses import CrossEntropy, PerToken

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3), nn.Flatten())
    theta, loss = model.init(rng), PerToken(CrossEntropy(), 5)
    X, y = rng.standard_normal((4, 5, 3)), rng.integers(0, 3, (4, 5))
    d = 4 * updates.kfac(model, theta, loss, X, y, 4 * LAM, kfac_approx="reduce",
                         damping_mode="factored")
    r = infer((model, theta), loss, X, y, "kfac_update", d, LAM)
    assert r.passed and r.convention["kfac_approx"] == "reduce"
    assert r.convention["damping"] == "N*lambda" and r.convention["scale"] == "N"


def test_theta_at_the_time_of_the_candidate():
    torch = pytest.importorskip("torch")
    import copy

    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 3)).double()
    rng = np.random.default_rng(1)
    X, y = torch.tensor(rng.standard_normal((N, 3))), torch.tensor(rng.integers(0, 3, N))
    ce = torch.nn.CrossEntropyLoss()
    ce(net(X), y).backward()
    grad = 3.0 * torch.cat([p.grad.reshape(-1) for p in net.parameters()])
    saved = copy.deepcopy(net.state_dict())
    torch.optim.SGD(net.parameters(), lr=0.5).step()          # the weights move
    late = infer(net, ce, X, y, "gradient", grad)
    assert not late.passed and "optimizer.step()" in late.summary
    r = infer(net, ce, X, y, "gradient", grad, theta=saved)
    assert r.passed and r.convention["scale"] == "C"


@pytest.mark.parametrize("pi", ["trace", 1.0])
def test_curvlinops_bias_damping(small, pi):
    model, theta, loss, X, y, names, inf = small
    d = updates.kfac(model, theta, loss, X, y, LAM, damping_mode="factored", pi=pi,
                     convention="curvlinops")
    r = inf.infer("kfac_update", d, LAM)
    assert r.passed and r.convention["convention"] == "curvlinops"
    assert r.convention["pi"] == pi and r.convention["damping"] == "lambda"


def test_kfac_jax_empirical_factors_are_named(small):
    model, theta, loss, X, y, names, inf = small
    K = KFAC(model, theta, loss, X, y, fisher_type="empirical", bias="joint",
             convention="kfac-jax")                        # G of the rows c·e_n: 1/N × refngd's
    r = inf.infer("kfac_factors", factors(K, names))
    assert r.passed and r.convention["convention"] == "kfac-jax" and r.convention["scale"] == "1"
    assert "0.G × 1/N, 2.G × 1/N refngd's" in r.summary
