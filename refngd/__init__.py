"""refngd: exact natural-gradient methods for neural networks, as a readable NumPy reference.

Notation and conventions: docs/design.md and ``docs/conventions.md``.
"""
from . import backend, losses, nn, subsets
from .autodiff import FunctionModel
from .derivatives import gradient, jacobian, jvp, loss_value, per_sample_gradients, vjp
from . import experiments, optim
from .optim import train

__version__ = "0.1.0"

__all__ = ["backend", "losses", "nn", "subsets", "FunctionModel", "jacobian", "jvp", "vjp",
           "per_sample_gradients", "gradient", "loss_value", "optim", "train", "__version__"]
