"""The two small networks of ``refngd compare``: an MLP and a CNN, as :class:`refngd.nn.Sequential`."""
from __future__ import annotations

import math

from .. import nn

MODEL_KINDS = ("mlp", "cnn")


def build_model(kind: str, input_shape: tuple, num_classes: int, width: int = 64):
    """A classifier for inputs of per-sample shape ``input_shape``.

    * ``"mlp"``: Linear(D, width) – Tanh – Linear(width, width) – Tanh – Linear(width, C)
      (D = prod(input_shape); for the digits 64-64-64-10, 8 970 parameters).
    * ``"cnn"``: Conv2d(C_in, 8, 3, padding=1) – Tanh – Conv2d(8, 16, 3, stride=2,
      padding=1) – Tanh – Flatten – Linear(16·⌈H/2⌉·⌈W/2⌉, C) (for 1×8×8 digits: 3 818
      parameters).

    Tanh rather than ReLU: smooth, so every curvature is well defined everywhere.
    """
    if kind not in MODEL_KINDS:
        raise ValueError(f"model must be one of {MODEL_KINDS}, got {kind!r}.")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
    if kind == "mlp":
        D = math.prod(input_shape)
        return nn.Sequential(nn.Linear(D, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                             nn.Linear(width, num_classes))
    if len(input_shape) != 3:
        raise ValueError(f"the cnn needs inputs of shape (C, H, W), got {tuple(input_shape)}.")
    c, h, w = input_shape
    flat = 16 * ((h + 1) // 2) * ((w + 1) // 2)
    return nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.Tanh(),
                         nn.Flatten(), nn.Linear(flat, num_classes))
