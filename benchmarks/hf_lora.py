"""Benchmark: importing a tiny GPT-2 with LoRA (transformers + peft) and one exact NGD step
on its adapters, against one PyTorch gradient (CPU, float64).

    python benchmarks/hf_lora.py            # N = 32 sequences of T = 8 tokens
    python benchmarks/hf_lora.py --quick    # fewer repeats

The model is the one of ``examples/hf_lora_exact_ngd.py``: GPT-2 with 2 layers, width 64,
4 heads, vocabulary 32, tied embeddings, LoRA rank 4 on ``c_attn`` (peft); random
initialisation, no download.  Timed (best wall time of ``--repeats`` calls after one
warm-up; every refngd time includes its forward pass):

* ``from_torch``: ``refngd.interop.from_torch(model, X)`` — the concrete-shape trace,
  the conversion and the check against PyTorch on the example batch;
* the PyTorch gradient: one forward and ``loss.backward()`` of the per-token
  cross-entropy (mean over the N·T tokens) — over the adapters only (peft's
  ``requires_grad``), as a LoRA fine-tuning step computes it;
* refngd's gradient on the adapters (checked equal to PyTorch's first);
* one exact damped NGD step on the adapters, ``updates.ngd`` with λ = 1e-3: the Fisher's
  R = N·T·(V − 1) rows on the adapters and, as R > P there, the regularised least-squares
  solve by QR of [U; √(λ/c) I] (docs/fisher.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import best_time  # beside this script

from refngd import interop, losses, updates


def build(N: int, T: int, V: int = 32):
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=T, n_embd=64, n_layer=2, n_head=4,
                                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                                  attn_implementation="sdpa")
    net = peft.get_peft_model(transformers.GPT2LMHeadModel(cfg), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True, lora_dropout=0.0))
    for module in net.modules():
        if hasattr(module, "lora_B"):
            for lin in module.lora_B.values():
                torch.nn.init.normal_(lin.weight, std=0.02)
    net = net.double().eval()
    rng = np.random.default_rng(0)
    X = rng.integers(0, V, (N, T))
    y = rng.integers(0, V, (N, T))
    return net, X, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    import torch

    net, X, y = build(args.batch, args.tokens)
    N, T = X.shape
    t_import = best_time(lambda: interop.from_torch(net, X), repeats)
    model, theta = interop.from_torch(net, X)
    loss = losses.PerToken(losses.CrossEntropy(), T)
    mask = model.trainable_mask()
    Xt, yt = torch.tensor(X), torch.tensor(y)
    params = [p for p in net.parameters() if p.requires_grad]

    def torch_grad():
        for p in params:
            p.grad = None
        logits = net(Xt).logits
        torch.nn.functional.cross_entropy(logits.reshape(N * T, -1), yt.reshape(-1)).backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).numpy()

    g_torch = torch_grad()
    g = updates.sgd(model, theta, loss, X, y)          # params=None: the adapters
    assert np.abs(g - g_torch).max() <= 1e-10 * np.abs(g_torch).max(), "the gradients differ"
    t_torch = best_time(torch_grad, repeats)
    t_grad = best_time(lambda: updates.sgd(model, theta, loss, X, y), repeats)
    t_ngd = best_time(lambda: updates.ngd(model, theta, loss, X, y, 1e-3), repeats)
    R = N * T * (model.output_shape[1] - 1)
    print(f"tiny GPT-2 + LoRA: P = {model.num_params}, adapters {int(mask.sum())}, N = {N}, "
          f"T = {T}, Fisher rows R = N·T·(V-1) = {R}")
    print(f"{'':32s}{'seconds':>10s}{'× torch grad':>14s}")
    for name, t in (("torch gradient (adapters)", t_torch), ("from_torch (import + check)", t_import),
                    ("refngd gradient (adapters)", t_grad), ("exact NGD step (adapters)", t_ngd)):
        print(f"{name:32s}{t:10.3f}{t / t_torch:14.1f}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.0f} s")
