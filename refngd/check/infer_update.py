"""The update half of :class:`refngd.check.infer.Inference`: dampings fitted and named per layer.

For an update quantity (``kfac_update``, ``ekfac_update``, ``ngd_update``, ``ef_update``,
``ief_update``) every option set's eigenblocks (:mod:`refngd.check.infer_search`) are
tried under every damping rule (:data:`refngd.check.infer_damping.RULES`); per layer the
damping is fitted in closed form and named (:func:`refngd.check.infer_damping.layer_choices`),
the layers' names are shared in a second pass, and each block's scale κ is named with the
named damping in place.  A layer whose candidate is a multiple of its gradient has a
damping that swamps its curvature: only κ/damping is named there
(:func:`refngd.check.infer_damping.swamped_choice`).
"""
from __future__ import annotations

import math

import numpy as np

from .infer_blocks import reproduce
from .infer_damping import RAW, RULES, evaluate, layer_choices, swamped_choice
from .infer_report import Fit, damping_names

KFAC_QUANTITIES = ("kfac_factors", "kfac", "ekfac", "kfac_update", "ekfac_update")


def _shapes(cand) -> str:
    if isinstance(cand, dict):
        return ", ".join(f"{k}: {v.shape}" for k, v in cand.items())
    return str(cand.shape)


class UpdateFits:
    """Mixin of :class:`refngd.check.infer.Inference`: ``self.search``, ``self.known`` and
    ``self._name_scalar`` come from it."""

    # ------------------------------------------------------------------ updates
    def _update_fits(self, quantity: str, cand, damping, tol: float) -> list:
        s = self.search
        if isinstance(cand, dict) or cand.shape != (s.P,):
            raise ValueError(f"{quantity}: the candidate is a (P,) vector with P = {s.P} "
                             f"(θ in parameters_to_vector order), got {_shapes(cand)}.")
        window = max(1e-6, 100 * tol)
        out = []
        for opts, blocks, unit in s.update_sets(quantity):
            blocks = [b.with_candidate(cand.astype(np.float64)) for b in blocks]
            layers: dict = {}
            for b in blocks:
                layers.setdefault(b.layer, []).append(b)
            lam = damping if isinstance(damping, tuple) else damping * unit
            lam_prod = lam[0] * lam[1] if isinstance(lam, tuple) else lam
            swamped = {layer: swamped_choice(bl, lam_prod, tol) for layer, bl in layers.items()}
            swamped = {k: v for k, v in swamped.items() if v is not None}
            for rule in s.rules(quantity, opts, damping):
                chosen, shared = dict(swamped), {}
                for _ in range(2):  # the second pass: what the other layers named, shared
                    for layer, bl in layers.items():
                        if layer in swamped:
                            continue
                        ch = layer_choices(rule, bl, lam, s.ctx(layer), window, tol, shared,
                                           self._fixed_pi(layer), s.betas,
                                           "ema_beta" in self.known)
                        if not ch:
                            break
                        chosen[layer] = ch[0]
                    else:
                        new = {tuple(c.names.values()): (c.names, c.recipe, c.complexity)
                               for c in chosen.values()
                               if c.complexity < RAW and c.swamped is None}
                        if len(layers) == 1 or set(new) <= set(shared):
                            break
                        shared.update(new)
                        continue
                    break
                if len(chosen) == len(layers):
                    out.append(self._update_fit(cand, opts, rule, chosen, blocks, tol,
                                                isinstance(damping, tuple),
                                                quantity in KFAC_QUANTITIES[3:], lam_prod))
        return out

    def _fixed_pi(self, layer: str):
        """(π, name) of a layer when the user gave ``pi=`` a number (``damping_split`` too)."""
        p = self.known.get("pi")
        if p is None or p == "trace":
            return None
        p = float(p)
        T = self.search.T(layer)
        if self.known.get("damping_split") == "locations" and T > 1:
            return p / math.sqrt(T), ("1/T^0.5" if p == 1 else f"{p / math.sqrt(T):g}")
        return p, ("1" if p == 1 else f"{p:g}")

    def _update_fit(self, cand, opts, rule, chosen, blocks, tol, pair: bool,
                    kronecker: bool, lam_prod: float = 1.0) -> Fit:
        s = self.search
        hyp = {}
        for ch in chosen.values():
            hyp.update(ch.hyp)
        ev = evaluate(blocks, hyp)
        named_k, unnamed, cx, seen = {}, {}, 0.0, set()
        ratios: dict = {}
        total = float(np.linalg.norm(cand))
        lam_sym = "(lambda_A*lambda_G)" if pair else "lambda"
        for b in blocks:  # κ per block, named; the residual with the named κ
            k, u = ev.kappa[b.name], ev.coords[b.name]
            mu = chosen[b.layer].swamped
            if mu is not None:  # only κ/μ is determined: name (κ/μ)·λ, a monomial
                # an EMA's (1 − β) cancels in κ/μ (factors and λ' alike): none unless named
                x = k / mu * lam_prod
                value, label, comp = self._name_scalar(x, b.C.ravel(), (u * mu).ravel() /
                                                       lam_prod, s.ctx(b.layer), tol,
                                                       ema="ema_beta" in self.known)
                if label is None:
                    unnamed[b.name], label = x, f"{x:.6g}"
                elif label not in seen:
                    cx, seen = cx + comp, seen | {label}
                ratios.setdefault(b.layer, set()).add(_over(label, lam_sym))
                if label in self._aliases:  # other names of the same ratio, for the report
                    self._aliases[_over(label, lam_sym)] = [_over(a, lam_sym)
                                                            for a in self._aliases[label]]
                named_k[b.name] = "undetermined"
                ev.kappa[b.name] = value * mu / lam_prod
                ev.residual[b.name] = _rel(b.C, ev.kappa[b.name] * u, total)
                continue
            if not math.isfinite(k):  # a damping that makes the block singular
                unnamed[b.name], named_k[b.name], ev.kappa[b.name] = k, "nan", 0.0
                ev.residual[b.name] = math.inf
                continue
            value, label, comp = self._name_scalar(k, b.C.ravel(), u.ravel(), s.ctx(b.layer), tol)
            if label is None:
                unnamed[b.name], label = k, f"{k:.6g}"
            elif label not in seen:
                cx, seen = cx + comp, seen | {label}
            named_k[b.name] = label
            ev.kappa[b.name] = value
            ev.residual[b.name] = _rel(b.C, value * u, total)
        names = {}
        for layer, ch in chosen.items():
            if ch.swamped is not None:
                continue
            if ch.complexity >= RAW:  # a damping no monomial names: the nearest only
                raw = {f"{layer}.{key}": v for (key, nm), v in zip(ch.names.items(), ch.recipe)
                       if v is not None and nm == f"{v:.6g}"}
                unnamed.update(raw or {f"{layer}.damping": math.nan})
            cx += ch.complexity
            for key, v in ch.names.items():
                names.setdefault(key, {})[layer] = v
        named = damping_names(rule, names, s, pair) if names else {}
        if ratios:  # the damping swamps these layers' curvature: scale/damping only
            order = list(dict.fromkeys(b.layer for b in blocks))
            damp = named.get("damping", {})
            named["damping"] = {k: "undetermined" if k in ratios else
                                (damp if isinstance(damp, str) else damp[k]) for k in order}
            named["scale/damping"] = {k: " or ".join(sorted(ratios[k])) for k in order
                                      if k in ratios}
        labels = set(named_k.values())
        named["scale"] = labels.pop() if len(labels) == 1 else named_k
        options = dict(opts)
        if kronecker:  # the damping rule's options (refngd.options); exact updates have none
            options.update({k: v for k, v in RULES[rule].items() if k != "bias_damping"})
            if RULES[rule].get("bias_damping") == "weight":
                options["convention"] = "curvlinops"
        options.update(named.pop("_options", {}))
        return Fit(options, named, dict(ev.residual), reproduce(blocks, ev, s.P),
                   s.complexity(options) + cx, unnamed)


def _rel(c: np.ndarray, r: np.ndarray, total: float) -> float:
    nr = float(np.linalg.norm(r))
    d = float(np.linalg.norm(c - r))
    if nr > 0:
        return d / nr
    return d / total if total > 0 else 0.0


def _over(m: str, lam: str) -> str:
    """The monomial ``m`` divided by the damping symbol: "N^2" → "N^2/lambda"."""
    if m == "1":
        return f"1/{lam}"
    if "/" in m:
        num, den = m.split("/", 1)
        den = den[1:-1] if den.startswith("(") else den
        return f"{num}/({den}*{lam})"
    return f"{m}/{lam}"
