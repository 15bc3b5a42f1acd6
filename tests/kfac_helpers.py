"""Helpers shared by the K-FAC test files."""
import numpy as np


def rel_err(a, b):
    """max |a − b| / max |b| (with a floor for an all-zero reference)."""
    return float(np.abs(np.asarray(a) - b).max() / max(np.abs(b).max(), 1e-300))


def block_mask(model, bias):
    """K-FAC's block structure: per parameter tensor (separate) or per layer (joint)."""
    M = np.zeros((model.num_params,) * 2, dtype=bool)
    for layer, (s, e) in zip(model.layers, model.slices):
        if bias == "joint":
            M[s:e, s:e] = True
            continue
        for shape in layer.param_shapes:
            n = int(np.prod(shape))
            M[s:s + n, s:s + n] = True
            s += n
    return M
