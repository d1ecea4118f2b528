"""Memory regions of a guest-virtual address space, from the guest's page tables.

Theory of operation
-------------------
lldb asks ``qMemoryRegionInfo:ADDR`` for ``memory region``, and to decide whether code is
executable while unwinding. The answer is the run of addresses around ADDR that share one
state: mapped with the same permissions (``r``, ``rw``, ``rx``, ``rwx``, from the R/W and XD
bits of every level of the walk), or not mapped at all (no permissions; lldb then wants the
distance to the next mapping).

``region_at`` walks the page tables with ``gdbstub.paging`` and grows the region page by page
in both directions while the state stays the same. Holes grow a whole page-table entry at a
time: a walk that stops at a not-present PML4E means the entry's 512 GiB are unmapped, so a
hole the size of most of the address space costs a handful of walks. The non-canonical range
of 4- and 5-level paging, and everything above 4 GiB in 32-bit and PAE paging, are holes too.
With paging off, the first 4 GiB are one ``rwx`` region (linear = physical).

The last region ends at 2**64 - 1 (see ``_LAST``). Growing stops after ``max_steps`` walks in
each direction, so a region built of many 4 KiB pages is reported in part (it still contains
ADDR); lldb asks again for addresses beyond it.
Nothing here knows about RAM: a page maps whatever its entry says, as the CPU would.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import paging

__all__ = ["Region", "region_at"]

_TOP = 1 << 64
_LAST = _TOP - 1
# The last region ends at 2**64 - 1, not 2**64: lldb walks regions until one ends at
# 0xffffffffffffffff (its LLDB_INVALID_ADDRESS); an end of 2**64 wraps to 0 and it loops.
_LOW4G = 1 << 32
# log2 of the span one entry of each level covers (32-bit paging's PDE is 22, see _span_bits)
_LEVEL_BITS = {"PML5E": 48, "PML4E": 39, "PDPTE": 30, "PDE": 21, "PTE": 12}


@dataclass(frozen=True, slots=True)
class Region:
    """``[start, start + size)`` and its permissions: ``""`` when nothing is mapped there."""

    start: int
    size: int
    permissions: str

    @property
    def end(self) -> int:
        """One past the last address."""
        return self.start + self.size

    @property
    def mapped(self) -> bool:
        """Whether the region is mapped (has any permission)."""
        return bool(self.permissions)


def _permissions(t: paging.Translation) -> str:
    return "r" + ("w" if t.writable else "") + ("" if t.nx else "x")


class _Walker:
    """One paging state's view: the state of one address and the span that shares it."""

    def __init__(self, read_phys: paging.ReadPhys, state: paging.PagingState) -> None:
        self.read = read_phys
        self.state = state
        self.mode = paging.paging_mode(state.cr0, state.cr4, state.efer)
        self.bits = 57 if self.mode == "5-level" else 48

    def hole_outside_tables(self, address: int) -> tuple[int, int] | None:
        """The hole no page table can map that holds ``address``, or None."""
        if self.mode in ("32-bit", "pae"):
            return (_LOW4G, _TOP) if address >= _LOW4G else None
        low_end = 1 << (self.bits - 1)
        high_start = _TOP - low_end
        return (low_end, high_start) if low_end <= address < high_start else None

    def probe(self, address: int) -> tuple[str, int, int]:
        """(permissions or "", start, end) of the page or hole span holding ``address``."""
        hole = self.hole_outside_tables(address)
        if hole is not None:
            return "", *hole
        state = self.state
        t = paging.translate(self.read, *state, address)
        if t is not None:
            return _permissions(t), t.page_vaddr, t.page_vaddr + t.page_size
        steps = paging.walk_steps(self.read, state, address)
        bits = 12
        if steps:
            last = steps[-1]
            bits = 22 if self.mode == "32-bit" and last.level == "PDE" else _LEVEL_BITS[last.level]
        start = address & ~((1 << bits) - 1)
        return "", start, start + (1 << bits)


def region_at(
    read_phys: paging.ReadPhys, state: paging.PagingState, address: int, *, max_steps: int = 4096
) -> Region:
    """The region around ``address`` (see the module docstring)."""
    address &= _TOP - 1
    mode = paging.paging_mode(state.cr0, state.cr4, state.efer)
    if mode == "none":
        return Region(0, _LOW4G, "rwx") if address < _LOW4G else Region(_LOW4G, _LAST - _LOW4G, "")
    walker = _Walker(read_phys, state)
    perms, start, end = walker.probe(address)
    for _ in range(max_steps):
        if end >= _TOP:
            break
        more, _, next_end = walker.probe(end)
        if more != perms:
            break
        end = next_end
    for _ in range(max_steps):
        if start == 0:
            break
        more, prev_start, _ = walker.probe(start - 1)
        if more != perms:
            break
        start = prev_start
    return Region(start, min(end, _LAST) - start, perms)
