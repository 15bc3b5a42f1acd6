"""Validating your own PyTorch code against refngd: per-sample gradients, an EF update, K-FAC.

The workflow: build the model in PyTorch, copy its parameters into a refngd θ with
``parameters_to_vector`` (the same order, docs/conventions.md), compute a quantity both
ways and look at ``refngd.metrics.relative_error``.  Round-off gives ~1e-15 in float64;
a missing factor gives an error of order one.  Part (c) plants such a bug on purpose, and
part (d) lets ``refngd.check.validate`` name it (docs/validating.md).

    python examples/validate_pytorch.py [--out examples_out/validate_pytorch.png]
"""
import argparse
import os
import sys

try:
    import matplotlib
except ModuleNotFoundError:  # a core-only install: name the extra, in one line
    raise SystemExit("this example needs matplotlib: pip install 'refngd[plot]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

try:
    import torch
    from torch.func import functional_call, grad, vmap
    from torch.nn.utils import parameters_to_vector
except ImportError:
    print("PyTorch is not installed (pip install torch): nothing to validate, exiting.")
    sys.exit(0)

import refngd
from refngd import losses, nn, updates
from refngd.curvature import KFAC
from refngd.metrics import relative_error

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/validate_pytorch.png")
args = parser.parse_args()

# --- the same MLP twice: PyTorch (float64) and refngd, with PyTorch's parameter values ----
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
theta = parameters_to_vector(net.parameters()).detach().numpy().copy()   # a copy, not a view
rng = np.random.default_rng(0)
N = 32
X, y = rng.standard_normal((N, 6)), rng.integers(0, 4, N)
Xt, yt = torch.tensor(X), torch.tensor(y)
loss = losses.CrossEntropy()                      # = torch.nn.CrossEntropyLoss(), c = 1/N
errors = {}

# --- (a) per-sample gradients g_n = ∇θ l_n of the *unreduced* losses (no c) -----------
params = {k: v.detach() for k, v in net.named_parameters()}
ce_sum = torch.nn.CrossEntropyLoss(reduction="sum")

def l_n(p, x, t):                                 # the loss of one sample
    return ce_sum(functional_call(net, p, (x[None],)), t[None])

grads = vmap(grad(l_n), in_dims=(None, 0, 0))(params, Xt, yt)
G_torch = torch.cat([grads[k].reshape(N, -1) for k in params], dim=1)    # (N, P), θ order
G_ref = refngd.per_sample_gradients(model, theta, loss, X, y)
errors["(a) per-sample grads"] = relative_error(G_torch.numpy(), G_ref)

# --- (b) a user's empirical-Fisher update in the paper's Gram form G^T (G G^T + λI)^{-1} 1 ---
lam = 1e-3
K = G_torch @ G_torch.T
d_user = G_torch.T @ torch.linalg.solve(K + lam * torch.eye(N, dtype=K.dtype), torch.ones(N, dtype=K.dtype))
d_ref = updates.ef(model, theta, loss, X, y, lam, form="gram")
errors["(b) EF update (gram)"] = relative_error(d_user.numpy(), d_ref)

# --- (c) a user's K-FAC factors, empirical Fisher type, computed with autograd --------
# refngd's convention (docs/kfac.md): F_W ≈ G ⊗ A (row-major vec W), A = (1/N) Σ_n a_n a_nᵀ,
# G = c Σ_n b_n b_nᵀ with b_n = ∂l_n/∂s_n the gradient of the *unreduced* loss with respect
# to the layer's output s_n, and c the loss's constant (1/N for a mean cross-entropy).
kfac = KFAC(model, theta, loss, X, y, fisher_type="empirical")   # bias="separate"
f0, f2 = kfac.factors()                           # the two Linear layers

def user_kfac(backward_reduction):
    """What a typical hook-based implementation does: A from inputs, G from backward grads."""
    s1 = net[0](Xt)
    s1.retain_grad()
    a1 = net[1](s1)
    s2 = net[2](a1)
    s2.retain_grad()
    torch.nn.CrossEntropyLoss(reduction=backward_reduction)(s2, yt).backward()
    A = [Xt.T @ Xt / N, (a1.T @ a1 / N).detach()]
    G = [s1.grad.T @ s1.grad / N, s2.grad.T @ s2.grad / N]   # "mean over the batch"
    return A, G

# The bug: back-propagating the *mean* loss makes s.grad = b_n / N, so averaging gives G/N².
A_bug, G_bug = user_kfac("mean")
_, G_fix = user_kfac("sum")                       # fixed: s.grad = b_n, then (1/N) Σ = c Σ
for i, f in enumerate((f0, f2)):
    errors[f"(c) A, layer {f.index}"] = relative_error(A_bug[i].numpy(), f.A)
    errors[f"(c) G buggy, layer {f.index}"] = relative_error(G_bug[i].numpy(), f.G)
    errors[f"(c) G fixed, layer {f.index}"] = relative_error(G_fix[i].numpy(), f.G)
ratio = np.linalg.norm(f2.G) / np.linalg.norm(G_bug[1].numpy())

print("refngd K-FAC convention: F_W ≈ G ⊗ A (row-major vec W), A = (1/N) Σ a aᵀ (no c),")
print(f"  G = c Σ_n b_n b_nᵀ with b_n = ∂l_n/∂s_n of the unreduced loss; here c = {kfac.c:g} = 1/N")
print(f"\n{'check':24s} relative error")
for name, err in errors.items():
    print(f"{name:24s} {err:.2e}")
print(f"\nrefngd G / buggy G = {ratio:.1f} = N² = {N * N}: the mean-loss backward divides b_n by N.")

# --- (d) the same check in one call: refngd.check.validate names the cause ---------------
from refngd import check  # noqa: E402

candidate = {"0.A": A_bug[0], "0.G": G_bug[0], "2.A": A_bug[1], "2.G": G_bug[1]}
report = check.validate(net, torch.nn.CrossEntropyLoss(), X, y, "kfac_factors", candidate,
                        fisher_type="empirical")
print(f"\nrefngd.check.validate: {report.diagnosis}")
assert not report.passed and "1/N² = 1/1024" in report.diagnosis

# The checks this example is about: agreement to round-off (the damped solve in (b) may
# amplify it ~100x, hence 1e-10, not 1e-15), and the bug caught (an error of order one).
for name, err in errors.items():
    if "buggy" in name:
        assert err > 0.5, f"{name}: the planted bug went unnoticed ({err:.2e})"
    else:
        assert err < 1e-10, f"{name}: PyTorch and refngd disagree ({err:.2e})"
assert abs(ratio - N * N) < 1e-8 * N * N

# --- figure: relative errors on a log scale -------------------------------------------
fig, ax = plt.subplots(figsize=(7, 3.8))
ax.barh(list(errors), [max(e, 1e-17) for e in errors.values()],   # exact zeros at 1e-17
        color=["tab:red" if "buggy" in n else "tab:green" for n in errors])
ax.set_xscale("log")
ax.axvline(1e-10, color="k", ls="--", lw=0.8, label="agreement threshold")
ax.invert_yaxis()
ax.set_xlabel("relative error, PyTorch vs refngd")
ax.set_title("Validating PyTorch code against refngd (red: planted bug)")
ax.legend(loc="lower right", fontsize=8)
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=110)
print(f"figure: {args.out}")
