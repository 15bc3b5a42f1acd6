"""Array-module selection, dtype policy, input checks, host reads and linear-algebra shims.

Every compute function in refngd derives its array module from its inputs,
``xp = namespace(theta, X)``, and never imports :mod:`numpy` for computation.  This is
the one module allowed to know about both NumPy and CuPy — which is why it also holds
every read of a device value on the host (:func:`host_values`, the queued checks of
:func:`one_host_read`) and the solvers whose NumPy and CuPy versions differ; hence its
length.

Dtype policy
------------
float64 is the default; float32 is allowed for the model.  Gram matrices and every
factorisation are formed in float64 regardless (docs/design.md §2), because the Woodbury
route subtracts two nearly equal vectors when the damping is small.
"""
from __future__ import annotations

import functools
import math
import threading

from typing import Any

import numpy as np

Array = Any  #: a NumPy or CuPy array
FLOAT_DTYPES = (np.float32, np.float64)

try:  # CuPy is an optional extra (``pip install refngd[gpu]``).
    import cupy as _cupy  # type: ignore
except Exception:  # pragma: no cover - depends on the machine
    _cupy = None


class SingularSystemError(np.linalg.LinAlgError):
    """Raised when an undamped system is singular; pass ``damping > 0``."""


def namespace(*arrays: Any):
    """Return the array module (``numpy`` or ``cupy``) of the given arrays.

    Non-array arguments (scalars, ``None``) are ignored.  Mixing NumPy and CuPy arrays is
    an error rather than a silent device transfer.
    """
    found = None
    for a in arrays:
        if a is None or np.isscalar(a):
            continue
        mod = _cupy if (_cupy is not None and isinstance(a, _cupy.ndarray)) else np
        if found is not None and mod is not found:
            raise TypeError(
                "refngd got a mix of NumPy and CuPy arrays; move all inputs to one device "
                "first (refngd.backend.to_device / to_numpy)."
            )
        found = mod
    return np if found is None else found


def is_cupy(a: Any) -> bool:
    """True when ``a`` is a CuPy array."""
    return _cupy is not None and isinstance(a, _cupy.ndarray)


def get_backend(name: str):
    """Array module by name: ``"numpy"`` or ``"cupy"``."""
    if name == "numpy":
        return np
    if name == "cupy":
        if _cupy is None:
            raise ImportError("backend='cupy' needs CuPy: pip install 'refngd[gpu]'.")
        return _cupy
    raise ValueError(f"unknown backend {name!r}; use 'numpy' or 'cupy'.")


def to_device(a: Any, like: Any = None, backend: str | None = None):
    """Move ``a`` to the device of ``like`` (or to ``backend``); no copy when already there."""
    xp = get_backend(backend) if backend is not None else namespace(like)
    if xp is np:
        return to_numpy(a)
    return xp.asarray(a)


def to_numpy(a: Any) -> np.ndarray:
    """Return ``a`` as a NumPy array (copies from the GPU when needed)."""
    if is_cupy(a):
        return a.get()
    return np.asarray(a)


def as_generator(rng: Any) -> np.random.Generator:
    """A NumPy ``Generator`` from a Generator or an integer seed (``None`` is refused).

    refngd never draws from hidden global state: Monte-Carlo quantities need an explicit
    ``rng`` so that results are reproducible.
    """
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be a numpy.random.Generator or an int seed, got {rng!r}; "
        "e.g. rng=numpy.random.default_rng(0)."
    )


def to_float(a: Any) -> float:
    """A 0-d array (NumPy or CuPy) as a Python float."""
    return float(to_numpy(a))


# ------------------------------------------------------------ host reads of device values
# Reading a value computed on a GPU (float(x), bool(x)) waits for every queued kernel: a
# host synchronisation, which stalls a launch-bound step.  Every check that needs a value
# on the host reads it through host_values; inside one public call (@one_host_read) the
# finiteness checks of device arrays are not read at once but queued and read with the
# next value the computation itself needs (a Cholesky pivot range) or when the call ends
# — a fixed, small number of synchronisations per call, whatever the number of layers.
_host_reads = [0]
_pending = threading.local()
#: tests set this to queue the checks of NumPy arrays too (as on a GPU), to exercise the
#: queued route on the CPU; NumPy checks are otherwise immediate (no synchronisation to save)
_QUEUE_NUMPY_CHECKS = [False]


def _queue():
    """The queue of checks of the running public call, or None outside one."""
    return getattr(_pending, "queue", None)


def host_values(*values: Any) -> np.ndarray:
    """Device scalars (0-d arrays, flags) as one float64 NumPy vector, in one transfer.

    Queued checks (:func:`require`) and prefetched values (:func:`prefetch`) of the
    running call are read in the same transfer; the first queued check that failed is
    raised before the values are returned.  On NumPy it costs nothing.
    :func:`host_read_count` counts the transfers.
    """
    q = _queue()
    queued = list(q) if q else []
    if q:
        q.clear()
    _host_reads[0] += 1
    allv = [v for v, _ in queued] + list(values)
    out = np.empty(len(allv), dtype=np.float64)
    on_gpu = [i for i, v in enumerate(allv) if is_cupy(v)]
    if on_gpu:  # the one transfer
        out[on_gpu] = _cupy.stack([allv[i].astype(_cupy.float64).reshape(()) for i in on_gpu]).get()
    for i, v in enumerate(allv):
        if not is_cupy(v):
            out[i] = float(v)
    for value, (_, then) in zip(out, queued):
        if isinstance(then, HostValue):
            then._value = float(value)
    for value, (_, then) in zip(out, queued):
        if not isinstance(then, HostValue) and not value:
            raise then() if callable(then) and not isinstance(then, BaseException) else then
    return out[len(queued):]


class HostValue:
    """A device scalar whose host value is read with the next transfer (:func:`prefetch`)."""

    def __init__(self, device_value: Any):
        self._device, self._value = device_value, None

    @property
    def value(self) -> float:
        """The value on the host; reads it now (one transfer) if no transfer has yet."""
        if self._value is None:
            q = _queue()
            if q is not None and any(t is self for _, t in q):
                host_values()  # reads it together with whatever else is queued
            else:
                self._value = float(host_values(self._device)[0])
        return self._value


def prefetch(value: Any, like: Any = None) -> HostValue:
    """A :class:`HostValue` for a device scalar that a later step will need on the host.

    Inside a :func:`one_host_read` call on GPU arrays it is read with the next transfer
    (the one a Cholesky factorisation makes anyway), so that asking for ``.value`` later
    costs no synchronisation of its own; otherwise it is read at once.
    """
    h = HostValue(value)
    q = _queue()
    if q is not None and (is_cupy(value if like is None else like) or _QUEUE_NUMPY_CHECKS[0]):
        q.append((value, h))
    else:
        h._value = float(host_values(value)[0])
    return h


def host_read_count() -> int:
    """How many host reads (:func:`host_values`) have happened since the import."""
    return _host_reads[0]


def require(flag: Any, error, like: Any) -> None:
    """Raise ``error`` unless ``flag`` (a 0-d boolean, possibly on a GPU) is true.

    ``error``: an exception, or a function returning one (called only on failure, so
    that a message may read device values).  Inside a :func:`one_host_read` call on GPU
    arrays (``like``'s device) the check is queued and read with the next host read.
    """
    q = _queue()
    if q is not None and (is_cupy(like) or _QUEUE_NUMPY_CHECKS[0]):
        q.append((flag, error))
    elif not host_values(flag)[0]:
        raise error() if callable(error) and not isinstance(error, BaseException) else error


def one_host_read(f):
    """Decorator for a public entry point: its checks are read together (see above).

    Only the outermost decorated call owns the queue.  When it returns, the checks still
    queued are read (one transfer, only if there are any); when it raises, a failed
    queued check is what is reported — it is the cause, the exception its consequence.
    """
    @functools.wraps(f)
    def call(*args, **kwargs):
        if _queue() is not None:
            return f(*args, **kwargs)
        _pending.queue = []
        try:
            out = f(*args, **kwargs)
            if _pending.queue:
                host_values()
            return out
        except Exception:
            if _pending.queue:
                host_values()  # raises a failed queued check: the cause of this exception
            raise
        finally:
            _pending.queue = None
    return call


# --------------------------------------------------------------------------- checks
def check_float_array(name: str, a: Any, ndim: int | None = None, finite: bool = True):
    """Validate a floating-point array and return it unchanged.

    Raises ``TypeError`` for a non-array, a masked array or ``numpy.matrix`` (whose
    operators mean something else: masks are ignored by the linear algebra, ``*`` is a
    matrix product) and a non-float dtype; ``ValueError`` for a wrong ``ndim`` or for
    NaN/Inf entries (when ``finite``).
    """
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; refngd would ignore the mask. Drop the masked "
                        f"rows or fill them ({name}.filled(value)) and pass a plain array.")
    if isinstance(a, np.matrix):
        raise TypeError(f"{name} is a numpy.matrix, whose * and shapes differ from arrays; "
                        f"pass numpy.asarray({name}) instead.")
    if not hasattr(a, "dtype"):
        raise TypeError(f"{name} must be an array, got {type(a).__name__}; "
                        f"convert with numpy.asarray({name}, dtype=float).")
    xp = namespace(a)
    if a.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has dtype {a.dtype}; refngd works in float64 (default) or float32. "
            f"Convert with {name}.astype(float)."
        )
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {tuple(a.shape)}.")
    if finite:
        require(xp.all(xp.isfinite(a)),
                ValueError(f"{name} contains NaN or Inf; refngd refuses to propagate them."), a)
    return a


def check_damping(damping: float, allow_zero: bool = True) -> float:
    """Validate a damping / regularisation constant and return it as a float."""
    try:
        if isinstance(damping, (str, bytes, bool)):  # float("0.1") and float(True) would pass
            raise TypeError
        lam = float(damping)
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a real number, got {damping!r}.") from None
    if not np.isfinite(lam) or lam < 0:
        raise ValueError(f"damping must be finite and >= 0, got {damping!r}.")
    if lam == 0 and not allow_zero:
        raise ValueError("damping must be > 0 here.")
    return lam


# --------------------------------------------------------------------- linear algebra
def _solve_triangular(xp, L, b, lower: bool, trans: int = 0):
    if xp is np:
        import scipy.linalg

        return scipy.linalg.solve_triangular(L, b, lower=lower, trans=trans, check_finite=False)
    import cupyx.scipy.linalg  # type: ignore

    return cupyx.scipy.linalg.solve_triangular(L, b, lower=lower, trans=trans)


def _cho_solve(xp, L, B):
    """(L Lᵀ)⁻¹ B: on the host LAPACK ``dtrsv``/``dtrsm`` (:func:`refngd.backend.lapack.cho_solve`)."""
    if xp is np:
        from .lapack import cho_solve

        return cho_solve(L, B)
    y = _solve_triangular(xp, L, B, lower=True)
    return _solve_triangular(xp, L, y, lower=True, trans=1)


def _cholesky_stats(A: Array, unshifted: Array | None = None):
    """(L, stats): the lower Cholesky factor of A or None, and its checks read in one transfer.

    ``stats`` = [L finite, min |L_ii|, max |L_ii|, max diagonal of ``unshifted``
    (default A)] (None when the factorisation raised).  CuPy returns NaNs instead of
    raising for a matrix that is not positive definite, hence the finiteness flag.
    When ``unshifted`` is given and is not A itself, A is the caller's shifted temporary
    (:class:`PSDFactor`) and is factored in place — on the host it must then hold zeros
    above the diagonal (:func:`refngd.backend.lapack.lower_copy`); otherwise A's lower
    triangle is copied first.

    On the host, LAPACK ``dpotrf`` of the OpenBLAS that NumPy links, in place, at about
    the GEMM rate (:mod:`refngd.backend.lapack` says why not ``numpy.linalg.cholesky`` or SciPy's).
    Its diagonal tells finiteness: a NaN or Inf anywhere in row i of L reaches L_ii
    through L_ii² = A_ii − Σ_k L_ik².
    """
    xp = namespace(A)
    if xp is np:
        from .lapack import cholesky_inplace, lower_copy

        own = (unshifted is not None and unshifted is not A and A.flags.c_contiguous
               and A.dtype == np.float64)
        # dpotrf leaves the strict upper triangle as it was: zeros, so L is lower-triangular
        L, ok = cholesky_inplace(A if own else lower_copy(A))
        if not ok:
            return None, None
    else:
        try:
            L = xp.linalg.cholesky(A)
        except np.linalg.LinAlgError:
            return None, None
    if not A.shape[0]:
        return L, np.array([1.0, 1.0, 1.0, 0.0])
    d = xp.abs(xp.diagonal(L))
    finite = xp.all(xp.isfinite(L)) if xp is not np else bool(np.isfinite(d).all())
    return L, host_values(finite, d.min(), d.max(),
                          xp.diagonal(A if unshifted is None else unshifted).max())


def _accept_pivots(stats) -> bool:
    """Cholesky "succeeds" on matrices singular to working precision: reject pivots that
    are tiny relative to the largest, so that the ``eigh`` fallback handles them."""
    finite, dmin, dmax = stats[0], stats[1], stats[2]
    return bool(finite) and np.isfinite(dmax) and dmin > 1e-7 * dmax


def cholesky(A: Array):
    """Lower Cholesky factor of a symmetric positive-definite matrix, or ``None``.

    Returns ``None`` (instead of raising, or of CuPy's silent NaNs) when ``A`` is not
    numerically positive definite (a pivot below 1e-7 × the largest), so that callers
    can fall back to :func:`eigh_psd`.  Its checks read the device once.
    """
    L, stats = _cholesky_stats(A)
    if L is None or not _accept_pivots(stats):
        return None
    return L


def eigh_psd(A: Array):
    """Eigendecomposition of a symmetric PSD matrix with eigenvalues clipped at 0."""
    xp = namespace(A)
    w, V = xp.linalg.eigh(A)
    return xp.maximum(w, 0.0), V


def eigh_range(A: Array):
    """Eigenpairs of a symmetric PSD matrix on its numerical range (eigenvalue > n·ε·max).

    For row-space solves Uᵀ V diag(1/(w + μ)) Vᵀ b: the dropped directions are
    annihilated by Uᵀ in exact arithmetic, and keeping them would add ~ε‖A‖/μ of
    round-off (see :class:`PSDFactor`, ``projected``).
    """
    return numerical_range(*eigh_psd(A))


def numerical_range(w: Array, V: Array):
    """The eigenpairs (w, V) of :func:`eigh_psd` whose eigenvalue exceeds n·ε·max(w)."""
    if w.shape[0] == 0:
        return w, V
    keep = w > w.shape[0] * np.finfo(np.float64).eps * float(w.max())
    return w[keep], V[:, keep]


class PSDFactor:
    """A factorisation of ``A + shift·I`` for symmetric positive (semi-)definite ``A``.

    Formed in float64.  Cholesky first; when it fails (the shifted matrix is singular or
    indefinite to working precision) ``eigh`` with eigenvalues clipped at 0.  A singular
    shifted matrix (smallest eigenvalue ≤ ``rtol`` × largest, default ``n·eps``) raises
    :class:`SingularSystemError` — refngd never returns the NaNs or huge numbers of a
    singular solve.  Factor once, then call :meth:`solve` as often as needed.

    ``projected=True`` declares that the caller multiplies every solution by Uᵀ for
    A = U Uᵀ (a Gram matrix), so that only the solution's part in range(A) matters: with
    ``shift > 0`` the directions of A that are null to working precision (eigenvalue
    ≤ n·ε·max) are then dropped from the solution instead of raising.  Kept, they would
    carry (vᵀB)/shift — huge for a small shift when B has a component there (two samples
    with the same input but different targets) — and Uᵀ cancels them only up to round-off,
    an error of order ε‖A‖/shift.  Dropped, the solution is that of the problem restricted
    to range(A), which is what Uᵀ(A + shift·I)⁻¹B is in exact arithmetic.  Such directions
    are detected from the Cholesky pivots (a null direction leaves a pivot² of order
    ``shift``); the eigendecomposition is only paid then.  A shift of 0 still raises.
    """

    def __init__(self, A: Array, shift: float = 0.0, rtol: float | None = None,
                 projected: bool = False):
        if not np.isfinite(shift):
            # e.g. damping 1e308 divided by a loss constant c < 1: an overflow, not a singularity
            raise ValueError(f"the damping overflows float64 here (diagonal shift {shift}); use a "
                             "damping of a sensible size relative to the curvature (e.g. 1e-3).")
        xp = namespace(A)
        A = xp.asarray(A, dtype=xp.float64)
        n = A.shape[0]
        self.xp, self.n, self.L = xp, n, None
        M = A
        if shift and xp is np:  # lower triangle of A + shift·I, zeros above: one pass
            from .lapack import lower_copy

            M = lower_copy(A, shift)
        elif shift:  # A + shift·I without an n × n identity temporary
            M = A.copy()
            M.reshape(-1)[::n + 1] += shift
        self.L, stats = _cholesky_stats(M, A)  # M: factored in place when it is a copy
        if self.L is not None and not _accept_pivots(stats):
            self.L = None
        projected = bool(projected and shift and n)
        if self.L is not None and projected and _may_have_null_space(stats, shift, n):
            self.L = None
        if self.L is not None:
            self.scale = math.sqrt(stats[3] + shift)  # √ of the largest diagonal entry
        if self.L is None:
            w, self.V = eigh_range(A) if projected else eigh_psd(A)
            self.w = w + shift
            wmax = float(self.w.max()) if self.w.shape[0] else 1.0
            self.scale = math.sqrt(wmax) if wmax > 0 else 1.0
            tol = (rtol if rtol is not None else n * np.finfo(np.float64).eps) * (wmax if n else 1)
            if n and not projected and float(self.w.min()) <= tol:
                raise SingularSystemError(
                    f"the {n}x{n} system is singular (smallest eigenvalue {float(self.w.min()):.3g}, "
                    f"largest {float(self.w.max()):.3g}); pass damping > 0."
                )

    def solve(self, B: Array) -> Array:
        """``(A + shift·I)⁻¹ B`` for B of shape (n,) or (n, k), in float64."""
        B = self.xp.asarray(B, dtype=self.xp.float64)
        if self.L is not None:
            return _cho_solve(self.xp, self.L, B)
        w = self.w[:, None] if B.ndim == 2 else self.w
        return self.V @ ((self.V.T @ B) / w)

    def solve_scaled(self, B: Array):
        """(σ·(A + shift·I)⁻¹B, σ), σ ≈ √(largest diagonal entry of A + shift·I).

        The same solution times σ, computed with the factor divided by σ, so that it
        stays representable where the solution itself would not: an undamped Gram matrix
        of a saturated model (entries ~1e-260) with right-hand sides ~1e130 has solutions
        ~1e390, while Uᵀ of them is ~1e260 (and a float32 model's rows cannot even hold
        solutions beyond 3e38).  σ is the nearest power of two, so the scaling is exact;
        within [2⁻⁸, 2⁸] it is 1 and this is :meth:`solve`.
        """
        s = self.scale
        if not s > 0 or not math.isfinite(s):
            return self.solve(B), 1.0
        s = 2.0 ** round(math.log2(s))
        if 2.0 ** -8 <= s <= 2.0 ** 8:
            return self.solve(B), 1.0
        B = self.xp.asarray(B, dtype=self.xp.float64) / s
        if self.L is not None:
            return _cho_solve(self.xp, self.L / s, B), s
        w = (self.w[:, None] if B.ndim == 2 else self.w) / (s * s)
        return self.V @ ((self.V.T @ B) / w), s


def _may_have_null_space(stats, shift: float, n: int) -> bool:
    """Could A have a direction null to working precision, judged from chol(A + shift·I)?

    ``stats`` are :func:`_cholesky_stats` of A + shift·I (min pivot, max A_ii; already
    on the host).  Only a small shift matters (the error a null direction causes is
    ~ε‖A‖/shift, below 1e-12 for shift ≥ 1e-4·max diag A), and a null direction of A
    leaves a pivot² of order ``shift`` (λ_min(A + shift·I) ≤ min pivot²; measured
    1.6–15 × shift for generic rank-deficient Gram matrices), while a direction with
    eigenvalue σ leaves ≥ σ + shift.  False alarms (an eigenvalue below ~100·shift) only
    cost an eigendecomposition.
    """
    scale = stats[3]  # max A_ii
    if shift >= 1e-4 * scale:
        return False
    return stats[1] ** 2 <= 100 * shift + n * 2.3e-16 * scale


def lstsq_ridge(U: Array, b: Array, mu: float) -> Array:
    """argmin_d ‖U d − b‖² + μ‖d‖² for U (m, n), by QR — never the normal equations.

    The minimiser solves (UᵀU + μI) d = Uᵀb.  Forming UᵀU squares the condition number;
    a QR factorisation of the stacked matrix [U; √μ I] ((m + n) × n) does not: the
    relative error is about ε·cond([U; √μ I]) = ε·√cond(UᵀU + μI).  For μ = 0 it needs
    m ≥ n and U of full column rank, and raises :class:`SingularSystemError` when a
    diagonal entry of R is ≤ max(m, n)·ε·max|R_ii|.  (An unpivoted QR usually, not always,
    reveals rank deficiency on R's diagonal; the check errs on the side of a small R_ii.)
    """
    xp = namespace(U)
    U = xp.asarray(U, dtype=xp.float64)
    b = xp.asarray(b, dtype=xp.float64)
    m, n = U.shape
    if mu > 0:
        U = xp.concatenate([U, math.sqrt(mu) * xp.eye(n, dtype=xp.float64)], axis=0)
        b = xp.concatenate([b, xp.zeros(n, dtype=xp.float64)])
    elif m < n:
        raise SingularSystemError(f"the least-squares problem has fewer equations ({m}) than "
                                  f"unknowns ({n}); pass damping > 0.")
    Q, R = xp.linalg.qr(U, mode="reduced")
    d = xp.abs(xp.diagonal(R))
    if not mu and n and float(d.min()) <= max(m, n) * np.finfo(np.float64).eps * float(d.max()):
        raise SingularSystemError(
            f"the {n}x{n} system is singular (its row matrix has rank < {n} to working "
            f"precision); pass damping > 0.")
    return _solve_triangular(xp, R, Q.T @ b, lower=False)


def psd_solve(A: Array, B: Array, shift: float = 0.0, rtol: float | None = None) -> Array:
    """Solve ``(A + shift·I) X = B`` for symmetric PSD ``A``: see :class:`PSDFactor`.

    Parameters
    ----------
    A : (R, R) array
    B : (R,) or (R, k) array
    shift : float, added to the diagonal (``>= 0``).
    """
    return PSDFactor(A, shift, rtol).solve(B)


def erf(x: Array) -> Array:
    """The error function on NumPy (SciPy) or CuPy (cupyx) arrays."""
    if namespace(x) is np:
        import scipy.special

        return scipy.special.erf(x)
    import cupyx.scipy.special  # type: ignore

    return cupyx.scipy.special.erf(x)
