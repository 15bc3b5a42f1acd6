"""The operations the model libraries need (issue 20, item 4), in small custom modules
imported with an example batch: ``F.scaled_dot_product_attention`` (causal, boolean and
additive masks), ``x ** c``, an Embedding at constant indices (with ``padding_idx``),
transformers' ``Conv1D`` (:class:`refngd.nn.TransposedLinear`), dtype casts that change
nothing, a sentinel-free batch size.  Forward, gradients and the GGN against torch.func;
every row primitive against the dense rows (the helpers of tests/test_torch_graph.py).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from refngd import interop, nn  # noqa: E402
from refngd.curvature import KFAC, Fisher  # noqa: E402
from refngd.losses import CrossEntropy  # noqa: E402
from test_torch_graph import TOL, assert_rows_match_torch, torch_ggn  # noqa: E402


class Attention(torch.nn.Module):
    """Fused attention as transformers calls it: causal, a boolean and an additive mask."""

    def __init__(self, d=4, T=3, mode="causal"):
        super().__init__()
        self.qkv, self.out, self.mode = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d * T, 3), mode
        self.register_buffer("keep", torch.tensor([[True, False, True], [True, True, False],
                                                   [False, True, True]]))

    def forward(self, x):
        N, T, d = x.shape
        qkv = self.qkv(x).view(N, T, 3, 2, d // 2)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))       # (N, heads, T, d_h)
        if self.mode == "causal":
            h = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.mode == "bool":
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=self.keep, scale=0.3)
        else:
            bias = torch.arange(T, dtype=x.dtype)[None, :] * 0.1   # computed from shapes alone
            h = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        h = h.transpose(1, 2).reshape(N, T, d).to(x.dtype)
        return self.out((h + 0.5 * h ** 3 - torch.pow(h, 2)).flatten(1))


class Positions(torch.nn.Module):
    """Token and position embeddings (positions: constant indices, one padding row)."""

    def __init__(self, V=6, T=4, d=3):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(V, d), torch.nn.Embedding(T + 1, d, padding_idx=0)
        self.head = torch.nn.Linear(d, 3)

    def forward(self, ids):
        positions = torch.arange(ids.shape[1], device=ids.device)[None, :] + 1
        positions = positions.expand(ids.shape[0], -1)     # built with the batch size
        h = self.tok(ids) + self.pos(positions) + self.pos(positions * 0)   # and the pad row
        return self.head(torch.tanh(h).mean(1))


def make(net, X):
    net = net.double().eval()
    model, theta = interop.from_torch(net, X)
    return net, model, theta


def check_against_torch(net, model, theta, X):
    N = len(X)
    out = net(torch.tensor(X)).detach().numpy()
    np.testing.assert_allclose(model.forward(theta, X), out, rtol=1e-12, atol=1e-13)
    y = np.arange(N) % 3
    np.testing.assert_allclose(Fisher(model, theta, CrossEntropy(), X, y, params="all").dense(),
                               torch_ggn(net, X, torch.nn.CrossEntropyLoss()), **TOL)
    assert_rows_match_torch(net, model, theta, X)


@pytest.mark.parametrize("mode", ["causal", "bool", "additive"])
def test_fused_attention_and_powers(mode):
    torch.manual_seed(0)
    X = np.random.default_rng(0).standard_normal((4, 3, 4))
    net, model, theta = make(Attention(mode=mode), X)
    check_against_torch(net, model, theta, X)
    X7 = np.random.default_rng(1).standard_normal((7, 3, 4))     # another batch size
    np.testing.assert_allclose(model.forward(theta, X7), net(torch.tensor(X7)).detach().numpy(),
                               rtol=1e-12, atol=1e-13)


def test_embedding_at_constant_indices_with_padding_row():
    torch.manual_seed(0)
    X = np.random.default_rng(0).integers(0, 6, (3, 4))
    net, model, theta = make(Positions(), X)
    check_against_torch(net, model, theta, X)
    pad = slice(*model.layout.layer_slices[1])    # pos.weight: its row 0 gets no gradient
    assert np.all(model.linearize(theta, X).backprop(np.ones((3, 1, 3))).dense()[
        :, :, pad][:, :, :3] == 0)


def test_transformers_conv1d_is_a_transposed_linear():
    tr = pytest.importorskip("transformers")

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = tr.pytorch_utils.Conv1D(6, 4), tr.pytorch_utils.Conv1D(3, 6)
            torch.nn.init.normal_(self.c_fc.bias)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_fc(x))).mean(1)

    torch.manual_seed(0)
    X = np.random.default_rng(0).standard_normal((3, 5, 4))
    net, model, theta = make(Block(), X)
    assert isinstance(model.layers[0], nn.TransposedLinear)
    assert model.layers[0].param_shapes == ((4, 6), (6,))
    check_against_torch(net, model, theta, X)
    with pytest.raises(TypeError, match=r"stores its weight as \(in, out\)"):
        KFAC(model, theta, CrossEntropy(), X)


class TimmAttention(torch.nn.Module):
    """timm's ViT attention, as written there: qkv reshaped to (B, T, 3, h, d_h), permuted
    to (3, B, h, T, d_h) — the batch axis second — and unbound along axis 0; fused SDPA."""

    def __init__(self, d=4, heads=2):
        super().__init__()
        self.qkv, self.proj, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads
        self.head = torch.nn.Linear(d, 3)

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)
        h = self.proj(h.transpose(1, 2).reshape(B, T, C)) + x
        v2 = qkv[2].transpose(1, 2).reshape(B, T, C)          # an item used directly too
        return self.head(h[:, 0] + v2.mean(1))


def test_timm_style_permute_then_unbind():
    torch.manual_seed(0)
    X = np.random.default_rng(0).standard_normal((3, 5, 4))
    net, model, theta = make(TimmAttention(), X)
    check_against_torch(net, model, theta, X)


class Expands(torch.nn.Module):
    def __init__(self, size):
        super().__init__()
        self.a, self.size = torch.nn.Linear(3, 4), size

    def forward(self, x):
        return self.a(x)[:, None].expand(x.shape[0], self.size, 4).sum(1)


def test_the_sentinel_batch_size_never_passes_silently():
    """Concrete tracing runs with a sentinel batch size; one that a model dimension equals
    is avoided, and a literal that equals it anyway is caught by the check on the example."""
    X = np.random.default_rng(0).standard_normal((2, 3))
    torch.manual_seed(0)
    for size in (5, 1030):
        net, model, theta = make(Expands(size), X)
        np.testing.assert_allclose(model.forward(theta, X), net(torch.tensor(X)).detach().numpy(),
                                   rtol=1e-12)
    with pytest.raises(interop.UnsupportedModuleError, match="differs from it on the example"):
        make(Expands(1031), X)                       # the first sentinel, as a literal size


def test_values_nothing_uses_are_dropped_not_refused():
    """A question library code asks of its input (transformers' ``is_jax_jitting(x)`` calls
    ``x.jax()`` under tracing when jax is installed) is a node nobody uses: dropped, not
    refused; an in-place method is still seen."""
    import torch

    class Asks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            x.argsort(dim=-1)            # a value nothing uses, of an op refngd has no rows for
            return self.lin(x)

    net = Asks().double()
    X = torch.randn(4, 3, dtype=torch.float64)
    for example in (None, X):
        model, theta = interop.from_torch(net, example) if example is not None else interop.from_torch(net)
        assert np.abs(model.forward(theta, X.numpy()) - net(X).detach().numpy()).max() < 1e-14

    class Mutates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            z = self.lin(x)
            z.exp_()                     # in place: kept, and refused (no rows for it)
            return z

    with pytest.raises(interop.UnsupportedModuleError, match="exp_"):
        interop.from_torch(Mutates().double(), X)


def test_refusals_say_their_own_reason():
    """An operation over the batch axis found on the example batch is a refusal, not a
    suspected tracing bug; only a trace that failed on control flow is told about it."""
    import torch

    class Lin(torch.nn.Module):
        def __init__(self, body):
            super().__init__()
            self.lin, self.body = torch.nn.Linear(3, 3), body

        def forward(self, x):
            return self.body(self, x)

    def flow(self, x):
        return self.lin(x) if x.sum() > 0 else -self.lin(x)

    X = torch.randn(4, 3, dtype=torch.float64)
    cases = {
        "batch axis": (lambda self, x: self.lin(x).movedim(0, 1), "mixes the samples",
                       "please report"),
        "vmap": (lambda self, x: torch.vmap(lambda r: self.lin(r))(x), "what torch.fx can trace",
                 "control flow"),
        "control flow": (flow, "without control flow", "please report"),
    }
    for name, (body, said, unsaid) in cases.items():
        with pytest.raises(interop.UnsupportedModuleError) as err:
            interop.from_torch(Lin(body).double(), X)
        assert said in str(err.value) and unsaid not in str(err.value), name
