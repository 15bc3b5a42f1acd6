"""Normalisation layers: LayerNorm, and BatchNorm1d / BatchNorm2d in evaluation mode.

Both end in an elementwise affine map y = x̂ ⊙ γ + β of a normalised x̂, so a row
cotangent b_r (of sample n) has the parameter gradient

    ∂⟨b_r, y_n⟩/∂γ = Σ_t b_rt ⊙ x̂_nt,      ∂⟨b_r, y_n⟩/∂β = Σ_t b_rt,

summed over the positions t that share γ and β (tokens for LayerNorm, the length or
spatial axes for BatchNorm).  These R × 2D rows are as cheap as the backward pass, so the
row primitives come from the materialised rows (:class:`SmallParametricLayer`).
"""
from __future__ import annotations

import math

from ..backend import namespace, to_device, to_numpy
from .base import SmallParametricLayer, host_full, positive_int


def _positive_float(value, name: str, owner: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise ValueError(f"{owner} {name} must be a finite number > 0, got {value!r}.")
    return float(value)


class LayerNorm(SmallParametricLayer):
    """``LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True, bias=True)``, as PyTorch.

    Normalises over the trailing axes ``normalized_shape`` (D = ∏ of them) at every other
    position t (token) of a sample (Ba et al. 2016, eq. 4, with PyTorch's biased variance):

        μ_nt = (1/D) Σ_i x_nti,   σ²_nt = (1/D) Σ_i (x_nti − μ_nt)²,
        x̂_nt = (x_nt − μ_nt) / √(σ²_nt + ε),   y_nt = x̂_nt ⊙ γ + β.

    Parameters: ``weight`` γ then ``bias`` β, each of shape ``normalized_shape`` (none
    without ``elementwise_affine``; no β with ``bias=False``); init γ = 1, β = 0.

    Backward (per position, g = b ⊙ γ, means over the D normalised entries):
    ∂⟨b, y⟩/∂x = (g − mean(g) − x̂ · mean(g ⊙ x̂)) / √(σ² + ε).

    References
    ----------
    J. L. Ba, J. R. Kiros, G. E. Hinton (2016). Layer normalization.  arXiv:1607.06450.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True,
                 bias: bool = True):
        shape = tuple(normalized_shape) if isinstance(normalized_shape, (tuple, list)) \
            else (normalized_shape,)
        if not shape:
            raise ValueError("LayerNorm normalized_shape must name at least one axis.")
        self.normalized_shape = tuple(positive_int(s, "normalized_shape", "LayerNorm") for s in shape)
        self.eps = _positive_float(eps, "eps", "LayerNorm")
        self.elementwise_affine, self.bias = bool(elementwise_affine), bool(bias) and bool(elementwise_affine)
        self.D = math.prod(self.normalized_shape)
        shapes = [self.normalized_shape] if self.elementwise_affine else []
        if self.bias:
            shapes.append(self.normalized_shape)
        self.param_shapes = tuple(shapes)

    def __repr__(self) -> str:
        return (f"LayerNorm({self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.elementwise_affine}, bias={self.bias})")

    def out_shape(self, in_shape):
        in_shape, k = tuple(in_shape), len(self.normalized_shape)
        if in_shape[len(in_shape) - k:] != self.normalized_shape or len(in_shape) < k:
            raise ValueError(f"{self!r} expects per-sample inputs ending in "
                             f"{self.normalized_shape}, got {in_shape}.")
        return in_shape

    def init_params(self, rng):
        return [host_full(s, 1.0 if i == 0 else 0.0) for i, s in enumerate(self.param_shapes)]

    def forward(self, params, x):
        xp = namespace(x)
        N = x.shape[0]
        xr = x.reshape(N, -1, self.D)
        mu = xr.mean(axis=2, keepdims=True)
        xc = xr - mu
        rstd = 1.0 / xp.sqrt((xc * xc).mean(axis=2, keepdims=True) + self.eps)
        xhat = xc * rstd  # (N, T, D)
        y = xhat
        if self.elementwise_affine:
            y = y * params[0].reshape(-1)
        if self.bias:
            y = y + params[1].reshape(-1)
        return y.reshape(x.shape), (xhat, rstd, x.shape)

    def backward(self, params, cache, B):
        xhat, rstd, shape = cache
        N, K = B.shape[:2]
        g = B.reshape(N, K, -1, self.D)
        if self.elementwise_affine:
            g = g * params[0].reshape(-1)
        xh = xhat[:, None]
        dx = (g - g.mean(axis=3, keepdims=True) - xh * (g * xh).mean(axis=3, keepdims=True))
        return (dx * rstd[:, None]).reshape(B.shape)

    def row_grads(self, cache, B):
        xp = namespace(B)
        xhat = cache[0]
        N, K = B.shape[:2]
        Br = B.reshape(N, K, -1, self.D)
        parts = [(Br * xhat[:, None]).sum(axis=2)]  # there are no rows without γ
        if self.bias:
            parts.append(Br.sum(axis=2))
        return xp.concatenate(parts, axis=2)


class _BatchNormEval(SmallParametricLayer):
    """Batch normalisation in evaluation mode: a fixed per-channel affine map.

    y_nc· = (x_nc· − m_c) / √(v_c + ε) · γ_c + β_c with the *running* statistics m, v
    (Ioffe & Szegedy 2015, Alg. 2, step 11 — inference).  In training mode the batch
    statistics couple all samples of a batch, so l_n would not be a function of sample n
    alone; refngd therefore implements evaluation mode only.

    The running statistics are buffers, not parameters: they are not part of θ and no
    curvature involves them.  They start as PyTorch's (m = 0, v = 1); set them with
    :meth:`set_running_stats` (e.g. from ``torch_bn.running_mean``/``running_var``).
    """

    _dims: tuple[int, ...] = ()  # allowed per-sample input ranks

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, *, bias: bool = True):
        name = type(self).__name__
        self.num_features = positive_int(num_features, "num_features", name)
        self.eps = _positive_float(eps, "eps", name)
        if not track_running_stats:
            raise ValueError(
                f"{name}(track_running_stats=False) normalises with the statistics of each "
                "batch even in evaluation mode, which couples the samples of a batch; refngd "
                "needs per-sample functions.  Use track_running_stats=True (evaluation mode "
                "with running statistics).")
        self.momentum = momentum  # unused: refngd never updates running statistics
        self.affine, self.bias = bool(affine), bool(bias) and bool(affine)
        shapes = [(self.num_features,)] if self.affine else []
        if self.bias:
            shapes.append((self.num_features,))
        self.param_shapes = tuple(shapes)
        self.running_mean = [0.0] * self.num_features
        self.running_var = [1.0] * self.num_features
        self.set_running_stats(self.running_mean, self.running_var)

    def set_running_stats(self, running_mean, running_var) -> None:
        """Set the buffers m (running mean) and v (running variance), each (num_features,)."""
        m, v = to_numpy(running_mean).astype(float), to_numpy(running_var).astype(float)
        C = self.num_features
        if m.shape != (C,) or v.shape != (C,):
            raise ValueError(f"running_mean and running_var must have shape ({C},), got "
                             f"{m.shape} and {v.shape}.")
        if not (m == m).all() or not (abs(m) < float("inf")).all() or not (v >= 0).all() \
                or not (v < float("inf")).all():
            raise ValueError("running_mean must be finite and running_var finite and >= 0.")
        self.running_mean, self.running_var = m, v

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.num_features}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias}) [eval]")

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) not in self._dims or in_shape[0] != self.num_features:
            raise ValueError(f"{self!r} expects per-sample input shapes with {self.num_features} "
                             f"channels first and rank in {self._dims}, got {in_shape}.")
        return in_shape

    def init_params(self, rng):
        return [host_full(s, 1.0 if i == 0 else 0.0) for i, s in enumerate(self.param_shapes)]

    def _stats(self, x):
        xp = namespace(x)
        m = to_device(self.running_mean, like=x).astype(x.dtype)
        s = 1.0 / xp.sqrt(to_device(self.running_var, like=x).astype(x.dtype) + self.eps)
        return m, s

    def forward(self, params, x):
        N, C = x.shape[:2]
        m, s = self._stats(x)
        xhat = (x.reshape(N, C, -1) - m[:, None]) * s[:, None]  # (N, C, L)
        y = xhat
        if self.affine:
            y = y * params[0][:, None]
        if self.bias:
            y = y + params[1][:, None]
        return y.reshape(x.shape), (xhat, s)

    def backward(self, params, cache, B):
        scale = cache[1] * params[0] if self.affine else cache[1]
        N, K, C = B.shape[:3]
        return (B.reshape(N, K, C, -1) * scale[:, None]).reshape(B.shape)

    def row_grads(self, cache, B):
        xp = namespace(B)
        N, K, C = B.shape[:3]
        Br = B.reshape(N, K, C, -1)
        parts = [(Br * cache[0][:, None]).sum(axis=3)] if self.affine else []
        if self.bias:
            parts.append(Br.sum(axis=3))
        return xp.concatenate(parts, axis=2)


class BatchNorm1d(_BatchNormEval):
    """``BatchNorm1d(num_features, eps, momentum, affine, track_running_stats, *, bias)``
    in evaluation mode, on (N, C) or (N, C, L) inputs: see :class:`_BatchNormEval`."""

    _dims = (1, 2)


class BatchNorm2d(_BatchNormEval):
    """``BatchNorm2d(num_features, eps, momentum, affine, track_running_stats, *, bias)``
    in evaluation mode, on (N, C, H, W) inputs: see :class:`_BatchNormEval`."""

    _dims = (3,)
