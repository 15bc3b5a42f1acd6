"""Which models of the installed model libraries refngd imports: one table.

For each model of torchvision, timm and transformers below (random initialisation, no
download, float64, eval mode) it calls ``refngd.interop.from_torch(model, X)`` once with an
example batch and compares the imported forward pass with PyTorch's on that batch; a model
that does not import is listed with the construct that stops it (refngd's refusal names
the node, the operation and the library's source line).  Libraries that are absent (or do
not import, as torchvision with a CPU build of torch) are skipped, and say so.

This is the check "run from outside" of docs/layers.md ("Model families"): the table there
came from this script.  tests/test_model_families.py holds the models that are tested
thoroughly (GGN- and Fisher-vector products against torch.func, exact NGD on LoRA adapters).

    python examples/model_zoo.py [--only NAME ...] [--out zoo.md]
"""
import argparse
import sys
import time
import warnings

import numpy as np


def images(N=2, size=32):
    return np.random.default_rng(0).standard_normal((N, 3, size, size))


def tokens(N=2, T=6, V=50):
    return np.random.default_rng(0).integers(0, V, (N, T))


def zoo():
    """name -> (library, constructor returning (module, X))."""
    def tv(fn, size=32, **kw):
        return "torchvision", lambda: (getattr(__import__("torchvision").models, fn)(
            num_classes=10, **kw), images(size=size))

    def tm(name, size=32, **kw):
        return "timm", lambda: (__import__("timm").create_model(
            name, pretrained=False, num_classes=10, **kw), images(size=size))

    def hf(model, config, inputs=tokens, **cfg):
        def make():
            tr = __import__("transformers")
            return getattr(tr, model)(getattr(tr, config)(**cfg)), inputs()
        return "transformers", make

    small = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "tv_resnet18": tv("resnet18"), "tv_resnet50": tv("resnet50"),
        "tv_mobilenet_v2": tv("mobilenet_v2"), "tv_mobilenet_v3_small": tv("mobilenet_v3_small"),
        "tv_efficientnet_b0": tv("efficientnet_b0"), "tv_convnext_tiny": tv("convnext_tiny"),
        "tv_densenet121": tv("densenet121"), "tv_shufflenet_v2_x0_5": tv("shufflenet_v2_x0_5"),
        "tv_squeezenet1_0": tv("squeezenet1_0", size=64), "tv_regnet_y_400mf": tv("regnet_y_400mf"),
        "tv_vgg11_bn": tv("vgg11_bn"), "tv_alexnet": tv("alexnet", size=64),
        "tv_swin_t": tv("swin_t"),
        "tv_vit_tiny": ("torchvision", lambda: (__import__("torchvision").models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
            num_classes=10), images())),
        "timm_resnet18": tm("resnet18"), "timm_convnext_atto": tm("convnext_atto"),
        "timm_efficientnet_b0": tm("efficientnet_b0"),
        "timm_mixer_s32": tm("mixer_s32_224", size=64, img_size=64),
        "timm_vit_tiny": tm("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2),
        "hf_bert": hf("BertForSequenceClassification", "BertConfig", vocab_size=50, hidden_size=32,
                      max_position_embeddings=16, num_labels=3, **small),
        "hf_distilbert": hf("DistilBertForSequenceClassification", "DistilBertConfig",
                            vocab_size=50, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                            max_position_embeddings=16, num_labels=3),
        "hf_roberta": hf("RobertaForSequenceClassification", "RobertaConfig", vocab_size=50,
                         hidden_size=32, max_position_embeddings=20, num_labels=3,
                         pad_token_id=1, **small),
        "hf_gpt2": hf("GPT2LMHeadModel", "GPT2Config", vocab_size=50, n_positions=16, n_embd=32,
                      n_layer=2, n_head=4),
        "hf_gpt_neox": hf("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=50, hidden_size=32,
                          max_position_embeddings=16, **small),
        "hf_llama": hf("LlamaForCausalLM", "LlamaConfig", vocab_size=50, hidden_size=32,
                       num_key_value_heads=2, max_position_embeddings=16, **small),
        "hf_opt": hf("OPTForCausalLM", "OPTConfig", vocab_size=50, hidden_size=32,
                     num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                     max_position_embeddings=16, word_embed_proj_dim=32),
        "hf_vit": hf("ViTForImageClassification", "ViTConfig", lambda: images(size=16),
                     image_size=16, patch_size=8, hidden_size=32, num_labels=3, **small),
        "hf_convnext": hf("ConvNextForImageClassification", "ConvNextConfig", images,
                          hidden_sizes=[16, 32, 32, 32], depths=[1, 1, 1, 1], num_labels=3),
        "hf_swin": hf("SwinForImageClassification", "SwinConfig", images, image_size=32,
                      patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                      window_size=4, num_labels=3),
    }


def check(make):
    """(imported?, P, relative forward difference, seconds, the refusal) of one model."""
    import torch

    from refngd import interop

    net, X = make()
    net = net.double().eval()
    t0 = time.perf_counter()
    try:
        model, theta = interop.from_torch(net, X)
    except interop.UnsupportedModuleError as err:
        return False, None, None, time.perf_counter() - t0, str(err)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = net(torch.tensor(X))
    out = getattr(out, "logits", out).reshape(len(X), -1).numpy()
    diff = np.abs(model.forward(theta, X) - out).max() / max(np.abs(out).max(), 1e-300)
    return True, theta.size, diff, seconds, ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these models only")
    parser.add_argument("--out", help="also write the table (markdown) to this file")
    args = parser.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        print("torch is not installed: nothing to import (pip install 'refngd[models]').")
        return 0
    models = zoo()
    unknown = sorted(set(args.only or ()) - set(models))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(models)}")
    warnings.filterwarnings("ignore")
    rows, absent = ["| model | imports | parameters | forward, rel. diff. | import (s) | refused at |",
                    "|---|---|---|---|---|---|"], set()
    for name in args.only or models:
        library, make = models[name]
        if library in absent:
            continue
        try:
            __import__(library)
        except Exception as err:  # noqa: BLE001 - ImportError, or torchvision's CUDA wheel
            absent.add(library)
            print(f"{library} is not importable here ({type(err).__name__}): its models skipped")
            continue
        ok, P, diff, seconds, why = check(make)
        if ok:
            rows.append(f"| {name} | yes | {P:,} | {diff:.1e} | {seconds:.1f} | |")
            assert diff <= 1e-10, f"{name}: the imported forward differs by {diff:.1e}"
        else:
            rows.append(f"| {name} | **refused** | | | {seconds:.1f} | {why.splitlines()[0][:300]} |")
        print(rows[-1], flush=True)
    table = "\n".join(rows)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")
        print(f"table: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
