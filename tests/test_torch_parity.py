"""Parity with PyTorch: same θ (``parameters_to_vector`` order), same numbers.

For an MLP and a CNN (Linear, Conv2d with stride / padding / dilation, Flatten, every
activation) built twice — once in refngd, once in ``torch.nn`` — with θ copied across
with ``vector_to_parameters`` / ``parameters_to_vector``, the tests check that outputs,
loss values (CrossEntropyLoss, MSELoss, BCEWithLogitsLoss; mean and sum), batch
gradients (``torch.autograd``), per-sample gradients and per-sample Jacobians
(``torch.func.vmap``) agree to float64 round-off, and that ``Sequential.init`` draws from
PyTorch's default initialisation distribution U(−1/√fan_in, 1/√fan_in).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils import parameters_to_vector, vector_to_parameters  # noqa: E402

import refngd  # noqa: E402
from refngd import nn  # noqa: E402
from refngd.losses import BCEWithLogits, CrossEntropy, MSELoss  # noqa: E402

HAS_CONV = hasattr(nn, "Conv2d")
needs_conv = pytest.mark.skipif(not HAS_CONV, reason="refngd.nn has no Conv2d yet")
TOL = dict(rtol=1e-11, atol=1e-13)


# ------------------------------------------------------------------ twin networks
def twin_act(name):
    return {
        "relu": (nn.ReLU(), torch.nn.ReLU()),
        "tanh": (nn.Tanh(), torch.nn.Tanh()),
        "sigmoid": (nn.Sigmoid(), torch.nn.Sigmoid()),
        "gelu": (nn.GELU("none"), torch.nn.GELU()),
        "gelu_tanh": (nn.GELU("tanh"), torch.nn.GELU(approximate="tanh")),
    }[name]


def build(spec, dtype=torch.float64):
    """spec: list of ("linear", in, out, bias) / ("conv", in, out, k, s, p, d, bias) /
    "flatten" / activation names.  Returns (refngd Sequential, torch Sequential)."""
    ours, theirs = [], []
    for item in spec:
        if item == "flatten":
            a, b = nn.Flatten(), torch.nn.Flatten()
        elif isinstance(item, str):
            a, b = twin_act(item)
        elif item[0] == "linear":
            _, i, o, bias = item
            a, b = nn.Linear(i, o, bias=bias), torch.nn.Linear(i, o, bias=bias)
        elif item[0] == "conv":
            _, i, o, k, s, p, d, bias = item
            a = nn.Conv2d(i, o, k, stride=s, padding=p, dilation=d, bias=bias)
            b = torch.nn.Conv2d(i, o, k, stride=s, padding=p, dilation=d, bias=bias)
        else:
            raise ValueError(item)
        ours.append(a)
        theirs.append(b)
    return nn.Sequential(*ours), torch.nn.Sequential(*theirs).to(dtype)


MLP_SPEC = [("linear", 5, 7, True), "relu", ("linear", 7, 6, False), "gelu",
            ("linear", 6, 6, True), "tanh", ("linear", 6, 5, True), "gelu_tanh",
            ("linear", 5, 4, True), "sigmoid", ("linear", 4, 3, True)]
MLP_IN = (5,)


def cnn_spec():
    # (2, 9, 8) -conv k3 s2 p1-> (4, 5, 4) -conv k(2,3) s1 p2 d2-> (3, 7, 4) -conv k1 s2-> (2, 4, 2)
    return [("conv", 2, 4, 3, 2, 1, 1, True), "relu",
            ("conv", 4, 3, (2, 3), 1, 2, 2, False), "gelu",
            ("conv", 3, 2, 1, 2, 0, 1, True), "tanh",
            "flatten", ("linear", 2 * 4 * 2, 3, True)]


CNN_IN = (2, 9, 8)


def models(kind):
    if kind == "cnn":
        if not HAS_CONV:
            pytest.skip("refngd.nn has no Conv2d yet")
        return build(cnn_spec()) + (CNN_IN,)
    return build(MLP_SPEC) + (MLP_IN,)


def load_theta(tmodel, theta):
    """refngd θ → torch parameters (in place), via vector_to_parameters."""
    with torch.no_grad():
        vector_to_parameters(torch.as_tensor(theta), tmodel.parameters())


def make_data(kind, loss_name, N=6, C=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((N,) + (CNN_IN if kind == "cnn" else MLP_IN))
    if loss_name == "ce":
        y = rng.integers(0, C, size=N)
    elif loss_name == "mse":
        y = rng.standard_normal((N, C))
    else:
        y = rng.uniform(0, 1, size=(N, C))
    return X, y, rng


LOSSES = {
    "ce": (CrossEntropy, torch.nn.CrossEntropyLoss),
    "mse": (MSELoss, torch.nn.MSELoss),
    "bce": (BCEWithLogits, torch.nn.BCEWithLogitsLoss),
}
KINDS = ["mlp", pytest.param("cnn", marks=needs_conv)]


def t(a):
    return torch.as_tensor(a)


def torch_grad_vector(tmodel, loss):
    grads = torch.autograd.grad(loss, list(tmodel.parameters()))
    return torch.cat([g.reshape(-1) for g in grads]).detach().numpy()


# ======================================================================= parameters
@pytest.mark.parametrize("kind", KINDS)
def test_parameter_order_round_trip(kind):
    ours, theirs, in_shape = models(kind)
    # torch θ → refngd: same outputs with torch's own initialisation
    theta_t = parameters_to_vector(theirs.parameters()).detach().numpy().copy()
    assert theta_t.shape == (ours.num_params,)
    X = np.random.default_rng(1).standard_normal((4,) + in_shape)
    np.testing.assert_allclose(ours.forward(theta_t, X), theirs(t(X)).detach().numpy(), **TOL)
    # refngd θ → torch → refngd is the identity, and blocks have PyTorch's shapes
    theta = ours.init(np.random.default_rng(2))
    load_theta(theirs, theta)
    np.testing.assert_array_equal(parameters_to_vector(theirs.parameters()).detach().numpy(), theta)
    ours_blocks = [p for blocks in ours.unflatten(theta) for p in blocks]
    for a, b in zip(ours_blocks, theirs.parameters(), strict=True):
        assert tuple(a.shape) == tuple(b.shape)
        np.testing.assert_array_equal(a, b.detach().numpy())


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_identical(kind):
    ours, theirs, in_shape = models(kind)
    theta = ours.init(np.random.default_rng(3))
    load_theta(theirs, theta)
    X = np.random.default_rng(4).standard_normal((5,) + in_shape)
    np.testing.assert_allclose(ours.forward(theta, X), theirs(t(X)).detach().numpy(), **TOL)


def test_outputs_float32():
    ours, theirs = build(MLP_SPEC, dtype=torch.float32)
    theta = ours.init(np.random.default_rng(5), dtype="float32")
    assert theta.dtype == np.float32
    load_theta(theirs, theta)
    X = np.random.default_rng(6).standard_normal((5,) + MLP_IN).astype(np.float32)
    Z = ours.forward(theta, X)
    assert Z.dtype == np.float32
    np.testing.assert_allclose(Z, theirs(t(X)).detach().numpy(), rtol=1e-5, atol=1e-6)


# ======================================================================= losses
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("kind", KINDS)
def test_loss_and_gradient_identical(kind, loss_name, reduction):
    ours, theirs, _ = models(kind)
    X, y, rng = make_data(kind, loss_name)
    theta = ours.init(rng)
    load_theta(theirs, theta)
    ours_loss, torch_loss_cls = LOSSES[loss_name]
    loss, tloss = ours_loss(reduction), torch_loss_cls(reduction=reduction)

    Zt = theirs(t(X))
    Lt = tloss(Zt, t(y))
    assert refngd.loss_value(ours, theta, loss, X, y) == pytest.approx(Lt.item(), rel=1e-12)
    np.testing.assert_allclose(refngd.gradient(ours, theta, loss, X, y), torch_grad_vector(theirs, Lt), **TOL)


@pytest.mark.parametrize("loss_name", list(LOSSES))
@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_vmap(kind, loss_name):
    """refngd's per-sample gradients are those of the unreduced l_n (= torch reduction='sum'
    on a batch of one sample), computed by torch.func.vmap(grad)."""
    ours, theirs, _ = models(kind)
    X, y, rng = make_data(kind, loss_name, seed=7)
    theta = ours.init(rng)
    load_theta(theirs, theta)
    ours_loss, torch_loss_cls = LOSSES[loss_name]
    tloss = torch_loss_cls(reduction="sum")
    params = {k: v.detach() for k, v in theirs.named_parameters()}

    def l_n(p, x, target):
        z = torch.func.functional_call(theirs, p, (x[None],))
        return tloss(z, target[None])

    grads = torch.func.vmap(torch.func.grad(l_n), in_dims=(None, 0, 0))(params, t(X), t(y))
    G_t = torch.cat([grads[k].reshape(X.shape[0], -1) for k in params], dim=1).numpy()
    for reduction in ("mean", "sum"):
        loss = ours_loss(reduction)
        G = refngd.per_sample_gradients(ours, theta, loss, X, y)
        np.testing.assert_allclose(G, G_t, **TOL)
        # and c Σ_n g_n is torch's gradient of the reduced loss
        Lt = torch_loss_cls(reduction=reduction)(theirs(t(X)), t(y))
        np.testing.assert_allclose(loss.scale(ours.forward(theta, X)) * G.sum(0),
                                   torch_grad_vector(theirs, Lt), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_gradients_loop(kind):
    """Same, with a plain loop of torch.autograd over samples (no torch.func)."""
    ours, theirs, _ = models(kind)
    X, y, rng = make_data(kind, "ce", N=3, seed=8)
    theta = ours.init(rng)
    load_theta(theirs, theta)
    rows = []
    for n in range(X.shape[0]):
        ln = torch.nn.CrossEntropyLoss(reduction="sum")(theirs(t(X[n:n + 1])), t(y[n:n + 1]))
        rows.append(torch_grad_vector(theirs, ln))
    np.testing.assert_allclose(refngd.per_sample_gradients(ours, theta, CrossEntropy(), X, y),
                               np.stack(rows), **TOL)


@pytest.mark.parametrize("kind", KINDS)
def test_per_sample_jacobians_vmap(kind):
    ours, theirs, _ = models(kind)
    X, _, rng = make_data(kind, "ce", N=4, seed=9)
    theta = ours.init(rng)
    load_theta(theirs, theta)
    params = {k: v.detach() for k, v in theirs.named_parameters()}

    def z_n(p, x):
        return torch.func.functional_call(theirs, p, (x[None],))[0]

    jac = torch.func.vmap(torch.func.jacrev(z_n), in_dims=(None, 0))(params, t(X))
    N, C = X.shape[0], 3
    J_t = torch.cat([jac[k].reshape(N, C, -1) for k in params], dim=2).numpy()
    np.testing.assert_allclose(refngd.jacobian(ours, theta, X), J_t, **TOL)


# ======================================================================= initialisation
def _init_layers():
    layers = [pytest.param(nn.Linear(1000, 300), torch.nn.Linear(1000, 300), 1000, id="linear")]
    if HAS_CONV:
        layers.append(pytest.param(nn.Conv2d(16, 64, 5), torch.nn.Conv2d(16, 64, 5), 16 * 25, id="conv"))
    return layers


@pytest.mark.parametrize("layer,tlayer,fan_in", _init_layers())
def test_init_matches_pytorch_distribution(layer, tlayer, fan_in):
    """Weights and biases ~ U(−1/√fan_in, 1/√fan_in), as PyTorch's default init."""
    bound = 1.0 / math.sqrt(fan_in)
    model = nn.Sequential(layer)
    theta = model.init(np.random.default_rng(10))
    W, b = model.unflatten(theta)[0]
    torch.manual_seed(0)
    tlayer.reset_parameters()
    Wt, bt = tlayer.weight.detach().numpy(), tlayer.bias.detach().numpy()
    for ours, theirs in [(W, Wt), (b, bt)]:
        assert np.abs(ours).max() <= bound
        assert np.abs(theirs).max() <= bound  # the bound really is PyTorch's
    # large blocks fill the interval: max close to the bound, uniform moments
    assert np.abs(W).max() >= 0.999 * bound
    assert abs(W.mean()) < 0.01 * bound
    assert W.std() == pytest.approx(bound / math.sqrt(3), rel=0.01)
    assert W.std() == pytest.approx(Wt.std(), rel=0.02)
    # same distribution as torch's draws (two-sample Kolmogorov-Smirnov, fixed seeds)
    from scipy.stats import ks_2samp

    assert ks_2samp(W.ravel(), Wt.ravel()).pvalue > 1e-3


def test_init_small_fan_in_and_no_bias():
    model = nn.Sequential(nn.Linear(3, 2000, bias=False), nn.Tanh(), nn.Linear(2000, 2))
    theta = model.init(np.random.default_rng(11))
    (W1,), (), (W2, b2) = model.unflatten(theta)
    assert np.abs(W1).max() <= 1 / math.sqrt(3) and np.abs(W1).max() > 0.99 / math.sqrt(3)
    assert np.abs(W2).max() <= 1 / math.sqrt(2000) and np.abs(b2).max() <= 1 / math.sqrt(2000)
    tm = torch.nn.Sequential(torch.nn.Linear(3, 2000, bias=False), torch.nn.Tanh(), torch.nn.Linear(2000, 2))
    assert parameters_to_vector(tm.parameters()).numel() == theta.size
