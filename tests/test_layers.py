"""Layers only call downward (ARCHITECTURE.md draws them): every import inside src/weightbank is checked.

Imports under ``if TYPE_CHECKING:`` and inside functions count too: a layer
that needs a name from above for its annotations is still leaning upward.
"""

from __future__ import annotations

import ast
from pathlib import Path

import weightbank

SRC = Path(weightbank.__file__).parent

# Modules every layer may use: the error tree, byte-size parsing, the version, pid checks.
LEAVES = frozenset({"errors", "_sizes", "_version", "_process"})

# What each part of the package may import besides itself and LEAVES. Siblings are absent on purpose:
# format and storage never import each other, and training and serving never import each other.
ALLOWED: dict[str, frozenset[str]] = {
    "_version": frozenset(),
    "errors": frozenset(),
    "_sizes": frozenset(),
    "_process": frozenset(),
    "format": frozenset(),
    "storage": frozenset(),
    "bank": frozenset({"format", "storage"}),
    "dcp": frozenset({"bank", "format", "storage"}),
    "interop": frozenset({"bank", "format", "storage"}),
    "training": frozenset({"bank", "dcp", "format"}),
    # serving reports the disk cache's statistics (storage.diskcache.DiskCacheStats) in its own stats
    "serving": frozenset({"bank", "format", "storage"}),
    "http": frozenset({"serving", "bank", "format"}),
    # integrations (optional extras) sit on top: they use the library, nothing below imports them
    "lightning": frozenset({"bank", "training"}),
    "cli": frozenset(
        {"__init__", "bank", "dcp", "format", "http", "interop", "serving", "storage", "training"}
    ),
    "__init__": frozenset(
        {"bank", "dcp", "format", "http", "interop", "serving", "storage", "training", "cli"}
    ),
}


def _part(rel: Path) -> str:
    """The layer a file belongs to: its subpackage, or its own name for a top-level module."""
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _targets(path: Path) -> list[tuple[int, str]]:
    """(line, part of weightbank) for every import of weightbank code in ``path``."""
    rel = path.relative_to(SRC)
    package = list(rel.parts[:-1])  # the importing module's package, relative to weightbank
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names: list[list[str]] = []
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "weightbank"]
        else:
            module = (node.module or "").split(".") if node.module else []
            if node.level == 0:
                if module[:1] != ["weightbank"]:
                    continue
                base = module[1:]
            else:
                base = package[: len(package) - (node.level - 1)] + module
            # `from .. import open` names the package itself; `from . import render` a module in it
            names = [base] if base else [[a.name] for a in node.names]
        for parts in names:
            top = parts[0] if parts else "__init__"
            if (SRC / top).is_dir() or (SRC / f"{top}.py").exists():
                out.append((node.lineno, top))
            else:  # a name re-exported by weightbank/__init__.py
                out.append((node.lineno, "__init__"))
    return out


def test_every_part_has_a_rule() -> None:
    parts = {_part(p.relative_to(SRC)) for p in SRC.rglob("*.py")}
    assert parts <= ALLOWED.keys(), f"add the new part of the package to ALLOWED: {parts - ALLOWED.keys()}"


def test_layers_only_import_downward() -> None:
    wrong: list[str] = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        part = _part(rel)
        allowed = ALLOWED[part] | LEAVES | {part}
        for line, target in _targets(path):
            if target not in allowed:
                wrong.append(f"src/weightbank/{rel}:{line} ({part}) imports {target}")
    assert not wrong, "imports against the layer order:\n" + "\n".join(wrong)


def test_leaves_and_siblings_stay_apart() -> None:
    assert not ALLOWED["format"] and not ALLOWED["storage"]
    assert "serving" not in ALLOWED["training"] and "training" not in ALLOWED["serving"]
    for part, allowed in ALLOWED.items():
        if part in LEAVES:
            assert not allowed


# The bank's private doors: integrations read through Bank.info / Bank.checkpoint / Bank.read_options.
PRIVATE_DOORS = ("._manifest(", "._pool(")


def test_only_the_bank_uses_its_private_doors() -> None:
    wrong = [
        f"src/weightbank/{path.relative_to(SRC)}:{n} uses {door}"
        for path in sorted(SRC.rglob("*.py"))
        if _part(path.relative_to(SRC)) != "bank"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        for door in PRIVATE_DOORS
        if door in line
    ]
    assert not wrong, "use bank.info(ref) / bank.checkpoint(ref) instead:\n" + "\n".join(wrong)
