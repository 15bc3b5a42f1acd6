"""``check.infer`` and ``check.validate`` on the cases a review of issue 19 found.

* a layer whose damping swamps its curvature (kfac-pytorch's Conv2d block is ~1e-9 of
  refngd's): only scale/damping is determined, and the report says so;
* (1 − β) powers in a damping name only where an EMA is in play;
* ``InferenceReport.options`` fed back into ``validate``;
* clear errors for options ``validate`` would otherwise ignore.
"""
from __future__ import annotations

import numpy as np
import pytest

import refngd
from infer_helpers import mlp
from refngd import check, updates


@pytest.fixture(scope="module")
def conv_net():
    m = refngd.nn.Sequential(refngd.nn.Conv2d(1, 4, 3, stride=2, padding=1), refngd.nn.ReLU(),
                             refngd.nn.Flatten(), refngd.nn.Linear(64, 10))
    th = m.init(np.random.default_rng(0))
    rng = np.random.default_rng(1)
    X, y = rng.standard_normal((32, 1, 8, 8)), rng.integers(0, 10, 32)
    return m, th, refngd.losses.CrossEntropy(), X, y


def test_damping_swamps_the_curvature(conv_net):
    m, th, ce, X, y = conv_net
    d = updates.kfac(m, th, ce, X, y, 1e-2, convention="kfac-pytorch", bias="joint",
                     fisher_type="empirical")
    r = check.infer((m, th), ce, X, y, "kfac_update", d.astype(np.float32).astype(np.float64),
                    1e-2)
    assert r.passed, r.summary
    assert r.convention["arithmetic"] == "float32"
    assert r.convention["scale/damping"] == {"0": "1/lambda"}
    assert r.convention["damping"]["0"] == "undetermined"
    assert r.convention["damping"]["3"] == "N^2*lambda"
    assert "for layer 0 only scale/damping is determined: the damping swamps the curvature" \
        in r.summary
    assert np.linalg.norm(r.reference - d) <= 1e-4 * np.linalg.norm(d)
    # in float64 the curvature is still seen: the damping is named, nothing swamped
    r64 = check.infer((m, th), ce, X, y, "kfac_update", d, 1e-2)
    assert r64.passed and "scale/damping" not in r64.convention


def test_swamped_pure_gradient_step(conv_net):
    """A candidate that is a multiple of the gradient for a huge λ: the ratio is named."""
    m, th, ce, X, y = conv_net
    lam = 1e-2
    d = updates.kfac(m, th, ce, X, y, lam * 1e12)  # refngd's own update at a swamping λ
    r = check.infer((m, th), ce, X, y, "kfac_update", d * 1e12, lam)
    assert r.passed, r.summary
    assert set(r.convention["scale/damping"].values()) == {"1/lambda"}
    assert r.alternatives  # every damping rule explains it equally well
    assert r.options is None and "swamps" in r.options_note
    with pytest.raises(ValueError, match="cannot reproduce this convention"):
        r.validate_kwargs()


@pytest.mark.parametrize("lam_g, name", [(0.1, "N*2*lambda"), (0.07, "7*lambda")])
def test_no_ema_factor_in_a_damping_without_an_ema(lam_g, name):
    """Per-factor (0.01, λ_G) given one λ = 0.01: λ_G is a monomial or round number × λ,
    not λ/(1 − 0.9) — there is no running average (the scale is 1)."""
    model, theta, loss, X, y, _ = mlp()
    d = updates.kfac(model, theta, loss, X, y, (0.01, lam_g), damping_mode="per-factor")
    r = check.infer((model, theta), loss, X, y, "kfac_update", d, 0.01)
    assert r.passed, r.summary
    assert r.convention["damping"] == f"(lambda, {name})"
    assert all("(1-" not in str(a.get("damping")) for a in r.alternatives)


@pytest.mark.parametrize("case", ["factored", "per-factor", "preset", "swamped"])
def test_options_feed_back_into_validate(case, conv_net):
    """report.options (numbers for this data) + candidate / report.scale_values pass
    check.validate; where validate cannot express the convention, options is None."""
    if case in ("preset", "swamped"):
        model, theta, loss, X, y = conv_net
        d = updates.kfac(model, theta, loss, X, y, 1e-2, convention="kfac-pytorch",
                         bias="joint", fisher_type="empirical")
        if case == "swamped":
            d = d.astype(np.float32).astype(np.float64)
        lam = 1e-2
    else:
        model, theta, loss, X, y, _ = mlp()
        n = X.shape[0]
        if case == "factored":
            kw = dict(fisher_type="empirical", bias="joint", damping_mode="factored", pi=1.0)
            d, lam = updates.kfac(model, theta, loss, X, y, n ** 2 * 0.1, **kw) / n ** 2, 0.1
        else:
            d = updates.kfac(model, theta, loss, X, y, (0.01, 0.1), damping_mode="per-factor")
            lam = 0.01
    r = check.infer((model, theta), loss, X, y, "kfac_update", d, lam)
    assert r.passed, r.summary
    if case in ("preset", "swamped"):  # kfac-pytorch's own update at λ, float32: rtol 1e-4
        assert r.options["convention"] == "kfac-pytorch" and r.options["damping"] == lam
    if case == "factored":
        assert r.options["damping"] == pytest.approx(X.shape[0] ** 2 * 0.1)
        assert r.scale_values == pytest.approx(1 / X.shape[0] ** 2)
    v = check.validate((model, theta), loss, X, y, "kfac_update", d / r.scale_values,
                       **r.validate_kwargs())
    assert v.passed, str(v)


@pytest.mark.parametrize("kw", [dict(pi=1.0), dict(damping_split="locations"),
                                dict(damping_mode="per-factor", pi=1.0)])
def test_validate_rejects_damping_options_the_mode_ignores(kw):
    model, theta, loss, X, y, _ = mlp()
    d = updates.kfac(model, theta, loss, X, y, 0.1)
    with pytest.raises(ValueError, match="does not use it.*damping_mode='factored'"):
        check.validate((model, theta), loss, X, y, "kfac_update", d, damping=0.1, **kw)


def test_validate_unknown_keyword_lists_the_valid_ones():
    model, theta, loss, X, y, _ = mlp()
    g = updates.kfac(model, theta, loss, X, y, 0.1)
    with pytest.raises(TypeError, match=r"'fisher' \(did you mean 'fisher_type'\?\).*"
                                        r"keywords are .*damping_mode"):
        check.validate((model, theta), loss, X, y, "kfac_update", g, damping=0.1,
                       fisher="empirical")


def test_bfloat16_candidate_says_how_to_convert():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    X, y = np.random.default_rng(0).standard_normal((4, 3)), np.array([0, 1, 0, 1])
    ce = torch.nn.CrossEntropyLoss()
    g = torch.zeros(8, dtype=torch.bfloat16)
    for fn in (check.validate, check.infer):
        with pytest.raises(TypeError, match=r"candidate is a bfloat16.*\.float\(\).*\.double\(\)"):
            fn(net, ce, X, y, "gradient", g)


def test_preset_named_with_a_bias_that_differs_from_it():
    model, theta, loss, X, y, _ = mlp()
    d = updates.kfac(model, theta, loss, X, y, 0.1, convention="kfac-pytorch", bias="separate",
                     fisher_type="empirical")
    r = check.infer((model, theta), loss, X, y, "kfac_update", d, 0.1)
    assert r.passed and "'kfac-pytorch' preset's update" in r.summary
    assert "the bias differs from the preset: yours is 'separate'" in r.summary
    assert r.options["convention"] == "kfac-pytorch" and r.options["bias"] == "separate"
    assert check.validate((model, theta), loss, X, y, "kfac_update", d,
                          **r.validate_kwargs()).passed


def test_swamped_ratio_names_sizes_not_an_ema():
    """Every layer swamped (λ = 1e12): the update is 10·g here, named 1/(N·2·λ) (N = 5), not
    (1 − 0.9)/λ — an EMA's (1 − β) cancels in scale/damping; layers share one sentence."""
    model, theta, loss, X, y, _ = mlp()
    n = X.shape[0]
    d = updates.kfac(model, theta, loss, X, y, 1e12)
    r = check.infer((model, theta), loss, X, y, "kfac_update", d * 1e12 * n * 2, 1e-2)
    assert r.passed, r.summary
    assert r.convention["scale/damping"] == {"0": "1/(N*2*lambda)", "2": "1/(N*2*lambda)"}
    assert "for layers 0, 2 only scale/damping is determined" in r.summary
    assert "undetermined ×" not in r.summary


def test_infer_rejects_pi_with_tikhonov():
    model, theta, loss, X, y, _ = mlp()
    with pytest.raises(ValueError, match="does not use it"):
        check.infer((model, theta), loss, X, y, "kfac_update", np.zeros(1), 0.1,
                    damping_mode="tikhonov", pi=1.0)


def test_factor_options_with_per_factor_scales():
    """kfac_factors with A and G scaled differently: scale_values is a dict per factor."""
    model, theta, loss, X, y, _ = mlp()
    from refngd.curvature import KFAC

    K = KFAC(model, theta, loss, X, y, fisher_type="empirical")
    n = X.shape[0]
    cand = {}
    for i, f in zip(("0", "2"), K.factors()):
        cand[f"{i}.A"], cand[f"{i}.G"] = np.asarray(f.A) * n, np.asarray(f.G) / n ** 2
    r = check.infer((model, theta), loss, X, y, "kfac_factors", cand)
    assert r.passed, r.summary
    assert r.scale_values == pytest.approx({"0.A": n, "0.G": n ** -2, "2.A": n, "2.G": n ** -2})
    fixed = {k: v / r.scale_values[k] for k, v in cand.items()}
    assert check.validate((model, theta), loss, X, y, "kfac_factors", fixed,
                          **r.validate_kwargs()).passed
