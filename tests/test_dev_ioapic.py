"""Tests for the I/O APIC (gdbstub.machine.devices.ioapic): registers through IOREGSEL/IOWIN,
edge and level pins, remote IRR, masks, polarity and the EOI register."""

from __future__ import annotations

from gdbstub.machine.devices.ioapic import IoApic, IoApicMessage

IOREGSEL, IOWIN, IOEOI = 0x00, 0x10, 0x40
MASKED, LEVEL, REMOTE_IRR, ACTIVE_LOW, LOGICAL = 1 << 16, 1 << 15, 1 << 14, 1 << 13, 1 << 11


class Rig:
    """An IoApic whose messages are recorded."""

    def __init__(self, **kwargs: int) -> None:
        self.sent: list[IoApicMessage] = []
        self.ioapic = IoApic(self.sent.append, **kwargs)

    def read(self, index: int) -> int:
        self.ioapic.mmio_write(IOREGSEL, 4, index)
        return self.ioapic.mmio_read(IOWIN, 4)

    def write(self, index: int, value: int) -> None:
        self.ioapic.mmio_write(IOREGSEL, 4, index)
        self.ioapic.mmio_write(IOWIN, 4, value)

    def program(self, pin: int, low: int, dest: int = 0) -> None:
        """As Linux does: the high half first, then the low half."""
        self.write(0x11 + 2 * pin, dest << 24)
        self.write(0x10 + 2 * pin, low)

    def entry(self, pin: int) -> int:
        return self.read(0x10 + 2 * pin) | (self.read(0x11 + 2 * pin) << 32)


def fixed(vector: int, dest: int = 0, level: bool = False, logical: bool = False) -> IoApicMessage:
    return IoApicMessage(
        dest=dest, dest_logical=logical, delivery_mode=0, vector=vector, level_triggered=level
    )


def test_id_version_arbitration() -> None:
    rig = Rig(apic_id=2)
    assert rig.read(0x00) == 2 << 24
    assert rig.read(0x01) == 0x170020  # version 0x20, 24 pins
    assert rig.read(0x02) == 2 << 24
    rig.write(0x00, 0x05 << 24)
    assert rig.read(0x00) == 5 << 24
    rig.write(0x01, 0)  # read-only
    assert rig.read(0x01) == 0x170020
    assert Rig(pins=16).read(0x01) == 0x0F0020
    rig.ioapic.mmio_write(IOREGSEL, 4, 0x23)
    assert rig.ioapic.mmio_read(IOREGSEL, 4) == 0x23
    assert rig.ioapic.mmio_read(IOWIN + 2, 1) == 0  # a byte of the selected register
    rig.ioapic.mmio_write(IOREGSEL, 4, 0x01)
    assert rig.ioapic.mmio_read(IOWIN + 2, 1) == 0x17


def test_reset_entries_are_masked() -> None:
    rig = Rig()
    assert all(rig.entry(pin) == MASKED for pin in range(24))
    rig.ioapic.set_irq(4, True)
    assert rig.sent == []
    assert rig.read(0x10 + 2 * 24) == 0  # past the last pin


def test_program_an_entry() -> None:
    rig = Rig()
    low = LOGICAL | (1 << 8) | 0x31  # lowest priority, logical
    rig.program(4, low, dest=0x0F)
    assert rig.entry(4) == (0x0F << 56) | low
    rig.write(0x10 + 2 * 4, low | (1 << 12) | REMOTE_IRR)  # read-only bits are not written
    assert rig.entry(4) == (0x0F << 56) | low
    rig.write(0x11 + 2 * 4, 0xFFFFFFFF)  # only bits 63:56 of the high half exist
    assert rig.entry(4) >> 32 == 0xFF000000
    rig.ioapic.set_irq(4, True)
    assert rig.sent == [
        IoApicMessage(dest=0xFF, dest_logical=True, delivery_mode=1, vector=0x31,
                      level_triggered=False)
    ]  # fmt: skip
    assert rig.ioapic.redirection(4) == rig.entry(4)


def test_edge_triggered_delivers_on_rising_edges() -> None:
    rig = Rig()
    rig.program(2, 0x30, dest=1)
    rig.ioapic.set_irq(2, True)
    rig.ioapic.set_irq(2, True)  # no new edge
    assert rig.sent == [fixed(0x30, dest=1)]
    rig.ioapic.set_irq(2, False)
    assert len(rig.sent) == 1
    rig.ioapic.set_irq(2, True)
    assert rig.sent == [fixed(0x30, dest=1)] * 2
    assert not rig.entry(2) & REMOTE_IRR  # edge entries never set remote IRR
    rig.ioapic.eoi(0x30)
    assert len(rig.sent) == 2


def test_level_triggered_remote_irr_until_eoi() -> None:
    rig = Rig()
    rig.program(9, LEVEL | 0x39)
    rig.ioapic.set_irq(9, True)
    assert rig.sent == [fixed(0x39, level=True)]
    assert rig.entry(9) & REMOTE_IRR
    rig.ioapic.set_irq(9, False)
    rig.ioapic.set_irq(9, True)  # still waiting for the EOI
    assert len(rig.sent) == 1
    rig.ioapic.eoi(0x38)  # another vector: nothing
    assert rig.entry(9) & REMOTE_IRR and len(rig.sent) == 1
    rig.ioapic.eoi(0x39)  # still asserted: delivered again
    assert rig.sent == [fixed(0x39, level=True)] * 2 and rig.entry(9) & REMOTE_IRR
    rig.ioapic.set_irq(9, False)
    rig.ioapic.eoi(0x39)  # deasserted: remote IRR clears, nothing sent
    assert not rig.entry(9) & REMOTE_IRR and len(rig.sent) == 2
    rig.ioapic.set_irq(9, True)
    assert len(rig.sent) == 3


def test_masked_pins() -> None:
    rig = Rig()
    rig.program(3, MASKED | 0x33)
    rig.ioapic.set_irq(3, True)  # a masked edge is lost
    rig.program(3, 0x33)
    assert rig.sent == []
    rig.ioapic.set_irq(3, False)
    rig.ioapic.set_irq(3, True)
    assert rig.sent == [fixed(0x33)]
    rig.program(5, MASKED | LEVEL | 0x35)
    rig.ioapic.set_irq(5, True)
    assert len(rig.sent) == 1
    rig.program(5, LEVEL | 0x35)  # unmasking an asserted level entry delivers
    assert rig.sent[-1] == fixed(0x35, level=True) and len(rig.sent) == 2


def test_active_low_polarity() -> None:
    rig = Rig()
    rig.ioapic.set_irq(10, True)  # idle level of an active-low line
    rig.program(10, ACTIVE_LOW | LEVEL | 0x3A)
    assert rig.sent == []
    rig.ioapic.set_irq(10, False)  # asserted
    assert rig.sent == [fixed(0x3A, level=True)]
    rig.ioapic.set_irq(10, True)
    rig.ioapic.eoi(0x3A)
    assert len(rig.sent) == 1
    rig.program(11, ACTIVE_LOW | 0x3B)  # edge: the falling electrical edge counts
    rig.ioapic.set_irq(11, True)
    assert len(rig.sent) == 1
    rig.ioapic.set_irq(11, False)
    assert rig.sent[-1] == fixed(0x3B)


def test_eoi_register() -> None:
    rig = Rig()
    rig.program(9, LEVEL | 0x39)
    rig.ioapic.set_irq(9, True)
    rig.ioapic.mmio_write(IOEOI, 4, 0x39)
    assert len(rig.sent) == 2 and rig.entry(9) & REMOTE_IRR


def test_edge_rewrite_clears_remote_irr() -> None:
    rig = Rig()
    rig.program(9, LEVEL | 0x39)
    rig.ioapic.set_irq(9, True)
    rig.program(9, MASKED | 0x39)  # Linux's unstick: edge clears remote IRR
    assert not rig.entry(9) & REMOTE_IRR
    rig.program(9, LEVEL | 0x39)  # level and asserted again: delivers
    assert len(rig.sent) == 2


def test_nmi_and_extint_are_edge_messages() -> None:
    rig = Rig()
    rig.program(0, (7 << 8) | LEVEL)  # ExtINT (QEMU's BIOS wiring): never remote IRR
    rig.ioapic.set_irq(0, True)
    assert rig.sent[-1].delivery_mode == 7 and not rig.entry(0) & REMOTE_IRR
    rig.program(1, 4 << 8)
    rig.ioapic.set_irq(1, True)
    assert rig.sent[-1].delivery_mode == 4 and len(rig.sent) == 2


def test_describe() -> None:
    rig = Rig()
    rig.program(9, LEVEL | 0x39, dest=3)
    rig.ioapic.set_irq(9, True)
    text = rig.ioapic.describe()
    assert "pin  9: vector 0x39" in text and "remote-IRR" in text and "asserted" in text
    assert "pin  4" not in text
