"""Reading ELF kernel images: loadable segments, notes and symbols (pyelftools underneath).

Theory of operation
===================

Every ``PT_LOAD`` segment is placed at ``p_paddr`` (as QEMU does); ``p_filesz`` bytes are
copied and ``p_memsz - p_filesz`` bytes are zero-filled (:func:`elf_segments`).  Notes are read
from ``PT_NOTE`` segments, or from ``SHT_NOTE`` sections when there are none
(:func:`iter_notes`).  Every pyelftools failure becomes a one-line :class:`BootError`.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from .common import BootError, Loads, ZeroFill, read_file

EM_386 = 3
EM_X86_64 = 62
ELF_MAGIC = b"\x7fELF"


def parse_elf(p: Path, data: bytes, *, require: bool = False) -> ELFFile | None:
    """An ELFFile over ``data``; None for a non-ELF file (a BootError if ``require``).

    Without ``require`` an ELF file for another machine than x86 is a BootError.
    """
    if data[:4] != ELF_MAGIC:
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


def iter_notes(elf: ELFFile) -> Iterator[tuple[bytes, int, bytes]]:
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


def elf_segments(elf: ELFFile) -> tuple[Loads, ZeroFill]:
    """The file's PT_LOAD contents at their physical addresses, and the bss to zero."""
    loads: Loads = []
    zero: ZeroFill = []
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


def symbols(path: str | Path) -> dict[str, int]:
    """Symbol name -> value from the ELF ``.symtab`` (global symbols win over local ones).

    Section, file and undefined symbols are left out.  A file without a symbol table gives {}.
    """
    p = Path(path)
    data = read_file(p)
    elf = parse_elf(p, data, require=True)
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
