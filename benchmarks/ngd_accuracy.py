"""Accuracy of the exact natural gradient against damping: row-space route vs Woodbury.

MLP 5-8-3 (tanh, cross-entropy mean, N = 6, P = 75, R = 12).  The reference takes the
float64 network's Jacobians and outputs as exact and does everything else in 90-digit
mpmath arithmetic (as ``tests/test_ground_truth.py``); λ = 0 is the pseudo-inverse
solution.  Prints the relative error of

* ``Fisher.natural_gradient`` (= ``updates.ngd``): Uᵀ(K + λ/c I)⁻¹a, the row-space route;
* ``Fisher.solve(g, λ)``: the Woodbury route for an arbitrary vector, applied to the same g.

    python benchmarks/ngd_accuracy.py
"""
from __future__ import annotations

import os
import sys

import mpmath
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
import test_ground_truth as reference  # noqa: E402  (the 90-digit reference of the tests)

from refngd import nn  # noqa: E402
from refngd.curvature import Fisher  # noqa: E402
from refngd.losses import CrossEntropy  # noqa: E402


def main() -> None:
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    theta = model.init(rng)
    X, y = rng.normal(size=(6, 5)), rng.integers(0, 3, 6)
    loss = CrossEntropy()
    with mpmath.workdps(reference.DPS):
        F_ref, g_ref = reference._reference_system(model, theta, loss, X, y)
    F = Fisher(model, theta, loss, X, y)
    g = F.gradient()
    print(f"MLP 5-8-3, N = 6, P = {theta.size}, R = {F.rows.R}; relative error against "
          f"{reference.DPS}-digit mpmath")
    print(f"{'damping':>8}  {'row space':>10}  {'Woodbury':>10}")
    for lam in (1e-2, 1e-7, 1e-10, 1e-12, 1e-14, 1e-16, 0.0):
        ref = reference._reference_solve(F_ref, g_ref, lam)
        row = reference._rel(F.natural_gradient(lam), ref)
        wood = reference._rel(F.solve(g, lam), ref)
        print(f"{lam:8.0e}  {row:10.1e}  {wood:10.1e}")


if __name__ == "__main__":
    main()
