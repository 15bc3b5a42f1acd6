"""Per-sample Jacobians, per-sample gradients, batch gradients, J·v and Jᵀ·w.

All of them are one backward pass of row cotangents (docs/design.md §2) through
``model.linearize(theta, X).backprop(rows)``, so they work unchanged for
:class:`refngd.nn.Sequential` and for :class:`refngd.autodiff.FunctionModel`.
"""
from __future__ import annotations

from .backend import Array, check_float_array, namespace, one_host_read
from .losses.base import check_loss as _check_loss
from .nn.protocols import check_model as _check_model


def _identity_rows(Z: Array) -> Array:
    xp = namespace(Z)
    N, C = Z.shape
    return xp.broadcast_to(xp.eye(C, dtype=Z.dtype), (N, C, C))


@one_host_read
def jacobian(model, theta: Array, X: Array) -> Array:
    """Per-sample output Jacobians J_n = ∂z_n/∂θ as a dense (N, C, P) array.

    Memory N·C·P: meant for small models and for validating other code.
    """
    _check_model(model)
    lin = model.linearize(theta, X)
    return lin.backprop(_identity_rows(lin.outputs)).dense()


@one_host_read
def jvp(model, theta: Array, X: Array, v: Array) -> Array:
    """Matrix-free J·v: returns (N, C) with rows J_n v, for a parameter vector v (P,)."""
    _check_model(model)
    lin = model.linearize(theta, X)
    _check_param_vector(v, theta)
    return lin.backprop(_identity_rows(lin.outputs)).matvec(v.astype(theta.dtype, copy=False))


@one_host_read
def vjp(model, theta: Array, X: Array, w: Array) -> Array:
    """Matrix-free Jᵀ·w = Σ_n J_nᵀ w_n for output-space weights w (N, C); returns (P,)."""
    _check_model(model)
    lin = model.linearize(theta, X)
    check_float_array("w", w, ndim=2)
    if w.shape != lin.outputs.shape:
        raise ValueError(f"w must have the output shape {tuple(lin.outputs.shape)}, got {tuple(w.shape)}.")
    xp = namespace(w)
    return lin.backprop(w[:, None, :]).rmatvec(xp.ones((w.shape[0], 1), dtype=theta.dtype))


@one_host_read
def per_sample_gradients(model, theta: Array, loss, X: Array, y: Array) -> Array:
    """Gradients g_n = J_nᵀ e_n of the *unreduced* per-sample losses l_n, shape (N, P).

    No reduction constant: the batch gradient is ``loss.scale(Z) * g.sum(0)``.
    """
    _check_model(model)
    _check_loss(loss)
    lin = model.linearize(theta, X)
    e = loss.output_gradient(lin.outputs, y)
    return lin.backprop(e[:, None, :]).dense()[:, 0, :]


@one_host_read
def gradient(model, theta: Array, loss, X: Array, y: Array) -> Array:
    """Gradient g = c Σ_n J_nᵀ e_n of the reduced loss L = c Σ_n l_n, shape (P,)."""
    _check_model(model)
    _check_loss(loss)
    lin = model.linearize(theta, X)
    return gradient_from(lin, loss, y)


@one_host_read
def gradient_from(lin, loss, y: Array, params=None) -> Array:
    """Batch gradient from an existing linearisation (reuses its forward pass).

    ``params`` (default all of θ): a parameter subset S (docs/subsets.md); the result is
    then g[S], of length |S|, computed without row work on the other parameters.
    """
    _check_loss(loss)
    Z = lin.outputs
    xp = namespace(Z)
    e = loss.output_gradient(Z, y) * loss.scale(Z)
    rows = lin.backprop(e[:, None, :], params=params)
    return rows.rmatvec(xp.ones((Z.shape[0], 1), dtype=Z.dtype))


def loss_value(model, theta: Array, loss, X: Array, y: Array) -> float:
    """The reduced loss L = c Σ_n l_n at θ, as a Python float."""
    _check_model(model)
    _check_loss(loss)
    return float(loss(model.forward(theta, X), y))


def _check_param_vector(v: Array, theta: Array) -> None:
    check_float_array("v", v, ndim=1)
    if v.shape != theta.shape:
        raise ValueError(f"v must have theta's shape {tuple(theta.shape)}, got {tuple(v.shape)}.")
