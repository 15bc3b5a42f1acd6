"""Per-sample losses with their output gradients, Hessians, Hessian factors and sampling.

Notation follows docs/design.md §2: ``Z`` is the (N, C) matrix of model outputs z_n, l_n is
the per-sample loss (never reduced), and the batch loss is L = c Σ_n l_n.

=================  ===============================  ===================  ====================
loss               l_n                              e_n = ∂l_n/∂z_n      H_n = ∂²l_n/∂z_n²
=================  ===============================  ===================  ====================
``CrossEntropy``   logsumexp(z_n) − z_n[y_n]        p_n − onehot(y_n)    diag(p_n) − p_n p_nᵀ
``MSELoss``        Σ_c (z_nc − y_nc)²               2 (z_n − y_n)        2 I
``BCEWithLogits``  Σ_c softplus(z_nc) − y_nc z_nc   σ(z_n) − y_n         diag(σ(z_n)(1 − σ(z_n)))
=================  ===============================  ===================  ====================

with p_n = softmax(z_n) and σ the logistic function.  The factors S_n with
S_n S_nᵀ = H_n are diag(√p_n) − p_n √p_nᵀ, √2·I and diag(√(σ(1 − σ))).

The constant c
--------------
``reduction="sum"`` gives c = 1.  ``reduction="mean"`` gives c = 1/N for ``CrossEntropy``
and c = 1/(N·C) for ``MSELoss`` and ``BCEWithLogits``, because PyTorch averages those two
over *all* N·C elements.  With these c, ``loss(Z, y)`` equals ``torch.nn.CrossEntropyLoss``,
``torch.nn.MSELoss`` and ``torch.nn.BCEWithLogitsLoss`` (same ``reduction``) exactly; c
multiplies the loss, the gradient and every curvature matrix alike.

The factor 2 of the MSE
-----------------------
PyTorch's ``MSELoss`` has no ½, so e_n = 2(z_n − y_n) and H_n = 2I.  This l_n is, up to an
additive constant, the negative log-likelihood of a Gaussian N(z_n, ½·I); that is the
distribution ``MSELoss.sample_targets`` draws from, so the Fisher equals the GGN.

Fisher = GGN
------------
All three losses are negative log-likelihoods of exponential families in their natural
parameters z_n (categorical, Gaussian with fixed variance ½, independent Bernoulli).  For
such losses E_{ŷ ~ p(y|z_n)}[e_n(ŷ) e_n(ŷ)ᵀ] = H_n, so the Fisher equals the generalised
Gauss-Newton matrix (Martens, 2020, "New insights and perspectives on the natural gradient
method", JMLR 21(146)).  ``sampled_output_gradients`` draws the ŷ whose output
gradients give the Monte-Carlo (sampled) Fisher.

All arrays returned have the array module (NumPy or CuPy) and the float dtype of ``Z``;
random numbers come from a host ``numpy.random.Generator`` and are moved to ``Z``'s device.
"""
from __future__ import annotations

import math
from typing import Any

from . import softmax_factors
from .backend import Array, check_float_array, namespace, require, to_device

__all__ = ["CrossEntropy", "MSELoss", "BCEWithLogits"]

_REDUCTIONS = ("mean", "sum")


class _Loss:
    """Shared validation and public API.

    Subclasses define the formulas on validated inputs: ``_check_y``, ``_per_sample``,
    ``_gradient`` (which must broadcast over rows, as ``sampled_output_gradients`` calls
    it on N·K rows), ``_hessian``, ``_sqrt`` and ``_sample``; and, for the exact natural
    gradient in row space, ``_gradient_in_factor`` (the default puts all of e_n in the
    residual r_n, which is correct but solved by the Woodbury route).
    """

    def _gradient_in_factor(self, Z: Array, y: Array):
        """Default: a_n = 0, r_n = e_n (no closed form known for this loss)."""
        xp = namespace(Z)
        M = self.hessian_factor(Z).shape[2]
        return xp.zeros((Z.shape[0], M), dtype=Z.dtype), self._gradient(Z, y)

    name: str = ""
    _per_element_mean: bool = False  # True: `mean` divides by N·C, else by N

    def __init__(self, reduction: str = "mean") -> None:
        if reduction not in _REDUCTIONS:
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_Z(Z: Array) -> Array:
        check_float_array("Z", Z, ndim=2)
        N, C = Z.shape
        if N < 1 or C < 1:
            raise ValueError(f"Z must have shape (N, C) with N >= 1 and C >= 1, got {Z.shape}.")
        return Z

    def check_targets(self, Z: Array, y: Any) -> Array:
        """Validate ``Z`` and the targets ``y``; return ``y`` on ``Z``'s device.

        Raises
        ------
        TypeError
            ``Z`` not a float array, or ``y`` of the wrong dtype.
        ValueError
            ``Z`` not 2-D or not finite, batch size or shape mismatch, targets out of range.
        """
        self._check_Z(Z)
        y = to_device(y, like=Z)
        if y.ndim < 1 or y.shape[0] != Z.shape[0]:
            raise ValueError(
                f"batch size mismatch: Z has N = {Z.shape[0]} rows but y has shape "
                f"{tuple(y.shape)}; pass one target per row of Z."
            )
        return self._check_y(Z, y)

    @staticmethod
    def _check_float_targets(Z: Array, y: Array) -> Array:
        """Shared check of (N, C) float targets (MSE, BCE); casts to ``Z.dtype``."""
        N, C = Z.shape
        if tuple(y.shape) != (N, C):
            hint = f" Use y.reshape({N}, {C})." if y.size == N * C else ""
            raise ValueError(
                f"targets y must have the same shape as Z, {(N, C)}, got {tuple(y.shape)}.{hint}"
            )
        if y.dtype.kind != "f":
            raise TypeError(f"targets y must be floats, got dtype {y.dtype}; use y.astype(float).")
        xp = namespace(Z)
        require(xp.all(xp.isfinite(y)),
                ValueError("targets y contain NaN or Inf; refngd refuses to propagate them."), y)
        return y.astype(Z.dtype, copy=False)

    @staticmethod
    def _check_rng(rng: Any, mc_samples: int) -> int:
        if not (hasattr(rng, "random") and hasattr(rng, "standard_normal")):
            raise TypeError(
                f"rng must be a numpy.random.Generator (numpy.random.default_rng(seed)), "
                f"got {type(rng).__name__}."
            )
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1, got {mc_samples!r}.")
        return mc_samples

    # ---------------------------------------------------------------- public API
    def scale(self, Z: Array) -> float:
        """The constant c of L = c Σ_n l_n for this batch (1, 1/N or 1/(N·C))."""
        N, C = self._check_Z(Z).shape
        if self.reduction == "sum":
            return 1.0
        return 1.0 / (N * C) if self._per_element_mean else 1.0 / N

    def per_sample(self, Z: Array, y: Any) -> Array:
        """Per-sample losses l_n, shape (N,), never reduced.

        Raises ``ValueError`` when a loss is too large for the dtype (e.g. logits of
        ±1e308, MSE residuals of 1e200): such a value cannot be represented, and an
        ``inf`` would silently poison every sum it enters.
        """
        y = self.check_targets(Z, y)
        return self._finite(self._per_sample(Z, y), "per-sample losses", Z)

    def __call__(self, Z: Array, y: Any) -> Array:
        """Batch loss L = c Σ_n l_n as a 0-d array (equals the PyTorch loss)."""
        xp = namespace(Z)
        total = xp.sum(self.per_sample(Z, y))
        return xp.asarray(self.scale(Z) * total, dtype=Z.dtype)

    def output_gradient(self, Z: Array, y: Any) -> Array:
        """Output gradients e_n = ∂l_n/∂z_n of the *unreduced* l_n, shape (N, C)."""
        y = self.check_targets(Z, y)
        return self._finite(self._gradient(Z, y), "output gradients", Z)

    def _finite(self, values: Array, what: str, Z: Array) -> Array:
        """``values`` unchanged, or a clear error when they overflowed (Z and y are finite)."""
        xp = namespace(values)
        require(xp.all(xp.isfinite(values)), lambda: ValueError(
            f"{self!r}: the {what} are NaN or Inf: they overflow {Z.dtype} (largest |output| "
            f"{float(xp.max(xp.abs(Z))):.3g}). The true values cannot be represented; rescale "
            "the outputs and targets (e.g. standardise the data) or lower the learning rate."),
            values)
        return values

    def output_hessian(self, Z: Array) -> Array:
        """Output Hessians H_n = ∂²l_n/∂z_n², shape (N, C, C); independent of y."""
        return self._hessian(self._check_Z(Z))

    def hessian_sqrt(self, Z: Array) -> Array:
        """Factors S_n with S_n S_nᵀ = H_n, shape (N, C, C).

        Column k of S_n is the k-th output-space row cotangent of the Fisher (docs/design.md
        §2): Σ_k S_n[:, k] S_n[:, k]ᵀ = H_n, so back-propagating the C columns through the
        network gives rows J_nᵀ S_n[:, k] whose outer products sum to J_nᵀ H_n J_n.
        """
        return self._sqrt(self._check_Z(Z))

    def hessian_factor(self, Z: Array, y: Any = None) -> Array:
        """A factor of H_n with the fewest columns: (N, C, M), M = rank H_n, F_n F_nᵀ = H_n.

        These are the Fisher's row cotangents (refngd.curvature.Fisher).  For MSE and BCE
        M = C and the factor is :meth:`hessian_sqrt` (``y`` is not used);
        ``CrossEntropy`` overrides it and, given the labels ``y``, aligns the factor with
        the gradient so that :meth:`gradient_in_factor` needs no large coefficients.
        """
        return self.hessian_sqrt(Z)

    def gradient_in_factor(self, Z: Array, y: Any) -> tuple[Array, Array]:
        """Coefficients of e_n in the Fisher's factor: e_n = F_n a_n + r_n.

        F_n (C, M) is :meth:`hessian_factor` ``(Z, y)`` — with the same labels, which
        matters for the cross-entropy.  Returns ``a`` (N, M) and ``r`` (N, C).  The
        output gradient of these likelihoods lies in the range of H_n (cross-entropy:
        1ᵀe_n = 0 = the null vector of diag(p) − ppᵀ; MSE and BCE: H_n is invertible), so
        ``r`` is exactly zero except for a sample whose curvature underflowed to zero in
        floating point (a softmax probability p_{y_n} = 0, a BCE variance σ(z)σ(−z) = 0),
        where ``r_n = e_n`` carries the part of the gradient outside the factor's range.

        ``a`` is computed from closed forms, never by dividing e_n by a tiny curvature, and
        F_n a_n reproduces e_n to a few ulps with no cancellation (a column of F_n that is
        tiny where a_n is huge is tiny *accurately*), so the gradient written in the rows
        is as accurate as the gradient itself.  With it the batch gradient is a combination
        of the Fisher's own rows, g = c Σ_n J_nᵀ F_n a_n (+ the residual rows), which lets
        :meth:`refngd.curvature.Fisher.natural_gradient` solve in row space at every
        damping (docs/fisher.md, "Natural gradient in row space").
        """
        y = self.check_targets(Z, y)
        return self._gradient_in_factor(Z, y)

    def sample_targets(self, Z: Array, rng: Any, mc_samples: int = 1) -> Array:
        """Draw K = ``mc_samples`` targets per sample from the model's p(y | z_n).

        Returns targets with leading shape (N, K): ``(N, K)`` int64 class labels for
        ``CrossEntropy``, ``(N, K, C)`` floats for ``MSELoss`` and ``BCEWithLogits``.
        """
        K = self._check_rng(rng, mc_samples)
        return self._sample(self._check_Z(Z), rng, K)

    def sampled_output_gradients(self, Z: Array, rng: Any, mc_samples: int = 1) -> Array:
        """Output gradients at sampled targets, shape (N, K, C).

        E_ŷ[e eᵀ] = H_n (Martens, 2020), so these K rows per sample are the row cotangents
        of the sampled Fisher.  They are *not* divided by √K: the sampled Fisher is
        c Σ_n (1/K) Σ_k J_nᵀ e_nk e_nkᵀ J_n.
        """
        return self.output_gradients_at(Z, self.sample_targets(Z, rng, mc_samples))

    def output_gradients_at(self, Z: Array, Yhat: Array) -> Array:
        """Output gradients ∂ℓ(z_n, ŷ_nk)/∂z_n at targets ``Yhat`` of leading shape (N, K): (N, K, C)."""
        Z = self._check_Z(Z)
        N, K = Yhat.shape[:2]
        C = Z.shape[1]
        xp = namespace(Z)
        Zrep = xp.repeat(Z, K, axis=0)  # row n·K + k is z_n
        E = self._gradient(Zrep, Yhat.reshape((N * K,) + tuple(Yhat.shape[2:])))
        return E.reshape(N, K, C)


def _log_softmax(Z: Array) -> Array:
    xp = namespace(Z)
    shifted = Z - xp.max(Z, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def _sigmoid(Z: Array) -> Array:
    """Logistic function without overflow: exp(−|z|) ≤ 1 on both branches."""
    xp = namespace(Z)
    e = xp.exp(-xp.abs(Z))
    return xp.where(Z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class CrossEntropy(_Loss):
    """Softmax cross-entropy with integer labels, equal to ``torch.nn.CrossEntropyLoss``.

    l_n = logsumexp(z_n) − z_n[y_n] (computed through a stable log-softmax),
    e_n = p_n − onehot(y_n), H_n = diag(p_n) − p_n p_nᵀ, S_n = diag(√p_n) − p_n √p_nᵀ,
    c = 1/N (``mean``) or 1 (``sum``).  Sampling ŷ ~ Categorical(p_n); since this is the
    NLL of a categorical distribution in its logits, Fisher = GGN (Martens, 2020).
    C = 1 is allowed and degenerate: p = 1, l_n = 0, e_n = 0, H_n = 0.

    Parameters
    ----------
    reduction : {"mean", "sum"}
    """

    name = "cross_entropy"
    _per_element_mean = False

    def _check_y(self, Z: Array, y: Array) -> Array:
        N, C = Z.shape
        if y.ndim != 1:
            raise ValueError(
                f"labels y must have shape (N,) = ({N},) of class indices, got "
                f"{tuple(y.shape)}; for one-hot targets pass y.argmax(axis=1)."
            )
        if y.dtype.kind not in "iu":
            raise TypeError(
                f"labels must be integers, e.g. y.astype(int); got dtype {y.dtype}."
            )
        xp = namespace(Z)
        # may be queued (refngd.backend.require): out-of-range labels then only index
        # (CuPy wraps them, NumPy raises IndexError) until the check is read and raised
        require(xp.all((y >= 0) & (y < C)), lambda: ValueError(
            f"labels must lie in [0, C) = [0, {C}); got min {int(y.min())}, "
            f"max {int(y.max())}."), y)
        return y.astype(xp.int64, copy=False)

    def _per_sample(self, Z: Array, y: Array) -> Array:
        xp = namespace(Z)
        logp = _log_softmax(Z)
        return -xp.take_along_axis(logp, y[:, None], axis=1)[:, 0]

    def _gradient(self, Z: Array, y: Array) -> Array:
        xp = namespace(Z)
        P = xp.exp(_log_softmax(Z))
        onehot = y[:, None] == xp.arange(Z.shape[1])[None, :]
        # e_y = p_y − 1 = −Σ_{c≠y} p_c: the sum keeps full relative accuracy when p_y ≈ 1,
        # where p_y − 1 would cancel (e.g. 1e-6 relative error at p_y = 1 − 1e-10).
        others = xp.sum(xp.where(onehot, 0, P), axis=1, keepdims=True)
        return xp.where(onehot, -others, P)

    def _gradient_in_factor(self, Z: Array, y: Array):
        """Closed-form a_n in :meth:`hessian_factor` ``(Z, y)``; r_n = 0 unless p_y underflowed.

        Label not the most probable class: F_n[:, 0] = −(q_y/s) e_n (q = √p,
        s = √(1 − p_y)), so a_n = (−s/q_y, 0, …, 0) — large when p_y is small, on a
        column small in the same proportion and computed to full relative accuracy, so
        F_n a_n and the rows' Uᵀa reproduce e_n without cancellation.  Label the most
        probable class: a_n = (q_c/q_y)_{c ≠ y}, all ≤ 1.  Where p_y is below the smallest
        normal number (an underflowed curvature), a_n = 0 and r_n = e_n.
        (:mod:`refngd.softmax_factors` derives both.)
        """
        xp = namespace(Z)
        N, C = Z.shape
        if C == 1:  # H = 0 and e = 0
            return xp.zeros((N, 1), dtype=Z.dtype), xp.zeros_like(Z)
        a, underflow = softmax_factors.gradient_coefficients(xp.exp(_log_softmax(Z)), y)
        return a, xp.where(underflow[:, None], self._gradient(Z, y), 0)

    def _sqrt(self, Z: Array) -> Array:
        xp = namespace(Z)
        P = xp.exp(_log_softmax(Z))
        q = xp.sqrt(P)
        # S = diag(q) − p qᵀ: S Sᵀ = diag(p) − 2 p pᵀ + p (qᵀq) pᵀ = diag(p) − p pᵀ, as
        # qᵀq = Σ_c p_c = 1.  Diagonal q_c(1 − p_c) with 1 − p_c from one_minus (no
        # cancellation where p_c ≈ 1).
        eye = xp.eye(Z.shape[1], dtype=bool)
        return xp.where(eye, (q * softmax_factors.one_minus(P))[:, :, None], -P[:, :, None] * q[:, None, :])

    def hessian_factor(self, Z: Array, y: Any = None) -> Array:
        """An exact C × (C−1) factor of H_n = diag(p) − p pᵀ, shape (N, C, C−1).

        H_n has rank C − 1 (its null vector is 1), so C − 1 rows per sample suffice for the
        Fisher: fewer rows, and a Gram matrix that is not singular by construction.  The
        factor is diag(q) Q_n, q = √p, Q_n an orthonormal basis of q⊥
        (:mod:`refngd.softmax_factors`): without labels the Householder basis pivoted at
        the most probable class — every row accurate relative to its size, also for a
        saturated softmax; with labels ``y``, for each sample whose label is not its most
        probable class, the basis aligned with the gradient, whose first column is
        F_n[:, 0] = −(q_y/s) e_n (s = √(1 − p_y)), so that :meth:`gradient_in_factor`
        writes e_n with one coefficient and no cancellation, however small p_y.  Both
        give the same Fisher; :class:`refngd.curvature.Fisher` uses the aligned one when
        it has labels.  (S_n Q_n = diag(q) Q_n for the factor S_n of
        :meth:`hessian_sqrt`, as qᵀQ_n = 0.)  For C = 1 (H = 0) the single zero column of
        :meth:`hessian_sqrt` is returned.
        """
        Z = self._check_Z(Z)
        if Z.shape[1] == 1:
            return self._sqrt(Z)
        xp = namespace(Z)
        q = xp.sqrt(xp.exp(_log_softmax(Z)))
        if y is None:
            return softmax_factors.label_free_factor(q)
        return softmax_factors.aligned_factor(q, self.check_targets(Z, y))

    def _hessian(self, Z: Array) -> Array:
        xp = namespace(Z)
        P = xp.exp(_log_softmax(Z))
        eye = xp.eye(Z.shape[1], dtype=bool)
        # diagonal p_c(1 − p_c) without the cancellation of p_c − p_c² where p_c ≈ 1
        return xp.where(eye, (P * softmax_factors.one_minus(P))[:, :, None], -P[:, :, None] * P[:, None, :])

    def _sample(self, Z: Array, rng: Any, K: int) -> Array:
        # Inverse-CDF sampling on Z's device: ŷ = #{k : cdf_k ≤ u}, u ~ U[0, 1) from host.
        xp = namespace(Z)
        N, C = Z.shape
        cdf = xp.cumsum(xp.exp(_log_softmax(Z)), axis=1)  # (N, C)
        u = to_device(rng.random((N, K)), like=Z)
        yhat = xp.sum(cdf[:, None, :] <= u[:, :, None], axis=2)
        return xp.minimum(yhat, C - 1).astype(xp.int64)  # cdf[-1] may round below 1


class MSELoss(_Loss):
    """Squared error summed over outputs, equal to ``torch.nn.MSELoss``.

    l_n = Σ_c (z_nc − y_nc)², e_n = 2(z_n − y_n), H_n = 2I, S_n = √2·I,
    c = 1/(N·C) (``mean``, PyTorch averages over all elements) or 1 (``sum``).
    Sampling ŷ = z_n + ε, ε ~ N(0, ½·I): l_n is that Gaussian's NLL up to a constant, so
    E[e eᵀ] = 4·½·I = H_n and Fisher = GGN (Martens, 2020).

    Parameters
    ----------
    reduction : {"mean", "sum"}
    """

    name = "mse"
    _per_element_mean = True

    def _check_y(self, Z: Array, y: Array) -> Array:
        return self._check_float_targets(Z, y)

    def _per_sample(self, Z: Array, y: Array) -> Array:
        xp = namespace(Z)
        return xp.sum((Z - y) ** 2, axis=1)

    def _gradient(self, Z: Array, y: Array) -> Array:
        return 2.0 * (Z - y)

    @staticmethod
    def _scaled_identities(Z: Array, value: float) -> Array:
        xp = namespace(Z)
        N, C = Z.shape
        return xp.zeros((N, C, C), dtype=Z.dtype) + value * xp.eye(C, dtype=Z.dtype)

    def _sqrt(self, Z: Array) -> Array:
        return self._scaled_identities(Z, math.sqrt(2.0))

    def _gradient_in_factor(self, Z: Array, y: Array):
        """F_n = √2·I, e_n = 2(z_n − y_n): a_n = √2 (z_n − y_n), r_n = 0."""
        xp = namespace(Z)
        return math.sqrt(2.0) * (Z - y), xp.zeros_like(Z)

    def _hessian(self, Z: Array) -> Array:
        return self._scaled_identities(Z, 2.0)

    def _sample(self, Z: Array, rng: Any, K: int) -> Array:
        N, C = Z.shape
        eps = to_device(rng.standard_normal((N, K, C)), like=Z).astype(Z.dtype, copy=False)
        return Z[:, None, :] + math.sqrt(0.5) * eps


class BCEWithLogits(_Loss):
    """Independent binary cross-entropies on logits, equal to ``torch.nn.BCEWithLogitsLoss``.

    l_n = Σ_c softplus(z_nc) − y_nc z_nc, computed stably as
    max(z, 0) − z·y + log1p(exp(−|z|)); e_n = σ(z_n) − y_n, H_n = diag(σ(1 − σ)),
    S_n = diag(√(σ(1 − σ))), c = 1/(N·C) (``mean``) or 1 (``sum``).  Targets may be soft
    (any float in [0, 1]).  Sampling ŷ_nc ~ Bernoulli(σ(z_nc)); this is the NLL of a
    Bernoulli in its natural parameter, so Fisher = GGN (Martens, 2020).

    Parameters
    ----------
    reduction : {"mean", "sum"}
    """

    name = "bce_with_logits"
    _per_element_mean = True

    def _check_y(self, Z: Array, y: Array) -> Array:
        y = self._check_float_targets(Z, y)
        xp = namespace(Z)
        require(xp.all((y >= 0) & (y <= 1)), lambda: ValueError(
            f"BCEWithLogits targets must lie in [0, 1], got values in "
            f"[{float(y.min())}, {float(y.max())}]."), y)
        return y

    def _per_sample(self, Z: Array, y: Array) -> Array:
        xp = namespace(Z)
        elem = xp.maximum(Z, 0) - Z * y + xp.log1p(xp.exp(-xp.abs(Z)))
        return xp.sum(elem, axis=1)

    def _gradient(self, Z: Array, y: Array) -> Array:
        # σ(z) − y = (1 − y)σ(z) − yσ(−z): no cancellation in σ(z) − 1 for z ≫ 0 with y = 1
        return (1 - y) * _sigmoid(Z) - y * _sigmoid(-Z)

    def _gradient_in_factor(self, Z: Array, y: Array):
        """F_n = diag(√v), v = σ(z)σ(−z): a = e/√v = (1 − y) e^{z/2} − y e^{−z/2}, r = 0.

        (σ(z)/√v = √(σ(z)/σ(−z)) = e^{z/2}.)  Where the factor √v is below the smallest
        normal number (|z| ≳ 1415 in float64, ≳ 174 in float32; e^{|z|/2} would overflow)
        the output has no usable curvature in floating point: a = 0 there and r = e carries
        the gradient.
        """
        xp = namespace(Z)
        ok = self._std(Z) >= xp.finfo(Z.dtype).tiny
        Zs = xp.where(ok, Z, 0)  # keeps exp() finite where the entry is masked anyway
        a = xp.where(ok, (1 - y) * xp.exp(Zs / 2) - y * xp.exp(-Zs / 2), 0)
        r = xp.where(ok, 0, self._gradient(Z, y))
        return a, r

    @staticmethod
    def _variance(Z: Array) -> Array:
        """σ(z)(1 − σ(z)) as σ(z)σ(−z), avoiding the cancellation in 1 − σ for z ≫ 0."""
        return _sigmoid(Z) * _sigmoid(-Z)

    @staticmethod
    def _std(Z: Array) -> Array:
        """√(σ(z)σ(−z)) = e^{−|z|/2} / (1 + e^{−|z|}), computed directly: √ of the variance
        would keep only a few bits once the variance is subnormal (|z| ≳ 708 in float64,
        ≳ 87 in float32), while this underflows only at twice those |z|."""
        xp = namespace(Z)
        return xp.exp(-xp.abs(Z) / 2) / (1 + xp.exp(-xp.abs(Z)))

    def _sqrt(self, Z: Array) -> Array:
        xp = namespace(Z)
        return self._std(Z)[:, :, None] * xp.eye(Z.shape[1], dtype=Z.dtype)

    def _hessian(self, Z: Array) -> Array:
        xp = namespace(Z)
        return self._variance(Z)[:, :, None] * xp.eye(Z.shape[1], dtype=Z.dtype)

    def _sample(self, Z: Array, rng: Any, K: int) -> Array:
        N, C = Z.shape
        u = to_device(rng.random((N, K, C)), like=Z)
        return (u < _sigmoid(Z)[:, None, :]).astype(Z.dtype)
