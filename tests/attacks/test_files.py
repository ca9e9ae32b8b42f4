"""Crafted files to import: safetensors with lying headers, torch files that need pickle.

Each must give ExternalFileError (or InvalidState for a file that needs
pickle to rebuild an object), never run code, and write nothing to the bank.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.interop import import_file


def _safetensors(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


GOOD_HEADER = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}

SAFETENSORS: dict[str, bytes] = {
    "header length past the file": _safetensors(GOOD_HEADER, bytes(8), length=1 << 20),
    "header length of 2**63": _safetensors(GOOD_HEADER, bytes(8), length=1 << 63),
    "header that is not JSON": _safetensors(b"{nope", bytes(8)),
    "header that is a list": _safetensors([1, 2], bytes(8)),
    "offsets past the data": _safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}),
    "shape that does not match the offsets": _safetensors(
        {"w": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 8]}}, bytes(8)
    ),
    "unknown dtype": _safetensors({"w": {"dtype": "F1024", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
    "overlapping tensors": _safetensors(
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        bytes(12),
    ),
    "a dimension of 2**62": _safetensors({"w": {"dtype": "F32", "shape": [1 << 62], "data_offsets": [0, 8]}}),
    "empty file": b"",
    "seven bytes": b"\x00" * 7,
}


@pytest.mark.parametrize("name", sorted(SAFETENSORS))
def test_crafted_safetensors_is_refused_and_writes_nothing(tmp_path: Path, name: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(SAFETENSORS[name])
    bank = wb.open(str(tmp_path / "bank"))
    with pytest.raises(wb.ExternalFileError):
        import_file(bank, path)
    assert bank.log() == []


class _Boom:
    """Would run code if unpickled (it never is)."""

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return (print, ("pickle ran!",))


def _torch_zip_with(pkl: bytes) -> bytes:
    """A torch-format zip whose data.pkl is ``pkl``."""
    buf = io.BytesIO()
    torch.save({"w": torch.ones(2)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = pkl if item.filename.endswith("data.pkl") else src.read(item)
            dst.writestr(item, data)
    return out.getvalue()


TORCH_FILES: dict[str, tuple[Callable[[], bytes], type[Exception]]] = {
    "a zip whose pickle calls print": (
        lambda: _torch_zip_with(pickle.dumps({"w": _Boom()}, protocol=2)),
        wb.InvalidState,
    ),
    "a legacy pickle that calls print": (lambda: pickle.dumps({"w": _Boom()}), wb.WeightbankError),
    "a truncated zip": (lambda: _torch_zip_with(pickle.dumps({"w": 1}))[:200], wb.ExternalFileError),
    "random bytes": (lambda: bytes(range(256)) * 4, wb.ExternalFileError),
}


@pytest.mark.parametrize("name", sorted(TORCH_FILES))
def test_crafted_torch_file_is_refused_and_never_runs_code(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    make, error = TORCH_FILES[name]
    path = tmp_path / "model.pt"
    path.write_bytes(make())
    bank = wb.open(str(tmp_path / "bank"))
    with pytest.raises(error):
        import_file(bank, path)
    assert "pickle ran!" not in capsys.readouterr().out
    assert bank.log() == []
