"""ELF core files of guest RAM, as QEMU's ``dump-guest-memory`` writes them, and the one place
on the host they may be written.

Theory of operation
-------------------
The file is what QEMU writes without paging information (``dump-guest-memory FILE``, no
``-p``), so tools that read QEMU's dumps read ours:

* an ELF64 header: ``ET_CORE``, ``EM_X86_64``, little-endian;
* program headers: one ``PT_NOTE`` first, then one ``PT_LOAD`` per guest RAM region, with
  ``p_paddr`` the region's guest-physical address, ``p_vaddr`` 0 (QEMU's value when it does
  not walk the page tables: gdb then reads the RAM that starts at guest-physical 0 by its
  physical addresses, ``x/4bx 0x100000``), ``p_filesz == p_memsz`` the region's size;
* the notes: an ``NT_PRSTATUS`` ("CORE") per vCPU holding the general registers in Linux's
  x86-64 ``elf_prstatus`` layout (``pr_pid`` is the vCPU's number + 1, as QEMU's), which gdb
  shows as that thread's registers, then a "QEMU" note per vCPU (type 0, QEMU's
  ``QEMUCPUState`` version 1: registers, segment caches, descriptor tables, control
  registers, ``kernel_gs_base``), which the ``crash`` utility reads;
* RAM, each region at a page-aligned offset.

RAM is streamed: ``write_core`` reads ``CHUNK`` bytes at a time through the ``read`` callback
(guest-physical), so a large guest never sits in the stub's memory twice; chunks of zeros are
skipped with a seek, so a mostly empty guest makes a sparse file.

``open_in(directory, name)`` is the only way a dump reaches the host's file system: ``name``
(relative to ``directory``, or absolute) must lie inside ``directory`` (the folder the user
allowed with ``--dump-dir``): ``..`` that climbs out, an absolute path elsewhere, a symbolic
link anywhere on the way (each folder is opened with ``O_NOFOLLOW`` from the one before, so
nothing can be swapped in between), an existing file that is not a regular file or that has
other hard links, all are refused with ``DumpPathError``. Files are created with mode 0600.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "CHUNK",
    "CpuState",
    "DumpPathError",
    "Segment",
    "note",
    "open_in",
    "prstatus",
    "qemu_cpu_state",
    "write_core",
]

CHUNK = 1 << 20  # RAM is read and written this much at a time
PAGE = 4096

ET_CORE, EM_X86_64, EV_CURRENT = 4, 62, 1
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
NT_PRSTATUS = 1
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")

# Linux's struct user_regs_struct (x86-64), the pr_reg of elf_prstatus
_USER_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
              "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss", "fs_base",
              "gs_base", "ds", "es", "fs", "gs")  # fmt: skip
_PRSTATUS_PID = 32  # offset of pr_pid in elf_prstatus
_PRSTATUS_REGS = 112  # offset of pr_reg
PRSTATUS_SIZE = 336

QEMU_NOTE_VERSION = 1
_QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
              "r12", "r13", "r14", "r15", "rip", "eflags")  # fmt: skip
_QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")
_SEGMENT = struct.Struct("<IIIIQ")
QEMU_CPU_STATE_SIZE = 8 + 8 * len(_QEMU_GPRS) + _SEGMENT.size * len(_QEMU_SEGMENTS) + 5 * 8 + 8


class DumpPathError(Exception):
    """The file named for a dump is not one the user allowed; the message says why."""


@dataclass(frozen=True)
class Segment:
    """A segment register's hidden part (or a descriptor table: ``limit`` and ``base``);
    ``flags`` are the attribute bits where a descriptor's high word has them (QEMU's)."""

    selector: int = 0
    limit: int = 0
    flags: int = 0
    base: int = 0

    @staticmethod
    def from_vmx(selector: int, limit: int, access_rights: int, base: int) -> Segment:
        """From VMCS fields: access rights (type..G, bit 16 unusable) become QEMU's flags."""
        flags = 0 if access_rights & (1 << 16) else (access_rights & 0xF0FF) << 8
        return Segment(selector, limit, flags, base)


@dataclass
class CpuState:
    """One vCPU as the dump records it: gdb's register names, and the segment caches."""

    registers: dict[str, int]
    segments: dict[str, Segment] = field(default_factory=dict)


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def note(name: bytes, kind: int, desc: bytes) -> bytes:
    """One ELF note: the header, ``name`` with its NUL, ``desc``, each padded to 4 bytes."""
    owner = name + b"\0"
    return struct.pack("<III", len(owner), len(desc), kind) + _pad4(owner) + _pad4(desc)


def prstatus(index: int, registers: dict[str, int]) -> bytes:
    """Linux's x86-64 ``elf_prstatus`` for vCPU ``index`` (``pr_pid`` = index + 1)."""
    out = bytearray(PRSTATUS_SIZE)
    struct.pack_into("<I", out, _PRSTATUS_PID, index + 1)
    values = [registers.get(name, 0) & 0xFFFF_FFFF_FFFF_FFFF for name in _USER_REGS]
    struct.pack_into(f"<{len(values)}Q", out, _PRSTATUS_REGS, *values)
    return bytes(out)


def qemu_cpu_state(cpu: CpuState) -> bytes:
    """QEMU's ``QEMUCPUState`` (version 1, with ``kernel_gs_base``) for one vCPU."""
    r = cpu.registers
    out = struct.pack("<II", QEMU_NOTE_VERSION, QEMU_CPU_STATE_SIZE)
    out += struct.pack(f"<{len(_QEMU_GPRS)}Q", *(r.get(n, 0) for n in _QEMU_GPRS))
    for name in _QEMU_SEGMENTS:
        seg = cpu.segments.get(name, Segment(selector=r.get(name, 0)))
        out += _SEGMENT.pack(seg.selector, seg.limit, seg.flags, 0, seg.base)
    out += struct.pack("<5Q", r.get("cr0", 0), 0, r.get("cr2", 0), r.get("cr3", 0), r.get("cr4", 0))
    out += struct.pack("<Q", r.get("k_gs_base", 0))
    return out


def _notes(cpus: list[CpuState]) -> bytes:
    status = [note(b"CORE", NT_PRSTATUS, prstatus(i, c.registers)) for i, c in enumerate(cpus)]
    qemu = [note(b"QEMU", 0, qemu_cpu_state(c)) for c in cpus]
    return b"".join(status + qemu)


def write_core(
    out: BinaryIO,
    regions: Iterable[tuple[int, int]],
    read: Callable[[int, int], bytes],
    cpus: list[CpuState],
) -> int:
    """Write the core (module docstring) of RAM ``regions`` (``(gpa, size)``, read through
    ``read(gpa, length)``) and ``cpus`` to ``out``, a seekable file at offset 0; returns its
    size."""
    ram = [(gpa, size) for gpa, size in regions if size > 0]
    notes = _notes(cpus)
    phnum = 1 + len(ram)
    note_offset = EHDR.size + phnum * PHDR.size
    offset = -(-(note_offset + len(notes)) // PAGE) * PAGE
    ident = b"\x7fELF" + bytes([2, 1, EV_CURRENT]) + bytes(9)  # ELFCLASS64, little-endian
    head = bytearray(EHDR.pack(ident, ET_CORE, EM_X86_64, EV_CURRENT, 0, EHDR.size, 0, 0,
                               EHDR.size, PHDR.size, phnum, 0, 0, 0))  # fmt: skip
    head += PHDR.pack(PT_NOTE, 0, note_offset, 0, 0, len(notes), len(notes), 0)
    placed = []
    for gpa, size in ram:
        head += PHDR.pack(PT_LOAD, PF_R | PF_W | PF_X, offset, 0, gpa, size, size, 0)
        placed.append((gpa, size, offset))
        offset += -(-size // PAGE) * PAGE
    out.write(bytes(head) + notes)
    zeros = bytes(CHUNK)
    end = note_offset + len(notes)
    for gpa, size, at in placed:
        for start in range(0, size, CHUNK):
            data = read(gpa + start, min(CHUNK, size - start))
            data += bytes(min(CHUNK, size - start) - len(data))  # a short read: zeros
            if data != zeros[: len(data)]:
                out.seek(at + start)
                out.write(data)
            end = at + start + len(data)
    out.truncate(end)
    return end


def _inside(path: str, base: str) -> str | None:
    """``path`` relative to ``base`` when it lies inside it (lexically), else None."""
    rel = os.path.relpath(path, base)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return None
    return rel


def open_in(directory: Path, name: str) -> tuple[BinaryIO, Path]:
    """Open ``name`` for a dump inside ``directory`` (module docstring); returns the file
    (truncated, mode 0600 when created) and its path. Raises ``DumpPathError``."""
    if not name or "\0" in name:
        raise DumpPathError("a dump needs a file name")
    bases = [os.path.abspath(directory), os.path.realpath(directory)]
    candidate = os.path.normpath(name if os.path.isabs(name) else os.path.join(bases[1], name))
    rel = next((r for r in (_inside(candidate, b) for b in bases) if r is not None), None)
    if rel is None:
        raise DumpPathError(f"{name} is not inside the dump folder {directory}")
    *folders, leaf = rel.split(os.sep)
    fd = os.open(bases[1], os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for folder in folders:
            try:
                inner = os.open(
                    folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError as exc:
                raise DumpPathError(
                    f"{name}: {folder} is not a folder inside {directory} ({exc.strerror})"
                ) from exc
            os.close(fd)
            fd = inner
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            file_fd = os.open(leaf, flags, 0o600, dir_fd=fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise DumpPathError(f"{name} is a symbolic link; not followed") from exc
            raise DumpPathError(f"cannot write {name}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    info = os.fstat(file_fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(file_fd)
        what = "has other hard links" if stat.S_ISREG(info.st_mode) else "is not a regular file"
        raise DumpPathError(f"{name} {what}; not overwritten")
    os.set_blocking(file_fd, True)
    os.ftruncate(file_fd, 0)
    return os.fdopen(file_fd, "wb"), Path(bases[1], rel)
