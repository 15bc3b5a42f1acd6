"""Benchmark: refngd's gradient and exact NGD step against one PyTorch gradient (CPU).

    python benchmarks/vs_torch.py            # MLP 784-1024-1024-10 (N = 128), CNN (N = 64)
    python benchmarks/vs_torch.py --quick    # fewer rounds

Issue 13's CPU goals are ratios to one ``loss.backward()`` of the same PyTorch model with
the same weights and batch (float64, cross-entropy, mean; λ = 1e-3):

* MLP 784-1024-1024-10 (ReLU, 1.86 M parameters), N = 128: ``refngd.gradient`` and the
  exact damped NGD step ``updates.ngd`` (goal: ≤ 4 torch gradients);
* the small CNN of ``benchmarks/kfac.py`` (3×16×16 input: conv3×3(16)-ReLU-conv3×3/2(32)-
  ReLU-Linear(2048, 10), P = 25 578), N = 64: ``refngd.gradient`` (goal: ≤ 1.2× torch's).

Issue 22 restated them for every CPU (AVX2 and AVX-512): the NGD step at ≥ 60 % of the
plain A @ B rate and ≤ 6.5 torch gradients, its Cholesky at ≥ 50 % of that rate, the CNN
gradient ≤ 1.3× torch's.  The header names the CPU, its widest vector extension and the
BLAS kernel OpenBLAS picked (threadpoolctl), and the MLP table each stage's share.

``--keep-freed-memory`` first calls :func:`refngd.memory.keep_freed_memory` (for the
whole process, PyTorch included).  Every time includes the forward pass.  Timing: best single call, in alternating blocks
of consecutive calls (``_common.best_in_blocks``).  Beside the MLP figures: the FLOPs of
the NGD step as refngd computes it and the rate of a plain A @ B in the same run.  Both
refngd results are checked against PyTorch first (gradient) or against the dense solve
(NGD, on a smaller batch) so that a fast wrong answer cannot pass.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from _common import (allocator_option, apply_allocator_option, best_in_blocks,  # beside
                     blas_info, cpu_model, matmul_rate, mlp, ngd_flop_parts,   # this
                     ngd_flops)                                                # script
from kfac import problem, small_cnn

import refngd
from refngd import losses, updates
from refngd.backend import PSDFactor
from refngd.curvature import Fisher


def torch_model(model, theta):
    """The PyTorch twin of a refngd Sequential of Linear/Conv2d/ReLU/Flatten, same weights."""
    import torch

    from refngd import nn

    layers = []
    for layer in model.layers:
        if isinstance(layer, nn.Linear):
            layers.append(torch.nn.Linear(layer.in_features, layer.out_features))
        elif isinstance(layer, nn.Conv2d):
            layers.append(torch.nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                                          stride=layer.stride, padding=layer.padding))
        elif isinstance(layer, nn.ReLU):
            layers.append(torch.nn.ReLU())
        elif isinstance(layer, nn.Flatten):
            layers.append(torch.nn.Flatten())
        else:
            raise TypeError(f"no PyTorch twin for {layer!r}")
    net = torch.nn.Sequential(*layers).double()
    torch.nn.utils.vector_to_parameters(torch.tensor(theta), net.parameters())
    return net


def torch_gradient(net, X, y):
    import torch

    Xt, yt = torch.tensor(X), torch.tensor(y)
    params = list(net.parameters())

    def grad():
        for p in params:
            p.grad = None
        torch.nn.functional.cross_entropy(net(Xt), yt).backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).numpy()

    return grad


def timed_against_torch(model, theta, loss, X, y, blocks, per_block, more=None) -> dict:
    """Best times of the torch gradient, refngd's gradient (checked equal first) and ``more``."""
    tgrad = torch_gradient(torch_model(model, theta), X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    assert np.abs(g - tgrad()).max() <= 1e-12 * np.abs(g).max(), "the gradients differ"
    fns = {"torch gradient": tgrad,
           "refngd gradient": lambda: refngd.gradient(model, theta, loss, X, y), **(more or {})}
    return best_in_blocks(fns, blocks, per_block)


def ngd_stages(model, theta, loss, X, y, lam) -> dict:
    """The stages of one exact NGD step (``updates.ngd``), each as a function to time.

    forward (``linearize``), the rows' backward pass, the Gram matrix, its Cholesky
    factorisation (``PSDFactor``: copy, shift, ``dpotrf``, pivot checks), the two
    triangular solves and Uᵀw — the step's work in the order it does it, on the
    intermediate results of one step computed here first.
    """
    lin = model.linearize(theta, X)
    F = Fisher(model, theta, loss, X, y, linearization=lin)
    cot, G = F.cotangents(), F.gram()
    a, _ = F.gradient_coefficients()
    fac = PSDFactor(G, shift=lam / F.c, projected=True)
    w, _ = fac.solve_scaled(a.reshape(-1))
    w = w.reshape(a.shape)
    return {"forward": lambda: model.linearize(theta, X),
            "rows backward": lambda: lin.backprop(cot),
            "Gram": F.rows.gram,
            "Cholesky": lambda: PSDFactor(G, shift=lam / F.c, projected=True),
            "solve": lambda: fac.solve_scaled(a.reshape(-1)),
            "U^T w": lambda: F.rows.rmatvec(w)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds")
    allocator_option(p)
    args = p.parse_args(argv)
    allocator = apply_allocator_option(args)
    try:
        import torch
    except ImportError:
        sys.exit("benchmarks/vs_torch.py needs PyTorch (pip install torch).")
    blocks, per_block = (3, 3) if args.quick else (6, 5)
    loss, lam = losses.CrossEntropy(), 1e-3
    print(f"CPU: {cpu_model()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; NumPy {np.__version__}; "
          f"{allocator}")
    for line in blas_info():
        print(f"  {line}")
    rate = matmul_rate(5)
    print(f"plain float64 A @ B (1280x1024 @ 1024x1024): {rate:.1f} GFLOP/s\n")

    widths, N = [784, 1024, 1024, 10], 128
    model = mlp(widths)
    rng = np.random.default_rng(0)
    theta = model.init(rng)
    X, y = rng.standard_normal((N, widths[0])), rng.integers(0, widths[-1], N)
    stages = ngd_stages(model, theta, loss, X, y, lam)
    t = timed_against_torch(model, theta, loss, X, y, blocks, per_block, {
        "refngd exact NGD": lambda: updates.ngd(model, theta, loss, X, y, lam), **stages})
    fl, parts = ngd_flops(widths, N, widths[-1]), ngd_flop_parts(widths, N, widths[-1])
    rate_end = matmul_rate(5)
    ref = max(rate, rate_end)  # the machine's GEMM rate in this run: the better of the two
    print(f"MLP {'-'.join(map(str, widths))} ({model.num_params:,} parameters), batch {N}, "
          f"R = {N * (widths[-1] - 1)} rows")
    print(f"{'':<20} {'ms':>8} {'/ torch grad':>13} {'GFLOP':>7} {'GFLOP/s':>8} {'% A@B':>6} "
          f"{'% step':>7}")
    step = t["refngd exact NGD"]
    for name, s in t.items():
        f = fl if name == "refngd exact NGD" else parts.get(name)
        extra = (f"{f / 1e9:7.3f} {f / s / 1e9:8.1f} {100 * f / s / 1e9 / ref:5.0f}%"
                 if f is not None else f"{'':>7} {'':>8} {'':>6}")
        share = f"{100 * s / step:6.0f}%" if name in stages else ""
        print(f"{name:<20} {1e3 * s:8.2f} {s / t['torch gradient']:13.2f} {extra} {share}")
    print(f"exact NGD: {fl / 1e9:.2f} GFLOP -> {fl / step / 1e9:.1f} GFLOP/s = "
          f"{100 * fl / step / 1e9 / ref:.0f}% of A @ B; Cholesky "
          f"{100 * parts['Cholesky'] / t['Cholesky'] / 1e9 / ref:.0f}% of A @ B\n")

    model, shape = small_cnn(16)
    theta, X, y = problem(model, shape, 64)
    lin = model.linearize(theta, X)
    e = (loss.output_gradient(lin.outputs, y) * loss.scale(lin.outputs))[:, None, :]
    rows = lin.backprop(e)
    ones = np.ones((64, 1))
    t = timed_against_torch(model, theta, loss, X, y, blocks, per_block, {
        "forward": lambda: model.linearize(theta, X),
        "backward (K = 1)": lambda: lin.backprop(e),
        "U^T w": lambda: rows.rmatvec(ones)})
    print(f"CNN 3x16x16 conv3x3(16)-conv3x3/2(32)-linear ({model.num_params:,} parameters), batch 64")
    for name, s in t.items():
        print(f"{name:<20} {1e3 * s:8.2f} {s / t['torch gradient']:13.2f}")
    print(f"\nplain A @ B at the end: {matmul_rate(5):.1f} GFLOP/s")


if __name__ == "__main__":
    main()
