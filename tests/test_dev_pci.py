"""Tests for PCI configuration mechanism #1 and the 0xCF9 reset (gdbstub.machine.devices.pci)."""

from __future__ import annotations

import pytest

from gdbstub.machine.bus import GuestReset, PortBus
from gdbstub.machine.devices.pci import PciHost


def addr(bus: int, dev: int, fn: int, reg: int) -> int:
    return 0x80000000 | bus << 16 | dev << 11 | fn << 8 | reg


def make() -> tuple[PciHost, PortBus]:
    pci = PciHost()
    bus = PortBus()
    bus.register(0xCF8, 8, pci)
    return pci, bus


def cfg_read(bus: PortBus, b: int, d: int, f: int, reg: int, size: int = 4) -> int:
    bus.write(0xCF8, 4, addr(b, d, f, reg & 0xFC))
    return bus.read(0xCFC + (reg & 3), size)


def test_host_bridge_ids() -> None:
    _, bus = make()
    assert cfg_read(bus, 0, 0, 0, 0x00) == 0x12378086
    assert cfg_read(bus, 0, 0, 0, 0x08) == 0x06000002  # class 06 00 00, revision 2
    assert cfg_read(bus, 0, 0, 0, 0x0C) >> 16 & 0xFF == 0x00  # header type 0


def test_byte_and_word_reads_at_data_offsets() -> None:
    _, bus = make()
    bus.write(0xCF8, 4, addr(0, 0, 0, 0))
    assert bus.read(0xCFC, 1) == 0x86
    assert bus.read(0xCFD, 1) == 0x80
    assert bus.read(0xCFE, 1) == 0x37
    assert bus.read(0xCFF, 1) == 0x12
    assert bus.read(0xCFC, 2) == 0x8086
    assert bus.read(0xCFE, 2) == 0x1237
    bus.write(0xCF8, 4, addr(0, 0, 0, 0x08))
    assert bus.read(0xCFF, 1) == 0x06  # base class
    assert bus.read(0xCFE, 1) == 0x00  # subclass
    assert bus.read(0xCFD, 4) == 0xFFFFFFFF  # crosses the dword


def test_piix3_isa_bridge() -> None:
    _, bus = make()
    assert cfg_read(bus, 0, 1, 0, 0x00) == 0x70008086
    assert cfg_read(bus, 0, 1, 0, 0x08) >> 8 == 0x060100
    assert cfg_read(bus, 0, 1, 0, 0x0E, 1) == 0x80  # multi-function
    assert cfg_read(bus, 0, 1, 0, 0x60) == 0x80808080  # PIRQ routing disabled
    bus.write(0xCF8, 4, addr(0, 1, 0, 0x60))
    bus.write(0xCFE, 1, 0x0B)  # PIRQC -> IRQ 11
    assert cfg_read(bus, 0, 1, 0, 0x60) == 0x800B8080
    assert cfg_read(bus, 0, 1, 1, 0x00) == 0xFFFFFFFF  # no function 1


def test_absent_devices_read_all_ones_and_swallow_writes() -> None:
    _, bus = make()
    for b, d, f in ((0, 2, 0), (0, 31, 7), (1, 0, 0), (255, 0, 0), (0, 0, 1)):
        assert cfg_read(bus, b, d, f, 0x00) == 0xFFFFFFFF
        assert cfg_read(bus, b, d, f, 0x02, 2) == 0xFFFF
        bus.write(0xCFC, 4, 0x12345678)
        assert cfg_read(bus, b, d, f, 0x00) == 0xFFFFFFFF
    assert cfg_read(bus, 0, 0, 0, 0x00) == 0x12378086


def test_enable_bit_off_reads_all_ones() -> None:
    _, bus = make()
    bus.write(0xCF8, 4, addr(0, 0, 0, 0) & 0x7FFFFFFF)
    assert bus.read(0xCFC, 4) == 0xFFFFFFFF
    assert bus.read(0xCFE, 2) == 0xFFFF
    bus.write(0xCFC, 1, 0x00)  # vanishes
    assert cfg_read(bus, 0, 0, 0, 0x00) == 0x12378086


def test_address_register_and_linux_type1_check() -> None:
    _, bus = make()
    bus.write(0xCFB, 1, 0x01)  # pci_check_type1: not part of the address
    tmp = bus.read(0xCF8, 4)
    bus.write(0xCF8, 4, 0x80000000)
    assert bus.read(0xCF8, 4) == 0x80000000
    bus.write(0xCF8, 4, tmp)
    assert bus.read(0xCF8, 4) == tmp
    bus.write(0xCF8, 2, 0x1234)  # a word write does not change the address
    assert bus.read(0xCF8, 4) == tmp


def test_read_only_header_and_bar_sizing() -> None:
    _, bus = make()
    bus.write(0xCF8, 4, addr(0, 0, 0, 0x00))
    bus.write(0xCFC, 4, 0)
    assert bus.read(0xCFC, 4) == 0x12378086
    for bar in range(0x10, 0x28, 4):  # sizing finds no BARs
        bus.write(0xCF8, 4, addr(0, 0, 0, bar))
        bus.write(0xCFC, 4, 0xFFFFFFFF)
        assert bus.read(0xCFC, 4) == 0
    bus.write(0xCF8, 4, addr(0, 0, 0, 0x3C))
    bus.write(0xCFC, 1, 0x0A)  # interrupt line is writable
    assert bus.read(0xCFC, 1) == 0x0A
    bus.write(0xCF8, 4, addr(0, 0, 0, 0x58))
    bus.write(0xCFD, 1, 0x30)  # PAM0
    assert bus.read(0xCFC, 4) == 0x3000


def test_cf9_reset_with_0x06_raises() -> None:
    pci, bus = make()
    bus.write(0xCF9, 1, 0x02)  # hard-reset type, no reset yet
    assert bus.read(0xCF9, 1) == 0x02
    with pytest.raises(GuestReset) as info:
        bus.write(0xCF9, 1, 0x06)
    assert info.value.how == "0xcf9"
    assert pci.resets == 1


def test_dword_address_write_does_not_reset() -> None:
    calls: list[str] = []
    pci = PciHost(on_reset=calls.append)
    pci.write(0xCF8, 4, 0x80000604)  # byte 1 of the dword has bit 2 set
    pci.write(0xCF8, 4, 0xFFFFFFFF)
    assert calls == []
    assert pci.read(0xCF8, 4) == 0xFFFFFFFF
    pci.write(0xCF9, 1, 0x06)
    assert calls == ["0xcf9"]
    assert pci.read(0xCF8, 4) == 0xFFFFFFFF  # the address register is untouched
    pci.write(0xCF9, 1, 0x04)  # soft reset also resets
    assert calls == ["0xcf9", "0xcf9"]
    assert "1237" in pci.describe()
