"""Benchmark: a K-FAC step against the exact NGD step on a small CNN, and where each spends.

    python benchmarks/kfac_vs_ngd.py            # N = 64, best of 9 interleaved rounds
    python benchmarks/kfac_vs_ngd.py --quick    # best of 3

The model is benchmarks/kfac.py's CNN (3×16×16 input: conv3×3(16)-ReLU-conv3×3/2(32)-
ReLU-Linear(2048, 10), P = 25 578), cross-entropy (mean), float64, λ = 1e-3, N = 64.
Every variant runs once per round, round after round, and the best of the rounds is kept,
so that a busy machine slows all of them alike; only the ratios are meant to be read.

Variants:

* ``updates.ngd``: exact NGD through the R × R Gram matrix (R = 9·N);
* ``updates.kfac``: K-FAC (type-2, expand, Tikhonov damping), forward pass included;
* ``K-FAC, all d × d factors formed``: the same step after also forming every factor
  matrix (``KFAC.factors()``), as K-FAC did before its factors became lazy — the
  Linear(2048, 10) input factor A = (1/N) ĀᵀĀ is 2048 × 2048 from 64 rows, while the
  thin-basis solve needs only the QR of Āᵀ (2048 × 64);

and the phases the two share or do not: the rows' backward pass (K = 9 rows a sample,
both), the gradient's backward pass (K = 1, K-FAC only: NGD writes the gradient in its
rows), K-FAC's factors and solve, NGD's Gram matrix and solve.
"""
from __future__ import annotations

import argparse
import os
import time

from _common import matmul_rate  # benchmarks/_common.py, beside this script
from kfac import problem, small_cnn

from refngd import losses, updates
from refngd.curvature import KFAC, Fisher
from refngd.curvature.kfac_factors import INPUT_FACTORS, fisher_cotangents
from refngd.derivatives import gradient_from


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="best of 3 instead of 9")
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args(argv)
    reps = 3 if args.quick else 9
    model, shape = small_cnn(16)
    loss, lam = losses.CrossEntropy(), 1e-3
    theta, X, y = problem(model, shape, args.batch)
    lin = model.linearize(theta, X)
    cot = fisher_cotangents(loss, lin.outputs, y, "type-2", 1, None)
    g = gradient_from(lin, loss, y)

    def kfac_all_factors():
        K = KFAC(model, theta, loss, X, y, linearization=model.linearize(theta, X))
        K.factors()  # forms every d × d factor matrix
        return K.solve(gradient_from(K.lin, loss, y), lam)

    def kfac_shared_lin():
        INPUT_FACTORS.pop(lin, None)  # the input factors are cached per linearisation
        return KFAC(model, theta, loss, X, y, linearization=lin).solve(g, lam)

    variants = {
        "updates.ngd": lambda: updates.ngd(model, theta, loss, X, y, lam),
        "updates.kfac": lambda: updates.kfac(model, theta, loss, X, y, lam),
        "K-FAC, all d x d factors formed": kfac_all_factors,
        "  forward pass": lambda: model.linearize(theta, X),
        "  rows' backward pass (K = 9)": lambda: lin.backprop(cot),
        "  gradient's backward pass (K = 1)": lambda: gradient_from(lin, loss, y),
        "  K-FAC rows + factors + solve": kfac_shared_lin,
        "  NGD rows + Gram + solve": lambda: Fisher(model, theta, loss, X, y,
                                                    linearization=lin).natural_gradient(lam),
    }
    for f in variants.values():  # warm-up
        f()
    best = dict.fromkeys(variants, float("inf"))
    rate0 = matmul_rate(2)
    for _ in range(reps):
        for name, f in variants.items():
            t0 = time.perf_counter()
            f()
            best[name] = min(best[name], time.perf_counter() - t0)
    rate1 = matmul_rate(2)
    print(f"CNN 3x16x16, P = {model.num_params:,}, N = {args.batch}, CE mean, float64, "
          f"damping {lam}; best of {reps} interleaved rounds; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"plain float64 A @ B: {rate0:.1f} GFLOP/s before, {rate1:.1f} after")
    ngd = best["updates.ngd"]
    print(f"  {'variant':<36} {'ms':>8} {'/ ngd':>7}")
    for name, t in best.items():
        print(f"  {name:<36} {t * 1e3:8.1f} {t / ngd:7.2f}")


if __name__ == "__main__":
    main()
