"""The γ study of the state-dependent opt-in methods at their own checkpoints.

``refngd compare`` records RF-Adam's, IKFAC's, AdamQLR's ... optimizer state at the γ
checkpoints of their own best run and scores ``opt.direction(θ_k, state_k, ...)`` there
(``gamma.own_trajectory``).  Checked here against a hand recomputation: the same run
retrained with ``record_state=True``, the exact Fisher of every fixed batch,
``metrics.gamma`` per batch, then the ratio of means, its delta-method standard error and
γ̄/γ̄* with γ* = 1/√(gᵀF⁺g) from an eigendecomposition of the
Fisher's dense rows' Gram matrix.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from refngd.backend import as_generator
from refngd.cli import main
from refngd.curvature import Fisher
from refngd.experiments.compare import METHODS, OWN_TRAJECTORY_METHODS
from refngd.experiments.data import load_digits
from refngd.experiments.models import build_model
from refngd.losses import CrossEntropy
from refngd.metrics import gamma
from refngd.optim.train import train

pytest.importorskip("sklearn")

TINY = ["--epochs", "1", "--batch-size", "32", "--max-steps", "4", "--no-progress", "--no-plots"]
LRS = ["sgd=0.1", "rfadam=3", "ikfac=0.1"]


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    out = tmp_path_factory.mktemp("own")
    rc = main(["compare", "--methods", "sgd,rfadam,ikfac,adamqlr",
               *[a for lr in LRS for a in ("--lr", lr)], "--out", str(out), *TINY])
    assert rc == 0
    return json.loads((out / "compare.json").read_text())


def test_own_trajectory_record(record):
    own = record["gamma"]["own_trajectory"]
    assert sorted(own) == ["adamqlr", "ikfac", "rfadam"]  # SGD is scored by E1 itself
    steps = [c["step"] for c in record["gamma"]["checkpoints"]]
    for m, rec in own.items():
        assert rec["label"] == METHODS[m].label and rec["lr"] == record["methods"][m]["best_lr"]
        assert [c["step"] for c in rec["checkpoints"]] == steps  # the same step numbers
        for c in rec["checkpoints"]:
            assert math.isfinite(c["mean_ratio"]) and c["stderr"] >= 0
            assert c["optimal_ratio"] >= 1 - 1e-9  # exact NGD minimises γ
    # at step 0 RF-Adam's state is s₀ = 1: one EMA update barely moves it, so d ≈ g there
    assert own["rfadam"]["checkpoints"][0]["mean_ratio"] == pytest.approx(1.0, abs=1e-3)
    # after steps its preconditioner has moved off the identity
    assert abs(own["rfadam"]["checkpoints"][-1]["mean_ratio"] - 1) > 1e-6


@pytest.mark.parametrize("method", ["rfadam", "ikfac", "adamqlr"])
def test_own_trajectory_matches_hand_recomputation(record, method):
    cfg = record["config"]
    seed, step, n = cfg["seed"], 2, cfg["batch_size"]
    data = load_digits(cfg["test_fraction"], seed).for_model(cfg["model"])
    model = build_model(cfg["model"], data.input_shape, data.num_classes)
    loss = CrossEntropy()
    lr = record["methods"][method]["best_lr"]
    opt = METHODS[method].make(lr)
    res = train(model, model.init(as_generator(seed)), loss, data.X_train, data.y_train, opt,
                epochs=cfg["epochs"], batch_size=n, max_steps=cfg["max_steps"], rng=seed,
                checkpoints=[step], record_state=True, progress=False, on_divergence="raise")
    theta, state = res.checkpoints[step], res.checkpoint_states[step]
    N = data.X_train.shape[0]
    idx = as_generator(seed + 1).permutation(N)  # the study's fixed batches
    x, sgd, star = [], [], []
    for k in range(record["gamma"]["batches"]):
        X, y = data.X_train[idx[k * n:(k + 1) * n]], data.y_train[idx[k * n:(k + 1) * n]]
        d = opt.direction(theta, state, model, loss, X, y, rng=as_generator(seed + 100 + k))
        F = Fisher(model, theta, loss, X, y)
        g = F.gradient()
        x.append(gamma(d, F, g))
        sgd.append(gamma(g, F, g))
        # γ* = 1/√(gᵀF⁺g), F = c·UᵀU with dense (R, P) rows U: for UUᵀ = WΛWᵀ,
        # gᵀ(UᵀU)⁺g = ‖Λ⁺Wᵀ(Ug)‖² (U = WΛ^½Vᵀ), so gᵀF⁺g = ‖Λ⁺WᵀUg‖²/c
        U = F.row_matrix()
        lam, W = np.linalg.eigh(U @ U.T)
        keep = lam > 1e-12 * lam.max()  # explicit cut-off of the numerical null space
        star.append(1 / math.sqrt(np.sum((W[:, keep].T @ (U @ g) / lam[keep]) ** 2) / F.c))
    x, sgd, star = map(np.array, (x, sgd, star))
    R = x.mean() / sgd.mean()
    se = np.sqrt(np.var(x - R * sgd, ddof=1) / len(x)) / sgd.mean()
    got = {c["step"]: c for c in record["gamma"]["own_trajectory"][method]["checkpoints"]}[step]
    assert got["mean_ratio"] == pytest.approx(R, rel=1e-10)
    assert got["stderr"] == pytest.approx(se, rel=1e-8)
    assert got["optimal_ratio"] == pytest.approx(x.mean() / star.mean(), rel=1e-6)  # pinv cut-off


def test_own_trajectory_table(record):
    from refngd.experiments.compare import format_results

    text = format_results(record)
    assert "E1-style, own checkpoints" in text and "OWN checkpoints" in text
    assert text.index("E1: γ̄(d)/γ̄(g)") < text.index("E1-style, own checkpoints") < text.index("last checkpoint")
    for m in ("rfadam", "ikfac", "adamqlr"):
        assert f"{METHODS[m].label} γ̄/γ̄*" in text


def test_own_trajectory_methods_are_the_opt_in_state_dependent_ones():
    assert set(OWN_TRAJECTORY_METHODS) == {"rfadam", "rfrmsprop", "ikfac", "ingd", "sirfshampoo", "adamqlr"}
    for m in OWN_TRAJECTORY_METHODS:
        assert callable(getattr(METHODS[m].make(METHODS[m].lr_grid[0]), "direction"))


def test_record_state_keeps_copies():
    """``record_state=True`` keeps the state each checkpoint step left, unchanged by later steps."""
    data = load_digits(0.2, 0).for_model("mlp")
    model = build_model("mlp", data.input_shape, data.num_classes)
    opt, loss = METHODS["rfadam"].make(1.0), CrossEntropy()
    theta0 = model.init(as_generator(0))
    kw = dict(batch_size=32, rng=0, progress=False)
    full = train(model, theta0, loss, data.X_train, data.y_train, opt, max_steps=3,
                 checkpoints=[0, 2], record_state=True, **kw)
    short = train(model, theta0, loss, data.X_train, data.y_train, opt, max_steps=2, **kw)
    assert sorted(full.checkpoint_states) == [0, 2]
    for key, v in opt.init(theta0).items():
        np.testing.assert_array_equal(full.checkpoint_states[0][key], v)
    for key, v in short.state.items():
        np.testing.assert_array_equal(full.checkpoint_states[2][key], v)
    assert not np.array_equal(full.checkpoint_states[2]["s"], full.state["s"])
    plain = train(model, theta0, loss, data.X_train, data.y_train, opt, max_steps=2, checkpoints=[2], **kw)
    assert plain.checkpoint_states == {}
