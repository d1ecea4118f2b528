"""What every boot protocol shares: the plan and CPU-state types, the boot area, cmdline, initrd.

Theory of operation
===================

A protocol module turns a kernel image into a :class:`BootPlan`: ``loads`` (the kernel's bytes
at their guest-physical addresses), ``zero_fill`` (its bss), ``extras`` (the loader's own
structures, each a named :class:`Blob`: GDT, boot information, memory map, command line, page
tables, initrd) and ``cpu`` (the boot vCPU's :class:`CpuState`).  The machine writes the plan
into RAM with :meth:`BootPlan.apply` and loads ``cpu`` into the vCPU.

The loader's structures live in the boot area 0x1000-0x10000 (the table is in
``gdbstub/machine/boot/__init__.py``); :func:`check_placement` refuses a kernel that would
overlap it, the firmware's areas, or lie outside RAM.  :func:`read_initrd` and
:func:`initrd_at_top` give every protocol the same initrd handling.

Segment access rights are in VMX format (type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14,
G 15, unusable 16); control-register values are architectural (the VMM adds whatever fixed bits
VMX needs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from ..firmware import layout

BootProtocol = Literal["linux", "multiboot", "pvh", "elf64"]

# ---- the loader's boot area (see gdbstub/machine/boot/__init__.py) -----------------------------
BOOT_AREA_START = 0x1000
BOOT_AREA_END = 0x10000
GDT_ADDR = 0x1000
TSS_ADDR = 0x1080
TSS_LIMIT = 0x67
BOOT_INFO_ADDR = 0x2000
ZERO_PAGE_ADDR = BOOT_INFO_ADDR  # Linux: struct boot_params, 4 KiB
MEMMAP_ADDR = 0x2040
MB_MODS_ADDR = 0x2080
MB_MMAP_ADDR = 0x2100
MODLIST_ADDR = 0x2800
MB_MOD_STRING_ADDR = 0x2C00
MB_MOD_STRING_MAX = 0x300  # including the NUL
MB_LOADER_NAME_ADDR = 0x2F00
CMDLINE_ADDR = 0x3000
CMDLINE_MAX = 0x1000  # including the NUL
PML4_ADDR = 0x4000
PDPT_LOW_ADDR = 0x5000
PDPT_HIGH_ADDR = 0x6000
PD_ADDR = 0x7000  # four page directories, 0x7000-0xafff
PAGE_TABLES_SIZE = 0x7000  # PML4_ADDR .. 0xb000
BOOT_STACK_TOP = 0x10000
HIGH_ALIAS_BASE = 0xFFFFFFFF80000000  # 0-2 GiB mapped again here (long-mode page tables)

# ---- GDT selectors (PVH, Multiboot, ELF64; Linux has its own, see cpu.py) -----------------------
SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_TSS = 0x20
GDT_LIMIT = 0x2F

# ---- VMX access rights ---------------------------------------------------------------------------
AR_CODE32 = 0xC09B  # execute/read, accessed, S, P, D, G
AR_CODE64 = 0xA09B  # execute/read, accessed, S, P, L, G
AR_DATA = 0xC093  # read/write, accessed, S, P, B, G
AR_TSS_BUSY = 0x008B  # busy TSS (32-bit or 64-bit by mode), P
AR_UNUSABLE = 0x10000

PAGE = 0x1000
FOUR_GIB = 1 << 32

# firmware areas a kernel image must not cover (the boot area is checked separately)
FIRMWARE_AREAS = (
    (layout.IVT_ADDR, layout.BDA_ADDR + 0x100, "the IVT and BIOS data area"),
    (layout.LOW_RAM_END, layout.HIGH_RAM_START, "the firmware area (EBDA, ACPI, MP table, BIOS)"),
)


class BootError(Exception):
    """The kernel image cannot be booted; ``str(err)`` is one line saying why."""


@dataclass(frozen=True)
class SegmentReg:
    """One segment register as the VMCS holds it (``ar`` in VMX access-rights format)."""

    selector: int
    base: int
    limit: int
    ar: int


@dataclass(frozen=True)
class DescriptorTable:
    """GDTR or IDTR."""

    base: int
    limit: int


def _data_seg() -> SegmentReg:
    return SegmentReg(SEL_DATA, 0, 0xFFFFFFFF, AR_DATA)


@dataclass
class CpuState:
    """Initial register values of the boot vCPU (each protocol module says what it sets)."""

    rip: int
    cr0: int
    cr3: int
    cr4: int
    efer: int
    cs: SegmentReg
    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rbp: int = 0
    rsp: int = BOOT_STACK_TOP
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rflags: int = 0x2
    xcr0: int = 0x1
    ds: SegmentReg = field(default_factory=_data_seg)
    es: SegmentReg = field(default_factory=_data_seg)
    fs: SegmentReg = field(default_factory=_data_seg)
    gs: SegmentReg = field(default_factory=_data_seg)
    ss: SegmentReg = field(default_factory=_data_seg)
    tr: SegmentReg = field(
        default_factory=lambda: SegmentReg(SEL_TSS, TSS_ADDR, TSS_LIMIT, AR_TSS_BUSY)
    )
    ldtr: SegmentReg = field(default_factory=lambda: SegmentReg(0, 0, 0, AR_UNUSABLE))
    gdtr: DescriptorTable = field(default_factory=lambda: DescriptorTable(GDT_ADDR, GDT_LIMIT))
    idtr: DescriptorTable = field(default_factory=lambda: DescriptorTable(0, 0))

    GPR_NAMES = (
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
    )  # fmt: skip
    SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldtr")

    def gprs(self) -> dict[str, int]:
        """The 16 general registers by name (``rax`` ... ``r15``)."""
        return {name: getattr(self, name) for name in self.GPR_NAMES}

    def segments(self) -> dict[str, SegmentReg]:
        """The segment registers by name (``cs ds es fs gs ss tr ldtr``)."""
        return {name: getattr(self, name) for name in self.SEGMENT_NAMES}


class Blob(NamedTuple):
    """A loader structure to write into guest memory."""

    name: str
    gpa: int
    data: bytes


Loads = list[tuple[int, bytes]]  # (gpa, bytes) of the kernel image
ZeroFill = list[tuple[int, int]]  # (gpa, length) of its bss


@dataclass
class BootPlan:
    """Everything needed to boot a kernel: memory contents and the initial CPU state.

    Apply it with :meth:`apply` (or write ``zero_fill``, then ``loads``, then ``extras``).
    """

    path: Path
    protocol: BootProtocol
    entry: int
    mem_size: int
    cmdline: str
    loads: Loads  # (gpa, bytes) from the kernel image
    zero_fill: ZeroFill  # (gpa, length) bss
    extras: list[Blob]  # loader structures: gdt, boot info, memmap, cmdline, initrd, ...
    cpu: CpuState

    def apply(self, write: Callable[[int, bytes], object], chunk: int = 1 << 20) -> None:
        """Write the whole plan through ``write(gpa, data)``: zero fills, loads, then extras."""
        for gpa, length in self.zero_fill:
            done = 0
            while done < length:
                n = min(chunk, length - done)
                write(gpa + done, bytes(n))
                done += n
        for gpa, data in self.loads:
            write(gpa, data)
        for blob in self.extras:
            write(blob.gpa, blob.data)

    def extra(self, name: str) -> Blob:
        """The loader structure called ``name`` (KeyError when absent)."""
        for blob in self.extras:
            if blob.name == name:
                return blob
        raise KeyError(name)

    def kernel_range(self) -> tuple[int, int]:
        """Lowest and one-past-highest guest-physical address the kernel image occupies."""
        spans = [(g, g + len(d)) for g, d in self.loads] + [(g, g + n) for g, n in self.zero_fill]
        return min(s for s, _ in spans), max(e for _, e in spans)

    def initrd_range(self) -> tuple[int, int] | None:
        """Start and one-past-end guest-physical address of the initrd (None without one)."""
        try:
            blob = self.extra("initrd")
        except KeyError:
            return None
        return blob.gpa, blob.gpa + len(blob.data)


@dataclass(frozen=True)
class Initrd:
    """An initrd (or Multiboot module) to load: its bytes and the name the guest may see."""

    data: bytes
    name: str


# ---- helpers -------------------------------------------------------------------------------------


def align_up(value: int, alignment: int) -> int:
    """``value`` rounded up to a multiple of ``alignment`` (a power of two; 0 or 1: unchanged)."""
    if alignment <= 1:
        return value
    return (value + alignment - 1) & ~(alignment - 1)


def read_file(p: Path, what: str = "") -> bytes:
    """The bytes of ``p``; a :class:`BootError` naming the file when it cannot be read."""
    label = f"{what} {p}" if what else str(p)
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise BootError(f"{label}: no such file") from None
    except IsADirectoryError:
        raise BootError(f"{label}: is a directory") from None
    except OSError as exc:
        raise BootError(f"{label}: cannot read: {exc.strerror or exc}") from None


def read_initrd(initrd: bytes | str | Path | None) -> Initrd | None:
    """Normalise ``load_kernel``'s ``initrd`` argument: bytes, a path, or None."""
    if initrd is None:
        return None
    if isinstance(initrd, (bytes, bytearray, memoryview)):
        data, name = bytes(initrd), "initrd"
    else:
        p = Path(initrd)
        data, name = read_file(p, "initrd"), str(p)
    if not data:
        raise BootError(f"initrd {name} is empty")
    return Initrd(data, name)


def cmdline_bytes(text: str, limit: int = CMDLINE_MAX - 1) -> bytes:
    """``text`` as a NUL-terminated string of at most ``limit`` bytes before the NUL."""
    raw = text.encode("utf-8")
    limit = min(limit, CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise BootError(f"command line is too long ({len(raw)} bytes, at most {limit})")
    return raw + b"\0"


def check_placement(p: Path, loads: Loads, zero: ZeroFill, mem_size: int) -> None:
    """Refuse kernel spans outside RAM or over the boot area or the firmware's areas."""
    spans = [(g, len(d)) for g, d in loads] + zero
    for gpa, size in spans:
        end = gpa + size
        if end > mem_size:
            raise BootError(
                f"{p}: segment {gpa:#x}-{end:#x} lies outside guest memory "
                f"(0-{mem_size:#x}); give the VM more memory"
            )
        if gpa < BOOT_AREA_END and end > BOOT_AREA_START:
            raise BootError(
                f"{p}: segment {gpa:#x}-{end:#x} overlaps the loader's boot area "
                f"{BOOT_AREA_START:#x}-{BOOT_AREA_END:#x}"
            )
        for start, stop, what in FIRMWARE_AREAS:
            if gpa < stop and end > start:
                raise BootError(
                    f"{p}: segment {gpa:#x}-{end:#x} overlaps {what} at {start:#x}-{stop:#x}"
                )


def initrd_at_top(size: int, *, top: int, floor: int, what: str = "initrd") -> int:
    """Page-aligned address of ``size`` bytes ending at or below ``top`` and at or above ``floor``.

    This is how QEMU places an initrd: as high as it may go.  A :class:`BootError` when it does
    not fit above ``floor`` (the end of the kernel).
    """
    addr = ((top - size) & ~(PAGE - 1)) if top >= size else -1
    if addr < floor:
        raise BootError(
            f"{what} ({size} bytes) does not fit between the kernel's end {floor:#x} and "
            f"{top:#x}; give the VM more memory"
        )
    return addr


def kernel_end(loads: Loads, zero: ZeroFill) -> int:
    """One past the highest guest-physical address the kernel image occupies."""
    return max([g + len(d) for g, d in loads] + [g + n for g, n in zero])
