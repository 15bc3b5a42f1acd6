"""The methods of ``refngd compare``: each with its label, fixed settings and learning-rate grid.

:data:`METHODS` is the one table of what the comparison can train; ``refngd compare``
trains :data:`DEFAULT_METHODS` unless ``--methods`` says otherwise.  Every method runs
with the fixed hyper-parameters below and only its learning rate is chosen (docs/compare.md
tells how the grids were found).  Its own module because the command
(:mod:`refngd.experiments.compare`) and the units of work that train and score the
methods (:mod:`refngd.experiments.units`, :mod:`refngd.experiments.grid`) all read it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from ..optim.adafisher import AdaFisher
from ..optim.baselines import SGD, Adafactor, Adam, AdamW
from ..optim.fadam import FAdam
from ..optim.natural import EF, IEF, NGD, SF


@dataclass(frozen=True)
class Method:
    """A method of the comparison: display label, optimizer factory ``make(lr)``, lr grid."""

    label: str
    make: Callable
    lr_grid: tuple
    settings: str  #: the fixed hyper-parameters, for the docs and the record


def _ladder(center: float) -> tuple:
    """Five learning rates around ``center`` on the 1–3–10 scale (steps of ≈ √10).

    ``_ladder(0.1) == (0.01, 0.03, 0.1, 0.3, 1.0)``; ``_ladder(0.03) == (0.003, 0.01, 0.03, 0.1, 0.3)``.
    """
    scale = sorted(m * 10.0**e for e in range(-7, 5) for m in (1, 3))
    i = min(range(len(scale)), key=lambda j: abs(math.log(scale[j] / center)))
    return tuple(float(f"{v:.0e}") for v in scale[i - 2:i + 3])


def _kfac_methods() -> dict:
    from ..optim.kfac import EKFAC, KFAC

    return {
        "kfac": Method("K-FAC", lambda lr: KFAC(lr=lr), _ladder(1.0),
                       "K-FAC defaults: MC Fisher (1 sample), EMA 0.95, inverse every 20 steps, "
                       "factored damping 1e-3, KL-clip 1e-3"),
        "ekfac": Method("EKFAC", lambda lr: EKFAC(lr=lr), _ladder(0.3),
                        "EKFAC defaults: MC Fisher (1 sample), EMA 0.95, eigenbasis every 20 "
                        "steps, damping 1e-3, KL-clip 1e-3"),
    }


METHODS: dict[str, Method] = {
    "sgd": Method("SGD", lambda lr: SGD(lr, momentum=0.9), _ladder(0.1), "momentum 0.9"),
    "adam": Method("Adam", lambda lr: Adam(lr), _ladder(0.01), "β = (0.9, 0.999), ε = 1e-8"),
    "adamw": Method("AdamW", lambda lr: AdamW(lr, weight_decay=0.0), _ladder(0.01),
                    "as Adam (no weight decay in compare)"),
    "adafactor": Method("Adafactor", lambda lr: Adafactor(lr=lr), _ladder(0.03),
                        "relative step ρ = lr, parameter scaling, no momentum"),
    "ngd": Method("NGD", lambda lr: NGD(lr, damping=1e-3), _ladder(0.1), "exact Fisher, λ = 1e-3"),
    "ef": Method("EF", lambda lr: EF(lr, damping=1e-3), _ladder(0.3),
                 "Gram form λ = 1e-3, update normalised to ‖g‖"),
    "ief": Method("iEF", lambda lr: IEF(lr, damping=1e-3), _ladder(10.0), "Gram form λ = 1e-3"),
    "sf": Method("SF", lambda lr: SF(lr, damping=1e-3), _ladder(1.0),
                 "1 MC sample, λ = 1e-3, update normalised to ‖g‖"),
    "adafisher": Method("AdaFisher", lambda lr: AdaFisher(lr), _ladder(0.1),
                        "β = 0.9, λ = 1e-3, EMA (0.92, 0.08), factors every step"),
    "fadam": Method("FAdam", lambda lr: FAdam(lr, weight_decay=0.0), _ladder(0.03),
                    "β = (0.9, 0.999), clip 1, adaptive ε, no weight decay"),
}
METHODS.update(_kfac_methods())


def _second_order_adaptive_methods() -> dict:
    """Opt-in (not in DEFAULT_METHODS): root-free, inverse-free and AdamQLR (docs/optim.md)."""
    from ..optim.adamqlr import AdamQLR
    from ..optim.rootfree import RFAdam, RFRMSProp
    from ..optim.singd import IKFAC, INGD
    from ..optim.sirfshampoo import SIRFShampoo

    return {
        "rfadam": Method("RF-Adam", lambda lr: RFAdam(lr), _ladder(3.0),
                         "root-free AdamW (Lin et al. 2024a): β = (0.9, 0.999), λ = 1e-4, s₀ = 1, "
                         "no bias correction, no weight decay"),
        "rfrmsprop": Method("RF-RMSProp", lambda lr: RFRMSProp(lr, momentum=0.9), _ladder(0.03),
                            "root-free RMSProp (Lin et al. 2024a, Fig. 4; β₂ = 0.01 the reference "
                            "code's default): λ = 1e-4, "
                            "momentum 0.9"),
        "ikfac": Method("IKFAC", lambda lr: IKFAC(lr, update_every=1), _ladder(0.03),
                        "inverse-free K-FAC (Lin et al. 2024b): empirical Fisher, β₁ = 1e-2, "
                        "λ = 1e-3, momentum 0.9, factors every step"),
        "ingd": Method("INGD", lambda lr: INGD(lr, update_every=1), _ladder(0.001),
                       "INGD (Lin et al. 2024b, Fig. 4): as IKFAC plus traces and α₁ = 0.5"),
        "sirfshampoo": Method("SIRFShampoo", lambda lr: SIRFShampoo(lr), _ladder(0.03),
                              "inverse-, root-free Shampoo (Lin et al. 2024a; sirfshampoo defaults): "
                              "β₂ = 1e-2, α₁ = 0.9, α₂ = 0.5, λ = 1e-3, factors every step"),
        "adamqlr": Method("AdamQLR", lambda lr: AdamQLR.untuned(lr_scale=lr), (1.0,),
                          "untuned AdamQLR (Clarke & Hernández-Lobato 2024, camera-ready): exact "
                          "Fisher step size, no clipping, λ₀ = 1e-3, ω = (0.5, 2); the 'lr' scales "
                          "the chosen step (1 = the paper's method)"),
    }


METHODS.update(_second_order_adaptive_methods())
#: methods whose direction depends on their optimizer state (``opt.direction(θ, state, ...)``):
#: the γ study scores them at checkpoints of their *own* best run (``gamma.own_trajectory``)
OWN_TRAJECTORY_METHODS = tuple(_second_order_adaptive_methods())

DEFAULT_METHODS = ("sgd", "adam", "ngd", "ef", "ief", "sf", "kfac", "ekfac", "adafisher", "fadam")


__all__ = ["Method", "METHODS", "DEFAULT_METHODS", "OWN_TRAJECTORY_METHODS"]
