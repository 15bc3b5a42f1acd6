"""How close is each approximate natural gradient to the exact one, as the damping varies?

Wu et al. (2024) measure an update direction d by γ(d) = √(dᵀFd) / |dᵀg| with the exact
Fisher F.  By Cauchy–Schwarz in the F inner product (g lies in the range of F),
|dᵀg| = |dᵀF·F⁺g| ≤ √(dᵀFd)·√(gᵀF⁺g), so γ(d) ≥ γ(F⁺g) for *every* d: the undamped
natural gradient is the optimum.  We plot γ(d)/γ(g) (below 1 beats SGD) for NGD, EF, iEF,
SF and K-FAC, each damped as (M + λI)⁻¹g, on a small MLP on scikit-learn's digits after a
little SGD training.  EF and SF swing with λ, iEF barely moves: its robustness to damping.

    python examples/gamma_vs_damping.py [--out examples_out/gamma_vs_damping.png]
"""
import argparse
import os

try:
    import matplotlib
    import sklearn  # noqa: F401  (the bundled digits)
except ModuleNotFoundError as err:  # a core-only install: name the extra, in one line
    raise SystemExit(f"this example needs {err.name}: pip install 'refngd[cli]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import refngd
from refngd import losses, nn, updates
from refngd.curvature import Fisher
from refngd.metrics import gamma_ratio
from refngd.experiments.data import load_digits
from refngd.experiments.plots import STYLE  # the colours of `refngd compare`'s figures

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/gamma_vs_damping.png")
args = parser.parse_args()

# --- data (standardised 8×8 digits, 64 features) and a 64-32-10 tanh MLP ---------------
data = load_digits().for_model("mlp")
X_train, y_train = data.X_train, data.y_train
rng = np.random.default_rng(0)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
theta = model.init(rng)
loss = losses.CrossEntropy()                       # c = 1/N

# 100 SGD steps: at initialisation every method looks alike; partly trained they do not.
for _ in range(100):
    idx = rng.choice(len(X_train), 128, replace=False)
    theta = theta - 0.3 * refngd.gradient(model, theta, loss, X_train[idx], y_train[idx])
print(f"train loss after 100 SGD steps: {refngd.loss_value(model, theta, loss, X_train, y_train):.3f}")

# --- one batch: the exact Fisher (R = N·(C−1) = 576 rows < P = 2410) and the gradient ----
X, y = X_train[:64], y_train[:64]
lin = model.linearize(theta, X)                    # one forward pass, shared by everything
F = Fisher(model, theta, loss, X, y, linearization=lin)
g = refngd.gradient(model, theta, loss, X, y)
best = gamma_ratio(F.solve(g, 0.0), F, g)          # λ = 0: the minimum-norm F⁺g

dampings = np.logspace(-8, 2, 21)
kw = dict(linearization=lin)
methods = {
    "NGD": lambda lam: updates.ngd(model, theta, loss, X, y, lam, **kw),
    "EF": lambda lam: updates.ef(model, theta, loss, X, y, lam, form="tikhonov", **kw),
    "iEF": lambda lam: updates.ief(model, theta, loss, X, y, lam, form="tikhonov", **kw),
    # the same sampled labels (seed 1) at every λ
    "SF": lambda lam: updates.sf(model, theta, loss, X, y, lam, rng=np.random.default_rng(1), **kw),
    "K-FAC": lambda lam: updates.kfac(model, theta, loss, X, y, lam, **kw),
}
ratios = {name: np.array([gamma_ratio(fn(lam), F, g) for lam in dampings])
          for name, fn in methods.items()}

print(f"\nγ(d)/γ(g) of the undamped natural gradient F⁺g: {best:.4f}")
print(f"{'method':6s} " + " ".join(f"{lam:8.0e}" for lam in dampings[::4]) + "   max/min over λ")
for name, r in ratios.items():
    print(f"{name:6s} " + " ".join(f"{v:8.3f}" for v in r[::4]) + f"   {r.max() / r.min():.2f}")

# The claim: no direction beats F⁺g, at any damping (1e-9: round-off in γ).
for name, r in ratios.items():
    assert np.all(r >= best * (1 - 1e-9)), f"{name} beats the exact natural gradient: {r.min()} < {best}"
# ... and damped NGD tends to it as λ → 0.
assert abs(ratios["NGD"][0] - best) < 1e-6 * best

# --- figure -------------------------------------------------------------------------
fig, ax = plt.subplots(figsize=(6.5, 4))
for name, r in ratios.items():
    color, ls = STYLE[name.lower().replace("-", "")]
    ax.plot(dampings, r, marker="o", ms=3, color=color, ls=ls, label=name)
ax.axhline(best, color="k", ls="--", lw=0.8, label="undamped NGD (optimum)")
ax.axhline(1.0, color="gray", ls=":", lw=0.8, label="SGD")
ax.set_xscale("log")
ax.set_xlabel("damping λ in (M + λI)⁻¹ g")
ax.set_ylabel("γ(d) / γ(g)   (lower is better)")
ax.set_title("Update quality vs damping, MLP on digits")
ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=110)
print(f"figure: {args.out}")
