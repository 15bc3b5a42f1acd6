"""K-FAC's factor rows, read off the layer protocol (docs/kfac.md, docs/design.md §3).

Every K-FAC factor is ``scale · MᵀM`` for a row matrix M.  A layer that supports K-FAC
(:meth:`refngd.nn.ParametricLayer.kfac_refusal` is None) says which input vectors its
weight multiplies — ``tokens(cache)``, (N, T, D) — and which rows arrive at the T
positions — ``token_rows(B)``, (N, K, d_out, T); T = 1 for a dense layer, T tokens for a
Linear on sequences, T image locations for Conv2d.  From these this module forms the rows
of A and G, for every layer alike:

    no sharing (T = 1):  A = (1/N) Σ_n ā_n ā_nᵀ,              G = c Σ_{n,k} b_nk b_nkᵀ
    expand:              A = 1/(N·T) Σ_{n,t} ā_nt ā_ntᵀ,      G = c Σ_{n,k,t} b_nkt b_nktᵀ
    reduce:              A = (1/N) Σ_n ā_n ā_nᵀ, ā_n = (1/T) Σ_t ā_nt,
                         G = c Σ_{n,k} b_nk b_nkᵀ, b_nk = Σ_t b_nkt

(Martens & Grosse 2015, §3–4; Grosse & Martens 2016; Eschenhagen et al. 2023, §3).
Nothing here asks what type a layer is: a new layer with the four K-FAC entries of the
protocol gets K-FAC, EKFAC and the Kronecker diagonal.

A layer whose weight is g disjoint blocks (``kfac_groups`` = g: a grouped convolution)
enters as g K-FAC units (:class:`GroupView`), each with the four entries of its block —
its D input columns, its d_out/g output rows — and its own place in θ: the weight rows
of group j are contiguous, its bias entries j·d_out/g:(j+1)·d_out/g sit after the whole
weight (``bias_start``).
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

from ..backend import Array, as_generator, namespace
from ..options import (BIAS_MODES, FISHER_TYPES, KFAC_APPROX, check_choice, check_int,
                       check_kfac_damping)
from .kronecker import Block, KronFactor

#: input factors per forward pass:
#: {linearization: {(layer index, part, group, approx, joint): KronFactor}} (``part``:
#: LayerRows.part, the (sub-)layer within model.layers[index] whose input forms A;
#: ``group``: a GroupView's group, else None)
INPUT_FACTORS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- factor rows
def shares_weights(layer, cache) -> bool:
    """True when T positions share the layer's weight (``kfac_approx`` applies)."""
    return layer.weight_sharing(cache) is not None


def _refuse_unshared(layer, approx):
    if approx is None:
        raise TypeError(f"{layer!r} shares its weight over several positions: its K-FAC needs "
                        "kfac_approx='expand' or 'reduce'.")


def input_rows(layer, cache, approx: str | None, joint: bool):
    """Rows M and scale of the input factor A = scale · MᵀM, in float64."""
    A3 = layer.tokens(cache)                                       # (N, T, D)
    N, T, D = A3.shape
    if not shares_weights(layer, cache):
        a, scale = A3.reshape(N, D), 1.0 / N
    else:
        _refuse_unshared(layer, approx)
        if approx == "expand":
            a, scale = A3.reshape(N * T, D), 1.0 / (N * T)
        else:
            a, scale = A3.mean(axis=1), 1.0 / N
    xp = namespace(a)
    a = a.astype(xp.float64, copy=False)
    if joint:
        a = xp.concatenate([a, xp.ones((a.shape[0], 1), dtype=xp.float64)], axis=1)
    return xp.ascontiguousarray(a), scale


def output_rows(layer, B: Array, approx: str | None) -> Array:
    """Rows of the output factor G = c · MᵀM: b_nk (no sharing), b_nkt (expand), Σ_t b_nkt
    (reduce).  ``approx`` None means the layer does not share its weight (T = 1)."""
    xp = namespace(B)
    Bt = layer.token_rows(B)                                       # (N, K, d_out, T)
    N, K, d_out, T = Bt.shape
    if approx == "reduce":
        M = Bt.sum(axis=3).reshape(N * K, d_out)
    else:  # expand, or one position: the rows at every position
        M = Bt.transpose(0, 1, 3, 2).reshape(N * K * T, d_out)
    return xp.ascontiguousarray(M.astype(xp.float64, copy=False))


def given_draws(loss, Z: Array, labels) -> Array:
    """Sampled targets given by the caller (another implementation's draws), as an array of
    leading shape (N, K): K draws per sample, or one draw in the observed targets' layout
    ((N,) class labels for the cross-entropy, (N, C) for MSE / BCE), which gets K = 1."""
    xp = namespace(Z)
    Yhat = xp.asarray(labels)
    draws = loss.sample_targets(Z[:1], as_generator(0), 1)  # the layout of a draw
    if Yhat.ndim == draws.ndim - 1:
        Yhat = Yhat[:, None]
    if Yhat.ndim != draws.ndim or Yhat.shape[0] != Z.shape[0] \
            or tuple(Yhat.shape[2:]) != tuple(draws.shape[2:]):
        raise ValueError(f"labels must have shape (N, K{', ...' if draws.ndim > 2 else ''}) "
                         f"with N = {Z.shape[0]} (one row of K draws per sample), got "
                         f"{tuple(Yhat.shape)}.")
    return Yhat.astype(draws.dtype, copy=False)


def fisher_cotangents(loss, Z: Array, y, fisher_type: str, mc_samples: int, rng,
                      factor_columns: str = "per-token", labels=None) -> Array:
    """The output-space rows of each Fisher type (as :mod:`refngd.curvature.exact`);
    for ``"mc"`` at the given sampled targets ``labels`` (:func:`given_draws`) if any.

    ``factor_columns="stacked"`` (a convention's, :mod:`refngd.conventions`): for a loss
    with T terms per sample, column m of every token's square factor S_nt
    (``loss.hessian_sqrt``; for the cross-entropy diag(√p) − p√pᵀ, as curvlinops) in one
    row (:meth:`refngd.losses.Loss.stack_token_columns`).  Stacked rows depend on which
    factor is stacked — their cross-token terms S_nt[:, m] S_nt'[:, m]ᵀ pair columns of
    equal index — so the square root the library uses is taken, not refngd's C − 1.
    """
    if labels is not None:
        if fisher_type != "mc":
            raise ValueError("labels= are the sampled targets of fisher_type='mc'; got "
                             f"fisher_type={fisher_type!r}.")
        Yhat = given_draws(loss, Z, labels)
        return loss.output_gradients_at(Z, Yhat) / Yhat.shape[1] ** 0.5
    if fisher_type == "type-2":
        if factor_columns == "stacked" and loss.tokens_per_sample > 1:
            return loss.stack_token_columns(loss.hessian_sqrt(Z)).transpose(0, 2, 1)
        # the columns of F_n F_nᵀ = H_n (C − 1 of them for CE); with labels the CE factor
        # is aligned with the gradient (updates.kfac writes g in it)
        F = loss.hessian_factor(Z) if y is None else loss.hessian_factor(Z, y)
        return F.transpose(0, 2, 1)
    if fisher_type == "mc":
        return loss.sampled_output_gradients(Z, rng, mc_samples) / mc_samples ** 0.5
    return loss.output_gradient(Z, y)[:, None, :]


def check_options(fisher_type, kfac_approx, bias, y, mc_samples, rng, labels=None):
    """Check K-FAC's options (:mod:`refngd.options`); the Generator for ``"mc"`` (None
    when the sampled ``labels`` are given)."""
    check_choice(fisher_type, "fisher_type", FISHER_TYPES)
    check_choice(kfac_approx, "kfac_approx", KFAC_APPROX)
    check_choice(bias, "bias", BIAS_MODES)
    if fisher_type == "empirical" and y is None:
        raise ValueError("fisher_type='empirical' needs the labels y.")
    if fisher_type == "mc":
        check_int(mc_samples, "mc_samples")
        return as_generator(rng) if labels is None else None
    return None


class GroupView:
    """Group j of a layer with ``kfac_groups`` = g > 1, as a K-FAC unit of its own.

    Its weight matrix is the rows j·d_out/g:(j+1)·d_out/g of the layer's (d_out, D)
    weight matrix, acting on the columns j·D:(j+1)·D of the layer's tokens; ``w_offset``
    and ``b_offset`` are where its weight and bias entries start, relative to the layer's
    slice of θ.  It carries only the K-FAC entries (no row primitives: the exact
    curvatures use the layer itself).
    """

    def __init__(self, layer, group: int):
        self.parent, self.group = layer, group
        d_out, self.D = layer.weight_matrix_shape
        self.d_out = d_out // layer.kfac_groups
        self.bias = layer.bias
        self.w_offset = group * self.d_out * self.D
        self.b_offset = d_out * self.D + group * self.d_out

    def __repr__(self) -> str:
        return f"{self.parent!r} (group {self.group})"

    kfac_groups = 1

    def kfac_refusal(self):
        return None

    @property
    def weight_matrix_shape(self) -> tuple[int, int]:
        return (self.d_out, self.D)

    def weight_sharing(self, cache):
        return self.parent.weight_sharing(cache)

    def tokens(self, cache):
        j, D = self.group, self.D
        return self.parent.tokens(cache)[:, :, j * D:(j + 1) * D]

    def token_rows(self, B):
        j, d = self.group, self.d_out
        return self.parent.token_rows(B)[:, :, j * d:(j + 1) * d]


def bias_start(e) -> int:
    """Where the bias of K-FAC unit ``e`` (a LayerRows) starts in the parameter vector:
    right after its weight, or, for a :class:`GroupView`, at its own offset."""
    layer = e.layer
    if isinstance(layer, GroupView):
        return e.start - layer.w_offset + layer.b_offset
    d_out, D = layer.weight_matrix_shape
    return e.start + d_out * D


def _units(e):
    """The K-FAC units of one LayerRows: itself, or one per group (:class:`GroupView`)."""
    g = e.layer.kfac_groups
    if g == 1:
        return [e]
    out = []
    for j in range(g):
        view = GroupView(e.layer, j)
        start = e.start + view.w_offset
        out.append(dataclasses.replace(e, layer=view, start=start,
                                       stop=start + view.d_out * view.D))
    return out


def parametric_rows(model, rows):
    """(index in model.layers, LayerRows) of every K-FAC unit; refuses other layers.

    A Linear inside a composite layer (an attention's in- and out-projection) gets the
    index of the composite that holds it; its factors are its own.  A grouped layer gives
    one entry per group (:class:`GroupView`; ``stop`` ends its weight entries, its bias is
    at :func:`bias_start`).  A layer without K-FAC factors is refused with the error it
    gives (``kfac_refusal``).
    """
    if not getattr(rows, "layers", None):
        raise TypeError("K-FAC needs a refngd.nn.Sequential of Linear / Conv2d layers "
                        f"(got {type(model).__name__}); use the exact curvatures for FunctionModel.")
    out = []
    for e in rows.layers:
        refusal = e.layer.kfac_refusal()
        if refusal is not None:
            raise type(refusal)(f"layer {e.index}: {refusal}")
        out.extend((e.index, unit) for unit in _units(e))
    return out


def check_mode(damping, damping_mode: str):
    """The damping as a float — or a pair (λ_A, λ_G) for ``"per-factor"`` — after checking
    ``damping_mode`` (:func:`refngd.options.check_kfac_damping`)."""
    return check_kfac_damping(damping, damping_mode)


# --------------------------------------------------------------------------- blocks
@dataclass
class LayerFactors:
    """K-FAC factors of one layer: its Fisher block ≈ G ⊗ A in row-major vec(W).

    Attributes
    ----------
    index : the layer's position in ``model.layers`` (for a projection inside attention, the
        attention's);  layer : the layer itself
    start, stop : its slice of θ
    A : input factor (d_A, d_A), no c.  Dense layers: (1/N) Σ ā ā ᵀ; weight sharing: see
        ``approx``.  d_A = D (``weight_matrix_shape[1]``) — or D + 1 with
        ``bias="joint"`` (ā = [a; 1]).
    G : output-gradient factor (d_out, d_out), c Σ b bᵀ over the Fisher type's rows.
    bias : ``"separate"`` (weight block G ⊗ A, bias block G, cross terms dropped),
           ``"joint"`` (one block G ⊗ A over [W | b]), or ``None`` (no bias).
    approx : ``"expand"`` / ``"reduce"`` for layers that share their weight (Conv2d, Linear
        on sequences), ``None`` for a dense layer.
    """

    index: int
    layer: object
    start: int
    stop: int
    A: Array
    G: Array
    bias: str | None
    approx: str | None


def build_blocks(e, A: KronFactor, G: KronFactor, bias: str, thin: bool, xp):
    """The blocks of one layer: [w] (no bias), [w, b] (separate) or [wb] (joint)."""
    layer = e.layer
    D = layer.weight_matrix_shape[1]
    d_out = G.dim
    if not layer.bias:
        return [Block("w", G, A, e.start, d_out, D, thin, e)]
    b0 = bias_start(e)
    if bias == "joint":
        return [Block("wb", G, A, e.start, d_out, D, thin, e, b0)]
    one = KronFactor(xp.ones((1, 1), dtype=xp.float64), 1.0)
    return [Block("w", G, A, e.start, d_out, D, thin, e, b0),
            Block("b", G, one, e.start, d_out, D, thin, e, b0)]

