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
from ..backend import Array, namespace, require, to_device
from .base import PointwiseLoss

__all__ = ["CrossEntropy", "MSELoss", "BCEWithLogits"]

def _log_softmax(Z: Array) -> Array:
    xp = namespace(Z)
    shifted = Z - xp.max(Z, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def _sigmoid(Z: Array) -> Array:
    """Logistic function without overflow: exp(−|z|) ≤ 1 on both branches."""
    xp = namespace(Z)
    e = xp.exp(-xp.abs(Z))
    return xp.where(Z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


class CrossEntropy(PointwiseLoss):
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


class MSELoss(PointwiseLoss):
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


class BCEWithLogits(PointwiseLoss):
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
