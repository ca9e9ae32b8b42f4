"""The tensor dtypes a checkpoint can hold, by their stable names in the manifest.

Names are torch's own (``float32``, ``bfloat16``, ``float8_e4m3fn``...), so a
manifest reads naturally and survives torch renaming its Python objects.
Quantized dtypes (``qint8``...) are refused: their scale and zero point live
outside the bytes, and torch has deprecated them.

Example:
    >>> import torch
    >>> from weightbank.format.dtypes import dtype_name, dtype_from_name
    >>> dtype_name(torch.bfloat16), dtype_from_name("float32")
    ('bfloat16', torch.float32)
"""

from __future__ import annotations

import torch

from ..errors import InvalidState, UnsupportedFormat

__all__ = ["SUPPORTED", "dtype_from_name", "dtype_name", "itemsize"]

_CANDIDATES = (
    "float64", "float32", "float16", "bfloat16",
    "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
    "complex32", "complex64", "complex128",
    "int8", "int16", "int32", "int64",
    "uint8", "uint16", "uint32", "uint64",
    "bool",
    "bits8", "bits16", "bits1x8", "bits2x4", "bits4x2",
)  # fmt: skip

#: name -> dtype for every dtype this torch build has and weightbank stores.
SUPPORTED: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in _CANDIDATES if isinstance(getattr(torch, n, None), torch.dtype)
}
_BY_DTYPE: dict[torch.dtype, str] = {d: n for n, d in SUPPORTED.items()}


def dtype_name(dtype: torch.dtype, path: str = "") -> str:
    """The manifest name of ``dtype``; InvalidState if weightbank cannot store it."""
    name = _BY_DTYPE.get(dtype)
    if name is None:
        raise InvalidState(
            path, f"tensors of dtype {dtype} cannot be stored (quantized dtypes are not supported)"
        )
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype for a manifest name; UnsupportedFormat if this torch lacks it."""
    dtype = SUPPORTED.get(name)
    if dtype is None:
        raise UnsupportedFormat(f"dtype {name!r}", name, "the dtypes of this torch build; upgrade torch")
    return dtype


def itemsize(name: str) -> int:
    """Bytes per element of a named dtype."""
    return dtype_from_name(name).itemsize
