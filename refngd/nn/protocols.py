"""The model and linearisation protocols, and the checks of a model and a reused linearisation.

Every curvature, update and optimizer of refngd reads a model through :class:`Model` and
one forward pass through :class:`Linearization` — :class:`refngd.nn.Sequential` and
:class:`refngd.FunctionModel` (HIPS autograd) implement both, and so can a user's own
model class.  The checks run once, where a public function receives its arguments, and
raise with a message that says what was wrong and what to do.  Array checks live in
:func:`refngd.backend.check_float_array`, the loss's in :func:`refngd.losses.check_loss`.
"""
from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from ..backend import Array, namespace


@runtime_checkable
class Linearization(Protocol):
    """One forward pass kept for back-propagating row cotangents (cf. ``jax.vjp``).

    ``outputs`` are the (N, C) model outputs; ``backprop(S, params=None)`` pulls R = N·K
    output-space rows S (N, K, C) back to the parameters once and returns a
    :class:`refngd.rows.RowSet` (or a ``DenseRowSet``) that contracts the implicit row
    matrix U (docs/design.md §2).  ``model``, ``theta`` and ``X`` say where it was built
    (checked when it is reused: :func:`linearization_for`).
    """

    model: Any
    theta: Array
    outputs: Array

    def backprop(self, cotangents: Array, params=None) -> Any: ...


@runtime_checkable
class Model(Protocol):
    """A refngd model: a map θ (P,), X (N, ...) ↦ Z (N, C) with row back-propagation.

    ``num_params`` is P; ``linearize(theta, X)`` runs the forward pass once and returns a
    :class:`Linearization`.  :class:`refngd.nn.Sequential` also has ``layers`` and a θ
    ``layout`` (:class:`refngd.nn.ParamLayout`), which layer-wise methods (K-FAC, layer
    indices as ``params=``) need.
    """

    num_params: int

    def linearize(self, theta: Array, X: Array) -> Linearization: ...


def check_model(model) -> None:
    """A refngd model: anything with ``linearize(theta, X)`` (Sequential, FunctionModel)."""
    if not hasattr(model, "linearize"):
        hint = ""
        if callable(model) and not isinstance(model, type):
            hint = (" To use a plain function f(theta, X) written with autograd.numpy, wrap it: "
                    "refngd.FunctionModel(f, theta).")
        raise TypeError("model must be a refngd.nn.Sequential or a refngd.FunctionModel, got "
                        f"{type(model).__name__}.{hint}")


def _same_array(a, b) -> bool:
    """``a`` and ``b`` hold the same numbers (identity first: the usual, free case)."""
    if a is b:
        return True
    if getattr(a, "shape", None) != getattr(b, "shape", None) or getattr(a, "dtype", None) != getattr(b, "dtype", None):
        return False
    xp = namespace(a, b)
    return bool(xp.array_equal(a, b))


def linearization_for(model, theta: Array, X: Array, linearization=None):
    """``model.linearize(theta, X)``, or ``linearization`` after checking that it is one.

    A linearisation keeps one forward pass; reusing it for another θ or another batch
    would silently give the curvature and update at the wrong point.  The check compares
    the model, θ and X it was built from — by identity, else entry by entry (O(P + N·D),
    negligible beside the forward pass it saves).
    """
    check_model(model)
    if linearization is None:
        return model.linearize(theta, X)
    if not (hasattr(linearization, "outputs") and hasattr(linearization, "backprop")):
        raise TypeError(f"linearization must be the result of model.linearize(theta, X), "
                        f"got {type(linearization).__name__}.")
    what = []
    if getattr(linearization, "model", model) is not model:
        what.append("another model")
    if not _same_array(getattr(linearization, "theta", theta), theta):
        what.append("another theta")
    lin_X = getattr(linearization, "X", None)
    if lin_X is not None and X is not None and not _same_array(lin_X, X):
        what.append("another X")
    if what:
        raise ValueError(f"linearization was built for {' and '.join(what)}; pass "
                         "linearization=model.linearize(theta, X) for these arguments (or leave it out).")
    return linearization
