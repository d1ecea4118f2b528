"""The PVH boot protocol: an ELF with the Xen PVH entry note, entered in 32-bit protected mode.

Theory of operation
===================

A PVH kernel is an ELF (32 or 64 bit, EM_386 or EM_X86_64) with an ELF note owner ``"Xen"``
type 18 (``XEN_ELFNOTE_PHYS32_ENTRY``) whose descriptor (4 or 8 bytes, little endian) is the
32-bit physical entry point.  Its ``PT_LOAD`` segments go to their physical addresses.

The kernel receives an ``hvm_start_info`` (version 1) at ``BOOT_INFO_ADDR``:

======  ======  ==============================================================================
offset  size    field
======  ======  ==============================================================================
0x00    4       magic 0x336ec578
0x04    4       version 1
0x08    4       flags 0
0x0c    4       nr_modules: 1 with an initrd, else 0
0x10    8       modlist_paddr: ``MODLIST_ADDR`` (one ``hvm_modlist_entry``: paddr, size,
                cmdline_paddr 0, reserved) with an initrd, else 0
0x18    8       cmdline_paddr: ``CMDLINE_ADDR``
0x20    8       rsdp_paddr: the firmware's ACPI RSDP (``rsdp_addr``; 0 = let the kernel scan)
0x28    8       memmap_paddr: ``MEMMAP_ADDR`` (``hvm_memmap_table_entry``: addr, size, type,
                reserved; the :mod:`.e820` map)
0x30    4       memmap_entries
======  ======  ==============================================================================

The initrd goes page-aligned at the top of RAM below 4 GiB (as QEMU's PVH loader puts it), above
the kernel.  Initial state: 32-bit protected mode, paging off, CS 0x08, data 0x10, EAX = 0,
EBX = ``BOOT_INFO_ADDR``, RIP = the note's entry (see :mod:`.cpu`).  The ELF64 protocol
(:mod:`.elf64`) hands its kernel the same start_info.
"""

from __future__ import annotations

import struct
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from . import cpu
from .common import (
    BOOT_INFO_ADDR,
    CMDLINE_ADDR,
    FOUR_GIB,
    MEMMAP_ADDR,
    MODLIST_ADDR,
    Blob,
    BootError,
    BootPlan,
    Initrd,
    Loads,
    ZeroFill,
    check_placement,
    cmdline_bytes,
    initrd_at_top,
    kernel_end,
)
from .e820 import memory_map
from .elfimage import elf_segments, iter_notes

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
HVM_START_INFO_SIZE = 56
HVM_MODLIST_ENTRY_SIZE = 32
XEN_ELFNOTE_PHYS32_ENTRY = 18


def pvh_entry(elf: ELFFile) -> int | None:
    """The PVH entry point from the ``XEN_ELFNOTE_PHYS32_ENTRY`` note, None without one."""
    try:
        for owner, ntype, desc in iter_notes(elf):
            if owner == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
                value = int.from_bytes(desc[:8] if len(desc) >= 8 else desc[:4], "little")
                if value >= FOUR_GIB:
                    raise BootError(f"PVH entry point {value:#x} is above 4 GiB")
                return value
    except (ELFError, ValueError, struct.error) as exc:
        raise BootError(f"malformed ELF notes: {exc}") from None
    return None


def place_initrd(initrd: Initrd, kernel_end: int, mem_size: int) -> Blob:
    """The initrd as the plan's ``initrd`` extra: page-aligned at the top of RAM below 4 GiB."""
    gpa = initrd_at_top(len(initrd.data), top=min(mem_size, FOUR_GIB), floor=kernel_end)
    return Blob("initrd", gpa, initrd.data)


def start_info(
    mem_size: int, raw_cmdline: bytes, *, initrd: Blob | None = None, rsdp_addr: int = 0
) -> list[Blob]:
    """The ``hvm_start_info`` and what it points at (memmap, cmdline, module list, initrd)."""
    mmap = memory_map(mem_size)
    info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,  # flags
        1 if initrd else 0,  # nr_modules
        MODLIST_ADDR if initrd else 0,
        CMDLINE_ADDR,
        rsdp_addr,
        MEMMAP_ADDR,
        len(mmap),
        0,
    )
    table = b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in mmap)
    blobs = [
        Blob("start_info", BOOT_INFO_ADDR, info),
        Blob("memmap", MEMMAP_ADDR, table),
        Blob("cmdline", CMDLINE_ADDR, raw_cmdline),
    ]
    if initrd is not None:
        entry = struct.pack("<QQQQ", initrd.gpa, len(initrd.data), 0, 0)
        blobs += [Blob("modlist", MODLIST_ADDR, entry), initrd]
    return blobs


def boot_extras(
    p: Path,
    loads: Loads,
    zero: ZeroFill,
    *,
    mem_size: int,
    cmdline: str,
    initrd: Initrd | None,
    rsdp_addr: int,
) -> list[Blob]:
    """Check the kernel's placement; the GDT, start_info and the rest (PVH and ELF64)."""
    check_placement(p, loads, zero, mem_size)
    raw = cmdline_bytes(cmdline)
    rd = place_initrd(initrd, kernel_end(loads, zero), mem_size) if initrd else None
    return [cpu.gdt(), *start_info(mem_size, raw, initrd=rd, rsdp_addr=rsdp_addr)]


def plan(
    p: Path,
    elf: ELFFile,
    entry: int,
    *,
    mem_size: int,
    cmdline: str,
    initrd: Initrd | None = None,
    rsdp_addr: int = 0,
) -> BootPlan:
    """The boot plan of PVH kernel ``elf`` (whose note gave ``entry``)."""
    loads, zero = elf_segments(elf)
    extras = boot_extras(
        p, loads, zero, mem_size=mem_size, cmdline=cmdline, initrd=initrd, rsdp_addr=rsdp_addr
    )
    state = cpu.protected_mode_cpu(entry, rax=0, rbx=BOOT_INFO_ADDR)
    return BootPlan(p, "pvh", entry, mem_size, cmdline, loads, zero, extras, state)
