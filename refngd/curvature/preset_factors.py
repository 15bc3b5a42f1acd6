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
* ``factor_scale`` (public implementations, :mod:`refngd.conventions.public`): refngd's
  ``expand`` factors times per-layer scalars s_A, s_G — monomials in N (samples), T
  (positions sharing the weight; 1 for a dense layer) and c (the loss constant), read off
  each code (docs/conventions.md derives them):

  ===================  ====================  =======================  =================
  ``factor_scale``     layer                 s_A                      s_G
  ===================  ====================  =======================  =================
  ``"kfac-pytorch"``   Conv2d (spatial)      1/T²                     c/(N·T³)
                       Linear (T ≥ 1)        1                        c/(N·T)
  ``"alecwangcq"``     Conv2d (spatial)      1/T                      N·c·T
                       Linear                1                        N·c
  ``"ekfac-pytorch"``  every layer           1                        N·c
  ===================  ====================  =======================  =================

  Only the factors change: the gradient that an update preconditions stays the user's.
  The codes form a row per position (``expand``); with ``kfac_approx="reduce"`` (which
  none of them has) a layer keeps refngd's factors.  EKFAC's diagonal, an estimate of
  the same block, is scaled by s_A·s_G (:func:`block_scale`).
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
    if conv.factor_scale != "none":
        N = lin.outputs.shape[0]
        return _rebuild(blocks, layer_factors(), _scaled(conv.factor_scale, c, N))
    return None


def factor_scalars(rule: str, c: float, N: int, T: int, spatial: bool) -> tuple[float, float]:
    """(s_A, s_G) of one layer under ``factor_scale=rule`` (the module docstring's table).

    Parameters
    ----------
    rule : a value of :data:`refngd.options.FACTOR_SCALES` other than ``"none"``.
    c : the loss constant (1/N for a mean-reduced cross-entropy).
    N : the number of samples in the batch.
    T : the positions sharing the layer's weight (1 for a dense layer).
    spatial : True for a weight shared over image locations (Conv2d).

    Returns
    -------
    The scalars multiplying refngd's ``expand`` factors A and G.
    """
    if rule == "kfac-pytorch":   # grad_output of the reduced loss; conv rows divided by T
        return (1.0 / T ** 2, c / (N * T ** 3)) if spatial else (1.0, c / (N * T))
    if rule == "alecwangcq":     # grad_output × N; conv A rows / T, G rows × T
        return (1.0 / T, N * c * T) if spatial else (1.0, N * c)
    if rule == "ekfac-pytorch":  # grad_output × N, every factor averaged over its rows
        return 1.0, N * c
    raise ValueError(f"unknown factor_scale {rule!r}.")


def block_scale(conv, entry, c: float, N: int, approx: str | None) -> float:
    """s_A·s_G of one layer's K-FAC block under ``conv.factor_scale`` (1 for ``"none"``).

    EKFAC's diagonal estimates the same Fisher block as K-FAC's factors, so under such a
    convention it is scaled by this product too (:class:`refngd.curvature.EKFAC`).
    """
    if conv.factor_scale == "none":
        return 1.0
    layer = entry.layer
    sharing = layer.weight_sharing(entry.cache)
    if sharing is not None and approx == "reduce":  # the factors are refngd's (see _scaled)
        return 1.0
    T = layer.tokens(entry.cache).shape[1]
    sA, sG = factor_scalars(conv.factor_scale, c, N, T, sharing == "spatial")
    return sA * sG


def _scaled(rule: str, c: float, N: int):
    def fn(f, old):
        e = old[0].entry
        T = f.layer.tokens(e.cache).shape[1]
        if f.approx == "reduce":  # the codes form every position's row: expand only
            return old, f.A, f.G
        sA, sG = factor_scalars(rule, c, N, T, f.layer.weight_sharing(e.cache) == "spatial")
        A0, G0 = old[0].A, old[0].G
        A, G = KronFactor(A0.M, A0.scale * sA), KronFactor(G0.M, G0.scale * sG)
        return [b.replace(G, A, b.thin) for b in old], A.F, G.F

    return fn


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
