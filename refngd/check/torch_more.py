"""PyTorch ⇄ refngd for the activations, Identity, Dropout, the 1-d pooling layers,
Upsample and the mean over tokens (registry entries of :mod:`refngd.interop`).

Each converter maps a ``torch.nn`` module to the refngd layer of docs/layers.md with the
same arguments; a setting refngd does not reproduce raises
:class:`refngd.interop.UnsupportedModuleError` naming the module, its path and the
setting.  ``Dropout`` (and ``Dropout1d/2d/3d``, ``AlphaDropout``) in ``eval()`` mode, or
with p = 0, is the identity; in training mode with p > 0 it is a random function, whose
curvature is not what anyone means, and is refused.

torch has no module for a mean over an axis; :func:`mean_module` is the small one that
stands in (the twin of :class:`refngd.nn.Mean`).
"""
from __future__ import annotations

import functools

from .. import nn
from .torch_arrays import _torch

__all__ = ["install", "mean_module"]


@functools.lru_cache(maxsize=None)
def _mean_class():
    torch = _torch()

    class Mean(torch.nn.Module):
        """``x.mean(dim=dim, keepdim=keepdim)``: the twin of :class:`refngd.nn.Mean`."""

        def __init__(self, dim=1, keepdim: bool = False):
            super().__init__()
            self.dim, self.keepdim = dim, bool(keepdim)

        def forward(self, x):
            return x.mean(dim=self.dim, keepdim=self.keepdim)

        def extra_repr(self) -> str:
            return f"dim={self.dim}, keepdim={self.keepdim}"

    return Mean


def mean_module(dim=1, keepdim: bool = False):
    """A torch module computing ``x.mean(dim=dim, keepdim=keepdim)`` (mean over tokens for
    (N, T, E) inputs with ``dim=1``), for use in ``nn.Sequential``."""
    return _mean_class()(dim, keepdim)


def install(register, register_builder, unsupported) -> None:
    """Register the converters and builders of this module's layers."""
    tnn = _torch().nn

    def dropout(m, path):
        if m.training and m.p > 0:
            raise unsupported(m, path, f"p={m.p} in training mode multiplies by a random mask; "
                                       "the curvature of a random function is not what you "
                                       "mean: call model.eval() (dropout is then the identity)")
        return [(nn.Dropout(m.p), [])]

    simple = {tnn.Identity: lambda m: nn.Identity(), tnn.SiLU: lambda m: nn.SiLU(),
              tnn.LeakyReLU: lambda m: nn.LeakyReLU(m.negative_slope),
              tnn.ELU: lambda m: nn.ELU(m.alpha),
              tnn.Softplus: lambda m: nn.Softplus(m.beta, m.threshold),
              tnn.ReLU6: lambda m: nn.ReLU6(),
              tnn.Hardtanh: lambda m: nn.Hardtanh(m.min_val, m.max_val),
              tnn.Hardsigmoid: lambda m: nn.Hardsigmoid(), tnn.Hardswish: lambda m: nn.Hardswish(),
              tnn.AvgPool1d: lambda m: nn.AvgPool1d(m.kernel_size, m.stride, m.padding,
                                                    m.ceil_mode, m.count_include_pad),
              tnn.MaxPool1d: lambda m: nn.MaxPool1d(m.kernel_size, m.stride, m.padding,
                                                    m.dilation, m.return_indices, m.ceil_mode),
              tnn.AdaptiveAvgPool1d: lambda m: nn.AdaptiveAvgPool1d(m.output_size),
              _mean_class(): lambda m: nn.Mean(m.dim, m.keepdim)}
    for t_type, make in simple.items():
        register(t_type, lambda m, path, make=make: [(make(m), [])])
    for t_type in (tnn.Dropout, tnn.Dropout1d, tnn.Dropout2d, tnn.Dropout3d, tnn.AlphaDropout):
        register(t_type, dropout)

    def upsample(m, path):
        if m.mode != "nearest":
            raise unsupported(m, path, f"mode={m.mode!r}; refngd has mode='nearest'")
        if m.recompute_scale_factor:
            raise unsupported(m, path, "recompute_scale_factor=True; leave it None")
        return [(nn.Upsample(size=m.size, scale_factor=m.scale_factor), [])]

    register(tnn.Upsample, upsample)

    builders = {
        nn.Identity: lambda l: tnn.Identity(), nn.SiLU: lambda l: tnn.SiLU(),
        nn.Dropout: lambda l: tnn.Dropout(l.p).eval(),
        nn.LeakyReLU: lambda l: tnn.LeakyReLU(l.negative_slope),
        nn.ELU: lambda l: tnn.ELU(l.alpha),
        nn.Softplus: lambda l: tnn.Softplus(l.beta, l.threshold),
        nn.ReLU6: lambda l: tnn.ReLU6(),
        nn.Hardtanh: lambda l: tnn.Hardtanh(l.min_val, l.max_val),
        nn.Hardsigmoid: lambda l: tnn.Hardsigmoid(), nn.Hardswish: lambda l: tnn.Hardswish(),
        nn.AvgPool1d: lambda l: tnn.AvgPool1d(l.kernel_size, l.stride, l.padding, l.ceil_mode,
                                              l.count_include_pad),
        nn.MaxPool1d: lambda l: tnn.MaxPool1d(l.kernel_size, l.stride, l.padding, l.dilation,
                                              ceil_mode=l.ceil_mode),
        nn.AdaptiveAvgPool1d: lambda l: tnn.AdaptiveAvgPool1d(l.output_size),
        nn.Upsample: lambda l: tnn.Upsample(size=l.size, scale_factor=l.scale_factor),
        nn.Mean: lambda l: mean_module(l.dim, l.keepdim),
    }
    for r_type, build in builders.items():
        register_builder(r_type, build)
