"""Converters for the modules of optional model libraries that are not ``torch.nn``
modules: today transformers' ``Conv1D`` (GPT-2's projections, a Linear layer whose weight
is stored (in, out)) → :class:`refngd.nn.TransposedLinear`.

They are registered when the library is already imported (refngd imports none of them):
:func:`install` runs on every ``from_torch`` call.  Everything else these libraries build
from — ``torch.nn`` modules, functional calls, peft's LoRA layers (traced through: a base
layer plus ``lora_B(lora_A(x)) · scaling``) — converts through the registry and the graph
import (docs/layers.md, "Model families").
"""
from __future__ import annotations

import sys

from .. import nn

__all__ = ["install"]


def _conv1d(m, path):
    return [(nn.TransposedLinear(m.nx, m.nf, bias=m.bias is not None),
             [t for t in (m.weight, m.bias) if t is not None])]


def install(registry: dict, register) -> None:
    """Register the converters of the optional libraries that are imported."""
    utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(utils, "Conv1D", None)
    if conv1d is not None and conv1d not in registry:
        register(conv1d, _conv1d)
