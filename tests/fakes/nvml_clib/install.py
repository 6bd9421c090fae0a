"""Put a fake library where pynvml keeps its loaded libnvidia-ml, and take it away again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pynvml

from .library import FakeNvmlLibrary


@contextmanager
def installed(lib: FakeNvmlLibrary) -> Iterator[FakeNvmlLibrary]:
    """pynvml calls `lib` as its loaded library for the duration, from every thread.

    pynvml keeps module state beside the library: its function-pointer cache (a pointer looked up on
    another library would be called instead of the fake's), its own init count, and the error strings it
    has read through nvmlErrorString. Each is emptied on entry and put back on exit.
    """
    with pynvml.libLoadLock:
        saved = (pynvml.nvmlLib, pynvml._nvmlLib_refcount, dict(pynvml._nvmlGetFunctionPointer_cache),
                 dict(pynvml.NVMLError._errcode_to_string))
        pynvml.nvmlLib = lib
        pynvml._nvmlLib_refcount = 0
        pynvml._nvmlGetFunctionPointer_cache.clear()
        pynvml.NVMLError._errcode_to_string.clear()
    try:
        yield lib
    finally:
        with pynvml.libLoadLock:
            pynvml.nvmlLib, pynvml._nvmlLib_refcount = saved[0], saved[1]
            pynvml._nvmlGetFunctionPointer_cache.clear()
            pynvml._nvmlGetFunctionPointer_cache.update(saved[2])
            pynvml.NVMLError._errcode_to_string.clear()
            pynvml.NVMLError._errcode_to_string.update(saved[3])
