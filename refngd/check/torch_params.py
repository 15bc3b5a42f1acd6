"""Parameters used directly in a traced ``forward`` (not through their module): the part
of :mod:`refngd.check.torch_graph`'s converter that handles them.

A parameter read in ``forward`` itself — a ViT's class token ``self.cls.expand(N, -1, -1)``,
a position embedding added, a layer scale ``x.mul(self.gamma.reshape(1, -1, 1, 1))``, an
embedding table at constant position ids — is one θ tensor whose rows are the per-row
gradients of its uses (``DirectRows``; docs/layers.md, "A parameter used directly").  It is
differentiated in ``+ − × ÷`` (:class:`refngd.nn.graph_ops.Elementwise` with parameter
arguments), ``expand``, the reshapes of :data:`RESHAPES` (:class:`ParamReshape`) and as an
embedding's weight at constant indices (:class:`ConstantLookup`); any other use is refused
by :meth:`DirectParameters.refuse_param`, which names the parameter (through the values
computed from it) and its module.
"""
from __future__ import annotations

from ..nn.graph import GraphNode, Ref
from ..nn.graph_more import ConstantLookup, ParamReshape
from ..nn.graph_ops import Elementwise
from ..nn.tied import TensorGroup
from .torch_arrays import UnsupportedModuleError
from .torch_ops import handler

__all__ = ["DirectParameters", "RESHAPES"]

#: methods that reshape a parameter used directly without moving entries (ParamReshape)
RESHAPES = ("reshape", "view", "unsqueeze", "squeeze", "flatten")


class DirectParameters:
    """The converter's part for parameters used directly (mixed into
    ``torch_graph._Converter``, whose state — ``kind``, ``index``, ``nodes``, ``root``,
    ``tensor_id`` — and helpers — ``refuse``, ``add``, ``arg``, ``where``, ``unsupported`` —
    it uses)."""

    def is_param(self, a) -> bool:
        if isinstance(a, (tuple, list)):
            return any(self.is_param(v) for v in a)
        return isinstance(a, self.torch.fx.Node) and self.kind.get(a) == "param"

    def refuse_param(self, node, what: str) -> UnsupportedModuleError:
        names = []
        for a in node.all_input_nodes:
            if self.kind.get(a) != "param":
                continue
            root = a
            while root.op != "get_attr" and root.all_input_nodes:  # W * 2, g.view(...)
                root = next((b for b in root.all_input_nodes if self.kind.get(b) == "param"),
                            root.all_input_nodes[0])
            if root.op != "get_attr":
                names.append(f"{a.name!r} (computed from parameters)")
                continue
            path = root.target.rpartition(".")[0]
            owner = self.root.get_submodule(path) if path else self.root
            via = "" if root is a else f", through {a.name!r}"
            names.append(f"{root.target!r} (of {type(owner).__name__}"
                         + (f" at {path!r}" if path else "") + f"{via})")
        return self.refuse(node, f"parameter {', '.join(names)} is used directly "
                                 f"in {what}; refngd differentiates a parameter used in forward "
                                 "(not through a module) in +, -, *, /, expand and reshape only, "
                                 "and passed as the weight of F.linear, F.conv1d/2d, F.layer_norm, "
                                 "F.batch_norm or F.embedding when used nowhere else: use it "
                                 "inside a module with a converter (nn.Linear, ...) or register "
                                 "one with refngd.interop.register")

    def _param_op(self, node, name, args, kw):
        """Arithmetic of parameters and constants only (``self.scale / 2``): a value shared
        by every sample, whose rows are per-row gradients (N, K, *shape)."""
        convert = handler(self.torch, node.target)
        try:
            op = convert(args, kw)[0] if convert is not None else None
        except ValueError:  # e.g. a reduction's axes, read as if the batch axis were there
            op = None
        if not isinstance(op, Elementwise):
            raise self.refuse_param(node, f"{name!r} without an activation")
        op.params = tuple(self.is_param(a) for a in args)
        op.batched, op.shared = (False,) * len(args), True
        return self.add(node, "param", GraphNode("param_op", op,
                                                 tuple(self.arg(a) for a in args)))

    def _param_shape(self, a):
        """The shape of a parameter used directly, or of a reshape of one (else None)."""
        if self.kind.get(a) != "param":
            return None
        op = self.nodes[self.index[a]].op
        return op.shape if isinstance(op, ParamReshape) else getattr(op, "param_shapes", [None])[0]

    def _param_reshape(self, node, name, args, kw):
        """``p.reshape(1, -1, 1, 1)`` and its kin on a parameter used directly: the new
        shape from PyTorch itself, on a meta tensor of p's shape."""
        try:
            meta = self.torch.empty(self._param_shape(args[0]), device="meta")
            shape = tuple(getattr(meta, name)(*args[1:], **kw).shape)
        except (TypeError, RuntimeError) as err:
            raise self.refuse_param(node, f"{name!r} with arguments {args[1:]} ({err})") from None
        return self.add(node, "param", GraphNode("param_op", ParamReshape(shape, name),
                                                 (self.arg(args[0]),)))

    def _lookup(self, node, module, x, name=None):
        """An embedding of constant indices (position ids): its weight used directly.
        ``name``: the weight's (default: the module's path + ".weight")."""
        path = node.target if isinstance(node.target, str) else (name or node.name)
        if module.max_norm is not None or module.scale_grad_by_freq:
            raise self.unsupported(module, path, "max_norm / scale_grad_by_freq")
        t = self.tensor_id[id(module.weight)]
        group = TensorGroup(None, (0,), [tuple(module.weight.shape)],
                            [name or node.target + ".weight"])
        w = self.nodes.append(GraphNode("param", group, (), (t,), self.where(node))) or \
            len(self.nodes) - 1
        op = ConstantLookup()
        if module.padding_idx is not None:
            op.padding_idx = module.padding_idx
        return self.add(node, "param", GraphNode("param_op", op, (Ref(w), self.arg(x))))
