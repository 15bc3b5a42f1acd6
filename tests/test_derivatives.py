"""Derivatives of explicit refngd networks against two independent oracles.

Oracle 1 — HIPS autograd: every test network is rewritten from scratch with
``autograd.numpy`` (parameters unpacked from θ in PyTorch order, activations and losses
written out by hand) and differentiated with ``autograd.jacobian`` / ``autograd.grad``.
Agreement is required to 1e-10 (relative, Frobenius norm) in float64.

Oracle 2 — central finite differences of refngd's own forward pass (step 1e-6),
required to agree to 1e-6 relative.  This checks backward against forward without
trusting any autodiff.

Covered: ``refngd.jacobian``, ``jvp``, ``vjp``, ``per_sample_gradients``, ``gradient``,
``loss_value`` and the RowSet contractions of ``model.linearize(θ, X).backprop(rows)``
(``dense``, ``gram``, ``matvec``, ``rmatvec``, ``sq_sum``), for MLPs with every activation,
bias on/off, every loss and reduction, degenerate shapes (N = 1, C = 1, one hidden unit),
small CNNs (when ``refngd.nn.Conv2d`` exists), ``FunctionModel`` and float32 models.
"""
from __future__ import annotations

import math

import autograd
import autograd.numpy as anp
import numpy as np
import pytest
from autograd.scipy.special import erf as anp_erf
from autograd.scipy.special import logsumexp as anp_logsumexp
from hypothesis import given, settings
from hypothesis import strategies as st

import refngd
from refngd import nn
from layer_oracles import conv_out
from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss

AD_RTOL = 1e-10  # against HIPS autograd, float64
FD_RTOL = 1e-6  # against central finite differences
FD_STEP = 1e-6
ATOL = 1e-13  # absolute floor, for quantities that are exactly zero (CE with C = 1)

HAS_CONV = hasattr(nn, "Conv2d")
needs_conv = pytest.mark.skipif(not HAS_CONV, reason="refngd.nn has no Conv2d yet")


# ------------------------------------------------------------------ helpers
def assert_close(actual, expected, rtol, atol=ATOL, what=""):
    """‖actual − expected‖ ≤ rtol‖expected‖ + atol (Frobenius), with matching shapes."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = float(np.linalg.norm((actual - expected).ravel()))
    scale = float(np.linalg.norm(expected.ravel()))
    assert err <= rtol * scale + atol, f"{what}: error {err:.3e} vs norm {scale:.3e} (rtol {rtol})"


def fd_jacobian(fun, theta, h=FD_STEP):
    """Central differences of ``fun: θ -> array`` in every coordinate; shape (*out, P)."""
    cols = []
    for i in range(theta.size):
        e = np.zeros_like(theta)
        e[i] = h
        cols.append((np.asarray(fun(theta + e)) - np.asarray(fun(theta - e))) / (2 * h))
    return np.stack(cols, axis=-1)


# -------------------------------------------------- activations, written independently
SQRT2 = math.sqrt(2.0)


def _gelu_tanh(x):
    c = math.sqrt(2.0 / math.pi)
    return 0.5 * x * (1.0 + anp.tanh(c * (x + 0.044715 * x ** 3)))


ACTIVATIONS = {  # name: (refngd layer factory, autograd.numpy function)
    "relu": (nn.ReLU, lambda x: x * (x > 0)),
    "tanh": (nn.Tanh, anp.tanh),
    "sigmoid": (nn.Sigmoid, lambda x: 1.0 / (1.0 + anp.exp(-x))),
    "gelu": (lambda: nn.GELU("none"), lambda x: 0.5 * x * (1.0 + anp_erf(x / SQRT2))),
    "gelu_tanh": (lambda: nn.GELU("tanh"), _gelu_tanh),
}
ACT_NAMES = list(ACTIVATIONS)


# ----------------------------------------------------------- losses, written independently
def anp_per_sample_loss(name, Z, y):
    """l_n for the three losses, from their textbook definitions."""
    if name == "ce":
        return anp_logsumexp(Z, axis=1) - Z[np.arange(Z.shape[0]), y]
    if name == "mse":
        return anp.sum((Z - y) ** 2, axis=1)
    return anp.sum(anp.logaddexp(0.0, Z) - y * Z, axis=1)  # bce: softplus(z) − y z


def reduction_constant(name, reduction, N, C):
    """c: 1 for sum; 1/N for CE mean; 1/(N·C) for MSE/BCE mean (PyTorch averages elements)."""
    if reduction == "sum":
        return 1.0
    return 1.0 / N if name == "ce" else 1.0 / (N * C)


LOSS_CLASSES = {"ce": CrossEntropy, "mse": MSELoss, "bce": BCEWithLogits}


def make_targets(name, N, C, rng):
    if name == "ce":
        return rng.integers(0, C, size=N)
    if name == "mse":
        return rng.standard_normal((N, C))
    return rng.uniform(0.0, 1.0, size=(N, C))


# ------------------------------------------------------------------ test networks
def make_mlp(widths, act, bias):
    """A refngd MLP and the same network as an independent autograd.numpy function."""
    layer_fac, act_fn = ACTIVATIONS[act]
    layers = []
    for i, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        if i < len(widths) - 2:
            layers.append(layer_fac())
    model = nn.Sequential(*layers)

    def f(theta, X):
        i, a = 0, X
        n_layers = len(widths) - 1
        for l, (d_in, d_out) in enumerate(zip(widths[:-1], widths[1:])):
            W = anp.reshape(theta[i:i + d_in * d_out], (d_out, d_in))  # PyTorch (out, in)
            i += d_in * d_out
            a = anp.dot(a, W.T)
            if bias:
                a = a + theta[i:i + d_out]
                i += d_out
            if l < n_layers - 1:
                a = act_fn(a)
        assert i == theta.shape[0]
        return a

    return model, f


def anp_conv2d(x, W, b, stride, padding, dilation):
    """Conv2d (cross-correlation, PyTorch semantics) by explicit patch gathering."""
    N, C, H, Wd = x.shape
    kh, kw = W.shape[2:]
    p = padding
    if p:
        zr = anp.zeros((N, C, p, Wd))
        x = anp.concatenate([zr, x, zr], axis=2)
        zc = anp.zeros((N, C, H + 2 * p, p))
        x = anp.concatenate([zc, x, zc], axis=3)
    Ho = conv_out(H, kh, stride, p, dilation)
    Wo = conv_out(Wd, kw, stride, p, dilation)
    rows = (np.arange(Ho) * stride)[:, None] + (np.arange(kh) * dilation)[None, :]  # (Ho, kh)
    cols = (np.arange(Wo) * stride)[:, None] + (np.arange(kw) * dilation)[None, :]  # (Wo, kw)
    I = np.broadcast_to(rows[:, None, :, None], (Ho, Wo, kh, kw))
    J = np.broadcast_to(cols[None, :, None, :], (Ho, Wo, kh, kw))
    patches = x[:, :, I, J]  # (N, C, Ho, Wo, kh, kw)
    out = anp.einsum("nchwij,ocij->nohw", patches, W)
    if b is not None:
        out = out + b[None, :, None, None]
    return out


def _kpair(k):
    return tuple(k) if isinstance(k, tuple) else (k, k)


def make_cnn(in_shape, convs, act, bias, C):
    """convs: list of (out_channels, k, stride, padding, dilation); k an int or (kh, kw).

    Conv → act → ... → Flatten → Linear, in refngd and as an autograd.numpy function.
    """
    layer_fac, act_fn = ACTIVATIONS[act]
    c, h, w = in_shape
    layers, spec = [], []
    for (oc, k, s, p, d) in convs:
        kh, kw = _kpair(k)
        layers += [nn.Conv2d(c, oc, k, stride=s, padding=p, dilation=d, bias=bias), layer_fac()]
        spec.append((c, oc, kh, kw, s, p, d))
        c, h, w = oc, conv_out(h, kh, s, p, d), conv_out(w, kw, s, p, d)
    feat = c * h * w
    layers += [nn.Flatten(), nn.Linear(feat, C, bias=bias)]
    model = nn.Sequential(*layers)

    def f(theta, X):
        i, a = 0, X
        for (ic, oc, kh, kw, s, p, d) in spec:
            W = anp.reshape(theta[i:i + oc * ic * kh * kw], (oc, ic, kh, kw))  # PyTorch order
            i += oc * ic * kh * kw
            b = None
            if bias:
                b = theta[i:i + oc]
                i += oc
            a = act_fn(anp_conv2d(a, W, b, s, p, d))
        a = anp.reshape(a, (a.shape[0], -1))  # row-major (C, H, W), like torch.nn.Flatten
        W = anp.reshape(theta[i:i + C * feat], (C, feat))
        i += C * feat
        a = anp.dot(a, W.T)
        if bias:
            a = a + theta[i:i + C]
            i += C
        assert i == theta.shape[0]
        return a

    return model, f


def setup(model, N, in_shape, seed=0):
    rng = np.random.default_rng(seed)
    theta = model.init(rng)
    theta = theta + 0.3 * rng.standard_normal(theta.shape)  # break PyTorch's small-init symmetry
    X = rng.standard_normal((N,) + tuple(in_shape))
    return theta, X, rng


# ---------------------------------------------------------- shared checks of one network
def check_jacobian(model, f, theta, X):
    J = refngd.jacobian(model, theta, X)
    Z = model.forward(theta, X)
    assert_close(Z, f(theta, X), AD_RTOL, what="forward")
    J_ad = autograd.jacobian(lambda t: f(t, X))(theta)  # (N, C, P): z_n depends on x_n only
    assert_close(J, J_ad, AD_RTOL, what="jacobian vs autograd")
    J_fd = fd_jacobian(lambda t: model.forward(t, X), theta)
    assert_close(J, J_fd, FD_RTOL, atol=1e-9, what="jacobian vs finite differences")
    return J


def check_jvp_vjp(model, theta, X, J, rng):
    N, C, P = J.shape
    v = rng.standard_normal(P)
    w = rng.standard_normal((N, C))
    assert_close(refngd.jvp(model, theta, X, v), np.einsum("ncp,p->nc", J, v), AD_RTOL, what="jvp")
    assert_close(refngd.vjp(model, theta, X, w), np.einsum("ncp,nc->p", J, w), AD_RTOL, what="vjp")
    # J v as a directional finite difference, independent of J
    h = FD_STEP
    jv_fd = (model.forward(theta + h * v, X) - model.forward(theta - h * v, X)) / (2 * h)
    assert_close(refngd.jvp(model, theta, X, v), jv_fd, FD_RTOL, atol=1e-9, what="jvp vs fd")


def check_loss_derivatives(model, f, theta, X, loss_name, reduction, rng):
    N = X.shape[0]
    C = model.forward(theta, X).shape[1]
    y = make_targets(loss_name, N, C, rng)
    loss = LOSS_CLASSES[loss_name](reduction)
    c = reduction_constant(loss_name, reduction, N, C)
    assert loss.scale(model.forward(theta, X)) == pytest.approx(c, rel=1e-15)

    def per_sample_ad(t):
        return anp_per_sample_loss(loss_name, f(t, X), y)

    def reduced_ad(t):
        return c * anp.sum(per_sample_ad(t))

    G = refngd.per_sample_gradients(model, theta, loss, X, y)
    g = refngd.gradient(model, theta, loss, X, y)
    # values
    assert refngd.loss_value(model, theta, loss, X, y) == pytest.approx(float(reduced_ad(theta)), rel=1e-12, abs=1e-14)
    # autograd oracle
    assert_close(G, autograd.jacobian(per_sample_ad)(theta), AD_RTOL, what="per-sample grads vs autograd")
    assert_close(g, autograd.grad(reduced_ad)(theta), AD_RTOL, what="gradient vs autograd")
    # consistency: g = c Σ_n g_n
    assert_close(c * G.sum(axis=0), g, 1e-13, what="c * sum per-sample == gradient")
    # finite differences of refngd's own losses
    G_fd = fd_jacobian(lambda t: loss.per_sample(model.forward(t, X), y), theta)
    assert_close(G, G_fd, FD_RTOL, atol=1e-9, what="per-sample grads vs fd")
    g_fd = fd_jacobian(lambda t: loss(model.forward(t, X), y), theta)
    assert_close(g, g_fd, FD_RTOL, atol=1e-9, what="gradient vs fd")
    return G, g


def check_rowset(model, theta, X, J, K, rng):
    """All RowSet contractions for random cotangent rows (N, K, C) against U = cot·J."""
    N, C, P = J.shape
    cot = rng.standard_normal((N, K, C))
    rows = model.linearize(theta, X).backprop(cot)
    assert (rows.N, rows.K, rows.P, rows.R) == (N, K, P, N * K)
    U = np.einsum("nkc,ncp->nkp", cot, J)
    Uf = U.reshape(N * K, P)
    assert_close(rows.dense(), U, AD_RTOL, what="dense")
    gram = rows.gram()
    assert gram.dtype == np.float64
    assert_close(gram, Uf @ Uf.T, AD_RTOL, what="gram")
    v = rng.standard_normal(P)
    assert_close(rows.matvec(v), U @ v, AD_RTOL, what="matvec")
    wts = rng.standard_normal((N, K))
    assert_close(rows.rmatvec(wts), wts.reshape(-1) @ Uf, AD_RTOL, what="rmatvec")
    assert_close(rows.sq_sum(), (Uf * Uf).sum(axis=0), AD_RTOL, what="sq_sum")
    # rows ordered r = n·K + k
    r = rng.integers(N * K)
    assert_close(rows.dense().reshape(N * K, P)[r], U[r // K, r % K], AD_RTOL, what="row order")
    # finite differences of θ ↦ ⟨cot_nk, z_n(θ)⟩
    U_fd = fd_jacobian(lambda t: np.einsum("nkc,nc->nk", cot, model.forward(t, X)), theta)
    assert_close(rows.dense(), U_fd, FD_RTOL, atol=1e-9, what="dense vs fd")
    return cot, rows


# ==================================================================== MLP tests
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("act", ACT_NAMES)
def test_mlp_jacobian_jvp_vjp(act, bias):
    model, f = make_mlp([3, 5, 4, 3], act, bias)
    theta, X, rng = setup(model, 4, (3,), seed=1)
    J = check_jacobian(model, f, theta, X)
    assert J.shape == (4, 3, model.num_params)
    check_jvp_vjp(model, theta, X, J, rng)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
@pytest.mark.parametrize("act", ACT_NAMES)
def test_mlp_loss_gradients(act, loss_name, reduction):
    bias = (ACT_NAMES.index(act) + len(loss_name)) % 2 == 0  # cover bias on and off
    model, f = make_mlp([4, 6, 3], act, bias)
    theta, X, rng = setup(model, 5, (4,), seed=2)
    check_loss_derivatives(model, f, theta, X, loss_name, reduction, rng)


@pytest.mark.parametrize("K", [1, 2, 5])
@pytest.mark.parametrize("act", ["relu", "gelu_tanh"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_mlp_rowset(act, bias, K):
    model, f = make_mlp([3, 4, 4, 2], act, bias)
    theta, X, rng = setup(model, 3, (3,), seed=3)
    J = autograd.jacobian(lambda t: f(t, X))(theta)
    cot, rows = check_rowset(model, theta, X, J, K, rng)
    # the FunctionModel route (explicit U from autograd) gives the same contractions
    frows = refngd.FunctionModel(f, theta).linearize(theta, X).backprop(cot)
    assert_close(frows.gram(), rows.gram(), AD_RTOL, what="FunctionModel gram")
    assert_close(frows.sq_sum(), rows.sq_sum(), AD_RTOL, what="FunctionModel sq_sum")


ODD_SHAPES = {  # name: (N, widths)
    "N1": (1, [3, 4, 2]),
    "C1": (4, [3, 4, 1]),
    "hidden1": (3, [2, 1, 3]),
    "all_ones": (1, [1, 1, 1]),
    "single_linear": (2, [3, 2]),
    "deep_narrow": (2, [2, 1, 1, 1, 2]),
}


@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
@pytest.mark.parametrize("shape", list(ODD_SHAPES))
def test_mlp_odd_shapes(shape, loss_name):
    N, widths = ODD_SHAPES[shape]
    act = ACT_NAMES[list(ODD_SHAPES).index(shape) % len(ACT_NAMES)]
    model, f = make_mlp(widths, act, bias=True)
    theta, X, rng = setup(model, N, (widths[0],), seed=4)
    J = check_jacobian(model, f, theta, X)
    check_jvp_vjp(model, theta, X, J, rng)
    for reduction in ("mean", "sum"):
        check_loss_derivatives(model, f, theta, X, loss_name, reduction, rng)
    check_rowset(model, theta, X, J, 2, rng)


def test_cross_entropy_single_class_gives_zero_gradients():
    """C = 1 softmax is constant: l_n = 0 and every gradient vanishes exactly."""
    model, f = make_mlp([3, 4, 1], "tanh", bias=True)
    theta, X, _ = setup(model, 3, (3,))
    y = np.zeros(3, dtype=int)
    G = refngd.per_sample_gradients(model, theta, CrossEntropy(), X, y)
    assert np.all(G == 0)
    assert np.all(refngd.gradient(model, theta, CrossEntropy("sum"), X, y) == 0)


@settings(max_examples=20, deadline=None)
@given(
    N=st.integers(1, 4),
    widths=st.lists(st.integers(1, 4), min_size=2, max_size=4),
    act=st.sampled_from(ACT_NAMES),
    bias=st.booleans(),
    loss_name=st.sampled_from(["ce", "mse", "bce"]),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2 ** 16),
)
def test_mlp_random_architectures_match_autograd(N, widths, act, bias, loss_name, reduction, seed):
    model, f = make_mlp(widths, act, bias)
    theta, X, rng = setup(model, N, (widths[0],), seed=seed)
    J_ad = autograd.jacobian(lambda t: f(t, X))(theta)
    assert_close(refngd.jacobian(model, theta, X), J_ad, AD_RTOL, what="jacobian")
    C = widths[-1]
    y = make_targets(loss_name, N, C, rng)
    loss = LOSS_CLASSES[loss_name](reduction)
    c = reduction_constant(loss_name, reduction, N, C)
    G_ad = autograd.jacobian(lambda t: anp_per_sample_loss(loss_name, f(t, X), y))(theta)
    assert_close(refngd.per_sample_gradients(model, theta, loss, X, y), G_ad, AD_RTOL, what="G")
    assert_close(refngd.gradient(model, theta, loss, X, y), c * G_ad.sum(0), AD_RTOL, what="g")


# ==================================================================== FunctionModel
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_function_model_matches_explicit_layers(loss_name):
    """The same derivative API on FunctionModel(f) agrees with the explicit Sequential."""
    model, f = make_mlp([3, 4, 3], "sigmoid", bias=True)
    theta, X, rng = setup(model, 4, (3,), seed=5)
    fm = refngd.FunctionModel(f, theta)
    y = make_targets(loss_name, 4, 3, rng)
    loss = LOSS_CLASSES[loss_name]()
    v, w = rng.standard_normal(theta.size), rng.standard_normal((4, 3))
    for fn, args in [(refngd.jacobian, ()), (refngd.jvp, (v,)), (refngd.vjp, (w,))]:
        assert_close(fn(fm, theta, X, *args), fn(model, theta, X, *args), AD_RTOL, what=fn.__name__)
    for fn in (refngd.per_sample_gradients, refngd.gradient):
        assert_close(fn(fm, theta, loss, X, y), fn(model, theta, loss, X, y), AD_RTOL, what=fn.__name__)


# ==================================================================== float32
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
@pytest.mark.parametrize("act", ["relu", "gelu", "sigmoid"])
def test_float32_model_close_to_float64(act, loss_name):
    model, _ = make_mlp([5, 8, 3], act, bias=True)
    theta, X, rng = setup(model, 6, (5,), seed=6)
    y = make_targets(loss_name, 6, 3, rng)
    loss = LOSS_CLASSES[loss_name]()
    t32, X32 = theta.astype(np.float32), X.astype(np.float32)
    cot = rng.standard_normal((6, 2, 3))
    checks = [
        (lambda t, x: refngd.jacobian(model, t, x)),
        (lambda t, x: refngd.per_sample_gradients(model, t, loss, x, y)),
        (lambda t, x: refngd.gradient(model, t, loss, x, y)),
        (lambda t, x: refngd.jvp(model, t, x, np.ones_like(t))),
        (lambda t, x: model.forward(t, x)),
    ]
    for fn in checks:
        r32, r64 = fn(t32, X32), fn(theta, X)
        assert r32.dtype == np.float32 and r64.dtype == np.float64
        assert_close(r32, r64, 1e-4, atol=1e-6)
    rows32 = model.linearize(t32, X32).backprop(cot)
    rows64 = model.linearize(theta, X).backprop(cot)
    assert rows32.gram().dtype == np.float64  # Gram matrices are formed in float64
    assert rows32.dense().dtype == np.float32
    assert_close(rows32.gram(), rows64.gram(), 1e-4)
    assert_close(rows32.sq_sum(), rows64.sq_sum(), 1e-4)


def test_float64_input_is_cast_to_float32_theta():
    model, _ = make_mlp([3, 4, 2], "tanh", bias=True)
    theta, X, _ = setup(model, 2, (3,))
    t32 = theta.astype(np.float32)
    assert model.forward(t32, X).dtype == np.float32
    assert refngd.jacobian(model, t32, X).dtype == np.float32


# ==================================================================== CNNs
CNN_CASES = {  # name: (in_shape, convs [(out_ch, k, stride, padding, dilation)], C)
    "stride2_pad1": ((2, 7, 6), [(3, 3, 2, 1, 1)], 3),
    "dilation2": ((1, 7, 7), [(2, 3, 1, 0, 2)], 2),
    "stride2_pad2_dil2": ((2, 8, 7), [(2, 3, 2, 2, 2)], 3),
    "two_convs": ((2, 8, 8), [(3, 3, 2, 1, 1), (2, 2, 1, 1, 2)], 2),
    "k1_C1": ((3, 4, 5), [(2, 1, 2, 0, 1)], 1),
    "rect_kernel": ((2, 6, 7), [(3, (2, 3), 2, 1, 1), (2, (3, 1), 1, 1, 2)], 2),
}


@needs_conv
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", list(CNN_CASES))
def test_cnn_jacobian_and_rowset(case, bias):
    in_shape, convs, C = CNN_CASES[case]
    act = ACT_NAMES[list(CNN_CASES).index(case) % len(ACT_NAMES)]
    model, f = make_cnn(in_shape, convs, act, bias, C)
    theta, X, rng = setup(model, 3, in_shape, seed=7)
    J = check_jacobian(model, f, theta, X)
    check_jvp_vjp(model, theta, X, J, rng)
    cot, rows = check_rowset(model, theta, X, J, 2, rng)
    # both Gram routes of Conv2d (materialised per-row gradients and the spatial
    # "ghost" contraction) give the same matrix
    U = np.einsum("nkc,ncp->nkp", cot, J).reshape(-1, J.shape[2])
    convs = [layer for layer in model.layers if isinstance(layer, nn.Conv2d)]
    try:
        for route in ("materialise", "spatial"):
            for layer in convs:
                layer.gram_route = route
            assert_close(rows.gram(), U @ U.T, AD_RTOL, what=f"gram via {route}")
    finally:
        for layer in convs:
            layer.gram_route = None


@needs_conv
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", ["ce", "mse", "bce"])
def test_cnn_loss_gradients(loss_name, reduction):
    model, f = make_cnn((2, 6, 5), [(3, 3, 2, 1, 1), (2, 2, 1, 0, 2)], "tanh", True, 3)
    theta, X, rng = setup(model, 3, (2, 6, 5), seed=8)
    check_loss_derivatives(model, f, theta, X, loss_name, reduction, rng)


@needs_conv
def test_cnn_single_sample_float32():
    model, f = make_cnn((1, 5, 5), [(2, 3, 2, 1, 2)], "relu", True, 2)
    theta, X, rng = setup(model, 1, (1, 5, 5), seed=9)
    J64 = check_jacobian(model, f, theta, X)
    J32 = refngd.jacobian(model, theta.astype(np.float32), X.astype(np.float32))
    assert J32.dtype == np.float32
    assert_close(J32, J64, 1e-4, atol=1e-6)


@needs_conv
@settings(max_examples=15, deadline=None)
@given(
    k=st.integers(1, 3), s=st.integers(1, 3), p=st.integers(0, 2), d=st.integers(1, 2),
    hw=st.tuples(st.integers(3, 7), st.integers(3, 7)), in_ch=st.integers(1, 2),
    out_ch=st.integers(1, 3), bias=st.booleans(), N=st.integers(1, 3), seed=st.integers(0, 999),
)
def test_cnn_random_hyperparameters_match_autograd(k, s, p, d, hw, in_ch, out_ch, bias, N, seed):
    h, w = hw
    if conv_out(h, k, s, p, d) < 1 or conv_out(w, k, s, p, d) < 1:
        return  # empty output: rejected by Conv2d (tested in test_errors.py)
    model, f = make_cnn((in_ch, h, w), [(out_ch, k, s, p, d)], "tanh", bias, 2)
    theta, X, rng = setup(model, N, (in_ch, h, w), seed=seed)
    J_ad = autograd.jacobian(lambda t: f(t, X))(theta)
    assert_close(refngd.jacobian(model, theta, X), J_ad, AD_RTOL, what="jacobian")
    check_rowset_against(model, theta, X, J_ad, rng)


def check_rowset_against(model, theta, X, J, rng):
    """Gram / matvec / rmatvec / sq_sum against U = cot·J (no finite differences)."""
    N, C, P = J.shape
    cot = rng.standard_normal((N, 3, C))
    rows = model.linearize(theta, X).backprop(cot)
    U = np.einsum("nkc,ncp->nkp", cot, J).reshape(N * 3, P)
    v, wts = rng.standard_normal(P), rng.standard_normal((N, 3))
    assert_close(rows.gram(), U @ U.T, AD_RTOL, what="gram")
    assert_close(rows.matvec(v).reshape(-1), U @ v, AD_RTOL, what="matvec")
    assert_close(rows.rmatvec(wts), wts.reshape(-1) @ U, AD_RTOL, what="rmatvec")
    assert_close(rows.sq_sum(), (U * U).sum(0), AD_RTOL, what="sq_sum")
