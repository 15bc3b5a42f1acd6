"""Files in for ``refngd check``: architecture JSON, weights, batch and candidate.

Formats (docs/validating.md, "From files"):

* architecture ``.json``: ``{"layers": [{"type": "Conv2d", "in_channels": 1, ...}, ...],
  "loss": {"type": "CrossEntropyLoss", "reduction": "mean"}}`` — PyTorch's class names
  and constructor arguments, in ``nn.Sequential`` order (``LoRALinear`` is refngd's;
  BatchNorm layers may carry ``running_mean`` / ``running_var`` lists);
* weights ``.npz`` with one array ``theta`` (``parameters_to_vector`` order) or one array
  per parameter named as in PyTorch's ``state_dict`` (``"0.weight"``, ``"0.bias"``,
  ``"1.self_attn.in_proj_weight"``, ...; BatchNorm's ``running_mean`` / ``running_var``
  buffers are read, ``num_batches_tracked`` ignored), or a PyTorch ``state_dict`` file
  (``.pt`` / ``.pth``) read with ``torch.load(weights_only=True)`` — never an arbitrary
  unpickle;
* batch ``.npz`` with ``X`` and ``y`` (integer ``X`` for a model starting with Embedding);
* candidate ``.npz`` with ``candidate`` (an array), or, for ``kfac_factors``, one array per
  factor (``"0.A"``, ``"0.G"``, ...); optionally ``v`` for ``fisher_matvec``.

Every problem raises :class:`FileFormatError` with a sentence saying what is wrong.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .. import losses, nn


class FileFormatError(ValueError):
    """An input file of ``refngd check`` is missing, unreadable or malformed."""


_LAYERS = {
    "Linear": (nn.Linear, ("in_features", "out_features"), ("bias",)),
    "Conv2d": (nn.Conv2d, ("in_channels", "out_channels", "kernel_size"),
               ("stride", "padding", "dilation", "groups", "bias")),
    "Conv1d": (nn.Conv1d, ("in_channels", "out_channels", "kernel_size"),
               ("stride", "padding", "dilation", "groups", "bias")),
    "LeakyReLU": (nn.LeakyReLU, (), ("negative_slope", "inplace")),
    "ELU": (nn.ELU, (), ("alpha", "inplace")),
    "SiLU": (nn.SiLU, (), ("inplace",)),
    "Softplus": (nn.Softplus, (), ("beta", "threshold")),
    "Hardtanh": (nn.Hardtanh, (), ("min_val", "max_val", "inplace")),
    "ReLU6": (nn.ReLU6, (), ("inplace",)),
    "Hardsigmoid": (nn.Hardsigmoid, (), ("inplace",)),
    "Hardswish": (nn.Hardswish, (), ("inplace",)),
    "Identity": (nn.Identity, (), ()),
    "Dropout": (nn.Dropout, (), ("p", "inplace")),
    "AvgPool1d": (nn.AvgPool1d, ("kernel_size",),
                  ("stride", "padding", "ceil_mode", "count_include_pad")),
    "MaxPool1d": (nn.MaxPool1d, ("kernel_size",),
                  ("stride", "padding", "dilation", "return_indices", "ceil_mode")),
    "AdaptiveAvgPool1d": (nn.AdaptiveAvgPool1d, ("output_size",), ()),
    "Upsample": (nn.Upsample, (), ("size", "scale_factor", "mode", "align_corners",
                                   "recompute_scale_factor")),
    "Mean": (nn.Mean, (), ("dim", "keepdim")),
    "Flatten": (nn.Flatten, (), ()),
    "ReLU": (nn.ReLU, (), ("inplace",)),
    "Tanh": (nn.Tanh, (), ()),
    "Sigmoid": (nn.Sigmoid, (), ()),
    "GELU": (nn.GELU, (), ("approximate",)),
    "LayerNorm": (nn.LayerNorm, ("normalized_shape",), ("eps", "elementwise_affine", "bias")),
    "BatchNorm1d": (nn.BatchNorm1d, ("num_features",),
                    ("eps", "momentum", "affine", "track_running_stats", "bias", "running_mean",
                     "running_var")),
    "BatchNorm2d": (nn.BatchNorm2d, ("num_features",),
                    ("eps", "momentum", "affine", "track_running_stats", "bias", "running_mean",
                     "running_var")),
    "Embedding": (nn.Embedding, ("num_embeddings", "embedding_dim"),
                  ("padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse")),
    "AvgPool2d": (nn.AvgPool2d, ("kernel_size",),
                  ("stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")),
    "MaxPool2d": (nn.MaxPool2d, ("kernel_size",),
                  ("stride", "padding", "dilation", "return_indices", "ceil_mode")),
    "AdaptiveAvgPool2d": (nn.AdaptiveAvgPool2d, ("output_size",), ()),
    "MultiheadAttention": (nn.MultiheadAttention, ("embed_dim", "num_heads"),
                           ("dropout", "bias", "add_bias_kv", "add_zero_attn", "kdim", "vdim",
                            "batch_first")),
    "TransformerEncoderLayer": (nn.TransformerEncoderLayer, ("d_model", "nhead"),
                                ("dim_feedforward", "dropout", "activation", "layer_norm_eps",
                                 "batch_first", "norm_first", "bias")),
    "LoRALinear": (nn.LoRALinear, ("in_features", "out_features", "rank", "alpha"), ("bias",)),
}
_LOSSES = {"CrossEntropyLoss": losses.CrossEntropy, "MSELoss": losses.MSELoss,
           "BCEWithLogitsLoss": losses.BCEWithLogits}


def _exists(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise FileFormatError(f"{what} file {path!r} does not exist.")


def load_architecture(path: str):
    """(refngd Sequential, loss) from the architecture JSON."""
    _exists(path, "architecture")
    try:
        with open(path) as fh:
            spec = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise FileFormatError(f"architecture file {path!r} is not valid JSON: {err}.") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("layers"), list) or not spec["layers"]:
        raise FileFormatError(f"{path!r}: expected an object with a non-empty list \"layers\".")
    layers = []
    for i, item in enumerate(spec["layers"]):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind not in _LAYERS:
            raise FileFormatError(f"{path!r}, layer {i}: unknown type {kind!r}; "
                                  f"refngd has {', '.join(_LAYERS)}.")
        cls, required, optional = _LAYERS[kind]
        args = {k: v for k, v in item.items() if k != "type"}
        unknown = set(args) - set(required) - set(optional)
        missing = [k for k in required if k not in args]
        if unknown or missing:
            raise FileFormatError(f"{path!r}, layer {i} ({kind}): "
                                  + (f"missing {missing}" if missing else "")
                                  + ("; " if unknown and missing else "")
                                  + (f"unsupported arguments {sorted(unknown)}" if unknown else "") + ".")
        args.pop("inplace", None)
        stats = [args.pop(k, None) for k in ("running_mean", "running_var")]
        try:
            layer = cls(*[args.pop(k) for k in required], **args)
            if any(s is not None for s in stats):
                if None in stats:
                    raise ValueError("give both running_mean and running_var, or neither.")
                layer.set_running_stats(np.asarray(stats[0], float), np.asarray(stats[1], float))
            layers.append(layer)
        except (TypeError, ValueError) as err:
            raise FileFormatError(f"{path!r}, layer {i} ({kind}): {err}") from None
    loss_spec = spec.get("loss")
    if isinstance(loss_spec, str):
        loss_spec = {"type": loss_spec}
    if not isinstance(loss_spec, dict) or loss_spec.get("type") not in _LOSSES:
        raise FileFormatError(f"{path!r}: \"loss\" must name one of {', '.join(_LOSSES)}, e.g. "
                              "{\"type\": \"CrossEntropyLoss\", \"reduction\": \"mean\"}.")
    try:
        loss = _LOSSES[loss_spec["type"]](loss_spec.get("reduction", "mean"))
    except ValueError as err:
        raise FileFormatError(f"{path!r}, loss: {err}") from None
    return nn.Sequential(*layers), loss


def _npz(path: str, what: str) -> dict:
    _exists(path, what)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as err:  # zipfile / value errors: a file that is not an .npz
        raise FileFormatError(f"{what} file {path!r} is not a readable .npz ({err}).") from None


def _float(name: str, a) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype not in (np.float64, np.float32):
        raise FileFormatError(f"{name} has dtype {a.dtype}; expected float64 or float32.")
    return a


def load_weights(path: str, model) -> np.ndarray:
    """θ from an ``.npz`` (``theta`` or per-parameter arrays) or a ``state_dict`` file."""
    if path.endswith((".pt", ".pth")):
        _exists(path, "weights")
        try:
            import torch
        except ImportError:
            raise FileFormatError("a .pt/.pth state_dict needs PyTorch installed; or save the "
                                  "weights as .npz.") from None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise FileFormatError(f"weights file {path!r} is not a state_dict loadable with "
                                  f"torch.load(weights_only=True): {err}") from None
        arrays = {k: v.detach().numpy() for k, v in state.items()}
    else:
        arrays = _npz(path, "weights")
    arrays = _take_running_stats(arrays, model, path)
    if "theta" in arrays:
        theta = _float("theta", arrays["theta"]).reshape(-1)
        if theta.size != model.num_params:
            raise FileFormatError(f"theta has {theta.size} entries; the architecture has "
                                  f"{model.num_params} parameters.")
        return theta
    parts = []
    for slot in model.layout:
        key = slot.key
        if key not in arrays:
            raise FileFormatError(f"weights file {path!r} has no {key!r} (expected "
                                  f"'theta' or the state_dict keys {_keys(model)}).")
        a = _float(key, arrays[key])
        if a.shape != slot.shape:
            raise FileFormatError(f"{key} has shape {a.shape}; the architecture needs {slot.shape}.")
        parts.append(a.reshape(-1))
    extra = set(arrays) - set(_keys(model))
    if extra:
        raise FileFormatError(f"weights file {path!r} has entries the architecture lacks: {sorted(extra)}.")
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise FileFormatError(f"parameters mix dtypes {sorted(map(str, dtypes))}; use one.")
    return np.concatenate(parts)


def _keys(model) -> list:
    return model.layout.keys()


def param_names(layer) -> list:
    """PyTorch's ``state_dict`` names of a layer's parameters, in θ order (prefix ``i.``)."""
    return list(layer.param_names)


def _take_running_stats(arrays: dict, model, path: str) -> dict:
    """Apply BatchNorm buffers found among the named arrays; return the other arrays (a
    self-attention wrapper's ``i.attn.*`` names read as ``nn.MultiheadAttention``'s ``i.*``)."""
    arrays = dict(arrays)
    for i, layer in enumerate(model.layers):
        prefix = getattr(layer, "torch_wrapper_prefix", "")
        if prefix:
            for k in layer.param_names:
                if f"{i}.{prefix}{k}" in arrays and f"{i}.{k}" not in arrays:
                    arrays[f"{i}.{k}"] = arrays.pop(f"{i}.{prefix}{k}")
        keys = [f"{i}.running_mean", f"{i}.running_var"]
        arrays.pop(f"{i}.num_batches_tracked", None)  # a training counter: not used in eval
        if not hasattr(layer, "set_running_stats") or not any(k in arrays for k in keys):
            continue
        if not all(k in arrays for k in keys):
            raise FileFormatError(f"weights file {path!r} has one of {keys} but not both.")
        try:
            layer.set_running_stats(np.asarray(arrays.pop(keys[0]), float),
                                    np.asarray(arrays.pop(keys[1]), float))
        except ValueError as err:
            raise FileFormatError(f"weights file {path!r}, layer {i}: {err}") from None
    return arrays


def load_labels(path: str) -> np.ndarray:
    """The sampled targets of a Monte-Carlo candidate: array ``labels`` of an ``.npz``."""
    data = _npz(path, "labels")
    if "labels" not in data:
        raise FileFormatError(f"labels file {path!r} needs an array 'labels', has {sorted(data)}.")
    return data["labels"]


def load_batch(path: str, dtype, integer: bool = False) -> tuple:
    """(X, y); X cast to ``dtype``, or kept as integer indices with ``integer=True``."""
    data = _npz(path, "batch")
    if "X" not in data or "y" not in data:
        raise FileFormatError(f"batch file {path!r} needs arrays 'X' and 'y', has {sorted(data)}.")
    X = data["X"]
    if not np.issubdtype(X.dtype, np.number):
        raise FileFormatError(f"X has dtype {X.dtype}; expected numbers.")
    if integer:
        if X.dtype.kind not in "iu":
            raise FileFormatError(f"X has dtype {X.dtype}; the first layer is an Embedding, which "
                                  "reads integer token indices.")
        return X, data["y"]
    return X.astype(dtype, copy=False), data["y"]


def load_candidate(path: str, quantity: str):
    """(candidate, v): an array, or a dict of factors for ``kfac_factors``."""
    data = _npz(path, "candidate")
    v = data.pop("v", None)
    if quantity == "kfac_factors":
        if not data:
            raise FileFormatError(f"candidate file {path!r} has no factors ('0.A', '0.G', ...).")
        return {k: _float(k, a) for k, a in data.items()}, v
    if "candidate" not in data:
        if len(data) != 1:
            raise FileFormatError(f"candidate file {path!r} needs one array named 'candidate' "
                                  f"(has {sorted(data)}).")
        data = {"candidate": next(iter(data.values()))}
    return _float("candidate", data["candidate"]), v


def input_shape_ok(model, theta, X) -> None:
    """A clear error when X does not fit the first layer."""
    try:
        model.forward(theta, X[:1])
    except ValueError as err:
        raise FileFormatError(f"X of shape {X.shape} does not fit the architecture: {err}") from None
