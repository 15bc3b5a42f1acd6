"""The damping of an update of unknown convention, fitted in the curvature's eigenbasis.

:func:`refngd.check.infer` calls :func:`update_fits` once per option set (Fisher type,
bias, ``kfac_approx``, factor rule, or an EF/iEF ``form``).  Every update refngd knows is,
per block of θ, a scalar times a *damped inverse* applied to a gradient r:

* K-FAC and EKFAC (Martens & Grosse 2015, §6.3; George et al. 2018, §3), in the block's
  Kronecker eigenbasis Q = U_G ⊗ U_A, with W = U_Gᵀ V_r U_A the gradient's coordinates,
  s_ij the curvature's eigenvalues (g_i a_j for K-FAC, EKFAC's re-estimated diagonal):

      Tikhonov:           d_ij = κ W_ij / (s_ij + μ)
      factor damping:     d_ij = κ W_ij / (s_ij + γ_A g_i + γ_G a_j + γ_A γ_G)

  (for K-FAC the second denominator is (g_i + γ_G)(a_j + γ_A); every factored variant —
  π = trace, a fixed π, λ/T per location, per-factor (λ_A, λ_G) — is one pair (γ_A, γ_G));
* exact NGD, EF and iEF (Wu et al. 2024, eq. 4, 5, 8): d = κ (M + μI)⁻¹ r in M's
  eigenbasis, with M the Fisher / EF / iEF matrix and r the gradient (or, for iEF's Gram
  form, Gᵀs on the matrix GᵀG).

A candidate that is such an update satisfies equations *linear* in (1/κ, μ/κ) — resp.
(1/κ, γ_A/κ, γ_G/κ, γ_Aγ_G/κ): W_ij = (1/κ)(s_ij + μ) d_ij — so the damping is fitted in
closed form by least squares (``lstsq`` on 2 or 4 columns) from one eigendecomposition per
factor pair, whatever the damping.  The fitted values are then named (a monomial times the
user's λ, :mod:`refngd.check.scalars`), each named hypothesis is evaluated exactly (its κ
in closed form) and the simplest one that reproduces the candidate wins.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .scalars import EMA_BETAS, name


@dataclass
class EigenBlock:
    """One block of θ in its curvature's eigenbasis (host float64).

    ``name`` (a PyTorch-style block name), ``layer`` (its layer's name), ``idx`` (θ
    indices of the block's entries), ``basis`` (Q or the pair (U_G, U_A)), ``W`` the
    gradient's and ``C`` the candidate's coordinates, ``S`` the eigenvalues, ``g``/``a`` the
    factors' eigenvalues (K-FAC family), ``trace_pi`` refngd's π of the block, ``T`` the
    positions sharing the weight, ``bias`` whether the block is a separate bias block.
    """

    name: str
    layer: str
    idx: np.ndarray
    basis: tuple
    W: np.ndarray
    C: np.ndarray | None
    S: np.ndarray
    g: np.ndarray | None = None
    a: np.ndarray | None = None
    trace_pi: float = 1.0
    T: int = 1
    bias: bool = False
    #: a thin basis Q (P × r) of an exact update's row space: the direction of the gradient's
    #: part outside it (eigenvalue 0), or None; coordinates then end with two for that part
    perp: np.ndarray | None = None

    def denominator(self, hyp: dict) -> np.ndarray:
        if "mu" in hyp:
            return self.S + hyp["mu"]
        gA, gG = hyp["gamma_A"], hyp["gamma_G"]
        return self.S + gA * self.g[:, None] + gG * self.a[None, :] + gA * gG

    def coords(self, v: np.ndarray) -> np.ndarray:
        """A θ-vector's coordinates in this block's eigenbasis (Qᵀ v).

        A thin basis (exact updates) adds two: the part of v outside span(Q) along the
        gradient's own part there (``perp``), and the norm of the rest (which no update
        of the family has).
        """
        if len(self.basis) == 1:
            Q = self.basis[0]
            x = v[self.idx]
            c = Q.T @ x
            if Q.shape[1] == Q.shape[0]:
                return c
            rest = x - Q @ c
            along = float(rest @ self.perp) if self.perp is not None else 0.0
            other = rest - along * self.perp if self.perp is not None else rest
            return np.concatenate([c, [along, float(np.linalg.norm(other))]])
        UG, UA = self.basis
        return UG.T @ v[self.idx] @ UA

    def with_candidate(self, cand: np.ndarray) -> "EigenBlock":
        return dataclasses.replace(self, C=self.coords(cand))

    def back(self, X: np.ndarray) -> np.ndarray:
        """The block's coordinates X back in θ order (Q X)."""
        if len(self.basis) == 1:
            Q = self.basis[0]
            r = Q.shape[1]
            out = Q @ X[:r]
            return out + X[r] * self.perp if r < Q.shape[0] and self.perp is not None else out
        UG, UA = self.basis
        return (UG @ X @ UA.T).reshape(-1)


@dataclass
class Evaluated:
    """A named damping hypothesis evaluated on every block: κ per block, residual per block."""

    hyp: dict                       # per block name: {"mu": .} or {"gamma_A": ., "gamma_G": .}
    kappa: dict = field(default_factory=dict)
    residual: dict = field(default_factory=dict)
    coords: dict = field(default_factory=dict)  # u = W / denominator (the update for κ = 1)


def evaluate(blocks: list, per_layer: dict) -> Evaluated:
    """κ_b in closed form (κ = ⟨C, u⟩/⟨u, u⟩, u = W / denominator) and ‖C − κu‖/‖κu‖."""
    out = Evaluated(per_layer)
    for b in blocks:
        hyp = per_layer[b.name] if b.name in per_layer else per_layer[b.layer]
        den = b.denominator(hyp)
        if np.any(den <= 0):
            out.kappa[b.name], out.residual[b.name] = math.nan, math.inf
            out.coords[b.name] = np.zeros_like(b.W)
            continue
        u = b.W / den
        uu = float((u * u).sum())
        k = float((b.C * u).sum()) / uu if uu > 0 else 0.0
        out.kappa[b.name] = k
        nu = abs(k) * math.sqrt(uu)
        nc = float(np.linalg.norm(b.C))
        diff = float(np.linalg.norm(b.C - k * u))
        out.residual[b.name] = diff / nu if nu > 0 else (0.0 if nc == 0 else math.inf)
        out.coords[b.name] = u
    return out


def free_fit(b: EigenBlock, factored: bool) -> list:
    """The dampings that fit block ``b`` best, by linear least squares (module docstring).

    Returns [{"mu": μ, "kappa": κ}] or [{"gamma_A": γ_A, "gamma_G": γ_G, "kappa": κ}, ...],
    or [] when the data do not determine it (the candidate is zero, or the columns are
    degenerate — a factor with a single eigenvalue, a bias block's A = [1]).  Where the
    gradient lives only on pairs with g_i = a_j (the tutorial's factors of one matrix ∇W
    share their spectrum) only γ_A + γ_G and γ_A γ_G are determined: both roots of
    t² − (γ_A + γ_G) t + γ_A γ_G are returned, in either order.
    """
    C = b.C
    if not np.any(C):
        return []
    if factored and (b.g is None or b.a.size < 2 or np.ptp(b.a) == 0 or np.ptp(b.g) == 0):
        return []
    cols = [b.S * C, b.g[:, None] * C, b.a[None, :] * C, C] if factored else [b.S * C, C]
    M = np.stack([c.reshape(-1) for c in cols], axis=1)
    scale = np.linalg.norm(M, axis=0)
    if np.any(scale == 0):
        return []
    Mn = M / scale
    if factored and abs(Mn[:, 1] @ Mn[:, 2]) > 1 - 1e-9:  # g∘C ∥ a∘C: sum and product only
        p, _, rank, _ = np.linalg.lstsq(Mn[:, [0, 1, 3]], b.W.reshape(-1), rcond=None)
        p = p / scale[[0, 1, 3]]
        if rank < 3 or not p[0] or not math.isfinite(p[0]):
            return []
        tot, prod = p[1] / p[0], p[2] / p[0]
        disc = tot * tot - 4 * prod
        if disc < -1e-4 * tot * tot:  # complex roots: not a damping
            return []
        disc = max(disc, 0.0)  # a double root (γ_A = γ_G, π = 1) up to round-off
        r1, r2 = (tot + math.sqrt(disc)) / 2, (tot - math.sqrt(disc)) / 2
        return [{"gamma_A": r1, "gamma_G": r2, "kappa": 1 / p[0]},
                {"gamma_A": r2, "gamma_G": r1, "kappa": 1 / p[0]}]
    p, _, rank, _ = np.linalg.lstsq(Mn, b.W.reshape(-1), rcond=None)
    p = p / scale
    if rank < Mn.shape[1] or not p[0] or not math.isfinite(p[0]):
        return []  # fewer informative coordinates than unknowns: not determined here
    if factored:
        return [{"gamma_A": p[1] / p[0], "gamma_G": p[2] / p[0], "kappa": 1 / p[0]}]
    return [{"mu": p[1] / p[0], "kappa": 1 / p[0]}]


# ----------------------------------------------------------------------- named hypotheses
#: the damping rules tried for a K-FAC / EKFAC update, with the options that select them
RULES = {
    "tikhonov": dict(damping_mode="tikhonov"),
    "factored-trace": dict(damping_mode="factored", pi="trace"),
    "factored-fixed": dict(damping_mode="factored"),
    "factored-trace-bias-weight": dict(damping_mode="factored", pi="trace",
                                       bias_damping="weight"),
    "factored-fixed-bias-weight": dict(damping_mode="factored", bias_damping="weight"),
    "per-factor": dict(damping_mode="per-factor"),
}


#: the complexity of a raw (unnamed) number: such a choice is only ever the nearest
RAW = 100.0
#: the complexity of a round number (one significant digit) naming a damping map: λ_G = 10λ
ROUND = 4.0


def _ema_token(names: dict) -> str | None:
    """The "(1-β" of an EMA factor in a layer's damping names, or None."""
    for v in names.values():
        if isinstance(v, str) and "(1-" in v:
            i = v.index("(1-")
            return v[i:v.index(")", i)]
    return None


@dataclass
class LayerChoice:
    """One layer's named damping under a rule: names, per-block hypotheses, evaluation."""

    names: dict
    hyp: dict
    ev: Evaluated
    complexity: float
    recipe: tuple = ()     # the numbers behind the names: (m,), (m_A, m_G) or (m, π)
    #: a layer whose damping swamps its curvature: the stand-in damping μ (only κ/μ counts)
    swamped: float | None = None

    @property
    def residual(self) -> float:
        return max(self.ev.residual.values())


def _named(x: float, ctx: dict, window: float, half: bool = False, top: int = 3,
           betas=EMA_BETAS) -> list:
    """Up to ``top`` (value, name, complexity) for x: the simplest monomials near it, and x."""
    out = [(m.value, str(m), m.complexity)
           for m in name(x, ctx, window, half=half, betas=betas)[:top]]
    if x > 0 and math.isfinite(x) and not half:  # a round number: 10, 0.5, 3e-3 (one digit)
        e = math.floor(math.log10(x))
        d = round(x / 10 ** e)
        r = d * 10.0 ** e
        if abs(x / r - 1) <= window and f"{r:g}" not in {n for _, n, _ in out}:
            out.append((r, f"{r:g}", ROUND + (d != 1)))
    if x > 0 and math.isfinite(x) and f"{x:.6g}" not in {n for _, n, _ in out}:
        out.append((x, f"{x:.6g}", RAW))  # the raw number: for the nearest convention
    return out


def _shifts(rule: str, blk: EigenBlock, weight: EigenBlock, lam_eff: float, pi: float | None,
            pf: tuple | None) -> dict:
    """(γ_A, γ_G) or μ of ``blk`` under ``rule`` (refngd.curvature.damping)."""
    if rule == "tikhonov":
        return {"mu": lam_eff}
    if rule == "per-factor":
        return {"gamma_A": pf[0], "gamma_G": pf[1]}
    if blk.bias and rule.endswith("bias-weight"):  # curvlinops: (G + √λ/π_W I) ⊗ [1]
        p = weight.trace_pi if pi is None else pi
        return {"gamma_A": 0.0, "gamma_G": math.sqrt(lam_eff) / p}
    p = blk.trace_pi if pi is None else pi
    return {"gamma_A": p * math.sqrt(lam_eff), "gamma_G": math.sqrt(lam_eff) / p}


#: how many of the simplest monomials a layer whose data do not determine its damping tries
PRIOR = 30


def _prior(rule: str, ctx: dict, fixed_pi: tuple | None = None, betas=EMA_BETAS) -> dict:
    """{key: (names, recipe, complexity)} of the simplest damping maps under ``rule``."""
    from .scalars import monomials

    ms = [(m.value, str(m), m.complexity) for m in monomials(ctx, betas=betas)[:PRIOR]]
    if rule == "tikhonov":
        return {(n,): ({"damping": n}, (v,), c) for v, n, c in ms}
    if rule == "per-factor":
        return {(na, ng): ({"lambda_A": na, "lambda_G": ng}, (va, vg), ca + cg)
                for va, na, ca in ms for vg, ng, cg in ms[:4]} | \
            {(ng, na): ({"lambda_A": ng, "lambda_G": na}, (vg, va), ca + cg)
             for va, na, ca in ms for vg, ng, cg in ms[:4]}
    if "trace" in rule:
        return {(n, "trace"): ({"damping": n, "pi": "trace"}, (v, None), c) for v, n, c in ms}
    pis = [(m.value, str(m), m.complexity) for m in monomials(ctx, half=True)[:4]] \
        if fixed_pi is None else [(fixed_pi[0], fixed_pi[1], 0.0)]
    return {(n, pn): ({"damping": n, "pi": pn}, (v, p), c + pc)
            for v, n, c in ms for p, pn, pc in pis}


def layer_choices(rule: str, blocks: list, lam, ctx: dict, window: float, tol: float,
                  shared: dict | None = None, fixed_pi: tuple | None = None,
                  betas=EMA_BETAS, ema: bool = False) -> list:
    """Named damping candidates for one layer's ``blocks`` under ``rule``, best first.

    ``lam``: the user's λ (or (λ_A, λ_G), per-factor only); ``ctx``: the layer's sizes;
    ``window``: how far a fitted value may be from a name; ``tol``: the pass tolerance;
    ``shared``: candidates other layers named ({key: (names, recipe, complexity)}), tried
    here too — a layer whose own data do not determine its damping (the tutorial's factors,
    of rank ≤ 2, say) takes the one the network's other layers show; ``fixed_pi``: (π, its
    name) the user knows, for the fixed-π rules; ``betas``: the EMA decays names may use
    (the user's ``ema_beta``, else :data:`refngd.check.scalars.EMA_BETAS`); ``ema``: the
    user passed ``ema_beta`` — without it a damping named with (1 − β)^k is kept only where
    the layer's scale κ carries the same (1 − β) (an EMA's factors from zero), and a round
    number (λ_G = 10λ) names what no monomial does.
    """
    main = next((b for b in blocks if not b.bias), blocks[0])
    pair = isinstance(lam, tuple)
    lam_a, lam_g = lam if pair else (lam, lam)
    if pair and rule != "per-factor":
        return []
    one = [(1.0, "1", 0.0)]
    cands = dict(shared or {})  # key → (names, recipe, complexity)
    if rule == "tikhonov":
        fit = free_fit(main, factored=False)
        for v, n, c in (_named(fit[0]["mu"] / lam, ctx, window, betas=betas)
                        if fit else []) or one:
            cands[(n,)] = ({"damping": n}, (v,), c)
    ffits = free_fit(main, factored=True) if rule != "tikhonov" else []
    for fit in ((ffits or [None]) if rule != "tikhonov" else []):
        ok = fit is not None and fit["gamma_A"] > 0 and fit["gamma_G"] > 0
        if rule == "per-factor":
            ma = _named(fit["gamma_A"] / lam_a, ctx, window, betas=betas) if ok else one
            mg = _named(fit["gamma_G"] / lam_g, ctx, window, betas=betas) if ok else one
            for va, na, ca in ma:
                for vg, ng, cg in mg:
                    cands[(na, ng)] = ({"lambda_A": na, "lambda_G": ng}, (va, vg), ca + cg)
            continue
        ms = (_named(fit["gamma_A"] * fit["gamma_G"] / lam, ctx, window, betas=betas)
              if ok else []) or one
        if "trace" in rule:
            pis = [(None, "trace", 0.0)]
        elif fixed_pi is not None:
            pis = [(fixed_pi[0], fixed_pi[1], 0.0)]
        else:
            pis = (_named(math.sqrt(fit["gamma_A"] / fit["gamma_G"]), ctx, window, half=True)
                   if ok else []) or one
        for v, n, c in ms:
            for p, pn, pc in pis:
                cands[(n, pn)] = ({"damping": n, "pi": pn}, (v, p), c + pc)

    if not cands or all(c >= RAW for _, _, c in cands.values()) or (
            rule != "tikhonov" and not ffits):
        cands.update(_prior(rule, ctx, fixed_pi, betas))  # undetermined here: the simplest names

    if fixed_pi is not None and rule.startswith("factored-fixed"):  # shared: this layer's π
        cands = {(nm["damping"], fixed_pi[1]): ({"damping": nm["damping"], "pi": fixed_pi[1]},
                                                (rc[0], fixed_pi[0]), c)
                 for nm, rc, c in cands.values()}

    def hyp(recipe):
        if rule == "tikhonov":
            return {b.name: _shifts(rule, b, main, recipe[0] * lam, None, None) for b in blocks}
        if rule == "per-factor":
            pf = (recipe[0] * lam_a, recipe[1] * lam_g)
            return {b.name: _shifts(rule, b, main, 0, None, pf) for b in blocks}
        return {b.name: _shifts(rule, b, main, recipe[0] * lam, recipe[1], None) for b in blocks}

    out = []
    for names, recipe, c in cands.values():
        h = hyp(recipe)
        out.append(LayerChoice(names, h, evaluate(blocks, h), c, recipe))

    if not ema:  # (1 − β)^k in a damping only where the scale carries the same EMA factor
        def ema_ok(ch):
            tok = _ema_token(ch.names)
            return tok is None or all(
                tok in str((name(abs(k), ctx, window, betas=betas) or ["-"])[0])
                for k in ch.ev.kappa.values() if k)
        out = [ch for ch in out if ema_ok(ch)]

    def rank(ch):  # the simplest choice that fits with every κ named; else the closest
        if ch.residual > tol:
            return (2, ch.residual, ch.complexity)
        named = all(name(abs(k), ctx, window, betas=betas) for k in ch.ev.kappa.values() if k)
        return (0 if named else 1, ch.complexity, ch.residual)

    return sorted(out, key=rank)


def swamped_choice(blocks: list, lam: float, tol: float) -> LayerChoice | None:
    """A layer whose candidate is a multiple of its gradient: the damping swamps the curvature.

    Every damped inverse is W/(s + μ) per eigen-coordinate (Tikhonov; a factored damping's
    γ_A g + γ_G a + γ_A γ_G alike).  Where the candidate is ρ·W per block within ``tol``,
    the curvature's eigenvalues times the scale lie below tolerance × damping: any damping
    μ ≥ max(s)/tol with κ = ρμ reproduces it, so only κ/μ (the scale over the damping) is
    determined by the data.  Returns the choice with a stand-in μ far above max(s) (named
    by the ratio alone, :meth:`refngd.check.infer.Inference._update_fit`), or None.
    """
    top = max((float(np.max(np.abs(b.S))) if b.S.size else 0.0) for b in blocks)
    mu = (top if top > 0 else 1.0) / max(tol, 1e-300) * 1e4
    for b in blocks:
        ww = float((b.W * b.W).sum())
        if ww == 0 or not np.any(b.C):
            return None
        rho = float((b.C * b.W).sum()) / ww
        if rho == 0 or np.linalg.norm(b.C - rho * b.W) > tol * abs(rho) * math.sqrt(ww):
            return None
    hyp = {b.name: {"mu": mu} for b in blocks}
    return LayerChoice({}, hyp, evaluate(blocks, hyp), 0.0, (lam,), swamped=mu)
