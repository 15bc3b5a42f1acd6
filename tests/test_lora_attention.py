"""LoRA adapters on the attention projections (``lora_rank=`` of MultiheadAttention and
TransformerEncoderLayer).

Independent route: HIPS autograd on tests/layer_oracles.py's attention and Transformer
block with the *merged* projection weights W₀ + s·B A (a LoRA projection is the Linear map
of its merged weight, Hu et al. 2022 eq. 3) — no refngd code, no LoRA wiring.  Checked:
forward, Jacobian, J·v, Jᵀ·w, the exact Fisher of the adapters against the autograd
Fisher and as the submatrix of the full one (1e-10), the default selection (adapters
only), parameter order and initialisation, K-FAC on the adapters as the submatrix of a
larger K-FAC subset, and the errors; optionally, outputs and Jacobian against PyTorch's
attention kernel on the merged weights (what PEFT runs).
"""
from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

import refngd
from refngd import nn
from refngd.curvature import KFAC, EmpiricalFisher, Fisher
from refngd.losses import CrossEntropy
from refngd.subsets import peft_mask

import layer_oracles as R

EXACT = 1e-10
N, T, PATCH, D, HEADS, FF, C, RANK, ALPHA = 5, 4, 3, 4, 2, 6, 3, 2, 3.0
S = ALPHA / RANK


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def attn_shapes(targets, bias=True):
    """θ order of a LoRA attention: per projection weight, bias, then (A, B) if adapted."""
    out = []
    for name, d_out in (("in_proj", 3 * D), ("out_proj", D)):
        out += [(d_out, D)] + ([(d_out,)] if bias else [])
        if name in targets:
            out += [(RANK, D), (d_out, RANK)]
    return out


def merged_attention(p, targets, bias=True):
    """(W_in, b_in, W_out, b_out) with each adapted weight merged: W₀ + s·B A."""
    out, i = [], 0
    for name in ("in_proj", "out_proj"):
        W = p[i]
        b = p[i + 1] if bias else None
        i += 2 if bias else 1
        if name in targets:
            W = W + S * anp.dot(p[i + 1], p[i])
            i += 2
        out += [W, b]
    return out


def vit(targets, norm_first, bias=True, seed=0):
    """patch Linear → TransformerEncoderLayer(LoRA on ``targets``) → LayerNorm → Flatten → Linear."""
    model = nn.Sequential(nn.Linear(PATCH, D), nn.TransformerEncoderLayer(
        D, HEADS, FF, activation="gelu", norm_first=norm_first, bias=bias, lora_rank=RANK,
        lora_alpha=ALPHA, lora_targets=targets), nn.LayerNorm(D), nn.Flatten(), nn.Linear(T * D, C))
    na = len(attn_shapes(targets, bias))
    shapes = [s for layer in model.layers for s in layer.param_shapes]

    def f(theta, X):
        p, _ = R.unpack(theta, shapes)
        h = R.linear_ref(X, p[0], p[1])
        block = p[2:2 + na + (8 if bias else 4)]
        Win, bin_, Wo, bo = merged_attention(block[:na], targets, bias)
        rest = block[na:]
        if not bias:  # tel_ref wants biases: zeros
            W1, W2, g1, g2 = rest
            rest = [W1, anp.zeros(FF), W2, anp.zeros(D), g1, anp.zeros(D), g2, anp.zeros(D)]
            bin_, bo = anp.zeros(3 * D), anp.zeros(D)
        h = R.tel_ref(h, [Win, bin_, Wo, bo] + list(rest), HEADS, norm_first, "gelu")
        q = 2 + na + (8 if bias else 4)
        h = anp.reshape(R.layernorm_ref(h, p[q], p[q + 1]), (X.shape[0], -1))
        return R.linear_ref(h, p[q + 2], p[q + 3])

    rng = np.random.default_rng(seed)
    theta = model.init(rng) + 0.3 * rng.standard_normal(model.num_params)  # B ≠ 0
    X = rng.standard_normal((N, T, PATCH))
    y = rng.integers(0, C, N)
    return model, f, theta, X, y


CASES = {"both_post": (("in_proj", "out_proj"), False, True),
         "both_pre": (("in_proj", "out_proj"), True, True),
         "in_only_nobias": (("in_proj",), False, False),
         "out_only_pre": (("out_proj",), True, True)}


@pytest.fixture(scope="module", params=list(CASES))
def problem(request):
    model, f, theta, X, y = vit(*CASES[request.param])
    J = autograd.jacobian(lambda t: f(t, X))(theta)  # (N, C, P)
    Z = f(theta, X)
    H = CrossEntropy().output_hessian(Z)  # p - ppᵀ per sample, checked in test_losses.py
    F_ref = np.einsum("nap,nab,nbq->pq", J, H, J) / N
    return model, f, theta, X, y, J, F_ref


def test_forward_jacobian_jvp_vjp(problem):
    model, f, theta, X, y, J, _ = problem
    assert rel_err(model.forward(theta, X), f(theta, X)) < EXACT
    assert rel_err(refngd.jacobian(model, theta, X), J) < EXACT
    rng = np.random.default_rng(3)
    v, w = rng.standard_normal(theta.size), rng.standard_normal((N, C))
    assert rel_err(refngd.jvp(model, theta, X, v), np.einsum("ncp,p->nc", J, v)) < EXACT
    assert rel_err(refngd.vjp(model, theta, X, w), np.einsum("ncp,nc->p", J, w)) < EXACT


def test_adapter_fisher_is_the_submatrix(problem):
    model, _, theta, X, y, J, F_ref = problem
    m = peft_mask(model)
    F_full = Fisher(model, theta, CrossEntropy(), X, y, params="all")
    F_sub = Fisher(model, theta, CrossEntropy(), X, y, params=m)
    assert F_sub.num_params == int(m.sum())
    assert rel_err(F_sub.dense(), F_full.dense()[np.ix_(m, m)]) < EXACT
    assert rel_err(F_sub.dense(), F_ref[np.ix_(m, m)]) < EXACT
    assert rel_err(F_sub.gradient(), F_full.gradient()[m]) < EXACT
    # per-sample gradients of the adapters (EF rows) against autograd's
    e = CrossEntropy().output_gradient(f_out := model.forward(theta, X), y)
    G_ref = np.einsum("ncp,nc->np", J[:, :, m], e)
    EF = EmpiricalFisher(model, theta, CrossEntropy(), X, y, params=m)
    assert rel_err(EF.dense(), G_ref.T @ G_ref / N) < EXACT
    assert f_out.shape == (N, C)


def test_only_adapters_get_rows(problem):
    model, _, theta, X, y, _, _ = problem
    rows = model.linearize(theta, X).backprop(np.ones((N, 1, C)), params=peft_mask(model))
    assert {type(e.layer).__name__ for e in rows.layers} == {"Linear"}
    assert all(e.index == 1 for e in rows.layers)
    targets = model.layers[1].children["self_attn"].lora_targets
    assert len(rows.layers) == 2 * len(targets)  # lora_A and lora_B of each adapted projection
    assert all(e.layer.bias is False for e in rows.layers)


def test_default_selection_is_the_adapters_of_the_attention():
    """MultiheadAttention with LoRA: trainable = the adapters; peft_mask = the adapters alone
    (the Transformer block's feed-forward and LayerNorm tensors keep their default)."""
    mha = nn.MultiheadAttention(D, HEADS, lora_rank=RANK, lora_alpha=ALPHA)
    assert mha.param_shapes == tuple(attn_shapes(("in_proj", "out_proj")))
    assert mha.trainable == (False, False, True, True) * 2
    model, _, theta, X, y = vit(("in_proj", "out_proj"), False)
    m = peft_mask(model)
    assert int(m.sum()) == (RANK * D + 3 * D * RANK) + (RANK * D + D * RANK)
    start = model.slices[1][0]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in model.layers[1].param_shapes])
    expected = np.zeros(model.num_params, bool)
    for t in (2, 3, 6, 7):  # in A, in B, out A, out B
        expected[start + offsets[t]:start + offsets[t + 1]] = True
    assert (m == expected).all()
    tm = model.trainable_mask()
    assert tm[expected].all() and not tm[start:start + offsets[2]].any()  # in_proj base frozen
    assert not tm[start + offsets[4]:start + offsets[6]].any()  # out_proj base frozen
    assert tm[:start].all() and tm[start + offsets[8]:].all()  # everything else trainable


def test_peft_initialisation_starts_at_the_base():
    """B = 0 and A ~ U(±1/√E): the LoRA attention's output equals the plain attention's with
    the same base parameters, and without LoRA the random stream is unchanged."""
    rng_a, rng_b = np.random.default_rng(5), np.random.default_rng(5)
    plain = nn.Sequential(nn.MultiheadAttention(D, HEADS), nn.Flatten())
    lora = nn.Sequential(nn.MultiheadAttention(D, HEADS, lora_rank=RANK), nn.Flatten())
    th_plain, th_lora = plain.init(rng_a), lora.init(rng_b)
    assert lora.layers[0].lora_alpha == RANK  # α defaults to r: scaling 1
    p = [int(np.prod(s)) for s in lora.layers[0].param_shapes]
    o = np.cumsum([0] + p)
    blocks = [th_lora[o[i]:o[i + 1]] for i in range(len(p))]
    assert (blocks[3] == 0).all() and (blocks[7] == 0).all()
    assert np.abs(blocks[2]).max() <= 1 / np.sqrt(D) and np.abs(blocks[6]).max() <= 1 / np.sqrt(D)
    base = np.concatenate([blocks[0], blocks[1], blocks[4], blocks[5]])
    X = np.random.default_rng(6).standard_normal((3, T, D))
    assert rel_err(lora.forward(th_lora, X), plain.forward(base, X)) < 1e-14
    assert (th_plain[:3 * D * D] == blocks[0]).all()  # the in-projection draw comes first in both


def test_kfac_on_adapters_is_a_submatrix():
    """K-FAC over the adapters is the adapters' block of K-FAC over adapters + classifier."""
    model, _, theta, X, y = vit(("in_proj", "out_proj"), True)
    m = peft_mask(model)
    big = m | (np.arange(model.num_params) >= model.slices[4][0])
    for approx in ("expand", "reduce"):
        K_sub = KFAC(model, theta, CrossEntropy(), X, y, kfac_approx=approx, params=m)
        K_big = KFAC(model, theta, CrossEntropy(), X, y, kfac_approx=approx, params=big)
        sel = m[big]
        assert rel_err(K_sub.dense(), K_big.dense()[np.ix_(sel, sel)]) < 1e-12
        assert len(K_sub.factors()) == 4  # one block per adapter matrix


def test_bad_lora_options_are_refused():
    with pytest.raises(ValueError, match="lora_targets must be a non-empty selection"):
        nn.MultiheadAttention(D, HEADS, lora_rank=2, lora_targets=("q_proj",))
    with pytest.raises(ValueError, match="lora_alpha without lora_rank"):
        nn.TransformerEncoderLayer(D, HEADS, FF, lora_alpha=4.0)
    with pytest.raises(ValueError, match="rank must be a positive integer"):
        nn.MultiheadAttention(D, HEADS, lora_rank=0)
    assert "lora_rank=2" in repr(nn.TransformerEncoderLayer(D, HEADS, FF, lora_rank=2))


def test_against_torch_merged_weights():
    """PyTorch's own attention kernel on the merged weights (what PEFT's LoRA for
    ``nn.MultiheadAttention`` runs: merge, forward, unmerge): outputs and Jacobian."""
    torch = pytest.importorskip("torch")
    F_t = torch.nn.functional
    mha = nn.MultiheadAttention(D, HEADS, lora_rank=RANK, lora_alpha=ALPHA)
    model = nn.Sequential(mha, nn.Flatten())
    rng = np.random.default_rng(11)
    theta = model.init(rng) + 0.3 * rng.standard_normal(model.num_params)
    X = rng.standard_normal((3, T, D))
    shapes = mha.param_shapes

    def f(th):
        p, i = [], 0
        for s in shapes:
            n = int(np.prod(s))
            p.append(th[i:i + n].reshape(s))
            i += n
        W_in, b_in, A_in, B_in, W_o, b_o, A_o, B_o = p
        x = torch.tensor(X).transpose(0, 1)  # PyTorch's kernel is sequence-first
        out = F_t.multi_head_attention_forward(
            x, x, x, D, HEADS, W_in + S * B_in @ A_in, b_in, None, None, False, 0.0,
            W_o + S * B_o @ A_o, b_o, training=False, need_weights=False)[0]
        return out.transpose(0, 1).reshape(X.shape[0], -1)

    th = torch.tensor(theta)
    assert rel_err(model.forward(theta, X), f(th).numpy()) < EXACT
    J_t = torch.autograd.functional.jacobian(f, th).numpy()  # (N, T·D, P)
    assert rel_err(refngd.jacobian(model, theta, X), J_t) < EXACT
