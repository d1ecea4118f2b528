"""Issue 14, ``monitor dump-guest-memory FILE``: an ELF core of guest RAM that gdb reads, written
only into the folder the command line allowed (``--dump-dir``), never anywhere else.

The writer on its own (the ELF layout, QEMU's notes, streaming, sparse zeros, gdb reading a
core), the folder rule (``..``, absolute paths, symbolic links, FIFOs, hard links), and the
command through real gdb on ``gdbstub run`` on kvm and emu: the core's registers and RAM are
what the live gdb saw.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from gdbdrive import ROOT, session
from guestbuild import build

from gdbstub import coredump, hv
from gdbstub.coredump import CpuState, DumpPathError, Segment

BACKENDS = [b for b in hv.available_backends() if b in ("kvm", "emu")]
KVMA = 0xFFFFFFFF80000000
HIGH = 0x1_0000_0000

needs_gdb = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


class Ram:
    """Two RAM regions (low at 0, one above 4 GiB) that count how they are read."""

    def __init__(self) -> None:
        self.low = bytearray(3 << 20)
        self.high = bytearray(1 << 20)
        self.low[0x1000:0x1004] = b"\xde\xad\xbe\xef"
        self.low[0x2FFFFE:0x300002] = b"ABCD"  # across a chunk boundary
        self.high[:4] = b"HIGH"
        self.reads: list[int] = []

    def regions(self) -> list[tuple[int, int]]:
        return [(0, len(self.low)), (HIGH, len(self.high))]

    def read(self, gpa: int, length: int) -> bytes:
        self.reads.append(length)
        if gpa >= HIGH:
            return bytes(self.high[gpa - HIGH : gpa - HIGH + length])
        return bytes(self.low[gpa : gpa + length])


REGS = {"rip": 0x101234, "rsp": 0x8FF0, "rax": 0x1111, "r15": 0xF15, "cs": 0x8, "ss": 0x10,
        "eflags": 0x202, "fs_base": 0x5555, "gs_base": 0x6666, "cr0": 0x80000011,
        "cr3": 0x85000, "cr4": 0x20, "k_gs_base": 0x7777}  # fmt: skip


def core(tmp: Path, ram: Ram, cpus: list[CpuState] | None = None) -> Path:
    path = tmp / "guest.core"
    with open(path, "wb") as out:
        size = coredump.write_core(out, ram.regions(), ram.read, cpus or [CpuState(REGS)])
    assert path.stat().st_size == size
    return path


def parse(
    path: Path,
) -> tuple[tuple[int, ...], list[tuple[int, ...]], list[tuple[bytes, int, bytes]]]:
    """The ELF header, the program headers and the notes of a core."""
    data = path.read_bytes()
    ehdr = coredump.EHDR.unpack_from(data)
    phdrs = [coredump.PHDR.unpack_from(data, ehdr[5] + i * ehdr[9]) for i in range(ehdr[10])]
    notes = []
    _, _, offset, _, _, filesz, _, _ = phdrs[0]
    at = offset
    while at < offset + filesz:
        namesz, descsz, kind = struct.unpack_from("<III", data, at)
        at += 12
        name = data[at : at + namesz].rstrip(b"\0")
        at += -(-namesz // 4) * 4
        notes.append((name, kind, data[at : at + descsz]))
        at += -(-descsz // 4) * 4
    return ehdr, phdrs, notes


# --- the writer ----------------------------------------------------------------------------------


def test_the_core_is_qemus_layout(tmp_path: Path) -> None:
    ram = Ram()
    second = CpuState(dict(REGS, rip=0x5678), {"cs": Segment.from_vmx(0x8, 0xFFFFF, 0xA09B, 0)})
    path = core(tmp_path, ram, [CpuState(REGS), second])
    ehdr, phdrs, notes = parse(path)
    assert ehdr[0][:7] == b"\x7fELF\x02\x01\x01"  # ELF64, little-endian
    assert ehdr[1:3] == (coredump.ET_CORE, coredump.EM_X86_64)
    kinds = [p[0] for p in phdrs]
    assert kinds == [coredump.PT_NOTE, coredump.PT_LOAD, coredump.PT_LOAD]
    data = path.read_bytes()
    for (_, _, offset, vaddr, paddr, filesz, memsz, _), (gpa, size) in zip(
        phdrs[1:], ram.regions(), strict=True
    ):
        assert (vaddr, paddr, filesz, memsz) == (0, gpa, size, size)  # QEMU without -p
        assert offset % 4096 == 0
        source = ram.low if gpa == 0 else ram.high
        assert data[offset : offset + size] == bytes(source)
    assert [(n, k) for n, k, _ in notes] == [(b"CORE", 1), (b"CORE", 1), (b"QEMU", 0), (b"QEMU", 0)]
    status = notes[1][2]
    assert len(status) == 336 and struct.unpack_from("<I", status, 32) == (2,)  # pr_pid
    regs = struct.unpack_from("<27Q", status, 112)
    assert regs[0] == 0xF15 and regs[10] == 0x1111 and regs[16] == 0x5678  # r15, rax, rip
    assert regs[17] == 0x8 and regs[19] == 0x8FF0 and regs[21] == 0x5555  # cs, rsp, fs_base
    qemu = notes[3][2]
    assert struct.unpack_from("<II", qemu) == (1, len(qemu)) and len(qemu) == 440
    assert struct.unpack_from("<QQ", qemu, 8 + 16 * 8) == (0x5678, 0x202)  # rip, rflags
    selector, limit, flags, _, base = struct.unpack_from("<IIIIQ", qemu, 8 + 18 * 8)
    assert (selector, limit, flags, base) == (0x8, 0xFFFFF, 0xA09B00, 0)  # cs: P, L, G
    assert struct.unpack_from("<Q", qemu, 432) == (0x7777,)  # kernel_gs_base


def test_ram_is_streamed_and_zeros_are_holes(tmp_path: Path) -> None:
    ram = Ram()
    ram.low = bytearray(64 << 20)  # 64 MiB of zeros but one page
    ram.low[0x1000:0x1004] = b"\xde\xad\xbe\xef"
    path = core(tmp_path, ram)
    assert max(ram.reads) == coredump.CHUNK  # never the whole region at once
    assert path.stat().st_size > 65 << 20
    assert path.stat().st_blocks * 512 < 8 << 20  # the zeros take no room on disk


def test_a_short_read_is_zeros(tmp_path: Path) -> None:
    out = io.BytesIO()
    size = coredump.write_core(out, [(0, 8192)], lambda gpa, n: b"\x11" * min(n, 100), [])
    assert size == len(out.getvalue()) == 4096 + 8192
    assert out.getvalue()[4096:] == b"\x11" * 100 + bytes(8092)


@needs_gdb
def test_gdb_reads_the_core(tmp_path: Path) -> None:
    path = core(tmp_path, Ram(), [CpuState(REGS), CpuState(dict(REGS, rip=0x5678))])
    out = subprocess.run(
        ["gdb", "-nx", "-batch", "-ex", f"target core {path}", "-ex", "info registers rip rax",
         "-ex", "x/4bx 0x1000", "-ex", "x/4c 0x2ffffe", "-ex", "info threads"],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    assert re.search(r"rip\s+0x101234", out) and re.search(r"rax\s+0x1111", out), out
    assert "0x1000:\t0xde\t0xad\t0xbe\t0xef" in out, out
    assert "65 'A'\t66 'B'\t67 'C'\t68 'D'" in out, out
    assert "LWP 2" in out and "0x0000000000005678" in out, out


# --- the folder rule ---------------------------------------------------------------------------


def test_names_inside_the_folder_are_written(tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    (folder / "sub").mkdir(parents=True)
    names = [("a.core", "a.core"), ("sub/b.core", "sub/b.core"),
             (str(folder / "c.core"), "c.core"), ("sub/../d.core", "d.core")]  # fmt: skip
    for name, where in names:
        out, path = coredump.open_in(folder, name)
        with out:
            out.write(b"x")
        assert path == folder / where and path.read_bytes() == b"x"
        assert (path.stat().st_mode & 0o777) == 0o600
    (folder / "a.core").write_bytes(b"old contents")
    out, _ = coredump.open_in(folder, "a.core")  # overwritten, as QEMU does
    out.close()
    assert (folder / "a.core").read_bytes() == b""


@pytest.mark.parametrize(
    "case",
    [
        "dotdot",
        "absolute",
        "folder-itself",
        "symlink-file",
        "symlink-folder",
        "fifo",
        "hard-link",
        "missing-folder",
    ],
)
def test_names_that_escape_the_folder_are_refused(case: str, tmp_path: Path) -> None:
    folder = tmp_path / "dumps"
    folder.mkdir()
    outside = tmp_path / "precious"
    outside.write_bytes(b"keep me")
    name = {
        "dotdot": "../precious",
        "absolute": str(outside),
        "folder-itself": str(folder),
        "symlink-file": "link",
        "symlink-folder": "linkdir/precious",
        "fifo": "pipe",
        "hard-link": "hard",
        "missing-folder": "nosuch/x.core",
    }[case]
    (folder / "link").symlink_to(outside)
    (folder / "linkdir").symlink_to(tmp_path)
    os.mkfifo(folder / "pipe")
    os.link(outside, folder / "hard")
    with pytest.raises(DumpPathError) as info:
        coredump.open_in(folder, name)
    assert str(info.value)
    assert outside.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dumps", "precious"]


def test_dump_dir_must_be_a_folder(tmp_path: Path) -> None:
    kernel = build("pvh_kernel")
    result = subprocess.run(
        [sys.executable, "-m", "gdbstub", "run", str(kernel), "--dump-dir", str(tmp_path / "no")],
        capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"gdbstub: --dump-dir {tmp_path / 'no'}: not a folder (create it first)"
    ]


# --- through gdb, on gdbstub run -----------------------------------------------------------------


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@needs_gdb
def test_dump_guest_memory_through_gdb(backend: str, tmp_path: Path) -> None:
    kernel = build("pvh_kernel")
    folder = tmp_path / "dumps"
    folder.mkdir()
    with session(kernel, backend, tmp_path, "--dump-dir", str(folder), "--memory", "64M") as (
        _stub,
        gdb,
    ):
        gdb.cmd("break add_numbers")
        assert "add_numbers" in gdb.cmd("continue")
        rip, rdi, rsp = gdb.value("$rip"), gdb.value("$rdi"), gdb.value("$rsp")
        code = gdb.cmd("x/8bx add_numbers").split(":", 1)[1].split()
        out = gdb.cmd("monitor dump-guest-memory guest.core")
        assert "guest.core" in out and "64 MiB" in out, out
        refused = gdb.cmd("monitor dump-guest-memory ../escape.core")
        assert "not inside the dump folder" in refused, refused
        assert "usage" in gdb.cmd("monitor dump-guest-memory -p x.core")
        assert gdb.value("$rip") == rip  # the guest is where it was
    assert sorted(p.name for p in folder.iterdir()) == ["guest.core"]
    assert not (tmp_path / "escape.core").exists()
    physical = gdb_value_of_symbol(kernel, "add_numbers") - KVMA
    result = subprocess.run(
        ["gdb", "-nx", "-batch", "-ex", f"target core {folder / 'guest.core'}",
         "-ex", "info registers rip rdi rsp cr3", "-ex", f"x/8bx {physical:#x}"],
        capture_output=True, text=True, timeout=60, check=False,
    ).stdout  # fmt: skip
    assert re.search(rf"rip\s+{rip:#x}", result), result
    assert re.search(rf"rdi\s+{rdi:#x}", result) and re.search(rf"rsp\s+{rsp:#x}", result)
    assert result.split(f"{physical:#x}:", 1)[1].split()[:8] == code, result


def gdb_value_of_symbol(elf: Path, name: str) -> int:
    from gdbstub.machine.loader import symbols

    return symbols(elf)[name]


@needs_gdb
def test_without_dump_dir_nothing_is_written(tmp_path: Path) -> None:
    kernel = build("pvh_kernel")
    with session(kernel, BACKENDS[0], tmp_path) as (_stub, gdb):
        before = sorted(ROOT.iterdir())
        out = gdb.cmd(f"monitor dump-guest-memory {tmp_path / 'x.core'}")
        lines = [line for line in out.splitlines() if line.strip()]
        assert lines == [
            "dump-guest-memory writes only into a folder you allow: "
            "start gdbstub run with --dump-dir DIR"
        ], out
        assert "dump-guest-memory FILE" in gdb.cmd("monitor help")
    assert not (tmp_path / "x.core").exists() and sorted(ROOT.iterdir()) == before
