"""Results records: JSON files and plain-text tables (host-side I/O)."""
from __future__ import annotations

import json
import math
import os
import tempfile

import numpy as np


def jsonable(obj):
    """``obj`` with arrays as lists, NumPy scalars as Python numbers and NaN/Inf as ``None``.

    JSON has no NaN or Infinity; ``None`` (``null``) keeps the file valid for every reader.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "get") and hasattr(obj, "device"):  # a CuPy array
        obj = obj.get()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    return obj


def save_json(record: dict, path: str) -> None:
    """Write ``record`` (see :func:`jsonable`) to ``path`` atomically, creating its folder.

    The JSON goes to a temporary file beside ``path`` that then replaces it in one
    ``os.replace``: a reader (or an interrupted run) sees the old file or the new one,
    never half a file.
    """
    text = json.dumps(jsonable(record), indent=1, allow_nan=False) + "\n"
    write_text_atomic(path, text)


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (atomic)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make results private
        os.replace(tmp, path)
    except BaseException:  # also KeyboardInterrupt: leave no temporary file behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def format_table(header: list[str], rows: list[list], align: str | None = None) -> str:
    """A Markdown table (readable as plain text); ``align`` is one of 'l'/'r' per column."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[j]) for r in cells) for j in range(len(header))]
    align = align or "l" + "r" * (len(header) - 1)

    def line(r):
        return "| " + " | ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(r, widths, align)) + " |"

    sep = "|" + "|".join(("-" * (w + 1) + ":") if a == "r" else ("-" * (w + 2))
                         for w, a in zip(widths, align)) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt(v, spec: str = ".4f") -> str:
    """A number for a table: ``—`` for None/NaN, ``inf`` for divergence."""
    if v is None:
        return "—"
    v = float(v)
    if math.isnan(v):
        return "—"
    if math.isinf(v):
        return "diverged" if v > 0 else "-inf"
    return format(v, spec)
