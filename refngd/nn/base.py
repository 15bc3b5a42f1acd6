"""The layer protocol: explicit forward pass and back-propagation of *row cotangents*.

A layer maps a batch ``x`` of shape ``(N, *in_shape)`` to ``(N, *out_shape)``.  Instead of
the usual single vector-Jacobian product, :meth:`Layer.backward` propagates a whole set of
R = N·K cotangent rows at once, stored as an array ``B`` of shape ``(N, K, *out_shape)``:
row ``(n, k)`` belongs to sample ``n`` (docs/design.md §2).  One backward pass with these rows
yields every curvature quantity of refngd.

Layers with parameters (:class:`ParametricLayer`) also define the *row primitives* — the
per-layer contractions of the implicit row matrix U (R × P_layer), whose row ``(n, k)`` is
the parameter gradient of ⟨B[n, k], layer output of sample n⟩:

========================  ======================  ===========================================
primitive                  returns                 meaning
========================  ======================  ===========================================
``row_gram(cache, B)``     (R, R) float64          U Uᵀ, the layer's Gram contribution
``row_dot(cache, B, V)``   (N, K)                  U v for a parameter block list V
``row_sum(cache, B, w)``   list of blocks          Uᵀ w for row weights w of shape (N, K)
``row_grads(cache, B)``    (N, K, P_layer)         U itself, rows flattened in PyTorch order
``row_sq_sum(cache, B)``   (P_layer,)              diag(UᵀU) = Σ_r u_r ⊙ u_r
========================  ======================  ===========================================

A layer may also define ``row_sum_into(cache, B, w, out)``: :meth:`row_sum` written into
``out``, views of the result vector shaped like ``param_shapes`` (Linear and Conv2d do:
their weight block is then one GEMM straight into Uᵀw, with no temporary and no copy).

Like HIPS autograd's primitives, each layer's derivatives sit right beside its forward.

Beyond its derivatives a layer owns every other fact about itself that the rest of refngd
reads (docs/design.md §6, "The layer protocol"); nothing outside :mod:`refngd.nn` asks
what type a layer is:

==============================  ===========================================================
attribute / method               used by
==============================  ===========================================================
``param_shapes``, ``param_names``  the θ layout (:class:`refngd.nn.ParamLayout`), weight files, names
``kfac_refusal()``               K-FAC / EKFAC / the Kronecker diagonal: None, or the error
``weight_matrix_shape``          (d_out, D): the weight as the matrix K-FAC factors
``weight_sharing(cache)``        None, ``"sequence"`` or ``"spatial"``: T positions share W
``tokens(cache)``                (N, T, D) the inputs W sees (T = 1 without sharing)
``token_rows(B)``                (N, K, d_out, T) the rows at those T positions
``kfac_groups``                  g: the weight is g disjoint blocks (grouped convolution)
``backward_workspace(...)``      :mod:`refngd.memory`: temporaries of ``backward``
``gram_workspace(...)``          :mod:`refngd.memory`: temporaries of ``row_gram``
==============================  ===========================================================

A new layer that implements the row primitives (or only ``row_grads``, as a
:class:`SmallParametricLayer`) works with every exact curvature, update and subset; one
that also implements the four K-FAC entries gets K-FAC, EKFAC and the Kronecker diagonal
(tests/test_layer_protocol.py defines one in a single file).

Parameter subsets (docs/subsets.md) enter through :meth:`ParametricLayer.row_views`: it
returns the row-primitive objects of the layer's *selected* tensors only — the layer
itself when all are selected, a restriction of it (say its weight without its bias) when
some are, or the views of its sub-layers when it is built from simpler layers
(:class:`refngd.nn.Composite`: a LoRA layer is a frozen Linear plus two trainable ones, an
attention layer two Linear projections around a parameter-free attention).  Frozen tensors
thus never enter a row primitive.  :meth:`Layer.backward_views` is the one backward step
of :meth:`refngd.nn.Linearization.backprop`: the selected tensors' views and the rows at
the layer's input.
"""
from __future__ import annotations

import math
import operator
from abc import ABC, abstractmethod
from typing import Any

from ..backend import Array, namespace, to_numpy
from ..options import ArgumentTypeError, check_int

#: bytes of a float64: Gram matrices and factorisations are float64 (docs/design.md §3)
_F8 = 8


def positive_int(value, name: str, owner: str) -> int:
    """``value`` as an int ≥ 1 (:func:`refngd.options.check_int`), naming the layer."""
    return check_int(value, f"{owner} {name}")


def layer_ints(values: dict, owner: str, message: str | None = None) -> list[int]:
    """Each of ``values`` (name → value) as an int ≥ 1: :class:`ArgumentTypeError` for a
    non-integer, ``ValueError`` for one below 1 — with ``message`` if given (the layer's
    own wording, naming both sizes), else :func:`positive_int`'s."""
    out = []
    for name, v in values.items():
        if message is None:
            out.append(positive_int(v, name, owner))
            continue
        if isinstance(v, bool) or not hasattr(v, "__index__"):
            raise ArgumentTypeError(message)
        if operator.index(v) < 1:
            raise ValueError(message)
        out.append(operator.index(v))
    return out


def int_pair(value, name: str, owner: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (kernel size, stride, padding, ...), each ≥ ``minimum``."""
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    what = f"{owner} {name} must be an int or a pair of ints, got {value!r}."
    if len(vals) != 2:
        raise ValueError(what)
    if any(isinstance(v, bool) or not hasattr(v, "__index__") for v in vals):
        raise ArgumentTypeError(what)
    vals = tuple(operator.index(v) for v in vals)
    if min(vals) < minimum:
        raise ValueError(f"{owner} {name} must be >= {minimum}, got {value!r}.")
    return vals


def int_single(value, name: str, owner: str, minimum: int) -> int:
    """An int, or a 1-tuple of one (PyTorch's ``_single``: the sizes of 1-d layers), ≥ ``minimum``."""
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ValueError(f"{owner} {name} must be an int or a 1-tuple, got {value!r}.")
        value = value[0]
    return check_int(value, f"{owner} {name}", minimum)


def host_full(shape: tuple[int, ...], value: float):
    """A host float64 array of ``shape`` filled with ``value`` (for ``init_params``)."""
    return to_numpy([float(value)] * math.prod(shape)).reshape(shape)


class Layer(ABC):
    """A layer without parameters (activations, reshapes)."""

    #: True for layers that read integer indices (Embedding): only first in a Sequential
    integer_input: bool = False

    #: shapes of the parameter arrays, in PyTorch's ``parameters()`` order
    param_shapes: tuple[tuple[int, ...], ...] = ()

    @property
    def param_names(self) -> tuple[str, ...]:
        """PyTorch's ``state_dict`` names of the parameter tensors, in θ order (relative to
        the module: ``"weight"``, ``"bias"``; a composite's ``"linear1.weight"``)."""
        return ("weight", "bias")[:len(self.param_shapes)]

    @property
    def peft_tensors(self) -> tuple[bool, ...]:
        """Per tensor: is it one PEFT trains (a LoRA adapter, a prompt embedding)?
        (:func:`refngd.nn.subsets.peft_mask`)."""
        return (False,) * len(self.param_shapes)

    def out_shape(self, in_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample output shape for a per-sample input shape; raises on a mismatch."""
        return in_shape

    @abstractmethod
    def forward(self, params: list[Array], x: Array) -> tuple[Array, Any]:
        """Return ``(output, cache)``; ``cache`` holds what :meth:`backward` needs."""

    @abstractmethod
    def backward(self, params: list[Array], cache: Any, B: Array) -> Array:
        """Pull row cotangents ``B`` (N, K, *out_shape) back to (N, K, *in_shape)."""

    def init_params(self, rng) -> list:
        """Host (NumPy) initial parameters drawn with ``rng``; empty for this layer."""
        return []

    def backward_views(self, params: list[Array], cache: Any, B: Array, active: tuple[bool, ...],
                       need_input: bool = True) -> tuple[list, Array | None]:
        """One backward step of :meth:`refngd.nn.Linearization.backprop`: ``(views, B_in)``.

        ``views`` are the row views of the selected tensors (``active``, one bool per
        tensor; see :meth:`ParametricLayer.row_views`) — none for a layer without
        parameters — and ``B_in`` the rows pulled back to the input (None when
        ``need_input`` is False and the input rows cost extra work).
        :class:`refngd.nn.Composite` overrides it to get both from one pass through its
        sub-layers, which forms the input rows anyway.
        """
        return [], (self.backward(params, cache, B) if need_input else None)

    # ------------------------------------------------------------ memory (refngd.memory)
    def backward_workspace(self, in_shape: tuple, out_shape: tuple, R: int) -> int:
        """Array elements that :meth:`backward` allocates for R rows besides its result."""
        return 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ParametricLayer(Layer):
    """A layer with parameters; adds the row primitives listed in the module docstring.

    ``trainable`` (one bool per tensor of ``param_shapes``) is the layer's default
    selection when a curvature gets ``params=None`` — PyTorch's ``requires_grad``;
    every tensor unless a subclass or the user sets it otherwise.
    """

    @property
    def trainable(self) -> tuple[bool, ...]:
        return getattr(self, "_trainable", None) or (True,) * len(self.param_shapes)

    @trainable.setter
    def trainable(self, flags) -> None:
        self._trainable = self._trainable_flags(flags)

    def _trainable_flags(self, flags) -> tuple[bool, ...]:
        """``flags`` as one bool per parameter tensor, or a clear error."""
        flags = tuple(bool(f) for f in flags)
        if len(flags) != len(self.param_shapes):
            raise ValueError(f"{self!r}.trainable needs one bool per parameter tensor "
                             f"({len(self.param_shapes)}), got {len(flags)}.")
        return flags

    def restrict(self, active: tuple[bool, ...]) -> "ParametricLayer":
        """Row primitives of the tensors with ``active[t]`` only (some, not all, selected).

        The returned object's ``param_shapes`` are the selected shapes, in order, and its
        row primitives take this layer's cache and rows.  Layers that do not override this
        refuse partial selections: select all of their tensors or none.
        """
        raise ValueError(f"{self!r} cannot restrict its curvature to some of its parameter "
                         "tensors; select all of them or none.")

    def check_subset(self, active: tuple[bool, ...]) -> None:
        """Raise ``ValueError`` unless :meth:`row_views` supports the selection ``active``."""
        if any(active) and not all(active):
            self.restrict(active)

    def row_views(self, cache: Any, B: Array, active: tuple[bool, ...]) -> list:
        """``[(primitives, cache, B)]`` covering the selected tensors, in θ order.

        Each ``primitives`` is a :class:`ParametricLayer` whose row primitives, called with
        the paired cache and rows, give the selected tensors' rows; the concatenation of
        their ``param_shapes`` is the selected tensors in θ order.  Nothing is computed for
        unselected tensors.
        """
        if all(active):
            return [(self, cache, B)]
        if not any(active):
            return []
        return [(self.restrict(active), cache, B)]

    def backward_views(self, params, cache, B, active, need_input=True):
        views = self.row_views(cache, B, active) if any(active) else []
        return views, (self.backward(params, cache, B) if need_input else None)

    # ------------------------------------------------------------ memory (refngd.memory)
    def gram_workspace(self, in_shape: tuple, out_shape: tuple, N: int, K: int,
                       itemsize: int) -> int:
        """Bytes :meth:`row_gram` holds besides the accumulated R × R Gram matrix.

        The default is a dense layer's: its R × R contribution, the N × N input Gram (and
        its copy), and float64 copies of float32 rows.
        """
        R, out_size = N * K, math.prod(out_shape)
        return (R * R + 2 * N * N + (itemsize != _F8) * R * out_size) * _F8

    # ------------------------------------------------------------ K-FAC (docs/kfac.md)
    def kfac_refusal(self) -> Exception | None:
        """None when K-FAC applies to this layer's rows, else the error that says why not.

        K-FAC needs a weight matrix W (d_out × D) acting on input vectors (at T positions
        that share it): the four entries below.  Layers without one refuse it here.
        """
        return TypeError(f"K-FAC supports Linear and Conv2d layers (also the projections "
                         "inside MultiheadAttention) and other layers whose weight is a "
                         f"matrix acting on input vectors, not {self!r}; use the exact "
                         "curvatures (Fisher, EmpiricalFisher, ...) for it.")

    @property
    def weight_matrix_shape(self) -> tuple[int, int]:
        """(d_out, D): the weight as the matrix whose K-FAC factors are G and A."""
        raise self.kfac_refusal()

    def weight_sharing(self, cache: Any) -> str | None:
        """How many positions share the weight: None (one, a dense layer), ``"sequence"``
        (tokens) or ``"spatial"`` (image locations); K-FAC's ``kfac_approx`` applies to
        the last two (Eschenhagen et al. 2023, §3)."""
        raise self.kfac_refusal()

    def tokens(self, cache: Any) -> Array:
        """(N, T, g·D): the input vectors ā_nt the weight multiplies (T = 1 without
        sharing; g = :attr:`kfac_groups`, 1 but for grouped convolutions)."""
        raise self.kfac_refusal()

    @property
    def kfac_groups(self) -> int:
        """g ≥ 1: the weight is g disjoint blocks, block j mapping input columns
        j·D:(j+1)·D of :meth:`tokens` to outputs j·d_out/g:(j+1)·d_out/g of
        :meth:`token_rows` — a grouped convolution.  Block j's entries are the rows
        j·d_out/g:(j+1)·d_out/g of the (d_out, D) weight matrix (contiguous in θ); K-FAC
        gives each block its own factors (docs/kfac.md, "Grouped convolution")."""
        return 1

    def token_rows(self, B: Array) -> Array:
        """(N, K, d_out, T): row b_rt at each of the T positions (a view where possible)."""
        raise self.kfac_refusal()

    @abstractmethod
    def row_gram(self, cache: Any, B: Array) -> Array:
        """(R, R) float64 Gram matrix U Uᵀ of this layer's rows."""

    @abstractmethod
    def row_dot(self, cache: Any, B: Array, V: list[Array]) -> Array:
        """(N, K) products U v, for v given as this layer's parameter blocks V."""

    @abstractmethod
    def row_sum(self, cache: Any, B: Array, w: Array) -> list[Array]:
        """Uᵀ w as parameter blocks, for row weights w of shape (N, K)."""

    @abstractmethod
    def row_grads(self, cache: Any, B: Array) -> Array:
        """(N, K, P_layer) per-row gradients, flattened in PyTorch order."""

    @abstractmethod
    def row_sq_sum(self, cache: Any, B: Array) -> Array:
        """(P_layer,) diagonal of UᵀU, i.e. Σ_r u_r ⊙ u_r."""


class SmallParametricLayer(ParametricLayer):
    """A layer with few parameters per output (normalisation layers' scale and shift).

    Its per-row gradients U_l (R × P_l) cost no more than its backward pass, so every row
    primitive is read off the materialised U_l: the Gram U_l U_lᵀ (R²·P_l), U_l v, U_lᵀ w
    and Σ_r u_r ⊙ u_r.  Subclasses implement :meth:`row_grads` only.  Any selection of
    its tensors is supported (:meth:`restrict`: the selected columns of U_l).
    """

    def _U(self, cache, B):
        N, K = B.shape[:2]
        return self.row_grads(cache, B).reshape(N * K, -1)

    def restrict(self, active):
        """The selected tensors' columns of U_l (a :class:`SmallParametricLayer` view)."""
        if len(active) != len(self.param_shapes):
            raise ValueError(f"{self!r} has {len(self.param_shapes)} tensors, got a selection "
                             f"of {len(active)}.")
        return _Columns(self, active)

    def row_gram(self, cache, B):
        xp = namespace(B)
        U = self._U(cache, B).astype(xp.float64, copy=False)
        return U @ U.T

    def row_dot(self, cache, B, V):
        xp = namespace(B)
        v = xp.concatenate([b.reshape(-1) for b in V])
        return (self._U(cache, B) @ v).reshape(B.shape[:2])

    def row_sum(self, cache, B, w):
        return split_blocks(w.reshape(-1) @ self._U(cache, B), 0, self.param_shapes)

    def row_sq_sum(self, cache, B):
        U = self._U(cache, B)
        return (U * U).sum(axis=0)


class _RowsView(SmallParametricLayer):
    """Row primitives of part of a layer (``restrict``): read off its materialised rows,
    never a layer of a model itself."""

    _kind = "a row view"

    def forward(self, params, x):  # pragma: no cover - a view, never in a model
        raise TypeError(f"{self._kind} is a view of a layer's rows, not a layer of a model.")

    def backward(self, params, cache, B):  # pragma: no cover
        raise TypeError(f"{self._kind} is a view of a layer's rows, not a layer of a model.")


class BiasRows(_RowsView):
    """Row primitives of a bias alone, for a layer whose weight is frozen.

    A bias b (d_out,) added at every position of the output (one position for Linear on
    (N, d), the T tokens of Linear on sequences, the T image locations of Conv2d) has the
    per-row gradient β_r = Σ_t b_rt, the row summed over positions.  The rows' channel axis
    is right after (N, K) — (N, K, d_out, *positions), Conv2d — or, with
    ``channels_last``, last — (N, K, *positions, d_out), Linear.
    Gram β_r·β_r', U v = β_r·v, Uᵀ w = Σ_r w_r β_r (from the rows β, as every
    :class:`SmallParametricLayer`).
    """

    _kind = "BiasRows"

    def __init__(self, parent: ParametricLayer, d_out: int, channels_last: bool = False):
        self.parent, self.d_out, self.channels_last = parent, int(d_out), bool(channels_last)
        self.param_shapes = ((self.d_out,),)

    def __repr__(self) -> str:
        return f"BiasRows({self.parent!r})"

    def kfac_refusal(self) -> Exception | None:
        return ValueError(
            f"K-FAC needs a layer's weight: the subset selects the bias of {self.parent!r} "
            "without its weight; select the whole layer, or use the exact curvatures, "
            "which support bias-only subsets.")

    def row_grads(self, cache, B):
        """β (N, K, d_out): each row summed over the output positions."""
        N, K = B.shape[:2]
        if self.channels_last:
            Bm = B.reshape(N, K, -1, self.d_out)
            return Bm[:, :, 0] if Bm.shape[2] == 1 else Bm.sum(axis=2)
        Bm = B.reshape(N, K, self.d_out, -1)
        return Bm[..., 0] if Bm.shape[3] == 1 else Bm.sum(axis=3)


class _Columns(_RowsView):
    """Some tensors of a :class:`SmallParametricLayer`: its per-row gradients' columns."""

    _kind = "a restricted layer"

    def __init__(self, parent: SmallParametricLayer, active: tuple[bool, ...]):
        self.parent, self._cols, i = parent, [], 0
        for shape, on in zip(parent.param_shapes, active):
            size = math.prod(shape)
            if on:
                self._cols.append((i, i + size))
            i += size
        self.param_shapes = tuple(s for s, on in zip(parent.param_shapes, active) if on)

    def __repr__(self) -> str:
        return f"{self.parent!r} (restricted)"

    def row_grads(self, cache, B):
        G = self.parent.row_grads(cache, B)
        return namespace(B).concatenate([G[:, :, a:b] for a, b in self._cols], axis=2)


def num_elements(shapes) -> int:
    """Σ over ``shapes`` of the number of entries."""
    return sum(math.prod(s) for s in shapes)


def split_blocks(v: Array, start: int, shapes) -> list:
    """Views of ``v[start:]`` cut into consecutive blocks of ``shapes`` (row-major): the θ
    layout of one layer or row view, for code that holds its start and shapes."""
    out, i = [], start
    for shape in shapes:
        size = math.prod(shape)
        out.append(v[i:i + size].reshape(shape))
        i += size
    return out
