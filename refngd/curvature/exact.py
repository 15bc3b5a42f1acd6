"""The exact natural-gradient family as row curvatures c·UᵀU (docs/design.md §2).

=================================  =====================================  ==============
class                               rows s_nk (output space)                rows / sample
=================================  =====================================  ==============
:class:`Fisher`                     columns of S_n, S_n S_nᵀ = H_n          rank H_n
:class:`SampledFisher`              ∂ℓ(z_n, ŷ_nk)/∂z_n / √K                 K
:class:`EmpiricalFisher`            e_n = ∂l_n/∂z_n                         1
:class:`ImprovedEmpiricalFisher`    e_n / ‖e_n‖                             1
=================================  =====================================  ==============

Each row becomes u_nk = J_nᵀ s_nk, so F = c Σ_nk u_nk u_nkᵀ = c UᵀU.
"""
from __future__ import annotations

from ..options import CONVENTION, check_int
from ..backend import Array, as_generator, namespace
from .base import RowCurvature
from .kfac_factors import given_draws


class Fisher(RowCurvature):
    """The exact Fisher / generalised Gauss–Newton matrix (type-2 Fisher).

    F = c Σ_n J_nᵀ H_n J_n with H_n = ∂²l_n/∂z_n², realised with the M rows
    s_nk = F_n[:, k] of a factor F_n F_nᵀ = H_n, so that Σ_k s_nk s_nkᵀ = H_n
    (``loss.hessian_factor``).  M = C for MSE and BCE; for the cross-entropy M = C − 1,
    since H_n = diag(p) − p pᵀ has rank C − 1: 10 % fewer rows for C = 10, and a Gram
    matrix that is non-singular for generic data with N(C − 1) ≤ P, so that even the
    undamped natural gradient F⁺g exists on the Gram route.  For the
    softmax cross-entropy and the MSE (the negative log-likelihoods of a categorical and
    of a Gaussian with variance ½), and for the Bernoulli BCE, the Fisher of the model's
    predictive distribution equals this GGN (Martens 2020, "New insights and perspectives
    on the natural gradient method", §9.2).  F does not depend on the labels ``y``; given
    them, the cross-entropy's factor is the label-aligned one (``loss.hessian_factor(Z,
    y)``), whose rows contain each sample's gradient direction, so that
    :meth:`natural_gradient` writes the gradient in the rows without cancellation even
    where a sample's p_y is tiny.  The rows and K then depend on y; F, its products and
    its solves do not.
    """

    def __init__(self, model, theta, loss, X, y=None, linearization=None, params=None,
                 convention=CONVENTION):
        super().__init__(model, theta, loss, X, y, linearization, params, convention)

    def cotangents(self) -> Array:
        if self.y is None:
            return self.loss.hessian_factor(self.outputs).transpose(0, 2, 1)
        return self.loss.hessian_factor(self.outputs, self.y).transpose(0, 2, 1)

    def gradient_coefficients(self):
        """e_n = F_n a_n (+ r_n where a curvature underflowed): ``loss.gradient_in_factor``."""
        return self.loss.gradient_in_factor(self.outputs, self.y)


class SampledFisher(RowCurvature):
    """The Monte-Carlo (sampled) Fisher with K label samples per input.

    F̂ = c Σ_n (1/K) Σ_k ĝ_nk ĝ_nkᵀ, ĝ_nk = J_nᵀ ∂ℓ(z_n, ŷ_nk)/∂z_n, ŷ_nk ~ p(y | z_n)
    (Martens 2020, eq. 13; Kunstner et al. 2019, §3).  Unbiased for the Fisher:
    E[F̂] = F, with entrywise standard error O(1/√(N K)).  Rows are scaled by 1/√K so
    that F̂ = c UᵀU exactly.  ``rng`` (a NumPy Generator or an int seed) is required —
    unless ``labels`` gives the sampled targets ŷ_nk (another implementation's draws, leading
    shape (N, K); :func:`~refngd.curvature.kfac_factors.given_draws`), which are used instead.
    """

    def __init__(self, model, theta, loss, X, y=None, mc_samples: int = 1, rng=None,
                 linearization=None, params=None, convention=CONVENTION, labels=None):
        self.mc_samples = check_int(mc_samples, "mc_samples")
        self.rng = as_generator(rng) if labels is None else None
        self._labels = labels
        super().__init__(model, theta, loss, X, y, linearization, params, convention)

    def cotangents(self) -> Array:
        #: the sampled targets ŷ_nk, leading shape (N, K)
        if self._labels is not None:
            self.sampled_targets = given_draws(self.loss, self.outputs, self._labels)
            self.mc_samples = int(self.sampled_targets.shape[1])
        else:
            self.sampled_targets = self.loss.sample_targets(self.outputs, self.rng,
                                                            self.mc_samples)
        E = self.loss.output_gradients_at(self.outputs, self.sampled_targets)
        return E / self.mc_samples ** 0.5

    def gradient_coefficients(self):
        """Where a sample's drawn label equals its observed one, that row *is* its EF row.

        Then e_n = √K · s_nk exactly (a_nk = √K for the first such k, r_n = 0) and the
        sample's share of g lies in the rows' span; otherwise r_n = e_n.
        """
        xp = namespace(self.outputs)
        Yhat = self.sampled_targets
        N = Yhat.shape[0]
        # the observed targets in the layout of one draw (a sequence loss's (N, T, …))
        y = self.loss.check_targets(self.outputs, self.y).reshape((N,) + tuple(Yhat.shape[2:]))
        same = Yhat == y[:, None]
        if same.ndim > 2:
            same = xp.all(same.reshape(same.shape[0], same.shape[1], -1), axis=2)
        first = same & (xp.cumsum(same, axis=1) == 1)                  # (N, K)
        a = first.astype(self.outputs.dtype) * self.mc_samples ** 0.5
        e = self.loss.output_gradient(self.outputs, self.y)
        r = xp.where(xp.any(same, axis=1)[:, None], 0, e)
        return a, r


class EmpiricalFisher(RowCurvature):
    """The empirical Fisher F̃ = c Σ_n g_n g_nᵀ, g_n = J_nᵀ e_n (one row per sample).

    Not a Fisher: it uses the observed labels instead of the model's (Kunstner et al.
    2019, "Limitations of the empirical Fisher approximation", eq. 5).
    """

    label_based = True

    def cotangents(self) -> Array:
        e = self.loss.output_gradient(self.outputs, self.y)
        if self.convention.ef_rows == "token":  # one row per token term (refngd.conventions)
            return self.loss.split_tokens(e)
        return e[:, None, :]

    def gradient_coefficients(self):
        """The rows are the e_n themselves (or their token blocks, which sum to e_n): a = 1,
        r = 0."""
        xp = namespace(self.outputs)
        N = self.outputs.shape[0]
        K = self.loss.tokens_per_sample if self.convention.ef_rows == "token" else 1
        return xp.ones((N, K), dtype=self.outputs.dtype), xp.zeros_like(self.outputs)


class ImprovedEmpiricalFisher(RowCurvature):
    """The improved empirical Fisher F̃* = c Σ_n g_n g_nᵀ / ‖e_n‖² (Wu et al. 2024, eq. 14).

    One row per sample, s_n = e_n / ‖e_n‖.  A perfectly learnt sample (e_n = 0, so
    g_n = 0) contributes nothing: its row is set to 0 rather than 0/0.
    """

    label_based = True

    def cotangents(self) -> Array:
        xp = namespace(self.outputs)
        e = self.loss.output_gradient(self.outputs, self.y)
        norm = xp.sqrt((e * e).sum(axis=1, keepdims=True))
        safe = xp.where(norm > 0, norm, 1)
        return (xp.where(norm > 0, e / safe, 0))[:, None, :]

    def gradient_coefficients(self):
        """e_n = ‖e_n‖ · (e_n/‖e_n‖): a_n = ‖e_n‖ (0 for a zero row), r = 0."""
        xp = namespace(self.outputs)
        e = self.loss.output_gradient(self.outputs, self.y)
        return xp.sqrt((e * e).sum(axis=1, keepdims=True)), xp.zeros_like(e)

    def output_grad_sq_norms(self) -> Array:
        """s_n = ‖e_n‖² (N,), the right-hand side of the iEF update (Wu et al. 2024, eq. 8)."""
        e = self.loss.output_gradient(self.outputs, self.y)
        return (e * e).sum(axis=1)
