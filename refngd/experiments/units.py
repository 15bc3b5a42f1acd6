"""The units of work of ``refngd compare``: one training run, one γ evaluation on one batch.

``refngd compare`` is a grid of independent pieces of work (:mod:`refngd.experiments.grid`
plans and assembles them):

=========  =====================================  ======================================
kind       identity (:class:`Unit`)               what it computes
=========  =====================================  ======================================
``train``  seed, method, learning rate            one training run (:func:`run_train`)
``gamma``  seed, checkpoint step, batch index     γ of every method's direction at every
                                                  damping on one batch at one checkpoint
                                                  of the trajectory (:func:`run_gamma`)
``own``    seed, method, its best lr, step,       γ of a state-dependent method's own
           batch index                            direction (:func:`run_own`)
=========  =====================================  ======================================

Each ``run_*`` function is a pure function of its explicit inputs (the configuration, the
seed's data set, the unit, and for the γ units θ and the optimizer state at the
checkpoint) and returns plain data encoded by
:func:`encode_exact`, so a result can travel to another
process, be stored, and be read back bit for bit.

**Random streams belong to the unit.**  Nothing is drawn from a stream that another unit
also draws from, so neither the order in which units run nor the process that runs them
can change a number:

* a training run of seed s: the data split, θ₀ and the batch order come from s alone
  (the same start and the same batches for every method and learning rate, as the
  comparison wants), the Monte-Carlo draws of its optimizer from the second stream
  ``refngd.train`` derives from s (``SeedSequence(s).spawn(2)``);
* the γ evaluation on fixed batch k of seed s: the batches are cut from
  ``default_rng(s + 1)`` (the same for every checkpoint and method), the draws of SF and
  of Monte-Carlo K-FAC from ``default_rng(s + 100 + k)`` — the streams refngd has always
  used, so the in-process numbers are those of every earlier version.

**BLAS threads.**  ``threads`` (the ``--threads`` of the command) caps the BLAS threads
while a unit runs when threadpoolctl is installed; a local cluster also sets the usual
environment variables for its worker processes (:mod:`refngd.experiments.executors`).
"""
from __future__ import annotations

import base64
import contextlib
import copy
import math
import time
from dataclasses import dataclass

import numpy as np

from ..backend import as_generator
from ..losses import CrossEntropy
from ..optim.train import train
from .gamma_study import batch_gammas, direction_gammas
from .methods import METHODS
from .models import build_model


@dataclass(frozen=True)
class Unit:
    """The identity of one unit of work; ``key`` names it in stored results and logs."""

    kind: str  #: "train", "gamma" or "own"
    seed: int
    method: str | None = None
    lr: float | None = None
    step: int | None = None
    batch: int | None = None

    @property
    def key(self) -> str:
        """``seed 0/train/sgd/lr=0.1``, ``seed 0/gamma/step=46/batch=3``, ...

        ``repr`` of the learning rate: the key of 0.1 is never that of 0.1000001.
        """
        parts = [f"seed {self.seed}", self.kind]
        if self.method is not None:
            parts.append(self.method)
        if self.lr is not None:
            parts.append(f"lr={self.lr!r}")
        if self.step is not None:
            parts += [f"step={self.step}", f"batch={self.batch}"]
        return "/".join(parts)

    @property
    def filename(self) -> str:
        """The file name of its stored result (``key`` with ``.`` for ``/`` and no spaces)."""
        return self.key.replace(" ", "").replace("/", ".") + ".json"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def checkpoint_steps(config, n_train: int) -> tuple[int, int, list[int]]:
    """(steps per epoch, steps of a full run, the γ checkpoint steps) of ``config``."""
    per_epoch = -(-n_train // config.batch_size)
    total = config.epochs * per_epoch
    if config.max_steps is not None:
        total = min(config.max_steps, total)
    n_ck = config.gamma_checkpoints
    if not config.gamma:
        return per_epoch, total, []
    return per_epoch, total, sorted({round(i * total / max(1, n_ck - 1)) for i in range(n_ck)})


def run_train(config, data, unit: Unit, checkpoints=(), record_state: bool = False,
              threads: int | None = None) -> dict:
    """One training run of ``unit.method`` at ``unit.lr`` from seed ``unit.seed``'s θ₀.

    ``data`` is the seed's data set shaped for the model (:meth:`Dataset.for_model`);
    ``checkpoints``: the steps at which θ (and with ``record_state`` the optimizer state)
    is kept, for the γ units.  Returns the encoded ``{"run": the row of the method's
    ``runs`` list, "result": TrainResult.to_dict(), "checkpoints", "states", "seconds"}``.
    """
    t0 = time.perf_counter()
    data = fresh(data)
    with blas_limit(threads):
        model = build_model(config.model, data.input_shape, data.num_classes)
        theta0 = model.init(as_generator(unit.seed))
        per_epoch = checkpoint_steps(config, data.X_train.shape[0])[0]
        spec = METHODS[unit.method]
        res = train(model, theta0, CrossEntropy(), data.X_train, data.y_train, spec.make(unit.lr),
                    epochs=config.epochs, batch_size=config.batch_size,
                    max_steps=config.max_steps, rng=unit.seed, X_test=data.X_test,
                    y_test=data.y_test, eval_every=max(1, per_epoch // 4), progress=False,
                    checkpoints=checkpoints, on_divergence="ignore", record_state=record_state)
    run = {"lr": unit.lr, "final_train_loss": res.final_train_loss,
           "test_accuracy": res.evals["test_accuracy"][-1],
           "seconds_per_step": res.seconds_per_step, "steps": res.steps, "stopped": res.stopped}
    return encode_exact({"run": run, "result": res.to_dict(), "checkpoints": res.checkpoints,
                         "states": res.checkpoint_states, "seconds": time.perf_counter() - t0})


def run_gamma(config, data, unit: Unit, theta, rows, dampings, threads: int | None = None) -> dict:
    """:func:`~refngd.experiments.gamma_study.batch_gammas` at θ on the training rows ``rows``
    (fixed batch ``unit.batch``), its draws from ``default_rng(seed + 100 + batch)``."""
    t0 = time.perf_counter()
    data, theta = fresh((data, theta))
    with blas_limit(threads):
        model = build_model(config.model, data.input_shape, data.num_classes)
        out = batch_gammas(model, theta, CrossEntropy(), data.X_train[rows], data.y_train[rows],
                           methods=config.gamma_methods, dampings=dampings,
                           rng=as_generator(unit.seed + 100 + unit.batch))
    return encode_exact({"gammas": out, "seconds": time.perf_counter() - t0})


def run_own(config, data, unit: Unit, theta, state, rows, threads: int | None = None) -> dict:
    """γ of ``opt.direction(θ, state, ...)`` of ``unit.method`` at ``unit.lr`` on one batch
    (:func:`~refngd.experiments.gamma_study.direction_gammas`)."""
    t0 = time.perf_counter()
    # also a copy of the state: in-process the same state object serves every batch of
    # the checkpoint, and a direction that touched it would make one batch's γ depend on another's
    data, theta, state = fresh((data, theta, state))
    with blas_limit(threads):
        model = build_model(config.model, data.input_shape, data.num_classes)
        loss = CrossEntropy()
        X, y = data.X_train[rows], data.y_train[rows]
        d = METHODS[unit.method].make(unit.lr).direction(
            theta, state, model, loss, X, y, rng=as_generator(unit.seed + 100 + unit.batch))
        out = direction_gammas(model, theta, loss, X, y, d)
    return encode_exact({"gammas": out, "seconds": time.perf_counter() - t0})


def fresh(inputs):
    """A deep copy of a unit's array inputs, in memory allocated by NumPy in this process.

    Arrays a Dask worker unpickles can sit at any byte offset of the message they came in
    (even unaligned for float64), and BLAS kernels peel their loops to the alignment of
    their operands: the same γ then differed in the last bits from the in-process one
    (up to 1e-9 relative for K-FAC at tiny damping).  Fresh copies make every process
    see its inputs as this process would.
    """
    return copy.deepcopy(inputs)


def blas_limit(threads: int | None):
    """Cap the BLAS threads at ``threads`` while a unit runs (threadpoolctl, when installed).

    ``None`` or 0 leaves them as they are.  threadpoolctl is not a dependency of refngd
    (scikit-learn brings it); without it the environment variables a local cluster sets
    for its workers still hold.
    """
    if not threads:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


# ------------------------------------------------------------------ exact round trips
#: the tags of :func:`encode_exact`; a dict that uses one as a key is itself tagged
_TAGS = ("__ndarray__", "__float__", "__tuple__", "__items__")


def encode_exact(obj):
    """``obj`` as JSON-able data that :func:`decode_exact` turns back into *exactly* ``obj``.

    For the results of the units of work, stored one file each while a run goes on and
    read back by ``--resume`` (:mod:`refngd.experiments.run_output`): a resumed run must
    assemble the same record as an uninterrupted one, so θ's bytes, float32 against
    float64 and inf against NaN must survive, which :func:`refngd.optim.records.jsonable`
    (NaN/Inf as null, arrays as lists of Python floats) does not promise.  Tagged values:

    * an ndarray or NumPy scalar: ``{"__ndarray__": base64 of its bytes, "dtype", "shape"}``
      (``shape`` null for a scalar);
    * NaN and ±inf: ``{"__float__": "nan" | "inf" | "-inf"}``;
    * a tuple: ``{"__tuple__": [...]}``;
    * a dict with a key that is not a string (or is a tag): ``{"__items__": [[k, v], ...]}``.

    Strings, ints, finite floats, bools and None are themselves; anything else is a
    ``TypeError`` (a unit's result must be plain data).
    """
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, (np.ndarray, np.generic)):
        a = np.asarray(obj)
        if a.dtype.hasobject:
            raise TypeError(f"cannot store an object array exactly (dtype {a.dtype}).")
        data = base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")
        shape = None if isinstance(obj, np.generic) else list(a.shape)
        return {"__ndarray__": data, "dtype": a.dtype.str, "shape": shape}
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else {"__float__": repr(float(obj))}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_exact(v) for v in obj]}
    if isinstance(obj, list):
        return [encode_exact(v) for v in obj]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in obj):
            return {k: encode_exact(v) for k, v in obj.items()}
        return {"__items__": [[encode_exact(k), encode_exact(v)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} exactly: a unit's result must be "
                    "plain data (dicts, lists, numbers, strings, NumPy arrays).")


def decode_exact(obj):
    """The inverse of :func:`encode_exact`."""
    if isinstance(obj, list):
        return [decode_exact(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__ndarray__" in obj:
        a = np.frombuffer(base64.b64decode(obj["__ndarray__"]), dtype=np.dtype(obj["dtype"]))
        return a[0] if obj["shape"] is None else a.reshape(obj["shape"]).copy()  # writable
    if "__float__" in obj:
        return float(obj["__float__"])
    if "__tuple__" in obj:
        return tuple(decode_exact(v) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {decode_exact(k): decode_exact(v) for k, v in obj["__items__"]}
    return {k: decode_exact(v) for k, v in obj.items()}
