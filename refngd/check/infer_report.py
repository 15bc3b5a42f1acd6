""":class:`InferenceReport`: what :func:`refngd.check.infer` found, and the paragraph a user reads."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Fit:
    """One convention tried by ``infer``: options, named scalars, residuals, its value.

    ``options``: the options (refngd's names) of the option set; ``named``: the named
    scalars and damping ({"scale": ..., "damping": ..., "pi": ...}; a value per block where
    they differ); ``residual``: block name → relative error of the candidate under it;
    ``unnamed``: scalars no monomial explains (block → value); ``reference``: refngd's value
    under this convention (what reproduces the candidate); ``complexity``: how far from
    refngd's defaults (options changed + exponents of the named scalars), for ranking.
    """

    options: dict
    named: dict
    residual: dict
    reference: object
    complexity: float
    unnamed: dict = field(default_factory=dict)

    @property
    def worst(self) -> float:
        return max(self.residual.values()) if self.residual else math.inf

    def fits(self, tol: float) -> bool:
        return self.worst <= tol and not self.unnamed

    def convention(self) -> dict:
        return {**self.options, **self.named}


@dataclass
class InferenceReport:
    """The result of :func:`refngd.check.infer`.

    Attributes
    ----------
    passed : some convention explains the candidate within ``rtol``.
    convention : the simplest such convention, a dict of options (refngd's names) and named
        scalars — ``"scale"`` (candidate = scale × refngd's value; one entry per block where
        they differ), ``"damping"`` (refngd's λ that reproduces the update, e.g.
        ``"N^2*lambda"``), ``"pi"``, ``"arithmetic": "float32"`` where only float32
        round-off separates them, ``"convention"`` (a preset of :mod:`refngd.conventions`).
        When nothing fits: the *nearest* convention (scalars no monomial names as numbers).
    residual : the largest relative error of a block under ``convention``.
    alternatives : other conventions that reproduce the candidate equally well (the data
        cannot tell them apart: say, one sample, a λ far below every eigenvalue, or sizes
        that coincide — N = T).
    differing : when nothing fits, the blocks (by layer) that still differ under the
        nearest convention, with their relative errors.
    reference : refngd's value under ``convention`` (what the candidate is compared with).
    summary : a paragraph saying all of this in words.
    options : the keyword arguments of :func:`refngd.check.validate` that reproduce
        ``convention`` for this data (options, preset, λ and π as numbers, ``rtol`` for
        float32, ``labels``/``theta`` as given), or None where ``validate`` cannot express
        it (``options_note`` says why).  ``validate`` takes no scale: pass
        ``candidate / report.scale_values``.
    scale_values : the scale as numbers — a float, or for an update with per-block scales
        a (P,) vector, for ``kfac_factors`` a dict per factor — by which the candidate is
        refngd's value under ``options``.
    """

    passed: bool
    quantity: str
    convention: dict
    residual: float
    rtol: float
    alternatives: list
    differing: dict
    reference: object
    summary: str
    blocks: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    options: dict | None = None
    scale_values: object = None
    options_note: str | None = None

    def validate_kwargs(self) -> dict:
        """:attr:`options`, or a ValueError saying why ``validate`` cannot express it."""
        if self.options is None:
            raise ValueError("check.validate cannot reproduce this convention: "
                             f"{self.options_note or 'nothing explains the candidate'}.")
        return dict(self.options)

    def __str__(self) -> str:
        lines = [f"refngd check --infer — {self.quantity}"]
        w = max([len(k) for k in self.blocks] + [5])
        for k, e in self.blocks.items():
            ok = "ok" if e <= self.rtol else "DIFFERS"
            lines.append(f"  {k:{w}s}  {e:10.3e}  {ok}")
        lines.append(f"tolerance: relative error <= {self.rtol:.1e}")
        lines.append(("PASSED: " if self.passed else "FAILED: ") + self.summary)
        return "\n".join(lines)


# ----------------------------------------------------------------------------- words
_OPTION_WORDS = {
    ("fisher_type", "empirical"): "the empirical Fisher (rows e_n at the observed labels)",
    ("fisher_type", "type-2"): "the exact type-2 Fisher/GGN rows",
    ("fisher_type", "mc"): "Monte-Carlo rows at your sampled labels",
    ("bias", "joint"): "a joint bias column (ā = [a; 1])",
    ("bias", "separate"): "a separate bias block",
    ("kfac_approx", "reduce"): "K-FAC-reduce for shared weights",
    ("kfac_approx", "expand"): "K-FAC-expand for shared weights",
    ("damping_mode", "tikhonov"): "Tikhonov damping (G ⊗ A + λI)⁻¹",
    ("damping_mode", "factored"): "factored damping (G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹ "
                                  "(Martens & Grosse 2015, §6.3)",
    ("damping_mode", "per-factor"): "per-factor damping (G + λ_G I)⁻¹ ⊗ (A + λ_A I)⁻¹",
    ("damping_split", "locations"): "λ/T per location of a shared weight before the split "
                                    "(TF K-FAC, EKFAC-pytorch)",
    ("form", "gram"): "the Gram form Gᵀ(GGᵀ + λI)⁻¹ (Wu et al. 2024, eq. 5/8)",
    ("form", "tikhonov"): "the Tikhonov form (F̃ + λI)⁻¹g",
}


#: EKFAC's damping in words: its matrix is diagonal in U_G ⊗ U_A with eigenvalues S, and a
#: factor damping adds K-FAC's term (G + γ_G I) ⊗ (A + γ_A I) − G ⊗ A (refngd.curvature.damping)
_EKFAC_WORDS = {
    ("damping_mode", "tikhonov"): "Tikhonov damping (S + λ)⁻¹ on EKFAC's eigenvalues S",
    ("damping_mode", "factored"): "factored damping, S + γ_A g + γ_G a + γ_A γ_G on EKFAC's "
                                  "eigenvalues S (Martens & Grosse 2015, §6.3)",
    ("damping_mode", "per-factor"): "per-factor damping, S + λ_A g + λ_G a + λ_A λ_G on "
                                    "EKFAC's eigenvalues S",
}


def _what(quantity: str) -> str:
    if quantity.startswith(("kfac", "ekfac")):
        return "EKFAC" if quantity.startswith("ekfac") else "K-FAC"
    return quantity.replace("_", " ")


def moved_scalars(scale: dict) -> list:
    """Layers whose A and G carry reciprocal scalars: the same K-FAC block G ⊗ A."""
    out = []
    for k, a in scale.items():
        if not k.endswith(".A"):
            continue
        g = scale.get(k[:-2] + ".G")
        if a != "1" and g is not None and (g == f"1/{a}" or a == f"1/{g}"):
            big, (src, dst) = (a, ("G", "A")) if g == f"1/{a}" else (g, ("A", "G"))
            out.append(f"layer {k[:-2]!r}: the same K-FAC block G ⊗ A — a factor {big} moved "
                       f"from {src} to {dst}")
    return out


def _scale_words(scale) -> str:
    if isinstance(scale, dict):
        parts = ", ".join(f"{k} × {v}" for k, v in scale.items()
                          if v not in ("1", "undetermined"))
        moved = moved_scalars(scale)
        text = f"blockwise your values are refngd's times: {parts}" if parts else ""
        return text + (" (" + "; ".join(moved) + ")" if moved else "")
    if scale in (None, "1", "undetermined"):
        return ""
    return f"your values are {scale} × refngd's"


def summarise(quantity: str, fit: Fit, conv: dict, passed: bool, residual: float, tol: float,
              alternatives: list, differing: dict, notes: list) -> str:
    """The paragraph of :attr:`InferenceReport.summary` (``conv``: the convention reported)."""
    what = _what(quantity)
    words = {**_OPTION_WORDS, **_EKFAC_WORDS} if quantity.startswith("ekfac") else _OPTION_WORDS
    opts = [words[(k, v)] for k, v in fit.options.items() if (k, v) in words]
    preset = conv.get("convention")
    head = f"your {what} "
    if preset and preset != "refngd":
        head += f"follows the {preset!r} convention (refngd.conventions)"
        head += f" with {', '.join(opts)}" if opts else ""
    else:
        head += f"uses {', '.join(opts)}" if opts else "follows refngd's convention"
    parts = [head]
    sw = _scale_words(conv.get("scale"))
    if sw:
        parts.append(sw)
    damp = conv.get("damping")
    if damp is not None:
        if isinstance(damp, dict):
            damp = ", ".join(f"layer {k}: {v}" for k, v in damp.items() if v != "undetermined")
        if damp:
            parts.append(f"your λ corresponds to refngd's {damp}")
    by_ratio: dict = {}
    for layer, ratio in (conv.get("scale/damping") or {}).items():
        by_ratio.setdefault(ratio, []).append(layer)
    for ratio, layers in by_ratio.items():
        which = (f"layer {layers[0]}" if len(layers) == 1 else
                 f"layers {', '.join(layers)}")
        parts.append(f"for {which} only scale/damping is determined: the damping swamps "
                     f"the curvature (its eigenvalues × scale are below tolerance × damping), "
                     f"so the data cannot tell the scale from the damping — scale/damping = "
                     f"{ratio}, i.e. your update there is ({ratio}) × the gradient")
    if "pi" in conv and conv.get("damping_mode") == "factored":
        pi = conv["pi"]
        parts.append("π per layer: " + ", ".join(f"layer {k}: {v}" for k, v in pi.items())
                     if isinstance(pi, dict) else f"π = {pi}")
        if pi not in ("trace", 1.0, "1"):
            parts[-1] += (" on refngd's factors (a fixed π on factors scaled unlike refngd's — "
                          "a scalar on G, or one moved from A to G — is another π on "
                          "refngd's; docs/validating.md §9)")
    for key in ("lambda_A", "lambda_G"):
        if key in conv:
            parts.append(f"{key.replace('lambda', 'γ')} = {conv[key]}")
    if conv.get("arithmetic") == "float32":
        parts.append("your float64 numbers carry float32 round-off (a float32 step inside)")
    text = "; ".join(parts)
    if passed:
        text += f"; the {quantity} then agrees to {residual:.1e} (tolerance {tol:.0e})."
    else:
        text = "no convention explains the candidate. The nearest: " + text
        unnamed = "scalars no monomial in N, T, C, K, 2 and (1 − β) names: " + ", ".join(
            f"{k} × {v:.6g}" for k, v in fit.unnamed.items())
        if fit.unnamed and residual <= tol:  # the numbers fit; only their names are missing
            text += (f"; it reproduces the candidate to {residual:.2g} (tolerance {tol:.0e}) "
                     f"only with {unnamed}")
        else:
            text += f"; it still differs by {residual:.2g} (tolerance {tol:.0e})"
            if fit.unnamed:
                text += "; " + unnamed
        if differing:
            text += "; blocks that differ: " + ", ".join(
                f"{k} ({e:.2g})" for k, e in differing.items())
        text += ". Compare the factors first (quantity 'kfac_factors'), then the update."
    if alternatives:
        alt = "; ".join(", ".join(f"{k}={v}" for k, v in a.items() if conv.get(k) != v)
                        or "the same options" for a in alternatives[:4])
        text += (f" The data cannot tell these apart — equally good: {alt}"
                 + (f" (and {len(alternatives) - 4} more)" if len(alternatives) > 4 else "")
                 + ".")
    for n in notes:
        text += " " + n
    return text


# ----------------------------------------------------------------------------- values
def assemble(quantity, repro: dict, ref, search):
    """The reproduction as the candidate's layout (dict for factors, array otherwise)."""
    if quantity == "kfac_factors":
        return repro
    out = np.zeros(np.shape(ref))
    blocks = search.layer_slices() if quantity in ("kfac", "ekfac") else search.param_blocks()
    sq = out.ndim == 2 and out.shape[0] == out.shape[1] == search.P
    mask = np.ones(out.shape, bool) if sq else None
    for k, (a, b) in blocks.items():
        if sq:
            out[a:b, a:b] = repro[k]
            mask[a:b, a:b] = False
        else:
            out[..., a:b] = repro[k]
    if sq and "off-diagonal" in repro:
        out[mask] = repro["off-diagonal"][mask]
    return out


def damping_names(rule: str, names: dict, search, pair: bool) -> dict:
    """The named damping of an update fit, per layer collapsed where all agree."""
    def one(d):
        vals = set(d.values())
        return vals.pop() if len(vals) == 1 else d

    def times(m, sym="lambda"):
        if m == "1":
            return sym
        if "/" in m and not m.startswith("("):
            num, den = m.split("/", 1)
            return f"{sym}/{den}" if num == "1" else f"{num}*{sym}/{den}"
        return f"{m}*{sym}"

    out: dict = {}
    if rule == "per-factor":
        la = {k: times(v, "lambda_A" if pair else "lambda") for k, v in names["lambda_A"].items()}
        lg = {k: times(v, "lambda_G" if pair else "lambda") for k, v in names["lambda_G"].items()}
        out["damping"] = one({k: f"({la[k]}, {lg[k]})" for k in la})
        return out
    out["damping"] = one({k: times(v) for k, v in names["damping"].items()})
    if "pi" in names:
        pis = names["pi"]
        if all(v == "trace" for v in pis.values()):
            out["pi"] = "trace"
        elif all(v == "1" for v in pis.values()):
            out["pi"] = 1.0
        elif all(v in ("1", "1/T^0.5") for v in pis.values()) and \
                all(search.T(k) > 1 for k, v in pis.items() if v != "1") and \
                all(search.T(k) == 1 for k, v in pis.items() if v == "1"):
            out["pi"] = 1.0
            out["_options"] = {"damping_split": "locations"}
        else:
            out["pi"] = one(pis)
            try:
                out["pi"] = float(out["pi"])  # a number the user gave
            except (TypeError, ValueError):
                pass
    return out


