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
  Within the NGD step it ran at 38–46 % of the GEMM rate on the AVX-512 VM (OpenBLAS's
  SkylakeX kernels, whose TRSM runs at 47–72 % of their GEMM rate there); a recursive
  Cholesky written here with its triangular solves recursed into GEMMs was measured at
  0.8–1.2× its speed and is not used.

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


def lower_copy(A: np.ndarray, shift: float = 0.0, block: int = 256) -> np.ndarray:
    """A new C-ordered float64 matrix: the lower triangle of ``A`` (+ shift on the diagonal),
    zeros above — what :func:`cholesky_inplace` turns into a clean lower factor.

    Parameters
    ----------
    A : (n, n) array (any float dtype or strides); only its lower triangle is read.
    shift : added to the diagonal after the copy, as ``M.reshape(-1)[::n + 1] += shift``.
    block : rows per block.

    In row blocks: the part left of each block's diagonal square is copied, the square
    itself through a small ``tril``, the part right of it set to zero — one pass that
    reads half of A, instead of a full copy and then a second pass zeroing the upper
    triangle of the factor.  The lower triangle is that of ``A.copy()`` with ``shift``
    added to its diagonal, bit for bit.
    """
    n = A.shape[0]
    M = np.empty((n, n), dtype=np.float64)
    for i in range(0, n, block):
        j = min(n, i + block)
        M[i:j, :i] = A[i:j, :i]
        M[i:j, i:j] = np.tril(A[i:j, i:j])
        M[i:j, j:] = 0.0
    if shift:
        M.reshape(-1)[::n + 1] += shift
    return M


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
        upper = np.triu(np.ones((j - i, j - i), dtype=bool), 1)
        sq[upper] = sq.T[upper]
    return G
