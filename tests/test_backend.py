"""refngd.backend: the array-module rule, dtype checks and the PSD linear-algebra shims.

The first test keeps the CuPy path honest on machines without a GPU (docs/design.md §5): a
compute module that imports NumPy directly would silently pull CuPy arrays to the host
(or fail), so compute modules must derive ``xp = namespace(...)`` from their inputs.
"""
from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.special

import refngd
from refngd import backend
from refngd.backend import (
    PSDFactor,
    SingularSystemError,
    check_damping,
    check_float_array,
    namespace,
    psd_solve,
)

PACKAGE_DIR = Path(refngd.__file__).resolve().parent

# Modules (paths relative to refngd/) that MAY import NumPy directly.  Everything else
# under refngd/ is a compute module and must get its array module from its inputs.
NUMPY_ALLOWED = frozenset({
    "backend/__init__.py",  # the one place that knows about both NumPy and CuPy
    "backend/lapack.py",    # host LAPACK through ctypes: NumPy arrays only (never CuPy's)
    "cli.py",            # command line: host-side argument parsing and I/O
    "__main__.py",       # `python -m refngd` entry point
    "optim/train.py",    # training loop driver: host-side logging and bookkeeping
    "optim/records.py",        # saving / loading results files (host I/O)
    "experiments/plots.py",    # matplotlib figures (host only)
    "experiments/data.py",     # data set loading and preprocessing on the host
    "experiments/units.py",    # exact byte encoding of results for storage and transport (host)
    "check/report.py",         # validation reports: candidates are judged on the host in float64
    "check/files.py",          # `refngd check`: reading .npz / .json / state_dict files on the host
    "check/torch_trace.py",    # PyTorch import: the example batch's shape and the import's check
                               # against PyTorch's own forward, on the host
    # check.infer: refngd's values (computed through the backend) copied to the host, where the
    # scalars and dampings are fitted and named in float64, as report.py judges candidates
    "check/infer.py", "check/infer_damping.py", "check/infer_report.py", "check/infer_search.py",
    "check/infer_options.py", "check/infer_update.py", "check/infer_blocks.py",
})


def numpy_imports(source: str, filename: str = "<src>") -> list[str]:
    """Every place in ``source`` that imports numpy (or a numpy submodule), as text."""
    hits = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            hits += [f"line {node.lineno}: import {a.name}" for a in node.names
                     if a.name == "numpy" or a.name.startswith("numpy.")]
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 0 and (mod == "numpy" or mod.startswith("numpy.")):
                hits.append(f"line {node.lineno}: from {mod} import ...")
        elif isinstance(node, ast.Call):  # __import__("numpy"), importlib.import_module("numpy")
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if name in ("__import__", "import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and \
                        (arg.value == "numpy" or arg.value.startswith("numpy.")):
                    hits.append(f"line {node.lineno}: {name}({arg.value!r})")
    return hits


def compute_modules() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py")
                  if p.relative_to(PACKAGE_DIR).as_posix() not in NUMPY_ALLOWED)


def test_no_direct_numpy_in_compute_modules():
    files = compute_modules()
    names = {p.relative_to(PACKAGE_DIR).as_posix() for p in files}
    # the scan really covers the compute modules
    assert {"derivatives.py", "rows.py", "nn/linear.py", "nn/sequential.py"} <= names
    assert "backend/__init__.py" not in names
    offenders = {}
    for path in files:
        hits = numpy_imports(path.read_text(encoding="utf-8"), str(path))
        if hits:
            offenders[path.relative_to(PACKAGE_DIR).as_posix()] = hits
    assert not offenders, (
        "compute modules must not import numpy; use `xp = refngd.backend.namespace(...)` "
        f"(or add a host-side I/O module to NUMPY_ALLOWED with a reason): {offenders}"
    )


@pytest.mark.parametrize("src,flagged", [
    ("import numpy as np", True),
    ("import numpy", True),
    ("import numpy.linalg as la", True),
    ("from numpy import linalg", True),
    ("from numpy.random import default_rng", True),
    ("def f():\n    import numpy as np\n    return np", True),
    ("np = __import__('numpy')", True),
    ("import importlib\nnp = importlib.import_module('numpy')", True),
    ("import autograd.numpy as anp", False),
    ("from autograd import numpy as anp", False),
    ("from .backend import namespace", False),
    ("from . import numpy_helpers", False),
    ("import numpyro", False),
    ("x = 'import numpy'", False),
])
def test_numpy_import_detector(src, flagged):
    assert bool(numpy_imports(src)) is flagged


# ---------------------------------------------------------------- namespace & checks
def test_namespace_numpy():
    a = np.ones(3)
    assert namespace(a) is np
    assert namespace(a, np.zeros((2, 2), dtype=np.float32)) is np
    assert namespace(a, None, 1.0, 2) is np
    assert namespace() is np
    assert namespace(None) is np
    assert backend.get_backend("numpy") is np
    with pytest.raises(ValueError, match="unknown backend 'torch'"):
        backend.get_backend("torch")


@pytest.mark.skipif(backend._cupy is not None, reason="CuPy is installed")
def test_cupy_backend_without_cupy():
    with pytest.raises(ImportError, match=r"needs CuPy: pip install 'refngd\[gpu\]'"):
        backend.get_backend("cupy")


def test_host_conversions():
    a = np.arange(3.0)
    assert backend.to_numpy(a) is a
    assert backend.to_device([1.0, 2.0], like=a).dtype == np.float64
    assert backend.to_float(np.array(2.5)) == 2.5
    assert not backend.is_cupy(a)


def test_check_float_array():
    a = np.ones((2, 3), dtype=np.float32)
    assert check_float_array("a", a, ndim=2) is a
    with pytest.raises(ValueError, match=r"a must be 1-dimensional, got shape \(2, 3\)"):
        check_float_array("a", a, ndim=1)
    with pytest.raises(TypeError, match="a has dtype int64"):
        check_float_array("a", np.ones(2, dtype=np.int64))
    b = np.array([1.0, np.nan])
    with pytest.raises(ValueError, match="a contains NaN or Inf"):
        check_float_array("a", b)
    assert check_float_array("a", b, finite=False) is b


@pytest.mark.parametrize("bad", [-1e-12, -1.0, float("nan"), float("inf"), -float("inf")])
def test_check_damping_rejects(bad):
    with pytest.raises(ValueError, match="damping must be finite and >= 0"):
        check_damping(bad)


def test_check_damping_accepts():
    assert check_damping(0) == 0.0 and isinstance(check_damping(0), float)
    assert check_damping(np.float32(0.5)) == 0.5
    assert check_damping(np.array(1e-3)) == 1e-3
    with pytest.raises(ValueError, match="damping must be > 0 here"):
        check_damping(0.0, allow_zero=False)
    for bad in ("0.1", None, [0.1], True):
        with pytest.raises(TypeError, match="damping must be a real number"):
            check_damping(bad)


def test_erf():
    x = np.linspace(-4, 4, 41)
    np.testing.assert_allclose(backend.erf(x), [math.erf(v) for v in x], rtol=1e-14, atol=1e-16)
    np.testing.assert_array_equal(backend.erf(x), scipy.special.erf(x))


# ---------------------------------------------------------------- psd_solve
def spd(n, seed=0, cond=1e3):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    w = np.geomspace(1.0, cond, n) if n > 1 else np.ones(1)
    return (Q * w) @ Q.T


def psd_rank(n, r, seed=0):
    G = np.random.default_rng(seed).standard_normal((n, r))
    return G @ G.T


def rel(a, b):
    return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("n", [1, 2, 5, 40])
@pytest.mark.parametrize("bshape", ["vector", "matrix"])
def test_psd_solve_spd_equals_numpy(n, bshape):
    A = spd(n, seed=n)
    rng = np.random.default_rng(n + 1)
    B = rng.standard_normal(n) if bshape == "vector" else rng.standard_normal((n, 3))
    X = psd_solve(A, B)
    assert X.shape == B.shape and X.dtype == np.float64
    assert rel(X, np.linalg.solve(A, B)) < 1e-10
    # with a shift
    X = psd_solve(A, B, shift=0.7)
    assert rel(X, np.linalg.solve(A + 0.7 * np.eye(n), B)) < 1e-10


def test_psd_solve_works_in_float64_for_float32_input():
    A = spd(6, seed=3).astype(np.float32)
    B = np.ones(6, dtype=np.float32)
    X = psd_solve(A, B)
    assert X.dtype == np.float64
    assert rel(X, np.linalg.solve(A.astype(np.float64), B.astype(np.float64))) < 1e-10


@pytest.mark.parametrize("A", [psd_rank(6, 3), np.zeros((4, 4)), np.diag([1.0, 1.0, 0.0])],
                         ids=["rank3of6", "zero", "diag_with_zero"])
def test_psd_solve_singular_without_shift_raises(A):
    B = np.ones(A.shape[0])
    with pytest.raises(SingularSystemError, match=r"singular .*pass damping > 0"):
        psd_solve(A, B)
    with pytest.raises(np.linalg.LinAlgError):  # SingularSystemError is a LinAlgError
        psd_solve(A, B, shift=0.0)


def test_psd_solve_tiny_shift_still_singular():
    A = psd_rank(6, 3, seed=1)
    with pytest.raises(SingularSystemError, match="pass damping > 0"):
        psd_solve(A, np.ones(6), shift=1e-18)


def _spy_eigh(monkeypatch):
    calls = []
    real = backend.eigh_psd

    def spy(A):
        calls.append(A.shape)
        return real(A)

    monkeypatch.setattr(backend, "eigh_psd", spy)
    return calls


@pytest.mark.parametrize("bshape", ["vector", "matrix"])
def test_psd_solve_eigh_fallback_forced(monkeypatch, bshape):
    """Cholesky disabled: the eigh route solves (A + shift·I) X = B on a singular PSD A."""
    A = psd_rank(7, 3, seed=2)
    rng = np.random.default_rng(5)
    B = rng.standard_normal(7) if bshape == "vector" else rng.standard_normal((7, 2))
    expected = np.linalg.solve(A + 0.3 * np.eye(7), B)
    X_chol = psd_solve(A, B, shift=0.3)
    calls = _spy_eigh(monkeypatch)
    monkeypatch.setattr(backend, "_cholesky_stats", lambda M, A=None: (None, None))
    X = psd_solve(A, B, shift=0.3)
    assert calls, "the eigh fallback was not used"
    assert X.shape == B.shape
    assert rel(X, expected) < 1e-10
    assert rel(X, X_chol) < 1e-10
    # factor once, solve many times, on the eigh route
    F = PSDFactor(A, shift=0.3)
    assert F.L is None
    assert rel(F.solve(B), expected) < 1e-10


def test_psd_solve_eigh_fallback_natural(monkeypatch):
    """A shift so small that Cholesky's pivot test rejects it, yet the system is solvable."""
    A = np.diag([2.0, 1.0, 0.0])
    s = 5e-15  # pivot √s ≈ 7e-8 < 1e-7·max pivot, eigenvalue s > n·eps·max
    calls = _spy_eigh(monkeypatch)
    X = psd_solve(A, np.ones(3), shift=s)
    assert calls, "expected the eigh fallback"
    np.testing.assert_allclose(X, 1.0 / (np.diag(A) + s), rtol=1e-12)


def test_psd_solve_cholesky_route_for_spd(monkeypatch):
    calls = _spy_eigh(monkeypatch)
    psd_solve(spd(5), np.ones(5))
    assert not calls


def test_cholesky_helper():
    A = spd(4, seed=9)
    L = backend.cholesky(A)
    np.testing.assert_allclose(L @ L.T, A, rtol=1e-12)
    assert np.allclose(L, np.tril(L))
    assert backend.cholesky(psd_rank(5, 2)) is None
    assert backend.cholesky(-np.eye(3)) is None
    w, V = backend.eigh_psd(psd_rank(5, 2))
    assert (w >= 0).all()
    np.testing.assert_allclose((V * w) @ V.T, psd_rank(5, 2), atol=1e-12)


def test_solve_scaled_keeps_tiny_systems_representable():
    """A ~ 1e-260, B ~ 1e130: (A)⁻¹B ~ 1e390 overflows; σ·A⁻¹B with σ = 2^k ≈ √max A_ii
    does not, and equals the well-scaled solve exactly scaled (powers of two)."""
    A0, b0 = spd(5, seed=3), np.random.default_rng(4).standard_normal(5)
    for shift in (0.0, 1e-300):
        fac = PSDFactor(A0 * 1e-260, shift=shift)
        x, s = fac.solve_scaled(b0 * 1e130)
        assert np.all(np.isfinite(x)) and s == 2.0 ** round(np.log2(s))
        # σ·A⁻¹B = σ·1e390·A0⁻¹b0 (shift 1e-300 is negligible against A ~ 1e-260)
        expect = np.linalg.solve(A0, b0) * (s * 1e260) * 1e130
        np.testing.assert_allclose(x, expect, rtol=1e-12)
    x, s = PSDFactor(A0).solve_scaled(b0)  # well scaled: the plain solve
    assert s == 1.0
    np.testing.assert_allclose(x, np.linalg.solve(A0, b0), rtol=1e-12)
