"""``FunctionModel``: any f(θ, X) written with ``autograd.numpy``, differentiated by HIPS autograd.

This is refngd's second, independent route to every derivative: the explicit layers of
:mod:`refngd.nn` are checked against it in the tests, and it lets every curvature in
refngd run on models that the layer library does not offer (NumPy only).
"""
from __future__ import annotations

import warnings
from typing import Callable

import autograd
import autograd.numpy as anp

from .backend import Array, check_float_array, is_cupy
from .rows import DenseRowSet
from .nn.subsets import resolve_params


class FunctionModel:
    """Wrap ``f(theta, X) -> Z`` (Z of shape (N, C)) as a refngd model.

    Parameters
    ----------
    f : callable
        A function of a flat parameter vector θ (P,) and a batch X (N, ...), written with
        ``autograd.numpy``, returning outputs (N, C).  Sample n's output may depend only
        on X[n] (no batch norm): per-sample Jacobians are read off the batch Jacobian.
    theta : (P,) array
        An example parameter vector; fixes P and the dtype.

    Notes
    -----
    The Jacobian is formed with ``autograd.jacobian`` (one reverse pass per output
    entry, N·C in all), so this route is exact but slow; use it for checking and for
    small models.
    """

    def __init__(self, f: Callable, theta: Array):
        if is_cupy(theta):
            raise TypeError("FunctionModel runs on NumPy only (HIPS autograd has no GPU backend).")
        if not callable(f):
            raise TypeError(f"f must be a function f(theta, X) -> outputs (N, C), got {type(f).__name__}.")
        check_float_array("theta", theta, ndim=1)
        self.f = f
        self.num_params = int(theta.shape[0])
        self.dtype = theta.dtype

    def __repr__(self) -> str:
        return f"FunctionModel({getattr(self.f, '__name__', 'f')}, num_params={self.num_params})"

    def _check(self, theta, X):
        check_float_array("theta", theta, ndim=1)
        if theta.shape[0] != self.num_params:
            raise ValueError(f"theta has {theta.shape[0]} entries, the model has {self.num_params}.")
        if theta.dtype != self.dtype:
            raise TypeError(f"theta has dtype {theta.dtype} but this FunctionModel was built for "
                            f"{self.dtype}; convert with theta.astype({str(self.dtype)!r}).")
        check_float_array("X", X)
        if X.ndim < 1 or X.shape[0] < 1:
            raise ValueError(f"X must be a batch of shape (N, ...) with N >= 1, got {tuple(X.shape)}.")

    def forward(self, theta: Array, X: Array) -> Array:
        """Outputs Z = f(θ, X) of shape (N, C)."""
        self._check(theta, X)
        Z = anp.asarray(self.f(theta, X))
        if Z.ndim != 2 or Z.shape[0] != X.shape[0]:
            raise ValueError(f"f must return outputs of shape (N, C) = ({X.shape[0]}, C), got {Z.shape}.")
        if not anp.all(anp.isfinite(Z)):
            raise ValueError("the model outputs contain NaN or Inf; check theta, X and f.")
        return Z

    def linearize(self, theta: Array, X: Array) -> "FunctionLinearization":
        """Outputs and a lazily computed Jacobian, for back-propagating row cotangents."""
        return FunctionLinearization(self, theta, X, self.forward(theta, X))


class FunctionLinearization:
    """The :class:`refngd.nn.Linearization` interface, through HIPS autograd."""

    def __init__(self, model, theta, X, outputs):
        self.model, self.theta, self.X, self.outputs = model, theta, X, outputs
        self._J = None

    @property
    def jacobian(self) -> Array:
        """Per-sample Jacobians (N, C, P) from ``autograd.jacobian``."""
        if self._J is None:
            X = self.X
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                Jfull = autograd.jacobian(lambda t: self.model.f(t, X))(self.theta)  # (N, C, P)
            if any("independent of input" in str(w.message) for w in caught):
                # autograd only warns; its zero Jacobian would make every derivative wrong
                raise TypeError(
                    "the output of f does not depend on theta as autograd sees it: f must be written "
                    "with autograd.numpy (import autograd.numpy as np), not plain numpy, whose "
                    "functions (np.dot, np.tanh, ...) autograd cannot trace. If f really ignores "
                    "theta, there is nothing to differentiate.")
            for w in caught:  # pass every other warning on unchanged
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            self._J = anp.asarray(Jfull)
        return self._J

    def backprop(self, cotangents: Array, params=None) -> DenseRowSet:
        """Rows u_nk = J_nᵀ cotangents[n, k] as an explicit :class:`DenseRowSet`.

        ``params``: ``None`` (all of θ) or a boolean mask / :class:`refngd.subsets.ParamSubset`:
        the rows of θ[S] only, U[:, S] (any entries may be selected; the Jacobian is still
        formed in full, as this route is the reference, not the fast path).
        """
        check_float_array("cotangents", cotangents)
        N, C = self.outputs.shape
        if cotangents.ndim != 3 or cotangents.shape[0] != N or cotangents.shape[2] != C:
            raise ValueError(
                f"cotangents must have shape (N, K, C) = ({N}, K, {C}), got {tuple(cotangents.shape)}."
            )
        subset = None if params is None else resolve_params(self.model, params)
        J = self.jacobian if subset is None else self.jacobian[:, :, subset.index]
        return DenseRowSet(anp.einsum("nkc,ncp->nkp", cotangents, J), subset)
