"""Low-precision storage of an optimizer's state and factors: bfloat16 and float16.

Root-free and inverse-free methods (RF-RMSProp / RF-Adam, Lin et al. 2024a; INGD / IKFAC,
Lin et al. 2024b; SIRFShampoo) are proposed because their state — second moments,
Kronecker factors K, C with K Kᵀ ≈ A⁻¹ — can live in bfloat16, where methods that need a
square root, an inverse or an eigendecomposition of their state are said not to.
:class:`LowPrecision` makes that measurable for any refngd optimizer:

    state_t = store( opt.step(θ_{t−1}, load(state_{t−1}), batch) )

* ``store`` rounds every floating-point array of the state (moments, momentum buffers,
  Kronecker factors, K-FAC's stored eigenbases and eigenvalues, INGD's K, C, m_K, m_C) to
  the storage format, round-to-nearest-even: ``"bfloat16"`` (8 significand bits, float32's
  exponent range; ``ml_dtypes.bfloat16``, the extra ``pip install "refngd[lowprec]"``) or
  ``"float16"`` (11 significand bits, largest finite 65504; NumPy's own).  The state really
  is held in that dtype: half float32's memory.
* ``load`` converts it back to the ``compute`` dtype (float32 by default): the arithmetic of
  a step — the moment and factor updates, the matrix products of IKFAC/INGD's K ← K(I − β₁m),
  K-FAC's eigendecomposition of its running factors — runs in *at least* float32, the
  float32 accumulation the papers assume for bfloat16 training (the batch's Kronecker
  factors themselves are formed in float64 by :mod:`refngd.curvature`).  θ is kept in
  ``compute`` too (float32 master weights, as mixed-precision training does).

So each stored array is rounded once per step.  Not emulated: the rounding of every
intermediate elementwise operation that bfloat16 arithmetic on a device performs (refngd
rounds the *result* of a step, not each operation in it), and low-precision forward and
backward passes — this is a mode for the optimizers' state and factor updates only.

The known failure modes this exposes, each checked in tests/test_optim_lowprec.py:
a running average s ← (1 − β) s + β x whose increment β(x − s) is below half an ulp of s
does not move at all (bfloat16's ulp at 1 is 2⁻⁷); float16 flushes values below 6·10⁻⁸ to
zero and overflows above 65504.
"""
from __future__ import annotations

from ..backend import Array, is_cupy, namespace
from .base import Optimizer

STORAGE_DTYPES = ("bfloat16", "float16", "float32", "float64")
COMPUTE_DTYPES = ("float32", "float64")


def storage_dtype(name: str):
    """The dtype of a storage format name, as ``astype`` takes it (``"bfloat16"``:
    ``ml_dtypes.bfloat16``, NumPy only; the others: their name, for NumPy and CuPy)."""
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype must be one of {STORAGE_DTYPES}, got {name!r}.")
    if name != "bfloat16":
        return name
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - exercised by monkeypatching sys.modules
        raise ImportError('dtype="bfloat16" needs ml_dtypes: pip install "refngd[lowprec]" '
                          "(or pip install ml_dtypes).") from None
    return ml_dtypes.bfloat16


def round_to(a: Array, name: str) -> Array:
    """``a`` rounded to the storage format ``name`` and returned as float32 (for checks)."""
    xp = namespace(a)
    return xp.asarray(a).astype(storage_dtype(name)).astype(xp.float32)


def _is_float_array(v) -> bool:
    dtype = getattr(v, "dtype", None)
    if dtype is None or not hasattr(v, "astype") or not hasattr(v, "ndim"):
        return False
    return dtype.kind == "f" or dtype.name == "bfloat16"


def _map(state, fn):
    """Apply ``fn`` to every floating-point NumPy array in a nest of dicts, lists, tuples."""
    if isinstance(state, dict):
        return {k: _map(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        out = [_map(v, fn) for v in state]
        return out if isinstance(state, list) else tuple(out)
    return fn(state) if _is_float_array(state) else state


class LowPrecision(Optimizer):
    """``optimizer`` with its state stored in ``dtype`` and its steps computed in ``compute``.

    Parameters
    ----------
    optimizer : any :mod:`refngd.optim` optimizer (``init`` / ``step``; ``direction`` is
        passed through where the optimizer has one).
    dtype : storage format of the state: ``"bfloat16"`` (default), ``"float16"``,
        ``"float32"`` or ``"float64"``.
    compute : ``"float32"`` (default) or ``"float64"``: the dtype the state is loaded into,
        and θ's dtype.

    Notes
    -----
    ``"bfloat16"`` on NumPy arrays only (CuPy has no bfloat16 dtype); the other formats on
    NumPy and CuPy.  ``LowPrecision(opt, "float64", "float64")`` is ``opt`` exactly (tested).
    """

    _hyper = ("optimizer", "dtype", "compute")

    def __init__(self, optimizer: Optimizer, dtype: str = "bfloat16", compute: str = "float32"):
        if not (hasattr(optimizer, "init") and hasattr(optimizer, "step")):
            raise TypeError(f"optimizer must be a refngd.optim optimizer, got {optimizer!r}.")
        if compute not in COMPUTE_DTYPES:
            raise ValueError(f"compute must be one of {COMPUTE_DTYPES}, got {compute!r}.")
        self.optimizer, self.dtype, self.compute = optimizer, dtype, compute
        self._store_dtype = storage_dtype(dtype)
        self._compute_dtype = compute
        self.name = f"{getattr(optimizer, 'name', type(optimizer).__name__)}@{dtype}"

    def _theta(self, theta: Array) -> Array:
        if self.dtype == "bfloat16" and is_cupy(theta):
            raise TypeError('dtype="bfloat16" runs on NumPy arrays only (CuPy has no bfloat16); '
                            'float16 runs on both.')
        return theta.astype(self._compute_dtype, copy=False)

    def store(self, state: dict) -> dict:
        """The state with every floating-point array rounded to the storage dtype."""
        return _map(state, lambda a: a.astype(self._store_dtype))

    def load(self, state: dict) -> dict:
        """The stored state converted to the compute dtype (exactly: every storage format
        is a subset of float32)."""
        return _map(state, lambda a: a.astype(self._compute_dtype))

    def init(self, theta: Array) -> dict:
        return self.store(self.optimizer.init(self._theta(theta)))

    def step(self, theta: Array, state: dict, model, loss, X: Array, y: Array, rng=None):
        new, new_state, info = self.optimizer.step(self._theta(theta), self.load(state), model,
                                                   loss, X, y, rng=rng)
        return self._theta(new), self.store(new_state), info

    def direction(self, theta: Array, state: dict, model, loss, X: Array, y: Array, rng=None):
        """The wrapped optimizer's ``direction`` from the stored (rounded) state."""
        if not hasattr(self.optimizer, "direction"):
            raise AttributeError(f"{type(self.optimizer).__name__} has no direction().")
        return self.optimizer.direction(self._theta(theta), self.load(state), model, loss, X, y,
                                        rng=rng)

    def hyperparameters(self) -> dict:
        inner = self.optimizer.hyperparameters() if hasattr(self.optimizer, "hyperparameters") \
            else {}
        return {"optimizer": getattr(self.optimizer, "name", repr(self.optimizer)),
                "optimizer_hyperparameters": inner, "dtype": self.dtype, "compute": self.compute}


__all__ = ["LowPrecision", "STORAGE_DTYPES", "COMPUTE_DTYPES", "storage_dtype", "round_to"]
