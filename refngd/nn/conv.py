"""2-d convolution as a matrix product over im2col patches, with its row primitives.

Notation follows Grosse & Martens (2016), "A Kronecker-factored approximate Fisher matrix
for convolution layers": the *patches* ā_nt ∈ R^D, D = C_in·kh·kw, are the receptive
fields of sample n at output location t = 1..T (T = H_out·W_out), unrolled in the
row-major order of the weight's (in, kh, kw) axes ("im2col").  With Ā_n (T × D) and
W_mat = weight.reshape(C_out, D) the layer is one matrix product per sample,

    z_nt = W_mat ā_nt + b,

i.e. a Linear layer shared over the T locations.  A row cotangent b_r ∈ R^{C_out × T} of
sample n = n(r) therefore has the parameter gradient (summed over locations)

    G_r = Σ_t b_rt ā_ntᵀ  (C_out × D),     bias gradient  Σ_t b_rt.
"""
from __future__ import annotations

import copy
import math
import operator

from ..backend import namespace
from .base import BiasRows, ParametricLayer

#: rough bound (in array elements) on the temporaries of the chunked primitives
_CHUNK_ELEMS = 1 << 22


def _int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise ValueError(f"Conv2d {name} must be an int or a pair of ints, got {value!r}.")
    v = operator.index(value)
    if v < minimum:
        raise ValueError(f"Conv2d {name} must be >= {minimum}, got {value!r}.")
    return v


def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(vals) != 2:
        raise ValueError(f"Conv2d {name} must be an int or a pair of ints, got {value!r}.")
    return tuple(_int(v, name, minimum) for v in vals)


def conv_gram_flops(N: int, K: int, T: int, C_out: int, D: int, bias: bool = True):
    """FLOP counts ``(materialise, spatial)`` of the two routes of :meth:`Conv2d.row_gram`.

    With R = N·K rows and P_l = C_out·(D + bias) parameters, counting a multiply-add as
    2 FLOPs and only one triangle of every symmetric product (as both routes compute):

    * materialise: form U_l (R × P_l), then U_l U_lᵀ:    2·R·T·C_out·D + R²·P_l
    * spatial:     input Grams Ā_n Ā_mᵀ (m ≥ n), each contracted first with sample m's rows,
      then with sample n's:                           N²·T²·D + N·R·T²·C_out + R²·T·C_out
    """
    R, P = N * K, C_out * (D + int(bool(bias)))
    return (2 * R * T * C_out * D + R * R * P,
            N * N * T * T * D + N * R * T * T * C_out + R * R * T * C_out)


def conv_gram_route(N: int, K: int, T: int, C_out: int, D: int, bias: bool = True) -> str:
    """The cheaper Gram route by :func:`conv_gram_flops`: ``"materialise"`` or ``"spatial"``."""
    mat, spa = conv_gram_flops(N, K, T, C_out, D, bias)
    return "spatial" if spa < mat else "materialise"


class Conv2d(ParametricLayer):
    """2-d convolution (cross-correlation) on NCHW inputs, as :class:`torch.nn.Conv2d`.

    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out.
    kernel_size, stride, padding, dilation : int or pair of ints
        As in PyTorch; padding is zero padding on both sides.  Only ``groups=1``.
    bias : bool, default True

    Attributes
    ----------
    param_shapes : ((C_out, C_in, kh, kw), (C_out,)) — weight then bias, each row-major:
        θ is exactly ``parameters_to_vector(torch_conv.parameters())``.
    gram_route : None, "materialise" or "spatial"
        Force a route of :meth:`row_gram`; None (default) picks by :func:`conv_gram_route`.

    Notes
    -----
    Initialisation as PyTorch: weight and bias ~ U(−k, k), k = 1/√(C_in·kh·kw).  With
    the module docstring's Ā_n, b_r, G_r, and B_r (T × C_out) the rows b_rtᵀ of row r:

    * U v:   r ↦ Σ_t ⟨b_rt, V_W ā_nt + V_b⟩          (V_W Ā_nᵀ once per sample)
    * Uᵀ w:  Σ_n Σ_t (Σ_k w_nk b_nkt) ā_ntᵀ           (contract over k first)
    * Gram:  K[r, r'] = Σ_{t,t'} (B_r B_r'ᵀ)_{tt'} (Ā_n Ā_mᵀ + 1_bias)_{tt'}  ("spatial"),
      or U_l U_lᵀ from per-row gradients ("materialise"), whichever needs fewer FLOPs.

    The spatial route is the "ghost norm" trick: Goodfellow (2015) observed that
    per-example gradient norms of a dense layer follow from its inputs and output
    gradients without forming the gradients; Li et al. (2022) carried this over to
    layers applied at many positions (sequences, and here image locations), where the
    price is a T × T Gram per pair of samples.  It pays when T² is small next to the
    layer's parameter count (late, wide layers); choosing per layer is the "mixed ghost
    clipping" of Bu et al. (2022).

    References
    ----------
    R. Grosse, J. Martens (2016). A Kronecker-factored approximate Fisher matrix for
    convolution layers.  ICML.
    I. Goodfellow (2015). Efficient per-example gradient computations.  arXiv:1510.01799.
    X. Li, F. Tramèr, P. Liang, T. Hashimoto (2022). Large language models can be strong
    differentially private learners.  ICLR.
    Z. Bu, J. Mao, S. Xu (2022). Scalable and efficient training of large convolutional
    neural networks with differential privacy.  NeurIPS.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1,
                 padding=0, dilation=1, bias: bool = True):
        if not all(hasattr(c, "__index__") and not isinstance(c, bool) and operator.index(c) >= 1
                   for c in (in_channels, out_channels)):
            raise ValueError("Conv2d needs in_channels >= 1 and out_channels >= 1 (integers), "
                             f"got {in_channels!r} and {out_channels!r}.")
        self.in_channels, self.out_channels = operator.index(in_channels), operator.index(out_channels)
        self.kernel_size = _pair(kernel_size, "kernel_size", 1)
        self.stride = _pair(stride, "stride", 1)
        self.padding = _pair(padding, "padding", 0)
        self.dilation = _pair(dilation, "dilation", 1)
        self.bias = bool(bias)
        self.gram_route: str | None = None  #: None (auto), "materialise" or "spatial"
        self.D = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        shapes = [(self.out_channels, self.in_channels) + self.kernel_size]
        if self.bias:
            shapes.append((self.out_channels,))
        self.param_shapes = tuple(shapes)

    def __repr__(self) -> str:
        return (f"Conv2d({self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias})")

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(
                f"{self!r} expects per-sample input shape ({self.in_channels}, H, W) "
                f"(NCHW with {self.in_channels} channels), got {in_shape}.")
        hw = []
        for size, k, s, p, d in zip(in_shape[1:], self.kernel_size, self.stride,
                                    self.padding, self.dilation):
            hw.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
        if min(hw) < 1:
            raise ValueError(
                f"{self!r} gives an empty output for input shape {in_shape}: the padded input "
                f"is smaller than the dilated kernel; use a larger input or more padding.")
        return (self.out_channels, hw[0], hw[1])

    def init_params(self, rng):
        bound = 1.0 / math.sqrt(self.D)
        return [rng.uniform(-bound, bound, size=s) for s in self.param_shapes]

    # ----------------------------------------------------------------- forward/backward
    def _im2col(self, x):
        """Patches as columns Āᵀ (N, D, T), D in the weight's (in, kh, kw) order.

        One strided view of the padded input and one copy; the (D, T) layout keeps the
        output locations contiguous, which makes both the copy and the forward GEMM fast.
        """
        xp = namespace(x)
        N = x.shape[0]
        _, Ho, Wo = self.out_shape(x.shape[1:])
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        if ph or pw:
            x = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
        sN, sC, sH, sW = x.strides
        view = xp.lib.stride_tricks.as_strided(
            x, shape=(N, self.in_channels) + self.kernel_size + (Ho, Wo),
            strides=(sN, sC, sH * dh, sW * dw, sH * sh, sW * sw))
        return view.reshape(N, self.D, Ho * Wo), (Ho, Wo)  # reshape copies the view

    def forward(self, params, x):
        """z_n = W_mat Āₙᵀ (+ b): one batched GEMM over the im2col columns.

        The cache holds the columns Āᵀ (N, D, T) and the input's spatial shape (H, W).
        """
        cols, (Ho, Wo) = self._im2col(x)
        z = params[0].reshape(self.out_channels, self.D) @ cols  # (N, C_out, T)
        if self.bias:
            z = z + params[1][:, None]
        return z.reshape(x.shape[0], self.out_channels, Ho, Wo), (cols, tuple(x.shape[2:]))

    def backward(self, params, cache, B):
        """Transposed convolution (col2im of W_matᵀ b_r): one GEMM, then a shifted add per offset.

        Y = W_allᵀ Bᵀ stacks every kernel offset's W[:, :, i, j]ᵀ b_r (kh·kw·C_in rows, one
        product instead of kh·kw skinny ones: measured 1.4–1.8× faster on 2 cores); offset
        (i, j)'s block is added to the input positions it reads.  Blocks of rows keep Y
        near _CHUNK_ELEMS entries; no (R, D, T) column buffer is formed.
        """
        xp = namespace(B)
        (H, W), (N, K, Co, Ho, Wo) = cache[1], B.shape
        (ph, pw), (sh, sw), (dh, dw) = self.padding, self.stride, self.dilation
        (kh, kw), R, C, T = self.kernel_size, N * K, self.in_channels, Ho * Wo
        Bt = xp.ascontiguousarray(B.reshape(R, Co, T).transpose(1, 0, 2)).reshape(Co, -1)
        Wall = params[0].transpose(2, 3, 1, 0).reshape(kh * kw * C, Co)  # rows (i, j, c)
        out = xp.zeros((C, R, H + 2 * ph, W + 2 * pw), dtype=Bt.dtype)
        step = max(1, _CHUNK_ELEMS // (self.D * T))
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            Y = (Wall @ Bt[:, r0 * T:r1 * T]).reshape(kh, kw, C, r1 - r0, Ho, Wo)
            for i in range(kh):
                for j in range(kw):
                    out[:, r0:r1, i * dh:i * dh + sh * (Ho - 1) + 1:sh,
                        j * dw:j * dw + sw * (Wo - 1) + 1:sw] += Y[i, j]
        out = out[:, :, ph:ph + H, pw:pw + W].transpose(1, 0, 2, 3)
        return xp.ascontiguousarray(out).reshape(N, K, C, H, W)

    def restrict(self, active):
        """Weight only: the same layer without bias (same cache); bias only: :class:`BiasRows`."""
        if len(active) != 2:
            raise ValueError(f"{self!r} has {len(self.param_shapes)} tensors, got a selection "
                             f"of {len(active)}.")
        if active[1]:
            return BiasRows(self, self.out_channels)
        weight_only = copy.copy(self)
        weight_only.bias = False
        weight_only.param_shapes = self.param_shapes[:1]
        return weight_only

    # ------------------------------------------------------------------ row primitives
    def _rows(self, cache, B):
        """Patches Ā (N, T, D) (a view of the cached columns) and rows as (N, K, C_out, T)."""
        cols = cache[0]
        return cols.transpose(0, 2, 1), B.reshape(B.shape[0], B.shape[1], self.out_channels, -1)

    def _channel_blocks(self, A, Bm):
        """Per-row weight gradients a block of output channels at a time.

        Yields G[n, k, o, :] = Σ_t b_nk,o,t ā_ntᵀ for o in a block, shape (N, K, block, D);
        each block has about _CHUNK_ELEMS entries.
        """
        N, K, Co, T = Bm.shape
        step = max(1, _CHUNK_ELEMS // max(1, N * K * self.D))
        for o0 in range(0, Co, step):
            yield Bm[:, :, o0:o0 + step] @ A[:, None]

    def row_grads(self, cache, B):
        xp = namespace(B)
        A, Bm = self._rows(cache, B)
        N, K = Bm.shape[:2]
        gW = (Bm @ A[:, None]).reshape(N, K, -1)  # (N, K, C_out·D)
        return xp.concatenate([gW, Bm.sum(axis=3)], axis=2) if self.bias else gW

    def row_dot(self, cache, B, V):
        cols, (N, K) = cache[0], B.shape[:2]
        M = V[0].reshape(self.out_channels, self.D) @ cols  # (N, C_out, T): V_W ā_nt
        if self.bias:
            M = M + V[1][:, None]
        return (B.reshape(N, K, -1) @ M.reshape(N, -1, 1))[..., 0]

    def row_sum(self, cache, B, w):
        xp = namespace(B)
        cols, (N, K) = cache[0], B.shape[:2]
        v = (w[:, None, :] @ B.reshape(N, K, -1)).reshape(N, self.out_channels, -1)
        blocks = [xp.einsum("not,ndt->od", v, cols, optimize=True).reshape(self.param_shapes[0])]
        if self.bias:
            blocks.append(v.sum(axis=(0, 2)))
        return blocks

    def row_sq_sum(self, cache, B):
        """Σ_r G_r ⊙ G_r from per-row gradients materialised a block of channels at a time."""
        xp = namespace(B)
        A, Bm = self._rows(cache, B)
        parts = [(G * G).sum(axis=(0, 1)).reshape(-1) for G in self._channel_blocks(A, Bm)]
        if self.bias:
            gb = Bm.sum(axis=3)
            parts.append((gb * gb).sum(axis=(0, 1)))
        return xp.concatenate(parts)

    def row_gram(self, cache, B):
        """(R, R) float64 Gram U_l U_lᵀ by the cheaper route (or ``self.gram_route``)."""
        xp = namespace(B)
        A, Bm = self._rows(cache, B)
        N, K, Co, T = Bm.shape
        route = self.gram_route or conv_gram_route(N, K, T, Co, self.D, self.bias)
        if route not in ("materialise", "spatial"):
            raise ValueError(f"gram_route must be None, 'materialise' or 'spatial', got {route!r}.")
        A = A.astype(xp.float64, copy=False)
        Bm = Bm.astype(xp.float64, copy=False)
        if route == "materialise":
            return self._gram_materialise(xp, A, Bm)
        return self._gram_spatial(xp, A, Bm)

    def _gram_materialise(self, xp, A, Bm):
        """Σ over channel blocks c of U_c U_cᵀ (each a symmetric rank-k update)."""
        N, K, Co, _ = Bm.shape
        R = N * K
        G = xp.zeros((R, R), dtype=xp.float64)
        for Gc in self._channel_blocks(A, Bm):
            U = Gc.reshape(R, -1)  # rows (n, k), columns (o, d) of this channel block
            G += U @ U.T
        if self.bias:
            U = Bm.sum(axis=3).reshape(R, Co)
            G += U @ U.T
        return G

    def _gram_spatial(self, xp, A, Bm):
        """K[(n,k), (m,j)] = Σ_{t,o} b_nkot Σ_u (Ā_n Ā_mᵀ + 1)_{tu} b_mjou, in sample blocks.

        Contracting the input Gram with one side's rows first costs N·R·T²·C_out (one
        triangle of block pairs) instead of the R²·T²·C_out of forming every B_r B_r'ᵀ;
        memory per block of S × S sample pairs is S²·T·(T + K·C_out).  At least 8 blocks
        a side, so that skipping the lower triangle of blocks saves nearly half the work.
        """
        N, K, Co, T = Bm.shape
        Q = Bm.transpose(0, 3, 2, 1).reshape(N, T, Co * K)   # Q[m][u, (o, j)] = b_mjou
        Bt = Bm.transpose(0, 1, 3, 2).reshape(N, K, T * Co)  # Bt[n][k, (t, o)] = b_nkot
        At = A.transpose(0, 2, 1)
        S = max(1, min(-(-N // 8), math.isqrt(_CHUNK_ELEMS // (T * (T + Co * K)))))
        G = xp.empty((N, K, N, K), dtype=xp.float64)
        for n0 in range(0, N, S):
            n = slice(n0, min(N, n0 + S))
            for m0 in range(n0, N, S):  # upper triangle of blocks; the lower one mirrors it
                m = slice(m0, min(N, m0 + S))
                AA = A[n, None] @ At[None, m]  # (S, S, T, T) input Grams Ā_n Ā_mᵀ
                if self.bias:
                    AA += 1.0
                Y = AA @ Q[None, m]  # (S, S, T, C_out·K)
                Y = Y.reshape(Y.shape[0], Y.shape[1], T * Co, K)
                G[n, :, m, :] = (Bt[n, None] @ Y).transpose(0, 2, 1, 3)
                if m0 != n0:
                    G[m, :, n, :] = G[n, :, m, :].transpose(2, 3, 0, 1)
        G = G.reshape(N * K, N * K)
        return 0.5 * (G + G.T)  # diagonal blocks: the two triangles differ by round-off
