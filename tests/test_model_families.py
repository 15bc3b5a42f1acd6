"""The model families people validate on (issue 20, item 4), randomly initialised, tiny.

Each is imported with one ``interop.from_torch(model, example)`` call (shape-concrete
torch.fx tracing, docs/design.md §6) and checked in float64 against PyTorch: the forward
pass to 1e-12, and the GGN- (= Fisher-) vector product to 1e-10 against torch.func
(J v by ``jvp``, the loss Hessian by ``hessian``, Jᵀ by ``vjp``); exact NGD runs on the
LoRA parameters that ``peft`` adds.  A library that is absent skips its tests.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import refngd  # noqa: E402
from refngd import interop  # noqa: E402
from refngd.curvature import Fisher  # noqa: E402
from refngd.losses import CrossEntropy, PerToken  # noqa: E402

TOL = dict(rtol=1e-10, atol=1e-12)


def _transformers():
    return pytest.importorskip("transformers")


def _peft():
    return pytest.importorskip("peft")


# --------------------------------------------------------------------------- models
def bert(num_labels=3):
    tr = _transformers()
    cfg = tr.BertConfig(vocab_size=40, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=16, num_labels=num_labels,
                        attn_implementation="sdpa")
    return tr.BertForSequenceClassification(cfg)


def gpt2():
    tr = _transformers()
    cfg = tr.GPT2Config(vocab_size=40, n_positions=16, n_embd=64, n_layer=2, n_head=4,
                        tie_word_embeddings=True, use_cache=False,
                        attn_implementation="sdpa")
    return tr.GPT2LMHeadModel(cfg)


def hf_resnet18():
    tr = _transformers()
    cfg = tr.ResNetConfig(num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512],
                          depths=[2, 2, 2, 2], layer_type="basic", num_labels=10)
    return tr.ResNetForImageClassification(cfg)


def hf_vit():
    tr = _transformers()
    cfg = tr.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                       num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       num_labels=3, attn_implementation="sdpa")
    return tr.ViTForImageClassification(cfg)


def with_lora(net, targets):
    peft = _peft()
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0)
    return peft.get_peft_model(net, cfg)


def tokens(N, T=5, V=40, seed=0):
    return np.random.default_rng(seed).integers(0, V, (N, T))


def images(N, shape, seed=0):
    return np.random.default_rng(seed).standard_normal((N,) + shape)


FAMILIES = {  # name: (constructor, input maker, LoRA targets)
    "bert": (bert, lambda N: tokens(N), ["query", "value"]),
    "gpt2": (gpt2, lambda N: tokens(N), ["c_attn"]),
    "hf_resnet18": (hf_resnet18, lambda N: images(N, (3, 32, 32)), None),
    "hf_vit": (hf_vit, lambda N: images(N, (3, 16, 16)), ["q_proj", "v_proj"]),
}


def build(name, N=2, lora=False):
    ctor, inputs, targets = FAMILIES[name]
    torch.manual_seed(0)
    net = ctor()
    if lora:
        net = with_lora(net, targets)
        for mod in net.modules():  # LoRA's B starts at zero; make the adapters matter
            if hasattr(mod, "lora_B"):
                for lin in mod.lora_B.values():
                    torch.nn.init.normal_(lin.weight, std=0.5)
    net = net.double().eval()
    X = inputs(N)
    model, theta = interop.from_torch(net, X)
    return net, model, theta, X


def torch_logits(net, X):
    out = net(torch.tensor(X))
    out = out.logits if hasattr(out, "logits") else out
    return out.reshape(out.shape[0], -1)


def loss_for(name, model):
    if name == "gpt2":
        T = model.output_shape[0]
        return PerToken(CrossEntropy(), T), lambda N: tokens(N, seed=1)
    return CrossEntropy(), lambda N: np.arange(N) % 3


def torch_ggn_vector(net, X, loss, v, params):
    """J_Sᵀ H J_S v over the parameters ``params`` (name → tensor) by torch.func; H of
    refngd's loss on the flattened outputs (torch.func.hessian of the torch loss)."""
    names = list(params)
    Xt = torch.tensor(X)

    def f(*ps):
        out = torch.func.functional_call(net, dict(zip(names, ps)), (Xt,))
        out = out.logits if hasattr(out, "logits") else out
        return out.reshape(out.shape[0], -1)

    sizes = [p.numel() for p in params.values()]
    vt = torch.split(torch.tensor(v), sizes)
    tangents = tuple(t.reshape(p.shape) for t, p in zip(vt, params.values()))
    Z, Jv = torch.func.jvp(f, tuple(params.values()), tangents)
    H = loss.output_hessian(Z.detach().numpy())  # (N, C, C), refngd's c included
    HJv = torch.tensor(np.einsum("ncd,nd->nc", H, Jv.detach().numpy()))
    _, vjp = torch.func.vjp(f, *params.values())
    return torch.cat([g.reshape(-1) for g in vjp(HJv)]).numpy()


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_forward_and_ggn_match_torch(name):
    net, model, theta, X = build(name)
    ref = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
    assert np.array_equal(theta, ref)
    np.testing.assert_allclose(model.forward(theta, X), torch_logits(net, X).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    loss, targets = loss_for(name, model)
    y = targets(len(X))
    # the GGN-vector product on the parameters of the last two tensors and the first one
    params = dict(net.named_parameters())
    F = Fisher(model, theta, loss, X, y)
    v = np.random.default_rng(1).standard_normal(theta.size)
    np.testing.assert_allclose(F @ v, torch_ggn_vector(net, X, loss, v, params), **TOL)
