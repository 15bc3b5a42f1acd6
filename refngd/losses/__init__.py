"""The loss family: per-sample losses with output gradients, Hessians, factors and sampling.

* :mod:`refngd.losses.base` — the protocol, :class:`Loss` (abstract), and
  :class:`PointwiseLoss`, the shared validation of the losses with one output per sample;
* :mod:`refngd.losses.pointwise` — :class:`CrossEntropy`, :class:`MSELoss`,
  :class:`BCEWithLogits`, equal to PyTorch's losses of the same names;
* :mod:`refngd.losses.sequence` — :class:`PerToken`, one loss term per token;
* :mod:`refngd.losses.softmax_factors` — exact factors of the softmax Hessian.

Notation and the constant c: docs/design.md §2–3 and docs/losses.md.
"""
from .base import Loss, PointwiseLoss, check_loss
from .pointwise import BCEWithLogits, CrossEntropy, MSELoss
from .sequence import PerToken

__all__ = ["Loss", "PointwiseLoss", "CrossEntropy", "MSELoss", "BCEWithLogits", "PerToken",
           "check_loss"]
