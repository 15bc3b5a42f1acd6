"""2-d pooling on NCHW inputs: AvgPool2d, AdaptiveAvgPool2d (linear) and MaxPool2d.

Average pooling is separable: every output is a mean over a rectangle of rows × columns
with a divisor that is a product of a row and a column factor (PyTorch's
``avg_pool2d`` kernel: the window clipped to the padded input gives ``count_include_pad``'s
divisor, the window clipped to the input the other one).  So for each sample and channel

    Y = P_h X P_wᵀ,     backward  B ↦ P_hᵀ B P_w,

with P_h (H_out × H) and P_w (W_out × W) the 1-d pooling matrices built below.  Max
pooling routes each row cotangent entry to the position of its window's maximum (the
first one in the window's row-major order on ties, as PyTorch's CPU kernel).
"""
from __future__ import annotations

import operator
from abc import abstractmethod

from ..backend import namespace
from .base import Layer, int_pair


_pair = int_pair  # (value, name, owner, minimum): refngd.nn.base


def pool_out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """PyTorch's ``pooling_output_shape``: floor (or ceil) of (size + 2p − d(k−1) − 1)/s + 1;
    with ceil_mode the last window must start inside the input or the left padding."""
    num = size + 2 * p - d * (k - 1) - 1
    out = (-(-num // s) if ceil_mode else num // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


class _Window2d(Layer):
    """Shared argument handling of AvgPool2d and MaxPool2d."""

    dilation = (1, 1)

    def _setup(self, kernel_size, stride, padding, ceil_mode):
        owner = type(self).__name__
        self.kernel_size = _pair(kernel_size, "kernel_size", owner, 1)
        self.stride = (self.kernel_size if stride is None or stride == ()
                       else _pair(stride, "stride", owner, 1))
        self.padding = _pair(padding, "padding", owner, 0)
        self.ceil_mode = bool(ceil_mode)
        for k, p, d in zip(self.kernel_size, self.padding, self.dilation):
            if 2 * p > d * (k - 1) + 1:  # PyTorch's check "pad should be at most half ..."
                raise ValueError(f"{owner} padding {self.padding} must be at most half of the "
                                 f"(dilated) kernel size {self.kernel_size}.")

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"{self!r} expects per-sample input shape (C, H, W), got {in_shape}.")
        hw = tuple(pool_out_size(n, k, s, p, d, self.ceil_mode) for n, k, s, p, d in zip(
            in_shape[1:], self.kernel_size, self.stride, self.padding, self.dilation))
        if min(hw) < 1:
            raise ValueError(f"{self!r} gives an empty output for input shape {in_shape}; use a "
                             "larger input or a smaller kernel.")
        return (in_shape[0],) + hw


class _Separable(Layer):
    """Y = P_h X P_wᵀ per sample and channel; subclasses build the two matrices."""

    @abstractmethod
    def _matrices(self, xp, H: int, W: int, dtype):
        """The (H_out, H) and (W_out, W) matrices P_h and P_w of the pooling."""

    def forward(self, params, x):
        xp = namespace(x)
        Ph, Pw = self._matrices(xp, x.shape[2], x.shape[3], x.dtype)
        return (Ph @ x) @ Pw.T, (Ph, Pw)

    def backward(self, params, cache, B):
        Ph, Pw = cache
        return (Ph.T @ B) @ Pw


class AvgPool2d(_Window2d, _Separable):
    """``AvgPool2d(kernel_size, stride=None, padding=0, ceil_mode=False,
    count_include_pad=True, divisor_override=None)``, as :class:`torch.nn.AvgPool2d`.

    Output (i, j) is the sum of the input over window rows h ∈ [i·s_h − p_h, i·s_h − p_h + k_h)
    and columns likewise (clipped to the input), divided by ``divisor_override`` or, in
    each direction, by the window's length clipped to the padded input
    (``count_include_pad=True``) or to the input (False); see the module docstring.
    """

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True, divisor_override: int | None = None):
        self._setup(kernel_size, stride, padding, ceil_mode)
        self.count_include_pad = bool(count_include_pad)
        if divisor_override is not None and (isinstance(divisor_override, bool) or not hasattr(
                divisor_override, "__index__") or operator.index(divisor_override) < 1):
            raise ValueError(f"AvgPool2d divisor_override must be None or an integer >= 1, got "
                             f"{divisor_override!r}.")
        self.divisor_override = None if divisor_override is None else operator.index(divisor_override)

    def __repr__(self) -> str:
        return (f"AvgPool2d(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, ceil_mode={self.ceil_mode}, "
                f"count_include_pad={self.count_include_pad}, divisor_override={self.divisor_override})")

    def _matrix(self, xp, n: int, k: int, s: int, p: int, dtype):
        out = pool_out_size(n, k, s, p, 1, self.ceil_mode)
        P = xp.zeros((out, n), dtype=dtype)
        for i in range(out):
            start = i * s - p
            end = min(start + k, n + p)
            lo, hi = max(start, 0), min(end, n)
            if lo >= hi:
                continue  # a window entirely in the padding: output 0, as PyTorch
            if self.divisor_override is not None:
                P[i, lo:hi] = 1.0
            else:
                P[i, lo:hi] = 1.0 / ((end - start) if self.count_include_pad else (hi - lo))
        return P

    def _matrices(self, xp, H, W, dtype):
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        Ph = self._matrix(xp, H, kh, sh, ph, dtype)
        Pw = self._matrix(xp, W, kw, sw, pw, dtype)
        if self.divisor_override is not None:
            Ph = Ph / self.divisor_override
        return Ph, Pw


class AdaptiveAvgPool2d(_Separable):
    """``AdaptiveAvgPool2d(output_size)``, as :class:`torch.nn.AdaptiveAvgPool2d`.

    Output i of an axis of length n → n_out averages the inputs
    [⌊i·n/n_out⌋, ⌈(i+1)·n/n_out⌉) (PyTorch's start/end index rule); ``output_size`` is an
    int or a pair whose entries may be None (keep that axis' size).
    """

    def __init__(self, output_size):
        sizes = tuple(output_size) if isinstance(output_size, (tuple, list)) else (output_size, output_size)
        if len(sizes) != 2 or any(v is not None and (isinstance(v, bool) or not hasattr(v, "__index__")
                                                      or operator.index(v) < 1) for v in sizes):
            raise ValueError("AdaptiveAvgPool2d output_size must be an int >= 1 or a pair of ints "
                             f">= 1 / None, got {output_size!r}.")
        self.output_size = tuple(None if v is None else operator.index(v) for v in sizes)

    def __repr__(self) -> str:
        return f"AdaptiveAvgPool2d(output_size={self.output_size})"

    def _sizes(self, H, W):
        return tuple(n if o is None else o for n, o in zip((H, W), self.output_size))

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3:
            raise ValueError(f"{self!r} expects per-sample input shape (C, H, W), got {in_shape}.")
        return (in_shape[0],) + self._sizes(*in_shape[1:])

    @staticmethod
    def _matrix(xp, n: int, out: int, dtype):
        P = xp.zeros((out, n), dtype=dtype)
        for i in range(out):
            lo, hi = (i * n) // out, -(-((i + 1) * n) // out)
            P[i, lo:hi] = 1.0 / (hi - lo)
        return P

    def _matrices(self, xp, H, W, dtype):
        Ho, Wo = self._sizes(H, W)
        return self._matrix(xp, H, Ho, dtype), self._matrix(xp, W, Wo, dtype)


class MaxPool2d(_Window2d):
    """``MaxPool2d(kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
    ceil_mode=False)``, as :class:`torch.nn.MaxPool2d`.

    Output (i, j) is the maximum over the (dilated) window; padding never wins (it is −∞).
    Backward: each entry of a row cotangent goes to its window's arg-max (first on ties);
    entries of overlapping windows that share an arg-max add up.  Differentiable wherever
    every window's maximum is unique — almost everywhere.  ``return_indices=True`` is
    refused (a layer of a :class:`Sequential` returns one array).
    """

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices: bool = False, ceil_mode: bool = False):
        if return_indices:
            raise ValueError("MaxPool2d(return_indices=True) returns a pair; a refngd layer returns "
                             "one array.  Use return_indices=False.")
        self.dilation = _pair(dilation, "dilation", "MaxPool2d", 1)
        self._setup(kernel_size, stride, padding, ceil_mode)

    def __repr__(self) -> str:
        return (f"MaxPool2d(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, ceil_mode={self.ceil_mode})")

    def _geometry(self, H, W):
        _, Ho, Wo = self.out_shape((1, H, W))
        pads = []
        for n, o, k, s, p, d in zip((H, W), (Ho, Wo), self.kernel_size, self.stride, self.padding,
                                    self.dilation):
            need = (o - 1) * s + d * (k - 1) + 1  # padded length the windows read
            pads.append((p, max(0, need - n - p)))
        return Ho, Wo, pads

    def forward(self, params, x):
        xp = namespace(x)
        N, C, H, W = x.shape
        Ho, Wo, pads = self._geometry(H, W)
        xpad = xp.pad(x, ((0, 0), (0, 0)) + tuple(pads), constant_values=-xp.inf)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        sN, sC, sH, sW = xpad.strides
        view = xp.lib.stride_tricks.as_strided(
            xpad, shape=(N, C, Ho, Wo, kh, kw),
            strides=(sN, sC, sH * sh, sW * sw, sH * dh, sW * dw)).reshape(N, C, Ho, Wo, kh * kw)
        idx = view.argmax(axis=4)  # first maximum in row-major window order
        z = xp.take_along_axis(view, idx[..., None], axis=4)[..., 0]
        return z, (idx, (H, W), xpad.shape[2:])

    def backward(self, params, cache, B):
        """One masked, strided add per kernel offset (as Conv2d's backward), no scatter."""
        xp = namespace(B)
        idx, (H, W), (Hp, Wp) = cache
        N, K, C, Ho, Wo = B.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        (ph, pw) = self.padding
        out = xp.zeros((N, K, C, Hp, Wp), dtype=B.dtype)
        for i in range(kh):
            for j in range(kw):
                mask = (idx == i * kw + j)[:, None].astype(B.dtype)
                out[:, :, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh,
                    j * dw:j * dw + sw * (Wo - 1) + 1:sw] += B * mask
        return xp.ascontiguousarray(out[:, :, :, ph:ph + H, pw:pw + W])
