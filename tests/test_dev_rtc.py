"""Tests for the MC146818 CMOS RTC (gdbstub.machine.devices.rtc) against a fake virtual clock."""

from __future__ import annotations

import calendar

import pytest

from gdbstub.machine.devices.rtc import Rtc

NS = 1_000_000_000
MIB = 1 << 20
GIB = 1 << 30
# Thursday 2024-02-29 13:59:58 UTC, half a second into the second
START = calendar.timegm((2024, 2, 29, 13, 59, 58)) + 0.5


class FakeClock:
    def __init__(self) -> None:
        self.t = 0

    def __call__(self) -> int:
        return self.t


class Irq:
    def __init__(self) -> None:
        self.levels: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.levels.append(level)

    @property
    def edges(self) -> int:
        return sum(1 for i, v in enumerate(self.levels) if v and (i == 0 or not self.levels[i - 1]))


def make(mem: int = 256 * MIB, cpus: int = 1) -> tuple[Rtc, FakeClock, Irq]:
    clock, irq = FakeClock(), Irq()
    return Rtc(clock, irq, start_time=START, mem_size=mem, cpus=cpus), clock, irq


def rd(rtc: Rtc, index: int) -> int:
    rtc.write(0x70, 1, index)
    return rtc.read(0x71, 1)


def wr(rtc: Rtc, index: int, value: int) -> None:
    rtc.write(0x70, 1, index)
    rtc.write(0x71, 1, value)


def time_regs(rtc: Rtc) -> tuple[int, ...]:
    return tuple(rd(rtc, i) for i in (0, 2, 4, 6, 7, 8, 9, 0x32))


def test_bcd_24h_power_on_time() -> None:
    rtc, _, _ = make()
    assert rd(rtc, 0x0B) & 0x06 == 0x02  # BCD, 24-hour
    # sec, min, hour, weekday (Thursday = 5), day, month, year, century
    assert time_regs(rtc) == (0x58, 0x59, 0x13, 0x05, 0x29, 0x02, 0x24, 0x20)
    assert rd(rtc, 0x0D) == 0x80  # VRT
    assert rd(rtc, 0x0A) & 0x7F == 0x26


def test_binary_and_12h() -> None:
    rtc, _, _ = make()
    wr(rtc, 0x0B, 0x04)  # binary, 12-hour
    assert time_regs(rtc) == (58, 59, 0x80 | 1, 5, 29, 2, 24, 20)  # 1 PM
    wr(rtc, 0x0B, 0x00)  # BCD, 12-hour
    assert rd(rtc, 4) == 0x81
    wr(rtc, 0x0B, 0x06)  # binary, 24-hour
    assert rd(rtc, 4) == 13


def test_12h_midnight_and_noon() -> None:
    clock, irq = FakeClock(), Irq()
    rtc = Rtc(clock, irq, start_time=calendar.timegm((2000, 1, 1, 0, 30, 0)), mem_size=MIB)
    wr(rtc, 0x0B, 0x00)
    assert rd(rtc, 4) == 0x12  # 12 AM
    clock.t = 12 * 3600 * NS
    assert rd(rtc, 4) == 0x92  # 12 PM
    assert rd(rtc, 6) == 7  # 2000-01-01 was a Saturday


def test_time_advances_with_the_virtual_clock_only() -> None:
    rtc, clock, _ = make()
    assert rd(rtc, 0) == 0x58
    clock.t = NS // 2 - 1
    assert rd(rtc, 0) == 0x58
    clock.t = NS // 2
    assert rd(rtc, 0) == 0x59
    clock.t += 10 * NS  # 14:00:09 on the 29th ... leap day rolls over at midnight
    assert time_regs(rtc)[:3] == (0x09, 0x00, 0x14)
    clock.t += 10 * 3600 * NS
    assert time_regs(rtc)[:7] == (0x09, 0x00, 0x00, 0x06, 0x01, 0x03, 0x24)  # Fri 1 March


def uip_edges(rtc: Rtc, clock: FakeClock, step_ns: int, until_ns: int) -> list[int]:
    """Poll register A every ``step_ns``; the virtual times at which UIP went 1 -> 0."""
    falls: list[int] = []
    prev = False
    rtc.write(0x70, 1, 0x0A)
    while clock.t < until_ns:
        uip = bool(rtc.read(0x71, 1) & 0x80)
        if prev and not uip:
            falls.append(clock.t)
        prev = uip
        clock.t += step_ns
    return falls


def test_uip_falls_once_a_second_when_polled_fast() -> None:
    rtc, clock, _ = make()
    falls = uip_edges(rtc, clock, 50_000, 3 * NS)
    # seconds change at virtual 0.5 s, 1.5 s, 2.5 s; UIP was set 244 us before each
    assert [round(t / NS, 3) for t in falls] == [0.5, 1.5, 2.5]


@pytest.mark.parametrize("step_ns", [300_000, 1_000_000, 3_000_000])
def test_uip_edge_seen_even_by_a_slow_poller(step_ns: int) -> None:
    rtc, clock, _ = make()
    falls = uip_edges(rtc, clock, step_ns, 3 * NS)
    assert len(falls) == 3
    for t, boundary in zip(falls, (0.5, 1.5, 2.5), strict=True):
        assert boundary * NS <= t <= boundary * NS + 2 * step_ns + 1


def test_uip_not_reported_to_an_occasional_reader() -> None:
    rtc, clock, _ = make()
    clock.t = 100_000_000
    assert rd(rtc, 0x0A) & 0x80 == 0
    clock.t += NS  # a read one second later is not polling
    assert rd(rtc, 0x0A) & 0x80 == 0


def test_uip_and_time_registers_agree() -> None:
    rtc, clock, _ = make()
    clock.t = NS // 2 - 100_000  # in the UIP window: the old second still shows
    assert rd(rtc, 0x0A) & 0x80
    assert rd(rtc, 0) == 0x58
    clock.t = NS // 2
    assert rd(rtc, 0x0A) & 0x80 == 0
    assert rd(rtc, 0) == 0x59


def test_periodic_interrupt_rate_6_is_1024_hz() -> None:
    rtc, clock, irq = make()
    assert rtc.next_deadline_ns() is None  # nothing enabled
    wr(rtc, 0x0A, 0x26)
    rd(rtc, 0x0C)
    wr(rtc, 0x0B, 0x02 | 0x40)  # PIE
    count = 0
    while True:
        deadline = rtc.next_deadline_ns()
        assert deadline is not None and deadline > clock.t
        if deadline > NS:
            break
        clock.t = deadline
        rtc.poll(deadline)
        assert irq.edges == count + 1
        assert rtc.next_deadline_ns() is None  # IRQF stays set until C is read
        c = rd(rtc, 0x0C)
        assert c & 0xC0 == 0xC0  # IRQF | PF
        assert rd(rtc, 0x0C) == 0  # cleared on read
        count += 1
    assert count == 1024
    assert irq.levels[-1] is False  # a pulse, not a level


def test_periodic_rate_3_and_no_storm_after_a_gap() -> None:
    rtc, clock, irq = make()
    wr(rtc, 0x0A, 0x23)  # 8192 Hz
    wr(rtc, 0x0B, 0x42)
    d1 = rtc.next_deadline_ns()
    assert d1 is not None and abs(d1 - NS / 8192) < 2
    clock.t = 10 * NS
    rtc.poll(clock.t)
    assert irq.edges == 1
    rd(rtc, 0x0C)
    d2 = rtc.next_deadline_ns()
    assert d2 is not None and 10 * NS < d2 <= 10 * NS + NS // 8192 + 1


def test_pf_without_pie_is_polled_and_rate_zero_stops_it() -> None:
    rtc, clock, irq = make()
    rd(rtc, 0x0C)
    clock.t += 2_000_000
    assert rd(rtc, 0x0C) == 0x40  # PF without IRQF
    assert irq.edges == 0
    wr(rtc, 0x0A, 0x20)  # rate 0
    clock.t += 2_000_000
    assert rd(rtc, 0x0C) == 0


def test_enabling_pie_with_pf_pending_pulses() -> None:
    rtc, clock, irq = make()
    clock.t += 2_000_000
    wr(rtc, 0x0B, 0x42)
    assert irq.edges == 1
    assert rd(rtc, 0x0C) == 0xC0


def test_update_ended_interrupt() -> None:
    rtc, clock, irq = make()
    rd(rtc, 0x0C)
    wr(rtc, 0x0B, 0x12)  # UIE
    deadline = rtc.next_deadline_ns()
    assert deadline == NS // 2  # the next second boundary
    clock.t = deadline - 1
    rtc.poll(clock.t)
    assert irq.edges == 0
    clock.t = deadline
    rtc.poll(clock.t)
    assert irq.edges == 1
    assert rd(rtc, 0x0C) & 0xB0 == 0x90  # IRQF | UF (PF runs at the default rate too)
    assert rtc.next_deadline_ns() == NS // 2 + NS


def test_alarm_interrupt() -> None:
    rtc, clock, irq = make()  # 13:59:58.5
    wr(rtc, 0x01, 0x05)  # alarm 14:00:05
    wr(rtc, 0x03, 0x00)
    wr(rtc, 0x05, 0x14)
    rd(rtc, 0x0C)
    wr(rtc, 0x0B, 0x22)  # AIE
    deadline = rtc.next_deadline_ns()
    assert deadline == NS // 2 + 6 * NS
    clock.t = deadline - NS
    rtc.poll(clock.t)
    assert irq.edges == 0
    assert rd(rtc, 0x0C) & 0xB0 == 0x10  # UF without UIE, no IRQF
    clock.t = deadline
    rtc.poll(clock.t)
    assert irq.edges == 1
    assert rd(rtc, 0x0C) & 0xB0 == 0xB0  # IRQF | AF | UF
    assert rtc.next_deadline_ns() == deadline + 86400 * NS  # same time tomorrow


def test_alarm_dont_care_every_minute() -> None:
    rtc, clock, irq = make()
    wr(rtc, 0x01, 0x30)  # xx:xx:30
    wr(rtc, 0x03, 0xFF)
    wr(rtc, 0x05, 0xC0)
    rd(rtc, 0x0C)
    wr(rtc, 0x0B, 0x22)
    fired = []
    for _ in range(3):
        deadline = rtc.next_deadline_ns()
        assert deadline is not None
        clock.t = deadline
        rtc.poll(deadline)
        fired.append(time_regs(rtc)[:3])
        assert rd(rtc, 0x0C) & 0xA0 == 0xA0
    assert fired == [(0x30, 0x00, 0x14), (0x30, 0x01, 0x14), (0x30, 0x02, 0x14)]
    assert irq.edges == 3


def test_set_mode_writes_the_time() -> None:
    rtc, clock, _ = make()
    wr(rtc, 0x0B, 0x82 | 0x10)  # SET (+ UIE, which SET clears)
    assert rd(rtc, 0x0B) == 0x82
    for index, value in ((0, 0x00), (2, 0x30), (4, 0x08), (7, 0x15), (8, 0x07), (9, 0x99)):
        wr(rtc, index, value)
    wr(rtc, 0x32, 0x19)
    clock.t += 5 * NS  # frozen while SET
    assert rd(rtc, 0) == 0x00 and rd(rtc, 0x0A) & 0x80 == 0
    wr(rtc, 0x0B, 0x02)
    assert time_regs(rtc) == (0x00, 0x30, 0x08, 0x5, 0x15, 0x07, 0x99, 0x19)  # Thu 1999-07-15
    assert rtc.time_s() == calendar.timegm((1999, 7, 15, 8, 30, 0))
    clock.t += NS // 2  # the sub-second phase ran on (it was .5)
    assert rd(rtc, 0) == 0x01


def test_write_without_set_applies_at_once() -> None:
    rtc, _, _ = make()
    wr(rtc, 0x0B, 0x06)  # binary 24 h
    wr(rtc, 2, 10)
    assert time_regs(rtc)[:3] == (58, 10, 13)


def test_divider_reset_freezes_time() -> None:
    rtc, clock, _ = make()
    wr(rtc, 0x0A, 0x70)  # divider held in reset
    clock.t += 3 * NS
    assert rd(rtc, 0) == 0x58
    assert rd(rtc, 0x0A) & 0x80 == 0
    wr(rtc, 0x0A, 0x26)  # first update 500 ms later
    clock.t += NS // 2 - 1
    assert rd(rtc, 0) == 0x58
    clock.t += 1
    assert rd(rtc, 0) == 0x59


def test_memory_size_bytes_256_mib() -> None:
    rtc, _, _ = make(256 * MIB, cpus=4)
    word = lambda i: rd(rtc, i) | rd(rtc, i + 1) << 8  # noqa: E731
    assert word(0x15) == 640
    assert word(0x17) == 0xFFFF and word(0x30) == 0xFFFF  # 255 MiB in KiB, capped
    assert word(0x34) == (256 - 16) * 16
    assert rd(rtc, 0x5B) == rd(rtc, 0x5C) == rd(rtc, 0x5D) == 0
    assert rd(rtc, 0x5F) == 3


def test_memory_size_bytes_small_and_5_gib() -> None:
    rtc, _, _ = make(8 * MIB)
    assert rd(rtc, 0x17) | rd(rtc, 0x18) << 8 == 7 * 1024
    assert rd(rtc, 0x34) | rd(rtc, 0x35) << 8 == 0
    rtc, _, _ = make(5 * GIB)  # 3 GiB below 4 GiB, 2 GiB above
    assert rd(rtc, 0x17) | rd(rtc, 0x18) << 8 == 0xFFFF
    assert rd(rtc, 0x34) | rd(rtc, 0x35) << 8 == (3 * GIB - 16 * MIB) // 65536
    high = rd(rtc, 0x5B) | rd(rtc, 0x5C) << 8 | rd(rtc, 0x5D) << 16
    assert high == 2 * GIB // 65536
    assert rd(rtc, 0x5F) == 0


def test_nmi_mask_nvram_and_index_port() -> None:
    rtc, _, _ = make()
    assert not rtc.nmi_masked
    rtc.write(0x70, 1, 0x80 | 0x0F)
    assert rtc.nmi_masked
    rtc.write(0x71, 1, 0x0A)  # shutdown status
    rtc.write(0x70, 1, 0x0F)
    assert not rtc.nmi_masked
    assert rtc.read(0x71, 1) == 0x0A
    wr(rtc, 0x40, 0x5A)
    assert rd(rtc, 0x40) == 0x5A
    assert rtc.read(0x70, 1) == 0xFF
    wr(rtc, 0x0C, 0xFF)  # C and D are read-only
    wr(rtc, 0x0D, 0x00)
    assert rd(rtc, 0x0C) == 0 and rd(rtc, 0x0D) == 0x80
    rtc.write(0x70, 2, 0x5A40)  # a word write: index then data
    assert rd(rtc, 0x40) == 0x5A


def test_describe() -> None:
    rtc, _, _ = make()
    text = rtc.describe()
    assert "2024-02-29 13:59:58" in text and "1024 Hz" in text
