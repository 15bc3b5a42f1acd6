"""The PyTorch twin check of a converted model, every route independent of refngd's code.

For a float64 ``torch.nn`` model and a batch: θ is ``parameters_to_vector`` bit for bit,
``to_torch`` gives it back; the forward pass; the per-sample gradients (torch.func.vmap
of torch.func.grad); the GGN-vector product c Σ_n J_nᵀ H_n J_n v (torch.func.jvp, the
loss's Hessian by torch.func.hessian, torch.func.vjp); and every row primitive of a set
of random row cotangents against U = S J with J from torch.func.jacrev.
"""
from __future__ import annotations

import numpy as np

import refngd
from refngd import interop
from refngd.curvature import Fisher
from numerics import assert_close

TOL = 1e-10


def functional(torch, net):
    """``f(θ, x)``: ``net`` as a function of its flat parameter vector (parameters() order)."""
    names = [k for k, _ in net.named_parameters()]
    shapes = [tuple(p.shape) for _, p in net.named_parameters()]

    def unflat(th):
        out, i = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            out[n] = th[i:i + k].reshape(s)
            i += k
        return out

    def f(th, x):
        return torch.func.functional_call(net, unflat(th), (x,))
    return f


def check_twin(torch, net, X, y, loss_module, loss=None, tol=TOL):
    """Every check of the module docstring; ``loss`` (refngd) defaults to the converted
    ``loss_module``, which PyTorch applies to ``net``'s outputs as they are (say
    (N, C, d) for a class axis at dimension 1); refngd's twin is ``net`` then Flatten().
    Returns (model, θ)."""
    from torch.nn.utils import parameters_to_vector
    net = net.double()
    model, theta = interop.from_torch(torch.nn.Sequential(net, torch.nn.Flatten()))
    ref = parameters_to_vector(net.parameters()).detach().numpy()
    assert np.array_equal(theta, ref)
    back = interop.to_torch(model, theta)
    assert np.array_equal(parameters_to_vector(back.parameters()).detach().numpy(), theta)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    out = net(Xt).detach()
    np.testing.assert_allclose(back(Xt).detach().numpy(), out.reshape(len(X), -1).numpy(),
                               rtol=1e-13, atol=1e-14)
    loss = interop.from_torch_loss(loss_module) if loss is None else loss
    Z = model.forward(theta, X)
    assert_close(Z, out.reshape(len(X), -1).numpy(), 1e-12)
    assert abs(float(loss(Z, y)) - float(loss_module(out, yt))) <= 1e-12 * abs(float(loss(Z, y)))

    f = functional(torch, net)
    th = torch.tensor(theta)
    N = len(X)
    summed = type(loss_module)(reduction="sum")

    def sample_loss(t, x, yy):
        return summed(f(t, x[None]), yy[None])
    G = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0, 0))(th, Xt, yt)
    assert_close(refngd.per_sample_gradients(model, theta, loss, X, y), G.numpy(), tol)

    v = torch.tensor(np.random.default_rng(1).standard_normal(theta.size))
    z, Jv = torch.func.jvp(lambda t: f(t, Xt), (th,), (v,))
    H = torch.func.hessian(lambda zz: loss_module(zz, yt))(z.detach())   # c H over the batch
    HJv = (H.reshape(z.numel(), z.numel()) @ Jv.reshape(-1)).reshape(z.shape)
    _, pull = torch.func.vjp(lambda t: f(t, Xt), th)
    Gv = pull(HJv)[0].numpy()
    assert_close(Fisher(model, theta, loss, X, y) @ v.numpy(), Gv, tol)

    J = torch.func.jacrev(lambda t: f(t, Xt).reshape(N, -1))(th).numpy()   # (N, C, P)
    rng = np.random.default_rng(2)
    S = rng.standard_normal((N, 2, J.shape[1]))
    U = np.einsum("nkc,ncp->nkp", S, J)
    rows = model.linearize(theta, X).backprop(S)
    Uf = U.reshape(2 * N, -1)
    assert_close(rows.dense(), U, tol)
    assert_close(rows.gram(), Uf @ Uf.T, tol)
    w = rng.standard_normal(theta.size)
    assert_close(rows.matvec(w), U @ w, tol)
    a = rng.standard_normal((N, 2))
    assert_close(rows.rmatvec(a), np.einsum("nk,nkp->p", a, U), tol)
    assert_close(rows.sq_sum(), (Uf * Uf).sum(axis=0), tol)
    return model, theta
