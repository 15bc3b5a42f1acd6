"""Approximation quality of update directions: Wu et al. (2024)'s evaluation framework.

X. Wu, W. Yu, C. Zhang, P. Woodland (2024), "An Improved Empirical Fisher Approximation
for Natural Gradient Descent", NeurIPS 2024, §6 (and their Algorithm 4).  At a
checkpoint θ and on a fixed batch, every method's update d is scored by

    γ(d) = √(dᵀ F d) / |dᵀ g|       (eq. 15; F the exact Fisher/GGN of the batch)

relative to SGD's γ(g): a ratio below 1 means d is closer to the exact natural gradient
(which minimises γ) than the plain gradient is.  Each method's damping λ is swept over a
grid and the best (smallest) ratio is reported, as in the paper.

Damping grid.  λ = τ · s with τ from ``taus`` (default 10⁻⁸ … 10²) and s the *mean
eigenvalue of the matrix being damped*, so that one τ grid means the same for every
method:

=========  =====================================================  ================
method      update d(λ)                                            s
=========  =====================================================  ================
``ngd``     (F + λI)⁻¹ g, exact Fisher                              tr(F)/P
``sf``      (F̂ + λI)⁻¹ g, one MC label per input                    tr(F̂)/P
``ef``      Gᵀ(GGᵀ + λI)⁻¹ 1   (paper's eq. 4, Gram damping)        tr(GGᵀ)/N
``ief``     Gᵀ(GGᵀ + λI)⁻¹ s   (paper's eq. 8, Gram damping)        tr(GGᵀ)/N
``kfac``    (G ⊗ A + λI)⁻¹ g per layer, Tikhonov                    tr(K-FAC)/P
``ekfac``   (Q diag(s) Qᵀ + λI)⁻¹ g per layer, Tikhonov             tr(EKFAC)/P
=========  =====================================================  ================

K-FAC and EKFAC use the ``type-2`` factors (exact output Hessian rows), so they measure
the Kronecker structure alone, not Monte-Carlo noise (pass ``kfac_fisher_type`` to
change).  One eigendecomposition per method serves the whole damping sweep for the
exact family.
"""
from __future__ import annotations

import math

from ..backend import SingularSystemError, namespace, to_float
from ..curvature import EKFAC, KFAC, EmpiricalFisher, Fisher, SampledFisher
from ..derivatives import gradient_from
from ..metrics import gamma

GAMMA_METHODS = ("ngd", "ef", "ief", "sf", "kfac", "ekfac")
#: relative damping τ: λ = τ × (mean eigenvalue of the damped matrix)
DEFAULT_TAUS = tuple(10.0**k for k in range(-8, 3))


def gamma_ratios(model, theta, loss, X, y, methods=GAMMA_METHODS, taus=DEFAULT_TAUS, rng=None,
                 kfac_fisher_type: str = "type-2") -> dict:
    """γ(d_λ)/γ(g) of every method for every damping on one batch.

    Returns ``{method: {"taus": [...], "dampings": [...], "ratios": [...],
    "best_ratio": r, "best_tau": τ, "best_damping": λ, "best_on_grid_edge": bool}}`` and
    ``"gamma_sgd"``, γ(g) itself.  ``rng`` (NumPy Generator) is needed for ``"sf"``.
    Ratios are ``inf`` where a direction has no first-order descent (dᵀg = 0) or a solve
    failed.
    """
    unknown = [m for m in methods if m not in GAMMA_METHODS]
    if unknown:
        raise ValueError(f"unknown γ methods {unknown}; choose from {GAMMA_METHODS}.")
    taus = [float(t) for t in taus]
    if not taus or min(taus) <= 0:
        raise ValueError("taus must be a non-empty list of positive numbers.")
    lin = model.linearize(theta, X)
    g = gradient_from(lin, loss, y)
    F = Fisher(model, theta, loss, X, y, linearization=lin)
    g_sgd = gamma(g, F, g)
    P = theta.shape[0]
    out = {"gamma_sgd": g_sgd}
    for method in methods:
        dirs, scale = _directions(method, model, theta, loss, X, y, lin, F, g, taus, P, rng,
                                  kfac_fisher_type)
        ratios = [(gamma(d, F, g) / g_sgd if d is not None else math.inf) for d in dirs]
        out[method] = _summary(taus, scale, ratios)
    return out


def _directions(method, model, theta, loss, X, y, lin, F, g, taus, P, rng, kfac_fisher_type):
    """The method's update for every τ, and the damping scale s (λ = τ s)."""
    if method == "ngd":
        s = F.trace() / P
        return F.solve_sweep(g, [t * s for t in taus]), s
    if method == "sf":
        if rng is None:
            raise TypeError("the sampled Fisher needs rng=numpy.random.default_rng(seed).")
        SF = SampledFisher(model, theta, loss, X, y, rng=rng, linearization=lin)
        s = SF.trace() / P
        return SF.solve_sweep(g, [t * s for t in taus]), s
    if method in ("ef", "ief"):
        return _gram_sweep(method, model, theta, loss, X, y, lin, taus)
    kf = KFAC(model, theta, loss, X, y, fisher_type=kfac_fisher_type, rng=rng, linearization=lin)
    op = kf if method == "kfac" else EKFAC(model, theta, loss, X, y, kfac=kf)
    s = op.trace() / P
    dirs = []
    for t in taus:
        try:
            dirs.append(op.solve(g, t * s))
        except SingularSystemError:  # a numerically singular block at tiny λ: no direction
            dirs.append(None)
    return dirs, s


def _gram_sweep(method, model, theta, loss, X, y, lin, taus):
    """Wu et al. (2024) eq. 4 / 8 for all λ from one ``eigh`` of the N × N Gram matrix."""
    EF = EmpiricalFisher(model, theta, loss, X, y, linearization=lin)
    Z = lin.outputs
    xp = namespace(Z)
    K = EF.gram()
    N = K.shape[0]
    w, V = xp.linalg.eigh(K)
    w = xp.maximum(w, 0.0)
    if method == "ef":
        rhs = xp.ones(N, dtype=xp.float64)
    else:
        e = loss.output_gradient(Z, y)
        rhs = (e * e).sum(axis=1).astype(xp.float64)
    Vr = V.T @ rhs
    s = to_float(xp.trace(K)) / N
    if s == 0:  # every e_n = 0: a perfectly fitted batch has no update to score
        return [None] * len(taus), s
    dirs = []
    for t in taus:
        coef = V @ (Vr / (w + t * s))
        dirs.append(EF.rows.rmatvec(coef.reshape(N, 1).astype(theta.dtype, copy=False)))
    return dirs, s


def _summary(taus, scale, ratios) -> dict:
    finite = [(r, i) for i, r in enumerate(ratios) if math.isfinite(r)]
    best, i = min(finite) if finite else (math.inf, 0)
    edge = False
    if finite and len(ratios) > 1 and i in (0, len(ratios) - 1):
        # at an end of the grid and still falling towards it: a wider grid might do better
        # (a plateau, e.g. for λ → 0 once λ is below every eigenvalue, is not flagged)
        neighbour = ratios[1] if i == 0 else ratios[-2]
        edge = not (math.isfinite(neighbour) and neighbour <= best * (1 + 1e-3))
    return {"taus": list(taus), "dampings": [t * scale for t in taus], "ratios": ratios,
            "best_ratio": best, "best_tau": taus[i], "best_damping": taus[i] * scale,
            "best_on_grid_edge": edge}


def average_gamma(tables: list[dict]) -> dict:
    """Average several :func:`gamma_ratios` results (one per evaluation batch) per τ.

    The best ratio is taken *after* averaging over batches: one damping per method and
    checkpoint, as a practitioner would choose it.
    """
    if not tables:
        raise ValueError("average_gamma needs at least one table.")
    out = {"gamma_sgd": sum(t["gamma_sgd"] for t in tables) / len(tables)}
    for method, first in tables[0].items():
        if method == "gamma_sgd":
            continue
        ratios = [sum(t[method]["ratios"][i] for t in tables) / len(tables)
                  for i in range(len(first["taus"]))]
        scale = sum(t[method]["dampings"][0] / t[method]["taus"][0] for t in tables) / len(tables)
        out[method] = _summary(first["taus"], scale, ratios)
    return out


__all__ = ["GAMMA_METHODS", "DEFAULT_TAUS", "gamma_ratios", "average_gamma"]
