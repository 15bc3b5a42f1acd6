"""refngd.backend.lapack (issue 22): the in-place Cholesky, triangular solves and triangle-only Gram
products agree with straightforward dense NumPy to ~1e-12 on every host LAPACK route.

Float32 rows, rank-deficient Gram matrices and λ = 0 included; Gram matrices and
factorisations are float64 whatever the model's dtype.  No timing is asserted.
"""
import numpy as np
import pytest

from refngd import backend, losses, nn
from refngd.backend import lapack as linalg
from refngd.backend import PSDFactor, SingularSystemError
from refngd.curvature import Fisher

ROUTES = ["scipy", "numpy"] + (["numpy-openblas"] if linalg.numpy_openblas() is not None else [])


def rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


def spd(n, seed=0, extra=5):
    X = np.random.default_rng(seed).standard_normal((n, n + extra))
    return X @ X.T / n + 0.1 * np.eye(n)


@pytest.fixture(params=ROUTES)
def route(request, monkeypatch):
    monkeypatch.setattr(linalg, "HOST_LAPACK", request.param)
    assert linalg.route() == request.param
    return request.param


def test_numpy_openblas_found_where_numpy_links_it():
    """NumPy's wheels link scipy-openblas64: then the in-place route must be the default."""
    try:
        lapack = np.show_config(mode="dicts")["Build Dependencies"]["lapack"]
    except (TypeError, KeyError):  # older NumPy: nothing to check against
        lapack = {}
    if lapack.get("name") == "scipy-openblas" and "USE64BITINT" in str(lapack):
        assert linalg.numpy_openblas() is not None
    assert linalg.route() in ("numpy-openblas", "scipy", "numpy")


def test_bad_route_name(monkeypatch):
    monkeypatch.setattr(linalg, "HOST_LAPACK", "mkl")
    with pytest.raises(ValueError, match="REFNGD_HOST_LAPACK"):
        linalg.route()


@pytest.mark.parametrize("n", [0, 1, 7, 300, 520])
def test_cholesky_inplace_equals_numpy(route, n):
    A = spd(n, seed=n)
    M = A.copy()
    M[np.triu_indices(n, 1)] = 7.0  # the strict upper triangle is never read
    L, ok = linalg.cholesky_inplace(M)
    assert ok and L is M
    if n:
        ref = np.linalg.cholesky(A)
        assert rel(np.tril(L), ref) < 1e-12
        if route != "numpy":  # LAPACK in place leaves the other triangle alone
            assert (L[np.triu_indices(n, 1)] == 7.0).all()
        assert rel(np.tril(L) @ np.tril(L).T, A) < 1e-13


@pytest.mark.parametrize("bad", ["indefinite", "singular"])
def test_cholesky_inplace_reports_failure(route, bad):
    A = -np.eye(4) if bad == "indefinite" else np.zeros((4, 4))
    _, ok = linalg.cholesky_inplace(A.copy())
    assert not ok


@pytest.mark.skipif(linalg.numpy_openblas() is None, reason="NumPy's own OpenBLAS not found")
@pytest.mark.parametrize("nb", [0, 64, 100, 128])
def test_blocked_cholesky_equals_one_dpotrf(monkeypatch, nb):
    """The blocked factorisation (issue 22) gives LAPACK's factor to round-off for every
    block size (0: one dpotrf call), leaves the strict upper triangle alone, and reports a
    non-positive pivot met in a late block."""
    monkeypatch.setattr(linalg, "HOST_LAPACK", "numpy-openblas")
    monkeypatch.setattr(linalg, "CHOLESKY_BLOCK", nb)
    n = 450
    A = spd(n, seed=3)
    M = A.copy()
    M[np.triu_indices(n, 1)] = 7.0
    L, ok = linalg.cholesky_inplace(M)
    assert ok and rel(np.tril(L), np.linalg.cholesky(A)) < 1e-12
    assert (L[np.triu_indices(n, 1)] == 7.0).all()
    B = A.copy()
    B[n - 3, n - 3] = -1.0               # indefinite only in the last block's pivots
    assert not linalg.cholesky_inplace(B)[1]


def test_cholesky_inplace_refuses_other_layouts():
    with pytest.raises(ValueError):
        linalg.cholesky_inplace(np.asfortranarray(spd(5))[:, :4])
    with pytest.raises(ValueError):
        linalg.cholesky_inplace(spd(5).astype(np.float32))


@pytest.mark.parametrize("bshape", [(300,), (300, 1), (300, 5)])
def test_cho_solve_equals_dense_solve(route, bshape):
    A = spd(300, seed=3)
    B = np.random.default_rng(4).standard_normal(bshape)
    L, _ = linalg.cholesky_inplace(A.copy())
    L[np.triu_indices(300, 1)] = np.nan  # only the lower triangle may be read
    X = linalg.cho_solve(L, B.astype(np.float32))  # float32 right-hand side: solved in float64
    assert X.dtype == np.float64 and X.shape == B.shape
    assert rel(X, np.linalg.solve(A, B.astype(np.float32).astype(np.float64))) < 1e-12


@pytest.mark.parametrize("R, d", [(1, 3), (50, 1), (130, 40), (300, 900)])
def test_syrk_lower_and_mirror(route, R, d):
    Bf = np.random.default_rng(R).standard_normal((R, d))
    out = np.full((R, R), 3.0)
    linalg.syrk_lower(Bf, out)
    ref = Bf @ Bf.T
    low = np.tril_indices(R)
    assert rel(out[low], ref[low]) < 1e-14
    linalg.symmetrize_lower(out)
    assert (out == out.T).all()
    assert rel(out, ref) < 1e-14


@pytest.mark.parametrize("shift", [0.0, 0.25])
def test_lower_copy(shift):
    A = np.arange(600.0 * 600).reshape(600, 600)
    ref = np.tril(A) + shift * np.eye(600)
    np.testing.assert_array_equal(linalg.lower_copy(A, shift, block=64), ref)
    np.testing.assert_array_equal(linalg.lower_copy(A[::2, ::2].astype(np.float32), shift),
                                  np.tril(A[::2, ::2].astype(np.float32)) + shift * np.eye(300))


def test_psdfactor_factor_bitwise_as_before(route):
    """The factor of A + shift·I from lower_copy is that of A.copy() + shift, bit for bit."""
    A, shift = spd(300, seed=9), 1e-3
    M = A.copy()
    M.reshape(-1)[::301] += shift
    L, ok = linalg.cholesky_inplace(M)
    assert ok
    np.testing.assert_array_equal(PSDFactor(A, shift=shift).L, np.tril(L))


# ------------------------------------------------------------------ PSDFactor on top
def psd_rank(n, r, seed=0):
    X = np.random.default_rng(seed).standard_normal((n, r))
    return X @ X.T


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shift", [0.0, 1e-3, 2.0])
def test_psdfactor_against_dense(route, dtype, shift):
    A = spd(200, seed=5).astype(dtype)
    B = np.random.default_rng(6).standard_normal((200, 3)).astype(dtype)
    fac = PSDFactor(A, shift=shift)
    assert fac.L is not None and fac.L.dtype == np.float64
    assert (fac.L == np.tril(fac.L)).all()  # the factor is lower-triangular, as before
    A64 = A.astype(np.float64) + shift * np.eye(200)
    ref = np.linalg.solve(A64, B.astype(np.float64))
    assert rel(fac.solve(B), ref) < 1e-12
    assert rel(fac.solve(B[:, 0]), ref[:, 0]) < 1e-12
    x, s = PSDFactor(A * dtype(2.0 ** -40), shift=shift * 2.0 ** -40).solve_scaled(B[:, 0])
    assert s != 1.0 and rel(x / s, ref[:, 0] * 2.0 ** 40) < 1e-12


def test_psdfactor_rank_deficient(route):
    A = psd_rank(40, 12, seed=7)
    b = np.random.default_rng(8).standard_normal(40)
    with pytest.raises(SingularSystemError):
        PSDFactor(A).solve(b)  # λ = 0 on a singular system raises, on every route
    ref = np.linalg.solve(A + 0.5 * np.eye(40), b)
    assert rel(PSDFactor(A, shift=0.5).solve(b), ref) < 1e-12
    # projected with a tiny shift: the null directions are dropped (eigh route)
    w, V = np.linalg.eigh(A)
    keep = w > 40 * np.finfo(float).eps * w.max()
    ref = V[:, keep] @ ((V[:, keep].T @ b) / (w[keep] + 1e-12))
    assert rel(PSDFactor(A, shift=1e-12, projected=True).solve(b), ref) < 1e-10


def test_psdfactor_does_not_modify_its_input(route):
    A = spd(50, seed=9)
    A0 = A.copy()
    PSDFactor(A)
    PSDFactor(A, shift=0.1)
    backend.cholesky(A)
    np.testing.assert_array_equal(A, A0)


# ------------------------------------------------------------------ Gram of a network
def dense_gram64(F):
    """U Uᵀ from per-row gradients formed in float64 from the (possibly float32) rows."""
    U = []
    for e in F.rows.layers:
        B = e.B.astype(np.float64)
        a = e.cache.astype(np.float64)
        a = np.concatenate([a, np.ones((a.shape[0], 1))], axis=1)
        U.append((B[:, :, :, None] * a[:, None, None, :]).reshape(F.rows.R, -1))
    U = np.concatenate(U, axis=1)
    return U @ U.T


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("duplicate", [False, True])
def test_network_gram_and_ngd_against_dense(route, dtype, duplicate):
    model = nn.Sequential(nn.Linear(12, 30), nn.ReLU(), nn.Linear(30, 20), nn.Tanh(),
                          nn.Linear(20, 4))
    rng = np.random.default_rng(10)
    theta = model.init(rng, dtype=dtype)
    X, y = rng.standard_normal((9, 12)), rng.integers(0, 4, 9)
    if duplicate:  # two identical samples: a rank-deficient Gram matrix
        X[5], y[5] = X[2], y[2]
    F = Fisher(model, theta, losses.CrossEntropy(), X, y)
    G = F.gram()
    assert G.dtype == np.float64 and (G == G.T).all()
    assert rel(G, dense_gram64(F)) < 1e-12
    U = F.row_matrix().astype(np.float64)
    g = F.gradient().astype(np.float64)
    for lam in ([1e-3, 1.0] if duplicate else [0.0, 1e-3, 1.0]):
        d = F.natural_gradient(lam)
        if lam == 0:
            ref = np.linalg.lstsq(F.c * U.T @ U, g, rcond=None)[0]
        else:
            ref = np.linalg.solve(F.c * U.T @ U + lam * np.eye(U.shape[1]), g)
        assert rel(d, ref) < (1e-10 if dtype == "float64" else 1e-4)
