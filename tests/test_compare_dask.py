"""``refngd compare`` on a Dask cluster (issue 23): the same record as in-process, also
after a worker is killed mid-run; ``--workers`` and ``--scheduler`` from the command line.

Skipped without dask.distributed (``pip install 'refngd[distributed]'``).  Tiny
configurations and two-worker local clusters: seconds, not minutes.
"""
from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("distributed")
pytest.importorskip("sklearn")

from refngd.cli import main  # noqa: E402
from refngd.experiments import executors  # noqa: E402
from refngd.experiments.compare import run_compare  # noqa: E402
from refngd.experiments.executors import close_quietly, local_cluster  # noqa: E402
from refngd.optim.records import jsonable, load_json  # noqa: E402

from test_compare_units import SMALL, TINY, tiny_config, without_timings  # noqa: E402

QUIET = lambda *a: None  # noqa: E731


@pytest.fixture(scope="module")
def in_process():
    """The in-process record of the two-seed tiny configuration (the reference)."""
    return jsonable(run_compare(tiny_config(seeds=2), log=QUIET, threads=1))


@pytest.fixture(scope="module")
def cluster():
    cluster, client, threads = local_cluster(2, 1)
    assert threads == 1
    yield cluster, client
    close_quietly(client, cluster)


KEYS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "OPENBLAS_NUM_THREADS")


def _worker_start_env():
    """The environment the worker process was started with (glibc and OpenBLAS read it
    then; variables set later in os.environ change nothing)."""
    import pathlib

    path = pathlib.Path("/proc/self/environ")
    if not path.exists():
        import os

        return {k: os.environ.get(k) for k in KEYS}
    pairs = (item.split("=", 1) for item in path.read_bytes().decode().split("\0") if "=" in item)
    env = dict(pairs)
    return {k: env.get(k) for k in KEYS}


def test_local_workers_start_with_kept_freed_memory_and_one_blas_thread(cluster):
    """Dask's nanny default (trim at 64 KiB) is overridden by refngd's own settings, in the
    environment the workers are spawned with; this process's own is left as it was."""
    import os

    from refngd.memory import keep_freed_memory_env

    _, client = cluster
    want = dict(keep_freed_memory_env(), OPENBLAS_NUM_THREADS="1")
    assert set(map(str, client.run(_worker_start_env).values())) == {str(want)}
    assert os.environ.get("MALLOC_TRIM_THRESHOLD_") != want["MALLOC_TRIM_THRESHOLD_"]


def test_two_workers_give_the_in_process_record(cluster, in_process):
    _, client = cluster
    seen = []
    record = jsonable(run_compare(tiny_config(seeds=2), log=QUIET, client=client, threads=1,
                                  on_unit=lambda unit, result: seen.append(unit.key)))
    assert without_timings(record) == without_timings(in_process)  # every number
    assert len(seen) == len(set(seen)) == 2 * (4 + 3 * 2 + 3 * 2)  # each unit once
    assert len(client.scheduler_info()["workers"]) == 2


def test_a_killed_worker_loses_nothing(in_process):
    """SIGKILL a worker while it holds a unit: the scheduler runs that unit elsewhere."""
    cluster, client, _ = local_cluster(2, 1)
    try:
        pids = client.run(os.getpid)
        killed = {}

        def kill_a_busy_worker(unit, result):
            if killed:
                return
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if busy:  # the worker that holds the most units right now
                worker = max(busy, key=lambda w: len(busy[w]))
                killed.update(worker=worker, units=len(busy[worker]))
                os.kill(pids[worker], signal.SIGKILL)

        record = jsonable(run_compare(tiny_config(seeds=2), log=QUIET, client=client, threads=1,
                                      on_unit=kill_a_busy_worker))
        assert killed and killed["units"] >= 1
        assert without_timings(record) == without_timings(in_process)
    finally:
        close_quietly(client, cluster)


def test_cli_workers_writes_the_in_process_compare_json(tmp_path, capsys):
    # 3 training runs and the γ study at steps 0, 1, 2 (× 8 batches of 32): 27 units
    args = ["compare", "--methods", "sgd,ngd", "--lr", "sgd=0.1:0.3", "--lr", "ngd=0.1",
            *SMALL, "--max-steps", "2"]
    assert main([*args, "--out", str(tmp_path / "here")]) == 0
    assert main([*args, "--out", str(tmp_path / "there"), "--workers", "2"]) == 0
    assert "a local Dask cluster of 2 worker processes × 1 BLAS thread" in capsys.readouterr().out
    here = load_json(str(tmp_path / "here" / "compare.json"))
    there = load_json(str(tmp_path / "there" / "compare.json"))
    assert without_timings(there) == without_timings(here)
    assert here["executor"] == {"kind": "in-process"}
    assert there["executor"] == {"kind": "local Dask cluster", "workers": 2,
                                 "blas_threads_per_worker": 1}
    assert sorted(os.listdir(tmp_path / "there")) == ["compare.json", "table.md"]


def test_cli_scheduler_uses_an_existing_cluster(cluster, tmp_path, capsys):
    local, _ = cluster
    out = tmp_path / "res"
    assert main(["compare", "--methods", "sgd", "--lr", "0.1", "--no-gamma", *SMALL,
                 "--out", str(out), "--scheduler", local.scheduler_address]) == 0
    rec = load_json(str(out / "compare.json"))
    assert rec["executor"]["kind"] == "Dask scheduler" and rec["executor"]["workers"] == 2
    assert f"the Dask cluster at {local.scheduler_address}" in capsys.readouterr().out


def test_cli_unreachable_scheduler_fails_in_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(executors, "CONNECT_TIMEOUT", 0.5)
    out = tmp_path / "res"
    assert main(["compare", *TINY, "--out", str(out), "--scheduler", "tcp://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the Dask scheduler at 'tcp://127.0.0.1:9'" in err[0]
    assert not out.exists()  # nothing was written
