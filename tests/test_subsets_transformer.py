"""Parameter subsets (``params=``) on models with the Transformer-era layers.

The subset curvature is the submatrix F[S, S] of the full one (docs/subsets.md): checked
here against the dense Fisher from HIPS-autograd Jacobians of the independent definition
in tests/layer_oracles.py, for whole-layer masks (last layer), masks of a composite's
sub-layers (the attention inside a TransformerEncoderLayer) and partial ones inside a
sub-layer (in-projection weight only, LayerNorm scale only, a sequence Linear's bias
only), and for the K-FAC family on attention projections and LoRA adapters applied to
sequences, where the subset operator must be the submatrix of the full one.
"""
from __future__ import annotations

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from refngd import nn
from refngd.curvature import KFAC, Fisher, KroneckerDiagonal
from refngd.losses import CrossEntropy, MSELoss
from refngd.losses import PerToken
from refngd.subsets import peft_mask, resolve_params

import layer_oracles as R
from test_transformer_curvature import C, D, FF, HEADS, N, T, reference, transformer

EXACT = 1e-10


def rel_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def tensor_mask(model, picks: dict) -> np.ndarray:
    """Boolean θ mask selecting, per layer index, the listed tensor indices ("all": every one)."""
    mask = np.zeros(model.num_params, dtype=bool)
    for i, tensors in picks.items():
        layer, (start, _) = model.layers[i], model.slices[i]
        if tensors == "all":
            tensors = range(len(layer.param_shapes))
        offsets = np.cumsum([0] + [int(np.prod(s)) for s in layer.param_shapes])
        for t in tensors:
            mask[start + offsets[t]:start + offsets[t + 1]] = True
    return mask


# TransformerEncoderLayer tensors: self_attn 0-3 (in_proj W, b, out_proj W, b), linear1 4-5,
# linear2 6-7, norm1 8-9, norm2 10-11
MASKS = {
    "last_layer": {4: "all"},
    "attention": {1: [0, 1, 2, 3]},
    "in_proj_weight_and_norm_scales": {1: [0, 8, 10], 2: [0]},
    "patch_bias_and_ffn": {0: [1], 1: [4, 5, 6, 7]},
}


@pytest.fixture(scope="module", params=[False, True], ids=["post_norm", "pre_norm"])
def problem(request):
    model, theta, X, y, J, H, _ = reference(request.param)
    F_ref = np.einsum("nap,nab,nbq->pq", J, H, J) / N  # CrossEntropyLoss(reduction="mean")
    return model, theta, X, y, F_ref


@pytest.mark.parametrize("name", list(MASKS))
def test_subset_fisher_is_the_submatrix(problem, name):
    model, theta, X, y, F_ref = problem
    m = tensor_mask(model, MASKS[name])
    F_full = Fisher(model, theta, CrossEntropy(), X, y).dense()
    F_sub = Fisher(model, theta, CrossEntropy(), X, y, params=m)
    assert F_sub.num_params == int(m.sum())
    assert rel_err(F_sub.dense(), F_full[np.ix_(m, m)]) < EXACT
    assert rel_err(F_sub.dense(), F_ref[np.ix_(m, m)]) < EXACT
    assert rel_err(F_sub.gradient(), Fisher(model, theta, CrossEntropy(), X, y).gradient()[m]) \
        < EXACT


def test_frozen_layers_get_no_rows(problem):
    """Last-layer and attention-only subsets record rows of the selected (sub-)layers only."""
    model, theta, X, y, _ = problem
    lin = model.linearize(theta, X)
    cot = np.random.default_rng(1).standard_normal((N, 2, C))
    rows = lin.backprop(cot, params=tensor_mask(model, {4: "all"}))
    assert [e.index for e in rows.layers] == [4]
    rows = lin.backprop(cot, params=tensor_mask(model, MASKS["attention"]))
    assert [(e.index, e.part) for e in rows.layers] == [(1, 0), (1, 2)]  # in_proj, out_proj
    assert [type(e.layer).__name__ for e in rows.layers] == ["Linear", "Linear"]


def test_composite_trainable_flags_are_its_sublayers():
    """A composite's ``trainable`` is its sub-layers' flags; params=None follows them."""
    model, _, theta, X, y = transformer(False)
    tel = model.layers[1]
    tel.children["norm1"].trainable = (False, False)
    assert tel.trainable == (True,) * 8 + (False, False, True, True)
    tel.trainable = (False,) * 4 + (True,) * 8  # freeze the attention
    assert tel.children["self_attn"].trainable == (False,) * 4
    assert tel.children["norm1"].trainable == (True, True)
    m = model.trainable_mask()
    assert not m[tensor_mask(model, MASKS["attention"])].any() and int((~m).sum()) == 4 * D * D + 4 * D
    F = Fisher(model, theta, CrossEntropy(), X, y)
    assert F.num_params == int(m.sum())
    assert rel_err(F.dense(), Fisher(model, theta, CrossEntropy(), X, y, params="all").dense()[
        np.ix_(m, m)]) < EXACT
    with pytest.raises(ValueError, match="one bool per parameter tensor"):
        tel.trainable = (True,)


def test_embedding_model_subsets():
    """Integer inputs: a frozen Embedding is never back-propagated through (it has no input
    cotangent); a selected one is the submatrix."""
    V = 7
    model = nn.Sequential(nn.Embedding(V, D), nn.TransformerEncoderLayer(D, HEADS, FF),
                          nn.Flatten(), nn.Linear(T * D, C))
    rng = np.random.default_rng(3)
    theta, X, y = model.init(rng), rng.integers(0, V, (N, T)), rng.integers(0, C, N)
    F_full = Fisher(model, theta, CrossEntropy(), X, y).dense()
    for picks in ({3: "all"}, {1: [0, 1, 2, 3]}, {0: "all", 3: "all"}):
        m = tensor_mask(model, picks)
        F = Fisher(model, theta, CrossEntropy(), X, y, params=m).dense()
        assert rel_err(F, F_full[np.ix_(m, m)]) < EXACT


def attention_lora_model(seed=7):
    """Linear → LoRALinear on tokens → MultiheadAttention → Flatten, per-token MSE."""
    E = 4
    model = nn.Sequential(nn.Linear(D, E), nn.LoRALinear(E, E, rank=2, alpha=3.0),
                          nn.MultiheadAttention(E, 2), nn.Flatten())
    rng = np.random.default_rng(seed)
    theta = model.init(rng) + 0.3 * rng.standard_normal(model.num_params)  # LoRA B ≠ 0
    X = rng.standard_normal((N, T, D))
    y, loss = rng.standard_normal((N, T, E)), PerToken(MSELoss(), T)
    return model, theta, X, y, loss


def test_lora_on_sequences_against_autograd():
    """LoRA applied to tokens (weight sharing): Fisher of the adapters = submatrix of the
    dense autograd Fisher of z = x W₀ᵀ + b₀ + s (x Aᵀ) Bᵀ."""
    model, theta, X, y, loss = attention_lora_model()
    E, s = 4, 3.0 / 2  # alpha / rank
    shapes = [sh for layer in model.layers for sh in layer.param_shapes]

    def f(t):
        p, _ = R.unpack(t, shapes)
        h = R.linear_ref(X, p[0], p[1])
        h = R.linear_ref(h, p[2], p[3]) + s * anp.dot(anp.dot(h, p[4].T), p[5].T)
        o = R.mha_ref(h, p[6], p[7], p[8], p[9], 2)
        return anp.reshape(o, (N, -1))

    J = autograd.jacobian(f)(theta)  # (N, T·E, P)
    F_ref = loss.scale(f(theta)) * np.einsum("nap,naq->pq", J, J) * 2.0  # MSE: H = 2 I
    m = peft_mask(model)
    assert int(m.sum()) == 2 * E * 2
    F = Fisher(model, theta, loss, X, y, params=m).dense()
    assert rel_err(F, F_ref[np.ix_(m, m)]) < EXACT
    assert rel_err(Fisher(model, theta, loss, X, y, params="all").dense(), F_ref) < EXACT


@pytest.mark.parametrize("approx", ["expand", "reduce"])
@pytest.mark.parametrize("bias", ["separate", "joint"])
def test_kfac_subsets_on_attention_and_lora(approx, bias):
    """K-FAC on LoRA adapters and attention projections (one input-factor cache, keyed by
    layer index and part): every subset operator is the submatrix of the full one, and
    the factors a subset shares with the full operator are the same."""
    model, theta, X, y, loss = attention_lora_model()
    lin = model.linearize(theta, X)
    full = KFAC(model, theta, loss, X, y, kfac_approx=approx, bias=bias, params="all",
                linearization=lin)
    Kd = full.dense()
    picks = [{1: [2, 3]}, {2: [0, 1, 2, 3]}, {2: [2, 3]}, {1: [0, 2, 3], 2: [0, 2]},
             {0: "all", 2: [0, 1]}]
    for p in picks:
        m = tensor_mask(model, p)
        sub = KFAC(model, theta, loss, X, y, kfac_approx=approx, bias=bias, params=m,
                   linearization=lin)
        assert rel_err(sub.dense(), Kd[np.ix_(m, m)]) < EXACT, p
        diag = KroneckerDiagonal(model, theta, loss, X, y, kfac_approx=approx, params=m,
                                 linearization=lin)
        assert diag.num_params == int(m.sum())
    # the same (layer, part) → the same cached input factor, selected alone or with others
    sub = KFAC(model, theta, loss, X, y, kfac_approx=approx, bias=bias,
               params=tensor_mask(model, {2: [2, 3]}), linearization=lin)
    (f_sub,) = sub.factors()
    (f_full,) = [f for f in full.factors() if f.layer is f_sub.layer]  # the out-projection
    assert f_sub.index == f_full.index == 2 and f_sub.A is f_full.A


def test_kfac_on_transformer_linears_with_norms_frozen():
    """K-FAC refuses LayerNorm; a subset without the norms' tensors gets K-FAC for the
    Transformer's Linears and projections, whose diagonal is KroneckerDiagonal's."""
    model, _, theta, X, y = transformer(False)
    with pytest.raises(TypeError, match="not LayerNorm"):
        KFAC(model, theta, CrossEntropy(), X, y)
    m = tensor_mask(model, {0: "all", 1: list(range(8)), 4: "all"})
    K = KFAC(model, theta, CrossEntropy(), X, y, kfac_approx="expand", params=m)
    assert K.num_params == int(m.sum())
    Kdiag = KroneckerDiagonal(model, theta, CrossEntropy(), X, y, kfac_approx="expand", params=m)
    assert rel_err(np.diag(K.dense()), Kdiag.dense().diagonal()) < EXACT
    with pytest.raises(ValueError, match="K-FAC needs a layer's weight"):
        KFAC(model, theta, CrossEntropy(), X, y, kfac_approx="expand",
             params=tensor_mask(model, {1: [1]}))


def test_partial_selection_a_sublayer_cannot_restrict_is_refused():
    """A composite passes a partial selection on to the sub-layer; one that cannot restrict
    refuses it with an error naming the composite and the sub-layer."""
    class Block(nn.Composite):
        def __init__(self):
            self._register([("lin", nn.Linear(D, D)), ("scale", R.Scale(D))])

        def compose(self, params, x):
            h, c1 = self._fwd("lin", params, x)
            z, c2 = self._fwd("scale", params, h)
            return z, (c1, c2)

        def pull_back(self, ctx, inner, B):
            return self._back(ctx, "lin", inner[0], self._back(ctx, "scale", inner[1], B))

    model = nn.Sequential(Block(), nn.Linear(D, C))
    ok = tensor_mask(model, {0: [0], 1: "all"})  # lin's weight only: Linear restricts
    assert resolve_params(model, ok).num_params == D * D + D * C + C
    bad = tensor_mask(model, {0: [0, 1, 2]})  # scale's w without its b
    with pytest.raises(ValueError, match="sub-layer 'scale'.*select all of them or none"):
        resolve_params(model, bad)
