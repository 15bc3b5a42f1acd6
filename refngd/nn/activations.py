"""Elementwise activations, Identity, Dropout (evaluation mode) and Flatten.

Each activation caches its derivative σ'(x) in the forward pass (ReLU and Hardtanh as
the boolean mask where it is 1); the backward pass multiplies every cotangent row by it
(broadcast over the K rows of a sample).  At a kink the derivative is PyTorch's:
ReLU'(0) = 0, LeakyReLU'(0) = negative_slope, ELU'(0) = α
(``torch/csrc/autograd/FunctionsManual.cpp`` and the ATen backward kernels).
"""
from __future__ import annotations

import math

from ..backend import erf, namespace
from ..options import check_positive, check_real, check_unit_interval
from .base import Layer

class _Elementwise(Layer):
    def backward(self, params, cache, B):
        return B * cache[:, None]


class ReLU(_Elementwise):
    """max(x, 0); derivative 1[x > 0] (0 at x = 0, as PyTorch).

    The derivative is cached as the boolean mask itself (one byte an entry, not a float
    copy): the backward product B · 1[x > 0] is the same, and on the CNN of
    ``benchmarks/vs_torch.py`` the gradient took 0.6–0.7 ms less (docs/benchmarks.md).
    """

    def forward(self, params, x):
        mask = x > 0
        return x * mask, mask


class Tanh(_Elementwise):
    """tanh(x); derivative 1 − tanh²(x)."""

    def forward(self, params, x):
        t = namespace(x).tanh(x)
        return t, 1 - t * t


class Sigmoid(_Elementwise):
    """σ(x) = 1/(1 + e^−x); derivative σ(1 − σ)."""

    def forward(self, params, x):
        xp = namespace(x)
        s = 0.5 * (1 + xp.tanh(0.5 * x))  # overflow-free form of 1/(1 + e^-x)
        return s, s * (1 - s)


class GELU(_Elementwise):
    """x·Φ(x) (``approximate="none"``) or PyTorch's tanh approximation (``"tanh"``).

    Derivatives: Φ(x) + x φ(x) for the exact form; for the tanh form with
    u = √(2/π)(x + 0.044715 x³): ½(1 + tanh u) + ½ x (1 − tanh² u) u'.
    """

    def __init__(self, approximate: str = "none"):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}.")
        self.approximate = approximate

    def __repr__(self) -> str:
        return f"GELU(approximate={self.approximate!r})"

    def forward(self, params, x):
        xp = namespace(x)
        if self.approximate == "none":
            cdf = 0.5 * (1 + erf(x / math.sqrt(2)))
            pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
            return x * cdf, cdf + x * pdf
        c = math.sqrt(2 / math.pi)
        t = xp.tanh(c * (x + 0.044715 * x**3))
        dt = (1 - t * t) * c * (1 + 3 * 0.044715 * x * x)
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * dt


class LeakyReLU(_Elementwise):
    """x for x > 0, negative_slope·x otherwise; derivative 1[x > 0] + slope·1[x ≤ 0]
    (``torch.nn.LeakyReLU(negative_slope=0.01)``; at 0 PyTorch's backward takes the slope)."""

    def __init__(self, negative_slope: float = 0.01, inplace: bool = False):
        self.negative_slope = check_real(negative_slope, "LeakyReLU negative_slope")

    def __repr__(self) -> str:
        return f"LeakyReLU(negative_slope={self.negative_slope!r})"

    def forward(self, params, x):
        xp = namespace(x)
        d = xp.where(x > 0, 1.0, self.negative_slope).astype(x.dtype)
        return x * d, d


class ELU(_Elementwise):
    """x for x > 0, α(eᵡ − 1) otherwise (Clevert et al. 2016); derivative 1 or α eᵡ
    (x ≤ 0, PyTorch's branch at 0), as ``torch.nn.ELU(alpha=1.0)``."""

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        self.alpha = check_real(alpha, "ELU alpha")

    def __repr__(self) -> str:
        return f"ELU(alpha={self.alpha!r})"

    def forward(self, params, x):
        xp = namespace(x)
        pos = x > 0
        neg = xp.where(pos, 0.0, x)  # no overflow of eˣ on the positive branch
        return (xp.where(pos, x, self.alpha * xp.expm1(neg)),
                xp.where(pos, 1.0, self.alpha * xp.exp(neg)).astype(x.dtype))


class SiLU(_Elementwise):
    """x·σ(x) ("swish", Elfwing et al. 2018; ``torch.nn.SiLU``); derivative
    σ(x)(1 + x(1 − σ(x)))."""

    def forward(self, params, x):
        xp = namespace(x)
        s = 0.5 * (1 + xp.tanh(0.5 * x))
        return x * s, s * (1 + x * (1 - s))


class Softplus(_Elementwise):
    """(1/β) log(1 + e^{βx}), or x where βx > threshold (``torch.nn.Softplus(beta=1.0,
    threshold=20.0)``); derivative σ(βx), or 1 where βx > threshold — PyTorch's switch."""

    def __init__(self, beta: float = 1.0, threshold: float = 20.0):
        self.beta = check_positive(beta, "Softplus beta")
        self.threshold = check_real(threshold, "Softplus threshold")

    def __repr__(self) -> str:
        return f"Softplus(beta={self.beta!r}, threshold={self.threshold!r})"

    def forward(self, params, x):
        xp = namespace(x)
        bx = self.beta * x
        lin = bx > self.threshold
        sp = xp.logaddexp(0.0, bx) / self.beta
        s = 0.5 * (1 + xp.tanh(0.5 * bx))
        return xp.where(lin, x, sp), xp.where(lin, 1.0, s).astype(x.dtype)


class Hardtanh(_Elementwise):
    """min(max(x, min_val), max_val) (``torch.nn.Hardtanh(min_val=-1.0, max_val=1.0)``;
    ``ReLU6`` is ``Hardtanh(0, 6)``); derivative 1[min_val < x < max_val] — 0 at both
    kinks, as PyTorch's ``hardtanh_backward``."""

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False):
        self.min_val = check_real(min_val, "Hardtanh min_val")
        self.max_val = check_real(max_val, "Hardtanh max_val")
        if not self.min_val < self.max_val:
            raise ValueError(f"Hardtanh needs min_val < max_val, got {min_val!r} and {max_val!r}.")

    def __repr__(self) -> str:
        return f"Hardtanh(min_val={self.min_val!r}, max_val={self.max_val!r})"

    def forward(self, params, x):
        xp = namespace(x)
        inside = (x > self.min_val) & (x < self.max_val)  # the derivative, as ReLU's mask
        return xp.clip(x, self.min_val, self.max_val), inside


class ReLU6(Hardtanh):
    """min(max(x, 0), 6) (``torch.nn.ReLU6``, MobileNetV2): ``Hardtanh(0, 6)``."""

    def __init__(self, inplace: bool = False):
        super().__init__(0.0, 6.0)

    def __repr__(self) -> str:
        return "ReLU6()"


class Hardsigmoid(_Elementwise):
    """ReLU6(x + 3)/6 (Howard et al. 2019, "Searching for MobileNetV3", §5.2;
    ``torch.nn.Hardsigmoid``); derivative 1/6 for −3 < x < 3, else 0 (PyTorch's branches;
    its CPU kernel multiplies by the float32 constant 1.0f/6.0f even in float64, relative
    error 3e-8 — refngd's 1/6 is exact, tests/test_layers_twins.py)."""

    def __init__(self, inplace: bool = False):
        pass

    def forward(self, params, x):
        xp = namespace(x)
        d = ((x > -3) & (x < 3)).astype(x.dtype) / 6
        return xp.clip(x + 3, 0.0, 6.0) / 6, d


class Hardswish(_Elementwise):
    """x·ReLU6(x + 3)/6 (Howard et al. 2019, §5.2, "h-swish"; ``torch.nn.Hardswish``);
    derivative 0 for x ≤ −3, x/3 + 1/2 for −3 < x < 3, 1 for x ≥ 3 — PyTorch's branches
    (``hardswish_backward``: the outer ones at both kinks)."""

    def __init__(self, inplace: bool = False):
        pass

    def forward(self, params, x):
        xp = namespace(x)
        mid = x / 3 + 0.5
        d = xp.where(x <= -3, 0.0, xp.where(x < 3, mid, 1.0)).astype(x.dtype)
        return x * xp.clip(x + 3, 0.0, 6.0) / 6, d


class Identity(Layer):
    """The identity (``torch.nn.Identity``): output = input, rows pass unchanged."""

    def forward(self, params, x):
        return x, None

    def backward(self, params, cache, B):
        return B


class Dropout(Identity):
    """Dropout in evaluation mode: the identity (``torch.nn.Dropout(p)`` after ``eval()``).

    refngd's curvatures are those of a deterministic function of θ; a network in training
    mode multiplies by a random mask, whose "curvature" is not the quantity anyone means,
    so refngd has no training mode: this layer is always the evaluation-mode identity, and
    :func:`refngd.interop.from_torch` refuses a ``Dropout`` with p > 0 in training mode.
    ``p`` is kept (and checked: 0 ≤ p ≤ 1, as PyTorch) so that the twin converts back.
    """

    def __init__(self, p: float = 0.5, inplace: bool = False):
        self.p = check_unit_interval(p, "Dropout p", closed_right=True)

    def __repr__(self) -> str:
        return f"Dropout(p={self.p!r})"


class Flatten(Layer):
    """Flatten all but the batch axis (``torch.nn.Flatten()``), row-major like PyTorch."""

    def out_shape(self, in_shape):
        return (math.prod(in_shape),)

    def forward(self, params, x):
        return x.reshape(x.shape[0], -1), x.shape[1:]

    def backward(self, params, cache, B):
        return B.reshape(B.shape[:2] + tuple(cache))
