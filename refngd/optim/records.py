"""Results records: JSON files and plain-text tables (host-side I/O)."""
from __future__ import annotations

import base64
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


# ------------------------------------------------------------------ exact round trips
#: the tags of :func:`encode_exact`; a dict that uses one as a key is itself tagged
_TAGS = ("__ndarray__", "__float__", "__tuple__", "__items__")


def encode_exact(obj):
    """``obj`` as JSON-able data that :func:`decode_exact` turns back into *exactly* ``obj``.

    For the results of ``refngd compare``'s units of work, stored one file each while a
    run goes on and read back by ``--resume`` (:mod:`refngd.experiments.units`): a resumed
    run must assemble the same record as an uninterrupted one, so θ's bytes, float32
    against float64 and inf against NaN must survive, which :func:`jsonable` (NaN/Inf as
    null, arrays as lists of Python floats) does not promise.  Tagged values:

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

