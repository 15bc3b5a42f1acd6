"""Every option's name, allowed values and default — defined once — and the argument checks.

refngd's entry points (``refngd.curvature``, ``refngd.updates``, ``refngd.optim``,
``refngd.check`` and the command line) take the same options.  Each option's allowed values
are a ``Literal`` type below, its tuple of values is read off that type, and its default is
one constant; every signature uses these names, so the values and defaults cannot drift
apart between entry points.  Where an entry point deliberately uses another default (an
optimizer follows its paper), the reason is stated where that default is set.

=================  ===============================  ==========  ==================================
option             values                           default     meaning (docs/design.md §3)
=================  ===============================  ==========  ==================================
``reduction``      ``"mean"``, ``"sum"``            ``"mean"``  the loss constant c (1/N or 1)
``fisher_type``    ``"type-2"``, ``"mc"``,          ``"type-2"``  K-FAC's rows: a factor of H_n,
                   ``"empirical"``                              sampled gradients, or e_n
``kfac_approx``    ``"expand"``, ``"reduce"``       ``"expand"``  weight sharing (Eschenhagen
                                                                et al. 2023, §3)
``bias``           ``"separate"``, ``"joint"``      ``"separate"``  K-FAC's bias block
``damping_mode``   ``"tikhonov"``, ``"factored"``,  ``"tikhonov"``  (F + λI), Martens & Grosse's
                   ``"per-factor"``                             factored damping (2015, §6.3), or
                                                                (A + λ_A I) ⊗ (G + λ_G I)
``pi``             ``"trace"`` or a number > 0      ``"trace"``  factored damping's π (M&G §6.3)
``damping_split``  ``"even"``, ``"locations"``      ``"even"``  factored damping of a layer that
                                                                shares its weight over T positions
``form``           ``"gram"``, ``"tikhonov"``       ``"gram"``  EF/iEF damping: the paper's
                                                                N × N Gram (Wu et al. 2024,
                                                                eq. 4, 8) or P × P Tikhonov
``convention``     a preset of :mod:`refngd.conventions`  ``"refngd"``
=================  ===============================  ==========  ==================================

Two fields of :class:`refngd.conventions.Convention` take their values from here too:
``factor_scale`` (how a public implementation's K-FAC factors are scaled relative to
refngd's, :data:`FACTOR_SCALES`) and ``gram_rows`` (the rows of the EF/iEF Gram form,
:data:`GRAM_ROWS`); docs/conventions.md derives each.

The argument checks form one vocabulary with one exception type per mistake: a value of the
wrong *type* (a float where an integer is needed, a string where a number is) raises
:class:`ArgumentTypeError`; a value of the right type outside its range or set raises
``ValueError``.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Literal, get_args

from .backend import check_damping

__all__ = ["Reduction", "FisherType", "KfacApprox", "BiasMode", "DampingMode", "Form", "Pi",
           "PiRule", "DampingSplit", "FactorScale", "GramRows", "REDUCTIONS", "FISHER_TYPES",
           "KFAC_APPROX", "BIAS_MODES", "DAMPING_MODES", "FORMS", "PI_RULES", "DAMPING_SPLITS",
           "FACTOR_SCALES", "GRAM_ROWS", "REDUCTION", "FISHER_TYPE", "KFAC_APPROX_DEFAULT", "BIAS",
           "DAMPING_MODE", "FORM", "PI", "DAMPING_SPLIT", "FACTOR_SCALE", "GRAM_ROW", "CONVENTION",
           "ArgumentTypeError", "check_choice", "check_int", "check_real", "check_positive",
           "check_nonnegative", "check_unit_interval", "check_pi", "check_kfac_damping"]

# ------------------------------------------------------------------ names and values
Reduction = Literal["mean", "sum"]
FisherType = Literal["type-2", "mc", "empirical"]
KfacApprox = Literal["expand", "reduce"]
BiasMode = Literal["separate", "joint"]
DampingMode = Literal["tikhonov", "factored", "per-factor"]
Form = Literal["gram", "tikhonov"]
#: the named rule for factored damping's π; a number > 0 fixes π instead
PiRule = Literal["trace"]
Pi = PiRule | float
DampingSplit = Literal["even", "locations"]
#: a convention's K-FAC factors relative to refngd's ``expand`` factors, per layer
#: (:mod:`refngd.curvature.preset_factors`): refngd's own, or one public implementation's
FactorScale = Literal["none", "kfac-pytorch", "alecwangcq", "ekfac-pytorch"]
#: the rows of the EF/iEF Gram form: refngd's g_n, or the reduced loss's c·g_n (with the
#: targets of iEF then ‖c·e_n‖²)
GramRows = Literal["g_n", "c*g_n"]

REDUCTIONS: tuple[str, ...] = get_args(Reduction)
FISHER_TYPES: tuple[str, ...] = get_args(FisherType)
KFAC_APPROX: tuple[str, ...] = get_args(KfacApprox)
BIAS_MODES: tuple[str, ...] = get_args(BiasMode)
DAMPING_MODES: tuple[str, ...] = get_args(DampingMode)
FORMS: tuple[str, ...] = get_args(Form)
PI_RULES: tuple[str, ...] = get_args(PiRule)
DAMPING_SPLITS: tuple[str, ...] = get_args(DampingSplit)
FACTOR_SCALES: tuple[str, ...] = get_args(FactorScale)
GRAM_ROWS: tuple[str, ...] = get_args(GramRows)

# ------------------------------------------------------------------ defaults
#: PyTorch's default reduction
REDUCTION: Reduction = "mean"
#: the exact GGN/Fisher rows: K-FAC without sampling noise, the reference to validate against
FISHER_TYPE: FisherType = "type-2"
#: Eschenhagen et al. (2023) recommend expand for layers whose weight sharing is a batch axis
KFAC_APPROX_DEFAULT: KfacApprox = "expand"
#: Martens & Grosse (2015) treat the bias with its own block; joint is one option away
BIAS: BiasMode = "separate"
#: exact damping of the curvature: the matrix refngd compares against is F + λI
DAMPING_MODE: DampingMode = "tikhonov"
#: the paper's damping of EF and iEF (Wu et al. 2024, eq. 4 and 8)
FORM: Form = "gram"
#: Martens & Grosse (2015, §6.3): π² = (tr A / dim A) / (tr G / dim G)
PI: Pi = "trace"
#: the same split for every layer (refngd's factored damping before these options existed)
DAMPING_SPLIT: DampingSplit = "even"
#: refngd's factors: A and G as docs/kfac.md defines them
FACTOR_SCALE: FactorScale = "none"
#: the paper's Gram form, Gᵀ(GGᵀ + λI)⁻¹ t over the unreduced losses' gradients g_n
GRAM_ROW: GramRows = "g_n"
#: refngd's own conventions (docs/conventions.md)
CONVENTION = "refngd"


# ------------------------------------------------------------------ checks
class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type: a float where an integer is needed, a string where a
    number is, a bool where either is.

    It is a ``TypeError`` (what the mistake is) and, like NumPy's ``AxisError``, also a
    ``ValueError``: some entry points raised ``ValueError`` for this mistake before the
    checks were unified, and code that catches that keeps working.
    """


def check_choice(value: Any, name: str, choices: tuple) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if any(value is c or (isinstance(value, str) and value == c) for c in choices):
        return value
    raise ValueError(f"{name} must be one of {choices}, got {value!r}.")


def check_int(value: Any, name: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum``: :class:`ArgumentTypeError` for a non-integer
    (bool and float included), ``ValueError`` below ``minimum``."""
    what = {1: "a positive integer", 0: "a non-negative integer"}.get(
        minimum, f"an integer >= {minimum}")
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ArgumentTypeError(f"{name} must be {what}, got {value!r}.")
    v = operator.index(value)
    if v < minimum:
        raise ValueError(f"{name} must be {what}, got {value!r}.")
    return v


def check_real(value: Any, name: str) -> float:
    """``value`` as a finite float: :class:`ArgumentTypeError` for a non-number (bool and
    str included), ``ValueError`` for NaN or ±Inf."""
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{name} must be a real number, got {value!r}.") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {value!r}.")
    return v


def check_positive(value: Any, name: str) -> float:
    """A finite real number > 0."""
    v = check_real(value, name)
    if not v > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    return v


def check_nonnegative(value: Any, name: str) -> float:
    """A finite real number ≥ 0."""
    v = check_real(value, name)
    if v < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}.")
    return v


def check_unit_interval(value: Any, name: str, closed_right: bool = False) -> float:
    """A decay / momentum coefficient in [0, 1) (or [0, 1] with ``closed_right``)."""
    v = check_real(value, name)
    if v < 0 or v > 1 or (v == 1 and not closed_right):
        interval = "[0, 1]" if closed_right else "[0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}.")
    return v


def check_pi(value: Any) -> Pi:
    """Factored damping's π: ``"trace"`` (:data:`PI_RULES`) or a finite number > 0 (a float)."""
    if isinstance(value, str):
        return check_choice(value, "pi", PI_RULES)
    return check_positive(value, "pi")


def check_unused_damping_options(damping_mode: Any, pi: Any = PI, damping_split: Any = DAMPING_SPLIT
                          ) -> None:
    """Raise where ``pi`` or ``damping_split`` is set but ``damping_mode`` ignores it.

    π and the split of λ between the factors belong to a *factored* damping
    (Martens & Grosse 2015, §6.3); Tikhonov damping (G ⊗ A + λI)⁻¹ and per-factor damping
    (λ_A, λ_G) have neither, so a value other than the default would be silently unused.
    """
    check_choice(damping_mode, "damping_mode", DAMPING_MODES)
    if damping_mode == "factored":
        return
    bad = [f"{k}={v!r}" for k, v, d in (("pi", pi, PI), ("damping_split", damping_split,
                                                           DAMPING_SPLIT)) if v != d]
    if bad:
        raise ValueError(f"{' and '.join(bad)} set with damping_mode={damping_mode!r}, which "
                         f"does not use {'them' if len(bad) > 1 else 'it'}: π and the damping "
                         "split belong to factored damping. Pass damping_mode='factored' (if "
                         "your code damps each factor) or leave them at their defaults "
                         f"(pi={PI!r}, damping_split={DAMPING_SPLIT!r}).")


def check_kfac_damping(damping: Any, damping_mode: str) -> float | tuple[float, float]:
    """K-FAC's damping after checking ``damping_mode``: a float λ ≥ 0, or — for
    ``"per-factor"`` only — a pair (λ_A, λ_G) of floats ≥ 0 (a single λ means λ_A = λ_G = λ)."""
    check_choice(damping_mode, "damping_mode", DAMPING_MODES)
    if isinstance(damping, (tuple, list)):
        if damping_mode != "per-factor" or len(damping) != 2:
            raise ValueError("damping as a pair (λ_A, λ_G) needs damping_mode='per-factor'; "
                             f"got damping={damping!r} with damping_mode={damping_mode!r}.")
        return (check_nonnegative(damping[0], "damping[0] (λ_A)"),
                check_nonnegative(damping[1], "damping[1] (λ_G)"))
    return check_damping(damping)  # the one check of a scalar damping (refngd.backend)
