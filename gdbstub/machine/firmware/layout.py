"""Where the machine's firmware and platform live in guest-physical memory and I/O space.

One table for the boot protocols (which must mark these areas reserved or avoid them) and the
firmware builders (which fill them). Everything between ``LOW_RAM_END`` and 1 MiB is reserved in
every memory map the machine hands out.

====================  ===========================================================================
0x00000-0x003ff       real-mode IVT (vectors point at ``BIOS_STUBS``)
0x00400-0x004ff       BIOS data area (BDA)
0x01000-0x0ffff       the boot loader's own structures (``machine/loader.py``)
0x9fc00-0x9ffff       EBDA (1 KiB; BDA word 0x40E holds its segment 0x9fc0)
0xe0000-0xeffff       ACPI tables (RSDP first, 16-byte aligned, found by the BIOS-area scan)
0xf0000-0xf0fff       MP floating pointer and MP configuration table
0xf1000-0xf17ff       BIOS service stubs (one 8-byte stub per vector: ``push dx; mov dx,
                      BIOS_PORT; out dx, ax; pop dx; iret``, see ``bios.py``); the machine
                      answers the port exit in Python
0xfec00000            I/O APIC (MMIO, 4 KiB)
0xfee00000            local APIC (MMIO, 4 KiB)
====================  ===========================================================================
"""

from __future__ import annotations

IVT_ADDR = 0x0
BDA_ADDR = 0x400
LOW_RAM_END = 0x9FC00
EBDA_ADDR = 0x9FC00
EBDA_SIZE = 0x400
HIGH_RAM_START = 0x100000
ACPI_ADDR = 0xE0000
ACPI_SIZE = 0x10000
MPTABLE_ADDR = 0xF0000
MPTABLE_SIZE = 0x1000
BIOS_STUBS = 0xF1000
BIOS_PORT = 0x511  # a port nothing else uses (QEMU's fw_cfg is 0x510-0x511; we have no fw_cfg)

IOAPIC_ADDR = 0xFEC00000
LAPIC_ADDR = 0xFEE00000
MMIO_SIZE = 0x1000

# I/O ports of the PC platform (QEMU's pc machine, i440FX/PIIX)
PIC_MASTER = 0x20
PIC_SLAVE = 0xA0
ELCR = 0x4D0
PIT_PORT = 0x40
PORT61 = 0x61
I8042_DATA = 0x60
I8042_CMD = 0x64
RTC_PORT = 0x70
PORT92 = 0x92
PCI_CONFIG = 0xCF8
RESET_CONTROL = 0xCF9
ACPI_PM_BASE = 0x600  # PM1a_EVT 0x600 (4 bytes), PM1a_CNT 0x604 (2), PM_TMR 0x608 (4)
ACPI_PM1_EVT = ACPI_PM_BASE
ACPI_PM1_CNT = ACPI_PM_BASE + 4
ACPI_PM_TMR = ACPI_PM_BASE + 8
ACPI_LEGACY_OFF = 0xB004  # QEMU's older soft-off port (write 0x2000)
ACPI_RESET_VALUE = 0x06  # FADT reset register: I/O port 0xCF9, value 6

# ISA IRQ wiring (QEMU pc): the PIT on IRQ0 reaches I/O APIC pin 2 (MADT override 0 -> 2);
# the SCI is IRQ 9, level-triggered active high (MADT override 9 -> 9, flags 0xd)
IRQ_PIT = 0
IRQ_KBD = 1
IRQ_COM1 = 4
IRQ_RTC = 8
IRQ_SCI = 9
IRQ_MOUSE = 12
GSI_PIT = 2
