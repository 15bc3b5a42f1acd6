"""``refngd compare`` end to end on tiny configurations, and its error messages."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from refngd.cli import main

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TINY = ["--epochs", "1", "--batch-size", "32", "--max-steps", "4", "--no-progress"]


def test_compare_end_to_end(tmp_path, capsys):
    out = tmp_path / "res"
    rc = main(["compare", "--methods", "sgd,ngd,ef,ief,sf,kfac,ekfac,adafisher,fadam,adam",
               "--lr", "sgd=0.1:0.3", "--lr", "ngd=0.1", "--out", str(out), *TINY])
    assert rc == 0
    text = capsys.readouterr().out
    for word in ("final train loss", "test accuracy", "ms / step", "best lr", "SGD", "K-FAC",
                 "EKFAC", "AdaFisher", "FAdam", "E1: γ̄(d)/γ̄(g)", "E1 γ̄/γ̄*", "best over damping", "iEF"):
        assert word in text, word
    files = sorted(os.listdir(out))
    assert files == ["compare.json", "gamma_ratios.png", "gamma_vs_damping.png", "loss_vs_step.png",
                     "loss_vs_time.png", "table.md"]
    rec = json.loads((out / "compare.json").read_text())
    assert rec["config"]["methods"][0] == "sgd" and rec["data"]["name"] == "digits"
    sgd = rec["methods"]["sgd"]
    assert sgd["lr_grid"] == [0.1, 0.3] and len(sgd["runs"]) == 2 and sgd["best_lr"] in (0.1, 0.3)
    assert min(r["final_train_loss"] for r in sgd["runs"]) == sgd["final_train_loss"]
    assert len(sgd["best"]["log"]["loss"]) == 4
    assert rec["methods"]["ngd"]["lr_grid"] == [0.1]
    gam = rec["gamma"]
    assert gam["trajectory"] == "sgd" and [c["step"] for c in gam["checkpoints"]] == [0, 1, 2, 3, 4]
    assert "own_trajectory" not in gam and "own checkpoints" not in text  # no opt-in method
    for c in gam["checkpoints"]:
        ngd = c["e3"]["ngd"]["best_ratio"]
        for m in ("ef", "ief", "sf", "kfac", "ekfac"):  # exact NGD minimises γ
            assert c["e3"][m]["best_ratio"] >= ngd * (1 - 1e-9)
            assert c["e1"][m]["optimal_ratio"] >= 1 - 1e-9
    # the documented schema (docs/compare.md): E1 and E3 at the last checkpoint
    for m in ("ngd", "ef", "ief", "sf", "kfac", "ekfac"):
        assert set(gam["e1"][m]) >= {"mean_ratio", "stderr", "damping"}
        assert gam["e1"][m]["damping"] == gam["e1_damping"]
        assert gam["e3"][m]["dampings"] == gam["e3"]["ngd"]["dampings"]  # one grid for all
        assert len(gam["e3"][m]["ratios"]) == len(gam["e3"][m]["dampings"])
    for row in rec["table"]:
        assert row["seconds_per_step"] > 0
    with open(out / "loss_vs_step.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_compare_several_seeds(tmp_path, capsys):
    out = tmp_path / "seeds"
    rc = main(["compare", "--methods", "sgd,ief", "--lr", "0.1", "--seeds", "2", "--no-plots",
               "--out", str(out), *TINY])
    assert rc == 0
    text = capsys.readouterr().out
    assert "mean ± standard deviation over 2 seeds: 0, 1" in text
    rec = json.loads((out / "compare.json").read_text())
    assert rec["seeds"] == [0, 1] and len(rec["per_seed"]) == 2
    losses = [r["methods"]["ief"]["final_train_loss"] for r in rec["per_seed"]]
    assert rec["methods"]["ief"]["final_train_loss"]["mean"] == pytest.approx(np.mean(losses))
    assert rec["methods"]["ief"]["final_train_loss"]["sd"] == pytest.approx(np.std(losses, ddof=1))
    e1 = [r["gamma"]["e1"]["ief"]["mean_ratio"] for r in rec["per_seed"]]
    assert rec["gamma"]["e1"]["ief"]["mean_ratio"] == pytest.approx(np.mean(e1))
    assert rec["gamma"]["e1"]["ief"]["stderr"] == pytest.approx(np.std(e1, ddof=1) / np.sqrt(2))


def test_compare_cnn_and_own_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 36)).astype(np.float32)  # 6 × 6 "images" as 36 features
    y = (X[:, :18].sum(1) > 0).astype(np.int64) * 3 + 2     # labels {2, 5}: remapped to {0, 1}
    path = tmp_path / "mine.npz"
    np.savez(path, X=X, y=y)
    rc = main(["compare", "--model", "cnn", "--data", str(path), "--methods", "sgd,kfac,ekfac,adafisher",
               "--no-gamma", "--no-plots", "--out", str(tmp_path / "o"), *TINY])
    assert rc == 0
    rec = json.loads((tmp_path / "o" / "compare.json").read_text())
    assert rec["data"]["classes"] == [2, 5] and rec["data"]["input_shape"] == [1, 6, 6]
    assert "Conv2d" in rec["config"]["model_repr"] and "gamma" not in rec


def test_python_m_refngd_help():
    r = subprocess.run([sys.executable, "-m", "refngd", "compare", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for opt in ("--methods", "--model", "--data", "--epochs", "--batch-size", "--lr", "--seed",
                "--out", "--no-progress"):
        assert opt in r.stdout



@pytest.mark.parametrize("command", ["compare", "check"])
def test_every_option_has_help_and_one_default(command, capsys):
    # issue 21: ``refngd check --help`` once printed "(default: by dtype) (default: None)"
    # and showed five options with no help at all
    from refngd.cli import build_parser
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    missing = [a.option_strings[0] for a in sub._actions if a.option_strings and not a.help]
    assert not missing, f"refngd {command}: options without help: {missing}"
    text = sub.format_help()
    assert "(default: None)" not in text and text.count("(default:") <= len(sub._actions)
    assert not any(line.count("(default:") > 1 for line in " ".join(text.split()).split("--"))

def run_err(args, capsys):
    with pytest.raises(SystemExit) as exc:
        rc = main(args)
        raise SystemExit(rc)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("args,msg", [
    (["compare", "--methods", "sgd,lbfgs"], "unknown method"),
    (["compare", "--methods", "sgd,sgd"], "twice"),
    (["compare", "--lr", "adam=fast"], "METHOD=LR"),
    (["compare", "--lr", "adam=-1"], "positive"),
    (["compare", "--methods", "sgd", "--lr", "adam=0.1"], "not in --methods"),
    (["compare", "--epochs", "0"], "positive integer"),
    (["compare", "--model", "rnn"], "invalid choice"),
])
def test_bad_options(args, msg, capsys):
    assert msg in run_err(args, capsys)


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("make,msg", [
    (lambda p: str(p / "missing.npz"), "does not exist"),
    (lambda p: _npz(p, X=np.zeros((5, 2))), "no array(s) ['y']"),
    (lambda p: _npz(p, X=np.zeros((5, 2)), y=np.zeros(5)), "integer class labels"),
    (lambda p: _npz(p, X=np.zeros((5, 2)), y=np.zeros(4, int)), "5 samples but y has 4"),
    (lambda p: _npz(p, X=np.full((5, 2), np.nan), y=np.arange(5)), "NaN or Inf"),
    (lambda p: _npz(p, X=np.zeros(5), y=np.arange(5)), "shape (N, features...)"),
    (lambda p: _npz(p, X=np.zeros((6, 2)), y=np.zeros(6, int)), "single class"),
    (lambda p: _npz(p, X=np.zeros((6, 2, 3)), y=np.zeros((6, 2), int)), "1-dimensional"),
])
def test_bad_data(tmp_path, capsys, make, msg):
    err = run_err(["compare", "--data", make(tmp_path), "--methods", "sgd", *TINY,
                   "--out", str(tmp_path / "o")], capsys)
    assert msg in err and err.startswith("refngd compare: error:")


def test_bad_data_for_cnn(tmp_path, capsys):
    path = _npz(tmp_path, X=np.zeros((6, 5)), y=np.arange(6) % 2)
    err = run_err(["compare", "--data", path, "--model", "cnn", "--methods", "sgd", *TINY,
                   "--out", str(tmp_path / "o")], capsys)
    assert "perfect square" in err and "--model mlp" in err


def test_not_an_npz(tmp_path, capsys):
    path = tmp_path / "x.npz"
    path.write_text("hello")
    err = run_err(["compare", "--data", str(path), "--methods", "sgd", *TINY], capsys)
    assert "numpy.savez" in err
