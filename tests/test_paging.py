"""The software page walker, on page tables built in a bytearray acting as physical memory."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gdbstub import paging
from gdbstub.paging import PagingState

P, RW, US, PS = 1, 2, 4, 0x80
XD = 1 << 63
KIB4, MIB2, MIB4, GIB1 = 1 << 12, 1 << 21, 1 << 22, 1 << 30

CR0_PG_PE = 0x8000_0001
CR4_PSE, CR4_PAE, CR4_LA57 = 0x10, 0x20, 0x1000
EFER_LMA = 0x500  # LME | LMA
EFER_NXE = 0x800


class Phys:
    """Guest-physical memory: reads past the end come back short, like GuestMemory.read."""

    def __init__(self, size: int = 4 << 20) -> None:
        self.mem = bytearray(size)
        self.next = 0x10_0000
        self.reads = 0

    def read(self, addr: int, n: int) -> bytes:
        self.reads += 1
        return bytes(self.mem[addr : addr + n])

    def alloc(self) -> int:
        addr = self.next
        self.next += KIB4
        return addr

    def get(self, addr: int, width: int) -> int:
        return int.from_bytes(self.mem[addr : addr + width], "little")

    def put(self, addr: int, value: int, width: int) -> None:
        self.mem[addr : addr + width] = value.to_bytes(width, "little")


class Tables:
    """Page tables of one paging mode ("32", "pae", "4", "5") built in ``Phys``."""

    def __init__(self, phys: Phys, mode: str) -> None:
        self.phys = phys
        self.mode = mode
        self.levels = {"32": 2, "pae": 3, "4": 4, "5": 5}[mode]
        self.width = 4 if mode == "32" else 8
        self.root = phys.alloc()
        if mode == "pae":
            self.root += 0x20  # PDPT only needs 32-byte alignment

    def state(self, nxe: bool = False, pse: bool = True) -> PagingState:
        cr4 = {"32": CR4_PSE if pse else 0, "pae": CR4_PAE, "4": CR4_PAE, "5": CR4_PAE | CR4_LA57}
        efer = EFER_LMA if self.mode in ("4", "5") else 0
        return PagingState(CR0_PG_PE, self.root, cr4[self.mode], efer | (EFER_NXE if nxe else 0))

    def index(self, va: int, level: int) -> int:
        if self.mode == "32":
            return (va >> (12 + 10 * (level - 1))) & 0x3FF
        if self.mode == "pae" and level == 3:
            return (va >> 30) & 3
        return (va >> (12 + 9 * (level - 1))) & 0x1FF

    def entry_addr(self, va: int, level: int) -> int:
        """Address of the entry for ``va`` at ``level`` (creating the tables above it)."""
        table = self.root
        for lvl in range(self.levels, level, -1):
            addr = table + self.index(va, lvl) * self.width
            entry = self.phys.get(addr, self.width)
            if not entry & P:
                upper = P if self.mode == "pae" and lvl == 3 else P | RW | US
                entry = self.phys.alloc() | upper
                self.phys.put(addr, entry, self.width)
            table = entry & 0x000F_FFFF_FFFF_F000
        return table + self.index(va, level) * self.width

    def map(self, va: int, pa: int, size: int = KIB4, flags: int = P | RW | US) -> int:
        level = {KIB4: 1, MIB2: 2, MIB4: 2, GIB1: 3}[size]
        addr = self.entry_addr(va, level)
        self.phys.put(addr, pa | flags | (PS if level > 1 else 0), self.width)
        return addr


def tr(phys: Phys, state: PagingState, va: int, access: paging.Access = "r") -> paging.Translation:
    t = paging.translate(phys.read, *state, va, access=access)
    assert t is not None, hex(va)
    return t


def none(phys: Phys, state: PagingState, va: int, access: paging.Access = "r") -> bool:
    return paging.translate(phys.read, *state, va, access=access) is None


# --- modes -------------------------------------------------------------------------------------


def test_paging_off_is_identity() -> None:
    phys = Phys()
    off = PagingState(0x11, 0, 0, 0)
    t = tr(phys, off, 0x12345)
    assert (t.paddr, t.page_vaddr, t.page_size, t.steps) == (0x12345, 0x12000, KIB4, ())
    assert none(phys, off, 1 << 32)
    assert paging.virtual_to_physical_chunks(phys.read, off, 0x1000, 0x20000) == [(0x1000, 0x20000)]
    assert paging.virtual_to_physical_chunks(phys.read, off, 0xFFFF_F000, 0x2000) == [
        (0xFFFF_F000, 0x1000)
    ]
    assert paging.paging_mode(0x11, CR4_PAE, EFER_LMA) == "none"
    assert phys.reads == 0


def test_32bit_4k_and_4m_pages() -> None:
    phys = Phys()
    t = Tables(phys, "32")
    pte = t.map(0x0040_1000, 0x0020_3000)
    t.map(0xC000_0000, 0x0080_0000, MIB4, P | RW)  # supervisor 4 MiB page
    state = t.state()
    assert paging.paging_mode(state.cr0, state.cr4, state.efer) == "32-bit"
    r = tr(phys, state, 0x0040_1234)
    assert (r.paddr, r.page_size, r.writable, r.user, r.nx) == (
        0x0020_3234,
        KIB4,
        True,
        True,
        False,
    )
    assert [s.level for s in r.steps] == ["PDE", "PTE"]
    assert r.steps[1].entry_addr == pte
    r = tr(phys, state, 0xC012_3456)
    assert (r.paddr, r.page_size, r.page_vaddr, r.user) == (0x0092_3456, MIB4, 0xC000_0000, False)
    assert none(phys, state, 0x0040_2000)  # PTE not present
    assert none(phys, state, 0x8000_0000)  # PDE not present
    assert none(phys, state, 0x1_0040_1000)  # beyond 32 bits


def test_32bit_pse_off_and_pse36() -> None:
    phys = Phys()
    t = Tables(phys, "32")
    # PDE with PS and PSE-36 bits 20:13 = 0x12 -> physical bits 39:32
    addr = t.entry_addr(0x0800_0000, 2)
    phys.put(addr, 0x0040_0000 | (0x12 << 13) | P | RW | PS, 4)
    assert tr(phys, t.state(), 0x0800_0010).paddr == 0x12_0040_0010
    # without CR4.PSE the PS bit is ignored: the PDE points at a page table
    t.map(0x0040_0000, 0x5000)
    pde = t.entry_addr(0x0040_0000, 2)
    pt = phys.get(pde, 4) & 0xFFFF_F000
    phys.put(pde, pt | P | RW | US | PS, 4)
    assert tr(phys, t.state(pse=False), 0x0040_0001).paddr == 0x5001
    assert tr(phys, t.state(pse=True), 0x0040_0001).page_size == MIB4


def test_32bit_protection_is_and_of_levels() -> None:
    phys = Phys()
    t = Tables(phys, "32")
    t.map(0x1000, 0x1000, flags=P | RW | US)
    pde = t.entry_addr(0x1000, 2)
    phys.put(pde, phys.get(pde, 4) & ~RW, 4)
    r = tr(phys, t.state(), 0x1000)
    assert not r.writable and r.user
    assert none(phys, t.state(), 0x1000, access="w")
    assert tr(phys, t.state(), 0x1000, access="x").paddr == 0x1000


def test_pae() -> None:
    phys = Phys()
    t = Tables(phys, "pae")
    t.map(0xC000_0000, 0x0020_0000, MIB2, P | RW | XD)
    t.map(0x0804_8000, 0x0030_0000, KIB4, P | US)
    state = t.state(nxe=True)
    assert paging.paging_mode(state.cr0, state.cr4, state.efer) == "pae"
    r = tr(phys, state, 0xC010_0004)
    assert (r.paddr, r.page_size, r.writable, r.user, r.nx) == (
        0x0030_0004,
        MIB2,
        True,
        False,
        True,
    )
    assert [s.level for s in r.steps] == ["PDPTE", "PDE"]
    assert r.steps[0].entry_addr == t.root + 3 * 8
    r = tr(phys, state, 0x0804_8FFF)
    assert (r.paddr, r.writable, r.user, r.nx) == (0x0030_0FFF, False, True, False)
    assert [s.level for s in r.steps] == ["PDPTE", "PDE", "PTE"]
    assert none(phys, state, 0xC010_0000, access="x")
    assert not tr(phys, t.state(nxe=False), 0xC010_0000).nx  # XD means nothing without NXE
    assert none(phys, state, 0x4000_0000)  # PDPTE 1 not present
    assert none(phys, state, 0x1_0000_0000)


def test_4level_all_page_sizes() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    t.map(0x40_0000, 0x9000)
    t.map(0x20_0000_0000 + 0x60_0000, 0x8000_0000, MIB2)  # beyond RAM: fine, not read
    t.map(0xFFFF_FFFF_8000_0000, 0x1_0000_0000 - GIB1, GIB1, P | RW)
    state = t.state()
    assert paging.paging_mode(state.cr0, state.cr4, state.efer) == "4-level"
    r = tr(phys, state, 0x40_0123)
    assert (r.paddr, r.page_size) == (0x9123, KIB4)
    assert [s.level for s in r.steps] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert r.steps[0].entry_addr == t.root
    r = tr(phys, state, 0x20_0000_0000 + 0x7F_FFFF)
    assert (r.paddr, r.page_size, r.page_vaddr) == (0x801F_FFFF, MIB2, 0x20_0060_0000)
    r = tr(phys, state, 0xFFFF_FFFF_8123_4567)
    assert (r.paddr, r.page_size, r.user) == (0xC123_4567, GIB1, False)
    assert r.page_paddr == 0xC000_0000
    assert [s.level for s in r.steps] == ["PML4E", "PDPTE"]
    assert r.steps[0].entry_addr == t.root + 511 * 8
    assert none(phys, state, 0x40_1000)
    assert none(phys, state, 0x7FFF_FFFF_F000)


def test_non_canonical_addresses() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    t.map(0, 0x5000)
    state = t.state()
    assert tr(phys, state, 0).paddr == 0x5000
    # same PML4 slot as 0, but bits 63:48 are not a sign extension of bit 47
    for va in (1 << 48, 0x8000_0000_0000, 0xFFFF_0000_0000_0000, 1 << 63, -1, 1 << 64):
        assert none(phys, state, va), hex(va)
        assert paging.walk_steps(phys.read, state, va) == []


def test_ps_in_pml4e_is_reserved() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    phys.put(t.root, 0 | P | RW | PS, 8)
    assert none(phys, t.state(), 0x1000)


def test_5level() -> None:
    phys = Phys()
    t = Tables(phys, "5")
    low = 0x0080_0000_0000_1000  # bit 55: needs 57-bit addresses
    high = 0xFF00_0000_4000_0000  # bit 56 set: sign-extended, PML5 index 256
    t.map(low, 0x7000)
    t.map(high, 0x4000_0000, GIB1)
    state = t.state(nxe=True)
    assert paging.paging_mode(state.cr0, state.cr4, state.efer) == "5-level"
    r = tr(phys, state, low + 8)
    assert r.paddr == 0x7008
    assert [s.level for s in r.steps] == ["PML5E", "PML4E", "PDPTE", "PDE", "PTE"]
    assert r.steps[0].entry_addr == t.root + 0x80 * 8
    r = tr(phys, state, high + 0x10)
    assert (r.paddr, r.page_size) == (0x4000_0010, GIB1)
    assert r.steps[0].entry_addr == t.root + 256 * 8
    assert none(phys, state, 0x0100_0000_0000_0000)  # bit 56 set, 63:57 clear
    # the 4-level view of the same address is non-canonical
    four = state._replace(cr4=CR4_PAE)
    assert none(phys, four, low)


def test_nx_and_access_in_long_mode() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    t.map(0x1000, 0x1000, flags=P | XD)
    t.map(0x2000, 0x2000, flags=P | RW | US)
    state = t.state(nxe=True)
    r = tr(phys, state, 0x1000)
    assert r.nx and not r.writable and not r.user
    assert none(phys, state, 0x1000, access="x")
    assert none(phys, state, 0x1000, access="w")
    assert tr(phys, state, 0x2000, access="w").writable
    # XD at an upper level makes everything below it no-execute
    pml4e = t.root
    phys.put(pml4e, phys.get(pml4e, 8) | XD, 8)
    assert tr(phys, state, 0x2000).nx


def test_tables_outside_ram() -> None:
    phys = Phys(size=0x20_0000)
    t = Tables(phys, "4")
    t.map(0x1000, 0x1000)
    pde = t.entry_addr(0x1000, 2)
    phys.put(pde, 0x1_0000_0000 | P | RW, 8)  # page table beyond RAM
    assert none(phys, t.state(), 0x1000)
    steps = paging.walk_steps(phys.read, t.state(), 0x1000)
    assert [s.level for s in steps] == ["PML4E", "PDPTE", "PDE"]
    assert none(phys, PagingState(CR0_PG_PE, 0x4000_0000, CR4_PAE, EFER_LMA), 0)


def test_walk_steps_stop_at_not_present_entry() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    t.map(0x1000, 0x1000)
    steps = paging.walk_steps(phys.read, t.state(), 0x3000)
    assert [s.level for s in steps] == ["PML4E", "PDPTE", "PDE", "PTE"]
    assert steps[-1].entry == 0
    assert "not present" in str(steps[-1])
    assert "4-level" in paging.describe_mode(t.state())
    assert "off" in paging.describe_mode(PagingState(0, 0, 0, 0))
    assert "KiB page" in tr(phys, t.state(), 0x1000).describe()


# --- chunks for memory reads --------------------------------------------------------------------


def test_chunks_stop_at_first_unmapped_page() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    t.map(0x10000, 0x50000)
    t.map(0x11000, 0x51000)  # contiguous: merges
    t.map(0x12000, 0x70000)  # not contiguous: new chunk
    t.map(0x14000, 0x72000)  # after a hole at 0x13000: not reached
    chunks = paging.virtual_to_physical_chunks(phys.read, t.state(), 0x10800, 0x10000)
    assert chunks == [(0x50800, 0x1800), (0x70000, 0x1000)]
    assert paging.virtual_to_physical_chunks(phys.read, t.state(), 0x13000, 0x10) == []
    assert paging.virtual_to_physical_chunks(phys.read, t.state(), 0x10000, 0) == []
    regs = {"cr0": CR0_PG_PE, "cr3": t.root, "cr4": CR4_PAE, "efer": EFER_LMA, "rax": 1}
    assert paging.virtual_to_physical_chunks(phys.read, regs, 0x10FF0, 0x20) == [(0x50FF0, 0x20)]


def test_chunks_stop_at_non_canonical_boundary() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    t.map(0x7FFF_FFFF_F000, 0x3000)
    chunks = paging.virtual_to_physical_chunks(phys.read, t.state(), 0x7FFF_FFFF_FF00, 0x1000)
    assert chunks == [(0x3F00, 0x100)]


def test_chunks_walk_once_per_page() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    for i in range(16):
        t.map(0x40_0000 + i * KIB4, 0x20_0000 + i * KIB4)
    t.map(0x80_0000, 0x60_0000, MIB2)
    phys.reads = 0
    chunks = paging.virtual_to_physical_chunks(phys.read, t.state(), 0x40_0000, 0x10000)
    assert chunks == [(0x20_0000, 0x10000)]
    assert phys.reads == 16 * 4
    phys.reads = 0
    chunks = paging.virtual_to_physical_chunks(phys.read, t.state(), 0x80_1000, 0x10000)
    assert chunks == [(0x60_1000, 0x10000)]
    assert phys.reads == 3


def test_chunks_32bit_and_pae_stop_at_4gib() -> None:
    phys = Phys()
    t = Tables(phys, "32")
    t.map(0xFFFF_F000, 0x1000)
    chunks = paging.virtual_to_physical_chunks(phys.read, t.state(), 0xFFFF_FF00, 0x1000)
    assert chunks == [(0x1F00, 0x100)]


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(["32", "pae", "4", "5"]),
    st.dictionaries(st.integers(0, 63), st.integers(0, 255), max_size=24),
    st.integers(0, 70 * KIB4),
    st.integers(1, 20 * KIB4),
)
def test_chunks_match_a_model(mode: str, pages: dict[int, int], start: int, length: int) -> None:
    """Random 4 KiB mappings of a 64-page window whose upper half is past the end of the
    mode's address space (4 GiB, or the canonical lower half); chunks = the mapped prefix."""
    phys = Phys()
    t = Tables(phys, mode)
    limit = {"32": 1 << 32, "pae": 1 << 32, "4": 1 << 47, "5": 1 << 56}[mode]
    base_va = limit - 32 * KIB4
    base_pa = 0x100_0000
    pages = {v: p for v, p in pages.items() if v < 32}
    for vpage, ppage in pages.items():
        t.map(base_va + vpage * KIB4, base_pa + ppage * KIB4)
    va = base_va + start
    expect: list[tuple[int, int]] = []
    pos = va
    while pos < va + length:
        vpage = (pos - base_va) // KIB4
        if vpage not in pages:
            break
        pa = base_pa + pages[vpage] * KIB4 + pos % KIB4
        step = min(va + length, (pos | (KIB4 - 1)) + 1) - pos
        if expect and sum(expect[-1]) == pa:
            expect[-1] = (expect[-1][0], expect[-1][1] + step)
        else:
            expect.append((pa, step))
        pos += step
    assert paging.virtual_to_physical_chunks(phys.read, t.state(), va, length) == expect


# --- dump -----------------------------------------------------------------------------------------


def test_dump_4level_merges_and_sign_extends() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    for i in range(4):
        t.map(0x40_0000 + i * KIB4, 0x20_0000 + i * KIB4, flags=P | RW)
    t.map(0x40_4000, 0x20_4000, flags=P)  # read-only: new run
    t.map(0x40_5000, 0x90_0000, flags=P)  # not physically contiguous: new run
    t.map(0xFFFF_8000_0000_0000, 0, GIB1, P | RW | XD)
    state = t.state(nxe=True)
    maps = paging.dump_mappings(phys.read, *state)
    assert maps == [
        paging.PageMapping(0x40_0000, 0x20_0000, 0x4000, "rwxs"),
        paging.PageMapping(0x40_4000, 0x20_4000, 0x1000, "r-xs"),
        paging.PageMapping(0x40_5000, 0x90_0000, 0x1000, "r-xs"),
        paging.PageMapping(0xFFFF_8000_0000_0000, 0, GIB1, "rw-s"),
    ]
    assert "0xffff800000000000" in str(maps[-1])
    assert paging.dump_mappings(phys.read, *state, limit=2) == maps[:2]


def test_dump_5level_32bit_pae_and_off() -> None:
    phys = Phys()
    t5 = Tables(phys, "5")
    t5.map(0xFF00_0000_0000_0000, 0x1000, flags=P | RW | US)
    assert paging.dump_mappings(phys.read, *t5.state()) == [
        paging.PageMapping(0xFF00_0000_0000_0000, 0x1000, KIB4, "rwxu")
    ]
    t32 = Tables(phys, "32")
    t32.map(0xC000_0000, 0, MIB4, P | RW)
    t32.map(0x1000, 0x1000, flags=P | US)
    assert paging.dump_mappings(phys.read, *t32.state()) == [
        paging.PageMapping(0x1000, 0x1000, KIB4, "r-xu"),
        paging.PageMapping(0xC000_0000, 0, MIB4, "rwxs"),
    ]
    tp = Tables(phys, "pae")
    tp.map(0xC000_0000, 0, MIB2, P | RW | US)
    tp.map(0xC020_0000, MIB2, MIB2, P | RW | US)
    assert paging.dump_mappings(phys.read, *tp.state()) == [
        paging.PageMapping(0xC000_0000, 0, 2 * MIB2, "rwxu")
    ]
    assert paging.dump_mappings(phys.read, 0, 0, 0, 0) == [
        paging.PageMapping(0, 0, 1 << 32, "rwxs")
    ]


def test_dump_survives_self_referencing_table() -> None:
    phys = Phys()
    t = Tables(phys, "4")
    t.map(0x1000, 0x1000)
    phys.put(t.root + 8 * 510, t.root | P | RW, 8)  # recursive PML4 slot
    maps = paging.dump_mappings(phys.read, *t.state(), limit=100_000, max_tables=2000)
    assert maps[0] == paging.PageMapping(0x1000, 0x1000, KIB4, "rwxu")
    assert all(m.vaddr >= 0xFFFF_0000_0000_0000 for m in maps[1:])


@pytest.mark.parametrize("mode", ["32", "pae", "4", "5"])
def test_translate_agrees_with_dump(mode: str) -> None:
    phys = Phys()
    t = Tables(phys, mode)
    top = 0xC000_0000 if mode in ("32", "pae") else 0xFFFF_FFFF_C000_0000
    t.map(top, 0x40_0000, MIB2 if mode != "32" else MIB4, P | RW)
    t.map(0x3000, 0x8000, flags=P | US)
    for m in paging.dump_mappings(phys.read, *t.state()):
        for off in (0, m.size - 1):
            r = tr(phys, t.state(), m.vaddr + off)
            assert r.paddr == m.paddr + off
            assert (r.writable, r.user) == (m.flags[1] == "w", m.flags[3] == "u")
