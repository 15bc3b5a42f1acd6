"""Hessian, Fisher (= GGN) and empirical Fisher of a small network, side by side.

For a softmax cross-entropy network z = f(x; θ) with per-sample loss l_n, the Hessian
of the batch loss splits into the generalised Gauss–Newton matrix plus a residual term
(Martens 2020, "New insights and perspectives on the natural gradient method"):

    ∇²L = c Σ_n J_nᵀ H_n J_n  +  c Σ_n Σ_k e_nk ∇²z_nk,        e_n = ∂l_n/∂z_n.

The first term is the Fisher of the model's predictive distribution; the empirical Fisher
c Σ_n g_n g_nᵀ is a third matrix (Kunstner et al. 2019).  What the example measures:

1. the Fisher is positive *semi*-definite, and singular: rank ≤ N(C − 1) < P here;
2. the Hessian is indefinite away from a minimum, and ∇²L − F has eigenvalues of both
   signs, so the Fisher is neither a lower nor an upper bound of the Hessian;
3. the Fisher *is* the Hessian averaged over labels drawn from the model itself
   (E_{y ~ p(y|x)} e_n = 0 kills the residual term) — computed exactly, label by label;
4. at a zero-residual minimum (MSE, targets the network fits exactly) Hessian = GGN,
   while the empirical Fisher is exactly zero there.

The Hessian comes from HIPS autograd on an independent autograd.numpy copy of the network
(checked against refngd's loss and gradient), the Fisher and EF from refngd.

    python examples/fisher_vs_hessian.py [--out examples_out/fisher_vs_hessian.png]
"""
import argparse
import os

import autograd
import autograd.numpy as anp
try:
    import matplotlib
except ModuleNotFoundError:  # a core-only install: name the extra, in one line
    raise SystemExit("this example needs matplotlib: pip install 'refngd[plot]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

import refngd
from refngd import curvature, losses, nn

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/fisher_vs_hessian.png")
args = parser.parse_args()

rng = np.random.default_rng(1)
N, D, H, C = 4, 2, 4, 3
model = nn.Sequential(nn.Linear(D, H), nn.Tanh(), nn.Linear(H, C))
theta = 1.5 * model.init(rng)
P = model.num_params
X = rng.standard_normal((N, D))
y = rng.integers(0, C, N)
ce = losses.CrossEntropy()                    # mean: c = 1/N


def mlp(t, Xb):
    """The same network in autograd.numpy; θ in PyTorch order (W1 row-major, b1, W2, b2)."""
    W1, b1 = t[:H * D].reshape(H, D), t[H * D:H * D + H]
    o = H * D + H
    W2, b2 = t[o:o + C * H].reshape(C, H), t[o + C * H:]
    return anp.dot(anp.tanh(anp.dot(Xb, W1.T) + b1), W2.T) + b2


def ce_sum(t, Xb, labels):
    Z = mlp(t, Xb)
    m = anp.max(Z, axis=1, keepdims=True)
    lse = m[:, 0] + anp.log(anp.sum(anp.exp(Z - m), axis=1))
    return anp.sum(lse - Z[anp.arange(len(labels)), labels])


hess = autograd.hessian(ce_sum)
assert abs(ce_sum(theta, X, y) / N - refngd.loss_value(model, theta, ce, X, y)) < 1e-12
assert np.allclose(autograd.grad(ce_sum)(theta, X, y) / N, refngd.gradient(model, theta, ce, X, y),
                   rtol=0, atol=1e-12), "the autograd copy must be the same network"

Hs = hess(theta, X, y) / N
F = curvature.Fisher(model, theta, ce, X, y).dense()
EF = curvature.EmpiricalFisher(model, theta, ce, X, y).dense()
eig = {name: np.linalg.eigvalsh(M) for name, M in [("Hessian", Hs), ("Fisher / GGN", F), ("empirical Fisher", EF)]}
tol = 1e-10 * eig["Fisher / GGN"].max()
rank_F = int(np.sum(eig["Fisher / GGN"] > tol))
print(f"P = {P}, N = {N}, C = {C}: rank F = {rank_F} (≤ N(C−1) = {N * (C - 1)}), "
      f"min eig F = {eig['Fisher / GGN'].min():.1e}, rank EF = {int(np.sum(eig['empirical Fisher'] > tol))}")
assert eig["Fisher / GGN"].min() > -tol, "the Fisher is positive semi-definite"
assert rank_F == N * (C - 1) < P, "…and singular: not 'always positive definite'"
lo, hi = eig["Hessian"].min(), eig["Hessian"].max()
d = np.linalg.eigvalsh(Hs - F)
print(f"Hessian eigenvalues in [{lo:.3f}, {hi:.3f}]; Hessian − Fisher in [{d.min():.3f}, {d.max():.3f}]")
assert lo < -1e-3 * hi, "the Hessian is indefinite here"
assert d.min() < -1e-4 and d.max() > 1e-4, "the Fisher is no bound on the Hessian, in either direction"

# --- 3. the Fisher is the Hessian's expectation under the model's own labels (exact sum)
Z = model.forward(theta, X)
p = np.exp(Z - Z.max(1, keepdims=True))
p /= p.sum(1, keepdims=True)
H_model = sum(p[n, k] * hess(theta, X[n:n + 1], np.array([k])) for n in range(N) for k in range(C)) / N
err_expected = refngd.metrics.relative_error(H_model, F)
print(f"‖E_{{y~model}}[∇²L] − F‖ / ‖F‖ = {err_expected:.1e}")
assert err_expected < 1e-10, "the expected Hessian under the model's labels is the Fisher"

# --- 4. a zero-residual minimum of the squared error: Hessian = GGN, EF = 0 ----------------
mse = losses.MSELoss()
Y = model.forward(theta, X)                   # targets the network fits exactly at θ
mse_sum = lambda t: anp.sum((mlp(t, X) - Y) ** 2)
H_mse = autograd.hessian(mse_sum)(theta) / (N * C)
F_mse = curvature.Fisher(model, theta, mse, X, Y).dense()
EF_mse = curvature.EmpiricalFisher(model, theta, mse, X, Y).dense()
err_zero = refngd.metrics.relative_error(H_mse, F_mse)
print(f"zero residual: ‖∇²L − GGN‖ / ‖GGN‖ = {err_zero:.1e}, ‖EF‖ = {np.abs(EF_mse).max():.1e}")
assert err_zero < 1e-10, "at a zero-residual minimum the Hessian is the Gauss-Newton matrix"
assert np.abs(EF_mse).max() == 0.0, "…and the empirical Fisher vanishes there"

# --- figure: sorted spectra (symlog) --------------------------------------------------------
fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
for (name, w), m in zip(eig.items(), "os^"):
    axes[0].plot(np.sort(w)[::-1], m + "-", ms=4, label=name)
axes[0].set_yscale("symlog", linthresh=1e-6)
axes[0].axhline(0, color="k", lw=0.5)
axes[0].set_xlabel("index (sorted)")
axes[0].set_ylabel("eigenvalue")
axes[0].set_title(f"Spectra at a random θ (P = {P}, N = {N}, C = {C})")
axes[0].legend(fontsize=8)
axes[1].plot(np.sort(d)[::-1], "d-", ms=4, color="tab:purple")
axes[1].set_yscale("symlog", linthresh=1e-6)
axes[1].axhline(0, color="k", lw=0.5)
axes[1].set_title("Hessian − Fisher: both signs (no bound)")
axes[1].set_xlabel("index (sorted)")
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=80)
print(f"figure: {args.out}")
