"""Benchmark: ``refngd.check.infer`` on the docs' MLP and CNN, one fresh search per call.

    python benchmarks/infer.py            # best of 3 per quantity
    python benchmarks/infer.py --quick    # best of 1

The models are docs/validating.md's MLP (Linear(6, 16)-Tanh-Linear(16, 4), N = 32) and
docs/conventions.md's CNN (Conv2d(1, 4, 3, stride 2, padding 1)-ReLU-Flatten-Linear(64, 10)
on 8 × 8 images, N = 32), as torch float64 modules with CrossEntropyLoss.  Each candidate
is refngd's own value under a convention that differs from the defaults in several ways
(empirical Fisher, joint bias, factored damping with π = 1, factors N² × smaller, …), so
that the search must find it; every call builds a new search (nothing cached between
calls; only the module-level table of monomial names is built once per process), i.e. the
time a user waits for one ``check.infer``: "first" is the first call in the process, "best"
the best of the repeats.  The target is ≤ 10 s per call on 2 cores (issue 19).  On a
loaded machine run it with ``OPENBLAS_NUM_THREADS=1``: OpenBLAS's spinning threads, with
PyTorch's beside them, can make a 128 × 180 SVD take a second.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from refngd import check, interop, updates
from refngd.curvature import KFAC


def problems():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(),
                              torch.nn.Linear(16, 4)).double()
    Xm, ym = rng.standard_normal((32, 6)), rng.integers(0, 4, 32)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 10)).double()
    Xc, yc = rng.standard_normal((32, 1, 8, 8)), rng.integers(0, 10, 32)
    return {"MLP 6-16-4": (mlp, Xm, ym), "CNN conv(1,4)-linear(64,10)": (cnn, Xc, yc)}


def candidates(net, X, y, lam):
    """(quantity, candidate, damping) triples, each a convention infer has to find."""
    model, theta = interop.from_torch(net)
    loss = interop.from_torch_loss(torch.nn.CrossEntropyLoss())
    N = len(X)
    base = (model, theta, loss, X, y)
    K = KFAC(*base, fisher_type="empirical", bias="joint")
    names = [n.rsplit(".", 1)[0] for n, _ in net.named_parameters() if n.endswith("weight")]
    fac = {f"{n}.{s}": getattr(f, s) * (N ** 2 if s == "G" else 1.0)
           for f, n in zip(K.factors(), names) for s in "AG"}
    return [
        ("kfac_factors", fac, None),
        ("kfac", KFAC(*base, convention="tutorial").dense() * 0.01, None),
        ("kfac_update", N ** 2 * updates.kfac(*base, N ** 2 * lam, fisher_type="empirical",
                                              bias="joint", damping_mode="factored", pi=1.0),
         lam),
        ("ekfac_update", updates.ekfac(*base, lam, damping_mode="per-factor"), lam),
        ("ngd_update", updates.ngd(*base, N * lam), lam),
        ("ef_update", updates.ef(*base, lam, form="tikhonov"), lam),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="best of 1 instead of 3")
    args = p.parse_args(argv)
    reps = 1 if args.quick else 3
    ce = torch.nn.CrossEntropyLoss()
    print(f"check.infer, best of {reps}, torch threads {torch.get_num_threads()}")
    for title, (net, X, y) in problems().items():
        P = sum(q.numel() for q in net.parameters())
        print(f"\n{title} (P = {P}, N = {len(X)})")
        for quantity, cand, lam in candidates(net, X, y, 1e-2):
            times, report = [], None
            for _ in range(reps):
                t0 = time.perf_counter()
                report = check.infer(net, ce, X, y, quantity, cand, damping=lam)
                times.append(time.perf_counter() - t0)
            print(f"  {quantity:13s} first {times[0]:7.3f} s  best {min(times):7.3f} s  "
                  f"passed={report.passed}  {report.convention}")


if __name__ == "__main__":
    main()
