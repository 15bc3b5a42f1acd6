"""Parameter-free operations of a :class:`refngd.nn.GraphModel`: the nodes between layers.

A traced model (``refngd.interop.from_torch`` on a module with a ``forward`` of its own)
is a graph whose nodes are refngd layers (the modules) and the operations here: residual
additions, products and scalings, concatenation and slicing, reshapes and permutations,
reductions over axes, products of activations and softmax.  Each operation takes its
arguments ``args`` — *activations* (arrays (N, *shape) of the batch, sample n in row n),
constants (buffers, Python numbers) and *statics* (sizes read off a shape) — and returns
``(output, cache)``; its :meth:`GraphOp.backward` pulls row cotangents B
(N, K, *out_shape) back to every activation argument, as (N, K, *in_shape) arrays
(docs/design.md §2), and None for the other arguments.

No operation may mix samples: an axis argument of 0 (the batch axis), a reshape that
changes the batch size or an index into the batch axis is refused with a ``ValueError``
(the graph model names the node).  Torch axes count the batch axis; on the rows, axis
``d`` of an activation is axis ``d + 1`` (the K rows of a sample sit at axis 1).
"""
from __future__ import annotations

import abc
import math
from typing import Any, Callable

from ..backend import Array, namespace

__all__ = ["GraphOp", "Elementwise", "ShapeOp", "Permute", "Reduce", "Concat", "Split",
           "Index", "MatMul", "Static", "unbroadcast", "param_rows", "batch_axis", "BatchAxisError"]


class BatchAxisError(ValueError):
    """An operation over the batch axis: it would mix the samples, which rows cannot."""


def batch_axis(d: int, ndim: int, what: str) -> int:
    """Torch axis ``d`` of an (N, ...) activation with ``ndim`` axes, non-negative; refuses
    the batch axis 0 (an operation over it would mix the samples)."""
    if not -ndim <= d < ndim:
        raise ValueError(f"{what}: axis {d} is out of range for {ndim} axes.")
    d = d % ndim
    if d == 0:
        raise BatchAxisError(f"{what} over axis 0, the batch axis, mixes the samples; refngd's "
                         "rows are per sample (docs/design.md §2).")
    return d


def unbroadcast(B: Array, shape: tuple) -> Array:
    """Rows B (N, K, *out) summed down to an activation of shape (N, *in) that broadcast to
    (N, *out) (same number of axes; the summed axes are those where ``in`` has 1)."""
    out = B.shape[2:]
    if tuple(out) == tuple(shape[1:]):
        return B
    axes = tuple(i + 2 for i, (a, b) in enumerate(zip(shape[1:], out)) if a == 1 and b != 1)
    return B.sum(axis=axes, keepdims=True) if axes else B


def param_rows(G: Array, shape: tuple, out_ndim: int) -> Array:
    """Per-row gradients (N, K, *shape) of a parameter of ``shape`` that broadcast into an
    activation with ``out_ndim`` axes, from G (N, K, *out_shape): the rows summed over the
    axes the parameter was broadcast along — within each sample, never across samples.

    A parameter with as many axes as the activation has its axis 0 against the batch axis
    (size 1: the same for every sample, as a ViT's (1, T, d) position embedding)."""
    own = tuple(shape[1:]) if len(shape) == out_ndim else tuple(shape)
    if len(shape) == out_ndim and shape[0] != 1:
        raise ValueError(f"a parameter of shape {tuple(shape)} broadcast against the batch "
                         "axis needs size 1 there.")
    lead = G.ndim - 2 - len(own)
    if lead:
        G = G.sum(axis=tuple(range(2, 2 + lead)))
    axes = tuple(i + 2 for i, (a, b) in enumerate(zip(own, G.shape[2:])) if a == 1 and b != 1)
    if axes:
        G = G.sum(axis=axes, keepdims=True)
    return G.reshape(G.shape[:2] + tuple(shape))


def _rows_view(v: Array) -> Array:
    """An activation (N, ...) with an axis for the K rows of a sample: (N, 1, ...)."""
    return v[:, None]


class GraphOp(abc.ABC):
    """A parameter-free node of a graph model (an abstract base: every operation defines
    :meth:`forward` and :meth:`backward`).

    ``batched`` says, per argument, whether it is an activation (it then gets rows in
    :meth:`backward`); ``name`` is used in messages.
    """

    name = "op"
    #: per argument: is it a parameter used directly (gets per-row gradients); only
    #: :class:`Elementwise` and :class:`Expand` accept parameters
    params: tuple[bool, ...] = ()
    #: the output has no batch axis: arithmetic of parameters and constants only, a value
    #: shared by every sample (its rows still are per sample: (N, K, *shape))
    shared = False

    def __init__(self, batched: tuple[bool, ...]):
        self.batched = tuple(batched)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    @abc.abstractmethod
    def forward(self, args: list) -> tuple[Any, Any]:
        """(output, cache) for the argument values ``args``."""

    @abc.abstractmethod
    def backward(self, cache: Any, B: Array) -> list:
        """Rows at each argument: (N, K, *arg_shape) for an activation, else None."""


class Static(GraphOp):
    """A value computed from shapes and Python numbers (``x.size(1)``, ``n * d``): no rows."""

    def __init__(self, fn: Callable, name: str):
        super().__init__(())
        self.fn, self.name = fn, name

    def forward(self, args):
        return self.fn(*args), None

    def backward(self, cache, B):
        return []  # no arguments, no rows


class Elementwise(GraphOp):
    """``a + b``, ``a - b``, ``a * b``, ``a / b`` with broadcasting, or ``-a`` (``kind`` "neg").

    Activation arguments must have the output's number of axes (their batch axis stays
    axis 0); constants broadcast from the right as in PyTorch.
    """

    def __init__(self, kind: str, batched):
        super().__init__(batched)
        if kind not in ("add", "sub", "mul", "div", "neg"):
            raise ValueError(f"unknown elementwise operation {kind!r}.")
        self.kind = self.name = kind

    def forward(self, args):
        if self.kind == "neg":
            out = -args[0]
        else:
            a, b = args
            out = {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b,
                   "div": lambda: a / b}[self.kind]()
        for v, on, is_param in zip(args, self.batched, self.params or (False,) * len(args)):
            if on and v.ndim != out.ndim:
                raise ValueError(f"{self.kind}: an activation of shape {tuple(v.shape)} "
                                 f"broadcasts to {tuple(out.shape)}, which moves its batch axis.")
            if is_param and not self.shared and v.ndim == out.ndim and v.shape[0] != 1:
                raise ValueError(f"{self.kind}: a parameter of shape {tuple(v.shape)} meets the "
                                 "batch axis with a size other than 1.")
        return out, (args, out.shape)

    def _rows_of(self, v, on):
        return _rows_view(v) if on else v

    def backward(self, cache, B):
        args, _ = cache
        if self.kind == "neg":
            return [-B]
        a, b = (self._rows_of(v, on) for v, on in zip(args, self.batched))
        if self.kind == "add":
            grads = [B, B]
        elif self.kind == "sub":
            grads = [B, -B]
        elif self.kind == "mul":
            grads = [B * b, B * a]
        else:
            grads = [B / b, -B * a / (b * b)]
        out_ndim = len(cache[1]) + self.shared  # a shared output: as if it had a batch axis
        params = self.params or (False,) * len(args)
        return [unbroadcast(g, v.shape) if on else
                (param_rows(g, v.shape, out_ndim) if is_param else None)
                for g, v, on, is_param in zip(grads, args, self.batched, params)]


class ShapeOp(GraphOp):
    """A reshape that keeps each sample's entries together, in row-major order: ``view``,
    ``reshape``, ``flatten``, ``unflatten``, ``squeeze``, ``unsqueeze``, ``contiguous``.

    ``fn(x, *static)`` computes the output; it must keep the batch size (axis 0), so that
    sample n's entries stay sample n's.  The rows are reshaped back.
    """

    def __init__(self, fn: Callable, name: str):
        super().__init__((True,))
        self.fn, self.name = fn, name

    def forward(self, args):
        x = args[0]
        out = self.fn(*args)
        if out.ndim < 1 or out.shape[0] != x.shape[0]:
            raise ValueError(f"{self.name} of an activation of shape {tuple(x.shape)} gives "
                             f"{tuple(out.shape)}: the batch axis must stay axis 0 of size "
                             f"{x.shape[0]} (keep x.size(0) first in view/reshape).")
        return out, x.shape

    def backward(self, cache, B):
        return [B.reshape(B.shape[:2] + tuple(cache[1:]))] + [None] * (len(self.batched) - 1)


class Permute(GraphOp):
    """``permute(dims)``, ``transpose(d0, d1)`` (``dims`` then the pair) or ``movedim(source,
    destination)`` (``dims`` then the two, ints or tuples) of the axes after the batch axis:
    the batch axis must stay first."""

    def __init__(self, dims: tuple[int, ...], name: str = "permute"):
        super().__init__((True,))
        self.dims, self.name = tuple(dims), name

    def _perm(self, ndim: int) -> tuple[int, ...]:
        if self.name == "transpose":
            a, b = (batch_axis(d, ndim, "transpose") for d in self.dims)
            perm = list(range(ndim))
            perm[a], perm[b] = b, a
            return tuple(perm)
        if self.name == "movedim":
            src, dst = ((d,) if isinstance(d, int) else tuple(d) for d in self.dims)
            src = tuple(batch_axis(d, ndim, "movedim") for d in src)
            dst = tuple(batch_axis(d, ndim, "movedim") for d in dst)
            if len(src) != len(dst) or len(set(src)) != len(src) or len(set(dst)) != len(dst):
                raise ValueError(f"movedim{self.dims}: source and destination differ in length "
                                 "or repeat an axis.")
            order = [d for d in range(ndim) if d not in src]
            for d, s in sorted(zip(dst, src)):
                order.insert(d, s)
            return tuple(order)
        if len(self.dims) != ndim:
            raise ValueError(f"permute {self.dims} of {ndim} axes.")
        perm = tuple(d % ndim for d in self.dims)
        if perm[0] != 0:
            raise ValueError(f"permute {self.dims} moves the batch axis; refngd's rows are per "
                             "sample, so axis 0 must stay first.")
        return perm

    def forward(self, args):
        perm = self._perm(args[0].ndim)
        inv = sorted(range(len(perm)), key=lambda i: perm[i])
        return args[0].transpose(perm), (0, 1) + tuple(j + 1 for j in inv[1:])

    def backward(self, cache, B):
        return [B.transpose(cache)]


class Reduce(GraphOp):
    """``sum`` or ``mean`` over ``dims`` (never the batch axis), with ``keepdim``."""

    def __init__(self, kind: str, dims, keepdim: bool):
        super().__init__((True,))
        self.kind, self.keepdim = kind, bool(keepdim)
        self.dims = tuple(dims) if isinstance(dims, (tuple, list)) else (dims,)
        self.name = f"{kind} over dims {self.dims}"

    def forward(self, args):
        x = args[0]
        axes = tuple(sorted({batch_axis(d, x.ndim, self.kind) for d in self.dims}))
        fn = x.sum if self.kind == "sum" else x.mean
        return fn(axis=axes, keepdims=self.keepdim), (x.shape, axes)

    def backward(self, cache, B):
        shape, axes = cache
        xp = namespace(B)
        if not self.keepdim:
            kept = list(B.shape)
            for a in axes:
                kept.insert(a + 1, 1)
            B = B.reshape(kept)
        out = xp.broadcast_to(B, B.shape[:2] + tuple(shape[1:]))
        if self.kind == "mean":
            return [out * (1.0 / math.prod(shape[a] for a in axes))]
        return [out.copy()]


class Concat(GraphOp):
    """``torch.cat(tensors, dim)`` along an axis after the batch axis.  Empty 1-d constants
    are skipped, as PyTorch does (an empty key/value cache concatenated with new keys)."""

    name = "cat"

    def __init__(self, dim: int, batched):
        super().__init__(batched)
        self.dim = dim

    def forward(self, args):
        ref = next(a for a, on in zip(args, self.batched) if on)
        axis = batch_axis(self.dim, ref.ndim, "cat")
        xp = namespace(*[a for a, on in zip(args, self.batched) if on])
        empty = [not on and a.ndim == 1 and a.shape[0] == 0 for a, on in zip(args, self.batched)]
        used = [a for a, skip in zip(args, empty) if not skip]
        return xp.concatenate(used, axis=axis), (axis, [0 if skip else a.shape[axis]
                                                        for a, skip in zip(args, empty)])

    def backward(self, cache, B):
        axis, sizes = cache
        out, i = [], 0
        for size, on in zip(sizes, self.batched):
            idx = (slice(None),) * (axis + 1) + (slice(i, i + size),)
            out.append(B[idx] if on else None)
            i += size
        return out


class Split(GraphOp):
    """``split`` / ``chunk`` along an axis after the batch axis: a tuple of pieces.

    ``sizes_fn(length)`` gives the pieces' sizes.  ``backward`` takes the rows of each
    piece (None where none arrived) as a dict {piece: rows}.
    """

    def __init__(self, sizes_fn: Callable, dim: int, name: str):
        super().__init__((True,))
        self.sizes_fn, self.dim, self.name = sizes_fn, dim, name

    def forward(self, args):
        x = args[0]
        axis = batch_axis(self.dim, x.ndim, self.name)
        pieces, i = [], 0
        for s in self.sizes_fn(x.shape[axis]):
            pieces.append(x[(slice(None),) * axis + (slice(i, i + s),)])
            i += s
        return tuple(pieces), (axis, [p.shape for p in pieces])

    def backward(self, cache, B: dict):
        axis, shapes = cache
        some = next(iter(B.values()))
        xp = namespace(some)
        N, K = some.shape[:2]
        parts = [B[i] if i in B else xp.zeros((N, K) + tuple(s[1:]), dtype=some.dtype)
                 for i, s in enumerate(shapes)]
        return [xp.concatenate(parts, axis=axis + 1)]


class Index(GraphOp):
    """``x[index]`` with slices, integers, ``None`` and ``...`` — the batch axis taken whole
    (``x[:, ...]``, ``x[..., 0]``); the rows go back into zeros of the input's shape.
    ``args`` are ``[x, index]``."""

    name = "getitem"

    def __init__(self):
        super().__init__((True, False))

    @staticmethod
    def rows_index(index, ndim: int) -> tuple:
        """The index of the rows (N, K, ...) that matches ``index`` on (N, ...)."""
        idx = index if isinstance(index, tuple) else (index,)
        for i in idx:
            if not (i is None or i is Ellipsis or isinstance(i, (int, slice))):
                raise ValueError(f"indexing with {type(i).__name__} (advanced indexing) is "
                                 "not supported; use slices and integers.")
        if idx and idx[0] is Ellipsis:
            if sum(1 for i in idx[1:] if i is not None) >= ndim:
                raise ValueError(f"index {idx} reaches the batch axis.")
            return idx
        if not idx or idx[0] != slice(None):
            raise ValueError(f"index {idx} selects from the batch axis; refngd's rows are per "
                             "sample: index as x[:, ...].")
        return (slice(None),) + idx

    def forward(self, args):
        x, index = args
        rows_index = self.rows_index(index, x.ndim)
        return x[index], (x.shape, rows_index)

    def backward(self, cache, B):
        shape, rows_index = cache
        xp = namespace(B)
        out = xp.zeros(B.shape[:2] + tuple(shape[1:]), dtype=B.dtype)
        out[rows_index] = B
        return [out, None]


class MatMul(GraphOp):
    """``a @ b`` (``torch.matmul``, ``bmm``) of activations and constants, per sample.

    Two activations need the same number of axes, at least 3 (a matrix per sample); an
    activation times a constant matrix may be (N, k) @ (k, n).
    """

    name = "matmul"

    def __init__(self, batched):
        super().__init__(batched)

    def forward(self, args):
        a, b = args
        ba, bb = self.batched
        if any(v.ndim < 2 for v in (a, b)):
            raise ValueError("matmul with a vector operand is not supported; unsqueeze it.")
        if (ba and bb and (a.ndim != b.ndim or a.ndim < 3)) or (bb and not ba and b.ndim < 3):
            raise ValueError(f"matmul of shapes {tuple(a.shape)} and {tuple(b.shape)} would "
                             "multiply across the batch axis; use (N, ..., m, k) @ (N, ..., k, n).")
        out = a @ b
        if (ba and out.ndim != a.ndim) or (bb and out.ndim != b.ndim):
            raise ValueError(f"matmul of shapes {tuple(a.shape)} and {tuple(b.shape)} moves "
                             "the batch axis.")
        return out, (a, b)

    def backward(self, cache, B):
        a, b = cache
        ba, bb = self.batched
        ar, br = (_rows_view(a) if ba else a), (_rows_view(b) if bb else b)
        ga = unbroadcast(B @ br.swapaxes(-1, -2), a.shape) if ba else None
        gb = unbroadcast(ar.swapaxes(-1, -2) @ B, b.shape) if bb else None
        return [ga, gb]
