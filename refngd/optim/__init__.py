"""Optimizers and the training loop, in the functional style of optax.

::

    opt = refngd.optim.NGD(lr=1.0, damping=1e-3)
    state = opt.init(theta)
    theta, state, info = opt.step(theta, state, model, loss, X, y, rng=rng)

or ``result = refngd.train(model, theta, loss, X, y, opt, epochs=5)``.  See
``docs/optim.md`` for every method's formula and source, and ``refngd compare`` for the
side-by-side experiment.
"""
from .adafisher import AdaFisher
from .adamqlr import AdamQLR
from .base import Optimizer
from .baselines import SGD, AdaGrad, Adafactor, Adam, AdamW
from .fadam import FAdam
from .kfac import EKFAC, KFAC
from .lowprec import LowPrecision
from .natural import EF, IEF, NGD, SF
from .rootfree import RFAdam, RFRMSProp
from .singd import IKFAC, INGD
from .sirfshampoo import SIRFShampoo
from .train import TrainResult, train

__all__ = ["Optimizer", "SGD", "AdaGrad", "Adam", "AdamW", "Adafactor", "NGD", "SF", "EF", "IEF", "KFAC",
           "EKFAC", "AdaFisher", "FAdam", "RFRMSProp", "RFAdam", "INGD", "IKFAC", "SIRFShampoo",
           "AdamQLR", "LowPrecision",
           "train", "TrainResult"]
