"""Benchmark: refngd on a GPU (CuPy) beside PyTorch peers on the same device, in one run.

    python benchmarks/gpu.py                  # full run: MLP 784-1024-1024-10, N = 128 and 2048
    python benchmarks/gpu.py --quick          # smaller model and batches, fewer repeats
    python benchmarks/gpu.py --out gpu.json   # also write every figure to a JSON file
    python benchmarks/gpu.py --no-peers       # refngd only

Needs CuPy and an NVIDIA GPU; without them it exits at once with a message saying so.
PyTorch (CUDA build), torch.func and curvlinops are used when installed and skipped with a
note otherwise.

Setup (the table of issue 13): float64, cross-entropy (mean), damping λ = 1e-3, the same
weights and batch for every library.  Every time is the best of ``--repeats`` runs after a
warm-up, each run bracketed by a device synchronisation (CuPy and PyTorch launch kernels
asynchronously; unsynchronised times would measure the launches only).  Figures:

refngd (CuPy)
  * ``ngd N``: ``updates.ngd`` (forward pass included) at N = 128 and N = 2048, beside the
    float64 FLOP floor: the step's FLOP count (``_common.ngd_flops``) divided by the
    float64 GEMM rate measured in the same run (an 8192² product);
  * its stages at N = 128: forward, cotangents, backward of the rows, Gram matrix,
    factor + solve, Uᵀw;
  * ``gradient``, ``per-sample gradients`` (N × P), ``K-FAC build + solve`` (type-2,
    expand, Tikhonov; cold: factors and eigendecompositions included) and the cached
    K-FAC solve.
PyTorch on the same GPU (when installed)
  * ``torch gradient``: one ``loss.backward()``;
  * ``torch.func per-sample gradients``: ``vmap(grad)``;
  * ``torch.func Gram route``: ``vmap(jacrev)`` Jacobians J (N·C × P), then the exact
    damped NGD by push-through, d = Jᵀ x with (c·H J Jᵀ + λI) x = c·e (H the block-
    diagonal output Hessians) — the same direction as refngd's, checked;
  * ``curvlinops GGN + CG``: ``GGNLinearOperator`` and conjugate gradients on
    (G + λI) d = g to a relative residual of ``--cg-rtol`` (default 1e-6), checked against
    refngd's direction;
  * ``curvlinops K-FAC build + solve`` (type-2, expand, exact damping) and its cached apply.
"""
from __future__ import annotations

import argparse

import numpy as np

from _common import best_time, matmul_rate, mlp, ngd_flops  # benchmarks/_common.py, beside


def _gpu_or_exit():
    """CuPy with at least one device, or SystemExit with a message saying what is missing."""
    try:
        import cupy
    except Exception as err:  # ImportError, or a CUDA library that fails to load
        raise SystemExit(f"benchmarks/gpu.py needs CuPy and an NVIDIA GPU: CuPy is not usable "
                         f"here ({type(err).__name__}: {err}). Install it with "
                         "pip install 'refngd[gpu]' on a machine with a GPU.") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:
        count, why = 0, f" ({type(err).__name__}: {err})"
    else:
        why = ""
    if count < 1:
        raise SystemExit(f"benchmarks/gpu.py needs an NVIDIA GPU: CuPy sees no device{why}.")
    return cupy


class Timer:
    """``_common.best_time`` with this run's number of repeats (it waits for CuPy and torch)."""

    def __init__(self, repeats: int):
        self.repeats = repeats

    def __call__(self, f, repeats: int | None = None) -> float:
        return best_time(f, repeats or self.repeats)


def refngd_figures(xp, timer, widths, N, lam, with_stages: bool, record: dict):
    """refngd's figures on ``xp`` (CuPy; NumPy only in the script's own test)."""

    import refngd
    from refngd import losses, updates
    from refngd.backend import PSDFactor, host_read_count, to_numpy
    from refngd.curvature import KFAC

    rng = np.random.default_rng(0)
    model = mlp(widths)
    theta = model.init(rng, backend="numpy" if xp is np else "cupy")
    Xh, yh = rng.standard_normal((N, widths[0])), rng.integers(0, widths[-1], N)
    X, y = xp.asarray(Xh), xp.asarray(yh)
    loss = losses.CrossEntropy()
    out = {}
    reads = host_read_count()
    d = updates.ngd(model, theta, loss, X, y, lam)
    out["ngd host reads"] = host_read_count() - reads  # synchronisations for checks, per step
    out["ngd"] = timer(lambda: updates.ngd(model, theta, loss, X, y, lam))
    out["ngd GFLOP"] = ngd_flops(widths, N, widths[-1]) / 1e9
    if with_stages:
        lin = model.linearize(theta, X)
        cot = loss.hessian_factor(lin.outputs).transpose(0, 2, 1)
        rows = lin.backprop(cot)
        K = rows.gram()
        a, _ = loss.gradient_in_factor(lin.outputs, y)
        c = float(loss.scale(lin.outputs))
        w = PSDFactor(K, shift=lam / c, projected=True).solve(a.reshape(-1))
        out["stage forward"] = timer(lambda: model.linearize(theta, X))
        out["stage cotangents"] = timer(lambda: (loss.hessian_factor(lin.outputs),
                                                 loss.gradient_in_factor(lin.outputs, y)))
        out["stage backward of the rows"] = timer(lambda: lin.backprop(cot))
        out["stage Gram"] = timer(rows.gram)
        out["stage factor + solve"] = timer(
            lambda: PSDFactor(K, shift=lam / c, projected=True).solve(a.reshape(-1)))
        out["stage U^T w"] = timer(lambda: rows.rmatvec(w.reshape(rows.N, rows.K)))
        del lin, rows, K
        out["gradient"] = timer(lambda: refngd.gradient(model, theta, loss, X, y))
        out["per-sample gradients"] = timer(
            lambda: refngd.per_sample_gradients(model, theta, loss, X, y))
        g = refngd.gradient(model, theta, loss, X, y)
        out["K-FAC build + solve"] = timer(
            lambda: KFAC(model, theta, loss, X, y).solve(g, lam))
        kf = KFAC(model, theta, loss, X, y).eigendecompose()
        out["K-FAC cached solve"] = timer(lambda: kf.solve(g, lam))
    record[f"refngd N={N}"] = out
    return model, theta, Xh, yh, to_numpy(d)


def peer_figures(torch, timer, widths, Xh, yh, theta_h, d_ref, lam, cg_rtol, record, N,
                 device: str = "cuda"):
    """PyTorch, torch.func and curvlinops on the same GPU, same weights and batch."""
    from vs_torch import torch_model  # the same MLP in PyTorch, same weights

    dev = torch.device(device)
    net = torch_model(mlp(widths), theta_h).to(dev)
    X, y = torch.tensor(Xh, device=dev), torch.tensor(yh, device=dev)
    ce = torch.nn.CrossEntropyLoss()
    params = [p for p in net.parameters()]
    out, notes = {}, {}

    def grad():
        net.zero_grad(set_to_none=True)
        ce(net(X), y).backward()
        return torch.cat([p.grad.reshape(-1) for p in params])

    out["torch gradient"] = timer(grad)
    g = grad().detach()
    d_ref_t = torch.tensor(d_ref, device=dev)

    def rel(d):
        d = d.detach()
        return float(torch.linalg.norm(d - d_ref_t) / torch.linalg.norm(d_ref_t))

    try:
        from torch.func import functional_call, grad as fgrad, jacrev, vmap

        pdict = {k: v.detach() for k, v in net.named_parameters()}

        def loss_n(p, x, t):
            return ce(functional_call(net, p, (x[None],)), t[None])

        psg = vmap(fgrad(loss_n), in_dims=(None, 0, 0))
        out["torch.func per-sample gradients"] = timer(lambda: psg(pdict, X, y))

        def z_n(p, x):
            return functional_call(net, p, (x[None],))[0]

        jac = vmap(jacrev(z_n), in_dims=(None, 0))

        def gram_route():
            J = torch.cat([t.reshape(N, widths[-1], -1) for t in jac(pdict, X).values()], dim=2)
            J = J.reshape(N * widths[-1], -1)               # (N·C, P), rows (n, class)
            Z = net(X)
            p = torch.softmax(Z, dim=1)
            H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]  # (N, C, C)
            e = (p - torch.nn.functional.one_hot(y, widths[-1]).double()).reshape(-1)
            c = 1.0 / N
            KJ = (J @ J.T).reshape(N, widths[-1], N * widths[-1])
            A = c * (H @ KJ).reshape(N * widths[-1], -1)   # c·H·J Jᵀ (block-diagonal H)
            A.diagonal().add_(lam)
            return J.T @ torch.linalg.solve(A, c * e)

        d = gram_route()
        notes["torch.func Gram route rel. diff. to refngd"] = rel(d)
        del d
        out["torch.func Gram route"] = timer(gram_route, max(1, timer.repeats // 2))
    except Exception as err:  # out of memory, or an older torch without torch.func
        notes["torch.func"] = f"skipped: {type(err).__name__}: {err}"
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    try:
        import curvlinops

        def ggn_cg():
            op = curvlinops.GGNLinearOperator(net, ce, params, [(X, y)], check_deterministic=False)
            x = torch.zeros_like(g)
            r = g.clone()
            q = r.clone()
            rr, g2, it = float(r @ r), float(g @ g), 0
            while rr > cg_rtol ** 2 * g2 and it < 10_000:
                Aq = op @ q + lam * q
                alpha = rr / float(q @ Aq)
                x += alpha * q
                r -= alpha * Aq
                rr_new = float(r @ r)
                q = r + (rr_new / rr) * q
                rr, it = rr_new, it + 1
            return x, it

        d, its = ggn_cg()
        notes["curvlinops GGN + CG iterations"] = its
        notes["curvlinops GGN + CG rel. diff. to refngd"] = rel(d)
        out["curvlinops GGN + CG"] = timer(lambda: ggn_cg(), max(1, timer.repeats // 2))

        def kfac_op():
            return curvlinops.KFACLinearOperator(net, ce, params, [(X, y)], check_deterministic=False,
                                                 fisher_type="type-2", kfac_approx="expand")

        def kfac_build_solve():
            inv = curvlinops.KFACInverseLinearOperator(kfac_op(), damping=lam, use_exact_damping=True)
            return inv @ g

        out["curvlinops K-FAC build + solve"] = timer(kfac_build_solve)
        inv = curvlinops.KFACInverseLinearOperator(kfac_op(), damping=lam, use_exact_damping=True)
        inv @ g
        out["curvlinops K-FAC cached apply"] = timer(lambda: inv @ g)
    except Exception as err:
        notes["curvlinops"] = f"skipped: {type(err).__name__}: {err}"
    record[f"peers N={N}"] = out
    record[f"notes N={N}"] = notes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="MLP 784-256-256-10, N = 64 and 512")
    p.add_argument("--repeats", type=int, default=None, help="best of this many (default 10; 3 quick)")
    p.add_argument("--no-peers", action="store_true", help="skip PyTorch, torch.func, curvlinops")
    p.add_argument("--cg-rtol", type=float, default=1e-6, help="CG relative residual (curvlinops)")
    p.add_argument("--out", default=None, help="write the figures to this JSON file")
    args = p.parse_args(argv)
    cupy = _gpu_or_exit()
    torch = None
    if not args.no_peers:
        try:
            import torch as _torch

            torch = _torch if _torch.cuda.is_available() else None
        except ImportError:
            torch = None
    timer = Timer(args.repeats or (3 if args.quick else 10))
    lam = 1e-3
    width, (n_small, n_large) = (256, (64, 512)) if args.quick else (1024, (128, 2048))
    widths = [784, width, width, 10]
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    rate = matmul_rate(3, cupy, 8192, 8192, 8192)  # float64 GEMM rate of the device
    record = {"device": name, "float64 GEMM GFLOP/s": rate, "model": "MLP " + "-".join(map(str, widths)),
              "damping": lam, "dtype": "float64", "loss": "cross-entropy (mean)",
              "torch": None if torch is None else torch.__version__, "cupy": cupy.__version__}
    print(f"device: {name}; float64 GEMM (8192^2): {rate:.0f} GFLOP/s; CuPy {cupy.__version__}"
          + ("" if torch is None else f"; torch {torch.__version__}"))
    for N in (n_small, n_large):
        model, theta, Xh, yh, d = refngd_figures(cupy, timer, widths, N, lam, N == n_small, record)
        if torch is not None and N == n_small:
            peer_figures(torch, timer, widths, Xh, yh, cupy.asnumpy(theta), d, lam, args.cg_rtol,
                         record, N)
        cupy.get_default_memory_pool().free_all_blocks()
    if torch is None and not args.no_peers:
        print("PyTorch with CUDA is not available: peers skipped.")
    for key, vals in record.items():
        if not isinstance(vals, dict):
            continue
        print(f"\n{key}")
        for k, v in vals.items():
            if isinstance(v, float) and not k.endswith(("GFLOP", "refngd", "iterations")):
                print(f"  {k:<40} {v * 1e3:10.2f} ms")
            else:
                print(f"  {k:<40} {v}")
        if "ngd" in vals:
            floor = vals["ngd GFLOP"] / rate
            vals["float64 FLOP floor"] = floor
            print(f"  {'float64 FLOP floor':<40} {floor * 1e3:10.2f} ms  "
                  f"(ngd / floor = {vals['ngd'] / floor:.2f})")
    if args.out:
        from refngd.optim.records import save_json

        save_json(record, args.out)
        print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
