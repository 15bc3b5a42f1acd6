"""The argument checks shared by every public entry point (derivatives, curvatures, updates).

Each check runs once, where a public function receives its arguments, and raises with a
message that says what was wrong and what to do — never a traceback from deep inside
NumPy, and never a silently wrong number.  Array checks (dtype, shape, NaN/Inf, masked
arrays, ``np.matrix``) live in :func:`refngd.backend.check_float_array`; this module holds
the checks of refngd's own objects: the model, the loss and a reused linearisation.
"""
from __future__ import annotations

from .backend import Array, namespace


def check_model(model) -> None:
    """A refngd model: anything with ``linearize(theta, X)`` (Sequential, FunctionModel)."""
    if not hasattr(model, "linearize"):
        hint = ""
        if callable(model) and not isinstance(model, type):
            hint = (" To use a plain function f(theta, X) written with autograd.numpy, wrap it: "
                    "refngd.FunctionModel(f, theta).")
        raise TypeError("model must be a refngd.nn.Sequential or a refngd.FunctionModel, got "
                        f"{type(model).__name__}.{hint}")


def check_loss(loss) -> None:
    """A refngd loss *instance* (``CrossEntropy()``, not the class, not a string)."""
    if isinstance(loss, type):
        raise TypeError(f"pass a loss instance, e.g. {loss.__name__}(), not the class {loss.__name__}.")
    if not (hasattr(loss, "output_gradient") and hasattr(loss, "scale")):
        raise TypeError(
            "loss must be a refngd.losses loss (CrossEntropy(), MSELoss(), BCEWithLogits()), "
            f"got {loss!r}."
        )


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
