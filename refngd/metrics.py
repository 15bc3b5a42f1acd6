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


def _max_abs(a: Array) -> float:
    xp = namespace(a)
    return to_float(xp.max(xp.abs(a))) if a.size else 0.0


def _check_fisher(fisher, P: int) -> None:
    """A curvature operator or a dense (P, P) array — anything else gets a clear error."""
    if hasattr(fisher, "quadratic_form") or hasattr(fisher, "matvec"):
        shape = getattr(fisher, "shape", (P, P))
    elif hasattr(fisher, "ndim") and hasattr(fisher, "shape"):
        check_float_array("fisher", fisher, ndim=2)
        shape = tuple(fisher.shape)
    else:
        raise TypeError(f"fisher must be a refngd curvature (e.g. refngd.curvature.Fisher) or a dense "
                        f"(P, P) array, got {type(fisher).__name__}.")
    if tuple(shape) != (P, P):
        raise ValueError(f"fisher has shape {tuple(shape)} but d and g have P = {P} entries; "
                         f"pass the ({P}, {P}) Fisher of the same parameters.")


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
        γ(d); ``inf`` when d is orthogonal to g (no first-order decrease) or zero.

    Raises
    ------
    ValueError
        For NaN/Inf, mismatched shapes, a zero gradient g (γ is undefined), a Fisher of
        the wrong size, or dᵀFd < 0 beyond round-off.

    Notes
    -----
    Computed in the scaled form γ(d) = √(d̂ᵀFd̂) / (|d̂ᵀĝ| · s_g) with d̂ = d/s_d,
    ĝ = g/s_g and s = max|·|, so that the scale invariance holds exactly even at
    scales like 1e±200 where dᵀFd itself would overflow or underflow.
    """
    _check_pair(("d", "g"), d, g)
    _check_fisher(fisher, d.shape[0])
    s_d, s_g = _max_abs(d), _max_abs(g)
    if s_g == 0:
        raise ValueError("g is zero: γ(d) = √(dᵀFd)/|dᵀg| is undefined without a gradient.")
    if s_d == 0:
        return math.inf
    d_hat, g_hat = d / s_d, g / s_g
    q = _quadratic_form(fisher, d_hat)
    dg = abs(to_float(d_hat @ g_hat))
    return math.inf if dg == 0 else (math.sqrt(max(q, 0.0)) / dg) / s_g


def gamma_ratio(d: Array, fisher, g: Array) -> float:
    """γ(d) / γ(g): the indicator relative to SGD's direction; below 1 beats SGD.

    Raises ``ValueError`` when gᵀFg = 0 (γ(g) = 0): the Fisher vanishes along the
    gradient — e.g. saturated logits where it underflows to 0 — and the ratio is undefined.
    """
    gg = gamma(g, fisher, g)
    if gg == 0:
        raise ValueError("gᵀFg = 0: the Fisher vanishes along the gradient (saturated outputs, "
                         "where it underflows to 0?), so γ(g) = 0 and γ(d)/γ(g) is undefined.")
    return gamma(d, fisher, g) / gg


def cosine_similarity(a: Array, b: Array) -> float:
    """⟨a, b⟩ / (‖a‖ ‖b‖); raises for a zero vector, NaN/Inf or mismatched shapes.

    Each vector is first divided by its largest |entry|, so any scale (1e−200, 1e200)
    gives the same result.
    """
    _check_pair(("a", "b"), a, b)
    xp = namespace(a, b)
    sa, sb = _max_abs(a), _max_abs(b)
    if sa == 0 or sb == 0:
        raise ValueError("cosine similarity of a zero vector is undefined.")
    a, b = a / sa, b / sb
    return to_float(a @ b) / (to_float(xp.linalg.norm(a)) * to_float(xp.linalg.norm(b)))


def relative_error(a: Array, reference: Array) -> float:
    """‖a − reference‖ / ‖reference‖ (Euclidean; Frobenius for matrices); raises for a zero
    reference, NaN/Inf or mismatched shapes (no broadcasting of (P, 1) against (P,)).

    Both arrays are divided by the larger of their largest |entries| first, so the
    result is the same at any common scale (no overflow at 1e200, no underflow at 1e−200).
    """
    _check_pair(("a", "reference"), a, reference, ndim=None)
    xp = namespace(a, reference)
    if _max_abs(reference) == 0:
        raise ValueError("relative error against a zero reference is undefined.")
    s = max(_max_abs(a), _max_abs(reference))
    a, reference = a / s, reference / s
    return to_float(xp.linalg.norm(a - reference)) / to_float(xp.linalg.norm(reference))
