"""The built documentation site: what a reader sees, not only what the Markdown says.

``mkdocs build --strict`` catches broken links and bad config, not what renders wrongly.
These tests build the site once (a few seconds; skipped when the ``docs`` extra is not
installed) and read the HTML of every page:

* no Sphinx role shown literally (":class:`torch.nn.Sequential`": docs/hooks/sphinx_roles.py
  turns those of the docstrings into cross-references);
* no ``_{``, ``^{`` or ``$`` outside typeset mathematics and code — an equation that
  arithmatex did not pick up;
* every image the pages show exists in the site;
* the counts the pages state match examples/ (the gallery's examples).

With Chromium installed (``apt-get install chromium``; .ci/run does it where it can) the
key pages (in CI: every page with mathematics) are also opened in headless Chromium:
MathJax must typeset every equation without an error, and screenshots of the theory page
and the gallery are written to ``screenshots/`` in the site.  ``REFNGD_SITE_DIR=path``
checks an already-built site (CI builds it with ``mkdocs build --strict`` first) instead of
building one.
"""
from __future__ import annotations

import functools
import html
import http.server
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading

import pytest

from test_examples import TEXTBOOK

ROOT = pathlib.Path(__file__).resolve().parents[1]

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const|ref|term|any|math):"
                  r"(?:`|<code>)")
#: what may legitimately hold ``_{`` or ``$``: code, typeset math, scripts and styles
EXEMPT = re.compile(
    r"<(pre|code|script|style|textarea)\b.*?</\1>"
    r"|<(span|div) class=\"arithmatex\">.*?</\2>", re.S)
TAG = re.compile(r"<[^>]+>")
IMG = re.compile(r"<img\b[^>]*\bsrc=\"([^\"]+)\"")
NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
#: the pages that the browser check opens (~4 s each); screenshots of the first two
KEY_PAGES = ["theory", "gallery", "fisher", "kfac", "api"]
#: every other page with mathematics, opened in CI (CI=true) or on an explicit site
MORE_PAGES = ["optim", "metrics", "empirical_fisher", "sampled_fisher", "layers", "losses",
              "conventions", "tutorials", "subsets", "validating", "bad_input", "index",
              "compare", "design", "architecture", "benchmarks"]
BROWSER_PAGES = KEY_PAGES + (MORE_PAGES if os.environ.get("CI") or os.environ.get(
    "REFNGD_SITE_DIR") else [])


def problems(site: pathlib.Path) -> list[str]:
    """Every defect a reader would see in the built site ``site``, one line each."""
    found = []
    for page in sorted(site.rglob("*.html")):
        rel = page.relative_to(site)
        if rel.parts[0] in ("assets", "screenshots") or rel.name == "404.html":
            continue
        raw = page.read_text(encoding="utf-8")
        body = raw.split('<article', 1)[-1]          # the page's own content, not the chrome
        for m in ROLE.finditer(body):
            context = html.unescape(TAG.sub("", body[m.start():m.start() + 80]))
            found.append(f"{rel}: a literal Sphinx role: {context!r}")
        for m in re.finditer(r"::</p>", body):
            context = html.unescape(TAG.sub("", body[max(0, m.start() - 60):m.start() + 2]))
            found.append(f"{rel}: a reST literal-block marker shown: {context!r}")
        text = html.unescape(TAG.sub(" ", EXEMPT.sub(" ", body)))
        for token in ("_{", "^{", "$"):
            for m in re.finditer(re.escape(token), text):
                context = " ".join(text[max(0, m.start() - 40):m.start() + 40].split())
                found.append(f"{rel}: {token!r} outside mathematics and code: {context!r}")
        for src in IMG.findall(raw):
            if re.match(r"[a-z]+:|//", src):
                continue
            target = (page.parent / html.unescape(src).split("#")[0].split("?")[0]).resolve()
            if not target.is_file():
                found.append(f"{rel}: image {src} is not in the site")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> pathlib.Path:
    given = os.environ.get("REFNGD_SITE_DIR")
    if given:
        path = pathlib.Path(given)
        assert (path / "index.html").is_file(), f"REFNGD_SITE_DIR={given} holds no built site"
        return path
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                   "pymdownx"):
        pytest.importorskip(module, reason="the docs extra: pip install -e '.[docs]'")
    path = tmp_path_factory.mktemp("site") / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    return path


def test_site_shows_no_literal_roles_raw_subscripts_or_missing_images(site):
    found = problems(site)
    assert not found, "\n".join(found[:40]) + (f"\n... {len(found)} in all" if found else "")


def test_site_has_typeset_math_and_linked_api(site):
    theory = (site / "theory" / "index.html").read_text(encoding="utf-8")
    assert theory.count('class="arithmatex"') >= 20, "the theory page has no typeset equations"
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    # the docstrings' roles are links where their target is on the site
    assert api.count('class="autorefs autorefs-internal"') >= 100


def test_planted_defects_are_caught(site, tmp_path):
    """A literal role, a raw subscript, a stray $ and a missing image each fail the check."""
    copy = tmp_path / "site"
    (copy / "page").mkdir(parents=True)
    page = (site / "fisher" / "index.html").read_text(encoding="utf-8")
    plants = {
        "role": "<p>see :class:`torch.nn.Sequential` for the order</p>",
        "role-code": "<p>see :class:<code>torch.nn.Sequential</code></p>",
        "subscript": "<p>the loss at p_{θ+d} is</p>",
        "dollar": "<p>an equation $x^2$ left as text</p>",
        "image": '<p><img alt="x" src="../img/missing.png"></p>',
        "literal-marker": "<p>the backward pass::</p>",
    }
    for name, snippet in plants.items():
        marker = "</article>"
        assert marker in page
        (copy / "page" / "index.html").write_text(page.replace(marker, snippet + marker, 1))
        found = problems(copy)
        assert found and all("page/index.html" in f for f in found), (name, found)
    (copy / "page" / "index.html").write_text(page)
    assert problems(copy) == []


def test_sphinx_roles_become_code_or_links():
    pytest.importorskip("griffe")
    sys.path.insert(0, str(ROOT / "docs" / "hooks"))
    try:
        import sphinx_roles
    finally:
        sys.path.pop(0)
    assert sphinx_roles.convert(":class:`torch.nn.Sequential`") == "`torch.nn.Sequential`"
    assert sphinx_roles.convert(":meth:`~refngd.curvature.KFAC.solve`") == "`solve`"
    assert sphinx_roles.convert(":math:`x^2`") == "$x^2$"
    marked = "the rows::\n\n    x = 1\n::\n"
    assert sphinx_roles.literal_markers(marked) == "the rows:\n\n    x = 1\n"
    text = "m_t = β₁ m_{t−1}, `keep_{this}`"
    assert sphinx_roles.subscripts(text) == "m_t = β₁ m<sub>t−1</sub>, `keep_{this}`"


def test_counts_on_the_pages_match_the_examples():
    """"eleven examples" on one page and "nine" on another: the count is checked, not typed."""
    n = len(TEXTBOOK)
    pattern = re.compile(r"\b(\w+) (?:more |textbook |gallery )?examples\b", re.I)
    pages = {"README.md": ROOT / "README.md", "index.md": ROOT / "docs" / "index.md",
             "gallery.md": ROOT / "docs" / "gallery.md"}
    stated = []
    for name, path in pages.items():
        text = " ".join(path.read_text(encoding="utf-8").split())
        for word in pattern.findall(text):
            if word.lower() in NUMBERS or word.isdigit():
                value = NUMBERS.get(word.lower(), None)
                value = int(word) if value is None else value
                stated.append((name, word, value))
    text = (ROOT / "docs" / "gallery.md").read_text(encoding="utf-8")
    sections = re.findall(r"^## \d+\. .*`(\w+)\.py`", text, re.M)
    assert sections == TEXTBOOK, "gallery.md's numbered sections: the TEXTBOOK examples, in order"
    loop = re.search(r"for n in (.*?); do", text, re.S).group(1).replace("\\", " ").split()
    assert loop == TEXTBOOK, "the regeneration loop in gallery.md names every example"
    gallery = [s for s in stated if s[2] >= 5]   # the gallery's count, not "two examples"
    assert gallery, "no page states how many examples the gallery has"
    wrong = [s for s in gallery if s[2] != n]
    assert not wrong, f"the gallery has {n} examples (tests/test_examples.py TEXTBOOK): {wrong}"


# ------------------------------------------------------------------ a real browser
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def served(site):
    """The site over HTTP on the loopback interface (MathJax's fonts are not read from file:)."""
    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _browser(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--disable-dev-shm-usage", "--no-first-run", "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("page", BROWSER_PAGES)
def test_page_typesets_in_chromium(page, site, served):
    if _chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    url = f"{served}/" if page == "index" else f"{served}/{page}/"
    proc = _browser(["--dump-dom", url])
    dom = proc.stdout
    assert "<article" in dom, f"Chromium rendered nothing for {page}:\n{proc.stderr[-2000:]}"
    source = (site / ("" if page == "index" else page) / "index.html").read_text(encoding="utf-8")
    equations = source.count('class="arithmatex"')
    typeset = dom.count('jax="SVG"')     # glyphs as SVG paths: no web font has to load
    errors = re.findall(r'data-mjx-error="([^"]*)"', dom) + re.findall(
        r"<mjx-merror\b[^>]*>(.*?)</mjx-merror>", dom, re.S)
    assert not errors, f"{page}: MathJax errors: {[TAG.sub('', e)[:80] for e in errors[:10]]}"
    assert typeset >= equations, (
        f"{page}: MathJax typeset {typeset} of {equations} equations (did it load?)")
    if page in ("theory", "gallery"):
        shots = site / "screenshots"
        shots.mkdir(exist_ok=True)
        out = shots / f"{page}.png"
        proc = _browser([f"--screenshot={out}", "--window-size=1280,2400", f"{served}/{page}/"])
        assert out.is_file() and out.stat().st_size > 10_000, proc.stderr[-2000:]


def test_method_count_in_the_readme_matches_refngd_compare():
    # "train 10 methods" / "trains ten methods": the count of refngd compare's default methods
    from refngd.experiments.compare import DEFAULT_METHODS
    text = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    stated = re.findall(r"\btrains? (\w+) methods\b", text)
    assert stated, "the README no longer says how many methods refngd compare trains"
    for word in stated:
        value = int(word) if word.isdigit() else NUMBERS.get(word.lower())
        assert value == len(DEFAULT_METHODS), (
            f"README: '{word} methods', but refngd compare trains {len(DEFAULT_METHODS)}")
