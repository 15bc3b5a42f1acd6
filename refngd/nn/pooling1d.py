"""1-d pooling on (N, C, L) inputs: AvgPool1d, MaxPool1d, AdaptiveAvgPool1d.

Each is its 2-d namesake (:mod:`refngd.nn.pooling`) on the input viewed as (N, C, 1, L)
with a 1 × k window — the same windows, divisors and arg-max rule, so the same
derivatives — with PyTorch's 1-d arguments.
"""
from __future__ import annotations

from .base import Layer, int_single
from .pooling import AdaptiveAvgPool2d, AvgPool2d, MaxPool2d


class _Pool1d(Layer):
    """(N, C, L) ↦ the 2-d layer ``self._inner`` on (N, C, 1, L), and back."""

    _inner: Layer

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 2:
            raise ValueError(f"{self!r} expects per-sample input shape (C, L), got {in_shape}.")
        try:
            C, _, L = self._inner.out_shape((in_shape[0], 1, in_shape[1]))
        except ValueError:
            raise ValueError(f"{self!r} gives an empty output for input shape {in_shape}; use a "
                             "larger input or a smaller kernel.") from None
        return (C, L)

    def forward(self, params, x):
        N, C, L = x.shape
        z, cache = self._inner.forward(params, x.reshape(N, C, 1, L))
        return z.reshape(N, C, -1), cache

    def backward(self, params, cache, B):
        N, K, C, L = B.shape
        out = self._inner.backward(params, cache, B.reshape(N, K, C, 1, L))
        return out.reshape(out.shape[:3] + (-1,))


def _window(owner, kernel_size, stride, padding):
    k = int_single(kernel_size, "kernel_size", owner, 1)
    s = k if stride is None or stride == () else int_single(stride, "stride", owner, 1)
    return k, s, int_single(padding, "padding", owner, 0)


class AvgPool1d(_Pool1d):
    """``AvgPool1d(kernel_size, stride=None, padding=0, ceil_mode=False,
    count_include_pad=True)``, as :class:`torch.nn.AvgPool1d`: output t is the mean of the
    input over [t·s − p, t·s − p + k) (the divisor as :class:`AvgPool2d`'s)."""

    def __init__(self, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
                 count_include_pad: bool = True):
        k, s, p = _window("AvgPool1d", kernel_size, stride, padding)
        if 2 * p > k:
            raise ValueError(f"AvgPool1d padding {p} must be at most half of the kernel size {k}.")
        self.kernel_size, self.stride, self.padding = (k,), (s,), (p,)
        self.ceil_mode, self.count_include_pad = bool(ceil_mode), bool(count_include_pad)
        self._inner = AvgPool2d((1, k), (1, s), (0, p), self.ceil_mode, self.count_include_pad)

    def __repr__(self) -> str:
        return (f"AvgPool1d(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, ceil_mode={self.ceil_mode}, "
                f"count_include_pad={self.count_include_pad})")


class MaxPool1d(_Pool1d):
    """``MaxPool1d(kernel_size, stride=None, padding=0, dilation=1, return_indices=False,
    ceil_mode=False)``, as :class:`torch.nn.MaxPool1d`: the maximum over the dilated window,
    its cotangent routed to the first arg-max (:class:`MaxPool2d`)."""

    def __init__(self, kernel_size, stride=None, padding=0, dilation=1,
                 return_indices: bool = False, ceil_mode: bool = False):
        if return_indices:
            raise ValueError("MaxPool1d(return_indices=True) returns a pair; a refngd layer returns "
                             "one array.  Use return_indices=False.")
        k, s, p = _window("MaxPool1d", kernel_size, stride, padding)
        d = int_single(dilation, "dilation", "MaxPool1d", 1)
        if 2 * p > d * (k - 1) + 1:
            raise ValueError(f"MaxPool1d padding {p} must be at most half of the (dilated) kernel "
                             f"size {k}.")
        self.kernel_size, self.stride, self.padding, self.dilation = k, s, p, d
        self.ceil_mode = bool(ceil_mode)
        self._inner = MaxPool2d((1, k), (1, s), (0, p), (1, d), ceil_mode=self.ceil_mode)

    def __repr__(self) -> str:
        return (f"MaxPool1d(kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, ceil_mode={self.ceil_mode})")


class AdaptiveAvgPool1d(_Pool1d):
    """``AdaptiveAvgPool1d(output_size)``, as :class:`torch.nn.AdaptiveAvgPool1d`: output i
    of L_out averages the inputs [⌊i·L/L_out⌋, ⌈(i+1)·L/L_out⌉)."""

    def __init__(self, output_size):
        self.output_size = int_single(output_size, "output_size", "AdaptiveAvgPool1d", 1)
        self._inner = AdaptiveAvgPool2d((None, self.output_size))

    def __repr__(self) -> str:
        return f"AdaptiveAvgPool1d(output_size={self.output_size})"
