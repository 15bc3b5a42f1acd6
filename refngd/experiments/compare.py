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
   natural-gradient method), on fixed evaluation batches, γ(d)/γ(g) of EF, iEF, SF,
   K-FAC, EKFAC and exact NGD with the damping swept over a grid
   (:func:`refngd.experiments.gamma_ratios`); best ratio per method reported;
5. a table, a JSON record and PNG plots.

No method gets weight decay, learning-rate schedules or tuned damping: every method runs
with the fixed hyper-parameters of :data:`METHODS` and only its learning rate is chosen.
"""
from __future__ import annotations

import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..backend import as_generator
from ..losses import CrossEntropy
from ..optim.adafisher import AdaFisher
from ..optim.baselines import SGD, Adafactor, Adam, AdamW
from .data import load_digits, load_npz
from .gamma_study import GAMMA_METHODS, average_gamma, gamma_ratios
from ..optim.fadam import FAdam
from .models import build_model
from ..optim.natural import EF, IEF, NGD, SF
from .results import fmt, format_table, save_json
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
    gamma_batches: int = 4
    gamma_methods: tuple = GAMMA_METHODS
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
        for name in ("epochs", "batch_size", "gamma_checkpoints", "gamma_batches"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be an integer >= 1, got {v!r}.")

    def grid(self, method: str) -> tuple:
        return tuple(self.lr.get(method, METHODS[method].lr_grid))


def run_compare(config: CompareConfig, log=print, on_method: Callable | None = None) -> dict:
    """Run the comparison of ``config``; returns its record (write it with :func:`write_outputs`).

    ``log`` receives the progress lines (``print`` by default); ``on_method(key, rec)`` is
    called as each method finishes (``refngd compare`` saves it at once:
    :class:`refngd.experiments.run_output.RunOutput`).
    """
    config.check()
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
    methods_rec, checkpoints = {}, {}
    for m in config.methods:
        spec = METHODS[m]
        rec = {"label": spec.label, "settings": spec.settings, "lr_grid": list(config.grid(m)),
               "runs": [], "best_lr": None, "best": None}
        best_res = None
        for lr in config.grid(m):
            opt = spec.make(lr)
            res = train(model, theta0, loss, data.X_train, data.y_train, opt, epochs=config.epochs,
                        batch_size=config.batch_size, max_steps=config.max_steps, rng=config.seed,
                        X_test=data.X_test, y_test=data.y_test, eval_every=eval_every,
                        progress=config.progress, desc=f"{spec.label} lr={lr:g}",
                        checkpoints=ck_steps if m == trajectory else (), on_divergence="ignore")
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
        record["gamma"] = _gamma_study(config, model, loss, data, checkpoints, trajectory, log)
    record["table"] = summary_rows(record)
    record["seconds_total"] = time.perf_counter() - t_start
    return record


def _gamma_study(config, model, loss, data, checkpoints, trajectory, log) -> dict:
    """γ ratios at the trajectory's checkpoints on ``gamma_batches`` fixed batches."""
    rng = as_generator(config.seed + 1)
    N = data.X_train.shape[0]
    n = min(config.batch_size, N)
    idx = rng.permutation(N)
    batches = [idx[i * n:(i + 1) * n] for i in range(min(config.gamma_batches, max(1, N // n)))]
    log(f"γ evaluation: {len(checkpoints)} checkpoints of the {METHODS[trajectory].label} run × "
        f"{len(batches)} fixed batches of {n}")
    rows = []
    bar = progress_bar(len(checkpoints), config.progress, "γ evaluation", "checkpoint", leave=True)
    for step in sorted(checkpoints):
        theta = checkpoints[step]
        tables = [gamma_ratios(model, theta, loss, data.X_train[b], data.y_train[b],
                               methods=config.gamma_methods, rng=as_generator(config.seed + 100 + k))
                  for k, b in enumerate(batches)]
        rows.append({"step": step, "table": average_gamma(tables)})
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"trajectory": trajectory, "methods": list(config.gamma_methods),
            "batch_size": n, "batches": len(batches), "checkpoints": rows,
            "note": "best over the damping grid of the mean (over batches) γ(d)/γ(g); "
                    "λ = τ × mean eigenvalue of the damped matrix"}


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
    """The printed tables: training results, then the γ ratios."""
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
    if gam:
        steps = [c["step"] for c in gam["checkpoints"]]
        head = ["γ(d)/γ(g), best over damping"] + [f"step {s}" for s in steps]
        body = []
        for m in gam["methods"]:
            body.append([METHODS[m].label if m in METHODS else m] +
                        [fmt(c["table"][m]["best_ratio"], ".3f") for c in gam["checkpoints"]])
        text.append("")
        text.append(format_table(head, body, "l" + "r" * len(steps)))
        text.append(f"(checkpoints of the {METHODS[gam['trajectory']].label} run; {gam['batches']} "
                    f"fixed batches of {gam['batch_size']}; below 1 beats SGD, NGD is the optimum)")
    return "\n".join(text)


def write_outputs(record: dict, out_dir: str, plots: bool = True) -> list[str]:
    """``compare.json``, ``table.md`` and (with matplotlib) the PNG plots in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, "compare.json"), os.path.join(out_dir, "table.md")]
    save_json(record, paths[0])
    with open(paths[1], "w", encoding="utf-8") as f:
        f.write(format_results(record) + "\n")
    if plots:
        from .plots import plot_all

        paths += plot_all(record, out_dir)
    return paths
