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

from refngd import interop  # noqa: E402
from refngd import updates  # noqa: E402
from refngd.subsets import peft_mask  # noqa: E402
from refngd.curvature import KFAC, EmpiricalFisher, Fisher  # noqa: E402
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


def gpt2(attn="sdpa"):
    tr = _transformers()
    cfg = tr.GPT2Config(vocab_size=40, n_positions=16, n_embd=64, n_layer=2, n_head=4,
                        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                        attn_implementation=attn)          # use_cache: the default (True)
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


def _optional(module):
    """A library that may be installed but not importable (torchvision's CUDA wheel on a
    CPU torch): skip either way."""
    try:
        return __import__(module)
    except Exception as err:  # noqa: BLE001 - ImportError, OSError, RuntimeError
        pytest.skip(f"{module} is not importable here: {type(err).__name__}: {err}")


def tv_resnet18():
    """torchvision's ResNet-18 (BatchNorm in eval, as ``build`` sets), 10 classes."""
    return _optional("torchvision").models.resnet18(num_classes=10)


def tv_vit():
    """torchvision's VisionTransformer at a tiny size: nn.MultiheadAttention self-attention,
    a class token concatenated in forward, learned position embeddings."""
    return _optional("torchvision").models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=3)


def tv_mobilenet_v2():
    """torchvision's MobileNetV2: depthwise convolutions, ReLU6, inverted residuals."""
    return _optional("torchvision").models.mobilenet_v2(num_classes=10)


def tv_efficientnet_b0():
    """torchvision's EfficientNet-B0: SiLU, squeeze-and-excitation (a sigmoid gate
    multiplied in), stochastic depth (the identity in eval mode)."""
    return _optional("torchvision").models.efficientnet_b0(num_classes=10)


def timm_convnext():
    """timm's ConvNeXt-Atto: depthwise 7 × 7 convolutions, LayerNorm over channels,
    layer scale ``x.mul(gamma.reshape(1, -1, 1, 1))``."""
    return _optional("timm").create_model("convnext_atto", pretrained=False, num_classes=3)


def timm_efficientnet():
    """timm's EfficientNet-B0: BatchNormAct2d (``F.batch_norm`` of its own parameters and
    running statistics, then SiLU), squeeze-and-excitation."""
    return _optional("timm").create_model("efficientnet_b0", pretrained=False, num_classes=3)


def distilbert():
    """DistilBERT: its classifier applies ``nn.ReLU()`` created inside forward."""
    tr = _transformers()
    cfg = tr.DistilBertConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                              max_position_embeddings=16, num_labels=3)
    return tr.DistilBertForSequenceClassification(cfg)


def timm_vit():
    """timm's ViT-Tiny at 2 blocks on 32 × 32 images: fused attention (F.scaled_dot_product_
    attention), timm's LayerNorm (F.layer_norm on its parameters)."""
    return _optional("timm").create_model("vit_tiny_patch16_224", pretrained=False,
                                          img_size=32, patch_size=8, num_classes=3, depth=2)


def with_lora(net, targets):
    peft = _peft()
    conv1d = targets == ["c_attn"]                      # GPT-2's Conv1D stores W as (in, out)
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, lora_dropout=0.0,
                          fan_in_fan_out=conv1d)
    return peft.get_peft_model(net, cfg)


def tokens(N, T=5, V=40, seed=0):
    return np.random.default_rng(seed).integers(0, V, (N, T))


def images(N, shape, seed=0):
    return np.random.default_rng(seed).standard_normal((N,) + shape)


FAMILIES = {  # name: (constructor, input maker, LoRA targets)
    "bert": (bert, lambda N: tokens(N), ["query", "value"]),
    "gpt2": (gpt2, lambda N: tokens(N), ["c_attn"]),
    "gpt2_eager": (lambda: gpt2("eager"), lambda N: tokens(N), ["c_attn"]),
    "hf_resnet18": (hf_resnet18, lambda N: images(N, (3, 32, 32)), None),
    "hf_vit": (hf_vit, lambda N: images(N, (3, 16, 16)), ["q_proj", "v_proj"]),
    "tv_resnet18": (tv_resnet18, lambda N: images(N, (3, 32, 32)), ["layer4.1.conv2", "fc"]),
    "tv_vit": (tv_vit, lambda N: images(N, (3, 32, 32)), ["mlp.0", "mlp.3"]),
    "timm_vit": (timm_vit, lambda N: images(N, (3, 32, 32)), ["qkv"]),
    "tv_mobilenet_v2": (tv_mobilenet_v2, lambda N: images(N, (3, 32, 32)), None),
    "tv_efficientnet_b0": (tv_efficientnet_b0, lambda N: images(N, (3, 32, 32)), None),
    "timm_convnext": (timm_convnext, lambda N: images(N, (3, 32, 32)), None),
    "timm_efficientnet": (timm_efficientnet, lambda N: images(N, (3, 32, 32)), None),
    "distilbert": (distilbert, lambda N: tokens(N), ["q_lin", "v_lin"]),
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
    if name.startswith("gpt2"):
        T = model.output_shape[0]
        return PerToken(CrossEntropy(), T), lambda N: tokens(N, seed=1)
    return CrossEntropy(), lambda N: np.arange(N) % 3


def torch_outputs(net, names):
    """The flattened logits as a function of the tensors ``names`` (the rest fixed)."""
    def f(Xt, *ps):
        out = torch.func.functional_call(net, dict(zip(names, ps)), (Xt,), strict=False)
        out = out.logits if hasattr(out, "logits") else out
        return out.reshape(out.shape[0], -1)
    return f


def torch_ggn_vector(net, X, loss, v, names):
    """Jᵀ (c H) J v over the tensors ``names`` by torch.func (c H_n: the Hessian of the
    reduced loss in sample n's outputs, from refngd's loss).  J v by ``jvp`` where PyTorch has forward-mode rules,
    else (fused attention) the rows of J by ``jacrev``."""
    params = dict(net.named_parameters())
    ps = tuple(params[n].detach() for n in names)
    f = torch_outputs(net, names)
    Xt = torch.tensor(X)
    vt = torch.split(torch.tensor(v), [p.numel() for p in ps])
    tangents = tuple(t.reshape(p.shape) for t, p in zip(vt, ps))
    try:
        Z, Jv = torch.func.jvp(lambda *q: f(Xt, *q), ps, tangents)
    except (NotImplementedError, RuntimeError):  # sdpa: no forward-mode AD on CPU
        J = torch.func.jacrev(lambda *q: f(Xt, *q), argnums=tuple(range(len(ps))))(*ps)
        Z = f(Xt, *ps)
        N, C = Z.shape
        Jm = torch.cat([j.reshape(N, C, -1) for j in J], dim=2)
        Jv = torch.einsum("ncp,p->nc", Jm, torch.tensor(v))
    Zn = Z.detach().numpy()
    H = loss.scale(Zn) * loss.output_hessian(Zn)          # c H_n: the reduced loss's Hessian
    HJv = torch.tensor(np.einsum("ncd,nd->nc", H, Jv.detach().numpy()))
    _, vjp = torch.func.vjp(lambda *q: f(Xt, *q), *ps)
    return torch.cat([g.reshape(-1) for g in vjp(HJv)]).numpy()


def torch_per_sample_gradients(net, X, y, loss, names):
    """(N, P_S) gradients of each sample's loss term l_n (refngd's e_n-rows: J_nᵀ e_n)."""
    params = dict(net.named_parameters())
    ps = tuple(params[n].detach() for n in names)
    f = torch_outputs(net, names)
    Z = f(torch.tensor(X), *ps).detach().numpy()
    e = torch.tensor(loss.output_gradient(Z, y))          # (N, C), unscaled ∂l_n/∂z_n
    _, vjp = torch.func.vjp(lambda *q: f(torch.tensor(X), *q), *ps)
    rows = []
    for n in range(len(X)):                                # one vjp per sample: small N
        w = torch.zeros_like(e)
        w[n] = e[n]
        rows.append(torch.cat([g.reshape(-1) for g in vjp(w)]))
    return torch.stack(rows).numpy()


# --------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_forward_and_curvature_match_torch(name):
    """One from_torch call; forward to 1e-12; the GGN (= Fisher for these losses) and the
    empirical Fisher times a vector, over every parameter, against torch.func to 1e-10."""
    net, model, theta, X = build(name)
    ref = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
    assert np.array_equal(theta, ref)
    np.testing.assert_allclose(model.forward(theta, X), torch_logits(net, X).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    loss, targets = loss_for(name, model)
    y = targets(len(X))
    names = [n for n, _ in net.named_parameters()]
    v = np.random.default_rng(1).standard_normal(theta.size)
    F = Fisher(model, theta, loss, X, y, params="all")
    np.testing.assert_allclose(F @ v, torch_ggn_vector(net, X, loss, v, names), **TOL)
    G = torch_per_sample_gradients(net, X, y, loss, names)
    c = loss.scale(model.forward(theta, X))
    EF = EmpiricalFisher(model, theta, loss, X, y, params="all")
    np.testing.assert_allclose(EF @ v, c * G.T @ (G @ v), **TOL)


@pytest.mark.parametrize("name", ["bert", "gpt2", "hf_vit", "tv_resnet18", "tv_vit", "timm_vit",
                                  "distilbert"])
def test_lora_subset_curvature_and_exact_ngd(name):
    """peft's LoRA adapters are the trainable parameters (params=None): the GGN-vector
    product on them matches torch.func, and the exact damped NGD step solves its system."""
    net, model, theta, X = build(name, lora=True)
    np.testing.assert_allclose(model.forward(theta, X), torch_logits(net, X).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
    mask = model.trainable_mask()
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n or "classifier" in n or "score" in n for n in names)
    assert mask.sum() == sum(p.numel() for p in net.parameters() if p.requires_grad)
    lora = np.concatenate([np.full(p.numel(), p.requires_grad and "lora_" in n)
                           for n, p in net.named_parameters()])
    assert lora.any() and np.array_equal(peft_mask(model), lora)   # the adapters by name
    loss, targets = loss_for(name, model)
    y = targets(len(X))
    F = Fisher(model, theta, loss, X, y)                  # params=None: the adapters
    v = np.random.default_rng(2).standard_normal(int(mask.sum()))
    np.testing.assert_allclose(F @ v, torch_ggn_vector(net, X, loss, v, names), **TOL)
    lam = 1e-3
    d = updates.ngd(model, theta, loss, X, y, lam)
    g = F.gradient()
    assert d.shape == g.shape == (mask.sum(),)
    # a backward-stable solve: the residual is round-off of the system's own terms (an
    # element-wise rtol would fail where F d and λ d nearly cancel, as in ResNet's adapters)
    Fd = F @ d
    residual = np.linalg.norm(Fd + lam * d - g)
    assert residual <= 1e-10 * (np.linalg.norm(Fd) + lam * np.linalg.norm(d) + np.linalg.norm(g))
    K = KFAC(model, theta, loss, X, y, kfac_approx="expand")   # the adapters are Linear layers
    assert K.dense().shape == (mask.sum(), mask.sum()) and np.all(np.isfinite(K.dense()))


def test_eager_vit_attention_in_float32_is_refused_with_its_line():
    """transformers' eager ViT attention computes its softmax in float32 even in a float64
    model: refngd, which computes in θ's dtype, refuses it and says where and why."""
    tr = _transformers()
    cfg = tr.ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1,
                       num_attention_heads=4, intermediate_size=64, num_labels=3,
                       attn_implementation="eager")
    net = tr.ViTForImageClassification(cfg).double().eval()
    with pytest.raises(interop.UnsupportedModuleError,
                       match=r"modeling_vit\.py.*softmax.*computed in torch\.float32"):
        interop.from_torch(net, images(2, (3, 16, 16)))


def test_library_control_flow_on_values_is_refused_with_its_line():
    """A forward that branches on the values of its input cannot be traced: the refusal
    names the line (here GPT-2 with an attention mask built from the ids' values)."""
    tr = _transformers()

    class PadMasked(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = gpt2()

        def forward(self, ids):
            if (ids == 0).any():                 # data-dependent: which samples have padding
                return self.lm(ids, attention_mask=(ids != 0).long()).logits
            return self.lm(ids).logits

    assert tr
    net = PadMasked().double().eval()
    with pytest.raises(interop.UnsupportedModuleError,
                       match=r"could not trace PadMasked\.forward at File .*if \(ids == 0\)"
                             r"\.any\(\)"):
        interop.from_torch(net, tokens(2))


def test_without_an_example_the_shape_check_is_named():
    """Symbolic tracing (no example batch) stops at the library's first shape check: the
    refusal names the line and says that an example batch imports it."""
    _transformers()
    net = hf_resnet18().double().eval()
    with pytest.raises(interop.UnsupportedModuleError,
                       match=r"modeling_resnet\.py.*if num_channels != self\.num_channels.*"
                             r"example batch: from_torch\(module, X\)"):
        interop.from_torch(net)


def test_validate_takes_a_transformers_model():
    """refngd.check.validate imports a transformers model with the batch as its example."""
    import refngd
    net, model, theta, X = build("bert")
    y = np.arange(len(X)) % 3
    v = np.random.default_rng(4).standard_normal(theta.size)
    ref = Fisher(model, theta, CrossEntropy(), X, y, params="all") @ v
    report = refngd.check.validate(net, torch.nn.CrossEntropyLoss(), X, y, "fisher_matvec",
                                   ref, v=v)
    assert report.passed, str(report)
    report = refngd.check.validate(net, torch.nn.CrossEntropyLoss(), X, y, "fisher_matvec",
                                   2 * ref, v=v)
    assert not report.passed and "factor 2" in report.diagnosis


def test_mobilenet_v3_imports_with_hardswish_and_hardsigmoid():
    """torchvision's MobileNetV3-Small (Hardswish, Hardsigmoid gates): forward to 1e-12 and
    the exact gradient.  Its GGN is not compared at 1e-10: PyTorch's Hardsigmoid backward
    multiplies by float32(1/6) (tests/test_layers_twins.py), refngd by 1/6."""
    tv = _optional("torchvision")
    torch.manual_seed(0)
    net = tv.models.mobilenet_v3_small(num_classes=10).double().eval()
    X = images(2, (3, 32, 32))
    model, theta = interop.from_torch(net, X)
    np.testing.assert_allclose(model.forward(theta, X), torch_logits(net, X).detach().numpy(),
                               rtol=1e-12, atol=1e-12)
