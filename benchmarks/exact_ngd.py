"""Benchmark: exact NGD, EF, iEF and SF directions through the Gram route.

    python benchmarks/exact_ngd.py            # full run (about a minute on 2 cores)
    python benchmarks/exact_ngd.py --quick    # smaller sizes

Model: MLP 784-1024-1024-10 (ReLU, ≈1.86 M parameters), batch 128, cross-entropy, float64.
Every timing is the best of several repeats of a whole update computed from scratch
(forward pass included).  Printed next to each: its FLOP count and the GFLOP/s reached,
beside a plain float64 ``A @ B`` measured in the same run; then the Gram route against a
materialised Jacobian on a width where U (R × P) still fits in memory, and how the NGD
time grows with batch size and width.
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import (allocator_option, apply_allocator_option, best_time,  # beside this
                     matmul_rate, mlp, ngd_flops)                          # script

from refngd import losses, updates
from refngd.curvature import Fisher
from refngd.backend import PSDFactor, get_backend, to_device, to_numpy
from refngd.derivatives import gradient_from


BACKEND = "numpy"  # set by --backend


def problem(widths, N, seed=0):
    rng = np.random.default_rng(seed)
    model = mlp(widths)
    theta = model.init(rng, backend=BACKEND)
    X = to_device(rng.standard_normal((N, widths[0])), like=theta)
    y = to_device(rng.integers(0, widths[-1], N), like=theta)
    return model, theta, X, y


def methods(model, theta, loss, X, y, lam):
    return {
        "ngd": lambda: updates.ngd(model, theta, loss, X, y, lam),
        "ef": lambda: updates.ef(model, theta, loss, X, y, lam, form="tikhonov"),
        "ief": lambda: updates.ief(model, theta, loss, X, y, lam, form="tikhonov"),
        "sf (K=1)": lambda: updates.sf(model, theta, loss, X, y, lam, mc_samples=1, rng=0),
    }


def materialised_ngd(model, theta, loss, X, y, lam):
    """The same NGD direction through an explicit U (R × P): U Uᵀ by one GEMM."""
    lin = model.linearize(theta, X)
    F = Fisher(model, theta, loss, X, y, linearization=lin)
    g = gradient_from(lin, loss, y)
    U = F.row_matrix()
    K = U @ U.T
    w = PSDFactor(K, shift=lam / F.c).solve(U @ g)
    return (g - U.T @ w) / lam


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="array module: cupy runs everything on the GPU")
    allocator_option(p)
    args = p.parse_args(argv)
    allocator = apply_allocator_option(args)
    global BACKEND
    BACKEND = args.backend
    reps = 3 if args.quick else 7
    lam = 1e-3
    loss = losses.CrossEntropy()
    width, N = (512, 64) if args.quick else (1024, 128)
    widths = [784, width, width, 10]

    rate = matmul_rate(reps, get_backend(args.backend))
    print(f"backend: {args.backend}; {allocator}")
    print(f"plain float64 A @ B (1280x1024 @ 1024x1024): {rate:.1f} GFLOP/s\n")

    model, theta, X, y = problem(widths, N)
    print(f"MLP {'-'.join(map(str, widths))} ({model.num_params:,} parameters), batch {N}, "
          f"CE, float64, damping {lam}")
    print(f"{'method':<10} {'seconds':>9}")
    times = {}
    for name, f in methods(model, theta, loss, X, y, lam).items():
        times[name] = best_time(f, reps)
        print(f"{name:<10} {times[name]:9.4f}")
    fl = ngd_flops(widths, N, widths[-1])
    print(f"ngd: {fl / 1e9:.2f} GFLOP -> {fl / times['ngd'] / 1e9:.1f} GFLOP/s "
          f"({100 * fl / times['ngd'] / 1e9 / rate:.0f}% of A @ B)\n")

    # Gram route vs materialised Jacobian, on a width where U fits in memory.
    mw = 128 if args.quick else 256
    mwidths = [784, mw, mw, 10]
    model2, theta2, X2, y2 = problem(mwidths, N)
    R = N * (mwidths[-1] - 1)  # the CE Fisher has C − 1 rows per sample
    print(f"Gram route vs materialised U: MLP {'-'.join(map(str, mwidths))} "
          f"({model2.num_params:,} parameters), batch {N}: U is {R} x {model2.num_params} "
          f"({R * model2.num_params * 8 / 2**30:.2f} GiB)")
    d_gram = updates.ngd(model2, theta2, loss, X2, y2, lam)
    d_mat = materialised_ngd(model2, theta2, loss, X2, y2, lam)
    err = float(np.abs(to_numpy(d_gram - d_mat)).max() / np.abs(to_numpy(d_mat)).max())
    t_gram = best_time(lambda: updates.ngd(model2, theta2, loss, X2, y2, lam), reps)
    t_mat = best_time(lambda: materialised_ngd(model2, theta2, loss, X2, y2, lam), max(1, reps // 3))
    print(f"  gram {t_gram:.4f} s   materialised {t_mat:.4f} s   ratio {t_mat / t_gram:.1f}x   "
          f"(max relative difference {err:.1e})\n")

    print("NGD time against batch size (width %d):" % width)
    print(f"{'batch':>6} {'R':>6} {'seconds':>9} {'GFLOP/s':>8}")
    for n in ([16, 32, 64, 128] if args.quick else [32, 64, 128, 256, 512]):
        m, th, Xn, yn = problem(widths, n)
        t = best_time(lambda: updates.ngd(m, th, loss, Xn, yn, lam), max(1, reps // 2))
        print(f"{n:>6} {n * 9:>6} {t:9.4f} {ngd_flops(widths, n, 10) / t / 1e9:8.1f}")
    print(f"\nNGD time against width (batch {N}):")
    print(f"{'width':>6} {'params':>10} {'seconds':>9} {'GFLOP/s':>8}")
    for w in ([128, 256, 512] if args.quick else [256, 512, 1024, 2048]):
        ww = [784, w, w, 10]
        m, th, Xn, yn = problem(ww, N)
        t = best_time(lambda: updates.ngd(m, th, loss, Xn, yn, lam), max(1, reps // 2))
        print(f"{w:>6} {m.num_params:>10,} {t:9.4f} {ngd_flops(ww, N, 10) / t / 1e9:8.1f}")


if __name__ == "__main__":
    main()
