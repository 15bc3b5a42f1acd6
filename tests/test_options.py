"""One owner per option: every entry point takes refngd.options' values and defaults, the
deliberate exceptions say why, and one mistake raises one exception type everywhere."""
from __future__ import annotations

import argparse
import inspect

import numpy as np
import pytest

from refngd import curvature, nn, options, optim, updates
from refngd.check import validate
from refngd.check.cli import add_check_parser
from refngd.losses import CrossEntropy, PerToken

DEFAULTS = {"fisher_type": options.FISHER_TYPE, "kfac_approx": options.KFAC_APPROX_DEFAULT,
            "bias": options.BIAS, "damping_mode": options.DAMPING_MODE, "form": options.FORM,
            "convention": options.CONVENTION}

ENTRY_POINTS = [curvature.KFAC, curvature.EKFAC, curvature.KroneckerDiagonal, curvature.Fisher,
                curvature.EmpiricalFisher, updates.ngd, updates.ef, updates.ief, updates.kfac,
                updates.ekfac, validate, optim.EF, optim.IEF]

#: defaults an optimizer sets differently on purpose; the reason is a comment where it is set
OPTIMIZER_DEFAULTS = {(optim.KFAC, "damping_mode"): "factored", (optim.KFAC, "fisher_type"): "mc",
                      (optim.EKFAC, "fisher_type"): "mc", (optim.INGD, "fisher_type"): "empirical",
                      (optim.IKFAC, "fisher_type"): "empirical",
                      (optim.AdaFisher, "fisher_type"): "empirical"}


def test_values_are_read_off_the_literal_types():
    assert options.FISHER_TYPES == ("type-2", "mc", "empirical")
    assert options.FORMS == ("gram", "tikhonov")
    values = {"fisher_type": options.FISHER_TYPES, "kfac_approx": options.KFAC_APPROX,
              "bias": options.BIAS_MODES, "damping_mode": options.DAMPING_MODES,
              "form": options.FORMS}
    for name, allowed in values.items():
        assert DEFAULTS[name] in allowed, name


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f"{f.__module__}.{f.__qualname__}")
def test_entry_point_defaults_agree(fn):
    sig = inspect.signature(fn)
    for name, default in DEFAULTS.items():
        if name in sig.parameters and sig.parameters[name].default is not inspect.Parameter.empty:
            got = sig.parameters[name].default
            if got is None:  # EKFAC: None means "take the KFAC default / the kfac= object's"
                continue
            assert got == default, f"{fn.__qualname__}({name}={got!r}) vs options {default!r}"


def test_optimizer_defaults_that_differ_are_the_listed_ones():
    for cls in (optim.KFAC, optim.EKFAC, optim.INGD, optim.IKFAC, optim.AdaFisher, optim.EF,
                optim.IEF):
        sig = inspect.signature(cls)
        for name, default in DEFAULTS.items():
            if name in sig.parameters:
                want = OPTIMIZER_DEFAULTS.get((cls, name), default)
                assert sig.parameters[name].default == want, (cls.__name__, name)


def test_cli_defaults_agree():
    parser = argparse.ArgumentParser()
    add_check_parser(parser.add_subparsers(dest="cmd"))
    sub = parser._subparsers._group_actions[0].choices["check"]
    defaults = {a.dest: a.default for a in sub._actions}
    for name, default in DEFAULTS.items():
        assert defaults[name] == default, name


def test_the_checker_accepts_refngds_own_ef_update_with_default_options():
    """`form` used to default to "tikhonov" in check.validate and "gram" in updates.ef."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    rng = np.random.default_rng(0)
    theta, X, y = model.init(rng), rng.standard_normal((5, 3)), rng.integers(0, 2, 5)
    loss = CrossEntropy()
    d = updates.ef(model, theta, loss, X, y, damping=1e-3)
    assert validate((model, theta), loss, X, y, "ef_update", d, damping=1e-3).passed


@pytest.mark.parametrize("bad, exc", [(2.0, options.ArgumentTypeError), (True, TypeError),
                                      ("3", TypeError), (0, ValueError), (-1, ValueError)])
def test_one_exception_type_per_mistake(bad, exc):
    model = nn.Sequential(nn.Linear(3, 2))
    rng = np.random.default_rng(0)
    theta, X, y = model.init(rng), rng.standard_normal((4, 3)), rng.integers(0, 2, 4)
    loss = CrossEntropy()
    calls = [lambda: curvature.SampledFisher(model, theta, loss, X, y, mc_samples=bad, rng=0),
             lambda: curvature.KFAC(model, theta, loss, X, y, fisher_type="mc",
                                    mc_samples=bad, rng=0),
             lambda: loss.sample_targets(model.forward(theta, X), rng, bad),
             lambda: PerToken(loss, bad),
             lambda: nn.Linear(bad, 2), lambda: nn.Conv2d(1, bad, 3), lambda: nn.Embedding(bad, 2),
             lambda: nn.LoRALinear(3, 2, bad, 1.0)]
    for call in calls:
        with pytest.raises(exc):
            call()
    if exc is not ValueError:  # a wrong type is also a ValueError, for code that caught that
        for call in calls:
            with pytest.raises(ValueError):
                call()


def test_choices_are_checked_with_value_error():
    model = nn.Sequential(nn.Linear(3, 2))
    rng = np.random.default_rng(0)
    theta, X, y = model.init(rng), rng.standard_normal((4, 3)), rng.integers(0, 2, 4)
    for kw in ({"fisher_type": "typo"}, {"kfac_approx": "both"}, {"bias": "none"}):
        with pytest.raises(ValueError, match=f"{next(iter(kw))} must be one of"):
            curvature.KFAC(model, theta, CrossEntropy(), X, y, **kw)
    with pytest.raises(ValueError, match="damping_mode must be one of"):
        curvature.KFAC(model, theta, CrossEntropy(), X, y).solve(np.ones(8), 1.0, "typo")
    with pytest.raises(ValueError, match="form must be one of"):
        updates.ef(model, theta, CrossEntropy(), X, y, damping=1.0, form="typo")
