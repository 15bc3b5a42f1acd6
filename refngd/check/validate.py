"""``validate``: build refngd's twin of a model, compute a quantity, compare a candidate."""
from __future__ import annotations

from typing import Any

from .. import conventions
from ..options import (BIAS, CONVENTION, DAMPING_MODE, FISHER_TYPE, FORM, KFAC_APPROX_DEFAULT,
                       BiasMode, DampingMode, FisherType, Form, KfacApprox)
from ..backend import namespace
from .report import Report, compare
from .quantities import QUANTITIES, Twin, mc_tolerance, reference


def _prefixes_from_torch(module) -> list:
    """Names of the parametric layers ("0", "2.1", ...) from ``named_parameters``."""
    out = []
    for name, _ in module.named_parameters():
        prefix = name.rsplit(".", 1)[0]
        if not out or out[-1] != prefix:
            out.append(prefix)
    return out


def _as_array(a):
    if a is None or not hasattr(a, "detach"):
        return a
    from .interop import to_array

    return to_array(a)


def make_twin(model, loss, X, y, convention=CONVENTION, **options) -> Twin:
    """A :class:`Twin` from a torch model (or a ``(refngd model, θ)`` pair) and a loss.

    ``model``: a ``torch.nn.Module`` (converted by :func:`refngd.interop.from_torch`; with
    X as its example batch where a symbolic trace cannot import it, as for the models of
    transformers) or a pair (refngd ``Sequential``, θ).  ``loss``: a torch loss module or a refngd loss.
    """
    if isinstance(model, tuple):
        ours, theta = model
        prefixes = [str(i) for i, (a, b) in enumerate(ours.slices) if b > a]
    else:
        from .interop import UnsupportedModuleError, from_torch

        try:
            ours, theta = from_torch(model)
        except UnsupportedModuleError:  # a model that reads its input's shape: X as example
            ours, theta = from_torch(model, X)
        prefixes = _prefixes_from_torch(model)
    if not hasattr(loss, "hessian_factor"):
        from .interop import from_torch_loss

        loss = from_torch_loss(loss)
    # The reference is computed in float64 whatever the model's dtype: a float32 candidate is
    # judged against exact numbers with a float32 tolerance, not against float32 round-off.
    theta = theta.astype(namespace(theta).float64, copy=False)
    X, y = _as_array(X), _as_array(y)
    if "v" in options:
        options["v"] = _as_array(options["v"])
    return Twin(ours, theta, loss, X, y, conventions.get(convention), prefixes, options)


def validate(model, loss, X, y, quantity: str, candidate: Any, convention: str = "refngd", *,
             rtol: float | None = None, damping: float | None = None, v=None, mc_samples: int = 1,
             fisher_type: FisherType = FISHER_TYPE, kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT,
             bias: BiasMode = BIAS, damping_mode: DampingMode = DAMPING_MODE,
             form: Form = FORM, rng=0) -> Report:
    """Compare a candidate ``quantity`` with refngd's value for the same model and batch.

    Parameters
    ----------
    model : a ``torch.nn.Sequential`` (or a ``(refngd.nn.Sequential, θ)`` pair).
    loss : ``torch.nn.CrossEntropyLoss`` / ``MSELoss`` / ``BCEWithLogitsLoss`` (or a refngd loss).
    X, y : the batch (NumPy arrays or torch tensors).
    quantity : one of ``refngd.check.QUANTITIES``: ``per_sample_gradients`` (N, P),
        ``gradient`` (P,), ``fisher``/``ggn``, ``empirical_fisher``, ``ief``, ``kfac``,
        ``ekfac``, ``sampled_fisher`` (P, P), ``fisher_diagonal``, ``fisher_matvec`` (P,),
        ``kfac_factors`` (a dict ``{"<layer>.A": A, "<layer>.G": G}``, layer names as in
        ``named_parameters``), ``ngd_update``, ``ef_update``, ``ief_update``,
        ``kfac_update``, ``ekfac_update`` (P,; need ``damping``), ``gamma`` (a float:
        γ(v) = √(vᵀFv)/|vᵀg| of Wu et al. 2024, eq. 15, for the direction ``v``).
    candidate : your value (NumPy, CuPy or torch), θ in ``parameters_to_vector`` order.
    convention : a preset of :mod:`refngd.conventions` — the library you mean to match.
    rtol : tolerance on the relative error; default by the candidate's dtype (1e-10
        float64, 1e-4 float32 — the reference itself is always computed in float64),
        for ``sampled_fisher`` from the spread of refngd's own estimates at this N and K.
    damping, v, mc_samples, fisher_type, kfac_approx, bias, damping_mode, form, rng :
        the options your code used (refngd's names; see :class:`refngd.curvature.KFAC`).

    Returns
    -------
    :class:`refngd.check.Report` (``passed``, ``diagnosis``, ``str()``).
    """
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}.")
    twin = make_twin(model, loss, X, y, convention, damping=damping, v=v, mc_samples=mc_samples,
                     fisher_type=fisher_type, kfac_approx=kfac_approx, bias=bias,
                     damping_mode=damping_mode, form=form, rng=rng)
    return check_twin(twin, quantity, candidate, rtol=rtol)


def check_twin(twin: Twin, quantity: str, candidate, rtol: float | None = None) -> Report:
    """:func:`validate` on an existing :class:`Twin` (the CLI builds one from files)."""
    ref, alts, blocked = reference(twin, quantity)
    reason = None
    if quantity == "sampled_fisher" and rtol is None:
        rtol, reason = mc_tolerance(twin)
    blocks = twin.param_blocks() if blocked and len(twin.param_blocks()) > 1 else None
    report = compare(_as_array(candidate) if hasattr(candidate, "detach") else candidate, ref,
                     blocks=blocks, rtol=rtol, context=twin.context(), layouts=twin.layouts(),
                     alternatives=alts, quantity=f"{quantity} ({twin.convention.name} convention)",
                     rtol_reason=reason)
    return report
