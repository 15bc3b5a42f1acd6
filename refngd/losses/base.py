"""The loss protocol: :class:`Loss`, the abstract base every refngd loss implements.

A loss knows its per-sample value l_n, output gradient e_n = ∂l_n/∂z_n, output Hessian
H_n and a factor F_n F_nᵀ = H_n, how to draw targets from the model's p(y | z_n), and the
constant c of L = c Σ_n l_n (docs/design.md §2–3).  The public methods validate their
arguments once and call the subclass's hooks on validated inputs; the hooks are abstract,
so a loss that lacks one cannot be instantiated.  The formulas are in
:mod:`refngd.losses.pointwise` (cross-entropy, MSE, BCE) and :mod:`refngd.losses.sequence`.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from ..backend import Array, check_float_array, namespace, require, to_device
from ..options import REDUCTION, REDUCTIONS, Reduction, check_int

__all__ = ["Loss", "PointwiseLoss", "check_loss"]


class Loss(ABC):
    """The loss protocol every curvature, update and optimizer of refngd reads.

    A loss is a per-sample negative log-likelihood l_n = ℓ(z_n, y_n) of the model output
    z_n, with the batch loss L = c Σ_n l_n (docs/design.md §2).  Subclasses implement the
    abstract methods below; :meth:`__call__` and :meth:`sampled_output_gradients` follow
    from them.  All arrays have ``Z``'s array module and dtype.

    Attributes
    ----------
    name : a short name used in records and messages.
    reduction : ``"mean"`` or ``"sum"`` (:mod:`refngd.options`), which fixes c.
    """

    name: str = ""
    reduction: Reduction = REDUCTION
    #: loss terms per sample that share no outputs (T tokens of a sequence loss; 1 else):
    #: sample n's output holds them side by side, term t at z_n[t·C:(t+1)·C]
    tokens_per_sample: int = 1

    def __init__(self, reduction: Reduction = REDUCTION) -> None:
        if reduction not in REDUCTIONS:  # (this message is matched by users' tests)
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
        self.reduction = reduction

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reduction={self.reduction!r})"

    @staticmethod
    def _check_Z(Z: Array) -> Array:
        check_float_array("Z", Z, ndim=2)
        N, C = Z.shape
        if N < 1 or C < 1:
            raise ValueError(f"Z must have shape (N, C) with N >= 1 and C >= 1, got {Z.shape}.")
        return Z

    @abstractmethod
    def scale(self, Z: Array) -> float:
        """The constant c of L = c Σ_n l_n for this batch."""

    @abstractmethod
    def check_targets(self, Z: Array, y: Any) -> Array:
        """Validate ``Z`` and the targets ``y``; return ``y`` on ``Z``'s device."""

    @abstractmethod
    def per_sample(self, Z: Array, y: Any) -> Array:
        """Per-sample losses l_n, shape (N,), never reduced."""

    @abstractmethod
    def output_gradient(self, Z: Array, y: Any) -> Array:
        """Output gradients e_n = ∂l_n/∂z_n of the unreduced l_n, shape (N, C)."""

    @abstractmethod
    def output_hessian(self, Z: Array) -> Array:
        """Output Hessians H_n = ∂²l_n/∂z_n², shape (N, C, C)."""

    @abstractmethod
    def hessian_sqrt(self, Z: Array) -> Array:
        """Square factors S_n S_nᵀ = H_n, shape (N, C, C)."""

    @abstractmethod
    def hessian_factor(self, Z: Array, y: Any = None) -> Array:
        """A factor F_n F_nᵀ = H_n with the fewest columns, (N, C, M): the Fisher's rows."""

    @abstractmethod
    def gradient_in_factor(self, Z: Array, y: Any) -> tuple[Array, Array]:
        """e_n = F_n a_n + r_n: coefficients ``a`` (N, M) and residual ``r`` (N, C)."""

    @abstractmethod
    def sample_targets(self, Z: Array, rng: Any, mc_samples: int = 1) -> Array:
        """K = ``mc_samples`` targets per sample drawn from p(y | z_n), leading shape (N, K)."""

    @abstractmethod
    def output_gradients_at(self, Z: Array, Yhat: Array) -> Array:
        """Output gradients at targets ``Yhat`` of leading shape (N, K): (N, K, C)."""

    # ------------------------------------------------------------ token layout
    def split_tokens(self, E: Array) -> Array:
        """(N, T·C) output vectors → (N, T, T·C): row t holds token t's block alone.

        The rows of the empirical Fisher of the N·T token terms (a library that flattens
        a sequence into the batch, :mod:`refngd.conventions` ``ef_rows="token"``); the
        rows of a sample sum to E[n].  T = :attr:`tokens_per_sample` (T = 1: E[:, None]).
        """
        T = self.tokens_per_sample
        N, TC = E.shape
        if T == 1:
            return E[:, None, :]
        C = TC // T
        out = namespace(E).zeros((N, T, TC), dtype=E.dtype)
        for t in range(T):
            out[:, t, t * C:(t + 1) * C] = E[:, t * C:(t + 1) * C]
        return out

    def stack_token_columns(self, F: Array) -> Array:
        """(N, T·C, T·M) block-diagonal factor → (N, T·C, M): column m of every token's
        block side by side, Σ_t F[:, :, t·M + m] (``factor_columns="stacked"``).

        Its outer products are Σ_{t,t'} F_nt[:, m] F_nt'[:, m]ᵀ: H_n plus the off-diagonal
        blocks — not a factor of H_n, but what a library that back-propagates each
        column for all tokens at once accumulates.
        """
        T = self.tokens_per_sample
        if T == 1:
            return F
        N, TC, TM = F.shape
        return F.reshape(N, TC, T, TM // T).sum(axis=2)

    def __call__(self, Z: Array, y: Any) -> Array:
        """Batch loss L = c Σ_n l_n as a 0-d array (equals the PyTorch loss)."""
        xp = namespace(Z)
        total = xp.sum(self.per_sample(Z, y))
        return xp.asarray(self.scale(Z) * total, dtype=Z.dtype)

    def sampled_output_gradients(self, Z: Array, rng: Any, mc_samples: int = 1) -> Array:
        """Output gradients at sampled targets, shape (N, K, C).

        E_ŷ[e eᵀ] = H_n (Martens, 2020), so these K rows per sample are the row cotangents
        of the sampled Fisher.  They are *not* divided by √K: the sampled Fisher is
        c Σ_n (1/K) Σ_k J_nᵀ e_nk e_nkᵀ J_n.
        """
        return self.output_gradients_at(Z, self.sample_targets(Z, rng, mc_samples))



class PointwiseLoss(Loss):
    """A loss with one output vector per sample: shared validation and the public API.

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

    _per_element_mean: bool = False  # True: `mean` divides by N·C, else by N

    # ------------------------------------------------------------------ validation
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
        return check_int(mc_samples, "mc_samples")

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

    def output_gradients_at(self, Z: Array, Yhat: Array) -> Array:
        """Output gradients ∂ℓ(z_n, ŷ_nk)/∂z_n at targets ``Yhat`` of leading shape (N, K): (N, K, C)."""
        Z = self._check_Z(Z)
        N, K = Yhat.shape[:2]
        C = Z.shape[1]
        xp = namespace(Z)
        Zrep = xp.repeat(Z, K, axis=0)  # row n·K + k is z_n
        E = self._gradient(Zrep, Yhat.reshape((N * K,) + tuple(Yhat.shape[2:])))
        return E.reshape(N, K, C)

    # ---------------------------------------------------------------- the formulas
    @abstractmethod
    def _check_y(self, Z: Array, y: Array) -> Array:
        """Validate targets (already on Z's device, batch size checked); return them."""

    @abstractmethod
    def _per_sample(self, Z: Array, y: Array) -> Array:
        """l_n on validated inputs, (N,)."""

    @abstractmethod
    def _gradient(self, Z: Array, y: Array) -> Array:
        """e_n on validated inputs, (N, C); must broadcast over N·K rows."""

    @abstractmethod
    def _hessian(self, Z: Array) -> Array:
        """H_n, (N, C, C)."""

    @abstractmethod
    def _sqrt(self, Z: Array) -> Array:
        """S_n with S_n S_nᵀ = H_n, (N, C, C)."""

    @abstractmethod
    def _sample(self, Z: Array, rng: Any, K: int) -> Array:
        """K targets per sample from p(y | z_n), leading shape (N, K)."""


def check_loss(loss) -> None:
    """A refngd loss *instance* (``CrossEntropy()``, not the class, not a string)."""
    if isinstance(loss, type):
        raise TypeError(f"pass a loss instance, e.g. {loss.__name__}(), not the class {loss.__name__}.")
    # the declared protocol is Loss; an object with the hooks every route needs (a wrapper
    # that delegates to a loss, say) is accepted as before the protocol was declared
    if not isinstance(loss, Loss) and not (hasattr(loss, "output_gradient")
                                           and hasattr(loss, "scale")):
        raise TypeError(
            "loss must be a refngd.losses loss (CrossEntropy(), MSELoss(), BCEWithLogits(), "
            f"PerToken(...)) or a subclass of refngd.losses.Loss, got {loss!r}."
        )
