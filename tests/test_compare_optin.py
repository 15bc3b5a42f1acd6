"""The opt-in methods of ``refngd compare``: root-free, inverse-free and AdamQLR run end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest

from refngd import optim
from refngd.cli import main
from refngd.experiments.compare import DEFAULT_METHODS, METHODS

import handmlp

pytest.importorskip("sklearn")

TINY = ["--epochs", "1", "--batch-size", "32", "--max-steps", "3", "--no-progress", "--no-gamma",
        "--no-plots"]
OPT_IN = ("rfadam", "rfrmsprop", "ikfac", "ingd", "sirfshampoo", "adamqlr")


def test_opt_in_methods_are_registered_but_not_default():
    for m in OPT_IN:
        assert m in METHODS and m not in DEFAULT_METHODS
        assert METHODS[m].make(METHODS[m].lr_grid[0]).name == m
    assert METHODS["adamqlr"].lr_grid == (1.0,)  # the step size is AdamQLR's own


@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_compare_runs_the_opt_in_methods(tmp_path, capsys, model):
    out = tmp_path / "res"
    lrs = ["sgd=0.1", "rfadam=3", "rfrmsprop=0.1", "ikfac=0.1", "ingd=0.03", "sirfshampoo=0.01"]
    rc = main(["compare", "--model", model, "--methods", "sgd," + ",".join(OPT_IN),
               *[a for lr in lrs for a in ("--lr", lr)], "--out", str(out), *TINY])
    assert rc == 0
    text = capsys.readouterr().out
    for label in ("RF-Adam", "RF-RMSProp", "IKFAC", "INGD", "SIRFShampoo", "AdamQLR"):
        assert label in text, label
    rec = json.loads((out / "compare.json").read_text())
    for m in OPT_IN:
        run = rec["methods"][m]["runs"][0]
        assert run["stopped"] is None and run["steps"] == 3
    assert rec["methods"]["adamqlr"]["best"]["log"]["step_size"][0] > 0


@pytest.mark.parametrize("make", [
    lambda: optim.RFRMSProp(lr=0.1),
    lambda: optim.RFAdam(lr=1.0),
    lambda: optim.IKFAC(lr=0.1, momentum=0.0, update_every=1),
    lambda: optim.INGD(lr=0.1, momentum=0.0, update_every=1),
    lambda: optim.SIRFShampoo(lr=0.1, momentum=0.0),
])
def test_direction_is_the_step_and_leaves_the_state_alone(make):
    """``direction`` (for the γ study) equals (θ − θ_new)/lr of ``step`` and changes no state."""
    model, theta, loss, X, y = handmlp.make(N=10)
    opt = make()
    state = opt.init(theta)
    theta, state, _ = opt.step(theta, state, model, loss, X[:5], y[:5])   # a non-trivial state
    before = repr(state)
    d = opt.direction(theta, state, model, loss, X[5:], y[5:])
    assert repr(state) == before
    new, _, _ = opt.step(theta, state, model, loss, X[5:], y[5:])
    np.testing.assert_allclose((theta - new) / opt.lr, d, rtol=1e-12, atol=1e-14)
