"""Per-token losses: one loss term per token, T tokens per sample (sequence labelling,
language modelling).

A model for T tokens and C classes ends with a Linear on the tokens and ``Flatten()``, so
sample n's output is z_n ∈ R^{T·C} with token t's logits at z_n[t·C:(t+1)·C] (PyTorch's
row-major flattening of (T, C)).  :class:`PerToken` applies a per-sample loss ℓ of
:mod:`refngd.losses` to every token:

    l_n = Σ_t ℓ(z_nt, y_nt),        L = c Σ_n l_n,

with c the base loss's constant for the N·T rows (z_nt): for ``CrossEntropy``,
c = 1/(N·T) (``mean``, PyTorch's ``CrossEntropyLoss`` on the (N·T, C) logits) or 1
(``sum``); for ``MSELoss`` and ``BCEWithLogits`` c = 1/(N·T·C) or 1.

A *sample* is the whole sequence: e_n = ∂l_n/∂z_n stacks the T token gradients, the output
Hessian H_n = blockdiag_t(H_nt) (tokens share no logits), and its factor is the block
diagonal of the tokens' factors, so the Fisher has T·M rows per sample (M = C − 1 for the
cross-entropy) and equals the Fisher of the N·T token terms.  The empirical Fisher and iEF
use one row per *sequence*, e_n (the sum of its tokens' contributions, normalised as a
whole by iEF), not one per token.  Sampled targets draw every token independently from
its own p(y | z_nt); E[e eᵀ] is then blockdiag(H_nt) = H_n, so the sampled Fisher stays
unbiased.
"""
from __future__ import annotations

from typing import Any

from ..backend import Array, namespace, to_device
from ..options import check_int
from .base import Loss, PointwiseLoss

__all__ = ["PerToken"]


class PerToken(Loss):
    """A loss of :mod:`refngd.losses` applied to each of T tokens; see the module docstring.

    Parameters
    ----------
    loss : CrossEntropy, MSELoss or BCEWithLogits instance (its ``reduction`` is used).
    num_tokens : T; the model output per sample has T·C entries.

    Notes
    -----
    Targets: ``(N, T)`` integer labels for ``CrossEntropy``, ``(N, T, C)`` floats for the
    other two.
    """

    def __init__(self, loss: PointwiseLoss, num_tokens: int):
        if not isinstance(loss, PointwiseLoss):
            raise TypeError("PerToken needs a loss instance of refngd.losses (CrossEntropy(), "
                            f"MSELoss(), BCEWithLogits()), got {loss!r}.")
        self.base, self.num_tokens = loss, check_int(num_tokens, "num_tokens")
        self.tokens_per_sample = self.num_tokens
        self.reduction = loss.reduction
        self.name = "per_token_" + loss.name

    def __repr__(self) -> str:
        return f"PerToken({self.base!r}, num_tokens={self.num_tokens})"

    # ------------------------------------------------------------------ layout
    def _tokens(self, Z: Array) -> Array:
        """(N, T·C) → (N·T, C): one row per token."""
        N, TC = self._check_Z(Z).shape
        T = self.num_tokens
        if TC % T:
            raise ValueError(f"Z has {TC} outputs per sample, not a multiple of num_tokens = {T}; "
                             "the model must output (N, T·C) (a Linear on the tokens, then Flatten()).")
        return Z.reshape(N * T, TC // T)

    def _block_diag(self, blocks: Array, N: int) -> Array:
        """(N·T, C, M) token blocks → (N, T·C, T·M) block-diagonal per sample."""
        xp = namespace(blocks)
        T = self.num_tokens
        _, C, M = blocks.shape
        b = blocks.reshape(N, T, C, M)
        out = xp.zeros((N, T * C, T * M), dtype=blocks.dtype)
        for t in range(T):
            out[:, t * C:(t + 1) * C, t * M:(t + 1) * M] = b[:, t]
        return out

    # ------------------------------------------------------------------ API
    def scale(self, Z: Array) -> float:
        """c of L = c Σ_n l_n: the base loss's constant for the N·T token rows."""
        return self.base.scale(self._tokens(Z))

    def check_targets(self, Z: Array, y: Any) -> Array:
        """Validate ``Z`` and targets with leading shape (N, T); return them as N·T rows."""
        Zt = self._tokens(Z)
        y = to_device(y, like=Z)
        N, T = Z.shape[0], self.num_tokens
        if y.ndim < 2 or tuple(y.shape[:2]) != (N, T):
            raise ValueError(f"per-token targets must have leading shape (N, T) = ({N}, {T}), got "
                             f"{tuple(y.shape)}.")
        return self.base.check_targets(Zt, y.reshape((N * T,) + tuple(y.shape[2:])))

    def per_sample(self, Z: Array, y: Any) -> Array:
        """l_n = Σ_t ℓ(z_nt, y_nt), shape (N,)."""
        ys = self.check_targets(Z, y)
        return self.base._per_sample(self._tokens(Z), ys).reshape(Z.shape[0], -1).sum(axis=1)

    def output_gradient(self, Z: Array, y: Any) -> Array:
        """e_n (N, T·C): the token gradients ∂ℓ/∂z_nt side by side."""
        ys = self.check_targets(Z, y)
        return self.base._gradient(self._tokens(Z), ys).reshape(Z.shape)

    def output_hessian(self, Z: Array) -> Array:
        """H_n = blockdiag_t(H_nt), shape (N, T·C, T·C)."""
        return self._block_diag(self.base.output_hessian(self._tokens(Z)), Z.shape[0])

    def hessian_sqrt(self, Z: Array) -> Array:
        """blockdiag_t(S_nt), shape (N, T·C, T·C)."""
        return self._block_diag(self.base.hessian_sqrt(self._tokens(Z)), Z.shape[0])

    def hessian_factor(self, Z: Array, y: Any = None) -> Array:
        """blockdiag_t(F_nt), shape (N, T·C, T·M): the Fisher's T·M rows per sample.

        With targets ``y`` each token's factor is the base loss's ``hessian_factor(z_nt,
        y_nt)`` (for the cross-entropy aligned with the token's gradient).
        """
        if y is None:
            return self._block_diag(self.base.hessian_factor(self._tokens(Z)), Z.shape[0])
        ys = self.check_targets(Z, y)
        return self._block_diag(self.base.hessian_factor(self._tokens(Z), ys), Z.shape[0])

    def gradient_in_factor(self, Z: Array, y: Any) -> tuple[Array, Array]:
        """e_n = F_n a_n + r_n token by token: ``a`` (N, T·M) and ``r`` (N, T·C), in the
        block order of :meth:`hessian_factor` ``(Z, y)`` (token t's M coefficients at
        t·M:(t+1)·M), from the base loss's closed forms."""
        ys = self.check_targets(Z, y)
        a, r = self.base._gradient_in_factor(self._tokens(Z), ys)
        N = Z.shape[0]
        return a.reshape(N, -1), r.reshape(N, -1)

    def sample_targets(self, Z: Array, rng: Any, mc_samples: int = 1) -> Array:
        """K draws per sample, each token independently: leading shape (N, K, T)."""
        Yt = self.base.sample_targets(self._tokens(Z), rng, mc_samples)  # (N·T, K, ...)
        N, T = Z.shape[0], self.num_tokens
        Y = Yt.reshape((N, T) + tuple(Yt.shape[1:]))
        return namespace(Z).moveaxis(Y, 1, 2)

    def output_gradients_at(self, Z: Array, Yhat: Array) -> Array:
        """Output gradients at targets of leading shape (N, K, T) — each token at its own
        target — as (N, K, T·C); the sampled Fisher's rows (``sampled_output_gradients``)."""
        xp = namespace(Z)
        N, K, T = Yhat.shape[0], Yhat.shape[1], self.num_tokens
        Yt = xp.moveaxis(Yhat, 2, 1).reshape((N * T, K) + tuple(Yhat.shape[3:]))  # rows n·T + t
        E = self.base.output_gradients_at(self._tokens(Z), Yt)                     # (N·T, K, C)
        C = E.shape[2]
        return E.reshape(N, T, K, C).transpose(0, 2, 1, 3).reshape(N, K, T * C)
