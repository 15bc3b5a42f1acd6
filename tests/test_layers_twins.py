"""The layers of issue 20 against PyTorch, in float64 (tests/twins.py: θ, to_torch, forward,
per-sample gradients, GGN-vector product, every row primitive).

Each case puts the layer between parametric layers, so that its backward pass enters
the Jacobian of the layer before it, and ends in a Flatten and a Linear classifier.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refngd  # noqa: E402
from refngd import interop, nn  # noqa: E402
from twins import check_twin  # noqa: E402

tnn = torch.nn
N, C = 5, 3
rng = np.random.default_rng(0)


def _act(module):
    return lambda: tnn.Sequential(tnn.Linear(4, 6), module, tnn.Linear(6, C))


def _conv1d(**kw):
    def make():
        conv = tnn.Conv1d(4, 8, 3, **kw)
        L = conv(torch.zeros(1, 4, 9)).shape[2]
        return tnn.Sequential(tnn.Conv1d(2, 4, 2, padding=1), tnn.Tanh(), conv, tnn.Flatten(),
                              tnn.Linear(8 * L, C))
    return make


def _conv2d_groups(groups, bias=True):
    def make():
        return tnn.Sequential(tnn.Conv2d(2, 4, 2), tnn.Tanh(),
                              tnn.Conv2d(4, 8, 3, padding=1, stride=2, groups=groups, bias=bias),
                              tnn.Flatten(), tnn.Linear(8 * 3 * 3, C))
    return make


def _seq_layer(module, L_out, channels=3):
    """Conv1d(2, 3, 2) → Tanh → module on (N, 3, L) → Flatten → Linear."""
    return lambda: tnn.Sequential(tnn.Conv1d(2, channels, 2), tnn.Tanh(), module, tnn.Flatten(),
                                  tnn.Linear(channels * L_out, C))


def _img_layer(module, HW_out):
    return lambda: tnn.Sequential(tnn.Conv2d(2, 3, 2), tnn.Tanh(), module, tnn.Flatten(),
                                  tnn.Linear(3 * HW_out, C))


def _tokens_mean(dim, keepdim=False):
    return lambda: tnn.Sequential(tnn.Linear(8, 6), tnn.GELU(), interop.mean_module(dim, keepdim),
                                  tnn.Flatten(), tnn.Linear(6 if dim == 1 else 2, C))


X_VEC = rng.standard_normal((N, 4))
X_SEQ = rng.standard_normal((N, 2, 8))
X_IMG = rng.standard_normal((N, 2, 6, 6))
CASES = {
    "leaky_relu": (_act(tnn.LeakyReLU(0.2)), X_VEC),
    "elu": (_act(tnn.ELU(alpha=1.3)), X_VEC),
    "silu": (_act(tnn.SiLU()), X_VEC),
    "softplus": (_act(tnn.Softplus(beta=2.0, threshold=1.0)), X_VEC),
    "identity": (_act(tnn.Identity()), X_VEC),
    # inputs × 4: pre-activations over ±8 reach every branch of the hard activations
    "hardtanh": (_act(tnn.Hardtanh(-0.5, 2.0)), 4 * X_VEC),
    "relu6": (_act(tnn.ReLU6()), 4 * X_VEC),
    "hardswish": (_act(tnn.Hardswish()), 4 * X_VEC),
    "dropout_eval": (lambda: _act(tnn.Dropout(0.3))().eval(), X_VEC),
    "conv1d": (_conv1d(), X_SEQ),
    "conv1d_stride_pad_dil": (_conv1d(stride=2, padding=2, dilation=2), X_SEQ),
    "conv1d_groups": (_conv1d(groups=2, bias=False), X_SEQ),
    "conv1d_depthwise": (_conv1d(groups=4, padding=1), X_SEQ),
    "conv2d_groups": (_conv2d_groups(2), X_IMG),
    "conv2d_depthwise": (_conv2d_groups(4), X_IMG),
    "conv2d_groups_nobias": (_conv2d_groups(4, bias=False), X_IMG),
    # X_SEQ (N, 2, 8) → Conv1d(2, 3, 2): (N, 3, 7)
    "avgpool1d": (_seq_layer(tnn.AvgPool1d(2), 3), X_SEQ),
    "avgpool1d_pad_ceil_exclude": (_seq_layer(tnn.AvgPool1d(3, 2, 1, ceil_mode=True,
                                                            count_include_pad=False), 4), X_SEQ),
    "maxpool1d": (_seq_layer(tnn.MaxPool1d(2), 3), X_SEQ),
    "maxpool1d_overlap_pad_dil": (_seq_layer(tnn.MaxPool1d(3, 1, 1, dilation=2), 5), X_SEQ),
    "adaptive_avgpool1d": (_seq_layer(tnn.AdaptiveAvgPool1d(3), 3), X_SEQ),
    "upsample1d_scale2": (_seq_layer(tnn.Upsample(scale_factor=2), 14), X_SEQ),
    "upsample1d_size": (_seq_layer(tnn.Upsample(size=10), 10), X_SEQ),
    "upsample1d_frac": (_seq_layer(tnn.Upsample(scale_factor=1.7), 11), X_SEQ),
    # X_IMG (N, 2, 6, 6) → Conv2d(2, 3, 2): (N, 3, 5, 5)
    "upsample2d_scale": (_img_layer(tnn.Upsample(scale_factor=(2, 1.5)), 10 * 7), X_IMG),
    "upsample2d_size": (_img_layer(tnn.Upsample(size=(7, 4)), 28), X_IMG),
    "mean_tokens": (_tokens_mean(1), X_SEQ),
    "mean_last_keepdim": (_tokens_mean(-1, keepdim=True), X_SEQ),
    "embedding_N": (lambda: tnn.Sequential(tnn.Embedding(7, 3), tnn.Linear(3, C)),
                    rng.integers(0, 7, N)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_twin(case, reduction):
    make, X = CASES[case]
    torch.manual_seed(0)
    net = make()
    check_twin(torch, net, X, rng.integers(0, C, N), tnn.CrossEntropyLoss(reduction=reduction))


# ----------------------------------------------------------- per-position cross-entropy
def _segmentation_1d():
    """Conv1d head: outputs (N, C, L), PyTorch's CrossEntropyLoss with the class axis at 1."""
    return tnn.Sequential(tnn.Conv1d(2, 4, 3, padding=1), tnn.SiLU(), tnn.Conv1d(4, C, 1))


def _segmentation_2d():
    return tnn.Sequential(tnn.Conv2d(2, 4, 3, padding=1, groups=2), tnn.ReLU(),
                          tnn.Upsample(scale_factor=2), tnn.Conv2d(4, C, 1))


class _FlatTokenCE(tnn.Module):
    def __init__(self, reduction):
        super().__init__()
        self.ce = tnn.CrossEntropyLoss(reduction=reduction)

    def forward(self, out, y):
        return self.ce(out.reshape(-1, out.shape[-1]), y.reshape(-1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_class_axis_1(reduction):
    from refngd.losses import CrossEntropy, PerToken
    torch.manual_seed(1)
    check_twin(torch, _segmentation_1d(), X_SEQ, rng.integers(0, C, (N, 8)),
               tnn.CrossEntropyLoss(reduction=reduction),
               PerToken(CrossEntropy(reduction), 8, class_dim=1))
    check_twin(torch, _segmentation_2d(), rng.standard_normal((N, 2, 3, 2)),
               rng.integers(0, C, (N, 6, 4)), tnn.CrossEntropyLoss(reduction=reduction),
               PerToken(CrossEntropy(reduction), 24, class_dim=1))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_on_tokens_last(reduction):
    """Outputs (N, T, C) without a final Flatten in PyTorch: refngd's twin flattens them
    and reads them with PerToken (class_dim=-1)."""
    from refngd.losses import CrossEntropy, PerToken
    torch.manual_seed(2)
    net = tnn.Sequential(tnn.Linear(8, 6), tnn.GELU(), tnn.Linear(6, C))
    check_twin(torch, net, X_SEQ, rng.integers(0, C, (N, 2)), _FlatTokenCE(reduction),
               PerToken(CrossEntropy(reduction), 2))


def test_architecture_json_reads_the_new_layers(tmp_path):
    """`refngd check`'s JSON table knows every new layer: the file gives the model that
    from_torch gives for the same torch modules."""
    import json

    from refngd.check.files import load_architecture
    torch.manual_seed(3)
    net = tnn.Sequential(
        tnn.Conv1d(2, 4, 3, padding=1, groups=2), tnn.LeakyReLU(0.1), tnn.MaxPool1d(2),
        tnn.Upsample(scale_factor=2), tnn.AvgPool1d(2, 1), tnn.ELU(0.5), tnn.Dropout(0.2),
        tnn.AdaptiveAvgPool1d(3), tnn.Softplus(2.0), tnn.Identity(), interop.mean_module(-1),
        tnn.SiLU(), tnn.Linear(4, C)).double().eval()
    layers = [
        {"type": "Conv1d", "in_channels": 2, "out_channels": 4, "kernel_size": 3, "padding": 1,
         "groups": 2},
        {"type": "LeakyReLU", "negative_slope": 0.1}, {"type": "MaxPool1d", "kernel_size": 2},
        {"type": "Upsample", "scale_factor": 2}, {"type": "AvgPool1d", "kernel_size": 2, "stride": 1},
        {"type": "ELU", "alpha": 0.5}, {"type": "Dropout", "p": 0.2},
        {"type": "AdaptiveAvgPool1d", "output_size": 3}, {"type": "Softplus", "beta": 2.0},
        {"type": "Identity"}, {"type": "Mean", "dim": -1}, {"type": "SiLU"},
        {"type": "Linear", "in_features": 4, "out_features": C}]
    (tmp_path / "a.json").write_text(json.dumps({"layers": layers,
                                                 "loss": {"type": "CrossEntropyLoss"}}))
    model, _ = load_architecture(str(tmp_path / "a.json"))
    twin, theta = interop.from_torch(net)
    assert repr(model) == repr(twin)
    np.testing.assert_allclose(model.forward(theta, X_SEQ), net(torch.tensor(X_SEQ)).detach().numpy(),
                               rtol=1e-12, atol=1e-14)


def test_refusals_name_the_setting():
    def refused(module, *patterns):
        with pytest.raises(interop.UnsupportedModuleError) as err:
            interop.from_torch(tnn.Sequential(tnn.Linear(8, 8), module))
        for pat in patterns:
            assert pat in str(err.value), str(err.value)

    refused(tnn.Dropout(0.5), "Dropout at '1'", "training mode", "model.eval()")
    refused(tnn.Dropout2d(0.5), "Dropout2d at '1'", "random")
    refused(tnn.Upsample(scale_factor=2, mode="linear"), "Upsample at '1'", "mode='linear'")
    refused(tnn.Conv1d(8, 8, 3, padding="same"), "Conv1d at '1'", "padding='same'")
    refused(tnn.MaxPool1d(2, return_indices=True), "MaxPool1d at '1'", "return_indices")
    model, _ = interop.from_torch(tnn.Sequential(tnn.Linear(8, 8), tnn.Dropout(0.0)))  # p = 0
    assert isinstance(model.layers[1], nn.Dropout)


@pytest.mark.parametrize("make, error, match", [
    (lambda: nn.Conv2d(4, 6, 3, groups=4), ValueError, "out_channels \\(6\\) must be divisible"),
    (lambda: nn.Conv1d(3, 6, 3, groups=2), ValueError, "in_channels \\(3\\) must be divisible"),
    (lambda: nn.Conv2d(2, 2, 3, 1, 0, 1, 2), TypeError, "pass groups= by keyword"),
    (lambda: nn.Conv1d(2, 2, (3, 3)), ValueError, "1-tuple"),
    (lambda: nn.Conv1d(2, 2, 3, groups=1.0), TypeError, "groups"),
    (lambda: nn.LeakyReLU("a"), TypeError, "negative_slope"),
    (lambda: nn.Softplus(beta=0), ValueError, "beta"),
    (lambda: nn.Dropout(1.5), ValueError, "Dropout p"),
    (lambda: nn.AvgPool1d(2, padding=2), ValueError, "at most half"),
    (lambda: nn.MaxPool1d(2, return_indices=True), ValueError, "return_indices"),
    (lambda: nn.AdaptiveAvgPool1d(0), ValueError, "output_size"),
    (lambda: nn.Upsample(), ValueError, "either size or scale_factor"),
    (lambda: nn.Upsample(scale_factor=2, mode="bilinear"), ValueError, "'nearest'"),
    (lambda: nn.Upsample(size=2.5), TypeError, "integers"),
    (lambda: nn.Mean(0), ValueError, "batch axis"),
    (lambda: nn.Mean(1.0), TypeError, "tuple of ints"),
])
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_shape_errors():
    for layer, X in [(nn.Conv1d(2, 3, 3), np.zeros((2, 3, 5))), (nn.MaxPool1d(2), np.zeros((2, 5))),
                     (nn.Mean(3), np.zeros((2, 3, 4))), (nn.Upsample(size=3), np.zeros((2, 3)))]:
        model = nn.Sequential(layer, nn.Flatten())
        with pytest.raises(ValueError, match="layer 0"):
            model.forward(np.zeros(model.num_params), X)


def test_from_torch_loss_reads_the_class_axis_of_multi_axis_outputs():
    from refngd.losses import PerToken
    loss = interop.from_torch_loss(tnn.CrossEntropyLoss(reduction="sum"), output_shape=(C, 2, 4))
    assert isinstance(loss, PerToken) and loss.class_dim == 1 and loss.num_tokens == 8
    Z, y = rng.standard_normal((N, C, 2, 4)), rng.integers(0, C, (N, 2, 4))
    ref = tnn.CrossEntropyLoss(reduction="sum")(torch.tensor(Z), torch.tensor(y)).item()
    assert abs(float(loss(Z.reshape(N, -1), y)) - ref) <= 1e-12 * abs(ref)
    assert type(interop.from_torch_loss(tnn.MSELoss(), output_shape=(3, 4))).__name__ == "MSELoss"
    assert type(interop.from_torch_loss(tnn.CrossEntropyLoss(), output_shape=(C,))).__name__ == \
        "CrossEntropy"


@pytest.mark.parametrize("pair", [(nn.Hardtanh(-1.0, 2.0), tnn.Hardtanh(-1.0, 2.0)),
                                  (nn.ReLU6(), tnn.ReLU6()), (nn.Hardsigmoid(), tnn.Hardsigmoid()),
                                  (nn.Hardswish(), tnn.Hardswish())],
                         ids=["hardtanh", "relu6", "hardsigmoid", "hardswish"])
def test_hard_activations_take_pytorchs_derivative_at_the_kinks(pair):
    """At the kinks (−3, −1, 0, 2, 3, 6) the derivative refngd caches is the one PyTorch's
    backward uses: 0 at both ends of Hardtanh / ReLU6 / Hardsigmoid, and Hardswish's outer
    branches at x = ±3 (0 and 1)."""
    mine, theirs = pair
    x = np.array([[-4.0, -3.0, -1.0, 0.0, 1.5, 2.0, 3.0, 6.0, 7.0]])
    y, d = mine.forward([], x)
    xt = torch.tensor(x, requires_grad=True)
    yt = theirs(xt)
    (dt,) = torch.autograd.grad(yt.sum(), xt)
    np.testing.assert_array_equal(y, yt.detach().numpy())
    if isinstance(mine, nn.Hardsigmoid):   # PyTorch's CPU backward multiplies by float(1/6)
        np.testing.assert_array_equal(d, np.where(dt.numpy() > 0, 1 / 6, 0.0))
        assert np.all(dt.numpy()[dt.numpy() > 0] == float(np.float32(1 / 6)))
    else:
        np.testing.assert_array_equal(d, dt.numpy())


class _ClampHardsigmoid(tnn.Module):
    """ReLU6(x + 3)/6 written with clamp, whose backward is exact (1 inside the range)."""

    def forward(self, x):
        return torch.clamp(x + 3, 0.0, 6.0) / 6


def test_hardsigmoid_takes_the_exact_derivative():
    """refngd's Hardsigmoid derivative is 1/6; PyTorch's CPU backward kernel multiplies by
    the float32 constant 1.0f/6.0f (0.16666667163…, relative error 3e-8) even in float64.
    Against the same function written with clamp (exact backward) refngd agrees to 1e-10;
    against nn.Hardsigmoid's gradient only to that float32 constant."""
    from torch.nn.utils import vector_to_parameters
    torch.manual_seed(0)
    net = tnn.Sequential(tnn.Linear(4, 6), tnn.Hardsigmoid(), tnn.Linear(6, C)).double()
    model, theta = interop.from_torch(net)
    exact = tnn.Sequential(tnn.Linear(4, 6), _ClampHardsigmoid(), tnn.Linear(6, C)).double()
    vector_to_parameters(torch.tensor(theta), exact.parameters())
    X, y = 4 * X_VEC, rng.integers(0, C, N)
    loss = interop.from_torch_loss(tnn.CrossEntropyLoss())
    G = refngd.per_sample_gradients(model, theta, loss, X, y)
    ce = tnn.CrossEntropyLoss(reduction="sum")

    def torch_grads(m):
        rows = []
        for n in range(N):
            m.zero_grad()
            ce(m(torch.tensor(X[n:n + 1])), torch.tensor(y[n:n + 1])).backward()
            rows.append(torch.cat([p.grad.reshape(-1) for p in m.parameters()]).numpy())
        return np.stack(rows)
    scale = np.abs(G).max()
    assert np.abs(G - torch_grads(exact)).max() <= 1e-12 * scale
    err = np.abs(G - torch_grads(net)).max() / scale
    assert 1e-10 < err < 1e-7        # PyTorch's float32 1/6, nothing larger
