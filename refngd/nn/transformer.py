"""The Transformer encoder block (Vaswani et al. 2017, §3.1), as PyTorch's.

A :class:`Composite` of ``self_attn`` (:class:`MultiheadAttention`), ``linear1``,
the activation, ``linear2``, ``norm1`` and ``norm2`` — registered in PyTorch's
``parameters()`` order — wired with two residual connections.  For the input x:

    post-norm (norm_first=False):  h = LN₁(x + SA(x)),   y = LN₂(h + FF(h))
    pre-norm  (norm_first=True):   h = x + SA(LN₁(x)),   y = h + FF(LN₂(h))

with FF(u) = W₂ σ(W₁ u + b₁) + b₂.  A residual branch adds its rows to the skip path's:
for y = u + F(u) the rows at u are B + J_Fᵀ B.
"""
from __future__ import annotations

from .activations import GELU, ReLU
from .attention import LORA_TARGETS, MultiheadAttention, _refuse_dropout, _refuse_seq_first
from .composite import Composite
from .linear import Linear
from .norm import LayerNorm


class TransformerEncoderLayer(Composite):
    """``TransformerEncoderLayer(d_model, nhead, dim_feedforward=2048, dropout=0.0,
    activation="relu", layer_norm_eps=1e-5, batch_first=True, norm_first=False, bias=True)``.

    Equals :class:`torch.nn.TransformerEncoderLayer` with ``dropout=0`` (or any dropout in
    ``eval()`` mode) and ``batch_first=True`` on (N, T, d_model) inputs, without masks.
    Parameters (``parameters()`` order): ``self_attn.in_proj_weight`` (3d, d),
    ``self_attn.in_proj_bias``, ``self_attn.out_proj.weight`` (d, d),
    ``self_attn.out_proj.bias``, ``linear1.weight`` (F, d), ``linear1.bias``,
    ``linear2.weight`` (d, F), ``linear2.bias``, ``norm1.weight``, ``norm1.bias``,
    ``norm2.weight``, ``norm2.bias`` (no biases with ``bias=False``).

    Differences from PyTorch's signature: ``dropout`` defaults to 0 (PyTorch: 0.1) and any
    other value is refused — curvature needs a deterministic function; ``batch_first``
    defaults to True and False is refused; ``activation`` is ``"relu"`` or ``"gelu"``
    (exact GELU, as PyTorch's string), not a callable.

    ``lora_rank``, ``lora_alpha``, ``lora_targets`` (keyword-only, refngd's extension) put
    LoRA adapters on the attention's projections, as :class:`MultiheadAttention`'s: the
    ``self_attn`` tensors are then those listed there (adapters right after each
    projection's bias), followed by ``linear1.weight`` … ``norm2.bias`` as above.  The
    projections' bases are frozen; the feed-forward and LayerNorm tensors keep their
    default (trainable), and :func:`refngd.subsets.peft_mask` selects the adapters alone.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048,
                 dropout: float = 0.0, activation: str = "relu", layer_norm_eps: float = 1e-5,
                 batch_first: bool = True, norm_first: bool = False, bias: bool = True, *,
                 lora_rank: int | None = None, lora_alpha: float | None = None,
                 lora_targets=LORA_TARGETS):
        _refuse_dropout(dropout, "TransformerEncoderLayer")
        _refuse_seq_first(batch_first, "TransformerEncoderLayer")
        if activation not in ("relu", "gelu"):
            raise ValueError(f"TransformerEncoderLayer activation must be 'relu' or 'gelu', got "
                             f"{activation!r}.")
        attn = MultiheadAttention(d_model, nhead, bias=bias, lora_rank=lora_rank,
                                  lora_alpha=lora_alpha, lora_targets=lora_targets)
        self.d_model, self.nhead, self.dim_feedforward = attn.embed_dim, nhead, dim_feedforward
        self.activation, self.norm_first, self.bias = activation, bool(norm_first), bool(bias)
        self.layer_norm_eps = layer_norm_eps
        self._register([
            ("self_attn", attn),
            ("linear1", Linear(d_model, dim_feedforward, bias=bias)),
            ("act", ReLU() if activation == "relu" else GELU("none")),
            ("linear2", Linear(dim_feedforward, d_model, bias=bias)),
            ("norm1", LayerNorm(d_model, eps=layer_norm_eps, bias=bias)),
            ("norm2", LayerNorm(d_model, eps=layer_norm_eps, bias=bias)),
        ])

    def __repr__(self) -> str:
        return (f"TransformerEncoderLayer({self.d_model}, {self.nhead}, dim_feedforward="
                f"{self.dim_feedforward}, activation={self.activation!r}, "
                f"layer_norm_eps={self.layer_norm_eps}, norm_first={self.norm_first}, bias={self.bias}"
                f"{self._lora_repr()})")

    def _lora_repr(self) -> str:
        attn = self.children["self_attn"]
        if not attn.lora_targets:
            return ""
        return (f", lora_rank={attn.lora_rank}, lora_alpha={attn.lora_alpha:g}, "
                f"lora_targets={attn.lora_targets}")

    def out_shape(self, in_shape):
        return self.children["self_attn"].out_shape(in_shape)

    # ------------------------------------------------------------------ the block
    _FF = ("linear1", "act", "linear2")

    def _ff(self, params, u):
        return self._fwd_chain(self._FF, params, u)

    def _ff_back(self, ctx, cache, B):
        return self._back_chain(ctx, self._FF, cache, B)

    def compose(self, params, x):
        if self.norm_first:
            u, c_n1 = self._fwd("norm1", params, x)
            a, c_sa = self._fwd("self_attn", params, u)
            h = x + a
            u2, c_n2 = self._fwd("norm2", params, h)
            f, c_ff = self._ff(params, u2)
            return h + f, (c_n1, c_sa, c_n2, c_ff)
        a, c_sa = self._fwd("self_attn", params, x)
        h, c_n1 = self._fwd("norm1", params, x + a)
        f, c_ff = self._ff(params, h)
        y, c_n2 = self._fwd("norm2", params, h + f)
        return y, (c_n1, c_sa, c_n2, c_ff)

    def pull_back(self, ctx, inner, B):
        c_n1, c_sa, c_n2, c_ff = inner
        if self.norm_first:
            Bh = B + self._back(ctx, "norm2", c_n2, self._ff_back(ctx, c_ff, B))
            return Bh + self._back(ctx, "norm1", c_n1, self._back(ctx, "self_attn", c_sa, Bh))
        Bs2 = self._back(ctx, "norm2", c_n2, B)
        Bh = Bs2 + self._ff_back(ctx, c_ff, Bs2)
        Bs1 = self._back(ctx, "norm1", c_n1, Bh)
        return Bs1 + self._back(ctx, "self_attn", c_sa, Bs1)
