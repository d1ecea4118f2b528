"""Intel 8254 programmable interval timer and the PC's port 0x61 (one device, no VM calls).

Theory of operation
-------------------
The three counters run from a 1.193182 MHz input clock.  Nothing counts in the background:
each counter remembers the virtual tick ``t0`` at which its counting element (CE) was loaded
with the count ``n`` (1..65536, a written 0 meaning 65536, or 10000 in BCD) and derives its
value and its OUT pin from ``d = tick(now) - t0`` when asked.  ``tick(ns)`` is
``ns * 1193182 // 10**9`` of the machine's virtual clock.

* A written count reaches the CE on the next input clock (``t0 = tick + 1``); until then the
  read-back status shows NULL COUNT.  Mode 0 thus raises OUT ``n + 1`` clocks after the write,
  as on the chip.  Writing the first byte of a two-byte count in mode 0 stops the counter and
  drops OUT.  In modes 2 and 3 a new count written while counting takes effect at the end of
  the current period; in modes 1 and 5 at the next gate trigger.
* Modes: 0 OUT rises at terminal count and stays high, 1 gate-triggered one-shot (OUT low until
  terminal count), 2 rate generator (OUT low for the one clock where the CE holds 1, period
  ``n``), 3 square wave (high for ``ceil(n/2)`` of every ``n`` clocks, the CE counting by two),
  4 software-triggered strobe and 5 gate-triggered strobe (OUT low for one clock at terminal
  count).  Mode numbers 6 and 7 act as 2 and 3.
* Gate: channels 0 and 1 have their gate tied high; channel 2's gate is bit 0 of port 0x61.  A
  low gate freezes the count in modes 0 and 4, stops the count and forces OUT high in modes 2
  and 3 (a rising edge reloads), and a rising edge (re)starts modes 1, 2, 3 and 5.
* Reads: a status latched by the read-back command comes first, then a count latched by the
  counter-latch or read-back command, then the live count, byte by byte as the access mode says
  (LSB, MSB, or LSB then MSB with a flip-flop).  Port 0x43 is write-only and reads 0.
* IRQ0 is channel 0's OUT, delivered as pulses (``irq0(True)`` then ``irq0(False)``) by
  :meth:`Pit.poll`: one per period in modes 2 and 3 (where OUT rises), one at terminal count in
  modes 0, 1, 4 and 5.  Events already delivered are remembered as ``_irq_after`` (a tick); after
  a long gap a poll delivers one late pulse and the next one is the first period boundary after
  now.  Changing the mode or count does not itself pulse IRQ0.
* Port 0x61 (NMI status and control): bit 0 gate of channel 2, bit 1 speaker data enable,
  bits 2-3 parity/channel-check enables (stored), bit 4 the DRAM refresh toggle (flips on every
  read: some kernels wait for it to change), bit 5 OUT of channel 2, bits 6-7 (NMI sources) 0.

After reset every counter is in mode 3 with count 65536 as QEMU leaves them (channel 0 thus
ticks at 18.2 Hz until the guest reprograms it; channel 2 waits for its gate).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

PIT_HZ = 1_193_182
NS_PER_S = 1_000_000_000

PIT_BASE = 0x40
PIT_CONTROL = 0x43
PORT61 = 0x61

RW_LATCH, RW_LSB, RW_MSB, RW_WORD = 0, 1, 2, 3
_RW_NAMES = {RW_LSB: "lsb", RW_MSB: "msb", RW_WORD: "lsb/msb"}

P61_GATE2 = 0x01
P61_SPEAKER = 0x02
P61_STORED = 0x0C  # parity / channel check enables: kept as written
P61_REFRESH = 0x10
P61_OUT2 = 0x20


def tick_at(ns: int) -> int:
    """The PIT input-clock tick count at virtual time ``ns``."""
    return ns * PIT_HZ // NS_PER_S


def ns_of_tick(tick: int) -> int:
    """The first virtual nanosecond at which :func:`tick_at` reaches ``tick``."""
    return -(-tick * NS_PER_S // PIT_HZ)


def _to_bcd(value: int) -> int:
    out = 0
    for shift in (0, 4, 8, 12):
        out |= (value % 10) << shift
        value //= 10
    return out


def _from_bcd(raw: int) -> int:
    return sum(min((raw >> (4 * i)) & 0xF, 9) * 10**i for i in range(4))


class _Channel:
    """One 8254 counter; every method takes the current tick ``t`` and runs under the lock."""

    def __init__(self, index: int, gate: bool) -> None:
        self.index = index
        self.gate = gate
        self.mode_bits = 3  # mode as written (reported in the status byte)
        self.rw = RW_WORD
        self.bcd = False
        self.cr: int | None = 0  # count register (raw 16 bits); None while half written
        self.lsb_written: int | None = None  # first byte of an LSB-then-MSB write
        self.read_msb_next = False
        self.count_latch: int | None = None
        self.status_latch: int | None = None
        # counting element
        self.loaded = True
        self.n = 65536
        self.t0 = 0
        self.t0_edge = False  # t0 ends a period (OUT rose there), not a fresh load
        self.hold: int | None = None if gate else 0  # elapsed ticks frozen while stopped
        self.pending_n: int | None = None  # modes 1/2/3/5: count for the next reload
        self.pending_at: int | None = None  # modes 2/3: the period end where it loads
        self.null_until: int | None = 0  # NULL COUNT until this tick (None: until loaded)
        self.idle_out = True  # OUT while no count is loaded
        self.idle_value = 0  # CE value while no count is loaded

    # -- derived state
    @property
    def mode(self) -> int:
        """Effective mode 0..5 (6 and 7 act as 2 and 3)."""
        return self.mode_bits - 4 if self.mode_bits >= 6 else self.mode_bits

    @property
    def modulus(self) -> int:
        return 10000 if self.bcd else 65536

    def count_of(self, raw: int) -> int:
        """The count a raw register value stands for (0 is the largest)."""
        value = _from_bcd(raw) if self.bcd else raw
        return value or self.modulus

    def settle(self, t: int) -> None:
        """Apply a mode 2/3 count whose period end has come."""
        if self.pending_at is not None and t >= self.pending_at and self.pending_n is not None:
            self.t0, self.n, self.t0_edge = self.pending_at, self.pending_n, True
            self.pending_n = self.pending_at = None

    def elapsed(self, t: int) -> int:
        d = self.hold if self.hold is not None else t - self.t0
        return max(d, 0)

    def value(self, t: int) -> int:
        """The CE as the counter would be read at tick ``t`` (binary, 0..modulus-1)."""
        if not self.loaded:
            return self.idle_value
        d, n, mode = self.elapsed(t), self.n, self.mode
        if mode == 2:
            v = n - d % n
        elif mode == 3:
            v = n - (2 * d) % n
        else:
            v = n - d
        return v % self.modulus

    def out(self, t: int) -> bool:
        """The OUT pin at tick ``t``."""
        if not self.loaded:
            return self.idle_out
        mode, n = self.mode, self.n
        if mode in (2, 3) and self.hold is not None:
            return True  # gate low forces OUT high
        d = self.elapsed(t)
        if mode in (0, 1):
            return d >= n
        if mode == 2:
            return d % n != n - 1
        if mode == 3:
            return d % n < (n + 1) // 2
        return d != n  # modes 4 and 5

    def null_count(self, t: int) -> bool:
        return self.null_until is None or t < self.null_until

    def next_event(self, after: int) -> int | None:
        """The first tick > ``after`` where OUT gives an IRQ edge (call :meth:`settle` first)."""
        if not self.loaded or self.hold is not None:
            return None
        mode, n, t0 = self.mode, self.n, self.t0
        if mode in (2, 3):
            first = t0 if self.t0_edge else t0 + n
            if after < first:
                return first
            return t0 + ((after - t0) // n + 1) * n
        end = t0 + n
        return end if after < end else None

    # -- programming
    def load(self, t: int, n: int) -> None:
        """The CE takes ``n`` on the next input clock."""
        self.loaded, self.n, self.t0, self.t0_edge = True, n, t + 1, False
        self.pending_n = self.pending_at = None
        self.null_until = t + 1
        stops = self.mode in (0, 2, 3, 4) and not self.gate
        self.hold = 0 if stops else None

    def unload(self, t: int, out: bool) -> None:
        """Stop counting, keeping the CE's value, with OUT at ``out``."""
        self.idle_value = self.value(t)
        self.loaded, self.idle_out = False, out
        self.hold = self.pending_n = self.pending_at = None

    def control(self, t: int, rw: int, mode_bits: int, bcd: bool) -> None:
        """A control word for this counter (not a latch command)."""
        self.settle(t)
        self.unload(t, mode_bits != 0)
        self.rw, self.mode_bits, self.bcd = rw, mode_bits, bcd
        self.cr, self.lsb_written = None, None
        self.read_msb_next = False
        self.count_latch = self.status_latch = None
        self.null_until = None

    def write_byte(self, t: int, byte: int) -> None:
        self.settle(t)
        if self.rw == RW_LSB:
            self.cr = byte
        elif self.rw == RW_MSB:
            self.cr = byte << 8
        elif self.lsb_written is None:
            self.lsb_written = byte
            if self.mode == 0:  # the first byte stops the count and drops OUT
                self.unload(t, False)
                self.null_until = None
            return
        else:
            self.cr = self.lsb_written | (byte << 8)
            self.lsb_written = None
        self.new_count(t, self.count_of(self.cr))

    def new_count(self, t: int, n: int) -> None:
        mode = self.mode
        if mode in (1, 5):
            self.pending_n = n  # waits for a gate trigger
            if not self.loaded:
                self.idle_out = True
            self.null_until = None
        elif mode in (2, 3) and self.loaded and t >= self.t0:
            self.pending_n = n
            if self.hold is not None:  # gate low: loads at the rising edge
                self.pending_at = None
                self.null_until = None
            else:
                k = max(0, (t - self.t0) // self.n + 1)
                self.pending_at = self.t0 + k * self.n
                self.null_until = self.pending_at
        else:
            self.load(t, n)

    def set_gate(self, t: int, level: bool) -> None:
        self.settle(t)
        if level == self.gate:
            return
        self.gate = level
        mode = self.mode
        if mode in (0, 4):
            if not self.loaded:
                return
            if not level:
                self.hold = t - self.t0
            elif self.hold is not None:
                self.t0, self.hold = t - self.hold, None
        elif mode in (2, 3):
            if not self.loaded:
                return
            if not level:
                self.hold, self.pending_at = t - self.t0, None
            else:
                self.load(t, self.pending_n or self.n)
        elif level:  # modes 1 and 5: a rising edge triggers
            n = self.pending_n
            if n is None and self.loaded:
                n = self.n
            if n is not None:
                self.load(t, n)

    # -- reading
    def latch_count(self, t: int) -> None:
        self.settle(t)
        if self.count_latch is None:
            v = self.value(t)
            self.count_latch = _to_bcd(v) if self.bcd else v

    def latch_status(self, t: int) -> None:
        self.settle(t)
        if self.status_latch is None:
            self.status_latch = (
                (0x80 if self.out(t) else 0)
                | (0x40 if self.null_count(t) else 0)
                | (self.rw << 4)
                | (self.mode_bits << 1)
                | int(self.bcd)
            )

    def read_byte(self, t: int) -> int:
        self.settle(t)
        if self.status_latch is not None:
            status, self.status_latch = self.status_latch, None
            return status
        latched = self.count_latch is not None
        if self.count_latch is not None:
            v = self.count_latch
        else:
            v = self.value(t)
            v = _to_bcd(v) if self.bcd else v
        if self.rw == RW_LSB:
            byte, last = v & 0xFF, True
        elif self.rw == RW_MSB:
            byte, last = v >> 8, True
        elif not self.read_msb_next:
            byte, last = v & 0xFF, False
            self.read_msb_next = True
        else:
            byte, last = v >> 8, True
            self.read_msb_next = False
        if latched and last:
            self.count_latch = None
        return byte & 0xFF

    def describe(self, t: int) -> str:
        self.settle(t)
        if self.loaded:
            state = f"count {self.n} ({PIT_HZ / self.n:.1f} Hz) value {self.value(t)}"
            if self.hold is not None:
                state += " stopped"
        else:
            state = f"no count loaded, value {self.idle_value}"
        rw = _RW_NAMES.get(self.rw, "?")
        bcd = " bcd" if self.bcd else ""
        return (
            f"pit ch{self.index}: mode {self.mode_bits} {rw}{bcd} {state}"
            f" out {int(self.out(t))} gate {int(self.gate)}"
        )


class Pit:
    """The 8254 at ports 0x40-0x43 and port 0x61, counting on ``clock``'s virtual ns.

    ``irq0(level)`` is channel 0's output line; the machine registers this object for both
    port ranges and calls :meth:`poll` when :meth:`next_deadline_ns` comes.
    """

    def __init__(self, clock: Callable[[], int], irq0: Callable[[bool], None]) -> None:
        self._clock = clock
        self._irq0 = irq0
        self._lock = threading.Lock()
        self.channels = [_Channel(0, True), _Channel(1, True), _Channel(2, False)]
        self._speaker = False
        self._p61_stored = 0
        self._refresh = False
        self._irq_after = self._tick()  # channel 0 events up to this tick are delivered

    def _tick(self) -> int:
        return tick_at(self._clock())

    # -- ports
    def read(self, port: int, size: int) -> int:
        """``in`` from 0x40-0x43 or 0x61 (wider accesses read consecutive ports)."""
        value = 0
        with self._lock:
            t = self._tick()
            for i in range(size):
                value |= self._read8(port + i, t) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` to 0x40-0x43 or 0x61 (wider accesses write consecutive ports)."""
        with self._lock:
            t = self._tick()
            for i in range(size):
                self._write8(port + i, (value >> (8 * i)) & 0xFF, t)

    def _read8(self, port: int, t: int) -> int:
        if PIT_BASE <= port < PIT_CONTROL:
            return self.channels[port - PIT_BASE].read_byte(t)
        if port == PIT_CONTROL:
            return 0
        if port == PORT61:
            self._refresh = not self._refresh
            ch2 = self.channels[2]
            ch2.settle(t)
            return (
                (P61_GATE2 if ch2.gate else 0)
                | (P61_SPEAKER if self._speaker else 0)
                | self._p61_stored
                | (P61_REFRESH if self._refresh else 0)
                | (P61_OUT2 if ch2.out(t) else 0)
            )
        return 0xFF

    def _write8(self, port: int, value: int, t: int) -> None:
        if PIT_BASE <= port < PIT_CONTROL:
            self.channels[port - PIT_BASE].write_byte(t, value)
        elif port == PIT_CONTROL:
            self._control(value, t)
        elif port == PORT61:
            self._speaker = bool(value & P61_SPEAKER)
            self._p61_stored = value & P61_STORED
            self.channels[2].set_gate(t, bool(value & P61_GATE2))

    def _control(self, value: int, t: int) -> None:
        select, rw = value >> 6, (value >> 4) & 3
        if select == 3:  # read-back: bit 5 clear latches counts, bit 4 clear latches status
            for ch in self.channels:
                if value & (2 << ch.index):
                    if not value & 0x20:
                        ch.latch_count(t)
                    if not value & 0x10:
                        ch.latch_status(t)
            return
        ch = self.channels[select]
        if rw == RW_LATCH:
            ch.latch_count(t)
            return
        ch.control(t, rw, (value >> 1) & 7, bool(value & 1))

    # -- gate and time
    def set_gate2(self, level: bool) -> None:
        """Drive channel 2's gate (what bit 0 of port 0x61 does)."""
        with self._lock:
            self.channels[2].set_gate(self._tick(), level)

    def next_deadline_ns(self) -> int | None:
        """Virtual time of channel 0's next IRQ0 pulse (may be past: poll now), or None."""
        with self._lock:
            ch0 = self.channels[0]
            ch0.settle(self._tick())
            event = ch0.next_event(self._irq_after)
        return None if event is None else ns_of_tick(event)

    def poll(self, now_ns: int) -> None:
        """Pulse IRQ0 once if channel 0 had an event by ``now_ns`` (missed periods are dropped)."""
        fire = False
        with self._lock:
            t = tick_at(now_ns)
            ch0 = self.channels[0]
            ch0.settle(t)
            event = ch0.next_event(self._irq_after)
            if event is not None and event <= t:
                fire = True
                self._irq_after = t
        if fire:
            self._irq0(True)
            self._irq0(False)

    def describe(self) -> str:
        """Counter states and the next IRQ0, for ``monitor info timers``."""
        with self._lock:
            now = self._clock()
            t = tick_at(now)
            lines = [ch.describe(t) for ch in self.channels]
            event = self.channels[0].next_event(self._irq_after)
            speaker = "on" if self._speaker else "off"
        if event is None:
            lines.append(f"pit irq0: none pending; speaker {speaker}")
        else:
            due = (ns_of_tick(event) - now) / 1e6
            lines.append(f"pit irq0: next in {due:.3f} ms; speaker {speaker}")
        return "\n".join(lines)
