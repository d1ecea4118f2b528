"""Tests for the local APIC (gdbstub.machine.devices.lapic): what a guest observes through the
xAPIC page and the x2APIC MSRs, against a fake clock, a fake TSC and a fake TPR register."""

from __future__ import annotations

import pytest

from gdbstub.machine.devices.lapic import (
    ApicMsrFault,
    LocalApic,
    timer_divisor,
)

ID, VERSION, TPR, APR, PPR, EOI, LDR, DFR, SVR = (
    0x20,
    0x30,
    0x80,
    0x90,
    0xA0,
    0xB0,
    0xD0,
    0xE0,
    0xF0,
)
ISR, TMR, IRR, ESR, ICR_LO, ICR_HI = 0x100, 0x180, 0x200, 0x280, 0x300, 0x310
LVTT, LVT_THERMAL, LVT_PERF, LVT0, LVT1, LVTERR = 0x320, 0x330, 0x340, 0x350, 0x360, 0x370
TMICT, TMCCT, TDCR = 0x380, 0x390, 0x3E0
APIC_BASE, TSC_DEADLINE = 0x1B, 0x6E0
MASKED, PERIODIC, TSC_MODE = 1 << 16, 1 << 17, 2 << 17
DM_NMI, DM_EXTINT = 0x400, 0x700
SELF, ALL, OTHERS = 1 << 18, 2 << 18, 3 << 18
TIMER_VECTOR = 0xEC


class Rig:
    """A LocalApic with every input faked and every output recorded."""

    def __init__(self, *, apic_id: int = 0, bsp: bool = True, tsc_hz: int = 2_000_000_000) -> None:
        self.now = 0
        self.tsc_now = 0
        self.tpr = 0
        self.tpr_writes: list[int] = []
        self.eois: list[int] = []
        self.ipis: list[tuple[int, int, int, int]] = []
        self.notified = 0
        self.apic = LocalApic(
            apic_id=apic_id,
            clock=lambda: self.now,
            tsc=lambda: self.tsc_now,
            tsc_hz=tsc_hz,
            get_tpr=lambda: self.tpr,
            set_tpr=self._set_tpr,
            on_eoi=self.eois.append,
            notify=self._notify,
            send_ipi=lambda *ipi: self.ipis.append(ipi),
            bsp=bsp,
        )

    def _set_tpr(self, value: int) -> None:
        self.tpr = value
        self.tpr_writes.append(value)

    def _notify(self) -> None:
        self.notified += 1

    def r(self, reg: int) -> int:
        return self.apic.mmio_read(reg, 4)

    def w(self, reg: int, value: int) -> None:
        self.apic.mmio_write(reg, 4, value)

    def enable(self) -> None:
        self.w(SVR, 0x1FF)

    def take(self) -> int | None:
        """What the CPU would do before an entry: take the pending vector, if any."""
        vector = self.apic.pending_vector()
        if vector is not None:
            self.apic.acknowledge(vector)
        return vector

    def bitmap(self, base: int) -> set[int]:
        """The vectors set in ISR, TMR or IRR, read as the guest does (8 registers)."""
        found = set()
        for i in range(8):
            value = self.r(base + 0x10 * i)
            found |= {32 * i + b for b in range(32) if value >> b & 1}
        return found

    def advance(self, ns: int) -> None:
        self.now += ns
        self.tsc_now += ns * 2  # 2 GHz


def test_reset_state() -> None:
    rig = Rig(apic_id=3)
    assert rig.r(ID) == 3 << 24
    assert rig.r(VERSION) == 0x50014
    assert rig.r(SVR) == 0xFF
    assert rig.r(DFR) == 0xFFFFFFFF
    assert [rig.r(reg) for reg in (LVTT, LVT_THERMAL, LVT_PERF, LVT1, LVTERR)] == [MASKED] * 5
    assert rig.r(LVT0) == DM_EXTINT  # the BSP's virtual wire, as a BIOS leaves it
    assert rig.apic.extint_enabled()
    assert rig.apic.msr_read(APIC_BASE) == 0xFEE00000 | 0x800 | 0x100
    ap = Rig(apic_id=1, bsp=False)
    assert ap.r(LVT0) == MASKED and not ap.apic.extint_enabled()
    assert ap.apic.msr_read(APIC_BASE) == 0xFEE00000 | 0x800
    # other sizes and unaligned offsets read 0 and writes are ignored
    assert rig.apic.mmio_read(ID + 1, 4) == 0 and rig.apic.mmio_read(ID, 2) == 0
    rig.apic.mmio_write(SVR, 1, 0x1FF)
    assert rig.r(SVR) == 0xFF


def test_linux_xapic_bring_up() -> None:
    """setup_local_APIC() on the BSP, then the timer and error vectors."""
    rig = Rig()
    assert rig.r(VERSION) & 0xFF == 0x14 and (rig.r(VERSION) >> 16) & 0xFF == 5
    rig.w(DFR, 0xFFFFFFFF)  # flat model
    rig.w(LDR, 1 << 24)
    assert rig.r(LDR) == 1 << 24 and rig.r(DFR) == 0xFFFFFFFF
    rig.w(TPR, (rig.r(TPR) & ~0xFF) | 0x10)  # accept nothing below class 2 while setting up
    assert rig.tpr == 0x10 and rig.r(TPR) == 0x10 and rig.r(PPR) == 0x10
    rig.w(SVR, (rig.r(SVR) & ~0xFF) | 0x100 | 0xFF)
    assert rig.r(SVR) == 0x1FF
    rig.w(LVT0, DM_EXTINT)
    rig.w(LVT1, DM_NMI)
    assert rig.r(LVT0) == DM_EXTINT and rig.r(LVT1) == DM_NMI
    rig.w(ESR, 0)
    rig.w(LVTERR, 0xFE)
    rig.w(ESR, 0)
    assert rig.r(ESR) == 0 and rig.r(LVTERR) == 0xFE
    rig.w(TDCR, 0x3)
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)
    assert rig.r(LVTT) == PERIODIC | TIMER_VECTOR
    rig.w(TPR, 0)
    assert rig.tpr_writes == [0x10, 0] and rig.r(PPR) == 0
    assert rig.r(APR) == 0
    rig.apic.accept(0x31)
    assert rig.take() == 0x31


def test_priority_tpr_and_nesting() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.accept(0x31)
    rig.apic.accept(0x45)
    assert rig.bitmap(IRR) == {0x31, 0x45}
    assert rig.apic.pending_vector() == 0x45  # the higher class wins
    rig.tpr = 0x40  # TPR's class blocks its own class and below
    assert rig.apic.pending_vector() is None and rig.r(PPR) == 0x40
    rig.tpr = 0x3F
    assert rig.apic.pending_vector() == 0x45
    rig.tpr = 0
    assert rig.take() == 0x45
    assert rig.bitmap(ISR) == {0x45} and rig.bitmap(IRR) == {0x31}
    assert rig.r(PPR) == 0x40
    assert rig.apic.pending_vector() is None  # 0x31 waits for the handler of 0x45
    rig.apic.accept(0x52)
    assert rig.take() == 0x52  # nests over 0x45
    assert rig.r(PPR) == 0x50 and rig.bitmap(ISR) == {0x45, 0x52}
    rig.w(EOI, 0)  # retires the highest in-service vector
    assert rig.bitmap(ISR) == {0x45} and rig.r(PPR) == 0x40
    rig.w(EOI, 0)
    assert rig.bitmap(ISR) == set() and rig.r(PPR) == 0
    assert rig.take() == 0x31
    assert rig.eois == []  # edge-triggered: the I/O APIC hears nothing


def test_same_class_waits_for_eoi() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.accept(0x40)
    assert rig.take() == 0x40
    rig.apic.accept(0x41)
    assert rig.apic.pending_vector() is None  # same class as the one in service
    rig.w(EOI, 0)
    assert rig.take() == 0x41


def test_vectors_below_16_are_illegal() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.accept(5)
    assert rig.apic.pending_vector() is None and rig.bitmap(IRR) == set()
    rig.w(ESR, 0)
    assert rig.r(ESR) == 0x40  # received illegal vector
    rig.w(ESR, 0)
    assert rig.r(ESR) == 0


def test_level_triggered_eoi_calls_on_eoi() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.accept(0x61, level_triggered=True)
    assert rig.bitmap(TMR) == {0x61}
    rig.apic.accept(0x50)
    assert rig.take() == 0x61
    rig.w(EOI, 0)
    assert rig.eois == [0x61]
    assert rig.take() == 0x50
    rig.w(EOI, 0)
    assert rig.eois == [0x61]


def test_accept_notifies_and_software_disabled_drops() -> None:
    rig = Rig()
    rig.apic.accept(0x40)  # software-disabled after reset: not accepted
    assert rig.apic.pending_vector() is None and rig.notified == 0
    rig.enable()
    rig.apic.accept(0x40)
    assert rig.notified == 1 and rig.apic.pending_vector() == 0x40


@pytest.mark.parametrize("dcr", [0x0, 0x1, 0x2, 0x3, 0x8, 0x9, 0xA, 0xB])
def test_one_shot_timer_each_divider(dcr: int) -> None:
    divisor = {0: 2, 1: 4, 2: 8, 3: 16, 8: 32, 9: 64, 0xA: 128, 0xB: 1}[dcr]
    assert timer_divisor(dcr) == divisor
    rig = Rig()
    rig.enable()
    rig.now = 1000
    rig.w(TDCR, dcr)
    rig.w(LVTT, TIMER_VECTOR)
    rig.w(TMICT, 1000)
    assert rig.r(TMICT) == 1000 and rig.r(TDCR) == dcr
    assert rig.r(TMCCT) == 1000
    deadline = 1000 + 1000 * divisor  # 1 GHz bus: one tick is `divisor` ns
    assert rig.apic.next_deadline_ns() == deadline
    rig.now += 250 * divisor
    assert rig.r(TMCCT) == 750
    rig.now += 250 * divisor
    assert rig.r(TMCCT) == 500
    rig.apic.poll(deadline - 1)
    assert rig.apic.pending_vector() is None
    rig.now = deadline
    rig.apic.poll(deadline)
    assert rig.take() == TIMER_VECTOR and rig.notified == 1
    assert rig.r(TMCCT) == 0 and rig.apic.next_deadline_ns() is None
    rig.now += 10 * 1000 * divisor
    rig.apic.poll(rig.now)
    assert rig.bitmap(IRR) == set()  # one-shot: once


def test_current_count_keeps_its_place_across_a_divider_change() -> None:
    rig = Rig()
    rig.enable()
    rig.w(TDCR, 0xB)  # divide by 1
    rig.w(LVTT, TIMER_VECTOR)
    rig.w(TMICT, 1000)
    rig.now = 400
    rig.w(TDCR, 0x0)  # divide by 2 from here on
    assert rig.r(TMCCT) == 600
    rig.now = 600
    assert rig.r(TMCCT) == 500
    assert rig.apic.next_deadline_ns() == 400 + 600 * 2


def test_timer_stops_when_initial_count_is_zero() -> None:
    rig = Rig()
    rig.enable()
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)
    rig.w(TMICT, 100)
    assert rig.apic.next_deadline_ns() is not None
    rig.w(TMICT, 0)
    assert rig.apic.next_deadline_ns() is None and rig.r(TMCCT) == 0


def test_periodic_rate_and_late_poll() -> None:
    rig = Rig()
    rig.enable()
    rig.w(TDCR, 0x3)  # divide by 16
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)
    rig.w(TMICT, 625)  # 625 * 16 ns = 10 us
    fired = 0
    while True:
        deadline = rig.apic.next_deadline_ns()
        assert deadline is not None
        if deadline > 1_000_000:
            break
        rig.now = deadline
        rig.apic.poll(deadline)
        if rig.take() == TIMER_VECTOR:
            fired += 1
            rig.w(EOI, 0)
    assert fired == 100  # 1 ms at 10 us
    assert rig.now == 1_000_000
    rig.now += 2_500  # a quarter period into the next one
    assert rig.r(TMCCT) == 625 - 2_500 // 16
    # a long stop: one late tick, then the period restarts from the poll
    rig.now += 1_000_000
    rig.apic.poll(rig.now)
    assert rig.take() == TIMER_VECTOR
    rig.w(EOI, 0)
    assert rig.apic.pending_vector() is None
    assert rig.apic.next_deadline_ns() == rig.now + 10_000
    assert rig.r(TMCCT) == 625


def test_masked_timer_counts_but_does_not_interrupt() -> None:
    rig = Rig()
    rig.enable()
    rig.w(LVTT, MASKED | PERIODIC | TIMER_VECTOR)
    rig.w(TMICT, 1000)  # 2 us a period at divide-by-2
    assert rig.apic.next_deadline_ns() is None  # nothing to poll for
    rig.now = 500
    assert rig.r(TMCCT) == 750
    rig.now = 5_000  # two and a half periods
    rig.apic.poll(rig.now)
    assert rig.r(TMCCT) == 500 and rig.apic.pending_vector() is None
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)  # unmask: in phase, no stale tick
    assert rig.apic.pending_vector() is None
    assert rig.apic.next_deadline_ns() == 6_000
    rig.now = 6_000
    rig.apic.poll(rig.now)
    assert rig.take() == TIMER_VECTOR
    # a masked one-shot expires silently
    rig.w(LVTT, MASKED | TIMER_VECTOR)
    rig.w(TMICT, 10)
    rig.now += 100
    rig.apic.poll(rig.now)
    assert rig.r(TMCCT) == 0 and rig.bitmap(IRR) == set()


def test_tsc_deadline_timer() -> None:
    rig = Rig(tsc_hz=2_000_000_000)
    rig.enable()
    rig.advance(1000)
    assert rig.apic.msr_read(TSC_DEADLINE) == 0
    rig.apic.msr_write(TSC_DEADLINE, rig.tsc_now + 100)  # ignored outside TSC-deadline mode
    assert rig.apic.msr_read(TSC_DEADLINE) == 0
    rig.w(LVTT, TSC_MODE | TIMER_VECTOR)
    rig.w(TMICT, 1234)  # ignored in TSC-deadline mode
    assert rig.r(TMICT) == 0 and rig.r(TMCCT) == 0
    target = rig.tsc_now + 4000
    rig.apic.msr_write(TSC_DEADLINE, target)
    assert rig.apic.msr_read(TSC_DEADLINE) == target
    assert rig.apic.next_deadline_ns() == rig.now + 2000
    rig.advance(1999)
    rig.apic.poll(rig.now)
    assert rig.apic.pending_vector() is None
    rig.advance(1)
    rig.apic.poll(rig.now)
    assert rig.take() == TIMER_VECTOR
    assert rig.apic.msr_read(TSC_DEADLINE) == 0 and rig.apic.next_deadline_ns() is None
    rig.w(EOI, 0)
    # re-armed by a write; 0 disarms
    rig.apic.msr_write(TSC_DEADLINE, rig.tsc_now + 10)
    assert rig.apic.next_deadline_ns() == rig.now + 5
    rig.apic.msr_write(TSC_DEADLINE, 0)
    assert rig.apic.next_deadline_ns() is None
    rig.advance(100)
    rig.apic.poll(rig.now)
    assert rig.apic.pending_vector() is None
    rig.apic.msr_write(TSC_DEADLINE, rig.tsc_now + 10)
    rig.advance(5)
    rig.apic.poll(rig.now)
    assert rig.take() == TIMER_VECTOR
    rig.w(EOI, 0)
    # a deadline already past fires at once; leaving TSC-deadline mode disarms
    rig.apic.msr_write(TSC_DEADLINE, 1)
    assert rig.take() == TIMER_VECTOR
    rig.apic.msr_write(TSC_DEADLINE, rig.tsc_now + 10)
    rig.w(LVTT, TIMER_VECTOR)
    rig.w(LVTT, TSC_MODE | TIMER_VECTOR)
    assert rig.apic.msr_read(TSC_DEADLINE) == 0


def test_software_disable_masks_lvts() -> None:
    rig = Rig()
    rig.enable()
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)
    rig.w(LVT1, DM_NMI)
    rig.w(SVR, 0xFF)  # software-disable
    assert rig.r(LVTT) == MASKED | PERIODIC | TIMER_VECTOR
    assert rig.r(LVT1) == MASKED | DM_NMI
    assert rig.r(LVT0) & MASKED and not rig.apic.extint_enabled()
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)  # cannot be unmasked while disabled
    assert rig.r(LVTT) & MASKED
    rig.enable()
    assert rig.r(LVTT) & MASKED  # stays masked until rewritten
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)
    assert not rig.r(LVTT) & MASKED


def test_self_ipi_through_the_icr() -> None:
    rig = Rig(apic_id=2)
    rig.enable()
    rig.w(ICR_LO, SELF | 0x40)
    assert rig.r(ICR_LO) & (1 << 12) == 0  # delivery status: idle
    assert rig.take() == 0x40 and rig.ipis == []
    rig.w(EOI, 0)
    rig.w(ICR_HI, 2 << 24)
    rig.w(ICR_LO, 0x41)  # physical, to its own ID
    assert rig.take() == 0x41 and rig.ipis == []
    rig.w(EOI, 0)
    rig.w(ICR_HI, 5 << 24)
    rig.w(ICR_LO, 0x42)  # to another CPU
    assert rig.ipis == [(5, 0x42, 0, 0)] and 0x42 not in rig.bitmap(IRR)
    rig.w(ICR_LO, ALL | 0x43)
    assert 0x43 in rig.bitmap(IRR) and rig.ipis[-1] == (5, 0x43, 0, 2)
    rig.w(ICR_LO, OTHERS | 0x44)
    assert 0x44 not in rig.bitmap(IRR) and rig.ipis[-1] == (5, 0x44, 0, 3)
    rig.w(ICR_HI, 0xFF << 24)
    rig.w(ICR_LO, 0x45)  # physical broadcast
    assert 0x45 in rig.bitmap(IRR) and rig.ipis[-1] == (0xFF, 0x45, 0, 0)
    rig.w(ICR_LO, SELF | DM_NMI)
    assert rig.apic.take_nmi() and not rig.apic.take_nmi()
    count = len(rig.ipis)
    rig.w(ICR_LO, OTHERS | (1 << 15) | 0x500)  # INIT level de-assert: nothing happens
    assert len(rig.ipis) == count
    rig.w(ICR_LO, OTHERS | (1 << 15) | (1 << 14) | 0x500)  # INIT assert goes out
    assert rig.ipis[-1] == (0xFF, 0, 5, 3)
    rig.w(ICR_LO, SELF | 0x05)  # illegal vector: send error, nothing delivered
    rig.w(ESR, 0)
    assert rig.r(ESR) == 0x20


def test_logical_destination_flat_and_cluster() -> None:
    rig = Rig()
    rig.enable()
    rig.w(LDR, 0x04 << 24)
    rig.w(ICR_HI, 0x06 << 24)
    rig.w(ICR_LO, (1 << 11) | 0x50)  # flat: bit 2 is ours
    assert 0x50 in rig.bitmap(IRR)
    rig.w(ICR_HI, 0x08 << 24)
    rig.w(ICR_LO, (1 << 11) | 0x51)
    assert 0x51 not in rig.bitmap(IRR) and rig.ipis[-1] == (0x08, 0x51, 0, 0)
    rig.w(DFR, 0x0FFFFFFF)  # cluster model: cluster 3, member bit 1
    assert rig.r(DFR) == 0x0FFFFFFF
    rig.w(LDR, 0x31 << 24)
    rig.w(ICR_HI, 0x33 << 24)
    rig.w(ICR_LO, (1 << 11) | 0x52)
    assert 0x52 in rig.bitmap(IRR)
    rig.w(ICR_HI, 0x21 << 24)
    rig.w(ICR_LO, (1 << 11) | 0x53)
    assert 0x53 not in rig.bitmap(IRR)
    assert rig.apic.matches_destination(0x31, logical=True)
    assert rig.apic.matches_destination(0, logical=False)
    assert not rig.apic.matches_destination(1, logical=False)


def x2apic_rig(apic_id: int = 0x12) -> Rig:
    rig = Rig(apic_id=apic_id)
    rig.apic.msr_write(APIC_BASE, 0xFEE00000 | 0x800 | 0x400)
    return rig


def test_x2apic_enable_and_registers() -> None:
    rig = x2apic_rig()
    assert rig.apic.msr_read(APIC_BASE) == 0xFEE00000 | 0xD00  # BSP bit kept
    assert rig.apic.x2apic_mode
    assert rig.apic.msr_read(0x802) == 0x12  # the full x2APIC ID
    assert rig.apic.msr_read(0x803) == 0x50014
    assert rig.apic.msr_read(0x80D) == (1 << 16) | (1 << 2)  # cluster 1, bit 2
    assert rig.apic.mmio_read(ID, 4) == 0xFFFFFFFF  # the page is not decoded
    rig.apic.mmio_write(SVR, 4, 0x1FF)
    assert rig.apic.msr_read(0x80F) == 0xFF
    rig.apic.msr_write(0x80F, 0x1FF)
    rig.apic.msr_write(0x808, 0x20)
    assert rig.tpr == 0x20 and rig.apic.msr_read(0x80A) == 0x20
    rig.apic.msr_write(0x808, 0)
    rig.apic.msr_write(0x83F, 0x60)  # SELF IPI
    assert rig.apic.pending_vector() == 0x60
    assert rig.apic.msr_read(0x820 + 3) == 1  # IRR word 3, bit 0
    rig.apic.msr_write(0x830, (0x12 << 32) | 0x61)  # ICR as one 64-bit MSR, to itself
    assert rig.apic.msr_read(0x830) == (0x12 << 32) | 0x61
    assert rig.take() == 0x61
    rig.apic.msr_write(0x80B, 0)  # EOI
    assert rig.take() == 0x60
    rig.apic.msr_write(0x830, (0x13 << 32) | 0x62)
    assert rig.ipis == [(0x13, 0x62, 0, 0)]
    rig.apic.msr_write(0x832, TIMER_VECTOR)
    rig.apic.msr_write(0x83E, 0xB)
    rig.apic.msr_write(0x838, 100)
    rig.now += 40
    assert rig.apic.msr_read(0x839) == 60


@pytest.mark.parametrize(
    ("op", "msr", "value"),
    [
        ("read", 0x80B, 0),  # EOI is write-only
        ("read", 0x83F, 0),  # SELF IPI is write-only
        ("write", 0x80B, 1),  # EOI of a non-zero value
        ("write", 0x828, 1),  # ESR: only zero may be written
        ("write", 0x802, 0),  # ID is read-only
        ("write", 0x80D, 0),  # LDR is read-only
        ("write", 0x839, 0),  # current count is read-only
        ("read", 0x809, 0),  # no APR in x2APIC mode
        ("read", 0x80E, 0),  # no DFR
        ("read", 0x831, 0),  # no ICR high half
        ("read", 0x82F, 0),  # no CMCI LVT here
        ("read", 0x8FF, 0),  # reserved
        ("write", 0x808, 0x100),  # TPR bits 31:8 are reserved
        ("write", 0x80F, 1 << 32),  # upper halves are reserved
        ("write", 0x830, 1 << 13),  # reserved ICR bit
        ("write", 0x83F, 0x100),  # SELF IPI takes a vector only
    ],
)
def test_x2apic_msr_faults(op: str, msr: int, value: int) -> None:
    rig = x2apic_rig()
    with pytest.raises(ApicMsrFault):
        if op == "read":
            rig.apic.msr_read(msr)
        else:
            rig.apic.msr_write(msr, value)


def test_x2apic_msrs_fault_in_xapic_mode_and_base_transitions() -> None:
    rig = Rig(apic_id=0x12)
    with pytest.raises(ApicMsrFault):
        rig.apic.msr_read(0x802)
    with pytest.raises(ApicMsrFault):
        rig.apic.msr_write(APIC_BASE, 0xFEE00000 | 0x400)  # EXTD without EN
    with pytest.raises(ApicMsrFault):
        rig.apic.msr_write(APIC_BASE, 0xFEE00000 | 0x800 | 0x1)  # reserved bit
    with pytest.raises(ApicMsrFault):
        rig.apic.msr_write(APIC_BASE, (1 << 45) | 0x800)  # beyond the physical address width
    rig.apic.msr_write(APIC_BASE, 0xFEE00000 | 0xC00)
    with pytest.raises(ApicMsrFault):
        rig.apic.msr_write(APIC_BASE, 0xFEE00000 | 0x800)  # x2APIC -> xAPIC directly
    rig.apic.msr_write(APIC_BASE, 0xFEE00000)  # x2APIC -> disabled
    assert rig.apic.mmio_read(VERSION, 4) == 0xFFFFFFFF and rig.apic.extint_enabled()
    with pytest.raises(ApicMsrFault):
        rig.apic.msr_write(APIC_BASE, 0xFEE00000 | 0xC00)  # disabled -> x2APIC directly
    rig.apic.msr_write(APIC_BASE, 0xFEE00000 | 0x800)  # disabled -> xAPIC
    assert rig.r(ID) == 0x12 << 24 and rig.r(SVR) == 0xFF  # ID kept, the rest reset
    with pytest.raises(ApicMsrFault):
        rig.apic.msr_read(0x1234)


def test_hardware_disabled_apic() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.accept(0x40)
    rig.apic.msr_write(APIC_BASE, 0xFEE00000)
    assert rig.apic.pending_vector() is None
    rig.apic.accept(0x41)
    rig.apic.msr_write(APIC_BASE, 0xFEE00800)
    assert rig.bitmap(IRR) == set() and rig.r(SVR) == 0xFF


def test_lint0_extint_pass_through() -> None:
    rig = Rig()
    assert rig.apic.extint_enabled()  # reset: virtual wire
    rig.apic.set_lint0(True)
    assert rig.notified == 1  # the 8259's INTR wakes the vCPU
    rig.apic.set_lint0(False)
    rig.enable()
    rig.w(LVT0, MASKED | DM_EXTINT)  # Linux with the I/O APIC in charge
    assert not rig.apic.extint_enabled()
    rig.apic.set_lint0(True)
    assert rig.notified == 1
    rig.w(LVT0, DM_EXTINT)
    assert rig.apic.extint_enabled()
    assert rig.apic.pending_vector() is None  # the vector comes from the PIC, not the APIC


def test_lint1_nmi_on_rising_edge() -> None:
    rig = Rig()
    rig.enable()
    rig.w(LVT1, DM_NMI)
    rig.apic.set_lint1(True)
    assert rig.apic.take_nmi() and not rig.apic.take_nmi()
    rig.apic.set_lint1(True)  # no new edge
    assert not rig.apic.take_nmi()
    rig.apic.set_lint1(False)
    rig.apic.set_lint1(True)
    assert rig.apic.take_nmi()
    rig.w(LVT1, MASKED | DM_NMI)
    rig.apic.set_lint1(False)
    rig.apic.set_lint1(True)
    assert not rig.apic.take_nmi()


def test_lint_fixed_level_uses_remote_irr() -> None:
    rig = Rig()
    rig.enable()
    rig.w(LVT0, (1 << 15) | 0x70)  # fixed, level-triggered
    rig.apic.set_lint0(True)
    assert rig.r(LVT0) & (1 << 14)  # remote IRR
    assert rig.take() == 0x70
    rig.w(EOI, 0)
    assert rig.eois == [0x70]
    assert rig.take() == 0x70  # still asserted: delivered again
    rig.apic.set_lint0(False)
    rig.w(EOI, 0)
    assert not rig.r(LVT0) & (1 << 14) and rig.apic.pending_vector() is None


def test_deliver_nmi_and_reset() -> None:
    rig = Rig(apic_id=4)
    rig.enable()
    rig.w(ID, 7 << 24)
    rig.apic.deliver_nmi()
    rig.apic.accept(0x80)
    rig.w(LVTT, TIMER_VECTOR)
    rig.w(TMICT, 10)
    assert rig.apic.take_nmi()
    rig.apic.deliver_nmi()
    rig.apic.reset()  # INIT: the ID stays, the rest goes
    assert rig.r(ID) == 7 << 24 and rig.r(SVR) == 0xFF and rig.bitmap(IRR) == set()
    assert rig.r(LVTT) == MASKED and rig.apic.next_deadline_ns() is None
    assert not rig.apic.take_nmi()
    rig.apic.reset(power_on=True)
    assert rig.r(ID) == 4 << 24


def test_describe() -> None:
    rig = Rig()
    rig.enable()
    rig.apic.accept(0x31, level_triggered=True)
    rig.w(LVTT, PERIODIC | TIMER_VECTOR)
    rig.w(TMICT, 1000)
    text = rig.apic.describe()
    assert "xAPIC" in text and "IRR 0x31" in text and "TMR 0x31" in text
    assert "periodic" in text and "initial 1000" in text and "LINT0" in text
