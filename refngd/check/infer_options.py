"""``InferenceReport.options``: the keyword arguments of ``check.validate`` for what ``infer`` found.

``infer`` names its scalars (``"N^2*lambda"``, ``"1/(N^0.5*2^0.5)"``); ``validate`` takes
numbers.  :func:`validate_options` evaluates the names for the given data (N, T, C, K of
each layer, the user's λ) and returns the options, the convention preset, λ and π as
numbers — or ``None`` with the reason where ``validate`` cannot express the convention (a
damping or π that differs by layer, a layer whose damping swamps its curvature).  The
scale is not an option of ``validate``: :attr:`InferenceReport.scale_values` is the number
(or, for an update, the (P,) vector of per-block numbers; for ``kfac_factors`` a dict of
numbers per factor) to divide the candidate by.
"""
from __future__ import annotations

import math
import re

import numpy as np

#: options of check.validate that infer reports under the same names
_OPTIONS = ("fisher_type", "bias", "kfac_approx", "damping_mode", "form", "pi",
            "damping_split", "convention", "mc_samples")
_NAME = re.compile(r"^[NTCK0-9.^*/()\-+ ,e_a-zA-Z]*$")


def value_of(name: str, ctx: dict, lam=None) -> float:
    """The number a scalar name of :mod:`refngd.check.scalars` stands for.

    ``ctx``: the sizes (:func:`refngd.check.scalars.sizes`); ``lam``: λ, or (λ_A, λ_G).
    """
    s = str(name).strip()
    if not _NAME.match(s):
        raise ValueError(f"not a scalar name: {name!r}")
    la, lg = lam if isinstance(lam, tuple) else (lam, lam)
    env = {"N": ctx.get("N", 1), "T": ctx.get("T", 1), "C": ctx.get("C", 1),
           "K": ctx.get("K", 1), "lA": la, "lG": lg, "lam": lam if not isinstance(lam, tuple)
           else None}
    s = (s.replace("lambda_A", "lA").replace("lambda_G", "lG").replace("lambda", "lam")
         .replace("^", "**"))
    return eval(s, {"__builtins__": {}}, env)  # noqa: S307 — names infer itself built


def _per_layer(v, search, lam) -> float | None:
    """One number for a name, or per-layer names that all give the same number; else None."""
    layers = v if isinstance(v, dict) else {k: v for k in search.layer_slices()}
    vals = set()
    for layer, nm in layers.items():
        if nm == "undetermined":
            return None
        x = value_of(nm, search.ctx(layer), lam)
        vals.add(tuple(x) if isinstance(x, tuple) else round(float(x), 15))
    if len(vals) != 1:
        vals = {tuple(round(float(a), 12) for a in x) if isinstance(x, tuple)
                else round(x, 12) for x in vals}
        if len(vals) != 1:
            return None
    x = vals.pop()
    return tuple(float(a) for a in x) if isinstance(x, tuple) else float(x)


def validate_options(search, quantity: str, conv: dict, damping, preset_update, rtol: float,
                     f32: bool, theta=None, v=None) -> tuple:
    """(options for ``check.validate`` or None, scale values or None, the reason if None).

    ``preset_update``: (preset, its damping options) whose update at the user's λ is the
    candidate, or None; ``rtol``: the tolerance the verdict used; ``f32``: the candidate is
    float32; ``theta``, ``v``: as given to ``infer`` (passed on).
    """
    opts = {k: conv[k] for k in _OPTIONS if k in conv}
    if search.labels is not None:
        opts["labels"] = search.labels
    if conv.get("arithmetic") == "float32" or f32 or rtol != 1e-10:
        opts["rtol"] = rtol
    if theta is not None:
        opts["theta"] = theta
    if v is not None:
        opts["v"] = v
    if preset_update:  # the preset's update at the user's λ is the candidate
        name, kw = preset_update
        opts = {k: x for k, x in opts.items() if k in ("fisher_type", "bias", "kfac_approx",
                                                        "labels", "rtol", "theta", "v")}
        opts.update(kw, convention=name, damping=damping)
        return opts, 1.0, None
    if "scale/damping" in conv:
        return None, None, ("the damping swamps the curvature of layer(s) "
                            f"{', '.join(conv['scale/damping'])}: only scale/damping is known")
    if quantity.endswith("_update"):
        d = _per_layer(conv.get("damping", "lambda"), search, damping)
        if d is None:
            return None, None, "the damping differs by layer (validate takes one λ)"
        opts["damping"] = d
    if "pi" in conv and conv["pi"] not in ("trace", 1.0):
        p = conv["pi"] if isinstance(conv["pi"], float) else _per_layer(conv["pi"], search,
                                                                          damping)
        if p is None:
            return None, None, "π differs by layer (validate takes one π)"
        opts["pi"] = float(p)
    scale = _scale_values(search, quantity, conv.get("scale", "1"), damping)
    if scale is None:
        return None, None, "the scale differs by layer (divide each block by its own)"
    return opts, scale, None


def _scale_values(search, quantity, scale, damping):
    if not isinstance(scale, dict):
        if scale == "1":
            return 1.0
        vals = {round(value_of(scale, search.ctx(k), damping), 12) for k in search.layer_slices()}
        if len(vals) == 1:
            return float(vals.pop())
        scale = {k: scale for k in search.param_blocks()}
    if quantity == "kfac_factors":  # {"<layer>.A": number, ...}: divide each factor by its own
        return {k: float(value_of(nm, search.ctx(k), damping)) for k, nm in scale.items()}
    if not quantity.endswith("_update"):
        return None
    out = np.ones(search.P)
    for p, (a, b) in search.param_blocks().items():
        for k, nm in scale.items():
            if k == "all" or k == p or (k.endswith("weight+bias") and
                                        search.layer_of(k) == search.layer_of(p)):
                x = value_of(nm, search.ctx(p), damping)
                if not math.isfinite(x):
                    return None
                out[a:b] = x
    return out
