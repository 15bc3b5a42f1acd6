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

* **the scalar test**, beside the error test: the relative error of an MC update is mostly
  direction noise, so a wrong *scale* hides in it (a factor 2 on one G moves the update of
  its layer by 0.4 where the tolerance is 0.77 at N = 32, K = 1).  Per block the
  least-squares scale of the candidate against the expectation, s_b = ⟨X̂_b, X_b⟩/⟨X_b, X_b⟩,
  is compared with the same scale of refngd's ``TRIALS`` estimates: a block fails when
      |s_b − m'_b| > z·s'_b,   z = ``Z``,
  m'_b, s'_b the trials' mean and standard deviation of s (blocks whose trials all share
  one scale — deterministic ones — are skipped).  Chebyshev bounds a correct candidate's
  chance to fail it by 1/z² ≈ 2.8%, so the two tests together by ≈ 5.5% per block (both
  bounds are distribution-free and loose; the measured rates above include the scalar
  test: 0 of 100 correct factor candidates and 0 of 40 updates in
  tests/test_check_montecarlo.py, 0 of 100 correct updates in the case below — their
  largest |s_b − m'_b|/s'_b was 3.8 — and, on the 4-6-3 tanh MLP of that test file with
  refngd's estimator at unused seeds, K-FAC updates failing 0/400 (CE, N = 32, K = 4),
  0/400 (CE, N = 8, K = 1), 1/400 (MSE, N = 16, K = 1), none by the scalar test).  **Power**, measured on the docs' MLP (6-16-4, tanh,
  CE), N = 32, K = 1, factored damping π = 1, λ = 0.01, the hook-based candidate of
  /tmp/r19/t18.py with ``2.G`` doubled: the error test alone caught 0/100; with the
  scalar test (s ≈ 0.61 against 1.03 ± 0.057) 98/100 are caught — the block's update is
  scaled by ≈ 0.6, not 0.5, because the damping is not doubled with G.
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


def _mean_sd(e: list) -> tuple:
    m = sum(e) / len(e)
    return m, (sum((v - m) ** 2 for v in e) / (len(e) - 1)) ** 0.5


def _scale(x, r) -> float:
    xp = namespace(r)
    rr = float(xp.sum(r * r))
    return float(xp.sum(x * r)) / rr if rr > 0 else 0.0


def mc_block_tolerances(twin: Twin, quantity: str, ref, blocks) -> tuple[dict, str, dict]:
    """(block name → τ_b, the sentence for the report, block name → (m'_b, s'_b) of the
    trials' least-squares scales for :func:`scale_test`) from ``TRIALS`` MC estimates."""
    rng = as_generator(twin.options.get("rng", 0))
    ref_b = _split(ref, blocks)
    errs: dict = {k: [] for k in ref_b}
    sc: dict = {k: [] for k in ref_b}
    for _ in range(TRIALS):
        draw = dataclasses.replace(twin, options={**twin.options, "rng": rng})
        for k, x in _split(value(draw, quantity), blocks).items():
            r = ref_b[k]
            xp = namespace(r)
            nr = float(xp.linalg.norm(r))
            errs[k].append(float(xp.linalg.norm(x - r)) / nr if nr > 0 else 0.0)
            sc[k].append(_scale(x, r))
    tol, spread = {}, {}
    for k, e in errs.items():
        m, s = _mean_sd(e)
        tol[k] = max(m + Z * s, max(e))
        spread[k] = (m, s)
    scales = {k: _mean_sd(v) for k, v in sc.items()}
    worst = max(tol, key=tol.get)
    K = int(twin.options.get("mc_samples", 1))
    N = int(twin.X.shape[0])
    reason = (f"Monte-Carlo, fisher_type='mc', N = {N}, K = {K}, no labels=: compared with the "
              f"expectation (the type-2 value); per block, mean + {Z:g} sd of the relative "
              f"errors of refngd's own {TRIALS} estimates (largest {tol[worst]:.2g} for "
              f"{worst!r}: {spread[worst][0]:.2g} ± {spread[worst][1]:.2g}); a correct "
              f"candidate exceeds it with probability <= 1/(1 + {Z:g}²) (Cantelli); and the "
              f"least-squares scale of each block against the expectation within {Z:g} sd of "
              f"the trials' scales (Chebyshev: <= 1/{Z:g}²). Pass "
              "labels= (your sampled targets) for an exact comparison")
    weak = [k for k, t in tol.items() if t >= 1.0]
    if weak:
        reason += (f". At this N·K the tolerance of {', '.join(map(repr, weak))} is >= 1: a "
                   "factor 2 there is within sampling noise — only labels= can tell")
    return tol, reason, scales


def scale_test(report, candidate, ref, blocks, scales: dict) -> None:
    """Fail the blocks of ``report`` whose least-squares scale against the expectation lies
    outside m'_b ± Z·s'_b of refngd's own estimates (module docstring), in place."""
    from .report import _host

    cand = _split(candidate if isinstance(candidate, dict) else _host("candidate", candidate),
                  blocks)
    ref_b = _split(ref, blocks)
    for b in report.blocks:
        if b.name not in scales or b.name not in cand or not b.passed:
            continue
        m, s = scales[b.name]
        if not s > 1e-12 * max(abs(m), 1e-300):  # deterministic: one scale for every draw
            continue
        r = _host("reference", ref_b[b.name]).astype(float)
        c = _host("candidate", cand[b.name]).astype(float)
        if c.shape != r.shape:
            continue
        x = _scale(c, r)
        if abs(x - m) > Z * s:
            b.passed = False
            b.diagnosis = (f"its scale against the expectation is {x:.3g}, refngd's own "
                           f"estimates' {m:.3g} ± {s:.2g}: a scalar factor of about "
                           f"{x / m:.3g} (outside {Z:g} sd), which the sampling noise of "
                           "the relative error hides")
