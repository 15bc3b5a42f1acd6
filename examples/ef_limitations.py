"""The empirical Fisher is not the Fisher: Kunstner et al. (2019), Figure 1, recomputed.

Linear regression z = θ₀x + θ₁ under the squared error (``MSELoss``, the negative
log-likelihood of a Gaussian with variance ½).  Its Fisher is the constant Gauss–Newton
matrix F = 2c ĀᵀĀ (Ā = [x, 1]) — here equal to the Hessian — so the natural gradient
F⁻¹g = θ − θ* points straight at the least-squares solution from everywhere, and one
step with learning rate 1 lands on it.  The empirical Fisher F̃ = c Σ_n g_n g_nᵀ weights
each sample by its squared residual; its preconditioned field F̃⁻¹g bends away from θ*
(Kunstner, Balles & Hennig 2019, "Limitations of the empirical Fisher approximation for
natural gradient descent", Fig. 1).

Asserted: NGD's direction is parallel to θ − θ* at every grid point (cosine 1 to round-off)
and one NGD step solves the problem from every start; EF's direction deviates by more than
25° somewhere, and EF descent with its best step size (from a grid) is still far from θ*
after 50 steps from some start.

    python examples/ef_limitations.py [--out examples_out/ef_limitations.png]
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
from refngd.metrics import cosine_similarity

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/ef_limitations.png")
args = parser.parse_args()

rng = np.random.default_rng(0)
N = 50
x = rng.standard_normal((N, 1)) + 1.0
y = 2.0 * x + 1.0 + rng.standard_normal((N, 1))
model = nn.Sequential(nn.Linear(1, 1))          # θ = (weight, bias)
loss = losses.MSELoss()
A_bar = np.hstack([x, np.ones((N, 1))])
theta_star = np.linalg.lstsq(A_bar, y[:, 0], rcond=None)[0]   # the independent reference
lam = 1e-10                                                    # as small as round-off allows

directions = {
    "GD": lambda t: updates.sgd(model, t, loss, x, y),
    "NGD": lambda t: updates.ngd(model, t, loss, x, y, damping=lam),
    "EF": lambda t: updates.ef(model, t, loss, x, y, damping=lam),
}

# --- fields: cosine between each direction and θ − θ* on a grid ----------------------------
u = np.linspace(theta_star[0] - 3, theta_star[0] + 3, 13)
v = np.linspace(theta_star[1] - 3, theta_star[1] + 3, 13)
grid = [np.array([a, b]) for b in v for a in u if np.hypot(a - theta_star[0], b - theta_star[1]) > 0.2]
cos = {k: np.array([cosine_similarity(f(t), t - theta_star) for t in grid]) for k, f in directions.items()}
for k, c in cos.items():
    print(f"{k:3s}: cos(direction, θ − θ*) over the grid in [{c.min():.4f}, {c.max():.4f}]")
assert cos["NGD"].min() > 1 - 1e-9, "the natural gradient points at θ* from everywhere"
assert np.degrees(np.arccos(cos["EF"].min())) > 25, "the EF field should bend away from θ*"

# --- trajectories: NGD with lr 1; EF and GD with the best lr of a grid ---------------------
starts = [theta_star + np.array(s) for s in [(-2.5, 2.5), (2.5, 2.0), (-2.0, -2.5), (2.5, -2.5)]]
steps = 50


def descend(f, t0, lr, n):
    out = [t0]
    with np.errstate(all="ignore"):
        for _ in range(n):
            out.append(out[-1] - lr * f(out[-1]))
    return np.array(out)


def best(f, t0):
    runs = [descend(f, t0, lr, steps) for lr in (0.01, 0.03, 0.1, 0.3, 1.0)]
    ok = [r for r in runs if np.all(np.isfinite(r))]
    return min(ok, key=lambda r: np.linalg.norm(r[-1] - theta_star))


paths = {"NGD": [descend(directions["NGD"], s, 1.0, 1) for s in starts],
         "GD": [best(directions["GD"], s) for s in starts],
         "EF": [best(directions["EF"], s) for s in starts]}
ngd_err = max(np.linalg.norm(p[-1] - theta_star) for p in paths["NGD"])
ef_err = max(np.linalg.norm(p[-1] - theta_star) / np.linalg.norm(p[0] - theta_star) for p in paths["EF"])
print(f"one NGD step (lr 1): max ‖θ₁ − θ*‖ = {ngd_err:.1e}; EF after {steps} steps (best lr): "
      f"worst relative distance to θ* = {ef_err:.3f}")
assert ngd_err < 1e-7, "one NGD step must solve linear least squares"
assert ef_err > 0.05, "EF descent should still be far from θ* from some start"

# --- figure -------------------------------------------------------------------------------
U, V = np.meshgrid(np.linspace(u[0], u[-1], 60), np.linspace(v[0], v[-1], 60))
Lg = np.array([[refngd.loss_value(model, np.array([a, b]), loss, x, y) for a, b in zip(ra, rb)]
               for ra, rb in zip(U, V)])
fig, axes = plt.subplots(1, 4, figsize=(15, 4.4))
axes[0].plot(x[:, 0], y[:, 0], ".", color="0.3", label=f"data (N = {N})")
xs = np.linspace(x.min(), x.max(), 2)
axes[0].plot(xs, theta_star[0] * xs + theta_star[1], "k-", lw=1,
             label=f"least squares: z = {theta_star[0]:.2f}x + {theta_star[1]:.2f}")
axes[0].set_title("data and least-squares fit")
axes[0].set_xlabel("input x")
axes[0].set_ylabel("target y")
axes[0].legend(loc="upper left", fontsize=8)
for ax, name in zip(axes[1:], ["GD", "NGD", "EF"]):
    ax.contour(U, V, Lg, levels=15, colors="0.8", linewidths=0.7)
    for t in grid[::2]:
        d = -directions[name](t)
        d = 0.35 * d / np.linalg.norm(d)
        ax.arrow(t[0], t[1], d[0], d[1], head_width=0.08, color="0.55", lw=0.6)
    for p in paths[name]:
        ax.plot(p[:, 0], p[:, 1], "o-", ms=2.5, lw=1.2)
    ax.plot(*theta_star, "k*", ms=12, zorder=5)
    ax.set_title(f"{name} field and paths" + (" (lr 1, one step)" if name == "NGD" else " (best lr)"))
    ax.set_xlabel("θ₀ (slope)")
axes[1].set_ylabel("θ₁ (intercept)")
# one legend for the three field panels: what the star, arrows, contours and lines are
handles = [plt.Line2D([], [], ls="", marker="*", color="k", ms=12,
                      label="θ* (least-squares solution)"),
           plt.Line2D([], [], ls="", marker=r"$\rightarrow$", color="0.55", ms=12,
                      label="field: the update direction −d, normalised"),
           plt.Line2D([], [], color="0.8", lw=0.8, label="loss contours"),
           plt.Line2D([], [], color="C0", marker="o", ms=2.5, lw=1.2,
                      label=f"paths from 4 starts (one colour each; ≤ {steps} steps)")]
fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=9, frameon=False)
fig.tight_layout(rect=(0, 0.07, 1, 1))
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=70)
print(f"figure: {args.out}")
