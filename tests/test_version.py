"""One version, one source: ``src/weightbank/_version.py``; pyproject.toml reads it (setuptools dynamic)."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

import weightbank as wb

ROOT = Path(__file__).resolve().parents[1]


def test_installed_distribution_has_the_package_version() -> None:
    # An edited _version.py without a reinstall fails here; `make` reinstalls when _version.py changes.
    assert wb.__version__ == version("weightbank")


def test_pyproject_takes_the_version_from_the_package() -> None:
    # Read as text: tomllib is 3.11+ and the project supports 3.10.
    text = (ROOT / "pyproject.toml").read_text()
    project = text.split("[project]", 1)[1].split("\n[", 1)[0]
    assert not re.search(r"^version\s*=", project, re.M), (
        "the version lives in src/weightbank/_version.py only"
    )
    assert re.search(r'^dynamic\s*=\s*\[[^]]*"version"', project, re.M)
    assert re.search(r'^version\s*=\s*\{\s*attr\s*=\s*"weightbank\._version\.__version__"', text, re.M)


def test_version_is_pep440() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", wb.__version__), wb.__version__
