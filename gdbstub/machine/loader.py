"""Kernel image loader: turn a ``-kernel`` file into a :class:`BootPlan` (pure, no VM calls).

Theory of operation
===================

``load_kernel(path, mem_size=..., cmdline=..., initrd=..., rsdp_addr=...)`` reads the file and
decides the boot protocol in the order QEMU's ``-kernel`` uses:

1. **Linux** -- a bzImage (``"HdrS"`` at 0x202; protocol 2.12+ with a 64-bit entry), booted
   through the 64-bit Linux boot protocol (:mod:`gdbstub.machine.boot.linux`).
2. **Multiboot v1** -- a header in the first 8 KiB (:mod:`gdbstub.machine.boot.multiboot`).
3. **PVH** -- an ELF with the Xen ``XEN_ELFNOTE_PHYS32_ENTRY`` note
   (:mod:`gdbstub.machine.boot.pvh`).
4. **ELF64** -- any other EM_X86_64 ELF64 file, entered in long mode
   (:mod:`gdbstub.machine.boot.elf64`).

A 32-bit ELF without either header is an error, as is an ELF of another machine.  The protocols,
the loader's memory layout (everything it writes lives in 0x1000-0x10000, apart from the kernel
and the initrd) and each protocol's initial CPU state are described in
``gdbstub/machine/boot/`` (the package docstring has the layout table).  This module is the
public face: the names the machine, the CLI and the tests import stay importable from here.
"""

from __future__ import annotations

from pathlib import Path

from .. import kallsyms
from .boot import elf64, linux, multiboot, pvh
from .boot.common import (
    AR_CODE32,
    AR_CODE64,
    AR_DATA,
    AR_TSS_BUSY,
    AR_UNUSABLE,
    BOOT_AREA_END,
    BOOT_AREA_START,
    BOOT_INFO_ADDR,
    BOOT_STACK_TOP,
    CMDLINE_ADDR,
    CMDLINE_MAX,
    GDT_ADDR,
    GDT_LIMIT,
    HIGH_ALIAS_BASE,
    MB_LOADER_NAME_ADDR,
    MB_MMAP_ADDR,
    MB_MOD_STRING_ADDR,
    MB_MODS_ADDR,
    MEMMAP_ADDR,
    MODLIST_ADDR,
    PAGE_TABLES_SIZE,
    PD_ADDR,
    PDPT_HIGH_ADDR,
    PDPT_LOW_ADDR,
    PML4_ADDR,
    SEL_CODE32,
    SEL_CODE64,
    SEL_DATA,
    SEL_TSS,
    TSS_ADDR,
    TSS_LIMIT,
    ZERO_PAGE_ADDR,
    Blob,
    BootError,
    BootPlan,
    BootProtocol,
    CpuState,
    DescriptorTable,
    SegmentReg,
    read_file,
    read_initrd,
)
from .boot.cpu import (
    LINUX_BOOT_CS,
    LINUX_BOOT_DS,
    LONG_MODE_CR0,
    LONG_MODE_CR4,
    LONG_MODE_EFER,
    PROTECTED_MODE_CR0,
    build_page_tables,
)
from .boot.e820 import E820_RAM, E820_RESERVED, HIGH_RAM_START, LOW_RAM_END, memory_map
from .boot.elfimage import EM_386, EM_X86_64, parse_elf
from .boot.elfimage import symbols as elf_symbols
from .boot.multiboot import MULTIBOOT_BOOTLOADER_MAGIC, MULTIBOOT_HEADER_MAGIC
from .boot.payload import vmlinux_of_bzimage
from .boot.pvh import HVM_START_MAGIC, XEN_ELFNOTE_PHYS32_ENTRY

__all__ = [
    "AR_CODE32", "AR_CODE64", "AR_DATA", "AR_TSS_BUSY", "AR_UNUSABLE", "BOOT_AREA_END",
    "BOOT_AREA_START", "BOOT_INFO_ADDR", "BOOT_STACK_TOP", "CMDLINE_ADDR", "CMDLINE_MAX",
    "E820_RAM", "E820_RESERVED", "EM_386", "EM_X86_64", "GDT_ADDR", "GDT_LIMIT",
    "HIGH_ALIAS_BASE", "HIGH_RAM_START", "HVM_START_MAGIC", "LINUX_BOOT_CS", "LINUX_BOOT_DS",
    "LONG_MODE_CR0", "LONG_MODE_CR4", "LONG_MODE_EFER", "LOW_RAM_END", "MB_LOADER_NAME_ADDR",
    "MB_MMAP_ADDR", "MB_MODS_ADDR", "MB_MOD_STRING_ADDR", "MEMMAP_ADDR", "MIN_MEM_SIZE",
    "MODLIST_ADDR", "MULTIBOOT_BOOTLOADER_MAGIC", "MULTIBOOT_HEADER_MAGIC", "PAGE_TABLES_SIZE",
    "PDPT_HIGH_ADDR", "PDPT_LOW_ADDR", "PD_ADDR", "PML4_ADDR", "PROTECTED_MODE_CR0",
    "SEL_CODE32", "SEL_CODE64", "SEL_DATA", "SEL_TSS", "TSS_ADDR", "TSS_LIMIT",
    "XEN_ELFNOTE_PHYS32_ENTRY", "ZERO_PAGE_ADDR", "Blob", "BootError", "BootPlan",
    "BootProtocol", "CpuState", "DescriptorTable", "SegmentReg", "build_page_tables",
    "load_kernel", "memory_map", "symbols",
]  # fmt: skip

MIN_MEM_SIZE = 2 * HIGH_RAM_START


def symbols(path: str | Path) -> dict[str, int]:
    """Symbol name -> address for the kernel at ``path``: its ELF ``.symtab``; for a stripped
    ``vmlinux`` or a bzImage, the kernel's own kallsyms table (link-time addresses: right when
    it boots with ``nokaslr``); ``{}`` when it has neither. A file that is neither an ELF file
    nor a bzImage is a BootError."""
    p = Path(path)
    data = read_file(p)
    if linux.is_bzimage(data):
        try:
            return kallsyms.symbol_map(vmlinux_of_bzimage(data))
        except BootError:  # no payload we can decompress here: no symbols, the boot goes on
            return {}
    return elf_symbols(p) or kallsyms.symbol_map(data)


def load_kernel(
    path: str | Path,
    *,
    mem_size: int,
    cmdline: str = "",
    initrd: bytes | str | Path | None = None,
    rsdp_addr: int = 0,
) -> BootPlan:
    """Read the kernel image at ``path`` and plan its boot into ``mem_size`` bytes of RAM.

    ``initrd`` (bytes or a file) becomes the Linux initrd, the PVH/ELF64 start_info module or
    the Multiboot module; ``rsdp_addr`` (the firmware's ACPI RSDP, 0 for none) goes into the
    PVH/ELF64 start_info and the Linux zero page.  Raises :class:`BootError` (one line).
    """
    p = Path(path)
    if mem_size < MIN_MEM_SIZE or mem_size % 4096:
        raise BootError(f"memory size {mem_size:#x} must be a multiple of 4 KiB and >= 2 MiB")
    data = read_file(p)
    rd = read_initrd(initrd)
    if linux.is_bzimage(data):
        return linux.plan(
            p, data, mem_size=mem_size, cmdline=cmdline, initrd=rd, rsdp_addr=rsdp_addr
        )
    mb = multiboot.find_header(data)
    elf = parse_elf(p, data)
    if mb is not None:
        return multiboot.plan(
            p, data, mb, elf, mem_size=mem_size, cmdline=cmdline, initrd=rd,
            kernel_name=str(path),
        )  # fmt: skip
    if elf is None:
        raise BootError(f"{p}: not an ELF file, a bzImage or a Multiboot kernel")
    entry = pvh.pvh_entry(elf)
    if entry is not None:
        return pvh.plan(
            p, elf, entry, mem_size=mem_size, cmdline=cmdline, initrd=rd, rsdp_addr=rsdp_addr
        )
    return elf64.plan(p, elf, mem_size=mem_size, cmdline=cmdline, initrd=rd, rsdp_addr=rsdp_addr)
