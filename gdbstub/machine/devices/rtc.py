"""The MC146818 CMOS real-time clock and NVRAM at ports 0x70/0x71 (no VM calls).

Theory of operation
-------------------
Port 0x70 selects a CMOS byte (bits 6-0) and masks NMIs (bit 7, kept in :attr:`Rtc.nmi_masked`);
port 0x71 reads or writes the selected byte.  The clock is not a counter that ticks: the time of
day is *computed* on each read as ``start_time`` (host epoch seconds at power-on) plus the virtual
nanoseconds of ``clock()`` plus an offset the guest changes by writing the time (QEMU's
``-rtc clock=vm``).  So the guest's calendar stops while the VM is stopped in the debugger.

Registers 0-9 and the century byte 0x32 are the time in the format register B selects (BCD or
binary, 24 or 12 hours with the PM flag 0x80 in the hour byte).  While B.SET is 1 they are plain
storage holding what the guest wrote; clearing SET makes that the time (the sub-second phase runs
on), as does a write to a time register while SET is 0.  Register A holds the divider (only
000, 001, 010 let time run; other values freeze it and leaving them puts the next update 500 ms
away) and the periodic rate; its UIP bit is 1 for the last 244 us of every second.  A guest that
polls A more slowly than that would never see UIP, so a read that follows a read of the previous
second (within 10 ms) without UIP having been seen reports UIP once: pollers see the 1 -> 0 edge
every second whatever their speed.

Interrupt flags (register C) are computed lazily from virtual time on every access and in
:meth:`Rtc.poll`: PF at the periodic rate, UF at each second boundary, AF at a boundary whose time
matches the alarm registers (0xC0-0xFF is "don't care").  They are set whatever the enables in B;
IRQF is ``C & B`` and when it becomes 1 IRQ8 is pulsed (an edge for the PIC/IOAPIC).  Reading C
clears it.  :meth:`Rtc.next_deadline_ns` is only set while an enabled event can raise IRQF; after
a long gap one event is delivered, never a storm.  The deadline can change after any register
access, so callers must ask again after I/O.

NVRAM 0x0E-0x7F is filled as QEMU's pc machine does: base, extended and high memory sizes and the
CPU count (0x5F); 0x0F is the shutdown status byte.
"""

from __future__ import annotations

import calendar
import threading
import time
from collections.abc import Callable

from ..firmware.layout import RTC_PORT

NS = 1_000_000_000
UIP_NS = 244_000  # UIP is set this long before each update
UIP_CATCHUP_NS = 10_000_000  # a read this soon after one in the previous second is "polling"
DAY = 86400
MAX_TIME_S = 253402300799  # 9999-12-31 23:59:59

# register indices
SECONDS, SECONDS_ALARM, MINUTES, MINUTES_ALARM, HOURS, HOURS_ALARM = 0, 1, 2, 3, 4, 5
DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR = 6, 7, 8, 9
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
SHUTDOWN_STATUS = 0x0F
CENTURY = 0x32
TIME_REGS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

A_UIP = 0x80
A_DV_MASK = 0x70
A_RS_MASK = 0x0F
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM_BINARY, B_24H, B_DSE = (
    0x80,
    0x40,
    0x20,
    0x10,
    0x08,
    0x04,
    0x02,
    0x01,
)
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
C_EVENTS = C_PF | C_AF | C_UF
D_VRT = 0x80
HOUR_PM = 0x80
DONT_CARE = 0xC0

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB


def default_below_4g(mem_size: int) -> int:
    """RAM below 4 GiB for ``mem_size`` bytes of RAM: QEMU's i440FX split (3 GiB from 3.5 GiB)."""
    return 0xC0000000 if mem_size >= 0xE0000000 else mem_size


def _to_bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _from_bcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0x0F)


class Rtc:
    """MC146818 RTC + 128 bytes of CMOS at ports 0x70 (index, NMI mask) and 0x71 (data)."""

    def __init__(
        self,
        clock: Callable[[], int],
        irq8: Callable[[bool], None],
        *,
        start_time: float,
        mem_size: int,
        cpus: int = 1,
        below_4g: int | None = None,
    ) -> None:
        self._clock = clock
        self._irq8 = irq8
        self._lock = threading.Lock()
        self.index = 0
        self.nmi_masked = False
        self.cmos = bytearray(128)
        self.cmos[REG_A] = 0x26  # 32.768 kHz time base, 1024 Hz periodic rate
        self.cmos[REG_B] = B_24H
        self.cmos[REG_D] = D_VRT
        self._fill_nvram(mem_size, cpus, below_4g)
        now = clock()
        # wall-clock ns = virtual ns + _offset_ns while the divider runs, else _frozen_ns
        self._offset_ns = int(start_time * NS) - now
        self._frozen_ns: int | None = None
        self.irq_pulses = 0  # times IRQ8 was pulsed (for describe and tests)
        self._a_read_ns: int | None = None  # virtual time of the last read of register A
        self._a_read_sec = -1  # wall second of that read
        self._uip_sec = -1  # the wall second whose UIP window a read has reported
        self._last_update_sec = 0  # wall second of the last update cycle accounted for
        self._last_tick = -1  # periodic tick index accounted for
        self._rebase(now)

    # -- NVRAM
    def _fill_nvram(self, mem_size: int, cpus: int, below_4g: int | None) -> None:
        low = default_below_4g(mem_size) if below_4g is None else min(below_4g, mem_size)
        high = mem_size - low

        def put(index: int, value: int, nbytes: int) -> None:
            for i in range(nbytes):
                self.cmos[index + i] = (value >> (8 * i)) & 0xFF

        base = min(low // KIB, 640)
        put(0x15, base, 2)
        ext = min(max(low - MIB, 0) // KIB, 0xFFFF)
        put(0x17, ext, 2)
        put(0x30, ext, 2)
        put(0x34, min(max(low - 16 * MIB, 0) // (64 * KIB), 0xFFFF), 2)
        put(0x5B, min(high // (64 * KIB), 0xFFFFFF), 3)
        self.cmos[0x5F] = max(cpus - 1, 0) & 0xFF

    # -- wall time
    def _running(self) -> bool:
        """The divider lets time flow (DV = 000, 001 or 010)."""
        return (self.cmos[REG_A] & A_DV_MASK) <= 0x20

    def _updating(self) -> bool:
        """Update cycles happen (time runs and SET is 0)."""
        return self._running() and not self.cmos[REG_B] & B_SET

    def _wall_ns(self, now: int) -> int:
        if self._frozen_ns is not None:
            return self._frozen_ns
        return now + self._offset_ns

    def _set_wall(self, now: int, wall_ns: int) -> None:
        if self._frozen_ns is not None:
            self._frozen_ns = wall_ns
        else:
            self._offset_ns = wall_ns - now
        self._rebase(now)

    def _rebase(self, now: int) -> None:
        """Forget event history: the next UF/PF comes from the next boundary after ``now``."""
        self._last_update_sec = self._wall_ns(now) // NS
        self._last_tick = self._tick_index(now)
        self._uip_sec = -1
        self._a_read_sec = -1

    # -- time registers
    def _enc(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _to_bcd(v)

    def _dec(self, v: int) -> int:
        return v if self.cmos[REG_B] & B_DM_BINARY else _from_bcd(v)

    def _enc_hour(self, h24: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._enc(h24)
        return self._enc(h24 % 12 or 12) | (HOUR_PM if h24 >= 12 else 0)

    def _dec_hour(self, v: int) -> int:
        if self.cmos[REG_B] & B_24H:
            return self._dec(v & 0x7F)
        h = self._dec(v & 0x7F) % 12
        return h + 12 if v & HOUR_PM else h

    def _encode_time(self, seconds: int) -> dict[int, int]:
        t = time.gmtime(min(max(seconds, 0), MAX_TIME_S))
        return {
            SECONDS: self._enc(t.tm_sec % 60),
            MINUTES: self._enc(t.tm_min),
            HOURS: self._enc_hour(t.tm_hour),
            DAY_OF_WEEK: self._enc((t.tm_wday + 1) % 7 + 1),  # Sunday = 1
            DAY_OF_MONTH: self._enc(t.tm_mday),
            MONTH: self._enc(t.tm_mon),
            YEAR: self._enc(t.tm_year % 100),
            CENTURY: self._enc(t.tm_year // 100),
        }

    def _decode_time(self, regs: dict[int, int]) -> int:
        year = self._dec(regs[CENTURY]) * 100 + self._dec(regs[YEAR])
        month = min(max(self._dec(regs[MONTH]), 1), 12)
        mday = max(self._dec(regs[DAY_OF_MONTH]), 1)
        return calendar.timegm(
            (
                max(year, 1),
                month,
                mday,
                self._dec_hour(regs[HOURS]),
                self._dec(regs[MINUTES]),
                self._dec(regs[SECONDS]),
            )
        )

    def _current_regs(self, now: int) -> dict[int, int]:
        if self.cmos[REG_B] & B_SET:
            return {i: self.cmos[i] for i in TIME_REGS}
        return self._encode_time(self._wall_ns(now) // NS)

    def _load_time(self, now: int, regs: dict[int, int]) -> None:
        """Make ``regs`` the current time, keeping the sub-second phase."""
        phase = self._wall_ns(now) % NS
        self._set_wall(now, self._decode_time(regs) * NS + phase)

    # -- periodic interrupt, update and alarm
    def _period_cycles(self) -> int | None:
        """The periodic rate as a count of 32.768 kHz cycles, None when off."""
        rs = self.cmos[REG_A] & A_RS_MASK
        if rs == 0 or not self._running():
            return None
        if rs <= 2:
            rs += 7
        return 1 << (rs - 1)

    def _tick_index(self, now: int) -> int:
        cycles = self._period_cycles()
        return -1 if cycles is None else now * 32768 // (cycles * NS)

    def _alarm_sets(self) -> tuple[list[int], list[int], list[int]]:
        def allowed(reg: int, limit: int, hour: bool = False) -> list[int]:
            v = self.cmos[reg]
            if v & DONT_CARE == DONT_CARE:
                return list(range(limit))
            value = self._dec_hour(v) if hour else self._dec(v)
            return [value] if 0 <= value < limit else []

        return (
            allowed(HOURS_ALARM, 24, hour=True),
            allowed(MINUTES_ALARM, 60),
            allowed(SECONDS_ALARM, 60),
        )

    def _next_alarm(self, after_sec: int) -> int | None:
        """The first wall second after ``after_sec`` whose time matches the alarm registers."""
        hours, minutes, seconds = self._alarm_sets()
        day0 = after_sec - after_sec % DAY
        tod = after_sec % DAY
        th, tm, ts = tod // 3600, tod // 60 % 60, tod % 60
        for day in (day0, day0 + DAY):
            first_day = day == day0
            for h in hours:
                if first_day and h < th:
                    continue
                for m in minutes:
                    if first_day and h == th and m < tm:
                        continue
                    for s in seconds:
                        if first_day and h == th and m == tm and s <= ts:
                            continue
                        return day + h * 3600 + m * 60 + s
        return None

    def _sync(self, now: int) -> bool:
        """Bring register C up to ``now``; True if IRQF became set (the caller pulses IRQ8)."""
        c = self.cmos[REG_C]
        tick = self._tick_index(now)
        if tick > self._last_tick:
            c |= C_PF
        self._last_tick = tick
        if self._updating():
            sec = self._wall_ns(now) // NS
            if sec > self._last_update_sec:
                c |= C_UF
                alarm = self._next_alarm(self._last_update_sec)
                if alarm is not None and alarm <= sec:
                    c |= C_AF
            self._last_update_sec = sec
        return self._set_c(c)

    def _set_c(self, c: int) -> bool:
        raised = False
        if c & self.cmos[REG_B] & C_EVENTS:
            raised = not c & C_IRQF
            c |= C_IRQF
        else:
            c &= ~C_IRQF
        self.cmos[REG_C] = c
        if raised:
            self.irq_pulses += 1
        return raised

    def _pulse(self) -> None:
        self._irq8(True)
        self._irq8(False)

    def next_deadline_ns(self) -> int | None:
        """Virtual time of the next enabled interrupt event, None while none can fire."""
        with self._lock:
            b = self.cmos[REG_B]
            if self.cmos[REG_C] & C_IRQF or not b & (B_PIE | B_AIE | B_UIE):
                return None
            now = self._clock()
            deadlines: list[int] = []
            cycles = self._period_cycles()
            if b & B_PIE and cycles is not None:
                n = now * 32768 // (cycles * NS) + 1
                deadlines.append(-(-n * cycles * NS // 32768))
            if self._updating() and b & (B_UIE | B_AIE):
                sec = self._wall_ns(now) // NS
                target: int | None = sec + 1
                if not b & B_UIE:
                    target = self._next_alarm(sec)
                if target is not None:
                    deadlines.append(target * NS - self._offset_ns)
            return min(deadlines) if deadlines else None

    def poll(self, now_ns: int) -> None:
        """Deliver the periodic, update-ended and alarm interrupts due by ``now_ns``."""
        with self._lock:
            raised = self._sync(now_ns)
        if raised:
            self._pulse()

    # -- port I/O
    def read(self, port: int, size: int) -> int:
        """``in`` from 0x70/0x71 (wider accesses read consecutive ports)."""
        value = 0
        for i in range(size):
            value |= self._read8(port + i) << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` to 0x70/0x71 (wider accesses write consecutive ports)."""
        for i in range(size):
            self._write8(port + i, (value >> (8 * i)) & 0xFF)

    def _read8(self, port: int) -> int:
        if port != RTC_PORT + 1:
            return 0xFF  # the index register is write-only
        with self._lock:
            now = self._clock()
            index = self.index
            raised = self._sync(now)
            value = self._read_reg(index, now)
        if raised and index != REG_C:  # a read of C consumed the event already
            self._pulse()
        return value

    def _read_reg(self, index: int, now: int) -> int:
        if index in TIME_REGS:
            return self._current_regs(now)[index]
        if index == REG_A:
            return (self.cmos[REG_A] & 0x7F) | (A_UIP if self._uip(now) else 0)
        if index == REG_C:
            value = self.cmos[REG_C]
            self.cmos[REG_C] = 0
            return value
        if index == REG_D:
            return D_VRT
        return self.cmos[index]

    def _uip(self, now: int) -> bool:
        """UIP as a read of register A at ``now`` sees it (see the module docstring)."""
        if not self._updating():
            return False
        wall = self._wall_ns(now)
        sec = wall // NS
        uip = False
        if wall % NS >= NS - UIP_NS:
            uip = True
            self._uip_sec = sec
        elif (
            self._a_read_sec == sec - 1
            and self._uip_sec != sec - 1
            and self._a_read_ns is not None
            and now - self._a_read_ns <= UIP_CATCHUP_NS
        ):
            uip = True  # the poller stepped over the window of the previous second
            self._uip_sec = sec - 1
        self._a_read_sec = sec
        self._a_read_ns = now
        return uip

    def _write8(self, port: int, value: int) -> None:
        if port == RTC_PORT:
            with self._lock:
                self.index = value & 0x7F
                self.nmi_masked = bool(value & 0x80)
            return
        if port != RTC_PORT + 1:
            return
        with self._lock:
            now = self._clock()
            self._sync(now)
            raised = self._write_reg(self.index, value, now)
        if raised:
            self._pulse()

    def _write_reg(self, index: int, value: int, now: int) -> bool:
        if index in TIME_REGS:
            if self.cmos[REG_B] & B_SET:
                self.cmos[index] = value
            else:
                regs = self._current_regs(now)
                regs[index] = value
                self._load_time(now, regs)
            return False
        if index == REG_A:
            self._write_a(value, now)
            return False
        if index == REG_B:
            return self._write_b(value, now)
        if index in (REG_C, REG_D):
            return False  # read-only
        self.cmos[index] = value
        return False

    def _write_a(self, value: int, now: int) -> None:
        was_running = self._running()
        old_rate = self.cmos[REG_A] & A_RS_MASK
        if was_running and (value & A_DV_MASK) > 0x20:
            self._frozen_ns = self._wall_ns(now)  # divider held: time stops
        self.cmos[REG_A] = value & 0x7F
        if not was_running and self._running():
            frozen = self._frozen_ns if self._frozen_ns is not None else self._wall_ns(now)
            self._frozen_ns = None
            self._set_wall(now, frozen - frozen % NS + NS // 2)  # first update in 500 ms
        elif was_running != self._running() or old_rate != value & A_RS_MASK:
            self._last_tick = self._tick_index(now)

    def _write_b(self, value: int, now: int) -> bool:
        old = self.cmos[REG_B]
        if value & B_SET:
            value &= ~B_UIE  # setting SET clears UIE
            if not old & B_SET:
                self.cmos[REG_B] = value  # latch in the new format
                latched = self._encode_time(self._wall_ns(now) // NS)
                for i, v in latched.items():
                    self.cmos[i] = v
        elif old & B_SET:
            self.cmos[REG_B] = value
            self._load_time(now, {i: self.cmos[i] for i in TIME_REGS})
        self.cmos[REG_B] = value
        return self._set_c(self.cmos[REG_C])

    # -- for the monitor and the machine
    def time_s(self) -> int:
        """The RTC's current time in epoch seconds (of its running clock)."""
        with self._lock:
            return self._wall_ns(self._clock()) // NS

    def describe(self) -> str:
        """A few lines of state for ``monitor info timers``."""
        with self._lock:
            now = self._clock()
            wall = self._wall_ns(now)
            a, b, c = self.cmos[REG_A], self.cmos[REG_B], self.cmos[REG_C]
            cycles = self._period_cycles()
            frozen = self._frozen_ns is not None
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(min(max(wall // NS, 0), MAX_TIME_S)))
        rate = "off" if cycles is None else f"{32768 / cycles:g} Hz"
        state = "divider held" if frozen else "running"
        deadline = self.next_deadline_ns()
        return (
            f"rtc: {stamp} ({state}{', SET' if b & B_SET else ''}) A={a:#04x} B={b:#04x} "
            f"C={c:#04x} periodic {rate}{' enabled' if b & B_PIE else ''}\n"
            f"rtc: IRQ8 pulses {self.irq_pulses}, next deadline "
            f"{'none' if deadline is None else f'{deadline} ns'}, "
            f"NMI {'masked' if self.nmi_masked else 'enabled'}"
        )
