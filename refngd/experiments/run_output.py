"""Where a ``refngd compare`` run writes, so that no run is ever lost or mixed with another.

Three rules, each enforced here and nowhere else:

1. **Check first.**  The output folder is validated (and created) *before* any data is
   loaded or any training starts: an existing file, a path below a file or a folder that
   cannot be written end the command at once with one line saying what to do.
2. **Never mix runs.**  A folder that already holds anything (an earlier run's
   ``compare.json``, its PNGs) is never written into: the run goes to the first free
   sibling ``OUT-2``, ``OUT-3``, ..., and :attr:`RunOutput.note` says so.
3. **Save as you go.**  Each unit of work (:mod:`refngd.experiments.units`) is saved as
   it finishes, one file per unit in ``OUT/units/`` beside a copy of the configuration
   (``units/run.json``); after each method finishes, ``compare.json`` is rewritten
   atomically (:func:`refngd.optim.records.save_json`) with every finished method
   and ``"complete": false``.  An interrupted run (Ctrl-C) keeps them, and
   :meth:`RunOutput.interrupted_message` is the one line that says so.  The finished run
   replaces the file with the full record (``"complete": true``) and removes ``units/``.

``--resume`` is the one exception to rule 2: the run goes on in ``OUT`` itself, after
checking that ``OUT`` holds a run of the same configuration, and the units recorded there
are not run again (:attr:`RunOutput.done`).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import asdict, is_dataclass

from ..optim.records import jsonable, load_json, save_json

RECORD = "compare.json"
UNITS = "units"  #: the folder of the finished units' results while a run goes on
RUN_HEADER = "run.json"  #: in it: the configuration and version the units belong to
#: options that do not change a number of the record, so a run may resume with others
RESUME_FREE = ("out", "progress")


class OutputError(ValueError):
    """``--out`` cannot be used; the message says why and what to do."""


def _check_writable_folder(folder: str, shown: str) -> None:
    """Raise :class:`OutputError` unless a file can be created in the existing ``folder``."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".refngd-write-test-", dir=folder)
    except OSError as err:
        raise OutputError(f"--out {shown!r}: cannot write into {folder!r} ({err.strerror}); "
                          "choose a folder you can write to with --out.") from None
    os.close(fd)
    os.remove(probe)


def _free_sibling(path: str) -> str:
    """``path``, or the first of ``path-2``, ``path-3``, ... that does not exist or is empty."""
    k = 2
    while True:
        candidate = f"{path}-{k}"
        if not os.path.exists(candidate) or (os.path.isdir(candidate) and not os.listdir(candidate)):
            return candidate
        k += 1


class RunOutput:
    """The output folder of one run, checked and created before any work.

    Parameters
    ----------
    out : the requested folder (``--out``).
    resume : go on with the interrupted run in ``out`` (``--resume``) instead of writing
        to a fresh sibling when ``out`` holds files.

    Attributes
    ----------
    folder : where this run writes (``out``, or a fresh sibling when ``out`` holds files).
    note : ``None``, or the line telling the user that ``folder`` differs from ``out``, or
        what ``--resume`` found there.
    record_path : ``folder/compare.json``.
    done : unit key → encoded result of the units an interrupted run recorded (``--resume``).
    complete : ``--resume`` found a finished run: there is nothing to do.
    """

    def __init__(self, out: str, resume: bool = False):
        if not isinstance(out, str) or not out.strip():
            raise OutputError("--out needs a folder name, e.g. --out results.")
        path = os.path.normpath(os.path.expanduser(out))
        self.requested, self.note = out, None
        self.done: dict = {}
        self.complete = False
        self._earlier = None  # the configuration an interrupted run recorded (--resume)
        if os.path.exists(path) and not os.path.isdir(path):
            raise OutputError(f"--out {out!r} is an existing file, not a folder; "
                              "pass a folder name with --out.")
        # the nearest existing ancestor must be a folder we can write into
        parent = os.path.dirname(os.path.abspath(path))
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent):
            raise OutputError(f"--out {out!r} lies below {parent!r}, which is a file, not a folder; "
                              "pass another --out.")
        if resume and os.path.isdir(path) and os.listdir(path):
            self._read_earlier(path, out)
        elif resume:
            self.note = f"--resume: nothing was recorded in {out!r} yet; the run starts there."
        elif os.path.isdir(path) and os.listdir(path):
            fresh = _free_sibling(path)
            self.note = (f"--out {out!r} already holds files (an earlier run?); they are left "
                         f"untouched and this run writes to {fresh!r}.")
            path = fresh
        existed = os.path.isdir(path)
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as err:
            raise OutputError(f"--out {out!r}: cannot create the folder ({err.strerror}); "
                              "choose a folder you can write to with --out.") from None
        self._created = not existed
        _check_writable_folder(path, out)
        self.folder = path
        self.record_path = os.path.join(path, RECORD)
        self.finished: dict = {}
        self.units_saved = 0
        self._header: dict = {}
        self._run_header: dict = {}

    # ------------------------------------------------------------------ --resume
    def _read_earlier(self, path: str, out: str) -> None:
        """The configuration and the finished units of the run in ``path``."""
        header, units = os.path.join(path, UNITS, RUN_HEADER), os.path.join(path, UNITS)
        record = os.path.join(path, RECORD)
        try:
            if os.path.isfile(header):
                self._earlier = load_json(header)
            elif os.path.isfile(record):
                rec = load_json(record)
                config = dict(rec.get("config", {}))
                if rec.get("complete"):
                    self.complete = True
                    config["data"] = config.get("data_path")  # a full record names the data set
                self._earlier = {"config": config, "refngd_version": rec.get("refngd_version")}
        except (OSError, ValueError) as err:
            raise OutputError(f"--resume: cannot read the run in {out!r} ({err}).") from None
        if self._earlier is None:
            raise OutputError(f"--resume: {out!r} holds files but no refngd compare run (no "
                              f"{RECORD}); pass the --out of the interrupted run, or leave "
                              "--resume out.")
        unreadable = 0
        for name in sorted(os.listdir(units)) if os.path.isdir(units) else []:
            if name == RUN_HEADER or not name.endswith(".json"):
                continue
            try:
                stored = load_json(os.path.join(units, name))
                self.done[stored["key"]] = stored["result"]
            except (OSError, ValueError, KeyError, TypeError):
                unreadable += 1  # written atomically, so only a foreign file: run it again
        if not self.complete:
            self.note = (f"--resume: {len(self.done)} finished unit(s) recorded in {out!r} are "
                         "used, not run again" + (f" ({unreadable} unreadable file(s) in "
                                                  f"{UNITS}/ ignored)" if unreadable else "") + ".")

    # ------------------------------------------------------------------ saving as we go
    def start(self, config, blas_threads: int | None = None) -> None:
        """Remember the run's settings for the partial records.

        ``blas_threads``: the BLAS threads each unit runs with (None: the library's
        default).  With ``--resume``, raise :class:`OutputError` unless the interrupted run
        had the same settings (all but :data:`RESUME_FREE`), the same BLAS threads per unit
        (another count can move the last digits) and the same refngd version.
        """
        from .. import __version__

        settings = asdict(config) if is_dataclass(config) else dict(config)
        self._header = {"config": settings}
        self._run_header = {"refngd_version": __version__, "blas_threads": blas_threads,
                            "config": jsonable(settings)}
        if self._earlier is not None:
            self._check_same(self._run_header)

    def _check_same(self, now: dict) -> None:
        then = self._earlier
        where = f"--resume: the run in {self.requested!r}"
        if then.get("refngd_version") not in (None, now["refngd_version"]):
            raise OutputError(f"{where} was made by refngd {then['refngd_version']}, this is "
                              f"{now['refngd_version']}: its units could differ; leave --resume "
                              "out to start a fresh run.")
        old = jsonable(then.get("config", {}))
        differ = [f"{k.replace('_', '-')} {old.get(k)!r} there, {v!r} here"
                  for k, v in now["config"].items() if k not in RESUME_FREE and old.get(k) != v]
        if "blas_threads" in then and then["blas_threads"] != now["blas_threads"]:
            differ.append(f"BLAS threads per unit {then['blas_threads']} there, "
                          f"{now['blas_threads']} here (--threads, --workers)")
        if differ:
            raise OutputError(f"{where} has another configuration ({'; '.join(differ)}); resume "
                              "with the same options, or leave --resume out to start a fresh run.")

    def unit_done(self, unit, result) -> None:
        """Save one finished unit's encoded result atomically in ``folder/units/``."""
        units = os.path.join(self.folder, UNITS)
        if not self.units_saved:
            os.makedirs(units, exist_ok=True)
            save_json(self._run_header, os.path.join(units, RUN_HEADER))
        save_json({"key": unit.key, "unit": unit.to_dict(), "result": result},
                  os.path.join(units, unit.filename))
        self.units_saved += 1

    def finish(self) -> None:
        """The full record is written: the units' files have served their purpose."""
        shutil.rmtree(os.path.join(self.folder, UNITS), ignore_errors=True)

    def method_done(self, method: str, rec: dict) -> None:
        """Record one finished method and rewrite ``compare.json`` atomically."""
        finished = {**self.finished, method: rec}
        partial = {**self._header, "complete": False, "finished_methods": list(finished),
                   "methods": finished}
        save_json(partial, self.record_path)
        self.finished = finished  # only once it is on disk: the interrupt message must be true

    def interrupted_message(self) -> str:
        """The one line printed when the run is interrupted."""
        kept = len(self.done) + self.units_saved
        again = (f"; finish it with the same options and --resume --out {self.folder}"
                 if kept else "")
        if not self.finished:
            if not kept:
                self.discard_if_empty()
                return "refngd compare: interrupted before any method finished; nothing was saved."
            return (f"refngd compare: interrupted before any method finished; kept {kept} finished "
                    f"unit(s) in {os.path.join(self.folder, UNITS)}{again}.")
        names = ", ".join(self.finished)
        return (f"refngd compare: interrupted; kept the results of the {len(self.finished)} "
                f"finished method(s) ({names}) in {self.record_path} and {kept} finished "
                f"unit(s){again}.")

    def discard_if_empty(self) -> None:
        """Remove the folder again if this run created it and wrote nothing (an early error)."""
        if self._created and os.path.isdir(self.folder) and not os.listdir(self.folder):
            os.rmdir(self.folder)
