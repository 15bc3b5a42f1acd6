"""``refngd check`` files with the modern layers, without torch: the JSON table builds each
layer with its PyTorch arguments, BatchNorm buffers come from the JSON or the weights file,
Embedding models read integer X, and bad files say what is wrong (exit 2)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from refngd import losses, nn
from refngd.check.files import FileFormatError, load_architecture, load_weights, param_names
from refngd.cli import main
from refngd.curvature import Fisher

LOSS = {"type": "CrossEntropyLoss", "reduction": "sum"}


def _arch(tmp, layers, name="arch.json"):
    (tmp / name).write_text(json.dumps({"layers": layers, "loss": LOSS}))
    return str(tmp / name)


def test_every_new_layer_type_builds_with_pytorch_arguments(tmp_path):
    layers = [
        {"type": "LayerNorm", "normalized_shape": [2, 3], "eps": 1e-6, "bias": False},
        {"type": "BatchNorm1d", "num_features": 3, "affine": False},
        {"type": "BatchNorm2d", "num_features": 3, "momentum": None},
        {"type": "Embedding", "num_embeddings": 5, "embedding_dim": 2, "padding_idx": -1},
        {"type": "AvgPool2d", "kernel_size": [2, 3], "ceil_mode": True, "divisor_override": 2},
        {"type": "MaxPool2d", "kernel_size": 3, "stride": 2, "padding": 1, "dilation": 1},
        {"type": "AdaptiveAvgPool2d", "output_size": 3},
        {"type": "MultiheadAttention", "embed_dim": 4, "num_heads": 2, "bias": False},
        {"type": "TransformerEncoderLayer", "d_model": 4, "nhead": 1, "dim_feedforward": 6,
         "activation": "gelu", "norm_first": True},
        {"type": "LoRALinear", "in_features": 4, "out_features": 2, "rank": 1, "alpha": 8}]
    expected = [nn.LayerNorm((2, 3), eps=1e-6, bias=False), nn.BatchNorm1d(3, affine=False),
                nn.BatchNorm2d(3), nn.Embedding(5, 2, padding_idx=4),
                nn.AvgPool2d((2, 3), ceil_mode=True, divisor_override=2),
                nn.MaxPool2d(3, 2, 1), nn.AdaptiveAvgPool2d(3), nn.MultiheadAttention(4, 2, bias=False),
                nn.TransformerEncoderLayer(4, 1, 6, activation="gelu", norm_first=True),
                nn.LoRALinear(4, 2, 1, 8)]
    for spec, layer in zip(layers, expected):   # one at a time: a Sequential checks the order
        model, _ = load_architecture(_arch(tmp_path, [spec]))
        assert repr(model.layers[0]) == repr(layer)
        assert model.layers[0].param_shapes == layer.param_shapes
    names = {"MultiheadAttention": ["in_proj_weight", "out_proj.weight"],
             "LoRALinear": ["base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"],
             "LayerNorm": ["weight"], "BatchNorm1d": []}
    for spec, layer in zip(layers, expected):
        if spec["type"] in names:
            assert param_names(layer) == names[spec["type"]]
    tel = param_names(expected[8])
    assert len(tel) == len(expected[8].param_shapes) == 12
    assert tel[:4] == ["self_attn.in_proj_weight", "self_attn.in_proj_bias",
                       "self_attn.out_proj.weight", "self_attn.out_proj.bias"]
    assert tel[4:] == [f"{m}.{k}" for m in ("linear1", "linear2", "norm1", "norm2")
                       for k in ("weight", "bias")]


def test_running_stats_from_json_and_from_named_weights(tmp_path):
    mean, var = [0.5, -1.0], [2.0, 0.25]
    spec = [{"type": "Linear", "in_features": 3, "out_features": 2},
            {"type": "BatchNorm1d", "num_features": 2, "running_mean": mean, "running_var": var}]
    model, _ = load_architecture(_arch(tmp_path, spec))
    assert np.array_equal(model.layers[1].running_mean, mean)
    assert np.array_equal(model.layers[1].running_var, var)
    # a state_dict-shaped .npz: buffers applied, num_batches_tracked ignored
    model, _ = load_architecture(_arch(tmp_path, spec[:1] + [{"type": "BatchNorm1d", "num_features": 2}]))
    rng = np.random.default_rng(0)
    arrays = {"0.weight": rng.standard_normal((2, 3)), "0.bias": rng.standard_normal(2),
              "1.weight": rng.standard_normal(2), "1.bias": rng.standard_normal(2),
              "1.running_mean": np.array(mean), "1.running_var": np.array(var),
              "1.num_batches_tracked": np.array(7)}
    np.savez(tmp_path / "w.npz", **arrays)
    theta = load_weights(str(tmp_path / "w.npz"), model)
    assert np.array_equal(theta, np.concatenate([arrays[k].ravel() for k in list(arrays)[:4]]))
    assert np.array_equal(model.layers[1].running_var, var)
    del arrays["1.running_var"]
    np.savez(tmp_path / "w1.npz", **arrays)
    with pytest.raises(FileFormatError, match="not both"):
        load_weights(str(tmp_path / "w1.npz"), model)
    with pytest.raises(FileFormatError, match="running_mean and running_var"):
        load_architecture(_arch(tmp_path, [{"type": "BatchNorm1d", "num_features": 2,
                                            "running_mean": mean}]))


def test_embedding_model_end_to_end_with_integer_tokens(tmp_path, capsys):
    spec = [{"type": "Embedding", "num_embeddings": 7, "embedding_dim": 3},
            {"type": "Flatten"}, {"type": "Linear", "in_features": 12, "out_features": 3}]
    arch = _arch(tmp_path, spec)
    model = nn.Sequential(nn.Embedding(7, 3), nn.Flatten(), nn.Linear(12, 3))
    rng = np.random.default_rng(1)
    theta, X, y = model.init(rng), rng.integers(0, 7, (6, 4)), rng.integers(0, 3, 6)
    F = Fisher(model, theta, losses.CrossEntropy("sum"), X, y).dense()
    np.savez(tmp_path / "w.npz", theta=theta)
    np.savez(tmp_path / "b.npz", X=X, y=y)
    np.savez(tmp_path / "good.npz", candidate=F)
    np.savez(tmp_path / "bad.npz", candidate=F / 6)
    args = ["check", "--arch", arch, "--weights", str(tmp_path / "w.npz"), "--quantity", "fisher"]
    assert main(args + ["--batch", str(tmp_path / "b.npz"), "--candidate", str(tmp_path / "good.npz")]) == 0
    assert main(args + ["--batch", str(tmp_path / "b.npz"), "--candidate", str(tmp_path / "bad.npz")]) == 1
    np.savez(tmp_path / "bf.npz", X=X.astype(float), y=y)
    capsys.readouterr()
    assert main(args + ["--batch", str(tmp_path / "bf.npz"), "--candidate", str(tmp_path / "good.npz")]) == 2
    assert "integer token indices" in capsys.readouterr().err


def test_refused_settings_in_json_name_the_layer(tmp_path):
    with pytest.raises(FileFormatError, match=r"layer 0 \(TransformerEncoderLayer\).*dropout"):
        load_architecture(_arch(tmp_path, [{"type": "TransformerEncoderLayer", "d_model": 4,
                                            "nhead": 2, "dropout": 0.1}]))
    with pytest.raises(FileFormatError, match=r"layer 0 \(MultiheadAttention\)"):
        load_architecture(_arch(tmp_path, [{"type": "MultiheadAttention", "embed_dim": 5,
                                            "num_heads": 2}]))
    with pytest.raises(FileFormatError, match=r"layer 0 \(BatchNorm2d\).*track_running_stats"):
        load_architecture(_arch(tmp_path, [{"type": "BatchNorm2d", "num_features": 2,
                                            "track_running_stats": False}]))
