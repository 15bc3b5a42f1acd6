"""Comparing update directions: the γ indicator, cosine similarity, relative error."""
from __future__ import annotations

import math

from .backend import Array, namespace, to_float


def _quadratic_form(fisher, d: Array) -> float:
    if hasattr(fisher, "quadratic_form"):
        return fisher.quadratic_form(d)
    if hasattr(fisher, "matvec"):
        return to_float(d @ fisher.matvec(d))
    return to_float(d @ (fisher @ d))


def gamma(d: Array, fisher, g: Array) -> float:
    """Approximation-quality indicator γ(d) = √(dᵀ F d) / |dᵀ g| (Wu et al. 2024, eq. 15).

    Invariant to the scale of d and, by Cauchy–Schwarz in the F inner product, minimised
    by the exact natural gradient d = F⁻¹ g (F⁺ g when F is singular and g ∈ range F),
    where it equals 1/√(gᵀF⁺g).  Lower is better.

    Parameters
    ----------
    d : (P,) update direction.
    fisher : a curvature operator (e.g. :class:`refngd.curvature.Fisher`) or a dense (P, P) array.
    g : (P,) the loss gradient.

    Returns ``inf`` when d is orthogonal to g (no first-order decrease).
    """
    q = _quadratic_form(fisher, d)
    dg = abs(to_float(d @ g))
    return math.inf if dg == 0 else math.sqrt(max(q, 0.0)) / dg


def gamma_ratio(d: Array, fisher, g: Array) -> float:
    """γ(d) / γ(g): the indicator relative to SGD's direction; below 1 beats SGD."""
    return gamma(d, fisher, g) / gamma(g, fisher, g)


def cosine_similarity(a: Array, b: Array) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖); raises for a zero vector."""
    xp = namespace(a, b)
    na, nb = to_float(xp.linalg.norm(a)), to_float(xp.linalg.norm(b))
    if na == 0 or nb == 0:
        raise ValueError("cosine similarity of a zero vector is undefined.")
    return to_float(a @ b) / (na * nb)


def relative_error(a: Array, reference: Array) -> float:
    """‖a − reference‖ / ‖reference‖ (Euclidean); raises for a zero reference."""
    xp = namespace(a, reference)
    nr = to_float(xp.linalg.norm(reference))
    if nr == 0:
        raise ValueError("relative error against a zero reference is undefined.")
    return to_float(xp.linalg.norm(a - reference)) / nr
