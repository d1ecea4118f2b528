"""The Multiboot v1 protocol: a header in the first 8 KiB, entered in 32-bit protected mode.

Theory of operation
===================

The header (magic 0x1BADB002, ``magic + flags + checksum == 0``) sits at a 4-byte aligned offset
within the first 8192 bytes.  With flags bit 16 (the "a.out kludge") the header's own addresses
say what to load, for ELF files and raw binaries alike; without it the file must be an ELF whose
``PT_LOAD`` segments are loaded at their physical addresses.  (QEMU refuses ELF64 Multiboot
images without the kludge; we accept them when the entry point is below 4 GiB.)  Flag bits 0-2
(page-align modules, memory info, video mode) are accepted, the video request is ignored; any
other bit in 0-15 is an error, as the spec requires.

The Multiboot information structure at ``BOOT_INFO_ADDR`` has flags mem, boot device, cmdline,
mods, mmap and loader name: ``mem_lower`` 639 KiB, ``mem_upper`` the KiB above 1 MiB (capped
below 4 GiB), boot device 0x8000ffff, the command line ``"<kernel path> <cmdline>"`` (as QEMU and
GRUB pass it), the :mod:`.e820` map as mmap entries at ``MB_MMAP_ADDR`` and the loader name
"gdbstub".  An initrd becomes the one module (``mods_count`` 1, ``mods_addr`` =
``MB_MODS_ADDR``: ``mod_start``, ``mod_end`` (exclusive), ``string`` = its file name, reserved),
placed as QEMU does: on the first page boundary after the kernel image.

Initial state: 32-bit protected mode, paging off, CS 0x08, data 0x10, EAX = 0x2BADB002,
EBX = ``BOOT_INFO_ADDR`` (see :mod:`.cpu`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile

from . import cpu
from .common import (
    BOOT_INFO_ADDR,
    CMDLINE_ADDR,
    FOUR_GIB,
    MB_LOADER_NAME_ADDR,
    MB_MMAP_ADDR,
    MB_MOD_STRING_ADDR,
    MB_MOD_STRING_MAX,
    MB_MODS_ADDR,
    PAGE,
    Blob,
    BootError,
    BootPlan,
    Initrd,
    Loads,
    ZeroFill,
    align_up,
    check_placement,
    cmdline_bytes,
    kernel_end,
)
from .e820 import HIGH_RAM_START, LOW_RAM_END, is_ram, memory_map
from .elfimage import elf_segments

MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MB_FLAG_AOUT_KLUDGE = 1 << 16
MB_SUPPORTED_REQUIRED = 0x7  # bits 0-2 of the low 16 "must honour" bits
MBI_FLAG_MEM = 1 << 0
MBI_FLAG_BOOTDEV = 1 << 1
MBI_FLAG_CMDLINE = 1 << 2
MBI_FLAG_MODS = 1 << 3
MBI_FLAG_MMAP = 1 << 6
MBI_FLAG_LOADER_NAME = 1 << 9
MBI_SIZE = 120
MB_MOD_ENTRY_SIZE = 16
BOOT_LOADER_NAME = b"gdbstub\0"


@dataclass(frozen=True)
class MultibootHeader:
    """A Multiboot header found in the image, with its file offset."""

    offset: int
    flags: int
    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int
    entry_addr: int


def find_header(data: bytes) -> MultibootHeader | None:
    """The first valid Multiboot header in the first 8 KiB of ``data``, None without one."""
    limit = min(len(data), MULTIBOOT_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            fields = [0] * 5
            if len(data) >= off + 32:
                fields = list(struct.unpack_from("<5I", data, off + 12))
            return MultibootHeader(off, flags, *fields)
    return None


def image(
    p: Path, data: bytes, mb: MultibootHeader, elf: ELFFile | None
) -> tuple[Loads, ZeroFill, int]:
    """What to load (from the kludge addresses or the ELF segments) and the entry point."""
    required = mb.flags & 0xFFFF & ~MB_SUPPORTED_REQUIRED
    if required:
        raise BootError(
            f"{p}: Multiboot header requires unsupported features (flags {mb.flags:#x})"
        )
    if not mb.flags & MB_FLAG_AOUT_KLUDGE:
        if elf is None:
            raise BootError(
                f"{p}: Multiboot header without address fields (flags bit 16) in a non-ELF file"
            )
        loads, zero = elf_segments(elf)
        entry: int = elf.header["e_entry"]
        if entry >= FOUR_GIB:
            raise BootError(f"{p}: Multiboot ELF entry point {entry:#x} is above 4 GiB")
        return loads, zero, entry
    if len(data) < mb.offset + 32:
        raise BootError(f"{p}: Multiboot header is truncated")
    if mb.header_addr < mb.load_addr:
        raise BootError(
            f"{p}: Multiboot header_addr {mb.header_addr:#x} is below load_addr {mb.load_addr:#x}"
        )
    if mb.header_addr - mb.load_addr > mb.offset:
        raise BootError(
            f"{p}: Multiboot header_addr {mb.header_addr:#x} is inconsistent with "
            f"the header's file offset {mb.offset:#x}"
        )
    text_offset = mb.offset - (mb.header_addr - mb.load_addr)
    if mb.load_end_addr:
        if mb.load_end_addr < mb.load_addr:
            raise BootError(f"{p}: Multiboot load_end_addr is below load_addr")
        size = mb.load_end_addr - mb.load_addr
        if text_offset + size > len(data):
            raise BootError(
                f"{p}: Multiboot load range {mb.load_addr:#x}-{mb.load_end_addr:#x} "
                f"extends past the end of the file"
            )
    else:
        size = len(data) - text_offset
    loads = [(mb.load_addr, data[text_offset : text_offset + size])]
    bss: ZeroFill = []
    if mb.bss_end_addr:
        if mb.bss_end_addr < mb.load_addr + size:
            raise BootError(
                f"{p}: Multiboot bss_end_addr {mb.bss_end_addr:#x} is below the "
                f"end of the loaded image"
            )
        if mb.bss_end_addr > mb.load_addr + size:
            bss.append((mb.load_addr + size, mb.bss_end_addr - mb.load_addr - size))
    return loads, bss, mb.entry_addr


def place_module(initrd: Initrd, kernel_end: int, mem_size: int) -> Blob:
    """The module as the plan's ``initrd`` extra: on the first page after the kernel."""
    size = len(initrd.data)
    gpa = align_up(kernel_end, PAGE)
    if gpa + size > FOUR_GIB or not is_ram(gpa, size, mem_size):
        raise BootError(
            f"Multiboot module {initrd.name} ({size} bytes) does not fit in RAM after the "
            f"kernel at {gpa:#x}; give the VM more memory"
        )
    return Blob("initrd", gpa, initrd.data)


def boot_info(
    mem_size: int, raw_cmdline: bytes, module: Blob | None, module_name: str
) -> list[Blob]:
    """The Multiboot information structure and what it points at."""
    mmap = b"".join(struct.pack("<IQQI", 20, a, s, t) for a, s, t in memory_map(mem_size))
    mem_upper = (min(mem_size, 0xFFFFFFFF & ~0xFFF) - HIGH_RAM_START) // 1024
    mbi = bytearray(MBI_SIZE)
    flags = (
        MBI_FLAG_MEM
        | MBI_FLAG_BOOTDEV
        | MBI_FLAG_CMDLINE
        | MBI_FLAG_MODS
        | MBI_FLAG_MMAP
        | MBI_FLAG_LOADER_NAME
    )
    struct.pack_into(
        "<IIIII", mbi, 0, flags, LOW_RAM_END // 1024, mem_upper, 0x8000FFFF, CMDLINE_ADDR
    )
    mods: list[Blob] = []
    if module is not None:
        struct.pack_into("<II", mbi, 20, 1, MB_MODS_ADDR)  # mods_count, mods_addr
        name = module_name.encode("utf-8")[: MB_MOD_STRING_MAX - 1] + b"\0"
        end = module.gpa + len(module.data)
        entry = struct.pack("<IIII", module.gpa, end, MB_MOD_STRING_ADDR, 0)
        mods = [
            Blob("mods", MB_MODS_ADDR, entry),
            Blob("mod_string", MB_MOD_STRING_ADDR, name),
            module,
        ]
    struct.pack_into("<II", mbi, 44, len(mmap), MB_MMAP_ADDR)
    struct.pack_into("<I", mbi, 64, MB_LOADER_NAME_ADDR)
    return [
        Blob("mbi", BOOT_INFO_ADDR, bytes(mbi)),
        Blob("mmap", MB_MMAP_ADDR, mmap),
        Blob("loader_name", MB_LOADER_NAME_ADDR, BOOT_LOADER_NAME),
        Blob("cmdline", CMDLINE_ADDR, raw_cmdline),
        *mods,
    ]


def plan(
    p: Path,
    data: bytes,
    mb: MultibootHeader,
    elf: ELFFile | None,
    *,
    mem_size: int,
    cmdline: str,
    initrd: Initrd | None = None,
    kernel_name: str | None = None,
) -> BootPlan:
    """The boot plan of a Multiboot kernel (``kernel_name`` starts its command line)."""
    loads, zero, entry = image(p, data, mb, elf)
    check_placement(p, loads, zero, mem_size)
    # like QEMU (and GRUB), the kernel's file name is the first word of the command line
    raw = cmdline_bytes(f"{kernel_name if kernel_name is not None else p} {cmdline}")
    module = place_module(initrd, kernel_end(loads, zero), mem_size) if initrd else None
    extras = [cpu.gdt(), *boot_info(mem_size, raw, module, initrd.name if initrd else "")]
    state = cpu.protected_mode_cpu(entry, rax=MULTIBOOT_BOOTLOADER_MAGIC, rbx=BOOT_INFO_ADDR)
    return BootPlan(p, "multiboot", entry, mem_size, cmdline, loads, zero, extras, state)
