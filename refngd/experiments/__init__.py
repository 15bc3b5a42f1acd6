"""The experiment harness behind ``refngd compare``: data, the two small models, the
γ study of Wu et al. (2024), result records and figures; the comparison as a grid of units
of work (:mod:`.units`, :mod:`.grid`) run in-process or on a Dask cluster (:mod:`.executors`).

Optimizers and the training loop live in :mod:`refngd.optim`; this package only runs them
side by side and evaluates them.
"""
from .gamma_study import batch_gammas, e1_summary, e3_summary

__all__ = ["batch_gammas", "e1_summary", "e3_summary"]
