"""Software x86 page walker: guest-virtual to guest-physical addresses.

Theory of operation
-------------------
Hypervisor.framework has no call to translate a guest-virtual address, so the stub walks the
guest's page tables itself, reading them through ``read_phys(gpa, size) -> bytes`` (a short
result means "no RAM there", and the walk treats it as a not-present entry).  The paging mode
comes from the control registers, as the CPU decides it:

=====================  =========================================================  ============
CR0.PG / CR4.PAE /     mode                                                       levels
EFER.LMA / CR4.LA57
=====================  =========================================================  ============
PG=0                   none: linear = physical (32-bit linear addresses)          0
PG=1 PAE=0             32-bit paging; 4 MiB pages with CR4.PSE (PSE-36 bits)      PDE, PTE
PG=1 PAE=1 LMA=0       PAE: 4 PDPTEs at CR3, 2 MiB pages                          PDPTE..PTE
PG=1 PAE=1 LMA=1       4-level: 2 MiB and 1 GiB pages, canonical 48-bit           PML4E..PTE
... and LA57=1         5-level: canonical 57-bit                                  PML5E..PTE
=====================  =========================================================  ============

A walk reads one entry per level and stops at the first entry that is not present, that maps a
page (PS=1 where a large page is allowed), or at the PTE.  The page is writable and user-
accessible only if every level allows it, and no-execute if any level sets XD (when EFER.NXE).
In PAE mode the PDPTEs carry no R/W or U/S bits.  The walk reads the PDPTEs from memory at CR3
rather than from the CPU's PDPTE registers: they only differ if the guest edited them without
reloading CR3.

The debugger's view: permissions are reported, not enforced, unless ``access`` asks for it
("w" requires a writable page, "x" an executable one; "r" only a present one).  A debugger
writes breakpoints into read-only text, so memory accesses for gdb should pass "r".  The
supervisor view is taken: U/S is reported, never checked, and CR0.WP is not consulted.
Reserved bits are ignored (the physical address is masked to 52 bits), except PS in a PML4E or
PML5E, which makes the entry invalid.

Nothing is cached between calls (the guest changes its page tables at will); within one call
``virtual_to_physical_chunks`` walks once per page, and once per large page, so a 64 KiB read
costs at most 16 walks and physically contiguous pages merge into one chunk.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal, NamedTuple

__all__ = [
    "Access",
    "PageMapping",
    "PagingState",
    "ReadPhys",
    "Translation",
    "WalkStep",
    "describe_mode",
    "dump_mappings",
    "paging_mode",
    "translate",
    "virtual_to_physical_chunks",
    "walk_steps",
]

ReadPhys = Callable[[int, int], bytes]
"""``read_phys(gpa, size)``: guest-physical bytes, shorter (or empty) where there is no RAM."""

Access = Literal["r", "w", "x"]

CR0_PG = 1 << 31
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

_P = 1 << 0
_RW = 1 << 1
_US = 1 << 2
_PS = 1 << 7
_XD = 1 << 63

_ADDR_4K = 0x000F_FFFF_FFFF_F000
_ADDR_2M = 0x000F_FFFF_FFE0_0000
_ADDR_1G = 0x000F_FFFF_C000_0000

KIB4 = 1 << 12
MIB2 = 1 << 21
MIB4 = 1 << 22
GIB1 = 1 << 30
_U32 = 1 << 32
_U64 = 1 << 64


@dataclass(frozen=True, slots=True)
class WalkStep:
    """One page-table entry read by a walk: ``level`` is PML5E, PML4E, PDPTE, PDE or PTE."""

    level: str
    entry_addr: int
    entry: int

    def __str__(self) -> str:
        present = "" if self.entry & _P else "  (not present)"
        return f"{self.level:<5} @ {self.entry_addr:#x} = {self.entry:#018x}{present}"


@dataclass(frozen=True, slots=True)
class Translation:
    """Where a virtual address lands, and the page that maps it."""

    vaddr: int
    paddr: int
    page_size: int
    page_vaddr: int
    writable: bool
    user: bool
    nx: bool
    steps: tuple[WalkStep, ...]

    @property
    def page_paddr(self) -> int:
        """Physical address of the start of the page."""
        return self.paddr - (self.vaddr - self.page_vaddr)

    def describe(self) -> str:
        """One line: page size, page addresses, flags (``str(step)`` prints each walk step)."""
        return (
            f"{_size_name(self.page_size)} page {self.page_vaddr:#x} -> {self.page_paddr:#x}, "
            f"{_flags(self.writable, self.user, self.nx)}"
        )


class PageMapping(NamedTuple):
    """A run of virtual pages mapped to contiguous physical memory with the same flags.

    ``flags`` is four characters: ``r``, ``w`` or ``-``, ``x`` or ``-``, ``u`` (user) or ``s``.
    """

    vaddr: int
    paddr: int
    size: int
    flags: str

    def __str__(self) -> str:
        return f"{self.vaddr:#018x}-{self.vaddr + self.size:#018x} -> {self.paddr:#x} {self.flags}"


class PagingState(NamedTuple):
    """The registers that define a vCPU's address translation."""

    cr0: int
    cr3: int
    cr4: int
    efer: int

    @classmethod
    def from_regs(cls, regs: Mapping[str, int]) -> PagingState:
        """From a register mapping with gdbstub.regs names (cr0, cr3, cr4, efer)."""
        return cls(regs["cr0"], regs["cr3"], regs["cr4"], regs["efer"])


def _size_name(size: int) -> str:
    for unit, name in ((GIB1, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} B"


def _flags(writable: bool, user: bool, nx: bool) -> str:
    return "r" + ("w" if writable else "-") + ("-" if nx else "x") + ("u" if user else "s")


def paging_mode(cr0: int, cr4: int, efer: int) -> str:
    """``"none"``, ``"32-bit"``, ``"pae"``, ``"4-level"`` or ``"5-level"``."""
    if not cr0 & CR0_PG:
        return "none"
    if not cr4 & CR4_PAE:
        return "32-bit"
    if not efer & EFER_LMA:
        return "pae"
    return "5-level" if cr4 & CR4_LA57 else "4-level"


def _read_entry(read_phys: ReadPhys, addr: int, size: int) -> int | None:
    data = read_phys(addr, size)
    if len(data) < size:
        return None
    return int.from_bytes(data[:size], "little")


_LONG_LEVELS = ("PML5E", "PML4E", "PDPTE", "PDE", "PTE")


def _canonical(vaddr: int, bits: int) -> bool:
    top = vaddr >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def translate(
    read_phys: ReadPhys,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    vaddr: int,
    *,
    access: Access = "r",
) -> Translation | None:
    """Translate ``vaddr``; None when it is not mapped (or not canonical, or ``access`` fails)."""
    result = _walk(read_phys, PagingState(cr0, cr3, cr4, efer), vaddr, [])
    if result is None:
        return None
    if (access == "w" and not result.writable) or (access == "x" and result.nx):
        return None
    return result


def walk_steps(read_phys: ReadPhys, state: PagingState, vaddr: int) -> list[WalkStep]:
    """The entries a walk of ``vaddr`` reads, up to the one that maps it or stops it.

    For ``monitor translate``: on an unmapped address the last step is the entry that is not
    present.  Empty with paging off or for an address the mode cannot express.
    """
    steps: list[WalkStep] = []
    _walk(read_phys, state, vaddr, steps)
    return steps


def describe_mode(state: PagingState) -> str:
    """The paging mode in words, e.g. ``4-level paging (CR3 0x1000, NXE)``."""
    mode = paging_mode(state.cr0, state.cr4, state.efer)
    if mode == "none":
        return "paging off (linear = physical)"
    extras = [f"CR3 {state.cr3:#x}"]
    if mode == "32-bit" and state.cr4 & CR4_PSE:
        extras.append("PSE")
    if mode != "32-bit" and state.efer & EFER_NXE:
        extras.append("NXE")
    return f"{mode} paging ({', '.join(extras)})"


def _walk(
    read_phys: ReadPhys, state: PagingState, vaddr: int, steps: list[WalkStep]
) -> Translation | None:
    cr0, cr3, cr4, efer = state
    if not 0 <= vaddr < _U64:
        return None
    mode = paging_mode(cr0, cr4, efer)
    if mode == "none":
        if vaddr >= _U32:
            return None
        page = vaddr & ~(KIB4 - 1)
        return Translation(vaddr, vaddr, KIB4, page, True, True, False, ())
    if mode == "32-bit":
        return _walk32(read_phys, cr3, cr4, vaddr, steps)
    if mode == "pae":
        return _walk_pae(read_phys, cr3, efer, vaddr, steps)
    return _walk_long(read_phys, cr3, efer, vaddr, 5 if mode == "5-level" else 4, steps)


def _finish(
    vaddr: int, base: int, size: int, writable: bool, user: bool, nx: bool, steps: list[WalkStep]
) -> Translation:
    offset = vaddr & (size - 1)
    return Translation(vaddr, base + offset, size, vaddr - offset, writable, user, nx, tuple(steps))


def _walk32(
    read_phys: ReadPhys, cr3: int, cr4: int, vaddr: int, steps: list[WalkStep]
) -> Translation | None:
    if vaddr >= _U32:
        return None
    pde_addr = (cr3 & 0xFFFFF000) + ((vaddr >> 22) & 0x3FF) * 4
    pde = _read_entry(read_phys, pde_addr, 4)
    if pde is None:
        return None
    steps.append(WalkStep("PDE", pde_addr, pde))
    if not pde & _P:
        return None
    if pde & _PS and cr4 & CR4_PSE:
        base = (pde & 0xFFC00000) | (((pde >> 13) & 0xFF) << 32)  # PSE-36: bits 39:32
        return _finish(vaddr, base, MIB4, bool(pde & _RW), bool(pde & _US), False, steps)
    pte_addr = (pde & 0xFFFFF000) + ((vaddr >> 12) & 0x3FF) * 4
    pte = _read_entry(read_phys, pte_addr, 4)
    if pte is None:
        return None
    steps.append(WalkStep("PTE", pte_addr, pte))
    if not pte & _P:
        return None
    return _finish(
        vaddr, pte & 0xFFFFF000, KIB4, bool(pde & pte & _RW), bool(pde & pte & _US), False, steps
    )


def _walk_pae(
    read_phys: ReadPhys, cr3: int, efer: int, vaddr: int, steps: list[WalkStep]
) -> Translation | None:
    if vaddr >= _U32:
        return None
    pdpte_addr = (cr3 & 0xFFFFFFE0) + ((vaddr >> 30) & 3) * 8
    pdpte = _read_entry(read_phys, pdpte_addr, 8)
    if pdpte is None:
        return None
    steps.append(WalkStep("PDPTE", pdpte_addr, pdpte))
    if not pdpte & _P:
        return None
    return _walk_tail(read_phys, pdpte & _ADDR_4K, efer, vaddr, _RW | _US, False, steps)


def _walk_long(
    read_phys: ReadPhys, cr3: int, efer: int, vaddr: int, levels: int, steps: list[WalkStep]
) -> Translation | None:
    if not _canonical(vaddr, 57 if levels == 5 else 48):
        return None
    nxe = bool(efer & EFER_NXE)
    table = cr3 & _ADDR_4K
    rights = _RW | _US
    nx = False
    for level in range(levels, 2, -1):  # PML5 (5), PML4 (4), PDPT (3)
        entry_addr = table + ((vaddr >> (12 + 9 * (level - 1))) & 0x1FF) * 8
        entry = _read_entry(read_phys, entry_addr, 8)
        if entry is None:
            return None
        steps.append(WalkStep(_LONG_LEVELS[5 - level], entry_addr, entry))
        if not entry & _P:
            return None
        rights &= entry
        nx = nx or (nxe and bool(entry & _XD))
        if entry & _PS:
            if level != 3:
                return None  # PS is reserved in PML5E and PML4E
            return _finish(
                vaddr, entry & _ADDR_1G, GIB1, bool(rights & _RW), bool(rights & _US), nx, steps
            )
        table = entry & _ADDR_4K
    return _walk_tail(read_phys, table, efer, vaddr, rights, nx, steps)


def _walk_tail(
    read_phys: ReadPhys,
    pd: int,
    efer: int,
    vaddr: int,
    rights: int,
    nx: bool,
    steps: list[WalkStep],
) -> Translation | None:
    """The PDE and PTE levels, shared by PAE and long mode (64-bit entries)."""
    nxe = bool(efer & EFER_NXE)
    pde_addr = pd + ((vaddr >> 21) & 0x1FF) * 8
    pde = _read_entry(read_phys, pde_addr, 8)
    if pde is None:
        return None
    steps.append(WalkStep("PDE", pde_addr, pde))
    if not pde & _P:
        return None
    rights &= pde
    nx = nx or (nxe and bool(pde & _XD))
    if pde & _PS:
        return _finish(
            vaddr, pde & _ADDR_2M, MIB2, bool(rights & _RW), bool(rights & _US), nx, steps
        )
    pte_addr = (pde & _ADDR_4K) + ((vaddr >> 12) & 0x1FF) * 8
    pte = _read_entry(read_phys, pte_addr, 8)
    if pte is None:
        return None
    steps.append(WalkStep("PTE", pte_addr, pte))
    if not pte & _P:
        return None
    rights &= pte
    nx = nx or (nxe and bool(pte & _XD))
    return _finish(vaddr, pte & _ADDR_4K, KIB4, bool(rights & _RW), bool(rights & _US), nx, steps)


def virtual_to_physical_chunks(
    read_phys: ReadPhys,
    regs: Mapping[str, int] | PagingState,
    vaddr: int,
    length: int,
    access: Access = "r",
) -> list[tuple[int, int]]:
    """Split ``[vaddr, vaddr + length)`` into ``(paddr, length)`` physical chunks.

    ``regs`` is a ``PagingState`` or a mapping with ``cr0``, ``cr3``, ``cr4`` and ``efer``
    (the register names of ``gdbstub.regs``).  The chunks cover the mapped prefix of the
    range: the list stops at the first page that is unmapped (or fails ``access``), so a read
    returns what was readable.  Physically contiguous pages merge into one chunk.
    """
    state = regs if isinstance(regs, PagingState) else PagingState.from_regs(regs)
    cr0, cr3, cr4, efer = state
    chunks: list[tuple[int, int]] = []
    if length <= 0 or not 0 <= vaddr < _U64:
        return chunks
    end = min(vaddr + length, _U64)
    if not cr0 & CR0_PG:
        end = min(end, _U32)
        return [(vaddr, end - vaddr)] if vaddr < end else []
    addr = vaddr
    while addr < end:
        t = translate(read_phys, cr0, cr3, cr4, efer, addr, access=access)
        if t is None:
            break
        step = min(end, t.page_vaddr + t.page_size) - addr
        if chunks and chunks[-1][0] + chunks[-1][1] == t.paddr:
            chunks[-1] = (chunks[-1][0], chunks[-1][1] + step)
        else:
            chunks.append((t.paddr, step))
        addr += step
    return chunks


# ---------------------------------------------------------------------------------------------
# Whole-table dump


class _Budget:
    """Bounds the work of a dump: page tables may be huge, or loop back on themselves."""

    def __init__(self, limit: int, max_tables: int) -> None:
        self.limit = limit
        self.tables = max_tables
        self.out: list[PageMapping] = []

    def full(self) -> bool:
        return len(self.out) > self.limit or self.tables <= 0

    def emit(self, vaddr: int, paddr: int, size: int, flags: str) -> None:
        if self.out:
            last = self.out[-1]
            if (
                last.vaddr + last.size == vaddr
                and last.paddr + last.size == paddr
                and last.flags == flags
            ):
                self.out[-1] = last._replace(size=last.size + size)
                return
        self.out.append(PageMapping(vaddr, paddr, size, flags))


def _read_table(read_phys: ReadPhys, addr: int, count: int, width: int) -> tuple[int, ...]:
    data = read_phys(addr, count * width)
    if len(data) < count * width:
        return ()
    return struct.unpack(f"<{count}{'Q' if width == 8 else 'I'}", data)


def dump_mappings(
    read_phys: ReadPhys,
    cr0: int,
    cr3: int,
    cr4: int,
    efer: int,
    limit: int = 4096,
    *,
    max_tables: int = 65536,
) -> list[PageMapping]:
    """Every present mapping, in virtual-address order, with adjacent runs merged.

    Runs merge when virtual and physical addresses are both contiguous and the flags match.
    At most ``limit`` mappings are returned, and at most ``max_tables`` page tables are read
    (so a self-referencing table cannot make the dump run away).  With paging off the result
    is the identity mapping of the 4 GiB linear space.
    """
    mode = paging_mode(cr0, cr4, efer)
    if mode == "none":
        return [PageMapping(0, 0, _U32, "rwxs")][:limit]
    budget = _Budget(limit, max_tables)
    nxe = bool(efer & EFER_NXE)
    if mode == "32-bit":
        _dump32(read_phys, cr3, cr4, budget)
    elif mode == "pae":
        budget.tables -= 1
        pdptes = _read_table(read_phys, cr3 & 0xFFFFFFE0, 4, 8)
        for i, pdpte in enumerate(pdptes):
            if budget.full():
                break
            if pdpte & _P:
                _dump_level(read_phys, pdpte & _ADDR_4K, 2, i << 30, _RW | _US, False, nxe, budget)
    else:
        levels = 5 if mode == "5-level" else 4
        _dump_level(read_phys, cr3 & _ADDR_4K, levels, 0, _RW | _US, False, nxe, budget)
    return budget.out[:limit]


def _dump32(read_phys: ReadPhys, cr3: int, cr4: int, budget: _Budget) -> None:
    budget.tables -= 1
    for i, pde in enumerate(_read_table(read_phys, cr3 & 0xFFFFF000, 1024, 4)):
        if budget.full():
            return
        if not pde & _P:
            continue
        va = i << 22
        if pde & _PS and cr4 & CR4_PSE:
            base = (pde & 0xFFC00000) | (((pde >> 13) & 0xFF) << 32)
            budget.emit(va, base, MIB4, _flags(bool(pde & _RW), bool(pde & _US), False))
            continue
        budget.tables -= 1
        for j, pte in enumerate(_read_table(read_phys, pde & 0xFFFFF000, 1024, 4)):
            if pte & _P:
                flags = _flags(bool(pde & pte & _RW), bool(pde & pte & _US), False)
                budget.emit(va | (j << 12), pte & 0xFFFFF000, KIB4, flags)


def _sign_extend(vaddr: int, levels: int) -> int:
    bits = 12 + 9 * levels
    if vaddr >> (bits - 1) & 1:
        vaddr |= (_U64 - 1) ^ ((1 << bits) - 1)
    return vaddr


def _dump_level(
    read_phys: ReadPhys,
    table: int,
    level: int,
    va_base: int,
    rights: int,
    nx: bool,
    nxe: bool,
    budget: _Budget,
    top_levels: int | None = None,
) -> None:
    """Dump one table of 512 64-bit entries; ``level`` 1 = PT, 2 = PD, 3 = PDPT, 4, 5."""
    top = level if top_levels is None else top_levels
    budget.tables -= 1
    shift = 12 + 9 * (level - 1)
    for i, entry in enumerate(_read_table(read_phys, table, 512, 8)):
        if budget.full():
            return
        if not entry & _P:
            continue
        va = va_base | (i << shift)
        if level == top and top >= 4:
            va = _sign_extend(va, top)
        r = rights & entry
        x = nx or (nxe and bool(entry & _XD))
        if level == 1 or (entry & _PS and level in (2, 3)):
            mask = {1: _ADDR_4K, 2: _ADDR_2M, 3: _ADDR_1G}[level]
            budget.emit(va, entry & mask, 1 << shift, _flags(bool(r & _RW), bool(r & _US), x))
        elif entry & _PS:
            continue  # PS in a PML4E / PML5E: reserved, the entry maps nothing
        else:
            _dump_level(read_phys, entry & _ADDR_4K, level - 1, va, r, x, nxe, budget, top)
