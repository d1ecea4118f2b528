"""The guest's memory map, as every boot protocol hands it out (PVH memmap, Multiboot mmap, e820).

Theory of operation
===================

One list of ``(address, size, type)`` entries with E820 types, drawn from the firmware layout
(:mod:`gdbstub.machine.firmware.layout`), in QEMU's shape:

============================  ==========  ====================================================
0 - ``LOW_RAM_END``           RAM         conventional memory (IVT, BDA and the boot area too)
``LOW_RAM_END`` - 1 MiB       reserved    EBDA, ACPI tables, MP table, BIOS stubs, ROM hole
1 MiB - ``mem_size``          RAM         the kernel, its initrd and everything else
============================  ==========  ====================================================

Each protocol encodes the same entries its own way: ``hvm_memmap_table_entry`` (PVH and ELF64,
:mod:`.pvh`), Multiboot mmap entries (:mod:`.multiboot`), the zero page's ``e820_table``
(:mod:`.linux`, :func:`e820_table`).
"""

from __future__ import annotations

import struct

from ..firmware import layout

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
LOW_RAM_END = layout.LOW_RAM_END
HIGH_RAM_START = layout.HIGH_RAM_START
E820_MAX_ENTRIES_ZEROPAGE = 128


def memory_map(mem_size: int) -> list[tuple[int, int, int]]:
    """The guest's memory map as (address, size, type) with E820 types (1 RAM, 2 reserved)."""
    return [
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED),
        (HIGH_RAM_START, mem_size - HIGH_RAM_START, E820_RAM),
    ]


def is_ram(start: int, size: int, mem_size: int) -> bool:
    """Whether ``[start, start + size)`` lies inside one RAM entry of the memory map."""
    return any(
        kind == E820_RAM and addr <= start and start + size <= addr + length
        for addr, length, kind in memory_map(mem_size)
    )


def e820_table(mem_size: int) -> bytes:
    """The map as packed ``boot_e820_entry`` (u64 addr, u64 size, u32 type), 20 bytes each."""
    return b"".join(struct.pack("<QQI", a, s, t) for a, s, t in memory_map(mem_size))
