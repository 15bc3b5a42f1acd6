"""``refngd compare``: train one network with every method side by side (Wu et al. 2024, §6–7).

The experiment, in order:

1. data: scikit-learn's digits (or ``--data``), a seeded 80/20 split, standardised;
2. one initial θ (seeded) shared by every run; the same mini-batch order for every run;
3. for each method, one training run per learning rate of its grid (``METHODS[m].lr_grid``:
   five values on the 1–3–10 scale centred on the best value of a pilot sweep run with
   *another* seed, see docs/compare.md); the *best learning rate* is the one with the
   lowest final training loss on the whole training set (diverged runs never win);
4. approximation quality: at evenly spaced checkpoints of the best run of the
   *trajectory* method (SGD by default — the baseline, so the checkpoints favour no
   natural-gradient method), on fixed evaluation batches, γ of EF, iEF, SF, K-FAC,
   EKFAC and exact NGD under Wu et al.'s protocols (:mod:`refngd.experiments.gamma_study`):
   E1 (near-zero damping, γ̄_X/γ̄_SGD ± standard error and γ̄_X/γ̄*) and E3 (one absolute
   damping grid, the same for every method), and refngd's "best over damping" summary;
   the opt-in methods whose direction depends on their optimizer state
   (:data:`OWN_TRAJECTORY_METHODS`) are scored E1-style at the same step numbers of
   *their own* best run, with the state recorded there (``gamma.own_trajectory``);
5. a table, a JSON record and PNG plots; with ``seeds > 1`` all of it once per seed and
   a table of mean ± standard deviation over the seeds.

No method gets weight decay, learning-rate schedules or tuned damping: every method runs
with the fixed hyper-parameters of :data:`METHODS` and only its learning rate is chosen.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

from ..backend import as_generator
from ..losses import CrossEntropy
from ..optim.adafisher import AdaFisher
from ..optim.baselines import SGD, Adafactor, Adam, AdamW
from .data import load_digits, load_npz
from .gamma_study import (DEFAULT_DAMPINGS, E1_DAMPING, GAMMA_METHODS, batch_gammas, best_over_damping,
                          checkpoint_imbalance, direction_gammas, direction_summary, e1_summary,
                          e3_summary)
from ..optim.fadam import FAdam
from .models import build_model
from ..optim.natural import EF, IEF, NGD, SF
from ..optim.records import fmt, format_table, save_json
from ..optim.train import progress_bar, train


@dataclass(frozen=True)
class Method:
    """A method of the comparison: display label, optimizer factory ``make(lr)``, lr grid."""

    label: str
    make: Callable
    lr_grid: tuple
    settings: str  #: the fixed hyper-parameters, for the docs and the record


def _ladder(center: float) -> tuple:
    """Five learning rates around ``center`` on the 1–3–10 scale (steps of ≈ √10).

    ``_ladder(0.1) == (0.01, 0.03, 0.1, 0.3, 1.0)``; ``_ladder(0.03) == (0.003, 0.01, 0.03, 0.1, 0.3)``.
    """
    scale = sorted(m * 10.0**e for e in range(-7, 5) for m in (1, 3))
    i = min(range(len(scale)), key=lambda j: abs(math.log(scale[j] / center)))
    return tuple(float(f"{v:.0e}") for v in scale[i - 2:i + 3])


def _kfac_methods() -> dict:
    from ..optim.kfac import EKFAC, KFAC

    return {
        "kfac": Method("K-FAC", lambda lr: KFAC(lr=lr), _ladder(1.0),
                       "K-FAC defaults: MC Fisher (1 sample), EMA 0.95, inverse every 20 steps, "
                       "factored damping 1e-3, KL-clip 1e-3"),
        "ekfac": Method("EKFAC", lambda lr: EKFAC(lr=lr), _ladder(0.3),
                        "EKFAC defaults: MC Fisher (1 sample), EMA 0.95, eigenbasis every 20 "
                        "steps, damping 1e-3, KL-clip 1e-3"),
    }


METHODS: dict[str, Method] = {
    "sgd": Method("SGD", lambda lr: SGD(lr, momentum=0.9), _ladder(0.1), "momentum 0.9"),
    "adam": Method("Adam", lambda lr: Adam(lr), _ladder(0.01), "β = (0.9, 0.999), ε = 1e-8"),
    "adamw": Method("AdamW", lambda lr: AdamW(lr, weight_decay=0.0), _ladder(0.01),
                    "as Adam (no weight decay in compare)"),
    "adafactor": Method("Adafactor", lambda lr: Adafactor(lr=lr), _ladder(0.03),
                        "relative step ρ = lr, parameter scaling, no momentum"),
    "ngd": Method("NGD", lambda lr: NGD(lr, damping=1e-3), _ladder(0.1), "exact Fisher, λ = 1e-3"),
    "ef": Method("EF", lambda lr: EF(lr, damping=1e-3), _ladder(0.3),
                 "Gram form λ = 1e-3, update normalised to ‖g‖"),
    "ief": Method("iEF", lambda lr: IEF(lr, damping=1e-3), _ladder(10.0), "Gram form λ = 1e-3"),
    "sf": Method("SF", lambda lr: SF(lr, damping=1e-3), _ladder(1.0),
                 "1 MC sample, λ = 1e-3, update normalised to ‖g‖"),
    "adafisher": Method("AdaFisher", lambda lr: AdaFisher(lr), _ladder(0.1),
                        "β = 0.9, λ = 1e-3, EMA (0.92, 0.08), factors every step"),
    "fadam": Method("FAdam", lambda lr: FAdam(lr, weight_decay=0.0), _ladder(0.03),
                    "β = (0.9, 0.999), clip 1, adaptive ε, no weight decay"),
}
METHODS.update(_kfac_methods())


def _second_order_adaptive_methods() -> dict:
    """Opt-in (not in DEFAULT_METHODS): root-free, inverse-free and AdamQLR (docs/optim.md)."""
    from ..optim.adamqlr import AdamQLR
    from ..optim.rootfree import RFAdam, RFRMSProp
    from ..optim.singd import IKFAC, INGD
    from ..optim.sirfshampoo import SIRFShampoo

    return {
        "rfadam": Method("RF-Adam", lambda lr: RFAdam(lr), _ladder(3.0),
                         "root-free AdamW (Lin et al. 2024a): β = (0.9, 0.999), λ = 1e-4, s₀ = 1, "
                         "no bias correction, no weight decay"),
        "rfrmsprop": Method("RF-RMSProp", lambda lr: RFRMSProp(lr, momentum=0.9), _ladder(0.03),
                            "root-free RMSProp (Lin et al. 2024a, Fig. 4; β₂ = 0.01 the reference "
                            "code's default): λ = 1e-4, "
                            "momentum 0.9"),
        "ikfac": Method("IKFAC", lambda lr: IKFAC(lr, update_every=1), _ladder(0.03),
                        "inverse-free K-FAC (Lin et al. 2024b): empirical Fisher, β₁ = 1e-2, "
                        "λ = 1e-3, momentum 0.9, factors every step"),
        "ingd": Method("INGD", lambda lr: INGD(lr, update_every=1), _ladder(0.001),
                       "INGD (Lin et al. 2024b, Fig. 4): as IKFAC plus traces and α₁ = 0.5"),
        "sirfshampoo": Method("SIRFShampoo", lambda lr: SIRFShampoo(lr), _ladder(0.03),
                              "inverse-, root-free Shampoo (Lin et al. 2024a; sirfshampoo defaults): "
                              "β₂ = 1e-2, α₁ = 0.9, α₂ = 0.5, λ = 1e-3, factors every step"),
        "adamqlr": Method("AdamQLR", lambda lr: AdamQLR.untuned(lr_scale=lr), (1.0,),
                          "untuned AdamQLR (Clarke & Hernández-Lobato 2024, camera-ready): exact "
                          "Fisher step size, no clipping, λ₀ = 1e-3, ω = (0.5, 2); the 'lr' scales "
                          "the chosen step (1 = the paper's method)"),
    }


METHODS.update(_second_order_adaptive_methods())
#: methods whose direction depends on their optimizer state (``opt.direction(θ, state, ...)``):
#: the γ study scores them at checkpoints of their *own* best run (``gamma.own_trajectory``)
OWN_TRAJECTORY_METHODS = tuple(_second_order_adaptive_methods())

DEFAULT_METHODS = ("sgd", "adam", "ngd", "ef", "ief", "sf", "kfac", "ekfac", "adafisher", "fadam")


@dataclass
class CompareConfig:
    """Settings of one comparison (the command-line options of ``refngd compare``)."""

    methods: tuple = DEFAULT_METHODS
    model: str = "mlp"
    data: str | None = None
    epochs: int = 10
    batch_size: int = 64
    lr: dict = field(default_factory=dict)  #: method → list of learning rates (overrides the grid)
    seed: int = 0
    out: str = "results"
    progress: bool | None = None
    gamma: bool = True
    gamma_checkpoints: int = 6
    gamma_batches: int = 8
    gamma_methods: tuple = GAMMA_METHODS
    gamma_dampings: tuple = DEFAULT_DAMPINGS  #: absolute, P × P Tikhonov convention (E3, best)
    e1_damping: float = E1_DAMPING
    seeds: int = 1  #: run everything for seeds seed, seed + 1, …, seed + seeds − 1
    max_steps: int | None = None
    test_fraction: float = 0.2

    def check(self) -> None:
        if self.data is not None and (not isinstance(self.data, str) or not self.data.strip()):
            raise ValueError(f"--data needs the path of an .npz file, got {self.data!r}; "
                             "leave --data out to use the bundled digits.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}.")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}.")
        if not self.methods:
            raise ValueError("--methods needs at least one method.")
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods lists a method twice: {list(self.methods)}.")
        bad = [m for m in self.lr if m not in self.methods]
        if bad:
            raise ValueError(f"--lr names method(s) {bad} that are not in --methods {list(self.methods)}.")
        for m, lrs in self.lr.items():
            if not lrs or any(not (isinstance(v, float) and math.isfinite(v) and v > 0) for v in lrs):
                raise ValueError(f"--lr {m}=...: learning rates must be positive numbers, got {lrs}.")
        for name in ("epochs", "batch_size", "gamma_checkpoints", "gamma_batches", "seeds"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}.")

    def grid(self, method: str) -> tuple:
        return tuple(self.lr.get(method, METHODS[method].lr_grid))


def run_compare(config: CompareConfig, log=print, on_method: Callable | None = None) -> dict:
    """Run the comparison of ``config``; returns its record (write it with :func:`write_outputs`).

    ``log`` receives the progress lines (``print`` by default); ``on_method(key, rec)`` is
    called as each method finishes (``refngd compare`` saves it at once:
    :class:`refngd.experiments.run_output.RunOutput`).  With ``config.seeds > 1`` the
    whole comparison runs once per seed (``on_method`` then gets keys ``"seed S/METHOD"``)
    and the record aggregates them (:func:`aggregate_seeds`).
    """
    config.check()
    if config.seeds > 1:
        records = []
        for k in range(config.seeds):
            log(f"— seed {config.seed + k} ({k + 1} of {config.seeds}) —")
            seed = config.seed + k
            hook = None if on_method is None else (
                lambda m, rec, seed=seed: on_method(f"seed {seed}/{m}", rec))
            records.append(run_compare(replace(config, seed=seed, seeds=1), log, hook))
        return aggregate_seeds(records)
    t_start = time.perf_counter()
    data = (load_npz(config.data, config.test_fraction, config.seed) if config.data
            else load_digits(config.test_fraction, config.seed)).for_model(config.model)
    model = build_model(config.model, data.input_shape, data.num_classes)
    loss = CrossEntropy()
    theta0 = model.init(as_generator(config.seed))
    log(f"refngd compare: {data.name} ({data.X_train.shape[0]} train / {data.X_test.shape[0]} test, "
        f"{data.num_classes} classes), {config.model} with {model.num_params} parameters, "
        f"{config.epochs} epoch{'s' if config.epochs != 1 else ''} of batch {config.batch_size}, "
        f"seed {config.seed}")
    trajectory = "sgd" if "sgd" in config.methods else config.methods[0]
    per_epoch = math.ceil(data.X_train.shape[0] / config.batch_size)
    total = config.epochs * per_epoch if config.max_steps is None else min(config.max_steps, config.epochs * per_epoch)
    n_ck = config.gamma_checkpoints
    ck_steps = sorted({round(i * total / max(1, n_ck - 1)) for i in range(n_ck)}) if config.gamma else []
    eval_every = max(1, per_epoch // 4)

    runs = [(m, lr) for m in config.methods for lr in config.grid(m)]
    outer = progress_bar(len(runs), config.progress, "compare", "run", leave=True)
    methods_rec, checkpoints, own_runs = {}, {}, {}
    for m in config.methods:
        spec = METHODS[m]
        rec = {"label": spec.label, "settings": spec.settings, "lr_grid": list(config.grid(m)),
               "runs": [], "best_lr": None, "best": None}
        best_res = None
        own = config.gamma and m in OWN_TRAJECTORY_METHODS  # score it at its own checkpoints
        for lr in config.grid(m):
            opt = spec.make(lr)
            res = train(model, theta0, loss, data.X_train, data.y_train, opt, epochs=config.epochs,
                        batch_size=config.batch_size, max_steps=config.max_steps, rng=config.seed,
                        X_test=data.X_test, y_test=data.y_test, eval_every=eval_every,
                        progress=config.progress, desc=f"{spec.label} lr={lr:g}",
                        checkpoints=ck_steps if m == trajectory or own else (), on_divergence="ignore",
                        record_state=own)
            rec["runs"].append({"lr": lr, "final_train_loss": res.final_train_loss,
                                "test_accuracy": res.evals["test_accuracy"][-1],
                                "seconds_per_step": res.seconds_per_step, "steps": res.steps,
                                "stopped": res.stopped})
            if best_res is None or res.final_train_loss < best_res[1].final_train_loss:
                best_res = (lr, res)
            if outer is not None:
                outer.update(1)
        lr, res = best_res
        grid = rec["lr_grid"]
        rec.update(best_lr=lr, best_on_grid_edge=len(grid) > 1 and lr in (min(grid), max(grid)),
                   best=res.to_dict(), final_train_loss=res.final_train_loss,
                   test_accuracy=res.evals["test_accuracy"][-1], seconds_per_step=res.seconds_per_step,
                   optimizer=spec.make(lr).hyperparameters())
        if m == trajectory:
            checkpoints = res.checkpoints
        if own:
            own_runs[m] = (lr, res.checkpoints, res.checkpoint_states)
        methods_rec[m] = rec
        if on_method is not None:
            on_method(m, rec)
    if outer is not None:
        outer.close()

    from .. import __version__

    record = {
        "refngd_version": __version__,
        "config": {**asdict(config), "methods": list(config.methods), "data": data.name,
                   "data_path": config.data,
                   "loss": "CrossEntropy(mean)", "num_params": model.num_params,
                   "model_repr": repr(model), "steps_per_epoch": per_epoch, "eval_every": eval_every},
        "data": data.describe(),
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                    "cpu_count": os.cpu_count()},
        "methods": methods_rec,
    }
    if config.gamma:
        record["gamma"] = _gamma_study(config, model, loss, data, checkpoints, trajectory, log, own_runs)
    record["table"] = summary_rows(record)
    record["seconds_total"] = time.perf_counter() - t_start
    return record


def _gamma_study(config, model, loss, data, checkpoints, trajectory, log, own_runs=None) -> dict:
    """E1 and E3 (and the best-over-damping summary) at the trajectory's checkpoints.

    ``own_runs``: {method: (best lr, {step: θ}, {step: state})} of the state-dependent
    methods, scored E1-style at their own checkpoints (``"own_trajectory"``).
    """
    rng = as_generator(config.seed + 1)
    N = data.X_train.shape[0]
    n = min(config.batch_size, N)
    idx = rng.permutation(N)
    batches = [idx[i * n:(i + 1) * n] for i in range(min(config.gamma_batches, max(1, N // n)))]
    dampings = sorted(set(float(v) for v in config.gamma_dampings) | {float(config.e1_damping)})
    log(f"γ evaluation: {len(checkpoints)} checkpoints of the {METHODS[trajectory].label} run × "
        f"{len(batches)} fixed batches of {n}")
    rows = []
    bar = progress_bar(len(checkpoints), config.progress, "γ evaluation", "checkpoint", leave=True)
    for step in sorted(checkpoints):
        theta = checkpoints[step]
        per = [batch_gammas(model, theta, loss, data.X_train[b], data.y_train[b],
                            methods=config.gamma_methods, dampings=dampings,
                            rng=as_generator(config.seed + 100 + k))
               for k, b in enumerate(batches)]
        rows.append({"step": step, "e1": e1_summary(per, config.e1_damping), "e3": e3_summary(per),
                     **checkpoint_imbalance(per)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    last = rows[-1] if rows else {"e1": {}, "e3": {}}
    out = {"trajectory": trajectory, "methods": list(config.gamma_methods),
           "batch_size": n, "batches": len(batches), "dampings": dampings,
           "e1_damping": config.e1_damping,
           "damping_convention": f"absolute λ in (M + λI)⁻¹, M the method's P × P matrix of the "
                                 f"loss as trained ({type(loss).__name__}, reduction="
                                 f"{loss.reduction!r}); Gram forms use λ/c",
           "checkpoints": rows, "e1": last["e1"], "e3": last["e3"]}
    if own_runs:
        out["own_trajectory"] = {m: _own_trajectory(config, model, loss, data, batches, m, *run)
                                 for m, run in own_runs.items()}
    return out


def _own_trajectory(config, model, loss, data, batches, method, lr, thetas, states) -> dict:
    """γ̄(d)/γ̄(g) ± s.e. and γ̄(d)/γ̄* of ``opt.direction(θ_k, state_k, ...)`` at the
    method's own checkpoints, on the study's fixed batches (the exact Fisher at θ_k)."""
    opt = METHODS[method].make(lr)
    rows = []
    for step in sorted(states):
        theta, state = thetas[step], states[step]
        per = []
        for k, b in enumerate(batches):
            X, y = data.X_train[b], data.y_train[b]
            d = opt.direction(theta, state, model, loss, X, y, rng=as_generator(config.seed + 100 + k))
            per.append(direction_gammas(model, theta, loss, X, y, d))
        rows.append({"step": step, **direction_summary(per)})
    return {"label": METHODS[method].label, "lr": lr,
            "direction": "opt.direction(θ, state, ...) with the state recorded at the checkpoint "
                         "of the method's own best run (its own damping)",
            "checkpoints": rows}


# ------------------------------------------------------------------------- seeds
def _stats(values: list) -> dict:
    """Mean and sample standard deviation over the seeds.

    A seed without a value (None) makes both None and a diverged or failed one (inf)
    makes them inf: an average over the seeds that happened to work would hide it.
    """
    if any(v is None for v in values):
        return {"mean": None, "sd": None, "values": list(values)}
    vals = [float(v) for v in values]
    if not all(math.isfinite(v) for v in vals):
        return {"mean": math.inf, "sd": None, "values": list(values)}
    n = len(vals)
    mean = sum(vals) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return {"mean": mean, "sd": sd, "values": list(values)}


def aggregate_seeds(records: list[dict]) -> dict:
    """One record for several seeds: per-method mean ± sd, E1/E3 averaged over seeds.

    ``gamma.e1[m]["mean_ratio"]`` is the mean over seeds of each seed's E1 ratio and
    ``"stderr"`` its standard error over seeds (sd/√K); ``gamma.e3[m]["ratios"]`` the mean
    curve.  The per-seed records stay under ``"per_seed"``.
    """
    first = records[0]
    seeds = [r["config"]["seed"] for r in records]
    methods = {}
    for m, rec in first["methods"].items():
        recs = [r["methods"][m] for r in records]
        methods[m] = {"label": rec["label"], "settings": rec["settings"], "lr_grid": rec["lr_grid"],
                      "best_lr": [r["best_lr"] for r in recs],
                      **{k: _stats([r[k] for r in recs])
                         for k in ("final_train_loss", "test_accuracy", "seconds_per_step")}}
    out = {"refngd_version": first["refngd_version"],
           "config": {**first["config"], "seed": seeds[0], "seeds": len(seeds)},
           "seeds": seeds, "methods": methods, "per_seed": records,
           "seconds_total": sum(r["seconds_total"] for r in records)}
    if all(r.get("gamma") and r["gamma"]["checkpoints"] for r in records):
        g0 = first["gamma"]
        e1, e3 = {}, {}
        for m in g0["methods"]:
            ratios = [r["gamma"]["e1"][m]["mean_ratio"] for r in records]
            st = _stats(ratios)
            e1[m] = {"mean_ratio": st["mean"], "sd": st["sd"], "sd_over": "seeds", "per_seed": ratios,
                     "stderr": st["sd"] / math.sqrt(len(ratios)) if st["sd"] is not None else None,
                     "stderr_over": "seeds", "damping": g0["e1_damping"],
                     "optimal_ratio": _stats([r["gamma"]["e1"][m]["optimal_ratio"] for r in records])["mean"]}
            curve = [_stats([r["gamma"]["e3"][m]["ratios"][i] for r in records])["mean"]
                     for i in range(len(g0["dampings"]))]
            curve = [math.inf if v is None else v for v in curve]
            e3[m] = {"dampings": list(g0["dampings"]), "ratios": curve, **best_over_damping(g0["dampings"], curve)}
        out["gamma"] = {k: g0[k] for k in ("trajectory", "methods", "batch_size", "batches",
                                           "dampings", "e1_damping", "damping_convention")}
        out["gamma"].update(e1=e1, e3=e3, checkpoint_step=g0["checkpoints"][-1]["step"])
    return out


def _format_seeds(record: dict) -> str:
    seeds = record["seeds"]
    head = ["method", "final train loss", "test accuracy", "ms / step", "best lr per seed"]
    body = []
    for m, rec in record["methods"].items():
        body.append([rec["label"], _msd(rec["final_train_loss"], ".4f"), _msd(rec["test_accuracy"], ".3f"),
                     _msd({k: (1e3 * v if isinstance(v, float) else v)
                           for k, v in rec["seconds_per_step"].items() if k != "values"}, ".2f"),
                     "/".join(f"{v:g}" for v in rec["best_lr"])])
    text = [format_table(head, body, "lrrrl"),
            f"(mean ± standard deviation over {len(seeds)} seeds: {', '.join(map(str, seeds))})"]
    gam = record.get("gamma")
    if gam:
        head = [f"last checkpoint (step {gam['checkpoint_step']})", "E1 γ̄/γ̄(g)", "per seed",
                "E1 γ̄/γ̄*", "best over damping", "at λ"]
        body, edge = [], False
        for m in gam["methods"]:
            e1, e3 = gam["e1"][m], gam["e3"][m]
            edge |= e3["best_on_grid_edge"]
            body.append([_label(m), _msd({"mean": e1["mean_ratio"], "sd": e1["sd"]}, ".3f"),
                         "/".join(fmt(v, ".3g") for v in e1["per_seed"]), fmt(e1["optimal_ratio"], ".3f"),
                         fmt(e3["best_ratio"], ".3f") + (" *" if e3["best_on_grid_edge"] else ""),
                         f"{e3['best_damping']:.0e}"])
        text += ["", format_table(head, body, "lrlrrr"),
                 f"(E1: λ = {gam['e1_damping']:g}, {gam['batches']} batches of {gam['batch_size']} per "
                 f"seed, mean ± sd over seeds; best over damping of the seed-averaged E3 curve)"]
        if edge:
            text.append("* best damping on the edge of the grid: a wider grid might do better.")
    return "\n".join(text)


def _msd(st: dict, spec: str) -> str:
    if st.get("mean") is None:
        return "—"
    return fmt(st["mean"], spec) + (f" ± {format(st['sd'], spec)}" if st.get("sd") is not None else "")


# ------------------------------------------------------------------------- output
def summary_rows(record: dict) -> list[dict]:
    rows = []
    for m, rec in record["methods"].items():
        rows.append({"method": rec["label"], "key": m, "best_lr": rec["best_lr"],
                     "best_on_grid_edge": rec["best_on_grid_edge"],
                     "final_train_loss": rec["final_train_loss"], "test_accuracy": rec["test_accuracy"],
                     "seconds_per_step": rec["seconds_per_step"],
                     "diverged_runs": sum(r["stopped"] is not None for r in rec["runs"])})
    return rows


def format_results(record: dict) -> str:
    """The printed tables: training results, then the γ study (one seed or several)."""
    if "per_seed" in record:
        return _format_seeds(record)
    head = ["method", "final train loss", "test accuracy", "ms / step", "best lr (grid)"]
    body = []
    for r in record["table"]:
        grid = "/".join(f"{v:g}" for v in record["methods"][r["key"]]["lr_grid"])
        edge = " *" if r["best_on_grid_edge"] else ""
        div = f", {r['diverged_runs']} diverged" if r["diverged_runs"] else ""
        body.append([r["method"], fmt(r["final_train_loss"], ".4f"), fmt(r["test_accuracy"], ".3f"),
                     fmt(1e3 * r["seconds_per_step"] if r["seconds_per_step"] is not None else None, ".2f"),
                     f"{r['best_lr']:g} ({grid}{div}){edge}"])
    text = [format_table(head, body, "lrrrl")]
    if any(r["best_on_grid_edge"] for r in record["table"]):
        text.append("* best learning rate on the edge of its grid.")
    gam = record.get("gamma")
    if gam and gam["checkpoints"]:
        text += ["", _format_e1(gam)]
        if gam.get("own_trajectory"):
            text += ["", _format_own(gam)]
        text += ["", _format_last(gam)]
    return "\n".join(text)


def _label(m: str) -> str:
    from .plots import LABELS

    return METHODS[m].label if m in METHODS else LABELS.get(m, m)


def _format_e1(gam: dict) -> str:
    steps = [c["step"] for c in gam["checkpoints"]]
    head = [f"E1: γ̄(d)/γ̄(g), λ = {gam['e1_damping']:g}"] + [f"step {s}" for s in steps]
    body = [[_label(m)] + [_pm(c["e1"][m]["mean_ratio"], c["e1"][m]["stderr"]) for c in gam["checkpoints"]]
            for m in gam["methods"]]
    imb = (["imbalance, refngd: max/mean ‖g_n‖²"]
           + [fmt(c["imbalance"], ".1f") for c in gam["checkpoints"]])
    imb_paper = (["imbalance, Wu et al.: max/min ‖g_n‖"]
                 + [fmt(c.get("imbalance_paper"), ".1f") for c in gam["checkpoints"]])
    return "\n".join([format_table(head, body + [imb, imb_paper], "l" + "r" * len(steps)),
                      f"(Wu et al.'s first evaluation: ratio of mean γ over {gam['batches']} fixed batches "
                      f"of {gam['batch_size']} ± refngd's standard error (the paper's error "
                      f"bars are 1-σ sd: e1.sd in compare.json), checkpoints of the "
                      f"{_label(gam['trajectory'])} run; below 1 beats SGD)"])


def _format_own(gam: dict) -> str:
    """E1-style ratios of the state-dependent methods at their own runs' checkpoints."""
    own = gam["own_trajectory"]
    steps = sorted({c["step"] for rec in own.values() for c in rec["checkpoints"]})
    head = ["E1-style, own checkpoints"] + [f"step {s}" for s in steps]
    body = []
    for rec in own.values():
        at = {c["step"]: c for c in rec["checkpoints"]}
        body.append([f"{rec['label']} γ̄/γ̄(g)"] + [_pm(at[s]["mean_ratio"], at[s]["stderr"]) if s in at else "—"
                                                   for s in steps])
        body.append([f"{rec['label']} γ̄/γ̄*"] + [fmt(at[s]["optimal_ratio"], ".3f") if s in at else "—"
                                                 for s in steps])
    return "\n".join([format_table(head, body, "l" + "r" * len(steps)),
                      f"(at each method's OWN checkpoints: θ and optimizer state at these steps of its "
                      f"own best run, so θ differs from the {_label(gam['trajectory'])} checkpoints "
                      f"above; its direction with its own damping, on the same {gam['batches']} "
                      f"batches of {gam['batch_size']} ± standard error; step 0 is the initial state)"])


def _format_last(gam: dict) -> str:
    step = gam["checkpoints"][-1]["step"]
    head = [f"last checkpoint (step {step})", "E1 γ̄/γ̄(g)", "E1 γ̄/γ̄*", "best over damping", "at λ"]
    body, edge = [], False
    for m in gam["methods"]:
        e1, e3 = gam["e1"][m], gam["e3"][m]
        edge |= e3["best_on_grid_edge"]
        body.append([_label(m), _pm(e1["mean_ratio"], e1["stderr"]), fmt(e1["optimal_ratio"], ".3f"),
                     fmt(e3["best_ratio"], ".3f") + (" *" if e3["best_on_grid_edge"] else ""),
                     f"{e3['best_damping']:.0e}"])
    lo, hi = min(gam["dampings"]), max(gam["dampings"])
    notes = [f"(γ̄* = γ̄ of the exact undamped natural gradient, the optimum: E1 γ̄/γ̄* ≥ 1 is the "
             f"distance from optimal. Best over damping is refngd's summary, not the paper's: the "
             f"same absolute grid {lo:.0e}…{hi:.0e} for every method, P × P Tikhonov convention)"]
    if edge:
        notes.append("* best damping on the edge of the grid: a wider grid might do better.")
    return "\n".join([format_table(head, body, "lrrrr")] + notes)


def _pm(v, se) -> str:
    return fmt(v, ".3f") + (f" ± {se:.3f}" if se is not None and math.isfinite(v) else "")


def write_outputs(record: dict, out_dir: str, plots: bool = True) -> list[str]:
    """``compare.json``, ``table.md`` and (with matplotlib) the PNG plots in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "compare.json"), os.path.join(out_dir, "table.md")]
    save_json(record, paths[0])
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(format_results(record) + "\n")
    if plots:
        from .plots import plot_all

        # several seeds: the figures show the first seed's runs (the table has them all)
        paths += plot_all(record["per_seed"][0] if "per_seed" in record else record, out_dir)
    return paths
