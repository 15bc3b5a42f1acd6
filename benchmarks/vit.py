"""Benchmark: exact NGD on the tiny ViT of examples/tiny_vit_ief.py, and its E1 γ study.

    python benchmarks/vit.py                # batch 128, 10 E1 batches, best of 5
    python benchmarks/vit.py --quick        # batch 32, 3 E1 batches, best of 2

The model: patch Linear(4, 16) → TransformerEncoderLayer(16, 2 heads, pre-norm, GELU,
LoRA rank 4 on both attention projections) → LayerNorm → Flatten → Linear(256, 10) on
scikit-learn's digits as 16 tokens of 2×2 pixels, trained as in the example (Adam on the
base for the digits 0–4, then on adapters + head for 150 steps on all digits).

1. **Exact NGD against one gradient**, at batch N: per parameter subset (all of θ, the
   trained adapters + head, the adapters alone), the best wall time of one gradient
   (``refngd.gradient`` / ``gradient_from`` on the subset, forward pass included) and of
   one exact damped NGD direction (``updates.ngd``, λ = 1e-3: forward pass, one backward
   pass of the N·(C−1) Fisher rows and the gradient's, Gram or P × P factorisation, one
   Uᵀ·w).  Gradient and NGD are timed alternately within each repeat, so both see the same
   machine load; the ratio is of the two best times.
2. **The E1 γ study** (Wu et al. 2024, §6; ``refngd.experiments.gamma_study``) at the
   trained checkpoint, on ``--batches`` disjoint batches of N: γ̄_X/γ̄_SGD ± s.e. for NGD,
   iEF, EF and SF on each subset, and the wall time of one ``batch_gammas`` call.

The load average before and after is printed: the machine may be shared.  On a loaded
machine run it with ``OPENBLAS_NUM_THREADS=1``: the small factorisations (an R × R Cholesky
of a few hundred rows) suffer badly from oversubscribed BLAS threads.  No assertion.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from _common import best_time  # benchmarks/_common.py, beside this script

from refngd import losses, nn, updates
from refngd.derivatives import gradient_from
from refngd.experiments.data import load_digits
from refngd.experiments.gamma_study import E1_DAMPING, batch_gammas, e1_summary
from refngd.optim import Adam
from refngd.subsets import peft_mask


def patches(X):
    N = X.shape[0]
    return X.reshape(N, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(N, 16, 4)


def trained_vit():
    """The example's model and data, trained as there: (model, theta, X, y, subsets)."""
    data = load_digits().for_model("cnn")
    X, y = patches(data.X_train), data.y_train
    model = nn.Sequential(
        nn.Linear(4, 16),
        nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, activation="gelu", norm_first=True,
                                   lora_rank=4, lora_alpha=8.0),
        nn.LayerNorm(16), nn.Flatten(), nn.Linear(256, 10))
    loss, rng = losses.CrossEntropy(), np.random.default_rng(0)
    theta = model.init(rng)
    lora = peft_mask(model)
    trained = lora | (np.arange(model.num_params) >= model.slices[4][0])

    def adam(theta, mask, Xs, ys, steps):
        opt = Adam(lr=3e-3)
        state = opt.init(theta[mask])
        for _ in range(steps):
            i = rng.choice(len(Xs), 32, replace=False)
            g = gradient_from(model.linearize(theta, Xs[i]), loss, ys[i], params=mask)
            d, m, v = opt.direction(g, state)
            state = {"step": state["step"] + 1, "exp_avg": m, "exp_avg_sq": v}
            theta = theta.copy()
            theta[mask] -= opt.lr * d
        return theta

    theta = adam(theta, ~lora, X[y < 5], y[y < 5], 120)
    theta = adam(theta, trained, X, y, 150)
    return model, theta, X, y, {"all": "all", "adapters + head": trained, "adapters": lora}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None)
    args = ap.parse_args(argv)
    N = 32 if args.quick else 128
    repeats = args.repeats or (2 if args.quick else 5)
    n_batches = args.batches or (3 if args.quick else 10)
    threads = {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
               if k in os.environ}
    print(f"load average before: {os.getloadavg()}, {os.cpu_count()} CPUs, BLAS threads {threads or 'default'}")
    model, theta, X, y, subsets = trained_vit()
    loss = losses.CrossEntropy()
    Xb, yb = X[:N], y[:N]
    print(f"tiny ViT, P = {model.num_params}, batch {N}, R = {N * 9} Fisher rows")

    print(f"\n{'subset':>16} {'|S|':>6} {'gradient':>10} {'exact NGD':>10} {'ratio':>6}")
    for name, params in subsets.items():
        sub = None if isinstance(params, str) else params

        def grad():
            return gradient_from(model.linearize(theta, Xb), loss, yb, params=sub)

        def ngd():
            return updates.ngd(model, theta, loss, Xb, yb, 1e-3, params=params)

        tg, tn = [], []
        for _ in range(repeats):  # alternate, so that both see the same load
            tg.append(best_time(grad, 1))
            tn.append(best_time(ngd, 1))
        size = model.num_params if sub is None else int(sub.sum())
        print(f"{name:>16} {size:>6} {min(tg) * 1e3:>8.2f}ms {min(tn) * 1e3:>8.2f}ms "
              f"{min(tn) / min(tg):>5.1f}×")

    print(f"\nE1 (λ = {E1_DAMPING:g}) on {n_batches} batches of {N}: γ̄_X/γ̄_SGD ± s.e.")
    methods = ("ngd", "ief", "ef", "sf")
    perm = np.random.default_rng(1).permutation(len(X))[:n_batches * N].reshape(n_batches, N)
    print(f"{'subset':>16} " + " ".join(f"{m:>15}" for m in methods) + f" {'s/batch':>8}")
    for name in ("adapters", "adapters + head"):
        t0 = time.perf_counter()
        batches = [batch_gammas(model, theta, loss, X[i], y[i], methods=methods,
                                dampings=[E1_DAMPING], rng=np.random.default_rng(2 + b),
                                params=subsets[name]) for b, i in enumerate(perm)]
        per_batch = (time.perf_counter() - t0) / n_batches
        s = e1_summary(batches, E1_DAMPING)
        print(f"{name:>16} " + " ".join(f"{s[m]['mean_ratio']:>7.3f} ± {s[m]['stderr']:.3f}"
                                        for m in methods) + f" {per_batch:>7.2f}s")
    print(f"\nload average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
