"""Which devices the test machine has: the CuPy tests run only where a GPU is present."""
from __future__ import annotations


def gpu_available() -> bool:
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, no driver, no device: every case means "skip"
        return False
