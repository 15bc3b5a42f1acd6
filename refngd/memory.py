"""Memory planning: estimate the peak memory of a route before allocating it.

The exact curvatures of refngd are exact because they form large things: the R × R Gram
matrix and its factorisation (R = N·K rows), the rows arriving at every parametric layer
(one (N, K, *out_shape) buffer each), and, on the dense routes, U itself (R × P), UᵀU
(P × P) or the stacked matrix [U; √μ I] ((R + P) × P) of the least-squares solve.  Run
over the machine's memory, NumPy swaps or the process is killed, and CuPy raises an
out-of-memory error deep inside a kernel.  Instead, the curvature classes ask this module
first (:func:`check`) and raise :class:`MemoryPlanError`, which says what was needed,
what is free, and the largest batch that fits.

Estimates count the arrays the code allocates (their ``nbytes``), not the allocator's
overhead; they are upper estimates within a small factor of the measured peak (tests
check 0.5–2×, see tests/test_memory.py).

What is compared with the estimate — the *budget* — is, in order of precedence:

1. :func:`set_budget` / the :func:`budget` context manager: a number of bytes, a string
   such as ``"512MB"`` or ``"2GiB"``, or ``"off"`` to disable planning;
2. the environment variable ``REFNGD_MEMORY_BUDGET`` (same values);
3. otherwise the free memory of the device that holds the arrays: for NumPy the
   machine's ``MemAvailable`` (``/proc/meminfo`` on Linux, ``sysconf`` elsewhere;
   no check when neither exists), for CuPy the device's free memory plus the free
   blocks of CuPy's memory pool.
"""
from __future__ import annotations

import contextlib
import math
import os
import re
from typing import Callable

from .backend import get_backend, namespace

ENV_VAR = "REFNGD_MEMORY_BUDGET"
_OFF = ("off", "none", "false", "no", "disable", "disabled")
_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_UNSET = object()
_budget = _UNSET  #: module-level setting (see set_budget); _UNSET defers to the environment


class MemoryPlanError(MemoryError):
    """A route would need more memory than is free (or than the budget allows).

    Attributes: ``what`` (the route), ``needed`` and ``available`` (bytes), ``fits`` (the
    largest batch size N that fits, 0 when none does; ``None`` when not computed),
    ``parts`` (the estimate's breakdown, bytes by name).
    """

    def __init__(self, what: str, needed: int, available: int, source: str, N: int | None,
                 fits: int | None, parts: dict[str, int]):
        self.what, self.needed, self.available, self.fits = what, needed, available, fits
        self.source, self.parts = source, parts
        detail = ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)
        msg = (f"{what} needs about {format_bytes(needed)} ({detail}) but only "
               f"{format_bytes(available)} is available ({source}).")
        if fits is not None and N is not None:
            if fits > 0:
                msg += f" A batch of N = {fits} fits (this one has N = {N}): split the batch."
            else:
                msg += (" No batch size fits: the parameter-dimension part alone is too large; "
                        "use the Gram route or a parameter subset (params=).")
        msg += (f" To plan against another budget set {ENV_VAR} (e.g. '8GB', or 'off' to "
                "disable) or call refngd.memory.set_budget(...).")
        super().__init__(msg)


# ---------------------------------------------------------------------------- budget
def parse_bytes(value) -> int | None:
    """A budget as bytes: an int/float, or a string like ``"1.5GB"``, ``"512MiB"``, ``"2e9"``.

    Returns ``None`` for ``"off"`` (and ``False``); raises ``ValueError`` otherwise.
    """
    if value is False or (isinstance(value, str) and value.strip().lower() in _OFF):
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"a memory budget must be >= 0 bytes, got {value!r}.")
        return int(value)
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-z]*)\s*", value.lower())
        if m and m.group(2) in _UNITS:
            try:
                return int(float(m.group(1)) * _UNITS[m.group(2)])
            except ValueError:
                pass
    raise ValueError(f"cannot read {value!r} as a memory budget; use bytes (an int) or a string "
                     "such as '512MB', '2GiB', or 'off'.")


def set_budget(value=None):
    """Set the memory budget for planning; returns the previous setting.

    ``None``: defer to ``REFNGD_MEMORY_BUDGET`` and then to the free memory (the default);
    ``"off"``: never check; otherwise bytes (int) or a string such as ``"2GB"``.
    """
    global _budget
    previous = None if _budget is _UNSET else _budget
    if value is None:
        _budget = _UNSET
    else:
        parsed = parse_bytes(value)
        _budget = "off" if parsed is None else parsed
    return previous


@contextlib.contextmanager
def budget(value):
    """``with refngd.memory.budget("100MB"): ...`` — :func:`set_budget` for a block."""
    previous = set_budget(value)
    try:
        yield
    finally:
        set_budget(previous)


def free_bytes(xp) -> int | None:
    """Free memory of ``xp``'s device in bytes, or ``None`` when it cannot be read."""
    if xp is not get_backend("numpy"):
        try:
            free, _ = xp.cuda.runtime.memGetInfo()
            return int(free) + int(xp.get_default_memory_pool().free_bytes())
        except Exception:  # pragma: no cover - depends on the device
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:  # other POSIX systems (free pages only: an underestimate of what is reclaimable)
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


def available(xp) -> tuple[int | None, str]:
    """The budget in force and where it comes from; ``(None, ...)`` means: do not check."""
    if _budget is not _UNSET:
        return (None, "planning off") if _budget == "off" else (_budget, "refngd.memory.set_budget")
    env = os.environ.get(ENV_VAR)
    if env is not None and env.strip():
        return parse_bytes(env), ENV_VAR
    device = "the GPU's free memory" if xp is not get_backend("numpy") else "MemAvailable"
    return free_bytes(xp), device


def check(what: str, estimate: Callable[[int], dict[str, int]], N: int | None, xp) -> dict[str, int]:
    """Raise :class:`MemoryPlanError` when ``estimate(N)`` exceeds the budget.

    ``estimate`` maps a batch size to the estimate's parts (bytes by name); it is
    evaluated again by bisection to find the largest batch that fits.  Returns the parts.
    """
    parts = estimate(N)
    need = sum(parts.values())
    avail, source = available(xp)
    if avail is None or need <= avail:
        return parts
    fits = None
    if N is not None:
        lo, hi = 0, N  # need(lo) fits (or lo = 0), need(hi) does not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if sum(estimate(mid).values()) <= avail else (lo, mid)
        fits = lo
    raise MemoryPlanError(what, need, avail, source, N, fits, parts)


def format_bytes(n: float) -> str:
    """``1.5 GB`` style (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n} TB"  # pragma: no cover


# ------------------------------------------------------------------------ estimates
#: float64 bytes: the Gram matrix and every factorisation are float64 (docs/design.md §2)
_F8 = 8


def _layer_plan(model, in_shape: tuple, subset) -> list[tuple]:
    """Per layer of a Sequential: (layer, in_size, out_size, in_shape, out_shape, stored).

    ``stored``: the layer holds selected parameters, so the rows at its output are kept
    (one (N, K, *out_shape) buffer for the RowSet).  Layers before the first stored one
    are not back-propagated through (they are dropped).  What each layer allocates is the
    layer's own estimate (``backward_workspace``, ``gram_workspace``: the layer protocol).
    """
    if hasattr(model, "memory_plan"):  # a GraphModel: its layer nodes in forward order
        return model.memory_plan(tuple(in_shape), subset)
    plan, shape = [], tuple(in_shape)
    for i, layer in enumerate(model.layers):
        out = tuple(layer.out_shape(shape))
        stored = bool(layer.param_shapes) and (subset is None or any(subset.active[i]))
        plan.append((layer, math.prod(shape), math.prod(out), shape, out, stored))
        shape = out
    first = next((i for i, p in enumerate(plan) if p[5]), len(plan))
    return plan[first:]


def gram_route_estimate(model, in_shape: tuple, K: int, itemsize: int, P: int,
                        subset=None, gram: bool = True, C: int | None = None
                        ) -> Callable[[int], dict[str, int]]:
    """Peak bytes of one backward pass of N·K rows and (``gram``) the Gram route, as a
    function of N.

    Parts (bytes):

    * ``rows``: the rows kept at the output of every parametric layer, Σ_l N·K·out_l·s
      (s = the model's itemsize) — the RowSet;
    * ``backward temporaries``: the largest transient of the backward pass: the rows in
      flight and what one layer's backward allocates (``layer.backward_workspace``; Conv2d:
      one block of its product);
    * ``Gram route`` (R = N·K < P only): the R × R float64 Gram matrix and its
      factorisation — K, K + μI (with its identity temporary) and the Cholesky factor,
      4·8·R² — or, while the Gram is being summed, one layer's Gram temporaries
      (``layer.gram_workspace``; Conv2d's per-row gradients on the "materialise" route,
      its block products on the "spatial" one), whichever is larger; the backward
      temporaries are freed by then;
    * ``parameter-space vectors``: the direction Uᵀw and its per-layer blocks, 2·8·P.

    For a model without ``layers`` (:class:`refngd.FunctionModel`) the rows are an
    explicit U (N, K, P) computed from the Jacobian (N, C, P).
    """
    if not hasattr(model, "layers"):
        def est_dense(N):
            parts = {"Jacobian (N, C, P)": N * (C or K) * P * _F8, "rows U (N, K, P)": N * K * P * itemsize}
            if gram and N * K < P:
                parts["Gram matrix and factorisation"] = 4 * (N * K) ** 2 * _F8
            return parts
        return est_dense
    plan = _layer_plan(model, in_shape, subset)
    stored_per_row = sum(p[2] for p in plan if p[5])

    def transient(R: int) -> int:  # elements: rows in flight and one layer's backward
        return max((R * ((0 if stored else out_size) + in_size)
                    + layer.backward_workspace(shape, out, R)
                    for j, (layer, in_size, out_size, shape, out, stored) in enumerate(plan)
                    if j > 0), default=0)  # no cotangent for the first selected layer's input

    def est(N: int) -> dict[str, int]:
        R = N * K
        parts = {"rows' per-layer buffers": R * stored_per_row * itemsize,
                 "backward temporaries": transient(R) * itemsize}
        if gram and R < P:
            summing = R * R * _F8 + max((p[0].gram_workspace(p[3], p[4], N, K, itemsize)
                                         for p in plan if p[5]), default=0)
            factor = 4 * R * R * _F8
            parts["backward temporaries"] = 0  # freed before the Gram is formed
            parts["Gram route"] = max(summing, factor, transient(R) * itemsize)
            parts["parameter-space vectors"] = 2 * P * _F8  # Uᵀw and its per-layer blocks
        return parts
    return est


def dense_estimate(model, K: int, itemsize: int, P: int, route: str, subset=None
                   ) -> Callable[[int], dict[str, int]]:
    """Bytes the dense routes allocate, as a function of N (R = N·K rows).

    ``route``: ``"rows"`` — U (R × P) and one layer's per-row gradients while it is
    filled in (:meth:`RowCurvature.row_matrix`); ``"dense"`` — plus c·UᵀU
    (P × P, the model's dtype; NumPy scales the product in place); ``"factor"`` — U, its float64 copy, F = c UᵀU and its
    factorisation (5 float64 P × P arrays: F, F + λI with its temporary, the factor);
    ``"lstsq"`` — U, its float64 copy, and the QR factorisation of [U; √μ I]
    ((R + P) × P: the stacked matrix, NumPy's working copy and Q, plus R and the
    identity, P × P).
    """
    block = P
    if hasattr(model, "layers"):  # one layer's per-row gradients and their concatenation
        block = max((b - a for a, b in model.layout.layer_slices), default=P)
        block = min(block, P)

    def est(N: int) -> dict[str, int]:
        R = N * K
        cast = (itemsize != _F8) * R * P * _F8
        parts = {"rows U (R x P)": R * P * itemsize}
        if route == "rows" or route == "dense":
            parts["per-row gradient temporaries"] = 2 * R * block * itemsize
        if route == "dense":
            parts["U^T U (P x P)"] = P * P * itemsize  # c·(UᵀU) reuses the temporary
        elif route == "factor":
            parts["float64 copy of U"] = cast
            parts["F and its factorisation (P x P)"] = 5 * P * P * _F8
        elif route == "lstsq":
            parts["float64 copy of U"] = cast
            parts["QR of [U; sqrt(mu) I]"] = (3 * (R + P) * P + 2 * P * P) * _F8
        return parts
    return est


# ------------------------------------------------------------------ hooks for curvatures
def plan_rows(curv, X, K: int) -> None:
    """Check a :class:`~refngd.curvature.base.RowCurvature`'s backward pass of N·K rows and
    (R < P) its Gram route against the budget, before the rows are back-propagated."""
    xp = namespace(curv.theta)
    if available(xp)[0] is None or not hasattr(X, "shape"):
        return
    N = int(curv.outputs.shape[0])
    est = gram_route_estimate(curv.model, tuple(X.shape[1:]), K, curv.theta.dtype.itemsize,
                              curv.num_params, curv.subset, C=int(curv.outputs.shape[1]))
    check(f"the backward pass of R = {N * K} rows and the {N * K} x {N * K} Gram route",
          est, N, xp)


_ROUTE_NAMES = {"rows": "the dense row matrix U", "dense": "the dense P x P curvature",
                "factor": "the P x P factorisation (P <= R route)",
                "lstsq": "the QR least-squares solve (P <= R route)"}


def plan_dense(curv, route: str) -> None:
    """Check a dense route (:func:`dense_estimate`) of a RowCurvature against the budget."""
    xp = namespace(curv.theta)
    if available(xp)[0] is None:
        return
    N, K, P = curv.rows.N, curv.rows.K, curv.num_params
    est = dense_estimate(curv.model, K, curv.theta.dtype.itemsize, P, route, curv.subset)
    check(f"{_ROUTE_NAMES[route]} (R = {N * K}, P = {P})", est, N, xp)


def plan_square(P: int, xp, what: str, largest_block: int = 0) -> None:
    """Check a dense P × P float64 result (K-FAC's and EKFAC's ``dense()``): the matrix, its
    cast to the model's dtype, and the largest block's Kronecker product and eigenbasis."""
    if available(xp)[0] is None:
        return
    check(f"{what} (P = {P})", lambda _: {"P x P matrix and its copy": 2 * P * P * _F8,
                                          "largest Kronecker block": 2 * largest_block ** 2 * _F8},
          None, xp)


#: glibc's largest mmap threshold on 64-bit systems: blocks below it come from the heap
MMAP_THRESHOLD_MAX = 32 << 20


def keep_freed_memory_env(max_bytes: int = 1 << 30) -> dict[str, str]:
    """:func:`keep_freed_memory` as environment variables, for processes started later.

    glibc reads ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_`` when a process
    starts.  The local Dask cluster of ``refngd compare --workers`` spawns its worker
    processes with them (:func:`refngd.experiments.executors.local_cluster`): Dask's nanny
    otherwise starts every worker with ``MALLOC_TRIM_THRESHOLD_=65536``, which also turns
    off glibc's adaptive mmap threshold, and a unit then page-faulted 5× as often as in
    this process and took 1.7× as long (NGD and K-FAC training units, docs/benchmarks.md).
    """
    return {"MALLOC_TRIM_THRESHOLD_": str(_trim_bytes(max_bytes)),
            "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_MAX)}


def _trim_bytes(max_bytes: int) -> int:
    return int(min(max(int(max_bytes), 0), 2**31 - 1))


def keep_freed_memory(max_bytes: int = 1 << 30) -> bool:
    """Opt in: let glibc's malloc keep up to ``max_bytes`` of freed memory for reuse.

    A step of refngd allocates and frees temporaries of megabytes (Gram matrices, row
    blocks, im2col columns).  By default glibc returns freed memory at the top of the
    heap to the operating system as soon as more than about twice the largest recent
    block is free, so the next step touches fresh pages again: a page fault every 4 KiB,
    which was measured to make the exact NGD step of the 1.86 M-parameter MLP 1.3–1.5×
    slower on the 2-core VM (docs/benchmarks.md).  This sets malloc's trim threshold to
    ``max_bytes`` and its mmap threshold to glibc's maximum (32 MiB), for the whole
    process: freed memory then stays with the process (its resident size stays at its
    peak) and is reused.  The same as the environment variables ``MALLOC_TRIM_THRESHOLD_``
    and ``MALLOC_MMAP_THRESHOLD_``.  Linux with glibc only; returns whether it applied.
    refngd never calls it in your process; the planner's estimates are unaffected.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return (bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX))
            and bool(mallopt(M_TRIM_THRESHOLD, _trim_bytes(max_bytes))))
