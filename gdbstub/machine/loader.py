"""Kernel image loader: turn a ``-kernel`` file into a :class:`BootPlan` (pure, no VM calls).

Theory of operation
===================

``load_kernel(path, mem_size=..., cmdline=...)`` reads the file and decides the boot protocol in
the order QEMU's ``-kernel`` uses:

1. **Multiboot v1** -- a header (magic 0x1BADB002, ``magic + flags + checksum == 0``) at a
   4-byte aligned offset within the first 8192 bytes.  With flags bit 16 (the "a.out kludge")
   the header's own addresses say what to load, for ELF files and raw binaries alike; without it
   the file must be an ELF whose ``PT_LOAD`` segments are loaded at their physical addresses.
   (QEMU refuses ELF64 Multiboot images without the kludge; we accept them when the entry point
   is below 4 GiB.)  Flag bits 0-2 (page-align modules, memory info, video mode) are accepted,
   the video request is ignored; any other bit in 0-15 is an error, as the spec requires.
2. **PVH** -- an ELF (32 or 64 bit, EM_386 or EM_X86_64) with an ELF note owner ``"Xen"`` type
   18 (``XEN_ELFNOTE_PHYS32_ENTRY``) whose descriptor (4 or 8 bytes, little endian) is the
   32-bit physical entry point.
3. **ELF64** -- any other EM_X86_64 ELF64 file, entered at ``e_entry`` in 64-bit long mode.

A 32-bit ELF without either header is an error, as is an ELF of another machine.  Every
``PT_LOAD`` segment is placed at ``p_paddr`` (as QEMU does); ``p_filesz`` bytes are copied and
``p_memsz - p_filesz`` bytes are zero-filled.

Guest-physical memory layout of the loader's own structures
-----------------------------------------------------------
Everything the loader writes lives in ``[BOOT_AREA_START, BOOT_AREA_END)`` = 0x1000-0x10000,
inside the first 64 KiB that Linux reserves anyway and far below the usual 1 MiB kernel base.
A kernel segment that overlaps this area (or lies outside RAM) is a :class:`BootError`.  Page 0
is left untouched.

======== ==================================================================================
0x1000   GDT (``GDT_ADDR``): 0x00 null, 0x08 flat 32-bit code, 0x10 flat data, 0x18 64-bit
         code, 0x20 busy TSS (16-byte system descriptor; 0x28 is its upper half).  Limit 0x2f.
0x1080   TSS (``TSS_ADDR``), 0x68 bytes of zeros.
0x2000   boot information (``BOOT_INFO_ADDR``): ``hvm_start_info`` (PVH and ELF64) or the
         Multiboot information structure (Multiboot).
0x2040   PVH/ELF64: ``hvm_memmap_table_entry`` array (``MEMMAP_ADDR``).
0x2100   Multiboot: mmap entries (``MB_MMAP_ADDR``); 0x2f00 boot loader name "gdbstub".
0x3000   command line, NUL terminated (``CMDLINE_ADDR``, at most ``CMDLINE_MAX`` bytes).
         For Multiboot it is ``"<kernel path> <cmdline>"``, as QEMU passes it.
0x4000   ELF64 only: PML4 (``PML4_ADDR`` = CR3); 0x5000 PDPT for the low 4 GiB; 0x6000 PDPT
         for the top 512 GiB; 0x7000-0xafff four page directories of 2 MiB pages.
0xb000-  boot stack; every protocol starts with RSP = ``BOOT_STACK_TOP`` = 0x10000.
0x10000
======== ==================================================================================

The memory map given to the guest (PVH memmap, Multiboot mmap) is QEMU's shape: RAM
0-0x9fc00, reserved 0x9fc00-0x100000, RAM 0x100000-``mem_size``.

Initial CPU state
-----------------
Common to all protocols: RFLAGS = 0x2 (IF clear), IDTR = base 0 / limit 0 (any exception before
the kernel loads its own IDT becomes a triple fault), GDTR = 0x1000 / 0x2f, data segments
DS/ES/FS/GS/SS = selector 0x10 (flat, AR 0xc093), TR = 0x20 (base 0x1080, limit 0x67, AR 0x8b,
busy TSS), LDTR unusable (AR 0x10000), RSP = 0x10000, all other general registers 0, XCR0 = 1.

* Multiboot: 32-bit protected mode, paging off.  CS = 0x08 (flat 32-bit code, AR 0xc09b),
  CR0 = 0x11 (PE|ET), CR3 = CR4 = EFER = 0, EAX = 0x2BADB002, EBX = 0x2000 (the mbi).
* PVH: as Multiboot but EAX = 0 and EBX = 0x2000 (``hvm_start_info``), RIP = note entry.
* ELF64: 64-bit long mode.  CS = 0x18 (64-bit code, AR 0xa09b), CR0 = 0x80010033
  (PG|WP|NE|ET|MP|PE), CR3 = 0x4000, CR4 = 0x620 (PAE|OSFXSR|OSXMMEXCPT), EFER = 0x500
  (LME|LMA), RDI = 0x2000 (an ``hvm_start_info`` as for PVH: our extension, so the kernel can
  find its command line and memory map), RIP = ``e_entry``.  The page tables identity-map
  0-4 GiB and alias 0-2 GiB at 0xffffffff80000000 (the usual "kernel at -2 GiB" link
  address), all with 2 MiB pages, present + writable; ``e_entry`` must lie in one of the two.

Control-register values are architectural; the VMM adds whatever fixed bits VMX needs.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

BootProtocol = Literal["multiboot", "pvh", "elf64"]

# ---- the loader's boot area (see the module docstring) -----------------------------------------
BOOT_AREA_START = 0x1000
BOOT_AREA_END = 0x10000
GDT_ADDR = 0x1000
TSS_ADDR = 0x1080
TSS_LIMIT = 0x67
BOOT_INFO_ADDR = 0x2000
MEMMAP_ADDR = 0x2040
MB_MMAP_ADDR = 0x2100
MB_LOADER_NAME_ADDR = 0x2F00
CMDLINE_ADDR = 0x3000
CMDLINE_MAX = 0x1000  # including the NUL
PML4_ADDR = 0x4000
PDPT_LOW_ADDR = 0x5000
PDPT_HIGH_ADDR = 0x6000
PD_ADDR = 0x7000  # four page directories, 0x7000-0xafff
PAGE_TABLES_SIZE = 0x7000  # PML4_ADDR .. 0xb000
BOOT_STACK_TOP = 0x10000
HIGH_ALIAS_BASE = 0xFFFFFFFF80000000  # 0-2 GiB mapped again here (ELF64 page tables)

# ---- GDT selectors ------------------------------------------------------------------------------
SEL_CODE32 = 0x08
SEL_DATA = 0x10
SEL_CODE64 = 0x18
SEL_TSS = 0x20
GDT_LIMIT = 0x2F

# ---- VMX access rights: type 3:0, S 4, DPL 6:5, P 7, AVL 12, L 13, D/B 14, G 15, unusable 16 ----
AR_CODE32 = 0xC09B  # execute/read, accessed, S, P, D, G
AR_CODE64 = 0xA09B  # execute/read, accessed, S, P, L, G
AR_DATA = 0xC093  # read/write, accessed, S, P, B, G
AR_TSS_BUSY = 0x008B  # busy TSS (32-bit or 64-bit by mode), P
AR_UNUSABLE = 0x10000

# ---- protocol constants -------------------------------------------------------------------------
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
BOOT_LOADER_NAME = b"gdbstub\0"

HVM_START_MAGIC = 0x336EC578
HVM_START_VERSION = 1
HVM_START_INFO_SIZE = 56
XEN_ELFNOTE_PHYS32_ENTRY = 18

E820_RAM = 1
E820_RESERVED = 2
LOW_RAM_END = 0x9FC00
HIGH_RAM_START = 0x100000

EM_386 = 3
EM_X86_64 = 62

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

_PTE_P_RW = 0x3
_PDE_2M = 0x83  # present, writable, page size
_4G = 1 << 32


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
    """Initial register values of the boot vCPU (see the module docstring for each protocol)."""

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
    loads: list[tuple[int, bytes]]  # (gpa, bytes) from the kernel image
    zero_fill: list[tuple[int, int]]  # (gpa, length) bss
    extras: list[Blob]  # loader structures: gdt, tss, start_info/mbi, memmap, cmdline, ...
    cpu: CpuState

    def apply(self, write: Callable[[int, bytes], None], chunk: int = 1 << 20) -> None:
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


# ================================================================================================
# public entry points


def load_kernel(path: str | Path, *, mem_size: int, cmdline: str = "") -> BootPlan:
    """Read the kernel image at ``path`` and plan its boot into ``mem_size`` bytes of RAM."""
    p = Path(path)
    if mem_size < 2 * HIGH_RAM_START or mem_size % 4096:
        raise BootError(f"memory size {mem_size:#x} must be a multiple of 4 KiB and >= 2 MiB")
    data = _read_file(p)
    mb = _find_multiboot(data)
    elf = _parse_elf(p, data)
    if mb is not None:
        loads, zero, entry = _multiboot_image(p, data, mb, elf)
        protocol: BootProtocol = "multiboot"
    elif elf is not None and (pvh := _pvh_entry(elf)) is not None:
        loads, zero = _elf_segments(elf)
        entry, protocol = pvh, "pvh"
    elif elf is not None:
        if elf.elfclass != 64:
            raise BootError(f"{p}: 32-bit ELF without a Multiboot header or PVH note")
        if elf.header["e_machine"] != "EM_X86_64":
            raise BootError(f"{p}: ELF64 file for {elf.header['e_machine']}, not EM_X86_64")
        loads, zero = _elf_segments(elf)
        entry, protocol = elf.header["e_entry"], "elf64"
        if not (entry < _4G or entry >= HIGH_ALIAS_BASE):
            raise BootError(
                f"{p}: ELF64 entry point {entry:#x} is outside the boot page tables "
                f"(0-4 GiB and {HIGH_ALIAS_BASE:#x}+)"
            )
    else:  # pragma: no cover - _parse_elf raises for non-ELF files without Multiboot
        raise BootError(f"{p}: not an ELF file and no Multiboot header")
    _check_placement(p, loads, zero, mem_size)
    # Multiboot: like QEMU (and GRUB), the kernel's file name is the first word
    text = f"{path} {cmdline}" if protocol == "multiboot" else cmdline
    raw = text.encode("utf-8") + b"\0"
    if len(raw) > CMDLINE_MAX:
        raise BootError(
            f"command line is too long ({len(raw) - 1} bytes, at most {CMDLINE_MAX - 1})"
        )
    if protocol == "multiboot":
        extras, cpu = _multiboot_state(entry, mem_size, raw)
    elif protocol == "pvh":
        extras, cpu = _pvh_state(entry, mem_size, raw)
    else:
        extras, cpu = _elf64_state(entry, mem_size, raw)
    return BootPlan(p, protocol, entry, mem_size, cmdline, loads, zero, extras, cpu)


def symbols(path: str | Path) -> dict[str, int]:
    """Symbol name -> value from the ELF ``.symtab`` (global symbols win over local ones).

    Section, file and undefined symbols are left out.  A file without a symbol table gives {}.
    """
    p = Path(path)
    data = _read_file(p)
    elf = _parse_elf(p, data, require=True)
    assert elf is not None
    out: dict[str, int] = {}
    globals_: set[str] = set()
    try:
        for section in elf.iter_sections():
            if not isinstance(section, SymbolTableSection) or section.name != ".symtab":
                continue
            for sym in section.iter_symbols():
                name = sym.name
                kind = sym["st_info"]["type"]
                if (
                    not name
                    or kind in ("STT_SECTION", "STT_FILE")
                    or sym["st_shndx"] == "SHN_UNDEF"
                ):
                    continue
                is_global = sym["st_info"]["bind"] != "STB_LOCAL"
                if name in out and (name in globals_ or not is_global):
                    continue
                out[name] = sym["st_value"]
                if is_global:
                    globals_.add(name)
    except (ELFError, ValueError, struct.error) as exc:
        raise BootError(f"{p}: bad symbol table: {exc}") from None
    return out


def build_page_tables(base: int = PML4_ADDR) -> bytes:
    """The ELF64 boot page tables as one 0x7000-byte block to be placed at ``base``.

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


def memory_map(mem_size: int) -> list[tuple[int, int, int]]:
    """The guest's memory map as (address, size, type) with E820 types (1 RAM, 2 reserved)."""
    return [
        (0, LOW_RAM_END, E820_RAM),
        (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED),
        (HIGH_RAM_START, mem_size - HIGH_RAM_START, E820_RAM),
    ]


# ================================================================================================
# file parsing


def _read_file(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except FileNotFoundError:
        raise BootError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise BootError(f"{p}: is a directory") from None
    except OSError as exc:
        raise BootError(f"{p}: cannot read: {exc.strerror or exc}") from None


def _parse_elf(p: Path, data: bytes, *, require: bool = False) -> ELFFile | None:
    """An ELFFile over ``data``, None for a non-ELF file (BootError if ``require``)."""
    import io

    if data[:4] != b"\x7fELF":
        if require:
            raise BootError(f"{p}: not an ELF file")
        return None
    try:
        elf = ELFFile(io.BytesIO(data))
        machine = elf.header["e_machine"]
        elf.num_segments()
    except (ELFError, ValueError, struct.error) as exc:
        raise BootError(f"{p}: malformed ELF file: {exc}") from None
    if not require and machine not in ("EM_386", "EM_X86_64"):
        raise BootError(f"{p}: ELF machine {machine} is not x86 (need EM_X86_64 or EM_386)")
    return elf


@dataclass(frozen=True)
class _MbHeader:
    offset: int
    flags: int
    header_addr: int
    load_addr: int
    load_end_addr: int
    bss_end_addr: int
    entry_addr: int


def _find_multiboot(data: bytes) -> _MbHeader | None:
    limit = min(len(data), MULTIBOOT_SEARCH) - 12
    for off in range(0, limit + 1, 4):
        magic, flags, checksum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            fields = [0] * 5
            if len(data) >= off + 32:
                fields = list(struct.unpack_from("<5I", data, off + 12))
            return _MbHeader(off, flags, *fields)
    return None


def _multiboot_image(
    p: Path, data: bytes, mb: _MbHeader, elf: ELFFile | None
) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]], int]:
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
        loads, zero = _elf_segments(elf)
        entry = elf.header["e_entry"]
        if entry >= _4G:
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
    bss: list[tuple[int, int]] = []
    if mb.bss_end_addr:
        if mb.bss_end_addr < mb.load_addr + size:
            raise BootError(
                f"{p}: Multiboot bss_end_addr {mb.bss_end_addr:#x} is below the "
                f"end of the loaded image"
            )
        if mb.bss_end_addr > mb.load_addr + size:
            bss.append((mb.load_addr + size, mb.bss_end_addr - mb.load_addr - size))
    return loads, bss, mb.entry_addr


def _iter_notes(elf: ELFFile) -> Iterator[tuple[bytes, int, bytes]]:
    """(owner, type, descriptor) of every note in PT_NOTE segments (SHT_NOTE sections if none)."""
    blobs: list[bytes] = []
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_NOTE":
            blobs.append(seg.data())
    if not blobs:
        for sec in elf.iter_sections():
            if sec["sh_type"] == "SHT_NOTE":
                blobs.append(sec.data())
    for blob in blobs:
        off = 0
        while off + 12 <= len(blob):
            namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
            off += 12
            name = blob[off : off + namesz].rstrip(b"\0")
            off += (namesz + 3) & ~3
            desc = blob[off : off + descsz]
            off += (descsz + 3) & ~3
            yield name, ntype, desc


def _pvh_entry(elf: ELFFile) -> int | None:
    try:
        for owner, ntype, desc in _iter_notes(elf):
            if owner == b"Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY and len(desc) >= 4:
                value = int.from_bytes(desc[:8] if len(desc) >= 8 else desc[:4], "little")
                if value >= _4G:
                    raise BootError(f"PVH entry point {value:#x} is above 4 GiB")
                return value
    except (ELFError, ValueError, struct.error) as exc:
        raise BootError(f"malformed ELF notes: {exc}") from None
    return None


def _elf_segments(elf: ELFFile) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]]]:
    loads: list[tuple[int, bytes]] = []
    zero: list[tuple[int, int]] = []
    try:
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                continue
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz:
                raise BootError(f"PT_LOAD at {paddr:#x} has p_filesz > p_memsz")
            if filesz:
                body = seg.data()
                if len(body) != filesz:
                    raise BootError(f"PT_LOAD at {paddr:#x} extends past the end of the file")
                loads.append((paddr, body))
            if memsz > filesz:
                zero.append((paddr + filesz, memsz - filesz))
    except (ELFError, ValueError, struct.error) as exc:
        raise BootError(f"malformed ELF program headers: {exc}") from None
    if not loads and not zero:
        raise BootError("ELF file has no loadable segments")
    return loads, zero


def _check_placement(
    p: Path, loads: list[tuple[int, bytes]], zero: list[tuple[int, int]], mem_size: int
) -> None:
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


# ================================================================================================
# boot structures and CPU state


def _gdt() -> Blob:
    entries = [
        0,
        0x00CF9B000000FFFF,  # 0x08 flat 32-bit code
        0x00CF93000000FFFF,  # 0x10 flat data
        0x00AF9B000000FFFF,  # 0x18 64-bit code
    ]
    # 0x20: busy TSS descriptor (type 0xb, P), base TSS_ADDR, limit 0x67; 0x28: upper half
    tss_lo = TSS_LIMIT | (TSS_ADDR & 0xFFFFFF) << 16 | 0x8B << 40 | ((TSS_ADDR >> 24) & 0xFF) << 56
    entries += [tss_lo, TSS_ADDR >> 32]
    table = struct.pack(f"<{len(entries)}Q", *entries)
    padded = table + bytes(TSS_ADDR - GDT_ADDR - len(table)) + bytes(TSS_LIMIT + 1)
    return Blob("gdt", GDT_ADDR, padded)


def _start_info(mem_size: int, raw_cmdline: bytes) -> list[Blob]:
    mmap = memory_map(mem_size)
    info = struct.pack(
        "<IIIIQQQQII",
        HVM_START_MAGIC,
        HVM_START_VERSION,
        0,  # flags
        0,  # nr_modules
        0,  # modlist_paddr
        CMDLINE_ADDR,
        0,  # rsdp_paddr
        MEMMAP_ADDR,
        len(mmap),
        0,
    )
    table = b"".join(struct.pack("<QQII", a, s, t, 0) for a, s, t in mmap)
    return [
        Blob("start_info", BOOT_INFO_ADDR, info),
        Blob("memmap", MEMMAP_ADDR, table),
        Blob("cmdline", CMDLINE_ADDR, raw_cmdline),
    ]


def _protected_cpu(entry: int, rax: int, rbx: int) -> CpuState:
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


def _pvh_state(entry: int, mem_size: int, raw_cmdline: bytes) -> tuple[list[Blob], CpuState]:
    extras = [_gdt(), *_start_info(mem_size, raw_cmdline)]
    return extras, _protected_cpu(entry, 0, BOOT_INFO_ADDR)


def _multiboot_state(entry: int, mem_size: int, raw_cmdline: bytes) -> tuple[list[Blob], CpuState]:
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
    struct.pack_into("<II", mbi, 20, 0, 0)  # mods_count, mods_addr
    struct.pack_into("<II", mbi, 44, len(mmap), MB_MMAP_ADDR)
    struct.pack_into("<I", mbi, 64, MB_LOADER_NAME_ADDR)
    extras = [
        _gdt(),
        Blob("mbi", BOOT_INFO_ADDR, bytes(mbi)),
        Blob("mmap", MB_MMAP_ADDR, mmap),
        Blob("loader_name", MB_LOADER_NAME_ADDR, BOOT_LOADER_NAME),
        Blob("cmdline", CMDLINE_ADDR, raw_cmdline),
    ]
    return extras, _protected_cpu(entry, MULTIBOOT_BOOTLOADER_MAGIC, BOOT_INFO_ADDR)


def _elf64_state(entry: int, mem_size: int, raw_cmdline: bytes) -> tuple[list[Blob], CpuState]:
    extras = [
        _gdt(),
        *_start_info(mem_size, raw_cmdline),
        Blob("page_tables", PML4_ADDR, build_page_tables(PML4_ADDR)),
    ]
    cpu = CpuState(
        rip=entry,
        cr0=LONG_MODE_CR0,
        cr3=PML4_ADDR,
        cr4=LONG_MODE_CR4,
        efer=LONG_MODE_EFER,
        cs=SegmentReg(SEL_CODE64, 0, 0xFFFFFFFF, AR_CODE64),
        rdi=BOOT_INFO_ADDR,
    )
    return extras, cpu
