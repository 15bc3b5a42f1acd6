"""Exact natural gradient on the LoRA adapters of a GPT-2 from Hugging Face transformers.

A tiny GPT-2 (2 layers, width 64, tied input/output embeddings; random initialisation, no
download) gets LoRA adapters on its attention projections through ``peft``; refngd imports
it with one ``refngd.interop.from_torch(model, X)`` call (a torch.fx trace with concrete
shapes, docs/design.md §6) and, on a synthetic next-token task (each token's successor is
its index plus one, modulo the vocabulary), computes three update directions over the
adapters only — the trainable parameters peft leaves, ``params=None`` — from the exact
Fisher F of the batch (the GGN of the per-token cross-entropy):

* exact NGD, (F + λI)⁻¹ g, with λ = 1e-8;
* iEF (Wu et al. 2024, eq. 8), Gᵀ(GGᵀ + λI)⁻¹ s with s_n = ‖e_n‖²;
* EF (Kunstner et al. 2019), Gᵀ(GGᵀ + λI)⁻¹ 1;

and scores each by γ(d) = √(dᵀFd) / |dᵀg| (Wu et al. 2024, eq. 15), which exact NGD
minimises.  Asserted: γ(NGD) ≤ γ(iEF) (and ≤ γ(EF)), and the imported forward pass equals
PyTorch's.  The figure shows γ of each direction relative to SGD's.

    python examples/hf_lora_exact_ngd.py [--out examples_out/hf_lora_exact_ngd.png]
"""
import argparse
import os
import sys
import time
import warnings

try:
    import matplotlib
except ModuleNotFoundError:  # a core-only install: name the extra, in one line
    raise SystemExit("this example needs matplotlib: pip install 'refngd[plot]'") from None
matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

try:
    import peft
    import torch
    import transformers
except ImportError as err:
    print(f"{err.name} is not installed (pip install 'refngd[models]'): nothing to import, "
          "exiting.")
    sys.exit(0)

from refngd import interop, losses, updates
from refngd.curvature import Fisher
from refngd.experiments.plots import STYLE  # the colours of `refngd compare`'s figures
from refngd.metrics import gamma

warnings.filterwarnings("ignore", category=FutureWarning)   # transformers' deprecation notes
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="examples_out/hf_lora_exact_ngd.png")
args = parser.parse_args()
t0 = time.perf_counter()

# --- the model: a tiny GPT-2 with LoRA on c_attn (peft) ----------------------------------
V, T, N = 32, 8, 16
torch.manual_seed(0)
config = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=64, n_layer=2, n_head=4,
                                 tie_word_embeddings=True,
                                 bos_token_id=0, eos_token_id=0)   # attention: sdpa, the default
net = transformers.GPT2LMHeadModel(config)
lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                       fan_in_fan_out=True)                        # Conv1D stores W as (in, out)
net = peft.get_peft_model(net, lora)
for module in net.modules():  # LoRA's B starts at zero: give the adapters a random state
    if hasattr(module, "lora_B"):
        for lin in module.lora_B.values():
            torch.nn.init.normal_(lin.weight, std=0.02)
net = net.double().eval()

# --- the task: predict the next token, x_{t+1} = x_t + 1 (mod V) -------------------------
rng = np.random.default_rng(0)
start = rng.integers(0, V, (N, 1))
X = (start + np.arange(T)) % V                 # (N, T) token ids
y = (X + 1) % V                                # (N, T) next-token targets

model, theta = interop.from_torch(net, X)      # one call: the whole traced graph
loss = losses.PerToken(losses.CrossEntropy(), T)  # outputs (N, T·V): a term per token
adapters = model.trainable_mask()              # requires_grad: peft's adapters
ref = net(torch.tensor(X)).logits.reshape(N, -1).detach().numpy()
assert np.allclose(model.forward(theta, X), ref, rtol=1e-12, atol=1e-12)
print(f"GPT-2: {model.num_params} parameters, {int(adapters.sum())} in the LoRA adapters; "
      f"imported in {time.perf_counter() - t0:.1f} s")

# --- three directions on the adapters, scored by γ with the exact Fisher -----------------
lin = model.linearize(theta, X)
F = Fisher(model, theta, loss, X, y, linearization=lin)      # params=None: the adapters
g = F.gradient()                                             # over the adapters
lam = 1e-8
directions = {
    "NGD": updates.ngd(model, theta, loss, X, y, lam, linearization=lin),
    "iEF": updates.ief(model, theta, loss, X, y, lam, linearization=lin),
    "EF": updates.ef(model, theta, loss, X, y, lam, linearization=lin),
    "SGD": g,
}
gammas = {name: gamma(d, F, g) for name, d in directions.items()}
for name, value in gammas.items():
    print(f"  γ({name:3s}) = {value:.4g}   γ/γ(SGD) = {value / gammas['SGD']:.3f}")
assert gammas["NGD"] <= gammas["iEF"] * (1 + 1e-9), gammas
assert gammas["NGD"] <= gammas["EF"] * (1 + 1e-9), gammas

# --- the figure -----------------------------------------------------------------------------
fig, ax = plt.subplots(figsize=(5.5, 3.6))
names = ["NGD", "iEF", "EF", "SGD"]
ratios = [gammas[n] / gammas["SGD"] for n in names]
bars = ax.bar(names, ratios, color=[STYLE[n.lower()][0] for n in names])
ax.bar_label(bars, labels=[f"{r:.3f}" for r in ratios], padding=2)
ax.axhline(1.0, color="0.3", lw=0.8, ls="--")
ax.set_ylim(0, 1.2 * max(ratios))
ax.set_ylabel("γ(d) / γ(SGD)  (lower is better)")
ax.set_title(f"exact Fisher on the LoRA adapters of a tiny GPT-2\n"
             f"({int(adapters.sum())} parameters, N = {N} sequences of T = {T} tokens, λ = {lam:g})",
             fontsize=10)
fig.tight_layout()
os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
fig.savefig(args.out, dpi=120)
print(f"figure: {args.out} ({time.perf_counter() - t0:.1f} s)")
