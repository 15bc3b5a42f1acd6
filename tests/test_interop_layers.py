"""refngd.interop on the modern layers: Transformer, BatchNorm + pooling CNN, Embedding, LoRA.

Every twin is checked against torch alone, in float64: θ bit for bit
(``parameters_to_vector``) and back through ``to_torch``; forward outputs; the batch
gradient (torch.autograd); per-sample gradients (torch.func.vmap of torch.func.grad); and
the exact Fisher / GGN c Σ_n J_nᵀ H_n J_n with J from torch.func.jacrev and H_n from
torch.autograd.functional.hessian of the torch loss — an independent route for every
quantity.  ``requires_grad`` must become the default selection (``params=None``).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils import parameters_to_vector  # noqa: E402

import refngd  # noqa: E402
from refngd import interop, nn  # noqa: E402
from refngd.curvature import Fisher  # noqa: E402

tnn = torch.nn
# torch.func.vmap over CPU attention falls back to a loop and says so; the numbers are exact
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")
TOL = dict(rtol=1e-10, atol=1e-12)
N, C = 5, 3


def _randomise_norms(net):
    """Non-trivial affine parameters and running statistics (init is γ=1, β=0, m=0, v=1)."""
    g = torch.Generator().manual_seed(7)
    for m in net.modules():
        if isinstance(m, (tnn.BatchNorm1d, tnn.BatchNorm2d)):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=torch.float64) + 0.5)
        if isinstance(m, (tnn.BatchNorm1d, tnn.BatchNorm2d, tnn.LayerNorm)) and m.weight is not None:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5, generator=g)
    return net


def transformer(norm_first: bool, activation: str):
    """patch Linear on (N, T, p) → TransformerEncoderLayer → LayerNorm → Flatten → Linear."""
    torch.manual_seed(0)
    return _randomise_norms(tnn.Sequential(
        tnn.Linear(4, 8),
        tnn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, activation=activation,
                                    batch_first=True, norm_first=norm_first),
        tnn.LayerNorm(8), tnn.Flatten(), tnn.Linear(3 * 8, C)).double())


def attention_lora():
    """bare self-attention and a LoRA projection, through the documented torch wrappers."""
    torch.manual_seed(1)
    net = tnn.Sequential(tnn.Linear(4, 6), interop.self_attention_module(6, 3), tnn.GELU(),
                         interop.lora_linear_module(6, 5, rank=2, alpha=3.0), tnn.Flatten(),
                         tnn.Linear(3 * 5, C)).double()
    with torch.no_grad():                     # B = 0 at init would hide the adapter's rows
        net[3].lora_B.weight.normal_()
    return net


def cnn_bn_pool():
    """Conv → BatchNorm2d (eval, running stats) → MaxPool → AvgPool → AdaptiveAvgPool → BN1d."""
    torch.manual_seed(2)
    net = tnn.Sequential(
        tnn.Conv2d(2, 3, 3, padding=1), tnn.BatchNorm2d(3), tnn.ReLU(), tnn.MaxPool2d(2),
        tnn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False),
        tnn.AdaptiveAvgPool2d((2, None)), tnn.Flatten(), tnn.Linear(3 * 2 * 4, 6),
        tnn.BatchNorm1d(6), tnn.Tanh(), tnn.Linear(6, C)).double()
    return _randomise_norms(net).eval()


def embedding_model():
    torch.manual_seed(3)
    return _randomise_norms(tnn.Sequential(
        tnn.Embedding(11, 4, padding_idx=0), tnn.LayerNorm(4), tnn.Flatten(),
        tnn.Linear(6 * 4, C)).double())


def frozen_mlp():
    """requires_grad=False on a whole layer, on one bias, and LoRA's frozen base."""
    torch.manual_seed(4)
    net = tnn.Sequential(tnn.Linear(5, 6), tnn.ReLU(), tnn.Linear(6, 6), tnn.LayerNorm(6),
                         interop.lora_linear_module(6, C, rank=2, alpha=2.0)).double()
    net[0].requires_grad_(False)
    net[2].bias.requires_grad_(False)
    with torch.no_grad():
        net[4].lora_B.weight.normal_()
    return net


rng = np.random.default_rng(0)
CASES = {
    "post-norm relu": (lambda: transformer(False, "relu"), rng.standard_normal((N, 3, 4))),
    "pre-norm gelu": (lambda: transformer(True, "gelu"), rng.standard_normal((N, 3, 4))),
    "attention+lora": (attention_lora, rng.standard_normal((N, 3, 4))),
    "cnn bn pool": (cnn_bn_pool, rng.standard_normal((N, 2, 6, 6))),
    "embedding": (embedding_model, np.concatenate([np.zeros((N, 1), int),
                                                   rng.integers(0, 11, (N, 5))], axis=1)),
    "frozen": (frozen_mlp, rng.standard_normal((N, 5))),
}
Y = rng.integers(0, C, N)


def torch_quantities(net, X, y, reduction):
    """(outputs, batch gradient, per-sample gradients, Fisher) of the trainable parameters."""
    names = [k for k, p in net.named_parameters() if p.requires_grad]
    params = {k: v.detach() for k, v in net.named_parameters()}
    Xt, yt = torch.tensor(X), torch.tensor(y)
    loss_mod = tnn.CrossEntropyLoss(reduction=reduction)
    net.zero_grad()
    out = net(Xt)
    loss_mod(out, yt).backward()
    g = torch.cat([p.grad.reshape(-1) for p in net.parameters() if p.requires_grad]).numpy()

    def f(sub, x):
        return torch.func.functional_call(net, {**params, **sub}, (x,))

    sub = {k: params[k] for k in names}
    ce = tnn.CrossEntropyLoss(reduction="sum")
    grads = torch.func.vmap(torch.func.grad(lambda p, x, t: ce(f(p, x[None]), t[None])),
                            in_dims=(None, 0, 0))(sub, Xt, yt)
    G = torch.cat([grads[k].reshape(N, -1) for k in names], dim=1).numpy()
    J = torch.func.jacrev(lambda p: f(p, Xt))(sub)
    Jm = torch.cat([J[k].reshape(N, C, -1) for k in names], dim=2)
    Z = out.detach()
    H = torch.autograd.functional.hessian(lambda z: loss_mod(z, yt), Z).reshape(N, C, N, C)
    Hn = torch.stack([H[n, :, n, :] for n in range(N)])
    F = torch.einsum("ncp,ncd,ndq->pq", Jm, Hn, Jm).numpy()
    return out.detach().numpy(), g, G, F


@pytest.mark.parametrize("case", CASES)
def test_theta_round_trips_exactly(case):
    make, X = CASES[case]
    net = make()
    model, theta = interop.from_torch(net)
    ref = parameters_to_vector(net.parameters()).detach().numpy().copy()
    assert theta.dtype == np.float64 and np.array_equal(theta, ref)
    back = interop.to_torch(model, theta)
    assert np.array_equal(parameters_to_vector(back.parameters()).detach().numpy(), theta)
    assert [p.requires_grad for p in back.parameters()] == [p.requires_grad for p in net.parameters()]
    np.testing.assert_allclose(back(torch.tensor(X)).detach().numpy(),
                               net.eval()(torch.tensor(X)).detach().numpy(), rtol=1e-12, atol=1e-14)
    model2, theta2 = interop.from_torch(back)
    assert np.array_equal(theta2, theta) and repr(model2) == repr(model)
    for l1, l2 in zip(model.layers, model2.layers):   # running statistics travel both ways
        if isinstance(l1, (nn.BatchNorm1d, nn.BatchNorm2d)):
            assert np.array_equal(l1.running_mean, l2.running_mean)
            assert np.array_equal(l1.running_var, l2.running_var)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_twin_equals_torch(case, reduction):
    make, X = CASES[case]
    net = make()
    model, theta = interop.from_torch(net)
    mask = np.concatenate([np.full(p.numel(), p.requires_grad) for p in net.parameters()])
    assert np.array_equal(model.trainable_mask(), mask)       # requires_grad → params=None
    loss = interop.from_torch_loss(tnn.CrossEntropyLoss(reduction=reduction))
    out, g, G, F = torch_quantities(net, X, Y, reduction)
    np.testing.assert_allclose(model.forward(theta, X), out, **TOL)
    np.testing.assert_allclose(refngd.gradient(model, theta, loss, X, Y)[mask], g, **TOL)
    np.testing.assert_allclose(refngd.per_sample_gradients(model, theta, loss, X, Y)[:, mask], G,
                               **TOL)
    fisher = Fisher(model, theta, loss, X, Y)                 # params=None: the trainable ones
    assert fisher.dense().shape == (mask.sum(), mask.sum())
    np.testing.assert_allclose(fisher.dense(), F, rtol=1e-10, atol=1e-13)
    if not mask.all():                                        # the submatrix of the full one
        full = Fisher(model, theta, loss, X, Y, params="all").dense()
        np.testing.assert_allclose(full[np.ix_(mask, mask)], F, rtol=1e-10, atol=1e-13)


def test_lora_twin_freezes_the_base_by_default():
    model, _ = interop.from_torch(tnn.Sequential(interop.lora_linear_module(4, 3, 2, 4.0)).double())
    layer = model.layers[0]
    assert isinstance(layer, nn.LoRALinear) and layer.scaling == 2.0
    assert layer.trainable == (False, False, True, True)


def assert_refused(net, *patterns):
    with pytest.raises(interop.UnsupportedModuleError) as err:
        interop.from_torch(net)
    for pat in patterns:
        assert pat in str(err.value), str(err.value)


def test_unsupported_settings_name_module_and_path():
    inner = tnn.Sequential(tnn.Linear(4, 3), tnn.BatchNorm1d(3))
    assert_refused(tnn.Sequential(tnn.Flatten(), inner).double(), "BatchNorm1d at '1.1'", "eval()")
    assert_refused(tnn.Sequential(tnn.Linear(4, 8), tnn.TransformerEncoderLayer(8, 2, 16, batch_first=True)),
             "TransformerEncoderLayer at '1'", "dropout.p=0.1")
    assert_refused(tnn.Sequential(tnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)),
             "TransformerEncoderLayer at '0'", "batch_first=False")
    assert_refused(tnn.Sequential(tnn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                                        activation=torch.tanh)),
             "TransformerEncoderLayer at '0'", "activation")
    assert_refused(tnn.Sequential(tnn.Embedding(5, 2, max_norm=1.0)), "Embedding at '0'", "max_norm")
    assert_refused(tnn.Sequential(tnn.Conv2d(1, 1, 1), tnn.MaxPool2d(2, return_indices=True)),
             "MaxPool2d at '1'", "return_indices")
    assert_refused(tnn.MultiheadAttention(4, 2, kdim=3, batch_first=True), "MultiheadAttention at the top",
             "kdim")
    bn = tnn.BatchNorm2d(2, track_running_stats=False).eval()
    assert_refused(tnn.Sequential(tnn.Conv2d(1, 2, 1), bn), "BatchNorm2d at '1'", "track_running_stats")


def test_dropout_in_eval_mode_is_accepted():
    """PyTorch's default dropout=0.1 is the identity in eval() mode, so the twin is exact."""
    torch.manual_seed(5)
    net = tnn.Sequential(tnn.Linear(4, 8), tnn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
                         tnn.Flatten(), tnn.Linear(16, 2)).double().eval()
    model, theta = interop.from_torch(net)
    X = np.random.default_rng(1).standard_normal((3, 2, 4))
    np.testing.assert_allclose(model.forward(theta, X), net(torch.tensor(X)).detach().numpy(),
                               rtol=1e-12, atol=1e-14)


# ----------------------------------------------------------------- refngd check from files
ARCHS = {
    "post-norm relu": [
        {"type": "Linear", "in_features": 4, "out_features": 8},
        {"type": "TransformerEncoderLayer", "d_model": 8, "nhead": 2, "dim_feedforward": 12},
        {"type": "LayerNorm", "normalized_shape": [8]}, {"type": "Flatten"},
        {"type": "Linear", "in_features": 24, "out_features": C}],
    "attention+lora": [
        {"type": "Linear", "in_features": 4, "out_features": 6},
        {"type": "MultiheadAttention", "embed_dim": 6, "num_heads": 3}, {"type": "GELU"},
        {"type": "LoRALinear", "in_features": 6, "out_features": 5, "rank": 2, "alpha": 3.0},
        {"type": "Flatten"}, {"type": "Linear", "in_features": 15, "out_features": C}],
    "cnn bn pool": [
        {"type": "Conv2d", "in_channels": 2, "out_channels": 3, "kernel_size": 3, "padding": 1},
        {"type": "BatchNorm2d", "num_features": 3}, {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "AvgPool2d", "kernel_size": 2, "stride": 1, "padding": 1, "count_include_pad": False},
        {"type": "AdaptiveAvgPool2d", "output_size": [2, None]}, {"type": "Flatten"},
        {"type": "Linear", "in_features": 24, "out_features": 6},
        {"type": "BatchNorm1d", "num_features": 6}, {"type": "Tanh"},
        {"type": "Linear", "in_features": 6, "out_features": C}],
    "embedding": [
        {"type": "Embedding", "num_embeddings": 11, "embedding_dim": 4, "padding_idx": 0},
        {"type": "LayerNorm", "normalized_shape": 4}, {"type": "Flatten"},
        {"type": "Linear", "in_features": 24, "out_features": C}],
}


@pytest.mark.parametrize("case", ARCHS)
def test_refngd_check_reads_the_new_layers_from_files(case, tmp_path):
    """JSON architecture + torch state_dict (.pt, buffers included) + batch → the torch
    Fisher (of the default-trainable parameters) passes, twice it fails."""
    import json

    from refngd.check.files import load_architecture
    from refngd.cli import main

    make, X = CASES[case]
    net = make()
    arch = {"layers": ARCHS[case], "loss": {"type": "CrossEntropyLoss", "reduction": "mean"}}
    (tmp_path / "arch.json").write_text(json.dumps(arch))
    model, _ = load_architecture(str(tmp_path / "arch.json"))
    twin, theta = interop.from_torch(net)
    assert repr(model) == repr(twin) and model.num_params == theta.size
    torch.save(net.state_dict(), tmp_path / "w.pt")
    np.savez(tmp_path / "batch.npz", X=X, y=Y)
    for p in net.parameters():        # the CLI's default selection: refngd's trainable flags
        p.requires_grad_(True)
    if case == "attention+lora":
        net[3].base_layer.requires_grad_(False)
    F = torch_quantities(net, X, Y, "mean")[3]
    np.savez(tmp_path / "good.npz", candidate=F)
    np.savez(tmp_path / "bad.npz", candidate=2 * F)
    args = ["check", "--arch", str(tmp_path / "arch.json"), "--weights", str(tmp_path / "w.pt"),
            "--batch", str(tmp_path / "batch.npz"), "--quantity", "fisher"]
    assert main(args + ["--candidate", str(tmp_path / "good.npz")]) == 0
    assert main(args + ["--candidate", str(tmp_path / "bad.npz")]) == 1
