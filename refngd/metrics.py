"""Comparing update directions: the γ indicator, cosine similarity, relative error."""
from __future__ import annotations

import math

from .backend import Array, check_float_array, namespace, to_float

#: a quadratic form dᵀFd below −_PSD_RTOL·‖d‖·‖Fd‖ is not round-off: F is indefinite along d
_PSD_RTOL = 1e-8


def _check_pair(names: tuple[str, str], a: Array, b: Array, ndim: int | None = 1) -> None:
    """Finite float arrays of one shape (no silent broadcasting); vectors unless ``ndim=None``."""
    check_float_array(names[0], a, ndim=ndim)
    check_float_array(names[1], b, ndim=ndim)
    if a.shape != b.shape:
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}.")


def _quadratic_form(fisher, d: Array) -> float:
    if hasattr(fisher, "quadratic_form"):
        return fisher.quadratic_form(d)  # c‖U d‖² for the row curvatures: never negative
    Fd = fisher.matvec(d) if hasattr(fisher, "matvec") else fisher @ d
    if getattr(Fd, "shape", None) != d.shape:
        raise ValueError(f"fisher @ d has shape {getattr(Fd, 'shape', None)}, expected {tuple(d.shape)}; "
                         "pass a (P, P) matrix or curvature operator.")
    xp = namespace(d, Fd)
    q = to_float(d @ Fd)
    if q < -_PSD_RTOL * to_float(xp.linalg.norm(d)) * to_float(xp.linalg.norm(Fd)):
        raise ValueError(f"dᵀFd = {q:.3g} < 0: the matrix is not positive semi-definite along d "
                         "(γ needs a Fisher / GGN, not e.g. an indefinite Hessian).")
    return q


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

    Returns
    -------
    float
        γ(d); ``inf`` when d is orthogonal to g (no first-order decrease).

    Raises
    ------
    ValueError
        For NaN/Inf, mismatched shapes, or dᵀFd < 0 beyond round-off.
    """
    _check_pair(("d", "g"), d, g)
    q = _quadratic_form(fisher, d)
    dg = abs(to_float(d @ g))
    return math.inf if dg == 0 else math.sqrt(max(q, 0.0)) / dg


def gamma_ratio(d: Array, fisher, g: Array) -> float:
    """γ(d) / γ(g): the indicator relative to SGD's direction; below 1 beats SGD."""
    return gamma(d, fisher, g) / gamma(g, fisher, g)


def cosine_similarity(a: Array, b: Array) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖); raises for a zero vector, NaN/Inf or mismatched shapes."""
    _check_pair(("a", "b"), a, b)
    xp = namespace(a, b)
    na, nb = to_float(xp.linalg.norm(a)), to_float(xp.linalg.norm(b))
    if na == 0 or nb == 0:
        raise ValueError("cosine similarity of a zero vector is undefined.")
    return to_float(a @ b) / (na * nb)


def relative_error(a: Array, reference: Array) -> float:
    """‖a − reference‖ / ‖reference‖ (Euclidean; Frobenius for matrices); raises for a zero
    reference, NaN/Inf or mismatched shapes (no broadcasting of (P, 1) against (P,))."""
    _check_pair(("a", "reference"), a, reference, ndim=None)
    xp = namespace(a, reference)
    nr = to_float(xp.linalg.norm(reference))
    if nr == 0:
        raise ValueError("relative error against a zero reference is undefined.")
    return to_float(xp.linalg.norm(a - reference)) / nr
