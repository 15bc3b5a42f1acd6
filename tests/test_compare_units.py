"""``refngd compare`` as units of work, in-process (issue 23): exact storage of a unit's
result, the same record whatever order the units complete in, ``--resume`` after an
interruption runs only the missing units, and the default never imports dask.

The Dask executor's own tests are in tests/test_compare_dask.py.
"""
from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from refngd.cli import main
from refngd.experiments.compare import CompareConfig
from refngd.experiments.executors import InProcess, worker_threads
from refngd.experiments.grid import Grid
from refngd.experiments.run_output import RunOutput
from refngd.experiments.units import Unit, decode_exact, encode_exact
from refngd.optim.records import load_json

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: numbers that depend on the machine's speed, not on the computation
TIMINGS = {"time", "seconds", "seconds_per_step", "seconds_total", "seconds_wall", "machine",
           "executor", "out", "out_folder"}
SMALL = ["--epochs", "1", "--batch-size", "32", "--max-steps", "4", "--no-progress", "--no-plots"]
TINY = ["--methods", "sgd,ngd,rfadam", "--lr", "sgd=0.1:0.3", "--lr", "ngd=0.1", "--lr",
        "rfadam=3", *SMALL]


def without_timings(obj):
    """``obj`` without its timings: what must be identical wherever the units ran."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def tiny_config(**kw) -> CompareConfig:
    base = dict(methods=("sgd", "ngd", "rfadam"),
                lr={"sgd": [0.1, 0.3], "ngd": [0.1], "rfadam": [3.0]},
                epochs=1, batch_size=32, max_steps=4, gamma_checkpoints=3, gamma_batches=2,
                progress=False)
    return CompareConfig(**{**base, **kw})


# ------------------------------------------------------------------ exact storage
def test_encode_exact_round_trips_bit_for_bit():
    rng = np.random.default_rng(0)
    obj = {"theta": rng.standard_normal(7), "f32": rng.standard_normal((2, 3)).astype(np.float32),
           "ints": np.arange(4), "scalar": np.float32(1.5), "i64": np.int64(3),
           "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "x": 0.1, "n": None,
           "tuple": (1, (2.0, "a")), "by_step": {0: np.ones(2), 46: np.zeros(2)},
           "tagged": {"__float__": 1}, "list": [True, "s", {"k": []}]}
    text = json.dumps(encode_exact(obj), allow_nan=False)  # valid JSON: no NaN tokens
    back = decode_exact(json.loads(text))
    assert back.keys() == obj.keys()
    for k in ("theta", "f32", "ints"):
        assert back[k].dtype == obj[k].dtype and back[k].tobytes() == obj[k].tobytes()
        assert back[k].flags.writeable
    assert type(back["scalar"]) is np.float32 and back["scalar"] == 1.5
    assert type(back["i64"]) is np.int64
    assert math.isnan(back["nan"]) and back["inf"] == math.inf and back["-inf"] == -math.inf
    assert back["tuple"] == (1, (2.0, "a")) and isinstance(back["tuple"][1], tuple)
    assert list(back["by_step"]) == [0, 46] and back["tagged"] == {"__float__": 1}
    assert back["list"] == [True, "s", {"k": []}] and back["x"] == 0.1 and back["n"] is None


def test_encode_exact_refuses_objects():
    with pytest.raises(TypeError, match="plain data"):
        encode_exact({"f": object()})


def test_unit_keys_and_file_names():
    u = Unit("train", 3, "sgd", 0.1)
    assert u.key == "seed 3/train/sgd/lr=0.1" and u.filename == "seed3.train.sgd.lr=0.1.json"
    assert Unit("train", 3, "sgd", 0.1000001).key != u.key
    g = Unit("gamma", 0, step=46, batch=2)
    assert g.key == "seed 0/gamma/step=46/batch=2" and "/" not in g.filename
    assert g.to_dict() == {"kind": "gamma", "seed": 0, "step": 46, "batch": 2}


def test_worker_threads_never_oversubscribe():
    assert worker_threads(2, 1, cores=16) == 1
    assert worker_threads(2, 0, cores=16) == 8  # --threads 0: all a worker may have
    assert worker_threads(4, 4, cores=8) == 2
    assert worker_threads(4, 1, cores=2) == 1  # more workers than cores: never below one
    for w in range(1, 9):
        for t in range(0, 5):
            assert w * worker_threads(w, t, cores=8) <= max(8, w)


# ------------------------------------------------------------------ order independence
class Shuffled(InProcess):
    """Runs the submitted units in a random order: as a cluster might complete them."""

    def __init__(self, seed):
        super().__init__()
        self.rng = random.Random(seed)

    def next_done(self):
        self._queue.rotate(-self.rng.randrange(len(self._queue)))
        return super().next_done()


def test_completion_order_cannot_change_the_record():
    pytest.importorskip("sklearn")
    config = tiny_config(seeds=2)
    quiet = lambda *a: None  # noqa: E731
    ordered = Grid(config, InProcess(), quiet, threads=1).run()
    for seed in (1, 2):
        shuffled = Grid(config, Shuffled(seed), quiet, threads=1).run()
        assert without_timings(shuffled) == without_timings(ordered)
    own = ordered[1]["gamma"]["own_trajectory"]["rfadam"]  # the γ units of both kinds ran
    assert [c["step"] for c in own["checkpoints"]] == [0, 2, 4]


def test_gamma_rows_are_the_studys_summary_of_its_batches():
    """A checkpoint row of the grid's γ study is gamma_study's summary of batch_gammas on the
    fixed batches, with both imbalance statistics: the units change who computes, not what."""
    pytest.importorskip("sklearn")
    from refngd.backend import as_generator
    from refngd.experiments.data import load_digits
    from refngd.experiments.gamma_study import (batch_gammas, checkpoint_imbalance, e1_summary,
                                                e3_summary)
    from refngd.experiments.models import build_model
    from refngd.experiments.units import blas_limit
    from refngd.losses import CrossEntropy
    from refngd.optim.records import jsonable

    config = tiny_config(methods=("sgd",), lr={"sgd": [0.1]})
    record = Grid(config, InProcess(), lambda *a: None, threads=1).run()[0]
    row = record["gamma"]["checkpoints"][0]
    assert row["step"] == 0  # θ₀, which the test can rebuild without training
    data = load_digits(config.test_fraction, config.seed).for_model(config.model)
    model = build_model(config.model, data.input_shape, data.num_classes)
    theta = model.init(as_generator(config.seed))
    n, N = record["gamma"]["batch_size"], data.X_train.shape[0]
    idx = as_generator(config.seed + 1).permutation(N)
    with blas_limit(1):  # as the units ran: another thread count can move the last digits
        per = [batch_gammas(model, theta, CrossEntropy(), data.X_train[b], data.y_train[b],
                            methods=config.gamma_methods, dampings=record["gamma"]["dampings"],
                            rng=as_generator(config.seed + 100 + k))
               for k, b in enumerate(idx[i * n:(i + 1) * n] for i in range(config.gamma_batches))]
    want = {"step": 0, "e1": e1_summary(per, config.e1_damping), "e3": e3_summary(per),
            **checkpoint_imbalance(per)}
    assert row["imbalance_paper"] is not None and row["imbalance_paper"] != row["imbalance"]
    assert jsonable(row) == jsonable(want)


# ------------------------------------------------------------------ --resume
def _interrupt_after(monkeypatch, n):
    """Make the n-th saved unit raise KeyboardInterrupt, as Ctrl-C would between units."""
    real, calls = RunOutput.unit_done, []

    def unit_done(self, unit, result):
        real(self, unit, result)
        calls.append(unit.key)
        if n is not None and len(calls) == n:
            raise KeyboardInterrupt

    monkeypatch.setattr(RunOutput, "unit_done", unit_done)
    return calls


def test_resume_runs_only_the_missing_units(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    straight = tmp_path / "straight"
    calls = _interrupt_after(monkeypatch, None)
    assert main(["compare", *TINY, "--out", str(straight)]) == 0
    total = len(calls)
    assert total == 4 + 5 * 8 + 5 * 8  # 4 runs; γ and RF-Adam's own: 5 checkpoints × 8 batches
    assert sorted(os.listdir(straight)) == ["compare.json", "table.md"]  # units/ removed

    out = tmp_path / "res"
    calls = _interrupt_after(monkeypatch, 7)
    capsys.readouterr()
    assert main(["compare", *TINY, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "7 finished unit(s)" in err[0] and "--resume" in err[0]
    partial = load_json(str(out / "compare.json"))
    assert partial["complete"] is False and list(partial["methods"]) == ["sgd", "ngd", "rfadam"]
    assert len(os.listdir(out / "units")) == 7 + 1  # and units/run.json

    calls = _interrupt_after(monkeypatch, None)
    assert main(["compare", *TINY, "--out", str(out), "--resume"]) == 0
    assert "--resume: 7 finished unit(s) recorded in" in capsys.readouterr().err
    assert len(calls) == total - 7  # only the missing units ran
    assert sorted(os.listdir(out)) == ["compare.json", "table.md"]
    assert without_timings(load_json(str(out / "compare.json"))) == \
        without_timings(load_json(str(straight / "compare.json")))

    # a finished run: nothing to resume
    assert main(["compare", *TINY, "--out", str(out), "--resume"]) == 0
    assert "holds a finished run" in capsys.readouterr().err


def test_resume_refuses_another_configuration(tmp_path, monkeypatch, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "res"
    _interrupt_after(monkeypatch, 2)
    assert main(["compare", *TINY, "--out", str(out)]) == 130
    with pytest.raises(SystemExit) as exc:
        main(["compare", *TINY, "--out", str(out), "--resume", "--epochs", "2"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "another configuration (epochs 1 there, 2 here)" in err
    with pytest.raises(SystemExit):  # other BLAS threads can move the last digits
        main(["compare", *TINY, "--out", str(out), "--resume", "--threads", "2"])
    assert "BLAS threads per unit 1 there, 2 here" in capsys.readouterr().err
    assert len(os.listdir(out / "units")) == 3  # untouched


def test_resume_refuses_a_folder_without_a_run(tmp_path, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        main(["compare", *TINY, "--out", str(tmp_path / "other"), "--resume"])
    assert exc.value.code == 2
    assert "no refngd compare run" in capsys.readouterr().err


def test_resume_of_nothing_starts_the_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "new"
    assert main(["compare", "--methods", "sgd", "--lr", "0.1", "--no-gamma", *SMALL,
                 "--out", str(out), "--resume"]) == 0
    assert "nothing was recorded" in capsys.readouterr().err
    assert load_json(str(out / "compare.json"))["complete"] is True


# ------------------------------------------------------------------ the options
def test_bad_executor_options(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--workers", "0"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "worker processes >= 1 (leave --workers out to run in-process)" in err
    with pytest.raises(SystemExit):
        main(["compare", "--workers", "2", "--scheduler", "tcp://127.0.0.1:8786"])
    assert "not both" in capsys.readouterr().err
    monkeypatch.setattr("refngd.cli._find", lambda name: None)  # as without dask installed
    assert main(["compare", "--workers", "2", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'refngd[distributed]'" in err[0]


def test_in_process_default_never_imports_dask(tmp_path):
    pytest.importorskip("sklearn")
    code = ("import sys; from refngd.cli import main; "
            f"rc = main(['compare', '--methods', 'sgd', '--lr', '0.1', *{SMALL!r}, "
            f"'--out', {str(tmp_path / 'o')!r}]); "
            "print(rc, sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('dask', 'distributed')))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout
    assert out.strip().splitlines()[-1] == "0 []"
