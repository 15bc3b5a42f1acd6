"""1-d convolution: a Conv2d with a 1 × k kernel on (C, 1, L) maps.

``torch.nn.Conv1d`` on (N, C_in, L) inputs computes, for output position t,

    z_nt = W_mat ā_nt + b,    ā_nt = the receptive field x_n[:, t·s − p + i·d], i = 0..k−1,

(D = (C_in/groups)·k entries in the weight's (in, k) order) — exactly a Conv2d with
kernel (1, k), stride (1, s), padding (0, p) and dilation (1, d) on the input viewed as
(N, C_in, 1, L), whose weight (C_out, C_in/g, 1, k) has the same row-major entries as
Conv1d's (C_out, C_in/g, k).  So :class:`Conv1d` *is* that Conv2d (its forward, backward,
row primitives, Gram routes and K-FAC entries: T = L_out positions share the weight,
``kfac_approx`` expand or reduce, one block per group), with PyTorch's 1-d arguments,
parameter shapes and (N, C, L) inputs and outputs.
"""
from __future__ import annotations

from .base import int_single
from .conv import Conv2d


class Conv1d(Conv2d):
    """``Conv1d(in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
    groups=1, bias=True)``, as :class:`torch.nn.Conv1d` (zero padding, integer sizes; the
    arguments in PyTorch's order, unlike :class:`Conv2d`, where ``groups`` is keyword-only).

    Parameters: ``weight`` (C_out, C_in/groups, k) and ``bias`` (C_out,), in θ order.
    Inputs (N, C_in, L), outputs (N, C_out, L_out) with
    L_out = ⌊(L + 2p − d(k − 1) − 1)/s⌋ + 1.  Initialisation U(±1/√(C_in/groups·k)), as
    PyTorch.  The attributes ``kernel_size``, ``stride``, ``padding``, ``dilation`` are
    PyTorch's 1-tuples; everything else is :class:`Conv2d`'s (module docstring).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, dilation=1, groups: int = 1, bias: bool = True):
        k, s = (int_single(kernel_size, "kernel_size", "Conv1d", 1),
                int_single(stride, "stride", "Conv1d", 1))
        p, d = (int_single(padding, "padding", "Conv1d", 0),
                int_single(dilation, "dilation", "Conv1d", 1))
        super().__init__(in_channels, out_channels, (1, k), (1, s), (0, p), (1, d), bias,
                         groups=groups)
        self.kernel_size, self.stride, self.padding, self.dilation = (k,), (s,), (p,), (d,)
        shapes = [(self.out_channels, self.in_channels // self.groups, k)]
        if self.bias:
            shapes.append((self.out_channels,))
        self.param_shapes = tuple(shapes)

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[0] != self.in_channels:
            raise ValueError(
                f"{self!r} expects per-sample input shape ({self.in_channels}, L) "
                f"(NCL with {self.in_channels} channels), got {in_shape}.")
        Co, _, L = self._out_shape2d((in_shape[0], 1, in_shape[1]))
        return (Co, L)

    def forward(self, params, x):
        N, C, L = x.shape
        W = params[0].reshape(params[0].shape[:2] + (1,) + params[0].shape[2:])
        z, cache = super().forward([W] + list(params[1:]), x.reshape(N, C, 1, L))
        return z.reshape(z.shape[0], z.shape[1], -1), cache

    def backward(self, params, cache, B):
        W = params[0].reshape(params[0].shape[:2] + (1,) + params[0].shape[2:])
        N, K, Co, L = B.shape
        out = super().backward([W] + list(params[1:]), cache, B.reshape(N, K, Co, 1, L))
        return out.reshape(out.shape[:3] + (-1,))
