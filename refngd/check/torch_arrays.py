"""Tensors between PyTorch and refngd: NumPy (CPU) or CuPy (CUDA, through DLPack).

The lowest piece of the PyTorch interop (:mod:`refngd.check.interop`,
:mod:`refngd.check.torch_layers`): torch is imported only when these functions run.
"""
from __future__ import annotations

from typing import Any

from ..backend import Array, is_cupy

__all__ = ["UnsupportedModuleError", "to_array", "to_tensor"]


class UnsupportedModuleError(TypeError):
    """A ``torch.nn`` module (or a setting of one) that refngd has no layer for."""


def _torch():
    try:
        import torch
    except ImportError as err:  # pragma: no cover - depends on the machine
        raise ImportError("refngd.interop needs PyTorch: pip install 'refngd[torch]'.") from err
    return torch


# --------------------------------------------------------------------------- tensors
def no_numpy_dtype(t: Any, name: str = "tensor") -> None:
    """Raise for a torch dtype NumPy cannot hold (bfloat16), saying how to convert it."""
    if str(getattr(t, "dtype", "")) == "torch.bfloat16":
        raise TypeError(f"{name} is a bfloat16 torch tensor, which NumPy (and refngd's "
                        "comparison) cannot hold; convert it with .float() (float32, judged at "
                        "float32's tolerance) or .double() — bfloat16 carries ~3 significant "
                        "digits, so expect to loosen rtol= accordingly.")


def to_array(t: Any, copy: bool = True) -> Array:
    """A torch tensor as a NumPy array (CPU) or a CuPy array (CUDA, via DLPack).

    ``copy=True`` (default) returns memory of its own, never a view of the tensor.  A
    CUDA tensor without CuPy installed raises (refngd does not silently move a GPU
    model's data to the host); pass ``tensor.cpu()`` for that.
    """
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(t).__name__}.")
    t = t.detach()
    no_numpy_dtype(t)
    if t.is_cuda:
        try:
            import cupy
        except ImportError:
            raise ImportError("a CUDA tensor needs CuPy to stay on the GPU (pip install "
                              "'refngd[gpu]'); or pass tensor.cpu() to work on the host.") from None
        a = cupy.from_dlpack(t.contiguous())   # shares the device memory: no host copy
        return a.copy() if copy else a
    a = t.resolve_conj().resolve_neg().numpy()
    return a.copy() if copy else a


def to_tensor(a: Array, like: Any = None):
    """A NumPy / CuPy array as a torch tensor (a copy; CuPy via DLPack, staying on the GPU)."""
    torch = _torch()
    if is_cupy(a):
        return torch.from_dlpack(a.copy())
    t = torch.tensor(a)
    return t.to(like.device) if like is not None else t
