"""Independent HIPS-autograd definitions of the layers of refngd.nn, written from the
papers / PyTorch documentation without refngd code: loops over heads, windows and
positions where refngd reshapes, so that a shared mistake is unlikely.

Every ``*_ref`` takes the layer's parameters as a list in PyTorch order.
"""
from __future__ import annotations

import math

import autograd.numpy as anp
import numpy as np

import numerics
from refngd import nn


def conv_out(size, k, s, p, d):
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def unpack(theta, shapes):
    """:func:`numerics.unpack`, and the rest of θ after those tensors."""
    used = sum(int(np.prod(s)) for s in shapes)
    return numerics.unpack(theta, shapes), theta[used:]


def linear_ref(x, W, b=None):
    z = anp.einsum("...i,oi->...o", x, W)
    return z if b is None else z + b


def layernorm_ref(x, g=None, b=None, eps=1e-5, axes=1):
    ax = tuple(range(x.ndim - axes, x.ndim))
    mu = anp.mean(x, axis=ax, keepdims=True)
    var = anp.mean((x - mu) ** 2, axis=ax, keepdims=True)
    y = (x - mu) / anp.sqrt(var + eps)
    if g is not None:
        y = y * g
    if b is not None:
        y = y + b
    return y


def softmax_rows(S):
    e = anp.exp(S - anp.max(S, axis=-1, keepdims=True))
    return e / anp.sum(e, axis=-1, keepdims=True)


def mha_ref(x, Win, bin_, Wout, bout, heads):
    """Self-attention, one head at a time (Vaswani et al. 2017, eq. 1 and §3.2.2)."""
    E = x.shape[-1]
    dh = E // heads
    qkv = linear_ref(x, Win, bin_)
    outs = []
    for h in range(heads):
        q = qkv[..., h * dh:(h + 1) * dh]
        k = qkv[..., E + h * dh:E + (h + 1) * dh]
        v = qkv[..., 2 * E + h * dh:2 * E + (h + 1) * dh]
        A = softmax_rows(anp.einsum("ntd,nsd->nts", q, k) / math.sqrt(dh))
        outs.append(anp.einsum("nts,nsd->ntd", A, v))
    return linear_ref(anp.concatenate(outs, axis=-1), Wout, bout)


def gelu_exact(x):
    from autograd.scipy.special import erf
    return 0.5 * x * (1 + erf(x / math.sqrt(2)))


def tel_ref(x, p, heads, norm_first, act, eps=1e-5):
    """PyTorch's TransformerEncoderLayer (dropout 0) from its documented formulas."""
    Win, bin_, Wo, bo, W1, b1, W2, b2, g1, be1, g2, be2 = p
    sa = lambda u: mha_ref(u, Win, bin_, Wo, bo, heads)  # noqa: E731
    sig = (lambda u: anp.maximum(u, 0.0)) if act == "relu" else gelu_exact
    ff = lambda u: linear_ref(sig(linear_ref(u, W1, b1)), W2, b2)  # noqa: E731
    ln1 = lambda u: layernorm_ref(u, g1, be1, eps)  # noqa: E731
    ln2 = lambda u: layernorm_ref(u, g2, be2, eps)  # noqa: E731
    if norm_first:
        h = x + sa(ln1(x))
        return h + ff(ln2(h))
    h = ln1(x + sa(x))
    return ln2(h + ff(h))


def embedding_ref(idx, W, padding_idx=None, W_value=None):
    """W[idx]; the padding row is read as a constant (its gradient is zero, as PyTorch)."""
    V = W.shape[0]
    onehot = (np.asarray(idx)[..., None] == np.arange(V)).astype(float)
    if padding_idx is not None:
        mask = np.ones((V, 1))
        mask[padding_idx] = 0.0
        W = W * mask + (1 - mask) * W_value
    return anp.einsum("...v,vd->...d", onehot, W)


def avgpool_ref(x, k, s, p, ceil_mode=False, count_include_pad=True, divisor_override=None):
    """PyTorch's avg_pool2d, one output entry at a time."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    N, C, H, W = x.shape

    def size(n, k_, s_, p_):
        num = n + 2 * p_ - (k_ - 1) - 1
        o = (-(-num // s_) if ceil_mode else num // s_) + 1
        return o - 1 if ceil_mode and (o - 1) * s_ >= n + p_ else o

    Ho, Wo = size(H, kh, sh, ph), size(W, kw, sw, pw)
    rows = []
    for i in range(Ho):
        cols = []
        for j in range(Wo):
            h0, w0 = i * sh - ph, j * sw - pw
            h1, w1 = min(h0 + kh, H + ph), min(w0 + kw, W + pw)
            pool = (h1 - h0) * (w1 - w0)
            a0, b0, a1, b1 = max(h0, 0), max(w0, 0), min(h1, H), min(w1, W)
            if a0 >= a1 or b0 >= b1:
                cols.append(anp.zeros((N, C)))
                continue
            div = divisor_override or (pool if count_include_pad else (a1 - a0) * (b1 - b0))
            cols.append(anp.sum(x[:, :, a0:a1, b0:b1], axis=(2, 3)) / div)
        rows.append(anp.stack(cols, axis=-1))
    return anp.stack(rows, axis=-2)


def maxpool_ref(x, k, s, p, d, ceil_mode=False):
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = k, s, p, d
    N, C, H, W = x.shape

    def size(n, k_, s_, p_, d_):
        num = n + 2 * p_ - d_ * (k_ - 1) - 1
        o = (-(-num // s_) if ceil_mode else num // s_) + 1
        return o - 1 if ceil_mode and (o - 1) * s_ >= n + p_ else o

    Ho, Wo = size(H, kh, sh, ph, dh), size(W, kw, sw, pw, dw)
    rows = []
    for i in range(Ho):
        cols = []
        for j in range(Wo):
            vals = [x[:, :, i * sh - ph + a * dh, j * sw - pw + e * dw]
                    for a in range(kh) for e in range(kw)
                    if 0 <= i * sh - ph + a * dh < H and 0 <= j * sw - pw + e * dw < W]
            cols.append(anp.max(anp.stack(vals, axis=-1), axis=-1))
        rows.append(anp.stack(cols, axis=-1))
    return anp.stack(rows, axis=-2)


def adaptive_avgpool_ref(x, out):
    N, C, H, W = x.shape
    Ho, Wo = out
    rows = []
    for i in range(Ho):
        h0, h1 = (i * H) // Ho, -(-((i + 1) * H) // Ho)
        cols = []
        for j in range(Wo):
            w0, w1 = (j * W) // Wo, -(-((j + 1) * W) // Wo)
            cols.append(anp.mean(x[:, :, h0:h1, w0:w1], axis=(2, 3)))
        rows.append(anp.stack(cols, axis=-1))
    return anp.stack(rows, axis=-2)


def batchnorm_eval_ref(x, g, b, mean, var, eps=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    if g is not None:
        y = y * anp.reshape(g, shape)
    if b is not None:
        y = y + anp.reshape(b, shape)
    return y


class Scale(nn.ParametricLayer):
    """z = x ⊙ w + b: a parametric layer *without* ``restrict`` (no partial selection) and
    without working row primitives — for the tests of how selections are refused."""

    def __init__(self, dim: int):
        self.param_shapes = ((dim,), (dim,))

    def forward(self, params, x):
        return x * params[0] + params[1], x

    def backward(self, params, cache, B):
        return B * params[0]

    def row_gram(self, cache, B): ...
    def row_dot(self, cache, B, V): ...
    def row_sum(self, cache, B, w): ...
    def row_grads(self, cache, B): ...
    def row_sq_sum(self, cache, B): ...
