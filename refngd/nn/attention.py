"""Multi-head self-attention (Vaswani et al. 2017, §3.2) in PyTorch's packed layout.

``MultiheadAttention`` is a :class:`Composite` of three sub-layers:

1. ``in_proj``: a Linear(E, 3E) on the tokens, [q | k | v] = x W_inᵀ + b_in, with
   PyTorch's packed ``in_proj_weight`` (rows 0:E for queries, E:2E keys, 2E:3E values);
2. ``attn``: the parameter-free :class:`ScaledDotProductAttention` on the packed q, k, v;
3. ``out_proj``: a Linear(E, E) on the tokens.

so its row primitives are those of two weight-shared Linear layers (refngd.nn.shared),
with the rows reaching each projection pulled back through the attention.

With ``lora_rank=r`` a projection is a :class:`refngd.nn.LoRALinear` instead (Hu et al.
2022, eq. 3; PEFT's LoRA for ``nn.MultiheadAttention``: one adapter pair on the packed
in-projection, A (r, E) and B (3E, r), and one on the out-projection), whose frozen base
holds PyTorch's projection and whose adapters are the default selection.
"""
from __future__ import annotations

import math

from ..backend import namespace
from .base import Layer, host_full, layer_ints
from .composite import Composite
from .linear import Linear
from .peft import LoRALinear

#: the projections LoRA can adapt, in θ order
LORA_TARGETS = ("in_proj", "out_proj")


class ScaledDotProductAttention(Layer):
    """softmax(Q Kᵀ/√d_h) V per head on packed inputs (N, T, 3E) → (N, T, E).

    Head h uses columns h·d_h:(h+1)·d_h of each of q, k, v (d_h = E / heads), as PyTorch.
    With S = Q Kᵀ/√d_h, A = softmax(S) (rows), O = A V, a row cotangent B_O pulls back to

        B_V = Aᵀ B_O,   B_A = B_O Vᵀ,   B_S = A ⊙ (B_A − rowsum(B_A ⊙ A)),
        B_Q = B_S K/√d_h,   B_K = B_Sᵀ Q/√d_h.
    """

    def __init__(self, embed_dim: int, num_heads: int):
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads

    def __repr__(self) -> str:
        return f"ScaledDotProductAttention(embed_dim={self.embed_dim}, num_heads={self.num_heads})"

    def out_shape(self, in_shape):
        return tuple(in_shape[:-1]) + (self.embed_dim,)

    def _heads(self, a, lead):
        """(*lead, T, E) → (*lead, heads, T, d_h)."""
        T = a.shape[-2]
        nd = len(lead)
        return a.reshape(lead + (T, self.num_heads, self.head_dim)).transpose(
            tuple(range(nd)) + (nd + 1, nd, nd + 2))

    def _merge(self, a, lead):
        """(*lead, heads, T, d_h) → (*lead, T, E)."""
        nd = len(lead)
        T = a.shape[-2]
        return a.transpose(tuple(range(nd)) + (nd + 1, nd, nd + 2)).reshape(lead + (T, self.embed_dim))

    def forward(self, params, x):
        xp = namespace(x)
        E, lead = self.embed_dim, x.shape[:1]
        q, k, v = (self._heads(x[..., i * E:(i + 1) * E], lead) for i in range(3))
        S = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(self.head_dim)  # (N, h, T, T)
        S = S - S.max(axis=3, keepdims=True)
        A = xp.exp(S)
        A /= A.sum(axis=3, keepdims=True)
        return self._merge(A @ v, lead), (q, k, v, A)

    def backward(self, params, cache, B):
        xp = namespace(B)
        q, k, v, A = (c[:, None] for c in cache)  # broadcast over the K rows
        lead = B.shape[:2]
        Bo = self._heads(B, lead)  # (N, K, h, T, d_h)
        BV = A.swapaxes(-1, -2) @ Bo
        BA = Bo @ v.swapaxes(-1, -2)
        BS = A * (BA - (BA * A).sum(axis=4, keepdims=True))
        r = 1.0 / math.sqrt(self.head_dim)
        BQ, BK = (BS @ k) * r, (BS.swapaxes(-1, -2) @ q) * r
        return xp.concatenate([self._merge(b, lead) for b in (BQ, BK, BV)], axis=-1)


def _check_dims(embed_dim, num_heads, owner: str) -> tuple[int, int]:
    vals = layer_ints({"embed_dim": embed_dim, "num_heads": num_heads}, owner)
    if vals[0] % vals[1]:
        raise ValueError(f"{owner}: embed_dim {vals[0]} is not divisible by num_heads {vals[1]}; "
                         "each head gets embed_dim // num_heads features, so choose num_heads "
                         f"among the divisors of {vals[0]}.")
    return vals[0], vals[1]


class MultiheadAttention(Composite):
    """``MultiheadAttention(embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False,
    add_zero_attn=False, kdim=None, vdim=None, batch_first=True)`` as self-attention.

    Computes PyTorch's ``mha(x, x, x, need_weights=False)[0]`` on (N, T, E) inputs —
    queries, keys and values all from the layer's input, no mask — with the parameters
    ``in_proj_weight`` (3E, E), ``in_proj_bias`` (3E,), ``out_proj.weight`` (E, E),
    ``out_proj.bias`` (E,) in this order (``parameters()`` order; no biases with
    ``bias=False``).  Init as PyTorch: in_proj_weight Xavier-uniform, out_proj.weight
    U(±1/√E), both biases 0.

    Only ``batch_first=True`` (refngd layers are batch-first; transpose a (T, N, E) input),
    ``dropout=0`` (curvature needs a deterministic function), and the defaults of
    ``add_bias_kv``, ``add_zero_attn``, ``kdim``, ``vdim``; others raise ``ValueError``.

    **LoRA on the projections** (refngd's keyword-only extension; Hu et al. 2022, eq. 3 and
    §4.1): ``lora_rank=r`` makes each projection named in ``lora_targets`` (default both,
    ``"in_proj"`` and ``"out_proj"``) a :class:`refngd.nn.LoRALinear` with scaling
    s = ``lora_alpha`` / r (``lora_alpha=None``: α = r, s = 1).  The in-projection gets one
    adapter pair on the packed [q | k | v] matrix, as PEFT's LoRA for
    ``nn.MultiheadAttention`` does.  Parameters, θ order (each adapter pair right after its
    projection's bias)::

        in_proj_weight (3E, E), in_proj_bias (3E,), [in A (r, E), in B (3E, r)],
        out_proj.weight (E, E), out_proj.bias (E,), [out A (r, E), out B (E, r)]

    A ~ U(±1/√E) and B = 0 (PEFT's initialisation, so the layer starts as its base); the
    projections' weights and biases are frozen (``trainable`` is the adapters alone, and
    :func:`refngd.subsets.peft_mask` selects them).  The row views are the base and
    adapter Linears of :class:`refngd.nn.LoRALinear`, so every curvature (K-FAC included:
    one block per adapter) applies unchanged.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim=None, vdim=None,
                 batch_first: bool = True, *, lora_rank: int | None = None,
                 lora_alpha: float | None = None, lora_targets=LORA_TARGETS):
        E, h = _check_dims(embed_dim, num_heads, "MultiheadAttention")
        _refuse_dropout(dropout, "MultiheadAttention")
        _refuse_seq_first(batch_first, "MultiheadAttention")
        if add_bias_kv or add_zero_attn or kdim not in (None, E) or vdim not in (None, E):
            raise ValueError("MultiheadAttention: add_bias_kv, add_zero_attn and kdim/vdim other "
                             "than embed_dim are not supported (refngd's attention is "
                             "self-attention with PyTorch's packed in-projection).")
        self.embed_dim, self.num_heads, self.bias = E, h, bool(bias)
        self.lora_targets = _lora_targets(lora_rank, lora_alpha, lora_targets)
        self.lora_rank, self.lora_alpha = lora_rank, lora_alpha

        def proj(name, d_out):
            if name not in self.lora_targets:
                return Linear(E, d_out, bias=self.bias)
            alpha = lora_rank if lora_alpha is None else lora_alpha
            return LoRALinear(E, d_out, lora_rank, alpha, bias=self.bias)

        self._register([("in_proj", proj("in_proj", 3 * E)),
                        ("attn", ScaledDotProductAttention(E, h)),
                        ("out_proj", proj("out_proj", E))])
        if self.lora_targets:
            self.lora_alpha = self.children[self.lora_targets[0]].alpha

    def __repr__(self) -> str:
        lora = (f", lora_rank={self.lora_rank}, lora_alpha={self.lora_alpha:g}, "
                f"lora_targets={self.lora_targets}") if self.lora_targets else ""
        return f"MultiheadAttention({self.embed_dim}, {self.num_heads}, bias={self.bias}{lora})"

    @property
    def param_names(self):
        """``torch.nn.MultiheadAttention``'s names (packed in-projection); with LoRA
        adapters, the sub-layers' names."""
        if self.lora_targets:
            return super().param_names
        return (("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")
                if self.bias else ("in_proj_weight", "out_proj.weight"))

    #: refngd.interop wraps self-attention in a module whose attention is ``attn``
    torch_wrapper_prefix = "attn."

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[1] != self.embed_dim:
            raise ValueError(f"{self!r} expects per-sample input shape (T, {self.embed_dim}) "
                             f"(batch_first), got {in_shape}.")
        return in_shape

    def init_params(self, rng):
        E = self.embed_dim
        bound = math.sqrt(6.0 / (E + 3 * E))  # xavier_uniform_ on the (3E, E) in_proj_weight
        out = []
        for name, d_out, b in (("in_proj", 3 * E, bound), ("out_proj", E, 1 / math.sqrt(E))):
            out.append(rng.uniform(-b, b, size=(d_out, E)))
            if self.bias:
                out.append(host_full((d_out,), 0.0))
            if name in self.lora_targets:  # PEFT: A ~ kaiming_uniform_(a=√5) = U(±1/√E), B = 0
                r = self.lora_rank
                out += [rng.uniform(-1 / math.sqrt(E), 1 / math.sqrt(E), size=(r, E)),
                        host_full((d_out, r), 0.0)]
        return out

    _CHAIN = ("in_proj", "attn", "out_proj")

    def compose(self, params, x):
        return self._fwd_chain(self._CHAIN, params, x)

    def pull_back(self, ctx, inner, B):
        return self._back_chain(ctx, self._CHAIN, inner, B)


def _lora_targets(rank, alpha, targets) -> tuple[str, ...]:
    """The validated projections to adapt: () without ``lora_rank``, else in θ order."""
    if rank is None:
        if alpha is not None:
            raise ValueError("MultiheadAttention: lora_alpha without lora_rank; pass lora_rank=r "
                             "to put LoRA adapters on the projections.")
        return ()
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    bad = [t for t in targets if t not in LORA_TARGETS]
    if bad or not targets:
        raise ValueError(f"MultiheadAttention lora_targets must be a non-empty selection of "
                         f"{LORA_TARGETS}, got {targets!r}.")
    return tuple(t for t in LORA_TARGETS if t in targets)


def _refuse_dropout(dropout, owner: str) -> None:
    if dropout != 0:
        raise ValueError(f"{owner}(dropout={dropout!r}): curvature needs a deterministic function, "
                         "so refngd supports dropout=0.0 only (PyTorch's evaluation mode); pass "
                         "dropout=0.0.")


def _refuse_seq_first(batch_first, owner: str) -> None:
    if not batch_first:
        raise ValueError(f"{owner}(batch_first=False): refngd layers take batch-first inputs "
                         "(N, T, E); pass batch_first=True and transpose (T, N, E) data first.")
