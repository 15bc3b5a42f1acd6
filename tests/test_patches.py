"""im2col and col2im (refngd/nn/patches.py) against the padded-input formulation, exhaustively
over small geometries: every kernel offset clipped on either side, offsets that read padding
only, strides whose phases receive no offset (stride > dilated kernel), dilation.

The references build the zero-padded input (im2col: one strided view of it; col2im: adds
into a padded buffer, then the crop) — the textbook definition, independent of the
clipping, phase and flat-run logic under test.  The outputs start as NaN, so any entry the functions
fail to write shows up.
"""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from layer_oracles import conv_out
from refngd.nn.patches import axis_reads, col2im_into, im2col_into


def padded_patches(x, k, s, p, d, out_hw):
    """(C, kh, kw, N, Ho, Wo) patches from the explicitly padded input."""
    N, C, H, W = x.shape
    xp = np.zeros((N, C, H + 2 * p[0], W + 2 * p[1]))
    xp[:, :, p[0]:p[0] + H, p[1]:p[1] + W] = x
    out = np.empty((C, k[0], k[1], N) + out_hw)
    for i, j in itertools.product(range(k[0]), range(k[1])):
        h0, w0 = i * d[0], j * d[1]
        out[:, i, j] = xp[:, :, h0:h0 + s[0] * (out_hw[0] - 1) + 1:s[0],
                          w0:w0 + s[1] * (out_hw[1] - 1) + 1:s[1]].transpose(1, 0, 2, 3)
    return out


def padded_col2im(Y, in_hw, k, s, p, d):
    """Σ of Y's offset blocks added into a padded (R, G, C, H + 2p, W + 2p) buffer, cropped."""
    R, G, _, _, C, Ho, Wo = Y.shape
    H, W = in_hw
    buf = np.zeros((R, G, C, H + 2 * p[0], W + 2 * p[1]))
    for i, j in itertools.product(range(k[0]), range(k[1])):
        h0, w0 = i * d[0], j * d[1]
        buf[..., h0:h0 + s[0] * (Ho - 1) + 1:s[0], w0:w0 + s[1] * (Wo - 1) + 1:s[1]] += Y[:, :, i, j]
    return buf[..., p[0]:p[0] + H, p[1]:p[1] + W]


GEOMETRIES = [
    (k, s, p, d, hw)
    for k in [(1, 1), (2, 3), (3, 3), (3, 1)]
    for s in [(1, 1), (2, 2), (3, 2), (1, 3)]
    for p in [(0, 0), (1, 1), (2, 0), (3, 2)]
    for d in [(1, 1), (2, 1)]
    for hw in [(1, 1), (4, 5), (7, 6), (8, 8)]  # (8, 8): "same" strided phases, Wo wide
    if conv_out(hw[0], k[0], s[0], p[0], d[0]) >= 1 and conv_out(hw[1], k[1], s[1], p[1], d[1]) >= 1
]


@pytest.mark.parametrize("k,s,p,d,hw", GEOMETRIES)
def test_im2col_and_col2im_match_the_padded_input(k, s, p, d, hw):
    rng = np.random.default_rng(hash((k, s, p, d, hw)) % 2**32)
    N, C, G, R = 2, 3, 2, 3
    Ho = conv_out(hw[0], k[0], s[0], p[0], d[0])
    Wo = conv_out(hw[1], k[1], s[1], p[1], d[1])
    x = rng.standard_normal((N, C) + hw)
    cols = np.full((C, k[0], k[1], N, Ho, Wo), np.nan)
    im2col_into(x, cols, k, s, p, d)
    np.testing.assert_array_equal(cols, padded_patches(x, k, s, p, d, (Ho, Wo)))

    Y = rng.standard_normal((R, G, k[0], k[1], C, Ho, Wo))
    expected = padded_col2im(Y, hw, k, s, p, d)  # before: col2im_into may zero entries of Y
    out = np.full((R, G, C) + hw, np.nan)
    col2im_into(Y, out, k, s, p, d)
    np.testing.assert_allclose(out, expected, rtol=1e-13, atol=1e-13)


def test_col2im_is_the_transpose_of_im2col():
    """⟨im2col(x), Y⟩ = ⟨x, col2im(Y)⟩ for one strided, dilated, padded geometry."""
    rng = np.random.default_rng(0)
    k, s, p, d, hw, N, C = (3, 2), (2, 3), (2, 1), (2, 1), (9, 8), 2, 3
    Ho, Wo = (conv_out(hw[a], k[a], s[a], p[a], d[a]) for a in range(2))
    x = rng.standard_normal((N, C) + hw)
    cols = np.empty((C, k[0], k[1], N, Ho, Wo))
    im2col_into(x, cols, k, s, p, d)
    Y = rng.standard_normal((N, 1, k[0], k[1], C, Ho, Wo))
    back = np.empty((N, 1, C) + hw)
    col2im_into(Y, back, k, s, p, d)
    lhs = np.einsum("cijntu,nijctu->", cols, Y[:, 0])
    assert abs(lhs - np.vdot(x, back[:, 0])) <= 1e-12 * abs(lhs)


@pytest.mark.parametrize("offset,stride,n_out,n_in,expected", [
    (-1, 1, 4, 4, (1, 4, 0)),   # the first output reads the padding
    (1, 1, 4, 4, (0, 3, 1)),    # the last one does
    (-3, 2, 2, 4, (2, 2, 1)),   # none reads the input: empty range
    (5, 1, 3, 4, (0, 0, 5)),
    (-2, 3, 3, 7, (1, 3, 1)),
])
def test_axis_reads(offset, stride, n_out, n_in, expected):
    t0, t1, first = axis_reads(offset, stride, n_out, n_in)
    assert (t0, t1) == expected[:2]
    if t0 < t1:
        assert first == expected[2]
        assert 0 <= first and t0 * stride + offset == first
        assert (t1 - 1) * stride + offset < n_in


@pytest.mark.parametrize("layout", ["fortran", "reversed", "sliced"])
@pytest.mark.parametrize("s", [(1, 1), (2, 2)])
def test_im2col_of_non_contiguous_inputs(layout, s):
    """The flat-run path needs contiguous rows; other layouts take the strided copy."""
    rng = np.random.default_rng(5)
    base = rng.standard_normal((2, 3, 8, 10))
    x = {"fortran": np.asfortranarray(base), "reversed": base[..., ::-1],
         "sliced": base[..., ::2]}[layout]
    k, p, d = (3, 3), (1, 1), (1, 1)
    Ho, Wo = (conv_out(x.shape[2 + a], k[a], s[a], p[a], d[a]) for a in range(2))
    cols = np.full((3, 3, 3, 2, Ho, Wo), np.nan)
    im2col_into(x, cols, k, s, p, d)
    np.testing.assert_array_equal(cols, padded_patches(np.ascontiguousarray(x), k, s, p, d, (Ho, Wo)))
