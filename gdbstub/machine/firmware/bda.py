"""The BIOS data area and the extended BIOS data area (pure builder: bytes for guest memory).

Theory of operation
===================

A PC BIOS leaves a 256-byte table at 0x400 that boot code and kernels read: Linux takes the EBDA
segment from word 0x40E (to bound low memory and to scan the EBDA for the MP floating pointer),
and boot loaders and real-mode code read the serial port bases, the equipment word and the base
memory size.  :func:`build_bda` returns ``(address, bytes)`` pieces for the machine to write:

=======  ====  ================================================================================
0x400    8     COM1-COM4 I/O bases (COM1 = 0x3F8, others absent)
0x408    6     LPT1-LPT3 I/O bases (absent)
0x40E    2     EBDA segment (0x9FC0)
0x410    2     equipment word: math coprocessor, one serial port
0x413    2     base memory size in KiB (639: RAM below the EBDA)
0x449    1     video mode 3 (80x25 colour text, as int 10h AH=0Fh reports)
0x44A    2     text columns (80)
0x463    2     CRT controller base port (0x3D4)
0x46C    4     timer ticks since midnight (18.2 Hz), ``ticks`` argument
0x470    1     midnight rollover flag (0)
0x484    1     text rows minus one (24)
=======  ====  ================================================================================

The EBDA (1 KiB at 0x9FC00) starts with its own size in KiB (1); the rest is zero.
"""

from __future__ import annotations

import struct

from gdbstub.machine.firmware.layout import (
    BDA_ADDR,
    EBDA_ADDR,
    EBDA_SIZE,
    HIGH_RAM_START,
    LOW_RAM_END,
)

BDA_SIZE = 0x100
COM1_BASE = 0x3F8

# equipment word (int 11h)
EQUIP_FPU = 1 << 1
EQUIP_SERIAL_SHIFT = 9  # bits 9-11: number of serial ports
EQUIPMENT_WORD = EQUIP_FPU | (1 << EQUIP_SERIAL_SHIFT)

BASE_MEMORY_KIB = LOW_RAM_END // 1024  # 639
EBDA_SEGMENT = EBDA_ADDR >> 4  # 0x9FC0
EBDA_SIZE_KIB = EBDA_SIZE // 1024

VIDEO_MODE = 3
TEXT_COLUMNS = 80
TEXT_ROWS = 25
CRTC_BASE = 0x3D4
TICKS_PER_DAY = 0x1800B0  # what the BIOS counts before the midnight rollover

# offsets inside the BDA
OFF_COM_PORTS = 0x00
OFF_EBDA_SEGMENT = 0x0E
OFF_EQUIPMENT = 0x10
OFF_BASE_MEMORY = 0x13
OFF_VIDEO_MODE = 0x49
OFF_COLUMNS = 0x4A
OFF_CRTC_BASE = 0x63
OFF_TICKS = 0x6C
OFF_MIDNIGHT = 0x70
OFF_ROWS = 0x84


def build_bda(*, mem_size: int, ticks: int = 0) -> list[tuple[int, bytes]]:
    """The BDA (at ``BDA_ADDR``) and the EBDA (at ``EBDA_ADDR``) for ``mem_size`` bytes of RAM.

    ``ticks`` fills the tick counter at 0x46C (reduced modulo a day's 0x1800B0 ticks).
    """
    if mem_size < HIGH_RAM_START:
        raise ValueError(f"mem_size {mem_size:#x} is below 1 MiB: no room for the EBDA")
    bda = bytearray(BDA_SIZE)
    struct.pack_into("<4H", bda, OFF_COM_PORTS, COM1_BASE, 0, 0, 0)
    struct.pack_into("<H", bda, OFF_EBDA_SEGMENT, EBDA_SEGMENT)
    struct.pack_into("<H", bda, OFF_EQUIPMENT, EQUIPMENT_WORD)
    struct.pack_into("<H", bda, OFF_BASE_MEMORY, BASE_MEMORY_KIB)
    struct.pack_into("<BH", bda, OFF_VIDEO_MODE, VIDEO_MODE, TEXT_COLUMNS)
    struct.pack_into("<H", bda, OFF_CRTC_BASE, CRTC_BASE)
    struct.pack_into("<I", bda, OFF_TICKS, ticks % TICKS_PER_DAY)
    struct.pack_into("<B", bda, OFF_MIDNIGHT, 0)
    struct.pack_into("<B", bda, OFF_ROWS, TEXT_ROWS - 1)
    ebda = bytearray(EBDA_SIZE)
    struct.pack_into("<H", ebda, 0, EBDA_SIZE_KIB)
    return [(BDA_ADDR, bytes(bda)), (EBDA_ADDR, bytes(ebda))]
