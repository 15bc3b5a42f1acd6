"""Natural gradient is invariant to reparameterisation; plain gradient descent is not.

A model with a real likelihood, so that its Fisher exists: logistic regression
p(y = 1 | x) = σ(θ₀x₁ + θ₁x₂) on 2-D inputs (``BCEWithLogits``, the Bernoulli negative
log-likelihood).  Reparameterise θ₁ = 10·φ₁ (θ = Jφ, J = diag(1, 10)): the same model
is then a logistic regression in φ on the inputs x·J.  refngd computes both Fisher
matrices from scratch, one per parameterisation; no Jacobian is applied by hand.

* Gradient descent follows g_φ = Jᵀg_θ, so its path, mapped back to θ, moves by J Jᵀ g_θ:
  a different path.
* Natural gradient descent follows F_φ⁻¹ g_φ = J⁻¹ F_θ⁻¹ g_θ (F_φ = Jᵀ F_θ J), so for any
  invertible linear J the discrete paths coincide exactly (Amari 1998; Martens 2020,
  on parameterisation invariance — for a nonlinear reparameterisation only the
  continuous-time path is invariant).
* Where invariance breaks: damping, (F_φ + λI)⁻¹ ≠ J⁻¹(F_θ + λI)⁻¹J⁻ᵀ, and λ = 0 with
  fewer rows than parameters (R < P), where F⁺g is the minimum-norm solution — minimum
  norm in whichever coordinates are used.  Both still change the outputs identically.

    python examples/geometry_2d.py [--out examples_out/geometry_2d.png]
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
parser.add_argument("--out", default="examples_out/geometry_2d.png")
args = parser.parse_args()

# --- data from a logistic model with θ_true = (1, -0.5) (not separable: an optimum exists)
rng = np.random.default_rng(0)
N = 60
X = rng.standard_normal((N, 2))
y = (rng.random((N, 1)) < 1 / (1 + np.exp(-X @ np.array([1.0, -0.5]))[:, None])).astype(float)

J = np.diag([1.0, 10.0])                  # θ = J φ
model = nn.Sequential(nn.Linear(2, 1, bias=False))   # the same layer in both coordinates
loss = losses.BCEWithLogits()
Xphi = X @ J                              # z = θᵀx = φᵀ(Jᵀx): the inputs seen by φ


def path(direction, theta0, Xc, steps, lr):
    """Iterates θ_{t+1} = θ_t − lr·direction(θ_t) in one coordinate system."""
    out = [theta0]
    for _ in range(steps):
        out.append(out[-1] - lr * direction(out[-1], Xc))
    return np.array(out)


gd = lambda t, Xc: updates.sgd(model, t, loss, Xc, y)
ngd = lambda lam: (lambda t, Xc: updates.ngd(model, t, loss, Xc, y, damping=lam))

theta0 = np.array([-2.0, 2.0])
phi0 = np.linalg.solve(J, theta0)
steps = 12
paths = {}
for name, fn, lr in [("GD", gd, 0.1), ("NGD", ngd(0.0), 0.25), ("NGD, λ = 0.05", ngd(0.05), 0.25)]:
    in_theta = path(fn, theta0, X, steps, lr)
    in_phi = path(fn, phi0, Xphi, steps, lr) @ J.T     # mapped back: θ = Jφ
    paths[name] = (in_theta, in_phi)

gap = {name: float(np.max(np.linalg.norm(a - b, axis=1))) for name, (a, b) in paths.items()}
for name, v in gap.items():
    print(f"{name:15s} max ‖θ-path − J·φ-path‖ = {v:.3e}")
assert gap["NGD"] < 1e-10, "undamped NGD must follow the same path in both parameterisations"
assert gap["GD"] > 0.5, "gradient descent should depend on the parameterisation"
assert gap["NGD, λ = 0.05"] > 1e-3, "damping should break the invariance measurably"

# --- λ = 0 with R < P: one sample, one row, two parameters --------------------------------
x1, y1 = X[:1], y[:1]
d_theta = updates.ngd(model, theta0, loss, x1, y1, damping=0.0)
d_phi = J @ updates.ngd(model, phi0, loss, x1 @ J, y1, damping=0.0)
out_gap = abs((x1 @ (d_theta - d_phi)).item())               # change of the output z
print(f"R = 1 < P = 2, λ = 0: ‖d_θ − J d_φ‖ = {np.linalg.norm(d_theta - d_phi):.3f}, "
      f"output change differs by {out_gap:.1e}")
assert np.linalg.norm(d_theta - d_phi) > 0.1, "minimum-norm F⁺g depends on the coordinates"
assert out_gap < 1e-10, "…but both directions change the model output identically"

# --- figure: loss contours, normalised fields, paths ---------------------------------------
a = np.linspace(-3, 3, 41)
T0, T1 = np.meshgrid(a, np.linspace(-3, 3, 41))
Lgrid = np.array([[refngd.loss_value(model, np.array([u, v]), loss, X, y) for u in a] for v in T1[:, 0]])
fig, axes = plt.subplots(1, 2, figsize=(11, 6.4))
for ax, (title, field) in zip(axes, [("−gradient field", gd), ("−natural-gradient field", ngd(0.0))]):
    ax.contour(T0, T1, Lgrid, levels=20, colors="0.8", linewidths=0.7)
    q = np.linspace(-2.7, 2.7, 10)
    for u in q:
        for v in q:
            d = -field(np.array([u, v]), X)
            d = 0.25 * d / np.linalg.norm(d)
            ax.arrow(u, v, d[0], d[1], head_width=0.06, color="0.5", lw=0.6)
    ax.set_title(title)
    ax.set_xlabel("θ₀")
    ax.set_ylabel("θ₁")
styles = {"GD": "tab:red", "NGD": "tab:blue", "NGD, λ = 0.05": "tab:green"}
for name, (pt, pp) in paths.items():
    ax = axes[0] if name == "GD" else axes[1]
    ax.plot(pt[:, 0], pt[:, 1], "o-", color=styles[name], ms=3, label=f"{name} in θ")
    ax.plot(pp[:, 0], pp[:, 1], "x--", color=styles[name], ms=5, label=f"{name} in φ (θ₁ = 10φ₁), mapped")
for ax in axes:
    # below the axes, at a readable size; the grey marks are explained there too
    handles, _ = ax.get_legend_handles_labels()
    handles += [plt.Line2D([], [], ls="", marker=r"$\rightarrow$", color="0.5", ms=12,
                           label="the field's direction, normalised"),
                plt.Line2D([], [], color="0.8", lw=0.8, label="loss contours")]
    ax.legend(handles=handles, fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.13),
              ncol=1, frameon=False)
    ax.set_xlim(-3, 3)
    ax.set_ylim(-3, 3)
fig.suptitle("Reparameterising θ₁ = 10φ₁ changes GD's path, not NGD's (unless damped)")
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=80, bbox_inches="tight")
print(f"figure: {args.out}")
