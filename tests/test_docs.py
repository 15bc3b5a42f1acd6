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
