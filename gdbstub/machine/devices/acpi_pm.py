"""ACPI fixed-hardware registers of the PC: PM1a event and control blocks, the PM timer.

Theory of operation
-------------------
Ports (``ACPI_PM_BASE`` = 0x600 in ``firmware/layout.py``; the FADT points at them):

====== ==== ==================================================================================
0x600  2    PM1_STS: TMR_STS (0), BM_STS (4), GBL_STS (5), PWRBTN_STS (8), SLPBTN_STS (9),
            RTC_STS (10), WAK_STS (15).  Writing 1 to a bit clears it.
0x602  2    PM1_EN: the matching enables (TMR_EN 0, GBL_EN 5, PWRBTN_EN 8, SLPBTN_EN 9, RTC_EN 10)
0x604  2    PM1_CNT: SCI_EN (0) always reads 1 (there is no SMI_CMD: the machine is always in
            ACPI mode), BM_RLD (1), GBL_RLS (2, write-only), SLP_TYP (10-12), SLP_EN (13,
            write-only).  SLP_EN with SLP_TYP 0 (our DSDT's and PIIX4's \\_S5) powers off:
            :class:`GuestPowerOff` from ``bus.py`` leaves the port write.
0x608  4    PM_TMR: 24-bit up-counter at 3.579545 MHz, ``now_ns * 3579545 // 10**9`` mod 2**24
            of the virtual clock; the upper byte reads 0 (FADT TMR_VAL_EXT clear), writes vanish
====== ==== ==================================================================================

Accesses of any width are split into the registers they cover (bytes past the block read 0xFF,
the two reserved bytes at 0x606 read 0).

TMR_STS is set whenever bit 23 of the timer changes, i.e. every 2**23 ticks (2.34 s).  The
device remembers the 2**23-tick period it last looked at and catches up lazily on every access
and in :meth:`AcpiPm.poll`: however many toggles a long gap holds, TMR_STS is just set, once.
The SCI is level-triggered: the line is high exactly while ``PM1_STS & PM1_EN`` is non-zero; it
is re-evaluated after every access and poll and ``sci`` is called only when the level changes.

:class:`LegacyPowerOff` is QEMU's older soft-off port 0xB004 (PIIX4 PM1_CNT at base 0xB000):
a write with SLP_EN set and SLP_TYP 0 (``outw(0x2000, 0xB004)``) powers off.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from gdbstub.machine.bus import GuestPowerOff
from gdbstub.machine.firmware.layout import ACPI_LEGACY_OFF, ACPI_PM_BASE

log = logging.getLogger(__name__)

PM_TIMER_HZ = 3_579_545
NS_PER_S = 1_000_000_000
PM_TIMER_MASK = 0xFFFFFF
TMR_TOGGLE_SHIFT = 23  # TMR_STS is set when bit 23 changes

PM_BLOCK_SIZE = 12  # 0x600-0x60B
PM1_STS, PM1_EN, PM1_CNT, PM_RESERVED, PM_TMR = 0, 2, 4, 6, 8

STS_TMR = 1 << 0
STS_BM = 1 << 4
STS_GBL = 1 << 5
STS_PWRBTN = 1 << 8
STS_SLPBTN = 1 << 9
STS_RTC = 1 << 10
STS_WAK = 1 << 15
STS_MASK = STS_TMR | STS_BM | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC | STS_WAK
EN_MASK = STS_TMR | STS_GBL | STS_PWRBTN | STS_SLPBTN | STS_RTC

CNT_SCI_EN = 1 << 0
CNT_BM_RLD = 1 << 1
CNT_GBL_RLS = 1 << 2
CNT_SLP_TYP_SHIFT = 10
CNT_SLP_TYP = 7 << CNT_SLP_TYP_SHIFT
CNT_SLP_EN = 1 << 13
CNT_STORED = CNT_BM_RLD | CNT_SLP_TYP  # bits that read back as written

S5_SLP_TYP = 0  # what our DSDT's \_S5 package (and QEMU's PIIX4) give


def pm_ticks_at(ns: int) -> int:
    """Ticks of the 3.579545 MHz PM timer clock at virtual time ``ns`` (not wrapped)."""
    return ns * PM_TIMER_HZ // NS_PER_S


def pm_ns_of_tick(tick: int) -> int:
    """The first virtual nanosecond at which :func:`pm_ticks_at` reaches ``tick``."""
    return -(-tick * NS_PER_S // PM_TIMER_HZ)


class AcpiPm:
    """PM1a_EVT, PM1a_CNT and PM_TMR at ``base`` (12 ports), raising ``sci(level)``."""

    def __init__(
        self,
        clock: Callable[[], int],
        sci: Callable[[bool], None],
        base: int = ACPI_PM_BASE,
        s5_slp_typ: int = S5_SLP_TYP,
    ) -> None:
        self.base = base
        self.s5_slp_typ = s5_slp_typ
        self._clock = clock
        self._sci = sci
        self._lock = threading.Lock()
        self.status = 0
        self.enable = 0
        self.control = 0  # stored PM1_CNT bits (SCI_EN is added on read)
        self._period_seen = pm_ticks_at(clock()) >> TMR_TOGGLE_SHIFT
        self._sci_level = False

    # -- public helpers
    def timer(self) -> int:
        """The PM timer's current 24-bit value."""
        return pm_ticks_at(self._clock()) & PM_TIMER_MASK

    @property
    def sci_level(self) -> bool:
        """Whether the SCI line is currently asserted."""
        with self._lock:
            return self._sci_level

    def press_power_button(self) -> None:
        """Set PWRBTN_STS (for a ``system_powerdown``): the guest sees an SCI if it enabled it."""
        with self._lock:
            self.status |= STS_PWRBTN
            change = self._update_sci_locked()
        self._signal(change)

    # -- ports
    def read(self, port: int, size: int) -> int:
        """``in`` from the PM block; accesses spanning registers are assembled byte-wise."""
        with self._lock:
            self._catch_up_locked(self._clock())
            regs = self._register_bytes_locked()
            change = self._update_sci_locked()
        self._signal(change)
        value = 0
        for i in range(size):
            offset = port - self.base + i
            byte = regs[offset] if 0 <= offset < PM_BLOCK_SIZE else 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, port: int, size: int, value: int) -> None:
        """``out`` to the PM block: W1C status, enables, control (SLP_EN may power off)."""
        # gather the bytes written per 16-bit register: {register offset: (value, byte mask)}
        parts: dict[int, tuple[int, int]] = {}
        for i in range(size):
            offset = port - self.base + i
            if not 0 <= offset < PM_BLOCK_SIZE:
                continue
            reg, shift = offset & ~1, 8 * (offset & 1)
            old_value, old_mask = parts.get(reg, (0, 0))
            byte = (value >> (8 * i)) & 0xFF
            parts[reg] = (old_value | (byte << shift), old_mask | (0xFF << shift))
        power_off = False
        with self._lock:
            self._catch_up_locked(self._clock())
            for reg, (val, mask) in parts.items():
                if reg == PM1_STS:
                    self.status &= ~(val & mask)
                elif reg == PM1_EN:
                    self.enable = (self.enable & ~mask) | (val & mask & EN_MASK)
                elif reg == PM1_CNT:
                    self.control = (self.control & ~mask) | (val & mask & CNT_STORED)
                    if val & mask & CNT_SLP_EN:
                        power_off = self._sleep_locked()
            change = self._update_sci_locked()
        self._signal(change)
        if power_off:
            raise GuestPowerOff()

    # -- time
    def next_deadline_ns(self) -> int | None:
        """When bit 23 of the timer next toggles, if TMR_EN would make that an SCI."""
        with self._lock:
            if not self.enable & STS_TMR or self.status & STS_TMR:
                return None
            return pm_ns_of_tick((self._period_seen + 1) << TMR_TOGGLE_SHIFT)

    def poll(self, now_ns: int) -> None:
        """Set TMR_STS if bit 23 toggled by ``now_ns`` (once, however many times) and update SCI."""
        with self._lock:
            self._catch_up_locked(now_ns)
            change = self._update_sci_locked()
        self._signal(change)

    def describe(self) -> str:
        """Registers and SCI level, for ``monitor info irq`` / ``monitor info timers``."""
        with self._lock:
            self._catch_up_locked(self._clock())
            cnt = self.control | CNT_SCI_EN
            return (
                f"acpi pm: PM1_STS {self.status:#06x} PM1_EN {self.enable:#06x}"
                f" PM1_CNT {cnt:#06x} sci {int(self._sci_level)}\n"
                f"acpi pm timer: {self.timer():#08x} ({PM_TIMER_HZ} Hz, 24-bit)"
            )

    # -- internals
    def _catch_up_locked(self, now_ns: int) -> None:
        period = pm_ticks_at(now_ns) >> TMR_TOGGLE_SHIFT
        if period > self._period_seen:
            self._period_seen = period
            self.status |= STS_TMR

    def _register_bytes_locked(self) -> bytes:
        cnt = self.control | CNT_SCI_EN
        tmr = self.timer()
        words = (self.status, self.enable, cnt, 0)
        return b"".join(w.to_bytes(2, "little") for w in words) + tmr.to_bytes(4, "little")

    def _sleep_locked(self) -> bool:
        """SLP_EN was written: True to power off (S5), otherwise the request is ignored."""
        slp_typ = (self.control & CNT_SLP_TYP) >> CNT_SLP_TYP_SHIFT
        if slp_typ == self.s5_slp_typ:
            return True
        log.warning("guest asked for ACPI sleep type %d: not supported, ignored", slp_typ)
        return False

    def _update_sci_locked(self) -> bool | None:
        """The new SCI level if it changed, else None."""
        level = bool(self.status & self.enable & STS_MASK)
        if level == self._sci_level:
            return None
        self._sci_level = level
        return level

    def _signal(self, change: bool | None) -> None:
        if change is not None:
            self._sci(change)


class LegacyPowerOff:
    """QEMU's older soft-off port at 0xB004 (2 ports): SLP_EN with SLP_TYP 0 powers off."""

    def __init__(self, base: int = ACPI_LEGACY_OFF) -> None:
        self.base = base

    def read(self, port: int, size: int) -> int:
        """Reads give 0 (SCI_EN clear: nothing else lives here)."""
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        """``outw(0x2000, 0xB004)`` (or the same bits by byte) raises GuestPowerOff."""
        shift = 8 * (port - self.base)
        if shift < 0:
            return
        word = (value << shift) & 0xFFFF
        if word & CNT_SLP_EN and (word & CNT_SLP_TYP) >> CNT_SLP_TYP_SHIFT == S5_SLP_TYP:
            raise GuestPowerOff()
