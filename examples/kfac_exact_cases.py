"""K-FAC is exact for a deep linear network under the squared error, approximate otherwise.

A Linear layer's exact Fisher block is c Σ_n B_n ⊗ (ā_n ā_nᵀ), B_n = Σ_k b_nk b_nkᵀ the
back-propagated output-Hessian rows of sample n; K-FAC replaces it by G ⊗ A with
G = c Σ_n B_n and A = (1/N) Σ_n ā_n ā_nᵀ (docs/kfac.md).  The two agree whenever B_n is
the same for every sample.  In a deep linear network under MSE it is: b_nk = √2·Mᵀe_k with
M the product of the later weights, independent of n.  A tanh makes M depend on x_n.

We compare K-FAC (bias="joint": one block per layer over [W | b]) with the exact Fisher
restricted to the same layer-diagonal blocks.

    python examples/kfac_exact_cases.py [--out examples_out/kfac_exact_cases.png]
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

from refngd import losses, nn
from refngd.curvature import KFAC, Fisher
from refngd.metrics import relative_error

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/kfac_exact_cases.png")
args = parser.parse_args()

rng = np.random.default_rng(0)
N, d_in, hidden, C = 32, 4, 6, 3
X, Y = rng.standard_normal((N, d_in)), rng.standard_normal((N, C))
loss = losses.MSELoss()                            # c = 1/(N·C), no ½ (docs/conventions.md)


def compare(*middle):
    """Per layer: relative Frobenius error of K-FAC's block against the exact Fisher's block."""
    model = nn.Sequential(nn.Linear(d_in, hidden), *middle, nn.Linear(hidden, hidden),
                          *middle, nn.Linear(hidden, C))
    theta = model.init(rng)
    F = Fisher(model, theta, loss, X, Y).dense()   # P × P: fine for P = 93
    kfac = KFAC(model, theta, loss, X, Y, bias="joint")
    K = kfac.dense()                               # block-diagonal, zero between layers
    mask = np.zeros_like(F, dtype=bool)
    blocks = []
    for f in kfac.factors():                       # layer f.index owns θ[f.start:f.stop]
        b = slice(f.start, f.stop)
        mask[b, b] = True
        blocks.append((f.index, F[b, b], K[b, b]))
    total = relative_error(K, np.where(mask, F, 0.0))   # all layer blocks at once
    return total, blocks


cases = {}
for name, middle in [("deep linear network", ()), ("tanh network", (nn.Tanh(),))]:
    total, blocks = compare(*middle)
    cases[name] = blocks
    per_layer = "  ".join(f"layer {i}: {relative_error(Kb, Fb):.1e}" for i, Fb, Kb in blocks)
    print(f"{name:20s} all blocks: {total:.2e}   ({per_layer})")
    if middle:
        err_tanh = total
        # the last layer is exact even so: its rows b_nk = √2·e_k do not depend on x_n
        assert relative_error(blocks[-1][2], blocks[-1][1]) < 1e-10
    else:
        assert total < 1e-10, "K-FAC must be exact for a deep linear network under MSE"
assert err_tanh > 1e-3, "with a nonlinearity K-FAC should only be an approximation"

# --- figure: both networks, the first layer's block exact vs K-FAC, and every layer's error --
fig, axes = plt.subplots(2, 4, figsize=(13, 6.2), layout="constrained",
                         gridspec_kw={"width_ratios": [1, 1, 1, 1.15]})
for row, (name, blocks) in enumerate(cases.items()):
    i, F_0, K_0 = blocks[0]
    vmax = np.abs(F_0).max()                       # one colour scale per row
    panels = [(F_0, f"exact Fisher block, layer {i}"), (K_0, "K-FAC  G ⊗ A"),
              (K_0 - F_0, f"K-FAC − exact (rel. err. {relative_error(K_0, F_0):.0e})")]
    for ax, (M, title) in zip(axes[row, :3], panels):
        im = ax.imshow(M, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("parameter j of [W | b]", fontsize=9)
    axes[row, 0].set_ylabel(f"{name}\nparameter i of [W | b]", fontsize=10)
    fig.colorbar(im, ax=axes[row, 2], shrink=0.85, label="block entry")
    errs = [max(relative_error(Kb, Fb), 1e-17) for _, Fb, Kb in blocks]
    bars = axes[row, 3].bar([f"layer {j}" for j, _, _ in blocks], errs, color="C0" if row else "C2")
    axes[row, 3].set_yscale("log")
    axes[row, 3].set_ylim(1e-17, 1e5)
    axes[row, 3].axhline(1e-10, color="0.5", ls=":", lw=1, label="round-off level 10⁻¹⁰")
    axes[row, 3].bar_label(bars, labels=[f"{e:.0e}" for e in errs], fontsize=8)
    axes[row, 3].set_ylabel(r"block error $\|K - F\|_F\, /\, \|F\|_F$")
    axes[row, 3].set_title(f"{name}: every layer", fontsize=10)
    axes[row, 3].legend(fontsize=8, loc="upper right")
fig.suptitle("Linear layers under MSE, bias='joint': K-FAC equals the exact Fisher block for a "
             "deep linear network (top), only approximates it with tanh (bottom; its last layer "
             "stays exact)", fontsize=10)
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=90, bbox_inches="tight")
print(f"figure: {args.out}")
