"""Quickstart: the exact natural gradient of a small MLP, and how EF, iEF and SF compare.

    python examples/quickstart.py
"""
import argparse

import numpy as np

import refngd
from refngd import losses, metrics, nn, updates
from refngd.curvature import Fisher

# no options: an unknown one (e.g. --out) is an error, not silently ignored
argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()

rng = np.random.default_rng(0)
model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 5))
theta = model.init(rng)                      # θ in PyTorch's parameters_to_vector order
X, y = rng.standard_normal((128, 20)), rng.integers(0, 5, 128)
loss = losses.CrossEntropy()                 # reduction="mean", as torch.nn.CrossEntropyLoss

g = refngd.gradient(model, theta, loss, X, y)
F = Fisher(model, theta, loss, X, y)         # exact Fisher = GGN, never formed as P x P
print(f"{model.num_params} parameters, Gram matrix {F.gram().shape}, tr F = {F.trace():.4f}")

lam = 1e-4
directions = {
    "SGD": g,
    "NGD": updates.ngd(model, theta, loss, X, y, damping=lam),
    "EF": updates.ef(model, theta, loss, X, y, damping=lam),
    "iEF": updates.ief(model, theta, loss, X, y, damping=lam),
    "SF": updates.sf(model, theta, loss, X, y, damping=lam, mc_samples=1, rng=rng),
}
print("gamma(d)/gamma(g) (Wu et al. 2024, eq. 15; lower is closer to NGD):")
for name, d in directions.items():
    print(f"  {name:4s} {metrics.gamma_ratio(d, F, g):.4f}")
