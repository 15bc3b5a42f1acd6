"""Parameter subsets: curvature and updates over selected parameter tensors only (docs/subsets.md).

Frozen layers, last-layer Laplace, LoRA adapters and prompt embeddings all restrict the
curvature to a subset S of θ's entries.  refngd follows curvlinops' ``params`` argument:
the operator on a subset is the P_S × P_S *submatrix* F[S, S] of the full curvature, and
every vector it takes or returns (gradient, update, ``F @ v``) is a subset-length vector
holding θ[S] in θ's order — for a boolean mask ``m`` exactly the entries ``theta[m]``,
so that a step is ``theta[m] -= lr * d``.  :meth:`ParamSubset.embed` writes a subset
vector into a full-length one with zeros in the frozen slots.

Selections are by whole parameter tensors (a weight, a bias, a LoRA factor), as
curvlinops' list of tensors and PyTorch's ``requires_grad``.  Frozen tensors cost no row
work: their layers' Gram contributions, U v and Uᵀ w terms are never computed, and
layers before the first selected one are not even back-propagated through
(:meth:`refngd.nn.Linearization.backprop`).

What ``params=`` accepts (:func:`resolve_params`):

* ``None`` — the model's trainable parameters (:func:`trainable_mask`; every tensor unless
  a layer freezes some by default, as :class:`refngd.nn.LoRALinear` freezes its base);
* ``"all"`` — every parameter, frozen-by-default ones included;
* a boolean array of shape (P,) in θ's layout, constant on every parameter tensor;
* a sequence of integer layer indices (positions in ``model.layers``): all tensors of
  those layers;
* a :class:`ParamSubset` (returned as is after a size check).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..backend import Array, namespace, to_device, to_numpy


@dataclass(frozen=True, eq=False)
class ParamSubset:
    """A selection of θ's entries, in θ's order (build it with :func:`resolve_params`).

    Attributes
    ----------
    num_total : P, the length of θ.
    mask : host boolean array (P,).
    index : host integer array (P_S,) of the selected θ positions, ascending.
    active : for a :class:`refngd.nn.Sequential`, per layer of ``model.layers`` a tuple with
        one bool per parameter tensor (``param_shapes`` order); ``None`` for a FunctionModel.
    starts : per layer, where its selected entries begin in the subset vector.
    """

    num_total: int
    mask: Array
    index: Array
    active: tuple | None = None
    starts: tuple | None = None

    @property
    def num_params(self) -> int:
        """P_S, the number of selected parameters."""
        return int(self.index.shape[0])

    def select(self, v: Array) -> Array:
        """θ[S]: the subset entries of a full-length vector v (P,)."""
        if getattr(v, "shape", None) != (self.num_total,):
            raise ValueError(f"v must have the full length P = {self.num_total}, got "
                             f"{getattr(v, 'shape', v)}.")
        return v[to_device(self.index, like=v)]

    def embed(self, d: Array, fill: float = 0.0) -> Array:
        """A full-length (P,) vector with d (P_S,) in the selected slots and ``fill`` elsewhere."""
        if getattr(d, "shape", None) != (self.num_params,):
            raise ValueError(f"d must be a subset vector of length {self.num_params}, got "
                             f"{getattr(d, 'shape', d)}.")
        xp = namespace(d)
        out = xp.full(self.num_total, fill, dtype=d.dtype)
        out[to_device(self.index, like=d)] = d
        return out


def trainable_mask(model) -> Array:
    """The model's default selection as a host boolean array (P,).

    Every tensor of a :class:`refngd.nn.Sequential` is trainable unless its layer's
    ``trainable`` attribute (one bool per tensor, PyTorch's ``requires_grad``) says
    otherwise; every entry of a FunctionModel is.
    """
    m = to_numpy(True).repeat(int(model.num_params))
    layers = getattr(model, "layers", None)
    if layers is None:
        return m
    for slot in model.layout:
        flags = getattr(layers[slot.layer], "trainable", ())
        if slot.tensor < len(flags):
            m[slot.start:slot.stop] = bool(flags[slot.tensor])
    return m


def peft_mask(model) -> Array:
    """The parameters PEFT trains: the adapters of every LoRA layer and the prompt embeddings.

    A host boolean array (P,) selecting the default-trainable tensors of the model's
    :class:`refngd.nn.LoRALinear` (A and B) and :class:`refngd.nn.PromptPrefix` layers —
    also inside composite layers (LoRA on a :class:`refngd.nn.MultiheadAttention`'s
    projections) — and nothing else: what ``peft.get_peft_model`` leaves with
    ``requires_grad``.  In a model imported from peft (a :class:`refngd.nn.GraphModel`), the
    trainable tensors that peft named ``lora_*``.
    """
    m = trainable_mask(model)
    names = getattr(model, "tensor_names", None)  # an imported graph: θ's tensors by name
    for t, slot in enumerate(model.layout):
        adapter = model.layers[slot.layer].peft_tensors[slot.tensor] or (
            names is not None and ".lora_" in f".{names[t]}")  # peft's lora_A, lora_B, ...
        m[slot.start:slot.stop] &= adapter
    if not bool(m.any()):
        raise ValueError("peft_mask: the model has no LoRALinear or PromptPrefix layer.")
    return m


def resolve_params(model, params) -> ParamSubset | None:
    """Turn a ``params=`` argument into a :class:`ParamSubset`, or ``None`` for all of θ.

    See the module docstring for what ``params`` may be.  Raises ``ValueError`` /
    ``TypeError`` saying what is wrong for an empty selection, a mask of the wrong shape
    or dtype, a mask that splits a parameter tensor, a layer index out of range or of a
    layer without parameters, and a partial selection a layer cannot honour.
    """
    P = int(model.num_params)
    if isinstance(params, ParamSubset):
        if params.num_total != P:
            raise ValueError(f"this ParamSubset was built for P = {params.num_total} parameters, "
                             f"the model has {P}.")
        return params
    if params is None:
        mask = trainable_mask(model)
    elif isinstance(params, str):
        if params != "all":
            raise ValueError(f"params must be None, 'all', a boolean mask or layer indices, "
                             f"got the string {params!r}.")
        return None
    else:
        mask = _as_mask(model, params, P)
    return _from_mask(model, mask, P)


def _as_mask(model, params, P: int) -> Array:
    try:
        arr = to_numpy(params)
    except Exception:
        arr = None
    if arr is None or arr.ndim != 1 or arr.dtype.kind not in "biu":
        raise TypeError(
            "params must be None, 'all', a boolean mask of θ's shape (P,), or a sequence of "
            f"layer indices; got {type(params).__name__}"
            + (f" of dtype {arr.dtype} and shape {arr.shape}" if arr is not None else "") + ".")
    if arr.dtype.kind == "b":
        if arr.shape != (P,):
            raise ValueError(f"a boolean params mask must have θ's shape ({P},), got {arr.shape}.")
        return arr
    layers = getattr(model, "layers", None)
    if layers is None:
        raise TypeError(f"layer indices need a refngd.nn.Sequential; for {type(model).__name__} "
                        "pass a boolean mask of θ's shape.")
    mask = to_numpy(False).repeat(P)
    for i in arr.tolist():
        if not -len(layers) <= i < len(layers):
            raise ValueError(f"params: layer index {i} is out of range for a model with "
                             f"{len(layers)} layers.")
        start, stop = model.layout.layer_slices[i]
        if start == stop:
            raise ValueError(f"params: layer {i} ({layers[i]!r}) has no parameters; index "
                             "parametric layers only.")
        mask[start:stop] = True
    return mask


def _from_mask(model, mask, P: int) -> ParamSubset | None:
    if not bool(mask.any()):
        raise ValueError("params selects no parameters; select at least one parameter tensor.")
    if bool(mask.all()):
        return None
    index = mask.nonzero()[0]
    layers = getattr(model, "layers", None)
    if layers is None:
        return ParamSubset(P, mask, index)
    active, starts, pos = [], [], 0
    for i, layer in enumerate(layers):
        starts.append(pos)
        flags = []
        for slot in model.layout.of_layer(i):
            n_on = int(mask[slot.start:slot.stop].sum())
            if 0 < n_on < slot.size:
                raise ValueError(
                    f"params selects {n_on} of the {slot.size} entries of parameter tensor "
                    f"{slot.tensor} (shape {slot.shape}) of layer {i} ({layer!r}); refngd "
                    "selects whole tensors, as curvlinops' params list and PyTorch's "
                    "requires_grad do: select all of its entries or none.")
            flags.append(n_on == slot.size)
            pos += n_on
        flags = tuple(flags)
        if any(flags) and not all(flags):
            try:
                layer.check_subset(flags)
            except ValueError as err:
                raise ValueError(f"params: layer {i}: {err}") from None
        active.append(flags)
    return ParamSubset(P, mask, index, tuple(active), tuple(starts))
