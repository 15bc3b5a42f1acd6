"""K-FAC factors under another library's convention (refngd.conventions).

Called once at the end of :class:`refngd.curvature.KFAC`'s construction: for the default
convention it changes nothing; otherwise it rebuilds the blocks of the layers whose factors
that library defines differently:

* ``conv_kfac="backpack"`` (BackPACK's KFLR / KFAC for Conv2d): G from ``reduce``
  (G = c Σ_{n,k} b̄_nk b̄_nkᵀ, b̄ = Σ_t b_t) and A = T · A_expand = (1/N) Σ_{n,t} ā_nt ā_ntᵀ,
  the bias block G_reduce.  For a Conv2d layer this is neither ``expand`` (A/T·…) nor
  ``reduce``; on a Linear layer (T = 1) every variant coincides.
* ``kfac_factors="tutorial"``: factors of the aggregated batch gradient ∇W (d_out × D),
  G = ∇W ∇Wᵀ / d_out, A = ∇Wᵀ ∇W / d_out, bias block ∇b ∇bᵀ / d_out — the "simplified
  K-FAC" of many tutorials, kept to show how far it is from any Fisher.
"""
from __future__ import annotations

from ..backend import namespace
from ..derivatives import gradient_from
from ..nn.conv import Conv2d
from ..nn.linear import Linear
from .kronecker import Block, KronFactor


def apply_convention(kfac, conv, model, loss, y) -> None:
    """Rebuild ``kfac.blocks`` / ``kfac._factors`` for convention ``conv`` (in place)."""
    if conv.kfac_factors == "tutorial":
        _tutorial(kfac, loss, y)
    elif conv.conv_kfac == "backpack":
        _backpack_conv(kfac)


def _rebuild(kfac, fn) -> None:
    """Replace every layer's blocks by ``fn(factors, old_blocks) -> (blocks, A, G)``."""
    from .kfac import LayerFactors

    blocks, factors = [], []
    for f in kfac._factors:
        old = [b for b in kfac.blocks if b.start == f.start]
        new, A, G = fn(f, old)
        blocks += new
        factors.append(LayerFactors(f.index, f.layer, f.start, f.stop, A, G, f.bias, f.approx))
    kfac.blocks, kfac._factors = blocks, factors


def _backpack_conv(kfac) -> None:
    from .kfac import input_rows, output_rows

    def fn(f, old):
        if not isinstance(f.layer, Conv2d):
            return old, f.A, f.G
        e = old[0].entry
        T = e.cache[0].shape[2]
        joint = any(b.kind == "wb" for b in old)
        M, scale = input_rows(f.layer, e.cache, "expand", joint)
        A = KronFactor(M, scale * T)
        G = KronFactor(output_rows(f.layer, e.B, "reduce"), kfac.c)
        return [b.replace(G, A, b.thin) for b in old], A.F, G.F

    _rebuild(kfac, fn)


def _tutorial(kfac, loss, y) -> None:
    if y is None:
        raise ValueError("convention='tutorial' builds its factors from the batch gradient: pass y.")
    g = gradient_from(kfac.lin, loss, y)
    xp = namespace(g)

    def fn(f, old):
        layer = f.layer
        d_out = layer.out_features if isinstance(layer, Linear) else layer.out_channels
        D = layer.in_features if isinstance(layer, Linear) else layer.D
        W = g[f.start:f.start + d_out * D].reshape(d_out, D).astype(xp.float64)
        G = KronFactor(xp.ascontiguousarray(W.T), 1.0 / d_out)   # ∇W ∇Wᵀ / d_out
        A = KronFactor(xp.ascontiguousarray(W), 1.0 / d_out)     # ∇Wᵀ ∇W / d_out
        blocks = [Block("w", G, A, f.start, d_out, D, True, old[0].entry)]
        if layer.bias:
            b = g[f.start + d_out * D:f.stop].astype(xp.float64)[None, :]
            one = KronFactor(xp.ones((1, 1), dtype=xp.float64), 1.0)
            blocks.append(Block("b", KronFactor(b, 1.0 / d_out), one, f.start, d_out, D, True,
                                old[0].entry))
        return blocks, A.F, G.F

    _rebuild(kfac, fn)
