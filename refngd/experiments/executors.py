"""Who runs the units of ``refngd compare``: this process, or a Dask cluster.

Two executors with one small interface (``scatter``, ``submit``, ``next_done``,
``close``), used by :class:`refngd.experiments.grid.Grid`:

* :class:`InProcess` (the default): runs each unit when the driver asks for the next
  result, in the order they were submitted.  No dependency beyond refngd's own.
* :class:`DaskExecutor`: submits every unit to a ``dask.distributed.Client`` at once and
  returns results as they complete.  The scheduler retries the units of a worker that
  dies on another worker (up to ``distributed.scheduler.allowed-failures`` times).

:func:`connect` makes the client of ``refngd compare --workers N`` (a local cluster of N
worker processes) or ``--scheduler ADDRESS`` (an existing cluster).  dask is imported
only here and only when asked for: ``refngd compare`` without these options never
touches it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections import deque
from typing import Callable

#: seconds to wait for ``--scheduler ADDRESS`` to answer before giving up
CONNECT_TIMEOUT = 10.0
#: the BLAS libraries' thread-count variables, set for the worker processes of a local cluster
BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
            "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")
INSTALL_HINT = "pip install 'refngd[distributed]'"


class ExecutorError(RuntimeError):
    """A cluster that cannot be started or reached; the message says why and what to do."""


class InProcess:
    """Runs every unit in this process, one after another, in submission order."""

    description = "in-process"

    def __init__(self):
        self._queue: deque = deque()

    def scatter(self, obj):
        return obj

    def submit(self, tag, fn: Callable, *args) -> None:
        self._queue.append((tag, fn, args))

    def next_done(self):
        """Run the oldest submitted unit; returns ``(tag, result)``."""
        tag, fn, args = self._queue.popleft()
        return tag, fn(*args)

    def close(self) -> None:
        self._queue.clear()


class DaskExecutor:
    """Runs the units on the workers of ``client`` (a ``dask.distributed.Client``).

    Large inputs shared by many units (a seed's data set) go to every worker once
    (:meth:`scatter`); results come back in completion order (:meth:`next_done`).
    :meth:`close` cancels what has not finished; the client itself stays open (it is the
    caller's).
    """

    def __init__(self, client, description: str | None = None):
        from distributed import as_completed

        self.client = client
        self.description = description or f"the Dask cluster at {client.scheduler.address}"
        self._done = as_completed()
        self._tags: dict = {}

    def scatter(self, obj):
        # broadcast: every worker holds a copy, so a worker that dies loses none of them
        return self.client.scatter(obj, broadcast=True, hash=False)

    def submit(self, tag, fn: Callable, *args) -> None:
        future = self.client.submit(fn, *args, pure=False)
        self._tags[future.key] = (tag, future)
        self._done.add(future)

    def next_done(self):
        future = next(self._done)
        tag, _ = self._tags.pop(future.key)
        return tag, future.result()  # a unit's own exception is raised here, unchanged

    def close(self) -> None:
        pending = [f for _, f in self._tags.values()]
        self._tags.clear()
        if pending:
            self.client.cancel(pending)


def worker_threads(workers: int, threads: int, cores: int | None = None) -> int:
    """BLAS threads per worker: ``threads`` (0: all it may have), so that workers × threads ≤ cores.

    ``worker_threads(2, 1, 16) == 1``; ``worker_threads(2, 0, 16) == 8``;
    ``worker_threads(4, 4, 8) == 2``; never below 1 (more workers than cores oversubscribe).
    """
    cores = cores or os.cpu_count() or 1
    share = max(1, cores // workers)
    return share if threads == 0 else min(threads, share)


def local_cluster(workers: int, threads: int, quiet: bool = True):
    """A ``LocalCluster`` of ``workers`` processes (one task each) and its ``Client``.

    Worker processes, not threads: the units spend much of their time in Python, which
    the GIL would serialise.  Each worker runs one unit at a time with
    :func:`worker_threads` BLAS threads (environment variables set before its BLAS loads)
    and keeps the memory its units free for the next ones
    (:func:`refngd.memory.keep_freed_memory_env`).
    The scheduler's HTTP server (it always has one) takes a free port: 8787 may be another
    cluster's.
    """
    from ..memory import keep_freed_memory_env

    distributed = _import_distributed("--workers")
    import dask

    n = worker_threads(workers, threads)
    env = {name: str(n) for name in BLAS_ENV}
    # Dask's nanny starts its workers with MALLOC_TRIM_THRESHOLD_=65536, which also fixes
    # glibc's mmap threshold at 128 KiB: a unit's temporaries were mapped and unmapped
    # afresh, 5x the page faults of the same unit in-process and ~1.7x its time
    # (docs/benchmarks.md).  The workers are refngd's own processes: they keep freed memory.
    env.update(keep_freed_memory_env())
    # glibc and OpenBLAS read these when a process starts, so they must be in the environment
    # the worker is spawned with ("pre-spawn-environ"); the nanny's ``env`` is applied after
    # the start.  The nanny writes them into this process's os.environ to spawn: restored after.
    pre = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **env}
    saved = {k: os.environ.get(k) for k in pre}
    try:
        with _workers_ignore_ctrl_c(), dask.config.set({"distributed.nanny.pre-spawn-environ": pre}):
            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                env=env, silence_logs=logging.ERROR if quiet else logging.WARNING)
    except Exception as err:  # noqa: BLE001 -- any failure to start is reported in one line
        raise ExecutorError(f"could not start a local Dask cluster of {workers} workers: "
                            f"{type(err).__name__}: {err}") from err
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    client = distributed.Client(cluster)
    return cluster, client, n


@contextlib.contextmanager
def _workers_ignore_ctrl_c():
    """Start the worker processes with SIGINT ignored (inherited through their exec).

    Ctrl-C in a terminal reaches the whole process group: the workers would die with a
    traceback each while the driver is saving what finished.  Ignoring it, they are left
    to the driver, which closes the cluster after saying what was kept.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may change signal handlers
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def close_quietly(client, cluster=None) -> None:
    """Close ``client`` and then ``cluster`` without Dask's shutdown chatter.

    Closing with units in flight (Ctrl-C) makes the scheduler log, at CRITICAL level,
    every message it can no longer send to the closed client: pages of tracebacks after
    the one line that says what was kept.  They say nothing the user needs.
    """
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
               if name == "distributed" or name.startswith("distributed.")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL + 1)
    try:
        client.close()
        if cluster is not None:
            cluster.close()
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


def connect(address: str, timeout: float | None = None):
    """A ``Client`` of the scheduler at ``address``, whose workers run this refngd version.

    Raises :class:`ExecutorError` when the scheduler does not answer within ``timeout``
    seconds (default :data:`CONNECT_TIMEOUT`) or a worker runs another refngd.
    """
    distributed = _import_distributed("--scheduler")
    timeout = CONNECT_TIMEOUT if timeout is None else timeout
    try:
        client = distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as err:
        raise ExecutorError(f"cannot reach the Dask scheduler at {address!r} within {timeout:g} s "
                            f"({type(err).__name__}: {err}); is it running, and is the address "
                            "host:port (e.g. tcp://10.0.0.5:8786)?") from None
    try:
        check_workers(client)
    except ExecutorError:
        client.close()
        raise
    return client


def check_workers(client) -> None:
    """Refuse workers that cannot import refngd or run another version of it.

    Another version could compute other numbers; the record would not say so.
    """
    from .. import __version__

    try:
        versions = client.run(_refngd_version)
    except Exception as err:  # noqa: BLE001 -- e.g. ModuleNotFoundError on the workers
        raise ExecutorError(f"the workers of {client.scheduler.address} cannot run refngd "
                            f"({type(err).__name__}: {err}); install refngd {__version__} "
                            "there.") from None
    other = {w: v for w, v in versions.items() if v != __version__}
    if other:
        raise ExecutorError(f"the workers run another refngd than this one ({__version__}): "
                            f"{other}; install the same version everywhere.")


def _refngd_version() -> str:
    from .. import __version__

    return __version__


def _import_distributed(option: str):
    try:
        import distributed
    except ImportError:
        raise ExecutorError(f"{option} needs dask.distributed, which is not installed: "
                            f"{INSTALL_HINT} (or leave {option} out to run in-process).") from None
    return distributed
