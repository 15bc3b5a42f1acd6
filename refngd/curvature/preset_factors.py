"""K-FAC factors under another library's convention (:mod:`refngd.conventions`).

Called once at the end of :class:`refngd.curvature.KFAC`'s construction.  It returns *new*
blocks and :class:`~refngd.curvature.LayerFactors` for the presets whose factors differ
from refngd's, computed from refngd's own (nothing is rewritten in place), or None when
the preset keeps refngd's factors:

* ``conv_kfac="backpack"`` (BackPACK's KFLR / KFAC for Conv2d): G from ``reduce``
  (G = c Σ_{n,k} b̄_nk b̄_nkᵀ, b̄ = Σ_t b_t) and A = T · A_expand = (1/N) Σ_{n,t} ā_nt ā_ntᵀ,
  the bias block G_reduce.  For a convolution this is neither ``expand`` (A/T·…) nor
  ``reduce``; on a dense layer (T = 1) every variant coincides.  It applies to layers
  whose weight is shared over image locations (``weight_sharing == "spatial"``).
* ``kfac_factors="tutorial"``: factors of the aggregated batch gradient ∇W (d_out × D),
  G = ∇W ∇Wᵀ / d_out, A = ∇Wᵀ ∇W / d_out, bias block ∇b ∇bᵀ / d_out — the "simplified
  K-FAC" of many tutorials, kept to show how far it is from any Fisher.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

from ..backend import namespace
from ..derivatives import gradient_from
from .kfac_factors import input_rows, output_rows
from .kronecker import Block, KronFactor


def preset_factors(conv, blocks: list, layer_factors: Callable[[], list], lin, c: float,
                   loss, y) -> tuple[list, list] | None:
    """``(blocks, factors)`` of K-FAC under convention ``conv``, or None for refngd's own.

    ``blocks`` and ``layer_factors()`` (called only when needed: it forms the d × d
    factors) are refngd's; ``lin`` the linearisation, ``c`` the loss constant under the
    convention.
    """
    if conv.kfac_factors == "tutorial":
        return _rebuild(blocks, layer_factors(), _tutorial(lin, loss, y))
    if conv.conv_kfac == "backpack":
        return _rebuild(blocks, layer_factors(), _backpack_conv(c))
    return None


def _rebuild(blocks: list, factors: list, fn) -> tuple[list, list]:
    """New blocks and factors: every layer's ``fn(factors, its blocks) -> (blocks, A, G)``."""
    new_blocks, new_factors = [], []
    for f in factors:
        old = [b for b in blocks if b.start == f.start]
        new, A, G = fn(f, old)
        new_blocks += new
        new_factors.append(dataclasses.replace(f, A=A, G=G))
    return new_blocks, new_factors


def _backpack_conv(c: float):
    def fn(f, old):
        e = old[0].entry
        if f.layer.weight_sharing(e.cache) != "spatial":
            return old, f.A, f.G
        T = f.layer.tokens(e.cache).shape[1]
        joint = any(b.kind == "wb" for b in old)
        M, scale = input_rows(f.layer, e.cache, "expand", joint)
        A = KronFactor(M, scale * T)
        G = KronFactor(output_rows(f.layer, e.B, "reduce"), c)
        return [b.replace(G, A, b.thin) for b in old], A.F, G.F

    return fn


def _tutorial(lin, loss, y):
    if y is None:
        raise ValueError("convention='tutorial' builds its factors from the batch gradient: pass y.")
    g = gradient_from(lin, loss, y)
    xp = namespace(g)

    def fn(f, old):
        d_out, D = f.layer.weight_matrix_shape
        W = g[f.start:f.start + d_out * D].reshape(d_out, D).astype(xp.float64)
        G = KronFactor(xp.ascontiguousarray(W.T), 1.0 / d_out)   # ∇W ∇Wᵀ / d_out
        A = KronFactor(xp.ascontiguousarray(W), 1.0 / d_out)     # ∇Wᵀ ∇W / d_out
        blocks = [Block("w", G, A, f.start, d_out, D, True, old[0].entry)]
        if f.layer.bias:
            b0 = old[-1].bias_start
            b = g[b0:b0 + d_out].astype(xp.float64)[None, :]
            one = KronFactor(xp.ones((1, 1), dtype=xp.float64), 1.0)
            blocks.append(Block("b", KronFactor(b, 1.0 / d_out), one, f.start, d_out, D, True,
                                old[0].entry, b0))
        return blocks, A.F, G.F

    return fn
