"""Memory regions from the guest's page tables (lldb's qMemoryRegionInfo): hand-built tables."""

from __future__ import annotations

import struct

from gdbstub.memregion import Region, region_at
from gdbstub.paging import PagingState

P, RW, PS = 1, 2, 0x80
XD = 1 << 63
CR0_PE_PG = 0x80000001
CR4_PAE = 0x20
EFER_LME_LMA_NXE = 0x500 | 0x800


class Phys:
    """A sparse guest-physical memory holding page tables."""

    def __init__(self) -> None:
        self.data = bytearray(0x10000)

    def entry(self, table: int, index: int, value: int) -> None:
        struct.pack_into("<Q", self.data, table + 8 * index, value)

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.data[gpa : gpa + size])


def long_mode_tables() -> tuple[Phys, PagingState]:
    """0-16 KiB r-x, 16-32 KiB rw- (XD), 32-36 KiB hole, 36-64 KiB rwx; 2-4 MiB rw- (a 2 MiB
    page); the kernel's -2 GiB: a 1 GiB r-x page. Nothing else."""
    m = Phys()
    pml4, pdpt, pd, pt, pdpt_hi = 0x1000, 0x2000, 0x3000, 0x4000, 0x5000
    m.entry(pml4, 0, pdpt | P | RW)
    m.entry(pml4, 511, pdpt_hi | P | RW)
    m.entry(pdpt, 0, pd | P | RW)
    m.entry(pd, 0, pt | P | RW)
    m.entry(pd, 1, 0x200000 | P | RW | PS | XD)
    for page in range(16):
        flags = P | (0 if page < 4 else RW) | (XD if 4 <= page < 8 else 0)
        if page != 8:
            m.entry(pt, page, (page << 12) | flags)
    m.entry(pdpt_hi, 510, 0x40000000 | P | PS)
    return m, PagingState(CR0_PE_PG, pml4, CR4_PAE, EFER_LME_LMA_NXE)


def test_mapped_runs_with_their_permissions() -> None:
    m, state = long_mode_tables()
    assert region_at(m.read, state, 0x1234) == Region(0, 0x4000, "rx")
    assert region_at(m.read, state, 0x7FFF) == Region(0x4000, 0x4000, "rw")
    assert region_at(m.read, state, 0x9000) == Region(0x9000, 0x7000, "rwx")
    assert region_at(m.read, state, 0x3FFFFF) == Region(0x200000, 0x200000, "rw")
    kernel = 0xFFFFFFFF80000000
    assert region_at(m.read, state, kernel + 0x1000) == Region(kernel, 1 << 30, "rx")


def test_holes_reach_the_next_mapping() -> None:
    m, state = long_mode_tables()
    assert region_at(m.read, state, 0x8800) == Region(0x8000, 0x1000, "")
    assert region_at(m.read, state, 0x10000) == Region(0x10000, 0x200000 - 0x10000, "")
    # from 4 MiB to the kernel's mapping: not-present PDEs, PDPTEs, PML4Es and the
    # non-canonical range are one hole
    big = region_at(m.read, state, 0x400000)
    assert big == Region(0x400000, 0xFFFFFFFF80000000 - 0x400000, "")
    assert region_at(m.read, state, 0x0000_8000_0000_0000) == big
    top = region_at(m.read, state, 0xFFFF_FFFF_FFFF_F000)
    assert top == Region(0xFFFFFFFFC0000000, (1 << 30) - 1, "")  # ends at lldb's 2**64 - 1


def test_growth_is_bounded_but_keeps_the_address() -> None:
    m, state = long_mode_tables()
    part = region_at(m.read, state, 0x400000, max_steps=3)
    assert not part.mapped and part.start <= 0x400000 < part.end
    assert part.end < 0xFFFFFFFF80000000


def test_paging_off_and_32_bit_paging() -> None:
    m = Phys()
    assert region_at(m.read, PagingState(1, 0, 0, 0), 0x1234) == Region(0, 1 << 32, "rwx")
    assert region_at(m.read, PagingState(1, 0, 0, 0), 1 << 33).permissions == ""
    pd, pt = 0x1000, 0x2000
    struct.pack_into("<I", m.data, pd, pt | P | RW)
    struct.pack_into("<I", m.data, pt + 4, 0x1000 | P)  # only 4-8 KiB, read-only
    state = PagingState(CR0_PE_PG, pd, 0, 0)
    assert region_at(m.read, state, 0x1800) == Region(0x1000, 0x1000, "rx")  # no XD bit there
    rest = Region(0x2000, (1 << 64) - 1 - 0x2000, "")  # above 4 GiB nothing can be mapped
    assert region_at(m.read, state, 0x2000) == rest
    assert region_at(m.read, state, 1 << 40) == rest
    assert region_at(m.read, state, 0) == Region(0, 0x1000, "")
