"""Exact factors of the softmax cross-entropy's output Hessian H = diag(p) − p pᵀ.

H has rank C − 1 (its null vector is 1), so C − 1 columns suffice: every factor here is
F = diag(q) Q with q = √p (a unit vector) and Q an orthonormal basis of q⊥, for then
Q Qᵀ = I − q qᵀ and

    (diag(q) Q)(diag(q) Q)ᵀ = diag(q)(I − q qᵀ)diag(q) = diag(p) − p pᵀ.

Which basis matters for rounding, not for the value:

* **Label-free** (:func:`label_free_factor`): the Householder reflection that maps q to
  −e_j, without its column j, with j the *most probable* class.  Row j of Q is then
  exactly −q_c (c ≠ j), so every row of F is accurate relative to its own size:
  ‖F[c, :]‖² = p_c(1 − p_c) to full relative accuracy also when p_j ≈ 1.  Pivoted at a
  fixed class instead, row j of a saturated softmax (true size ~√(1 − p_j), say 1e-30)
  comes out as O(1) − O(1): an absolute error ε, and the Fisher wrong by 35–80 %.
* **Aligned with the gradient** e = p − 1_y (:func:`aligned_factor`), for a label y that
  is not the most probable class: the first basis vector is f = (1_y − q_y q)/s,
  s = √(1 − p_y) = ‖1_y − q_y q‖, so that F[:, 0] = diag(q) f = −(q_y/s) e — a scaled copy
  of the gradient — and the other C − 2 vectors are an orthonormal basis of
  {x : x_y = 0, qᵀx = 0} (the pivoted reflection on the C − 1 other coordinates).  Then
  e = F a with a = (−s/q_y, 0, …, 0) (:func:`gradient_coefficients`): one large
  coefficient on a column that is small in the same proportion, computed to full
  relative accuracy — no cancellation however small p_y.  In the label-free basis the
  same e needs coefficients ~1/q_y on O(1) columns that cancel (relative error ε/q_y:
  the exact natural gradient of a confidently wrong sample with p_y = 5e-61 was off by
  56× even at λ = 1e3).  A label that *is* the most probable class keeps the label-free
  factor, whose coefficients a = (q_c/q_y)_{c≠y} are then all ≤ 1.

Everything is vectorised over the N rows without data-dependent shapes (no boolean
indexing, which would synchronise a GPU).
"""
from __future__ import annotations

from ..backend import Array, namespace


def householder_complement(u: Array) -> Array:
    """(N, m, m − 1): for unit rows u ≥ 0 (N, m), an orthonormal basis of u⊥, accurate
    row by row relative to each row's size.

    The reflection I − 2 v vᵀ/(vᵀv), v = u + e_j, maps u to −e_j; its columns other than
    j, in order, are the basis.  The pivot j is each row's largest entry, so
    vᵀv = 2 + 2 u_j ≥ 2 + 2/√m and row j of the basis is exactly −u_i (i ≠ j).  A zero
    row gives m − 1 unit vectors.
    """
    xp = namespace(u)
    N, m = u.shape
    j = xp.argmax(u, axis=1)
    v = u + (xp.arange(m)[None, :] == j[:, None])
    vv = (v * v).sum(axis=1)
    R = xp.eye(m, dtype=u.dtype) - (2 / vv)[:, None, None] * v[:, :, None] * v[:, None, :]
    keep = xp.arange(m - 1)[None, :] + (xp.arange(m - 1)[None, :] >= j[:, None])  # columns ≠ j
    return xp.take_along_axis(R, keep[:, None, :], axis=2)


def other_classes(y: Array, C: int) -> Array:
    """(N, C − 1) indices of the classes other than y_n, in order."""
    xp = namespace(y)
    k = xp.arange(C - 1)[None, :]
    return k + (k >= y[:, None])


def one_minus(p: Array) -> Array:
    """1 − p_c for probabilities p (N, C), accurate also where p_c ≈ 1: for the largest
    entry it is the sum of the others (1 − p_max would cancel), elsewhere 1 − p_c ≥ ½."""
    xp = namespace(p)
    top = xp.arange(p.shape[1])[None, :] == xp.argmax(p, axis=1)[:, None]
    rest = xp.sum(xp.where(top, 0, p), axis=1, keepdims=True)
    return xp.where(top, rest, 1 - p)


def label_free_factor(q: Array) -> Array:
    """(N, C, C − 1): diag(q) times the pivoted Householder basis of q⊥ (module docstring)."""
    return q[:, :, None] * householder_complement(q)


def aligned_factor(q: Array, y: Array) -> Array:
    """(N, C, C − 1): the factor aligned with e_n = p_n − 1_{y_n} (module docstring), and
    the label-free one for samples whose label is their most probable class."""
    xp = namespace(q)
    N, C = q.shape
    onehot = y[:, None] == xp.arange(C)[None, :]
    p = q * q
    qy = xp.take_along_axis(q, y[:, None], axis=1)                      # (N, 1)
    s = xp.sqrt(xp.sum(xp.where(onehot, 0, p), axis=1, keepdims=True))  # √(1 − p_y)
    safe = xp.where(s > 0, s, 1)
    first = xp.where(onehot, qy * s, -qy * p / safe)                    # −(q_y/s) e_n
    others = other_classes(y, C)
    q_o = xp.take_along_axis(q, others, axis=1) / safe                  # unit vectors
    rest = xp.zeros((N, C, C - 2), dtype=q.dtype)
    rest[xp.arange(N)[:, None], others, :] = householder_complement(q_o)
    aligned = xp.concatenate([first[:, :, None], q[:, :, None] * rest], axis=2)
    # a label that is the most probable class keeps the label-free factor: aligning would
    # compute the rows ~√p_c of a saturated softmax as nearly orthogonal O(1) vectors,
    # whose products ~p_c p_c' would come from cancellation
    free = label_free_factor(q)
    return xp.where((y == xp.argmax(q, axis=1))[:, None, None], free, aligned)


def gradient_coefficients(p: Array, y: Array) -> tuple[Array, Array]:
    """(a, underflow): e_n = F_n a_n in :func:`aligned_factor`'s F_n, closed form.

    Aligned samples: a_n = (−s/q_y, 0, …, 0); label the most probable class:
    a_n = (q_c/q_y)_{c ≠ y} (≤ 1).  ``underflow`` (N,) marks the aligned samples whose
    p_y is below the smallest normal number: their curvature along e_n underflowed, a_n
    is 0 there and the caller carries e_n as a residual.
    """
    xp = namespace(p)
    N, C = p.shape
    q = xp.sqrt(p)
    aligned = y != xp.argmax(q, axis=1)
    py = xp.take_along_axis(p, y[:, None], axis=1)[:, 0]
    s = xp.sqrt(xp.sum(xp.where(y[:, None] == xp.arange(C)[None, :], 0, p), axis=1))
    ok = py >= xp.finfo(p.dtype).tiny
    safe = xp.where(ok, xp.sqrt(py), 1)
    first = xp.zeros((N, C - 1), dtype=p.dtype)
    first[:, 0] = -s / safe
    q_others = xp.take_along_axis(q, other_classes(y, C), axis=1)
    a = xp.where(aligned[:, None], xp.where(ok[:, None], first, 0), q_others / safe[:, None])
    return a, aligned & ~ok
