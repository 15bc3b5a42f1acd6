"""mkdocs hook: MathJax 3 for the typeset mathematics, served by the site itself.

The docs extra installs ``django-static-mathjax`` from PyPI: despite its name it is only
MathJax 3's JavaScript, fonts and extensions as package data (no Django, no dependency).
When it is installed, the pages load ``assets/mathjax/tex-svg.js`` and this hook copies
what that file needs (the combined TeX→SVG component and the TeX extensions it autoloads;
~2.5 MB) into the built site, so the site typesets offline and
nothing is fetched at build or view time.  Without it (a bare ``pip install mkdocs...``)
the pages reference the same MathJax release on jsDelivr instead, and say so in the log.
"""
from __future__ import annotations

import importlib.util
import logging
import pathlib
import shutil

log = logging.getLogger("mkdocs.hooks.mathjax")

CONFIG_JS = "javascripts/mathjax.js"
# SVG output: every glyph is a path in the page, so nothing depends on web fonts loading
# (CommonHTML output drew blank equations in headless Chromium: its fonts never loaded)
LOCAL_JS = "assets/mathjax/tex-svg.js"
CDN_JS = "https://cdn.jsdelivr.net/npm/mathjax@3.2.2/es5/tex-svg.js"
#: what tex-svg.js loads at run time, relative to MathJax's es5/ folder
NEEDED = ("tex-svg.js", "input/tex/extensions", "ui", "a11y", "adaptors")


def mathjax_es5() -> pathlib.Path | None:
    """MathJax's es5/ folder from the ``django-static-mathjax`` package, or None."""
    spec = importlib.util.find_spec("mathjax")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        es5 = pathlib.Path(root) / "static" / "mathjax" / "es5"
        if (es5 / "tex-svg.js").is_file():
            return es5
    return None


def on_config(config, **kwargs):
    es5 = mathjax_es5()
    script = LOCAL_JS if es5 is not None else CDN_JS
    if es5 is None:
        log.info("MathJax: django-static-mathjax is not installed; the pages load it from %s",
                 CDN_JS)
    scripts = config.extra_javascript
    for js in (CONFIG_JS, script):      # the settings first, then MathJax itself
        if js not in [str(s) for s in scripts]:
            scripts.append(js)
    return config


def on_post_build(config, **kwargs):
    es5 = mathjax_es5()
    if es5 is None:
        return
    dest = pathlib.Path(config.site_dir) / "assets" / "mathjax"
    for rel in NEEDED:
        src = es5 / rel
        if src.is_dir():
            shutil.copytree(src, dest / rel, dirs_exist_ok=True)
        elif src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    shutil.copy2(es5.parent / "LICENSE", dest / "LICENSE")
