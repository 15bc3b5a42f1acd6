"""Benchmark: per-sample Jacobians and gradients, explicit layers vs HIPS autograd.

    python benchmarks/per_sample.py            # MLP 784-128-10, batch 64 (about a minute)
    python benchmarks/per_sample.py --quick    # MLP 784-32-10, batch 16

Model: MLP 784-128-10 (ReLU), batch 64, cross-entropy, float64.  Side by side in one run:

* Jacobian: ``refngd.jacobian`` (explicit row back-propagation, one pass with the N·C
  identity rows) against ``autograd.jacobian`` of f(θ, X) with respect to θ, the same
  network written in ``autograd.numpy`` (one reverse pass per output entry, N·C in all);
* per-sample gradients: ``refngd.per_sample_gradients`` against ``autograd.jacobian`` of
  the vector of per-sample losses (l_1, ..., l_N) with respect to θ (N reverse passes).

Every time is the best of ``--repeats`` runs (``time.perf_counter``) after one warm-up,
forward pass included.  The script checks that both routes give the same numbers and
prints the largest absolute difference.
"""
from __future__ import annotations

import argparse
import time

import autograd
import autograd.numpy as anp
import numpy as np
from autograd.scipy.special import logsumexp

import refngd
from _common import mlp  # benchmarks/_common.py, beside this script
from refngd import losses


def best_time(f, repeats: int):
    """(best seconds over ``repeats`` calls after a warm-up, last result)."""
    out = f()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def autograd_mlp(widths):
    """f(θ, X) for a ReLU MLP, θ in PyTorch's parameters_to_vector order."""

    def f(theta, X):
        i, a = 0, X
        for l, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            W = anp.reshape(theta[i:i + d_in * d_out], (d_out, d_in))
            i += d_in * d_out
            a = anp.dot(a, W.T) + theta[i:i + d_out]
            i += d_out
            if l < len(widths) - 2:
                a = anp.maximum(a, 0.0)
        return a

    return f


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller network and batch, fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5, 3 with --quick)")
    args = p.parse_args(argv)
    widths, N = ([784, 32, 10], 16) if args.quick else ([784, 128, 10], 64)
    repeats = args.repeats or (3 if args.quick else 5)

    rng = np.random.default_rng(0)
    model = mlp(widths)
    theta = model.init(rng)
    X = rng.standard_normal((N, widths[0]))
    y = rng.integers(0, widths[-1], N)
    loss = losses.CrossEntropy()
    f = autograd_mlp(widths)

    def per_sample_losses(t):
        Z = f(t, X)
        return logsumexp(Z, axis=1) - Z[np.arange(N), y]

    jac_ad = autograd.jacobian(lambda t: f(t, X))
    psg_ad = autograd.jacobian(per_sample_losses)

    print(f"MLP {'-'.join(map(str, widths))} (ReLU, {model.num_params:,} parameters), batch {N}, "
          f"cross-entropy, float64; best of {repeats}")
    rows = []
    t_ex, J = best_time(lambda: refngd.jacobian(model, theta, X), repeats)
    t_ad, J_ad = best_time(lambda: jac_ad(theta), repeats)
    err_J = float(np.abs(J - J_ad).max())
    rows.append(("jacobian (N, C, P)", t_ex, t_ad, err_J, float(np.abs(J_ad).max())))
    del J, J_ad

    t_ex, G = best_time(lambda: refngd.per_sample_gradients(model, theta, loss, X, y), repeats)
    t_ad, G_ad = best_time(lambda: psg_ad(theta), repeats)
    err_G = float(np.abs(G - G_ad).max())
    rows.append(("per-sample grads (N, P)", t_ex, t_ad, err_G, float(np.abs(G_ad).max())))

    print(f"{'quantity':<24} {'refngd s':>10} {'autograd s':>11} {'ratio':>7} {'max|diff|':>10}")
    for name, te, ta, err, _ in rows:
        print(f"{name:<24} {te:10.4f} {ta:11.4f} {ta / te:6.1f}x {err:10.2e}")
    print("ratio = autograd seconds / refngd seconds")
    for name, _, _, err, scale in rows:
        assert err <= 1e-10 * max(scale, 1.0), f"{name}: results disagree (max abs diff {err:.3e})"


if __name__ == "__main__":
    main()
