"""Tests for gdbstub.machine.loader: BootPlans of our test guests, the bench guests, a synthetic
bzImage (also booted on every backend) and, when cached, a real Debian kernel and initramfs."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import debian_kernel
import pytest
from guestbuild import assemble_flat, build

from gdbstub.machine import loader
from gdbstub.machine.loader import BootError, BootPlan, load_kernel, symbols

MEM = 64 << 20
BENCH = Path(__file__).resolve().parents[2] / "shared" / "bench" / "guest"
"""The shared bench guest, beside the repository (../shared/) on the development machines."""


def bench_guest(name: str) -> Path:
    """``BENCH / name``, or skip the test (with where it looked) when it is absent."""
    path = BENCH / name
    if not path.exists():
        pytest.skip(f"the shared bench guest ../shared/bench/guest/{name} is absent")
    return path


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
    path = bench_guest("bench.elf")
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
    path = bench_guest("bench-mb.elf")
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
    path = bench_guest("bench.elf")
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


# ---- Linux bzImage (synthetic) ------------------------------------------------------------

LINUX_PAYLOAD = r"""
startup_32:                         ; the 32-bit entry at the start: never used here
        hlt
        jmp     startup_32
        times 0x200 - ($ - $$) db 0
startup_64:                         ; load address + 0x200
        mov     r15, rsi            ; struct boot_params
        mov     ax, cs
        cmp     ax, 0x10
        jne     fail
        mov     ax, ds
        cmp     ax, 0x18
        jne     fail
        mov     ax, ss
        cmp     ax, 0x18
        jne     fail
        pushfq
        pop     rax
        test    eax, 0x200          ; IF must be clear
        jnz     fail
        cmp     dword [r15 + 0x202], 'HdrS'
        jne     fail
        cmp     byte [r15 + 0x210], 0xff
        jne     fail
        lea     rax, [rel startup_32]
        cmp     eax, [r15 + 0x214]  ; code32_start = where we were loaded
        jne     fail
        call    serial_init
        lea     rsi, [rel hello]
        call    serial_puts
        mov     esi, [r15 + 0x228]  ; cmd_line_ptr
        call    serial_puts
        lea     rsi, [rel newline]
        call    serial_puts
        GUEST_EXIT EXIT_OK
fail:
        GUEST_EXIT 0x11
hello:  db "hello from linux64: ", 0
newline: db 10, 0
DEFINE_SERIAL rsi
"""

XLF_KERNEL_64 = 1
XLF_ABOVE_4G = 2


def linux_payload() -> bytes:
    return assemble_flat(LINUX_PAYLOAD, bits=64, org=0)


def make_bzimage(
    payload: bytes | None = None,
    *,
    version: int = 0x020F,
    xloadflags: int = XLF_KERNEL_64 | XLF_ABOVE_4G,
    loadflags: int = 0x01,
    pref_address: int = 0x1000000,
    init_size: int = 0x100000,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    initrd_addr_max: int = 0x7FFFFFFF,
    cmdline_size: int = 2047,
    setup_sects: int = 1,
) -> bytes:
    """A bzImage: boot sector + setup sectors holding a setup header, then ``payload``."""
    if payload is None:
        payload = linux_payload()
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1EF] = 0xFF  # the sentinel: a loader must not copy it into the zero page
    setup[0x1F1] = setup_sects
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)  # vid_mode "normal"
    struct.pack_into("<H", setup, 0x1FC, 0x0801)  # root_dev: a value to see copied
    struct.pack_into("<H", setup, 0x1FE, 0xAA55)
    setup[0x200:0x202] = bytes([0xEB, 0x26C - 0x202])
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", setup, 0x22C, initrd_addr_max)
    struct.pack_into("<I", setup, 0x230, kernel_alignment)
    setup[0x234] = relocatable
    setup[0x235] = 21
    struct.pack_into("<H", setup, 0x236, xloadflags)
    struct.pack_into("<I", setup, 0x238, cmdline_size)
    struct.pack_into("<IQ", setup, 0x260, init_size, 0)  # init_size, handover/kernel_info
    struct.pack_into("<Q", setup, 0x258, pref_address)
    return bytes(setup) + payload


def write_bzimage(tmp_path: Path, **kwargs: int) -> Path:
    f = tmp_path / "bzImage"
    f.write_bytes(make_bzimage(**kwargs))  # type: ignore[arg-type]
    return f


def zero_page(plan: BootPlan) -> bytes:
    blob = plan.extra("zero_page")
    assert blob.gpa == 0x2000 and len(blob.data) == 4096
    return blob.data


def u32(data: bytes, off: int) -> int:
    value: int = struct.unpack_from("<I", data, off)[0]
    return value


def test_linux_bzimage(tmp_path: Path) -> None:
    image = make_bzimage()
    f = tmp_path / "bzImage"
    f.write_bytes(image)
    initrd = b"initrd contents\n" * 1000
    plan = load_kernel(f, mem_size=MEM, cmdline="console=ttyS0 quiet", initrd=initrd,
                       rsdp_addr=0xE0000)  # fmt: skip
    assert plan.protocol == "linux"
    # the protected-mode kernel (after 2 sectors) at pref_address, entered at +0x200
    assert plan.loads == [(0x1000000, image[1024:])] and plan.zero_fill == []
    assert plan.entry == 0x1000200
    zp = zero_page(plan)
    # the setup header is the image's, apart from the fields the loader writes
    written = {0x210, 0x211, *range(0x214, 0x218), *range(0x218, 0x220), 0x224, 0x225,
               *range(0x228, 0x22C)}  # fmt: skip
    for off in range(0x1F1, 0x26C):
        if off not in written:
            assert zp[off] == image[off], hex(off)
    assert zp[0x26C:0x290] == bytes(0x290 - 0x26C)
    assert zp[0x1EF] == 0  # sentinel not copied
    assert zp[0x210] == 0xFF  # type_of_loader: undefined
    assert zp[0x211] == 0x81  # LOADED_HIGH | CAN_USE_HEAP, no KEEP_SEGMENTS
    assert u32(zp, 0x214) == 0x1000000  # code32_start
    assert struct.unpack_from("<H", zp, 0x224)[0] == 0xDE00  # heap_end_ptr
    assert struct.unpack_from("<Q", zp, 0x70)[0] == 0xE0000  # acpi_rsdp_addr
    mem = memory_of(plan)
    assert cstr(mem, u32(zp, 0x228)) == "console=ttyS0 quiet"
    assert u32(zp, 0xC8) == 0  # ext_cmd_line_ptr
    # initrd: page-aligned at the top of RAM, above the kernel's init_size
    addr, size = u32(zp, 0x218), u32(zp, 0x21C)
    assert size == len(initrd) and (u32(zp, 0xC0), u32(zp, 0xC4)) == (0, 0)
    assert addr == (MEM - size) & ~0xFFF and addr % 4096 == 0
    assert addr >= 0x1000000 + 0x100000 and addr + size <= MEM
    assert read(mem, addr, size) == initrd
    assert plan.initrd_range() == (addr, addr + size)
    # e820: the firmware layout's map
    assert zp[0x1E8] == 3
    e820 = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(3)]
    assert e820 == [
        (0, 0x9FC00, 1),
        (0x9FC00, 0x100000 - 0x9FC00, 2),
        (0x100000, MEM - 0x100000, 1),
    ]
    assert zp[0x2D0 + 60 : 0x2D0 + 80] == bytes(20)


def test_linux_cpu_state_and_gdt(tmp_path: Path) -> None:
    plan = load_kernel(write_bzimage(tmp_path), mem_size=MEM)
    cpu = plan.cpu
    assert (cpu.cr0, cpu.cr3, cpu.cr4, cpu.efer) == (0x80010033, 0x4000, 0x620, 0x500)
    assert cpu.cs == loader.SegmentReg(0x10, 0, 0xFFFFFFFF, 0xA09B)
    for seg in (cpu.ds, cpu.es, cpu.ss, cpu.fs, cpu.gs):
        assert seg == loader.SegmentReg(0x18, 0, 0xFFFFFFFF, 0xC093)
    assert cpu.tr == loader.SegmentReg(0x20, 0x1080, 0x67, 0x8B)
    assert cpu.gdtr == loader.DescriptorTable(0x1000, 0x2F)
    assert cpu.idtr == loader.DescriptorTable(0, 0)
    assert cpu.rflags == 0x2 and cpu.rip == 0x1000200
    gprs = cpu.gprs()
    assert gprs.pop("rsi") == 0x2000 and gprs.pop("rsp") == 0x10000
    assert set(gprs.values()) == {0}
    mem = memory_of(plan)
    gdt = struct.unpack("<6Q", read(mem, 0x1000, 48))
    assert gdt[2] == 0x00AF9B000000FFFF  # __BOOT_CS: 64-bit code
    assert gdt[3] == 0x00CF93000000FFFF  # __BOOT_DS: flat data
    assert gdt[4] == 0x0000_8B00_1080_0067  # busy TSS
    # identity mapping covers init_size from the load address, the zero page and the cmdline
    for va in (0x1000000, 0x1000200, 0x10FFFFF, 0x2000, 0x2FFF, 0x3000, 0x10000 - 8):
        assert walk(mem, cpu.cr3, va) == va


def test_linux_pref_address_outside_ram(tmp_path: Path) -> None:
    f = write_bzimage(tmp_path, pref_address=0x8000000)  # 128 MiB, RAM is 64
    plan = load_kernel(f, mem_size=MEM)
    assert plan.loads[0][0] == 0x200000  # 1 MiB rounded up to kernel_alignment
    assert plan.entry == 0x200200
    assert u32(zero_page(plan), 0x214) == 0x200000
    f = write_bzimage(tmp_path, pref_address=0x8000000, kernel_alignment=0x100000)
    assert load_kernel(f, mem_size=MEM).loads[0][0] == 0x100000
    f = write_bzimage(tmp_path, pref_address=0x1000000, init_size=0x3D00000)  # 16 + 61 MiB
    assert load_kernel(f, mem_size=MEM).loads[0][0] == 0x200000


def test_linux_not_relocatable(tmp_path: Path) -> None:
    f = write_bzimage(tmp_path, pref_address=0x8000000, relocatable=0)
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "not relocatable" in one_line(exc)
    assert load_kernel(f, mem_size=256 << 20).loads[0][0] == 0x8000000


def test_linux_init_size_must_fit(tmp_path: Path) -> None:
    f = write_bzimage(tmp_path, init_size=0x4000000)  # 64 MiB
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "66 MiB" in one_line(exc)
    assert load_kernel(f, mem_size=96 << 20).loads[0][0] == 0x1000000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"version": 0x020A}, "2.10 is too old"),
        ({"xloadflags": 0}, "64-bit entry"),
        ({"loadflags": 0}, "zImage"),
    ],
)
def test_linux_refused(tmp_path: Path, kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(BootError) as exc:
        load_kernel(write_bzimage(tmp_path, **kwargs), mem_size=MEM)
    assert message in one_line(exc)


def test_linux_truncated(tmp_path: Path) -> None:
    f = tmp_path / "bzImage"
    f.write_bytes(make_bzimage()[:0x240])
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "truncated" in one_line(exc)


def test_linux_cmdline_size(tmp_path: Path) -> None:
    f = write_bzimage(tmp_path, cmdline_size=16)
    assert cstr(memory_of(load_kernel(f, mem_size=MEM, cmdline="x" * 16)), 0x3000) == "x" * 16
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM, cmdline="x" * 17)
    assert "at most 16" in one_line(exc)


def test_linux_initrd_addr_max(tmp_path: Path) -> None:
    f = write_bzimage(tmp_path, xloadflags=XLF_KERNEL_64, initrd_addr_max=0x2FFFFFF)
    plan = load_kernel(f, mem_size=MEM, initrd=b"x" * 5000)
    assert plan.initrd_range() == (0x3000000 - 0x2000, 0x3000000 - 0x2000 + 5000)
    # too big to fit above the kernel (16 MiB + init_size 1 MiB)
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM, initrd=bytes(0x1F00001))
    assert "initrd" in one_line(exc)


def test_linux_initrd_above_4g(tmp_path: Path) -> None:
    mem = (4 << 30) + (64 << 20)
    plan = load_kernel(write_bzimage(tmp_path), mem_size=mem, initrd=b"y" * 0x1800)
    zp = zero_page(plan)
    addr = mem - 0x2000
    assert (u32(zp, 0x218), u32(zp, 0x21C)) == (addr & 0xFFFFFFFF, 0x1800)
    assert (u32(zp, 0xC0), u32(zp, 0xC4)) == (1, 0)  # ext_ramdisk_image: bits 32-63
    assert plan.extra("initrd").gpa == addr
    e820 = [struct.unpack_from("<QQI", zp, 0x2D0 + 20 * i) for i in range(zp[0x1E8])]
    assert e820[-1] == (0x100000, mem - 0x100000, 1)


def test_linux_initrd_from_file(tmp_path: Path) -> None:
    rd = tmp_path / "rd.cpio"
    rd.write_bytes(b"070701" + bytes(200))
    plan = load_kernel(write_bzimage(tmp_path), mem_size=MEM, initrd=rd)
    assert plan.extra("initrd").data == rd.read_bytes()
    with pytest.raises(BootError) as exc:
        load_kernel(write_bzimage(tmp_path), mem_size=MEM, initrd=tmp_path / "missing")
    assert "no such file" in one_line(exc)


def test_linux_rsdp_needs_protocol_2_14(tmp_path: Path) -> None:
    f = write_bzimage(tmp_path, version=0x020D)
    zp = zero_page(load_kernel(f, mem_size=MEM, rsdp_addr=0xE0000))
    assert zp[0x70:0x78] == bytes(8)
    zp = zero_page(load_kernel(write_bzimage(tmp_path), mem_size=MEM))
    assert zp[0x70:0x78] == bytes(8)  # no RSDP given


def test_linux_boots_on_every_backend(tmp_path: Path) -> None:
    """The synthetic kernel checks its entry state (CS, DS, SS, IF, RSI, code32_start) itself."""
    from gdbdrive import Stub, backends

    f = write_bzimage(tmp_path)
    for backend in backends():
        stub = Stub(f, backend, "--cmdline", "console=ttyS0 abc", wait=False, tmp=tmp_path)
        try:
            assert stub.wait_exit(60) == 0x21, (backend, stub.serial_text(), stub.log.read_text())
            assert "hello from linux64: console=ttyS0 abc\n" in stub.serial_text(), backend
        finally:
            stub.stop()


# ---- initrd and RSDP for the other protocols ---------------------------------------------


def test_pvh_initrd_and_rsdp() -> None:
    initrd = bytes(range(256)) * 40
    plan = load_kernel(build("pvh_kernel"), mem_size=MEM, cmdline="a", initrd=initrd,
                       rsdp_addr=0xE0000)  # fmt: skip
    mem = memory_of(plan)
    _, _, flags, nmods, modlist, cmd, rsdp, _, _, _ = struct.unpack(
        "<IIIIQQQQII", read(mem, 0x2000, 56)
    )
    assert (flags, nmods, rsdp) == (0, 1, 0xE0000) and cstr(mem, cmd) == "a"
    paddr, size, mod_cmdline, reserved = struct.unpack("<QQQQ", read(mem, modlist, 32))
    assert (size, mod_cmdline, reserved) == (len(initrd), 0, 0)
    assert paddr == (MEM - len(initrd)) & ~0xFFF  # top of RAM, page-aligned
    assert paddr >= plan.kernel_range()[1]
    assert read(mem, paddr, size) == initrd


def test_elf64_initrd() -> None:
    plan = load_kernel(build("elf64_kernel"), mem_size=MEM, initrd=b"z" * 10)
    mem = memory_of(plan)
    nmods, modlist = struct.unpack("<IQ", read(mem, 0x200C, 12))
    assert nmods == 1
    paddr, size = struct.unpack("<QQ", read(mem, modlist, 16))
    assert (paddr, size) == (MEM - 0x1000, 10) and read(mem, paddr, 10) == b"z" * 10
    assert plan.cpu.rdi == 0x2000


def test_pvh_initrd_too_large() -> None:
    with pytest.raises(BootError) as exc:
        load_kernel(build("pvh_kernel"), mem_size=4 << 20, initrd=bytes(3 << 20))
    assert "initrd" in one_line(exc)


@pytest.mark.parametrize("name", ["mb_kernel", "mb_kernel.bin"])
def test_multiboot_module(name: str, tmp_path: Path) -> None:
    rd = tmp_path / "rootfs.img"
    rd.write_bytes(b"module!" * 999)
    plan = load_kernel(build(name), mem_size=MEM, cmdline="x", initrd=rd)
    mem = memory_of(plan)
    flags, mods_count, mods_addr = struct.unpack("<I16xII", read(mem, 0x2000, 28))
    assert flags & 0x8 and mods_count == 1
    start, end, string, reserved = struct.unpack("<IIII", read(mem, mods_addr, 16))
    # as QEMU: on the first page boundary after the kernel (bss included)
    assert start == (plan.kernel_range()[1] + 0xFFF) & ~0xFFF
    assert end == start + len(rd.read_bytes()) and reserved == 0
    assert read(mem, start, end - start) == rd.read_bytes()
    assert cstr(mem, string) == str(rd)
    _, mmap_addr = struct.unpack("<II", read(mem, 0x2000 + 44, 8))
    assert mmap_addr == 0x2100 and not mods_addr <= mmap_addr < mods_addr + 16


# ---- firmware layout ----------------------------------------------------------------------


def test_memory_map_is_the_firmware_layout() -> None:
    from gdbstub.machine.firmware import layout

    assert loader.memory_map(MEM) == [
        (0, layout.LOW_RAM_END, 1),
        (layout.LOW_RAM_END, layout.HIGH_RAM_START - layout.LOW_RAM_END, 2),
        (layout.HIGH_RAM_START, MEM - layout.HIGH_RAM_START, 1),
    ]
    # the EBDA, ACPI tables, MP table and BIOS stubs are all in the reserved entry
    for addr in (layout.EBDA_ADDR, layout.ACPI_ADDR, layout.MPTABLE_ADDR, layout.BIOS_STUBS):
        assert layout.LOW_RAM_END <= addr < layout.HIGH_RAM_START
    # the loader's own area is above the IVT and BDA and below the EBDA
    assert layout.BDA_ADDR + 0x100 <= loader.BOOT_AREA_START
    assert loader.BOOT_AREA_END <= layout.EBDA_ADDR


def test_kernel_over_the_firmware_area(tmp_path: Path) -> None:
    f = tmp_path / "k.bin"
    f.write_bytes(multiboot_raw(0x10000, (0xE0040, 0xE0000, 0, 0, 0xE0060)))
    with pytest.raises(BootError) as exc:
        load_kernel(f, mem_size=MEM)
    assert "firmware area" in one_line(exc)


# ---- a real Debian kernel -----------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_bzimage() -> Path:
    kernel = debian_kernel.cached_debian_kernel()
    if kernel is None:
        pytest.skip(
            f"no Debian kernel package (linux-image-*.deb) in {debian_kernel.cache_dir()} "
            "and none could be downloaded"
        )
    return kernel


@pytest.fixture(scope="module")
def busybox_cpio(tmp_path_factory: pytest.TempPathFactory) -> Path:
    busybox = debian_kernel.cached_busybox()
    if busybox is None:
        pytest.skip(f"no busybox-static package in {debian_kernel.cache_dir()}")
    return debian_kernel.busybox_initramfs(tmp_path_factory.mktemp("rd") / "rd.cpio", busybox)


def test_debian_bzimage_with_initrd(debian_bzimage: Path, busybox_cpio: Path) -> None:
    mem = 256 << 20
    plan = load_kernel(debian_bzimage, mem_size=mem, cmdline="console=ttyS0", initrd=busybox_cpio,
                       rsdp_addr=0xE0000)  # fmt: skip
    assert plan.protocol == "linux"
    zp = zero_page(plan)
    image = debian_bzimage.read_bytes()
    assert zp[0x202:0x206] == b"HdrS" and zp[0x206:0x208] == image[0x206:0x208]
    load, init_size = u32(zp, 0x214), u32(zp, 0x260)
    assert load == struct.unpack_from("<Q", image, 0x258)[0]  # pref_address fits in 256 MiB
    assert plan.entry == load + 0x200 and plan.cpu.rip == plan.entry
    assert plan.loads == [(load, image[(image[0x1F1] + 1) * 512 :])]
    rd_addr, rd_size = u32(zp, 0x218), u32(zp, 0x21C)
    assert rd_size == busybox_cpio.stat().st_size
    assert rd_addr >= load + init_size and rd_addr + rd_size <= mem and rd_addr % 4096 == 0
    assert plan.cpu.rsi == 0x2000 and plan.cpu.cs.selector == 0x10


def test_debian_bzimage_needs_memory(debian_bzimage: Path) -> None:
    with pytest.raises(BootError) as exc:
        load_kernel(debian_bzimage, mem_size=MEM)
    assert "MiB of RAM" in one_line(exc)


def test_debian_vmlinux_is_pvh(debian_bzimage: Path, tmp_path: Path) -> None:
    vmlinux = debian_kernel.extract_vmlinux(debian_bzimage, tmp_path / "vmlinux")
    assert vmlinux.read_bytes()[:4] == b"\x7fELF"
    plan = load_kernel(vmlinux, mem_size=256 << 20, initrd=b"rd")
    assert plan.protocol == "pvh"
    lo, hi = plan.kernel_range()
    assert lo <= plan.entry < hi and plan.entry < 1 << 32


def test_busybox_initramfs_is_a_newc_archive(busybox_cpio: Path, tmp_path: Path) -> None:
    """busybox's own cpio lists the archive we wrote (an independent reader)."""
    busybox = tmp_path / "busybox"
    busybox.write_bytes(debian_kernel.cached_busybox() or b"")
    busybox.chmod(0o755)
    with busybox_cpio.open("rb") as f:
        out = subprocess.run([str(busybox), "cpio", "-tv"], stdin=f, capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
    lines = {line.split()[-1] if "->" not in line else line.split()[-3]: line
             for line in out.splitlines()}  # fmt: skip
    assert lines["init"].startswith("-rwxr-xr-x")
    assert lines["bin/busybox"].startswith("-rwxr-xr-x")
    assert lines["bin/sh"].startswith("l") and lines["bin/sh"].endswith("-> busybox")
    assert lines["bin/cttyhack"].endswith("-> busybox")
    assert lines["dev/console"].startswith("c")
    for d in ("proc", "sys", "dev"):
        assert lines[d].startswith("d")
    data = busybox_cpio.read_bytes()
    assert debian_kernel.INIT_MARKER.encode() in data
    assert b"mount -t devtmpfs" in data and b"setsid cttyhack sh" in data
