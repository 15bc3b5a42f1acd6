"""The documentation site's gallery and tutorial pages stay in step with examples/.

Every textbook example has a committed figure under docs/img/gallery/ (small enough for
git), the gallery page shows it, every example named on the tutorial and gallery pages
exists, and every page in docs/ is reachable from mkdocs.yml's navigation.  (The site
itself is built with ``mkdocs build --strict`` in CI; the examples run in
test_examples.py.)
"""
import pathlib
import re

import pytest

from test_examples import TEXTBOOK

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MAX_PNG_BYTES = 250_000


@pytest.mark.parametrize("name", TEXTBOOK)
def test_gallery_shows_committed_figure(name):
    png = DOCS / "img" / "gallery" / f"{name}.png"
    assert png.is_file(), f"run: python examples/{name}.py --out {png.relative_to(ROOT)}"
    assert 0 < png.stat().st_size <= MAX_PNG_BYTES, f"{png.name} is {png.stat().st_size} bytes"
    assert f"(img/gallery/{name}.png)" in (DOCS / "gallery.md").read_text()


@pytest.mark.parametrize("page", ["gallery.md", "tutorials.md", "theory.md"])
def test_examples_named_in_pages_exist(page):
    named = set(re.findall(r"`(\w+)\.py`", (DOCS / page).read_text()))
    assert named, f"{page} names no example"
    missing = sorted(n for n in named if not (ROOT / "examples" / f"{n}.py").is_file())
    assert not missing, f"{page} names examples that do not exist: {missing}"


def test_every_tutorial_claim_cites_an_example():
    """Each bold claim on the tutorials page is followed by the example measuring it."""
    text = (DOCS / "tutorials.md").read_text()
    sections = re.split(r"\n\*\*", text)[1:]
    assert len(sections) >= 8
    for s in sections:
        assert re.search(r"`\w+\.py`", s), f"claim without an example: {s[:80]!r}"


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert not [p for p in pages if p not in nav], "add the page to mkdocs.yml's nav"


# ------------------------------------------------------------------ planted errors
def _run_example(name, tmp_path, monkeypatch, edit=None):
    """Execute examples/NAME.py in this process (so that refngd can be monkeypatched)."""
    pytest.importorskip("matplotlib").use("Agg")
    src = (ROOT / "examples" / f"{name}.py").read_text()
    if edit is not None:
        assert edit[0] in src, "the planted edit no longer matches the example"
        src = src.replace(*edit)
    monkeypatch.setattr("sys.argv", [name, "--out", str(tmp_path / f"{name}.png")])
    exec(compile(src, f"examples/{name}.py", "exec"), {"__name__": "__main__"})


def test_planted_wrong_jacobian_fails_geometry_2d(tmp_path, monkeypatch):
    """Mapping the φ-path back with Jᵀ⁻¹ instead of J must break the invariance check."""
    edit = ("@ J.T     # mapped back: θ = Jφ", "@ np.linalg.inv(J).T")
    with pytest.raises(AssertionError, match="same path"):
        _run_example("geometry_2d", tmp_path, monkeypatch, edit)


def test_planted_fisher_factor_fails_fisher_vs_hessian(tmp_path, monkeypatch):
    """A Fisher off by a factor 2 (rows scaled by √2) contradicts the expected Hessian."""
    from refngd.curvature import Fisher
    original = Fisher.cotangents
    monkeypatch.setattr(Fisher, "cotangents", lambda self: 2 ** 0.5 * original(self))
    with pytest.raises(AssertionError, match="expected Hessian"):
        _run_example("fisher_vs_hessian", tmp_path, monkeypatch)


def test_planted_kfac_factor_fails_kfac_vs_simplified(tmp_path, monkeypatch):
    """K-FAC's G off by a factor 2 is caught by the exact single-sample case."""
    import refngd.curvature.kfac as kfac_module
    original = kfac_module.output_rows
    monkeypatch.setattr(kfac_module, "output_rows", lambda *a: 2 ** 0.5 * original(*a))
    with pytest.raises(AssertionError, match="exact"):
        _run_example("kfac_vs_simplified", tmp_path, monkeypatch)


def test_planted_reduce_factor_fails_transformer_kfac(tmp_path, monkeypatch):
    """K-FAC-reduce's input factor off by a factor 2 is caught by its exact (pooled) case."""
    import refngd.curvature.kfac as kfac_module
    original = kfac_module.input_rows

    def planted(layer, cache, approx, joint):
        a, scale = original(layer, cache, approx, joint)
        return a, scale * (2.0 if approx == "reduce" else 1.0)

    monkeypatch.setattr(kfac_module, "input_rows", planted)
    with pytest.raises(AssertionError, match="reduce"):
        _run_example("transformer_kfac", tmp_path, monkeypatch)
