"""The Linux x86 boot protocol for a bzImage, through its 64-bit entry point.

Theory of operation
===================

(Documentation/arch/x86/boot.rst and zero-page.rst.)  A bzImage starts with the real-mode
boot sector and setup code, ``setup_sects`` sectors of 512 bytes after the boot sector (0 means
4); the setup header is at 0x1f1 and has ``"HdrS"`` at 0x202.  We need protocol 2.12 or later
with ``XLF_KERNEL_64`` in ``xloadflags``: the protected-mode kernel then has a 64-bit entry 0x200
bytes after its start, and the real-mode code never runs.  Older or 32-bit-only images are
refused with one line.

Loading:

* The protected-mode kernel (the file from ``((setup_sects or 4) + 1) * 512`` on) goes to
  ``pref_address`` when ``[pref_address, + init_size)`` lies in RAM below 4 GiB; otherwise a
  relocatable kernel goes to 1 MiB rounded up to ``kernel_alignment``, and a kernel that is not
  relocatable (it would move itself to ``pref_address``) is refused.  ``init_size`` (the memory
  the kernel needs from its start until it has read the memory map) must fit in RAM.
* The zero page (``struct boot_params``, 4 KiB at ``ZERO_PAGE_ADDR``) starts as zeros with the
  image's setup header copied in at 0x1f1 (up to ``0x202 + byte at 0x201``); we then set
  ``type_of_loader`` 0xff, ``loadflags`` |= CAN_USE_HEAP (LOADED_HIGH is the image's own; no
  KEEP_SEGMENTS, meaningless for the 64-bit entry), ``heap_end_ptr`` 0xde00 (the usual value for
  a setup segment at the zero page, unused by the 64-bit path), ``code32_start`` = the load
  address, ``cmd_line_ptr`` = ``CMDLINE_ADDR``, ``ramdisk_image``/``ramdisk_size`` (their high
  halves in ``ext_ramdisk_image``/``ext_ramdisk_size`` at 0xc0/0xc4), ``acpi_rsdp_addr`` at
  0x70 (protocol 2.14+, from ``rsdp_addr``), and the :mod:`.e820` map (``e820_entries`` at
  0x1e8, 20-byte entries at 0x2d0).
* The command line may hold ``cmdline_size`` bytes before its NUL (255 before protocol 2.06).
* The initrd goes page-aligned at the top of RAM below ``initrd_addr_max`` (any address when
  ``XLF_CAN_BE_LOADED_ABOVE_4G``), above the kernel's ``init_size`` range, as QEMU places it.

Initial state (the "64-bit Boot Protocol"): long mode on the identity-mapped 0-4 GiB page
tables (which cover ``init_size`` from the load address, the zero page and the command line),
the Linux GDT (:func:`gdbstub.machine.boot.cpu.linux_gdt`), CS = 0x10 (``__BOOT_CS``),
DS = ES = SS = FS = GS = 0x18 (``__BOOT_DS``), IF clear, RSI = ``ZERO_PAGE_ADDR``, every other
general register 0 but RSP (0x10000), RIP = load address + 0x200.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from . import cpu
from .common import (
    CMDLINE_ADDR,
    FOUR_GIB,
    ZERO_PAGE_ADDR,
    Blob,
    BootError,
    BootPlan,
    Initrd,
    align_up,
    cmdline_bytes,
    initrd_at_top,
)
from .e820 import E820_MAX_ENTRIES_ZEROPAGE, HIGH_RAM_START, e820_table, is_ram, memory_map

HDRS_MAGIC = b"HdrS"
SETUP_HEADER = 0x1F1
SECTOR = 512
ZERO_PAGE_SIZE = 0x1000
ENTRY_64_OFFSET = 0x200
MIN_VERSION = 0x020C  # 2.12: xloadflags
TYPE_OF_LOADER_UNDEFINED = 0xFF
HEAP_END_PTR = 0xE000 - 0x200  # heap end 0xe000 into the (notional) setup segment
OLD_INITRD_ADDR_MAX = 0x37FFFFFF  # before protocol 2.03
OLD_CMDLINE_SIZE = 255  # before protocol 2.06

# loadflags
LOADED_HIGH = 1 << 0
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7
# xloadflags
XLF_KERNEL_64 = 1 << 0
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1

# offsets in the image and in struct boot_params (the setup header is at the same place)
OFF_ACPI_RSDP_ADDR = 0x070
OFF_EXT_RAMDISK_IMAGE = 0x0C0
OFF_EXT_RAMDISK_SIZE = 0x0C4
OFF_EXT_CMD_LINE_PTR = 0x0C8
OFF_E820_ENTRIES = 0x1E8
OFF_SENTINEL = 0x1EF
OFF_SETUP_SECTS = 0x1F1
OFF_BOOT_FLAG = 0x1FE
OFF_JUMP = 0x200
OFF_HEADER = 0x202
OFF_VERSION = 0x206
OFF_TYPE_OF_LOADER = 0x210
OFF_LOADFLAGS = 0x211
OFF_CODE32_START = 0x214
OFF_RAMDISK_IMAGE = 0x218
OFF_RAMDISK_SIZE = 0x21C
OFF_HEAP_END_PTR = 0x224
OFF_CMD_LINE_PTR = 0x228
OFF_INITRD_ADDR_MAX = 0x22C
OFF_KERNEL_ALIGNMENT = 0x230
OFF_RELOCATABLE_KERNEL = 0x234
OFF_XLOADFLAGS = 0x236
OFF_CMDLINE_SIZE = 0x238
OFF_PREF_ADDRESS = 0x258
OFF_INIT_SIZE = 0x260
OFF_E820_TABLE = 0x2D0
OFF_EDD_MBR_SIG_BUFFER = 0x290  # the setup header's room in boot_params ends here
HEADER_2_12_END = 0x264  # one past init_size: what a 2.12 header must cover


@dataclass(frozen=True)
class SetupHeader:
    """The fields of a bzImage's setup header the loader reads."""

    setup_sects: int
    version: int
    loadflags: int
    initrd_addr_max: int
    kernel_alignment: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    pref_address: int
    init_size: int
    end: int  # one past the header in the image (0x202 + byte at 0x201, at most 0x290)

    @property
    def kernel_offset(self) -> int:
        """File offset of the protected-mode kernel."""
        return ((self.setup_sects or 4) + 1) * SECTOR

    def version_text(self) -> str:
        """The protocol version as ``"2.15"``."""
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def is_bzimage(data: bytes) -> bool:
    """Whether ``data`` has a Linux setup header (``"HdrS"`` at 0x202)."""
    return data[OFF_HEADER : OFF_HEADER + 4] == HDRS_MAGIC


def parse_header(p: Path, data: bytes) -> SetupHeader:
    """The setup header of bzImage ``data``; a one-line BootError when we cannot boot it."""
    if len(data) < OFF_VERSION + 2:
        raise BootError(f"{p}: Linux setup header is truncated")
    version = struct.unpack_from("<H", data, OFF_VERSION)[0]
    text = f"{version >> 8}.{version & 0xFF:02d}"
    if version < MIN_VERSION:
        raise BootError(
            f"{p}: Linux boot protocol {text} is too old: the 64-bit entry needs 2.12 or later"
        )
    end = min(OFF_HEADER + data[OFF_JUMP + 1], OFF_EDD_MBR_SIG_BUFFER)
    if end < HEADER_2_12_END or len(data) < end:
        raise BootError(f"{p}: Linux setup header is truncated (ends at {end:#x})")
    xloadflags = struct.unpack_from("<H", data, OFF_XLOADFLAGS)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise BootError(f"{p}: bzImage has no 64-bit entry point (XLF_KERNEL_64 is clear)")
    loadflags = data[OFF_LOADFLAGS]
    if not loadflags & LOADED_HIGH:
        raise BootError(f"{p}: zImage (loaded low) kernels are not supported, only bzImage")
    hdr = SetupHeader(
        setup_sects=data[OFF_SETUP_SECTS],
        version=version,
        loadflags=loadflags,
        initrd_addr_max=struct.unpack_from("<I", data, OFF_INITRD_ADDR_MAX)[0],
        kernel_alignment=struct.unpack_from("<I", data, OFF_KERNEL_ALIGNMENT)[0],
        relocatable=bool(data[OFF_RELOCATABLE_KERNEL]),
        xloadflags=xloadflags,
        cmdline_size=struct.unpack_from("<I", data, OFF_CMDLINE_SIZE)[0],
        pref_address=struct.unpack_from("<Q", data, OFF_PREF_ADDRESS)[0],
        init_size=struct.unpack_from("<I", data, OFF_INIT_SIZE)[0],
        end=end,
    )
    if hdr.kernel_offset + ENTRY_64_OFFSET >= len(data):
        raise BootError(f"{p}: bzImage ends before its protected-mode kernel's 64-bit entry")
    return hdr


def load_address(p: Path, hdr: SetupHeader, size: int, mem_size: int) -> int:
    """Where the protected-mode kernel goes (``size`` = max(image, init_size) bytes)."""
    ram_top = min(mem_size, FOUR_GIB)  # the boot page tables map 0-4 GiB

    def fits(addr: int) -> bool:
        return addr >= HIGH_RAM_START and addr + size <= ram_top and is_ram(addr, size, mem_size)

    pref = hdr.pref_address
    if pref and fits(pref):
        return pref
    if not hdr.relocatable:
        raise BootError(
            f"{p}: the kernel is not relocatable and needs {pref:#x}-{pref + size:#x} "
            f"(init_size {hdr.init_size:#x}); give the VM more memory"
        )
    addr = align_up(HIGH_RAM_START, hdr.kernel_alignment)
    if not fits(addr):
        need = (addr + size + (1 << 20) - 1) >> 20
        raise BootError(
            f"{p}: the kernel needs {size:#x} bytes (init_size) at {addr:#x}: "
            f"at least {need} MiB of RAM"
        )
    return addr


def place_initrd(hdr: SetupHeader, initrd: Initrd, kernel_end: int, mem_size: int) -> Blob:
    """The initrd as the plan's ``initrd`` extra, page-aligned at the top of allowed RAM."""
    if hdr.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G:
        top = mem_size
    else:
        top = min(mem_size, hdr.initrd_addr_max + 1)
    gpa = initrd_at_top(len(initrd.data), top=top, floor=kernel_end)
    return Blob("initrd", gpa, initrd.data)


def zero_page(
    data: bytes,
    hdr: SetupHeader,
    *,
    load: int,
    mem_size: int,
    initrd: Blob | None,
    rsdp_addr: int,
) -> bytes:
    """``struct boot_params`` for the kernel loaded at ``load``."""
    zp = bytearray(ZERO_PAGE_SIZE)
    zp[SETUP_HEADER : hdr.end] = data[SETUP_HEADER : hdr.end]
    zp[OFF_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    zp[OFF_LOADFLAGS] = (hdr.loadflags | CAN_USE_HEAP) & ~KEEP_SEGMENTS
    struct.pack_into("<I", zp, OFF_CODE32_START, load)
    struct.pack_into("<H", zp, OFF_HEAP_END_PTR, HEAP_END_PTR)
    struct.pack_into("<I", zp, OFF_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<I", zp, OFF_EXT_CMD_LINE_PTR, CMDLINE_ADDR >> 32)
    if initrd is not None:
        gpa, size = initrd.gpa, len(initrd.data)
        struct.pack_into("<II", zp, OFF_RAMDISK_IMAGE, gpa & 0xFFFFFFFF, size & 0xFFFFFFFF)
        struct.pack_into("<I", zp, OFF_EXT_RAMDISK_IMAGE, gpa >> 32)
        struct.pack_into("<I", zp, OFF_EXT_RAMDISK_SIZE, size >> 32)
    if rsdp_addr and hdr.version >= 0x020E:
        struct.pack_into("<Q", zp, OFF_ACPI_RSDP_ADDR, rsdp_addr)
    entries = len(memory_map(mem_size))
    assert entries <= E820_MAX_ENTRIES_ZEROPAGE
    zp[OFF_E820_ENTRIES] = entries
    table = e820_table(mem_size)
    zp[OFF_E820_TABLE : OFF_E820_TABLE + len(table)] = table
    return bytes(zp)


def plan(
    p: Path,
    data: bytes,
    *,
    mem_size: int,
    cmdline: str,
    initrd: Initrd | None = None,
    rsdp_addr: int = 0,
) -> BootPlan:
    """The boot plan of bzImage ``data`` (see the module docstring)."""
    hdr = parse_header(p, data)
    kernel = data[hdr.kernel_offset :]
    size = max(len(kernel), hdr.init_size)
    load = load_address(p, hdr, size, mem_size)
    limit = hdr.cmdline_size if hdr.version >= 0x0206 else OLD_CMDLINE_SIZE
    raw = cmdline_bytes(cmdline, limit)
    rd = place_initrd(hdr, initrd, load + size, mem_size) if initrd else None
    params = zero_page(data, hdr, load=load, mem_size=mem_size, initrd=rd, rsdp_addr=rsdp_addr)
    extras = [
        cpu.linux_gdt(),
        Blob("zero_page", ZERO_PAGE_ADDR, params),
        Blob("cmdline", CMDLINE_ADDR, raw),
        cpu.page_tables(),
    ]
    if rd is not None:
        extras.append(rd)
    entry = load + ENTRY_64_OFFSET
    state = cpu.long_mode_cpu(
        entry, code=cpu.LINUX_BOOT_CS, data=cpu.LINUX_BOOT_DS, rsi=ZERO_PAGE_ADDR
    )
    return BootPlan(p, "linux", entry, mem_size, cmdline, [(load, kernel)], [], extras, state)
