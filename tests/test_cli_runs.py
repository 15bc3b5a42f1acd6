"""``refngd compare`` never loses or mixes a run, and its small CLI behaviours (issue 9).

* ``--out`` is checked before any work (an existing file, a path below a file, an
  unwritable folder: exit 2 at once);
* a folder holding an earlier run is never written into (a fresh sibling, announced);
* each finished method is saved atomically as it finishes; SIGINT keeps them;
* missing optional packages give one clear line; ``--version``; bad integers exit 2.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from refngd import __version__
from refngd.cli import main
from refngd.optim.records import load_json, save_json
from refngd.experiments.run_output import OutputError, RunOutput

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--epochs", "1", "--batch-size", "32", "--max-steps", "2", "--no-progress", "--no-gamma"]


def _cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MPLBACKEND="Agg")
    return subprocess.Popen([sys.executable, "-m", "refngd", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


# ------------------------------------------------------------------------ --out first
def test_out_is_an_existing_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    target = tmp_path / "taken"
    target.write_text("mine")
    # no training may start: make it explode if it does
    monkeypatch.setattr("refngd.experiments.compare.run_compare",
                        lambda *a, **k: pytest.fail("training started before --out was checked"))
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(target), *TINY])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "is an existing file, not a folder" in err and "usage:" in err
    assert target.read_text() == "mine"


def test_out_below_a_file_fails_before_any_work(tmp_path, capsys, monkeypatch):
    (tmp_path / "f").write_text("x")
    monkeypatch.setattr("refngd.experiments.compare.run_compare",
                        lambda *a, **k: pytest.fail("training started before --out was checked"))
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--out", str(tmp_path / "f" / "sub" / "res"), *TINY])
    assert exc.value.code == 2
    assert "which is a file, not a folder" in capsys.readouterr().err


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write anywhere")
def test_out_unwritable_folder_fails_before_any_work(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="cannot"):
            RunOutput(str(locked / "res"))
    finally:
        locked.chmod(0o700)


def test_out_empty_string_is_refused():
    with pytest.raises(OutputError, match="needs a folder name"):
        RunOutput("")


def test_earlier_run_is_never_overwritten_or_mixed(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "res"
    out.mkdir()
    (out / "compare.json").write_text('{"earlier": true}')
    (out / "loss_vs_step.png").write_bytes(b"old")
    rc = main(["compare", "--methods", "sgd", "--lr", "sgd=0.1", "--out", str(out), "--no-plots", *TINY])
    assert rc == 0
    err = capsys.readouterr().err
    fresh = tmp_path / "res-2"
    assert "already holds files" in err and str(fresh) in err
    assert json.loads((out / "compare.json").read_text()) == {"earlier": True}  # untouched
    assert sorted(os.listdir(fresh)) == ["compare.json", "table.md"]  # no stale PNG beside it
    rec = load_json(str(fresh / "compare.json"))
    assert rec["complete"] is True and list(rec["methods"]) == ["sgd"]
    assert rec["config"]["out_folder"] == str(fresh) and rec["config"]["out"] == str(out)
    # a third run goes to res-3
    assert RunOutput(str(out)).folder == str(tmp_path / "res-3")


def test_each_finished_method_is_saved_as_it_finishes(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    seen = []
    real = RunOutput.method_done

    def spy(self, method, rec):
        real(self, method, rec)
        seen.append(load_json(self.record_path))  # readable JSON right after each method

    monkeypatch.setattr(RunOutput, "method_done", spy)
    rc = main(["compare", "--methods", "sgd,adam", "--lr", "0.1", "--out", str(tmp_path / "o"),
               "--no-plots", *TINY])
    assert rc == 0
    assert [r["finished_methods"] for r in seen] == [["sgd"], ["sgd", "adam"]]
    assert all(r["complete"] is False for r in seen)
    assert seen[0]["config"]["methods"] == ["sgd", "adam"]
    assert [f for f in os.listdir(tmp_path / "o") if f.endswith(".tmp")] == []


def test_save_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    save_json({"a": 1}, str(path))

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("refngd.optim.records.os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        save_json({"a": 2, "big": list(range(1000))}, str(path))
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole
    assert os.listdir(tmp_path) == ["r.json"]           # no temporary file left behind


@pytest.mark.skipif(os.name != "posix", reason="SIGINT delivery to a child process")
def test_sigint_keeps_the_finished_methods(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "res"
    # SGD finishes in seconds; 40 epochs of exact NGD take far longer: interrupt during NGD
    # SIG_DFL in the child: a test run started in the background of a non-interactive shell
    # inherits an *ignored* SIGINT, and Python then never raises KeyboardInterrupt
    proc = _cli(["compare", "--methods", "sgd,ngd", "--lr", "0.1", "--epochs", "40",
                 "--no-progress", "--no-gamma", "--no-plots", "--out", str(out)],
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    record = out / "compare.json"
    try:
        deadline = time.monotonic() + 240
        while not record.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "SGD never finished"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "interrupted; kept the results of the 1 finished method(s) (sgd)" in lines[0]
    rec = json.loads(record.read_text())
    assert rec["complete"] is False and list(rec["methods"]) == ["sgd"]
    assert rec["methods"]["sgd"]["best"]["evals"]["train_loss"]


# ------------------------------------------------------------------------ small CLI items
def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip() == f"refngd {__version__}"


@pytest.mark.parametrize("args, word", [(["--threads", "-3"], "--threads"), (["--seed", "-1"], "--seed"),
                                        (["--epochs", "0"], "--epochs"), (["--data", ""], "--data")])
def test_bad_integer_options_exit_2_with_usage(args, word, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and word in err


def test_help_shows_no_none_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    assert "default: None" not in out and "(default: 10)" in out


def test_missing_extras_give_one_clear_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("sklearn", "tqdm", "matplotlib") else real(name, *a))
    rc = main(["compare", "--out", str(tmp_path / "o"), *TINY])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scikit-learn" in err[0] and "pip install 'refngd[cli]'" in err[0]
    assert not (tmp_path / "o").exists()


def test_one_epoch_is_singular(tmp_path, capsys):
    pytest.importorskip("sklearn")
    assert main(["compare", "--methods", "sgd", "--lr", "0.1", "--out", str(tmp_path / "o"),
                 "--no-plots", *TINY]) == 0
    out = capsys.readouterr().out
    assert "1 epoch of batch" in out and "1 epochs" not in out


@pytest.mark.parametrize("values", [(0.62, 0.8, 1.27), (0.05, 0.3, 4.0), (0.7, 0.8, 0.95)])
def test_gamma_axis_is_labelled_on_both_sides_of_one(values):
    mpl = pytest.importorskip("matplotlib")
    mpl.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from refngd.experiments.plots import _log_ratio_axis

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], values)
    _log_ratio_axis(ax)
    fig.canvas.draw()
    labels = [float(t.get_text()) for t in ax.get_yticklabels() if t.get_text()]
    lo, hi = ax.get_ylim()
    assert 1.0 in labels and any(v > 1 for v in labels) and any(v < 1 for v in labels)
    assert all(lo <= v <= hi for v in labels) and lo <= min(values) and hi >= max(values)
    plt.close(fig)
