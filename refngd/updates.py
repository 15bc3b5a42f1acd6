"""Update directions of the natural-gradient family, one paper equation each.

Every function is called as ``f(model, theta, loss, X, y, ...)`` and returns a (P,)
direction d with the sign of the gradient, approximating F⁻¹ g: a step is θ − lr·d.
Pass ``linearization=model.linearize(theta, X)`` to several of them to share one forward
pass.  ``params=`` restricts every update to a parameter subset S (docs/subsets.md;
``None``: the model's trainable parameters): the direction is then (F[S, S] + λI)⁻¹ g[S],
a vector of length |S| in θ's order — step with ``theta[mask] -= lr * d``, or
``theta - lr * subset.embed(d)`` for ``subset = refngd.subsets.resolve_params(model, mask)``.
``convention=`` (:mod:`refngd.conventions`) computes a library's update: its α scales
the curvature and the gradient alike (the paper-defined ``form="gram"`` has no c and is
unaffected, except under a convention with ``gram_rows="c*g_n"`` — rows of the reduced
loss, as the iEF authors' code back-propagates them: then Δ_EF/c and c·Δ_iEF at λ/c²).

Two dampings for EF and iEF (``form=``)
---------------------------------------
With G = [g_1 … g_N]ᵀ the per-sample gradients of the *unreduced* losses, F̃ = c GᵀG and
g = c Gᵀ1:

* ``"gram"`` (the default): the paper's form (Wu et al. 2024, eq. 5 and 8)
  Gᵀ(GGᵀ + λI)⁻¹ 1 for EF, Gᵀ(GGᵀ + λI)⁻¹ s with s_n = ‖e_n‖² for iEF — damping added
  to the N × N Gram matrix.  The same default as :class:`refngd.optim.EF` / ``IEF`` and
  ``refngd compare``.
* ``"tikhonov"``: (F̃ + λI)⁻¹ g — damping added to the P × P matrix (Wu et al. 2024,
  eq. 4), as for every other curvature's ``solve``.

By the push-through identity (cGᵀG + λI)⁻¹ cGᵀ = Gᵀ(GGᵀ + (λ/c) I)⁻¹, so for EF the two
forms coincide when λ_gram = λ_tikhonov / c.  For iEF the Tikhonov form equals
Gᵀ(GGᵀ + (λ/c)·diag(s))⁻¹ s: the paper's form damps every sample equally, the Tikhonov
form in proportion to ‖e_n‖².  Undamped (λ → 0) both give the minimum-norm solutions
G Δ = 1 (EF) and G Δ = s (iEF): every sample's loss changes by 1, resp. ‖e_n‖², to first
order.  docs/empirical_fisher.md derives this.
"""
from __future__ import annotations

from .backend import Array, PSDFactor, check_damping, host_values, namespace, one_host_read
from .curvature import EmpiricalFisher, Fisher, ImprovedEmpiricalFisher, SampledFisher
from .derivatives import gradient_from
from .losses.base import check_loss
from .nn.protocols import linearization_for
from .nn.subsets import resolve_params
from .options import (BIAS, CONVENTION, DAMPING_MODE, DAMPING_SPLIT, FISHER_TYPE, FORM, FORMS,
                      KFAC_APPROX_DEFAULT, PI, BiasMode, DampingMode, DampingSplit, FisherType,
                      Form, KfacApprox, Pi, check_choice)


def _lin(model, theta, X, linearization, loss=None):
    """The checked linearisation of every update (:func:`refngd.nn.protocols.linearization_for`)."""
    if loss is not None:
        check_loss(loss)
    return linearization_for(model, theta, X, linearization)


@one_host_read
def sgd(model, theta: Array, loss, X: Array, y: Array, linearization=None, params=None) -> Array:
    """The plain gradient g = c Σ_n J_nᵀ e_n (the baseline every method is compared with)."""
    return gradient_from(_lin(model, theta, X, linearization), loss, y,
                         params=resolve_params(model, params))


@one_host_read
def ngd(model, theta: Array, loss, X: Array, y: Array, damping: float, linearization=None,
        params=None, convention=CONVENTION) -> Array:
    """Exact damped natural gradient d = (F + λI)⁻¹ g (Amari 1998; Martens 2020, eq. 8).

    F is the exact Fisher / GGN (:class:`refngd.curvature.Fisher`).  The gradient lies in
    the span of its rows, g = Uᵀ(c·a), so d = Uᵀ(K + (λ/c)I)⁻¹a on the R × R Gram matrix
    K (push-through; :meth:`~refngd.curvature.base.RowCurvature.natural_gradient`): as
    accurate as K for every λ ≥ 0, and λ = 0 gives the minimum-norm F⁺g.
    """
    lin = _lin(model, theta, X, linearization)
    F = Fisher(model, theta, loss, X, y, linearization=lin, params=params, convention=convention)
    return F.natural_gradient(damping)


@one_host_read
def sf(model, theta: Array, loss, X: Array, y: Array, damping: float, mc_samples: int = 1,
       rng=None, linearization=None, params=None, convention=CONVENTION) -> Array:
    """Sampled-Fisher natural gradient d = (F̂ + λI)⁻¹ g with K = ``mc_samples`` labels per input.

    F̂ is :class:`refngd.curvature.SampledFisher` (Martens 2020, eq. 13); ``rng`` required.
    """
    lin = _lin(model, theta, X, linearization)
    F = SampledFisher(model, theta, loss, X, y, mc_samples=mc_samples, rng=rng, linearization=lin,
                      params=params, convention=convention)
    return F.natural_gradient(damping)


def _gram_form(F: EmpiricalFisher, rhs: Array, damping: float) -> Array:
    """Gᵀ (G Gᵀ + λI)⁻¹ rhs for the EF rows G (Wu et al. 2024, eq. 5 / eq. 8).

    Always the N × N system, whatever P: it is the paper's definition.
    """
    lam = check_damping(damping)
    w = PSDFactor(F.gram(), shift=lam, projected=True).solve(rhs)
    return F.rows.rmatvec(w.reshape(-1, 1).astype(F.dtype, copy=False))


def _gram_row_scale(convention, loss, Z) -> float:
    """k with the Gram form's rows k·g_n: 1, or c under ``gram_rows="c*g_n"``.

    With rows J = k·G (and iEF's targets ‖k·e_n‖² = k²s), Jᵀ(JJᵀ + λI)⁻¹ t is
    (1/k)·Gᵀ(GGᵀ + (λ/k²) I)⁻¹ t for EF (t = 1) and k·Gᵀ(GGᵀ + (λ/k²) I)⁻¹ s for iEF.
    """
    from .conventions import get

    return float(loss.scale(Z)) if get(convention).gram_rows == "c*g_n" else 1.0


def _sq_norms(e: Array) -> Array:
    return (e * e).sum(axis=1)


@one_host_read
def ef(model, theta: Array, loss, X: Array, y: Array, damping: float, form: Form = FORM,
       linearization=None, params=None, convention=CONVENTION) -> Array:
    """Empirical-Fisher update (Kunstner et al. 2019, eq. 5; Wu et al. 2024, eq. 4 and 5).

    ``form="gram"`` (default, the paper's): Δ_EF = Gᵀ(GGᵀ + λI)⁻¹ 1.
    ``form="tikhonov"``: (F̃ + λI)⁻¹ g.
    See the module docstring for the relation between the two.
    """
    _check_form(form)
    lin = _lin(model, theta, X, linearization, loss)
    F = EmpiricalFisher(model, theta, loss, X, y, linearization=lin, params=params,
                        convention=convention)
    xp = namespace(lin.outputs)
    if form == "gram":  # one 1 per row (per token under a convention with ef_rows="token")
        k = _gram_row_scale(convention, loss, lin.outputs)
        return _gram_form(F, xp.ones(F.rows.R, dtype=xp.float64), check_damping(damping) / k ** 2) / k
    # g = c Σ_n g_n = Uᵀ(c·1): the gradient lies in the rows' span (push-through solve)
    return F.natural_gradient(damping)


@one_host_read
def ief(model, theta: Array, loss, X: Array, y: Array, damping: float, form: Form = FORM,
        linearization=None, params=None, convention=CONVENTION) -> Array:
    """Improved-empirical-Fisher update (Wu et al. 2024, eq. 8; the iEF matrix is eq. 14).

    ``form="gram"`` (default, the paper's): Δ_iEF = Gᵀ(GGᵀ + λI)⁻¹ s, s_n = ‖e_n‖².
    ``form="tikhonov"``: (F̃* + λI)⁻¹ g with F̃* = c Σ g_n g_nᵀ/‖e_n‖².
    See the module docstring for the relation between the two.
    """
    _check_form(form)
    lin = _lin(model, theta, X, linearization, loss)
    e = loss.output_gradient(lin.outputs, y)
    if form == "gram":
        F = EmpiricalFisher(model, theta, loss, X, y, linearization=lin, params=params)
        k = _gram_row_scale(convention, loss, lin.outputs)
        return _gram_form(F, _sq_norms(e), check_damping(damping) / k ** 2) * k
    F = ImprovedEmpiricalFisher(model, theta, loss, X, y, linearization=lin, params=params,
                                convention=convention)
    # rows g_n/‖e_n‖, so g = c Σ_n g_n = Uᵀ(c‖e_n‖) (a zero row carries weight 0)
    return F.natural_gradient(damping)


def _check_form(form: str) -> None:
    check_choice(form, "form", FORMS)


# --------------------------------------------------------------------------- K-FAC family
from .curvature import EKFAC, KFAC  # noqa: E402  (kept beside the functions that use it)


def _kronecker_gradient(F, lin, loss, y) -> Array:
    """The gradient that a K-FAC / EKFAC update preconditions, c Σ_n J_nᵀ e_n (c with α).

    Type-2 rows are the columns of the output Hessian's factor F_n, and e_n = F_n a_n
    (``loss.gradient_in_factor``), so g = c Uᵀa comes from the rows already
    back-propagated for the factors: no second backward pass.  A residual r_n ≠ 0 (a
    curvature that underflowed, docs/fisher.md) or another Fisher type: the gradient's
    own backward pass.
    """
    if F.fisher_type == "type-2":
        a, r = loss.gradient_in_factor(lin.outputs, y)
        xp = namespace(a)
        if a.shape[1] == F.rows.K and not host_values(xp.any(r != 0))[0]:
            return F.c * F.rows.rmatvec(a.astype(F.dtype, copy=False))
    return gradient_from(lin, loss, y, params=F.subset) * (F.c / float(loss.scale(lin.outputs)))


@one_host_read
def kfac(model, theta: Array, loss, X: Array, y: Array, damping: float, fisher_type: FisherType = FISHER_TYPE,
         mc_samples: int = 1, rng=None, kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT, bias: BiasMode = BIAS,
         damping_mode: DampingMode = DAMPING_MODE, linearization=None, params=None,
         convention=CONVENTION, pi: Pi = PI, damping_split: DampingSplit = DAMPING_SPLIT,
         labels=None) -> Array:
    """K-FAC update d = (F_KFAC + λI)⁻¹ g (Martens & Grosse 2015, §3–4 and §6.3).

    F_KFAC is :class:`refngd.curvature.KFAC` (block-diagonal, G ⊗ A per layer; docs/kfac.md).
    ``damping_mode="tikhonov"`` damps every block exactly, (G ⊗ A + λI)⁻¹;
    ``"factored"`` uses Martens & Grosse's (G + √λ/π I)⁻¹ ⊗ (A + π√λ I)⁻¹ (π by ``pi``:
    ``"trace"`` or a number; ``damping_split="locations"``: (G + √(λT)/π I)⁻¹ ⊗
    (A + π√(λ/T) I)⁻¹ for T positions sharing a weight); ``"per-factor"``
    (G + λ_G I)⁻¹ ⊗ (A + λ_A I)⁻¹ with ``damping`` = λ (on each factor) or (λ_A, λ_G) —
    :meth:`refngd.curvature.KFAC.solve`.
    ``convention`` selects a library's factors and loss scaling (:mod:`refngd.conventions`).
    ``labels``: the sampled targets of ``fisher_type="mc"`` instead of drawing them.
    """
    lin = _lin(model, theta, X, linearization)
    F = KFAC(model, theta, loss, X, y, fisher_type=fisher_type, mc_samples=mc_samples, rng=rng,
             kfac_approx=kfac_approx, bias=bias, linearization=lin, params=params,
             convention=convention, labels=labels)
    return F.solve(_kronecker_gradient(F, lin, loss, y), damping, damping_mode=damping_mode,
                   pi=pi, damping_split=damping_split)


@one_host_read
def ekfac(model, theta: Array, loss, X: Array, y: Array, damping: float, fisher_type: FisherType = FISHER_TYPE,
          mc_samples: int = 1, rng=None, kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT, bias: BiasMode = BIAS,
          linearization=None, params=None, convention=CONVENTION,
          damping_mode: DampingMode = DAMPING_MODE, pi: Pi = PI,
          damping_split: DampingSplit = DAMPING_SPLIT, labels=None) -> Array:
    """EKFAC update d = (Q diag(s) Qᵀ + λI)⁻¹ g (George et al. 2018, §3).

    Q = U_G ⊗ U_A is K-FAC's eigenbasis and s the second moments of the per-row
    gradients in it (:class:`refngd.curvature.EKFAC`).  ``damping_mode`` ``"factored"`` /
    ``"per-factor"`` (with ``pi``, ``damping_split``) add K-FAC's factor-damping term
    instead of λI: eigenvalues s_ij + γ_A g_i + γ_G a_j + γ_A γ_G
    (:meth:`refngd.curvature.EKFAC.solve`).  ``labels`` as :func:`kfac`.
    """
    lin = _lin(model, theta, X, linearization)
    F = EKFAC(model, theta, loss, X, y, fisher_type=fisher_type, mc_samples=mc_samples, rng=rng,
              kfac_approx=kfac_approx, bias=bias, linearization=lin, params=params,
              convention=convention, labels=labels)
    return F.solve(_kronecker_gradient(F, lin, loss, y), damping, damping_mode=damping_mode,
                   pi=pi, damping_split=damping_split)
