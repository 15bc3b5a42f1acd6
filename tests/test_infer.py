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

from infer_helpers import N, cnn, mlp, rel, value_of
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


def test_update_from_ema_factors_started_at_zero(small):
    """Factors (1 − β)·F after one EMA step from zero, no bias correction: the update is
    1/(1 − β)² × refngd's at λ/(1 − β)² — a negative power of (1 − β), named."""
    model, theta, loss, X, y, names, inf = small
    b = 0.95
    d = updates.kfac(model, theta, loss, X, y, LAM / (1 - b) ** 2) / (1 - b) ** 2
    r = inf.infer("kfac_update", d, LAM)
    assert r.passed, r.summary
    assert r.convention["damping_mode"] == "tikhonov"
    assert value_of(r.convention["scale"], {"N": N, "C": 3}) == pytest.approx((1 - b) ** -2)
    assert value_of(r.convention["damping"], {"N": N, "C": 3}, LAM) == \
        pytest.approx(LAM / (1 - b) ** 2)
    assert str(scalars.name(400.0, scalars.sizes(N=32, C=3), 1e-9, betas=(0.95,))[0]) == \
        "1/(1-0.95)^2"


def test_ema_beta_names_the_damping_too(small):
    """ema_beta= reaches the damping's names, not only the scale (β = 0.98 is not a default)."""
    model, theta, loss, X, y, names, inf = small
    b = 0.98
    d = updates.kfac(model, theta, loss, X, y, LAM / (1 - b) ** 2) / (1 - b) ** 2
    r = infer((model, theta), loss, X, y, "kfac_update", d, LAM, ema_beta=b)
    assert r.passed, r.summary
    assert r.convention["scale"] == "1/(1-0.98)^2"
    assert r.convention["damping"] == "lambda/(1-0.98)^2"


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
    # π = 1 on these factors is π = T on refngd's for layer 0: said per layer, not as a dict
    g, s, T = updates.sgd(model, theta, loss, X, y), np.sqrt(LAM), 16
    upd = []
    for n, fa in zip(names, K.factors()):
        A, G = f[f"{n}.A"], f[f"{n}.G"]
        I_G, t = np.eye(len(G)), T if n == "0" else 1
        gW, gb = g[fa.start:fa.stop - len(G)].reshape(len(G), -1), g[fa.stop - len(G):fa.stop]
        upd += [np.linalg.solve(G + s * I_G, gW) @ np.linalg.inv(A + s * np.eye(len(A))),
                np.linalg.solve(G / t + s / t * I_G, gb) / (1 + t * s)]  # the bias: π = t too
    d = np.concatenate([u.reshape(-1) for u in upd])
    r = infer((model, theta), loss, X, y, "kfac_update", d, LAM, damping_mode="factored")
    assert r.passed and r.convention["pi"] == {"0": "T", "3": "1"}, r.summary
    assert "π per layer: layer 0: T, layer 3: 1 on refngd's factors" in r.summary
    assert "{" not in r.summary



@pytest.mark.parametrize("mode", ["per-factor", "tikhonov"])
def test_kfac_pytorch_conv_update_is_named(mode):
    """kfac-pytorch's Conv2d block is 1/(N²T⁵) × refngd's (A/T², G/(N²T³)): T⁵ is named,
    and not as an alias with (1 − β) (N = 5, T = 16: N²T⁵ = T⁴/(1 − 0.95)²)."""
    model, theta, loss, X, y, names = cnn()
    d = updates.kfac(model, theta, loss, X, y, LAM, convention="kfac-pytorch",
                     damping_mode=mode, bias="joint", fisher_type="empirical")
    r = infer((model, theta), loss, X, y, "kfac_update", d, LAM)
    assert r.passed and "arithmetic" not in r.convention, r.summary
    assert r.convention["scale"] == {"0.weight+bias": "N^2*T^5", "3.weight+bias": "N^2"}
    damping = {"0": "(T^2*lambda, N^2*T^3*lambda)", "3": "(lambda, N^2*lambda)"} \
        if mode == "per-factor" else {"0": "N^2*T^5*lambda", "3": "N^2*lambda"}
    assert r.convention["damping"] == damping
    # the preset's own update at the user's λ: named
    how = f"convention='kfac-pytorch', damping_mode={mode!r}"
    assert "This is the 'kfac-pytorch' preset's update at your λ itself" in r.summary
    assert f"refngd.updates.kfac(..., {how}))" in r.summary


def test_float32_arithmetic_in_a_float64_candidate(small):
    model, theta, loss, X, y, names, inf = small
    d = updates.kfac(model, theta, loss, X, y, LAM)
    d32 = d.astype(np.float32).astype(np.float64)
    r = inf.infer("kfac_update", d32, LAM)
    assert r.passed and r.convention["arithmetic"] == "float32"
    assert "float32" in r.summary and r.residual > 1e-10



def test_no_float32_verdict_for_an_exact_float64_fit():
    """A damping named only in the wider (float32) window, whose named value reproduces the
    candidate to 1e-14, is a float64 fit: no "arithmetic": "float32", tolerance 1e-10."""
    from refngd import nn
    from refngd.losses import CrossEntropy

    model = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(64, 10))
    theta = model.init(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((32, 1, 8, 8)), rng.integers(0, 10, 32)
    d = updates.kfac(model, theta, CrossEntropy(), X, y, 1e-2, convention="kfac-pytorch",
                     damping_mode="factored", pi=1.0, bias="joint", fisher_type="empirical")
    r = infer((model, theta), CrossEntropy(), X, y, "kfac_update", d, 1e-2)
    assert r.passed and r.residual < 1e-12
    assert "arithmetic" not in r.convention and r.rtol == 1e-10, r.summary
    assert "float32" not in r.summary


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



def test_coinciding_sizes_are_said():
    """N = C = 4: a factor 1/N is also 1/C and 1/2²; the summary says the name is not unique
    (refngd.check.scalars promises it)."""
    from refngd import nn
    from refngd.losses import CrossEntropy

    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4))
    theta, loss = model.init(rng), CrossEntropy()
    X, y = rng.standard_normal((4, 3)), rng.integers(0, 4, 4)
    f = factors(KFAC(model, theta, loss, X, y), ("0", "2"), 1.0, 1 / 4)
    r = infer((model, theta), loss, X, y, "kfac_factors", f)
    assert r.passed and r.convention["scale"]["0.G"] == "1/N"
    assert "1/N is also 1/C or 1/2^2" in r.summary
    plain = factors(KFAC(model, theta, loss, X, y), ("0", "2"))
    alone = infer((model, theta), loss, X, y, "kfac_factors", plain)
    assert "not unique" not in alone.summary


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



def test_unnamed_damping_is_reported_as_a_number(small):
    """A damping no monomial names (0.37·λ): the report gives the number, not 'nan', and
    does not list it as a block that differs."""
    model, theta, loss, X, y, names, inf = small
    r = inf.infer("kfac_update", updates.kfac(model, theta, loss, X, y, 0.37 * LAM), LAM)
    assert not r.passed and r.convention["damping"] == "0.37*lambda"
    assert "nan" not in r.summary and "0.damping × 0.37" in r.summary
    assert "reproduces the candidate" in r.summary and r.differing == {}



def test_ekfac_damping_in_ekfac_words(small):
    """EKFAC's Tikhonov damping is (S + λ)⁻¹ on its eigenvalues, not (G ⊗ A + λI)⁻¹."""
    model, theta, loss, X, y, names, inf = small
    r = inf.infer("ekfac_update", updates.ekfac(model, theta, loss, X, y, LAM), LAM)
    assert r.passed and r.convention["damping_mode"] == "tikhonov"
    assert "(S + λ)⁻¹" in r.summary and "G ⊗ A + λI" not in r.summary


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



def test_bad_options_and_damping_are_named(small):
    """Values infer used to accept silently or fail on with an unrelated message."""
    torch = pytest.importorskip("torch")
    model, theta, loss, X, y, names, inf = small
    with pytest.raises(ValueError, match="damping_split must be one of"):
        Inference((model, theta), loss, X, y, damping_split="loc")
    for beta in (1, 1.5, 0):
        with pytest.raises(ValueError, match="0 < β < 1"):
            Inference((model, theta), loss, X, y, ema_beta=beta)
    with pytest.raises(ValueError, match="mc_samples"):
        Inference((model, theta), loss, X, y, mc_samples=0)
    with pytest.raises(ValueError, match=r"labels must have shape \(N, K\) with N = 5"):
        Inference((model, theta), loss, X, y, labels=y[:3])
    with pytest.raises(TypeError, match="damping must be a number"):
        inf.infer("kfac_update", np.zeros(theta.size), "0.1")
    # a pair (λ_A, λ_G) where it cannot apply: said so, not "no option set has the shapes"
    with pytest.raises(ValueError, match="per-factor damping of a K-FAC or EKFAC update"):
        inf.infer("ngd_update", np.ones(theta.size), (LAM, LAM))
    with pytest.raises(ValueError, match="damping_mode='tikhonov'"):
        infer((model, theta), loss, X, y, "kfac_update", np.ones(theta.size), (LAM, LAM),
              damping_mode="tikhonov")
    # torch and NumPy scalars are numbers: the same verdict as a float
    d = updates.kfac(model, theta, loss, X, y, LAM)
    for lam in (torch.tensor(LAM), np.float64(LAM)):
        assert inf.infer("kfac_update", d, lam).passed
    pf = updates.kfac(model, theta, loss, X, y, (LAM, 2 * LAM), damping_mode="per-factor")
    assert inf.infer("kfac_update", pf, (torch.tensor(LAM), np.float32(2 * LAM))).passed is \
        inf.infer("kfac_update", pf, (LAM, float(np.float32(2 * LAM)))).passed


def test_labels_in_a_draws_layout_are_one_draw():
    """MSE labels (N, C) are one draw (K = 1), not K = C draws."""
    model, theta, mse, X, Y, names = mlp("mse")
    Yhat = np.random.default_rng(5).standard_normal(Y.shape)
    assert Inference((model, theta), mse, X, Y, labels=Yhat).search.K == 1
    assert Inference((model, theta), mse, X, Y, labels=np.stack([Yhat] * 2, 1)).search.K == 2


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
    # an EMA from zero with β = 0.98 (not a default β): --ema-beta names it
    s = N / (1 - 0.98) ** 2
    np.savez(tmp_path / "e.npz", candidate=s * updates.kfac(
        model, theta, loss, X, y, s * LAM, fisher_type="empirical", damping_mode="factored"))
    ema = [a if a != str(tmp_path / "c.npz") else str(tmp_path / "e.npz") for a in args]
    assert main(ema + ["--ema-beta", "0.98"]) == 0
    assert "N/(1-0.98)^2" in capsys.readouterr().out
    assert main(ema[:-1] + ["--ema-beta", "0.98"]) == 2        # without --infer: an error
    assert "--ema-beta" in capsys.readouterr().err
    assert main(ema + ["--ema-beta", "1.5"]) == 2


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
