"""Every ```python block in README.md and docs/*.md runs (in order, one namespace per file).

Documentation examples are part of the reference: a stale one is a defect.  Blocks run in
a temporary working directory; a file whose blocks import torch is skipped when torch is
not installed.  docs/kfac.md has its own, stricter test (test_kfac_docs.py).
"""
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md"] + sorted(p for p in (ROOT / "docs").glob("*.md") if p.name != "kfac.md")
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
#: any import statement that names torch: ``import torch``, ``import numpy as np, torch``,
#: ``from torch import nn``, ``import torch.nn as tnn``
TORCH = re.compile(r"^\s*(?:import\s+[^\n#]*\btorch\b|from\s+torch\b)", re.M)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_python_blocks_in_docs_run(path, tmp_path, monkeypatch):
    blocks = BLOCK.findall(path.read_text())
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    if any(TORCH.search(b) for b in blocks):
        pytest.importorskip("torch")
    pytest.importorskip("matplotlib").use("Agg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        try:
            exec(compile(block, f"{path.name}[block {i}]", "exec"), namespace)
        except Exception as err:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{path.name}, python block {i} failed: {type(err).__name__}: {err}")


@pytest.mark.parametrize("text, imports", [
    ("import torch\n", True), ("import numpy as np, torch\n", True), ("from torch import nn\n", True),
    ("  import torch.nn as tnn\n", True), ("import numpy as np\n# torch is optional\n", False),
    ("x = 'import torch'\n", False), ("import torchvision_like_name\n", False),
])
def test_torch_import_detection(text, imports):
    # a docs file that imports torch in any spelling must be skipped without torch
    # (``import numpy as np, torch`` once failed the README's test command on a fresh machine)
    assert bool(TORCH.search(text)) is imports


def test_design_citations_point_to_existing_sections():
    # the code and docs cite "docs/design.md §N"; each such section must exist, and no file
    # may cite the team's notes that users never get (upper-case, outside docs/)
    design = (ROOT / "docs" / "design.md").read_text()
    sections = set(re.findall(r"^## §(\d+) ", design, re.M))
    assert sections == {str(i) for i in range(1, 7)}
    files = [ROOT / "README.md", ROOT / "setup.cfg"] + [
        p for d in ("refngd", "docs", "tests", "examples", "benchmarks") for p in (ROOT / d).rglob("*")
        if p.suffix in (".py", ".md") and p != pathlib.Path(__file__)]
    team_notes = "DESIGN" + ".md"
    cited = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        assert team_notes not in text and "../shared/" not in text, path
        for num in re.findall(r"design\.md`?\s*§(\d+)", text):
            assert num in sections, f"{path.name} cites docs/design.md §{num}, which does not exist"
            cited += 1
    assert cited > 10
