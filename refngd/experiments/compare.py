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
with the fixed hyper-parameters of :data:`~refngd.experiments.methods.METHODS` and only its
learning rate is chosen.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Callable

from ..optim.records import fmt, format_table, save_json
from ..optim.train import progress_bar
from .gamma_study import DEFAULT_DAMPINGS, E1_DAMPING, GAMMA_METHODS, best_over_damping
from .methods import DEFAULT_METHODS, METHODS, OWN_TRAJECTORY_METHODS, Method

__all__ = ["CompareConfig", "run_compare", "aggregate_seeds", "format_results", "write_outputs",
           "METHODS", "DEFAULT_METHODS", "OWN_TRAJECTORY_METHODS", "Method"]


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


def run_compare(config: CompareConfig, log=print, on_method: Callable | None = None, *,
                client=None, on_unit: Callable | None = None, done: dict | None = None,
                threads: int | None = None) -> dict:
    """Run the comparison of ``config``; returns its record (write it with :func:`write_outputs`).

    The comparison is a grid of units of work (:mod:`refngd.experiments.grid`): one
    training run per seed, method and learning rate, one γ evaluation per seed,
    checkpoint and batch.  They run in this process, one after another (the default), or
    on the workers of ``client``, a ``dask.distributed.Client`` (docs/compare.md, "On a
    cluster"); the record is the same either way.

    Parameters
    ----------
    config : the settings (checked here).
    log : receives the progress lines (``print`` by default).
    on_method : ``on_method(key, rec)`` as each method's training runs have all finished
        (``refngd compare`` saves it at once: :class:`refngd.experiments.run_output.RunOutput`);
        with ``config.seeds > 1`` the keys are ``"seed S/METHOD"``.
    client : a ``dask.distributed.Client`` to run the units on (None: in-process).
    on_unit : ``on_unit(unit, result)`` as each unit finishes, with its
        :class:`~refngd.experiments.units.Unit` and encoded result.
    done : unit key → result of units recorded by an interrupted run (``--resume``):
        they are not run again.
    threads : BLAS threads while a unit runs (None: as they are).

    With ``config.seeds > 1`` the record aggregates the seeds' records (:func:`aggregate_seeds`).
    """
    from .executors import DaskExecutor, InProcess
    from .grid import Grid

    config.check()
    t_start = time.perf_counter()
    executor = InProcess() if client is None else DaskExecutor(client)
    bar = None
    try:
        grid = Grid(config, executor, log, on_method, on_unit, done, threads)
        bar = progress_bar(grid.expected_units(), config.progress, "compare", "unit", leave=True)
        records = grid.run(bar)
    finally:
        executor.close()  # on Ctrl-C or an error: cancel what has not run
        if bar is not None:
            bar.close()
    record = records[0] if config.seeds == 1 else aggregate_seeds(records)
    record["seconds_wall"] = time.perf_counter() - t_start
    return record


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
           "units": {part: {kind: sum(r["units"][part][kind] for r in records)
                            for kind in first["units"][part]} for part in ("count", "seconds")},
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
