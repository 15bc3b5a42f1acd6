"""Conv2d: forward against PyTorch and a naive loop, row primitives against HIPS autograd."""
from __future__ import annotations

import pathlib

import autograd
import autograd.numpy as anp
import numpy as np
import pytest

from refngd.nn import Conv2d, Flatten, Linear, ReLU, Sequential, Tanh
from refngd.nn import conv as conv_module
from refngd.nn import conv_rows as conv_rows_module
from refngd.nn.conv import conv_gram_flops, conv_gram_route

RTOL, ATOL = 1e-10, 1e-12

# (in, out, kernel, stride, padding, dilation, bias, input (N, H, W))
CONFIGS = [
    (2, 3, 3, 1, 0, 1, True, (2, 6, 7)),
    (3, 4, 3, 2, 1, 1, True, (3, 9, 8)),
    (2, 2, (2, 3), (1, 2), (2, 1), 1, True, (2, 5, 7)),
    (1, 3, 3, 1, 2, 2, False, (2, 7, 7)),
    (2, 3, (3, 2), 2, (0, 1), (2, 1), True, (1, 9, 6)),
    (3, 2, 1, 1, 0, 1, False, (4, 3, 5)),
    (1, 1, (1, 4), (3, 1), (1, 0), (1, 2), True, (1, 7, 11)),
]


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def naive_conv(x, w, b, stride, padding, dilation):
    """Direct definition of the cross-correlation, one output entry at a time."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    Co, _, kh, kw = w.shape
    xp = np.zeros((N, C, H + 2 * ph, W + 2 * pw))
    xp[:, :, ph:ph + H, pw:pw + W] = x
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((N, Co, Ho, Wo))
    for n in range(N):
        for o in range(Co):
            for i in range(Ho):
                for j in range(Wo):
                    acc = 0.0 if b is None else b[o]
                    for c in range(C):
                        for a in range(kh):
                            for e in range(kw):
                                acc += w[o, c, a, e] * xp[n, c, i * sh + a * dh, j * sw + e * dw]
                    out[n, o, i, j] = acc
    return out


def _layer_and_data(cfg, seed=0):
    cin, cout, k, s, p, d, bias, (N, H, W) = cfg
    layer = Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias)
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(sh) for sh in layer.param_shapes]
    x = rng.standard_normal((N, cin, H, W))
    return layer, params, x, rng


# --------------------------------------------------------------------------- forward
@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_matches_naive_loop(cfg):
    layer, params, x, _ = _layer_and_data(cfg)
    z, _ = layer.forward(params, x)
    cin, cout, k, s, p, d, bias, _ = cfg
    ref = naive_conv(x, params[0], params[1] if bias else None, s, p, d)
    assert z.shape == ref.shape == (x.shape[0],) + layer.out_shape(x.shape[1:])
    np.testing.assert_allclose(z, ref, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_forward_backward_match_torch(cfg):
    torch = pytest.importorskip("torch")
    cin, cout, k, s, p, d, bias, _ = cfg
    layer, _, x, rng = _layer_and_data(cfg)
    torch.manual_seed(0)
    tconv = torch.nn.Conv2d(cin, cout, k, stride=s, padding=p, dilation=d, bias=bias).double()
    theta = torch.nn.utils.parameters_to_vector(tconv.parameters()).detach().numpy()
    params, i = [], 0  # PyTorch's parameter vector split with our param_shapes
    for shape in layer.param_shapes:
        params.append(theta[i:i + int(np.prod(shape))].reshape(shape))
        i += params[-1].size
    assert i == theta.size
    z, cache = layer.forward(params, x)
    tx = torch.tensor(x, requires_grad=True)
    tz = tconv(tx)
    np.testing.assert_allclose(z, tz.detach().numpy(), rtol=RTOL, atol=ATOL)
    # backward with K = 2 rows per sample: input cotangents = vjp of each row
    K = 2
    B = rng.standard_normal((x.shape[0], K) + z.shape[1:])
    dx = layer.backward(params, cache, B)
    assert dx.shape == (x.shape[0], K) + x.shape[1:]
    for k in range(K):
        (ref,) = torch.autograd.grad(tz, tx, torch.tensor(B[:, k]), retain_graph=True)
        np.testing.assert_allclose(dx[:, k], ref.numpy(), rtol=RTOL, atol=ATOL)


def test_init_params_follow_pytorch_bound():
    layer = Conv2d(3, 5, (2, 3))
    w, b = layer.init_params(np.random.default_rng(0))
    assert w.shape == (5, 3, 2, 3) and b.shape == (5,)
    bound = 1 / np.sqrt(3 * 2 * 3)
    assert np.abs(w).max() <= bound and np.abs(b).max() <= bound
    assert np.abs(w).max() > 0.8 * bound  # uses the whole interval
    assert layer.param_shapes == ((5, 3, 2, 3), (5,))
    assert Conv2d(3, 5, 1, bias=False).param_shapes == ((5, 3, 1, 1),)


# ------------------------------------------------------------------ bad input / API
def test_wrong_channels_and_empty_output_raise():
    layer = Conv2d(3, 4, 5)
    with pytest.raises(ValueError, match=r"expects per-sample input shape \(3, H, W\)"):
        layer.out_shape((2, 8, 8))
    with pytest.raises(ValueError, match="3 channels"):
        layer.out_shape((8, 8))
    with pytest.raises(ValueError, match="empty output"):
        layer.out_shape((3, 4, 8))
    assert layer.out_shape((3, 4, 8)[:1] + (5, 9)) == (4, 1, 5)
    model = Sequential(Conv2d(3, 2, 3), Flatten(), Linear(2 * 2 * 2, 2))
    theta = model.init(np.random.default_rng(0))
    with pytest.raises(ValueError, match="layer 0: .*3 channels"):
        model.forward(theta, np.zeros((2, 1, 4, 4)))
    for kwargs in ({"kernel_size": 0}, {"kernel_size": (2, 2, 2)}, {"kernel_size": 3, "stride": 0},
                   {"kernel_size": 3, "padding": -1}, {"kernel_size": 3, "padding": "same"},
                   {"kernel_size": 2.5}, {"kernel_size": (2, True)}):
        with pytest.raises(ValueError):
            Conv2d(1, 1, **kwargs)
    with pytest.raises(ValueError, match="in_channels >= 1 and out_channels >= 1"):
        Conv2d(0, 1, 3)
    with pytest.raises(ValueError, match="in_channels >= 1 and out_channels >= 1"):
        Conv2d(1.5, 1, 3)
    assert Conv2d(np.int64(2), 3, np.int64(3)).param_shapes == ((3, 2, 3, 3), (3,))
    layer.gram_route = "fast"
    x = np.zeros((1, 3, 5, 5))
    _, cache = layer.forward(layer.init_params(np.random.default_rng(0)), x)
    with pytest.raises(ValueError, match="gram_route"):
        layer.row_gram(cache, np.zeros((1, 1, 4, 1, 1)))


def test_conv_module_does_not_use_numpy():
    src = pathlib.Path(conv_module.__file__).read_text()
    assert "import numpy" not in src and "np." not in src


def test_gram_route_choice_by_flops():
    # late layer, small spatial extent, many parameters: the spatial route is cheaper
    assert conv_gram_route(N=32, K=10, T=16, C_out=256, D=256 * 9) == "spatial"
    # early layer, large images, few parameters: materialising is cheaper
    assert conv_gram_route(N=32, K=10, T=32 * 32, C_out=16, D=27) == "materialise"
    mat, spa = conv_gram_flops(2, 3, 5, 4, 7, bias=False)
    R = 6
    assert mat == 2 * R * 5 * 4 * 7 + R * R * 4 * 7
    assert spa == 4 * 25 * 7 + 2 * R * 25 * 4 + R * R * 5 * 4


# ------------------------------------------------------------- network vs autograd
def _ag_conv(x, w, b, stride, padding, dilation):
    """Convolution in autograd.numpy as a sum over kernel offsets of strided slices."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(padding), _pair(dilation)
    N, C, H, W = x.shape
    Co, _, kh, kw = w.shape
    if ph:
        zh = anp.zeros((N, C, ph, W))
        x = anp.concatenate([zh, x, zh], axis=2)
    if pw:
        zw = anp.zeros((N, C, H + 2 * ph, pw))
        x = anp.concatenate([zw, x, zw], axis=3)
    Ho = (H + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    Wo = (W + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = 0.0
    for a in range(kh):
        for e in range(kw):
            patch = x[:, :, a * dh:a * dh + sh * (Ho - 1) + 1:sh, e * dw:e * dw + sw * (Wo - 1) + 1:sw]
            out = out + anp.tensordot(patch, w[:, :, a, e], axes=([1], [1]))  # (N, Ho, Wo, Co)
    out = anp.transpose(out, (0, 3, 1, 2))
    return out if b is None else out + b[None, :, None, None]


NETS = {
    "relu": dict(c1=dict(k=3, s=1, p=1, d=1, b=True), c2=dict(k=(2, 3), s=2, p=(0, 1), d=1, b=False),
                 act=(ReLU, lambda t: anp.maximum(t, 0.0)), cin=2, hw=(7, 6), N=3, K=2, C=3),
    "tanh": dict(c1=dict(k=(3, 2), s=(2, 1), p=2, d=(1, 2), b=False), c2=dict(k=2, s=1, p=0, d=2, b=True),
                 act=(Tanh, anp.tanh), cin=1, hw=(9, 8), N=2, K=3, C=2),
}


def _build(spec):
    c1, c2 = spec["c1"], spec["c2"]
    conv1 = Conv2d(spec["cin"], 3, c1["k"], c1["s"], c1["p"], c1["d"], c1["b"])
    conv2 = Conv2d(3, 2, c2["k"], c2["s"], c2["p"], c2["d"], c2["b"])
    shape = conv2.out_shape(conv1.out_shape((spec["cin"],) + spec["hw"]))
    lin = Linear(int(np.prod(shape)), spec["C"])
    model = Sequential(conv1, spec["act"][0](), conv2, Flatten(), lin)
    layers = [(conv1, c1), (conv2, c2)]

    def f(theta, X):  # the same network written in autograd.numpy
        h, i = X, 0
        for j, (layer, c) in enumerate(layers):
            shapes = layer.param_shapes
            w = anp.reshape(theta[i:i + int(np.prod(shapes[0]))], shapes[0])
            i += int(np.prod(shapes[0]))
            b = None
            if c["b"]:
                b, i = theta[i:i + shapes[1][0]], i + shapes[1][0]
            h = _ag_conv(h, w, b, c["s"], c["p"], c["d"])
            if j == 0:
                h = spec["act"][1](h)
        h = anp.reshape(h, (h.shape[0], -1))
        W = anp.reshape(theta[i:i + lin.in_features * lin.out_features], (lin.out_features, lin.in_features))
        i += W.size
        return anp.dot(h, W.T) + theta[i:]

    return model, (conv1, conv2), f


def _setup(name, seed=0):
    spec = NETS[name]
    model, convs, f = _build(spec)
    rng = np.random.default_rng(seed)
    theta = model.init(rng) + 0.3 * rng.standard_normal(model.num_params)
    X = rng.standard_normal((spec["N"], spec["cin"]) + spec["hw"])
    cot = rng.standard_normal((spec["N"], spec["K"], spec["C"]))
    return model, convs, f, theta, X, cot, rng


@pytest.mark.parametrize("name", sorted(NETS))
def test_network_rows_match_autograd(name, monkeypatch):
    model, convs, f, theta, X, cot, rng = _setup(name)
    lin = model.linearize(theta, X)
    np.testing.assert_allclose(lin.outputs, f(theta, X), rtol=RTOL, atol=ATOL)
    J = autograd.jacobian(lambda th: f(th, X))(theta)  # (N, C, P): J_n = ∂z_n/∂θ
    U = np.einsum("nkc,ncp->nkp", cot, J)
    N, K, P = U.shape
    Uf = U.reshape(N * K, P)
    rows = lin.backprop(cot)
    np.testing.assert_allclose(rows.dense(), U, rtol=RTOL, atol=ATOL)
    v, w = rng.standard_normal(P), rng.standard_normal((N, K))
    np.testing.assert_allclose(rows.matvec(v), U @ v, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rows.rmatvec(w), w.reshape(-1) @ Uf, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(rows.sq_sum(), (U * U).sum(axis=(0, 1)), rtol=RTOL, atol=ATOL)
    # Uᵀw by both routes (per-sample products from T = 1 locations on, or never), for
    # K rows and for one row a sample (its own branch), weighted and through row_sum too
    rows1 = lin.backprop(cot[:, :1])
    w1 = rng.standard_normal((N, 1))
    for threshold in (1, 10**9):
        monkeypatch.setattr(conv_rows_module, "_PER_SAMPLE_T", threshold)
        np.testing.assert_allclose(rows.rmatvec(w), w.reshape(-1) @ Uf, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(rows1.rmatvec(w1), w1[:, 0] @ U[:, 0], rtol=RTOL, atol=ATOL)
        for e in rows.layers:
            blocks = e.layer.row_sum(e.cache, e.B, w)
            np.testing.assert_allclose(np.concatenate([b.reshape(-1) for b in blocks]),
                                       w.reshape(-1) @ Uf[:, e.start:e.stop], rtol=RTOL, atol=ATOL)
    # the transposed convolution in blocks of one row (every block path of backward)
    monkeypatch.setattr(conv_module, "_BACKWARD_CHUNK_ELEMS", 1)
    np.testing.assert_allclose(lin.backprop(cot).dense(), U, rtol=RTOL, atol=ATOL)
    ref_gram = Uf @ Uf.T
    # both Gram routes, once unchunked and once with tiny chunks (every block path)
    for chunk in (conv_rows_module._CHUNK_ELEMS, 1):
        monkeypatch.setattr(conv_rows_module, "_CHUNK_ELEMS", chunk)  # where the routes read it
        for route in ("materialise", "spatial", None):
            for c in convs:
                c.gram_route = route
            G = rows.gram()
            assert G.dtype == np.float64 and G.shape == (N * K, N * K)
            np.testing.assert_allclose(G, ref_gram, rtol=RTOL, atol=ATOL * np.abs(ref_gram).max())
            assert np.array_equal(G, G.T)
        np.testing.assert_allclose(rows.sq_sum(), (U * U).sum(axis=(0, 1)), rtol=RTOL, atol=ATOL)


def test_layer_gram_routes_agree_per_layer():
    # the last config has N = 17: spatial blocks of 3 samples, a ragged last block
    for cfg in CONFIGS + [(2, 3, 2, 1, 1, 1, True, (17, 4, 5))]:
        layer, params, x, rng = _layer_and_data(cfg, seed=1)
        z, cache = layer.forward(params, x)
        B = rng.standard_normal((x.shape[0], 3) + z.shape[1:])
        Uf = layer.row_grads(cache, B).reshape(x.shape[0] * 3, -1)
        for route in ("materialise", "spatial"):
            layer.gram_route = route
            np.testing.assert_allclose(layer.row_gram(cache, B), Uf @ Uf.T, rtol=RTOL,
                                       atol=1e-12 * np.abs(Uf).max() ** 2)


def test_matvec_against_central_differences():
    model, _, _, theta, X, cot, rng = _setup("tanh", seed=3)
    v = rng.standard_normal(model.num_params)
    eps = 1e-6
    dz = (model.forward(theta + eps * v, X) - model.forward(theta - eps * v, X)) / (2 * eps)
    ref = np.einsum("nkc,nc->nk", cot, dz)
    got = model.linearize(theta, X).backprop(cot).matvec(v)
    np.testing.assert_allclose(got, ref, rtol=1e-7, atol=1e-8)


def test_float32_runs_and_gram_is_float64():
    model, convs, _, theta, X, cot, _ = _setup("relu")
    rows32 = model.linearize(theta.astype(np.float32), X).backprop(cot)
    rows64 = model.linearize(theta, X).backprop(cot)
    assert rows32.dense().dtype == np.float32
    for route in ("materialise", "spatial"):
        for c in convs:
            c.gram_route = route
        G = rows32.gram()
        assert G.dtype == np.float64
        np.testing.assert_allclose(G, rows64.gram(), rtol=1e-4, atol=1e-4 * np.abs(G).max())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("groups,bias", [(1, False), (2, True), (4, True)])
def test_rmatvec_routes_agree_with_the_per_row_gradients(groups, bias, dtype, monkeypatch):
    """Uᵀw of a grouped convolution by per-sample products and by the (N·T)-long product,
    against the per-row gradients U (row_grads, another contraction), K = 1 and K = 3."""
    rng = np.random.default_rng(3)
    model = Sequential(Conv2d(4, 8, 3, 2, 1, 1, bias, groups=groups), Flatten(), Linear(8 * 16, 2))
    theta = model.init(rng).astype(dtype)
    X = rng.standard_normal((3, 4, 7, 8)).astype(dtype)
    lin = model.linearize(theta, X)
    rtol = 1e-12 if dtype == np.float64 else 1e-5
    for K in (1, 3):
        rows = lin.backprop(rng.standard_normal((3, K, 2)).astype(dtype))
        U = rows.dense().astype(np.float64).reshape(3 * K, -1)
        w = rng.standard_normal((3, K)).astype(dtype)
        for threshold, chunk in ((1, 1), (1, 10**9), (10**9, 10**9)):  # chunk 1: a sample a block
            monkeypatch.setattr(conv_rows_module, "_PER_SAMPLE_T", threshold)
            monkeypatch.setattr(conv_rows_module, "_CHUNK_ELEMS", chunk)
            got = rows.rmatvec(w)
            assert got.dtype == dtype
            np.testing.assert_allclose(got, w.reshape(-1).astype(np.float64) @ U, rtol=rtol,
                                       atol=rtol * np.abs(U).max())


@pytest.mark.parametrize("threshold", [1, 10**9])
def test_rmatvec_of_float32_rows_with_float64_weights_is_float64_accurate(threshold, monkeypatch):
    """Uᵀw of float32 rows and float64 weights is float64 (NumPy's promotion) and as
    accurate as float64 on those rows, by either route — not float32 products promoted."""
    monkeypatch.setattr(conv_rows_module, "_PER_SAMPLE_T", threshold)
    rng = np.random.default_rng(0)
    model = Sequential(Conv2d(3, 8, 3, 1, 1), Flatten())
    theta = model.init(rng, dtype="float32")
    X = rng.standard_normal((4, 3, 16, 16)).astype(np.float32)
    lin = model.linearize(theta, X)
    rows = lin.backprop(rng.standard_normal((4, 1, lin.outputs.shape[1])).astype(np.float32))
    w = rng.standard_normal((4, 1))
    got = rows.rmatvec(w)
    e = rows.layers[0]
    A, Bm = e.cache[0].astype(np.float64), e.B.reshape(4, 8, -1).astype(np.float64)
    ref = np.concatenate([np.einsum("n,not,ndt->od", w[:, 0], Bm, A).ravel(),
                          np.einsum("n,not->o", w[:, 0], Bm)])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13 * np.abs(ref).max())
