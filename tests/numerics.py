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


def assert_row_primitives(prim, cache, B, U, tol=1e-10):
    """Gram, U v, Uᵀ w, diag(UᵀU) of a layer's row primitives ``prim`` against its
    per-row gradients U (N, K, P)."""
    rng = np.random.default_rng(9)
    N, K, P = U.shape
    assert_close(prim.row_grads(cache, B), U, tol)
    Uf = U.reshape(N * K, P)
    assert_close(prim.row_gram(cache, B), Uf @ Uf.T, tol)
    V = [rng.standard_normal(s) for s in prim.param_shapes]
    v = np.concatenate([a.reshape(-1) for a in V])
    assert_close(prim.row_dot(cache, B, V), U @ v, tol)
    w = rng.standard_normal((N, K))
    assert_close(np.concatenate([b.reshape(-1) for b in prim.row_sum(cache, B, w)]),
                 np.einsum("nk,nkp->p", w, U), tol)
    assert_close(prim.row_sq_sum(cache, B), (U * U).sum((0, 1)), tol)
