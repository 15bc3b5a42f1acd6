"""PyTorch ⇄ refngd for the modern layers: normalisation, embedding, pooling, attention,
the Transformer block and LoRA (the registry entries of :mod:`refngd.interop`).

Each converter maps one ``torch.nn`` module to the refngd layer of docs/layers.md with the
same constructor arguments, and hands over the module's ``parameters()`` in order; each
builder goes back.  A setting refngd cannot reproduce (a BatchNorm in training mode,
dropout that is active, ``batch_first=False``, an activation other than ReLU / exact GELU)
raises :class:`refngd.interop.UnsupportedModuleError` naming the module, its path and the
setting.  Settings that do not change the function are accepted: dropout of a module in
``eval()`` mode is the identity, BatchNorm's ``momentum`` only updates buffers in training.

Two small torch modules stand in where ``torch.nn`` has no single-input module
(``nn.Sequential`` calls each child with one tensor):

* :func:`self_attention_module` → ``SelfAttention``: ``attn(x, x, x, need_weights=False)[0]``
  with ``attn = nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=True)``
  — the twin of :class:`refngd.nn.MultiheadAttention`.  A bare ``nn.MultiheadAttention``
  converts too (as this self-attention), but cannot run inside ``nn.Sequential``.
* :func:`lora_linear_module` → ``LoRALinear``: ``base_layer(x) + lora_B(lora_A(x)) · α/r``
  with three ``nn.Linear`` (PEFT's attribute names, base frozen) — the twin of
  :class:`refngd.nn.LoRALinear`.  PEFT's own ``lora.Linear`` is not converted (PEFT is not
  a dependency); copy its ``base_layer``, ``lora_A['default']``, ``lora_B['default']``
  weights into this module.
"""
from __future__ import annotations

import functools

from .. import nn
from .torch_arrays import _torch, to_array

__all__ = ["install", "self_attention_module", "lora_linear_module"]


@functools.lru_cache(maxsize=None)
def _wrapper_classes():
    """The two torch modules, defined once on first use (torch is optional)."""
    torch = _torch()

    class SelfAttention(torch.nn.Module):
        """``attn(x, x, x, need_weights=False)[0]`` on (N, T, E): refngd.nn.MultiheadAttention."""

        def __init__(self, embed_dim: int, num_heads: int, bias: bool = True, dropout: float = 0.0):
            super().__init__()
            self.attn = torch.nn.MultiheadAttention(embed_dim, num_heads, dropout=dropout,
                                                    bias=bias, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    class LoRALinear(torch.nn.Module):
        """``base_layer(x) + lora_B(lora_A(x)) · alpha/rank``: refngd.nn.LoRALinear (Hu et al.
        2022, eq. 3); base frozen, A PyTorch's Linear init (kaiming_uniform_, a=√5), B zero."""

        def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                     bias: bool = True):
            super().__init__()
            self.base_layer = torch.nn.Linear(in_features, out_features, bias=bias)
            self.lora_A = torch.nn.Linear(in_features, rank, bias=False)
            self.lora_B = torch.nn.Linear(rank, out_features, bias=False)
            torch.nn.init.zeros_(self.lora_B.weight)
            self.base_layer.requires_grad_(False)
            self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank

        def forward(self, x):
            return self.base_layer(x) + self.lora_B(self.lora_A(x)) * self.scaling

    return SelfAttention, LoRALinear


def self_attention_module(embed_dim: int, num_heads: int, bias: bool = True):
    """A torch self-attention module for ``nn.Sequential`` (the twin of refngd's
    ``MultiheadAttention``); its parameters are ``attn.in_proj_weight``, ``attn.in_proj_bias``,
    ``attn.out_proj.weight``, ``attn.out_proj.bias``, in θ order."""
    return _wrapper_classes()[0](embed_dim, num_heads, bias=bias)


def lora_linear_module(in_features: int, out_features: int, rank: int, alpha: float,
                       bias: bool = True):
    """A minimal torch LoRA layer (the twin of refngd's ``LoRALinear``); parameters
    ``base_layer.weight``, ``base_layer.bias`` (frozen), ``lora_A.weight``, ``lora_B.weight``."""
    return _wrapper_classes()[1](in_features, out_features, rank, alpha, bias=bias)


# --------------------------------------------------------------------------- converters
def _dropout_off(m, p: float, path: str, unsupported, where: str = "dropout") -> None:
    if p and m.training:
        raise unsupported(m, path, f"{where}={p} in training mode is random; call model.eval() "
                                   "or set it to 0 (curvature needs a deterministic function)")


def _mha_layer(m, path, unsupported, owner=None):
    """refngd MultiheadAttention for a torch nn.MultiheadAttention (checks its settings)."""
    owner = owner if owner is not None else m
    if not m.batch_first:
        raise unsupported(owner, path, "batch_first=False; refngd is batch-first: build it with "
                                       "batch_first=True and transpose (T, N, E) data")
    if m.bias_k is not None or m.add_zero_attn or not m._qkv_same_embed_dim:
        raise unsupported(owner, path, "add_bias_kv, add_zero_attn or kdim/vdim != embed_dim")
    _dropout_off(owner, m.dropout, path, unsupported)
    return nn.MultiheadAttention(m.embed_dim, m.num_heads, bias=m.in_proj_bias is not None)


def _activation_name(act, tnn, F) -> str | None:
    if act is F.relu or isinstance(act, tnn.ReLU):
        return "relu"
    if act is F.gelu or (isinstance(act, tnn.GELU) and act.approximate == "none"):
        return "gelu"
    return None


def install(register, register_builder, unsupported) -> None:
    """Register the converters and builders of this module's layers."""
    torch = _torch()
    tnn, F = torch.nn, torch.nn.functional
    SelfAttention, LoRA = _wrapper_classes()

    def params(m):
        return list(m.parameters())

    def layer_norm(m, path):
        return [(nn.LayerNorm(m.normalized_shape, eps=m.eps,
                              elementwise_affine=m.elementwise_affine,
                              bias=getattr(m, "bias", None) is not None), params(m))]

    def batch_norm(m, path):
        if m.training:
            raise unsupported(m, path, "training mode normalises with the batch's statistics, "
                                       "which couple the samples; call model.eval() so that it "
                                       "uses its running statistics, as refngd does")
        if not m.track_running_stats or m.running_mean is None:
            raise unsupported(m, path, "track_running_stats=False uses batch statistics even in "
                                       "eval mode")
        cls = nn.BatchNorm1d if isinstance(m, tnn.BatchNorm1d) else nn.BatchNorm2d
        layer = cls(m.num_features, eps=m.eps, affine=m.affine, bias=m.bias is not None)
        layer.set_running_stats(to_array(m.running_mean.cpu()), to_array(m.running_var.cpu()))
        return [(layer, params(m))]

    def embedding(m, path):
        return [(nn.Embedding(m.num_embeddings, m.embedding_dim, padding_idx=m.padding_idx,
                              max_norm=m.max_norm, norm_type=m.norm_type,
                              scale_grad_by_freq=m.scale_grad_by_freq, sparse=m.sparse), [m.weight])]

    def avg_pool(m, path):
        return [(nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                              m.count_include_pad, m.divisor_override), [])]

    def max_pool(m, path):
        return [(nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation,
                              m.return_indices, m.ceil_mode), [])]

    def adaptive_avg_pool(m, path):
        return [(nn.AdaptiveAvgPool2d(m.output_size), [])]

    def mha(m, path):
        return [(_mha_layer(m, path, unsupported), params(m))]

    def self_attention(m, path):
        return [(_mha_layer(m.attn, path, unsupported, owner=m), params(m))]

    def encoder_layer(m, path):
        act = _activation_name(m.activation, tnn, F)
        if act is None:
            raise unsupported(m, path, f"activation {m.activation!r}; refngd has 'relu' and "
                                       "'gelu' (exact)")
        if m.norm1.eps != m.norm2.eps:
            raise unsupported(m, path, f"norm1.eps={m.norm1.eps} differs from norm2.eps="
                                       f"{m.norm2.eps}; refngd has one layer_norm_eps")
        for name in ("dropout", "dropout1", "dropout2"):
            _dropout_off(m, getattr(m, name).p, path, unsupported, f"{name}.p")
        attn = _mha_layer(m.self_attn, path, unsupported, owner=m)
        layer = nn.TransformerEncoderLayer(
            m.self_attn.embed_dim, m.self_attn.num_heads, dim_feedforward=m.linear1.out_features,
            activation=act, layer_norm_eps=m.norm1.eps, norm_first=m.norm_first,
            bias=attn.bias)
        return [(layer, params(m))]

    def lora(m, path):
        base = m.base_layer
        return [(nn.LoRALinear(base.in_features, base.out_features, m.rank, m.alpha,
                               bias=base.bias is not None), params(m))]

    from .torch_more import install as install_more  # activations, 1-d pooling, Upsample, ...
    install_more(register, register_builder, unsupported)
    register(tnn.LayerNorm, layer_norm)
    register(tnn.BatchNorm1d, batch_norm)
    register(tnn.BatchNorm2d, batch_norm)
    register(tnn.Embedding, embedding)
    register(tnn.AvgPool2d, avg_pool)
    register(tnn.MaxPool2d, max_pool)
    register(tnn.AdaptiveAvgPool2d, adaptive_avg_pool)
    register(tnn.MultiheadAttention, mha)
    register(SelfAttention, self_attention)
    register(tnn.TransformerEncoderLayer, encoder_layer)
    register(LoRA, lora)

    # ------------------------------------------------------------------ builders
    def build_batch_norm(cls, l):
        # float64 buffers: to_torch casts the whole model to θ's dtype afterwards, and a
        # float32 default here would round the running statistics on the way.
        m = cls(l.num_features, eps=l.eps, affine=l.affine, dtype=torch.float64)
        if l.affine and not l.bias:
            m.register_parameter("bias", None)  # refngd's bias=False; F.batch_norm takes None
        m.running_mean.copy_(torch.tensor(l.running_mean))
        m.running_var.copy_(torch.tensor(l.running_var))
        return m.eval()  # the running statistics, as refngd

    register_builder(nn.LayerNorm, lambda l: tnn.LayerNorm(
        l.normalized_shape, eps=l.eps, elementwise_affine=l.elementwise_affine, bias=l.bias))
    register_builder(nn.BatchNorm1d, functools.partial(build_batch_norm, tnn.BatchNorm1d))
    register_builder(nn.BatchNorm2d, functools.partial(build_batch_norm, tnn.BatchNorm2d))
    register_builder(nn.Embedding, lambda l: tnn.Embedding(
        l.num_embeddings, l.embedding_dim, padding_idx=l.padding_idx, sparse=l.sparse))
    register_builder(nn.AvgPool2d, lambda l: tnn.AvgPool2d(
        l.kernel_size, l.stride, l.padding, ceil_mode=l.ceil_mode,
        count_include_pad=l.count_include_pad, divisor_override=l.divisor_override))
    register_builder(nn.MaxPool2d, lambda l: tnn.MaxPool2d(
        l.kernel_size, l.stride, l.padding, dilation=l.dilation, ceil_mode=l.ceil_mode))
    register_builder(nn.AdaptiveAvgPool2d, lambda l: tnn.AdaptiveAvgPool2d(l.output_size))
    register_builder(nn.MultiheadAttention, lambda l: SelfAttention(l.embed_dim, l.num_heads,
                                                                    bias=l.bias))
    register_builder(nn.TransformerEncoderLayer, lambda l: tnn.TransformerEncoderLayer(
        l.d_model, l.nhead, dim_feedforward=l.dim_feedforward, dropout=0.0,
        activation=l.activation, layer_norm_eps=l.layer_norm_eps, batch_first=True,
        norm_first=l.norm_first, bias=l.bias))
    register_builder(nn.LoRALinear, lambda l: LoRA(l.in_features, l.out_features, l.rank,
                                                   l.alpha, bias=l.bias))
