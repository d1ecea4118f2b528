"""Guest-physical memory as the VMM sees it: host buffers mapped at guest-physical addresses.

The framework has no call to read guest memory: a VMM reads the host memory it mapped. This
class records those mappings (and makes them through ``hv_vm_map``), so that the machine and the
debug target read and write guest-physical memory by GPA, in chunks, never byte by byte.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from . import hv
from .buffers import Buffer

RWX = hv.HV_MEMORY_READ | hv.HV_MEMORY_WRITE | hv.HV_MEMORY_EXEC


@dataclass
class _Range:
    gpa: int
    view: memoryview

    @property
    def end(self) -> int:
        return self.gpa + len(self.view)


class GuestMemory:
    """Guest RAM ranges, each a host buffer mapped at a guest-physical address."""

    def __init__(self) -> None:
        self._ranges: list[_Range] = []
        self._starts: list[int] = []

    def add(self, gpa: int, buffer: Buffer, *, map_it: bool = True, flags: int = RWX) -> None:
        """Record ``buffer`` at ``gpa``; with ``map_it`` also ``hv_vm_map`` it."""
        view = memoryview(buffer).cast("B")
        if map_it:
            hv.hv_vm_map(buffer, gpa, len(view), flags)
        index = bisect.bisect(self._starts, gpa)
        self._ranges.insert(index, _Range(gpa, view))
        self._starts.insert(index, gpa)

    def allocate(self, gpa: int, size: int, flags: int = RWX) -> memoryview:
        """Allocate page-aligned host memory, map it at ``gpa`` and return a view of it."""
        buffer = hv.hv_vm_allocate(size)
        self.add(gpa, buffer, flags=flags)
        return memoryview(buffer).cast("B")

    def _find(self, gpa: int) -> _Range | None:
        index = bisect.bisect(self._starts, gpa) - 1
        if index >= 0 and gpa < self._ranges[index].end:
            return self._ranges[index]
        return None

    def contains(self, gpa: int) -> bool:
        """Whether ``gpa`` is RAM."""
        return self._find(gpa) is not None

    def read(self, gpa: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``gpa``; shorter when the RAM ends (empty if none)."""
        out = bytearray()
        while length > 0:
            rng = self._find(gpa)
            if rng is None:
                break
            chunk = min(length, rng.end - gpa)
            out += rng.view[gpa - rng.gpa : gpa - rng.gpa + chunk]
            gpa += chunk
            length -= chunk
        return bytes(out)

    def write(self, gpa: int, data: bytes) -> int:
        """Write ``data`` at ``gpa``; returns how many bytes landed in RAM."""
        done = 0
        while done < len(data):
            rng = self._find(gpa + done)
            if rng is None:
                break
            start = gpa + done - rng.gpa
            chunk = min(len(data) - done, rng.end - (gpa + done))
            rng.view[start : start + chunk] = data[done : done + chunk]
            done += chunk
        return done

    def ranges(self) -> list[tuple[int, int]]:
        """``(gpa, size)`` of every RAM range."""
        return [(r.gpa, len(r.view)) for r in self._ranges]
