"""The θ layout: where each parameter tensor of a chain of layers lives in θ (docs/design.md §3).

:class:`ParamLayout` is the single owner of this fact; :class:`refngd.nn.Sequential` builds
it from its layers' ``param_shapes`` and ``param_names`` (``model.layout``), and subsets,
weight files, the validation kit and the optimizers read it instead of walking the layers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..backend import Array

__all__ = ["TensorSlot", "ParamLayout"]


@dataclass(frozen=True)
class TensorSlot:
    """One parameter tensor's place in θ (docs/design.md §3).

    ``layer`` is its layer's index in ``model.layers``, ``tensor`` its index among that
    layer's ``param_shapes``, ``name`` its PyTorch ``state_dict`` name within the layer
    (``key`` adds the layer index, as ``nn.Sequential``'s state dict does), and
    θ[start:stop] its entries, row-major in ``shape``.
    """

    layer: int
    tensor: int
    name: str
    shape: tuple[int, ...]
    start: int
    stop: int

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.name}"

    @property
    def size(self) -> int:
        return self.stop - self.start


class ParamLayout:
    """The θ layout of a chain of layers: one :class:`TensorSlot` per parameter tensor.

    The single owner of "where is tensor t of layer l in θ": PyTorch's
    ``parameters_to_vector(model.parameters())`` order — layer by layer, each layer's
    ``param_shapes`` in order, each tensor row-major.
    """

    def __init__(self, layers) -> None:
        slots, spans, start = [], [], 0
        for i, layer in enumerate(layers):
            first = start
            for t, (shape, name) in enumerate(zip(layer.param_shapes, layer.param_names)):
                size = math.prod(shape)
                slots.append(TensorSlot(i, t, name, tuple(shape), start, start + size))
                start += size
            spans.append((first, start))
        self.slots: tuple[TensorSlot, ...] = tuple(slots)
        #: (start, stop) of every layer's slice of θ (empty for a layer without parameters)
        self.layer_slices: tuple[tuple[int, int], ...] = tuple(spans)
        self.num_params = start

    def __iter__(self):
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def of_layer(self, index: int) -> tuple[TensorSlot, ...]:
        """The slots of layer ``index``, in θ order."""
        return tuple(s for s in self.slots if s.layer == index)

    def keys(self) -> list[str]:
        """``state_dict`` keys of every tensor (``"0.weight"``, ``"0.bias"``, ...)."""
        return [s.key for s in self.slots]

    def split(self, v: Array, index: int | None = None) -> list:
        """Views of a parameter vector's blocks, shaped like the tensors: of layer
        ``index``, or per layer (a list of lists) when ``index`` is None."""
        if index is None:
            return [self.split(v, i) for i in range(len(self.layer_slices))]
        return [v[s.start:s.stop].reshape(s.shape) for s in self.of_layer(index)]
