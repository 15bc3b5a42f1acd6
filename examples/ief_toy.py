"""EF's inversely-scaled projection and the improved EF that fixes it (Wu et al. 2024).

Least squares on the two points {(0, 0), (1, 0)} with f(x) = θ₀ + θ₁x (``MSELoss``,
e_n = 2(z_n − y_n)): P = N = 2, so every undamped update of the Gram form is fixed by
what it does to each sample's output.  With G = [g_1; g_2], g_n = e_n ∇_θ z_n
(Wu, Yu, Zhang & Woodland 2024, "An improved empirical Fisher approximation for natural
gradient descent", eq. 4 and 8):

* EF:  G Δ = 1   ⇒  Δz_n = 1 / e_n   — a sample that is almost fitted moves the most;
* iEF: G Δ = s, s_n = ‖e_n‖²  ⇒  Δz_n = e_n — each output moves along its own residual,
  which here is exactly twice the Gauss–Newton / NGD step (z − y = e/2).

The same holds for logistic regression (``BCEWithLogits``, two samples, P = 2, after the
logistic toy of the same paper): EF moves each logit by 1/e_n, iEF by e_n, NGD by
e_n/(σ(1 − σ)) — the right-hand panel shows the three against |e_n| over random θ.  Asserted: G Δ_EF = 1 and G Δ_iEF = s to
round-off, Δ_iEF = 2 Δ_NGD for least squares, EF stalls at a fixed learning rate while
iEF and NGD converge.

    python examples/ief_toy.py [--out examples_out/ief_toy.png]
"""
import argparse
import os

try:
    import matplotlib
except ModuleNotFoundError:  # a core-only install: name the extra, in one line
    raise SystemExit("this example needs matplotlib: pip install 'refngd[plot]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import refngd
from refngd import losses, nn, updates

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/ief_toy.png")
args = parser.parse_args()

model = nn.Sequential(nn.Linear(1, 1))           # θ = (θ₁ slope, θ₀ intercept) in θ's order
X = np.array([[0.0], [1.0]])
Y = np.zeros((2, 1))
mse = losses.MSELoss()
Abar = np.hstack([X, np.ones((2, 1))])           # ∂z_n/∂θ, the independent reference

methods = {
    "GD": lambda t: updates.sgd(model, t, mse, X, Y),
    "EF": lambda t: updates.ef(model, t, mse, X, Y, damping=0.0, form="gram"),
    "iEF": lambda t: updates.ief(model, t, mse, X, Y, damping=0.0, form="gram"),
    "NGD": lambda t: updates.ngd(model, t, mse, X, Y, damping=0.0),
}

# --- the projections, checked at random points ----------------------------------------------
rng = np.random.default_rng(0)
worst = {"EF": 0.0, "iEF": 0.0, "iEF = 2 NGD": 0.0}
for t in rng.standard_normal((20, 2)) * 2:
    e = 2 * (Abar @ t - Y[:, 0])                    # e_n = 2 (z_n − y_n)
    dz = {k: Abar @ methods[k](t) for k in ("EF", "iEF", "NGD")}
    worst["EF"] = max(worst["EF"], np.max(np.abs(e * dz["EF"] - 1)))        # g_nᵀΔ = 1
    worst["iEF"] = max(worst["iEF"], np.max(np.abs(e * dz["iEF"] - e ** 2)))  # g_nᵀΔ = e_n²
    worst["iEF = 2 NGD"] = max(worst["iEF = 2 NGD"],
                               refngd.metrics.relative_error(methods["iEF"](t), 2 * methods["NGD"](t)))
print("least squares, max violation over 20 random θ: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
assert worst["EF"] < 1e-9, "EF must move every sample's loss by exactly 1 (G Δ = 1)"
assert worst["iEF"] < 1e-9, "iEF must move sample n's loss by ‖e_n‖² (G Δ = s)"
assert worst["iEF = 2 NGD"] < 1e-10, "for least squares with P = N, iEF is twice the NGD step"

# --- trajectories at one learning rate --------------------------------------------------------
theta0, lr, steps = np.array([1.5, 1.0]), 0.1, 60
paths = {}
for k, f in methods.items():
    p = [theta0]
    for _ in range(steps):
        p.append(p[-1] - lr * f(p[-1]))
    paths[k] = np.array(p)
final = {k: refngd.loss_value(model, p[-1], mse, X, Y) for k, p in paths.items()}
print(f"loss after {steps} steps at lr {lr}: " + ", ".join(f"{k} {v:.2e}" for k, v in final.items()))
assert final["NGD"] < 1e-4 and final["iEF"] < 1e-4, "iEF and NGD converge at this lr"
assert final["EF"] > 100 * final["iEF"], "EF's 1/e_n steps stall near the optimum"

# --- the logistic toy: per-sample logit change against |e_n| ---------------------------------
bce = losses.BCEWithLogits()
Yb = np.array([[1.0], [0.0]])
pts = {"EF": [], "iEF": [], "NGD": []}
for t in rng.standard_normal((60, 2)) * 3:
    e = bce.output_gradient(model.forward(t, X), Yb)[:, 0]
    for k, fn in [("EF", updates.ef), ("iEF", updates.ief)]:
        dz = Abar @ fn(model, t, bce, X, Yb, damping=0.0, form="gram")
        pts[k] += list(zip(np.abs(e), np.abs(dz)))
    pts["NGD"] += list(zip(np.abs(e), np.abs(Abar @ updates.ngd(model, t, bce, X, Yb, damping=0.0))))
ef_pts, ief_pts = np.array(pts["EF"]), np.array(pts["iEF"])
assert np.allclose(ef_pts[:, 0] * ef_pts[:, 1], 1, rtol=1e-8), "logistic EF: |Δz_n| = 1/|e_n|"
assert np.allclose(ief_pts[:, 1], ief_pts[:, 0], rtol=1e-8), "logistic iEF: |Δz_n| = |e_n|"
print(f"logistic toy: EF's |Δz_n|·|e_n| = 1 and iEF's |Δz_n| = |e_n| at {len(ef_pts)} (θ, n) pairs")

# --- figure -----------------------------------------------------------------------------------
fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
g = np.linspace(-2, 2, 9)
for ax, names in zip(axes[:2], [("GD", "EF"), ("iEF", "NGD")]):
    for k, col in zip(names, ("tab:red", "tab:blue")):
        for a in g:
            for b in g:
                t = np.array([a, b])
                if np.min(np.abs(Abar @ t)) < 1e-9:   # a fitted sample: EF undefined
                    continue
                d = -methods[k](t)
                d = 0.18 * d / np.linalg.norm(d)
                ax.arrow(a, b, d[0], d[1], head_width=0.05, color=col, alpha=0.45, lw=0.5)
        ax.plot(paths[k][:, 0], paths[k][:, 1], "o-", ms=2, color=col, label=f"{k} path (lr {lr})")
    ax.plot(0, 0, "k*", ms=10)
    ax.set_xlabel("θ slope")
    ax.set_ylabel("θ intercept")
    ax.legend(fontsize=8, loc="lower left")
axes[0].set_title("least squares on {(0,0), (1,0)}: GD and EF")
axes[1].set_title("iEF and NGD (same direction)")
for k, m in [("EF", "o"), ("iEF", "s"), ("NGD", "^")]:
    a = np.array(pts[k])
    axes[2].loglog(a[:, 0], a[:, 1], m, ms=3, alpha=0.6, label=k)
axes[2].set_xlabel("|e_n| (per-sample output gradient)")
axes[2].set_ylabel("|Δz_n| (logit change of sample n)")
axes[2].set_title("logistic toy: EF's inversely-scaled projection")
axes[2].legend(fontsize=8)
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=75)
print(f"figure: {args.out}")
