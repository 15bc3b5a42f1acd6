"""Shape-concrete ``torch.fx`` tracing: the capture of models whose ``forward`` reads the
shapes, dtypes and devices of its tensors (Hugging Face ``transformers``, ``peft``) —
docs/design.md §6, "Which tracer".

Plain symbolic tracing turns ``x.shape[1]`` into a proxy, so ``if x.shape[1] != 3:`` and
``torch.arange(x.shape[1])`` stop it.  Given an example input, :func:`trace_concrete`
traces with proxies that carry a *meta* tensor (shapes and dtypes, no data) of the example's
per-sample shape and a sentinel batch size (:func:`sentinel`): shapes, dtypes and devices are
plain Python values, so control flow on them runs as Python; tensors computed from them
alone (position ids, causal masks) are computed once, eagerly, and become constants of the
graph.  Control flow on *values* of the data or the parameters still stops the tracer
(a proxy's ``bool``): refngd does not specialise a model to one input.

The batch size is the one shape that must stay free: every integer argument equal to the
sentinel becomes the running batch size, and a constant with the sentinel as its first axis
(a mask expanded to the batch) must be the same for every sample and keeps one copy.
"""
from __future__ import annotations

import functools
import inspect
import math
import os
import traceback

import numpy as np

from ..nn.graph_ops import BatchAxisError
from .torch_arrays import UnsupportedModuleError, _torch, to_array

__all__ = ["BATCH", "META", "sentinel", "trace", "trace_concrete", "culprit", "check_import"]

#: the sentinel batch sizes of the meta example: the first of these primes that is no
#: dimension of a parameter, a buffer or the example (the import also checks the traced
#: model against PyTorch on the real example)
BATCH = (1031, 1033, 1039, 1049, 1051, 1061, 1063, 1069)


def sentinel(module, example_shape) -> int:
    """The batch size to trace with: a prime from :data:`BATCH` no known size equals."""
    sizes = set(example_shape)
    for t in [*module.parameters(), *module.buffers()]:
        sizes.update(t.shape)
    for b in BATCH:
        if b not in sizes:
            return b
    raise ValueError("every sentinel batch size is a dimension of the model")
#: the key of ``node.meta`` that holds each traced value's meta tensor
META = "refngd_meta"


def _to_meta(torch, value):
    if isinstance(value, torch.fx.Proxy):
        meta = value.node.meta.get(META)
        if meta is None:
            raise ValueError(f"no shape is known for {value.node.name}")
        return meta
    if isinstance(value, torch.Tensor):
        return value.to("meta")
    if isinstance(value, torch.device):  # x.to(y.device): stay on the meta device
        return torch.device("meta")
    if isinstance(value, (tuple, list)):
        return type(value)(_to_meta(torch, v) for v in value)
    if isinstance(value, dict):
        return {k: _to_meta(torch, v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(*(_to_meta(torch, v) for v in (value.start, value.stop, value.step)))
    return value


@functools.lru_cache(maxsize=None)
def _classes():
    torch = _torch()
    fx = torch.fx

    class ShapeProxy(fx.Proxy):
        """A proxy whose shape, dtype and device are Python values (its meta tensor)."""

        def _meta(self):
            meta = self.node.meta.get(META)
            if meta is None:
                why = self.node.meta.get("refngd_meta_error", "not a tensor")
                raise fx.proxy.TraceError(f"the shape of {self.node.name} is unknown ({why})")
            return meta

        def size(self, dim=None):
            return self._meta().size() if dim is None else self._meta().size(dim)

        def dim(self):
            return self._meta().dim()

        def numel(self):
            return self._meta().numel()

        def is_floating_point(self):
            return self._meta().is_floating_point()

        def __len__(self):
            return self._meta().shape[0]

        @property
        def shape(self):
            return self._meta().shape

        @property
        def ndim(self):
            return self._meta().ndim

        @property
        def dtype(self):
            return self._meta().dtype

        @property
        def device(self):
            return self.tracer.device

        @property
        def is_cuda(self):
            return self.tracer.device.type == "cuda"

    class ConcreteTracer(fx.Tracer):
        """Leaf modules as the converter registry says; metas for every created node."""

        def __init__(self, leaf, device):
            super().__init__(autowrap_modules=(math,))
            self.leaf, self.device = leaf, device
            self.constants: dict = {}
            self._depth = 0  # > 0 while a leaf module's meta output is computed

        def is_leaf_module(self, m, qualname):
            return self.leaf(m) or super().is_leaf_module(m, qualname)

        def proxy(self, node):
            return ShapeProxy(node, self)

        def getattr(self, attr, attr_val, parameter_proxy_cache):
            if self._depth:
                return attr_val
            return super().getattr(attr, attr_val, parameter_proxy_cache)

        def call_module(self, m, forward, args, kwargs):
            if self._depth or transient(self, m):
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

        def create_arg(self, a):
            if (isinstance(a, torch.Tensor) and not isinstance(a, torch.nn.Parameter)
                    and a not in self.tensor_attrs):
                name = f"_refngd_constant{len(self.constants)}"
                self.constants[name] = a
                return self.create_node("get_attr", name, (), {})
            if type(a).__module__.startswith("transformers.cache_utils"):
                return None  # a key/value cache among the outputs (use_cache=True): unused
            return super().create_arg(a)

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None,
                         proxy_factory_fn=None):
            proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr,
                                         proxy_factory_fn)
            try:
                proxy.node.meta[META] = self._meta(kind, target, args, kwargs)
            except Exception as err:  # noqa: BLE001 - a value of unknown shape
                proxy.node.meta[META] = None
                proxy.node.meta["refngd_meta_error"] = f"{type(err).__name__}: {err}"
            return proxy

        def _meta(self, kind, target, args, kwargs):
            if kind == "placeholder":
                return self.example if self.example is not None else None
            if kind == "get_attr":
                value = self.constants.get(target)
                if value is None:
                    value = self.root
                    self._depth += 1  # plain attributes, not proxies
                    try:
                        for part in target.split("."):
                            value = getattr(value, part)
                    finally:
                        self._depth -= 1
                return value.to("meta") if isinstance(value, torch.Tensor) else None
            margs, mkw = _to_meta(torch, args), _to_meta(torch, kwargs)
            if kind == "call_function":
                return target(*margs, **mkw)
            if kind == "call_method":
                return getattr(margs[0], target)(*margs[1:], **mkw)
            if kind == "call_module":  # the leaf with meta parameters and buffers
                module = self.root.get_submodule(target)
                state = {k: v.to("meta") for k, v in
                         [*module.named_parameters(), *module.named_buffers()]}
                self._depth += 1
                try:
                    return torch.func.functional_call(module, state, tuple(margs), mkw)
                finally:
                    self._depth -= 1
            return None

        def trace(self, root, concrete_args=None, example=None):
            self.example = example
            return super().trace(root, concrete_args)

    return ConcreteTracer


def transient(tracer, m) -> bool:
    """``m`` was created in ``forward`` (DistilBERT's ``nn.ReLU()(x)``) and holds no tensors:
    traced through its own forward (its functional calls), as torch.fx cannot name it.  One
    with parameters or buffers (new random weights at every call) stays refused by torch.fx."""
    try:
        tracer.path_of_module(m)
        return False
    except NameError:
        return next(iter(m.parameters()), None) is None and next(iter(m.buffers()), None) is None


def trace(module, registry: dict, example):
    """The root, fx graph and constants of ``module.forward``: a symbolic trace (the
    other arguments of ``forward`` fixed to their defaults), or with ``example`` a batch of
    inputs, :func:`trace_concrete`.  ``registry``'s module types stay leaves."""
    torch = _torch()
    leaf = lambda m: type(m) in registry  # noqa: E731
    if example is not None:
        dtype = (torch.long if np.asarray(example).dtype.kind in "iu"
                 else next(module.parameters()).dtype)
        return trace_concrete(module, tuple(np.shape(example)[1:]), dtype, leaf)
    params = list(inspect.signature(module.forward).parameters.values())
    concrete = {p.name: p.default for p in params[1:]
                if p.default is not inspect.Parameter.empty}

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return leaf(m) or super().is_leaf_module(m, qualname)

        def call_module(self, m, forward, args, kwargs):
            if transient(self, m):
                return forward(*args, **kwargs)
            return super().call_module(m, forward, args, kwargs)

    tracer = Tracer()
    tracer.record_stack_traces = True
    return module, drop_unused(tracer.trace(module, concrete_args=concrete or None)), {}


def drop_unused(graph):
    """``graph`` without the nodes whose value nothing uses and that change nothing.

    Library code asks questions of its input that a trace records as nodes whose result
    only decides a branch, e.g. transformers' ``is_jax_jitting(x)``: with jax installed
    ``hasattr(proxy, "jax")`` is true and ``x.jax()`` becomes a node nobody uses.  Such a
    node does not contribute to the output; in-place methods (``add_``), ``setitem`` and
    the graph's placeholders and output are kept, so a mutation is still seen (and
    refused where refngd has no rows for it).
    """
    import operator

    keep = {operator.setitem, operator.delitem}
    changed = True
    while changed:
        changed = False
        for node in reversed(list(graph.nodes)):
            if node.users or node.op in ("placeholder", "output"):
                continue
            name = getattr(node.target, "__name__", node.target if isinstance(node.target, str) else "")
            if node.target in keep or str(name).endswith("_"):
                continue
            graph.erase_node(node)
            changed = True
    return graph


def trace_concrete(module, example_shape: tuple, example_dtype, leaf):
    """Trace ``module(x)`` for a meta input x (:func:`sentinel`, *example_shape) of
    ``example_dtype``; ``leaf(m)`` says which modules stay single nodes.

    The root traced is a wrapper whose ``forward(x)`` calls ``module(x)`` (its other
    arguments keep their defaults, ``**kwargs`` included), so every path starts with
    ``"m."``.  Returns the wrapper, the fx graph and the constants it computed.
    """
    torch = _torch()
    params = list(module.parameters())
    device = params[0].device if params else torch.device("cpu")
    root = _root_class()(module)
    tracer = _classes()(leaf, device)
    tracer.record_stack_traces = True
    batch = sentinel(module, example_shape)
    example = torch.empty((batch,) + tuple(example_shape), dtype=example_dtype, device="meta")
    graph = drop_unused(tracer.trace(root, example=example))
    graph.refngd_batch = batch
    return root, graph, tracer.constants


@functools.lru_cache(maxsize=None)
def _root_class():
    torch = _torch()

    class Root(torch.nn.Module):
        """``forward(x) = m(x)``: the one-input root of a concrete trace."""

        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x)

    return Root


def culprit(err) -> str:
    """The innermost frame outside torch of a failed trace: the construct that stopped it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # refngd's own
    frames = [f for f in traceback.extract_tb(err.__traceback__)
              if "/torch/" not in f.filename and not f.filename.startswith(here)]
    if not frames:
        return ""
    f = frames[-1]
    return f' at File "{f.filename}", line {f.lineno}, in {f.name}: {(f.line or "").strip()}'


def _example_arrays(module, example):
    """The example batch as a NumPy array and as a tensor of the module's dtype."""
    torch = _torch()
    X = example.detach().cpu().numpy() if isinstance(example, torch.Tensor) else np.asarray(example)
    if X.ndim < 1 or X.shape[0] < 1:
        raise ValueError(f"example must be a batch (N, ...) with N >= 1, got {X.shape}.")
    p = next(module.parameters())
    Xt = torch.as_tensor(X, device=p.device)
    if X.dtype.kind == "f":
        Xt = Xt.to(p.dtype)
        X = X.astype(to_array(p.detach()[:1]).dtype)
    return X, Xt


def check_import(module, model, theta, example) -> None:
    """The imported graph must compute the module's outputs on the example batch."""
    torch = _torch()
    X, Xt = _example_arrays(module, example)
    with torch.no_grad():
        out = module(Xt)
    out = getattr(out, "logits", out)
    if isinstance(out, (tuple, list)):
        out = out[0]
    ref = to_array(out.reshape(out.shape[0], -1).detach())
    try:
        got = model.forward(theta, X)
    except UnsupportedModuleError:
        raise  # a refusal of an operation (its own message names the node and the reason)
    except BatchAxisError as err:  # the same: an operation over the batch axis, named
        raise UnsupportedModuleError(f"{type(module).__name__}.forward: {err}") from None
    except (ValueError, TypeError, IndexError) as err:
        raise UnsupportedModuleError(
            f"the graph traced from {type(module).__name__}.forward fails on the example batch "
            f"({err}); a shape traced with the sentinel batch size may have been taken for "
            "another size, or a size of the example was specialised: please report it.") from None
    scale = float(np.max(np.abs(ref))) + 1.0
    err = float(np.max(np.abs(np.asarray(got) - np.asarray(ref)))) if got.shape == ref.shape \
        else float("inf")
    tol = 1e-9 if ref.dtype == np.float64 else 1e-4
    if not err <= tol * scale:
        raise UnsupportedModuleError(
            f"the graph traced from {type(module).__name__}.forward differs from it on the "
            f"example batch (max |difference| {err:.3g}, outputs {got.shape} vs {ref.shape}): "
            "a traced shape is specialised in a way refngd did not catch; please report it.")
