"""Tests for gdbstub.machine.devices.acpi_pm: PM1 event/control registers and the PM timer."""

from __future__ import annotations

import pytest

from gdbstub.machine.bus import GuestPowerOff, PortBus
from gdbstub.machine.devices.acpi_pm import (
    PM_TIMER_HZ,
    AcpiPm,
    LegacyPowerOff,
    pm_ns_of_tick,
)

STS, EN, CNT, TMR = 0x600, 0x602, 0x604, 0x608
TMR_STS, PWRBTN = 0x0001, 0x0100


class FakeClock:
    def __init__(self, ns: int = 0) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns


def make_pm(start_ns: int = 0) -> tuple[AcpiPm, FakeClock, list[bool]]:
    clock = FakeClock(start_ns)
    sci: list[bool] = []
    return AcpiPm(clock, sci.append), clock, sci


def test_pm_timer_rate_and_24_bit_wrap() -> None:
    pm, clock, _ = make_pm()
    assert pm.read(TMR, 4) == 0
    clock.ns = 1_000_000_000
    assert pm.read(TMR, 4) == PM_TIMER_HZ
    first = pm.read(TMR, 4)
    clock.ns += 1_000_000  # 1 ms
    assert pm.read(TMR, 4) - first in (3579, 3580)
    # wrap: 2**24 ticks is about 4.69 s
    clock.ns = pm_ns_of_tick((1 << 24) - 2)
    assert pm.read(TMR, 4) == 0xFFFFFE
    clock.ns = pm_ns_of_tick((1 << 24) + 5)
    assert pm.read(TMR, 4) == 5
    assert pm.read(TMR + 3, 1) == 0  # bits 24-31 read 0 (TMR_VAL_EXT clear)
    pm.write(TMR, 4, 0x123456)  # read-only
    assert pm.read(TMR, 4) == 5


def test_sci_en_reads_set_and_control_bits() -> None:
    pm, _, _ = make_pm()
    assert pm.read(CNT, 2) & 1  # ACPI mode always on (no SMI_CMD)
    pm.write(CNT, 2, 0x0002 | (5 << 10))  # BM_RLD, SLP_TYP 5, no SLP_EN
    assert pm.read(CNT, 2) == 0x0001 | 0x0002 | (5 << 10)
    pm.write(CNT, 2, 0)
    assert pm.read(CNT, 2) == 0x0001


def test_slp_en_with_s5_type_powers_off() -> None:
    pm, _, _ = make_pm()
    with pytest.raises(GuestPowerOff):
        pm.write(CNT, 2, (0 << 10) | 0x2000)
    # another sleep type (S3 in some DSDTs) is not a power-off
    pm.write(CNT, 2, (1 << 10) | 0x2000)
    assert not pm.read(CNT, 2) & 0x2000  # SLP_EN is write-only
    # through the port bus and by byte writes, as some guests do
    bus = PortBus()
    bus.register(0x600, 12, pm)
    bus.write(CNT, 1, 0x00)
    with pytest.raises(GuestPowerOff):
        bus.write(CNT + 1, 1, 0x20)


def test_legacy_poweroff_port() -> None:
    dev = LegacyPowerOff()
    dev.write(0xB004, 2, 0x0000)
    dev.write(0xB004, 2, 0x0400 | 0x2000)  # SLP_TYP 1: not off
    with pytest.raises(GuestPowerOff):
        dev.write(0xB004, 2, 0x2000)
    with pytest.raises(GuestPowerOff):
        dev.write(0xB005, 1, 0x20)


def test_status_write_one_to_clear_and_sci_level() -> None:
    pm, _, sci = make_pm()
    pm.press_power_button()
    assert pm.read(STS, 2) & PWRBTN
    assert sci == []  # not enabled: no SCI
    pm.write(EN, 2, PWRBTN)
    assert sci == [True] and pm.sci_level
    pm.write(STS, 2, 0)  # writing zeros clears nothing
    assert pm.read(STS, 2) & PWRBTN and sci == [True]
    pm.write(STS, 2, 0xFEFF)  # ones elsewhere: PWRBTN still set
    assert pm.read(STS, 2) & PWRBTN and sci == [True]
    pm.write(STS, 2, PWRBTN)
    assert not pm.read(STS, 2) & PWRBTN
    assert sci == [True, False] and not pm.sci_level
    # status set while enabled: SCI rises; disabling drops it with the status still set
    pm.press_power_button()
    assert sci == [True, False, True]
    pm.write(EN, 2, 0)
    assert sci == [True, False, True, False]
    assert pm.read(STS, 2) & PWRBTN
    # a 32-bit access covers PM1_STS and PM1_EN; a byte write clears only its byte
    pm.write(EN, 2, PWRBTN | TMR_STS)
    assert pm.read(STS, 4) == PWRBTN | ((PWRBTN | TMR_STS) << 16)
    pm.write(STS, 1, 0xFF)  # low byte: TMR_STS and friends, not PWRBTN (bit 8)
    assert pm.read(STS, 2) & PWRBTN
    pm.write(STS + 1, 1, 0x01)
    assert not pm.read(STS, 2) & PWRBTN


def test_timer_overflow_status_and_sci() -> None:
    pm, clock, sci = make_pm()
    assert pm.next_deadline_ns() is None  # TMR_EN clear: nothing to deliver
    pm.write(EN, 2, TMR_STS)
    toggle = pm_ns_of_tick(1 << 23)  # bit 23 first changes after ~2.34 s
    assert pm.next_deadline_ns() == toggle
    clock.ns = toggle - 1
    pm.poll(clock.ns)
    assert sci == [] and not pm.read(STS, 2) & TMR_STS
    clock.ns = toggle
    pm.poll(clock.ns)
    assert sci == [True]
    assert pm.read(STS, 2) & TMR_STS
    assert pm.next_deadline_ns() is None  # already pending
    pm.write(STS, 2, TMR_STS)
    assert sci == [True, False]
    assert pm.next_deadline_ns() == pm_ns_of_tick(2 << 23)
    # a long gap (many toggles) sets the status once; one SCI edge, cleared by one write
    clock.ns += 60 * 1_000_000_000
    pm.poll(clock.ns)
    assert sci == [True, False, True]
    pm.write(STS, 2, TMR_STS)
    assert sci == [True, False, True, False]
    assert not pm.read(STS, 2) & TMR_STS
    nxt = pm.next_deadline_ns()
    assert nxt is not None and clock.ns < nxt <= clock.ns + pm_ns_of_tick(1 << 23)


def test_timer_status_seen_without_enable() -> None:
    pm, clock, sci = make_pm()
    clock.ns = pm_ns_of_tick(3 << 23)
    assert pm.read(STS, 2) & TMR_STS  # an OS polling the status sees the overflow
    assert sci == []
    pm.write(STS, 2, TMR_STS)
    assert not pm.read(STS, 2) & TMR_STS


def test_describe() -> None:
    pm, clock, _ = make_pm()
    clock.ns = 1_000_000_000
    text = pm.describe()
    assert "PM1_CNT 0x0001" in text and f"{PM_TIMER_HZ:#08x}" in text
