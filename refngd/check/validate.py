"""``validate``: build refngd's twin of a model, compute a quantity, compare a candidate."""
from __future__ import annotations

from typing import Any

from .. import conventions
from ..options import (BIAS, CONVENTION, DAMPING_MODE, DAMPING_SPLIT, FISHER_TYPE, FORM,
                       KFAC_APPROX_DEFAULT, PI, BiasMode, DampingMode, DampingSplit, FisherType,
                       Form, KfacApprox, Pi, check_unused_damping_options)
from ..backend import namespace
from .montecarlo import expectation, mc_block_tolerances, scale_test, statistical
from .report import Report, compare
from .quantities import QUANTITIES, Twin, mc_tolerance, reference
from .weights import stale_weights_note, theta_from


def _prefixes_from_torch(module, ours) -> list:
    """The PyTorch name of each of ``ours``' layers with parameters ("0", "2.1", ...).

    A layer's name is the common dotted prefix of the ``named_parameters`` that fill its
    slice of θ: "3" for "3.weight" and "3.bias", "1" for a Transformer layer's
    "1.self_attn.in_proj_weight", ..., "1.norm2.bias" (one refngd layer, many tensors).
    """
    named, start = [], 0
    for name, p in module.named_parameters():
        named.append((name, start))
        start += p.numel()
    out, first = [], []
    for a, b in ours.layout.layer_slices:
        if b == a:
            continue
        parts = [name.split(".") for name, s in named if a <= s < b]
        common = parts[0][:-1] if parts else []
        for q in parts[1:]:
            k = 0
            while k < min(len(common), len(q) - 1) and common[k] == q[k]:
                k += 1
            common = common[:k]
        out.append(".".join(common) if common else (".".join(parts[0][:-1]) if parts else str(a)))
        first.append(".".join(parts[0]) if parts else str(a))
    # layers of parameters held by one module (F.linear(x, self.W1, self.b1), ...) share
    # its prefix: each is then named by its first tensor ("W1"), never two by one name
    return [f if out.count(n) > 1 else n for n, f in zip(out, first)]


def _as_array(a):
    if a is None or not hasattr(a, "detach"):
        return a
    from .interop import to_array

    return to_array(a)


def make_twin(model, loss, X, y, convention=CONVENTION, theta=None, **options) -> Twin:
    """A :class:`Twin` from a torch model (or a ``(refngd model, θ)`` pair) and a loss.

    ``model``: a ``torch.nn.Module`` (converted by :func:`refngd.interop.from_torch`; with
    X as its example batch where a symbolic trace cannot import it, as for the models of
    transformers) or a pair (refngd ``Sequential``, θ).  ``loss``: a torch loss module or a
    refngd loss.  ``theta``: the weights to use instead of the module's (or the pair's) — a
    (P,) vector in ``parameters_to_vector`` order or a ``state_dict``
    (:func:`refngd.check.weights.theta_from`).
    """
    if isinstance(model, tuple):
        ours, current = model
        prefixes = [str(i) for i, (a, b) in enumerate(ours.slices) if b > a]
        names = ours.layout.keys()
    else:
        from .interop import UnsupportedModuleError, from_torch

        try:
            ours, current = from_torch(model)
        except UnsupportedModuleError:  # a model that reads its input's shape: X as example
            ours, current = from_torch(model, X)
        prefixes = _prefixes_from_torch(model, ours)
        names = [n for n, _ in model.named_parameters()]
    theta = current if theta is None else theta_from(theta, names, ours, current)
    if not hasattr(loss, "hessian_factor"):
        from .interop import from_torch_loss

        loss = from_torch_loss(loss)
    # The reference is computed in float64 whatever the model's dtype: a float32 candidate is
    # judged against exact numbers with a float32 tolerance, not against float32 round-off.
    theta = theta.astype(namespace(theta).float64, copy=False)
    X, y = _as_array(X), _as_array(y)
    for key in ("v", "labels"):
        if key in options:
            options[key] = _as_array(options[key])
    return Twin(ours, theta, loss, X, y, conventions.get(convention), prefixes, options)


def validate(model, loss, X, y, quantity: str, candidate: Any, convention: str = "refngd", *,
             rtol: float | None = None, damping: float | None = None, v=None, mc_samples: int = 1,
             fisher_type: FisherType = FISHER_TYPE, kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT,
             bias: BiasMode = BIAS, damping_mode: DampingMode = DAMPING_MODE,
             form: Form = FORM, rng=0, pi: Pi = PI, damping_split: DampingSplit = DAMPING_SPLIT,
             labels=None, theta=None, **unknown) -> Report:
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
    damping, v, mc_samples, fisher_type, kfac_approx, bias, damping_mode, form, rng, pi,
    damping_split : the options your code used (refngd's names; see
        :class:`refngd.curvature.KFAC` and :meth:`~refngd.curvature.KFAC.solve`).  ``damping``
        is λ, or (λ_A, λ_G) with ``damping_mode="per-factor"``.
    labels : the targets your code *sampled* for a Monte-Carlo quantity
        (``fisher_type="mc"``, ``sampled_fisher``), shape (N, K) (one draw: (N,)); refngd
        then uses the same draws and the comparison is exact.  Without them a Monte-Carlo
        K-FAC quantity is compared with its expectation (the type-2 rows) within a
        tolerance per block derived from refngd's own estimates at this N and K
        (:mod:`refngd.check.montecarlo`; the report states it).
    theta : the weights the candidate was computed at — a (P,) vector in
        ``parameters_to_vector`` order or a ``state_dict`` — instead of the module's
        current weights.  Take the candidate *before* ``optimizer.step()`` (which moves
        them), or pass ``theta=`` the state saved then (docs/validating.md).

    Returns
    -------
    :class:`refngd.check.Report` (``passed``, ``diagnosis``, ``str()``).
    """
    if unknown:
        raise TypeError(_unknown_keywords(unknown))
    if quantity not in QUANTITIES:
        raise ValueError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}.")
    check_unused_damping_options(damping_mode, pi, damping_split)
    twin = make_twin(model, loss, X, y, convention, theta=theta, damping=damping, v=v,
                     mc_samples=mc_samples, fisher_type=fisher_type, kfac_approx=kfac_approx,
                     bias=bias, damping_mode=damping_mode, form=form, rng=rng, pi=pi,
                     damping_split=damping_split, labels=labels)
    report = check_twin(twin, quantity, candidate, rtol=rtol)
    if not report.passed and theta is None and not isinstance(model, tuple):
        note = stale_weights_note(model, twin)
        if note:
            report.notes.append(note)
    return report


def _unknown_keywords(unknown: dict) -> str:
    """The message for keywords ``validate`` does not take, with the nearest valid names."""
    import difflib
    import inspect

    valid = [k for k, p in inspect.signature(validate).parameters.items()
             if p.kind is p.KEYWORD_ONLY or (p.default is not p.empty and
                                              p.kind is not p.VAR_KEYWORD)]
    hints = []
    for k in unknown:
        near = difflib.get_close_matches(k, valid, n=2, cutoff=0.5) or \
            [v for v in valid if v.startswith(k) or k.startswith(v)][:2]
        hints.append(f"{k!r}" + (f" (did you mean {' or '.join(map(repr, near))}?)"
                                  if near else ""))
    return (f"validate() does not take the keyword(s) {', '.join(hints)}; its keywords are "
            f"{', '.join(valid)}.")


def check_twin(twin: Twin, quantity: str, candidate, rtol: float | None = None) -> Report:
    """:func:`validate` on an existing :class:`Twin` (the CLI builds one from files)."""
    # a Monte-Carlo K-FAC quantity without the candidate's draws: against its expectation
    stat = statistical(twin, quantity)
    ref, alts, blocked = reference(expectation(twin) if stat else twin, quantity)
    reason, block_rtol, scales = None, None, None
    if quantity == "sampled_fisher" and rtol is None and twin.options.get("labels") is None:
        rtol, reason = mc_tolerance(twin)
    blocks = twin.param_blocks() if blocked and len(twin.param_blocks()) > 1 else None
    if stat and rtol is None:
        block_rtol, reason, scales = mc_block_tolerances(twin, quantity, ref, blocks)
    if hasattr(candidate, "detach"):
        from .torch_arrays import no_numpy_dtype

        no_numpy_dtype(candidate, "candidate")
        candidate = _as_array(candidate)
    report = compare(candidate, ref,
                     blocks=blocks, rtol=rtol, context=twin.context(), layouts=twin.layouts(),
                     alternatives=alts, quantity=f"{quantity} ({twin.convention.name} convention)",
                     rtol_reason=reason, block_rtol=block_rtol)
    if scales is not None:  # a wrong scale hides in an MC update's direction noise
        scale_test(report, candidate, ref, blocks, scales)
    return report
