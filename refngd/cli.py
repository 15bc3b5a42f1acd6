"""The ``refngd`` command line: ``refngd compare`` and ``refngd check`` (also ``python -m refngd ...``)."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time


def _lr_override(text: str):
    """``METHOD=LR[:LR...]`` or a bare ``LR`` (all methods) → (method or None, [lrs])."""
    method, _, values = text.rpartition("=")
    try:
        lrs = [float(v) for v in values.split(":")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--lr {text!r}: expected METHOD=LR[:LR...] (e.g. sgd=0.1 or adam=1e-3:3e-3) or a bare LR."
        ) from None
    if not lrs or any(not (math.isfinite(v) and v > 0) for v in lrs):
        raise argparse.ArgumentTypeError(f"--lr {text!r}: learning rates must be positive numbers.")
    return (method.strip().lower() or None), lrs


def _int_at_least(minimum: int, what: str):
    """An argparse type: an integer >= ``minimum`` (a bad value exits 2 with the usage)."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}.") from None
        if v < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}.")
        return v

    parse.__name__ = what  # argparse names the type in its message
    return parse


_positive_int = _int_at_least(1, "a positive integer")
_workers = _int_at_least(1, "a number of worker processes >= 1 (leave --workers out to run "
                            "in-process)")
_nonnegative_int = _int_at_least(0, "an integer >= 0")


def build_parser() -> argparse.ArgumentParser:
    from .check.cli import HelpFormatter, add_check_parser
    from .experiments.compare import DEFAULT_METHODS, METHODS

    from . import __version__

    parser = argparse.ArgumentParser(prog="refngd", description="refngd: exact natural-gradient methods.")
    parser.add_argument("--version", action="version", version=f"refngd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    cmp = sub.add_parser(
        "compare", help="train one network with every method and compare them",
        description=("Train a small network with SGD, Adam, exact NGD, EF, iEF, SF, K-FAC, EKFAC, "
                     "AdaFisher and FAdam side by side (each at the best of five learning rates), "
                     "evaluate the approximation quality γ(d)/γ(g) of Wu et al. (2024) along the "
                     "way, print a table and write results/ (JSON record and PNG plots)."),
        formatter_class=HelpFormatter)
    cmp.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                     help=f"comma-separated methods, from: {', '.join(METHODS)}")
    cmp.add_argument("--model", choices=("mlp", "cnn"), default="mlp", help="network")
    cmp.add_argument("--data", metavar="PATH.npz", default=None,
                     help="your data: an .npz with arrays X (N, ...) and y (N,) integer labels "
                          "(optionally X_test, y_test); default: scikit-learn's digits")
    cmp.add_argument("--epochs", type=_positive_int, default=10, help="passes over the training set")
    cmp.add_argument("--batch-size", type=_positive_int, default=64, help="mini-batch size")
    cmp.add_argument("--lr", type=_lr_override, action="append", default=[], metavar="METHOD=LR[:LR...]",
                     help="learning rate(s) instead of a method's default grid; repeatable; a bare "
                          "LR applies to every method")
    cmp.add_argument("--seed", type=_nonnegative_int, default=0, help="seed of the split, θ₀, batches and sampling")
    cmp.add_argument("--seeds", type=_positive_int, default=1,
                     help="run everything for K seeds (seed, seed+1, …) and report mean ± sd")
    cmp.add_argument("--out", default="results", help="output folder")
    cmp.add_argument("--no-progress", action="store_true", help="no progress bars")
    cmp.add_argument("--no-gamma", action="store_true", help="skip the γ-ratio evaluation")
    cmp.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    cmp.add_argument("--threads", type=_nonnegative_int, default=1,
                     help="BLAS threads during the run (0: the library's default). One is fastest "
                          "for these small matrices and immune to oversubscribed machines")
    cmp.add_argument("--workers", type=_workers, default=None, metavar="N",
                     help="run the units of work on a local Dask cluster of N worker processes "
                          "(needs refngd[distributed]); default: in this process")
    cmp.add_argument("--scheduler", default=None, metavar="ADDRESS",
                     help="run them on the existing Dask cluster whose scheduler is at ADDRESS "
                          "(e.g. tcp://10.0.0.5:8786)")
    cmp.add_argument("--resume", action="store_true",
                     help="go on with the interrupted run in --out: the units it recorded are "
                          "not run again")
    cmp.add_argument("--max-steps", type=_positive_int, default=None, help=argparse.SUPPRESS)
    parser.compare_parser = cmp

    add_check_parser(sub)
    return parser


def compare_config(args, parser):
    from .experiments.compare import CompareConfig

    methods = tuple(m.strip().lower() for m in args.methods.split(",") if m.strip())
    lr = {}
    for method, lrs in args.lr:
        targets = methods if method is None else (method,)
        for m in targets:
            lr[m] = lrs
    config = CompareConfig(methods=methods, model=args.model, data=args.data, epochs=args.epochs,
                           batch_size=args.batch_size, lr=lr, seed=args.seed, out=args.out,
                           progress=False if args.no_progress else None, gamma=not args.no_gamma,
                           max_steps=args.max_steps, seeds=args.seeds)
    try:
        config.check()
    except ValueError as err:
        parser.error(str(err))
    return config


def _blas_threads(n: int):
    """Limit BLAS threads to ``n`` (threadpoolctl, a scikit-learn dependency) while running."""
    if n == 0:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _missing_extras(config, plots: bool) -> tuple[list[str], list[str]]:
    """What ``refngd compare`` needs from the ``cli`` extra: (fatal errors, notes).

    scikit-learn is needed for the bundled digits; without tqdm the run has no progress
    bars and without matplotlib no plots (both noted, the run goes on).
    """
    from importlib.util import find_spec

    extra = "pip install 'refngd[cli]'"
    errors, notes = [], []
    if config.data is None and find_spec("sklearn") is None:
        errors.append(f"the bundled digits need scikit-learn, which is not installed: {extra} "
                      "(or pass your own data with --data PATH.npz).")
    if config.progress is not False and find_spec("tqdm") is None:
        if config.progress or sys.stderr.isatty():  # bars were wanted (None: on a terminal)
            notes.append(f"tqdm is not installed: no progress bars ({extra}).")
        config.progress = False
    if plots and find_spec("matplotlib") is None:
        notes.append(f"matplotlib is not installed: no plots, the JSON record and table only ({extra}).")
    return errors, notes


def _find(module: str):
    from importlib.util import find_spec

    return find_spec(module)


def _unit_threads(args) -> int | None:
    """The BLAS threads each unit runs with (None: the library's default)."""
    if args.workers is not None:
        from .experiments.executors import worker_threads

        return worker_threads(args.workers, args.threads)
    return args.threads or None


@contextlib.contextmanager
def _executor(args):
    """``(client, description)``: no client in-process, else a Dask client, closed afterwards.

    ``--workers N`` starts a local cluster of N processes with ``--threads`` BLAS threads
    each, capped so that N × threads ≤ cores (``--threads 0``: cores // N);
    ``--scheduler ADDRESS`` connects to an existing one (each unit then caps its BLAS
    threads at ``--threads`` where threadpoolctl is installed).
    """
    if args.workers is None and args.scheduler is None:
        yield None, {"kind": "in-process"}
        return
    from .experiments.executors import close_quietly, connect, local_cluster

    cluster = None
    if args.workers is not None:
        cluster, client, n = local_cluster(args.workers, args.threads)
        info = {"kind": "local Dask cluster", "workers": args.workers,
                "blas_threads_per_worker": n}
        cores = os.cpu_count() or 1
        shared = (f" on {cores} cores: more workers than cores, they share them"
                  if args.workers > cores else "")
        print(f"refngd compare: a local Dask cluster of {args.workers} worker processes × {n} "
              f"BLAS thread{'s' if n != 1 else ''}{shared}")
    else:
        client = connect(args.scheduler)
        workers = len(client.nthreads())  # some dask versions list 5 in scheduler_info()
        info = {"kind": "Dask scheduler", "address": args.scheduler, "workers": workers,
                "blas_threads_per_worker": args.threads or None}
        print(f"refngd compare: the Dask cluster at {args.scheduler} ({workers} workers now)")
    try:
        yield client, info
    finally:
        close_quietly(client, cluster)


def main(argv=None) -> int:
    """Entry point of the ``refngd`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "check":
        from .check.cli import run_check

        return run_check(args)
    config = compare_config(args, parser.compare_parser)
    from .experiments.compare import format_results, run_compare, write_outputs
    from .experiments.data import DataError
    from .experiments.executors import ExecutorError
    from .experiments.run_output import OutputError, RunOutput

    if args.workers is not None and args.scheduler is not None:
        parser.compare_parser.error("--workers starts a local cluster and --scheduler uses an "
                                    "existing one: pass one of them, not both.")
    errors, notes = _missing_extras(config, plots=not args.no_plots)
    if (args.workers or args.scheduler) and _find("distributed") is None:
        option = "--workers" if args.workers else "--scheduler"
        errors.append(f"{option} needs dask.distributed, which is not installed: pip install "
                      f"'refngd[distributed]' (or leave {option} out to run in-process).")
    if errors:
        print(f"refngd compare: error: {errors[0]}", file=sys.stderr)
        return 2
    plots = not args.no_plots and not any("matplotlib" in n for n in notes)
    try:  # before any work: a bad --out must not cost a whole run
        out = RunOutput(config.out, resume=args.resume)
        out.start(config, blas_threads=_unit_threads(args))
    except OutputError as err:
        parser.compare_parser.error(str(err))
    if out.complete:
        print(f"refngd compare: --out {config.out!r} holds a finished run ({out.record_path}); "
              "nothing to resume.", file=sys.stderr)
        return 0
    for line in notes + ([out.note] if out.note else []):
        print(f"refngd compare: {line}", file=sys.stderr)
    t0 = time.perf_counter()
    try:
        with _blas_threads(args.threads), _executor(args) as (client, executor):
            record = run_compare(config, on_method=out.method_done, on_unit=out.unit_done,
                                 done=out.done, client=client,
                                 threads=executor.get("blas_threads_per_worker"))
    except (DataError, FileNotFoundError, ExecutorError) as err:
        out.discard_if_empty()
        print(f"refngd compare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{out.interrupted_message()}", file=sys.stderr)
        return 130
    record["config"]["blas_threads"] = args.threads or None
    record["executor"] = executor
    record["complete"] = True
    record["config"]["out_folder"] = out.folder  # where it went (a fresh sibling if --out held files)
    print()
    print(format_results(record))
    paths = write_outputs(record, out.folder, plots=plots)
    out.finish()
    print()
    print(f"wrote {', '.join(paths)}")
    print(f"total {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
