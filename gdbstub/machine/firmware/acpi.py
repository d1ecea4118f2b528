"""ACPI tables for the ``gdbstub run`` PC (pure builder: bytes for guest memory, no VM calls).

Theory of operation
===================

:func:`build_acpi` lays out one blob that the machine copies to ``base`` (``ACPI_ADDR``, inside
the 0xE0000-0xFFFFF window that Linux scans for the RSDP on a BIOS machine)::

    base + 0x00   RSDP  (ACPI 2.0, 36 bytes, 16-byte aligned; both RSDT and XSDT addresses)
    base + 0x40   FACS  (64 bytes, 64-byte aligned as the spec requires; it has no checksum)
    then          RSDT, XSDT, FADT, MADT, DSDT (8-byte aligned, each with its own checksum)

Every pointer in the tables is an absolute guest-physical address computed from ``base``.

The FADT (revision 3, 244 bytes: the ACPI 2.0/3.0 layout that QEMU's pc and q35 use and Linux
6.1 reads) describes the platform of ``firmware/layout.py``: PM1a event block at 0x600 (4
bytes), PM1a control at 0x604 (2), a 24-bit PM timer at 0x608 (4), SCI on IRQ 9, no GPE blocks,
the reset register (system I/O 0xCF9, value 6), and SMI_CMD = 0, which tells the OS that the
machine is always in ACPI mode (so the PM device should read SCI_EN = 1 in PM1a_CNT).  The
flags are QEMU's pc set (WBINVD, C1, sleep button as a control method, RTC wake from S4,
platform clock) plus RESET_REG_SUP, and the APIC cluster model above 8 CPUs.  IAPC_BOOT_ARCH has
LEGACY_DEVICES and 8042, so Linux keeps its i8042 probe and the CMOS RTC.

The MADT lists one local APIC per CPU (ACPI id = APIC id = index), one I/O APIC (id = ``cpus``,
GSI base 0), the overrides ISA IRQ 0 -> GSI 2 and IRQ 9 -> GSI 9 (level, active high), and an
NMI on LINT1 of every processor.

The DSDT holds hand-encoded AML: an empty ``Scope (\\_SB)`` and ``Name (\\_S5, Package () {0,
0, 0, 0})``, i.e. soft-off is SLP_TYPa = 0 written with SLP_EN to PM1a_CNT (QEMU's value).  The
small AML encoder below (``aml_*``) covers the few terms needed and encodes PkgLength in full.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from gdbstub.machine.firmware.layout import (
    ACPI_ADDR,
    ACPI_PM1_CNT,
    ACPI_PM1_EVT,
    ACPI_PM_TMR,
    ACPI_RESET_VALUE,
    ACPI_SIZE,
    GSI_PIT,
    IOAPIC_ADDR,
    IRQ_PIT,
    IRQ_SCI,
    LAPIC_ADDR,
    RESET_CONTROL,
)

OEM_ID = b"GDBSTB"
OEM_TABLE_ID = b"GDBSTUB "
OEM_REVISION = 1
CREATOR_ID = b"GDBS"
CREATOR_REVISION = 1

RSDP_SIGNATURE = b"RSD PTR "
RSDP_LENGTH = 36
HEADER_LENGTH = 36
FADT_REVISION = 3
FADT_LENGTH = 244
FACS_LENGTH = 64
RTC_CENTURY_INDEX = 0x32
MAX_CPUS = 254  # APIC ids 0..cpus-1 and the I/O APIC's id (= cpus) must fit below 0xFF

# FADT flags (ACPI 6.4 table 5.10)
FADT_WBINVD = 1 << 0
FADT_PROC_C1 = 1 << 2
FADT_SLP_BUTTON = 1 << 5
FADT_RTC_S4 = 1 << 7
FADT_TMR_VAL_EXT = 1 << 8
FADT_RESET_REG_SUP = 1 << 10
FADT_USE_PLATFORM_CLOCK = 1 << 15
FADT_FORCE_APIC_CLUSTER_MODEL = 1 << 18
# FADT IAPC_BOOT_ARCH
BOOT_ARCH_LEGACY_DEVICES = 1 << 0
BOOT_ARCH_8042 = 1 << 1

# Generic Address Structure address spaces
GAS_SYSTEM_MEMORY = 0
GAS_SYSTEM_IO = 1

# MADT
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0
MADT_IO_APIC = 1
MADT_INT_OVERRIDE = 2
MADT_LOCAL_APIC_NMI = 4
MADT_LAPIC_ENABLED = 1 << 0
MPS_INTI_ACTIVE_HIGH = 0x1
MPS_INTI_LEVEL = 0xC
SCI_OVERRIDE_FLAGS = MPS_INTI_ACTIVE_HIGH | MPS_INTI_LEVEL  # 0xd
ALL_PROCESSORS = 0xFF

# AML opcodes (ACPI 6.4 chapter 20)
AML_ZERO = 0x00
AML_ONE = 0x01
AML_NAME = 0x08
AML_BYTE_PREFIX = 0x0A
AML_WORD_PREFIX = 0x0B
AML_DWORD_PREFIX = 0x0C
AML_STRING_PREFIX = 0x0D
AML_QWORD_PREFIX = 0x0E
AML_SCOPE = 0x10
AML_PACKAGE = 0x12
AML_ONES = 0xFF
AML_ROOT_CHAR = 0x5C
AML_PARENT_PREFIX = 0x5E
AML_DUAL_NAME_PREFIX = 0x2E
AML_MULTI_NAME_PREFIX = 0x2F
AML_NULL_NAME = 0x00


@dataclass(frozen=True)
class AcpiTables:
    """The ACPI blob and where its RSDP lands once the blob is written at its base address."""

    blob: bytes
    rsdp_addr: int


# ================================================================================================
# AML encoder


def aml_pkg_length(body_len: int) -> bytes:
    """Encode a PkgLength for ``body_len`` bytes that follow it (the length counts itself)."""
    if body_len + 1 < 0x40:
        return bytes([body_len + 1])
    for extra in (1, 2, 3):
        total = body_len + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0xF)
            return bytes([lead]) + (total >> 4).to_bytes(extra, "little")
    raise ValueError(f"AML package too long: {body_len} bytes")


def _name_seg(seg: str) -> bytes:
    if not 1 <= len(seg) <= 4:
        raise ValueError(f"bad AML name segment {seg!r}")
    raw = seg.upper().ljust(4, "_").encode("ascii")
    if not (raw[0:1].isalpha() or raw[0:1] == b"_") or not all(
        chr(c).isalnum() or c == 0x5F for c in raw
    ):
        raise ValueError(f"bad AML name segment {seg!r}")
    return raw


def aml_name_string(path: str) -> bytes:
    """Encode an ACPI name path such as ``\\_SB.PCI0``, ``^FOO`` or ``_S5``."""
    out = bytearray()
    rest = path
    if rest.startswith("\\"):
        out.append(AML_ROOT_CHAR)
        rest = rest[1:]
    else:
        while rest.startswith("^"):
            out.append(AML_PARENT_PREFIX)
            rest = rest[1:]
    segs = [_name_seg(s) for s in rest.split(".")] if rest else []
    if not segs:
        out.append(AML_NULL_NAME)
    elif len(segs) == 1:
        out += segs[0]
    elif len(segs) == 2:
        out.append(AML_DUAL_NAME_PREFIX)
        out += b"".join(segs)
    else:
        out += bytes([AML_MULTI_NAME_PREFIX, len(segs)]) + b"".join(segs)
    return bytes(out)


def aml_integer(value: int) -> bytes:
    """The shortest AML encoding of an integer constant (ZeroOp, OneOp, OnesOp or a prefix)."""
    if value == 0:
        return bytes([AML_ZERO])
    if value == 1:
        return bytes([AML_ONE])
    if value == (1 << 64) - 1:
        return bytes([AML_ONES])
    for prefix, size in (
        (AML_BYTE_PREFIX, 1),
        (AML_WORD_PREFIX, 2),
        (AML_DWORD_PREFIX, 4),
        (AML_QWORD_PREFIX, 8),
    ):
        if 0 <= value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"AML integer out of range: {value}")


def aml_string(text: str) -> bytes:
    """An AML String (ASCII, NUL-terminated)."""
    return bytes([AML_STRING_PREFIX]) + text.encode("ascii") + b"\0"


def aml_package(elements: Iterable[bytes | int]) -> bytes:
    """``Package () {...}`` of already-encoded data objects (ints are encoded for you)."""
    items = [aml_integer(e) if isinstance(e, int) else e for e in elements]
    if len(items) > 0xFF:
        raise ValueError("AML Package has more than 255 elements")
    body = bytes([len(items)]) + b"".join(items)
    return bytes([AML_PACKAGE]) + aml_pkg_length(len(body)) + body


def aml_name(path: str, data: bytes) -> bytes:
    """``Name (path, data)``."""
    return bytes([AML_NAME]) + aml_name_string(path) + data


def aml_scope(path: str, body: bytes = b"") -> bytes:
    """``Scope (path) { body }``."""
    inner = aml_name_string(path) + body
    return bytes([AML_SCOPE]) + aml_pkg_length(len(inner)) + inner


def dsdt_aml() -> bytes:
    """The DSDT's AML body: an empty ``\\_SB`` scope and the S5 (soft-off) sleep package."""
    return aml_scope("\\_SB") + aml_name("\\_S5", aml_package([0, 0, 0, 0]))


# ================================================================================================
# tables


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to zero modulo 256."""
    return -sum(data) & 0xFF


def _with_checksum(data: bytes, offset: int) -> bytes:
    """``data`` with the checksum byte at ``offset`` set (the byte must be 0 on entry)."""
    buf = bytearray(data)
    buf[offset] = checksum(bytes(buf))
    return bytes(buf)


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A complete System Description Table: standard header, ``body``, correct checksum."""
    header = struct.pack(
        "<4sIBB6s8sI4sI",
        signature,
        HEADER_LENGTH + len(body),
        revision,
        0,
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        CREATOR_ID,
        CREATOR_REVISION,
    )
    return _with_checksum(header + body, 9)


def gas(space: int, bit_width: int, address: int, access_size: int = 0) -> bytes:
    """A Generic Address Structure (12 bytes); bit offset 0; access size 0 = legacy."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def build_rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """The ACPI 2.0 RSDP: checksum over the first 20 bytes, extended checksum over all 36."""
    first = struct.pack("<8sB6sBI", RSDP_SIGNATURE, 0, OEM_ID, 2, rsdt_addr)
    first = _with_checksum(first, 8)
    whole = first + struct.pack("<IQB3x", RSDP_LENGTH, xsdt_addr, 0)
    return _with_checksum(whole, 32)


def build_facs() -> bytes:
    """The FACS (version 2, no global-lock or S4BIOS support, no waking vector yet)."""
    return struct.pack("<4sIIIIIQBxxxI24x", b"FACS", FACS_LENGTH, 0, 0, 0, 0, 0, 2, 0)


def build_fadt(*, facs_addr: int, dsdt_addr: int, cpus: int) -> bytes:
    """The FADT (revision 3) of the PIIX-style PM block at ``ACPI_PM_BASE``."""
    flags = (
        FADT_WBINVD
        | FADT_PROC_C1
        | FADT_SLP_BUTTON
        | FADT_RTC_S4
        | FADT_RESET_REG_SUP
        | FADT_USE_PLATFORM_CLOCK
    )
    if cpus > 8:  # flat logical destination mode addresses at most 8 CPUs
        flags |= FADT_FORCE_APIC_CLUSTER_MODEL
    body = bytearray()
    body += struct.pack(
        "<IIBBHIBBBB",
        facs_addr,  # FIRMWARE_CTRL
        dsdt_addr,  # DSDT
        1,  # INT_MODEL (ACPI 1.0; reserved since): multiple APIC, as QEMU sets it
        0,  # Preferred_PM_Profile: unspecified
        IRQ_SCI,  # SCI_INT
        0,  # SMI_CMD: none, the machine is always in ACPI mode
        0,  # ACPI_ENABLE
        0,  # ACPI_DISABLE
        0,  # S4BIOS_REQ
        0,  # PSTATE_CNT
    )
    body += struct.pack(
        "<8I",
        ACPI_PM1_EVT,  # PM1a_EVT_BLK
        0,  # PM1b_EVT_BLK
        ACPI_PM1_CNT,  # PM1a_CNT_BLK
        0,  # PM1b_CNT_BLK
        0,  # PM2_CNT_BLK
        ACPI_PM_TMR,  # PM_TMR_BLK
        0,  # GPE0_BLK
        0,  # GPE1_BLK
    )
    body += struct.pack(
        "<BBBBBBBBHHHHBBBBBHBI",
        4,  # PM1_EVT_LEN
        2,  # PM1_CNT_LEN
        0,  # PM2_CNT_LEN
        4,  # PM_TMR_LEN
        0,  # GPE0_BLK_LEN
        0,  # GPE1_BLK_LEN
        0,  # GPE1_BASE
        0,  # CST_CNT
        0xFFF,  # P_LVL2_LAT: > 100, no C2
        0xFFF,  # P_LVL3_LAT: > 1000, no C3
        0,  # FLUSH_SIZE
        0,  # FLUSH_STRIDE
        0,  # DUTY_OFFSET
        0,  # DUTY_WIDTH
        0,  # DAY_ALRM
        0,  # MON_ALRM
        RTC_CENTURY_INDEX,  # CENTURY
        BOOT_ARCH_LEGACY_DEVICES | BOOT_ARCH_8042,  # IAPC_BOOT_ARCH
        0,  # reserved
        flags,
    )
    body += gas(GAS_SYSTEM_IO, 8, RESET_CONTROL)  # RESET_REG
    body += struct.pack("<BHB", ACPI_RESET_VALUE, 0, 0)  # RESET_VALUE, ARM_BOOT_ARCH, minor
    body += struct.pack("<QQ", facs_addr, dsdt_addr)  # X_FIRMWARE_CTRL, X_DSDT
    body += gas(GAS_SYSTEM_IO, 32, ACPI_PM1_EVT)  # X_PM1a_EVT_BLK
    body += gas(GAS_SYSTEM_MEMORY, 0, 0)  # X_PM1b_EVT_BLK
    body += gas(GAS_SYSTEM_IO, 16, ACPI_PM1_CNT)  # X_PM1a_CNT_BLK
    body += gas(GAS_SYSTEM_MEMORY, 0, 0)  # X_PM1b_CNT_BLK
    body += gas(GAS_SYSTEM_MEMORY, 0, 0)  # X_PM2_CNT_BLK
    body += gas(GAS_SYSTEM_IO, 32, ACPI_PM_TMR)  # X_PM_TMR_BLK
    body += gas(GAS_SYSTEM_MEMORY, 0, 0)  # X_GPE0_BLK
    body += gas(GAS_SYSTEM_MEMORY, 0, 0)  # X_GPE1_BLK
    table = sdt(b"FACP", FADT_REVISION, bytes(body))
    assert len(table) == FADT_LENGTH
    return table


def build_madt(*, cpus: int) -> bytes:
    """The MADT: local APICs, the I/O APIC, ISA overrides and the LINT1 NMI."""
    body = bytearray(struct.pack("<II", LAPIC_ADDR, MADT_PCAT_COMPAT))
    for cpu in range(cpus):
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, cpu, cpu, MADT_LAPIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, cpus, 0, IOAPIC_ADDR, 0)
    body += struct.pack("<BBBBIH", MADT_INT_OVERRIDE, 10, 0, IRQ_PIT, GSI_PIT, 0)
    body += struct.pack("<BBBBIH", MADT_INT_OVERRIDE, 10, 0, IRQ_SCI, IRQ_SCI, SCI_OVERRIDE_FLAGS)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, 0, 1)
    return sdt(b"APIC", 3, bytes(body))


def build_dsdt() -> bytes:
    """The DSDT (revision 2: 64-bit AML integers) around :func:`dsdt_aml`."""
    return sdt(b"DSDT", 2, dsdt_aml())


def _align(value: int, to: int) -> int:
    return (value + to - 1) & ~(to - 1)


def build_acpi(*, cpus: int = 1, base: int = ACPI_ADDR) -> AcpiTables:
    """Build every table for a machine with ``cpus`` CPUs, as one blob to write at ``base``."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"cpus must be 1..{MAX_CPUS}, not {cpus}")
    if base % 16 or base + ACPI_SIZE > 1 << 32:
        raise ValueError(f"ACPI base {base:#x} must be 16-byte aligned and below 4 GiB")
    facs_off = 0x40
    rsdt_off = facs_off + FACS_LENGTH
    n_tables = 2  # FADT, MADT (the DSDT and FACS hang off the FADT)
    xsdt_off = _align(rsdt_off + HEADER_LENGTH + 4 * n_tables, 8)
    fadt_off = _align(xsdt_off + HEADER_LENGTH + 8 * n_tables, 8)
    madt_off = _align(fadt_off + FADT_LENGTH, 8)
    madt = build_madt(cpus=cpus)
    dsdt_off = _align(madt_off + len(madt), 8)
    dsdt = build_dsdt()
    fadt = build_fadt(facs_addr=base + facs_off, dsdt_addr=base + dsdt_off, cpus=cpus)
    pointed = (base + fadt_off, base + madt_off)
    rsdt = sdt(b"RSDT", 1, struct.pack(f"<{n_tables}I", *pointed))
    xsdt = sdt(b"XSDT", 1, struct.pack(f"<{n_tables}Q", *pointed))
    rsdp = build_rsdp(base + rsdt_off, base + xsdt_off)

    blob = bytearray(dsdt_off + len(dsdt))
    for off, table in (
        (0, rsdp),
        (facs_off, build_facs()),
        (rsdt_off, rsdt),
        (xsdt_off, xsdt),
        (fadt_off, fadt),
        (madt_off, madt),
        (dsdt_off, dsdt),
    ):
        blob[off : off + len(table)] = table
    if len(blob) > ACPI_SIZE:
        raise ValueError(f"ACPI tables ({len(blob)} bytes) overflow their {ACPI_SIZE:#x} window")
    return AcpiTables(blob=bytes(blob), rsdp_addr=base)
