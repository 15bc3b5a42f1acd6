"""The experiment harness behind ``refngd compare``: data, the two small models, the
methods it trains (:mod:`.methods`), the γ study of Wu et al. (2024), the run's output
folder and figures; the comparison as a grid of units of work (:mod:`.units`, :mod:`.grid`)
run in-process or on a Dask cluster (:mod:`.executors`).

Optimizers, the training loop and the JSON records live in :mod:`refngd.optim`; this
package only runs them side by side and evaluates them.
"""
from .gamma_study import batch_gammas, e1_summary, e3_summary

__all__ = ["batch_gammas", "e1_summary", "e3_summary"]
