"""Intel MultiProcessor Specification 1.4 tables (pure builder: bytes for guest memory).

Theory of operation
===================

Kernels that do not read ACPI (or run with ``acpi=off``) find the processors and the interrupt
wiring in the MP tables.  :func:`build_mptable` returns one blob for ``base`` (``MPTABLE_ADDR``,
in the 0xF0000-0xFFFFF window that Linux scans for ``_MP_``)::

    base + 0x00   MP floating pointer structure (16 bytes, 16-byte aligned, spec rev 1.4;
                  feature byte 2 bit 7 IMCRP clear: virtual-wire mode, no IMCR to program)
    base + 0x10   MP configuration table "PCMP": 44-byte header, then the entries sorted by type

The entries are: one processor per CPU (local APIC id = index, version 0x14, enabled, CPU 0 the
bootstrap processor; signature and features from ``machine/cpuid.py``), one ISA bus (id 0), one
I/O APIC (id = ``cpus``, version 0x20, at ``IOAPIC_ADDR``), an INT entry for each ISA IRQ 0-15
except the cascade IRQ 2 (IRQ 0 goes to pin 2, the others to the pin of the same number,
polarity and trigger "conforms to the bus"), and the local interrupts ExtINT on LINT0 and NMI on
LINT1 of every local APIC (destination 0xFF).  Both structures carry a checksum that makes their
bytes sum to zero.
"""

from __future__ import annotations

import struct

from gdbstub.machine.cpuid import APIC, FPU, SIGNATURE_EAX
from gdbstub.machine.firmware.layout import (
    GSI_PIT,
    IOAPIC_ADDR,
    IRQ_PIT,
    LAPIC_ADDR,
    MPTABLE_ADDR,
    MPTABLE_SIZE,
)

MPF_SIGNATURE = b"_MP_"
MPC_SIGNATURE = b"PCMP"
SPEC_REV = 4  # MP spec 1.4
OEM_ID = b"GDBSTUB "
PRODUCT_ID = b"VIRTUAL PC  "
MPF_LENGTH = 16
MPC_HEADER_LENGTH = 44
MAX_CPUS = 254  # local APIC ids 0..cpus-1 and the I/O APIC's id (= cpus) must fit below 0xFF

# entry types and sizes
MP_PROCESSOR, MP_BUS, MP_IOAPIC, MP_INTSRC, MP_LINTSRC = 0, 1, 2, 3, 4
PROCESSOR_ENTRY_SIZE = 20
OTHER_ENTRY_SIZE = 8

CPU_ENABLED = 1 << 0
CPU_BOOTPROCESSOR = 1 << 1
LAPIC_VERSION = 0x14  # integrated local APIC
IOAPIC_VERSION = 0x20  # QEMU's I/O APIC version
IOAPIC_ENABLED = 1 << 0

INT_TYPE_INT, INT_TYPE_NMI, INT_TYPE_SMI, INT_TYPE_EXTINT = 0, 1, 2, 3
IRQ_FLAGS_CONFORMING = 0  # polarity and trigger "conform to the bus" (ISA: edge, active high)
ISA_BUS_ID = 0
ISA_BUS_TYPE = b"ISA   "
ISA_IRQS = 16
CASCADE_IRQ = 2
ALL_LAPICS = 0xFF


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` plus itself sum to zero modulo 256."""
    return -sum(data) & 0xFF


def isa_irq_pin(irq: int) -> int | None:
    """The I/O APIC pin that ISA ``irq`` reaches, or None for the cascade IRQ 2."""
    if irq == CASCADE_IRQ:
        return None
    return GSI_PIT if irq == IRQ_PIT else irq


def _entries(cpus: int) -> list[bytes]:
    cpu_signature = SIGNATURE_EAX & 0xFFF  # stepping, model, family
    cpu_features = (1 << FPU) | (1 << APIC)
    entries: list[bytes] = []
    for cpu in range(cpus):
        flags = CPU_ENABLED | (CPU_BOOTPROCESSOR if cpu == 0 else 0)
        entries.append(
            struct.pack(
                "<BBBBII8x", MP_PROCESSOR, cpu, LAPIC_VERSION, flags, cpu_signature, cpu_features
            )
        )
    entries.append(struct.pack("<BB6s", MP_BUS, ISA_BUS_ID, ISA_BUS_TYPE))
    ioapic_id = cpus
    entries.append(
        struct.pack("<BBBBI", MP_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, IOAPIC_ADDR)
    )
    for irq in range(ISA_IRQS):
        pin = isa_irq_pin(irq)
        if pin is None:
            continue
        entries.append(
            struct.pack(
                "<BBHBBBB",
                MP_INTSRC,
                INT_TYPE_INT,
                IRQ_FLAGS_CONFORMING,
                ISA_BUS_ID,
                irq,
                ioapic_id,
                pin,
            )
        )
    for lint, kind in ((0, INT_TYPE_EXTINT), (1, INT_TYPE_NMI)):
        entries.append(
            struct.pack(
                "<BBHBBBB",
                MP_LINTSRC,
                kind,
                IRQ_FLAGS_CONFORMING,
                ISA_BUS_ID,
                0,
                ALL_LAPICS,
                lint,
            )
        )
    return entries


def build_mptable(*, cpus: int = 1, base: int = MPTABLE_ADDR) -> bytes:
    """The MP floating pointer at ``base`` followed by the configuration table it points to."""
    if not 1 <= cpus <= MAX_CPUS:
        raise ValueError(f"cpus must be 1..{MAX_CPUS}, not {cpus}")
    if base % 16 or base + MPTABLE_SIZE > 1 << 32:
        raise ValueError(f"MP table base {base:#x} must be 16-byte aligned and below 4 GiB")
    entries = _entries(cpus)
    body = b"".join(entries)
    length = MPC_HEADER_LENGTH + len(body)
    header = bytearray(
        struct.pack(
            "<4sHBB8s12sIHHIHBx",
            MPC_SIGNATURE,
            length,
            SPEC_REV,
            0,  # checksum
            OEM_ID,
            PRODUCT_ID,
            0,  # OEM table pointer
            0,  # OEM table size
            len(entries),
            LAPIC_ADDR,
            0,  # extended table length
            0,  # extended table checksum
        )
    )
    config = bytearray(header + body)
    config[7] = checksum(bytes(config))
    config_addr = base + MPF_LENGTH
    mpf = bytearray(
        struct.pack(
            "<4sIBBBB4x",
            MPF_SIGNATURE,
            config_addr,
            MPF_LENGTH // 16,
            SPEC_REV,
            0,  # checksum
            0,  # feature 1: a configuration table is present
        )
    )
    mpf[10] = checksum(bytes(mpf))
    blob = bytes(mpf + config)
    if len(blob) > MPTABLE_SIZE:
        raise ValueError(f"MP tables ({len(blob)} bytes) overflow their {MPTABLE_SIZE:#x} window")
    return blob
