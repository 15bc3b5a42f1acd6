"""Griffe extension for the API reference: Sphinx roles in docstrings become cross-references.

refngd's docstrings are read in editors and by ``help()`` as much as on the site, so they
keep the usual reST roles (:class:`~refngd.curvature.KFAC`, :meth:`solve`, :mod:`refngd.nn`).
mkdocstrings would show them literally; this extension rewrites each one, before the
docstring is parsed, into

* an optional mkdocs-autorefs cross-reference when griffe resolves the name (absolute,
  or relative to the documented object and its parents, as Sphinx does): a link where
  the target is on the site, plain code where it is not (no warning: a private helper
  or a module that moved stays readable, and ``mkdocs build --strict`` keeps passing);
* plain code (backticks) for everything else (``torch.nn.Sequential``, numpy, ...).

``~`` shows the last component only, as in Sphinx.  The docstrings' plain-text
mathematics keeps its Unicode; only a brace subscript, ``m_{t−1}``, which Markdown would
show literally (or worse, pair its underscores into emphasis), is shown as a subscript, and
reST's ``text::`` before a literal block reads ``text:``.  Configured in mkdocs.yml under the
python handler's ``extensions``; tests/test_site.py fails on any role left in the site.
"""
from __future__ import annotations

import html
import re

import griffe

#: a brace subscript after a letter, digit or bracket: m_{t−1}, (q_c/q_y)_{c≠y}
SUBSCRIPT = re.compile(r"(?<=[\w)\]′'ᵀ])_\{([^{}\n]+)\}")
CODE = re.compile(r"(`+)(?:.+?)\1", re.S)
#: the reST roles of Python docstrings (tests/test_site.py fails on any left in the site)
ROLES = "class|func|meth|mod|attr|data|obj|exc|const|ref|term|any|math"
ROLE = re.compile(rf":(?:py:)?({ROLES}):`([^`]+)`")


def _resolve(obj, name: str) -> str | None:
    """The full path of ``name`` as seen from ``obj`` (absolute or relative), or None."""
    name = name.rstrip("()")
    collection = getattr(obj, "modules_collection", None)
    if collection is not None:
        try:
            collection.get_member(name)   # absolute path: refngd.curvature.KFAC
            return name
        except (KeyError, ValueError, AttributeError, griffe.AliasResolutionError,
                griffe.CyclicAliasError):
            pass
    head, _, rest = name.partition(".")
    scope = obj
    while scope is not None:            # relative: the object's own scope, then its parents'
        try:
            path = scope.resolve(head)
            return f"{path}.{rest}" if rest else path
        except (griffe.NameResolutionError, griffe.AliasResolutionError, KeyError, AttributeError):
            scope = scope.parent
    return None


def convert(text: str, obj=None) -> str:
    """``text`` with every Sphinx role replaced by an optional cross-reference or code."""
    def one(match: re.Match) -> str:
        target = match.group(2).strip()
        if match.group(1) == "math":                      # :math:`x` is mathematics
            return f"${target}$"
        shown = target
        if "<" in target and target.endswith(">"):      # :class:`title <path>`
            shown, target = (s.strip() for s in target[:-1].split("<", 1))
        elif target.startswith("~"):
            target = target[1:]
            shown = target.rstrip("()").rsplit(".", 1)[-1] + ("()" if target.endswith("()") else "")
        path = _resolve(obj, target) if obj is not None else None
        code = f"`{shown}`"
        if path is None:
            return code
        return f'<autoref identifier="{html.escape(path, quote=True)}" optional>{code}</autoref>'

    return ROLE.sub(one, text)


def literal_markers(text: str) -> str:
    """reST's ``text::`` before a literal block reads ``text:`` (a lone ``::`` line goes)."""
    out = []
    for line in text.split("\n"):
        if line.strip() == "::":
            continue
        out.append(line[:-1] if line.endswith("::") and not line.endswith(":::") else line)
    return "\n".join(out)


def subscripts(text: str) -> str:
    """``m_{t−1}`` → ``m<sub>t−1</sub>`` outside code spans and doctest lines."""
    out = []
    for line in text.split("\n"):
        if line.lstrip().startswith((">>>", "...")) or "_{" not in line:
            out.append(line)
            continue
        pieces, last = [], 0
        for m in CODE.finditer(line):
            pieces.append(SUBSCRIPT.sub(r"<sub>\1</sub>", line[last:m.start()]))
            pieces.append(m.group(0))
            last = m.end()
        pieces.append(SUBSCRIPT.sub(r"<sub>\1</sub>", line[last:]))
        out.append("".join(pieces))
    return "\n".join(out)


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring once the object tree is complete."""

    def on_object(self, *, obj, **kwargs) -> None:
        if obj.is_alias or obj.docstring is None:
            return
        value = obj.docstring.value
        new = subscripts(convert(value, obj) if ":" in value and "`" in value else value)
        new = literal_markers(new)
        if new != value:
            obj.docstring.value = new
