# Stub of the compiled plane coder (_cplanes.c). Buffers are anything with the buffer
# protocol (bytes, bytearray, memoryview, numpy arrays); typed loosely because numpy's
# stubs declare ndarray a Buffer only on Python 3.12+.
from collections.abc import Sequence
from typing import Any

def split(src: Any, dst: Any, itemsize: int, rotate: bool, /) -> None: ...
def merge(planes: Sequence[Any], out: Any, rotate: bool, /) -> None: ...
