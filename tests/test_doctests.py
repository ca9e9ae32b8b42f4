"""Every docstring example in ``src/weightbank`` runs, one test per module: an example nobody runs rots.

The examples run inside the pytest session, so ``filterwarnings = error`` holds
for them as for any test, each module's examples start in an empty temporary
directory (an example may open ``./bank``), and ``...`` in an expected output
matches anything (``ELLIPSIS``). A module that cannot be imported because an
optional framework is missing is skipped with the package's name; any other
import failure is a failing test, never a silent skip. An example that must not
run here (it needs a server, a GPU, or minutes) says so with ``# doctest: +SKIP``.
"""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path
from types import ModuleType

import pytest

import weightbank

FLAGS = doctest.ELLIPSIS


def _module_names() -> list[str]:
    """Every module, from the files: collecting imports nothing, so no optional framework can break it."""
    src = Path(weightbank.__file__).parent
    names = []
    for path in src.rglob("*.py"):
        parts = path.relative_to(src).with_suffix("").parts
        parts = parts[:-1] if parts[-1] == "__init__" else parts
        names.append(".".join((weightbank.__name__, *parts)))
    return sorted(names)


def _import(name: str) -> ModuleType:
    """The module, or a skip when an optional package (not weightbank itself) is what is missing."""
    try:
        return importlib.import_module(name)
    except weightbank.MissingDependency as e:
        pytest.skip(f"{name} needs the optional package {e.package}")
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing in ("", weightbank.__name__):
            raise
        pytest.skip(f"{name} needs the optional package {missing}")


@pytest.mark.parametrize("name", _module_names())
def test_docstring_examples(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    module = _import(name)
    monkeypatch.chdir(tmp_path)
    tests = [t for t in doctest.DocTestFinder(exclude_empty=True).find(module, name) if t.examples]
    if not tests:
        pytest.skip(f"{name} has no docstring examples")
    report = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in sorted(tests, key=lambda t: t.lineno or 0):
        runner.run(test, out=report.write)
    if runner.failures:
        pytest.fail(f"{runner.failures} of {runner.tries} examples failed in {name}:\n{report.getvalue()}")
