"""Parameter-efficient fine-tuning layers: LoRA adapters and prompt (prefix) embeddings.

Both exist to be trained on a small parameter subset while the rest of the network stays
fixed; refngd's curvatures then work on that subset alone (docs/subsets.md).

* :class:`LoRALinear` — Hu et al. (2022), "LoRA: Low-rank adaptation of large language
  models", ICLR, eq. (3) with the scaling α/r of their §4.1: z = W₀a + b₀ + (α/r)·B A a.
* :class:`PromptPrefix` — Lester, Al-Rfou & Constant (2021), "The power of scale for
  parameter-efficient prompt tuning", EMNLP, §2: m trainable embeddings prepended to every
  input sequence.
"""
from __future__ import annotations

import math

from ..backend import namespace
from .base import SmallParametricLayer, host_full, positive_int
from .composite import Composite
from .linear import Linear


class LoRALinear(Composite):
    """``LoRALinear(in_features, out_features, rank, alpha, bias=True)``: a Linear layer with a
    frozen base and a trainable low-rank update (Hu et al. 2022, eq. 3, §4.1).

    z = a W₀ᵀ + b₀ + s · (a Aᵀ) Bᵀ,   s = alpha / rank,

    with inputs a (N, in_features) or sequences (N, *S, in_features) (weight sharing over
    the positions, as :class:`Linear`).  Parameters, in θ order — exactly
    ``parameters_to_vector(peft_lora_linear.parameters())`` for PEFT's ``lora.Linear``
    (``base_layer.weight``, ``base_layer.bias``, ``lora_A.default.weight``,
    ``lora_B.default.weight``):

    ======  ============================  =========  ======================================
    tensor  shape                         trainable  initialisation (PEFT's defaults)
    ======  ============================  =========  ======================================
    W₀      (out_features, in_features)   no         as :class:`Linear`: U(−k, k), k = 1/√in
    b₀      (out_features,)  (if bias)    no         as :class:`Linear`
    A       (rank, in_features)           yes        ``kaiming_uniform_(a=√5)``: U(−k, k)
    B       (out_features, rank)          yes        zeros (so the layer starts as its base)
    ======  ============================  =========  ======================================

    ``trainable`` (the default selection of ``params=None``) is the adapters A and B.

    Rows: the layer is a :class:`Composite` of three Linear sub-layers, PEFT's modules
    ``base_layer``, ``lora_A``, ``lora_B``, wired as z = base(a) + lora_B(s·lora_A(a)), so its
    parameter gradients are theirs (:meth:`row_views`): for an output row b_r of sample n,

    * W₀, b₀: the base :class:`Linear` with input a_n and row b_r;
    * A:      ``lora_A = Linear(in, rank, bias=False)`` with input a_n and row s·Bᵀb_r
      (∂⟨b, s B A a⟩/∂A = s Bᵀ b aᵀ);
    * B:      ``lora_B = Linear(rank, out, bias=False)`` with input s·A a_n and row b_r
      (∂⟨b, s B A a⟩/∂B = b (s A a)ᵀ).

    Every curvature — exact, K-FAC (one Kronecker block per adapter, factors of those
    inputs and rows), EKFAC — therefore works on LoRA unchanged, and the frozen base costs
    no row work.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 bias: bool = True):
        base = Linear(in_features, out_features, bias)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = positive_int(rank, "rank", "LoRALinear")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) \
                or alpha <= 0:
            raise ValueError(f"LoRALinear alpha must be a positive finite number, got {alpha!r}.")
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.rank
        self.bias = base.bias
        self._register([("base", base),
                        ("lora_A", Linear(self.in_features, self.rank, bias=False)),
                        ("lora_B", Linear(self.rank, self.out_features, bias=False))])
        self.base = base
        base.trainable = (False,) * len(base.param_shapes)  # PEFT freezes the base layer

    @property
    def param_names(self):
        """PEFT's names (``refngd.interop.lora_linear_module``): ``base_layer.*``,
        ``lora_A.weight``, ``lora_B.weight``."""
        return (("base_layer.weight",) + (("base_layer.bias",) if self.bias else ())
                + ("lora_A.weight", "lora_B.weight"))

    @property
    def peft_tensors(self):
        """All of them: PEFT trains what of this layer is trainable (the adapters)."""
        return (True,) * len(self.param_shapes)

    def __repr__(self) -> str:
        return (f"LoRALinear({self.in_features}, {self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha:g}, bias={self.bias})")

    def out_shape(self, in_shape):
        try:
            return self.base.out_shape(in_shape)
        except ValueError:
            raise ValueError(f"{self!r} expects per-sample input shape ({self.in_features},) (or "
                             f"(T, {self.in_features}) for sequences), got {tuple(in_shape)}.") from None

    def init_params(self, rng):
        base = self.base.init_params(rng)
        bound = 1.0 / math.sqrt(self.in_features)  # kaiming_uniform_(a=√5): √3·√(1/3)/√fan_in
        A = rng.uniform(-bound, bound, size=(self.rank, self.in_features))
        return base + [A, host_full((self.out_features, self.rank), 0.0)]

    def compose(self, params, x):
        z, c_base = self._fwd("base", params, x)
        h, c_A = self._fwd("lora_A", params, x)
        u, c_B = self._fwd("lora_B", params, self.scaling * h)  # lora_B's input: s·A a
        return z + u, (c_base, c_A, c_B)

    def pull_back(self, ctx, inner, B):
        c_base, c_A, c_B = inner
        B_in = self._back(ctx, "base", c_base, B)
        return B_in + self._back(ctx, "lora_A", c_A, self.scaling * self._back(ctx, "lora_B", c_B, B))


class PromptPrefix(SmallParametricLayer):
    """``PromptPrefix(num_tokens, dim)``: prepend m = num_tokens trainable embeddings to every
    sequence (prompt tuning; Lester et al. 2021, §2).

    Input (N, T, dim) → output (N, m + T, dim): out[n] = [E; x_n] with E (m, dim) the
    one parameter tensor.  Initialisation N(0, 1), the default of ``torch.nn.Embedding``
    that PEFT's randomly initialised prompt embedding uses.

    Rows: E enters sample n's output at positions 0..m−1 only, so the per-row gradient
    of a row b_r (m + T, dim) is its prefix block b_r[:m] — no input is involved.
    Gram ⟨b_r[:m], b_r'[:m]⟩, U v = ⟨b_r[:m], V⟩, Uᵀ w = Σ_r w_r b_r[:m].  The backward
    pass hands b_r[m:] to the layer below.
    """

    @property
    def peft_tensors(self):
        """All of them: PEFT trains what of this layer is trainable (the adapters)."""
        return (True,) * len(self.param_shapes)

    def __init__(self, num_tokens: int, dim: int):
        self.num_tokens = positive_int(num_tokens, "num_tokens", "PromptPrefix")
        self.dim = positive_int(dim, "dim", "PromptPrefix")
        self.param_shapes = ((self.num_tokens, self.dim),)

    def __repr__(self) -> str:
        return f"PromptPrefix({self.num_tokens}, {self.dim})"

    def out_shape(self, in_shape):
        in_shape = tuple(in_shape)
        if len(in_shape) != 2 or in_shape[1] != self.dim:
            raise ValueError(f"{self!r} expects per-sample input shape (T, {self.dim}) (a sequence "
                             f"of {self.dim}-dim embeddings), got {in_shape}.")
        return (self.num_tokens + in_shape[0], self.dim)

    def init_params(self, rng):
        return [rng.standard_normal(size=self.param_shapes[0])]

    def forward(self, params, x):
        xp = namespace(x)
        E = xp.broadcast_to(params[0].astype(x.dtype, copy=False), (x.shape[0],) + self.param_shapes[0])
        return xp.concatenate([E, x], axis=1), None

    def backward(self, params, cache, B):
        return B[:, :, self.num_tokens:]

    def row_grads(self, cache, B):
        """(N, K, m·dim): a row's gradient is its cotangent at the m prepended positions
        (the Gram, U v, Uᵀw and diagonal are read off these, as every small layer's)."""
        N, K = B.shape[:2]
        return B[:, :, :self.num_tokens].reshape(N, K, -1)
