"""A qualitative optimizer table, measured: SGD, Adam, AdaGrad, K-FAC and L-BFGS on one problem.

Tutorials often summarise optimizers in a table of adjectives (curvature "none",
"diagonal", "Kronecker", "full"; cost "slow", "medium", "fast").  Here every cell is a
number, on one full-batch problem (a Tanh MLP, softmax cross-entropy, 256 synthetic
samples), each method at the best learning rate of a small grid:

* curvature and its memory: what the method stores beyond θ, in floats.  L-BFGS keeps m
  pairs (s_i, y_i) — a rank-2m approximation of the inverse Hessian, 2mP floats (Nocedal
  1980; Liu & Nocedal 1989) — not the "full" P × P matrix; K-FAC keeps two small factors
  per layer and their eigendecompositions, Σ_l 2(d_in² + d_out²) + d_in + d_out (Martens &
  Grosse 2015); AdaGrad (Duchi et al. 2011) and
  Adam (Kingma & Ba 2015) keep one or two diagonals;
* cost per iteration: gradient evaluations per iteration (L-BFGS's line search can use
  several) and the measured wall time (printed, never asserted: the machine is shared);
* convergence: iterations to reach a target loss, and the loss after the budget.

Asserted: the memory counts (L-BFGS's 2mP < P², K-FAC's factor count below P²), that the
curvature methods (K-FAC, L-BFGS) reach the target in fewer iterations than SGD and
AdaGrad, and that every method decreases the loss.

    python examples/optimizer_table.py [--out examples_out/optimizer_table.png]
"""
import argparse
import os
import time

try:
    import matplotlib
except ModuleNotFoundError:  # a core-only install: name the extra, in one line
    raise SystemExit("this example needs matplotlib: pip install 'refngd[plot]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy.optimize import minimize

import refngd
from refngd import losses, nn, optim
from refngd.optim.records import format_table

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/optimizer_table.png")
args = parser.parse_args()

rng = np.random.default_rng(0)
D, H, C, N = 10, 32, 4, 256
teacher = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C))
X = rng.standard_normal((N, D))
y = teacher.forward(2.0 * teacher.init(rng), X).argmax(1)
model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
loss = losses.CrossEntropy()
theta0 = model.init(np.random.default_rng(1))
P = model.num_params
iters, m = 60, 10
target = 0.05


def run_refngd(make, lr):
    opt = make(lr)
    theta, state = theta0.copy(), opt.init(theta0)
    curve, times = [refngd.loss_value(model, theta0, loss, X, y)], []
    with np.errstate(all="ignore"):
        for _ in range(iters):
            t0 = time.perf_counter()
            try:
                theta, state, info = opt.step(theta, state, model, loss, X, y)
            except (ValueError, np.linalg.LinAlgError):   # diverged (non-finite θ or outputs)
                return None
            times.append(time.perf_counter() - t0)
            curve.append(refngd.loss_value(model, theta, loss, X, y))
    return (np.array(curve), float(np.median(times)), 1.0, state)


def run_lbfgs():
    evals, curve = [0], [refngd.loss_value(model, theta0, loss, X, y)]

    def fg(t):
        evals[0] += 1
        return refngd.loss_value(model, t, loss, X, y), refngd.gradient(model, t, loss, X, y)

    t0 = time.perf_counter()
    res = minimize(fg, theta0, jac=True, method="L-BFGS-B",
                   callback=lambda t: curve.append(refngd.loss_value(model, t, loss, X, y)),
                   options={"maxiter": iters, "maxcor": m, "gtol": 0, "ftol": 0})
    wall = (time.perf_counter() - t0) / max(res.nit, 1)
    return np.array(curve), wall, evals[0] / max(res.nit, 1), None


# K-FAC's state: A (d_in × d_in) and G (d_out × d_out) per layer, and their eigendecompositions
kfac_mem = sum(2 * (a * a + b * b) + a + b for a, b in [(D, H), (H, C)])
methods = {
    "SGD": (lambda lr: optim.SGD(lr), (1.0, 3.0), "none", 0),
    "AdaGrad": (lambda lr: optim.AdaGrad(lr), (0.01, 0.03, 0.1, 0.3), "diagonal, accumulated g²", P),
    "Adam": (lambda lr: optim.Adam(lr), (0.003, 0.01, 0.03, 0.1), "diagonal, moving average of g²", 2 * P),
    "K-FAC": (lambda lr: optim.KFAC(lr, damping_mode="tikhonov", fisher_type="type-2", ema_decay=0.0,
                                        inverse_every=1, kl_clip=None), (0.1, 0.3, 0.5),
              "Kronecker-factored Fisher blocks", kfac_mem),
}
results = {}
for name, (make, lrs, curv, mem) in methods.items():
    runs = [(lr, r) for lr in lrs if (r := run_refngd(make, lr)) is not None and np.isfinite(r[0][-1])]
    lr, r = min(runs, key=lambda c: c[1][0][-1])
    results[name] = dict(lr=lr, curve=r[0], wall=r[1], evals=r[2], curvature=curv, memory=mem)
c, wall, ev, _ = run_lbfgs()
results["L-BFGS"] = dict(lr=None, curve=c, wall=wall, evals=ev, curvature=f"rank-{2 * m} inverse-Hessian (m = {m})",
                         memory=2 * m * P)


def to_target(curve):
    hit = np.nonzero(curve <= target)[0]
    return int(hit[0]) if hit.size else None


rows = []
for name, r in results.items():
    hit = to_target(r["curve"])
    rows.append([name, r["curvature"], f"{r['memory']:,}", f"{r['evals']:.2f}", f"{1e3 * r['wall']:.2f}",
                 "—" if hit is None else str(hit), f"{r['curve'][min(iters, len(r['curve']) - 1)]:.4f}",
                 "—" if r["lr"] is None else f"{r['lr']:g}"])
print(f"P = {P} parameters (P² = {P * P:,}); target loss {target}; {iters} iterations; full batch N = {N}")
print(format_table(["method", "curvature", "floats stored", "grads/iter", "ms/iter", "iters to target",
                    f"loss @ {iters}", "best lr"], rows))

assert results["L-BFGS"]["memory"] < P * P and kfac_mem < P * P, "neither stores the full P × P matrix"
for name, r in results.items():
    assert r["curve"][-1] < r["curve"][0], f"{name} must decrease the loss"
slow = [to_target(results[k]["curve"]) for k in ("SGD", "AdaGrad")]
for k in ("K-FAC", "L-BFGS"):
    hit = to_target(results[k]["curve"])
    assert hit is not None and all(s is None or hit < s for s in slow), \
        f"{k} should reach the target in fewer iterations than SGD and AdaGrad"

# --- figure -------------------------------------------------------------------------------------
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, r in results.items():
    lab = name + ("" if r["lr"] is None else f" (lr {r['lr']:g})")
    ax.semilogy(r["curve"], label=lab)
ax.axhline(target, color="k", lw=0.5, ls="--")
ax.set_xlabel("iteration")
ax.set_ylabel("training loss (full batch)")
ax.set_title(f"One problem, five optimizers (P = {P})")
ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=80)
print(f"figure: {args.out}")
