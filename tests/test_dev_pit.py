"""Tests for gdbstub.machine.devices.pit: the 8254 and port 0x61 as a guest sees them."""

from __future__ import annotations

from gdbstub.machine.devices.pit import PIT_HZ, Pit, ns_of_tick, tick_at

CH0, CH1, CH2, CTRL, P61 = 0x40, 0x41, 0x42, 0x43, 0x61


class FakeClock:
    """Virtual time the test moves by hand."""

    def __init__(self, ns: int = 0) -> None:
        self.ns = ns

    def __call__(self) -> int:
        return self.ns

    def to_tick(self, tick: int) -> None:
        self.ns = ns_of_tick(tick)

    @property
    def tick(self) -> int:
        return tick_at(self.ns)


def make_pit(start_ns: int = 123_456) -> tuple[Pit, FakeClock, list[bool]]:
    clock = FakeClock(start_ns)
    levels: list[bool] = []
    return Pit(clock, levels.append), clock, levels


def pulses(levels: list[bool]) -> int:
    """Number of complete IRQ pulses (a True followed by a False) on the line."""
    assert levels == [True, False] * (len(levels) // 2)
    return len(levels) // 2


def program(pit: Pit, ctrl: int, count: int, port: int = CH0) -> None:
    pit.write(CTRL, 1, ctrl)
    pit.write(port, 1, count & 0xFF)
    pit.write(port, 1, (count >> 8) & 0xFF)


def latch_read(pit: Pit, port: int) -> int:
    pit.write(CTRL, 1, (port - CH0) << 6)  # counter latch command
    lo = pit.read(port, 1)
    return lo | (pit.read(port, 1) << 8)


def status(pit: Pit, channel: int) -> int:
    pit.write(CTRL, 1, 0xE0 | (2 << channel))  # read-back: status only
    return pit.read(CH0 + channel, 1)


def test_mode2_period_and_irq0_edges() -> None:
    pit, clock, levels = make_pit()
    n = 11932  # Linux HZ=100
    program(pit, 0x34, n)  # ch0, lsb/msb, mode 2
    t0 = clock.tick + 1  # loaded on the next input clock
    deadline = pit.next_deadline_ns()
    assert deadline == ns_of_tick(t0 + n)
    clock.ns = deadline - 1
    pit.poll(clock.ns)
    assert levels == []
    clock.ns = deadline
    pit.poll(clock.ns)
    assert pulses(levels) == 1
    pit.poll(clock.ns)  # same instant: nothing new
    assert pulses(levels) == 1
    for k in range(2, 6):
        nxt = pit.next_deadline_ns()
        assert nxt == ns_of_tick(t0 + k * n)
        clock.ns = nxt
        pit.poll(clock.ns)
        assert pulses(levels) == k
    # the period in virtual time is n / 1.193182 MHz (10 ms)
    assert abs((ns_of_tick(t0 + 2 * n) - ns_of_tick(t0 + n)) - n * 1e9 / PIT_HZ) < 2
    # the counter runs n .. 1 within each period
    clock.to_tick(t0 + 5 * n + 100)
    assert latch_read(pit, CH0) == n - 100
    clock.to_tick(t0 + 6 * n - 1)
    assert latch_read(pit, CH0) == 1


def test_no_tick_storm_after_long_gap() -> None:
    pit, clock, levels = make_pit()
    n = 1193  # 1 kHz
    program(pit, 0x34, n)
    clock.ns += 10 * 1_000_000_000  # ten seconds without a poll
    pit.poll(clock.ns)
    assert pulses(levels) == 1
    pit.poll(clock.ns)
    assert pulses(levels) == 1
    nxt = pit.next_deadline_ns()
    assert nxt is not None and clock.ns < nxt <= clock.ns + ns_of_tick(n) + 1
    clock.ns = nxt
    pit.poll(clock.ns)
    assert pulses(levels) == 2


def test_mode4_one_shot_like_linux_clockevent() -> None:
    pit, clock, levels = make_pit()
    pit.write(CTRL, 1, 0x38)  # ch0, lsb/msb, mode 4 (Linux's oneshot)
    assert pit.next_deadline_ns() is None  # no count yet
    t = clock.tick
    pit.write(CH0, 1, 1000 & 0xFF)
    pit.write(CH0, 1, 1000 >> 8)
    assert pit.next_deadline_ns() == ns_of_tick(t + 1 + 1000)
    clock.to_tick(t + 1000)
    pit.poll(clock.ns)
    assert levels == []
    clock.to_tick(t + 1001)
    pit.poll(clock.ns)
    assert pulses(levels) == 1
    assert pit.next_deadline_ns() is None  # one shot only
    clock.ns += 1_000_000_000
    pit.poll(clock.ns)
    assert pulses(levels) == 1
    # the next event: a new count re-arms it
    t = clock.tick
    pit.write(CH0, 1, 50)
    pit.write(CH0, 1, 0)
    assert pit.next_deadline_ns() == ns_of_tick(t + 51)
    clock.to_tick(t + 51)
    pit.poll(clock.ns)
    assert pulses(levels) == 2


def test_mode0_terminal_count() -> None:
    pit, clock, levels = make_pit()
    pit.write(CTRL, 1, 0x30)  # ch0 mode 0
    assert not status(pit, 0) & 0x80  # OUT low after the control word
    t = clock.tick
    pit.write(CH0, 1, 0x10)
    pit.write(CH0, 1, 0x00)  # count 16
    clock.to_tick(t + 16)
    assert latch_read(pit, CH0) == 1
    assert not status(pit, 0) & 0x80
    pit.poll(clock.ns)
    assert levels == []
    clock.to_tick(t + 17)  # n + 1 clocks after the write
    assert status(pit, 0) & 0x80
    pit.poll(clock.ns)
    assert pulses(levels) == 1
    clock.to_tick(t + 22)  # keeps counting down past zero; OUT stays high
    assert latch_read(pit, CH0) == 0x10000 - 5
    assert status(pit, 0) & 0x80
    assert pit.next_deadline_ns() is None


def test_mode0_first_byte_stops_count() -> None:
    pit, clock, _ = make_pit()
    program(pit, 0x30, 1000)
    clock.to_tick(clock.tick + 2000)
    assert status(pit, 0) & 0x80  # terminal count reached
    pit.write(CH0, 1, 0x00)  # first byte of a new count
    assert not status(pit, 0) & 0x80  # OUT drops at once
    held = latch_read(pit, CH0)
    clock.to_tick(clock.tick + 300)
    assert latch_read(pit, CH0) == held  # not counting
    t = clock.tick
    pit.write(CH0, 1, 0x01)  # count 256
    clock.to_tick(t + 1 + 56)
    assert latch_read(pit, CH0) == 200


def test_latch_freezes_until_read_and_lsb_msb_sequencing() -> None:
    pit, clock, _ = make_pit()
    program(pit, 0x34, 0x1234)
    t0 = clock.tick + 1
    clock.to_tick(t0 + 0x34)
    pit.write(CTRL, 1, 0x00)  # latch ch0: 0x1200
    clock.to_tick(t0 + 0x100)
    pit.write(CTRL, 1, 0x00)  # ignored: a latch is pending
    assert pit.read(CH0, 1) == 0x00
    clock.to_tick(t0 + 0x200)
    assert pit.read(CH0, 1) == 0x12  # MSB of the latched value
    # no latch: live reads alternate LSB, MSB
    clock.to_tick(t0 + 0x234)
    assert pit.read(CH0, 1) == 0x00
    assert pit.read(CH0, 1) == 0x10
    # a latch after the flip-flop went back to LSB
    assert latch_read(pit, CH0) == 0x1000


def test_lsb_only_and_msb_only_access() -> None:
    pit, clock, _ = make_pit()
    pit.write(CTRL, 1, 0x14)  # ch0, LSB only, mode 2
    t = clock.tick
    pit.write(CH0, 1, 0x80)  # count 0x80
    clock.to_tick(t + 1 + 0x10)
    assert pit.read(CH0, 1) == 0x70
    assert pit.read(CH0, 1) == 0x70  # no flip-flop: LSB every time
    pit.write(CTRL, 1, 0x24)  # ch0, MSB only, mode 2
    t = clock.tick
    pit.write(CH0, 1, 0x02)  # count 0x200
    assert pit.next_deadline_ns() == ns_of_tick(t + 1 + 0x200)
    clock.to_tick(t + 1 + 0x101)
    assert pit.read(CH0, 1) == 0x00  # 0x0ff
    assert pit.read(CH0, 1) == 0x00
    clock.to_tick(t + 1 + 0x80)
    assert pit.read(CH0, 1) == 0x01  # 0x180


def test_read_back_status_and_count() -> None:
    pit, clock, _ = make_pit()
    pit.write(CTRL, 1, 0xB0)  # ch2, lsb/msb, mode 0, binary
    st = status(pit, 2)
    assert st == 0x40 | 0x30 | 0x00  # OUT low, null count (no count yet), rw 3, mode 0
    pit.write(P61, 1, 0x01)  # gate high
    t = clock.tick
    pit.write(CH2, 1, 0x00)
    pit.write(CH2, 1, 0x10)  # 0x1000
    assert status(pit, 2) & 0x40  # count not in the CE until the next clock
    clock.to_tick(t + 1 + 0x20)
    # read-back of count and status of ch0 and ch2: status first, then the count
    pit.write(CTRL, 1, 0xC0 | 0x08 | 0x02)
    assert pit.read(CH2, 1) == 0x30  # OUT low, count loaded, rw 3, mode 0, binary
    clock.to_tick(t + 1 + 0x500)  # the latched count stays
    assert pit.read(CH2, 1) == 0xE0
    assert pit.read(CH2, 1) == 0x0F
    ch0_status = pit.read(CH0, 1)
    assert ch0_status == 0x80 | 0x30 | (3 << 1)  # reset state: mode 3, OUT high at d=0 mod n
    # a second status read-back while one is pending is ignored
    pit.write(CTRL, 1, 0xE8)
    clock.to_tick(t + 1 + 0x1000)  # terminal count: OUT rises
    pit.write(CTRL, 1, 0xE8)
    assert not pit.read(CH2, 1) & 0x80  # the first status (OUT low)
    assert status(pit, 2) & 0x80
    # mode 6 reports as written and acts as mode 2; BCD bit
    pit.write(CTRL, 1, 0x7D)  # ch1, lsb/msb, mode 6, bcd
    assert status(pit, 1) == 0x80 | 0x40 | 0x30 | (6 << 1) | 1
    assert pit.read(CTRL, 1) == 0  # the control port is write-only


def test_bcd_count() -> None:
    pit, clock, _ = make_pit()
    pit.write(CTRL, 1, 0x31)  # ch0 mode 0 bcd
    t = clock.tick
    pit.write(CH0, 1, 0x00)
    pit.write(CH0, 1, 0x10)  # BCD 1000
    clock.to_tick(t + 1 + 1)
    assert latch_read(pit, CH0) == 0x0999
    assert pit.next_deadline_ns() == ns_of_tick(t + 1 + 1000)


def test_mode2_new_count_waits_for_period_end() -> None:
    pit, clock, levels = make_pit()
    program(pit, 0x34, 1000)
    t0 = clock.tick + 1
    clock.to_tick(t0 + 400)
    pit.write(CH0, 1, 500 & 0xFF)
    pit.write(CH0, 1, 500 >> 8)
    assert latch_read(pit, CH0) == 600  # still the old period
    assert pit.next_deadline_ns() == ns_of_tick(t0 + 1000)
    clock.to_tick(t0 + 1000)
    pit.poll(clock.ns)
    assert pulses(levels) == 1
    assert pit.next_deadline_ns() == ns_of_tick(t0 + 1500)
    clock.to_tick(t0 + 1100)
    assert latch_read(pit, CH0) == 400


def test_mode3_square_wave_on_out2_with_gate() -> None:
    pit, clock, _ = make_pit()
    pit.write(P61, 1, 0x03)  # gate 2 high, speaker on
    program(pit, 0xB6, 100, CH2)  # ch2 mode 3 (the beep)
    t0 = clock.tick + 1

    def out2() -> bool:
        return bool(pit.read(P61, 1) & 0x20)

    highs = []
    for d in range(200):
        clock.to_tick(t0 + d)
        highs.append(out2())
    assert highs == ([True] * 50 + [False] * 50) * 2
    clock.to_tick(t0 + 20)
    assert latch_read(pit, CH2) == 60  # counts down by two
    # gate low: OUT forced high and the count stops; rising edge reloads
    clock.to_tick(t0 + 260)
    assert not out2()
    pit.write(P61, 1, 0x02)
    assert out2()
    stopped = latch_read(pit, CH2)
    clock.to_tick(t0 + 400)
    assert latch_read(pit, CH2) == stopped
    pit.write(P61, 1, 0x03)
    t1 = clock.tick + 1
    clock.to_tick(t1 + 10)
    assert latch_read(pit, CH2) == 80
    clock.to_tick(t1 + 60)
    assert not out2()


def test_linux_pit_calibrate_tsc_loop() -> None:
    """pit_calibrate_tsc: ch2 mode 0, gate high, poll OUT2 in port 0x61 bit 5."""
    pit, clock, _ = make_pit()
    latch = PIT_HZ // (1000 // 50)  # CAL_LATCH for 50 ms
    pit.write(P61, 1, (pit.read(P61, 1) & ~0x02) | 0x01)
    pit.write(CTRL, 1, 0xB0)
    pit.write(CH2, 1, latch & 0xFF)
    pit.write(CH2, 1, latch >> 8)
    start = clock.ns
    reads = 0
    while (pit.read(P61, 1) & 0x20) == 0:
        clock.ns += 1000  # one microsecond per loop iteration
        reads += 1
        assert reads < 100_000
    elapsed = clock.ns - start
    expected = (latch + 1) * 1e9 / PIT_HZ
    assert abs(elapsed - expected) <= 2000
    # the gate freezes a mode 0 count
    pit.write(CTRL, 1, 0xB0)
    pit.write(CH2, 1, 0xFF)
    pit.write(CH2, 1, 0xFF)
    clock.ns += 100_000
    pit.write(P61, 1, 0x00)
    frozen = latch_read(pit, CH2)
    clock.ns += 1_000_000
    assert latch_read(pit, CH2) == frozen
    assert not pit.read(P61, 1) & 0x21
    pit.write(P61, 1, 0x01)
    clock.ns += 1_000_000
    assert frozen - latch_read(pit, CH2) == tick_at(clock.ns) - tick_at(clock.ns - 1_000_000)


def test_linux_quick_pit_calibrate_msb_sequence() -> None:
    """quick_pit_calibrate: 0xffff in mode 0, then LSB/MSB reads expecting MSB 0xff, 0xfe..."""
    pit, clock, _ = make_pit()
    pit.write(P61, 1, (pit.read(P61, 1) & ~0x02) | 0x01)
    pit.write(CTRL, 1, 0xB0)
    pit.write(CH2, 1, 0xFF)
    pit.write(CH2, 1, 0xFF)

    def read_msb() -> int:
        pit.read(CH2, 1)  # LSB, discarded
        clock.ns += 500
        msb = pit.read(CH2, 1)
        clock.ns += 500
        return msb

    seen: list[tuple[int, int]] = []  # (msb, ns of the first read giving it)
    while len(seen) < 20:
        msb = read_msb()
        if not seen or seen[-1][0] != msb:
            seen.append((msb, clock.ns))
    assert [m for m, _ in seen] == list(range(0xFF, 0xFF - 20, -1))
    # each MSB value lasts 256 input clocks (214.5 us)
    span = (seen[-1][1] - seen[1][1]) / (len(seen) - 2)
    assert abs(span - 256e9 / PIT_HZ) < 100


def test_refresh_bit_toggles_on_every_read() -> None:
    pit, _, _ = make_pit()
    bits = [pit.read(P61, 1) & 0x10 for _ in range(6)]
    assert bits[0] != bits[1] and bits[::2] == [bits[0]] * 3 and bits[1::2] == [bits[1]] * 3
    pit.write(P61, 1, 0xFF)  # bits 4-7 are read-only; 0-3 stored
    assert pit.read(P61, 1) & 0xCF == 0x0F


def test_describe_mentions_channels_and_irq() -> None:
    pit, _, _ = make_pit()
    program(pit, 0x34, 11932)
    text = pit.describe()
    assert "ch0: mode 2" in text and "count 11932" in text and "irq0: next in" in text
