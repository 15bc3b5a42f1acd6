"""Linear maps along axes without parameters: nearest-neighbour Upsample and Mean.

Both are linear in their input, so the backward pass applies the transposed map to every
cotangent row:

* ``Upsample(mode="nearest")``: output position i of a spatial axis reads input
  src(i) = min(⌊i·s⌋, n_in − 1) (PyTorch's ``nearest_idx``, computed in float32 as
  PyTorch does, with s = 1/scale_factor or n_in/n_out); per axis a 0/1 matrix P
  (n_out × n_in), y = P_h x P_wᵀ, backward B ↦ P_hᵀ B P_w (entries reading the same
  input add up).
* ``Mean(dim)``: y = mean of x over the axes ``dim`` (mean-pooling over tokens with
  dim=1 on (N, T, E)); backward spreads each cotangent entry, divided by the count, over
  the reduced axes.
"""
from __future__ import annotations

import math
import operator

from ..backend import namespace
from ..options import ArgumentTypeError, check_positive
from .base import Layer


def nearest_index(xp, n_in: int, n_out: int, scale_factor: float | None):
    """PyTorch's source index of each of n_out outputs (aten/src/ATen/native/UpSample.h,
    ``nearest_idx``: identity, i >> 1 for doubling, else ⌊i·s⌋ in float32)."""
    i = xp.arange(n_out)
    if n_out == n_in:
        return i
    if n_out == 2 * n_in:
        return i >> 1
    f32 = xp.float32
    s = xp.asarray(1.0 / scale_factor if scale_factor else n_in, dtype=f32)
    if not scale_factor:
        s = s / xp.asarray(n_out, dtype=f32)
    return xp.minimum(xp.floor(i.astype(f32) * s).astype(xp.int64), n_in - 1)


class Upsample(Layer):
    """``Upsample(size=None, scale_factor=None, mode="nearest")``, as :class:`torch.nn.Upsample`
    on (N, C, L) or (N, C, H, W) inputs.

    Give either ``size`` (an int or one per spatial axis) or ``scale_factor`` (a number or
    one per axis; n_out = ⌊n_in · scale⌋).  Only ``mode="nearest"``; ``align_corners`` and
    ``recompute_scale_factor=True`` (which change other modes or the index rule) are
    refused.
    """

    def __init__(self, size=None, scale_factor=None, mode: str = "nearest",
                 align_corners: bool | None = None, recompute_scale_factor: bool | None = None):
        if mode != "nearest":
            raise ValueError(f"Upsample mode={mode!r} is not supported; refngd has 'nearest'.")
        if align_corners is not None or recompute_scale_factor:
            raise ValueError("Upsample(mode='nearest') takes no align_corners and no "
                             "recompute_scale_factor=True.")
        if (size is None) == (scale_factor is None):
            raise ValueError("Upsample needs either size or scale_factor (not both).")
        self.mode = mode
        self.size = None if size is None else self._each(size, "size", self._int)
        self.scale_factor = (None if scale_factor is None else
                             self._each(scale_factor, "scale_factor",
                                        lambda v: check_positive(v, "Upsample scale_factor")))

    @staticmethod
    def _int(v):
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise ArgumentTypeError(f"Upsample size must hold integers, got {v!r}.")
        if operator.index(v) < 1:
            raise ValueError(f"Upsample size must be >= 1, got {v!r}.")
        return operator.index(v)

    @staticmethod
    def _each(value, name, check):
        if isinstance(value, (tuple, list)):
            if not 1 <= len(value) <= 2:
                raise ValueError(f"Upsample {name} must have one entry per spatial axis (1 or 2).")
            return tuple(check(v) for v in value)
        return check(value)

    def __repr__(self) -> str:
        return f"Upsample(size={self.size!r}, scale_factor={self.scale_factor!r}, mode='nearest')"

    def _per_axis(self, value, k):
        if value is None:
            return (None,) * k
        if isinstance(value, tuple):
            if len(value) != k:
                raise ValueError(f"{self!r} has {len(value)} sizes / factors for {k} spatial axes.")
            return value
        return (value,) * k

    def _plan(self, in_shape):
        """(n_in, n_out, scale) per spatial axis of a per-sample (C, *spatial) shape."""
        in_shape = tuple(in_shape)
        if len(in_shape) not in (2, 3):
            raise ValueError(f"{self!r} expects per-sample input shape (C, L) or (C, H, W), got "
                             f"{in_shape}.")
        k = len(in_shape) - 1
        sizes, scales = self._per_axis(self.size, k), self._per_axis(self.scale_factor, k)
        plan = []
        for n, size, sf in zip(in_shape[1:], sizes, scales):
            out = size if size is not None else int(math.floor(n * sf))
            if out < 1:
                raise ValueError(f"{self!r} gives an empty output for input shape {in_shape}.")
            plan.append((n, out, sf))
        return plan

    def out_shape(self, in_shape):
        return (tuple(in_shape)[0],) + tuple(out for _, out, _ in self._plan(in_shape))

    def forward(self, params, x):
        xp = namespace(x)
        mats = []
        for n, out, sf in self._plan(x.shape[1:]):
            P = xp.zeros((out, n), dtype=x.dtype)
            P[xp.arange(out), nearest_index(xp, n, out, sf)] = 1.0
            mats.append(P)
        y = x @ mats[-1].T
        if len(mats) == 2:
            y = mats[0] @ y
        return xp.ascontiguousarray(y), mats

    def backward(self, params, cache, B):
        out = B @ cache[-1]
        return cache[0].T @ out if len(cache) == 2 else out


class Mean(Layer):
    """The mean over the axes ``dim`` of the batched input, ``x.mean(dim=dim, keepdim=...)``:
    ``Mean(1)`` on (N, T, E) is mean-pooling over the T tokens.

    ``dim``: an int or a tuple of ints, counted as PyTorch counts them on the batched
    (N, ...) tensor (negative from the end); the batch axis 0 cannot be reduced (that would
    couple the samples).  The twin in PyTorch is ``refngd.interop.mean_module(dim)``.
    """

    def __init__(self, dim=1, keepdim: bool = False):
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        if not dims or any(isinstance(d, bool) or not hasattr(d, "__index__") for d in dims):
            raise ArgumentTypeError(f"Mean dim must be an int or a tuple of ints, got {dim!r}.")
        dims = tuple(operator.index(d) for d in dims)
        if 0 in dims:
            raise ValueError("Mean over the batch axis 0 couples the samples; reduce per-sample "
                             "axes (dim >= 1 or negative).")
        self.dim = dims[0] if not isinstance(dim, (tuple, list)) else dims
        self._dims, self.keepdim = dims, bool(keepdim)

    def __repr__(self) -> str:
        return f"Mean(dim={self.dim!r}, keepdim={self.keepdim})"

    def _axes(self, ndim: int) -> tuple[int, ...]:
        """The reduced axes of a batched tensor with ``ndim`` axes, as positive indices."""
        axes = set()
        for d in self._dims:
            a = d + ndim if d < 0 else d
            if not 1 <= a < ndim:
                raise ValueError(f"{self!r}: dim {d} is not a per-sample axis of a batch with "
                                 f"{ndim} axes.")
            axes.add(a)
        return tuple(sorted(axes))

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        axes = self._axes(len(in_shape) + 1)
        if self.keepdim:
            return tuple(1 if a + 1 in axes else n for a, n in enumerate(in_shape))
        return tuple(n for a, n in enumerate(in_shape) if a + 1 not in axes)

    def forward(self, params, x):
        axes = self._axes(x.ndim)
        return x.mean(axis=axes, keepdims=self.keepdim), (x.shape, axes)

    def backward(self, params, cache, B):
        xp = namespace(B)
        shape, axes = cache
        count = math.prod(shape[a] for a in axes)
        full = B.shape[:2] + tuple(1 if a in axes else n for a, n in enumerate(shape) if a)
        return xp.broadcast_to((B / count).reshape(full), B.shape[:2] + tuple(shape[1:])).copy()
