"""GDTs, boot page tables and initial CPU states the boot protocols share.

Theory of operation
===================

Two GDTs, both at ``GDT_ADDR`` with limit 0x2f and a busy TSS at selector 0x20 (VMX wants a
usable TR with a busy TSS type, even though no kernel looks at it before loading its own):

* :func:`gdt` (PVH, Multiboot, ELF64): 0x08 flat 32-bit code, 0x10 flat data, 0x18 64-bit code.
* :func:`linux_gdt`: the selectors the Linux boot protocol requires, 0x10 = ``__BOOT_CS``
  (64-bit code) and 0x18 = ``__BOOT_DS`` (flat data); 0x08 is flat 32-bit code, as in the
  kernel's own boot GDT.

The long-mode page tables (:func:`build_page_tables`) identity-map 0-4 GiB and map 0-2 GiB again
at 0xffffffff80000000, all with 2 MiB pages, present + writable.

Initial CPU states, common to all: RFLAGS = 0x2 (IF clear), IDTR = 0/0 (an exception before the
kernel loads its own IDT is a triple fault), TR = 0x20 (base 0x1080, limit 0x67, busy), LDTR
unusable, RSP = 0x10000, XCR0 = 1.

* :func:`protected_mode_cpu`: CR0 = 0x11 (PE|ET), paging off, CS = 0x08, data segments 0x10.
* :func:`long_mode_cpu`: CR0 = 0x80010033 (PG|WP|NE|ET|MP|PE), CR3 = ``PML4_ADDR``,
  CR4 = 0x620 (PAE|OSFXSR|OSXMMEXCPT), EFER = 0x500 (LME|LMA), CS and data selectors by
  argument (ELF64: 0x18 and 0x10; Linux: 0x10 and 0x18).

These are architectural values, what the guest sees on bare metal. The machine writes them as a
framework VMM must (``gdbstub.vmxsetup``): CR0.NE and CR4.VMXE added in the real registers and
hidden behind the guest/host masks, EFER.LMA and the IA-32e mode guest control from LME & PG.
"""

from __future__ import annotations

import struct

from .common import (
    AR_CODE32,
    AR_CODE64,
    AR_DATA,
    GDT_ADDR,
    PML4_ADDR,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    TSS_ADDR,
    TSS_LIMIT,
    Blob,
    CpuState,
    SegmentReg,
)

CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

PROTECTED_MODE_CR0 = CR0_PE | CR0_ET  # 0x11
LONG_MODE_CR0 = CR0_PG | CR0_WP | CR0_NE | CR0_ET | CR0_MP | CR0_PE  # 0x80010033
LONG_MODE_CR4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT  # 0x620
LONG_MODE_EFER = EFER_LME | EFER_LMA  # 0x500

# Linux boot protocol selectors (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol")
LINUX_BOOT_CS = 0x10
LINUX_BOOT_DS = 0x18

DESC_CODE32 = 0x00CF9B000000FFFF  # flat 32-bit code, accessed
DESC_DATA = 0x00CF93000000FFFF  # flat data, accessed
DESC_CODE64 = 0x00AF9B000000FFFF  # 64-bit code, accessed

_PTE_P_RW = 0x3
_PDE_2M = 0x83  # present, writable, page size


def _tss_descriptor() -> list[int]:
    """The busy TSS descriptor (type 0xb, P) at ``TSS_ADDR`` as two GDT slots."""
    low = TSS_LIMIT | (TSS_ADDR & 0xFFFFFF) << 16 | 0x8B << 40 | ((TSS_ADDR >> 24) & 0xFF) << 56
    return [low, TSS_ADDR >> 32]


def _gdt_blob(entries: list[int]) -> Blob:
    table = struct.pack(f"<{len(entries)}Q", *entries)
    padded = table + bytes(TSS_ADDR - GDT_ADDR - len(table)) + bytes(TSS_LIMIT + 1)
    return Blob("gdt", GDT_ADDR, padded)


def gdt() -> Blob:
    """The GDT (and the zeroed TSS after it) of the PVH, Multiboot and ELF64 protocols."""
    return _gdt_blob([0, DESC_CODE32, DESC_DATA, DESC_CODE64, *_tss_descriptor()])


def linux_gdt() -> Blob:
    """The Linux protocol's GDT: 0x10 ``__BOOT_CS`` (64-bit code), 0x18 ``__BOOT_DS`` (data)."""
    return _gdt_blob([0, DESC_CODE32, DESC_CODE64, DESC_DATA, *_tss_descriptor()])


def build_page_tables(base: int = PML4_ADDR) -> bytes:
    """The long-mode boot page tables as one 0x7000-byte block to be placed at ``base``.

    Layout relative to ``base``: +0 PML4, +0x1000 PDPT (low), +0x2000 PDPT (high), +0x3000..
    +0x6fff four page directories.  Identity-maps 0-4 GiB and maps 0-2 GiB again at
    0xffffffff80000000, with 2 MiB pages.  ``base`` must be 4 KiB aligned; CR3 = ``base``.
    """
    if base % 4096:
        raise ValueError("page tables must be 4 KiB aligned")
    pdpt_lo, pdpt_hi, pd = base + 0x1000, base + 0x2000, base + 0x3000
    pml4 = [0] * 512
    pml4[0] = pdpt_lo | _PTE_P_RW
    pml4[511] = pdpt_hi | _PTE_P_RW
    lo = [0] * 512
    for i in range(4):
        lo[i] = (pd + i * 0x1000) | _PTE_P_RW
    hi = [0] * 512
    hi[510] = pd | _PTE_P_RW
    hi[511] = (pd + 0x1000) | _PTE_P_RW
    pds = [(i << 21) | _PDE_2M for i in range(4 * 512)]
    return struct.pack("<3584Q", *pml4, *lo, *hi, *pds)


def page_tables() -> Blob:
    """:func:`build_page_tables` at ``PML4_ADDR``, as a plan's ``page_tables`` extra."""
    return Blob("page_tables", PML4_ADDR, build_page_tables(PML4_ADDR))


def protected_mode_cpu(entry: int, *, rax: int = 0, rbx: int = 0) -> CpuState:
    """32-bit protected mode, paging off, flat CS 0x08 and data 0x10, at ``entry``."""
    return CpuState(
        rip=entry,
        cr0=PROTECTED_MODE_CR0,
        cr3=0,
        cr4=0,
        efer=0,
        cs=SegmentReg(SEL_CODE32, 0, 0xFFFFFFFF, AR_CODE32),
        rax=rax,
        rbx=rbx,
    )


def long_mode_cpu(
    entry: int, *, code: int = SEL_CODE64, data: int = SEL_DATA, rsi: int = 0, rdi: int = 0
) -> CpuState:
    """64-bit long mode on the :func:`build_page_tables` tables, at ``entry``."""
    flat = SegmentReg(data, 0, 0xFFFFFFFF, AR_DATA)
    return CpuState(
        rip=entry,
        cr0=LONG_MODE_CR0,
        cr3=PML4_ADDR,
        cr4=LONG_MODE_CR4,
        efer=LONG_MODE_EFER,
        cs=SegmentReg(code, 0, 0xFFFFFFFF, AR_CODE64),
        rsi=rsi,
        rdi=rdi,
        ds=flat,
        es=flat,
        fs=flat,
        gs=flat,
        ss=flat,
    )
