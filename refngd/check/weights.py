"""θ at the time of the candidate: ``validate(theta=...)`` and a cheap check for moved weights.

``validate`` reads a torch module's *current* weights.  Every optimizer moves them in
``optimizer.step()``, so a candidate taken during one step and validated after it belongs
to another θ.  The safe order is: compute the candidate, validate, then ``step()``; or save
the weights first (``theta = parameters_to_vector(model.parameters()).detach().clone()``
or ``copy.deepcopy(model.state_dict())``) and pass ``theta=``.

When the check fails and no ``theta=`` was given, :func:`stale_weights_note` compares the
module's ``p.grad`` — left by the backward pass that (usually) produced the candidate —
with the gradient of the batch at the module's current weights: one gradient, no more.
A mismatch means the weights moved after that backward pass (or ``.grad`` holds something
else: a preconditioned direction, gradients accumulated over other batches), and the
report says so.
"""
from __future__ import annotations

from collections.abc import Mapping


from ..backend import Array, namespace
from ..derivatives import gradient

#: p.grad agrees with the gradient at the current weights to this relative error (float32
#: backward passes included): above it, the weights or the gradient are not the batch's
GRAD_RTOL = 1e-4


def _array(a) -> Array:
    if hasattr(a, "detach"):
        from .interop import to_array

        return to_array(a)
    return a


def theta_from(theta, names: list, model, current: Array) -> Array:
    """θ from a (P,) vector in ``parameters_to_vector`` order or a ``state_dict``.

    ``names``: the parameters' names in θ's order (``named_parameters``, or the layout's
    keys); ``model``: the refngd twin (for the shapes); ``current``: its θ now (dtype,
    device).  A ``state_dict``'s buffers (running statistics) are not parameters and are
    read from the module.
    """
    xp = namespace(current)
    if isinstance(theta, Mapping):
        missing = [n for n in names if n not in theta]
        if missing:
            raise ValueError(f"theta (a state_dict) has no {missing[:3]}; it needs the keys "
                             f"{names}.")
        parts = []
        for name, slot in zip(names, model.layout):
            a = xp.asarray(_array(theta[name]))
            if tuple(a.shape) != tuple(slot.shape):
                raise ValueError(f"theta[{name!r}] has shape {tuple(a.shape)}; the model's "
                                 f"{name} has {tuple(slot.shape)}.")
            parts.append(a.reshape(-1))
        vec = xp.concatenate(parts)
    else:
        vec = xp.asarray(_array(theta))
        if vec.ndim != 1 or vec.shape[0] != current.shape[0]:
            raise ValueError(f"theta must be a ({current.shape[0]},) vector in "
                             f"parameters_to_vector order or a state_dict, got shape "
                             f"{tuple(vec.shape)}.")
    if vec.dtype.kind != "f":
        raise TypeError(f"theta must hold floats, got {vec.dtype}.")
    return vec.astype(current.dtype, copy=False)


def stale_weights_note(module, twin) -> str | None:
    """A sentence when the module's ``p.grad`` is not the batch's gradient at its current
    weights (module docstring), else None.  Needs every parameter's ``.grad`` and labels."""
    params = list(module.parameters())
    if twin.y is None or not params or any(p.grad is None for p in params):
        return None
    import torch

    g_user = _array(torch.cat([p.grad.detach().reshape(-1) for p in params]))
    xp = namespace(twin.theta)
    g_user = xp.asarray(g_user).astype(xp.float64)
    g_now = gradient(twin.model, twin.theta, twin.loss, twin.X, twin.y)
    norm = float(xp.linalg.norm(g_now))
    err = float(xp.linalg.norm(g_user - g_now)) / norm if norm > 0 else float("inf")
    if err <= GRAD_RTOL:
        return None
    return (f"note: the module's p.grad differs from this batch's gradient at its current "
            f"weights (relative error {err:.2g}). If that gradient came from this batch, the "
            "weights changed after it was computed — optimizer.step() ran — and the candidate "
            "belongs to the earlier θ: validate before step(), or pass theta= the weights "
            "saved then. (A preconditioner that writes its direction into .grad, or gradients "
            "accumulated over other batches, also explain this.)")
