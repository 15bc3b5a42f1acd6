"""New layers (sequences, LayerNorm, Embedding, attention, Transformer block, pooling,
BatchNorm in eval mode): outputs, Jacobians, J·v, Jᵀ·w, per-sample gradients and every
row primitive against HIPS autograd on the independent definitions of
tests/layer_oracles.py; directional derivatives against a 6th-order central finite
difference; and (optional) everything against PyTorch on the same θ.

Each case is a small Sequential whose tested layer is preceded by a Linear (so that the
layer's input cotangents, i.e. its backward pass, enter the Jacobian of that Linear) and
followed by Flatten.
"""
from __future__ import annotations

import autograd
import autograd.numpy as anp
from autograd.tracer import getval
import numpy as np
import pytest
from numerics import assert_close

import refngd
from refngd import nn
from refngd.losses import CrossEntropy

import layer_oracles as R

EXACT = 1e-10
# 6th-order stencil at h = 1e-3: truncation ~1e-15, round-off ~1e-12 relative (measured ≤ 2e-12)
FD_TOL = 1e-10


# ----------------------------------------------------------------------------- cases
# Each builder returns (refngd model, f(theta, X) in autograd.numpy, X, torch builder).
# The torch builder (called only when torch is present) returns a torch.nn.Module with
# the same parameters() order.

def _seq_linear(N=3, T=4, bias=True, route=None):
    lin1, lin2 = nn.Linear(3, 4, bias=bias), nn.Linear(4, 2, bias=bias)
    lin1.gram_route = lin2.gram_route = route
    model = nn.Sequential(lin1, nn.Tanh(), lin2, nn.Flatten())
    shapes = [s for layer in (lin1, lin2) for s in layer.param_shapes]

    def f(theta, X):
        p, _ = R.unpack(theta, shapes)
        W1, b1, W2, b2 = (p[0], p[1], p[2], p[3]) if bias else (p[0], None, p[1], None)
        return anp.reshape(R.linear_ref(anp.tanh(R.linear_ref(X, W1, b1)), W2, b2), (X.shape[0], -1))

    def tm(torch):
        return torch.nn.Sequential(torch.nn.Linear(3, 4, bias=bias), torch.nn.Tanh(),
                                   torch.nn.Linear(4, 2, bias=bias), torch.nn.Flatten())
    return model, f, np.random.default_rng(1).standard_normal((N, T, 3)), tm


def _layernorm(affine=True, bias=True, T=3):
    ln = nn.LayerNorm(5, elementwise_affine=affine, bias=bias)
    model = nn.Sequential(nn.Linear(3, 5), ln, nn.Flatten())

    def f(theta, X):
        p, rest = R.unpack(theta, [(5, 3), (5,)])
        q, _ = R.unpack(rest, ln.param_shapes)
        g = q[0] if affine else None
        b = q[1] if affine and bias else None
        return anp.reshape(R.layernorm_ref(R.linear_ref(X, *p), g, b), (X.shape[0], -1))

    def tm(torch):
        return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(
            5, elementwise_affine=affine, bias=bias), torch.nn.Flatten())
    return model, f, np.random.default_rng(2).standard_normal((3, T, 3)), tm


def _layernorm_2d():
    """normalized_shape over two axes (T, d)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm((2, 4)), nn.Flatten())

    def f(theta, X):
        p, rest = R.unpack(theta, [(4, 3), (4,), (2, 4), (2, 4)])
        return anp.reshape(R.layernorm_ref(R.linear_ref(X, p[0], p[1]), p[2], p[3], axes=2),
                           (X.shape[0], -1))

    def tm(torch):
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm((2, 4)), torch.nn.Flatten())
    return model, f, np.random.default_rng(3).standard_normal((3, 2, 3)), tm


def _embedding(padding_idx=0, T=5):
    emb = nn.Embedding(6, 3, padding_idx=padding_idx)
    model = nn.Sequential(emb, nn.Linear(3, 2), nn.Flatten())
    X = np.random.default_rng(4).integers(0, 6, size=(4, T))
    X[0, 0] = 0  # the padding token occurs

    def f(theta, X):
        p, _ = R.unpack(theta, [(6, 3), (2, 3), (2,)])
        e = R.embedding_ref(X, p[0], padding_idx, W_value=getval(theta)[:18].reshape(6, 3)
                            if padding_idx is not None else None)
        return anp.reshape(R.linear_ref(e, p[1], p[2]), (X.shape[0], -1))

    def tm(torch):
        return torch.nn.Sequential(torch.nn.Embedding(6, 3, padding_idx=padding_idx),
                                   torch.nn.Linear(3, 2), torch.nn.Flatten())
    return model, f, X, tm


class _SelfAttention:
    """torch MultiheadAttention as a self-attention module (for the torch twin)."""

    def __new__(cls, torch, E, h, bias):
        class SA(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.mha = torch.nn.MultiheadAttention(E, h, bias=bias, batch_first=True)

            def forward(self, x):
                return self.mha(x, x, x, need_weights=False)[0]
        return SA()


def _mha(E=4, heads=2, bias=True, T=3):
    model = nn.Sequential(nn.Linear(3, E), nn.MultiheadAttention(E, heads, bias=bias), nn.Flatten())
    shapes = [(E, 3), (E,), (3 * E, E)] + ([(3 * E,)] if bias else []) + [(E, E)] + ([(E,)] if bias else [])

    def f(theta, X):
        p, _ = R.unpack(theta, shapes)
        W0, b0 = p[0], p[1]
        if bias:
            Win, bin_, Wo, bo = p[2:]
        else:
            (Win, Wo), bin_, bo = p[2:], None, None
        return anp.reshape(R.mha_ref(R.linear_ref(X, W0, b0), Win, bin_, Wo, bo, heads),
                           (X.shape[0], -1))

    def tm(torch):
        return torch.nn.Sequential(torch.nn.Linear(3, E), _SelfAttention(torch, E, heads, bias),
                                   torch.nn.Flatten())
    return model, f, np.random.default_rng(5).standard_normal((3, T, 3)), tm


def _tel(norm_first=False, act="relu", heads=2, T=3, seed=6):
    E, F = 4, 5
    model = nn.Sequential(nn.Linear(3, E), nn.TransformerEncoderLayer(
        E, heads, F, activation=act, norm_first=norm_first), nn.Flatten())
    shapes = [(E, 3), (E,)] + list(model.layers[1].param_shapes)

    def f(theta, X):
        p, _ = R.unpack(theta, shapes)
        return anp.reshape(R.tel_ref(R.linear_ref(X, p[0], p[1]), p[2:], heads, norm_first, act),
                           (X.shape[0], -1))

    def tm(torch):
        return torch.nn.Sequential(torch.nn.Linear(3, E), torch.nn.TransformerEncoderLayer(
            E, heads, F, dropout=0.0, activation=act, batch_first=True, norm_first=norm_first),
            torch.nn.Flatten())
    return model, f, np.random.default_rng(seed).standard_normal((3, T, 3)), tm


def _pool(kind, **kw):
    pool = {"avg": nn.AvgPool2d, "max": nn.MaxPool2d, "adaptive": nn.AdaptiveAvgPool2d}[kind](**kw)
    model = nn.Sequential(nn.Linear(5, 5), pool, nn.Flatten())

    def f(theta, X):
        p, _ = R.unpack(theta, [(5, 5), (5,)])
        h = R.linear_ref(X, p[0], p[1])
        if kind == "avg":
            out = R.avgpool_ref(h, pool.kernel_size, pool.stride, pool.padding, pool.ceil_mode,
                                pool.count_include_pad, pool.divisor_override)
        elif kind == "max":
            out = R.maxpool_ref(h, pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                pool.ceil_mode)
        else:
            out = R.adaptive_avgpool_ref(h, pool.out_shape(h.shape[1:])[1:])
        return anp.reshape(out, (X.shape[0], -1))

    def tm(torch):
        cls = {"avg": torch.nn.AvgPool2d, "max": torch.nn.MaxPool2d,
               "adaptive": torch.nn.AdaptiveAvgPool2d}[kind]
        return torch.nn.Sequential(torch.nn.Linear(5, 5), cls(**kw), torch.nn.Flatten())
    return model, f, np.random.default_rng(7).standard_normal((2, 2, 6, 5)), tm


def _batchnorm(dim, affine=True):
    rng = np.random.default_rng(8)
    C = 2 if dim != "1d_flat" else 4
    bn = (nn.BatchNorm2d if dim == "2d" else nn.BatchNorm1d)(C, affine=affine)
    mean, var = rng.standard_normal(C), rng.uniform(0.5, 2.0, C)
    bn.set_running_stats(mean, var)
    if dim == "2d":
        X, lin = rng.standard_normal((3, C, 4, 5)), nn.Linear(5, 5)
    elif dim == "1d":
        X, lin = rng.standard_normal((3, C, 5)), nn.Linear(5, 5)
    else:
        X, lin = rng.standard_normal((3, 5)), nn.Linear(5, C)
    model = nn.Sequential(lin, bn, nn.Flatten())

    def f(theta, X):
        p, rest = R.unpack(theta, lin.param_shapes)
        q, _ = R.unpack(rest, bn.param_shapes)
        g, b = (q[0], q[1]) if affine else (None, None)
        return anp.reshape(R.batchnorm_eval_ref(R.linear_ref(X, *p), g, b, mean, var), (X.shape[0], -1))

    def tm(torch):
        tb = (torch.nn.BatchNorm2d if dim == "2d" else torch.nn.BatchNorm1d)(C, affine=affine).double()
        tb.running_mean.copy_(torch.tensor(mean))
        tb.running_var.copy_(torch.tensor(var))
        return torch.nn.Sequential(torch.nn.Linear(*lin.param_shapes[0][::-1]), tb, torch.nn.Flatten())
    return model, f, X, tm


CASES = {
    "linear_seq": lambda: _seq_linear(),
    "linear_seq_T1": lambda: _seq_linear(T=1),
    "linear_seq_nobias_spatial": lambda: _seq_linear(bias=False, route="spatial"),
    "linear_seq_materialise": lambda: _seq_linear(route="materialise"),
    "layernorm": lambda: _layernorm(),
    "layernorm_T1_nobias": lambda: _layernorm(bias=False, T=1),
    "layernorm_noaffine": lambda: _layernorm(affine=False),
    "layernorm_2axes": _layernorm_2d,
    "embedding_padding": lambda: _embedding(),
    "embedding_T1": lambda: _embedding(padding_idx=None, T=1),
    "mha": lambda: _mha(),
    "mha_one_head": lambda: _mha(heads=1),
    "mha_nobias_T1": lambda: _mha(bias=False, T=1),
    "mha_3heads": lambda: _mha(E=6, heads=3),
    "tel_post_relu": lambda: _tel(),
    "tel_post_gelu": lambda: _tel(act="gelu"),
    "tel_pre_relu": lambda: _tel(norm_first=True),
    "tel_pre_gelu_one_head": lambda: _tel(norm_first=True, act="gelu", heads=1),
    "tel_T1": lambda: _tel(T=1),
    "avgpool": lambda: _pool("avg", kernel_size=2),
    "avgpool_pad_ceil_exclude": lambda: _pool("avg", kernel_size=3, stride=2, padding=1,
                                              ceil_mode=True, count_include_pad=False),
    "avgpool_divisor": lambda: _pool("avg", kernel_size=(2, 3), stride=(1, 2), padding=(1, 1),
                                     divisor_override=4),
    "maxpool": lambda: _pool("max", kernel_size=2),
    "maxpool_overlap_pad_dil_ceil": lambda: _pool("max", kernel_size=3, stride=2, padding=1,
                                                  dilation=(1, 2), ceil_mode=True),
    "adaptive": lambda: _pool("adaptive", output_size=(4, 3)),
    "adaptive_none": lambda: _pool("adaptive", output_size=(None, 2)),
    "batchnorm1d": lambda: _batchnorm("1d"),
    "batchnorm1d_flat": lambda: _batchnorm("1d_flat"),
    "batchnorm2d": lambda: _batchnorm("2d"),
    "batchnorm2d_noaffine": lambda: _batchnorm("2d", affine=False),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    model, f, X, tm = CASES[request.param]()
    theta = 0.7 * np.random.default_rng(11).standard_normal(model.num_params)
    J = autograd.jacobian(lambda t: f(t, X))(theta)  # (N, C, P), autograd alone
    return request.param, model, f, theta, X, J, tm


# ------------------------------------------------------------------------ autograd
def test_forward(case):
    _, model, f, theta, X, _, _ = case
    assert_close(model.forward(theta, X), f(theta, X), 1e-12)


def test_jacobian_jvp_vjp(case):
    _, model, _, theta, X, J, _ = case
    rng = np.random.default_rng(12)
    assert_close(refngd.jacobian(model, theta, X), J)
    v = rng.standard_normal(theta.size)
    assert_close(refngd.jvp(model, theta, X, v), J @ v)
    w = rng.standard_normal(J.shape[:2])
    assert_close(refngd.vjp(model, theta, X, w), np.einsum("nc,ncp->p", w, J))


def test_per_sample_gradients(case):
    _, model, f, theta, X, _, _ = case
    Z = f(theta, X)
    y = np.random.default_rng(13).integers(0, Z.shape[1], Z.shape[0])

    def losses(t):  # per-sample cross-entropies, written with autograd
        Zt = f(t, X)
        m = anp.max(Zt, axis=1, keepdims=True)
        lse = anp.log(anp.sum(anp.exp(Zt - m), axis=1)) + m[:, 0]
        return lse - Zt[np.arange(Zt.shape[0]), y]

    assert_close(refngd.per_sample_gradients(model, theta, CrossEntropy(), X, y),
                 autograd.jacobian(losses)(theta))


def test_row_primitives(case):
    """K = 2 random cotangent rows per sample: every RowSet contraction against U = S J."""
    _, model, _, theta, X, J, _ = case
    rng = np.random.default_rng(14)
    N, C, P = J.shape
    S = rng.standard_normal((N, 2, C))
    U = np.einsum("nkc,ncp->nkp", S, J)
    rows = model.linearize(theta, X).backprop(S)
    Uf = U.reshape(2 * N, P)
    assert_close(rows.dense(), U)
    assert_close(rows.gram(), Uf @ Uf.T)
    v, w = rng.standard_normal(P), rng.standard_normal((N, 2))
    assert_close(rows.matvec(v), U @ v)
    assert_close(rows.rmatvec(w), np.einsum("nk,nkp->p", w, U))
    assert_close(rows.sq_sum(), (Uf * Uf).sum(axis=0))
    assert_close(rows.take(1, 2).gram(), U[:, 1] @ U[:, 1].T)


def test_directional_derivative_finite_differences(case):
    """J v against a 6th-order central difference of the forward pass (h = 1e-3)."""
    name, model, _, theta, X, _, _ = case
    v = np.random.default_rng(15).standard_normal(theta.size)
    if name == "embedding_padding":  # the padding row is read, but its gradient is 0 by definition
        v[:3] = 0.0
    v /= np.linalg.norm(v)
    h, coef = 1e-3, {1: 45 / 60, 2: -9 / 60, 3: 1 / 60}
    fd = sum(c * (model.forward(theta + j * h * v, X) - model.forward(theta - j * h * v, X))
             for j, c in coef.items()) / h
    assert_close(refngd.jvp(model, theta, X, v), fd, FD_TOL)


# ------------------------------------------------------------------------- PyTorch
def test_against_torch(case):
    torch = pytest.importorskip("torch")
    from twins import functional

    _, model, _, theta, X, J, tm = case
    module = tm(torch).double().eval()
    shapes = [tuple(p.shape) for _, p in module.named_parameters()]
    assert shapes == [s for layer in model.layers for s in layer.param_shapes]
    Xt = torch.tensor(X)
    f = functional(torch, module)

    def fn(th):
        return f(th, Xt)

    tt = torch.tensor(theta)
    assert_close(model.forward(theta, X), fn(tt).detach().numpy(), 1e-12)
    Jt = torch.autograd.functional.jacobian(fn, tt).numpy()  # (N, C, P): rows of sample n only
    assert_close(refngd.jacobian(model, theta, X), Jt)


# -------------------------------------------------------------------- bad input
@pytest.mark.parametrize("make, match", [
    (lambda: nn.MultiheadAttention(5, 2), "not divisible by num_heads"),
    (lambda: nn.TransformerEncoderLayer(6, 4, 8), "not divisible by num_heads"),
    (lambda: nn.MultiheadAttention(4, 2, dropout=0.1), "dropout=0.0"),
    (lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.1), "deterministic"),
    (lambda: nn.TransformerEncoderLayer(4, 2, 8, batch_first=False), "batch_first=True"),
    (lambda: nn.MultiheadAttention(4, 2, batch_first=False), "batch_first=True"),
    (lambda: nn.MultiheadAttention(4, 2, kdim=3), "kdim"),
    (lambda: nn.TransformerEncoderLayer(4, 2, 8, activation="tanh"), "'relu' or 'gelu'"),
    (lambda: nn.BatchNorm2d(3, track_running_stats=False), "couples the samples"),
    (lambda: nn.BatchNorm1d(0), "num_features"),
    (lambda: nn.LayerNorm(4, eps=0), "eps"),
    (lambda: nn.Embedding(5, 3, max_norm=1.0), "max_norm"),
    (lambda: nn.Embedding(5, 3, scale_grad_by_freq=True), "scale_grad_by_freq"),
    (lambda: nn.Embedding(5, 3, padding_idx=5), "padding_idx"),
    (lambda: nn.MaxPool2d(2, return_indices=True), "return_indices"),
    (lambda: nn.AvgPool2d(2, padding=2), "at most half"),
    (lambda: nn.AdaptiveAvgPool2d(0), "output_size"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_shape_and_input_errors():
    bad = nn.Sequential(nn.Linear(3, 4), nn.Flatten(), nn.MultiheadAttention(4, 2))
    with pytest.raises(ValueError, match=r"expects per-sample input shape \(T, 4\)"):
        bad.forward(np.zeros(bad.num_params), np.zeros((2, 3, 3)))
    emb = nn.Sequential(nn.Embedding(5, 3), nn.Flatten())
    theta = emb.init(np.random.default_rng(0))
    with pytest.raises(TypeError, match="integer indices"):
        emb.forward(theta, np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        emb.forward(theta, np.full((2, 4), 5))
    late = nn.Sequential(nn.Linear(2, 2), nn.Embedding(5, 3), nn.Flatten())
    with pytest.raises(ValueError, match="first layer"):
        late.forward(np.zeros(late.num_params), np.zeros((2, 2)))
    bn = nn.BatchNorm2d(3)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        bn.set_running_stats(np.zeros(2), np.ones(3))
    with pytest.raises(ValueError, match=">= 0"):
        bn.set_running_stats(np.zeros(3), -np.ones(3))
    with pytest.raises(ValueError, match="ending in"):
        nn.LayerNorm(4).out_shape((3, 5))


def test_parameter_order_and_init_follow_pytorch():
    torch = pytest.importorskip("torch")
    pairs = [
        (nn.TransformerEncoderLayer(4, 2, 6, norm_first=True),
         torch.nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True, norm_first=True)),
        (nn.TransformerEncoderLayer(4, 2, 6, bias=False),
         torch.nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True, bias=False)),
        (nn.MultiheadAttention(6, 3), torch.nn.MultiheadAttention(6, 3, batch_first=True)),
        (nn.LayerNorm((2, 3)), torch.nn.LayerNorm((2, 3))),
        (nn.Embedding(7, 2, padding_idx=-1), torch.nn.Embedding(7, 2, padding_idx=-1)),
        (nn.BatchNorm1d(3, bias=False), torch.nn.BatchNorm1d(3, bias=False)),
    ]
    for ours, theirs in pairs:
        assert list(ours.param_shapes) == [tuple(p.shape) for p in theirs.parameters()], ours
        init = ours.init_params(np.random.default_rng(0))
        for a, (name, p) in zip(init, theirs.named_parameters()):
            p = p.detach().numpy()
            assert a.shape == p.shape, name
            if np.all(p == p.flat[0]):  # PyTorch's constant inits: LN/BN 1 and 0, attention biases 0
                assert np.array_equal(a, p), name
    emb = nn.Embedding(7, 2, padding_idx=3).init_params(np.random.default_rng(0))[0]
    assert np.all(emb[3] == 0) and np.all(emb[[0, 1, 2, 4, 5, 6]] != 0)
    W = nn.MultiheadAttention(6, 3).init_params(np.random.default_rng(0))[0]
    assert np.abs(W).max() <= np.sqrt(6 / 24) and np.abs(W).max() > 0.8 * np.sqrt(6 / 24)


@pytest.mark.parametrize("route", ["spatial", "materialise"])
def test_embedding_and_projection_gram_routes(route):
    """Both Gram routes of the weight-shared layers inside Embedding and attention."""
    model = nn.Sequential(nn.Embedding(6, 4, padding_idx=1), nn.MultiheadAttention(4, 2),
                          nn.Flatten(), nn.Linear(5 * 4, 3))
    model.layers[0].gram_route = route
    for name in ("in_proj", "out_proj"):
        model.layers[1].children[name].gram_route = route
    rng = np.random.default_rng(16)
    theta, X = model.init(rng), rng.integers(0, 6, (4, 5))
    S = rng.standard_normal((4, 2, 3))
    rows = model.linearize(theta, X).backprop(S)
    U = rows.dense().reshape(8, -1)
    assert_close(rows.gram(), U @ U.T)
    assert_close(U, np.einsum("nkc,ncp->nkp", S, refngd.jacobian(model, theta, X)).reshape(8, -1))


@pytest.mark.parametrize("layer, in_shape", [
    (nn.Linear(5, 4), (5,)), (nn.Linear(5, 4, bias=False), (5,)), (nn.Linear(5, 4), (3, 5)),
    (nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 6)), (nn.Conv2d(2, 3, 2, bias=False), (2, 4, 4)),
])
def test_row_sum_into_writes_row_sum(layer, in_shape):
    """The in-place Uᵀw (written into views of the result vector) equals the block route."""
    rng = np.random.default_rng(3)
    N, K = 4, 3
    params = layer.init_params(rng)
    x = rng.standard_normal((N,) + in_shape)
    z, cache = layer.forward(params, x)
    B = rng.standard_normal((N, K) + z.shape[1:])
    w = rng.standard_normal((N, K))
    expected = np.concatenate([b.reshape(-1) for b in layer.row_sum(cache, B, w)])
    out = np.full(expected.size, np.nan)
    blocks, i = [], 0
    for shape in layer.param_shapes:
        size = int(np.prod(shape))
        blocks.append(out[i:i + size].reshape(shape))
        i += size
    layer.row_sum_into(cache, B, w, blocks)
    assert_close(out, expected, 1e-14)
