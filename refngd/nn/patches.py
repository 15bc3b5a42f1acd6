"""Patch geometry of a 2-d convolution: im2col and its transpose col2im, zero padding implicit.

A convolution with kernel (kh, kw), stride s, padding p and dilation d reads, for output
location (t, u) and kernel offset (i, j), the input position

    h = t·s_h + i·d_h − p_h,     w = u·s_w + j·d_w − p_w,

and positions outside [0, H) × [0, W) are the zero padding.  Along one axis, offset i
therefore reads the input at the arithmetic progression h = first, first + s, … for the
output positions t0 ≤ t < t1 of :func:`axis_reads`; the others read zeros.

* :func:`im2col_into` writes the patches Ā (columns (c, i, j), rows (n, t, u)): one
  strided copy per kernel offset from the input itself, and zeros where the offset reads
  padding — no padded copy of the input is made.
* :func:`col2im_into` is its transpose, the input cotangent of the transposed
  convolution: every offset's block of Y = W_matᵀ b is added at the positions it read.
  With stride s > 1 the input positions split into s_h·s_w *phases*
  (h mod s_h, w mod s_w); offset (i, j) writes into exactly one phase, at a shift.  Each
  phase is summed in a contiguous buffer and written into its strided positions once
  (the sub-pixel decomposition of a strided transposed convolution, e.g. Shi et al.,
  2016): on the 2-core VM, 9 strided adds of Conv2d(16, 32, 3, stride=2, padding=1)'s
  backward took 1.15 ms, the 4 phases 0.70 ms (docs/benchmarks.md, issue 22).

Both work for any backend (NumPy or CuPy arrays: :func:`refngd.backend.namespace`).

References
----------
W. Shi et al. (2016). Real-time single image and video super-resolution using an efficient
sub-pixel convolutional neural network.  CVPR.  (The phase decomposition.)
"""
from __future__ import annotations

import math

from ..backend import namespace


def axis_reads(offset: int, stride: int, n_out: int, n_in: int) -> tuple[int, int, int]:
    """Output positions t0 ≤ t < t1 whose input position t·stride + offset lies in
    [0, n_in), and the first such input position (one kernel offset, one axis)."""
    t0 = max(0, -(offset // stride)) if offset < 0 else 0
    t1 = min(n_out, -(-(n_in - offset) // stride))
    return t0, max(t0, t1), t0 * stride + offset


def _span(first: int, stride: int, count: int) -> slice:
    """``count`` positions first, first + stride, … as a slice."""
    return slice(first, first + stride * (count - 1) + 1, stride)


def _reads(kernel, stride, padding, dilation, out_hw, in_hw):
    """Per axis, per kernel offset: :func:`axis_reads` of that offset."""
    return [[axis_reads(i * d - p, s, n_out, n_in) for i in range(k)]
            for k, s, p, d, n_out, n_in in zip(kernel, stride, padding, dilation, out_hw, in_hw)]


def im2col_into(x, out, kernel, stride, padding, dilation) -> None:
    """Write the patches of ``x`` (N, C, H, W) into ``out`` (C, kh, kw, N, Ho, Wo).

    ``out[c, i, j, n, t, u] = x[n, c, t·s_h + i·d_h − p_h, u·s_w + j·d_w − p_w]``, zero
    where that position is padding: per offset one copy and zeroed borders.  Where an
    offset's input positions form rows as long as the output's (W_phase = Wo: "same"
    padding, strided or not), its block is one flat run per (channel, sample) from the
    input (stride 1) or from a contiguous copy of the input's phase (a, b) — the shift
    (δq, δv) is the flat offset δq·Wo + δv, and the entries that wrap into a neighbouring
    row are the padding ones, zeroed after the copy.  Otherwise it is a (rows × columns)
    strided copy.  (Flat runs: 0.15 against 0.20 ms for Conv2d(3, 16, 3, padding=1), 0.40
    against 0.48 ms for Conv2d(16, 32, 3, stride=2, padding=1) on 64 inputs of 16 × 16.)
    """
    xp = namespace(x)
    N, C, H, W = x.shape
    Ho, Wo = out.shape[4:]
    sh, sw = stride
    rows, cols = _reads(kernel, stride, padding, dilation, (Ho, Wo), (H, W))
    xt = x.transpose(1, 0, 2, 3)  # (C, N, H, W): the axes of out's blocks
    planes = {}  # phase (a, b) → x at rows a::s_h, columns b::s_w as (C, N, n_a, Wo), or None
    for i, (t0, t1, h) in enumerate(rows):
        for j, (u0, u1, w) in enumerate(cols):
            block = out[:, i, j]
            if not (t0 < t1 and u0 < u1):  # the offset reads padding only
                block[...] = 0
                continue
            key = (h % sh, w % sw)
            if key not in planes:
                plane = xt[:, :, key[0]::sh, key[1]::sw]
                if plane.shape[3] != Wo:
                    plane = None
                elif (sh, sw) != (1, 1):
                    plane = xp.ascontiguousarray(plane)
                planes[key] = plane
            plane = planes[key]
            if plane is not None and _flat_rows(plane) and _flat_rows(block):
                n = plane.shape[2]
                shift, y0, y1 = _flat_run(t0, t1, h // sh - t0, w // sw - u0, Wo, n)
                flat = block.reshape(C, N, Ho * Wo)
                flat[..., y0:y1] = plane.reshape(C, N, n * Wo)[..., y0 + shift:y1 + shift]
                flat[..., :y0] = 0
                flat[..., y1:] = 0
                block[..., :u0] = 0  # the entries that wrapped around a row
                block[..., u1:] = 0
                continue
            block[:, :, t0:t1, u0:u1] = xt[:, :, _span(h, sh, t1 - t0), _span(w, sw, u1 - u0)]
            block[:, :, :t0] = 0
            block[:, :, t1:] = 0
            block[:, :, t0:t1, :u0] = 0
            block[:, :, t0:t1, u1:] = 0


def _flat_rows(a) -> bool:
    """Whether the last two axes of ``a`` are one contiguous run (a reshape is a view)."""
    return a.strides[-1] == a.itemsize and a.strides[-2] == a.shape[-1] * a.itemsize


def _flat_run(t0: int, t1: int, dq: int, dv: int, Wo: int, n: int) -> tuple[int, int, int]:
    """(shift, y0, y1): rows t0:t1 of a (·, Wo) plane moved by (dq, dv) into an (n, Wo)
    plane, as one flat run — entries y0:y1 of the first go to y0 + shift:y1 + shift of the
    second, shift = dq·Wo + dv, clipped to both planes (what is clipped, and what wraps
    around a row, are the entries outside the offset's columns: the caller zeroes them)."""
    shift = dq * Wo + dv
    return shift, max(t0 * Wo, -shift), min(t1 * Wo, n * Wo - shift)


def col2im_into(Y, out, kernel, stride, padding, dilation) -> None:
    """Overwrite ``out`` (R, G, C, H, W) with the sum of the offsets' blocks of ``Y``
    (R, G, kh, kw, C, Ho, Wo), each added at the input positions it read (padding drops).

    ``out[..., h, w] = Σ_{i, j, t, u : h = t·s_h + i·d_h − p_h, w = u·s_w + j·d_w − p_w}
    Y[:, :, i, j, :, t, u]``.  Per phase (a, b) = (h mod s_h, w mod s_w): the first block
    that covers the whole phase is assigned (else the phase starts at zero), the others
    are added at their shift; with stride 1 the one phase is ``out`` itself.

    When a phase's rows are as long as Y's (W_phase = Wo: "same" padding, strided or
    not), a shift (δq, δv) is one flat offset δq·Wo + δv of the (rows × columns) plane,
    and each block is added as one long contiguous run per channel: the block's entries
    that read padding are zeroed in ``Y`` first (``Y`` is overwritten there), so that
    those that wrap into a neighbouring row add nothing.  NumPy's inner loops are then
    Ho·Wo long instead of Wo (0.12 against 0.03 ms for one block of Conv2d(16, 32, 3,
    stride=2, padding=1)'s backward on 64 rows, 2-core VM).  Otherwise the blocks are
    added as (rows × columns) slices.
    """
    xp = namespace(Y)
    H, W = out.shape[3:]
    Ho, Wo = Y.shape[5:]
    sh, sw = stride
    rows, cols = _reads(kernel, stride, padding, dilation, (Ho, Wo), (H, W))
    strided = (sh, sw) != (1, 1)
    buffer = None
    for a in range(min(sh, H)):
        for b in range(min(sw, W)):
            target = out[:, :, :, a::sh, b::sw]
            n_a, n_b = target.shape[3:]
            blocks = []  # (i, j, output rows t0:t1, columns u0:u1, phase row q0, column v0)
            for i, (t0, t1, h) in enumerate(rows):
                for j, (u0, u1, w) in enumerate(cols):
                    if t0 < t1 and u0 < u1 and h % sh == a and w % sw == b:
                        blocks.append((i, j, t0, t1, u0, u1, h // sh, w // sw))
            if not blocks:
                target[...] = 0
                continue
            if strided:  # a contiguous buffer for the phase, written into place once
                if buffer is None:
                    buffer = xp.empty(math.prod(out.shape[:3]) * -(-H // sh) * -(-W // sw),
                                      dtype=out.dtype)
                phase = buffer[:math.prod(target.shape)].reshape(target.shape)
            else:
                phase = target
            full = next((k for k, blk in enumerate(blocks)
                         if blk[2:] == (0, Ho, 0, Wo, 0, 0) and (n_a, n_b) == (Ho, Wo)), None)
            if full is None:
                phase[...] = 0
            else:
                i, j = blocks.pop(full)[:2]
                phase[...] = Y[:, :, i, j]
            # rows as long as Y's, each (rows × columns) plane one run in memory
            flat = n_b == Wo and _flat_rows(phase) and _flat_rows(Y)
            for i, j, t0, t1, u0, u1, q0, v0 in blocks:
                if flat:
                    _add_flat(Y[:, :, i, j], phase, t0, t1, u0, u1, q0 - t0, v0 - u0)
                else:
                    phase[:, :, :, q0:q0 + t1 - t0, v0:v0 + u1 - u0] += Y[:, :, i, j, :, t0:t1, u0:u1]
            if strided:
                target[...] = phase


def _add_flat(block, phase, t0, t1, u0, u1, dq, dv) -> None:
    """phase[..., t + dq, u + dv] += block[..., t, u] for t0 ≤ t < t1, u0 ≤ u < u1, as one
    flat run per (row, group, channel): block (R, G, C, Ho, Wo) and phase (R, G, C, n, Wo)
    share the row length Wo; the columns outside u0:u1 are zeroed in ``block`` first."""
    Ho, Wo = block.shape[3:]
    n = phase.shape[3]
    block[..., :u0] = 0
    block[..., u1:] = 0
    shift, y0, y1 = _flat_run(t0, t1, dq, dv, Wo, n)
    flat_block = block.reshape(block.shape[:3] + (Ho * Wo,))
    flat_phase = phase.reshape(phase.shape[:3] + (n * Wo,))
    flat_phase[..., y0 + shift:y1 + shift] += flat_block[..., y0:y1]
