"""Tests for gdbstub.machine.loader: BootPlans of our test guests and the bench guests."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
from guestbuild import build

from gdbstub.machine import loader
from gdbstub.machine.loader import BootError, BootPlan, load_kernel, symbols

MEM = 64 << 20
BENCH = Path("/work/shared/bench/guest")


def memory_of(plan: BootPlan) -> dict[int, int]:
    """A sparse byte map of everything the plan writes (for small checks)."""
    mem: dict[int, int] = {}

    def write(gpa: int, data: bytes) -> None:
        for i, b in enumerate(data):
            mem[gpa + i] = b

    plan.apply(write)
    return mem


def read(mem: dict[int, int], gpa: int, n: int) -> bytes:
    return bytes(mem.get(gpa + i, 0) for i in range(n))


def q(mem: dict[int, int], gpa: int) -> int:
    value: int = struct.unpack("<Q", read(mem, gpa, 8))[0]
    return value


def cstr(mem: dict[int, int], gpa: int) -> str:
    out = bytearray()
    while mem.get(gpa, 0):
        out.append(mem[gpa])
        gpa += 1
    return out.decode()


def walk(mem: dict[int, int], cr3: int, va: int) -> int | None:
    """Translate ``va`` through 4-level page tables (4 KiB, 2 MiB and 1 GiB pages)."""
    table = cr3 & ~0xFFF
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = q(mem, table + ((va >> shift) & 0x1FF) * 8)
        if not entry & 1:
            return None
        if level in (1, 2) and entry & 0x80:
            mask = (1 << shift) - 1
            return (entry & 0x000FFFFFFFFFF000 & ~mask) | (va & mask)
        table = entry & 0x000FFFFFFFFFF000
    return table | (va & 0xFFF)


def check_protected_common(plan: BootPlan) -> None:
    cpu = plan.cpu
    assert cpu.cr0 == 0x11 and cpu.cr3 == 0 and cpu.cr4 == 0 and cpu.efer == 0
    assert cpu.cs == loader.SegmentReg(0x08, 0, 0xFFFFFFFF, 0xC09B)
    for seg in (cpu.ds, cpu.es, cpu.fs, cpu.gs, cpu.ss):
        assert seg == loader.SegmentReg(0x10, 0, 0xFFFFFFFF, 0xC093)
    assert cpu.tr == loader.SegmentReg(0x20, 0x1080, 0x67, 0x8B)
    assert cpu.ldtr.ar == 0x10000
    assert cpu.gdtr == loader.DescriptorTable(0x1000, 0x2F)
    assert cpu.idtr == loader.DescriptorTable(0, 0)
    assert cpu.rflags == 0x2
    assert cpu.rip == plan.entry


def check_gdt(mem: dict[int, int]) -> None:
    gdt = struct.unpack("<6Q", read(mem, 0x1000, 48))
    assert gdt[1] == 0x00CF9B000000FFFF
    assert gdt[2] == 0x00CF93000000FFFF
    assert gdt[3] == 0x00AF9B000000FFFF
    assert gdt[4] == 0x0000_8B00_1080_0067  # busy TSS at 0x1080, limit 0x67


def check_start_info(mem: dict[int, int], cmdline: str) -> None:
    magic, version, flags, nmods, modlist, cmd, rsdp, memmap, entries, _ = struct.unpack(
        "<IIIIQQQQII", read(mem, 0x2000, 56)
    )
    assert (magic, version, flags, nmods, modlist, rsdp) == (0x336EC578, 1, 0, 0, 0, 0)
    assert cstr(mem, cmd) == cmdline
    table = [struct.unpack("<QQII", read(mem, memmap + 24 * i, 24)) for i in range(entries)]
    assert table == [
        (0, 0x9FC00, 1, 0),
        (0x9FC00, 0x100000 - 0x9FC00, 2, 0),
        (0x100000, MEM - 0x100000, 1, 0),
    ]


# ---- PVH ----------------------------------------------------------------------------------


def test_pvh_kernel() -> None:
    path = build("pvh_kernel")
    plan = load_kernel(path, mem_size=MEM, cmdline="console=ttyS0 x=1")
    syms = symbols(path)
    assert plan.protocol == "pvh"
    assert plan.entry == syms["pvh_start32"] == 0x100000
    check_protected_common(plan)
    assert plan.cpu.rbx == 0x2000 and plan.cpu.rax == 0 and plan.cpu.rsp == 0x10000
    mem = memory_of(plan)
    check_gdt(mem)
    check_start_info(mem, "console=ttyS0 x=1")
    # the kernel image: .boot at 1 MiB, higher-half part at its physical address
    assert read(mem, 0x100000, 1) == b"\xfa"  # cli
    main64 = syms["main64"] - 0xFFFFFFFF80000000
    assert (main64, 1) in [(g, 1) for g, _ in plan.loads] or any(
        g <= main64 < g + len(d) for g, d in plan.loads
    )
    lo, hi = plan.kernel_range()
    assert lo == 0x100000 and hi >= syms["stack_top"] - 0xFFFFFFFF80000000
    assert "page_tables" not in {b.name for b in plan.extras}


def test_pvh_symbols() -> None:
    syms = symbols(build("pvh_kernel"))
    for name in (
        "main64", "counter", "spin_loop", "loop_body", "add_numbers", "guest_int3", "mode",
        "int3_hits", "int3_handler", "call_add_1", "demo_loop", "halt_forever",
        "do_triple_fault", "xmm0_value", "ymm1_value",
    ):  # fmt: skip
        assert name in syms, name
    assert syms["loop_body"] == syms["spin_loop"] + 7
    assert syms["counter"] >= 0xFFFFFFFF80000000
    assert syms["counter"] & ~0xFFF != syms["spin_loop"] & ~0xFFF  # data on its own page


def test_mode_switch_is_pvh() -> None:
    path = build("mode_switch")
    plan = load_kernel(path, mem_size=MEM)
    syms = symbols(path)
    assert plan.protocol == "pvh" and plan.entry == syms["pvh_start32"]
    for name in ("start32", "loop32", "work32_done", "start64", "loop64", "work64_done"):
        assert name in syms
    assert syms["start32"] < syms["start64"] < 0x200000


def test_bench_pvh() -> None:
    path = BENCH / "bench.elf"
    if not path.exists():
        pytest.skip("bench guest not present")
    plan = load_kernel(path, mem_size=256 << 20)
    assert plan.protocol == "pvh"
    assert plan.entry == symbols(path)["pvh_start32"]
    lo, hi = plan.kernel_range()
    assert lo == 0x100000 and hi > 16 << 20  # membuf in .bss


# ---- Multiboot ----------------------------------------------------------------------------


def check_mbi(plan: BootPlan, cmdline: str) -> None:
    mem = memory_of(plan)
    check_gdt(mem)
    flags, lower, upper, _bootdev, cmd, mods_count, _mods_addr = struct.unpack(
        "<7I", read(mem, 0x2000, 28)
    )
    assert flags & 0x245 == 0x245  # mem, cmdline, mmap, loader name
    assert lower == 639 and upper == (MEM - 0x100000) // 1024
    assert mods_count == 0
    assert cstr(mem, cmd) == cmdline
    mmap_length, mmap_addr = struct.unpack("<II", read(mem, 0x2000 + 44, 8))
    entries = []
    off = 0
    while off < mmap_length:
        size, addr, length, kind = struct.unpack("<IQQI", read(mem, mmap_addr + off, 24))
        entries.append((addr, length, kind))
        off += size + 4
    assert entries == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x100000 - 0x9FC00, 2),
        (0x100000, MEM - 0x100000, 1),
    ]
    (name_addr,) = struct.unpack("<I", read(mem, 0x2000 + 64, 4))
    assert cstr(mem, name_addr) == "gdbstub"


@pytest.mark.parametrize("name", ["mb_kernel", "mb_kernel.bin"])
def test_multiboot_kernel(name: str) -> None:
    path = build(name)
    plan = load_kernel(path, mem_size=MEM, cmdline="hello world")
    syms = symbols(build("mb_kernel"))
    assert plan.protocol == "multiboot"
    assert plan.entry == syms["mb_entry"]
    check_protected_common(plan)
    assert plan.cpu.rax == 0x2BADB002 and plan.cpu.rbx == 0x2000
    check_mbi(plan, f"{path} hello world")
    assert plan.loads[0][0] == 0x100000
    # bss (stack) is zero-filled up to _bss_end
    assert plan.kernel_range()[1] == syms["_bss_end"]


def test_multiboot_elf_and_flat_load_the_same_bytes() -> None:
    elf = load_kernel(build("mb_kernel"), mem_size=MEM)
    flat = load_kernel(build("mb_kernel.bin"), mem_size=MEM)
    assert elf.loads == flat.loads and elf.zero_fill == flat.zero_fill


def test_bench_multiboot() -> None:
    path = BENCH / "bench-mb.elf"
    if not path.exists():
        pytest.skip("bench guest not present")
    plan = load_kernel(path, mem_size=256 << 20)
    assert plan.protocol == "multiboot"  # Multiboot wins over the PVH note, as in QEMU
    assert plan.entry == symbols(path)["pvh_start32"]
    assert plan.cpu.rax == 0x2BADB002


# ---- ELF64 --------------------------------------------------------------------------------


def test_elf64_kernel() -> None:
    path = build("elf64_kernel")
    plan = load_kernel(path, mem_size=MEM, cmdline="abc")
    syms = symbols(path)
    assert plan.protocol == "elf64"
    assert plan.entry == syms["_start"] >= 0xFFFFFFFF80000000
    cpu = plan.cpu
    assert (cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer) == (0x80010033, 0x4000, 0x620, 0x500)
    assert cpu.cs == loader.SegmentReg(0x18, 0, 0xFFFFFFFF, 0xA09B)
    assert cpu.ss == loader.SegmentReg(0x10, 0, 0xFFFFFFFF, 0xC093)
    assert cpu.rsp == 0x10000 and cpu.rdi == 0x2000 and cpu.rip == plan.entry
    mem = memory_of(plan)
    check_gdt(mem)
    check_start_info(mem, "abc")
    # page tables: identity 0-4 GiB, 0-2 GiB again at -2 GiB
    assert walk(mem, cpu.cr3, plan.entry) == plan.entry - 0xFFFFFFFF80000000 == 0x100000
    for va in (0, 0x1000, 0x12345678, 0xFFFFFFFF, 0x9FC00):
        assert walk(mem, cpu.cr3, va) == va
    assert walk(mem, cpu.cr3, 0xFFFFFFFF80000000 + 0x7FFFFFFF) == 0x7FFFFFFF
    assert walk(mem, cpu.cr3, 1 << 32) is None
    assert walk(mem, cpu.cr3, 0x00007FFF00000000) is None
    # the bytes at the entry are the kernel's
    assert read(mem, 0x100000, 3) == bytes.fromhex("488925")  # mov [rel entry_rsp], rsp


def test_build_page_tables_alignment() -> None:
    assert len(loader.build_page_tables(0x4000)) == loader.PAGE_TABLES_SIZE
    with pytest.raises(ValueError):
        loader.build_page_tables(0x4001)


# ---- errors -------------------------------------------------------------------------------


def one_line(exc: pytest.ExceptionInfo[BootError]) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


def link(tmp_path: Path, source: str, fmt: str, emulation: str, *ld_args: str) -> Path:
    src = tmp_path / "k.asm"
    src.write_text(source)
    obj = tmp_path / "k.o"
    out = tmp_path / "k.elf"
    subprocess.run(["nasm", "-f", fmt, "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", emulation, "-nostdlib", "-static", "-z", "noexecstack", *ld_args, "-o",
         str(out), str(obj)],
        check=True,
    )  # fmt: skip
    return out


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BootError) as exc:
        load_kernel(tmp_path / "nope.elf", mem_size=MEM)
    assert "no such file" in one_line(exc)


def test_directory(tmp_path: Path) -> None:
    with pytest.raises(BootError) as exc:
        load_kernel(tmp_path, mem_size=MEM)
    one_line(exc)


def test_not_elf_no_multiboot(tmp_path: Path) -> None:
    f = tmp_path / "junk.bin"
    f.write_bytes(b"\x90" * 10000)
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "not an ELF" in one_line(exc)


def test_wrong_machine(tmp_path: Path) -> None:
    data = bytearray(build("elf64_kernel").read_bytes())
    struct.pack_into("<H", data, 18, 183)  # EM_AARCH64
    f = tmp_path / "arm.elf"
    f.write_bytes(bytes(data))
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "EM_AARCH64" in one_line(exc)


def test_elf32_without_headers(tmp_path: Path) -> None:
    f = link(tmp_path, "bits 32\nglobal _start\n_start: hlt\n", "elf32", "elf_i386",
             "-Ttext=0x100000")  # fmt: skip
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "32-bit ELF" in one_line(exc)


def test_truncated_elf(tmp_path: Path) -> None:
    data = build("elf64_kernel").read_bytes()
    f = tmp_path / "cut.elf"
    f.write_bytes(data[:200])
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    one_line(exc)


def test_segment_outside_memory() -> None:
    path = BENCH / "bench.elf"
    if not path.exists():
        pytest.skip("bench guest not present")
    with pytest.raises(BootError) as exc:
        load_kernel(path, mem_size=8 << 20)
    assert "outside guest memory" in one_line(exc)


def test_segment_overlaps_boot_area(tmp_path: Path) -> None:
    f = link(tmp_path, "bits 64\nglobal _start\n_start: hlt\n", "elf64", "elf_x86_64",
             "-Ttext=0x8000")  # fmt: skip
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "boot area" in one_line(exc)


def test_elf64_low_entry(tmp_path: Path) -> None:
    f = link(tmp_path, "bits 64\nglobal _start\n_start: hlt\n", "elf64", "elf_x86_64",
             "-Ttext=0x200000")  # fmt: skip
    plan = load_kernel(f, mem_size=MEM)
    assert plan.protocol == "elf64" and plan.entry == 0x200000


def test_elf64_unmapped_entry(tmp_path: Path) -> None:
    f = link(tmp_path, "bits 64\nglobal _start\n_start: hlt\n", "elf64", "elf_x86_64",
             "-Ttext=0x200000", "--entry=0x500000000")  # fmt: skip
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "entry point" in one_line(exc)


def multiboot_raw(flags: int, fields: tuple[int, ...] = ()) -> bytes:
    magic = 0x1BADB002
    header = struct.pack("<III", magic, flags, (-(magic + flags)) & 0xFFFFFFFF)
    return b"\0" * 64 + header + struct.pack(f"<{len(fields)}I", *fields) + b"\xf4" * 64


def test_multiboot_raw_kludge(tmp_path: Path) -> None:
    f = tmp_path / "k.bin"
    # header at file offset 64 = address 0x100040; load the whole file at 0x100000, bss to +1 MiB
    f.write_bytes(multiboot_raw(0x10000, (0x100040, 0x100000, 0, 0x200000, 0x100060)))
    plan = load_kernel(f, mem_size=MEM)
    assert plan.protocol == "multiboot" and plan.entry == 0x100060
    assert plan.loads == [(0x100000, f.read_bytes())]
    size = len(f.read_bytes())
    assert plan.zero_fill == [(0x100000 + size, 0x100000 - size)]


def test_multiboot_unsupported_flags(tmp_path: Path) -> None:
    f = tmp_path / "k.bin"
    f.write_bytes(multiboot_raw(0x10008, (0x100040, 0x100000, 0, 0, 0x100060)))
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "unsupported" in one_line(exc)


def test_multiboot_without_kludge_needs_elf(tmp_path: Path) -> None:
    f = tmp_path / "k.bin"
    f.write_bytes(multiboot_raw(0x2))
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "non-ELF" in one_line(exc)


def test_multiboot_bad_checksum_is_ignored(tmp_path: Path) -> None:
    f = tmp_path / "k.bin"
    f.write_bytes(struct.pack("<III", 0x1BADB002, 0x10000, 0) + bytes(100))
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "not an ELF" in one_line(exc)


def test_multiboot_bad_header_addr(tmp_path: Path) -> None:
    f = tmp_path / "k.bin"
    f.write_bytes(multiboot_raw(0x10000, (0x100040, 0x100100, 0, 0, 0x100060)))
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    one_line(exc)


def test_cmdline_too_long() -> None:
    with pytest.raises(BootError) as exc:
        load_kernel(build("pvh_kernel"), mem_size=MEM, cmdline="x" * 5000)
    assert "too long" in one_line(exc)


def test_bad_memory_size() -> None:
    with pytest.raises(BootError) as exc:
        load_kernel(build("pvh_kernel"), mem_size=0x1000)
    one_line(exc)


def test_symbols_of_non_elf(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"hello")
    with pytest.raises(BootError) as exc:
        symbols(f)
    one_line(exc)


def test_apply_order_and_chunks() -> None:
    plan = load_kernel(build("pvh_kernel"), mem_size=MEM)
    writes: list[tuple[int, int]] = []
    plan.apply(lambda gpa, data: writes.append((gpa, len(data))), chunk=0x1000)
    assert all(n <= max(0x1000, max(len(d) for _, d in plan.loads), 0x7000) for _, n in writes)
    assert writes[-1][0] == plan.extras[-1].gpa
    assert plan.extra("start_info").gpa == 0x2000
    with pytest.raises(KeyError):
        plan.extra("nothing")
