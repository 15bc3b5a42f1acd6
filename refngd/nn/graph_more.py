"""More operations of a :class:`refngd.nn.GraphModel`: ``expand``, softmax, powers, the
lookup of an embedding matrix at constant indices (the position embeddings of a
Transformer), and PyTorch's fused ``scaled_dot_product_attention`` (transformers' default
attention).

As in :mod:`refngd.nn.graph_ops`, ``forward(args)`` returns ``(value, cache)`` and
``backward(cache, B)`` the rows (N, K, *shape) at each argument (None for constants).
"""
from __future__ import annotations

import math

from ..backend import namespace
from .graph_ops import GraphOp, _rows_view, batch_axis, param_rows, unbroadcast

__all__ = ["Expand", "Softmax", "Power", "ConstantLookup", "ScaledDotProduct", "PermuteUnbind"]


class Power(GraphOp):
    """``x ** c`` (``torch.pow(x, c)``) of an activation for a constant number c;
    rows B ↦ c x^(c−1) ⊙ B.  ``args`` are ``[x, c]``."""

    name = "pow"

    def __init__(self):
        super().__init__((True, False))

    def forward(self, args):
        x, c = args
        if not isinstance(c, (int, float)) or isinstance(c, bool):
            raise ValueError(f"pow with exponent of type {type(c).__name__}; refngd has "
                             "x ** c for a constant number c")
        return x ** c, (x, c)

    def backward(self, cache, B):
        x, c = cache
        return [B * (c * x ** (c - 1))[:, None], None]


class ConstantLookup(GraphOp):
    """Rows ``W[idx]`` of an embedding matrix W (a parameter) at constant integer indices
    (a Transformer's position ids ``arange(T)``): a value shared by every sample.

    Its rows reach W as per-row gradients (N, K, V, d): each looked-up row's cotangent added
    at its index (indices that repeat add up), the same for any sample's rows.  ``args`` are
    ``[W, idx]``; the output has ``idx``'s shape then d.
    """

    name = "embedding at constant indices"
    shared = True
    #: the row that gets no gradient (``padding_idx`` of ``torch.nn.Embedding``)
    padding_idx = None

    def __init__(self):
        super().__init__((False, False))
        self.params = (True, False)

    def forward(self, args):
        W, idx = args
        return W[idx], (W.shape, idx)

    def backward(self, cache, B):
        shape, idx = cache
        xp = namespace(B)
        N, K = B.shape[:2]
        lead = B.ndim - 2 - (idx.ndim + 1)
        if lead:  # broadcast over extra leading axes within a sample: sum them
            B = B.sum(axis=tuple(range(2, 2 + lead)))
        out = xp.zeros((N, K) + tuple(shape), dtype=B.dtype)
        flat = B.reshape(N, K, -1, shape[-1])
        xp.add.at(out, (slice(None), slice(None), idx.reshape(-1)), flat)
        if self.padding_idx is not None:
            out[:, :, self.padding_idx] = 0
        return [out, None]


class ScaledDotProduct(GraphOp):
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=, scale=)`` of
    activations (N, ..., T, d) without dropout: O = softmax(q kᵀ·s + M) v per sample, s the
    scale (1/√d by default), M the constant mask (additive, or boolean: False masks out) and,
    with ``is_causal``, the lower-triangular one.  ``args`` are ``[q, k, v, mask]``.

    Rows, with A = softmax(S) (:class:`refngd.nn.ScaledDotProductAttention`'s formulas):
    B_v = Aᵀ B, B_A = B vᵀ, B_S = A ⊙ (B_A − rowsum(B_A ⊙ A)), B_q = s B_S k, B_k = s B_Sᵀ q.
    """

    name = "scaled_dot_product_attention"

    def __init__(self, is_causal: bool = False, scale: float | None = None):
        super().__init__((True, True, True, False))
        self.is_causal, self.scale = bool(is_causal), scale

    def forward(self, args):
        q, k, v, mask = args
        if not all(self.batched[:3]) or self.batched[3]:
            raise ValueError("scaled_dot_product_attention of q, k, v computed from the input "
                             "and a constant mask only")
        xp = namespace(q)
        s = self.scale if self.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        S = (q @ k.swapaxes(-1, -2)) * s
        if self.is_causal:
            L, M = S.shape[-2:]
            S = xp.where(xp.tril(xp.ones((L, M), dtype=bool)), S, -xp.inf)
        if mask is not None:
            S = xp.where(mask, S, -xp.inf) if mask.dtype == bool else S + mask
        S = S - S.max(axis=-1, keepdims=True)
        A = xp.exp(S)
        A /= A.sum(axis=-1, keepdims=True)
        return A @ v, (q, k, v, A, s)

    def backward(self, cache, B):
        q, k, v, A, s = (a[:, None] if hasattr(a, "ndim") else a for a in cache)
        Bv = A.swapaxes(-1, -2) @ B
        BA = B @ v.swapaxes(-1, -2)
        BS = A * (BA - (BA * A).sum(axis=-1, keepdims=True))
        return [(BS @ k) * s, (BS.swapaxes(-1, -2) @ q) * s, Bv, None]


class Expand(GraphOp):
    """``expand(sizes)`` of an activation (its batch axis kept) or of a parameter to the
    batch (a ViT's class token ``cls.expand(N, -1, -1)``); ``args`` are ``[x, sizes]``."""

    name = "expand"

    def __init__(self):
        super().__init__((True, False))

    def forward(self, args):
        x, sizes = args
        xp = namespace(x)
        lead = len(sizes) - x.ndim
        shape = tuple(x.shape[i - lead] if s == -1 else s for i, s in enumerate(sizes))
        out = xp.broadcast_to(x, shape)
        return out, x.shape

    def backward(self, cache, B):
        if self.params and self.params[0]:
            return [param_rows(B, cache, B.ndim - 1), None]
        return [unbroadcast(B, cache), None]


class ParamReshape(GraphOp):
    """``p.reshape(shape)`` (``view``, ``unsqueeze``, ``squeeze``, ``flatten``) of a parameter
    used directly: a value shared by every sample (timm's layer scale
    ``gamma.reshape(1, -1, 1, 1)``).  Rows (N, K, *shape) ↦ (N, K, *p.shape): a reshape moves
    no entry, so each entry's per-row gradient is that of the entry it came from."""

    shared = True

    def __init__(self, shape: tuple, name: str):
        super().__init__((False,))
        self.params, self.shape = (True,), tuple(shape)
        self.name = f"{name} of a parameter to {self.shape}"

    def forward(self, args):
        x = args[0]
        return x.reshape(self.shape), tuple(x.shape)

    def backward(self, cache, B):
        return [B.reshape(B.shape[:2] + cache)]


class Softmax(GraphOp):
    """``softmax`` or ``log_softmax`` (``log=True``) over an axis after the batch axis.

    Rows: softmax s, B ↦ s ⊙ (B − Σ_d B ⊙ s); log-softmax B ↦ B − s Σ_d B.
    """

    def __init__(self, axis: int, log: bool = False):
        super().__init__((True,))
        self.dim, self.log = axis, bool(log)
        self.name = ("log_softmax" if log else "softmax") + f" over dim {axis}"

    def forward(self, args):
        x = args[0]
        xp = namespace(x)
        axis = batch_axis(self.dim, x.ndim, self.name)
        shifted = x - x.max(axis=axis, keepdims=True)
        e = xp.exp(shifted)
        total = e.sum(axis=axis, keepdims=True)
        s = e / total
        return (shifted - xp.log(total) if self.log else s), (s, axis)

    def backward(self, cache, B):
        s, axis = cache
        s = _rows_view(s)
        ax = axis + 1
        if self.log:
            return [B - s * B.sum(axis=ax, keepdims=True)]
        return [s * (B - (B * s).sum(axis=ax, keepdims=True))]


class PermuteUnbind(GraphOp):
    """``x.permute(perm)`` that brings an axis in front of the batch axis (``perm[1] == 0``),
    consumed only by ``unbind(0)`` or ``[i]`` — timm's ``qkv.reshape(B, T, 3, h, d)
    .permute(2, 0, 3, 1, 4).unbind(0)``: a tuple of pieces, each with the batch axis first
    (piece i is ``x.permute(perm)[i]``).  The rows of the pieces (a dict {piece: rows}, as
    :class:`refngd.nn.graph_ops.Split`) are stacked and permuted back."""

    name = "permute then unbind"

    def __init__(self, perm: tuple[int, ...]):
        super().__init__((True,))
        self.perm = tuple(perm)

    def forward(self, args):
        x = args[0]
        if len(self.perm) != x.ndim or self.perm[1] != 0:
            raise ValueError(f"permute {self.perm} of an input with {x.ndim} axes must put the "
                             "batch axis second")
        y = x.transpose(self.perm)
        return tuple(y[i] for i in range(y.shape[0])), [p.shape for p in y]

    def backward(self, cache, B: dict):
        shapes = cache
        some = next(iter(B.values()))
        xp = namespace(some)
        N, K = some.shape[:2]
        S = xp.stack([B[i] if i in B else xp.zeros((N, K) + tuple(s[1:]), dtype=some.dtype)
                      for i, s in enumerate(shapes)], axis=2)     # (N, K, pieces, *rest)
        q = (0, self.perm[0]) + self.perm[2:]                      # x's axis at each of S's
        inv = sorted(range(len(q)), key=lambda j: q[j])
        return [S.transpose((0, 1) + tuple(inv[a] + 1 for a in range(1, len(q))))]


class Pad(GraphOp):
    """``F.pad(x, pad, mode="constant", value)``: constant padding of the last
    ``len(pad) // 2`` axes (never the batch axis), pads ≥ 0; the rows are the padded
    rows' interior.  ``args`` are ``[x, pad, value]``."""

    name = "pad"

    def __init__(self):
        super().__init__((True, False, False))

    def forward(self, args):
        x, pad, value = args
        pad = tuple(int(p) for p in pad)
        if len(pad) % 2 or len(pad) // 2 > x.ndim - 1:
            raise ValueError(f"pad {pad} of an activation with {x.ndim} axes: it must pad "
                             "axes after the batch axis, two numbers per axis.")
        if min(pad, default=0) < 0:
            raise ValueError(f"pad {pad}: negative padding (cropping); slice instead.")
        widths = [(0, 0)] * x.ndim
        for i in range(len(pad) // 2):
            widths[x.ndim - 1 - i] = (pad[2 * i], pad[2 * i + 1])
        xp = namespace(x)
        out = xp.pad(x, widths, mode="constant", constant_values=0.0 if value is None else value)
        rows = (slice(None), slice(None)) + tuple(slice(a, a + n) for (a, _), n in
                                                  zip(widths[1:], x.shape[1:]))
        return out, rows

    def backward(self, cache, B):
        return [B[cache], None, None]
