"""``check.infer`` recovers synthetic candidates drawn at random from the convention space.

Each draw (fixed seed) picks a problem (MLP or CNN), a quantity, options (Fisher type,
bias, kfac_approx, the tutorial / BackPACK factor rules, an EF/iEF form), a scalar (a
monomial in N, T, C, 2 and (1 − β); for a CNN's factors sometimes T moved from A to G),
a damping variant with a map λ' = s·λ, and float32 or not; the candidate is refngd's own value under that convention, computed through the
public functions (``updates.kfac``, ``KFAC``, ``quantities.reference``).  ``infer`` must
pass and name a convention whose value — recomputed here from the *names* through the
public functions, an independent route — reproduces the candidate to 1e-10 (float64) or
the float32 tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest

from infer_helpers import N, cnn, mlp, rel, value_of
from refngd import updates
from refngd.check import Inference
from refngd.check.quantities import reference
from refngd.check.validate import make_twin
from refngd.curvature import KFAC

DRAWS = 220
PROBLEMS = {"mlp": mlp, "cnn": cnn}
QUANTITIES = ("kfac_factors", "kfac", "kfac_update", "kfac_update", "kfac_update",
              "ekfac_update", "ekfac_update", "gradient", "fisher", "empirical_fisher",
              "ngd_update", "ef_update", "ief_update")
SCALES = ("1", "N", "1/N", "N^2", "1/N^2", "2", "C", "(1-0.99)", "1/(N*C)")
DAMPING_MAPS = ("1", "N", "1/N", "N^2")
VARIANTS = (dict(damping_mode="tikhonov"), dict(damping_mode="factored", pi="trace"),
            dict(damping_mode="factored", pi=1.0),
            dict(damping_mode="factored", pi=1.0, damping_split="locations"),
            dict(damping_mode="per-factor"), dict(damping_mode="per-factor", pair=True))


def sizes(problem, layer=None):
    T = 16 if problem == "cnn" and layer in (None, "0") else 1
    return {"N": N, "C": 3, "T": T, "K": 1}


def _draw(i):
    rng = np.random.default_rng(1000 + i)
    problem = ("mlp", "cnn")[i % 2]
    q = QUANTITIES[rng.integers(len(QUANTITIES))]
    opts = {"fisher_type": ("type-2", "empirical")[rng.integers(2)],
            "bias": ("separate", "joint")[rng.integers(2)]}
    if problem == "cnn":
        opts["kfac_approx"] = ("expand", "reduce")[rng.integers(2)]
    u = rng.random()
    if q in ("kfac_factors", "kfac", "kfac_update") and u < 0.15:
        opts = {"convention": "tutorial"}
    elif problem == "cnn" and u < 0.3 and q != "kfac_factors":
        opts = {"fisher_type": opts["fisher_type"], "bias": opts["bias"], "convention": "backpack"}
    variant = dict(VARIANTS[rng.integers(len(VARIANTS))])
    if not q.endswith("kfac_update"):
        variant = {}  # exact updates have one damping
    if variant.get("damping_split") and problem == "mlp":
        variant["damping_split"] = "even"
    return dict(i=i, problem=problem, quantity=q, opts=opts, variant=variant,
                scale=SCALES[rng.integers(len(SCALES))],
                dmap=DAMPING_MAPS[rng.integers(len(DAMPING_MAPS))],
                lam=float((0.01, 0.1)[rng.integers(2)]), f32=bool(rng.random() < 0.2),
                form=("gram", "tikhonov")[rng.integers(2)],
                moved=bool(rng.random() < 0.5))  # kfac_factors, CNN: T moved from A to G


CASES = [_draw(i) for i in range(DRAWS)]


@pytest.fixture(scope="module")
def problems():
    out = {}
    for name, make in PROBLEMS.items():
        model, theta, loss, X, y, names = make()
        out[name] = (model, theta, loss, X, y, names, Inference((model, theta), loss, X, y))
    return out


def truth_value(p, case, scale, damping, opts, variant, form):
    """refngd's value of the case's quantity under its convention (public functions)."""
    model, theta, loss, X, y, names, _ = p
    q = case["quantity"]
    if q == "kfac_factors":
        K = KFAC(model, theta, loss, X, y, **opts)
        return {f"{n}.{s}": scale * getattr(f, s) for f, n in zip(K.factors(), names)
                for s in "AG"}
    if q in ("kfac_update", "ekfac_update"):
        v = {k: w for k, w in variant.items() if k != "pair"}
        fn = updates.kfac if q == "kfac_update" else updates.ekfac
        return scale * fn(model, theta, loss, X, y, damping, **opts, **v)
    if q == "ngd_update":
        return scale * updates.ngd(model, theta, loss, X, y, damping)
    if q in ("gradient", "fisher", "empirical_fisher") and opts.get("convention") in (
            "tutorial", "backpack"):
        opts = {}  # the draw's K-FAC options do not apply to an exact quantity
    if q in ("ef_update", "ief_update"):
        fn = updates.ef if q == "ef_update" else updates.ief
        return scale * fn(model, theta, loss, X, y, damping, form=form)
    if q == "kfac":
        return scale * KFAC(model, theta, loss, X, y, **opts).dense()
    conv = opts.get("convention", "refngd")                # a preset infer named
    return scale * np.asarray(reference(make_twin((model, theta), loss, X, y, conv), q)[0])


def make_candidate(p, case):
    q = case["quantity"]
    sz = sizes(case["problem"])
    scale = value_of(case["scale"], sz)
    lam = case["lam"]
    damping = value_of(case["dmap"], sz) * lam
    user_lam = lam
    variant = dict(case["variant"])
    if variant.pop("pair", False):
        user_lam = (lam, 3 * lam)
        damping = (value_of(case["dmap"], sz) * lam, 3 * lam)
    opts = case["opts"]
    if q == "ekfac_update" and opts.get("convention") == "tutorial":
        opts = {}
    cand = truth_value(p, case, scale, damping, opts, {**variant, "pair": None}, case["form"])
    if q == "kfac_factors" and case["problem"] == "cnn" and case["moved"]:
        cand["0.A"], cand["0.G"] = cand["0.A"] / 16, cand["0.G"] * 16   # per-layer scalars
    if case["f32"]:
        cand = ({k: v.astype(np.float32) for k, v in cand.items()} if isinstance(cand, dict)
                else cand.astype(np.float32))
    return cand, user_lam


def independent(p, case, report, user_lam):
    """The candidate rebuilt from the report's *names* through the public functions."""
    conv = dict(report.convention)
    sz = sizes(case["problem"])
    scale, damping = conv.pop("scale"), conv.pop("damping", None)
    if isinstance(scale, dict) or isinstance(damping, dict) or isinstance(conv.get("pi"), dict):
        return None  # per-block names: checked through report.reference only
    conv.pop("arithmetic", None)
    opts = {k: conv[k] for k in ("fisher_type", "bias", "kfac_approx", "convention") if k in conv}
    variant = {k: conv[k] for k in ("damping_mode", "pi", "damping_split") if k in conv}
    if isinstance(variant.get("pi"), str) and variant["pi"] != "trace":
        variant["pi"] = value_of(variant["pi"], sz)
    lam = value_of(damping, sz, user_lam) if damping is not None else None
    return truth_value(p, case, value_of(scale, sz), lam, opts, variant, conv.get("form"))


@pytest.mark.parametrize("case", CASES, ids=[f"{c['i']}-{c['problem']}-{c['quantity']}"
                                             for c in CASES])
def test_recovered(problems, case):
    p = problems[case["problem"]]
    cand, user_lam = make_candidate(p, case)
    q = case["quantity"]
    report = p[-1].infer(q, cand, user_lam if q.endswith("_update") else None)
    tol = 1e-4 if case["f32"] else 1e-10
    assert report.passed, (case, report.summary)
    if isinstance(cand, dict):
        assert max(rel(report.reference[k], cand[k]) for k in cand) <= 2 * tol
    else:
        assert rel(report.reference, cand) <= 2 * tol, report.summary
    again = independent(p, case, report, user_lam)
    if again is not None:
        if isinstance(cand, dict):
            assert max(rel(again[k], cand[k]) for k in cand) <= 2 * tol, report.convention
        else:
            assert rel(again, cand) <= 2 * tol, (report.convention, report.summary)


def test_draws_cover_the_space():
    assert len(CASES) >= 200
    assert {c["quantity"] for c in CASES} == set(QUANTITIES)
    assert {tuple(sorted(c["variant"].items())) for c in CASES
            if c["quantity"].endswith("kfac_update")} >= {
        tuple(sorted(v.items())) for v in VARIANTS if v.get("damping_split") != "locations"}
    assert sum(c["f32"] for c in CASES) >= 20
    assert any(c["opts"].get("convention") == "tutorial" for c in CASES)
    assert any(c["opts"].get("convention") == "backpack" for c in CASES)
    assert any(c["moved"] and c["problem"] == "cnn" and c["quantity"] == "kfac_factors"
               for c in CASES)
