"""Functional layers with parameters: ``F.linear(x, W, b)``, ``F.layer_norm(x, shape, γ, β)``,
``F.conv1d`` / ``F.conv2d(x, W, b, ...)`` in a traced ``forward`` (:mod:`refngd.check.torch_graph`).

A library that writes a layer as a function of its parameters (timm's ``LayerNorm``, whose
``forward`` calls ``F.layer_norm(x, self.normalized_shape, self.weight, self.bias,
self.eps)``; a hand-written ``F.linear``) imports as the module it stands for: the call's
arguments build that ``torch.nn`` module *around the very same Parameter objects*, and the
module's registered converter (:mod:`refngd.check.interop`) gives the refngd layer — so a
functional form has exactly the rows, K-FAC factors and θ slice of its module, and a layer
that gains a converter gains its functional form.  The parameters must be read only as these
arguments (another use of the same tensor is refused by the caller).

Each entry: the names of the function's positional arguments, in order, and which of them
are parameters; ``module(**arguments)`` builds the module.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

from ..nn.graph import GraphNode, Ref
from .torch_arrays import UnsupportedModuleError
from .torch_trace import META


class FunctionalLayer(NamedTuple):
    """One functional layer: its argument names (the first is the input), the names of
    its parameter arguments, and ``module(**arguments)`` → the equivalent torch module."""

    names: tuple
    params: tuple
    module: Callable


def _with(module, **tensors):
    """``module`` with its parameters replaced by the given Parameter objects (or None)."""
    for name, t in tensors.items():
        if getattr(module, name, None) is not None or t is not None:
            setattr(module, name, t)
    return module


@functools.lru_cache(maxsize=None)
def functional_layers(torch) -> dict:
    """``torch.nn.functional`` function → :class:`FunctionalLayer`."""
    F, tnn = torch.nn.functional, torch.nn

    def linear(weight, bias=None):
        if weight.dim() != 2 or (bias is not None and tuple(bias.shape) != (weight.shape[0],)):
            raise ValueError(f"F.linear with weight {tuple(weight.shape)} and bias "
                             f"{None if bias is None else tuple(bias.shape)}")
        m = tnn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        return _with(m, weight=weight, bias=bias)

    def layer_norm(normalized_shape, weight=None, bias=None, eps=1e-5):
        if weight is None and bias is not None:
            raise ValueError("F.layer_norm with a bias but no weight (refngd's LayerNorm has "
                             "β only beside γ)")
        m = tnn.LayerNorm(normalized_shape, eps=eps, elementwise_affine=weight is not None,
                          bias=bias is not None, device="meta")
        return _with(m, weight=weight, bias=bias)

    def conv(cls, d):
        def make(weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
            if weight.dim() != d + 2:
                raise ValueError(f"a {d}-d convolution with weight {tuple(weight.shape)}")
            m = cls(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                    stride=stride, padding=padding, dilation=dilation, groups=groups,
                    bias=bias is not None, device="meta")
            return _with(m, weight=weight, bias=bias)
        return make

    def batch_norm(running_mean, running_var, weight=None, bias=None, training=False,
                   momentum=0.1, eps=1e-5, input_ndim=None):
        if training:
            raise ValueError("training=True normalises with the batch's statistics, which "
                             "couple the samples; call model.eval()")
        if running_mean is None or running_var is None:
            raise ValueError("no running statistics: the batch's statistics are used")
        if input_ndim not in (2, 3, 4):
            raise ValueError("the input's number of axes is unknown (pass an example batch: "
                             "from_torch(module, X)) or not 2, 3 or 4")
        cls = tnn.BatchNorm2d if input_ndim == 4 else tnn.BatchNorm1d
        m = cls(len(running_mean), eps=eps, momentum=momentum, affine=weight is not None,
                dtype=torch.float64).eval()
        m.running_mean = torch.as_tensor(running_mean)
        m.running_var = torch.as_tensor(running_var)
        if (weight is None) != (bias is None):
            raise ValueError("F.batch_norm with only one of weight and bias (refngd's BatchNorm "
                             "has both or neither)")
        return _with(m, weight=weight, bias=bias)

    def embedding(weight, padding_idx=None, max_norm=None, norm_type=2.0,
                  scale_grad_by_freq=False, sparse=False):
        if weight.dim() != 2:
            raise ValueError(f"F.embedding with weight {tuple(weight.shape)}")
        m = tnn.Embedding(weight.shape[0], weight.shape[1], padding_idx=padding_idx,
                          max_norm=max_norm, norm_type=norm_type,
                          scale_grad_by_freq=scale_grad_by_freq, sparse=sparse, device="meta")
        return _with(m, weight=weight)

    conv_names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    return {
        F.linear: FunctionalLayer(("input", "weight", "bias"), ("weight", "bias"), linear),
        F.layer_norm: FunctionalLayer(("input", "normalized_shape", "weight", "bias", "eps"),
                                      ("weight", "bias"), layer_norm),
        F.conv1d: FunctionalLayer(conv_names, ("weight", "bias"), conv(tnn.Conv1d, 1)),
        F.conv2d: FunctionalLayer(conv_names, ("weight", "bias"), conv(tnn.Conv2d, 2)),
        F.batch_norm: FunctionalLayer(("input", "running_mean", "running_var", "weight", "bias",
                                       "training", "momentum", "eps"), ("weight", "bias"),
                                      batch_norm),
        F.embedding: FunctionalLayer(("input", "weight", "padding_idx", "max_norm", "norm_type",
                                      "scale_grad_by_freq", "sparse"), ("weight",), embedding),
    }


def _option_key(v):
    """A hashable stand-in for an option's value (arrays by content: running statistics)."""
    if hasattr(v, "tobytes") and hasattr(v, "shape"):   # a host array (a buffer's value)
        return (tuple(v.shape), str(v.dtype), v.tobytes())
    if isinstance(v, (list, tuple)):
        return tuple(_option_key(u) for u in v)
    try:
        hash(v)
        return v
    except TypeError:
        return repr(v)


def bind(spec: FunctionalLayer, args, kwargs) -> dict:
    """The call's arguments by name (positional ones named from ``spec.names``)."""
    if len(args) > len(spec.names):
        raise ValueError(f"{len(args)} positional arguments; at most {len(spec.names)}")
    bound = dict(zip(spec.names, args))
    for k, v in kwargs.items():
        if k not in spec.names or k in bound:
            raise ValueError(f"unexpected argument {k!r}")
        bound[k] = v
    return bound


class FunctionalLayers:
    """The converter's part for functional layers (mixed into ``torch_graph._Converter``,
    whose state — ``kind``, ``index``, ``layers``, ``registry``, ``tensor_id`` — and helpers
    — ``refuse``, ``is_param``, ``is_act``, ``add``, ``arg``, ``where`` — it uses)."""

    def _layer_operand(self, user, node) -> bool:
        """``node`` is a parameter argument (not the input) of a functional layer at ``user``
        (``F.linear(x, W, b)``, ``F.layer_norm(x, shape, γ, β)``, ...)."""
        spec = functional_layers(self.torch).get(user.target)
        if spec is None:
            return False
        try:
            bound = bind(spec, user.args, user.kwargs)
        except ValueError:
            return False
        return (bound.get(spec.names[0]) is not node
                and any(bound.get(k) is node for k in spec.params))

    def _layer_call(self, node, spec, args, kw):
        """A functional layer whose parameters are read only there: the torch module it
        stands for, built around the same Parameter objects, through its converter
        (:mod:`refngd.check.torch_functional`; one call site per parameter tuple, another
        call site with the same tensors ties them)."""
        fname = getattr(node.target, "__name__", node.target)
        try:
            bound = bind(spec, args, kw)
        except ValueError as err:
            raise self.refuse(node, f"F.{fname}: {err}") from None
        x = bound.pop(spec.names[0], None)
        tensors = {k: bound.get(k) for k in spec.params}
        if self.is_param(tuple(tensors.values())):
            raise self.refuse_param(node, f"{fname!r} and another operation")
        own = all(t is None or self.kind.get(t) == "layer_param" for t in tensors.values())
        if fname == "embedding" and own and self.kind.get(x) in ("const", "static"):
            # constant indices (position ids): the weight used directly, as for the module
            bound["weight"] = self.index[tensors["weight"]]
            return self._lookup(node, spec.module(**bound), x, tensors["weight"].target)
        if not self.is_act(x) or not own:
            raise self.refuse(node, f"F.{fname} imports as a layer when its input is an "
                                    "activation and its weights are parameters (a constant or "
                                    "computed weight has no converter)")
        for k, v in list(bound.items()):   # buffers (running statistics): their values
            if k not in spec.params and self.kind.get(v) == "const":
                bound[k] = self.index[v]
        if any(isinstance(v, self.torch.fx.Node) for k, v in bound.items()
               if k not in spec.params):
            raise self.refuse(node, f"F.{fname} with an argument computed in forward; refngd "
                                    "needs its shapes and options as constants (with an example "
                                    "batch, from_torch(module, X), a shape read from an "
                                    "activation is one)")
        bound.update({k: None if t is None else self.index[t] for k, t in tensors.items()})
        if fname == "batch_norm":
            meta = x.meta.get(META)
            bound["input_ndim"] = None if meta is None else meta.ndim
        # one layer per call site's tensors *and* options: a second call with the same
        # tensors and options ties them; other options (eps, padding, padding_idx, running
        # statistics, the input's rank) make another layer on the same tensors
        key = (fname,) + tuple(id(bound[k]) for k in spec.params) + tuple(
            (k, _option_key(v)) for k, v in sorted(bound.items()) if k not in spec.params)
        if key not in self.layers:
            try:
                module = spec.module(**bound)
                self.layers[key] = self.registry[type(module)](module, node.name)
            except (TypeError, ValueError) as err:
                raise self.refuse(node, f"F.{fname}: {err}") from None
            except UnsupportedModuleError as err:
                raise self.refuse(node, f"F.{fname}: {err}") from None
        src = self.arg(x)
        for layer, ts in self.layers[key]:
            ids = tuple(self.tensor_id[id(t)] for t in ts)
            i = self.add(node, "act", GraphNode("layer", layer, (src,), ids,
                                                f"{self.where(node)} (F.{fname})"))
            src = Ref(i)
        return i
