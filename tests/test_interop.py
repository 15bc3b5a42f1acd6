"""refngd.interop: torch model → (refngd model, θ) → torch, exactly.

The twin is checked against torch itself on forward outputs, batch gradients
(torch.autograd), per-sample gradients (torch.func.vmap) and the exact Fisher / GGN
(torch.func.jacrev Jacobians with the loss Hessian from torch.autograd.functional.hessian),
all to float64 round-off; θ must be bit-for-bit parameters_to_vector.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch.nn.utils import parameters_to_vector  # noqa: E402

import refngd  # noqa: E402
from refngd import interop, losses, nn  # noqa: E402
from refngd.curvature import Fisher  # noqa: E402

TOL = dict(rtol=1e-11, atol=1e-13)


def torch_mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(5, 7), torch.nn.Tanh(),
        torch.nn.Sequential(torch.nn.Linear(7, 6, bias=False), torch.nn.GELU(approximate="tanh")),
        torch.nn.Linear(6, 4), torch.nn.Sigmoid(), torch.nn.Linear(4, 3)).double()


def torch_cnn(dtype=torch.float64):
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3, stride=2, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(3, 2, (2, 3), dilation=(1, 2), bias=False), torch.nn.GELU(),
        torch.nn.Flatten(), torch.nn.Linear(2 * 3 * 2, 3)).to(dtype)


CASES = {"mlp": (torch_mlp, (5,)), "cnn": (torch_cnn, (2, 7, 12))}


@pytest.mark.parametrize("kind", CASES)
def test_theta_is_parameters_to_vector_and_round_trips(kind):
    net = CASES[kind][0]()
    model, theta = interop.from_torch(net)
    ref = parameters_to_vector(net.parameters()).detach().numpy().copy()
    assert theta.dtype == np.float64 and np.array_equal(theta, ref)
    assert model.num_params == theta.size
    with torch.no_grad():                     # θ is a copy, not a view of the module
        next(net.parameters()).add_(1.0)
    assert np.array_equal(theta, ref)
    back = interop.to_torch(model, theta)
    assert np.array_equal(parameters_to_vector(back.parameters()).detach().numpy(), theta)
    model2, theta2 = interop.from_torch(back)
    assert np.array_equal(theta2, theta) and repr(model2) == repr(model)


def test_float32_is_kept():
    net = torch_cnn(torch.float32)
    model, theta = interop.from_torch(net)
    assert theta.dtype == np.float32
    X = np.random.default_rng(0).standard_normal((3, 2, 7, 12)).astype(np.float32)
    out = net(torch.tensor(X)).detach().numpy()
    np.testing.assert_allclose(model.forward(theta, X), out, rtol=1e-5, atol=1e-6)
    assert interop.to_torch(model, theta)[0].weight.dtype == torch.float32


def _torch_fisher(net, loss_mod, X):
    """F = c Σ_n J_nᵀ H_n J_n from torch alone (jacrev + autograd Hessian of the loss)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    Xt = torch.tensor(X)

    def f(p):
        return torch.func.functional_call(net, p, (Xt,))

    J = torch.func.jacrev(f)(params)
    N, C = f(params).shape
    Jm = torch.cat([J[k].reshape(N, C, -1) for k in params], dim=2)      # (N, C, P)
    Z = f(params).detach()
    y = torch.zeros(N, dtype=torch.long)                                  # H does not use y
    H = torch.autograd.functional.hessian(lambda z: loss_mod(z, y), Z).reshape(N, C, N, C)
    Hn = torch.stack([H[n, :, n, :] for n in range(N)])                   # per-sample blocks
    return torch.einsum("ncp,ncd,ndq->pq", Jm, Hn, Jm).numpy()


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_twin_forward_gradients_fisher_equal_torch(kind, reduction):
    make, in_shape = CASES[kind]
    net = make()
    model, theta = interop.from_torch(net)
    rng = np.random.default_rng(2)
    N = 4
    X, y = rng.standard_normal((N,) + in_shape), rng.integers(0, 3, N)
    loss_mod = torch.nn.CrossEntropyLoss(reduction=reduction)
    loss = interop.from_torch_loss(loss_mod)
    assert isinstance(loss, losses.CrossEntropy) and loss.reduction == reduction
    Xt, yt = torch.tensor(X), torch.tensor(y)
    np.testing.assert_allclose(model.forward(theta, X), net(Xt).detach().numpy(), **TOL)
    # batch gradient
    net.zero_grad()
    loss_mod(net(Xt), yt).backward()
    g_torch = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy()
    np.testing.assert_allclose(refngd.gradient(model, theta, loss, X, y), g_torch, **TOL)
    # per-sample gradients of the unreduced losses
    params = {k: v.detach() for k, v in net.named_parameters()}
    ce_sum = torch.nn.CrossEntropyLoss(reduction="sum")
    grads = torch.func.vmap(torch.func.grad(
        lambda p, x, t: ce_sum(torch.func.functional_call(net, p, (x[None],)), t[None])),
        in_dims=(None, 0, 0))(params, Xt, yt)
    G = torch.cat([grads[k].reshape(N, -1) for k in params], dim=1).numpy()
    np.testing.assert_allclose(refngd.per_sample_gradients(model, theta, loss, X, y), G, **TOL)
    # exact Fisher / GGN
    F = Fisher(model, theta, loss, X, y).dense()
    np.testing.assert_allclose(F, _torch_fisher(net, loss_mod, X), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name,cls", [("MSELoss", losses.MSELoss),
                                      ("BCEWithLogitsLoss", losses.BCEWithLogits)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_losses_match_torch_values(name, cls, reduction):
    mod = getattr(torch.nn, name)(reduction=reduction)
    loss = interop.from_torch_loss(mod)
    assert type(loss) is cls and loss.reduction == reduction
    rng = np.random.default_rng(3)
    Z, Y = rng.standard_normal((5, 3)), rng.uniform(0, 1, (5, 3))
    assert abs(float(loss(Z, Y)) - mod(torch.tensor(Z), torch.tensor(Y)).item()) < 1e-13


def test_unsupported_module_names_itself_and_its_path():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4),
                              torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Dropout(0.1)))
    with pytest.raises(interop.UnsupportedModuleError, match=r"Dropout at '1\.1'"):
        interop.from_torch(net)
    with pytest.raises(interop.UnsupportedModuleError, match="training mode"):
        interop.from_torch(net)                  # dropout is refused for its randomness
    with pytest.raises(interop.UnsupportedModuleError, match="padding_mode='reflect'"):
        interop.from_torch(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 3, padding_mode="reflect")))
    with pytest.raises(interop.UnsupportedModuleError, match="padding='same'"):
        interop.from_torch(torch.nn.Sequential(torch.nn.Conv2d(2, 2, 3, padding="same")))
    with pytest.raises(TypeError, match="float64 or float32"):
        interop.from_torch(torch.nn.Sequential(torch.nn.Linear(2, 2)).half())


def test_bad_losses_are_refused():
    with pytest.raises(ValueError, match="reduction"):
        interop.from_torch_loss(torch.nn.MSELoss(reduction="none"))
    with pytest.raises(ValueError, match="label_smoothing"):
        interop.from_torch_loss(torch.nn.CrossEntropyLoss(label_smoothing=0.1))
    with pytest.raises(ValueError, match="pos_weight"):
        interop.from_torch_loss(torch.nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)))
    with pytest.raises(interop.UnsupportedModuleError, match="NLLLoss"):
        interop.from_torch_loss(torch.nn.NLLLoss())


def test_registry_extends_conversion():
    """A new module type becomes convertible with one register() call."""
    class Twice(torch.nn.Linear):  # a subclass is NOT silently treated as its parent:
        def forward(self, x):      # without a converter its own forward is traced
            return 2 * super().forward(x)

    net = torch.nn.Sequential(Twice(3, 2)).double()
    X = torch.randn(4, 3, dtype=torch.float64)
    traced, theta = interop.from_torch(net)
    assert np.abs(traced.forward(theta, X.numpy()) - net(X).detach().numpy()).max() < 1e-14
    interop.register(Twice, lambda m, path: [(nn.Linear(3, 2), [m.weight, m.bias])])
    try:
        model, theta = interop.from_torch(net)
        assert isinstance(model.layers[0], nn.Linear) and theta.size == 8
    finally:
        interop._CONVERTERS.pop(Twice)


def test_to_array_refuses_non_tensors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        interop.to_array(np.zeros(3))
    a = interop.to_array(torch.arange(3.0, dtype=torch.float64))
    assert a.dtype == np.float64 and a.tolist() == [0.0, 1.0, 2.0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build of torch and a GPU")
def test_cuda_tensors_become_cupy_arrays_without_a_host_copy():
    cupy = pytest.importorskip("cupy")
    net = torch_mlp().cuda()
    model, theta = interop.from_torch(net)
    assert isinstance(theta, cupy.ndarray)
    ref = parameters_to_vector(net.parameters()).detach()
    assert cupy.array_equal(theta, cupy.from_dlpack(ref))
    back = interop.to_torch(model, theta)
    assert next(back.parameters()).is_cuda
    assert torch.equal(parameters_to_vector(back.parameters()).detach(), ref)
    X = cupy.random.default_rng(0).standard_normal((3, 5))
    out = model.forward(theta, X)
    assert cupy.allclose(out, cupy.from_dlpack(net(torch.from_dlpack(X)).detach()), rtol=1e-12)
