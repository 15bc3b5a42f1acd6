"""``infer``: the convention of a candidate of unknown provenance (docs/validating.md §12).

``validate`` answers "is this refngd's value under the options I name?".  A user holding
another implementation's number often cannot name them: which Fisher rows, which bias
treatment, which damping, and which bookkeeping scalars (a mean averaged again, factors
from already-averaged gradients, an EMA started from zero).  :func:`infer` searches that
space and returns the simplest convention that reproduces the candidate.

The search is organised so that nothing expensive is repeated:

1. **option sets** — every combination of the options ``validate`` takes that changes the
   quantity (``fisher_type``, ``bias``, ``kfac_approx`` where a layer shares its weight,
   the factor rules of the ``"tutorial"`` and ``"backpack"`` presets, an EF/iEF ``form``),
   minus those the user fixes with ``**known`` and those whose shapes cannot match.  refngd's
   value (or its eigendecomposition) is computed *once* per option set, on one shared
   linearisation, so A factors are shared between sets (``INPUT_FACTORS``);
2. **scalars in closed form** — per block (a K-FAC factor, a layer's block, or the whole
   quantity for the exact curvatures) the least-squares ratio α = ⟨c, r⟩/⟨r, r⟩, named as
   a monomial in N, T, C, K, 2 and (1 − β) (:mod:`refngd.check.scalars`); the residual is
   computed with the *named* value, so a name is accepted only if it reproduces the
   candidate;
3. **damping** (updates) — the damping is fitted by linear least squares in the
   eigenbasis of each factor pair, for every damping rule at once, then named and checked
   exactly (:mod:`refngd.check.infer_damping`).  A layer whose candidate is a multiple
   of its gradient within ``rtol`` has a damping that swamps its curvature (eigenvalues ×
   scale below tolerance × damping): only scale/damping is determined there, and that
   ratio alone is named (``"scale/damping"``; ``"damping"`` is ``"undetermined"``);
4. **presets** — the winner is compared once with each preset of
   :mod:`refngd.conventions` under the same options: a preset that reproduces it with no
   scalar names the convention (``"tutorial"``, ``"asdl"``, …).

Among the conventions that fit (every block within ``rtol``, every scalar named), the one
with the fewest changes from refngd's defaults wins; the others are ``alternatives``.  A
float64 candidate that fits only to float32 round-off (≤ 1e-4) passes with
``"arithmetic": "float32"``.

refngd's values are computed through :mod:`refngd.backend` (NumPy or CuPy); the fits,
names and verdict then run on host copies in float64, as :mod:`refngd.check.report` judges
candidates.
"""
from __future__ import annotations

import math

import numpy as np

from . import scalars
from .infer_report import Fit, InferenceReport, assemble, moved_scalars, summarise
from .infer_options import validate_options
from .infer_search import Search
from .infer_update import KFAC_QUANTITIES, UpdateFits, _rel, _shapes
from .quantities import QUANTITIES
from .report import _host, default_rtol, split_blocks

__all__ = ["infer", "Inference", "InferenceReport", "KNOWN"]

#: the options ``**known`` may fix (refngd's names, refngd.options) and the EMA's β
KNOWN = ("fisher_type", "bias", "kfac_approx", "damping_mode", "pi", "damping_split", "form",
         "convention", "mc_samples", "ema_beta")
#: float32 round-off in a float64 candidate: fits within this, not within float64's
FLOAT32_RTOL = default_rtol(np.float32)


def infer(model, loss, X, y, quantity: str, candidate, damping=None, *, rtol: float | None = None,
          labels=None, theta=None, v=None, **known) -> InferenceReport:
    """The convention under which refngd reproduces ``candidate`` — found, not assumed.

    Parameters
    ----------
    model, loss, X, y, quantity, candidate, damping, labels, theta, v : as
        :func:`refngd.check.validate` (a torch module or a ``(model, θ)`` pair, the loss,
        the batch, a name of ``refngd.check.QUANTITIES`` except ``gamma``, your value; λ
        — or (λ_A, λ_G) — for an update; your sampled targets for Monte-Carlo rows).
    rtol : tolerance on a block's relative error (default by the candidate's dtype).
    **known : options you know (``fisher_type="empirical"``, ``bias="joint"``, …, any of
        :data:`KNOWN`; ``ema_beta`` the β of your running averages): the search keeps them.

    Returns
    -------
    :class:`InferenceReport` — ``passed``, ``convention``, ``residual``, ``alternatives``,
    ``differing`` and ``summary``.

    Notes
    -----
    The search space and the ranking are in the module docstring.  Scalars are monomials
    N^a T^b C^c K^d 2^e (1 − β)^k with |a| ≤ 3, |b| ≤ 5, |c|, |e| ≤ 2, |d| ≤ 1, |k| ≤ 2; the damping
    rules are those of :mod:`refngd.curvature.damping` (Tikhonov; factored with π = trace,
    Martens & Grosse 2015, §6.3, or a fixed π — λ/T per location included; per-factor; a
    separate bias damped with its weight's π, as curvlinops), each with the map λ' = s·λ.
    """
    return Inference(model, loss, X, y, labels=labels, theta=theta, v=v, **known).infer(
        quantity, candidate, damping, rtol=rtol)


class Inference(UpdateFits):
    """:func:`infer` for many candidates on one model and batch (factorisations kept).

    ``Inference(model, loss, X, y, **known).infer(quantity, candidate, damping)`` equals
    :func:`infer`; the K-FAC objects, eigendecompositions and dense matrices computed for
    one candidate are reused for the next.
    """

    def __init__(self, model, loss, X, y, *, labels=None, theta=None, v=None, **known):
        bad = sorted(set(known) - set(KNOWN))
        if bad:
            raise TypeError(f"infer() does not know the option(s) {bad}; known options are "
                            f"{', '.join(KNOWN)}.")
        self.known = dict(known)
        if "damping_mode" in known and ({"pi", "damping_split"} & set(known)):
            from ..options import DAMPING_SPLIT, PI, check_unused_damping_options

            check_unused_damping_options(known["damping_mode"], known.get("pi", PI),
                                         known.get("damping_split", DAMPING_SPLIT))
        if known.get("fisher_type") == "mc" and labels is None:
            raise ValueError("fisher_type='mc' without labels=: infer compares exactly, so pass "
                             "the labels your code sampled (for a statistical check of an MC "
                             "quantity use check.validate(..., fisher_type='mc')).")
        self.search = Search(model, loss, X, y, labels, theta, known, v)
        self._theta, self._v, self._f32 = theta, v, False

    # ------------------------------------------------------------------ entry point
    def infer(self, quantity: str, candidate, damping=None, rtol: float | None = None
              ) -> InferenceReport:
        if quantity not in QUANTITIES or quantity == "gamma":
            raise ValueError(f"infer() takes an array quantity, one of "
                             f"{', '.join(q for q in QUANTITIES if q != 'gamma')}; got "
                             f"{quantity!r} (check γ with check.validate).")
        if quantity == "sampled_fisher" and self.search.labels is None:
            raise ValueError("sampled_fisher is random: pass labels= (the targets your code "
                             "sampled) so that infer can compare exactly, or check it with "
                             "check.validate's statistical tolerance.")
        update = quantity.endswith("_update")
        if update and damping is None:
            raise ValueError(f"{quantity} is an update: pass damping= (the λ your code used, or "
                             "(λ_A, λ_G) for per-factor damping).")
        damping = _damping(damping)
        if isinstance(damping, tuple) and (quantity not in KFAC_QUANTITIES[3:] or
                                           self.known.get("damping_mode",
                                                          "per-factor") != "per-factor"):
            raise ValueError(
                f"damping={damping!r}: a pair (λ_A, λ_G) is per-factor damping of a K-FAC or "
                f"EKFAC update (kfac_update, ekfac_update; damping_mode='per-factor'), not of "
                f"{quantity}" + (f" with damping_mode={self.known['damping_mode']!r}"
                                 if "damping_mode" in self.known else "") + "; pass one λ.")
        cand = ({str(k): _host(f"candidate[{k!r}]", v) for k, v in candidate.items()}
                if isinstance(candidate, dict) else _host("candidate", candidate))
        dtypes = [a.dtype for a in (cand.values() if isinstance(cand, dict) else [cand])]
        f32 = self._f32 = any(d == np.float32 for d in dtypes)
        tol = float(rtol) if rtol is not None else default_rtol(np.float32 if f32 else np.float64)
        def search(tol):
            return (self._update_fits(quantity, cand, damping, tol) if update
                    else self._scalar_fits(quantity, cand, tol))

        self._aliases: dict = {}
        fits, arithmetic = search(tol), None
        if not fits:
            raise ValueError(f"no option set of {quantity} has the candidate's shapes "
                             f"({_shapes(cand)}); check the quantity's layout "
                             "(check.validate describes it).")
        if not f32 and rtol is None and not any(f.fits(tol) for f in fits):
            loose = search(FLOAT32_RTOL)  # float32 round-off inside a float64 candidate?
            if any(f.fits(tol) for f in loose):
                # a name found only in the wider window (a damping the data pin down
                # loosely) whose exact value reproduces the candidate to float64: no float32
                fits = loose
            elif any(f.fits(FLOAT32_RTOL) for f in loose):
                fits, tol, arithmetic = loose, FLOAT32_RTOL, "float32"
        return self._report(quantity, cand, fits, tol, arithmetic, damping)

    # ------------------------------------------------------------------ scalar quantities
    def _scalar_fits(self, quantity: str, cand, tol: float) -> list:
        s = self.search
        out = []
        for opts in s.option_sets(quantity):
            ref = s.value(quantity, opts)
            if ref is None:
                continue
            fit = self._fit_scalars(quantity, cand, ref, opts, tol)
            if fit is not None:
                out.append(fit)
        return out

    def _fit_scalars(self, quantity, cand, ref, opts, tol):
        s = self.search
        if quantity == "kfac_factors":
            if not isinstance(cand, dict) or set(cand) != set(ref):
                if not isinstance(cand, dict):
                    raise ValueError("kfac_factors: the candidate is a dict {'<layer>.A': A, "
                                     "'<layer>.G': G, ...} (layer names as named_parameters).")
                raise ValueError(f"kfac_factors: candidate keys {sorted(cand)} do not match "
                                 f"the layers' {sorted(ref)}.")
            cb, rb = cand, ref
            groups = {k: [k] for k in rb}
        else:
            if isinstance(cand, dict):
                raise ValueError(f"{quantity}: the candidate is one array, not a dict.")
            if cand.shape != np.shape(ref):
                return None
            per_layer = quantity in ("kfac", "ekfac")
            blocks = s.layer_slices() if per_layer else s.param_blocks()
            cb, rb = split_blocks("c", cand, blocks), split_blocks("r", np.asarray(ref), blocks)
            groups = ({k: [k] for k in rb if k != "off-diagonal"} if per_layer
                      else {"all": list(rb)})
        if any(cb[k].shape != np.shape(rb[k]) for k in rb):
            return None
        total = math.sqrt(sum(float(np.sum(np.square(c, dtype=np.float64))) for c in cb.values()))
        named, unnamed, resid, repro, cx = {}, {}, {}, {}, 0.0
        seen = set()
        for g, keys in groups.items():
            c = np.concatenate([cb[k].astype(np.float64).ravel() for k in keys])
            r = np.concatenate([np.asarray(rb[k], dtype=np.float64).ravel() for k in keys])
            rr = float(r @ r)
            alpha = float(c @ r) / rr if rr > 0 else 0.0
            value, label, comp = self._name_scalar(alpha, c, r, s.ctx(g), tol)
            if label is None:
                unnamed[g] = alpha
                label = f"{alpha:.6g}"
            elif label not in seen:
                cx += comp
                seen.add(label)
            named[g] = label
            for k in keys:
                rk = value * np.asarray(rb[k], dtype=np.float64)
                repro[k] = rk
                resid[k] = _rel(cb[k].astype(np.float64), rk, total)
        for k in rb:
            if k not in repro:  # off-diagonal blocks: zero under a block-diagonal curvature
                repro[k] = np.asarray(rb[k], dtype=np.float64)
                resid[k] = _rel(cb[k].astype(np.float64), repro[k], total)
        labels = set(named.values())
        scale = labels.pop() if len(labels) == 1 else named
        return Fit(dict(opts), {"scale": scale}, resid, assemble(quantity, repro, ref, s),
                   s.complexity(opts) + cx, unnamed)

    def _name_scalar(self, alpha, c, r, ctx, tol, ema: bool = True):
        """(value, name, complexity) of the simplest monomial that reproduces c ≈ α r.

        Other names of the same number about as simple (sizes that coincide: N = C = 4
        makes 1/N also 1/C and 1/2²) are kept in ``self._aliases`` for the report.
        ``ema=False``: no (1 − β)^k in the name.
        """
        if alpha == 0:
            return 0.0, None, 0.0
        sign = -1.0 if alpha < 0 else 1.0
        window = max(1e-8, 100 * tol)
        nc = float(np.linalg.norm(c))
        hits = scalars.name(abs(alpha), ctx, window, betas=self.search.betas, ema=ema)
        for m in hits[:6]:
            v = sign * m.value
            if np.linalg.norm(c - v * r) <= max(tol, 1e-300) * abs(v) * np.linalg.norm(r) \
                    or nc == 0:
                pre = "-" if sign < 0 else ""
                same = [pre + str(o) for o in hits if o is not m and o.complexity <=
                        m.complexity + 1 and abs(o.value / m.value - 1) <= 1e-12]
                if same:
                    self._aliases[pre + str(m)] = same[:3]
                return v, pre + str(m), m.complexity + (sign < 0)
        return alpha, None, 0.0

    # ------------------------------------------------------------------ verdict
    def _report(self, quantity, cand, fits, tol, arithmetic, damping) -> InferenceReport:
        notes = []
        good = [f for f in fits if f.fits(tol)]
        passed = bool(good)
        # passed: the simplest that fits; else the nearest — the fewest blocks that differ
        pool = sorted(good, key=lambda f: (f.complexity, f.worst)) if passed else \
            sorted(fits, key=lambda f: (sum(e > tol for e in f.residual.values()),
                                        len(f.unnamed), f.worst, f.complexity))
        best = pool[0]
        conv = best.convention()
        if arithmetic:
            conv["arithmetic"] = arithmetic
        presets = self.search.preset_match(quantity, cand, best, tol, damping) if passed else []
        if presets and presets[0] != conv.get("convention"):
            # the preset's value *is* the candidate: its scale relative to the preset is 1
            raw = conv["scale"]
            sc = (", ".join(f"{k} × {v}" for k, v in raw.items() if v != "1")
                  if isinstance(raw, dict) else f"{raw} ×")
            moved = moved_scalars(raw) if isinstance(raw, dict) else []
            notes.append(f"Relative to refngd's own convention your values are {sc} "
                         f"refngd's: the {presets[0]!r} preset's scaling"
                         + (" (" + "; ".join(moved) + ")." if moved else "."))
            conv["convention"], conv["scale"] = presets[0], "1"
            notes += _preset_differs(presets[0], conv)
            if len(presets) > 1:
                notes.append("The presets " + ", ".join(map(repr, presets)) + " all give this "
                             "value (their loss scalings coincide here).")
        preset_update = None
        if passed and not presets:
            for name, kw in self.search.preset_update_match(quantity, cand, best, tol, damping):
                preset_update = preset_update or (name, kw)
                how = ", ".join(f"{k}={v!r}" for k, v in kw.items())
                notes.append(f"This is the {name!r} preset's update at your λ itself "
                             f"(refngd.updates.{quantity[:-7]}(..., convention={name!r}"
                             + (f", {how}" if how else "") + ")); the scalars above are "
                             "relative to refngd's own convention.")
        if preset_update:
            notes += _preset_differs(preset_update[0], {**best.options, **preset_update[1]})
        alts, seen = [], {_key(conv)}
        for f in pool[1:] if passed else []:
            c = f.convention()
            if _key(c) not in seen:
                seen.add(_key(c))
                alts.append(c)
        differing = {} if passed else {k: e for k, e in best.residual.items() if e > tol}
        if not passed:  # blocks whose scale no monomial names (a damping's: in the summary)
            for k in best.unnamed:
                if k in best.residual:
                    differing.setdefault(k, best.residual[k])
        used = _labels(conv)
        same = {k: v for k, v in self._aliases.items() if k in used}
        if same:
            notes.append("Sizes coincide here, so these names are not unique: " + "; ".join(
                f"{k} is also {' or '.join(v)}" for k, v in same.items()) + ".")
        notes += self.search.notes(quantity)
        if not passed and self.search.module is not None:
            from .weights import stale_weights_note

            note = stale_weights_note(self.search.module, self.search.twin)
            if note:
                notes.append(note)
        summary = summarise(quantity, best, conv, passed, best.worst, tol, alts, differing, notes)
        opts, scale, why = (validate_options(self.search, quantity, conv, damping,
                                             preset_update, tol, self._f32, self._theta,
                                             self._v) if passed else
                            (None, None, "nothing explains the candidate"))
        return InferenceReport(passed, quantity, conv, best.worst, tol, alts, differing,
                               best.reference, summary, dict(best.residual), notes, opts,
                               scale, why)


# ----------------------------------------------------------------------------- helpers
def _damping(damping):
    """λ as a float > 0, or (λ_A, λ_G) as floats > 0 (torch / NumPy scalars accepted)."""
    if damping is None:
        return None
    pair = isinstance(damping, (tuple, list))
    if pair and len(damping) != 2:
        raise ValueError(f"damping must be λ > 0 or a pair (λ_A, λ_G) > 0, got {damping!r}.")
    if hasattr(damping, "detach"):  # a torch scalar
        damping = damping.detach().cpu().numpy()
    try:
        vals = [float(v.detach().cpu().numpy() if hasattr(v, "detach") else v)
                for v in (damping if pair else [damping])]
        if isinstance(damping, (str, bytes)):
            raise TypeError
    except (TypeError, ValueError):
        raise TypeError(f"damping must be a number λ > 0 or a pair (λ_A, λ_G), got "
                        f"{damping!r}.") from None
    if not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError((f"damping must be λ > 0 or a pair (λ_A, λ_G) > 0, got {damping!r}."
                          if pair else
                          f"infer() needs damping > 0 (its map λ' = s·λ), got {damping!r}."))
    return tuple(vals) if pair else vals[0]


def _preset_differs(name: str, options: dict) -> list:
    """The sentence saying where the code's options differ from preset ``name``'s own."""
    from .. import conventions

    own = dict(getattr(conventions.get(name), "options", ()) or ())
    diff = [(k, options[k], v) for k, v in own.items() if k in options and options[k] != v]
    if not diff:
        return []
    what = "; ".join(f"the {k} differs from the preset: yours is {a!r}, the {name!r} preset's "
                     f"own is {b!r}" for k, a, b in diff)
    return [f"Not the {name!r} preset as published: {what} (the preset is named for its "
            f"scaling; pass {', '.join(f'{k}={a!r}' for k, a, _ in diff)} with it)."]


def _labels(conv: dict) -> set:
    """Every scalar name in a convention dict (its "scale", per block or whole)."""
    sc = conv.get("scale")
    out = set(sc.values()) if isinstance(sc, dict) else {sc}
    return out | set((conv.get("scale/damping") or {}).values())


def _key(conv: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in conv.items()))
