"""The table from traced PyTorch operations to refngd graph operations (docs/layers.md,
"Operations in a traced forward").

:func:`handlers` maps each supported ``call_function`` target (``torch.cat``,
``operator.add``, ...) and ``call_method`` name (``"view"``, ``"mean"``, ...) to a
converter ``(args, kwargs) -> (GraphOp, fx arguments)`` of
:mod:`refngd.check.torch_graph`; :func:`functional_modules` maps the functional
activations (``F.relu``, ``torch.tanh``, ...) to the module whose registered converter
gives their layer.  A converter raises ``ValueError`` for a setting it cannot reproduce.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Callable

from ..nn.graph_more import Expand, Pad, Power, ScaledDotProduct, Softmax
from ..nn.graph_ops import Concat, Elementwise, MatMul, Permute, Reduce, ShapeOp, Split, batch_axis

__all__ = ["handlers", "functional_modules", "handler", "static_fn", "sizes", "CASTS",
           "unbound_permute"]


def _pick(args: list, kw: dict, i: int, name: str, default=None):
    """Argument ``name`` given at position ``i`` or by keyword."""
    if len(args) > i:
        return args[i]
    return kw.get(name, default)


def _not_batch(dim, what: str):
    """Refuse a literal dim 0 (the batch axis) when the model is imported."""
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    if any(isinstance(d, int) and d == 0 for d in dims):
        raise ValueError(f"{what} over dim 0, the batch axis, mixes the samples; refngd's "
                         "rows are per sample (docs/design.md §2)")
    return dim


def _varargs(args: list, start: int):
    """``view(a, b)`` or ``view((a, b))``: the sizes as one sequence."""
    rest = args[start:]
    return rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)


# --------------------------------------------------------------------------- shapes
def _flatten(x, start=0, end=-1):
    nd = x.ndim
    s, e = start % nd, end % nd
    return x.reshape(x.shape[:s] + (math.prod(x.shape[s:e + 1]),) + x.shape[e + 1:])


def _unflatten(x, dim, sizes):
    d = dim % x.ndim
    return x.reshape(x.shape[:d] + tuple(sizes) + x.shape[d + 1:])


def _squeeze(x, dim):
    d = batch_axis(dim, x.ndim, "squeeze")
    return x.reshape(x.shape[:d] + x.shape[d + 1:]) if x.shape[d] == 1 else x


def _unsqueeze(x, dim):
    d = dim % (x.ndim + 1)
    if d == 0:
        raise ValueError("unsqueeze(0) puts a new axis before the batch axis.")
    return x.reshape(x.shape[:d] + (1,) + x.shape[d:])


def _shape(name: str, fn: Callable, n_static: int):
    """A ShapeOp converter: the activation and ``n_static`` static arguments."""
    def convert(args, kw):
        return ShapeOp(fn, name), args[:1] + list(args[1:1 + n_static])
    return convert


def _reshape(args, kw):
    sizes = _varargs(args, 1) if len(args) > 1 else kw["shape"]
    return ShapeOp(lambda x, s: x.reshape(tuple(s)), "reshape"), [args[0], tuple(sizes)]


def _flatten_conv(args, kw):
    start, end = _pick(args, kw, 1, "start_dim", 0), _pick(args, kw, 2, "end_dim", -1)
    return ShapeOp(functools.partial(_flatten, start=start, end=end), "flatten"), [args[0]]


def _unflatten_conv(args, kw):
    dim, sizes = _pick(args, kw, 1, "dim"), _pick(args, kw, 2, "sizes")
    return ShapeOp(lambda x, d, s: _unflatten(x, d, s), "unflatten"), [args[0], dim, sizes]


def _squeeze_conv(args, kw):
    dim = _pick(args, kw, 1, "dim")
    if dim is None or isinstance(dim, (tuple, list)):
        raise ValueError("squeeze needs one dim (without it, a batch of one would lose its "
                         "batch axis)")
    return ShapeOp(lambda x, d: _squeeze(x, d), "squeeze"), [args[0], dim]


def _unsqueeze_conv(args, kw):
    return ShapeOp(lambda x, d: _unsqueeze(x, d), "unsqueeze"), [args[0],
                                                                 _pick(args, kw, 1, "dim")]


def _identity(name):
    return lambda args, kw: (ShapeOp(lambda x: x, name), args[:1])


def _expand(args, kw):
    sizes = _varargs(args, 1) if len(args) > 1 else kw["size"]
    return Expand(), [args[0], tuple(sizes)]


def _pow(args, kw):
    return Power(), [args[0], _pick(args, kw, 1, "exponent")]


def _permute(args, kw):
    return Permute(tuple(_varargs(args, 1) if len(args) > 1 else kw["dims"])), args[:1]


def _movedim(args, kw):
    src, dst = _pick(args, kw, 1, "source"), _pick(args, kw, 2, "destination")
    return Permute((src, dst), "movedim"), args[:1]


def _transpose(args, kw):
    d0, d1 = _pick(args, kw, 1, "dim0"), _pick(args, kw, 2, "dim1")
    return Permute((d0, d1), "transpose"), args[:1]


# --------------------------------------------------------------------------- arithmetic
def _elementwise(kind: str):
    def convert(args, kw):
        if kw.get("alpha", 1) != 1 or kw.get("rounding_mode") is not None:
            raise ValueError(f"{kind} with alpha / rounding_mode")
        if kind == "neg":
            return Elementwise("neg", (True,)), args[:1]
        other = _pick(args, kw, 1, "other")
        return Elementwise(kind, (True, True)), [args[0], other]
    return convert


def _reduce(kind: str):
    def convert(args, kw):
        dim = _pick(args, kw, 1, "dim")
        keepdim = _pick(args, kw, 2, "keepdim", False)
        if dim is None or (isinstance(dim, (tuple, list)) and not dim):
            raise ValueError(f"{kind} over every axis includes the batch axis; give dim")
        if kw.get("dtype") is not None:
            raise ValueError(f"{kind}(dtype=...)")
        return Reduce(kind, _not_batch(dim, kind), keepdim), args[:1]
    return convert


def _cat(args, kw):
    tensors = list(_pick(args, kw, 0, "tensors"))
    dim = _pick(args, kw, 1, "dim", 0)
    return Concat(_not_batch(dim, "cat"), ()), tensors


def _split(args, kw):
    size = _pick(args, kw, 1, "split_size_or_sections", kw.get("split_size"))
    dim = _pick(args, kw, 2, "dim", 0)

    def sizes(n):
        if isinstance(size, (tuple, list)):
            return list(size)
        return [size] * (n // size) + ([n % size] if n % size else [])
    return Split(sizes, _not_batch(dim, "split"), "split"), args[:1]


def _chunk(args, kw):
    chunks, dim = _pick(args, kw, 1, "chunks"), _pick(args, kw, 2, "dim", 0)

    def sizes(n):
        step = -(-n // chunks)
        return [step] * (n // step) + ([n % step] if n % step else [])
    return Split(sizes, _not_batch(dim, "chunk"), "chunk"), args[:1]


def _matmul(args, kw):
    return MatMul(()), [args[0], _pick(args, kw, 1, "other", kw.get("mat2"))]


def _softmax(log: bool):
    def convert(args, kw):
        dim = _pick(args, kw, 1, "dim")
        if dim is None:
            raise ValueError("softmax needs dim")
        op = Softmax(_not_batch(dim, "softmax"), log)
        op.dtype = _pick(args, kw, 3, "dtype")  # checked against the input's (torch_graph)
        return op, args[:1]
    return convert


def _sdpa(args, kw):
    mask = _pick(args, kw, 3, "attn_mask")
    if _pick(args, kw, 4, "dropout_p", 0.0):
        raise ValueError("scaled_dot_product_attention with dropout_p > 0 is random; call "
                         "model.eval() (curvature needs a deterministic function)")
    if kw.get("enable_gqa"):
        raise ValueError("scaled_dot_product_attention(enable_gqa=True)")
    op = ScaledDotProduct(_pick(args, kw, 5, "is_causal", False), _pick(args, kw, 6, "scale"))
    return op, list(args[:3]) + [mask]


def _pad(args, kw):
    mode = _pick(args, kw, 2, "mode", "constant")
    if mode != "constant":
        raise ValueError(f"pad(mode={mode!r}); refngd pads with a constant only")
    return Pad(), [args[0], _pick(args, kw, 1, "pad"), _pick(args, kw, 3, "value")]


@functools.lru_cache(maxsize=None)
def handlers(torch) -> dict:
    """Target (function or method name) → converter (module docstring)."""
    F = torch.nn.functional
    table: dict = {}

    def put(targets, conv):
        for t in targets:
            table[t] = conv

    for kind, fns in (("add", (operator.add, operator.iadd, torch.add, "add")),
                      ("sub", (operator.sub, operator.isub, torch.sub, "sub", torch.subtract,
                               "subtract")),
                      ("mul", (operator.mul, operator.imul, torch.mul, "mul", torch.multiply,
                               "multiply")),
                      ("div", (operator.truediv, operator.itruediv, torch.div, "div",
                               torch.divide, "divide")),
                      ("neg", (operator.neg, torch.neg, "neg"))):
        put(fns, _elementwise(kind))
    put(("view", "reshape", torch.reshape), _reshape)
    put(("flatten", torch.flatten), _flatten_conv)
    put(("unflatten", torch.unflatten), _unflatten_conv)
    put(("squeeze", torch.squeeze), _squeeze_conv)
    put(("unsqueeze", torch.unsqueeze), _unsqueeze_conv)
    put(("contiguous",), _identity("contiguous"))
    put(("clone", torch.clone), _identity("clone"))
    put(("expand",), _expand)
    put((operator.pow, torch.pow, "pow"), _pow)
    put(("permute", torch.permute), _permute)
    put(("transpose", torch.transpose, "swapaxes", torch.swapaxes), _transpose)
    put(("movedim", torch.movedim, "moveaxis", torch.moveaxis), _movedim)
    put(("mean", torch.mean), _reduce("mean"))
    put(("sum", torch.sum), _reduce("sum"))
    put((torch.cat, torch.concat, torch.concatenate), _cat)
    put(("split", torch.split), _split)
    put(("chunk", torch.chunk), _chunk)
    put((operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm"), _matmul)
    put((F.softmax, torch.softmax, "softmax"), _softmax(False))
    put((F.log_softmax, torch.log_softmax, "log_softmax"), _softmax(True))
    put((F.scaled_dot_product_attention,), _sdpa)
    put((F.pad, torch._C._nn.pad), _pad)
    return table


@functools.lru_cache(maxsize=None)
def functional_modules(torch) -> dict:
    """Functional activation (function or method name) → ``make(*args, **kw)`` of the
    equivalent module (None for the identity: dropout that is off)."""
    F, tnn = torch.nn.functional, torch.nn

    def plain(cls):
        return lambda inplace=False: cls()

    def dropout(p=0.5, training=True, inplace=False):
        if training and p:
            raise ValueError(f"dropout(p={p}, training=True) is random; call model.eval() "
                             "(curvature needs a deterministic function)")
        return None

    def stochastic_depth(p, mode, training=True):
        if training and p:
            raise ValueError(f"stochastic_depth(p={p}, training=True) drops residual branches "
                             "at random; call model.eval() (curvature needs a deterministic "
                             "function)")
        return None

    table = {F.relu: plain(tnn.ReLU), torch.relu: plain(tnn.ReLU), "relu": plain(tnn.ReLU),
             torch.tanh: plain(tnn.Tanh), F.tanh: plain(tnn.Tanh), "tanh": plain(tnn.Tanh),
             torch.sigmoid: plain(tnn.Sigmoid), F.sigmoid: plain(tnn.Sigmoid),
             "sigmoid": plain(tnn.Sigmoid),
             F.gelu: lambda approximate="none": tnn.GELU(approximate=approximate),
             F.silu: plain(tnn.SiLU), F.elu: lambda alpha=1.0, inplace=False: tnn.ELU(alpha),
             F.leaky_relu: lambda negative_slope=0.01, inplace=False: tnn.LeakyReLU(
                 negative_slope),
             F.softplus: lambda beta=1.0, threshold=20.0: tnn.Softplus(beta, threshold),
             F.relu6: plain(tnn.ReLU6),
             F.hardtanh: lambda min_val=-1.0, max_val=1.0, inplace=False: tnn.Hardtanh(
                 min_val, max_val),
             F.hardsigmoid: plain(tnn.Hardsigmoid), F.hardswish: plain(tnn.Hardswish),
             F.dropout: dropout,
             # torchvision.ops.stochastic_depth (EfficientNet, ConvNeXt): by name, as
             # torchvision may not import; the identity in eval mode, like dropout
             "torchvision.ops.stochastic_depth.stochastic_depth": stochastic_depth,
             F.max_pool1d: _pool(tnn.MaxPool1d, ("kernel_size", "stride", "padding", "dilation",
                                                 "ceil_mode", "return_indices")),
             F.max_pool2d: _pool(tnn.MaxPool2d, ("kernel_size", "stride", "padding", "dilation",
                                                 "ceil_mode", "return_indices")),
             F.avg_pool1d: _pool(tnn.AvgPool1d, ("kernel_size", "stride", "padding",
                                                 "ceil_mode", "count_include_pad")),
             F.avg_pool2d: _pool(tnn.AvgPool2d, ("kernel_size", "stride", "padding", "ceil_mode",
                                                 "count_include_pad", "divisor_override")),
             F.adaptive_avg_pool1d: lambda output_size: tnn.AdaptiveAvgPool1d(output_size),
             F.adaptive_avg_pool2d: lambda output_size: tnn.AdaptiveAvgPool2d(output_size),
             F.interpolate: _interpolate(tnn)}
    return table


def _pool(cls, names: tuple):
    """``F.max_pool2d(x, k, ...)`` → the module with the same arguments, by keyword."""
    def make(*args, **kw):
        kw.update(zip(names, args))
        return cls(**kw)
    return make


def _interpolate(tnn):
    def make(size=None, scale_factor=None, mode="nearest", align_corners=None,
             recompute_scale_factor=None, antialias=False):
        if antialias:
            raise ValueError("interpolate(antialias=True)")
        return tnn.Upsample(size, scale_factor, mode, align_corners, recompute_scale_factor)
    return make


#: functions and methods that draw random numbers: refused wherever they appear (a value
#: drawn while tracing would otherwise be frozen into the graph as a constant)
RANDOM = frozenset({
    "bernoulli", "bernoulli_", "rand", "randn", "rand_like", "randn_like", "randint",
    "randint_like", "randperm", "normal", "normal_", "uniform_", "exponential_", "geometric_",
    "cauchy_", "log_normal_", "random_", "multinomial", "poisson", "rrelu", "rrelu_",
    "alpha_dropout", "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d"})

#: methods that convert dtype (or device): the identity where the dtype does not change
CASTS = ("to", "type", "float", "double", "half", "bfloat16")


def sizes(args) -> tuple:
    """``expand(a, b)`` or ``expand((a, b))``: the sizes."""
    rest = args[1:]
    return tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else tuple(rest)


def static_fn(target, kw) -> Callable:
    if target == "size":
        return lambda x, d=None: tuple(x.shape) if d is None else x.shape[d]
    if target == "dim":
        return lambda x: x.ndim
    if target is getattr:
        return lambda x, name: tuple(x.shape)
    return target


def handler(torch, target):
    """The converter of an operation: ``(args, kwargs) -> (GraphOp, fx args)``, or None."""
    return handlers(torch).get(target)


def unbound_permute(torch, node, args):
    """The dims of an fx ``permute`` node that moves the batch axis to 1 and is only
    unbound along axis 0 (timm's attention), else None (a plain :class:`Permute`)."""
    dims = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) \
        else tuple(args[1:])
    if not dims or not all(isinstance(d, int) for d in dims):
        return None
    perm = [d % len(dims) for d in dims]
    unbind = ("unbind", torch.unbind)
    ok = all((u.target is operator.getitem and isinstance(u.args[1], int))
             or (u.target in unbind and (u.args[1:] or (u.kwargs.get("dim", 0),))[0] == 0)
             for u in node.users)
    return dims if perm[0] != 0 and perm[1] == 0 and node.users and ok else None
