"""Helpers shared by the benchmark scripts: best-of-n wall time, the GEMM rate, the MLP."""
from __future__ import annotations

import time

import numpy as np


def synchronize() -> None:
    """Wait for queued GPU work (CuPy and, when imported, PyTorch launch asynchronously)."""
    import sys

    try:
        import cupy
    except ImportError:
        cupy = None
    if cupy is not None and cupy.cuda.runtime.getDeviceCount() > 0:
        cupy.cuda.Device().synchronize()
    torch = sys.modules.get("torch")  # never imported here just to wait for it
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()


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


def matmul_rate(repeats: int, xp=np, m: int = 1280, k: int = 1024, n: int = 1024) -> float:
    """GFLOP/s of a plain float64 (m × k) @ (k × n) product (on ``xp``'s device)."""
    rng = np.random.default_rng(1)
    A, B = xp.asarray(rng.standard_normal((m, k))), xp.asarray(rng.standard_normal((k, n)))
    return 2 * m * k * n / best_time(lambda: A @ B, repeats) / 1e9


def ngd_flop_parts(widths, N: int, C: int) -> dict:
    """FLOPs of each stage of refngd's exact NGD step for an MLP with CE (multiply-add = 2).

    R = N(C − 1) rows, the CE Fisher's exact factor, in which the gradient is written
    (g = Uᵀ(c·a), no gradient row): the forward pass; the rows through layers 2..L
    (W_lᵀ b); one Gram syrk of R rows per layer (R²·d_out, one triangle) and the N × N
    input Grams; the Cholesky of R × R (R³/3); the two triangular solves (2R²); and Uᵀw,
    a pass of N rows through the weight GEMMs.
    """
    R = N * (C - 1)
    d_in = np.array(widths[:-1], float) + 1  # the bias column
    d_out = np.array(widths[1:], float)
    return {"forward": 2 * N * (d_in * d_out).sum(),
            "rows backward": 2 * R * (np.array(widths[1:-1], float) * d_out[1:]).sum(),
            "Gram": (R * R * d_out).sum() + (N * N * d_in).sum(),
            "Cholesky": R ** 3 / 3,
            "solve": 2.0 * R * R,
            "U^T w": 2 * N * (d_in * d_out).sum()}


def ngd_flops(widths, N: int, C: int) -> float:
    """FLOPs of refngd's exact NGD step for an MLP with CE: the sum of :func:`ngd_flop_parts`."""
    return float(sum(ngd_flop_parts(widths, N, C).values()))


def cpu_model() -> str:
    """The CPU's model name and its widest x86 vector extension (from /proc/cpuinfo)."""
    import platform

    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and name in ("", platform.machine()):
                    name = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                          ("avx", "AVX")) if flag in flags), None)
    import os

    return f"{name}, {os.cpu_count()} logical CPUs" + (f", {isa}" if isa else "")


def blas_info() -> list[str]:
    """One line per BLAS/OpenMP library loaded (threadpoolctl): API, kernel, threads.

    Also says which host LAPACK route refngd's Cholesky takes and whether
    ``OPENBLAS_CORETYPE`` overrides OpenBLAS's kernel choice.
    """
    import os

    from refngd.backend import lapack as linalg

    lines = []
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        lines.append("threadpoolctl not installed: BLAS kernel unknown (pip install threadpoolctl)")
    else:
        for d in threadpool_info():
            lines.append(f"{d.get('internal_api')} {d.get('version') or ''} "
                         f"kernel={d.get('architecture', '-')} threads={d.get('num_threads')} "
                         f"({os.path.basename(d.get('filepath', ''))})")
    lines.append(f"refngd host LAPACK route: {linalg.route()}; OPENBLAS_CORETYPE="
                 f"{os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    return lines


def allocator_option(parser) -> None:
    """``--keep-freed-memory``: :func:`refngd.memory.keep_freed_memory` before timing."""
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="let glibc keep freed memory for reuse (refngd.memory."
                             "keep_freed_memory) — fewer page faults on fresh temporaries")


def apply_allocator_option(args) -> str:
    from refngd.memory import keep_freed_memory

    if getattr(args, "keep_freed_memory", False):
        return "malloc keeps freed memory" if keep_freed_memory() else "keep_freed_memory: not applied"
    return "default malloc settings"


def mlp(widths):
    """``Sequential`` of Linear layers with ReLU between them, e.g. [784, 1024, 1024, 10]."""
    from refngd import nn

    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def best_in_blocks(fns: dict, blocks: int, per_block: int) -> dict:
    """Best wall time of each ``fns[name]()``, timed in alternating blocks.

    Every function runs ``per_block`` times in a row (after one untimed call), then the
    next function, for ``blocks`` rounds.  Runs in a row keep each library's thread pool
    warm — switching between NumPy's OpenBLAS and PyTorch's OpenMP after every call makes
    each wait for the other's spinning threads on a 2-core machine — and the rounds spread
    background load over all functions alike.
    """
    best = {name: float("inf") for name in fns}
    for _ in range(blocks):
        for name, f in fns.items():
            synchronize()
            f()
            for _ in range(per_block):
                synchronize()
                t0 = time.perf_counter()
                f()
                synchronize()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best
