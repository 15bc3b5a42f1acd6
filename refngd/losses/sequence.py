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

PyTorch's ``CrossEntropyLoss`` on outputs (N, C, d1, ...) with targets (N, d1, ...) puts
the class axis at dimension 1: the per-sample output (C, d1, ...) flattened has class c of
position t = (d1, ...) at z_n[c·T + t], T = ∏d.  ``class_dim=1`` reads Z in that layout
(a permutation of the entries; every formula below is unchanged), so
``PerToken(CrossEntropy(), T, class_dim=1)`` after ``Flatten()`` equals PyTorch's loss on
the unflattened outputs, with c = 1/(N·T) (``mean``) as PyTorch's.

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
from .pointwise import CrossEntropy

__all__ = ["PerToken"]


class PerToken(Loss):
    """A loss of :mod:`refngd.losses` applied to each of T tokens; see the module docstring.

    Parameters
    ----------
    loss : CrossEntropy, MSELoss or BCEWithLogits instance (its ``reduction`` is used).
    num_tokens : T; the model output per sample has T·C entries.
    class_dim : -1 (default) or 1.  -1: the per-sample output is (T, C) flattened, token
        t's logits at z_n[t·C:(t+1)·C] (a Linear on (N, T, d), then Flatten(); PyTorch's
        ``loss(out.reshape(-1, C), y.reshape(-1))``).  1: it is (C, d1, ...) flattened,
        T = ∏d, class c of position t at z_n[c·T + t] (PyTorch's ``CrossEntropyLoss`` on
        (N, C, d1, ...) outputs, e.g. a Conv1d / Conv2d segmentation head, then Flatten()).

    Notes
    -----
    Targets: ``(N, T)`` integer labels for ``CrossEntropy`` (with ``class_dim=1`` also
    PyTorch's ``(N, d1, ...)``), ``(N, T, C)`` floats for the other two.  Outputs of :meth:`output_gradient`,
    :meth:`hessian_factor` and the other output-space arrays are in Z's layout.
    """

    def __init__(self, loss: PointwiseLoss, num_tokens: int, class_dim: int = -1):
        if not isinstance(loss, PointwiseLoss):
            raise TypeError("PerToken needs a loss instance of refngd.losses (CrossEntropy(), "
                            f"MSELoss(), BCEWithLogits()), got {loss!r}.")
        self.base, self.num_tokens = loss, check_int(num_tokens, "num_tokens")
        if isinstance(class_dim, bool) or class_dim not in (-1, 1):
            raise ValueError(f"class_dim must be -1 (outputs (T, C)) or 1 (PyTorch's (C, d1, ...)), "
                             f"got {class_dim!r}.")
        if class_dim == 1 and not isinstance(loss, CrossEntropy):
            raise ValueError(f"class_dim=1 is the class axis of CrossEntropyLoss; {loss!r} is "
                             "elementwise: use it on the flattened outputs directly (its mean "
                             "divides by every entry, as PyTorch's).")
        self.class_dim = int(class_dim)
        self.tokens_per_sample = self.num_tokens
        self.reduction = loss.reduction
        self.name = "per_token_" + loss.name

    def __repr__(self) -> str:
        dim = "" if self.class_dim == -1 else f", class_dim={self.class_dim}"
        return f"PerToken({self.base!r}, num_tokens={self.num_tokens}{dim})"

    # ------------------------------------------------------------------ layout
    def _tokens(self, Z: Array) -> Array:
        """(N, T·C) → (N·T, C): one row per token."""
        N, TC = self._check_Z(Z).shape
        T = self.num_tokens
        if TC % T:
            raise ValueError(f"Z has {TC} outputs per sample, not a multiple of num_tokens = {T}; "
                             "the model must output (N, T·C) (a Linear on the tokens, then Flatten()).")
        if self.class_dim == 1:  # (N, C, T) → (N, T, C)
            return Z.reshape(N, TC // T, T).transpose(0, 2, 1).reshape(N * T, TC // T)
        return Z.reshape(N * T, TC // T)

    def _to_layout(self, A: Array, axis: int) -> Array:
        """Output-space axis ``axis`` of A from the token-major order (t, c) to Z's order."""
        if self.class_dim == -1:
            return A
        xp = namespace(A)
        A = xp.moveaxis(A, axis, -1)
        T = self.num_tokens
        lead = A.shape[:-1]
        A = A.reshape(lead + (T, -1))
        A = xp.swapaxes(A, -1, -2).reshape(lead + (-1,))
        return xp.moveaxis(A, -1, axis)

    def split_tokens(self, E: Array) -> Array:
        """(N, T·C) → (N, T, T·C), row t token t's entries alone, in Z's layout (with
        ``class_dim=1`` token t's entries are z_n[c·T + t])."""
        if self.class_dim == -1:
            return super().split_tokens(E)
        T = self.num_tokens
        out = namespace(E).zeros((E.shape[0], T, E.shape[1]), dtype=E.dtype)
        for t in range(T):
            out[:, t, t::T] = E[:, t::T]
        return out

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
        if self.class_dim == 1 and y.ndim >= 2 and y.shape[0] == N and y.dtype.kind in "iu":
            y = y.reshape(N, -1)  # PyTorch's (N, d1, ...) labels
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
        return self._to_layout(self.base._gradient(self._tokens(Z), ys).reshape(Z.shape), 1)

    def output_hessian(self, Z: Array) -> Array:
        """H_n = blockdiag_t(H_nt), shape (N, T·C, T·C)."""
        H = self._block_diag(self.base.output_hessian(self._tokens(Z)), Z.shape[0])
        return self._to_layout(self._to_layout(H, 1), 2)

    def hessian_sqrt(self, Z: Array) -> Array:
        """blockdiag_t(S_nt), shape (N, T·C, T·C) (rows in Z's layout)."""
        return self._to_layout(self._block_diag(self.base.hessian_sqrt(self._tokens(Z)),
                                                Z.shape[0]), 1)

    def hessian_factor(self, Z: Array, y: Any = None) -> Array:
        """blockdiag_t(F_nt), shape (N, T·C, T·M): the Fisher's T·M rows per sample.

        With targets ``y`` each token's factor is the base loss's ``hessian_factor(z_nt,
        y_nt)`` (for the cross-entropy aligned with the token's gradient).
        """
        if y is None:
            F = self.base.hessian_factor(self._tokens(Z))
        else:
            F = self.base.hessian_factor(self._tokens(Z), self.check_targets(Z, y))
        return self._to_layout(self._block_diag(F, Z.shape[0]), 1)

    def gradient_in_factor(self, Z: Array, y: Any) -> tuple[Array, Array]:
        """e_n = F_n a_n + r_n token by token: ``a`` (N, T·M) and ``r`` (N, T·C), in the
        block order of :meth:`hessian_factor` ``(Z, y)`` (token t's M coefficients at
        t·M:(t+1)·M), from the base loss's closed forms."""
        ys = self.check_targets(Z, y)
        a, r = self.base._gradient_in_factor(self._tokens(Z), ys)
        N = Z.shape[0]
        return a.reshape(N, -1), self._to_layout(r.reshape(N, -1), 1)

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
        return self._to_layout(E.reshape(N, T, K, C).transpose(0, 2, 1, 3).reshape(N, K, T * C), 2)
