"""The training loop ``refngd.train``: seeded mini-batches, progress bar, logs, early stop.

Host-side driver (bookkeeping, timing, logging); the arithmetic happens in the optimizer's
``step``, which follows the arrays' device.
"""
from __future__ import annotations

import copy
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..backend import to_device, to_float, to_numpy
from ..options import check_int
from .base import batch_accuracy

#: rows per forward pass when evaluating on a whole data set
EVAL_CHUNK = 2048


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes
    ----------
    theta, state : final parameters and optimizer state.
    log : per-step lists ``step``, ``epoch``, ``time`` (cumulative seconds spent in
        ``optimizer.step``), ``loss`` and ``accuracy`` (the batch's, before the step) and
        every key of the optimizer's ``info``.
    evals : lists ``step``, ``epoch``, ``time``, ``train_loss``, ``train_accuracy`` (on
        the whole training set) and, with test data, ``test_loss``, ``test_accuracy``;
        taken at step 0, every ``eval_every`` steps and at the end.
    stopped : ``None``, or the message explaining an early stop (NaN/Inf, singular solve).
    checkpoints : {step: θ} for the requested checkpoint steps that were reached.
    checkpoint_states : {step: optimizer state} at the same steps (a deep copy, the state
        *after* that step, i.e. the one the next step starts from), only with
        ``record_state=True``; otherwise empty.
    config : the run's settings (optimizer name and hyper-parameters, batch size, ...).
    """

    theta: Any
    state: dict
    log: dict
    evals: dict
    config: dict
    stopped: str | None = None
    checkpoints: dict = field(default_factory=dict)
    checkpoint_states: dict = field(default_factory=dict)

    @property
    def diverged(self) -> bool:
        return self.stopped is not None

    @property
    def steps(self) -> int:
        return len(self.log["step"])

    @property
    def seconds(self) -> float:
        return self.log["time"][-1] if self.log["time"] else 0.0

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else math.nan

    @property
    def final_train_loss(self) -> float:
        return self.evals["train_loss"][-1] if not self.diverged else math.inf

    def to_dict(self) -> dict:
        """A JSON-ready record (without θ, the state and the checkpoints)."""
        return {"config": self.config, "stopped": self.stopped, "diverged": self.diverged,
                "steps": self.steps, "seconds": self.seconds,
                "seconds_per_step": self.seconds_per_step, "log": self.log, "evals": self.evals}

    def save(self, path: str) -> None:
        """Write :meth:`to_dict` as JSON (NaN/Inf written as null)."""
        from .records import save_json

        save_json(self.to_dict(), path)


def train(model, theta, loss, X, y, optimizer, *, epochs: int = 1, batch_size: int = 64,
          max_steps: int | None = None, rng=0, X_test=None, y_test=None,
          eval_every: int | None = None, progress: bool | None = None, desc: str | None = None,
          checkpoints=(), state: dict | None = None, on_divergence: str = "warn",
          record_state: bool = False) -> TrainResult:
    """Train ``model`` from ``theta`` with ``optimizer`` on (X, y) in shuffled mini-batches.

    Parameters
    ----------
    model, theta, loss : the network, its initial parameters and the loss.
    X, y : training data (NumPy or CuPy; batches are cut on the host and moved to θ's device).
    optimizer : a :mod:`refngd.optim` optimizer (``init`` / ``step``).
    epochs : passes over the data; ``max_steps`` stops earlier.
    batch_size : rows per step; the last, smaller batch of an epoch is kept.
    rng : int seed or ``numpy.random.Generator``.  Two independent streams are derived
        from it: one shuffles the data (so every optimizer sees the same batches for the
        same seed), one is passed to ``optimizer.step`` (Monte-Carlo methods).
    X_test, y_test : optional held-out data, evaluated with the training set.
    eval_every : steps between whole-data evaluations (default: once per epoch).
    progress : tqdm progress bar; ``None`` shows it only when stderr is a terminal.
    checkpoints : step numbers at which to keep a copy of θ (step 0 = the initial θ).
    state : resume from an optimizer state instead of ``optimizer.init(theta)``.
    record_state : also keep a deep copy of the optimizer state at every checkpoint
        (``result.checkpoint_states``): what a state-dependent direction such as
        ``RFAdam.direction(θ, state, ...)`` needs to be scored at that checkpoint.
    on_divergence : ``"warn"`` (default), ``"ignore"`` or ``"raise"`` when the loss or θ
        becomes NaN/Inf, or a step's linear solve is numerically singular (a run that has
        blown up); training stops either way, keeps the last finite θ, and
        ``result.stopped`` says why.
    """
    if not hasattr(optimizer, "step") or not hasattr(optimizer, "init"):
        raise TypeError(f"optimizer must be a refngd.optim optimizer, got {optimizer!r}.")
    check_int(epochs, "epochs")
    check_int(batch_size, "batch_size")
    if max_steps is not None:
        check_int(max_steps, "max_steps", minimum=0)
    if on_divergence not in ("warn", "ignore", "raise"):
        raise ValueError(f"on_divergence must be 'warn', 'ignore' or 'raise', got {on_divergence!r}.")
    X_host, y_host = _check_data("X", "y", X, y)
    N = X_host.shape[0]
    if (X_test is None) != (y_test is None):
        raise ValueError("pass both X_test and y_test, or neither.")
    if X_test is not None:
        _check_data("X_test", "y_test", X_test, y_test)
    data_rng, opt_rng = _streams(rng)
    per_epoch = math.ceil(N / batch_size)
    total = epochs * per_epoch if max_steps is None else min(int(max_steps), epochs * per_epoch)
    eval_every = per_epoch if eval_every is None else check_int(eval_every, "eval_every")
    want = _check_checkpoints(checkpoints)

    state = optimizer.init(theta) if state is None else state
    log: dict[str, list] = {"step": [], "epoch": [], "time": [], "loss": [], "accuracy": []}
    evals: dict[str, list] = {"step": [], "epoch": [], "time": [], "train_loss": [], "train_accuracy": []}
    if X_test is not None:
        evals.update(test_loss=[], test_accuracy=[])
    kept = {0: theta.copy()} if 0 in want else {}
    kept_states = {0: copy.deepcopy(state)} if record_state and 0 in want else {}
    config = {"optimizer": getattr(optimizer, "name", type(optimizer).__name__),
              "hyperparameters": optimizer.hyperparameters() if hasattr(optimizer, "hyperparameters") else {},
              "epochs": int(epochs), "batch_size": int(batch_size), "max_steps": max_steps,
              "n_train": int(N), "eval_every": eval_every, "loss": repr(loss)}

    def evaluate(step, epoch, elapsed):
        evals["step"].append(step)
        evals["epoch"].append(epoch)
        evals["time"].append(elapsed)
        tl, ta = dataset_metrics(model, theta, loss, X_host, y_host)
        evals["train_loss"].append(tl)
        evals["train_accuracy"].append(ta)
        if X_test is not None:
            vl, va = dataset_metrics(model, theta, loss, to_numpy(X_test), to_numpy(y_test))
            evals["test_loss"].append(vl)
            evals["test_accuracy"].append(va)

    bar = progress_bar(total, progress, desc)
    stopped, elapsed, step = None, 0.0, 0
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        evaluate(0, 0.0, 0.0)
        for epoch in range(epochs):
            if step >= total or stopped:
                break
            perm = data_rng.permutation(N)
            for i in range(per_epoch):
                if step >= total:
                    break
                idx = perm[i * batch_size:(i + 1) * batch_size]
                Xb, yb = to_device(X_host[idx], like=theta), to_device(y_host[idx], like=theta)
                t0 = time.perf_counter()
                try:
                    new_theta, new_state, info = optimizer.step(theta, state, model, loss, Xb, yb, rng=opt_rng)
                except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
                    # overflowing outputs (NaN/Inf) or a numerically singular solve: the run
                    # has left the region where its step is defined; anything else is a bug
                    if "NaN or Inf" not in str(err) and not isinstance(err, np.linalg.LinAlgError):
                        raise
                    stopped = f"stopped at step {step + 1} (epoch {epoch + 1}): {err}"
                    break
                elapsed += time.perf_counter() - t0
                step += 1
                bad = _not_finite(info, new_theta)
                if bad:
                    lr = getattr(optimizer, "lr", None)
                    hint = f"; the learning rate ({lr:g}) may be too large" if isinstance(lr, float) else ""
                    stopped = f"stopped at step {step} (epoch {epoch + 1}): {bad} is NaN or Inf{hint}."
                    break
                theta, state = new_theta, new_state
                _append(log, step, epoch + (i + 1) / per_epoch, elapsed, info)
                if step in want:
                    kept[step] = theta.copy()
                    if record_state:  # a copy: a step may update arrays of the state in place
                        kept_states[step] = copy.deepcopy(state)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{info.get('loss', math.nan):.4f}", refresh=False)
                if step % eval_every == 0 and step < total:
                    evaluate(step, log["epoch"][-1], elapsed)
        if not evals["step"] or evals["step"][-1] != step:
            evaluate(step, log["epoch"][-1] if log["epoch"] else 0.0, elapsed)
    if bar is not None:
        bar.close()
    if stopped:
        if on_divergence == "raise":
            raise FloatingPointError(stopped)
        if on_divergence == "warn":
            warnings.warn(stopped, RuntimeWarning, stacklevel=2)
    return TrainResult(theta, state, log, evals, config, stopped, kept, kept_states)


def _check_data(xname: str, yname: str, X, y) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of (X, y), checked *before* training: a NaN found after two steps as
    "diverged" would be reported as the optimizer's fault."""
    X_host, y_host = to_numpy(X), to_numpy(y)
    if X_host.ndim < 1 or X_host.shape[0] == 0:
        raise ValueError(f"{xname} is empty (shape {X_host.shape}); training needs at least one sample.")
    if y_host.ndim < 1 or y_host.shape[0] != X_host.shape[0]:
        raise ValueError(f"{xname} has {X_host.shape[0]} rows but {yname} has shape {y_host.shape}; "
                         "pass one target per row.")
    for name, a in ((xname, X_host), (yname, y_host)):
        if a.dtype.kind == "f":
            bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1)
            if bad.any():
                rows = np.flatnonzero(bad)
                shown = ", ".join(str(r) for r in rows[:5]) + (", ..." if rows.size > 5 else "")
                raise ValueError(f"{name} contains NaN or Inf in {rows.size} row(s) ({shown}); "
                                 "remove or impute them before training.")
    return X_host, y_host


def _check_checkpoints(checkpoints) -> set:
    """Checkpoint steps as a set of ints; anything but whole numbers >= 0 is an error."""
    try:
        items = list(checkpoints)
    except TypeError:
        raise TypeError(f"checkpoints must be a list of step numbers, got {checkpoints!r}.") from None
    want = set()
    for s in items:
        ok = isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_))
        if not ok and isinstance(s, (float, np.floating)) and float(s).is_integer():
            ok = True  # 3.0 is step 3; 2.5 is no step
        if not ok or s < 0:
            raise ValueError(f"checkpoints must be whole step numbers >= 0 (0 = the initial θ), "
                             f"got {s!r}.")
        want.add(int(s))
    return want


def dataset_metrics(model, theta, loss, X, y) -> tuple[float, float]:
    """(loss, accuracy) on a whole data set, in chunks of :data:`EVAL_CHUNK` rows.

    The loss is the data set's mean (or sum, for ``reduction="sum"``) of l_n, exactly
    the loss of one batch holding every row.  NaN/Inf outputs give ``inf`` loss.
    """
    N = X.shape[0]
    if N == 0:
        raise ValueError("dataset_metrics needs at least one sample, got an empty data set.")
    per_sample, correct, counted = 0.0, 0.0, 0
    for s in range(0, N, EVAL_CHUNK):
        Xb = to_device(X[s:s + EVAL_CHUNK], like=theta)
        yb = to_device(y[s:s + EVAL_CHUNK], like=theta)
        try:
            Z = model.forward(theta, Xb)
            c = float(loss.scale(Z))
            per_sample += to_float(loss(Z, yb)) / c  # Σ_n l_n over the chunk
        except ValueError as err:  # outputs or losses overflowed: a diverged θ
            if "NaN or Inf" in str(err):
                return math.inf, math.nan
            raise
        acc = batch_accuracy(Z, yb)
        if not math.isnan(acc):
            correct += acc * Z.shape[0]
            counted += Z.shape[0]
    Zfull_scale = _scale_for(loss, N, Z.shape[1])
    return per_sample * Zfull_scale, (correct / counted if counted else math.nan)


def _scale_for(loss, N: int, C: int) -> float:
    """The constant c of a batch of N rows with C outputs (see refngd.losses)."""
    return float(loss.scale(np.zeros((N, C))))


def _streams(rng):
    if isinstance(rng, np.random.Generator):
        seeds = rng.integers(0, 2**63, size=2)
        return np.random.default_rng(int(seeds[0])), np.random.default_rng(int(seeds[1]))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        a, b = np.random.SeedSequence(int(rng)).spawn(2)
        return np.random.default_rng(a), np.random.default_rng(b)
    raise TypeError(f"rng must be an int seed or a numpy.random.Generator, got {rng!r}.")


def _not_finite(info: dict, theta) -> str | None:
    if not math.isfinite(info.get("loss", 0.0)):
        return "the batch loss"
    if not np.all(np.isfinite(to_numpy(theta))):
        return "the parameter vector θ"
    return None


def _append(log: dict, step: int, epoch: float, elapsed: float, info: dict) -> None:
    n = len(log["step"])
    log["step"].append(step)
    log["epoch"].append(epoch)
    log["time"].append(elapsed)
    for k, v in info.items():
        if k not in log:
            log[k] = [math.nan] * n  # a key the optimizer did not report before
        log[k].append(v)
    for k, col in log.items():
        if len(col) == n:
            col.append(math.nan)


def progress_bar(total: int, progress: bool | None, desc: str | None, unit: str = "it",
                 leave: bool = False):
    """A tqdm bar on stderr, or ``None`` when ``progress`` is off (``None``: on a terminal)."""
    if progress is None:
        progress = bool(getattr(sys.stderr, "isatty", lambda: False)())
    if not progress:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError("progress bars need tqdm: pip install tqdm (or turn progress off).") from None
    return tqdm(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True, file=sys.stderr)
