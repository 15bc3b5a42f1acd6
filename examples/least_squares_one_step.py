"""Exact NGD with learning rate 1 solves linear least squares in one step.

For a linear model z = Āθ (Ā = [X, 1]) under the squared error, the Fisher is the
Gauss–Newton matrix F = 2c ĀᵀĀ and the gradient is g = 2c Āᵀ(Āθ − y), so
θ − F⁻¹g = θ − (ĀᵀĀ)⁻¹Āᵀ(Āθ − y) = (ĀᵀĀ)⁻¹Āᵀy: Newton's step on a quadratic, landing on
the least-squares solution from any start.  SGD on the same badly scaled problem
crawls, whatever its learning rate.

    python examples/least_squares_one_step.py [--out examples_out/least_squares_one_step.png]
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
from refngd.metrics import relative_error
from refngd.experiments.plots import STYLE  # the colours of `refngd compare`'s figures

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/least_squares_one_step.png")
args = parser.parse_args()

# --- a badly conditioned regression problem: feature scales from 1 to 30 -----------------
rng = np.random.default_rng(0)
N, d = 200, 8
X = rng.standard_normal((N, d)) * np.logspace(0, 1.5, d)
w_true = rng.standard_normal(d)
y = (X @ w_true + 0.5 + 0.1 * rng.standard_normal(N))[:, None]   # targets (N, 1)

model = nn.Sequential(nn.Linear(d, 1))            # θ = [w (1×d, row-major), b]
loss = losses.MSELoss()                           # = torch.nn.MSELoss(), c = 1/(N·1)
theta0 = model.init(rng)

# --- ground truth from NumPy: argmin ‖Āθ − y‖² ----------------------------------------
A_bar = np.hstack([X, np.ones((N, 1))])
theta_star = np.linalg.lstsq(A_bar, y[:, 0], rcond=1e-12)[0]
loss_star = refngd.loss_value(model, theta_star, loss, X, y)

# --- one exact natural-gradient step, lr = 1, tiny damping -----------------------------
direction = updates.ngd(model, theta0, loss, X, y, damping=1e-10)
theta1 = theta0 - direction
err = relative_error(theta1, theta_star)
print(f"P = {model.num_params} parameters, N = {N} samples, cond(Ā) = {np.linalg.cond(A_bar):.0f}")
print(f"‖θ − d − θ_lstsq‖ / ‖θ_lstsq‖ = {err:.2e}")
print(f"loss: start {refngd.loss_value(model, theta0, loss, X, y):.4f}, after one NGD step "
      f"{refngd.loss_value(model, theta1, loss, X, y):.6f}, optimum {loss_star:.6f}")
assert err < 1e-7, "one NGD step with lr 1 must land on the least-squares solution"

# --- 20 steps of each: NGD (stays at the optimum) and SGD at the best of a few lrs --------
steps = 20

def run(step_fn, lr):
    theta, curve = theta0.copy(), [refngd.loss_value(model, theta0, loss, X, y)]
    for _ in range(steps):
        theta = theta - lr * step_fn(theta)
        curve.append(refngd.loss_value(model, theta, loss, X, y))
    return np.array(curve)

ngd_curve = run(lambda t: updates.ngd(model, t, loss, X, y, damping=1e-10), 1.0)
sgd_curves = {}
for lr in (1e-4, 3e-4, 1e-3, 3e-3):
    with np.errstate(over="ignore", invalid="ignore"):
        c = run(lambda t: updates.sgd(model, t, loss, X, y), lr)
    if np.all(np.isfinite(c)) and c[-1] < c[0]:   # a diverged run is not a candidate
        sgd_curves[lr] = c
    else:
        print(f"SGD lr {lr:g} diverges (lr > 2/λ_max of the Hessian)")
best_lr = min(sgd_curves, key=lambda lr: sgd_curves[lr][-1])
sgd_curve = sgd_curves[best_lr]
print(f"after {steps} steps: NGD {ngd_curve[-1]:.6f}, SGD (best lr {best_lr:g}) {sgd_curve[-1]:.4f}")
assert np.allclose(ngd_curve[1:], loss_star, rtol=1e-8), "NGD must stay at the optimum"
assert sgd_curve[-1] > loss_star * (1 + 1e-3), "SGD should not have converged yet"

# --- figure -------------------------------------------------------------------------
fig, ax = plt.subplots(figsize=(6, 3.8))
ax.semilogy(np.maximum(sgd_curve - loss_star, 1e-16), "o-", ms=3, color=STYLE["sgd"][0],
            label=f"SGD, best lr = {best_lr:g}")
ax.semilogy(np.maximum(ngd_curve - loss_star, 1e-16), "s-", ms=3, color=STYLE["ngd"][0],
            label="exact NGD, lr = 1")
ax.set_xlabel("step")
ax.set_ylabel("loss − least-squares optimum")
ax.set_title("Linear least squares: NGD converges in one step")
ax.legend()
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=110)
print(f"figure: {args.out}")
