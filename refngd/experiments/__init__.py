"""The experiment harness behind ``refngd compare``: data, the two small models, the
γ study of Wu et al. (2024), result records and figures.

Optimizers and the training loop live in :mod:`refngd.optim`; this package only runs them
side by side and evaluates them.
"""
from .gamma_study import average_gamma, gamma_ratios

__all__ = ["gamma_ratios", "average_gamma"]
