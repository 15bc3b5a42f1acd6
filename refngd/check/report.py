"""``compare(candidate, reference)``: errors per block and a diagnosis of the mismatch.

A candidate (your implementation's number) is judged against a reference (refngd's)
block by block — a layer's weight or bias, a K-FAC factor — with the relative error
‖c − r‖/‖r‖, the largest absolute error and the cosine.  When a block fails, the
diagnosis names the recognisable causes that libraries and users actually get wrong:

* a clean constant factor c = α·r, named when α is 2, ½, √2, N, 1/N, C, K, T, N·T, N², …
  (the MSE's ½ convention, sum vs mean, an averaged mean, MC samples, conv locations);
* a sign flip (α = −1);
* row- vs column-major vec(W) — for a P × P block the same permutation turns G ⊗ A into
  A ⊗ G, so both readings are named;
* a bias row/column too many or missing (joint ā = [a; 1] vs a separate bias), first
  instead of last;
* a transposed matrix;
* equality with a named alternative the caller supplies (the EF where a Fisher was
  meant, ``reduce`` where ``expand`` was meant, the "tutorial" K-FAC, …);
* one block wrong while the others are right.

Everything is computed on the host in float64: this is a reporting module.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..backend import to_numpy

__all__ = ["compare", "Report", "BlockResult", "default_rtol", "split_blocks"]

_SHAPES = re.compile(r"for a \(\d+, \d+\) weight")

#: default relative tolerances by the candidate's dtype; ~1e3·ε covers the round-off of
#: the GEMMs, Cholesky and eigendecompositions in both the candidate and the reference
_RTOL = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-4}


def default_rtol(dtype) -> float:
    """1e-10 for float64, 1e-4 for float32 (about 10⁶·ε₆₄ and 10³·ε₃₂)."""
    dt = np.dtype(dtype)
    if dt not in _RTOL:
        raise TypeError(f"candidates must be float64 or float32 arrays, got {dt}.")
    return _RTOL[dt]


@dataclass
class BlockResult:
    """One block's verdict: errors, cosine and (when it fails) the diagnosis."""

    name: str
    shape: tuple
    rel_error: float
    max_abs: float
    cosine: float
    passed: bool
    diagnosis: str | None = None
    #: this block's own tolerance (a Monte-Carlo block's), or None: the report's
    rtol: float | None = None


@dataclass
class Report:
    """The result of :func:`compare`.  ``passed``, ``diagnosis`` (a sentence or None), ``str()``."""

    blocks: list
    rtol: float
    rtol_reason: str
    quantity: str | None = None
    notes: list = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.blocks)

    @property
    def failed(self) -> list:
        return [b for b in self.blocks if not b.passed]

    @property
    def diagnosis(self) -> str | None:
        bad = self.failed
        if not bad:
            return None
        known = [b for b in bad if b.diagnosis]
        if len(bad) == 1 and len(self.blocks) > 1:
            what = bad[0].diagnosis or "no recognisable cause (compare the numbers)"
            return f"only block {bad[0].name!r} is wrong, the other {len(self.blocks) - 1} match: {what}."
        if known and len(known) == len(bad) and len({b.diagnosis for b in bad}) == 1:
            return bad[0].diagnosis + "."
        causes = {_SHAPES.sub("for each weight", b.diagnosis or "") for b in bad}
        if known and len(known) == len(bad) and len(causes) == 1:
            return f"{causes.pop()}, in blocks {', '.join(b.name for b in bad)}."
        if not known:
            return None
        groups: dict = {}  # one entry per cause: a layer's moved scalar names both factors
        for b in bad:
            groups.setdefault(b.diagnosis or "no recognisable cause", []).append(b.name)
        return "; ".join(d if d.startswith("layer ") else f"{', '.join(names)}: {d}"
                         for d, names in groups.items()) + "."

    def __str__(self) -> str:
        head = f"refngd check{' — ' + self.quantity if self.quantity else ''}"
        w = max([len(b.name) for b in self.blocks] + [5])
        lines = [head, f"{'block':{w}s}  {'shape':>12s}  {'rel. error':>10s}  {'max |Δ|':>10s}  "
                       f"{'cosine':>9s}  verdict"]
        for b in self.blocks:
            lines.append(f"{b.name:{w}s}  {str(b.shape):>12s}  {b.rel_error:10.3e}  {b.max_abs:10.3e}  "
                         f"{b.cosine:9.6f}  {'ok' if b.passed else 'MISMATCH'}".replace("      nan", "        —"))
        own = [b for b in self.blocks if b.rtol is not None]
        if own:
            lines.append("tolerance per block: " + ", ".join(f"{b.name} <= {b.rtol:.2g}"
                                                             for b in own))
            lines.append(f"({self.rtol_reason}; other blocks: relative error <= {self.rtol:.1e})")
        else:
            lines.append(f"tolerance: relative error <= {self.rtol:.1e} ({self.rtol_reason})")
        lines += list(self.notes)
        if self.passed:
            lines.append("PASSED")
        else:
            lines.append("FAILED" + (f": {self.diagnosis}" if self.diagnosis else
                                     ": no recognisable cause; compare the numbers above."))
        return "\n".join(lines)


# --------------------------------------------------------------------------- helpers
def _host(name: str, a) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor: no torch import needed here
        from .torch_arrays import no_numpy_dtype

        no_numpy_dtype(a, name)
        a = a.detach().cpu().numpy()
    if isinstance(a, float):  # a scalar quantity such as γ
        a = np.float64(a)
    a = to_numpy(a)
    if a.dtype not in (np.float64, np.float32):
        raise TypeError(f"{name} must be a float64 or float32 array, got dtype {a.dtype}; "
                        "convert it first (NumPy: .astype(np.float64); torch: .double() or "
                        ".float()).")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or Inf; nothing meaningful can be compared.")
    return a


def _rel(c: np.ndarray, r: np.ndarray, scale: float) -> float:
    return float(np.linalg.norm(c - r)) / scale if scale > 0 else float(np.linalg.norm(c - r) > 0) * math.inf


def _close(c: np.ndarray, r: np.ndarray, tol: float) -> bool:
    n = float(np.linalg.norm(r))
    return n > 0 and c.shape == r.shape and float(np.linalg.norm(c - r)) <= tol * n


def _scalar_fit(c: np.ndarray, r: np.ndarray, tol: float):
    """α with c ≈ α r to relative tolerance ``tol`` (least squares), else None."""
    rr = float((r * r).sum())
    if rr == 0 or c.shape != r.shape:
        return None
    alpha = float((c * r).sum()) / rr
    if alpha != 0 and float(np.linalg.norm(c - alpha * r)) <= tol * abs(alpha) * math.sqrt(rr):
        return alpha
    return None


def _block_context(context: Mapping | None, key: str) -> dict:
    """The context for one block: a value given as a mapping is looked up by block name."""
    out = {}
    for k, v in (context or {}).items():
        v = v.get(key) if isinstance(v, Mapping) else v
        if v is not None:
            out[k] = v
    out["block"] = key
    return out


#: what a scalar T (the positions sharing a weight) means, by the factor it multiplies.  A
#: scalar alone is never expand vs reduce: those differ by more than a scalar (the
#: alternatives name them when the candidate equals the other one).
_T_WHY = {
    "A": "the positions sharing the weight (a Conv2d's output locations): A summed over the T "
         "locations where refngd averages, 1/(N·T) Σ_{n,t} ā ā ᵀ (or the reverse)",
    "G": "the positions sharing the weight (a Conv2d's output locations): G averaged over the T "
         "locations where refngd sums Σ_t b bᵀ (or the reverse)",
    "": "the positions sharing the weight (a Conv2d's output locations): a sum over the T "
        "locations where refngd averages, or the reverse",
}


def _constants(context: Mapping | None) -> list:
    """(value, name, explanation) of the factors worth naming, from N, C, K, T in context."""
    ctx = {k: v for k, v in (context or {}).items() if isinstance(v, (int, float)) and v > 1}
    if (context or {}).get("loss", "MSELoss") == "MSELoss":
        out = [(2.0, "2", "the MSE's factor 2 (a ½‖z − y‖² convention, Gaussian variance 1 instead of ½)"),
               (4.0, "4", "the MSE's factor 2 applied twice (e.g. in both e_n and the Hessian)"),
               (math.sqrt(2), "√2", "the MSE's Hessian square root √2·I taken as I")]
    else:
        out = [(2.0, "2", "a term counted twice (or a ½ missing)"), (4.0, "4", "a factor 2 applied twice"),
               (math.sqrt(2), "√2", "a square root of 2 in the rows (a Hessian factor)")]
    why = {"N": "the batch size: sum vs mean reduction, or a mean-reduced loss averaged again",
           "C": "the output dimension: MSE/BCE 'mean' divides by N·C, a per-sample mean only by N",
           "K": "the number of Monte-Carlo samples: a missing 1/K (or 1/√K on the rows)",
           "T": _T_WHY.get(str((context or {}).get("block", "")).rsplit(".", 1)[-1],
                           _T_WHY[""])}
    for k in ("N", "C", "K", "T"):
        if k in ctx:
            out.append((float(ctx[k]), f"{k} = {ctx[k]:g}", why[k]))
    if "N" in ctx:
        out.append((float(ctx["N"]) ** 2, f"N² = {ctx['N'] ** 2:g}",
                    "the batch size squared: a mean-reduced loss back-propagated, then averaged over N"))
        for k in ("T", "C"):
            if k in ctx:
                out.append((float(ctx["N"] * ctx[k]), f"N·{k} = {ctx['N'] * ctx[k]:g}",
                            f"the batch size times {k}: " + why[k].split(":")[0]))
    full = []
    for v, n, e in out:
        full.append((v, n, e))
        full.append((1 / v, f"1/{n.split(' = ')[0]}" + (f" = 1/{n.split(' = ')[1]}" if " = " in n else ""), e))
    return full


def _window(tol: float) -> float:
    """How far a fitted scalar may be from a named constant: 10 × a round-off tolerance,
    the tolerance itself where it is a statistical one (a Monte-Carlo block's, ≥ 1e-3)."""
    return tol if tol >= 1e-3 else max(10 * tol, 1e-9)


def _hits(a: float, tol: float, context) -> list:
    """(distance, name, explanation) of the named constants within reach of |α| = a, best first."""
    return sorted((abs(a / v - 1), n, e) for v, n, e in _constants(context)
                  if abs(a / v - 1) <= _window(tol))


def _name_factor(alpha: float, tol: float, context) -> str:
    if abs(alpha + 1) <= _window(tol):
        return "a sign flip (candidate = −reference): an update or gradient with the opposite sign"
    sign = "−" if alpha < 0 else ""
    hits = _hits(abs(alpha), tol, context)
    if not hits:
        return f"a constant factor {alpha:.6g} (candidate = {alpha:.6g} × reference), not a factor refngd recognises"
    names = " or ".join(f"{sign}{n}" for _, n, _ in hits)
    return f"a constant factor {names} (candidate = {alpha:.6g} × reference): {hits[0][2]}"


def _moved_scalars(results: list, cand: dict, ref: dict, context, rtol: float) -> None:
    """One layer's A and G off by reciprocal scalars: the same K-FAC block — say so.

    A candidate with A × s and G × 1/s (A averaged over the T locations and G summed over
    them where refngd does the reverse, say) has the same G ⊗ A.  Both blocks get one
    sentence, which :attr:`Report.diagnosis` then gives once per layer.
    """
    by = {b.name: b for b in results}
    for name, bA in by.items():
        layer = name[:-2]
        bG = by.get(layer + ".G")
        if not name.endswith(".A") or bG is None or bA.passed or bG.passed \
                or cand[bG.name].shape != ref[bG.name].shape:
            continue
        cA, rA = cand[name].astype(np.float64), ref[name].astype(np.float64)
        extra = cA.ndim == 2 and cA.shape[0] - rA.shape[0]
        if abs(extra) == 1:  # joint vs separate bias: compare the weight part
            cA, rA = (cA[:-1, :-1], rA) if extra > 0 else (cA, rA[:-1, :-1])
        elif cA.shape != rA.shape:
            continue
        tol = max(rtol, bA.rtol or 0.0, bG.rtol or 0.0)
        aA = _scalar_fit(cA, rA, tol)
        aG = _scalar_fit(cand[bG.name].astype(np.float64), ref[bG.name].astype(np.float64), tol)
        if aA is None or aG is None or aA <= 0 or abs(aA * aG - 1) > _window(tol):
            continue
        s = max(aA, 1 / aA)
        hits = _hits(s, tol, _block_context(context, name))
        what = hits[0][1] if hits else f"{s:.6g}"
        src, dst = ("G", "A") if aA > 1 else ("A", "G")
        col = "a joint bias column too many" if extra > 0 else "the joint bias column missing"
        same = (f"apart from the bias column (joint vs separate bias: {col}), the same K-FAC "
                "block G ⊗ A" if extra else "the same K-FAC block G ⊗ A")
        text = (f"layer {layer!r}: {same} — a factor {what} moved from {src} to {dst} "
                f"(A × {aA:.6g}, G × {aG:.6g}); the K-FAC matrix and its Tikhonov- and "
                "trace-π-damped (pi='trace') updates are unchanged by the move, damping with a "
                "fixed π or per-factor damping is not")
        bA.diagnosis = bG.diagnosis = text


def _factorisations(n: int, layout) -> list:
    if layout is not None:
        return [tuple(layout)]
    return [(p, n // p) for p in range(2, n) if n % p == 0 and n // p > 1]


def _vec_perm(p: int, q: int) -> np.ndarray:
    """For each row-major index i·q + j of a (p, q) matrix, its column-major index j·p + i."""
    return np.arange(p * q).reshape(q, p).T.reshape(-1)


def _structural(c: np.ndarray, r: np.ndarray, tol: float, context, layout) -> str | None:
    """Same-shape causes beyond a scalar: transposed vec / Kronecker order, transposition."""
    sq = r.ndim == 2 and r.shape[0] == r.shape[1]
    n = r.shape[-1]
    for p, q in _factorisations(n, layout):
        if p * q != n:
            continue
        perm = _vec_perm(p, q)  # candidate index (column-major) of each row-major entry
        c2 = c[np.ix_(perm, perm)] if sq else c[..., perm]
        alpha = _scalar_fit(c2, r, tol)
        if alpha is not None:
            extra = "" if abs(alpha - 1) <= 10 * tol else f", and {_name_factor(alpha, tol, context)}"
            if sq:
                return (f"column-major instead of row-major vec(W) for a ({p}, {q}) weight — "
                        f"equivalently A ⊗ G in place of G ⊗ A (PyTorch order needs G ⊗ A){extra}")
            return f"column-major instead of row-major vec(W) for a ({p}, {q}) weight{extra}"
    if sq and not np.allclose(r, r.T, rtol=0, atol=tol * float(np.abs(r).max())):
        if _close(c.T, r, tol):
            return "the transpose of the reference"
    return None


def _rest(c: np.ndarray, r: np.ndarray, tol: float, context) -> str:
    """How the matching part of a factor differs, once the extra/missing column is set aside."""
    if _close(c, r, tol):
        return ""
    alpha = _scalar_fit(c, r, tol)
    if alpha is not None:
        return f"; without that column, {_name_factor(alpha, tol, context)}"
    return "; the rest differs too (no recognisable cause: compare it after removing the column)"


def _shape_cause(c: np.ndarray, r: np.ndarray, tol: float, context=None) -> str:
    """Shapes differ: a bias row/column too many or missing, a transpose, a reshape.

    ``context["has_bias"]`` (the layer's, when known) decides between "joint vs separate
    bias" — a layer with a bias — and "a bias column where none belongs".
    """
    has_bias = (context or {}).get("has_bias")
    if c.ndim == 2 and r.ndim == 2 and c.shape[0] == c.shape[1] and r.shape[0] == r.shape[1]:
        d, e = c.shape[0], r.shape[0]
        if d == e + 1:
            if _close(c[1:, 1:], r, tol) and not _close(c[:-1, :-1], r, tol):
                return "one row/column too many, first: a bias column placed first, where it has none"
            if has_bias is False:
                return (f"one row/column too many ({d} vs {e}): a bias column (joint ā = [a; 1]) "
                        "where the layer has no bias" + _rest(c[:-1, :-1], r, tol, context))
            return ("one row/column too many, last: a joint bias (ā = [a; 1]) where the reference "
                    "keeps the bias separate — joint vs separate bias (bias='joint' vs "
                    "'separate')" + _rest(c[:-1, :-1], r, tol, context))
        if e == d + 1:
            if _close(c, r[1:, 1:], tol) and not _close(c, r[:-1, :-1], tol):
                return "the bias row/column is missing (the reference has it first)"
            return ("the bias row/column is missing: the reference is joint (ā = [a; 1], last), "
                    "the candidate has no bias column — joint vs separate bias"
                    + _rest(c, r[:-1, :-1], tol, context))
    if c.shape == r.shape[::-1] and c.ndim == 2 and _close(c.T, r, tol):
        return f"the transpose of the reference (shape {c.shape} instead of {r.shape})"
    if c.size == r.size and _close(c.reshape(r.shape), r, tol):
        return f"the right numbers in shape {c.shape} instead of {r.shape}"
    return f"shape {c.shape} does not match the reference's {r.shape}"


def _diagnose(c, r, tol, context, layout, alternatives: Mapping) -> str | None:
    if c.shape != r.shape:
        cause = _shape_cause(c, r, tol, context)
        for name, alt in alternatives.items():
            if alt is not None and alt.shape == c.shape and _close(c, alt, tol):
                return f"{cause} — the candidate equals {name}"
        return cause
    for name, alt in alternatives.items():
        if alt is not None and _close(c, alt, tol):
            return f"the candidate equals {name}"
    if not np.any(c):
        return ("the candidate is zero here: a block left out (e.g. block-diagonal where the full "
                "matrix was meant, or a layer skipped)")
    if not np.any(r):
        return ("the reference is zero here but the candidate is not: e.g. cross-layer (off-diagonal) "
                "entries where the approximation is block-diagonal, or entries for a frozen layer")
    alpha = _scalar_fit(c, r, tol)
    if alpha is not None:
        return _name_factor(alpha, tol, context)
    cause = _structural(c, r, tol, context, layout)
    if cause:
        return cause
    for name, alt in alternatives.items():
        beta = _scalar_fit(c, alt, tol) if alt is not None else None
        if beta is not None:
            return f"the candidate equals {name}, times {beta:.6g} ({_name_factor(beta, tol, context)})"
    return None


def split_blocks(name: str, a, blocks) -> dict:
    """name → host float array: a mapping as given, else ``a`` split by ``blocks`` (θ slices;
    a P × P matrix gives its diagonal blocks and the off-diagonal rest)."""
    if isinstance(a, Mapping):
        return {str(k): _host(f"{name}[{k!r}]", v) for k, v in a.items()}
    arr = _host(name, a)
    if blocks is None:
        return {"all": arr}
    out = {}
    sq = arr.ndim == 2 and arr.shape[0] == arr.shape[1]
    mask = np.ones(arr.shape, dtype=bool) if sq else None
    for key, sl in blocks.items():
        s = sl if isinstance(sl, slice) else slice(*sl)
        out[key] = arr[s, s] if sq else arr[..., s]
        if sq:
            mask[s, s] = False
    if sq and mask.any():  # a P × P matrix: the cross-layer blocks are checked too
        out["off-diagonal"] = np.where(mask, arr, 0.0).astype(arr.dtype)
    return out


# --------------------------------------------------------------------------- compare
def compare(candidate, reference, *, blocks: Mapping | None = None, rtol: float | None = None,
            context: Mapping | None = None, layouts: Mapping | None = None,
            alternatives: Mapping | None = None, quantity: str | None = None,
            rtol_reason: str | None = None, block_rtol: Mapping | None = None) -> Report:
    """Compare a candidate with a reference, block by block, and diagnose a mismatch.

    Parameters
    ----------
    candidate, reference : arrays of one shape (NumPy, CuPy or torch), or mappings
        name → array (e.g. K-FAC factors ``{"0.A": ..., "0.G": ...}``) with the same keys.
    blocks : optional name → slice (or (start, stop)) of θ: splits a (P,) vector, the last
        axis of an (N, P) array, or the diagonal blocks of a (P, P) matrix.
    rtol : relative-error tolerance; default by the candidate's dtype (:func:`default_rtol`).
    context : sizes used to name constant factors, ``{"N": 8, "C": 3, "K": 1, "T": 16}``
        (a value may be a mapping block name → value, e.g. T per layer), and ``"loss"``, the
        loss's class name (the factor-2 hints speak of the MSE only for ``"MSELoss"``).
    layouts : name → (d_out, d_in) of a weight block, for the row/column-major vec test
        (without it every factorisation of the block's length is tried).
    alternatives : description → array (or mapping like ``reference``) of known wrong
        answers, e.g. ``{"the empirical Fisher (EF) where the Fisher was meant": EF}``.
    quantity, rtol_reason : labels for the report.
    block_rtol : name → a block's own tolerance, used where it exceeds ``rtol`` (the
        statistical tolerance of a Monte-Carlo block, :mod:`refngd.check.montecarlo`).

    Returns
    -------
    :class:`Report` — ``passed``, ``diagnosis``, ``blocks`` and a readable ``str()``.
    """
    cand = split_blocks("candidate", candidate, blocks)
    ref = split_blocks("reference", reference, blocks)
    if set(cand) != set(ref):
        missing, extra = sorted(set(ref) - set(cand)), sorted(set(cand) - set(ref))
        raise ValueError(f"candidate blocks do not match the reference's: missing {missing}, "
                         f"unexpected {extra}; expected keys {sorted(ref)}.")
    alts = {k: split_blocks("alternative", v, blocks) for k, v in (alternatives or {}).items()}
    if rtol is None:
        worst = max((a.dtype for a in cand.values()), key=lambda d: _RTOL[np.dtype(d)])
        rtol = default_rtol(worst)
        rtol_reason = rtol_reason or f"{np.dtype(worst).name} candidate"
    total = math.sqrt(sum(float((r.astype(np.float64) ** 2).sum()) for r in ref.values()))
    results = []
    for key, r in ref.items():
        c = cand[key].astype(np.float64)
        r = r.astype(np.float64)
        if c.shape != r.shape:
            diag = _diagnose(c, r, rtol, _block_context(context, key), None,
                             {n: a.get(key) for n, a in alts.items()})
            results.append(BlockResult(key, tuple(c.shape), math.inf, math.inf, float("nan"), False, diag))
            continue
        nr = float(np.linalg.norm(r))
        err = _rel(c, r, nr if nr > 0 else total)
        nc = float(np.linalg.norm(c))
        cos = float((c * r).sum()) / (nc * nr) if nc > 0 and nr > 0 else float("nan")
        own = (block_rtol or {}).get(key)
        tol = rtol if own is None else max(rtol, float(own))
        ok = err <= tol
        diag = None
        if not ok:
            diag = _diagnose(c, r, tol, _block_context(context, key), (layouts or {}).get(key),
                             {n: a.get(key) for n, a in alts.items()})
        results.append(BlockResult(key, tuple(r.shape), err, float(np.abs(c - r).max(initial=0.0)),
                                   cos, ok, diag, None if own is None else tol))
    _moved_scalars(results, cand, ref, context, float(rtol))
    return Report(results, float(rtol), rtol_reason or "given", quantity)
