"""docs/kfac.md: every Python block runs, and the printed comparison matches the page."""
from __future__ import annotations

import contextlib
import io
import pathlib

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "kfac.md"


def fenced(text):
    """(language, body) of every fenced block, in order."""
    out, lang, body = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, body = line[3:].strip(), []
            else:
                out.append((lang, "\n".join(body) + "\n"))
                lang = None
        elif lang is not None:
            body.append(line)
    return out


def test_docs_examples_run_and_match_their_output():
    text = DOC.read_text(encoding="utf-8")
    code = [b for lang, b in fenced(text) if lang == "python"]
    outputs = [b for lang, b in fenced(text) if lang == ""]
    assert len(code) >= 2
    printed = []
    for src in code:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(src, str(DOC), "exec"), {"__name__": "__docs__"})
        printed.append(buf.getvalue())
    # the "simplified K-FAC" example prints exactly the table shown on the page
    assert printed[-1].strip() in [o.strip() for o in outputs], printed[-1]
