"""Benchmark: frozen parameters cost no row work (docs/subsets.md).

    python benchmarks/frozen_rows.py            # LoRA(1024→1024, r=8)-1024-10, batch 128
    python benchmarks/frozen_rows.py --quick    # widths 256, batch 32

One exact damped NGD direction (``updates.ngd``: forward pass, one backward pass of the
Fisher's rows and the gradient's, the Gram matrix, one Cholesky, one Uᵀ·w) on three
parameter subsets of the same network:

* ``all``: every parameter (the LoRA base W₀ included);
* ``peft``: the LoRA adapters A, B only (``peft_mask``) — the two wide Linear layers
  above are back-propagated through but contribute no row work;
* ``last``: the last layer only — no backward pass at all.

Printed per subset: |S|, the Gram FLOPs summed over the row records the backward pass
produced (R²·d_out + N²·d_in per Linear view, the two products of docs/design.md §4), the
best wall time of the row work alone (backward pass of the rows and the Gram matrix, on a
forward pass done once) and of the whole NGD direction (which adds the forward pass and the
R × R Cholesky, the same for every subset).  No assertion: the numbers are for the docs.
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import best_time  # benchmarks/_common.py, beside this script

from refngd import losses, nn, updates
from refngd.curvature import Fisher
from refngd.subsets import peft_mask


def model_and_data(width: int, N: int, rank: int = 8, C: int = 10, seed: int = 0):
    model = nn.Sequential(nn.LoRALinear(width, width, rank, 2.0 * rank), nn.ReLU(),
                          nn.Linear(width, width), nn.ReLU(), nn.Linear(width, C))
    rng = np.random.default_rng(seed)
    theta = model.init(rng)
    theta += 0.01 * rng.standard_normal(theta.shape)  # B ≠ 0
    X = rng.standard_normal((N, width))
    y = rng.integers(0, C, N)
    return model, theta, X, y


def gram_flops(rows) -> int:
    """Σ over the row records of R²·d_out + N²·d_in (Linear views: one triangle, 2 FLOPs/MAC)."""
    total = 0
    for e in rows.layers:
        d_out, d_in = e.layer.param_shapes[0]
        total += rows.R ** 2 * d_out + rows.N ** 2 * d_in
    return total


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    width, N = (256, 32) if args.quick else (1024, 128)
    model, theta, X, y = model_and_data(width, N)
    loss = losses.CrossEntropy()
    subsets = {"all": "all", "peft": peft_mask(model), "last": [4]}
    print(f"LoRA({width}->{width}, r=8) - ReLU - Linear({width}, {width}) - ReLU - Linear({width}, 10), "
          f"batch {N}, P = {model.num_params}")
    lin = model.linearize(theta, X)
    print(f"{'subset':>6} {'|S|':>9} {'row records':>12} {'Gram GFLOP':>11} {'rows+Gram':>10} "
          f"{'NGD time':>9}")
    for name, params in subsets.items():
        F = Fisher(model, theta, loss, X, y, params=params, linearization=lin)
        flops = gram_flops(F._joint)
        t_rows = best_time(lambda: Fisher(model, theta, loss, X, y, params=params,
                                          linearization=lin).gram(), args.repeats)
        t = best_time(lambda: updates.ngd(model, theta, loss, X, y, 1e-3, params=params), args.repeats)
        print(f"{name:>6} {F.num_params:>9} {len(F.rows.layers):>12} {flops / 1e9:>11.3f} "
              f"{t_rows:>9.3f}s {t:>8.3f}s")


if __name__ == "__main__":
    main()
