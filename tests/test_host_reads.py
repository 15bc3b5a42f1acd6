"""Host reads of device values: a fixed number per call, and the same errors when queued.

On a GPU every value read on the host (a finiteness flag, a pivot) is a synchronisation.
Inside a public call refngd queues the checks of device arrays and reads them with the
next value the computation needs (refngd.backend.one_host_read).  Here the NumPy checks
are queued the same way (``backend._QUEUE_NUMPY_CHECKS``) to test that route on the CPU:
the number of reads per call does not grow with the depth of the model, the results do
not change, and bad input still gets the same clear error.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import refngd
from refngd import backend, losses, nn, updates


def mlp(depth: int):
    layers = [nn.Linear(5, 8), nn.Tanh()]
    for _ in range(depth - 2):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(8, 3))


def problem(depth):
    rng = np.random.default_rng(0)
    model = mlp(depth)
    return model, model.init(rng), rng.standard_normal((6, 5)), rng.integers(0, 3, 6)


CALLS = {
    "ngd": (lambda m, t, X, y: updates.ngd(m, t, losses.CrossEntropy(), X, y, 1e-3), 2),
    "gradient": (lambda m, t, X, y: refngd.gradient(m, t, losses.CrossEntropy(), X, y), 1),
    "ef": (lambda m, t, X, y: updates.ef(m, t, losses.CrossEntropy(), X, y, 1e-3), 1),
    "kfac": (lambda m, t, X, y: updates.kfac(m, t, losses.CrossEntropy(), X, y, 1e-3), 2),
}


@pytest.fixture
def queued(monkeypatch):
    monkeypatch.setattr(backend, "_QUEUE_NUMPY_CHECKS", [True])


@pytest.mark.parametrize("name", CALLS)
def test_reads_per_call_do_not_grow_with_depth(queued, name):
    f, most = CALLS[name]
    counts = []
    for depth in (2, 6):
        args = problem(depth)
        before = backend.host_read_count()
        f(*args)
        counts.append(backend.host_read_count() - before)
    assert counts[0] == counts[1] <= most, counts


@pytest.mark.parametrize("name", CALLS)
def test_queued_checks_give_the_same_numbers(monkeypatch, name):
    f, _ = CALLS[name]
    args = problem(3)
    immediate = f(*args)
    monkeypatch.setattr(backend, "_QUEUE_NUMPY_CHECKS", [True])
    assert np.array_equal(f(*args), immediate)


def test_queued_failure_is_reported_not_its_consequence(queued):
    """NaN in X is only read after the forward pass; the X error wins over what follows."""
    model, theta, X, y = problem(2)
    X[2, 1] = np.nan
    with pytest.raises(ValueError, match="X contains NaN or Inf"):
        updates.ngd(model, theta, losses.CrossEntropy(), X, y, 1e-3)
    with pytest.raises(ValueError, match="theta contains NaN or Inf"):
        refngd.gradient(model, np.full_like(theta, np.inf), losses.CrossEntropy(), X * 0, y)
    assert backend._queue() is None  # the call's queue is gone after the error


def test_queued_label_check_wins_over_the_index_error(queued):
    """Out-of-range labels reach the indexing before their queued check is read (NumPy
    raises IndexError there, CuPy wraps): the label error is what the user sees."""
    model, theta, X, y = problem(2)
    y[3] = 7
    for f in (lambda: updates.ngd(model, theta, losses.CrossEntropy(), X, y, 1e-3),
              lambda: refngd.gradient(model, theta, losses.CrossEntropy(), X, y)):
        with pytest.raises(ValueError, match=r"labels must lie in \[0, C\) = \[0, 3\)"):
            f()


def test_checks_outside_a_call_are_immediate(queued):
    with pytest.raises(ValueError, match="w contains NaN"):
        backend.check_float_array("w", np.array([1.0, np.nan]))


def test_bad_input_batteries_with_queued_checks():
    """The bad-input test modules, rerun with every NumPy check queued as on a GPU."""
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, REFNGD_QUEUE_CHECKS="1")
    mods = ["tests/test_bad_input.py", "tests/test_errors.py", "tests/test_losses.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *mods],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
