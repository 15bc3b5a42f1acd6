"""Figures of a ``refngd compare`` record (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

import os

import numpy as np

#: one fixed colour and line style per method, so that every figure reads alike
STYLE = {
    "sgd": ("#7f7f7f", "-"), "adam": ("#17becf", "-"), "adamw": ("#17becf", "--"),
    "adafactor": ("#bcbd22", "-"), "ngd": ("#000000", "-"), "ef": ("#d62728", "-"),
    "ief": ("#2ca02c", "-"), "sf": ("#ff7f0e", "-"), "kfac": ("#1f77b4", "-"),
    "ekfac": ("#9467bd", "-"), "adafisher": ("#8c564b", "--"), "fadam": ("#e377c2", "--"),
    "rfadam": ("#17becf", ":"), "rfrmsprop": ("#bcbd22", ":"), "ikfac": ("#1f77b4", ":"),
    "ingd": ("#9467bd", ":"), "adamqlr": ("#e377c2", "-."), "sirfshampoo": ("#2ca02c", ":"),
    "kfac_mc": ("#1f77b4", "--"), "kfac_emp": ("#d62728", "--"), "kfac_ief": ("#2ca02c", "--"),
}

#: γ-ratio markers: NGD, K-FAC and EKFAC often lie within 3 % of each other, so each method
#: has its own marker (NGD open and on top) and a small sideways offset (plot_gamma)
MARKERS = {"ngd": "s", "kfac": "^", "ekfac": "v", "ef": "o", "ief": "D", "sf": "P"}


LABELS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW", "adafactor": "Adafactor", "ngd": "NGD",
          "ef": "EF", "ief": "iEF", "sf": "SF", "kfac": "K-FAC", "ekfac": "EKFAC",
          "adafisher": "AdaFisher", "fadam": "FAdam", "rfadam": "RF-Adam", "rfrmsprop": "RF-RMSProp",
          "ikfac": "IKFAC", "ingd": "INGD", "adamqlr": "AdamQLR", "sirfshampoo": "SIRFShampoo",
          # Wu et al. (2024), App. D.2.2 / Fig. 5, with the paper's names in brackets
          "kfac_mc": "MC K-FAC [KFAC]", "kfac_emp": "empirical K-FAC [eKFAC]",
          "kfac_ief": "iEF K-FAC [ieKFAC]"}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ImportError("plots need matplotlib: pip install 'refngd[cli]'.") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _style(method: str):
    color, ls = STYLE.get(method, (None, "-"))
    return {"color": color, "linestyle": ls, "linewidth": 1.6}


def _nums(values) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def _finish(plt, fig, ax, path: str) -> str:
    """Grid, legend, layout; save the figure to ``path`` and close it."""
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_loss(record: dict, path: str, x: str = "step") -> str:
    """Training loss (whole training set) of each method's best run against steps or seconds."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    key = {"step": "step", "time": "time"}[x]
    for method, res in record["methods"].items():
        best = res.get("best")
        if not best:
            continue
        ev = best["evals"]
        xs, ys = _nums(ev[key]), _nums(ev["train_loss"])
        ok = np.isfinite(ys) & (ys > 0) & (xs > 0 if x == "time" else True)
        label = f"{res['label']} (lr={res['best_lr']:g})"
        ax.plot(xs[ok], ys[ok], label=label, **_style(method))
    ax.set_yscale("log")
    if x == "time":  # methods differ in cost by orders of magnitude
        ax.set_xscale("log")
    ax.set_xlabel("optimizer steps" if x == "step" else "seconds in optimizer steps (log scale)")
    ax.set_ylabel("training loss (whole training set)")
    cfg = record["config"]
    ax.set_title(f"{cfg['data']} · {cfg['model']} · batch {cfg['batch_size']} · best lr per method",
                 fontsize=10)
    return _finish(plt, fig, ax, path)


def _log_ratio_axis(ax) -> None:
    """A log y axis for ratios around 1 with plain-number labels on both sides of 1.

    Ratios often span less than a decade (e.g. 0.6–1.3), where matplotlib's log axis
    labels only the decades: nothing would be labelled above 1.  Ticks at m × 10^k, with
    mantissas m the finer the narrower the span, keep labels above and below 1.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    lo, hi = min(lo, 0.8), max(hi, 1.25)  # 1 (the SGD line) and a labelled tick either side
    ax.set_ylim(lo, hi)
    span = hi / lo
    mant = ((1, 1.1, 1.2, 1.3, 1.5, 1.7, 2, 2.5, 3, 4, 5, 6, 7, 8, 9) if span < 3
            else (1, 1.5, 2, 3, 5, 7) if span < 10 else (1, 2, 5))
    ticks = [m * 10.0**e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in mant if lo <= m * 10.0**e <= hi]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_gamma(record: dict, path: str) -> str | None:
    """E1: γ̄(d)/γ̄(g) at the near-zero damping, per method, at each checkpoint (± s.e.)."""
    gam = record.get("gamma")
    if not gam or not gam.get("checkpoints"):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    steps = [c["step"] for c in gam["checkpoints"]]
    n = len(gam["methods"])
    dodge = 0.012 * ((max(steps) - min(steps)) or 1)   # methods side by side, not on top
    for i, method in enumerate(gam["methods"]):
        xs = np.asarray(steps, dtype=float) + (i - (n - 1) / 2) * dodge
        ys = _nums([c["e1"][method]["mean_ratio"] for c in gam["checkpoints"]])
        se = _nums([c["e1"][method]["stderr"] for c in gam["checkpoints"]])
        front = method == "ngd"                          # the optimum: drawn last, open marker
        ax.errorbar(xs, ys, yerr=np.nan_to_num(se), capsize=2, label=LABELS.get(method, method),
                    marker=MARKERS.get(method, "o"), markersize=7 if front else 5,
                    markerfacecolor="none" if front else None, zorder=4 if front else 2,
                    **_style(method))
    ax.axhline(1.0, color="#7f7f7f", linewidth=1.0, linestyle=":", label="SGD (= 1)")
    _log_ratio_axis(ax)
    ax.set_xlabel(f"checkpoint (step of the {gam['trajectory'].upper()} run)")
    ax.set_ylabel(f"E1: γ̄(d) / γ̄(g) at λ = {gam['e1_damping']:g}")
    ax.set_title("approximation quality (Wu et al. 2024, E1); lower is better", fontsize=10)
    return _finish(plt, fig, ax, path)


def plot_gamma_damping(record: dict, path: str) -> str | None:
    """E3: γ̄(d)/γ̄(g) against the absolute damping at the last checkpoint (robustness to λ)."""
    gam = record.get("gamma")
    if not gam or not gam.get("checkpoints"):
        return None
    plt = _pyplot()
    last = gam["checkpoints"][-1]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in gam["methods"]:
        t = last["e3"][method]
        ax.plot(t["dampings"], _nums(t["ratios"]), marker="o", markersize=3,
                label=LABELS.get(method, method), **_style(method))
    ax.axhline(1.0, color="#7f7f7f", linewidth=1.0, linestyle=":", label="SGD (= 1)")
    ax.set_xscale("log")
    _log_ratio_axis(ax)
    ax.set_xlabel("damping λ in (M + λI)⁻¹, the same for every method (P × P convention)")
    ax.set_ylabel("E3: γ̄(d) / γ̄(g)")
    ax.set_title(f"damping sweep at the last checkpoint (step {last['step']}); lower is better",
                 fontsize=10)
    return _finish(plt, fig, ax, path)


def plot_all(record: dict, out_dir: str) -> list[str]:
    """Write ``loss_vs_step.png``, ``loss_vs_time.png``, ``gamma_ratios.png`` and
    ``gamma_vs_damping.png``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = [plot_loss(record, os.path.join(out_dir, "loss_vs_step.png"), "step"),
             plot_loss(record, os.path.join(out_dir, "loss_vs_time.png"), "time")]
    for fn, name in ((plot_gamma, "gamma_ratios.png"), (plot_gamma_damping, "gamma_vs_damping.png")):
        p = fn(record, os.path.join(out_dir, name))
        if p:
            paths.append(p)
    return paths

