"""Monte-Carlo K-FAC quantities in ``validate``: exact with the candidate's draws, else statistical.

With ``fisher_type="mc"`` a K-FAC quantity is random: its rows are the output gradients
∂ℓ(z_n, ŷ_nk)/∂z_n / √K at targets ŷ_nk drawn from the model, so G = c Σ_n (1/K) Σ_k b̂_nk b̂_nkᵀ
differs from draw to draw.  ``validate`` checks such a candidate in one of two ways:

* **exact**, with ``labels=`` the candidate's own draws ŷ_nk: refngd back-propagates the
  same targets (:class:`refngd.curvature.KFAC` ``labels=``) and compares at the default
  tolerance;
* **statistical**, without them.  E_ŷ[∇ℓ ∇ℓᵀ] = H_n (the identity behind the sampled
  Fisher, Martens 2020, eq. 13), so E[G_mc] = G_type-2, and A does not depend on the draws:
  the reference is refngd's *type-2* value, the expectation of the rows.  A correct
  candidate's relative error per block, e_b = ‖X̂_b − X_b‖/‖X_b‖, is then a draw from the
  error distribution of the estimator at this N and K — a mean of N·K independent outer
  products, so its spread shrinks like 1/√(N·K).  refngd samples that distribution with
  ``TRIALS`` of its own estimates (draws from ``rng``) and accepts a block whose error is
  at most

      τ_b = max(m_b + z·s_b, max_i e_b,i, the dtype's default tolerance),   z = ``Z`` = 6,

  m_b and s_b the mean and standard deviation of the trials' errors.  For any error
  distribution Cantelli's inequality bounds a correct candidate's chance to exceed
  m + z·s by 1/(1 + z²) ≈ 2.7% (with m and s known).  Measured on independent correct
  candidates (refngd's estimator at unused seeds; 2-layer MLP): K-FAC factors 0/400
  (CE, N = 32, K = 4), 0/400 (CE, N = 8, K = 1), 3/400 (MSE, N = 16, K = 1); updates
  1/100, 2/100, 0/100 — and 0 of 100 torch-built candidates in
  tests/test_check_montecarlo.py.  A factor 2 (error ≈ 1) fails where the trials' errors
  are well below 1 (400/400 at N = 32, K = 4); where a block's τ_b reaches 1 (few draws)
  it cannot be told from sampling noise, and the report says so.  Deterministic blocks
  (A) get the default tolerance.

  For an *update* (``kfac_update``, ``ekfac_update``) the inverse is not linear in the
  draws: the reference is the update with the type-2 factors, and τ_b comes from refngd's
  own MC updates around it in the same way — the test asks whether the candidate is as
  close to the type-2 update as an MC update with this N and K is.
"""
from __future__ import annotations

import dataclasses

from ..backend import as_generator, namespace
from .quantities import Twin, value
from .report import split_blocks

#: refngd's own estimates behind a statistical tolerance, and the multiple of their spread
TRIALS = 16
Z = 6.0
#: the K-FAC quantities that depend on the draws of fisher_type="mc"
MC_QUANTITIES = ("kfac_factors", "kfac", "ekfac", "kfac_update", "ekfac_update")


def statistical(twin: Twin, quantity: str) -> bool:
    """Is ``quantity`` a Monte-Carlo K-FAC value to be judged against its expectation?"""
    o = twin.options
    return (quantity in MC_QUANTITIES and o.get("fisher_type") == "mc"
            and o.get("labels") is None)


def expectation(twin: Twin) -> Twin:
    """The twin whose rows are the expectation of the MC rows: fisher_type ``"type-2"``."""
    return dataclasses.replace(twin, options={**twin.options, "fisher_type": "type-2"})


def _split(x, blocks):
    return split_blocks("value", x, blocks)


def mc_block_tolerances(twin: Twin, quantity: str, ref, blocks) -> tuple[dict, str]:
    """(block name → τ_b, the sentence for the report) from ``TRIALS`` MC estimates."""
    rng = as_generator(twin.options.get("rng", 0))
    ref_b = _split(ref, blocks)
    errs: dict = {k: [] for k in ref_b}
    for _ in range(TRIALS):
        draw = dataclasses.replace(twin, options={**twin.options, "rng": rng})
        for k, x in _split(value(draw, quantity), blocks).items():
            r = ref_b[k]
            xp = namespace(r)
            nr = float(xp.linalg.norm(r))
            errs[k].append(float(xp.linalg.norm(x - r)) / nr if nr > 0 else 0.0)
    tol, spread = {}, {}
    for k, e in errs.items():
        m = sum(e) / len(e)
        s = (sum((v - m) ** 2 for v in e) / (len(e) - 1)) ** 0.5
        tol[k] = max(m + Z * s, max(e))
        spread[k] = (m, s)
    worst = max(tol, key=tol.get)
    K = int(twin.options.get("mc_samples", 1))
    N = int(twin.X.shape[0])
    reason = (f"Monte-Carlo, fisher_type='mc', N = {N}, K = {K}, no labels=: compared with the "
              f"expectation (the type-2 value); per block, mean + {Z:g} sd of the relative "
              f"errors of refngd's own {TRIALS} estimates (largest {tol[worst]:.2g} for "
              f"{worst!r}: {spread[worst][0]:.2g} ± {spread[worst][1]:.2g}); a correct "
              f"candidate exceeds it with probability <= 1/(1 + {Z:g}²) (Cantelli). Pass "
              "labels= (your sampled targets) for an exact comparison")
    weak = [k for k, t in tol.items() if t >= 1.0]
    if weak:
        reason += (f". At this N·K the tolerance of {', '.join(map(repr, weak))} is >= 1: a "
                   "factor 2 there is within sampling noise — only labels= can tell")
    return tol, reason
