"""The optimizer protocol of :mod:`refngd.optim`, in the functional style of optax.

::

    opt = refngd.optim.Adam(lr=1e-3)
    state = opt.init(theta)
    theta, state, info = opt.step(theta, state, model, loss, X, y, rng=rng)

* ``init(theta)`` returns a fresh *state*: a plain ``dict`` of arrays and counters
  (``state["step"]`` counts completed steps).
* ``step`` takes the parameters, the state and one batch, and returns the new parameters,
  a *new* state dict and an ``info`` dict of Python floats (JSON-ready).  Neither ``theta``
  nor ``state`` is modified in place: an old state can be reused to replay a step.
* No hidden global state: methods that draw random numbers (the sampled Fisher, K-FAC's
  Monte-Carlo factors) take ``rng``, a ``numpy.random.Generator``, in ``step``.

``info`` always holds ``loss`` and ``accuracy`` (the batch loss and, for integer class
labels, the batch accuracy at θ *before* the step, read off the step's own forward pass),
``grad_norm`` ‖g‖ and ``update_norm`` ‖θ_new − θ‖; methods add their own entries.

Every array operation uses ``xp = namespace(theta)`` (docs/design.md §5): optimizers run on
NumPy and CuPy alike.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from ..backend import Array, namespace, to_float
from ..derivatives import gradient_from
from ..options import (ArgumentTypeError, check_choice, check_int, check_nonnegative,  # noqa: F401
                       check_positive, check_real, check_unit_interval)


# --------------------------------------------------------------------------- checks
def check_lr(lr: Any, name: str = "lr") -> float:
    """A learning rate: a finite float > 0."""
    return check_positive(lr, name)


def require_rng(rng: Any, who: str):
    """The explicit ``rng`` of a Monte-Carlo method, or a clear error."""
    if rng is None:
        raise TypeError(
            f"{who} draws random numbers: pass rng=numpy.random.default_rng(seed) to "
            "step() (refngd.train passes its own)."
        )
    if not (hasattr(rng, "random") and hasattr(rng, "standard_normal")):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}.")
    return rng


# ----------------------------------------------------------------------- the batch
@dataclass
class Batch:
    """One forward pass and the gradient of a batch, shared by everything in a step.

    ``lin`` is ``model.linearize(theta, X)``; ``g`` the batch gradient (P,);
    ``loss`` and ``accuracy`` the batch loss and accuracy at θ (floats; accuracy is NaN
    when the targets are not integer class labels).
    """

    lin: Any
    g: Array
    loss: float
    accuracy: float


def evaluate_batch(model, theta: Array, loss, X: Array, y: Array) -> Batch:
    """Forward pass, batch loss, batch accuracy and gradient (one backward pass)."""
    if not hasattr(model, "linearize"):
        raise TypeError(
            f"model must be a refngd.nn.Sequential or a refngd.FunctionModel, got {type(model).__name__}."
        )
    lin = model.linearize(theta, X)
    Z = lin.outputs
    value = to_float(loss(Z, y))
    return Batch(lin, gradient_from(lin, loss, y), value, batch_accuracy(Z, y))


def batch_accuracy(Z: Array, y: Any) -> float:
    """Fraction of rows whose arg-max equals the integer label; NaN for other targets."""
    xp = namespace(Z)
    y = xp.asarray(y)
    if y.ndim != 1 or y.dtype.kind not in "iu" or Z.ndim != 2 or Z.shape[1] < 2:
        return math.nan
    return to_float(xp.mean((xp.argmax(Z, axis=1) == y).astype(xp.float64)))


def norm(v: Array) -> float:
    """Euclidean norm as a Python float."""
    return to_float(namespace(v).linalg.norm(v))


def rms(v: Array) -> float:
    """Root mean square √(mean(v²)) as a Python float."""
    xp = namespace(v)
    return to_float(xp.sqrt(xp.mean(v * v))) if v.size else 0.0


# ------------------------------------------------------------------ parameter blocks
def param_blocks(model, num_params: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """``(start, stop, shape)`` of every parameter array of θ, in θ's order.

    For :class:`refngd.nn.Sequential` these are the layers' weights and biases in
    PyTorch's shapes; any other model is one vector block ``(0, P, (P,))``.
    """
    layers, slices = getattr(model, "layers", None), getattr(model, "slices", None)
    if layers is None or slices is None:
        return [(0, num_params, (num_params,))]
    out = []
    for layer, (start, _) in zip(layers, slices):
        i = start
        for shape in getattr(layer, "param_shapes", ()):
            size = math.prod(shape)
            out.append((i, i + size, tuple(shape)))
            i += size
    return out


# ---------------------------------------------------------------------- optimizer
class Optimizer(ABC):
    """Base class: ``init(theta) -> state`` and ``step(...) -> (theta, state, info)``.

    Subclasses store their hyper-parameters as attributes listed in ``_hyper`` (so that
    :meth:`hyperparameters` and ``repr`` show them) and implement :meth:`step`.
    """

    name: str = "optimizer"
    _hyper: tuple[str, ...] = ()

    def init(self, theta: Array) -> dict:
        """A fresh state for parameters like ``theta``."""
        return {"step": 0}

    @abstractmethod
    def step(self, theta: Array, state: dict, model, loss, X: Array, y: Array, rng=None):
        """One optimisation step on the batch (X, y): returns ``(theta, state, info)``."""

    def hyperparameters(self) -> dict:
        """The hyper-parameters as a JSON-ready dict (used in results records)."""
        return {k: _jsonable(getattr(self, k)) for k in self._hyper}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={getattr(self, k)!r}" for k in self._hyper)
        return f"{type(self).__name__}({args})"

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _check_state(state: dict, *keys: str) -> None:
        if not isinstance(state, dict) or "step" not in state:
            raise TypeError("state must be the dict returned by opt.init(theta) or opt.step(...).")
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(
                f"state lacks {missing}: it was made by another optimizer; call this "
                "optimizer's init(theta)."
            )

    @staticmethod
    def _info(batch: Batch, theta: Array, new_theta: Array, **extra) -> dict:
        info = {"loss": batch.loss, "accuracy": batch.accuracy, "grad_norm": norm(batch.g),
                "update_norm": norm(new_theta - theta)}
        info.update({k: float(v) for k, v in extra.items()})
        return info


def _jsonable(v):
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return repr(v)


def apply_momentum(buf: Array | None, d: Array, momentum: float, nesterov: bool = False):
    """Heavy-ball buffer b ← μ b + d; returns ``(step_direction, new_buffer)``.

    Nesterov (as PyTorch's SGD): the step direction is d + μ b_new.  ``buf=None`` (first
    step) starts from b = 0, so the first buffer is d itself.
    """
    if momentum == 0:
        return d, buf
    new = d if buf is None else momentum * buf + d
    return (d + momentum * new if nesterov else new), new


def momentum_step(theta: Array, d: Array, buf: Array | None, lr: float, momentum: float,
                  weight_decay: float = 0.0, nesterov: bool = False):
    """θ − lr·u with u the heavy-ball direction of d + weight_decay·θ (:func:`apply_momentum`).

    The last stage shared by every optimizer that preconditions first and then takes an
    SGD-with-momentum step on the preconditioned direction d (PyTorch's coupled weight
    decay).  Returns ``(new_theta, new_buffer)``.
    """
    u = d + weight_decay * theta if weight_decay else d
    u, buf = apply_momentum(buf, u, momentum, nesterov)
    return theta - lr * u, buf


def zeros_like(theta: Array) -> Array:
    return namespace(theta).zeros_like(theta)
