"""The grid of ``refngd compare`` as units of work: plan them, run them, assemble the record.

For each seed, the units (:mod:`refngd.experiments.units`) and what each waits for:

1. a ``train`` unit per method and learning rate of its grid — all submitted at once;
2. when every learning rate of a method has finished, the method's record is complete
   (its best learning rate chosen exactly as before: the lowest final training loss, the
   first of equals in grid order) and ``on_method`` is called;
3. when the *trajectory* method (SGD by default) is complete, a ``gamma`` unit per
   checkpoint its best run reached and per fixed batch;
4. when a state-dependent opt-in method is complete, an ``own`` unit per checkpoint and
   batch of its best run.

The executor (:mod:`refngd.experiments.executors`) decides where and in what order the
units run; the record is assembled from their results in the grid's own order (methods,
learning rates, checkpoints and batches as configured), never in completion order, and
each unit owns its random streams — so the record is the same in-process and on any
cluster.  Every result passes through :func:`~refngd.experiments.units.encode_exact`
and back, also in-process, so a result read back by ``--resume`` is indistinguishable
from a fresh one.
"""
from __future__ import annotations

import os
import platform
import sys
from collections import deque
from dataclasses import asdict, dataclass, field

from ..backend import as_generator
from .data import load_digits, load_npz
from ..losses import CrossEntropy
from .gamma_study import checkpoint_imbalance, direction_summary, e1_summary, e3_summary
from .methods import METHODS, OWN_TRAJECTORY_METHODS
from .models import build_model
from .units import Unit, checkpoint_steps, decode_exact, run_gamma, run_own, run_train


@dataclass
class _Seed:
    """One seed's plan and the results that have come back for it."""

    seed: int
    data: object  #: the Dataset, shaped for the model
    ref: object  #: the same, as the executor hands it to the units (a Dask future)
    num_params: int
    model_repr: str
    per_epoch: int
    ck_steps: list
    trajectory: str
    batches: list  #: index arrays of the fixed γ batches
    n: int  #: their size
    dampings: list
    runs: dict = field(default_factory=dict)  #: (method, lr) → train result
    best: dict = field(default_factory=dict)  #: method → (lr, train result of its best run)
    methods: dict = field(default_factory=dict)  #: method → its record
    gammas: dict = field(default_factory=dict)  #: (step, batch) → batch_gammas result
    own: dict = field(default_factory=dict)  #: (method, step, batch) → direction_gammas result
    units: dict = field(default_factory=lambda: {k: 0 for k in ("train", "gamma", "own")})
    seconds: dict = field(default_factory=lambda: {k: 0.0 for k in ("train", "gamma", "own")})


class Grid:
    """The units of ``config``'s comparison, run on ``executor``; :meth:`run` returns the
    record of each seed.

    ``on_method(key, rec)`` as each method's runs have all finished; ``on_unit(unit,
    result)`` with each freshly computed unit's encoded result (``refngd compare`` saves
    it at once); ``done`` maps unit keys to results recorded by an earlier, interrupted
    run, which are taken instead of running those units again; ``threads``: BLAS
    threads per unit (None: leave them).
    """

    def __init__(self, config, executor, log=print, on_method=None, on_unit=None, done=None,
                 threads: int | None = None):
        self.config, self.executor, self.log = config, executor, log
        self.on_method, self.on_unit, self.done = on_method, on_unit, dict(done or {})
        self.threads, self.bar = threads, None
        self.ready: deque = deque()  # recorded results waiting to be taken up
        self.pending = 0
        self.seeds = [self._plan(config.seed + k, k) for k in range(config.seeds)]

    # ------------------------------------------------------------------ planning
    def _plan(self, seed: int, k: int) -> _Seed:
        config = self.config
        if config.seeds > 1:
            self.log(f"— seed {seed} ({k + 1} of {config.seeds}) —")
        data = (load_npz(config.data, config.test_fraction, seed) if config.data
                else load_digits(config.test_fraction, seed)).for_model(config.model)
        model = build_model(config.model, data.input_shape, data.num_classes)
        per_epoch, total, ck_steps = checkpoint_steps(config, data.X_train.shape[0])
        self.log(f"refngd compare: {data.name} ({data.X_train.shape[0]} train / "
                 f"{data.X_test.shape[0]} test, {data.num_classes} classes), {config.model} with "
                 f"{model.num_params} parameters, {config.epochs} epoch"
                 f"{'s' if config.epochs != 1 else ''} of batch {config.batch_size}, seed {seed}")
        N = data.X_train.shape[0]
        n = min(config.batch_size, N)
        idx = as_generator(seed + 1).permutation(N)
        batches = [idx[i * n:(i + 1) * n] for i in range(min(config.gamma_batches, max(1, N // n)))]
        dampings = sorted({float(v) for v in config.gamma_dampings} | {float(config.e1_damping)})
        trajectory = "sgd" if "sgd" in config.methods else config.methods[0]
        return _Seed(seed, data, self.executor.scatter(data), model.num_params, repr(model),
                     per_epoch, ck_steps, trajectory, batches, n, dampings)

    def expected_units(self) -> int:
        """How many units the grid will have if every run reaches every checkpoint."""
        c = self.config
        train = sum(len(set(c.grid(m))) for m in c.methods)
        per_ck = len(self.seeds[0].ck_steps) * len(self.seeds[0].batches)
        own = sum(m in OWN_TRAJECTORY_METHODS for m in c.methods) if c.gamma else 0
        return c.seeds * (train + per_ck * (int(c.gamma) + own))

    def _submit(self, unit: Unit, fn, *args) -> None:
        stored = self.done.get(unit.key)
        if stored is not None:
            self.ready.append((unit, stored))
        else:
            self.executor.submit(unit, fn, *args, self.threads)
            self.pending += 1

    # ------------------------------------------------------------------ running
    def run(self, bar=None) -> list[dict]:
        """Submit the training units, then the γ units as their runs finish; one record per seed.

        ``bar``: a progress bar (``update``, ``total``), advanced by one per unit.
        """
        c, self.bar = self.config, bar
        for s in self.seeds:
            for m in c.methods:
                ck = s.ck_steps if m == s.trajectory or self._own(m) else ()
                for lr in dict.fromkeys(c.grid(m)):  # a learning rate listed twice runs once
                    u = Unit("train", s.seed, m, lr)
                    self._submit(u, run_train, c, s.ref, u, ck, self._own(m))
        while self.ready or self.pending:
            if self.ready:
                unit, result = self.ready.popleft()
            else:
                unit, result = self.executor.next_done()
                self.pending -= 1
                if self.on_unit is not None:
                    self.on_unit(unit, result)
            self._take(unit, decode_exact(result))
            if self.bar is not None:
                self.bar.update(1)
        return [self._record(s) for s in self.seeds]

    def _own(self, method: str) -> bool:
        return self.config.gamma and method in OWN_TRAJECTORY_METHODS

    def _take(self, unit: Unit, result: dict) -> None:
        s = self.seeds[unit.seed - self.config.seed]
        s.units[unit.kind] += 1  # what its units cost, by kind (docs/compare.md)
        s.seconds[unit.kind] += result["seconds"]
        if unit.kind == "gamma":
            s.gammas[unit.step, unit.batch] = result["gammas"]
        elif unit.kind == "own":
            s.own[unit.method, unit.step, unit.batch] = result["gammas"]
        else:
            s.runs[unit.method, unit.lr] = result
            if all((unit.method, lr) in s.runs for lr in self.config.grid(unit.method)):
                self._method_done(s, unit.method)

    def _method_done(self, s: _Seed, m: str) -> None:
        c, spec = self.config, METHODS[m]
        grid = list(c.grid(m))
        runs = [s.runs[m, lr] for lr in grid]
        best = None
        for lr, res in zip(grid, runs):  # the first of equal losses wins, as it always did
            if best is None or res["run"]["final_train_loss"] < best[1]["run"]["final_train_loss"]:
                best = (lr, res)
        lr, res = best
        rec = {"label": spec.label, "settings": spec.settings, "lr_grid": grid,
               "runs": [r["run"] for r in runs], "best_lr": lr, "best": res["result"],
               "best_on_grid_edge": len(grid) > 1 and lr in (min(grid), max(grid)),
               "final_train_loss": res["run"]["final_train_loss"],
               "test_accuracy": res["run"]["test_accuracy"],
               "seconds_per_step": res["run"]["seconds_per_step"],
               "optimizer": spec.make(lr).hyperparameters()}
        s.methods[m], s.best[m] = rec, best
        if self.on_method is not None:
            self.on_method(m if c.seeds == 1 else f"seed {s.seed}/{m}", rec)
        ks = range(len(s.batches))
        if m == s.trajectory and c.gamma:
            steps = sorted(res["checkpoints"])
            self.log(f"γ evaluation (seed {s.seed}): {len(steps)} checkpoints of the "
                     f"{spec.label} run × {len(s.batches)} fixed batches of {s.n}")
            self._shrink(len(s.ck_steps) - len(steps), len(s.batches))
            for step in steps:
                for k in ks:
                    u = Unit("gamma", s.seed, step=step, batch=k)
                    self._submit(u, run_gamma, c, s.ref, u, res["checkpoints"][step],
                                 s.batches[k], s.dampings)
        if self._own(m):
            self._shrink(len(s.ck_steps) - len(res["states"]), len(s.batches))
            for step in sorted(res["states"]):
                for k in ks:
                    u = Unit("own", s.seed, m, lr, step=step, batch=k)
                    self._submit(u, run_own, c, s.ref, u, res["checkpoints"][step],
                                 res["states"][step], s.batches[k])

    def _shrink(self, missing_checkpoints: int, batches: int) -> None:
        """A best run that stopped early reached fewer checkpoints: fewer units than planned."""
        if self.bar is not None and missing_checkpoints > 0:
            self.bar.total -= missing_checkpoints * batches
            self.bar.refresh()

    # ------------------------------------------------------------------ the record
    def _record(self, s: _Seed) -> dict:
        from .. import __version__

        c, data = self.config, s.data
        record = {
            "refngd_version": __version__,
            "config": {**asdict(c), "seed": s.seed, "seeds": 1, "methods": list(c.methods),
                       "data": data.name, "data_path": c.data, "loss": "CrossEntropy(mean)",
                       "num_params": s.num_params, "model_repr": s.model_repr,
                       "steps_per_epoch": s.per_epoch, "eval_every": max(1, s.per_epoch // 4)},
            "data": data.describe(),
            "machine": {"python": sys.version.split()[0], "platform": platform.platform(),
                        "cpu_count": os.cpu_count()},
            "methods": {m: s.methods[m] for m in c.methods},
        }
        if c.gamma:
            record["gamma"] = self._gamma(s)
        record["table"] = summary_rows(record)
        record["units"] = {"count": dict(s.units), "seconds": dict(s.seconds)}
        record["seconds_total"] = sum(s.seconds.values())
        return record

    def _gamma(self, s: _Seed) -> dict:
        """E1 and E3 (and the best-over-damping summary) at the trajectory's checkpoints."""
        c, nb, loss = self.config, len(s.batches), CrossEntropy()
        rows = []
        for step in sorted({st for st, _ in s.gammas}):
            per = [s.gammas[step, k] for k in range(nb)]
            rows.append({"step": step, "e1": e1_summary(per, c.e1_damping), "e3": e3_summary(per),
                         **checkpoint_imbalance(per)})
        last = rows[-1] if rows else {"e1": {}, "e3": {}}
        out = {"trajectory": s.trajectory, "methods": list(c.gamma_methods),
               "batch_size": s.n, "batches": nb, "dampings": s.dampings,
               "e1_damping": c.e1_damping,
               "damping_convention": f"absolute λ in (M + λI)⁻¹, M the method's P × P matrix of "
                                     f"the loss as trained ({type(loss).__name__}, reduction="
                                     f"{loss.reduction!r}); Gram forms use λ/c",
               "checkpoints": rows, "e1": last["e1"], "e3": last["e3"]}
        own = [m for m in c.methods if self._own(m)]
        if own:
            out["own_trajectory"] = {}
            for m in own:
                lr, res = s.best[m]
                steps = sorted(res["states"])
                out["own_trajectory"][m] = {
                    "label": METHODS[m].label, "lr": lr,
                    "direction": "opt.direction(θ, state, ...) with the state recorded at the "
                                 "checkpoint of the method's own best run (its own damping)",
                    "checkpoints": [{"step": st, **direction_summary([s.own[m, st, k]
                                                                       for k in range(nb)])}
                                    for st in steps]}
        return out


def summary_rows(record: dict) -> list[dict]:
    """The record's ``table``: one row per method with its best run's numbers."""
    rows = []
    for m, rec in record["methods"].items():
        rows.append({"method": rec["label"], "key": m, "best_lr": rec["best_lr"],
                     "best_on_grid_edge": rec["best_on_grid_edge"],
                     "final_train_loss": rec["final_train_loss"], "test_accuracy": rec["test_accuracy"],
                     "seconds_per_step": rec["seconds_per_step"],
                     "diverged_runs": sum(r["stopped"] is not None for r in rec["runs"])})
    return rows


__all__ = ["Grid", "summary_rows"]
