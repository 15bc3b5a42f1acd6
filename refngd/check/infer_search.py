"""The search space of :func:`refngd.check.infer` and refngd's values on it, computed once.

:class:`Search` holds one linearisation of the model on the batch and caches, per option
set, the K-FAC object (its A factors shared through ``INPUT_FACTORS``), the dense
matrices and the eigendecompositions the damping fits need — so that a candidate is
compared with every convention for the cost of building each option set's curvature once.
"""
from __future__ import annotations

import numpy as np

from .. import conventions, updates
from ..backend import to_numpy
from ..curvature import EKFAC, KFAC, EmpiricalFisher, Fisher, ImprovedEmpiricalFisher
from ..curvature.kfac_factors import given_draws
from ..derivatives import per_sample_gradients
from ..options import (BIAS, BIAS_MODES, CONVENTION, DAMPING_MODE, DAMPING_MODES,
                       DAMPING_SPLIT, DAMPING_SPLITS, FISHER_TYPE, FISHER_TYPES, FORM, FORMS,
                       KFAC_APPROX, KFAC_APPROX_DEFAULT, check_choice, check_int, check_pi,
                       check_real)
from . import scalars
from .infer_blocks import kronecker_blocks, row_blocks
from .infer_damping import RULES
from .quantities import reference
from .validate import make_twin

_KFAC_Q = ("kfac_factors", "kfac", "ekfac", "kfac_update", "ekfac_update")


class Search:
    """refngd's side of the search: option sets, values, eigenblocks, sizes (cached)."""

    def __init__(self, model, loss, X, y, labels, theta, known: dict, v=None):
        self.known = known
        for key, choices in (("bias", BIAS_MODES), ("kfac_approx", KFAC_APPROX),
                             ("damping_mode", DAMPING_MODES), ("form", FORMS),
                             ("damping_split", DAMPING_SPLITS)):
            if key in known:
                check_choice(known[key], key, choices)
        if "fisher_type" in known:
            check_choice(known["fisher_type"], "fisher_type", FISHER_TYPES)
        if "pi" in known:
            known["pi"] = check_pi(known["pi"])
        if "convention" in known:
            known["convention"] = conventions.get(known["convention"]).name
        if "mc_samples" in known:
            known["mc_samples"] = check_int(known["mc_samples"], "mc_samples")
        if "ema_beta" in known:
            b = check_real(known["ema_beta"], "ema_beta")
            if not 0 < b < 1:
                raise ValueError(f"ema_beta is a running average's decay β, 0 < β < 1; got "
                                 f"{known['ema_beta']!r}.")
            known["ema_beta"] = b
        self.twin = make_twin(model, loss, X, y, "refngd", theta=theta, labels=labels, v=v,
                              mc_samples=known.get("mc_samples", 1))
        # a torch module whose weights the twin read (not a pair, not theta=): for the note
        # that its weights moved since the candidate (refngd.check.weights)
        self.module = model if theta is None and not isinstance(model, tuple) else None
        t = self.twin
        self.labels = t.options.get("labels")
        self.lin = t.model.linearize(t.theta, t.X)
        self.P = int(t.theta.shape[0])
        ctx = t.context()
        self.N, self.C = ctx["N"], ctx["C"]
        # K: the draws per sample; given labels in a draw's layout ((N,) classes, (N, C) for
        # MSE / BCE) are one draw — given_draws checks the shape and adds the K axis
        self.K = int(known.get("mc_samples", 1)) if self.labels is None else \
            int(given_draws(t.loss, to_numpy(self.lin.outputs),
                            to_numpy(self.labels)).shape[1])
        # T per layer that shares its weight (a convolution's locations, a sequence's tokens)
        rows = t.kfac_rows()
        self._T = {name: int(e.layer.tokens(e.cache).shape[1])
                   for name, e in zip(t.unit_names(rows), rows)
                   if e.layer.weight_sharing(e.cache) is not None}
        self.betas = (float(known["ema_beta"]),) if "ema_beta" in known else scalars.EMA_BETAS
        self._cache: dict = {}

    # ------------------------------------------------------------------ sizes
    def layer_of(self, name: str) -> str:
        for p in sorted(self.twin.prefixes, key=len, reverse=True):
            if name == p or name.startswith(p + "."):
                return p
        return name

    def T(self, name: str) -> int:
        return int(self._T.get(self.layer_of(name), 1))

    def ctx(self, name: str) -> dict:
        """The sizes a scalar of block/layer ``name`` is named with (T: its layer's)."""
        return scalars.sizes(self.N, self.C, self.T(name), self.K)

    def param_blocks(self) -> dict:
        return self.twin.param_blocks()

    def layer_slices(self) -> dict:
        out = {}
        for k, (a, b) in self.param_blocks().items():
            layer = self.layer_of(k)
            lo, hi = out.get(layer, (a, b))
            out[layer] = (min(lo, a), max(hi, b))
        return out

    # ------------------------------------------------------------------ option sets
    def _shares(self) -> bool:
        return bool(self._T)

    def option_sets(self, quantity: str) -> list:
        """The option dicts searched for ``quantity`` (the user's ``known`` ones fixed)."""
        kn = self.known
        t = self.twin
        if quantity not in _KFAC_Q:
            if quantity in ("ef_update", "ief_update"):
                return [{"form": f} for f in ([kn["form"]] if "form" in kn else FORMS)]
            convs = ["refngd"]
            if getattr(t.loss, "tokens_per_sample", 1) > 1:
                convs.append("curvlinops")
            if "convention" in kn:
                convs = [kn["convention"]]
            return [{} if c == "refngd" else {"convention": c} for c in convs]
        if "fisher_type" in kn:
            fts = [kn["fisher_type"]]
        else:
            fts = ["type-2"] + (["empirical"] if t.y is not None else []) + \
                (["mc"] if self.labels is not None else [])
        biases = [kn["bias"]] if "bias" in kn else list(BIAS_MODES)
        approx = [kn["kfac_approx"]] if "kfac_approx" in kn else \
            (list(KFAC_APPROX) if self._shares() else [KFAC_APPROX_DEFAULT])
        conv = kn.get("convention", CONVENTION)
        out = []
        for ft in fts:
            for b in biases:
                for ap in approx:
                    o = {"fisher_type": ft, "bias": b}
                    if self._shares():
                        o["kfac_approx"] = ap
                    if conv != "refngd":
                        o["convention"] = conv
                    out.append(o)
        if "convention" not in kn:
            if t.y is not None and not quantity.startswith("ekfac"):
                out.append({"convention": "tutorial"})
            if self._shares():
                out += [{"fisher_type": ft, "bias": b, "convention": "backpack"}
                        for ft in fts for b in biases]
        return out

    def complexity(self, opts: dict) -> float:
        """How far ``opts`` are from refngd's defaults (ranking of equally good fits)."""
        defaults = {"fisher_type": FISHER_TYPE, "bias": BIAS, "kfac_approx": KFAC_APPROX_DEFAULT,
                    "convention": CONVENTION, "damping_mode": DAMPING_MODE, "form": FORM,
                    "damping_split": DAMPING_SPLIT}
        return float(sum(1 for k, v in opts.items() if k in defaults and v != defaults[k]))

    # ------------------------------------------------------------------ values
    def kfac(self, opts: dict) -> KFAC:
        key = ("kfac", tuple(sorted(opts.items())))
        if key not in self._cache:
            t = self.twin
            ft = opts.get("fisher_type", FISHER_TYPE)
            self._cache[key] = KFAC(
                t.model, t.theta, t.loss, t.X, t.y, fisher_type=ft,
                kfac_approx=opts.get("kfac_approx", KFAC_APPROX_DEFAULT),
                bias=opts.get("bias", BIAS), linearization=self.lin,
                convention=opts.get("convention", "refngd"),
                labels=self.labels if ft == "mc" else None)
        return self._cache[key]

    def value(self, quantity: str, opts: dict):
        """refngd's value of ``quantity`` under ``opts`` (host float64), or None if undefined."""
        key = ("value", quantity, tuple(sorted(opts.items())))
        if key in self._cache:
            return self._cache[key]
        if quantity in _KFAC_Q:
            K = self.kfac(opts)
            if quantity == "kfac_factors":
                fs = K.factors()
                val = {f"{n}.{s}": to_numpy(getattr(f, s)).astype(np.float64)
                       for f, n in zip(fs, self.twin.unit_names(fs)) for s in "AG"}
            elif quantity == "kfac":
                val = to_numpy(K.dense()).astype(np.float64)
            else:
                val = to_numpy(EKFAC(self.twin.model, self.twin.theta, self.twin.loss,
                                     self.twin.X, self.twin.y, kfac=K).dense()).astype(np.float64)
        else:
            t = self.twin
            conv = conventions.get(opts.get("convention", "refngd"))
            twin = type(t)(t.model, t.theta, t.loss, t.X, t.y, conv, t.prefixes, t.options)
            val = to_numpy(reference(twin, quantity)[0]).astype(np.float64)
        self._cache[key] = val
        return val

    # ------------------------------------------------------------------ updates
    def update_sets(self, quantity: str) -> list:
        """[(options, eigenblocks without candidate, unit of λ)] for an update quantity."""
        t = self.twin
        out = []
        if quantity in ("kfac_update", "ekfac_update"):
            for opts in self.option_sets(quantity):
                key = ("eig", quantity, tuple(sorted(opts.items())))
                if key not in self._cache:
                    K = self.kfac(opts)
                    g = updates._kronecker_gradient(K, self.lin, t.loss, t.y)
                    E = None
                    if quantity == "ekfac_update":
                        E = EKFAC(t.model, t.theta, t.loss, t.X, t.y, kfac=K)
                        E = E.with_factors([(f.A, f.G) for f in E.factors()])
                    self._cache[key] = kronecker_blocks(K, g, self._starts(), E)
                out.append((opts, self._cache[key], 1.0))
            return out
        kw = dict(linearization=self.lin)
        base = (t.model, t.theta, t.loss, t.X, t.y)

        def rows(F):  # M = c UᵀU from the (R, P) rows and the gradient r
            return lambda: (F.row_matrix(), F.c, F.gradient())

        if quantity == "ngd_update":
            return [({}, self._rows("ngd", rows(Fisher(*base, **kw))), 1.0)]
        c = float(t.loss.scale(self.lin.outputs))
        for opts in self.option_sets(quantity):
            if quantity == "ef_update":  # gram: Gᵀ(GGᵀ + λI)⁻¹1 = (F̃ + cλ)⁻¹ g (push-through)
                blocks = self._rows("ef", rows(EmpiricalFisher(*base, **kw)))
                out.append((opts, blocks, c if opts["form"] == "gram" else 1.0))
            elif opts["form"] == "tikhonov":
                blocks = self._rows("ief", rows(ImprovedEmpiricalFisher(*base, **kw)))
                out.append((opts, blocks, 1.0))
            else:  # Gᵀ(GGᵀ + λI)⁻¹ s = (GᵀG + λI)⁻¹ Gᵀs, s_n = ‖e_n‖² (Wu et al. 2024, eq. 8)
                def gram_form():
                    G = self._psg()
                    e = to_numpy(t.loss.output_gradient(self.lin.outputs, t.y))
                    return G, 1.0, G.T @ (e.reshape(e.shape[0], -1) ** 2).sum(axis=1)
                out.append((opts, self._rows("ief-gram", gram_form), 1.0))
        return out

    def _psg(self) -> np.ndarray:
        if "psg" not in self._cache:
            t = self.twin
            self._cache["psg"] = to_numpy(per_sample_gradients(t.model, t.theta, t.loss, t.X,
                                                               t.y)).astype(np.float64)
        return self._cache["psg"]

    def _rows(self, key, make) -> list:
        if ("rows", key) not in self._cache:
            U, c, rhs = make()
            self._cache[("rows", key)] = row_blocks(to_numpy(U), float(c),
                                                    to_numpy(rhs).astype(np.float64))
        return self._cache[("rows", key)]

    def _starts(self) -> dict:
        return {a: self.layer_of(k) for k, (a, b) in self.param_blocks().items()
                if k.endswith(".weight")}

    def rules(self, quantity: str, opts: dict, damping) -> list:
        """The damping rules tried for ``quantity`` under ``opts`` (``known`` respected)."""
        if quantity not in ("kfac_update", "ekfac_update"):
            return ["tikhonov"]
        kn = self.known
        out = []
        has_bias_block = opts.get("bias", BIAS) == "separate" and any(
            k.endswith(".bias") for k in self.param_blocks())
        for rule, o in RULES.items():
            if isinstance(damping, tuple) and rule != "per-factor":
                continue
            if "damping_mode" in kn and o["damping_mode"] != kn["damping_mode"]:
                continue
            if "pi" in kn and o["damping_mode"] == "factored" and \
                    (kn["pi"] == "trace") != (o.get("pi") == "trace"):
                continue
            if o.get("bias_damping") and (not has_bias_block or opts.get("convention")):
                continue
            out.append(rule)
        return out

    # ------------------------------------------------------------------ presets, notes
    def preset_match(self, quantity: str, cand, fit, tol: float, damping) -> list:
        """The presets of :mod:`refngd.conventions` whose value *is* the candidate (no scalar).

        Only where the candidate is not refngd's own value (a scale other than 1): a preset
        whose loss scaling coincides with refngd's here says nothing.
        """
        conv = fit.options.get("convention")
        if conv:
            return [conv]
        if quantity.endswith("_update") or fit.named.get("scale") == "1":
            return []
        out = []
        for name in conventions.names():
            if name in ("refngd", "tutorial", "curvlinops") or (
                    name == "backpack" and quantity in _KFAC_Q):  # those are option sets
                continue
            opts = {**fit.options, "convention": name}
            try:
                ref = self.value(quantity, opts)
            except (ValueError, TypeError):
                continue
            if isinstance(ref, dict):
                if set(ref) != set(cand) or any(ref[k].shape != cand[k].shape for k in ref):
                    continue
                ok = all(np.linalg.norm(cand[k] - ref[k]) <= tol * np.linalg.norm(ref[k])
                         for k in ref)
            else:
                r = np.asarray(ref)
                ok = r.shape == np.shape(cand) and \
                    np.linalg.norm(cand - r) <= tol * max(np.linalg.norm(r), 1e-300)
            if ok:
                out.append(name)
        return out

    def preset_update_match(self, quantity: str, cand, fit, tol: float, damping) -> list:
        """[(preset, damping options)] whose K-FAC / EKFAC update at the user's λ *is* the
        candidate — the preset's factors damped as the code damps them (π = trace or 1).

        Only where the fit needed a scale (refngd's own update at the user's λ is not it).
        """
        if quantity not in ("kfac_update", "ekfac_update") or fit.options.get("convention") \
                or fit.named.get("scale") == "1":
            return []
        t = self.twin
        base = {k: fit.options[k] for k in ("fisher_type", "bias", "kfac_approx",
                                            "damping_mode", "damping_split")
                if k in fit.options}
        if base.get("fisher_type") == "mc":
            base["labels"] = self.labels
        pis = ["trace", 1.0] if base.get("damping_mode") == "factored" else [None]
        fn = updates.kfac if quantity == "kfac_update" else updates.ekfac
        cand = np.asarray(cand, dtype=np.float64)
        out = []
        for name in conventions.names():
            if name in ("refngd", "tutorial", "curvlinops"):  # option sets of the search
                continue
            for pi in pis:
                kw = dict(base, convention=name, **({} if pi is None else {"pi": pi}))
                try:
                    d = to_numpy(fn(t.model, t.theta, t.loss, t.X, t.y, damping,
                                    linearization=self.lin, **kw)).astype(np.float64)
                except (ValueError, TypeError, NotImplementedError):
                    continue
                if d.shape == cand.shape and np.linalg.norm(cand - d) <= \
                        tol * max(float(np.linalg.norm(d)), 1e-300):
                    out.append((name, {k: kw[k] for k in ("damping_mode", "pi", "damping_split")
                                       if k in kw}))
                    break
        return out

    def notes(self, quantity: str) -> list:
        out = []
        if quantity in _KFAC_Q and not self._shares():
            out.append("No layer shares its weight, so kfac_approx (expand/reduce) makes no "
                       "difference here.")
        if quantity in _KFAC_Q and self.labels is None and "fisher_type" not in self.known:
            out.append("Monte-Carlo rows were not searched: pass labels= (your sampled targets) "
                       "to include fisher_type='mc'.")
        if self.N == 1:
            out.append("With one sample many conventions coincide (N = 1).")
        return out
