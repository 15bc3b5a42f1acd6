"""Host (NumPy) Cholesky factorisation and triangular solves near the GEMM rate.

Every damped solve of refngd factors an R × R float64 Gram matrix (R = N·K rows, 500 to
20 000 in practice) by Cholesky and solves with its triangular factor twice
(:class:`refngd.backend.PSDFactor`).  The factorisation is R³/3 FLOPs; at the GEMM rate
it costs a fraction of the Gram matrix itself (R²·P/2 FLOPs per layer).  Which LAPACK entry
point comes closest to that rate was measured (docs/benchmarks.md, "Cholesky and
triangular solves"; 2-core VMs, NumPy and SciPy wheels, R = 1152):

* ``numpy.linalg.cholesky`` calls OpenBLAS's ``dpotrf`` but copies the matrix into and
  out of Fortran order and zeroes a triangle around it: 15–36 % of the GEMM rate on
  AVX2, 10–38 % on AVX-512, the slowest of the three in every run;
* SciPy's ``dpotrf`` (``scipy.linalg.lapack``, on the transposed, Fortran-ordered view so
  that nothing is copied) is fast by itself, but SciPy's wheel bundles a *second*
  OpenBLAS with its own thread pool: called right after NumPy's GEMMs (the Gram matrix),
  whose idle threads still spin, it ran 1.5–3× slower on 2 cores;
* the ``dpotrf`` / ``dtrsm`` / ``dtrsv`` of the OpenBLAS that NumPy itself links (NumPy's
  wheels ship it as ``scipy-openblas64``, ILP64, symbols ``scipy_dpotrf_64_`` …),
  called in place through :mod:`ctypes`: one thread pool for the whole step, no copy;
  OpenBLAS's own recursive, parallel ``potrf`` does its work in GEMM/SYRK/TRSM calls.
  Within the NGD step it ran at 38–48 % of the GEMM rate on the AVX-512 VM (OpenBLAS's
  SkylakeX kernels, whose TRSM runs at 47–72 % of their GEMM rate there).  A recursive
  Cholesky with its triangular solves recursed into GEMMs was measured at 0.8–1.2× its
  speed and is not used; a right-looking *blocked* one (:func:`_potrf_blocked`: ``dpotrf``
  of 128 × 128 diagonal blocks, the rest in ``dtrsm`` and rank-128 ``dsyrk`` updates,
  which OpenBLAS runs near the GEMM rate on both threads) ran at 51–53 % against 41–48 %
  for one ``dpotrf`` call, interleaved in one process at R = 1152, and within 5 % of it
  (either way, run to run) at R = 600 … 4608: it is the default above R = 256
  (:data:`CHOLESKY_BLOCK`; 0 restores one ``dpotrf`` call).

:func:`cholesky_inplace` and :func:`cho_solve` therefore use NumPy's own LAPACK where it is
found (already loaded in this process, ILP64 symbols present) and fall back to SciPy's
LAPACK, then to NumPy's, otherwise — the same mathematics (LAPACK ``dpotrf``, ``dtrsm``)
on every route.  ``REFNGD_HOST_LAPACK`` (``auto``, ``numpy-openblas``, ``scipy``,
``numpy``) or :data:`HOST_LAPACK` picks a route by hand.  CuPy arrays never come here:
the callers (:mod:`refngd.backend`, ``Linear.row_gram_lower_into``, ``RowSet.gram``)
send only NumPy arrays, which is why this module, part of the backend package, imports
NumPy directly and nothing of refngd (no import circle with the package it serves).

Layout: a C-ordered symmetric matrix is, read in Fortran order, its own transpose, so
``dpotrf('U')`` on the C array's memory computes the *lower* factor L (L Lᵀ = A) in the
C array's lower triangle, in place, and leaves its strict upper triangle untouched.
"""
from __future__ import annotations

import ctypes
import glob
import os

import numpy as np

#: ``"auto"`` (NumPy's own OpenBLAS, else SciPy, else NumPy), or one of the routes by name
HOST_LAPACK = os.environ.get("REFNGD_HOST_LAPACK", "auto")
ROUTES = ("auto", "numpy-openblas", "scipy", "numpy")

_i64 = ctypes.c_int64
_lib_cache: list = []  # [handles or None], resolved once


class _NumpyOpenBLAS:
    """ctypes handles to the ILP64 LAPACK/BLAS of the OpenBLAS that NumPy links."""

    def __init__(self, lib):
        self.path = lib._name
        self.potrf = lib.scipy_dpotrf_64_
        self.trsm = lib.scipy_dtrsm_64_
        self.trsv = lib.scipy_dtrsv_64_
        self.syrk = lib.scipy_dsyrk_64_
        for f in (self.potrf, self.trsm, self.trsv, self.syrk):
            f.restype = None


def _find_numpy_openblas():
    """NumPy's bundled ``scipy-openblas64`` if this process has already loaded it, else None.

    Only the copy NumPy itself uses qualifies (``RTLD_NOLOAD``: never a second library,
    whose thread pool would compete with NumPy's), and only with the ILP64 symbols whose
    integer width is known (``…_64_``).
    """
    root = os.path.dirname(np.__file__)
    patterns = [os.path.join(root + ".libs", "*openblas64*"),   # Linux and Windows wheels
                os.path.join(root, ".dylibs", "*openblas64*")]  # macOS wheels
    mode = getattr(os, "RTLD_NOLOAD", None)
    if mode is None:  # pragma: no cover - Windows: no way to ask "already loaded?"
        return None
    for path in sorted(p for pat in patterns for p in glob.glob(pat)):
        try:
            lib = ctypes.CDLL(path, mode=mode)
            return _NumpyOpenBLAS(lib)
        except (OSError, AttributeError):
            continue
    return None


def numpy_openblas():
    """The :class:`_NumpyOpenBLAS` handles (resolved once), or None where not available."""
    if not _lib_cache:
        try:
            _lib_cache.append(_find_numpy_openblas())
        except Exception:  # pragma: no cover - any surprise means: use the fallbacks
            _lib_cache.append(None)
    return _lib_cache[0]


def route() -> str:
    """The host LAPACK route in use: ``"numpy-openblas"``, ``"scipy"`` or ``"numpy"``."""
    want = HOST_LAPACK
    if want not in ROUTES:
        raise ValueError(f"REFNGD_HOST_LAPACK / refngd.backend.lapack.HOST_LAPACK must be one of "
                         f"{ROUTES}, got {want!r}.")
    if want in ("auto", "numpy-openblas") and numpy_openblas() is not None:
        return "numpy-openblas"
    if want == "numpy":
        return "numpy"
    try:
        import scipy.linalg.lapack  # noqa: F401
        return "scipy"
    except ImportError:  # pragma: no cover - SciPy is a dependency
        return "numpy"


def _c(s: bytes):
    return ctypes.c_char_p(s)


def _ptr(a: np.ndarray):
    return a.ctypes.data_as(ctypes.c_void_p)


def cholesky_inplace(M: np.ndarray) -> tuple[np.ndarray, bool]:
    """Lower Cholesky factor of the symmetric float64 matrix ``M``, computed in place.

    Parameters
    ----------
    M : (n, n) C-contiguous float64 NumPy array, symmetric (only its lower triangle is
        read).  It is overwritten.

    Returns
    -------
    (L, ok) : L is ``M`` itself with the factor in its lower triangle (L Lᵀ = M); its
        strict upper triangle is **not referenced** (it may still hold M's entries — the
        solves here read only the lower triangle; start from :func:`lower_copy` for zeros).
        ``ok`` is False when LAPACK ``dpotrf`` met a non-positive pivot (M is not
        numerically positive definite); L is then partial.
    """
    if M.dtype != np.float64 or not M.flags.c_contiguous or M.ndim != 2:
        raise ValueError("cholesky_inplace needs a C-contiguous float64 square matrix.")
    n = M.shape[0]
    if n == 0:
        return M, True
    r = route()
    if r == "numpy-openblas":
        if CHOLESKY_BLOCK and n > 2 * CHOLESKY_BLOCK:
            return M, _potrf_blocked(numpy_openblas(), M, CHOLESKY_BLOCK)
        lib, nn, info = numpy_openblas(), _i64(n), _i64(0)
        lib.potrf(_c(b"U"), ctypes.byref(nn), _ptr(M), ctypes.byref(nn), ctypes.byref(info),
                  ctypes.c_size_t(1))
        return M, info.value == 0
    if r == "scipy":
        from scipy.linalg import lapack

        # the transposed view is Fortran-ordered: dpotrf works on M's memory, no copy
        _, info = lapack.dpotrf(M.T, lower=0, clean=0, overwrite_a=1)
        return M, info == 0
    try:
        M[...] = np.linalg.cholesky(M)
    except np.linalg.LinAlgError:
        return M, False
    return M, True


#: block size of the right-looking blocked Cholesky on NumPy's OpenBLAS (0: one ``dpotrf``
#: call); ``REFNGD_CHOLESKY_BLOCK`` sets it.  See :func:`_potrf_blocked` for the measurement.
CHOLESKY_BLOCK = int(os.environ.get("REFNGD_CHOLESKY_BLOCK", "128"))


def _potrf_blocked(lib, M: np.ndarray, nb: int) -> bool:
    """Right-looking blocked Cholesky of ``M`` in place (the textbook block algorithm, by
    block rows of the Fortran upper factor U = Lᵀ): for each diagonal block k, ``dpotrf``
    of its nb × nb block, ``dtrsm`` of the block row right of it (U₁₂ ← U₁₁⁻ᵀ A₁₂) and
    ``dsyrk`` of the trailing matrix (A₂₂ −= U₁₂ᵀ U₁₂).

    Why not one ``dpotrf``: OpenBLAS's parallel ``potrf`` splits its work into panels whose
    updates run below the GEMM rate on 2 cores at the sizes of the NGD step (R ≈ 1152); here
    almost all the work is the trailing ``dsyrk`` updates, rank nb, which OpenBLAS runs near
    the GEMM rate with both threads (docs/benchmarks.md, issue 22).  Returns False at a
    non-positive pivot (the factor is then partial), as ``dpotrf``'s ``info``.
    """
    n = M.shape[0]
    ld, info = _i64(n), _i64(0)
    one, minus = ctypes.c_double(1.0), ctypes.c_double(-1.0)
    s1 = ctypes.c_size_t(1)
    base = M.ctypes.data
    at = lambda i, j: ctypes.c_void_p(base + 8 * (i + j * n))  # noqa: E731 - Fortran (i, j)
    for k in range(0, n, nb):
        b, r = min(nb, n - k), max(0, n - k - nb)
        lib.potrf(_c(b"U"), ctypes.byref(_i64(b)), at(k, k), ctypes.byref(ld),
                  ctypes.byref(info), s1)
        if info.value:
            return False
        if not r:
            break
        lib.trsm(_c(b"L"), _c(b"U"), _c(b"T"), _c(b"N"), ctypes.byref(_i64(b)),
                 ctypes.byref(_i64(r)), ctypes.byref(one), at(k, k), ctypes.byref(ld),
                 at(k, k + b), ctypes.byref(ld), s1, s1, s1, s1)
        lib.syrk(_c(b"U"), _c(b"T"), ctypes.byref(_i64(r)), ctypes.byref(_i64(b)),
                 ctypes.byref(minus), at(k, k + b), ctypes.byref(ld), ctypes.byref(one),
                 at(k + b, k + b), ctypes.byref(ld), s1, s1)
    return True


def lower_copy(A: np.ndarray, shift: float = 0.0, block: int = 128) -> np.ndarray:
    """A new C-ordered float64 matrix: the lower triangle of ``A`` (+ shift on the diagonal),
    zeros above — what :func:`cholesky_inplace` turns into a clean lower factor.

    Parameters
    ----------
    A : (n, n) array (any float dtype or strides); only its lower triangle is read.
    shift : added to the diagonal after the copy, as ``M.reshape(-1)[::n + 1] += shift``.
    block : rows per block.

    In row blocks: each block's rows up to the end of its diagonal square are copied in one
    contiguous assignment, the part right of the square set to zero, and the square's strict
    upper triangle zeroed through a cached boolean mask — one pass that reads about half
    of A.  (A ``tril`` of each square, as before, allocated a temporary per block: 1.4–1.6×
    slower at n = 1152.)  The lower triangle is that of ``A.copy()`` with ``shift`` added
    to its diagonal, bit for bit.
    """
    n = A.shape[0]
    M = np.empty((n, n), dtype=np.float64)
    for i in range(0, n, block):
        j = min(n, i + block)
        M[i:j, :j] = A[i:j, :j]
        M[i:j, j:] = 0.0
        M[i:j, i:j][_strict_upper(j - i)] = 0.0
    if shift:
        M.reshape(-1)[::n + 1] += shift
    return M


_UPPER_MASKS: dict[int, np.ndarray] = {}


def _strict_upper(b: int) -> np.ndarray:
    """The (b, b) boolean mask of the strict upper triangle (cached per size)."""
    mask = _UPPER_MASKS.get(b)
    if mask is None:
        mask = _UPPER_MASKS[b] = np.triu(np.ones((b, b), dtype=bool), 1)
    return mask


def cho_solve(L: np.ndarray, B: np.ndarray) -> np.ndarray:
    """(L Lᵀ)⁻¹ B from the lower factor of :func:`cholesky_inplace` (two triangular solves).

    Parameters
    ----------
    L : (n, n) C-contiguous float64 array; only its lower triangle is read.
    B : (n,) or (n, k) array; the result is a new float64 array of its shape.

    BLAS ``dtrsv`` (one right-hand side) or ``dtrsm`` (several), in place on a copy of B.
    """
    X = np.array(B, dtype=np.float64, order="C", copy=True)
    n = L.shape[0]
    if n == 0 or X.size == 0:
        return X
    r = route()
    if r == "numpy-openblas":
        lib, nn, one = numpy_openblas(), _i64(n), ctypes.c_double(1.0)
        s1 = ctypes.c_size_t(1)
        if X.ndim == 1:
            inc = _i64(1)
            # C-ordered L is the Fortran U = Lᵀ: L y = b is Uᵀ y = b, then U x = y
            lib.trsv(_c(b"U"), _c(b"T"), _c(b"N"), ctypes.byref(nn), _ptr(L), ctypes.byref(nn),
                     _ptr(X), ctypes.byref(inc), s1, s1, s1)
            lib.trsv(_c(b"U"), _c(b"N"), _c(b"N"), ctypes.byref(nn), _ptr(L), ctypes.byref(nn),
                     _ptr(X), ctypes.byref(inc), s1, s1, s1)
            return X
        # C-ordered X (n, k) is the Fortran Xᵀ (k × n): Xᵀ ← Xᵀ U⁻¹, then Xᵀ ← Xᵀ U⁻ᵀ
        k = _i64(X.shape[1])
        for trans in (b"N", b"T"):
            lib.trsm(_c(b"R"), _c(b"U"), _c(trans), _c(b"N"), ctypes.byref(k), ctypes.byref(nn),
                     ctypes.byref(one), _ptr(L), ctypes.byref(nn), _ptr(X), ctypes.byref(k),
                     s1, s1, s1, s1)
        return X
    import scipy.linalg

    y = scipy.linalg.solve_triangular(L, X, lower=True, check_finite=False, overwrite_b=True)
    return scipy.linalg.solve_triangular(L, y, lower=True, trans=1, check_finite=False,
                                         overwrite_b=True)


def syrk_lower(Bf: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out``'s lower triangle ← Bf Bfᵀ (BLAS ``dsyrk``: half the FLOPs of a GEMM).

    Parameters
    ----------
    Bf : (R, d) C-contiguous float64 array.
    out : (R, R) C-contiguous float64 array.  Only the lower triangle (diagonal included)
        is written on NumPy's own OpenBLAS; the strict upper triangle is left as it was.
        Elsewhere ``out`` receives the full product ``Bf @ Bf.T`` (NumPy dispatches it to
        ``dsyrk`` and mirrors the triangle).

    Why not ``Bf @ Bf.T``: NumPy's product computes one triangle by ``dsyrk`` too, but
    into a fresh array, and then mirrors it element by element with a strided copy —
    a pass that costs as much as the whole ``dsyrk`` when d is small (d = 10: 1.4 ms
    against 0.2 ms at R = 1152).  Callers that keep triangle semantics mirror once at
    the end (:func:`symmetrize_lower`).
    """
    R, d = Bf.shape
    if route() == "numpy-openblas" and R and d:
        lib, n, k = numpy_openblas(), _i64(R), _i64(d)
        s1 = ctypes.c_size_t(1)
        # C-ordered Bf is the Fortran Bfᵀ (d × R): Fortran C = (Bfᵀ)ᵀ Bfᵀ, trans = 'T';
        # Fortran's upper triangle is the C array's lower one
        lib.syrk(_c(b"U"), _c(b"T"), ctypes.byref(n), ctypes.byref(k),
                 ctypes.byref(ctypes.c_double(1.0)), _ptr(Bf), ctypes.byref(k),
                 ctypes.byref(ctypes.c_double(0.0)), _ptr(out), ctypes.byref(n), s1, s1)
        return out
    np.matmul(Bf, Bf.T, out=out)
    return out


def symmetrize_lower(G: np.ndarray, block: int = 128) -> np.ndarray:
    """Copy the lower triangle of the square C-ordered ``G`` onto its upper one, in place.

    In blocks of ``block`` rows, so that each transposed read stays in cache.
    """
    n = G.shape[0]
    for i in range(0, n, block):
        j = min(n, i + block)
        G[i:j, j:] = G[j:, i:j].T
        sq = G[i:j, i:j]
        upper = _strict_upper(j - i)
        sq[upper] = sq.T[upper]
    return G
