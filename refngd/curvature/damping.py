"""K-FAC's damping variants: how λ becomes the shifts (γ_A, γ_G) of the two factors.

Tikhonov damping (``damping_mode="tikhonov"``, the default) adds λI to every Kronecker
block, (G ⊗ A + λI)⁻¹.  Every other variant damps the *factors*: a block G ⊗ A becomes

    (G + γ_G I) ⊗ (A + γ_A I),     inverse (G + γ_G I)⁻¹ ⊗ (A + γ_A I)⁻¹,

so the update of a (d_G, d_A) block V is (G + γ_G I)⁻¹ V (A + γ_A I)⁻¹ and
log det = d_A Σ_i log(g_i + γ_G) + d_G Σ_j log(a_j + γ_A).  The variants differ only in
(γ_A, γ_G):

* ``"factored"`` (Martens & Grosse 2015, §6.3, "factored Tikhonov regularization"),
  ``damping_split="even"`` (the default):

      γ_A = π √λ,    γ_G = √λ / π,

  ``pi="trace"`` (default): π = √((tr A / dim A) / (tr G / dim G)) (M&G §6.3; 1 if a
  trace is 0); ``pi=1`` (or any number p > 0) fixes π = p — √λ on each factor for p = 1.
* ``"factored"`` with ``damping_split="locations"`` for a layer that shares its weight over
  T positions (Conv2d, a Linear on sequences; T = 1 otherwise): λ is normalised by T
  before it is split, as TensorFlow K-FAC's ``ConvKFCBasicFB`` (``normalize_damping``,
  tensorflow/kfac ``fisher_blocks.py``) and EKFAC-pytorch's ``KFAC._inv_covs``
  (``eps / num_locations``, github.com/Thrandis/EKFAC-pytorch ``kfac.py``) do.  Both
  write the block as T·(A ⊗ G/T) and damp (A + π√(λ/T) I) ⊗ (G/T + √(λ/T)/π I), i.e. in
  refngd's factors

      γ_A = π √(λ/T),    γ_G = √(λT) / π.

  With ``pi="trace"`` their π is computed from A and G/T, π = √T·π_MG, and the result is
  *identical* to ``"even"``: the trace-norm rule is invariant under a scalar moved between
  the factors.  The split changes the update only for a fixed π (``pi=1``, both codes'
  option ``pi=False`` / ``PI_TYPE="off"``).
* ``"per-factor"``: λ_A and λ_G given independently, ``damping=(λ_A, λ_G)``; a single λ
  puts λ — not √λ — on each factor, as kfac-pytorch's inverse method
  (``kfac/layers/inverse.py``, ``compute_a_inv`` / ``compute_g_inv``) does:

      γ_A = λ_A,    γ_G = λ_G.

A separate bias block has A = [1] (a 1 × 1 factor) and is damped by the same rule; a
convention with ``bias_damping="weight"`` (curvlinops) is handled by
``KroneckerOperator._factor_shifts``.  EKFAC (George et al. 2018 damp it Tikhonov only)
takes the same variants as refngd's definition: the damping term of the factored block,
(G + γ_G I) ⊗ (A + γ_A I) − G ⊗ A, is added to EKFAC's matrix — eigenvalues
s_ij + γ_A g_i + γ_G a_j + γ_A γ_G in the basis U_G ⊗ U_A, which is K-FAC's factored
damping exactly when s_ij = g_i a_j (:meth:`refngd.curvature.EKFAC.solve`).
"""
from __future__ import annotations

import math

from ..backend import Array, namespace
from ..options import DAMPING_SPLIT, DAMPING_SPLITS, PI, Pi, check_choice, check_pi


def trace_pi(A: Array, G: Array) -> float:
    """Martens & Grosse (2015, §6.3) π = √((tr A / dim A) / (tr G / dim G)); 1 if a trace is 0."""
    xp = namespace(A)
    ta, tg = float(xp.trace(A)) / A.shape[0], float(xp.trace(G)) / G.shape[0]
    return math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0


def check_damping_options(pi: Pi, damping_split: str) -> Pi:
    """``pi`` checked (``"trace"`` or a float > 0) after checking ``damping_split``."""
    check_choice(damping_split, "damping_split", DAMPING_SPLITS)
    return check_pi(pi)


def factor_shifts(A: Array, G: Array, damping, damping_mode: str, pi: Pi = PI,
                  damping_split: str = DAMPING_SPLIT, T: int = 1) -> tuple[float, float]:
    """(γ_G, γ_A) of one block G ⊗ A under a factor-damping variant (module docstring).

    ``damping``: λ, or (λ_A, λ_G) for ``"per-factor"``; ``T``: the positions sharing the
    layer's weight (used by ``damping_split="locations"`` with a fixed π only).
    """
    if damping_mode == "per-factor":
        lam_a, lam_g = damping if isinstance(damping, tuple) else (damping, damping)
        return float(lam_g), float(lam_a)
    if pi == "trace":  # invariant under A → sA, G → G/s: "locations" changes nothing
        p = trace_pi(A, G)
        return math.sqrt(damping) / p, math.sqrt(damping) * p
    p, t = float(pi), (T if damping_split == "locations" else 1)
    return math.sqrt(damping * t) / p, math.sqrt(damping / t) * p
