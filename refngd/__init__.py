"""refngd: exact natural-gradient methods for neural networks, as a readable NumPy reference.

Notation and conventions: docs/design.md and ``docs/conventions.md``.  ``import refngd``
loads the library — layers, losses, curvatures, updates, metrics and optimizers — but not
the experiment harness behind ``refngd compare`` (:mod:`refngd.experiments`, which needs
the ``cli`` extra) nor the validation kit (:mod:`refngd.check`, ``refngd.interop``,
``refngd.testing``), which load on first use.
"""
import sys as _sys

from . import backend, conventions, options
from . import losses, nn
from .nn import subsets
from .autodiff import FunctionModel
from .derivatives import gradient, jacobian, jvp, loss_value, per_sample_gradients, vjp
from . import curvature, metrics, updates
from . import optim
from .optim import train

# Parameter subsets belong with the layers (refngd.nn.subsets); ``refngd.subsets`` stays
# importable as the same module object.
_sys.modules[__name__ + ".subsets"] = subsets

__version__ = "0.1.0"

__all__ = ["backend", "options", "conventions", "losses", "nn", "subsets", "curvature",
           "updates", "metrics", "optim", "FunctionModel", "jacobian", "jvp", "vjp",
           "per_sample_gradients", "gradient", "loss_value", "train", "__version__"]
