"""The ELF64 protocol: any other x86-64 ELF file, entered at ``e_entry`` in 64-bit long mode.

Theory of operation
===================

The ``PT_LOAD`` segments go to their physical addresses.  The vCPU starts in long mode on the
boot page tables (:func:`gdbstub.machine.boot.cpu.build_page_tables`: identity 0-4 GiB, and
0-2 GiB again at 0xffffffff80000000); ``e_entry`` must lie in one of the two.  CS = 0x18
(64-bit code), data segments 0x10, RIP = ``e_entry``, RDI = ``BOOT_INFO_ADDR``: an
``hvm_start_info`` as for PVH (our extension, so the kernel can find its command line, memory
map, initrd and RSDP; see :mod:`.pvh`).
"""

from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile

from . import cpu
from .common import BOOT_INFO_ADDR, FOUR_GIB, HIGH_ALIAS_BASE, BootError, BootPlan, Initrd
from .elfimage import elf_segments
from .pvh import boot_extras


def plan(
    p: Path,
    elf: ELFFile,
    *,
    mem_size: int,
    cmdline: str,
    initrd: Initrd | None = None,
    rsdp_addr: int = 0,
) -> BootPlan:
    """The boot plan of ELF64 kernel ``elf``."""
    if elf.elfclass != 64:
        raise BootError(f"{p}: 32-bit ELF without a Multiboot header or PVH note")
    if elf.header["e_machine"] != "EM_X86_64":
        raise BootError(f"{p}: ELF64 file for {elf.header['e_machine']}, not EM_X86_64")
    loads, zero = elf_segments(elf)
    entry: int = elf.header["e_entry"]
    if not (entry < FOUR_GIB or entry >= HIGH_ALIAS_BASE):
        raise BootError(
            f"{p}: ELF64 entry point {entry:#x} is outside the boot page tables "
            f"(0-4 GiB and {HIGH_ALIAS_BASE:#x}+)"
        )
    extras = boot_extras(
        p, loads, zero, mem_size=mem_size, cmdline=cmdline, initrd=initrd, rsdp_addr=rsdp_addr
    )
    extras.append(cpu.page_tables())
    state = cpu.long_mode_cpu(entry, rdi=BOOT_INFO_ADDR)
    return BootPlan(p, "elf64", entry, mem_size, cmdline, loads, zero, extras, state)
