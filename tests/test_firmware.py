"""Tests for gdbstub.machine.firmware: ACPI and MP tables, BDA/EBDA, the real-mode BIOS.

Tables are read the way a kernel reads them: find the RSDP / ``_MP_`` by scanning, follow the
pointers, check every checksum and length, then the fields.  The BIOS services are driven
through a fake :class:`RealModeCpu`, and once through the real stubs on unicorn in real mode.
"""

from __future__ import annotations

import calendar
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from gdbstub.machine.firmware import acpi, bda, bios, mptable
from gdbstub.machine.firmware.layout import (
    ACPI_ADDR,
    BIOS_PORT,
    BIOS_STUBS,
    EBDA_ADDR,
    IOAPIC_ADDR,
    LAPIC_ADDR,
    MPTABLE_ADDR,
)
from gdbstub.machine.loader import memory_map

MIB = 1 << 20


class Mem:
    """Guest-physical memory made of (address, bytes) pieces."""

    def __init__(self, *pieces: tuple[int, bytes]) -> None:
        self.pieces = pieces

    def read(self, addr: int, n: int) -> bytes:
        for base, data in self.pieces:
            if base <= addr and addr + n <= base + len(data):
                return data[addr - base : addr - base + n]
        raise AssertionError(f"read of {n} bytes at {addr:#x} outside the tables")

    def u8(self, addr: int) -> int:
        return self.read(addr, 1)[0]

    def u16(self, addr: int) -> int:
        return int(struct.unpack("<H", self.read(addr, 2))[0])

    def u32(self, addr: int) -> int:
        return int(struct.unpack("<I", self.read(addr, 4))[0])

    def u64(self, addr: int) -> int:
        return int(struct.unpack("<Q", self.read(addr, 8))[0])


def sums_to_zero(data: bytes) -> bool:
    return sum(data) & 0xFF == 0


# ================================================================================================
# ACPI


class Acpi:
    """The tables of one :func:`build_acpi`, found as Linux finds them."""

    def __init__(self, cpus: int = 1) -> None:
        tables = acpi.build_acpi(cpus=cpus)
        self.tables = tables
        self.mem = Mem((ACPI_ADDR, tables.blob))
        # Linux scans 0xE0000-0xFFFFF on 16-byte boundaries for the RSDP
        blob = tables.blob
        hits = [o for o in range(0, len(blob), 16) if blob[o : o + 8] == b"RSD PTR "]
        assert hits == [0]
        self.rsdp = ACPI_ADDR + hits[0]

    def table(self, addr: int) -> bytes:
        length = self.mem.u32(addr + 4)
        data = self.mem.read(addr, length)
        assert sums_to_zero(data), f"bad checksum in {data[:4]!r}"
        return data

    def xsdt_entries(self) -> dict[bytes, int]:
        xsdt = self.table(self.mem.u64(self.rsdp + 24))
        count = (len(xsdt) - 36) // 8
        addrs = struct.unpack_from(f"<{count}Q", xsdt, 36)
        return {self.mem.read(a, 4): a for a in addrs}

    def fadt(self) -> bytes:
        return self.table(self.xsdt_entries()[b"FACP"])

    def madt(self) -> bytes:
        return self.table(self.xsdt_entries()[b"APIC"])

    def dsdt(self) -> bytes:
        return self.table(struct.unpack_from("<Q", self.fadt(), 140)[0])


def test_rsdp_is_found_by_the_bios_area_scan_and_checksums() -> None:
    a = Acpi()
    assert a.tables.rsdp_addr == a.rsdp == ACPI_ADDR
    assert 0xE0000 <= a.rsdp < 0x100000 and a.rsdp % 16 == 0
    rsdp = a.mem.read(a.rsdp, 36)
    assert rsdp[15] == 2  # ACPI 2.0+
    assert sums_to_zero(rsdp[:20])
    assert sums_to_zero(rsdp)
    assert struct.unpack_from("<I", rsdp, 20)[0] == 36


def test_rsdt_and_xsdt_point_at_the_same_tables() -> None:
    a = Acpi(cpus=2)
    rsdt = a.table(a.mem.u32(a.rsdp + 16))
    xsdt = a.table(a.mem.u64(a.rsdp + 24))
    assert rsdt[:4] == b"RSDT" and xsdt[:4] == b"XSDT"
    assert rsdt[8] == 1 and xsdt[8] == 1
    r = struct.unpack_from(f"<{(len(rsdt) - 36) // 4}I", rsdt, 36)
    x = struct.unpack_from(f"<{(len(xsdt) - 36) // 8}Q", xsdt, 36)
    assert r == x
    assert sorted(a.xsdt_entries()) == [b"APIC", b"FACP"]
    for addr in x:  # every table lies inside the blob and checksums (a.table asserts)
        a.table(addr)


def test_fadt_fields() -> None:
    a = Acpi()
    f = a.fadt()
    assert len(f) == 244 and f[8] >= 3
    facs, dsdt = struct.unpack_from("<II", f, 36)
    x_facs, x_dsdt = struct.unpack_from("<QQ", f, 132)
    assert (x_facs, x_dsdt) == (facs, dsdt)
    assert struct.unpack_from("<H", f, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<I", f, 48)[0] == 0  # SMI_CMD: always in ACPI mode
    pm1a_evt, pm1b_evt, pm1a_cnt, pm1b_cnt, pm2, tmr, gpe0, gpe1 = struct.unpack_from("<8I", f, 56)
    assert (pm1a_evt, pm1a_cnt, tmr) == (0x600, 0x604, 0x608)
    assert pm1b_evt == pm1b_cnt == pm2 == gpe0 == gpe1 == 0
    assert tuple(f[88:94]) == (4, 2, 0, 4, 0, 0)  # PM1_EVT, PM1_CNT, PM2, TMR, GPE0, GPE1 lens
    assert f[108] == 0x32  # century
    boot_arch = struct.unpack_from("<H", f, 109)[0]
    assert boot_arch & 3 == 3  # LEGACY_DEVICES | 8042
    assert boot_arch & (1 << 5) == 0  # CMOS RTC present
    flags = struct.unpack_from("<I", f, 112)[0]
    assert flags & acpi.FADT_WBINVD
    assert flags & acpi.FADT_RESET_REG_SUP
    assert not flags & acpi.FADT_TMR_VAL_EXT  # 24-bit PM timer
    assert not flags & acpi.FADT_FORCE_APIC_CLUSTER_MODEL
    assert flags == 0x84A5  # QEMU pc's set (WBINVD, C1, SLP_BUTTON, RTC_S4, platform clock) + reset
    # RESET_REG: system I/O, 8 bits at 0xCF9, value 6
    assert struct.unpack_from("<BBBBQ", f, 116) == (1, 8, 0, 0, 0xCF9)
    assert f[128] == 6
    assert f[131] == 0  # FADT minor version
    # X_ blocks agree with the 32-bit ones
    x_blocks = [struct.unpack_from("<BBBBQ", f, 148 + 12 * i) for i in range(8)]
    assert x_blocks[0] == (1, 32, 0, 0, 0x600)
    assert x_blocks[2] == (1, 16, 0, 0, 0x604)
    assert x_blocks[5] == (1, 32, 0, 0, 0x608)
    for i in (1, 3, 4, 6, 7):
        assert x_blocks[i] == (0, 0, 0, 0, 0)
    facs_data = a.mem.read(facs, 64)
    assert facs % 64 == 0
    assert facs_data[:4] == b"FACS" and struct.unpack_from("<I", facs_data, 4)[0] == 64
    assert a.mem.read(dsdt, 4) == b"DSDT"


def test_fadt_apic_cluster_model_above_eight_cpus() -> None:
    flags = struct.unpack_from("<I", Acpi(cpus=9).fadt(), 112)[0]
    assert flags & acpi.FADT_FORCE_APIC_CLUSTER_MODEL


def parse_madt(madt: bytes) -> tuple[int, int, list[bytes]]:
    lapic, flags = struct.unpack_from("<II", madt, 36)
    entries, off = [], 44
    while off < len(madt):
        length = madt[off + 1]
        assert length >= 2
        entries.append(madt[off : off + length])
        off += length
    assert off == len(madt)
    return lapic, flags, entries


@pytest.mark.parametrize("cpus", [1, 4])
def test_madt_entries(cpus: int) -> None:
    lapic, flags, entries = parse_madt(Acpi(cpus=cpus).madt())
    assert lapic == LAPIC_ADDR == 0xFEE00000
    assert flags == 1  # PCAT_COMPAT
    cpus_seen = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 0]
    assert cpus_seen == [(0, 8, i, i, 1) for i in range(cpus)]
    ioapics = [struct.unpack("<BBBBII", e) for e in entries if e[0] == 1]
    assert ioapics == [(1, 12, cpus, 0, IOAPIC_ADDR, 0)]
    overrides = [struct.unpack("<BBBBIH", e) for e in entries if e[0] == 2]
    assert overrides == [(2, 10, 0, 0, 2, 0), (2, 10, 0, 9, 9, 0xD)]
    nmis = [struct.unpack("<BBBHB", e) for e in entries if e[0] == 4]
    assert nmis == [(4, 6, 0xFF, 0, 1)]
    assert len(entries) == cpus + 4


def test_dsdt_defines_s5() -> None:
    dsdt = Acpi().dsdt()
    assert dsdt[8] == 2
    aml = dsdt[36:]
    # Name (\_S5, Package (4) {Zero, Zero, Zero, Zero})
    s5 = bytes([0x08, 0x5C]) + b"_S5_" + bytes([0x12, 0x06, 0x04, 0, 0, 0, 0])
    assert s5 in aml
    assert bytes([0x10, 0x06, 0x5C]) + b"_SB_" in aml  # Scope (\_SB) {}
    assert aml == acpi.dsdt_aml()


def decode_pkg_length(data: bytes) -> tuple[int, int]:
    """(value, bytes used) of an AML PkgLength."""
    extra = data[0] >> 6
    if extra == 0:
        return data[0] & 0x3F, 1
    value = data[0] & 0xF
    for i in range(extra):
        value |= data[1 + i] << (4 + 8 * i)
    return value, 1 + extra


@pytest.mark.parametrize("body", [0, 5, 62, 63, 64, 200, 4094, 4095, 70000])
def test_aml_pkg_length_counts_itself(body: int) -> None:
    enc = acpi.aml_pkg_length(body)
    value, used = decode_pkg_length(enc)
    assert used == len(enc)
    assert value == body + len(enc)


def test_aml_terms() -> None:
    assert acpi.aml_integer(0) == b"\x00"
    assert acpi.aml_integer(1) == b"\x01"
    assert acpi.aml_integer(5) == b"\x0a\x05"
    assert acpi.aml_integer(0x1234) == b"\x0b\x34\x12"
    assert acpi.aml_name_string("\\_SB.PCI0") == b"\\\x2e_SB_PCI0"
    assert acpi.aml_name_string("_S5") == b"_S5_"
    assert acpi.aml_string("PNP") == b"\x0dPNP\x00"


def test_acpi_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        acpi.build_acpi(cpus=0)
    with pytest.raises(ValueError):
        acpi.build_acpi(base=ACPI_ADDR + 8)


IASL = shutil.which("iasl")
needs_iasl = pytest.mark.skipif(
    IASL is None, reason="iasl not installed (Debian: apt-get install acpica-tools)"
)


def _iasl(*args: str, cwd: Path) -> str:
    assert IASL is not None
    proc = subprocess.run(
        [IASL, *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@needs_iasl
def test_iasl_round_trip(tmp_path: Path) -> None:
    """iasl decompiles every table cleanly and compiles the data tables back to our bytes."""
    a = Acpi(cpus=2)
    entries = a.xsdt_entries()
    fadt = a.fadt()
    tables = {
        "rsdt": a.table(a.mem.u32(a.rsdp + 16)),
        "xsdt": a.table(a.mem.u64(a.rsdp + 24)),
        "facp": fadt,
        "apic": a.table(entries[b"APIC"]),
        "facs": a.mem.read(struct.unpack_from("<I", fadt, 36)[0], 64),
        "dsdt": a.dsdt(),
    }
    for name, data in tables.items():
        (tmp_path / f"{name}.dat").write_bytes(data)
        out = _iasl("-d", f"{name}.dat", cwd=tmp_path)
        dsl = (tmp_path / f"{name}.dsl").read_text()
        for text in (out, dsl):
            assert "Incorrect checksum" not in text
            assert "**** " not in text  # iasl's marker for truncated or invalid structures
        if name == "dsdt":
            assert "Name (\\_S5, Package (0x04)" in dsl
            assert dsl.count("Zero") == 4
            assert "Scope (\\_SB)" in dsl
            continue
        _iasl(f"{name}.dsl", cwd=tmp_path)  # the data table compiler
        rebuilt = (tmp_path / f"{name}.aml").read_bytes()
        assert len(rebuilt) == len(data)
        if name == "facs":
            assert rebuilt == data
        else:  # iasl puts its own compiler id and revision in, hence another checksum
            assert rebuilt[:9] == data[:9] and rebuilt[10:28] == data[10:28]
            assert rebuilt[36:] == data[36:]

    # the RSDP: iasl does not disassemble a bare one, so compile ours from source and compare
    rsdp = a.mem.read(a.rsdp, 36)
    rsdt_addr, xsdt_addr = (
        struct.unpack_from("<I", rsdp, 16)[0],
        struct.unpack_from("<Q", rsdp, 24)[0],
    )
    (tmp_path / "rsdp.asl").write_text(
        '[0008] Signature : "RSD PTR "\n'
        "[0001] Checksum : 00\n"
        f'[0006] Oem ID : "{acpi.OEM_ID.decode()}"\n'
        "[0001] Revision : 02\n"
        f"[0004] RSDT Address : {rsdt_addr:08X}\n"
        "[0004] Length : 00000024\n"
        f"[0008] XSDT Address : {xsdt_addr:016X}\n"
        "[0001] Extended Checksum : 00\n"
        "[0003] Reserved : 000000\n"
    )
    _iasl("rsdp.asl", cwd=tmp_path)
    assert (tmp_path / "rsdp.aml").read_bytes() == rsdp


# ================================================================================================
# MP tables


def find_mpf(blob: bytes, base: int) -> int:
    hits = [base + o for o in range(0, len(blob), 16) if blob[o : o + 4] == b"_MP_"]
    assert len(hits) == 1
    return hits[0]


@pytest.mark.parametrize("cpus", [1, 3])
def test_mptable(cpus: int) -> None:
    blob = mptable.build_mptable(cpus=cpus)
    mem = Mem((MPTABLE_ADDR, blob))
    mpf = find_mpf(blob, MPTABLE_ADDR)
    assert mpf % 16 == 0
    floating = mem.read(mpf, 16)
    assert sums_to_zero(floating)
    config, length, rev, _cksum, feat1, feat2 = struct.unpack_from("<IBBBBB", floating, 4)
    assert (length, rev, feat1, feat2) == (1, 4, 0, 0)

    base_len = mem.u16(config + 4)
    table = mem.read(config, base_len)
    assert table[:4] == b"PCMP" and table[6] == 4
    assert sums_to_zero(table)
    count, lapic, ext_len = struct.unpack_from("<HIH", table, 34)
    assert lapic == LAPIC_ADDR and ext_len == 0

    entries, off = [], 44
    for _ in range(count):
        size = 20 if table[off] == 0 else 8
        entries.append(table[off : off + size])
        off += size
    assert off == base_len
    kinds = [e[0] for e in entries]
    assert kinds == sorted(kinds)

    procs = [struct.unpack_from("<BBBB", e) for e in entries if e[0] == 0]
    assert procs == [(0, i, 0x14, 1 | (2 if i == 0 else 0)) for i in range(cpus)]
    buses = [e for e in entries if e[0] == 1]
    assert buses == [b"\x01\x00ISA   "]
    ioapics = [struct.unpack("<BBBBI", e) for e in entries if e[0] == 2]
    assert ioapics == [(2, cpus, 0x20, 1, IOAPIC_ADDR)]
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    for _, kind, flags, bus, _irq, dst, _pin in ints:
        assert (kind, flags, bus, dst) == (0, 0, 0, cpus)
    assert {e[4]: e[6] for e in ints} == {0: 2, **{i: i for i in range(16) if i not in (0, 2)}}
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(kind, dst, lint) for _, kind, _, _, _, dst, lint in lints] == [
        (3, 0xFF, 0),  # ExtINT on LINT0
        (1, 0xFF, 1),  # NMI on LINT1
    ]


# ================================================================================================
# BDA


def test_bda_and_ebda() -> None:
    pieces = bda.build_bda(mem_size=256 * MIB, ticks=0x1800B0 + 5)
    mem = Mem(*pieces)
    assert mem.u16(0x400) == 0x3F8
    assert mem.u16(0x402) == 0
    assert mem.u16(0x40E) == 0x9FC0
    equipment = mem.u16(0x410)
    assert equipment & 2  # math coprocessor
    assert (equipment >> 9) & 7 == 1  # one serial port
    assert mem.u16(0x413) == 639
    assert mem.u32(0x46C) == 5  # ticks since midnight, wrapped at a day
    assert mem.u8(0x470) == 0
    assert mem.u16(EBDA_ADDR) == 1  # EBDA size in KiB
    assert mem.u16(0x40E) << 4 == EBDA_ADDR
    assert [len(d) for _, d in pieces] == [256, 1024]


# ================================================================================================
# BIOS


class FakeCpu:
    """A RealModeCpu with a dict of registers, a flags word and 1 MiB of memory."""

    def __init__(self, **regs: int) -> None:
        self.regs = dict.fromkeys(bios.REGISTERS, 0)
        self.regs.update(regs)
        self.cf: bool | None = None
        self.zf: bool | None = None
        self.mem = bytearray(1 << 20)

    def get(self, reg: str) -> int:
        return self.regs[reg]

    def set(self, reg: str, value: int) -> None:
        assert reg in bios.REGISTERS
        limit = 0xFFFF if reg in bios.SEGMENTS else 0xFFFFFFFF
        assert 0 <= value <= limit
        self.regs[reg] = value

    def set_carry(self, carry: bool) -> None:
        self.cf = carry

    def set_zero(self, zero: bool) -> None:
        self.zf = zero

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.mem[addr : addr + n])

    def write(self, addr: int, data: bytes) -> None:
        self.mem[addr : addr + len(data)] = data


def services(mem_size: int = 256 * MIB, **kw: object) -> bios.BiosServices:
    return bios.BiosServices(mem_map=memory_map(mem_size), mem_size=mem_size, **kw)  # type: ignore[arg-type]


def test_e820_iteration_returns_the_memory_map() -> None:
    svc = services()
    got, ebx = [], 0
    cpu = FakeCpu(es=0x1000, edi=0x20, esi=0x11111111, ebp=0x2222)
    for _ in range(10):  # Linux's loop: until EBX = 0 or CF
        cpu.regs.update(eax=0xE820, ebx=ebx, ecx=20, edx=bios.SMAP)
        svc.call(0x15, cpu)
        assert cpu.cf is False
        assert cpu.regs["eax"] == bios.SMAP and cpu.regs["ecx"] == 20
        got.append(struct.unpack("<QQI", cpu.read(0x10020, 20)))
        ebx = cpu.regs["ebx"]
        if ebx == 0:
            break
    assert got == memory_map(256 * MIB)
    assert (cpu.regs["esi"], cpu.regs["ebp"], cpu.regs["edx"]) == (0x11111111, 0x2222, bios.SMAP)


def test_e820_extended_entries_and_errors() -> None:
    svc = services()
    cpu = FakeCpu(eax=0xE820, ebx=2, ecx=24, edx=bios.SMAP, es=0, edi=0x500)
    svc.call(0x15, cpu)
    assert cpu.cf is False and cpu.regs["ecx"] == 24 and cpu.regs["ebx"] == 0
    assert struct.unpack("<QQII", cpu.read(0x500, 24)) == (MIB, 255 * MIB, 1, 1)
    past = FakeCpu(eax=0xE820, ebx=3, ecx=20, edx=bios.SMAP, edi=0x500)
    svc.call(0x15, past)
    assert past.cf is True and (past.regs["eax"] >> 8) & 0xFF == 0x86
    bad = FakeCpu(eax=0xE820, ebx=0, ecx=20, edx=0, edi=0x500)
    svc.call(0x15, bad)
    assert bad.cf is True


def test_e801_and_88_for_256_mib() -> None:
    svc = services()
    cpu = FakeCpu(eax=0xE801, ebx=0xABCD0000, edx=0x12340000)
    svc.call(0x15, cpu)
    assert cpu.cf is False
    assert cpu.regs["eax"] & 0xFFFF == cpu.regs["ecx"] & 0xFFFF == 15 * 1024
    assert cpu.regs["ebx"] == 0xABCD0000 | 240 * 16  # upper halves kept
    assert cpu.regs["edx"] == 0x12340000 | 240 * 16
    cpu = FakeCpu(eax=0x8800)
    svc.call(0x15, cpu)
    assert cpu.cf is False and cpu.regs["eax"] == 0xFFFF
    small = services(8 * MIB)
    cpu = FakeCpu(eax=0x8800)
    small.call(0x15, cpu)
    assert cpu.regs["eax"] == 7 * 1024
    cpu = FakeCpu(eax=0xE801)
    small.call(0x15, cpu)
    assert (cpu.regs["eax"], cpu.regs["ebx"]) == (7 * 1024, 0)


def test_unknown_services_set_carry() -> None:
    svc = services()
    for vector, eax in ((0x15, 0xC000), (0x15, 0xEC00), (0x14, 0), (0x17, 0), (0x00, 0)):
        cpu = FakeCpu(eax=eax, ebx=0x55)
        svc.call(vector, cpu)
        assert cpu.cf is True, (vector, eax)
        assert cpu.regs["ebx"] == 0x55
        if vector == 0x15:
            assert (cpu.regs["eax"] >> 8) & 0xFF == 0x86
    for eax in (0x4100, 0x0200, 0x0800):
        cpu = FakeCpu(eax=eax, ebx=0x55AA, edx=0x80)
        svc.call(0x13, cpu)
        assert cpu.cf is True and (cpu.regs["eax"] >> 8) == 1


def test_video_keyboard_and_equipment() -> None:
    out: list[bytes] = []
    svc = services(tty=out.append)
    for ch in b"Hi":
        cpu = FakeCpu(eax=0x0E00 | ch, ebx=7)
        svc.call(0x10, cpu)
        assert cpu.cf is None and cpu.regs["eax"] == 0x0E00 | ch
    assert b"".join(out) == b"Hi"
    cpu = FakeCpu(eax=0x0F00, ebx=0x1234)
    svc.call(0x10, cpu)
    assert cpu.regs["eax"] == 0x5003 and cpu.regs["ebx"] == 0x0034
    cpu = FakeCpu(eax=0x1200, ebx=0x10)
    svc.call(0x10, cpu)
    assert cpu.regs == FakeCpu(eax=0x1200, ebx=0x10).regs  # no-op
    cpu = FakeCpu(eax=0x0100)
    svc.call(0x16, cpu)
    assert cpu.zf is True and cpu.cf is True
    cpu = FakeCpu(eax=0x11)
    svc.call(0x11, cpu)
    assert cpu.regs["eax"] == bda.EQUIPMENT_WORD
    cpu = FakeCpu(eax=0xFFFF0000)
    svc.call(0x12, cpu)
    assert cpu.regs["eax"] == 0xFFFF0000 | 639


def test_clock_services() -> None:
    when = calendar.timegm((2024, 3, 5, 13, 7, 9, 0, 0, 0))
    svc = services(clock_ticks=lambda: 0x12345, now=lambda: when + 0.5)
    cpu = FakeCpu(eax=0x0000)
    svc.call(0x1A, cpu)
    assert cpu.cf is False
    assert (cpu.regs["ecx"], cpu.regs["edx"], cpu.regs["eax"] & 0xFF) == (0x1, 0x2345, 0)
    cpu = FakeCpu(eax=0x0200)
    svc.call(0x1A, cpu)
    assert (cpu.regs["ecx"], cpu.regs["edx"]) == (0x1307, 0x0900)
    cpu = FakeCpu(eax=0x0400)
    svc.call(0x1A, cpu)
    assert (cpu.regs["ecx"], cpu.regs["edx"]) == (0x2024, 0x0305)
    default = services(now=lambda: when)  # ticks from the time of day: 13:07:09
    cpu = FakeCpu(eax=0)
    default.call(0x1A, cpu)
    ticks = (cpu.regs["ecx"] << 16) | cpu.regs["edx"]
    assert ticks == int((13 * 3600 + 7 * 60 + 9) * 1193182 / 65536)


def test_ivt_points_every_vector_at_its_stub() -> None:
    (ivt_addr, ivt), (stubs_addr, stubs) = bios.build_ivt_and_stubs()
    assert (ivt_addr, len(ivt)) == (0, 1024)
    assert stubs_addr == BIOS_STUBS
    assert len(stubs) == 256 * bios.STUB_SIZE <= 0x1000
    for v in range(256):
        off, seg = struct.unpack_from("<HH", ivt, 4 * v)
        linear = (seg << 4) + off
        assert seg == 0xF000 and linear == BIOS_STUBS + v * bios.STUB_SIZE
        stub = stubs[linear - BIOS_STUBS : linear - BIOS_STUBS + bios.STUB_SIZE]
        if v in bios.HW_IRQ_VECTORS:
            assert stub[0] == 0xCF  # iret
        else:
            port = BIOS_PORT.to_bytes(2, "little")
            assert stub[:7] == b"\x52\xba" + port + b"\xef\x5a\xcf"


def test_stub_disassembles_as_documented() -> None:
    import capstone

    _, stubs = bios.build_ivt_and_stubs()[1]
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_16)
    code = stubs[0x15 * bios.STUB_SIZE : 0x16 * bios.STUB_SIZE]
    insns = [(i.address, i.mnemonic, i.op_str) for i in md.disasm(code[:7], 0)]
    assert insns == [
        (0, "push", "dx"),
        (1, "mov", "dx, 0x511"),
        (bios.STUB_OUT_OFFSET, "out", "dx, ax"),
        (5, "pop", "dx"),
        (6, "iret", ""),
    ]


def test_vector_of_round_trips_every_vector() -> None:
    for v in range(256):
        start = BIOS_STUBS + v * bios.STUB_SIZE
        for addr in (start, start + bios.STUB_OUT_OFFSET, start + bios.STUB_SIZE - 1):
            assert bios.vector_of(addr) == v
            assert bios.vector_of(addr - 0xF0000) == v  # the IP in segment F000
        assert bios.vector_of(0xF0000 + bios.stub_offset(v)) == v
    assert bios.vector_of(BIOS_STUBS - 1) is None
    assert bios.vector_of(BIOS_STUBS + 256 * bios.STUB_SIZE) is None
    assert bios.vector_of(0x7C00) is None
    assert bios.vector_of(ACPI_ADDR) is None


# ---- the stubs on a real-mode CPU (unicorn) ----------------------------------------------------


class UnicornCpu:
    """A RawCpu over a unicorn instance."""

    def __init__(self, uc: object) -> None:
        from unicorn import x86_const as X

        self.uc = uc
        self.ids = {
            name: getattr(X, f"UC_X86_REG_{name.upper()}")
            for name in (*bios.GPR32, "esp", "es", "ds", "ss")
        }

    def get(self, reg: str) -> int:
        return int(self.uc.reg_read(self.ids[reg]))  # type: ignore[attr-defined]

    def set(self, reg: str, value: int) -> None:
        self.uc.reg_write(self.ids[reg], value)  # type: ignore[attr-defined]

    def read(self, addr: int, n: int) -> bytes:
        return bytes(self.uc.mem_read(addr, n))  # type: ignore[attr-defined]

    def write(self, addr: int, data: bytes) -> None:
        self.uc.mem_write(addr, data)  # type: ignore[attr-defined]


def run_int(
    vector: int, regs: dict[str, int], svc: bios.BiosServices
) -> tuple[dict[str, int], int]:
    """Run ``pushf; call far F000:stub`` (what ``int`` does) on unicorn; regs and FLAGS after."""
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as X

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_16)
    uc.mem_map(0, 1 << 20)
    for addr, data in bios.build_ivt_and_stubs():
        uc.mem_write(addr, data)
    off, seg = struct.unpack("<HH", uc.mem_read(4 * vector, 4))
    code = b"\x9c\x9a" + struct.pack("<HH", off, seg)  # pushf; call far seg:off
    uc.mem_write(0x7C00, code)
    raw = UnicornCpu(uc)
    for name in ("cs", "ds", "es", "ss"):
        uc.reg_write(getattr(X, f"UC_X86_REG_{name.upper()}"), 0)
    uc.reg_write(X.UC_X86_REG_ESP, 0x7000)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x0003)  # CF set on entry: services must clear it
    for name, value in regs.items():
        raw.set(name, value)
    exits: list[int] = []

    def on_out(uc_: object, port: int, size: int, value: int, _user: object) -> None:
        assert (port, size) == (BIOS_PORT, 2)
        cs = uc.reg_read(X.UC_X86_REG_CS)
        ip = uc.reg_read(X.UC_X86_REG_EIP)
        v = bios.vector_of((cs << 4) + ip)
        assert v is not None
        exits.append(v)
        svc.call(v, bios.StubFrame(raw))

    uc.hook_add(unicorn.UC_HOOK_INSN, on_out, None, 1, 0, X.UC_X86_INS_OUT)
    uc.emu_start(0x7C00, 0x7C00 + len(code), count=100)
    assert exits == [vector]
    assert uc.reg_read(X.UC_X86_REG_ESP) == 0x7000
    names = (*bios.GPR32, "es", "ds")
    return {n: raw.get(n) for n in names}, int(uc.reg_read(X.UC_X86_REG_EFLAGS))


def test_stub_on_a_real_mode_cpu_e820() -> None:
    svc = services()
    regs, flags = run_int(
        0x15,
        {"eax": 0xE820, "ebx": 0, "ecx": 20, "edx": bios.SMAP, "edi": 0x600, "esi": 0x77},
        svc,
    )
    assert flags & bios.FLAG_CF == 0
    assert regs["eax"] == bios.SMAP and regs["ebx"] == 1 and regs["ecx"] == 20
    assert regs["edx"] == bios.SMAP  # the caller's DX came back through the stub's pop
    assert regs["esi"] == 0x77 and regs["edi"] == 0x600
    regs, flags = run_int(0x15, {"eax": 0xE820, "ebx": 9, "ecx": 20, "edx": bios.SMAP}, svc)
    assert flags & bios.FLAG_CF


def test_stub_on_a_real_mode_cpu_returns_dx_and_zf() -> None:
    svc = services(clock_ticks=lambda: 0x0003BEEF)
    regs, flags = run_int(0x1A, {"eax": 0, "edx": 0xAAAA5555}, svc)
    assert regs["ecx"] & 0xFFFF == 0x0003
    assert regs["edx"] == 0xAAAABEEF  # DX returned through the frame, EDX's top half kept
    assert flags & bios.FLAG_CF == 0
    regs, flags = run_int(0x16, {"eax": 0x0100, "edx": 0x1234}, svc)
    assert flags & bios.FLAG_ZF and regs["edx"] == 0x1234
