"""PyTorch ⇄ refngd (``refngd.interop``): a ``torch.nn`` model, its loss and its tensors as refngd objects.

``from_torch(module)`` returns ``(model, theta)``: a :class:`refngd.nn.Sequential` twin and
θ in exactly ``torch.nn.utils.parameters_to_vector(module.parameters())`` order
(docs/conventions.md), in the module's dtype.  ``to_torch(model, theta)`` goes back.
``from_torch_loss(loss_module)`` maps ``CrossEntropyLoss``, ``MSELoss`` and
``BCEWithLogitsLoss`` (with their ``reduction``) to refngd's losses.

Conversion is a *registry*: one converter per ``torch.nn`` module type, and one builder
per refngd layer type for the way back.  A new refngd layer becomes convertible with one
:func:`register` call (and one :func:`register_builder` for :func:`to_torch`) here or in
:mod:`refngd.check.torch_layers`; nothing else changes (``refngd check`` reads JSON without torch,
through the table in :mod:`refngd.check.files`, which needs the layer's entry too).
The converters of the normalisation, embedding, pooling, attention, Transformer and LoRA
layers live in :mod:`refngd.check.torch_layers`, with the two small torch modules
(:func:`self_attention_module`, :func:`lora_linear_module`) that stand in where
``torch.nn`` has no single-input module.  A module without a converter raises
:class:`UnsupportedModuleError` naming its type and its path in the model (``"2.1"``).

Tensors: CPU tensors become NumPy arrays (copied, so that a later in-place update of the
PyTorch model cannot change refngd's θ); CUDA tensors become CuPy arrays through DLPack,
without a round trip through host memory, when CuPy is installed.  torch is an optional
dependency (``pip install 'refngd[torch]'``), imported only when these functions run.
"""
from __future__ import annotations

import copy
from typing import Callable

from .. import losses as _losses
from .. import nn
from ..backend import Array
from .torch_arrays import UnsupportedModuleError, _torch, to_array, to_tensor
from .torch_hf import install as install_optional

__all__ = ["from_torch", "to_torch", "from_torch_loss", "to_array", "to_tensor", "register",
           "register_builder", "UnsupportedModuleError", "self_attention_module",
           "lora_linear_module", "mean_module"]


def self_attention_module(embed_dim: int, num_heads: int, bias: bool = True):
    """A torch self-attention module for ``nn.Sequential``: see :mod:`refngd.check.torch_layers`."""
    from .torch_layers import self_attention_module as make
    return make(embed_dim, num_heads, bias=bias)


def lora_linear_module(in_features: int, out_features: int, rank: int, alpha: float,
                       bias: bool = True):
    """A minimal torch LoRA layer (PEFT's names): see :mod:`refngd.check.torch_layers`."""
    from .torch_layers import lora_linear_module as make
    return make(in_features, out_features, rank, alpha, bias=bias)


def mean_module(dim=1, keepdim: bool = False):
    """A torch module ``x.mean(dim=dim, keepdim=keepdim)`` (the twin of ``refngd.nn.Mean``):
    see :mod:`refngd.check.torch_more`."""
    from .torch_more import mean_module as make
    return make(dim, keepdim)


# --------------------------------------------------------------------------- registry
#: torch module type -> converter(module, path) -> list of (refngd layer, [param tensors])
_CONVERTERS: dict[type, Callable] = {}
#: refngd layer type -> builder(layer) -> torch module (parameters filled in afterwards)
_BUILDERS: dict[type, Callable] = {}
_DEFAULTS_LOADED = False


def register(torch_type: type, converter: Callable | None = None):
    """Register ``converter(module, path) -> [(refngd_layer, [tensors in θ order]), ...]``.

    The tensors of all converted layers, concatenated, must be exactly the module's
    ``parameters()`` in order; :func:`from_torch` checks the total count.  Usable as a
    decorator: ``@register(torch.nn.LayerNorm)``.
    """
    if converter is None:
        return lambda fn: register(torch_type, fn)
    _CONVERTERS[torch_type] = converter
    return converter


def register_builder(layer_type: type, builder: Callable | None = None):
    """Register ``builder(layer) -> torch.nn.Module`` for :func:`to_torch`."""
    if builder is None:
        return lambda fn: register_builder(layer_type, fn)
    _BUILDERS[layer_type] = builder
    return builder


def _unsupported(module, path: str, why: str = "") -> UnsupportedModuleError:
    where = f"at {path!r}" if path else "at the top level"
    extra = f" ({why})" if why else ""
    known = ", ".join(sorted(t.__name__ for t in _CONVERTERS))
    return UnsupportedModuleError(
        f"{type(module).__name__} {where} of the model is not supported{extra}; refngd converts "
        f"{known}. Register a converter with refngd.interop.register if refngd has the layer.")


def _params(module) -> list:
    return [p for p in (module.weight, module.bias) if p is not None]


def _load_defaults() -> None:
    """The converters of every layer in :mod:`refngd.nn` (torch imported on first use)."""
    global _DEFAULTS_LOADED
    if _DEFAULTS_LOADED:
        return
    tnn = _torch().nn

    def linear(m, path):
        return [(nn.Linear(m.in_features, m.out_features, bias=m.bias is not None), _params(m))]

    def conv(m, path):
        if m.padding_mode != "zeros":
            raise _unsupported(m, path, f"padding_mode={m.padding_mode!r}; only 'zeros'")
        if isinstance(m.padding, str):
            raise _unsupported(m, path, f"padding={m.padding!r}; give the padding as integers")
        cls = nn.Conv1d if isinstance(m, tnn.Conv1d) else nn.Conv2d
        layer = cls(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                    padding=m.padding, dilation=m.dilation, groups=m.groups,
                    bias=m.bias is not None)
        return [(layer, _params(m))]

    def flatten(m, path):
        if m.start_dim != 1 or m.end_dim != -1:
            raise _unsupported(m, path, f"start_dim={m.start_dim}, end_dim={m.end_dim}; "
                                        "refngd flattens all but the batch axis")
        return [(nn.Flatten(), [])]

    def gelu(m, path):
        return [(nn.GELU(m.approximate), [])]

    register(tnn.Linear, linear)
    register(tnn.Conv2d, conv)
    register(tnn.Conv1d, conv)
    register(tnn.Flatten, flatten)
    register(tnn.GELU, gelu)
    for t_type, r_type in ((tnn.ReLU, nn.ReLU), (tnn.Tanh, nn.Tanh), (tnn.Sigmoid, nn.Sigmoid)):
        register(t_type, lambda m, path, r_type=r_type: [(r_type(), [])])

    register_builder(nn.Linear, lambda l: tnn.Linear(l.in_features, l.out_features, bias=l.bias))
    for r_type, t_type in ((nn.Conv2d, tnn.Conv2d), (nn.Conv1d, tnn.Conv1d)):
        register_builder(r_type, lambda l, t_type=t_type: t_type(
            l.in_channels, l.out_channels, l.kernel_size, stride=l.stride, padding=l.padding,
            dilation=l.dilation, groups=l.groups, bias=l.bias))
    register_builder(nn.Flatten, lambda l: tnn.Flatten())
    register_builder(nn.GELU, lambda l: tnn.GELU(approximate=l.approximate))
    for r_type, t_type in ((nn.ReLU, tnn.ReLU), (nn.Tanh, tnn.Tanh), (nn.Sigmoid, tnn.Sigmoid)):
        register_builder(r_type, lambda l, t_type=t_type: t_type())
    from .torch_layers import install  # LayerNorm ... TransformerEncoderLayer, LoRA
    install(register, register_builder, _unsupported)
    _DEFAULTS_LOADED = True


def _walk(module, path: str, out: list) -> None:
    """Depth-first over (nested) ``nn.Sequential``; every leaf goes through its converter."""
    tnn = _torch().nn
    if isinstance(module, tnn.Sequential):
        for name, child in module.named_children():
            _walk(child, f"{path}.{name}" if path else name, out)
        return
    conv = next((fn for t, fn in _CONVERTERS.items() if type(module) is t), None)
    if conv is None:
        raise _unsupported(module, path)
    try:
        out.extend(conv(module, path))
    except ValueError as err:  # a refngd constructor refusing a setting: say where it is
        raise _unsupported(module, path, str(err)) from None


# --------------------------------------------------------------------------- models
def from_torch(module, example=None) -> tuple[nn.Sequential | nn.GraphModel, Array]:
    """The refngd twin of a ``torch.nn`` model and its parameters θ.

    Parameters
    ----------
    module : any ``torch.nn.Module`` whose ``forward`` ``torch.fx`` can trace, built from
        modules with a registered converter — Linear, Conv2d, Flatten, ReLU, Tanh, Sigmoid,
        GELU, LayerNorm, BatchNorm1d/2d (``eval()`` mode; the running statistics are
        copied), Embedding, AvgPool2d, MaxPool2d, AdaptiveAvgPool2d, MultiheadAttention (as
        self-attention; :func:`self_attention_module` for use in ``nn.Sequential``),
        TransformerEncoderLayer (``batch_first=True``, dropout 0 or ``eval()``) and
        :func:`lora_linear_module` (docs/validating.md lists the settings) — and the
        operations of docs/layers.md ("Operations in a traced forward").
    example : optional batch of inputs (N, ...) (an array or tensor; integer token ids for
        a language model).  With it the module is traced with concrete shapes
        (:mod:`refngd.check.torch_trace`; docs/design.md §6, "Model libraries") — what the
        models of ``transformers`` and ``peft`` need, whose ``forward`` reads shapes,
        dtypes and devices — and the import is checked against the module on it.  The
        per-sample shape (sequence length, image size) is then the example's.

    Returns
    -------
    model : a plain ``nn.Sequential`` (nested allowed; not a subclass, no module used
        twice) of such modules, or one such module: a :class:`refngd.nn.Sequential`,
        converted child by child.  Anything else: a :class:`refngd.nn.GraphModel` of the
        traced forward (:mod:`refngd.check.torch_graph`); a parameter used twice is one
        slice of θ (docs/kfac.md, "Tied weights"), and every node refngd cannot reproduce
        is refused with its name, op, target and source line.
    theta : (P,) float64 or float32 as the module's parameters (which must share one
        dtype and device), equal element for element to
        ``parameters_to_vector(module.parameters())``; a NumPy array (CPU) or a CuPy array
        (CUDA, through DLPack).  Memory of its own: later changes to the module do not
        change θ.

    Each layer's ``trainable`` flags are the tensors' ``requires_grad``, so ``params=None``
    in a curvature or update means the torch model's trainable parameters (docs/subsets.md).
    """
    torch = _torch()
    _load_defaults()
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"from_torch needs a torch.nn.Module, got {type(module).__name__}.")
    install_optional(_CONVERTERS, register)  # transformers' Conv1D, once it is imported
    _check_example(example)
    if example is not None or not _is_chain(module):
        return _graph(module, example)
    pairs: list = []
    _walk(module, "", pairs)
    tensors = [t for _, ts in pairs for t in ts]
    expected = list(module.parameters())
    if len(tensors) != len(expected) or any(a is not b for a, b in zip(tensors, expected)):
        raise ValueError("the converted layers' parameters are not the module's parameters() in "
                         "order (a converter or a shared parameter); θ would be misaligned.")
    _check_tensors(tensors)
    for layer, ts in pairs:  # requires_grad becomes the default selection
        if ts:
            layer.trainable = tuple(t.requires_grad for t in ts)
    flat = _torch().cat([t.detach().reshape(-1) for t in tensors])
    return nn.Sequential(*[layer for layer, _ in pairs]), to_array(flat)


def _check_example(example) -> None:
    """One batch (N, ...), never a mapping or a tuple of inputs (curvlinops' dict inputs)."""
    import collections.abc as abc
    torch = _torch()
    if isinstance(example, abc.Mapping) or (
            isinstance(example, (tuple, list))
            and any(isinstance(e, (torch.Tensor, abc.Mapping)) for e in example)):
        what = (f"a {type(example).__name__} with keys {list(example)}"
                if isinstance(example, abc.Mapping) else
                f"a {type(example).__name__} of {len(example)} inputs")
        raise TypeError(f"from_torch's example is {what}: refngd's models take one array X "
                        "(N, ...).  Wrap the module in one whose forward(self, x) builds the "
                        "input, e.g. return self.net({'x': x}).")


def _is_chain(module) -> bool:
    """True for a plain ``nn.Sequential`` (nested allowed, never a subclass: its forward may
    differ) of ``torch.nn`` modules or modules with a converter, none used twice — or one
    such module: converted child by child.  Everything else is traced
    (:mod:`refngd.check.torch_graph`)."""
    tnn = _torch().nn
    if type(module) is tnn.Sequential:
        children = list(module._modules.values())
        if (len(set(map(id, children))) != len(children)
                or len(list(module.named_parameters(remove_duplicate=False)))
                != len(list(module.parameters()))):
            return False  # a module (or parameter) used twice: weight tying, traced
        return all(_is_chain(child) for child in module.children())
    if isinstance(module, tnn.Sequential):
        return False
    return type(module) in _CONVERTERS or type(module).__module__.startswith("torch.nn.")


def _check_tensors(tensors) -> None:
    """At least one parameter, one dtype (float64 or float32), one device."""
    torch = _torch()
    if not tensors:
        raise ValueError("the model has no parameters: nothing to validate.")
    dtypes = {t.dtype for t in tensors}
    devices = {t.device for t in tensors}
    if len(dtypes) != 1 or len(devices) != 1:
        raise ValueError(f"all parameters must share one dtype and device, got {dtypes} on "
                         f"{devices}.")
    dtype = dtypes.pop()
    if dtype not in (torch.float64, torch.float32):
        raise TypeError(f"parameters must be float64 or float32, got {dtype}; call model.double().")


def _graph(module, example=None):
    """A traced module as a :class:`refngd.nn.GraphModel` and θ (:func:`from_torch`)."""
    from .torch_graph import graph_from_torch
    from .torch_trace import check_import
    _check_tensors(list(module.parameters()))
    model, tensors = graph_from_torch(module, _CONVERTERS, _unsupported, example)
    for i, layer in enumerate(model.layers):  # requires_grad becomes the default selection
        flags = []
        for slot in model.layout.of_layer(i):
            flags.append(tensors[model.layout.slots.index(slot)].requires_grad)
        layer.trainable = tuple(flags)
    model.source = copy.deepcopy(module)  # for to_torch: the same forward, θ loaded into it
    flat = to_array(_torch().cat([t.detach().reshape(-1) for t in tensors]))
    if example is not None:
        check_import(module, model, flat, example)
    return model, flat


def to_torch(model: nn.Sequential | nn.GraphModel, theta: Array):
    """A ``torch.nn.Sequential`` equal to ``model`` with parameters θ (copied; θ's dtype);
    for a :class:`refngd.nn.GraphModel`, a copy of the module it was imported from.

    A CuPy θ gives a CUDA model (through DLPack).  ``from_torch(to_torch(model, θ))``
    returns θ exactly.  ``requires_grad`` is each layer's ``trainable`` flag; BatchNorm
    layers carry their running statistics and are in ``eval()`` mode.
    """
    torch = _torch()
    _load_defaults()
    model._check_theta(theta)
    if getattr(model, "source", None) is not None:  # an imported graph: its own module
        return _graph_to_torch(model, theta)
    mods = []
    for i, layer in enumerate(model.layers):
        builder = _BUILDERS.get(type(layer))
        if builder is None:
            raise UnsupportedModuleError(f"layer {i} ({layer!r}) has no PyTorch builder; "
                                         "register one with refngd.interop.register_builder.")
        mods.append(builder(layer))
    t = to_tensor(theta)
    net = torch.nn.Sequential(*mods).to(dtype=t.dtype, device=t.device)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(t, net.parameters())
    for layer, mod in zip(model.layers, mods):
        for p, on in zip(mod.parameters(), getattr(layer, "trainable", ())):
            p.requires_grad_(bool(on))
    return net


def _graph_to_torch(model, theta):
    """A copy of the module a :class:`refngd.nn.GraphModel` was imported from, with θ."""
    torch = _torch()
    t = to_tensor(theta)
    net = copy.deepcopy(model.source).to(dtype=t.dtype, device=t.device)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(t, net.parameters())
    flags = [f for layer in model.layers for f in layer.trainable]
    for p, on in zip(net.parameters(), flags):
        p.requires_grad_(bool(on))
    return net


# --------------------------------------------------------------------------- losses
def from_torch_loss(loss_module, output_shape: tuple | None = None):
    """refngd's loss for ``CrossEntropyLoss``, ``MSELoss`` or ``BCEWithLogitsLoss``.

    The reduction carries over (``"mean"`` / ``"sum"``; ``"none"`` has no single c and is
    refused), so ``loss(Z, y)`` equals the torch loss on the same outputs.  Class weights,
    ``pos_weight``, ``ignore_index`` hits and label smoothing change the likelihood and are
    refused with a message rather than silently ignored.

    ``output_shape``: the torch model's per-sample output shape, when it has more than one
    axis (refngd's twin flattens it).  ``CrossEntropyLoss`` reads its class axis at
    dimension 1, so (C, d1, ...) gives ``PerToken(CrossEntropy(), d1·..., class_dim=1)``;
    the elementwise ``MSELoss`` and ``BCEWithLogitsLoss`` are the same on flattened outputs.
    """
    base = _from_torch_loss(loss_module)
    shape = tuple(output_shape) if output_shape is not None else ()
    if len(shape) > 1 and isinstance(base, _losses.CrossEntropy):
        T = 1
        for d in shape[1:]:
            T *= int(d)
        return _losses.PerToken(base, T, class_dim=1)
    return base


def _from_torch_loss(loss_module):
    tnn = _torch().nn
    name = type(loss_module).__name__
    red = getattr(loss_module, "reduction", None)
    if red not in ("mean", "sum"):
        raise ValueError(f"{name}(reduction={red!r}): refngd needs reduction 'mean' or 'sum'.")
    if isinstance(loss_module, tnn.CrossEntropyLoss):
        if loss_module.weight is not None:
            raise ValueError("CrossEntropyLoss(weight=...) is not supported: class weights "
                             "change the likelihood; validate without them.")
        if loss_module.label_smoothing != 0:
            raise ValueError(f"CrossEntropyLoss(label_smoothing={loss_module.label_smoothing}) "
                             "is not supported; use label_smoothing=0.")
        return _losses.CrossEntropy(red)
    if isinstance(loss_module, tnn.MSELoss):
        return _losses.MSELoss(red)
    if isinstance(loss_module, tnn.BCEWithLogitsLoss):
        if loss_module.weight is not None or loss_module.pos_weight is not None:
            raise ValueError("BCEWithLogitsLoss with weight / pos_weight is not supported.")
        return _losses.BCEWithLogits(red)
    raise UnsupportedModuleError(f"loss {name} is not supported; refngd has CrossEntropyLoss, "
                                 "MSELoss and BCEWithLogitsLoss.")
