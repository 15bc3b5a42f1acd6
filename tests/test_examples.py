"""Every script in examples/ runs to completion and writes its figure.

The examples assert the mathematical claim they demonstrate, so a non-zero exit code
here means either a broken example or a wrong library result: read the stderr shown.
Each runs in a subprocess (a fresh interpreter, as a user would run it) with matplotlib's
Agg backend, writing its figure to a temporary directory.
"""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ["validate_pytorch", "least_squares_one_step", "gamma_vs_damping", "kfac_exact_cases"]
# the textbook gallery (docs/gallery.md): each asserts the claim its docstring states
TEXTBOOK = ["geometry_2d", "fisher_vs_hessian", "ef_limitations", "ief_toy", "kfac_vs_simplified",
            "nes", "natural_policy_gradient", "gp_natural_gradient", "optimizer_table", "tiny_vit_ief",
            "transformer_kfac", "low_precision", "hf_lora_exact_ngd"]
EXAMPLES += TEXTBOOK
NEEDS = {"validate_pytorch": "torch",      # the script exits 0 with a message without it
         "hf_lora_exact_ngd": "peft"}         # (the `models` extra: torch, transformers, peft)
NEEDS_SKLEARN = {"gamma_vs_damping", "tiny_vit_ief", "low_precision"}  # the bundled digits
SMOKE = {"low_precision": ["--smoke"]}     # CI runs the example's fast mode


def _run(args, cwd):
    env = dict(os.environ, MPLBACKEND="Agg")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)  # generous: a loaded 2-core machine runs them 3–10× slower


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_writes_figure(name, tmp_path):
    pytest.importorskip("matplotlib")
    if name in NEEDS_SKLEARN:
        pytest.importorskip("sklearn")
    out = tmp_path / "fig" / f"{name}.png"
    proc = _run([str(ROOT / "examples" / f"{name}.py"), "--out", str(out), *SMOKE.get(name, [])],
                cwd=tmp_path)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    needed = NEEDS.get(name)
    if needed and importlib.util.find_spec(needed) is None:
        assert "not installed" in proc.stdout
        pytest.skip(f"{needed} is not installed: {name} only printed a message")
    assert out.is_file() and out.stat().st_size > 0, f"{name} wrote no figure"
    assert "figure:" in proc.stdout


def test_quickstart_runs(tmp_path):
    proc = _run([str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "NGD" in proc.stdout


def test_quickstart_refuses_unknown_options(tmp_path):
    # quickstart writes no figure: ``--out x.png`` must be an error, not silently ignored
    proc = _run([str(ROOT / "examples" / "quickstart.py"), "--out", "x.png"], cwd=tmp_path)
    assert proc.returncode == 2 and "unrecognized arguments: --out" in proc.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", ["gamma_vs_damping", "least_squares_one_step"])
def test_example_figures_use_the_compare_colours(name):
    # the same method has the same colour in every figure of the project
    source = (ROOT / "examples" / f"{name}.py").read_text()
    assert "from refngd.experiments.plots import STYLE" in source and "STYLE[" in source


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_without_matplotlib_names_the_extra(name, tmp_path):
    # a core-only install (pip install refngd): one line naming the extra, no traceback
    block = ("import runpy, sys; sys.modules['matplotlib'] = None; sys.modules['sklearn'] = None; "
             "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = _run(["-c", block, str(ROOT / "examples" / f"{name}.py")], cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(r"pip install 'refngd\[(plot|cli)\]'", lines[0]), lines


def test_gamma_figure_keeps_ngd_visible(tmp_path, monkeypatch):
    # issue 21: with NGD, K-FAC and EKFAC within 3 % of each other, gamma_ratios.png hid
    # NGD's curve under the other two; now each has its own marker, a small sideways offset,
    # and NGD (open markers) is drawn on top
    pytest.importorskip("matplotlib")
    from refngd.experiments import plots
    seen = {}

    def finish(plt, fig, ax, path):
        seen["ax"] = ax
        plt.close(fig)
        return path

    monkeypatch.setattr(plots, "_finish", finish)
    methods = ["ngd", "kfac", "ekfac", "ef"]
    checkpoints = [{"step": s, "e1": {m: {"mean_ratio": 0.8, "stderr": 0.01} for m in methods}}
                   for s in (0, 50, 100)]
    record = {"gamma": {"checkpoints": checkpoints, "methods": methods, "trajectory": "sgd",
                        "e1_damping": 1e-8}}
    plots.plot_gamma(record, str(tmp_path / "gamma_ratios.png"))
    data = {c.get_label(): c.lines[0] for c in seen["ax"].containers}
    ngd, kfac, ekfac = data["NGD"], data["K-FAC"], data["EKFAC"]
    assert len({ngd.get_marker(), kfac.get_marker(), ekfac.get_marker()}) == 3
    assert ngd.get_zorder() > max(kfac.get_zorder(), ekfac.get_zorder())
    xs = [tuple(line.get_xdata()) for line in (ngd, kfac, ekfac)]
    assert len(set(xs)) == 3, "equal values must not be drawn at the same place"


def test_model_zoo_lists_an_imported_model_and_names_unknown_ones(tmp_path):
    """examples/model_zoo.py (docs/layers.md, "Model families"): a transformers model
    imports and its row says so; an unknown name is an error."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "zoo.md"
    proc = _run([str(ROOT / "examples" / "model_zoo.py"), "--only", "hf_distilbert",
                 "--out", str(out)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\| hf_distilbert \| yes \| [\d,]+ \| \d\.\de-\d\d \|", out.read_text())
    proc = _run([str(ROOT / "examples" / "model_zoo.py"), "--only", "resnet"], cwd=tmp_path)
    assert proc.returncode == 2 and "unknown model(s) ['resnet']" in proc.stderr
