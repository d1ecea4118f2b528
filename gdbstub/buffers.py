"""Small helpers for objects that expose a buffer (guest memory and fpstate images)."""

from __future__ import annotations

import ctypes
import mmap
from typing import Any, TypeAlias

Buffer: TypeAlias = "bytearray | memoryview | mmap.mmap | ctypes.Array[Any] | bytes"
"""Objects exposing the buffer protocol that ``gdbstub.hv`` accepts (Python 3.11 has no
``collections.abc.Buffer``)."""


def buffer_address(obj: Buffer) -> tuple[int, int]:
    """Return ``(address, length)`` of a writable, contiguous buffer.

    Raises ValueError if the buffer is read-only or not contiguous. The caller keeps ``obj``
    alive for as long as it uses the address.
    """
    view = memoryview(obj)
    if view.readonly:
        raise ValueError("buffer is read-only")
    if not view.contiguous:
        raise ValueError("buffer is not contiguous")
    length = view.nbytes
    if length == 0:
        return 0, 0
    array = (ctypes.c_char * length).from_buffer(view.cast("B"))
    return ctypes.addressof(array), length


def page_aligned_memory(size: int) -> mmap.mmap:
    """Anonymous, zero-filled, page-aligned host memory of ``size`` bytes (for guest RAM)."""
    return mmap.mmap(
        -1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=mmap.PROT_READ | mmap.PROT_WRITE
    )
