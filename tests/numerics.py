"""Shared comparison helpers of the test suite (the references themselves stay in each test)."""
from __future__ import annotations

import autograd.numpy as anp
import numpy as np


def assert_close(actual, expected, tol=1e-10):
    """Entrywise |a − e| ≤ tol · max|e| (a relative tolerance on the scale of the array)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-300)
    err = float(np.abs(actual - expected).max(initial=0.0))
    assert err <= tol * scale, f"max error {err:.3e} > {tol:.1e} x scale {scale:.3e}"


def unpack(theta, shapes):
    """θ split into autograd arrays of the given shapes, in order (PyTorch's layout)."""
    out, i = [], 0
    for s in shapes:
        size = int(np.prod(s))
        out.append(anp.reshape(theta[i:i + size], s))
        i += size
    return out
