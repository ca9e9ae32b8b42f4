"""The public API stays honest: __all__ sorted and complete, errors typed, no pickle anywhere."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import weightbank as wb
from weightbank import errors

SRC = Path(wb.__file__).parent


def test_all_is_sorted_and_importable() -> None:
    assert list(wb.__all__) == sorted(wb.__all__, key=str)
    for name in wb.__all__:
        assert hasattr(wb, name), name
    public = {n for n in vars(wb) if not n.startswith("_") and not inspect.ismodule(getattr(wb, n))} - {
        "annotations"
    }
    missing = public - set(wb.__all__)
    assert not missing, f"public names not in __all__: {missing}"


def test_error_tree_and_builtins() -> None:
    for name in errors.__all__:
        cls = getattr(errors, name)
        assert issubclass(cls, errors.WeightbankError)
        assert getattr(wb, name) is cls
    assert issubclass(errors.CheckpointNotFound, KeyError)
    assert issubclass(errors.CorruptObject, OSError)
    assert issubclass(errors.MissingObject, FileNotFoundError)
    assert issubclass(errors.InvalidState, TypeError)
    assert issubclass(errors.InvalidName, ValueError)
    doc = errors.__doc__ or ""
    for name in errors.__all__:
        assert name in doc, f"{name} missing from the tree in errors.py's docstring"


def test_public_functions_have_examples() -> None:
    for name in ("open",):
        assert "Example:" in (getattr(wb, name).__doc__ or "")
    for name, member in inspect.getmembers(wb.Bank, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert member.__doc__, f"Bank.{name} has no docstring"


def test_no_pickle_in_the_package() -> None:
    offenders = []
    for path in SRC.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle") for n in names):
                    offenders.append(f"{path}: imports pickle")
            if (
                (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "load"
                )
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
            ):
                weights_only = {k.arg: k.value for k in node.keywords}.get("weights_only")
                safe = isinstance(weights_only, ast.Constant) and weights_only.value is True
                if not safe:
                    offenders.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
    assert not offenders, offenders


def test_module_sizes_stay_small() -> None:
    big = {
        str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 700
    }
    assert not big, f"modules over 700 lines (split them): {big}"
