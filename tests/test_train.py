"""refngd.train: seeded batches, logs, evaluations, early stop on NaN/Inf, JSON records."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import refngd
from refngd import nn, optim
from refngd.losses import CrossEntropy, MSELoss
from refngd.optim.records import format_table, jsonable, load_json


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    X, y = rng.standard_normal((50, 4)), rng.integers(0, 3, 50)
    return model, model.init(rng), CrossEntropy(), X, y


class Recorder(optim.SGD):
    """SGD that remembers the rows of every batch it saw."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []

    def step(self, theta, state, model, loss, X, y, rng=None):
        self.seen.append(X[:, 0].copy())
        return super().step(theta, state, model, loss, X, y, rng)


def test_exported_and_logs(problem):
    model, th, loss, X, y = problem
    assert refngd.train is optim.train
    r = refngd.train(model, th, loss, X, y, optim.Adam(1e-2), epochs=3, batch_size=16, progress=False,
                     X_test=X[:10], y_test=y[:10], eval_every=2)
    steps_per_epoch = math.ceil(50 / 16)
    assert r.steps == 3 * steps_per_epoch == r.log["step"][-1]
    for key in ("step", "epoch", "time", "loss", "accuracy", "grad_norm", "update_norm"):
        assert len(r.log[key]) == r.steps
    assert r.log["epoch"][-1] == pytest.approx(3.0)
    assert np.all(np.diff(r.log["time"]) >= 0) and r.seconds_per_step > 0
    assert r.evals["step"] == [0, 2, 4, 6, 8, 10, 12]
    assert r.evals["train_loss"][0] == pytest.approx(refngd.loss_value(model, th, loss, X, y))
    assert r.evals["train_loss"][-1] == pytest.approx(refngd.loss_value(model, r.theta, loss, X, y))
    assert r.evals["test_loss"][-1] == pytest.approx(refngd.loss_value(model, r.theta, loss, X[:10], y[:10]))
    acc = np.mean(np.argmax(model.forward(r.theta, X), 1) == y)
    assert r.evals["train_accuracy"][-1] == pytest.approx(acc)
    assert r.final_train_loss == r.evals["train_loss"][-1] and not r.diverged
    assert r.config["optimizer"] == "adam" and r.config["hyperparameters"]["lr"] == 1e-2


def test_seeded_batches_are_shared_across_optimizers(problem):
    model, th, loss, X, y = problem
    a, b = Recorder(0.1), Recorder(0.01, momentum=0.9)
    optim.train(model, th, loss, X, y, a, epochs=2, batch_size=20, rng=7, progress=False)
    optim.train(model, th, loss, X, y, b, epochs=2, batch_size=20, rng=7, progress=False)
    assert len(a.seen) == 6 and [len(s) for s in a.seen[:3]] == [20, 20, 10]
    for s, t in zip(a.seen, b.seen):
        np.testing.assert_array_equal(s, t)
    # every epoch is a permutation of the data
    np.testing.assert_array_equal(np.sort(np.concatenate(a.seen[:3])), np.sort(X[:, 0]))
    # the Monte-Carlo stream does not disturb the batches, and the run is reproducible
    r1 = optim.train(model, th, loss, X, y, optim.SF(0.1), epochs=2, batch_size=20, rng=7, progress=False)
    r2 = optim.train(model, th, loss, X, y, optim.SF(0.1), epochs=2, batch_size=20, rng=7, progress=False)
    np.testing.assert_array_equal(r1.theta, r2.theta)
    r3 = optim.train(model, th, loss, X, y, optim.SF(0.1), epochs=2, batch_size=20, rng=8, progress=False)
    assert not np.array_equal(r1.theta, r3.theta)


def test_max_steps_and_checkpoints(problem):
    model, th, loss, X, y = problem
    r = optim.train(model, th, loss, X, y, optim.SGD(0.1), epochs=5, batch_size=10, max_steps=7,
                    checkpoints=(0, 3, 7, 99), progress=False)
    assert r.steps == 7 and sorted(r.checkpoints) == [0, 3, 7]
    np.testing.assert_array_equal(r.checkpoints[0], th)
    np.testing.assert_array_equal(r.checkpoints[7], r.theta)


def test_nan_stops_with_a_clear_message(problem):
    _, _, _, X, _ = problem
    model = nn.Sequential(nn.Linear(4, 3))  # least squares with a far too large step: θ explodes
    th = model.init(np.random.default_rng(1))
    loss, y = MSELoss(), np.random.default_rng(2).standard_normal((50, 3))
    with pytest.warns(RuntimeWarning, match="stopped at step .*NaN or Inf"):
        r = optim.train(model, th, loss, X, y, optim.SGD(100.0), epochs=30, batch_size=10, progress=False)
    assert r.diverged and "learning rate" in r.stopped
    assert r.steps < 150 and r.final_train_loss == math.inf
    assert np.all(np.isfinite(r.theta))  # the last finite θ is kept
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        optim.train(model, th, loss, X, y, optim.SGD(100.0), epochs=30, batch_size=10, progress=False,
                    on_divergence="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = optim.train(model, th, loss, X, y, optim.SGD(100.0), epochs=30, batch_size=10, progress=False,
                        on_divergence="ignore")
    assert r.diverged


def test_progress_bar(problem, capsys):
    pytest.importorskip("tqdm")
    model, th, loss, X, y = problem
    optim.train(model, th, loss, X, y, optim.SGD(0.1), epochs=1, batch_size=10)  # stderr not a tty
    assert capsys.readouterr().err == ""
    optim.train(model, th, loss, X, y, optim.SGD(0.1), epochs=1, batch_size=10, progress=True, desc="sgd")
    assert "sgd" in capsys.readouterr().err


def test_json_record(problem, tmp_path):
    model, th, loss, X, y = problem
    r = optim.train(model, th, loss, X, y, optim.KFAC(0.1), epochs=1, batch_size=25, progress=False)
    path = tmp_path / "sub" / "run.json"
    r.save(str(path))
    rec = load_json(str(path))
    assert rec["steps"] == 2 and rec["config"]["optimizer"] == "kfac"
    assert rec["log"]["loss"] == pytest.approx(r.log["loss"])
    assert "kl_scale" in rec["log"]
    # NaN and Inf become null, the file stays strict JSON
    assert jsonable({"a": [np.float64("nan"), np.inf, np.int64(3)]}) == {"a": [None, None, 3]}
    json.loads(path.read_text())


def test_bad_arguments(problem):
    model, th, loss, X, y = problem
    with pytest.raises(TypeError, match="optimizer"):
        optim.train(model, th, loss, X, y, "sgd")
    with pytest.raises(ValueError, match="batch_size"):
        optim.train(model, th, loss, X, y, optim.SGD(0.1), batch_size=0)
    with pytest.raises(ValueError, match="rows"):
        optim.train(model, th, loss, X, y[:-1], optim.SGD(0.1))
    with pytest.raises(ValueError, match="X_test"):
        optim.train(model, th, loss, X, y, optim.SGD(0.1), X_test=X)
    with pytest.raises(TypeError, match="rng"):
        optim.train(model, th, loss, X, y, optim.SGD(0.1), rng="seed")


def test_format_table():
    t = format_table(["a", "b"], [["x", 1.5], ["yy", 10]])
    assert t.splitlines() == ["| a  |   b |", "|----|----:|", "| x  | 1.5 |", "| yy |  10 |"]
