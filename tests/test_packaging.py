"""Package metadata agrees with itself: licence, version, authors, project URLs, citation."""
import configparser
import pathlib
import re

import refngd

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    return cfg["metadata"]


def test_license_file_matches_the_metadata():
    meta = _setup_cfg()
    assert meta["license"] == "MIT" and meta["license_files"].strip() == "LICENSE"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    assert "License :: OSI Approved :: MIT License" in meta["classifiers"]


def test_authors_and_project_urls():
    meta = _setup_cfg()
    assert meta["author"].strip()
    urls = dict(line.split(" = ", 1) for line in meta["project_urls"].strip().splitlines())
    assert urls
    for target in urls.values():  # no URL is known yet: each points to a file that exists
        assert (ROOT / target.strip()).exists(), target


def test_citation_file_has_the_package_version():
    text = (ROOT / "CITATION.cff").read_text()
    assert re.search(r"^cff-version: 1\.2\.0$", text, re.M)
    assert re.search(rf"^version: {re.escape(refngd.__version__)}$", text, re.M)
    assert re.search(r"^license: MIT$", text, re.M) and "authors:" in text
