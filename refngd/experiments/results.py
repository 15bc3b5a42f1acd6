"""Results records: JSON files and plain-text tables (host-side I/O)."""
from __future__ import annotations

import json
import math
import os

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
    """Write ``record`` (see :func:`jsonable`) to ``path``, creating its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(jsonable(record), f, indent=1, allow_nan=False)
        f.write("\n")


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
