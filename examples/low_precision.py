"""Low precision, the claim root- and inverse-free methods are published for, measured.

Lin et al. (2024a, 2024b) propose root-free RF-Adam and inverse-free IKFAC / INGD because
their state can be kept in bfloat16, where methods that take a square root (Adam) or an
inverse / eigendecomposition (K-FAC) of their state are said not to work.  Here the claim
is measured on refngd's own problem (``refngd compare``'s: the 8×8 digits, the 64-64-64-10
Tanh MLP, batches of 64, each method at its seed-0 best learning rate and settings from
``refngd.experiments.compare.METHODS``): every method is trained three times from the same
θ₀ on the same batches, with its state stored in float32, bfloat16 and float16
(:class:`refngd.optim.LowPrecision`: state rounded to the format after every step, steps
computed in float32, float32 master weights, float32 data).

Reported (measured, printed, not asserted — the claim may hold or fail here): the final
training loss in each format, the distance of the low-precision run from the float32 run
relative to how far the float32 run moved, and two mechanisms — K-FAC's stored eigenbases
lose orthogonality (max |UᵀU − I|), and a running average with decay weight β below 2⁻⁸
stops decreasing in bfloat16 (the fraction of second-moment entries that did not change
in the last step).  Asserted: every float32 run lowers the loss, the stored state is in
the storage dtype, and K-FAC's bfloat16 eigenbases are not orthogonal to better than
bfloat16's precision (max |UᵀU − I| > 10⁻³) while the float32 ones are (< 10⁻⁵).

    python examples/low_precision.py [--out docs/img/gallery/low_precision.png] [--smoke]

``--smoke`` (CI): two methods, 20 steps.  Needs ml_dtypes for bfloat16 (``pip install
"refngd[lowprec]"``); without it only float32 and float16 run.
"""
import argparse
import importlib.util
import os

try:  # the digits data and the figure: the cli extra
    import matplotlib
    import sklearn  # noqa: F401
except ImportError:
    raise SystemExit("this example needs matplotlib and scikit-learn: "
                     "pip install 'refngd[cli]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import refngd
from refngd.experiments.compare import METHODS
from refngd.experiments.data import load_digits
from refngd.experiments.models import build_model
from refngd.experiments.plots import LABELS, STYLE
from refngd.optim.records import format_table
from refngd.losses import CrossEntropy
from refngd.optim import LowPrecision

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/low_precision.png")
parser.add_argument("--epochs", type=int, default=10)
parser.add_argument("--seeds", type=int, default=3, help="seeds 0, 1, …, K − 1 (default 3)")
parser.add_argument("--smoke", action="store_true", help="CI: two methods, 20 steps")
args = parser.parse_args()

# the seed-0 best learning rates of docs/compare.md (default run and opt-in methods)
LR = {"kfac": 0.1, "adam": 0.03, "ikfac": 0.03, "ingd": 0.001, "rfadam": 3.0}
methods = ["kfac", "ikfac"] if args.smoke else ["kfac", "ikfac", "ingd", "adam", "rfadam"]
FORMATS = ["float32", "float16"]
if importlib.util.find_spec("ml_dtypes") is not None:
    FORMATS.insert(1, "bfloat16")
else:
    print("ml_dtypes is not installed: bfloat16 skipped (pip install \"refngd[lowprec]\")")

data = load_digits(seed=0).for_model("mlp")
X, y = data.X_train.astype(np.float32), data.y_train
model = build_model("mlp", data.input_shape, data.num_classes)
loss = CrossEntropy()
seeds = [0] if args.smoke else list(range(args.seeds))
theta0 = {k: model.init(np.random.default_rng(k)).astype(np.float32) for k in seeds}
epochs = 1 if args.smoke else args.epochs
max_steps = 20 if args.smoke else epochs * -(-X.shape[0] // 64)


def stored_arrays(state):
    if isinstance(state, dict):
        return [a for v in state.values() for a in stored_arrays(v)]
    if isinstance(state, (list, tuple)):
        return [a for v in state for a in stored_arrays(v)]
    return [state] if isinstance(state, np.ndarray) else []


def orthogonality_error(state):
    """max |UᵀU − I| over K-FAC's stored eigenbases (state["eigen"]: ((w_A, U_A), (w_G, U_G)))."""
    errs = [0.0]
    for pair in state.get("eigen") or []:
        for _, U in pair:
            U = np.asarray(U, dtype=np.float64)
            errs.append(float(np.abs(U.T @ U - np.eye(U.shape[1])).max()))
    return max(errs)


def curvature_state(state):
    """The running curvature statistics: Adam's v, RF-Adam's s, K-FAC's factors, IKFAC/INGD's
    K and C, as one flat float64 vector (to count entries a step left unchanged)."""
    keys = [k for k in ("exp_avg_sq", "s", "factors", "K", "C") if k in state]
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel()
                           for k in keys for a in stored_arrays(state[k])])


def mean_sd(v):
    v = np.asarray(v, dtype=np.float64)
    return f"{v.mean():.4f} ± {v.std(ddof=1):.4f}" if len(v) > 1 else f"{v[0]:.4f}"


runs, rows = {}, []
with np.errstate(all="ignore"):
    for m in methods:
        for fmt in FORMATS:
            for seed in seeds:
                opt = LowPrecision(METHODS[m].make(LR[m]), fmt)
                runs[m, fmt, seed] = refngd.train(
                    model, theta0[seed], loss, X, y, opt, epochs=epochs, batch_size=64,
                    max_steps=max_steps, rng=seed, progress=False, on_divergence="ignore",
                    record_state=True, checkpoints=(max_steps - 1,))
                assert all(a.dtype.name == fmt for a in stored_arrays(runs[m, fmt, seed].state))
        for seed in seeds:
            ev = runs[m, "float32", seed].evals["train_loss"]
            assert ev[-1] < ev[0], f"{m} float32 did not lower the loss (seed {seed})"
        for fmt in FORMATS:
            final, dev = [], []
            for seed in seeds:
                res, base = runs[m, fmt, seed], runs[m, "float32", seed]
                final.append(np.inf if res.diverged else res.evals["train_loss"][-1])
                dev.append(np.linalg.norm(res.theta.astype(np.float64) - base.theta)
                           / np.linalg.norm(base.theta - theta0[seed]))
            res = runs[m, fmt, seeds[0]]
            prev = curvature_state(next(iter(res.checkpoint_states.values())))
            same = np.mean(curvature_state(res.state) == prev)
            ortho = orthogonality_error(res.state) if m == "kfac" else None
            rows.append([LABELS[m], fmt, mean_sd(final), f"{np.mean(dev):.3g}", f"{same:.0%}",
                         "—" if ortho is None else f"{ortho:.1e}"])
        if m == "kfac":
            assert orthogonality_error(runs[m, "float32", seeds[0]].state) < 1e-5
            if "bfloat16" in FORMATS:
                assert orthogonality_error(runs[m, "bfloat16", seeds[0]].state) > 1e-3

head = ["method", "state", "final train loss", "‖θ − θ_fp32‖/‖θ_fp32 − θ₀‖",
        "curvature state unchanged by the last step", "‖UᵀU − I‖_max"]
print(format_table(head, rows, "llrrrr"))
print(f"({max_steps} steps of batch 64 on the digits MLP; state rounded after every step, "
      f"steps in float32; loss: mean ± sd over seeds {seeds}, distance: mean; the last two "
      "columns: seed 0)")

fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
groups = [("with a root or an inverse of the state", ["kfac", "adam"]),
          ("root-free / inverse-free", ["ikfac", "ingd", "rfadam"])]
dash = {"float32": "-", "bfloat16": "--", "float16": ":"}
for ax, (title, ms) in zip(axes, groups):
    for m in [m for m in ms if m in methods]:
        for fmt in FORMATS:
            ev = runs[m, fmt, seeds[0]].evals
            ax.semilogy(ev["step"], ev["train_loss"], color=STYLE[m][0], ls=dash[fmt],
                        label=f"{LABELS[m]}, {fmt}")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
axes[0].set_ylabel("training loss (whole training set)")
fig.suptitle(f"digits MLP, seed {seeds[0]}: optimizer state stored in float32 (solid), "
             "bfloat16 (dashed), float16 (dotted); steps computed in float32", fontsize=10)
fig.tight_layout()
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
fig.savefig(args.out, dpi=90)
print(f"figure: {args.out}")
