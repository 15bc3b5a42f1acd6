"""Where a ``refngd compare`` run writes, so that no run is ever lost or mixed with another.

Three rules, each enforced here and nowhere else:

1. **Check first.**  The output folder is validated (and created) *before* any data is
   loaded or any training starts: an existing file, a path below a file or a folder that
   cannot be written end the command at once with one line saying what to do.
2. **Never mix runs.**  A folder that already holds anything (an earlier run's
   ``compare.json``, its PNGs) is never written into: the run goes to the first free
   sibling ``OUT-2``, ``OUT-3``, ..., and :attr:`RunOutput.note` says so.
3. **Save as you go.**  After each method finishes, ``compare.json`` is rewritten
   atomically (:func:`refngd.optim.records.save_json`) with every finished method
   and ``"complete": false``; an interrupted run (Ctrl-C) keeps them, and
   :meth:`RunOutput.interrupted_message` is the one line that says so.  The finished run
   replaces the file with the full record (``"complete": true``).
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, is_dataclass

from ..optim.records import save_json

RECORD = "compare.json"


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

    Attributes
    ----------
    folder : where this run writes (``out``, or a fresh sibling when ``out`` holds files).
    note : ``None``, or the line telling the user that ``folder`` differs from ``out``.
    record_path : ``folder/compare.json``.
    """

    def __init__(self, out: str):
        if not isinstance(out, str) or not out.strip():
            raise OutputError("--out needs a folder name, e.g. --out results.")
        path = os.path.normpath(os.path.expanduser(out))
        self.requested, self.note = out, None
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
        if os.path.isdir(path) and os.listdir(path):
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
        self._header: dict = {}

    # ------------------------------------------------------------------ saving as we go
    def start(self, config) -> None:
        """Remember the run's settings for the partial records."""
        self._header = {"config": asdict(config) if is_dataclass(config) else dict(config)}

    def method_done(self, method: str, rec: dict) -> None:
        """Record one finished method and rewrite ``compare.json`` atomically."""
        finished = {**self.finished, method: rec}
        partial = {**self._header, "complete": False, "finished_methods": list(finished),
                   "methods": finished}
        save_json(partial, self.record_path)
        self.finished = finished  # only once it is on disk: the interrupt message must be true

    def interrupted_message(self) -> str:
        """The one line printed when the run is interrupted."""
        if not self.finished:
            self.discard_if_empty()
            return "refngd compare: interrupted before any method finished; nothing was saved."
        names = ", ".join(self.finished)
        return (f"refngd compare: interrupted; kept the results of the {len(self.finished)} finished "
                f"method(s) ({names}) in {self.record_path}.")

    def discard_if_empty(self) -> None:
        """Remove the folder again if this run created it and wrote nothing (an early error)."""
        if self._created and os.path.isdir(self.folder) and not os.listdir(self.folder):
            os.rmdir(self.folder)
