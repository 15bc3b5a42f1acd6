"""The quantities ``validate`` can check: refngd's reference and the known wrong answers.

Each entry computes, for a twin (model, θ, loss, batch, convention), the reference value
and a few *alternatives* — the answers a typical bug produces (the EF where the Fisher was
meant, ``reduce`` where ``expand`` was meant, the tutorial K-FAC, the other bias mode) —
which :func:`refngd.check.compare` names when a candidate equals one of them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

from .. import conventions, updates
from ..backend import as_generator, namespace
from ..curvature import EKFAC, KFAC, EmpiricalFisher, Fisher, ImprovedEmpiricalFisher, SampledFisher
from ..derivatives import gradient, per_sample_gradients
from ..options import (BIAS, DAMPING_MODE, DAMPING_SPLIT, FISHER_TYPE, FORM, KFAC_APPROX_DEFAULT,
                       PI)


@dataclass
class Twin:
    """Everything a quantity needs: the refngd model and θ, the loss, the batch, options."""

    model: object
    theta: object
    loss: object
    X: object
    y: object
    convention: object
    prefixes: list            # per parametric layer, its name ("0", "2.1", ...)
    options: dict = field(default_factory=dict)

    @property
    def kfac_kw(self) -> dict:
        o = self.options
        mc = o.get("fisher_type") == "mc"
        return dict(fisher_type=o.get("fisher_type", FISHER_TYPE),
                    kfac_approx=o.get("kfac_approx", KFAC_APPROX_DEFAULT),
                    bias=o.get("bias", BIAS), mc_samples=o.get("mc_samples", 1),
                    rng=o.get("rng", 0) if mc else None, labels=o.get("labels") if mc else None)

    @property
    def damping_kw(self) -> dict:
        """K-FAC's damping options (:meth:`refngd.curvature.KFAC.solve`)."""
        o = self.options
        return dict(damping_mode=o.get("damping_mode", DAMPING_MODE), pi=o.get("pi", PI),
                    damping_split=o.get("damping_split", DAMPING_SPLIT))

    def param_blocks(self) -> dict:
        """name → (start, stop) of every weight and bias block of θ (PyTorch names)."""
        out, i = {}, 0
        for index, (start, stop) in enumerate(self.model.layout.layer_slices):
            if stop == start:
                continue
            name = self.prefixes[i]
            i += 1
            w = self.model.layout.of_layer(index)[0].stop
            out[f"{name}.weight"] = (start, w)
            if stop > w:
                out[f"{name}.bias"] = (w, stop)
        return out

    def layer_names(self) -> dict:
        """index in ``model.layers`` → name, for every layer with parameters (one name each,
        from :attr:`prefixes`, in θ order)."""
        idx = [i for i, (a, b) in enumerate(self.model.layout.layer_slices) if b > a]
        return dict(zip(idx, self.prefixes))

    def unit_names(self, units) -> list:
        """The names of K-FAC units (``LayerFactors`` or ``LayerRows``, in θ order).

        A layer with one unit has the layer's name ("0"); a grouped convolution's groups are
        "0", "0.group1", ... (group 0 keeps the layer's name); a layer with several units
        (the projections of attention, the linear maps of a Transformer layer) names each
        after the parameter tensor where it starts, as PyTorch does ("1.in_proj",
        "1.out_proj", "1.linear1").  Named by the layer each unit belongs to, never by its
        position among the units: a frozen or K-FAC-less layer between two others does not
        shift the names.
        """
        units = list(units)
        layers, count = self.layer_names(), {}
        for u in units:
            count[u.index] = count.get(u.index, 0) + 1
        out = []
        for u in units:
            name = layers.get(u.index, str(u.index))
            group = getattr(u.layer, "group", None)
            if group is not None:
                out.append(name if not group else f"{name}.group{group}")
            elif count[u.index] == 1:
                out.append(name)
            else:
                out.append(f"{name}.{_tensor_stem(self.model.layout, u)}")
        return out

    def layouts(self) -> dict:
        """name → (d_out, D) of every weight block, for the row/column-major vec test."""
        rows = self.kfac_rows()
        return {f"{n}.weight": e.layer.weight_matrix_shape
                for n, e in zip(self.unit_names(rows), rows)}

    @functools.cached_property
    def _kfac_rows(self) -> list:
        # one linearisation and one backward pass of zeros per twin: the names, layouts and
        # context of a check all read the same rows
        lin = self.model.linearize(self.theta, self.X)
        Z = lin.outputs
        rows = lin.backprop(namespace(Z).zeros((Z.shape[0], 1, Z.shape[1]), dtype=Z.dtype))
        return [e for e in rows.layers if e.layer.kfac_refusal() is None]

    def kfac_rows(self) -> list:
        """The LayerRows of every layer with K-FAC factors, from one backward pass of zeros
        (their caches say whether and how a layer shares its weight); computed once."""
        return self._kfac_rows

    def context(self) -> dict:
        Z = self.model.forward(self.theta, self.X)
        ctx = {"N": int(Z.shape[0]), "C": int(Z.shape[1]), "loss": type(self.loss).__name__}
        K = int(self.options.get("mc_samples", 1))
        if K > 1:
            ctx["K"] = K
        T, has_bias = {}, {}
        rows = self.kfac_rows()
        for name, e in zip(self.unit_names(rows), rows):
            for s in ("A", "G"):  # joint vs separate bias, or a bias where none belongs
                has_bias[f"{name}.{s}"] = bool(e.layer.bias)
            if e.layer.weight_sharing(e.cache) == "spatial":
                t = int(e.layer.tokens(e.cache).shape[1])
                for s in ("A", "G", "weight", "bias"):
                    T[f"{name}.{s}"] = t
        if T:
            ctx["T"] = T
        ctx["has_bias"] = has_bias
        return ctx


def _tensor_stem(layout, unit) -> str:
    """The layer-local name of the tensor where ``unit`` starts, without "weight"
    ("self_attn.in_proj_weight" → "self_attn.in_proj", "linear1.weight" → "linear1")."""
    for slot in layout.of_layer(unit.index):
        if slot.start <= unit.start < slot.stop:
            stem = slot.name
            for tail in (".weight", "_weight"):
                if stem.endswith(tail):
                    return stem[: -len(tail)]
            return stem
    return f"unit{unit.start}"


def _factors(K: KFAC, twin: Twin) -> dict:
    """``"0.A"``, ``"0.G"``, ... per K-FAC unit, named by :meth:`Twin.unit_names`."""
    out = {}
    factors = K.factors()
    for key, f in zip(twin.unit_names(factors), factors):
        out[f"{key}.A"], out[f"{key}.G"] = f.A, f.G
    return out


def _kfac(twin: Twin, **over) -> KFAC:
    kw = {**twin.kfac_kw, **over}
    conv = over.pop("convention", twin.convention)
    kw.pop("convention", None)
    if kw["fisher_type"] != "mc":  # an alternative of another Fisher type draws nothing
        kw.update(rng=None, labels=None)
    return KFAC(twin.model, twin.theta, twin.loss, twin.X, twin.y, convention=conv, **kw)


def _has_conv(twin: Twin) -> bool:
    """Does a layer share its weight over image locations (a convolution)?"""
    return any(e.layer.weight_sharing(e.cache) == "spatial" for e in twin.kfac_rows())


def _kfac_alternatives(twin: Twin, get) -> dict:
    """The K-FAC answers of the common mistakes, through ``get(kfac_object)``."""
    kw = twin.kfac_kw
    alts = {}
    if _has_conv(twin):
        other = "reduce" if kw["kfac_approx"] == "expand" else "expand"
        alts[f"kfac_approx={other!r} where {kw['kfac_approx']!r} was meant (Conv2d)"] = \
            get(_kfac(twin, kfac_approx=other))
        if twin.convention.conv_kfac != "backpack":
            alts["BackPACK's Conv2d factors [G_reduce, T·A_expand]"] = get(_kfac(twin, convention="backpack"))
    if kw["fisher_type"] != "empirical" and twin.y is not None:
        alts["the empirical-Fisher K-FAC (rows e_n) where the Fisher was meant"] = \
            get(_kfac(twin, fisher_type="empirical"))
    if twin.y is not None and twin.convention.kfac_factors != "tutorial":
        alts["the tutorial's simplified K-FAC (factors of the aggregated gradient ∇W)"] = \
            get(_kfac(twin, convention="tutorial"))
    other_bias = "joint" if kw["bias"] == "separate" else "separate"
    alts[f"bias={other_bias!r} where {kw['bias']!r} was meant"] = get(_kfac(twin, bias=other_bias))
    return alts


def _exact(cls, twin, **kw):
    return cls(twin.model, twin.theta, twin.loss, twin.X, twin.y, convention=twin.convention, **kw)


def _damping(twin: Twin) -> float:
    lam = twin.options.get("damping")
    if lam is None:
        raise ValueError("this quantity is an update direction: pass damping= (the λ your code used).")
    return lam


def _vector(twin: Twin, what: str = "the vector your code multiplied"):
    v = twin.options.get("v")
    if v is None:
        raise ValueError(f"this quantity needs v= ({what}).")
    return v


EF_FOR_F = "the empirical Fisher (EF, observed labels) where the Fisher was meant"
F_FOR_EF = "the Fisher where the empirical Fisher (EF) was meant"


def reference(twin: Twin, quantity: str):
    """(reference, alternatives, blocked) for ``quantity``; ``blocked``: split along θ."""
    t, conv = twin, twin.convention
    if quantity == "per_sample_gradients":
        G = per_sample_gradients(t.model, t.theta, t.loss, t.X, t.y)
        return conventions.per_sample_gradients(G, t.loss, t.model.forward(t.theta, t.X), conv), {}, True
    if quantity == "gradient":
        return _exact(Fisher, t).gradient(), {}, True
    if quantity in ("fisher", "ggn"):
        return _exact(Fisher, t).dense(), {EF_FOR_F: _exact(EmpiricalFisher, t).dense()}, True
    if quantity == "fisher_diagonal":
        return _exact(Fisher, t).diagonal(), {EF_FOR_F: _exact(EmpiricalFisher, t).diagonal()}, True
    if quantity == "fisher_matvec":
        v = _vector(t)
        return _exact(Fisher, t) @ v, {EF_FOR_F: _exact(EmpiricalFisher, t) @ v}, True
    if quantity == "gamma":
        from ..metrics import gamma

        d = _vector(t, "the direction d whose γ(d) = √(dᵀFd)/|dᵀg| your code computed")
        F = _exact(Fisher, t)
        return float(gamma(d, F, F.gradient())), {}, False
    if quantity == "empirical_fisher":
        return _exact(EmpiricalFisher, t).dense(), {F_FOR_EF: _exact(Fisher, t).dense()}, True
    if quantity == "ief":
        return (_exact(ImprovedEmpiricalFisher, t).dense(),
                {"the empirical Fisher (EF) where the iEF was meant": _exact(EmpiricalFisher, t).dense()}, True)
    if quantity == "sampled_fisher":
        labels = t.options.get("labels")
        ref = (_exact(Fisher, t) if labels is None else
               _exact(SampledFisher, t, labels=labels)).dense()
        return ref, {EF_FOR_F: _exact(EmpiricalFisher, t).dense()}, True
    if quantity == "kfac_factors":
        return value(t, quantity), _kfac_alternatives(t, lambda k: _factors(k, t)), False
    if quantity == "kfac":
        alts = _kfac_alternatives(t, lambda k: k.dense())
        alts["the exact Fisher (no Kronecker factorisation)"] = _exact(Fisher, t).dense()
        return value(t, quantity), alts, True
    if quantity == "ekfac":
        return value(t, quantity), {"K-FAC where EKFAC was meant": _kfac(t).dense()}, True
    if quantity.endswith("_update"):
        return value(t, quantity), _update_alternatives(t, quantity[:-7]), True
    raise ValueError(f"unknown quantity {quantity!r}; choose one of {', '.join(QUANTITIES)}.")


def value(t: Twin, quantity: str):
    """refngd's value of a K-FAC quantity or an update, without the alternatives."""
    if quantity == "kfac_factors":
        return _factors(_kfac(t), t)
    if quantity == "kfac":
        return _kfac(t).dense()
    if quantity == "ekfac":
        return EKFAC(t.model, t.theta, t.loss, t.X, t.y, kfac=_kfac(t)).dense()
    if quantity.endswith("_update"):
        return _update(t, quantity[:-7])
    raise ValueError(f"value() computes K-FAC quantities and updates, not {quantity!r}.")


def _update(t: Twin, method: str):
    lam = _damping(t)
    o = t.options
    base = (t.model, t.theta, t.loss, t.X, t.y, lam)
    if method == "ngd":
        return updates.ngd(*base, convention=t.convention)
    if method == "ef":
        return updates.ef(*base, form=o.get("form", FORM), convention=t.convention)
    if method == "ief":
        return updates.ief(*base, form=o.get("form", FORM), convention=t.convention)
    if method in ("kfac", "ekfac"):
        return getattr(updates, method)(*base, convention=t.convention, **t.damping_kw,
                                        **t.kfac_kw)
    raise ValueError(f"unknown update {method!r}_update; choose ngd, ef, ief, kfac or ekfac.")


def _update_alternatives(t: Twin, method: str) -> dict:
    lam = _damping(t)
    base = (t.model, t.theta, t.loss, t.X, t.y, lam)
    alts = {"the plain gradient (no preconditioning)": gradient(t.model, t.theta, t.loss, t.X, t.y)}
    if method == "ngd":
        alts["the EF update where the natural gradient was meant"] = updates.ef(*base)
    if method in ("ef", "ief"):
        other = "gram" if t.options.get("form", "tikhonov") == "tikhonov" else "tikhonov"
        alts[f"form={other!r} (the other damping) where {t.options.get('form', 'tikhonov')!r} was meant"] = \
            getattr(updates, method)(*base, form=other)
    if method in ("kfac", "ekfac"):
        fn = getattr(updates, method)
        for what, kw in damping_variants(t.damping_kw, t.options.get("damping")):
            alts[what] = fn(*base[:-1], kw.pop("damping"), convention=t.convention, **kw,
                            **t.kfac_kw)
    return alts


#: the damping variants (refngd.curvature.damping) a K-FAC / EKFAC update is compared with
_VARIANTS = (("Tikhonov damping (G ⊗ A + λI)", dict(damping_mode="tikhonov")),
             ("factored damping with Martens & Grosse's trace-norm π",
              dict(damping_mode="factored", pi="trace", damping_split="even")),
             ("factored damping with π = 1 (√λ on each factor)",
              dict(damping_mode="factored", pi=1.0, damping_split="even")),
             ("factored damping with π = 1 and λ/T per location (TF K-FAC / EKFAC-pytorch "
              "without π)", dict(damping_mode="factored", pi=1.0, damping_split="locations")),
             ("per-factor damping with λ on each factor (A + λI) ⊗ (G + λI)",
              dict(damping_mode="per-factor")))


def damping_variants(chosen: dict, damping) -> list:
    """[(description, options with ``damping``)] of the damping variants other than ``chosen``."""
    out = []
    pair = isinstance(damping, (tuple, list))
    for what, kw in _VARIANTS:
        full = {**dict(pi=PI, damping_split=DAMPING_SPLIT), **kw}
        if pair or full == chosen or (kw["damping_mode"] == "tikhonov"
                                     and chosen["damping_mode"] == "tikhonov"):
            continue
        out.append((f"{what} where {_describe(chosen)} was meant", {**full, "damping": damping}))
    return out


def _describe(kw: dict) -> str:
    if kw["damping_mode"] == "tikhonov":
        return "Tikhonov damping"
    if kw["damping_mode"] == "per-factor":
        return "per-factor damping"
    split = ", λ/T per location" if kw["damping_split"] == "locations" else ""
    return f"factored damping (pi={kw['pi']!r}{split})"


def mc_tolerance(t: Twin, trials: int = 16) -> tuple:
    """(rtol, reason) for a sampled Fisher: from refngd's own estimates' spread around F.

    A correct Monte-Carlo candidate's relative error is a draw from the distribution of
    ‖F̂ − F‖/‖F‖ at this N and K; ``trials`` independent refngd estimates give its mean m
    and standard deviation s, and the tolerance m + 6 s (never below their maximum).
    """
    K = int(t.options.get("mc_samples", 1))
    F = _exact(Fisher, t).dense()
    xp = namespace(F)
    rng = as_generator(t.options.get("rng", 0))
    errs = []
    for _ in range(trials):
        Fh = _exact(SampledFisher, t, mc_samples=K, rng=rng).dense()
        errs.append(float(xp.linalg.norm(Fh - F) / xp.linalg.norm(F)))
    m = sum(errs) / trials
    s = (sum((e - m) ** 2 for e in errs) / (trials - 1)) ** 0.5
    tol = max(m + 6 * s, max(errs))
    return tol, (f"Monte-Carlo, N = {t.X.shape[0]}, K = {K}: refngd's own {trials} estimates have "
                 f"relative error {m:.3g} ± {s:.2g}; tolerance mean + 6 sd")


QUANTITIES = ("per_sample_gradients", "gradient", "fisher", "ggn", "fisher_diagonal", "fisher_matvec",
              "gamma", "empirical_fisher", "ief", "sampled_fisher", "kfac_factors", "kfac", "ekfac",
              "ngd_update", "ef_update", "ief_update", "kfac_update", "ekfac_update")
