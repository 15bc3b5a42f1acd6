"""``GraphModel``: layers and operations wired into a DAG on one flat θ (traced PyTorch models).

``refngd.interop.from_torch`` turns a module with a ``forward`` of its own (a residual
block, a concatenation, a mean over tokens, a module called twice) into a graph model:
a list of :class:`GraphNode` in topological order — the input, refngd layers (the
modules, through the converter registry), parameter-free operations
(:mod:`refngd.nn.graph_ops`) and statics (sizes read off shapes) — and one output node.
Row back-propagation (docs/design.md §2) runs through the graph in reverse: rows that
reach a node along several edges (fan-out: a residual connection, a value used twice) are
summed before they go on, so U is exactly the Jacobian of the whole graph.

**Parameters** are θ = ``parameters_to_vector(module.parameters())``: one slice per
*tensor*, however often it is used.  The θ layout (``model.layers``, ``model.layout``)
lists each tensor once, under the first layer that uses it — the layer itself when it
owns all of its tensors in order, else a :class:`TensorGroup` of the tensors it owns —
so subsets, weight files, the validation kit and K-FAC read a graph model as a
Sequential.  **Weight tying**: a tensor used by several call sites (a module called
twice, GPT-2's embedding reused as the output layer) has the per-row gradient
u_r = Σ_uses u_r^(use), the sum over its uses — so its row primitives are read off this
sum, materialised (:class:`TiedRows`): Gram (Σ_a u^(a))(Σ_b u^(b))ᵀ includes the cross
terms of the uses, as the Gram of the whole graph must.  A tensor used once keeps its
layer's own (fast, K-FAC-capable) row primitives.  K-FAC refuses a tied tensor
(docs/kfac.md, "Tied weights").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..backend import Array, check_float_array, get_backend, namespace, one_host_read, require
from ..rows import LayerRows, RowSet
from .base import num_elements
from .layout import ParamLayout
from .sequential import Sequential
from .subsets import resolve_params
from .tied import DirectRows, GraphRowSet, TensorGroup, TiedRows

__all__ = ["Ref", "GraphNode", "GraphModel", "GraphLinearization"]


@dataclass(frozen=True)
class Ref:
    """An argument that is the value of node ``node``."""

    node: int


@dataclass
class GraphNode:
    """One node of a :class:`GraphModel`.

    kind : ``"input"`` (the batch X), ``"layer"`` (a refngd :class:`Layer`, one activation
        argument), ``"param"`` (a parameter used directly in ``forward``: its value is the
        tensor itself, its op a :class:`TensorGroup` of it), ``"param_op"`` (arithmetic of
        parameters and constants, no batch axis), ``"op"`` (a
        :class:`refngd.nn.graph_ops.GraphOp`), ``"static"`` (a
        Python value computed from shapes) or ``"item"`` (item ``index`` of a node whose
        value is a tuple, such as a split).
    op : the layer or operation.
    args : the arguments: :class:`Ref` to earlier nodes, constants, nested in tuples,
        lists and slices as the traced call had them.
    tensors : for a layer, the θ tensor (index into ``GraphModel.tensor_names``) of each of
        its ``param_shapes``.
    where : the node as the user knows it (traced name, target, module path), for messages.
    """

    kind: str
    op: Any
    args: tuple = ()
    tensors: tuple = ()
    where: str = ""
    index: int = 0


def _refs(value) -> list[int]:
    """The nodes referenced anywhere in a (nested) argument."""
    if isinstance(value, Ref):
        return [value.node]
    if isinstance(value, (tuple, list)):
        return [r for v in value for r in _refs(v)]
    if isinstance(value, slice):
        return _refs((value.start, value.stop, value.step))
    return []


def _resolve(value, values: list):
    """The argument with every :class:`Ref` replaced by its node's value."""
    if isinstance(value, Ref):
        return values[value.node]
    if isinstance(value, tuple):
        return tuple(_resolve(v, values) for v in value)
    if isinstance(value, list):
        return [_resolve(v, values) for v in value]
    if isinstance(value, slice):
        return slice(*(_resolve(v, values) for v in (value.start, value.stop, value.step)))
    return value


class GraphModel:
    """A model whose forward pass is a DAG of refngd layers and operations (module docstring).

    Parameters
    ----------
    nodes : :class:`GraphNode` list in topological order; node 0 is the input.
    output : the node whose value is the model output Z (N, C).
    tensor_names, tensor_shapes : θ's tensors in order (PyTorch's ``named_parameters``).
    """

    def __init__(self, nodes: list[GraphNode], output: int, tensor_names, tensor_shapes):
        self.nodes, self.output = list(nodes), int(output)
        self.tensor_names = tuple(tensor_names)
        self.tensor_shapes = tuple(tuple(s) for s in tensor_shapes)
        self.uses: list[list[tuple[int, int]]] = [[] for _ in self.tensor_names]
        for i, node in enumerate(self.nodes):
            for local, t in enumerate(node.tensors):
                self.uses[t].append((i, local))
                if tuple(node.op.param_shapes[local]) != self.tensor_shapes[t]:
                    raise ValueError(f"{node.where}: tensor {local} has shape "
                                     f"{node.op.param_shapes[local]}, θ tensor "
                                     f"{self.tensor_names[t]!r} {self.tensor_shapes[t]}.")
        self._build_layout()
        #: the object the graph was imported from (a torch module; ``refngd.interop.to_torch``)
        self.source = None
        #: the per-sample shape of the output before it was flattened to (N, C) — (T, V)
        #: for a language model — or None (known when imported with an example batch)
        self.output_shape = None
        self.integer_input = any(self.nodes[j].kind == "layer" and self.nodes[j].op.integer_input
                                 for j in self._consumers(0))

    # ------------------------------------------------------------------ θ layout
    def _build_layout(self) -> None:
        owners, run = [], None  # runs of consecutive tensors owned by one layer
        for t, uses in enumerate(self.uses):
            node = self.nodes[uses[0][0]] if uses else None
            local = uses[0][1] if uses else 0
            if (run is not None and node is not None and run[0] is node.op
                    and run[1][-1] == local - 1):
                run[1].append(local)
                run[2].append(t)
            else:
                run = (node.op if node else None, [local], [t])
                owners.append(run)
        layers, self.tensor_owner, self.plain = [], [None] * len(self.uses), set()
        for op, locals_, ts in owners:
            whole = (op is not None and locals_ == list(range(len(op.param_shapes)))
                     and not any(op is layer for layer in layers))
            layer = op if whole else TensorGroup(
                op, locals_, [self.tensor_shapes[t] for t in ts],
                [self.tensor_names[t] for t in ts])
            for pos, t in enumerate(ts):
                self.tensor_owner[t] = (len(layers), pos)
            layers.append(layer)
        for i, node in enumerate(self.nodes):  # a layer that alone uses the tensors it owns
            if node.kind == "layer" and node.tensors and any(node.op is layer for layer in layers) and all(
                    self.uses[t] == [(i, loc)] for loc, t in enumerate(node.tensors)):
                self.plain.add(i)
        self.layers = tuple(layers)
        self.layout = ParamLayout(self.layers)
        self.slices = list(self.layout.layer_slices)
        self.num_params = self.layout.num_params
        self._tensor_start = [s.start for s in self.layout.slots]

    def _consumers(self, i: int) -> list[int]:
        return [j for j, n in enumerate(self.nodes) if i in _refs(n.args)]

    def __repr__(self) -> str:
        inner = "\n  ".join(f"{i}: {n.where}" for i, n in enumerate(self.nodes) if n.kind
                            in ("layer", "op"))
        return f"GraphModel(\n  {inner}\n)"

    # ------------------------------------------------------------------ parameters
    def init(self, rng, dtype="float64", backend: str = "numpy") -> Array:
        """θ drawn with each owner layer's PyTorch default initialisation."""
        return Sequential.init(self, rng, dtype, backend)

    unflatten, flatten, _check_theta = Sequential.unflatten, Sequential.flatten, \
        Sequential._check_theta
    trainable_mask = Sequential.trainable_mask

    # ------------------------------------------------------------------ forward
    def _check_input(self, theta, X):
        if self.integer_input:
            if getattr(X, "dtype", None) is None or X.dtype.kind not in "iu":
                raise TypeError(f"X must hold integer indices (the input feeds an embedding), "
                                f"got {getattr(X, 'dtype', type(X).__name__)}.")
        else:
            check_float_array("X", X)
        if X.ndim < 1 or X.shape[0] < 1:
            raise ValueError(f"X must be a batch of shape (N, ...) with N >= 1, got "
                             f"{tuple(X.shape)}.")
        return X if self.integer_input else X.astype(theta.dtype, copy=False)

    def _run(self, theta: Array, X: Array):
        """Values and caches of every node."""
        tensors = [t for blocks in self.unflatten(theta) for t in blocks]
        x = self._check_input(theta, X)
        N = x.shape[0]
        values, caches = [None] * len(self.nodes), [None] * len(self.nodes)
        for i, node in enumerate(self.nodes):
            try:
                if node.kind == "input":
                    values[i] = x
                    continue
                if node.kind == "item":
                    values[i] = values[node.args[0].node][node.index]
                    continue
                if node.kind == "param":
                    values[i] = tensors[node.tensors[0]]
                    continue
                args = _resolve(node.args, values)
                if node.kind == "layer":
                    node.op.out_shape(tuple(args[0].shape[1:]))
                    p = [tensors[t] for t in node.tensors]
                    values[i], caches[i] = node.op.forward(p, args[0])
                else:
                    values[i], caches[i] = node.op.forward(list(args))
            except (ValueError, TypeError, IndexError) as err:
                raise type(err)(f"node {node.where}: {err}") from None
            v = values[i]
            if node.kind not in ("static", "param", "param_op") and hasattr(v, "shape") and (
                    v.ndim < 1 or v.shape[0] != N):
                raise ValueError(f"node {node.where}: its output {tuple(v.shape)} lost the batch "
                                 f"axis (N = {N}); refngd's rows are per sample.")
        return values, caches

    def forward(self, theta: Array, X: Array) -> Array:
        """Model outputs Z = f(X; θ), shape (N, C)."""
        return self.linearize(theta, X).outputs

    @one_host_read
    def linearize(self, theta: Array, X: Array) -> "GraphLinearization":
        """Run the forward pass once and keep what every later backward pass needs."""
        values, caches = self._run(theta, X)
        out = values[self.output]
        if not hasattr(out, "ndim") or out.ndim != 2:
            raise ValueError(f"the model output has shape {getattr(out, 'shape', type(out))}; "
                             "refngd needs (N, C): flatten or reduce it in forward.")
        xp = namespace(out)
        require(xp.all(xp.isfinite(out)), ValueError(
            f"the model outputs contain NaN or Inf (overflow in {out.dtype}); check the "
            "scale of theta and X."), out)
        return GraphLinearization(self, theta, out, caches, self.unflatten(theta), X)

    def node_shapes(self, in_shape: tuple) -> list:
        """Per node, the per-sample shape of its value (from a one-sample forward pass)."""
        xp = get_backend("numpy")
        theta = xp.full(self.num_params, 0.01)
        X = xp.zeros((1,) + tuple(in_shape), dtype=int if self.integer_input else float)
        values, _ = self._run(theta, X)
        return [tuple(v.shape[1:]) if hasattr(v, "shape") else None for v in values]

    def memory_plan(self, in_shape: tuple, subset=None) -> list[tuple]:
        """For :mod:`refngd.memory`: per layer node, in forward order, ``(layer, in_size,
        out_size, in_shape, out_shape, stored)`` as a Sequential's plan (``stored``: the
        node holds selected tensors, so its rows are kept)."""
        shapes = self.node_shapes(in_shape)
        plan = []
        for i, node in enumerate(self.nodes):
            if node.kind != "layer":
                continue
            ins, out = shapes[node.args[0].node], shapes[i]
            stored = any(subset is None or subset.active[o][pos]
                         for o, pos in (self.tensor_owner[t] for t in node.tensors))
            plan.append((node.op, math.prod(ins), math.prod(out), ins, out, stored))
        first = next((i for i, p in enumerate(plan) if p[5]), len(plan))
        return plan[first:]


class GraphLinearization:
    """A forward pass of a :class:`GraphModel` kept for back-propagating row cotangents."""

    def __init__(self, model, theta, outputs, caches, params, X=None):
        self.model, self.theta, self.outputs, self.X = model, theta, outputs, X
        self._caches = caches
        self._tensors = [t for blocks in params for t in blocks]

    def _selected(self, subset) -> list[bool]:
        m = self.model
        if subset is None:
            return [True] * len(m.tensor_names)
        return [subset.active[o][pos] for o, pos in m.tensor_owner]

    def _position(self, subset, t: int) -> int:
        """Where tensor t starts in θ (or in θ[S] for a subset)."""
        m = self.model
        if subset is None:
            return m._tensor_start[t]
        owner, pos = m.tensor_owner[t]
        before = [s for s in m.layout.of_layer(owner)][:pos]
        return subset.starts[owner] + sum(s.size for s, on in
                                          zip(before, subset.active[owner]) if on)

    def backprop(self, cotangents: Array, params=None) -> RowSet:
        """Back-propagate R = N·K output-space rows (N, K, C) once through the graph.

        As :meth:`refngd.nn.Linearization.backprop`; rows reaching a node along several
        edges are summed, and a tied tensor's rows are the sum over its uses.
        """
        m = self.model
        N, C = self.outputs.shape
        check_float_array("cotangents", cotangents)
        if cotangents.ndim != 3 or cotangents.shape[0] != N or cotangents.shape[2] != C:
            raise ValueError(f"cotangents must have shape (N, K, C) = ({N}, K, {C}), got "
                             f"{tuple(cotangents.shape)}.")
        subset = None if params is None else resolve_params(m, params)
        sel = self._selected(subset)
        B0 = cotangents.astype(self.theta.dtype, copy=False)
        up = []  # up[i]: a selected tensor lies at or before node i (it needs rows)
        for node in m.nodes:
            up.append(any(sel[t] for t in node.tensors) or any(up[j] for j in _refs(node.args)))
        cot: dict[int, Any] = {m.output: B0}
        records, covered, tied = [], set(), {t: [] for t in range(len(sel)) if sel[t]}

        def send(ref, g):
            if g is None or not isinstance(ref, Ref) or not up[ref.node]:
                return
            j = ref.node
            cot[j] = g if j not in cot else cot[j] + g

        for i in range(len(m.nodes) - 1, 0, -1):
            node = m.nodes[i]
            B = cot.pop(i, None)
            if B is None or node.kind == "static":
                continue
            if node.kind == "param":  # per-row gradients of a directly used parameter
                t = node.tensors[0]
                if t in tied:
                    tied[t].append((DirectRows(m.tensor_shapes[t]), None, B, 0,
                                    math.prod(m.tensor_shapes[t])))
                continue
            if node.kind == "item":
                parts = cot.setdefault(node.args[0].node, {})
                parts[node.index] = B if node.index not in parts else parts[node.index] + B
                continue
            if node.kind in ("op", "param_op"):
                for arg, g in zip(node.args, node.op.backward(self._caches[i], B)):
                    send(arg, g)
                continue
            need = any(up[j] for j in _refs(node.args))
            p = [self._tensors[t] for t in node.tensors]
            mine = tuple(sel[t] for t in node.tensors)
            if i in m.plain or not any(mine):
                views, B_in = node.op.backward_views(p, self._caches[i], B, mine, need)
                self._record_plain(node, p, views, mine, subset, records, covered)
            else:  # tied tensors: the per-row gradients of every tensor of this use
                views, B_in = node.op.backward_views(p, self._caches[i], B,
                                                     (True,) * len(p), need)
                self._record_tied(node, views, tied)
            send(node.args[0], B_in)
        for t in sorted(tied):
            if t in covered:
                continue
            start = self._position(subset, t)
            size = math.prod(m.tensor_shapes[t])
            owner, pos = m.tensor_owner[t]
            prim = TiedRows(m.tensor_shapes[t], tied[t], m.tensor_names[t])
            records.append(LayerRows(prim, [], None, B0, start, start + size, owner, pos))
        if not records:
            raise ValueError("this model has no parameters to differentiate.")
        records.sort(key=lambda e: e.start)
        P = m.num_params if subset is None else subset.num_params
        return GraphRowSet(records, N, cotangents.shape[1], P, self.theta.dtype, subset)

    def _record_plain(self, node, p, views, active, subset, records, covered):
        if not views:
            return
        owner = self.model.tensor_owner[node.tensors[0]][0]
        tensors = [loc for loc, on in enumerate(active) if on]
        pos = self._position(subset, node.tensors[tensors[0]])
        j = 0
        for prim, c, b in views:
            size = num_elements(prim.param_shapes)
            records.append(LayerRows(prim, p, c, b, pos, pos + size, owner, tensors[j]))
            covered.update(node.tensors[loc] for loc in tensors[j:j + len(prim.param_shapes)])
            pos += size
            j += len(prim.param_shapes)

    def _record_tied(self, node, views, tied):
        local = 0
        for prim, c, b in views:
            col = 0
            for shape in prim.param_shapes:
                size = math.prod(shape)
                t = node.tensors[local]
                if t in tied:
                    tied[t].append((prim, c, b, col, col + size))
                col += size
                local += 1
