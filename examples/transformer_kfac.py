"""K-FAC in a Transformer, done right: expand vs reduce against the exact Fisher blocks.

A Linear layer applied to a sequence shares its weight over the T tokens, so its exact
Fisher block is c Σ_r vec(Σ_t b_rt ā_ntᵀ) vec(…)ᵀ — not a Kronecker product.  Eschenhagen
et al. (2023), "Kronecker-factored approximate curvature for modern neural network
architectures", NeurIPS, define two Kronecker approximations (their eqs. 7 and 10):

* **expand** — tokens as extra samples: A = (1/(N·T)) Σ_{n,t} ā_nt ā_ntᵀ,
  G = c Σ_{r,t} b_rt b_rtᵀ;
* **reduce** — tokens summed first: A = (1/N) Σ_n ā_n ā_nᵀ with ā_n = mean_t ā_nt,
  G = c Σ_r (Σ_t b_rt)(Σ_t b_rt)ᵀ;

and show that each is *exact* for a deep linear network in its own setting: expand with
one loss term per token, reduce when the tokens are pooled before the loss.  The common
tutorial recipe gets several things wrong — factors from the aggregated gradient (both
from one matrix), q, k, v as "independent blocks" although PyTorch packs them into one
in-projection with one input (so one Kronecker block), and no word on weight sharing.

Measured here (refngd.curvature.KFAC with ``bias="joint"``, one block per Linear over
[W | b]; exact blocks from refngd.curvature.Fisher; error ‖K_l − F_ll‖_F/‖F_ll‖_F):

1. the exact cases — per-token MSE on a deep linear token network (expand exact, reduce
   off), the same network with the tokens averaged before the MSE (reduce exact, expand
   off), and attention under a per-token MSE (expand exact for the out-projection, with
   nothing but the identity above it; the in-projection's rows pass through the softmax);
2. a tiny Transformer (patch Linear → TransformerEncoderLayer → LayerNorm → Linear head)
   in both settings: a pooled classifier (Flatten → Linear, one cross-entropy per
   sequence) and a per-token classifier (a Linear head on every token, PerToken
   cross-entropy) — every projection and feed-forward block, for both flavours.  The
   LayerNorms have no K-FAC and are left out with ``params=``.

Asserted: the exact cases to 1e-10 and the other flavour off by more than 1 %; in the
Transformer no block is exact (errors > 1e-3) — softmax, GELU, LayerNorm and the
cross-entropy make the rows depend on the sample — and the two flavours coincide on the
pooled classifier's head (no weight sharing there).  Printed, not asserted: which flavour
is closer per block.

    python examples/transformer_kfac.py [--out examples_out/transformer_kfac.png]
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

from refngd import nn
from refngd.curvature import KFAC, Fisher
from refngd.losses import CrossEntropy, MSELoss
from refngd.losses import PerToken

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/transformer_kfac.png")
args = parser.parse_args()

N, T, P_IN, D, C = 8, 6, 3, 8, 4
FLOOR = 1e-17  # plotted in place of an exact zero


def block_errors(model, theta, loss, X, y, approx, params="all"):
    """Per K-FAC block (bias="joint"): ‖K_l − F_ll‖_F / ‖F_ll‖_F on the subset ``params``."""
    F = Fisher(model, theta, loss, X, y, params=params).dense()
    K = KFAC(model, theta, loss, X, y, kfac_approx=approx, bias="joint", params=params)
    Kd = K.dense()
    out = []
    for f in K.factors():
        s = slice(f.start, f.stop)
        out.append(np.linalg.norm(Kd[s, s] - F[s, s]) / np.linalg.norm(F[s, s]))
    return out


rng = np.random.default_rng(0)

# --- 1. the exact cases ------------------------------------------------------------------
cases = {}
deep = nn.Sequential(nn.Linear(P_IN, D), nn.Linear(D, C), nn.Flatten())        # per token
theta = deep.init(rng)
X, y = rng.standard_normal((N, T, P_IN)), rng.standard_normal((N, T, C))
cases["per-token MSE\n(deep linear)"] = (["Linear 1", "Linear 2"], {
    a: block_errors(deep, theta, PerToken(MSELoss(), T), X, y, a) for a in ("expand", "reduce")},
    "expand", [0, 1])

pooled = nn.Sequential(nn.Linear(P_IN, D), nn.Linear(D, C), nn.AdaptiveAvgPool2d((1, None)),
                       nn.Flatten())                                            # token mean
theta = pooled.init(rng)
X, y = rng.standard_normal((N, 1, T, P_IN)), rng.standard_normal((N, C))
cases["pooled MSE\n(deep linear)"] = (["Linear 1", "Linear 2"], {
    a: block_errors(pooled, theta, MSELoss(), X, y, a) for a in ("expand", "reduce")},
    "reduce", [0, 1])

attn = nn.Sequential(nn.Linear(P_IN, D), nn.MultiheadAttention(D, 2), nn.Flatten())
theta = attn.init(rng)
X, y = rng.standard_normal((N, T, P_IN)), rng.standard_normal((N, T, D))
cases["per-token MSE\n(attention)"] = (["patch", "in_proj", "out_proj"], {
    a: block_errors(attn, theta, PerToken(MSELoss(), T), X, y, a) for a in ("expand", "reduce")},
    "expand", [2])

print("Exact cases (Eschenhagen et al. 2023): block error ‖K − F‖_F/‖F‖_F")
for name, (labels, errs, exact, exact_blocks) in cases.items():
    other = "reduce" if exact == "expand" else "expand"
    for i, lab in enumerate(labels):
        print(f"  {name.replace(chr(10), ' '):30s} {lab:9s} expand {errs['expand'][i]:.2e}  "
              f"reduce {errs['reduce'][i]:.2e}")
    for i in exact_blocks:
        assert errs[exact][i] < 1e-10, (name, labels[i], exact, errs[exact][i])
        assert errs[other][i] > 1e-2, (name, labels[i], other, errs[other][i])
assert cases["per-token MSE\n(attention)"][1]["expand"][1] > 1e-3  # in_proj: not exact

# --- 2. a tiny Transformer, pooled and per-token ---------------------------------------------
def transformer(head):
    return nn.Sequential(
        nn.Linear(P_IN, D),
        nn.TransformerEncoderLayer(D, 2, dim_feedforward=16, activation="gelu", norm_first=True),
        nn.LayerNorm(D), *head)


def linears_only(model):
    """Every tensor except the LayerNorms' (K-FAC covers Linear layers only)."""
    mask = np.ones(model.num_params, bool)
    for layer, (start, stop) in zip(model.layers, model.slices):
        if isinstance(layer, nn.LayerNorm):
            mask[start:stop] = False
        elif isinstance(layer, nn.TransformerEncoderLayer):
            off = start + sum(int(np.prod(s)) for s in layer.param_shapes[:8])
            mask[off:stop] = False  # norm1, norm2: the last four tensors
    return mask


LABELS = ["patch", "in_proj", "out_proj", "linear1", "linear2", "head"]
settings = {}
m_pool = transformer([nn.Flatten(), nn.Linear(T * D, C)])
theta = m_pool.init(rng) + 0.2 * rng.standard_normal(m_pool.num_params)  # away from init
X, y = rng.standard_normal((N, T, P_IN)), rng.integers(0, C, N)
settings["pooled classifier (Flatten → Linear, CE)"] = {
    a: block_errors(m_pool, theta, CrossEntropy(), X, y, a, linears_only(m_pool))
    for a in ("expand", "reduce")}

m_tok = transformer([nn.Linear(D, C), nn.Flatten()])
theta = m_tok.init(rng) + 0.2 * rng.standard_normal(m_tok.num_params)
y_tok = rng.integers(0, C, (N, T))
settings["per-token classifier (PerToken CE)"] = {
    a: block_errors(m_tok, theta, PerToken(CrossEntropy(), T), X, y_tok, a, linears_only(m_tok))
    for a in ("expand", "reduce")}

print("\nTiny Transformer (pre-norm, GELU): block error per Linear, expand | reduce | closer")
for name, errs in settings.items():
    print(f"  {name}")
    for i, lab in enumerate(LABELS):
        e, r = errs["expand"][i], errs["reduce"][i]
        print(f"    {lab:9s} {e:.3f} | {r:.3f} | {'expand' if e < r else 'reduce'}")
        assert min(e, r) > 1e-3, (name, lab)  # nothing is exact here
pool = settings["pooled classifier (Flatten → Linear, CE)"]
assert abs(pool["expand"][-1] - pool["reduce"][-1]) < 1e-12  # the head shares no weight

# --- figure -------------------------------------------------------------------------------
fig, axes = plt.subplots(1, 3, figsize=(14, 4), gridspec_kw={"width_ratios": [1.2, 1, 1]})
ax = axes[0]
x, ticks, names = 0, [], []
for name, (labels, errs, exact, _) in cases.items():
    ax.text(x + 0.19 + (len(labels) - 1) / 2, 8.0, name, ha="center", va="bottom", fontsize=7)
    for i, lab in enumerate(labels):
        for j, a in enumerate(("expand", "reduce")):
            ax.bar(x + 0.38 * j, max(errs[a][i], FLOOR), 0.36, color=f"C{j}",
                   label=a if x == 0 else None)
        ticks.append(x + 0.19)
        names.append(lab)
        x += 1
    x += 0.5
ax.set_yscale("log")
ax.set_xticks(ticks, names, fontsize=7)
ax.set_ylim(1e-17, 1e3)
ax.axhline(1e-10, color="k", ls=":", lw=0.8)
ax.set_ylabel("‖K − F‖_F / ‖F‖_F  per block")
ax.set_title("exact cases (blue: expand, orange: reduce; dotted: 1e-10)", fontsize=9)
for ax, (name, errs) in zip(axes[1:], settings.items()):
    xs = np.arange(len(LABELS))
    for j, a in enumerate(("expand", "reduce")):
        ax.bar(xs + 0.38 * j, errs[a], 0.36, color=f"C{j}", label=a)
    ax.set_xticks(xs + 0.19, LABELS, fontsize=8)
    ax.set_ylabel("‖K − F‖_F / ‖F‖_F  per block")
    ax.set_title(f"tiny Transformer: {name}", fontsize=9)
    ax.legend(fontsize=8)
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=90)
print(f"figure: {args.out}")
