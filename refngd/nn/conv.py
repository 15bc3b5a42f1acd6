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

from ..backend import namespace
from ..options import ArgumentTypeError
from .base import BiasRows, ParametricLayer, int_pair, layer_ints, positive_int
from .conv_rows import _CHUNK_ELEMS, ConvRows
from .patches import col2im_into, im2col_into
from .shared import gram_flops, gram_route
#: rows per block of the transposed convolution: its (kh·kw·C_in, rows·T) product is read
#: back once per kernel offset, and 8 MB blocks stay in cache (on 2 cores, Conv2d(16, 32)
#: with 576 rows: 57 ms with 32 MB blocks, 38–42 ms with 8 MB)
_BACKWARD_CHUNK_ELEMS = 1 << 20


def conv_gram_flops(N: int, K: int, T: int, C_out: int, D: int, bias: bool = True):
    """FLOP counts ``(materialise, spatial)`` of the two Gram routes: see
    :func:`refngd.nn.shared.gram_flops` (T output locations, D = C_in·kh·kw)."""
    return gram_flops(N, K, T, C_out, D, bias)


def conv_gram_route(N: int, K: int, T: int, C_out: int, D: int, bias: bool = True) -> str:
    """The cheaper Gram route by :func:`conv_gram_flops`: ``"materialise"`` or ``"spatial"``."""
    return gram_route(N, K, T, C_out, D, bias)


class Conv2d(ConvRows, ParametricLayer):
    """2-d convolution (cross-correlation) on NCHW inputs, as :class:`torch.nn.Conv2d`.

    Parameters
    ----------
    in_channels, out_channels : int
        C_in and C_out.
    kernel_size, stride, padding, dilation : int or pair of ints
        As in PyTorch; padding is zero padding on both sides (an integer: ``"same"`` /
        ``"valid"`` and other ``padding_mode`` values are refused by the converter).
    groups : int, default 1 (keyword only: the 7th argument is ``bias``)
        Grouped convolution (``groups = C_in``: depthwise): output channels
        j·C_out/g … (j+1)·C_out/g see only input channels j·C_in/g … (j+1)·C_in/g, with
        weight (C_out, C_in/g, kh, kw).  Every group is a convolution of its own on its
        patch rows j·D:(j+1)·D, D = (C_in/g)·kh·kw: its row gradients, Gram and K-FAC
        block are its own (the weights of different groups are disjoint).
    bias : bool, default True

    Attributes
    ----------
    param_shapes : ((C_out, C_in/groups, kh, kw), (C_out,)) — weight then bias, row-major:
        θ is exactly ``parameters_to_vector(torch_conv.parameters())``.
    gram_route : None, "materialise" or "spatial"
        Force a route of :meth:`row_gram`; None (default) picks by :func:`conv_gram_route`.

    Notes
    -----
    Initialisation as PyTorch: weight and bias ~ U(−k, k), k = 1/√(C_in·kh·kw).  With
    the module docstring's Ā_n, b_r, G_r, and B_r (T × C_out) the rows b_rtᵀ of row r:

    * U v:   r ↦ Σ_t ⟨b_rt, V_W ā_nt + V_b⟩          (V_W Ā_nᵀ once per sample)
    * Uᵀ w:  Σ_n Σ_t (Σ_k w_nk b_nkt) ā_ntᵀ           (contract over k first)
    * Gram:  ``K[r, r'] = Σ_{t,t'} (B_r B_r'ᵀ)_{tt'} (Ā_n Ā_mᵀ + 1_bias)_{tt'}`` ("spatial"),
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
                 padding=0, dilation=1, bias: bool = True, *, groups: int = 1):
        owner = type(self).__name__
        if not isinstance(bias, bool) and bias not in (0, 1):
            raise ArgumentTypeError(f"{owner} bias must be True or False, got {bias!r} (refngd's "
                                    "Conv2d takes bias as its 7th argument; pass groups= by "
                                    "keyword).")
        self.in_channels, self.out_channels = layer_ints(
            {"in_channels": in_channels, "out_channels": out_channels}, owner,
            f"{owner} needs in_channels >= 1 and out_channels >= 1 (integers), "
            f"got {in_channels!r} and {out_channels!r}.")
        self.groups = positive_int(groups, "groups", owner)
        for name in ("in_channels", "out_channels"):
            if getattr(self, name) % self.groups:
                raise ValueError(f"{owner} {name} ({getattr(self, name)}) must be divisible by "
                                 f"groups ({self.groups}).")
        # the 2-d geometry the computation reads (Conv1d: a 1 × k kernel on (C, 1, L) maps)
        self._k = self.kernel_size = int_pair(kernel_size, "kernel_size", owner, 1)
        self._s = self.stride = int_pair(stride, "stride", owner, 1)
        self._p = self.padding = int_pair(padding, "padding", owner, 0)
        self._d = self.dilation = int_pair(dilation, "dilation", owner, 1)
        self.bias = bool(bias)
        self.gram_route: str | None = None  #: None (auto), "materialise" or "spatial"
        #: columns of the weight matrix (C_in/groups)·kh·kw; the patches have groups·D rows
        self.D = self.in_channels // self.groups * self._k[0] * self._k[1]
        self._D_in = self.groups * self.D
        shapes = [(self.out_channels, self.in_channels // self.groups) + self._k]
        if self.bias:
            shapes.append((self.out_channels,))
        self.param_shapes = tuple(shapes)

    def __repr__(self) -> str:
        groups = f", groups={self.groups}" if self.groups != 1 else ""
        return (f"{type(self).__name__}({self.in_channels}, {self.out_channels}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}{groups}, bias={self.bias})")

    def out_shape(self, in_shape):
        return self._out_shape2d(in_shape)

    def _out_shape2d(self, in_shape):
        """(C_out, H_out, W_out) of a per-sample (C_in, H, W) input (Conv1d: H = 1)."""
        in_shape = tuple(in_shape)
        if len(in_shape) != 3 or in_shape[0] != self.in_channels:
            raise ValueError(
                f"{self!r} expects per-sample input shape ({self.in_channels}, H, W) "
                f"(NCHW with {self.in_channels} channels), got {in_shape}.")
        hw = []
        for size, k, s, p, d in zip(in_shape[1:], self._k, self._s, self._p, self._d):
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
    def _im2col(self, x, out_hw):
        """Patches as columns Āᵀ: a (g·D, N, T) array, rows in the weight's (in, kh, kw) order.

        Written by :func:`refngd.nn.patches.im2col_into`: per kernel offset one strided
        copy of the input, zeros where it reads padding (no padded copy of the input).
        Columns ordered (n, t) make the forward pass, Uᵀw and U v single 2-d GEMMs over
        all samples (a batched product of N (C_out × D)(D × T) GEMMs ran at half the rate
        on 2 cores), and keep the output locations contiguous for the copy.
        """
        xp = namespace(x)
        N, (Ho, Wo) = x.shape[0], out_hw
        cols = xp.empty((self._D_in, N, Ho * Wo), dtype=x.dtype)
        im2col_into(x, cols.reshape((self.in_channels,) + self._k + (N, Ho, Wo)),
                    self._k, self._s, self._p, self._d)
        return cols

    @staticmethod
    def _cols_matrix(cols):
        """The (D, N·T) matrix behind the cached (N, D, T) columns (a view, no copy)."""
        return cols.transpose(1, 0, 2).reshape(cols.shape[1], -1)

    def _weight_times(self, W, cols2):
        """W_mat Āᵀ for the (groups·D, M) columns: one GEMM, or one per group (group j's
        C_out/groups outputs read its D patch rows j·D:(j+1)·D), as (C_out, M)."""
        Co, g = self.out_channels, self.groups
        if g == 1:
            return W.reshape(Co, self.D) @ cols2
        M = cols2.shape[1]
        return (W.reshape(g, Co // g, self.D) @ cols2.reshape(g, self.D, M)).reshape(Co, M)

    def forward(self, params, x):
        """z_n = W_mat Āₙᵀ (+ b): one GEMM over the im2col columns of all samples.

        The cache holds the columns Āᵀ as an (N, g·D, T) view of the (g·D, N·T) matrix
        and the input's spatial shape (H, W).  W_mat Āᵀ is one (C_out × g·D)(g·D × N·T)
        product (one per group: group j's C_out/g rows of W_mat read its D patch rows),
        and the copy into the (n, o, t) layout adds the bias in the same pass.  Inside
        the CNN gradient of ``benchmarks/vs_torch.py`` (2-core AVX-512 VM, 400
        interleaved calls, three runs) this took 6.8–8.3 ms (best) against 7.1–9.6 ms
        for N per-sample products written in place and a separate bias pass
        (docs/benchmarks.md, issue 22).  Splitting the samples over two Python threads
        was measured too (1.3–1.7× on the layer alone) and is not used: inside a
        gradient it gained nothing, its threads competing with OpenBLAS's still-spinning
        ones.
        """
        xp = namespace(x)
        N = x.shape[0]
        _, Ho, Wo = self._out_shape2d(x.shape[1:])
        Co, T = self.out_channels, Ho * Wo
        cols = self._im2col(x, (Ho, Wo))  # (g·D, N, T)
        zt = self._weight_times(params[0], cols.reshape(self._D_in, N * T)).reshape(Co, N, T)
        z = xp.empty((N, Co, T), dtype=zt.dtype)
        if self.bias:
            xp.add(zt.transpose(1, 0, 2), params[1][:, None].astype(z.dtype, copy=False), out=z)
        else:
            z[...] = zt.transpose(1, 0, 2)
        return z.reshape(N, Co, Ho, Wo), (cols.transpose(1, 0, 2), tuple(x.shape[2:]))

    def backward(self, params, cache, B):
        """Transposed convolution (col2im of W_matᵀ b_r): a batched GEMM, then col2im.

        Y_r = W_all b_r stacks every kernel offset's W[:, :, i, j]ᵀ b_r (kh·kw·C_in rows, one
        product instead of kh·kw skinny ones: measured 1.4–1.8× faster on 2 cores), one
        product per row r (and group: group j's kh·kw·C_in/g rows times its C_out/g
        channels of b_r — the weights of other groups are never multiplied as zeros) on
        the rows' own (C_out, T) layout — no transposing copy of B.  Offset (i, j)'s block
        goes to the input positions it read (:func:`refngd.nn.patches.col2im_into`: by
        phases when strided; the padding receives nothing), written into the
        (R, C_in, H, W) result — no zero fill, no padded buffer.  Blocks of rows keep Y
        near _BACKWARD_CHUNK_ELEMS entries.
        """
        xp = namespace(B)
        (H, W), (N, K, Co, Ho, Wo) = cache[1], B.shape
        (kh, kw), R, C, T, g = self._k, N * K, self.in_channels, Ho * Wo, self.groups
        Br = B.reshape(R, g, Co // g, T)
        Cig = C // g
        # per group: rows (i, j, c) of its C_in/g input channels, columns its C_out/g outputs
        Wall = params[0].reshape(g, Co // g, Cig, kh, kw).transpose(0, 3, 4, 2, 1)
        Wall = Wall.reshape(g, kh * kw * Cig, Co // g).astype(Br.dtype, copy=False)
        out = xp.empty((R, C, H, W), dtype=Br.dtype)
        out5 = out.reshape(R, g, Cig, H, W)  # a view: channel j·C_in/g + c is (j, c)
        step = max(1, _BACKWARD_CHUNK_ELEMS // (self._D_in * T))
        for r0 in range(0, R, step):
            r1 = min(R, r0 + step)
            Y = xp.matmul(Wall, Br[r0:r1]).reshape(r1 - r0, g, kh, kw, Cig, Ho, Wo)
            col2im_into(Y, out5[r0:r1], self._k, self._s, self._p, self._d)
        return out.reshape(N, K, C, H, W)

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

    # ------------------------------------------------------------------ K-FAC protocol
    def kfac_refusal(self):
        return None

    @property
    def weight_matrix_shape(self):
        """(C_out, D), D = (C_in/groups)·kh·kw: the weight tensor as the matrix it is."""
        return (self.out_channels, self.D)

    @property
    def kfac_groups(self) -> int:
        """``groups``: K-FAC has one block per group (docs/kfac.md, "Grouped convolution")."""
        return self.groups

    def weight_sharing(self, cache):
        return "spatial"

    def tokens(self, cache):
        """Patches Ā (N, T, groups·D): a view of the cached columns (group j's D columns
        j·D:(j+1)·D)."""
        return cache[0].transpose(0, 2, 1)

    def token_rows(self, B):
        """Rows as (N, K, C_out, T): a view."""
        return B.reshape(B.shape[0], B.shape[1], self.out_channels, -1)

    # ------------------------------------------------------------------ memory
    def backward_workspace(self, in_shape, out_shape, R):
        """One block of the product Y (:meth:`backward`) and, when strided, col2im's phase
        buffer for it: the rows are read in their own layout (no copy) and the result is
        written in place, with no padded buffer."""
        T = math.prod(out_shape) // self.out_channels
        D = self._D_in
        rows = min(R, max(1, _BACKWARD_CHUNK_ELEMS // (D * T)))
        phase = 0
        if self._s != (1, 1):  # (C, H, W), or Conv1d's (C, L) as (C, 1, L)
            hw = ((1,) + tuple(in_shape[1:]))[-2:]
            phase = self.in_channels * math.prod(-(-n // s) for n, s in zip(hw, self._s))
        return rows * (D * T + phase)

    def gram_workspace(self, in_shape, out_shape, N, K, itemsize):
        """Float64 copies of float32 patches and rows, and the temporaries of the Gram
        route :func:`conv_gram_route` picks (:func:`refngd.nn.shared.shared_gram`)."""
        R, Co, D = N * K, self.out_channels // self.groups, self.D
        T = math.prod(out_shape) // self.out_channels
        route = self.gram_route or conv_gram_route(N, K, T, Co, D, self.bias)
        b = (itemsize != 8) * (N * T * self._D_in + R * self.out_channels * T) * 8
        if route == "materialise":  # per-row gradients one block of channels at a time
            step = max(1, _CHUNK_ELEMS // max(1, R * D))
            return b + (2 * R * R + R * min(step, Co) * D) * 8
        S = max(1, min(-(-N // 8), math.isqrt(_CHUNK_ELEMS // (T * (T + Co * K)))))
        return b + (3 * R * R + 2 * R * Co * T + S * S * T * (T + Co * K)) * 8
