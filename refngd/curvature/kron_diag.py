"""The diagonal of each Kronecker factor: diag(G) ⊗ diag(A) per layer.

Gomes, Zhang, Belilovsky, Wolf & Hosseini (2024), "AdaFisher: Adaptive second order optimization via
Fisher information" (ICLR 2025): the K-FAC factors of trained networks are
diagonally concentrated, so AdaFisher keeps only their diagonals,
F_layer ≈ diag(G) ⊗ diag(A) — a diagonal P × P matrix.  Here the diagonals are read off
the same rows as :class:`refngd.curvature.KFAC` (no d × d factor is formed):
diag(A) = scale · Σ_rows ā², diag(G) = c · Σ_rows b².  The bias entries are diag(G) in
both bias modes (the joint factor's last diagonal entry is mean(1·1) = 1), so ``bias``
does not change this operator.  AdaFisher's running averages are an optimizer's business.
"""
from __future__ import annotations

from ..backend import Array, SingularSystemError, check_damping, namespace
from .base import CurvatureOperator
from ..options import (BIAS, FISHER_TYPE, KFAC_APPROX_DEFAULT, BiasMode, FisherType,
                       KfacApprox)
from .kfac_factors import (LayerFactors, bias_start, check_options, fisher_cotangents,
                           input_rows, output_rows, parametric_rows, shares_weights)
from ..nn.subsets import resolve_params
from ..losses.base import check_loss
from ..nn.protocols import linearization_for


def place_kronecker_diagonal(d: Array, start: int, dG: Array, dA: Array, bias: bool,
                             b_start: int | None = None) -> None:
    """Write diag(G) ⊗ diag(A) of one layer into the (P,) vector ``d`` in θ's order.

    ``dA`` carries the bias input's entry last when ``bias``: weight (o, i) gets
    dG[o]·dA[i], bias o gets dG[o]·dA[−1] — at ``b_start`` (default: after the weight).
    """
    xp = namespace(dG)
    block = xp.outer(dG, dA)
    d_in = dA.shape[0] - bool(bias)
    nw = block.shape[0] * d_in
    d[start:start + nw] = block[:, :d_in].reshape(-1)
    if bias:
        b0 = start + nw if b_start is None else b_start
        d[b0:b0 + block.shape[0]] = block[:, -1]


class KroneckerDiagonal(CurvatureOperator):
    """diag(G) ⊗ diag(A) per layer, same arguments (``params=`` included) and interface as :class:`KFAC`.

    :meth:`factors` returns :class:`LayerFactors` whose ``A`` and ``G`` are the diagonals
    (1-D arrays; ``A`` has the trailing 1 of the bias with ``bias="joint"``).
    """

    def __init__(self, model, theta: Array, loss, X: Array, y=None,
                 fisher_type: FisherType = FISHER_TYPE, mc_samples: int = 1, rng=None,
                 kfac_approx: KfacApprox = KFAC_APPROX_DEFAULT, bias: BiasMode = BIAS,
                 linearization=None, params=None):
        rng = check_options(fisher_type, kfac_approx, bias, y, mc_samples, rng)
        self.fisher_type, self.kfac_approx, self.bias = fisher_type, kfac_approx, bias
        check_loss(loss)
        lin = linearization_for(model, theta, X, linearization)
        Z = lin.outputs
        xp = namespace(Z)
        self.c = float(loss.scale(Z))
        self.subset = resolve_params(model, params)
        rows = lin.backprop(fisher_cotangents(loss, Z, y, fisher_type, mc_samples, rng),
                            params=self.subset)
        self.num_params, self.dtype = rows.P, theta.dtype
        d = xp.zeros(self.num_params, dtype=xp.float64)
        self._factors = []
        for idx, e in parametric_rows(model, rows):
            approx = kfac_approx if shares_weights(e.layer, e.cache) else None
            M, scale = input_rows(e.layer, e.cache, approx, bool(e.layer.bias))
            dA = scale * (M * M).sum(axis=0)
            Mg = output_rows(e.layer, e.B, approx)
            dG = self.c * (Mg * Mg).sum(axis=0)
            place_kronecker_diagonal(d, e.start, dG, dA, bool(e.layer.bias), bias_start(e))
            joint = bias == "joint" and e.layer.bias
            self._factors.append(LayerFactors(idx, e.layer, e.start, e.stop,
                                              dA if joint or not e.layer.bias else dA[:-1], dG,
                                              bias if e.layer.bias else None, approx))
        self._d = d

    def factors(self) -> list:
        return list(self._factors)

    def diagonal(self) -> Array:
        return self._d.astype(self.dtype, copy=False)

    def matvec(self, v: Array) -> Array:
        self._check_vector("v", v)
        return (self._d * v).astype(self.dtype, copy=False)

    def dense(self) -> Array:
        return namespace(self._d).diag(self._d).astype(self.dtype, copy=False)

    def trace(self) -> float:
        return float(self._d.sum())

    def solve(self, g: Array, damping: float) -> Array:
        """(D + λI)⁻¹ g, elementwise."""
        lam = check_damping(damping)
        self._check_vector("g", g)
        den = self._d + lam
        if float(den.min()) <= 0:
            raise SingularSystemError("the diagonal has zero entries; pass damping > 0.")
        return (g / den).astype(self.dtype, copy=False)

    def logdet(self, damping: float) -> float:
        lam = check_damping(damping)
        return float(namespace(self._d).log(self._d + lam).sum())
