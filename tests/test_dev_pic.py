"""Tests for gdbstub.machine.devices.pic: the dual 8259A as a guest (and the CPU's INTA) sees it."""

from __future__ import annotations

import threading

import pytest

from gdbstub.machine.devices.pic import DualPic

M_CMD, M_DATA, S_CMD, S_DATA = 0x20, 0x21, 0xA0, 0xA1
ELCR0, ELCR1 = 0x4D0, 0x4D1
MASTER_BASE, SLAVE_BASE = 0x30, 0x38  # Linux's ISA_IRQ_VECTOR(0) and (8) on x86-64


def out(pic: DualPic, port: int, value: int) -> None:
    pic.write(port, 1, value)


def inb(pic: DualPic, port: int) -> int:
    return pic.read(port, 1)


def linux_init(pic: DualPic, auto_eoi: bool = False) -> None:
    """arch/x86/kernel/i8259.c init_8259A, then the masks Linux caches (all masked)."""
    out(pic, M_DATA, 0xFF)
    out(pic, M_CMD, 0x11)  # ICW1: edge, cascade, ICW4 follows
    out(pic, M_DATA, MASTER_BASE)  # ICW2
    out(pic, M_DATA, 1 << 2)  # ICW3: slave on IR2
    out(pic, M_DATA, 0x03 if auto_eoi else 0x01)  # ICW4: 8086 mode (+ AEOI)
    out(pic, S_CMD, 0x11)
    out(pic, S_DATA, SLAVE_BASE)
    out(pic, S_DATA, 2)  # ICW3: slave id 2
    out(pic, S_DATA, 0x01)
    out(pic, M_DATA, 0xFF)
    out(pic, S_DATA, 0xFF)


def isr(pic: DualPic, cmd: int) -> int:
    """Linux's i8259A_irq_real: OCW3 read-ISR, read, back to IRR."""
    out(pic, cmd, 0x0B)
    value = inb(pic, cmd)
    out(pic, cmd, 0x0A)
    return value


def irr(pic: DualPic, cmd: int) -> int:
    out(pic, cmd, 0x0A)
    return inb(pic, cmd)


def ready_pic(master_mask: int = 0x00, slave_mask: int = 0x00) -> DualPic:
    pic = DualPic()
    linux_init(pic)
    out(pic, M_DATA, master_mask)
    out(pic, S_DATA, slave_mask)
    return pic


def edge(pic: DualPic, irq: int) -> None:
    pic.set_irq(irq, True)
    pic.set_irq(irq, False)


def test_power_on_state_and_linux_probe() -> None:
    pic = DualPic()
    assert not pic.int_output()
    assert inb(pic, M_DATA) == 0x00 and inb(pic, S_DATA) == 0x00
    assert inb(pic, M_CMD) == 0x00  # IRR
    # probe_8259A: mask the slave, write all-but-cascade to the master, read it back
    out(pic, S_DATA, 0xFF)
    out(pic, M_DATA, 0xFB)
    assert inb(pic, M_DATA) == 0xFB
    assert inb(pic, S_DATA) == 0xFF
    # an unowned port of a wide access reads as an empty ISA bus
    assert pic.read(M_DATA, 2) == 0xFFFB


def test_linux_init_sequence() -> None:
    pic = DualPic()
    out(pic, M_DATA, 0x12)
    pic.set_irq(0, True)
    assert pic.int_output()
    linux_init(pic)
    assert inb(pic, M_DATA) == 0xFF and inb(pic, S_DATA) == 0xFF
    assert irr(pic, M_CMD) == 0 and isr(pic, M_CMD) == 0  # ICW1 forgot the edge
    assert not pic.int_output()
    # the line is still high: an edge needs low -> high after ICW1
    out(pic, M_DATA, 0xFA)  # unmask IRQ0 and the cascade
    pic.set_irq(0, True)
    assert not pic.int_output()
    pic.set_irq(0, False)
    pic.set_irq(0, True)
    assert pic.int_output()
    assert pic.acknowledge() == MASTER_BASE
    assert "base 0x30" in pic.describe() and "base 0x38" in pic.describe()


def test_icw_sequence_variants() -> None:
    pic = DualPic()
    # no ICW4: ICW2, ICW3, then the data port is the IMR again, ICW4 functions off
    out(pic, M_CMD, 0x10)
    assert "expects ICW2" in pic.describe()
    out(pic, M_DATA, 0x47)  # the low three bits of ICW2 are not part of the base
    out(pic, M_DATA, 0x04)
    out(pic, M_DATA, 0x5A)
    assert inb(pic, M_DATA) == 0x5A
    out(pic, M_DATA, 0x00)
    edge(pic, 3)
    assert pic.acknowledge() == 0x43
    assert isr(pic, M_CMD) == 0x08
    # single mode with ICW4: ICW2 then straight to ICW4 (auto-EOI here)
    out(pic, M_CMD, 0x13)
    out(pic, M_DATA, 0x80)
    out(pic, M_DATA, 0x03)
    out(pic, M_DATA, 0xF0)
    assert inb(pic, M_DATA) == 0xF0
    edge(pic, 1)
    assert pic.acknowledge() == 0x81
    assert isr(pic, M_CMD) == 0  # auto-EOI


def test_edge_irq0_gives_base_and_moves_irr_to_isr() -> None:
    calls: list[int] = []
    pic = DualPic(lambda: calls.append(1))
    linux_init(pic)
    out(pic, M_DATA, 0xFE)
    calls.clear()
    pic.set_irq(0, True)
    assert pic.int_output() and calls == [1]
    assert irr(pic, M_CMD) == 0x01
    pic.set_irq(0, True)  # no new edge while the line stays high
    pic.set_irq(0, False)  # the latch survives the line dropping
    assert pic.int_output() and calls == [1]
    assert pic.acknowledge() == MASTER_BASE
    assert not pic.int_output()
    assert irr(pic, M_CMD) == 0 and isr(pic, M_CMD) == 0x01
    out(pic, M_CMD, 0x20)  # non-specific EOI
    assert isr(pic, M_CMD) == 0
    assert not pic.int_output()  # one edge, one interrupt


def test_masks() -> None:
    pic = ready_pic(master_mask=0xFF)
    edge(pic, 4)
    assert not pic.int_output()
    assert irr(pic, M_CMD) == 0x10  # requested, just masked
    out(pic, M_DATA, 0xEF)
    assert pic.int_output()
    out(pic, M_DATA, 0xFF)
    assert not pic.int_output()
    # a masked cascade hides the whole slave
    out(pic, M_DATA, 0xFB)
    out(pic, S_DATA, 0xFF)
    edge(pic, 12)
    assert not pic.int_output()
    out(pic, S_DATA, 0xEF)
    assert pic.int_output()
    out(pic, M_DATA, 0xFF)
    assert not pic.int_output()


def test_priority_and_nesting() -> None:
    pic = ready_pic()
    edge(pic, 3)
    edge(pic, 1)
    assert pic.acknowledge() == MASTER_BASE + 1  # lower IRQ number first
    assert not pic.int_output()  # IRQ3 waits behind IRQ1 in service
    edge(pic, 0)
    assert pic.int_output()  # IRQ0 outranks it and nests
    assert pic.acknowledge() == MASTER_BASE + 0
    assert isr(pic, M_CMD) == 0x03
    out(pic, M_CMD, 0x20)  # non-specific EOI ends the highest: IRQ0
    assert isr(pic, M_CMD) == 0x02
    assert not pic.int_output()
    out(pic, M_CMD, 0x20)
    assert pic.int_output()
    assert pic.acknowledge() == MASTER_BASE + 3


def test_eoi_variants_and_rotation() -> None:
    pic = ready_pic()
    edge(pic, 6)
    assert pic.acknowledge() == MASTER_BASE + 6
    edge(pic, 7)
    edge(pic, 4)
    assert pic.acknowledge() == MASTER_BASE + 4  # nests above IRQ6
    assert isr(pic, M_CMD) == 0x50
    # a specific EOI ends IRQ6 although IRQ4 (higher) is still in service
    out(pic, M_CMD, 0x66)
    assert isr(pic, M_CMD) == 0x10
    assert not pic.int_output()  # IRQ7 still waits behind IRQ4
    out(pic, M_CMD, 0x64)
    assert pic.acknowledge() == MASTER_BASE + 7
    out(pic, M_CMD, 0x67)
    assert isr(pic, M_CMD) == 0 and not pic.int_output()

    # rotate on non-specific EOI: the IRQ just served becomes the lowest
    edge(pic, 0)
    assert pic.acknowledge() == MASTER_BASE
    out(pic, M_CMD, 0xA0)
    assert isr(pic, M_CMD) == 0
    edge(pic, 0)
    edge(pic, 5)
    assert pic.acknowledge() == MASTER_BASE + 5  # IRQ1 is now the highest, IRQ0 the lowest
    # rotate on specific EOI for IRQ5: now IRQ6 is the highest, ahead of IRQ0
    out(pic, M_CMD, 0xE5)
    edge(pic, 6)
    assert pic.acknowledge() == MASTER_BASE + 6
    out(pic, M_CMD, 0x20)
    assert pic.acknowledge() == MASTER_BASE + 0
    out(pic, M_CMD, 0x20)
    # set priority: IRQ4 lowest, IRQ5 highest
    out(pic, M_CMD, 0xC4)
    edge(pic, 3)
    edge(pic, 6)
    assert pic.acknowledge() == MASTER_BASE + 6
    out(pic, M_CMD, 0x20)
    assert pic.acknowledge() == MASTER_BASE + 3
    out(pic, M_CMD, 0x20)
    out(pic, M_CMD, 0xC7)  # back to IRQ0 highest
    edge(pic, 7)
    edge(pic, 0)
    assert pic.acknowledge() == MASTER_BASE + 0
    # the NOP command changes nothing
    out(pic, M_CMD, 0x40)
    assert isr(pic, M_CMD) == 0x01


def test_auto_eoi() -> None:
    pic = DualPic()
    linux_init(pic, auto_eoi=True)
    out(pic, M_DATA, 0x00)
    edge(pic, 1)
    edge(pic, 4)
    assert pic.acknowledge() == MASTER_BASE + 1
    assert isr(pic, M_CMD) == 0  # no EOI needed
    assert pic.int_output()  # IRQ4 is not held back by IRQ1
    assert pic.acknowledge() == MASTER_BASE + 4
    assert not pic.int_output()
    # rotate in auto-EOI mode: the IRQ served becomes the lowest
    out(pic, M_CMD, 0x80)
    edge(pic, 3)
    assert pic.acknowledge() == MASTER_BASE + 3
    edge(pic, 1)
    edge(pic, 5)
    assert pic.acknowledge() == MASTER_BASE + 5
    out(pic, M_CMD, 0x00)  # rotation off again
    assert pic.acknowledge() == MASTER_BASE + 1


def test_elcr_fixed_bits_and_readback() -> None:
    pic = DualPic()
    out(pic, ELCR0, 0xFF)
    out(pic, ELCR1, 0xFF)
    assert inb(pic, ELCR0) == 0xF8  # IRQ 0, 1, 2 stay edge
    assert inb(pic, ELCR1) == 0xDE  # IRQ 8 and 13 stay edge
    pic.write(ELCR0, 2, 0x0220)
    assert pic.read(ELCR0, 2) == 0x0220
    # ICW1 keeps the ELCR, a machine reset clears it
    linux_init(pic)
    assert pic.read(ELCR0, 2) == 0x0220
    pic.reset()
    assert pic.read(ELCR0, 2) == 0
    # IRQ0 stays edge even with the ELCR written all ones
    out(pic, ELCR0, 0xFF)
    linux_init(pic)
    out(pic, M_DATA, 0x00)
    pic.set_irq(0, True)
    assert pic.acknowledge() == MASTER_BASE
    out(pic, M_CMD, 0x20)
    assert not pic.int_output()


def test_level_triggered_stays_pending_until_line_drops() -> None:
    pic = ready_pic()
    out(pic, ELCR0, 0x20)  # IRQ5 level
    out(pic, ELCR1, 0x02)  # IRQ9 (the SCI) level
    pic.set_irq(5, True)
    assert pic.acknowledge() == MASTER_BASE + 5
    assert irr(pic, M_CMD) & 0x20  # a level request is not cleared by INTA
    assert not pic.int_output()  # held back by its own ISR bit
    out(pic, M_CMD, 0x20)
    assert pic.int_output()  # still high after EOI: interrupts again
    assert pic.acknowledge() == MASTER_BASE + 5
    pic.set_irq(5, False)
    out(pic, M_CMD, 0x20)
    assert not pic.int_output()
    assert irr(pic, M_CMD) == 0

    pic.set_irq(9, True)
    assert pic.acknowledge() == SLAVE_BASE + 1
    out(pic, S_CMD, 0x20)
    out(pic, M_CMD, 0x20)
    assert pic.int_output()
    assert pic.acknowledge() == SLAVE_BASE + 1
    pic.set_irq(9, False)
    out(pic, S_CMD, 0x20)
    out(pic, M_CMD, 0x20)
    assert not pic.int_output()

    # an edge-mode line held high interrupts once only
    pic.set_irq(6, True)
    assert pic.acknowledge() == MASTER_BASE + 6
    out(pic, M_CMD, 0x20)
    assert not pic.int_output()


def test_slave_irq8_through_the_cascade() -> None:
    pic = ready_pic(master_mask=0xFB, slave_mask=0xFE)
    edge(pic, 8)
    assert pic.int_output()
    assert irr(pic, S_CMD) == 0x01 and irr(pic, M_CMD) == 0x04
    assert pic.acknowledge() == SLAVE_BASE + 0
    assert isr(pic, S_CMD) == 0x01 and isr(pic, M_CMD) == 0x04
    assert irr(pic, S_CMD) == 0 and irr(pic, M_CMD) == 0
    # Linux's mask_and_ack_8259A for IRQ >= 8: specific EOI to the slave, then to IR2
    out(pic, S_CMD, 0x60)
    out(pic, M_CMD, 0x62)
    assert isr(pic, S_CMD) == 0 and isr(pic, M_CMD) == 0
    # a second slave IRQ arriving while the first is in service comes after both EOIs
    out(pic, S_DATA, 0x00)
    edge(pic, 14)
    assert pic.acknowledge() == SLAVE_BASE + 6
    edge(pic, 11)
    assert not pic.int_output()  # the master's IR2 is in service
    out(pic, S_CMD, 0x20)
    assert not pic.int_output()
    out(pic, M_CMD, 0x20)
    assert pic.int_output()
    assert pic.acknowledge() == SLAVE_BASE + 3
    # a slave IRQ outranks master IRQ 3-7, but not IRQ0/1
    out(pic, S_CMD, 0x20)
    out(pic, M_CMD, 0x20)
    out(pic, M_DATA, 0x00)
    edge(pic, 5)
    edge(pic, 15)
    edge(pic, 1)
    assert pic.acknowledge() == MASTER_BASE + 1
    out(pic, M_CMD, 0x20)
    assert pic.acknowledge() == SLAVE_BASE + 7
    assert isr(pic, S_CMD) == 0x80  # a real IRQ15: its ISR bit is set
    out(pic, S_CMD, 0x20)
    out(pic, M_CMD, 0x20)
    assert pic.acknowledge() == MASTER_BASE + 5


def test_spurious_irq7_when_the_request_goes_away() -> None:
    calls: list[int] = []
    pic = DualPic(lambda: calls.append(1))
    linux_init(pic)
    out(pic, M_DATA, 0x00)
    out(pic, ELCR0, 0x08)  # IRQ3 level
    pic.set_irq(3, True)
    assert pic.int_output() and len(calls) == 1
    pic.set_irq(3, False)  # gone before the CPU acknowledged
    assert not pic.int_output()
    assert pic.acknowledge() == MASTER_BASE + 7
    assert isr(pic, M_CMD) == 0  # what Linux's spurious check looks at
    # the same with an edge request masked between INTR and INTA
    edge(pic, 4)
    out(pic, M_DATA, 0x10)
    assert pic.acknowledge() == MASTER_BASE + 7
    assert isr(pic, M_CMD) == 0 and irr(pic, M_CMD) == 0x10
    # a genuine IRQ7 sets its ISR bit, which tells it from a spurious one
    edge(pic, 7)
    assert pic.acknowledge() == MASTER_BASE + 7
    assert isr(pic, M_CMD) == 0x80


def test_spurious_irq15_sets_the_master_cascade_isr() -> None:
    pic = ready_pic()
    out(pic, ELCR1, 0x04)  # IRQ10 level
    pic.set_irq(10, True)
    assert pic.int_output()
    pic.set_irq(10, False)
    assert pic.acknowledge() == SLAVE_BASE + 7
    assert isr(pic, S_CMD) == 0
    assert isr(pic, M_CMD) == 0x04  # the master served IR2
    out(pic, M_CMD, 0x62)  # Linux EOIs the master for a spurious IRQ15
    assert isr(pic, M_CMD) == 0 and not pic.int_output()
    # nothing at all pending: the master's spurious IRQ7
    assert pic.acknowledge() == MASTER_BASE + 7
    assert isr(pic, M_CMD) == 0


def test_irr_isr_reads_through_ocw3() -> None:
    pic = ready_pic()
    edge(pic, 6)
    edge(pic, 1)
    pic.acknowledge()
    assert inb(pic, M_CMD) == 0x40  # IRR is the default after ICW1
    out(pic, M_CMD, 0x0B)
    assert inb(pic, M_CMD) == 0x02
    assert inb(pic, M_CMD) == 0x02  # the selection sticks
    assert inb(pic, M_DATA) == 0x00  # the data port always reads the IMR
    out(pic, M_CMD, 0x08)  # OCW3 with RR clear leaves the selection alone
    assert inb(pic, M_CMD) == 0x02
    out(pic, M_CMD, 0x0A)
    assert inb(pic, M_CMD) == 0x40


def test_poll_mode() -> None:
    pic = ready_pic()
    edge(pic, 5)
    edge(pic, 3)
    out(pic, M_CMD, 0x0C)  # OCW3 poll
    assert inb(pic, M_CMD) == 0x83  # the poll read acknowledges IRQ3
    assert isr(pic, M_CMD) == 0x08
    assert inb(pic, M_CMD) == 0x20  # one read only: back to the IRR
    out(pic, M_CMD, 0x20)
    out(pic, M_CMD, 0x0C)
    assert inb(pic, M_DATA) == 0x85  # either port answers the poll
    out(pic, M_CMD, 0x20)
    assert not pic.int_output()
    out(pic, M_CMD, 0x0C)
    assert inb(pic, M_CMD) == 0x00  # nothing pending


def test_special_mask_mode() -> None:
    pic = ready_pic()
    edge(pic, 1)
    assert pic.acknowledge() == MASTER_BASE + 1
    edge(pic, 3)
    assert not pic.int_output()
    out(pic, M_DATA, 0x02)  # mask the in-service IRQ1 ...
    assert not pic.int_output()
    out(pic, M_CMD, 0x68)  # ... and in special mask mode it no longer blocks
    assert pic.int_output()
    assert pic.acknowledge() == MASTER_BASE + 3
    out(pic, M_CMD, 0x63)
    out(pic, M_CMD, 0x48)  # special mask mode off
    edge(pic, 4)
    assert not pic.int_output()  # IRQ1 is still in service
    out(pic, M_CMD, 0x61)
    assert pic.acknowledge() == MASTER_BASE + 4


def test_bios_setup_and_notify_from_another_thread() -> None:
    calls: list[str] = []
    pic = DualPic(lambda: calls.append(threading.current_thread().name))
    pic.bios_setup()
    assert inb(pic, M_DATA) == 0xFB and inb(pic, S_DATA) == 0xFF
    out(pic, M_DATA, 0xFA)
    worker = threading.Thread(target=edge, args=(pic, 0), name="pit")
    worker.start()
    worker.join()
    assert calls == ["pit"]
    assert pic.acknowledge() == 0x08
    out(pic, S_DATA, 0xFE)
    edge(pic, 8)
    assert not pic.int_output()  # behind IRQ0 in service
    out(pic, M_CMD, 0x20)
    assert pic.int_output()
    assert pic.acknowledge() == 0x70
    assert "INTR" in pic.describe()


def test_bad_irq_number() -> None:
    pic = DualPic()
    with pytest.raises(ValueError):
        pic.set_irq(16, True)
    pic.set_irq(2, True)  # the cascade input is not an ISA line
    assert not pic.int_output()
