"""The house's documents stay true to the tree: the licence pyproject declares, links, module paths."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "ARCHITECTURE.md", "SECURITY.md", "CHANGELOG.md")


def test_license_is_the_full_apache_2_text() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    for part in ("TERMS AND CONDITIONS FOR USE", "9. Accepting Warranty", "END OF TERMS AND CONDITIONS"):
        assert part in text
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.M)


def test_relative_links_point_at_files() -> None:
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)#\s]+)\)", (ROOT / doc).read_text()):
            if "://" not in target:
                assert (ROOT / target).exists(), f"{doc} links to {target}, which does not exist"


def test_module_paths_named_in_the_documents_exist() -> None:
    for doc in ("ARCHITECTURE.md", "SECURITY.md"):
        for path in re.findall(r"`((?:[a-z_]+/)+[a-z_]+\.py)`", (ROOT / doc).read_text()):
            here = [ROOT / path, ROOT / "src" / path, ROOT / "src" / "weightbank" / path]
            assert any(p.exists() for p in here), f"{doc} names {path}, which does not exist"


def test_readme_links_the_documents() -> None:
    readme = (ROOT / "README.md").read_text()
    for doc in ("ARCHITECTURE.md", "SECURITY.md", "CHANGELOG.md", "LICENSE"):
        assert f"]({doc})" in readme


def test_changelog_keeps_an_unreleased_section_first() -> None:
    headings = re.findall(r"^## (.+)$", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert headings and headings[0] == "Unreleased"
    assert all(re.match(r"\d+\.\d+\.\d+\S* - \d{4}-\d{2}-\d{2}$", h) for h in headings[1:]), headings
