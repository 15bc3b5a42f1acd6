"""Benchmark: K-FAC factors, their eigendecompositions and a cached preconditioned step.

    python benchmarks/kfac.py            # full run (MLP 784-1024-1024-10 and a small CNN)
    python benchmarks/kfac.py --quick    # smaller sizes, fewer repeats

For each model (batch 128, cross-entropy, float64) and each Fisher type (type-2, MC with
K = 1, empirical) three phases are timed, best of several repeats:

(a) build:  forward pass, one backward pass of the Fisher type's rows, A and G by one
            GEMM each per layer (``KFAC(...)`` from scratch);
(b) eig:    the eigendecompositions of all factors (``.eigendecompose()``);
(c) step:   one Tikhonov-damped preconditioned step (G ⊗ A + λI)⁻¹ g with cached
            decompositions (``.solve(g, λ)``), g given.

Each phase is printed with its FLOP count (multiply-add = 2; a symmetric rank-k update
X.T @ X of an m × d matrix counts m·d², the half it computes; a full ``eigh`` of order n
counts 4n³, a thin one the QR and small ``eigh`` it runs — see ``eig_flops``), the
GFLOP/s it reaches next to a plain float64 ``A @ B`` measured in the same run, and its
time relative to one plain gradient (``refngd.gradient``, forward pass included).
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import best_time, matmul_rate, mlp  # benchmarks/_common.py, beside this script

import refngd
from refngd import losses, nn
from refngd.curvature import KFAC


# --------------------------------------------------------------------------- models
def small_cnn(hw=16):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * (hw // 2) ** 2, 10))
    return model, (3, hw, hw)


def problem(model, in_shape, N, seed=0):
    rng = np.random.default_rng(seed)
    theta = model.init(rng)
    return theta, rng.standard_normal((N,) + in_shape), rng.integers(0, 10, N)


# --------------------------------------------------------------------------- FLOP counts
def layer_shapes(model, theta, X):
    """Per parametric layer: (layer, T output locations, D input columns, d_out)."""
    lin = model.linearize(theta, X[:1])
    out = []
    for layer, _, cache, _, _ in lin._steps:
        if isinstance(layer, nn.Linear):
            out.append((layer, 1, layer.in_features, layer.out_features))
        elif isinstance(layer, nn.Conv2d):
            out.append((layer, cache[0].shape[2], layer.D, layer.out_channels))
    return out


def gradient_flops(shapes, N):
    fl = 0
    for i, (_, T, D, d) in enumerate(shapes):
        fl += 2 * N * T * D * d * (3 if i else 2)  # forward, weight gradient, input cotangent
    return fl


def build_flops(shapes, N, K):
    fl = 0
    for i, (layer, T, D, d) in enumerate(shapes):
        dA = D + int(layer.bias)
        fl += 2 * N * T * D * d                      # forward
        fl += 2 * N * K * T * D * d if i else 0      # rows through the layer (not the first)
        fl += N * T * dA * dA + N * K * T * d * d    # A and G (expand), symmetric rank-k updates
    return fl


def eig_flops(n, m):
    """A full eigh (4n³) or, with m < n rows, the thin route: QR of the n × m row matrix
    (Householder + forming Q: 2·(2nm² − 2m³/3)), R Rᵀ (m³), eigh of order m (4m³), Q V (2nm²)."""
    if m >= n:
        return 4 * n ** 3
    return 2 * (2 * n * m * m - 2 * m ** 3 / 3) + m ** 3 + 4 * m ** 3 + 2 * n * m * m


def step_flops(K):
    """GEMMs of the cached step: Lᵀ V R and L W Rᵀ per block, in the order the code picks."""
    fl = 0
    for blk in K.blocks:
        (_, UG, _), (_, UA, _) = blk.eig()
        dG, rG = UG.shape
        dA, rA = UA.shape
        fl += 2 * min(rG * dG * dA + rG * dA * rA, dG * dA * rA + rG * dG * rA)  # Lᵀ V R
        fl += 2 * min(dG * rG * rA + dG * rA * dA, rG * rA * dA + dG * rG * dA)  # L W Rᵀ
    return fl


def all_eig_flops(K):
    return sum(eig_flops(f.dim, f.M.shape[0]) for f in
               {id(x): x for b in K.blocks for x in (b.G, b.A)}.values())


# --------------------------------------------------------------------------- run
def run_model(name, model, in_shape, N, reps, rate, lam=1e-3):
    loss = losses.CrossEntropy()
    theta, X, y = problem(model, in_shape, N)
    shapes = layer_shapes(model, theta, X)
    print(f"\n{name} ({model.num_params:,} parameters), batch {N}, CE, float64, damping {lam}")
    t_grad = best_time(lambda: refngd.gradient(model, theta, loss, X, y), reps)
    fl_grad = gradient_flops(shapes, N)
    print(f"  gradient (refngd.gradient): {t_grad * 1e3:8.2f} ms  {fl_grad / 1e9:6.2f} GFLOP "
          f"{fl_grad / t_grad / 1e9:6.1f} GFLOP/s")
    g = refngd.gradient(model, theta, loss, X, y)
    print(f"  {'fisher type':<11} {'phase':<6} {'ms':>9} {'GFLOP':>7} {'GFLOP/s':>8} "
          f"{'% of A@B':>8} {'x grad':>7}")
    rows = {}
    C2 = loss.hessian_factor(model.forward(theta, X[:1])).shape[2]  # type-2 rows per sample
    for ftype, kw, K_rows in (("type-2", {}, C2), ("mc", dict(mc_samples=1, rng=0), 1),
                              ("empirical", {}, 1)):
        def make(_=None, kw=kw, ftype=ftype):
            return KFAC(model, theta, loss, X, y, fisher_type=ftype, **kw)

        t_build = best_time(make, reps)
        t_eig = best_time(lambda K: K.eigendecompose(), reps, setup=make)
        K = make().eigendecompose()
        t_step = best_time(lambda: K.solve(g, lam), reps)
        for phase, t, fl in (("build", t_build, build_flops(shapes, N, K_rows)),
                             ("eig", t_eig, all_eig_flops(K)),
                             ("step", t_step, step_flops(K))):
            r = fl / t / 1e9
            print(f"  {ftype:<11} {phase:<6} {t * 1e3:9.2f} {fl / 1e9:7.2f} {r:8.1f} "
                  f"{100 * r / rate:7.0f}% {t / t_grad:7.2f}")
            rows[(ftype, phase)] = (t, fl)
    # all three Fisher types from one forward pass: A (and its eigendecomposition) shared
    def shared():
        lin = model.linearize(theta, X)
        for ftype, kw in (("type-2", {}), ("mc", dict(mc_samples=1, rng=0)), ("empirical", {})):
            KFAC(model, theta, loss, X, y, fisher_type=ftype, linearization=lin, **kw)
    t_sh = best_time(shared, reps)
    print(f"  all three Fisher types from one forward pass (A shared): {t_sh * 1e3:.2f} ms "
          f"= {t_sh / t_grad:.2f}x grad")
    steps = [rows[(f, "step")][0] / t_grad for f in ("type-2", "mc", "empirical")]
    print(f"  summary: type-2 factors {rows[('type-2', 'build')][0] / t_grad:.2f}x grad "
          f"(reference PyTorch library: ~9x); cached step {min(steps):.2f}-{max(steps):.2f}x grad "
          f"(reference: 6-8x)")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    args = p.parse_args(argv)
    reps = 2 if args.quick else 5
    rate = matmul_rate(reps)
    print(f"plain float64 A @ B (1280x1024 @ 1024x1024): {rate:.1f} GFLOP/s")
    width = 256 if args.quick else 1024
    run_model(f"MLP 784-{width}-{width}-10", mlp([784, width, width, 10]), (784,), 128, reps, rate)
    run_model("CNN 3x16x16: conv3x3(16)-ReLU-conv3x3/2(32)-ReLU-Linear(2048, 10)",
              *small_cnn(16), 128, reps, rate)
    print(f"\nplain float64 A @ B again (machine load check): {matmul_rate(reps):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
