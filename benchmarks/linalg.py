"""Benchmark: the host LAPACK entry points refngd chooses between, against the GEMM rate.

    python benchmarks/linalg.py            # Cholesky at R = 576, 1152, 2304; eigh at 257, 513, 1025
    python benchmarks/linalg.py --quick    # R = 1152 and eigh at 513 only, fewer repeats

Issue 22 asks that the Cholesky factorisation of the NGD step and the eigendecompositions
of K-FAC use the best LAPACK entry point available, chosen by measurement.  Cholesky of an
R × R SPD matrix (R³/3 FLOPs), each route copying the matrix first as refngd does:

* ``refngd.backend.lapack`` on NumPy's own OpenBLAS (``dpotrf`` in place, through ctypes);
* SciPy's ``dpotrf`` (a second OpenBLAS with its own thread pool) on the Fortran view;
* ``numpy.linalg.cholesky``.

``eigh`` of K-FAC-like factors (rank 128 plus a shift, and full rank), 4n³ FLOPs counted:
``numpy.linalg.eigh`` (``dsyevd``) and SciPy's ``evd``, ``evr`` drivers.  Each figure is
the best of its repeats, and its rate is compared with a plain n × n GEMM timed in
between; the rounds alternate so that background load spreads over all routes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from _common import blas_info, cpu_model

from refngd.backend import lapack


def best(f, repeats: int) -> float:
    t = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f()
        t = min(t, time.perf_counter() - t0)
    return t


def cholesky_routes(A):
    import scipy.linalg.lapack as sl

    def ours():
        lapack.cholesky_inplace(lapack.lower_copy(A))

    def scipy_potrf():
        M = A.copy()
        sl.dpotrf(M.T, lower=0, clean=0, overwrite_a=1)

    return {"refngd (NumPy's OpenBLAS)": ours, "SciPy dpotrf": scipy_potrf,
            "numpy.linalg.cholesky": lambda: np.linalg.cholesky(A)}


def eigh_routes(M):
    import scipy.linalg

    return {"numpy.linalg.eigh": lambda: np.linalg.eigh(M),
            "SciPy evd": lambda: scipy.linalg.eigh(M, driver="evd", check_finite=False),
            "SciPy evr": lambda: scipy.linalg.eigh(M, driver="evr", check_finite=False)}


def table(title, n, routes, flops, rounds, repeats, rng):
    P, Q = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    times, gemm = {k: float("inf") for k in routes}, float("inf")
    for _ in range(rounds):
        for name, f in routes.items():
            gemm = min(gemm, best(lambda: P @ Q, 2))
            times[name] = min(times[name], best(f, repeats))
    rate = 2 * n ** 3 / gemm
    print(f"{title} (n = {n}; plain {n}x{n} GEMM {rate / 1e9:.1f} GFLOP/s)")
    for name, t in times.items():
        print(f"  {name:<28} {1e3 * t:8.2f} ms {flops / t / 1e9:7.1f} GFLOP/s "
              f"{100 * flops / t / rate:4.0f}% of GEMM")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="one size each, fewer repeats")
    args = p.parse_args(argv)
    rounds, repeats = (2, 3) if args.quick else (3, 5)
    print(f"CPU: {cpu_model()}")
    for line in blas_info():
        print(f"  {line}")
    rng = np.random.default_rng(0)
    for n in ((1152,) if args.quick else (576, 1152, 2304)):
        X = rng.standard_normal((n, n + 10))
        A = X @ X.T / n + 1e-3 * np.eye(n)
        table("Cholesky", n, cholesky_routes(A), n ** 3 / 3, rounds, repeats, rng)
    for n in ((513,) if args.quick else (257, 513, 1025)):
        X = rng.standard_normal((n, 128))
        for kind, M in (("rank 128 + 1e-3 I", X @ X.T + 1e-3 * np.eye(n)),
                        ("full rank", np.cov(rng.standard_normal((n, 2 * n))))):
            table(f"eigh, {kind}", n, eigh_routes(M), 4 * n ** 3, rounds, repeats, rng)


if __name__ == "__main__":
    main()
