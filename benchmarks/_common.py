"""Helpers shared by the benchmark scripts: best-of-n wall time, the GEMM rate, the MLP."""
from __future__ import annotations

import time

import numpy as np


def synchronize() -> None:
    """Wait for queued GPU work (CuPy launches asynchronously); nothing without CuPy."""
    try:
        import cupy
    except ImportError:
        return
    if cupy.cuda.runtime.getDeviceCount() > 0:
        cupy.cuda.Device().synchronize()


def best_time(f, repeats: int, setup=None) -> float:
    """Best wall time of ``f()`` (or ``f(setup())``, setup untimed) over ``repeats`` runs
    after one warm-up; GPU work is waited for inside the timed region."""
    best = float("inf")
    for i in range(repeats + 1):
        arg = setup() if setup is not None else None
        synchronize()
        t0 = time.perf_counter()
        f(arg) if setup is not None else f()
        synchronize()
        if i:
            best = min(best, time.perf_counter() - t0)
    return best


def matmul_rate(repeats: int, xp=np) -> float:
    """GFLOP/s of a plain float64 (1280 × 1024) @ (1024 × 1024) product (on ``xp``'s device)."""
    rng = np.random.default_rng(1)
    A, B = xp.asarray(rng.standard_normal((1280, 1024))), xp.asarray(rng.standard_normal((1024, 1024)))
    return 2 * 1280 * 1024 * 1024 / best_time(lambda: A @ B, repeats) / 1e9


def mlp(widths):
    """``Sequential`` of Linear layers with ReLU between them, e.g. [784, 1024, 1024, 10]."""
    from refngd import nn

    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)
