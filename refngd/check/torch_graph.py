"""PyTorch module → :class:`refngd.nn.GraphModel` through ``torch.fx`` (docs/design.md §6,
"Importing arbitrary modules" and "Model libraries").

``from_torch`` sends every module that is not a plain ``nn.Sequential`` of known modules
here: :func:`graph_from_torch` traces its ``forward`` with ``torch.fx`` — symbolically, or
with concrete shapes when given an example batch (:mod:`refngd.check.torch_trace`) — with
modules that have a registered converter (and every other ``torch.nn`` module) kept as
single ``call_module`` nodes, and converts node by node:

* ``call_module``: the converter registry of :mod:`refngd.check.interop` (one refngd layer
  per module; a module called twice is one layer, its parameters one slice of θ; an
  Embedding at constant indices is its weight used directly);
* functional activations and pools (``F.relu``, ``torch.tanh``, ``F.silu``,
  ``F.max_pool2d``, ...): the converter of the equivalent module, so a layer that gains a
  converter gains its functional form;
* the operations of :mod:`refngd.nn.graph_ops` and :mod:`refngd.nn.graph_more`
  (:mod:`refngd.check.torch_ops` has the table), parameters used directly in ``+ − × ÷``
  and ``expand``, and statics (``x.size(0)``, ``x.shape``).

Anything else — an operation refngd has no rows for, another direct use of a parameter,
a dtype conversion, control flow on values — raises :class:`UnsupportedModuleError`
naming the node, its op and target and the source line that created it (never skipped).
"""
from __future__ import annotations

import operator
from typing import Callable

from ..nn.graph import GraphModel, GraphNode, Ref
from ..nn.graph_more import Expand, Pad, PermuteUnbind, Softmax
from ..nn.graph_ops import Elementwise, Index, ShapeOp, Split, Static
from ..nn.tied import TensorGroup
from .torch_arrays import UnsupportedModuleError, _torch, to_array
from .torch_functional import FunctionalLayers, functional_layers
from .torch_params import RESHAPES, DirectParameters
from .torch_ops import CASTS, RANDOM, functional_modules, handler, sizes, static_fn, unbound_permute
from .torch_trace import META, culprit, trace

__all__ = ["graph_from_torch"]


def _where(node) -> str:
    """The node as the user can find it: its name, op, target and source line."""
    target = getattr(node.target, "__name__", node.target)
    lines = (node.stack_trace or "").splitlines()
    frames = [(f.strip(), code.strip()) for f, code in zip(lines, lines[1:] + [""])
              if f.strip().startswith("File ") and "/torch/" not in f
              and "torch_trace.py" not in f]
    line = f" at {frames[-1][0]}: {frames[-1][1]}" if frames else ""
    return f"'{node.name}' ({node.op} {target}){line}"


class _Converter(FunctionalLayers, DirectParameters):
    """State of one conversion: fx node → refngd node index, kinds, the θ tensors."""

    where = staticmethod(_where)   # for the mixins' messages

    def __init__(self, root, registry: dict, unsupported: Callable, constants=None,
                 batch: int | None = None):
        self.torch = _torch()
        self.root, self.registry, self.unsupported = root, registry, unsupported
        self.name = type(root).__name__
        self.constants, self.batch = constants or {}, batch
        self.batch_ref = None   # the node of the running batch size (concrete tracing)
        self.output_shape = None
        self.params = list(root.parameters())
        self.tensor_id = {id(p): i for i, p in enumerate(self.params)}
        self.dtype = self.params[0].dtype if self.params else self.torch.float64
        self.nodes: list[GraphNode] = []
        self.index: dict = {}   # fx node -> refngd node index (or a constant)
        self.kind: dict = {}    # fx node -> "act" | "static" | "const" | "tuple"
        self.layers: dict = {}  # id(module) -> converted [(layer, tensors)]
        self.items: dict = {}   # (fx node, i) -> refngd node index (a module's tuple output)

    def refuse(self, node, why: str) -> UnsupportedModuleError:
        return UnsupportedModuleError(f"{self.name}.forward, node "
                                      f"{_where(node)}: not supported: {why}.")

    # ------------------------------------------------------------------ arguments
    def arg(self, a):
        """An fx argument as a refngd one: Ref, constant, nested."""
        fx = self.torch.fx
        if isinstance(a, fx.Node):
            v = self.index[a]
            return Ref(v) if isinstance(v, int) else v
        if isinstance(a, (tuple, list)):
            return type(a)(self.arg(v) for v in a)
        if isinstance(a, slice):
            return slice(self.arg(a.start), self.arg(a.stop), self.arg(a.step))
        if isinstance(a, self.torch.Size):
            return tuple(self.arg(v) for v in a)
        if self.batch is not None and type(a) is int and a == self.batch:
            return self.batch_ref  # the sentinel batch size of concrete tracing: N
        return a

    def is_act(self, a) -> bool:
        return isinstance(a, self.torch.fx.Node) and self.kind.get(a) == "act"

    def any_act(self, a) -> bool:
        if isinstance(a, (tuple, list)):
            return any(self.any_act(v) for v in a)
        return self.is_act(a)

    def add(self, node, kind: str, gnode: GraphNode) -> int:
        gnode.where = gnode.where or _where(node)
        self.nodes.append(gnode)
        self.index[node] = len(self.nodes) - 1
        self.kind[node] = kind
        return len(self.nodes) - 1

    # ------------------------------------------------------------------ nodes
    def placeholder(self, node):
        if self.nodes and not node.users:  # an argument fixed to its default (concrete_args)
            return
        if self.nodes:
            raise self.refuse(node, "refngd models take one input tensor X; give the other "
                                    "arguments of forward defaults")
        self.add(node, "act", GraphNode("input", None))
        if self.batch is not None:
            self.nodes.append(GraphNode("static", Static(lambda x: x.shape[0], "batch size"),
                                        (Ref(0),), where="the batch size"))
            self.batch_ref = Ref(len(self.nodes) - 1)

    def get_attr(self, node):
        if not node.users:  # read for its dtype or shape only (peft: lora_A.weight.dtype)
            return
        if node.target in self.constants:
            return self._constant(node, self.constants[node.target])
        value = self.root
        for part in node.target.split("."):
            value = getattr(value, part)
        if isinstance(value, self.torch.nn.Parameter) and all(
                self._layer_operand(u, node) for u in node.users):
            self.kind[node] = "layer_param"  # F.linear(x, W, b), ...: a layer (call)
            self.index[node] = value
            return
        if isinstance(value, self.torch.nn.Parameter):  # used directly: +, -, *, /, expand
            t = self.tensor_id[id(value)]
            group = TensorGroup(None, (0,), [tuple(value.shape)], [node.target])
            self.add(node, "param", GraphNode("param", group, (), (t,)))
            return
        if not isinstance(value, self.torch.Tensor):
            raise self.refuse(node, f"attribute of type {type(value).__name__}")
        self._constant(node, value)

    def _constant(self, node, value):
        """A tensor the traced forward computed from shapes alone (or a buffer): a constant.
        One built with the sentinel batch size must be the same for every sample."""
        if (self.batch is not None and value.ndim and value.shape[0] == self.batch):
            if not bool((value == value[:1]).all()):
                raise self.refuse(node, f"a constant of shape {tuple(value.shape)} differs "
                                        "from sample to sample without depending on the input")
            value = value[:1]
        if value.is_floating_point():
            value = value.to(self.dtype)
        self.index[node] = to_array(value.detach().cpu())
        self.kind[node] = "const"

    def call_module(self, node):
        module = self.root.get_submodule(node.target)
        tnn = self.torch.nn
        if type(module) in (tnn.Softmax, tnn.LogSoftmax):
            return self.op(node, Softmax(module.dim, isinstance(module, tnn.LogSoftmax)),
                           (node.args[0],))
        if isinstance(module, tnn.modules.padding._ConstantPadNd) and type(
                module) not in self.registry:  # nn.ZeroPad2d, nn.ConstantPad1d, ...
            return self.op(node, Pad(), (node.args[0], tuple(module.padding), module.value))
        conv = self.registry.get(type(module))
        if conv is None:
            raise self.unsupported(module, node.target)
        x = node.args[0] if node.args else None
        if (isinstance(module, tnn.Embedding) and len(node.args) == 1 and not node.kwargs
                and self.kind.get(x) in ("const", "static")):
            return self._lookup(node, module, x)
        if isinstance(module, tnn.MultiheadAttention):
            x = self._self_attention(node)
        elif len(node.args) != 1 or node.kwargs or not self.is_act(x):
            raise self.refuse(node, f"{type(module).__name__} is called with "
                                    f"{len(node.args)} arguments {dict(node.kwargs)}; refngd's "
                                    "layers take one activation")
        if id(module) not in self.layers:
            try:
                self.layers[id(module)] = conv(module, node.target)
            except ValueError as err:
                raise self.unsupported(module, node.target, str(err)) from None
        src = self.arg(x)
        for layer, tensors in self.layers[id(module)]:
            ids = tuple(self.tensor_id[id(t)] for t in tensors)
            i = self.add(node, "act", GraphNode("layer", layer, (src,), ids,
                                                f"{_where(node)} ({type(module).__name__})"))
            src = Ref(i)
        if isinstance(module, tnn.MultiheadAttention):
            self.kind[node] = "tuple"
            self.items[(node, 0)] = src.node

    def _self_attention(self, node):
        args = list(node.args) + [None] * 3
        q, k, v = args[:3]
        kw = dict(node.kwargs)
        if not (q is k is v) or kw.pop("need_weights", True) is not False or any(
                val is not None for val in kw.values()):
            raise self.refuse(node, "MultiheadAttention converts as self-attention "
                                    "attn(x, x, x, need_weights=False) without masks")
        return q

    def op(self, node, op, args) -> int:
        """A graph operation on ``args`` (fx arguments, activations flagged)."""
        if getattr(op, "dtype", None) is not None:  # softmax(x, dtype=...): a rounding
            meta = getattr(args[0], "meta", {}).get(META)
            if meta is None or meta.dtype != op.dtype:
                raise self.refuse(node, f"{op.name} computed in {op.dtype} (the input is "
                                        f"{getattr(meta, 'dtype', 'of unknown dtype')}): "
                                        "rounding to another precision inside the model; "
                                        "refngd computes in θ's dtype and would need a layer "
                                        "that rounds as PyTorch's kernel does")
        op.params = tuple(self.is_param(a) for a in args)
        if any(op.params) and not isinstance(op, (Elementwise, Expand)):
            raise self.refuse_param(node, op.name)
        op.batched = tuple(self.is_act(a) for a in args)
        kind = "tuple" if isinstance(op, Split) else "act"
        return self.add(node, kind, GraphNode("op", op, tuple(self.arg(a) for a in args)))

    def static(self, node, fn: Callable, args, name: str):
        self.add(node, "static", GraphNode("static", Static(fn, name),
                                           tuple(self.arg(a) for a in args)))

    def call(self, node):
        """``call_function`` and ``call_method``: an operation, a static or a layer."""
        target = node.target
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        args, kw = list(node.args), dict(node.kwargs)
        if name in RANDOM:
            raise self.refuse(node, f"{name!r} draws random numbers; the curvature of a random "
                                    "function is not what you mean (in training mode a dropout "
                                    "or stochastic depth does this: call model.eval())")
        if target is operator.getitem:
            return self._getitem(node, args)
        if node.op == "call_method" and target in CASTS and isinstance(
                args[0], self.torch.fx.Node):
            return self.cast(node, args)
        if name == "unbind" and self.kind.get(args[0]) == "tuple" and isinstance(
                self.nodes[self.index[args[0]]].op, PermuteUnbind):
            self.index[node], self.kind[node] = self.index[args[0]], "tuple"
            return None
        dims = unbound_permute(self.torch, node, args) if name == "permute" and self.is_act(args[0]) else None
        if dims is not None:
            op = PermuteUnbind(tuple(d % len(dims) for d in dims))
            return self.add(node, "tuple", GraphNode("op", op, (self.arg(args[0]),)))
        spec = functional_layers(self.torch).get(target)
        if spec is not None:
            return self._layer_call(node, spec, args, kw)
        if not any(self.any_act(a) for a in args + list(kw.values())):
            if any(self.is_param(a) for a in args + list(kw.values())):
                if name == "expand":
                    return self.op(node, Expand(), [args[0], tuple(sizes(args))])
                if name in RESHAPES and self._param_shape(args[0]) is not None:
                    return self._param_reshape(node, name, args, kw)
                return self._param_op(node, name, args, kw)
            if self.kind.get(args[0] if args else None) == "tuple":
                raise self.refuse(node, "an operation on a tuple")
            fn = getattr(operator, name, None) if callable(target) else None
            if target is getattr or fn is target or name in ("size", "dim"):
                return self.static(node, static_fn(target, kw), args, name)
            raise self.refuse(node, "an operation on constants only; compute it outside forward")
        if name in ("size", "dim") or target is getattr:
            if target is getattr and args[1] not in ("shape",):
                raise self.refuse(node, f"attribute {args[1]!r} of an activation")
            return self.static(node, static_fn(target, kw), args, name)
        modules = functional_modules(self.torch)
        # by the function itself, a method's name, or a qualified name (torchvision's
        # stochastic_depth, which may not import)
        make = modules.get(target) or modules.get(f"{getattr(target, '__module__', '')}.{name}")
        if make is not None:
            return self._functional(node, make, args, kw)
        convert = handler(self.torch, target)
        if convert is None and any(self.is_param(a) for a in args + list(kw.values())):
            raise self.refuse_param(node, repr(name))
        if convert is None:
            raise self.refuse(node, f"refngd has no rows for {name!r} (docs/layers.md lists the "
                                    "supported operations)")
        try:
            op, op_args = convert(args, kw)
        except ValueError as err:
            raise self.refuse(node, str(err)) from None
        return self.op(node, op, op_args)

    def _getitem(self, node, args):
        src, index = args
        if self.kind.get(src) == "tuple":
            key = (src, index)
            if key in self.items:
                self.index[node], self.kind[node] = self.items[key], "act"
                return None
            if not isinstance(self.nodes[self.index[src]].op, (Split, PermuteUnbind)):
                raise self.refuse(node, f"item {index!r} of a module's tuple output")
            return self.add(node, "act", GraphNode("item", None, (Ref(self.index[src]),),
                                                   index=int(index)))
        if self.is_act(src):
            return self.op(node, Index(), [src, index])
        if self.is_param(src):
            raise self.refuse_param(node, "indexing")
        return self.static(node, operator.getitem, args, "getitem")

    def _functional(self, node, make, args, kw):
        x = args[0] if args else kw.pop("input")
        if not self.is_act(x):
            raise self.refuse_param(node, getattr(node.target, "__name__", node.target))
        try:
            module = make(*args[1:], **{k: v for k, v in kw.items() if k != "input"})
        except (TypeError, ValueError) as err:
            raise self.refuse(node, f"arguments {args[1:]} {kw}: {err}") from None
        if module is None:  # identity (dropout off)
            return self.op(node, ShapeOp(lambda v: v, "identity"), [x])
        conv = self.registry.get(type(module))
        if conv is None:
            raise self.refuse(node, f"refngd has no layer for {type(module).__name__} yet")
        pairs = conv(module, node.name)
        src = self.arg(x)
        for layer, _ in pairs:
            i = self.add(node, "act", GraphNode("layer", layer, (src,)))
            src = Ref(i)
        return None

    def output(self, node):
        out = node.args[0]
        if isinstance(out, dict):  # a ModelOutput of transformers: its logits
            out = out.get("logits", out)
        if isinstance(out, dict):
            out = tuple(out.values())
        if isinstance(out, (tuple, list)):  # (logits, None, ...) as return_dict=False gives
            acts = [v for v in out if self.any_act(v)]
            if len(acts) != 1 or not self.is_act(out[0]):
                raise self.refuse(node, f"forward returns {len(out)} values, {len(acts)} of "
                                        "them computed from the input; refngd needs one tensor "
                                        "of outputs, first (the logits)")
            out = out[0]
        if not self.is_act(out):
            raise self.refuse(node, f"forward returns {type(out).__name__}; refngd needs one "
                                    "tensor of outputs (N, C)")
        meta = out.meta.get(META)
        if meta is None or meta.ndim <= 2:
            return self.index[out]
        self.output_shape = tuple(meta.shape[1:])  # (T, C): refngd's outputs are flattened
        flat = ShapeOp(lambda x: x.reshape(x.shape[0], -1), "flatten of the outputs")
        self.nodes.append(GraphNode("op", flat, (Ref(self.index[out]),), where=_where(node)))
        return len(self.nodes) - 1

    def cast(self, node, args):
        """``x.to(dtype)``, ``x.type(dtype)``, ``x.float()`` ...: the identity where the
        dtype does not change (the meta tensors of concrete tracing say so)."""
        src = args[0]
        before, after = src.meta.get(META), node.meta.get(META)
        if before is None or after is None:
            raise self.refuse(node, "a dtype conversion; refngd computes in θ's dtype "
                                    "(convert the model, e.g. model.double())")
        if before.dtype != after.dtype:
            raise self.refuse(node, f"a conversion from {before.dtype} to {after.dtype} inside "
                                    f"forward (the model computes part of its function in "
                                    f"{after.dtype}, e.g. an RMSNorm's variance); refngd computes "
                                    "every operation in θ's dtype and would not reproduce that "
                                    "rounding: use a model that computes in one dtype")
        self.index[node], self.kind[node] = self.index[src], self.kind[src]


def graph_from_torch(module, registry: dict, unsupported: Callable,
                     example=None) -> tuple[GraphModel, list]:
    """Trace ``module`` with ``torch.fx`` and convert it (module docstring).

    ``example``: a batch of inputs (N, ...) — traced with concrete shapes
    (:mod:`refngd.check.torch_trace`), which models that read their inputs' shapes need.
    Returns the graph model and the θ tensors in ``module.parameters()`` order.
    """
    torch = _torch()
    rng = torch.random.get_rng_state()
    try:
        root, graph, constants = trace(module, registry, example)
        drew = not torch.equal(rng, torch.random.get_rng_state())
    except Exception as err:
        hint = ("" if example is not None else "; a forward that reads its input's shape "
                "or dtype, or whose signature the symbolic tracer cannot call (models of "
                "transformers and peft), imports with an example batch: from_torch(module, X)")
        flow = "control flow" in str(err) or type(err).__name__ == "TraceError"
        why = ("refngd imports a forward without control flow on the values of its input or "
               "parameters" if flow else "refngd imports what torch.fx can trace")
        raise UnsupportedModuleError(
            f"torch.fx could not trace {type(module).__name__}.forward{culprit(err)} "
            f"({type(err).__name__}: {err}); {why} (docs/validating.md, 'Importing "
            f"arbitrary modules'){hint}.") from None
    finally:
        torch.random.set_rng_state(rng)   # tracing leaves the caller's random stream as it was
    if drew:  # a value drawn while tracing would be frozen into the graph as a constant
        raise UnsupportedModuleError(
            f"{type(module).__name__}.forward draws random numbers (dropout, stochastic depth "
            "or noise in training mode, or a random tensor): the curvature of a random "
            "function is not what you mean; call module.eval() or remove the randomness.")
    conv = _Converter(root, registry, unsupported, constants,
                      getattr(graph, "refngd_batch", None))
    conv.name = type(module).__name__
    output = None
    for node in graph.nodes:
        if node.op == "placeholder":
            conv.placeholder(node)
        elif node.op == "get_attr":
            conv.get_attr(node)
        elif node.op == "call_module":
            conv.call_module(node)
        elif node.op in ("call_function", "call_method"):
            conv.call(node)
        elif node.op == "output":
            output = conv.output(node)
    names = [n for n, _ in module.named_parameters()]
    shapes = [tuple(p.shape) for p in conv.params]
    model = GraphModel(conv.nodes, output, names, shapes)
    model.output_shape = conv.output_shape
    if example is not None:  # token ids may pass a view before the embedding (GPT-2)
        model.integer_input = getattr(example, "dtype", None) is not None and (
            str(example.dtype).startswith(("int", "uint", "torch.int", "torch.uint")))
    return model, conv.params
