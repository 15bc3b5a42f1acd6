"""Approximation quality of update directions: Wu et al. (2024)'s evaluation protocols.

X. Wu, W. Yu, C. Zhang, P. Woodland (2024), "An Improved Empirical Fisher Approximation
for Natural Gradient Descent", NeurIPS 2024, §6.  At a checkpoint θ and on a batch, an
update direction d is scored by

    γ(d) = √(dᵀ F d) / |dᵀ g|       (F the exact Fisher/GGN of the batch, g its gradient),

invariant to the scale of d and minimised by the exact natural gradient: γ(d) ≥ γ* =
γ(F⁺g) = 1/√(gᵀF⁺g) (Cauchy–Schwarz in the F inner product).

One damping convention for every method.  Every damping here is *absolute* and in the
P × P Tikhonov convention of the loss as trained (reduction included): the method's
direction is (M + λI)⁻¹(its right-hand side) for its P × P matrix M = c·(…).  For the
paper's Gram forms this means λ_gram = λ / c:

=========  ==============================================  ==============================
method      direction at damping λ                          as computed
=========  ==============================================  ==============================
``ngd``     (F + λI)⁻¹ g, exact Fisher                       Uᵀ(K + λ/c)⁻¹a (row space)
``sf``      (F̂ + λI)⁻¹ g, one MC label per input             the same on F̂'s rows
``ef``      (F̃ + λI)⁻¹ g = Gᵀ(GGᵀ + (λ/c)I)⁻¹ 1               EF Gram form (paper's eq. 5)
``ief``     (F̃ + λI)⁻¹ cGᵀs = Gᵀ(GGᵀ + (λ/c)I)⁻¹ s            iEF Gram form (paper's eq. 8)
``kfac``    (G ⊗ A + λI)⁻¹ g per layer                        type-2 factors, Tikhonov
``ekfac``   (Q diag(s) Qᵀ + λI)⁻¹ g per layer                 type-2 factors, Tikhonov
=========  ==============================================  ==============================

and, opt-in (:data:`WU_FIG5_METHODS`, Wu et al.'s App. D.2.2 and Fig. 5, same convention):

============  ==========================================  ================================
``kfac_mc``    (G_MC ⊗ A + λI)⁻¹ g per layer               the paper's "KFAC" (of SF)
``kfac_emp``   (G̃ ⊗ A + λI)⁻¹ g, G̃ = c Σ_n b_n b_nᵀ        the paper's "eKFAC" (of EF, eq. 42)
``kfac_ief``   (G̃* ⊗ A + λI)⁻¹ g, G̃* = c Σ_n b_n b_nᵀ/s_n  the paper's "ieKFAC" (eq. 43)
============  ==========================================  ================================

with b_n the layer's output gradient of the per-sample loss l_n, A = (1/N) Σ_n a_n a_nᵀ
K-FAC's input factor and s_n = ‖e_n‖² = ‖∂l_n/∂z_n‖² the iEF weights (eq. 8): ieKFAC is
the K-FAC approximation of the iEF matrix c Σ_n g_n g_nᵀ/s_n (eq. 41), as eKFAC is of the
EF.  **Names.** refngd's ``ekfac`` is George et al. (2018)'s *eigenvalue-corrected* K-FAC;
the paper's "eKFAC" is the *empirical* K-FAC, here ``kfac_emp`` (:data:`PAPER_NAMES`).
Equation numbers are those of arXiv:2406.06420v2.

So identical damping lists mean identical dampings, for every method
(``tests/test_gamma_study.py`` fails otherwise).  At large λ every direction tends to
its right-hand side over λ: the gradient for all of them except iEF, whose Gram form
tends to cGᵀs = c Σ_n ‖e_n‖² g_n — a reweighted gradient, not g.

The protocols (:func:`batch_gammas` on each batch, then):

* **E1** (:func:`e1_summary`, the paper's first evaluation): one near-zero damping, many
  batches, the ratio of mean γ's γ̄_X / γ̄_SGD and γ̄_X / γ̄* (≥ 1: how far from optimal),
  beside the gradient-norm imbalance of the batches.  Two spreads, each labelled: the
  paper's error bars are **1-σ standard deviations** over its evaluations (captions of
  Fig. 2 and 3; Fig. 5 follows Fig. 2), here ``sd`` = the sample standard deviation over
  the batches of the per-batch ratio γ_X/γ_SGD (the captions do not name the quantity;
  refngd takes the ratio); ``stderr`` is refngd's standard error of the ratio of means (delta
  method) — a spread of the *mean*, not of the evaluations, and not the paper's.  Two
  imbalance statistics, each labelled: the paper's (Fig. 2) is the mean over batches of
  max_n ‖g_n‖ / min_n ‖g_n‖ (``imbalance_paper``); refngd's is max_n ‖g_n‖² / mean_n ‖g_n‖²
  (``imbalance``).
* **E3** (:func:`e3_summary`, the paper's third evaluation): γ̄_X / γ̄_SGD against one
  absolute damping grid, the same for every method.
* **best over damping** (refngd's own summary, not the paper's): the smallest E3 ratio per
  method, flagged when it sits on the edge of the grid.
* **a given direction** (:func:`direction_gammas`, :func:`direction_summary`; refngd's
  own): γ̄(d)/γ̄(g) and γ̄(d)/γ̄* of a direction built elsewhere — an optimizer's
  state-dependent ``opt.direction(θ, state, ...)``, scored by ``refngd compare`` at the
  method's own checkpoints.
"""
from __future__ import annotations

import math

from ..backend import SingularSystemError, eigh_range, namespace, to_float
from ..curvature import EKFAC, KFAC, EmpiricalFisher, Fisher, SampledFisher
from ..derivatives import gradient_from
from ..metrics import gamma
from ..nn.subsets import resolve_params
from ..options import FISHER_TYPE, FisherType

GAMMA_METHODS = ("ngd", "ef", "ief", "sf", "kfac", "ekfac")
#: Wu et al. (2024), App. D.2.2, Fig. 5: iEF beside the three Kronecker-factored methods
WU_FIG5_METHODS = ("ief", "kfac_mc", "kfac_emp", "kfac_ief")
#: every method :func:`batch_gammas` can score (the Fig. 5 K-FACs are opt-in)
ALL_GAMMA_METHODS = GAMMA_METHODS + ("kfac_mc", "kfac_emp", "kfac_ief")
#: the names Wu et al. (2024) give these methods (``kfac``, ``ekfac`` are not in the paper:
#: refngd's type-2 K-FAC and George et al.'s eigenvalue-corrected K-FAC)
PAPER_NAMES = {"ngd": "NGD", "ef": "EF", "ief": "iEF", "sf": "SF", "kfac_mc": "KFAC",
               "kfac_emp": "eKFAC", "kfac_ief": "ieKFAC"}
#: what each E1 spread is, in the record beside it
SD_LABEL = "1-σ sample standard deviation over batches of γ_X/γ_SGD (as Wu et al.'s error bars)"
STDERR_LABEL = ("standard error of γ̄_X/γ̄_SGD over batches, delta method "
                "(refngd's, not the paper's)")
#: absolute dampings of the E3 grid (P × P Tikhonov convention of the loss as trained)
DEFAULT_DAMPINGS = tuple(10.0**k for k in range(-10, 3))
#: E1's near-zero damping: far below every curvature scale of the default problems, yet
#: every method (K-FAC's rank-deficient factors included) still has a direction
E1_DAMPING = 1e-8


def batch_gammas(model, theta, loss, X, y, methods=GAMMA_METHODS, dampings=DEFAULT_DAMPINGS,
                 rng=None, kfac_fisher_type: FisherType = FISHER_TYPE, params=None) -> dict:
    """γ of every method's direction at every damping, on one batch.

    Returns ``{"dampings": [...], "gamma_sgd": γ(g), "gamma_star": γ(F⁺g) (see
    :func:`_gamma_star`), "imbalance": gradient-norm imbalance, method: [γ(d_λ)]}``;
    γ is ``inf`` where a direction has no first-order descent (dᵀg = 0) or its solve
    failed.  ``rng`` (a NumPy Generator) is needed for ``"sf"``.

    ``params`` (docs/subsets.md; default the model's trainable tensors, as the curvature
    classes): the parameter subset S the whole study works on — F = F[S, S], g = g[S],
    every direction and the imbalance on S (LoRA adapters, a last layer).
    """
    unknown = [m for m in methods if m not in ALL_GAMMA_METHODS]
    if unknown:
        raise ValueError(f"unknown γ methods {unknown}; choose from {ALL_GAMMA_METHODS}.")
    dampings = [float(v) for v in dampings]
    if not dampings or not all(math.isfinite(v) and v > 0 for v in dampings):
        raise ValueError("dampings must be a non-empty list of positive finite numbers.")
    sub = resolve_params(model, params)
    lin = model.linearize(theta, X)
    g = gradient_from(lin, loss, y, params=sub)
    sel = dict(linearization=lin, params="all" if sub is None else sub)
    F = Fisher(model, theta, loss, X, y, **sel)
    gamma_star = _gamma_star(F, g)
    EF = EmpiricalFisher(model, theta, loss, X, y, **sel)
    out = {"dampings": dampings, "gamma_sgd": gamma(g, F, g), "gamma_star": gamma_star,
           "imbalance": gradient_norm_imbalance(EF), "imbalance_paper": max_min_norm_ratio(EF)}
    shared = {}  # K-FAC's factors, built once for "kfac" and "ekfac"
    for method in methods:
        dirs = _directions(method, model, theta, loss, X, y, sel, F, EF, g, dampings, rng,
                           kfac_fisher_type, shared)
        out[method] = [gamma(d, F, g) if d is not None else math.inf for d in dirs]
    return out


def _gamma_star(F: Fisher, g) -> float | None:
    """γ* = γ(F⁺g) = 1/√(gᵀF⁺g), the optimum every direction is measured against.

    From F⁺g itself where the Gram matrix K can be factored.  Where K is singular to
    working precision (late in training a confident sample's C − 1 rows are of size
    √p_c, giving eigenvalues ~1e-14), the same number without a solve: g = Uᵀ(c·a), so
    gᵀF⁺g = c²aᵀU(cUᵀU)⁺Uᵀa = c·aᵀΠa with Π the projector onto range(K), taken as K's
    numerical range.  None only where part of e_n lies outside its rows' span (r ≠ 0).
    """
    try:
        return gamma(F.natural_gradient(0.0), F, g)
    except SingularSystemError:
        a, r = F.gradient_coefficients()
        xp = namespace(a)
        if bool(xp.any(r != 0)):
            return None
        w, V = eigh_range(F.gram())
        Va = V.T @ a.reshape(-1).astype(xp.float64)
        q = F.c * to_float((Va * Va).sum())
        return None if q <= 0 else 1.0 / math.sqrt(q)


def gradient_norm_imbalance(EF: EmpiricalFisher) -> float | None:
    """max_n ‖g_n‖² / mean_n ‖g_n‖² of the per-sample gradients g_n = J_nᵀe_n, in [1, N]
    (refngd's statistic; the paper's is :func:`max_min_norm_ratio`).

    1 when every sample pulls equally hard, N when one sample carries the whole
    gradient.  EF's update makes every sample's loss fall by the same amount whatever its
    ‖g_n‖ (G Δ = 1), which is what goes wrong when the norms are imbalanced — the
    inversely-scaled projection of Wu et al. (2024).  ``None`` when every g_n = 0.
    """
    xp = namespace(EF.outputs)
    sq = xp.diagonal(EF.gram())
    mean = to_float(sq.mean())
    return None if mean == 0 else to_float(sq.max()) / mean


def max_min_norm_ratio(EF: EmpiricalFisher) -> float | None:
    """max_n ‖g_n‖ / min_n ‖g_n‖ of one batch: Wu et al. (2024)'s imbalance (Fig. 2, the
    fourth panel, averaged over the evaluated batches).  ``None`` when some g_n = 0."""
    xp = namespace(EF.outputs)
    sq = xp.diagonal(EF.gram())
    lo = to_float(sq.min())
    return None if not lo > 0 else math.sqrt(to_float(sq.max()) / lo)


def checkpoint_imbalance(batches: list[dict]) -> dict:
    """Both imbalance statistics of one checkpoint, averaged over its batches (None if none).

    ``imbalance``: refngd's max ‖g_n‖²/mean ‖g_n‖²; ``imbalance_paper``: Wu et al.'s mean
    over batches of max ‖g_n‖/min ‖g_n‖.
    """
    out = {}
    for key in ("imbalance", "imbalance_paper"):
        v = [b[key] for b in batches if b.get(key) is not None]
        out[key] = sum(v) / len(v) if v else None
    return out


def _directions(method, model, theta, loss, X, y, sel, F, EF, g, dampings, rng, kfac_fisher_type,
                shared=None):
    """The method's direction at every (absolute, P × P Tikhonov) damping.

    ``shared`` (a dict) keeps the K-FAC operator of one batch for the other Kronecker
    method — not for ``"mc"`` factors, which then draw their own labels as before.
    """
    if method == "ngd":
        return F.natural_gradient_sweep(dampings)
    if method == "sf":
        if rng is None:
            raise TypeError("the sampled Fisher needs rng=numpy.random.default_rng(seed).")
        SF = SampledFisher(model, theta, loss, X, y, rng=rng, **sel)
        return SF.natural_gradient_sweep(dampings)
    if method == "ef":
        return EF.natural_gradient_sweep(dampings)  # Gram form (eq. 5) at λ_gram = λ/c
    if method == "ief":
        return _ief_gram_sweep(EF, loss, y, dampings)
    if method in ("kfac_mc", "kfac_emp", "kfac_ief"):
        return _wu_kfac(method, model, theta, loss, X, y, sel, g, dampings, rng)
    kf = None if shared is None or kfac_fisher_type == "mc" else shared.get("kfac")
    if kf is None:
        kf = KFAC(model, theta, loss, X, y, fisher_type=kfac_fisher_type, rng=rng, **sel)
        if shared is not None and kfac_fisher_type != "mc":
            shared["kfac"] = kf
    op = kf if method == "kfac" else EKFAC(model, theta, loss, X, y, kfac=kf)
    dirs = []
    for lam in dampings:
        try:
            dirs.append(op.solve(g, lam))
        except SingularSystemError:  # a numerically singular block at tiny λ: no direction
            dirs.append(None)
    return dirs


class _IEFWeighted:
    """A loss whose output gradients are e_n/‖e_n‖: its empirical K-FAC is ieKFAC."""

    def __init__(self, loss):
        self._loss = loss

    def __getattr__(self, name):
        return getattr(self._loss, name)

    def output_gradient(self, Z, y):
        e = self._loss.output_gradient(Z, y)
        xp = namespace(e)
        norms = xp.sqrt((e * e).sum(axis=1, keepdims=True))
        return xp.where(norms > 0, e / xp.where(norms > 0, norms, 1.0), 0.0)


def _wu_kfac(method, model, theta, loss, X, y, sel, g, dampings, rng):
    """Wu et al.'s Fig. 5 K-FACs (module docstring): MC, empirical and iEF-weighted factors."""
    if method == "kfac_mc":
        if rng is None:
            raise TypeError("the MC K-FAC needs rng=numpy.random.default_rng(seed).")
        op = KFAC(model, theta, loss, X, y, fisher_type="mc", rng=rng, **sel)
    else:
        src = _IEFWeighted(loss) if method == "kfac_ief" else loss
        op = KFAC(model, theta, src, X, y, fisher_type="empirical", **sel)
    dirs = []
    for lam in dampings:
        try:
            dirs.append(op.solve(g, lam))
        except SingularSystemError:
            dirs.append(None)
    return dirs


def _ief_gram_sweep(EF: EmpiricalFisher, loss, y, dampings):
    """Gᵀ(GGᵀ + (λ/c)I)⁻¹ s, s_n = ‖e_n‖², for all λ from one ``eigh`` (Wu et al. eq. 8)."""
    xp = namespace(EF.outputs)
    e = loss.output_gradient(EF.outputs, y)
    s = (e * e).sum(axis=1).astype(xp.float64)
    if not bool(xp.any(s > 0)):  # a perfectly fitted batch has no update to score
        return [None] * len(dampings)
    w, V = eigh_range(EF.gram())  # the Gram matrix's numerical null space is annihilated by Gᵀ
    Vs = V.T @ s
    N = s.shape[0]
    return [EF.rows.rmatvec((V @ (Vs / (w + lam / EF.c))).reshape(N, 1).astype(EF.dtype))
            for lam in dampings]


# ------------------------------------------------------------------------ protocols
def _ratio_of_means(x: list[float], y: list[float]) -> tuple[float, float | None]:
    """x̄/ȳ and its standard error by the delta method, √(Var(x − R y)/n)/ȳ (n ≥ 2)."""
    n = len(x)
    if any(not math.isfinite(v) for v in x) or not y:
        return math.inf, None
    xm, ym = sum(x) / n, sum(y) / n
    R = xm / ym
    if n < 2:
        return R, None
    dev = [a - R * b for a, b in zip(x, y)]
    var = sum(d * d for d in dev) / (n - 1)
    return R, math.sqrt(var / n) / ym


def _sd_of_ratios(x: list[float], y: list[float]) -> float | None:
    """Sample standard deviation (n − 1) of x_b / y_b over the batches; None for n < 2."""
    r = [a / b for a, b in zip(x, y)]
    if len(r) < 2 or not all(math.isfinite(v) for v in r):
        return None if len(r) < 2 else math.inf
    m = sum(r) / len(r)
    return math.sqrt(sum((v - m) ** 2 for v in r) / (len(r) - 1))


def e1_summary(batches: list[dict], damping: float) -> dict:
    """The paper's first evaluation at one damping: γ̄_X/γ̄_SGD, its spreads, γ̄_X/γ̄*.

    ``batches`` are :func:`batch_gammas` results that all contain ``damping``.  Returns
    ``{method: {"mean_ratio", "sd", "sd_label", "stderr", "stderr_label", "damping",
    "optimal_ratio"}}``: ``sd`` the paper's kind of error bar (1-σ standard deviation over
    the batches of the per-batch ratio γ_X/γ_SGD; Wu et al. 2024, Fig. 2 caption),
    ``stderr`` refngd's standard error of the ratio of means (delta method); both None for
    a single batch.  ``optimal_ratio`` is None where γ* is undefined.
    """
    if not batches:
        raise ValueError("e1_summary needs at least one batch.")
    i = _damping_index(batches[0]["dampings"], damping)
    sgd = [b["gamma_sgd"] for b in batches]
    stars = [b["gamma_star"] for b in batches]
    out = {}
    for m in _methods(batches[0]):
        x = [b[m][i] for b in batches]
        ratio, se = _ratio_of_means(x, sgd)
        optimal = _ratio_of_means(x, stars)[0] if all(s is not None for s in stars) else None
        out[m] = {"mean_ratio": ratio, "sd": _sd_of_ratios(x, sgd), "sd_label": SD_LABEL,
                  "sd_over": "batches", "stderr": se, "stderr_label": STDERR_LABEL,
                  "stderr_over": "batches",
                  "damping": damping, "optimal_ratio": optimal}
    return out


def direction_gammas(model, theta, loss, X, y, d) -> dict:
    """γ of one given direction ``d`` on one batch, beside γ(g) and γ* (as :func:`batch_gammas`).

    For directions that depend on an optimizer's state (RF-Adam, IKFAC, AdamQLR, ...:
    ``opt.direction(θ, state, ...)``), which :func:`batch_gammas` cannot build from θ
    alone.  Returns ``{"gamma": γ(d), "gamma_sgd": γ(g), "gamma_star": γ(F⁺g) or None}``
    with F the exact Fisher of the batch at θ (all trainable parameters).
    """
    lin = model.linearize(theta, X)
    g = gradient_from(lin, loss, y)
    F = Fisher(model, theta, loss, X, y, linearization=lin)
    try:
        gamma_star = gamma(F.natural_gradient(0.0), F, g)
    except SingularSystemError:
        gamma_star = None
    return {"gamma": gamma(d, F, g), "gamma_sgd": gamma(g, F, g), "gamma_star": gamma_star}


def direction_summary(batches: list[dict]) -> dict:
    """E1-style ratios of :func:`direction_gammas` results over batches.

    ``{"mean_ratio": γ̄(d)/γ̄(g), "stderr" (delta method over the batches; None for one),
    "optimal_ratio": γ̄(d)/γ̄* (None where γ* is undefined)}``.
    """
    if not batches:
        raise ValueError("direction_summary needs at least one batch.")
    x = [b["gamma"] for b in batches]
    stars = [b["gamma_star"] for b in batches]
    ratio, se = _ratio_of_means(x, [b["gamma_sgd"] for b in batches])
    optimal = _ratio_of_means(x, stars)[0] if all(v is not None for v in stars) else None
    return {"mean_ratio": ratio, "stderr": se, "stderr_over": "batches", "optimal_ratio": optimal}


def e3_summary(batches: list[dict]) -> dict:
    """The paper's third evaluation: γ̄_X(λ)/γ̄_SGD over the shared damping grid, per method.

    Also refngd's own "best over damping" summary: ``best_ratio``, ``best_damping`` and
    ``best_on_grid_edge`` (the minimum sits at an end of the grid and the ratio is still
    falling towards it, so a wider grid might do better).
    """
    if not batches:
        raise ValueError("e3_summary needs at least one batch.")
    dampings = batches[0]["dampings"]
    sgd = _mean([b["gamma_sgd"] for b in batches])
    out = {}
    for m in _methods(batches[0]):
        ratios = [_mean([b[m][i] for b in batches]) / sgd for i in range(len(dampings))]
        out[m] = {"dampings": list(dampings), "ratios": ratios, **best_over_damping(dampings, ratios)}
    return out


def best_over_damping(dampings, ratios) -> dict:
    """The smallest ratio, its damping, and whether it sits on (and falls towards) a grid edge."""
    finite = [(r, i) for i, r in enumerate(ratios) if math.isfinite(r)]
    best, i = min(finite) if finite else (math.inf, 0)
    edge = False
    valid = [j for _, j in finite]
    if len(valid) > 1 and i in (min(valid), max(valid)):
        # on the edge of the grid, or of its part where the method has a direction; a
        # plateau reached there (λ below every eigenvalue, say) is not flagged
        neighbour = ratios[i + 1] if i == min(valid) else ratios[i - 1]
        edge = not (math.isfinite(neighbour) and neighbour <= best * (1 + 1e-3))
    return {"best_ratio": best, "best_damping": dampings[i], "best_on_grid_edge": edge}


def _damping_index(dampings, damping: float) -> int:
    for i, v in enumerate(dampings):
        if math.isclose(v, damping, rel_tol=1e-12):
            return i
    raise ValueError(f"damping {damping:g} was not evaluated (dampings: {list(dampings)}).")


def _methods(batch: dict) -> list[str]:
    return [m for m in ALL_GAMMA_METHODS if m in batch]


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


__all__ = ["GAMMA_METHODS", "WU_FIG5_METHODS", "ALL_GAMMA_METHODS", "PAPER_NAMES",
           "DEFAULT_DAMPINGS", "E1_DAMPING", "batch_gammas", "gradient_norm_imbalance",
           "max_min_norm_ratio", "checkpoint_imbalance", "e1_summary", "e3_summary",
           "best_over_damping", "direction_gammas", "direction_summary"]
