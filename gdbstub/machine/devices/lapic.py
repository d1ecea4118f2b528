"""The local APIC of one vCPU: xAPIC MMIO at 0xFEE00000, x2APIC MSRs, timer, IPIs and LINT pins.

Theory of operation
-------------------
One :class:`LocalApic` per vCPU. Interrupts arrive through :meth:`LocalApic.accept` (the I/O
APIC, another APIC's IPI, this APIC's own LVTs): the vector's bit is set in the 256-bit IRR and,
for a level-triggered interrupt, in the TMR. The machine asks :meth:`LocalApic.pending_vector`
before each entry: the highest IRR vector whose priority class (bits 7:4) is above the processor
priority, where PPR is the TPR, or the class of the highest in-service vector when that is
higher. When the CPU takes the interrupt, :meth:`LocalApic.acknowledge` moves it from IRR to ISR;
the guest's EOI retires the highest ISR bit and, if its TMR bit was set, calls ``on_eoi(vector)``
so the I/O APIC clears its remote IRR. The TPR itself lives in the vCPU (``HV_X86_TPR``, so the
hardware's TPR shadow and CR8 see one value): it is read through ``get_tpr`` whenever a priority
is computed and written through ``set_tpr`` on a TPR register write; it holds the 8-bit APIC TPR.

The timer counts at ``bus_hz`` divided by the divide configuration register. A one-shot or
periodic count is kept as "``base_count`` at virtual time ``base_ns``", so the current count is
computed from the clock on every read. TSC-deadline mode compares IA32_TSC_DEADLINE with
``tsc()``; firing clears the MSR. :meth:`LocalApic.next_deadline_ns` tells the machine when to
call :meth:`LocalApic.poll`; a masked LVT keeps counting (expiries are consumed when the state is
next looked at, in phase) but asks for no polling. A periodic timer polled late by more than a
period fires once and re-arms from the poll time. While the APIC is software-disabled (SVR bit 8
clear) every LVT is forced masked, and fixed interrupts are not accepted (as KVM does).

The ICR sends IPIs. Only the sender is modelled here: fixed and NMI IPIs that include this APIC
(the "self" and "all including self" shorthands, its own physical ID, a physical broadcast or a
matching logical destination) are delivered at once; the part that may reach other APICs goes
to ``send_ipi(dest, vector, delivery_mode, shorthand)`` when one is given (the machine binds one
per vCPU, so it knows the sender). INIT level de-assert IPIs are dropped, as on every CPU since
the Pentium 4; delivery status always reads idle.

The LINT pins: LINT0 in ExtINT mode passes the 8259's INTR straight to the CPU (the machine asks
:meth:`LocalApic.extint_enabled` and takes the vector from the PIC); LINT1 in NMI mode gives an
NMI on a rising edge; a fixed-mode LINT delivers its vector (on an edge, or while asserted with
the LVT's remote IRR as the level latch). As KVM and QEMU do for the BSP, :meth:`LocalApic.reset`
leaves LINT0 in unmasked ExtINT mode (the virtual wire a BIOS sets up), so the PIC works before
the guest touches the APIC; a guest write to a LINT0 while software-disabled masks it.

IA32_APIC_BASE: EN clear is the globally disabled APIC (MMIO not decoded, the INTR pin goes
straight to the CPU, registers reset on the way down), EXTD set is x2APIC mode (registers as MSRs
0x800-0x8FF, MMIO not decoded, 32-bit ID, derived LDR). Invalid transitions (EXTD without EN,
x2APIC to xAPIC, disabled to x2APIC) and the SDM's x2APIC access rules raise
:class:`ApicMsrFault`, which the machine turns into #GP(0).

Callbacks are made outside the lock (``on_eoi`` re-enters through the I/O APIC's redelivery),
except ``get_tpr``, ``clock`` and ``tsc``, which must not call back into the APIC.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# MSRs
MSR_APIC_BASE = 0x1B
MSR_TSC_DEADLINE = 0x6E0
MSR_X2APIC_FIRST = 0x800
MSR_X2APIC_LAST = 0x8FF

APIC_DEFAULT_BASE = 0xFEE00000
BASE_BSP, BASE_EXTD, BASE_EN = 1 << 8, 1 << 10, 1 << 11
PHYS_ADDR_BITS = 40  # the CPU model's (cpuid.py leaf 0x80000008)
BASE_RESERVED = 0xFF | (1 << 9) | ~((1 << PHYS_ADDR_BITS) - 1)

APIC_VERSION = 0x14  # integrated APIC, as QEMU
MAX_LVT = 5  # six LVT entries: timer, thermal, perfmon, LINT0, LINT1, error (no CMCI)
VERSION_VALUE = APIC_VERSION | (MAX_LVT << 16)

# register offsets in the xAPIC page (x2APIC MSR = 0x800 + offset / 16)
REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_ICR_LOW = 0x300
REG_ICR_HIGH = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0
REG_SELF_IPI = 0x3F0  # x2APIC only

LVT_TIMER, LVT_THERMAL, LVT_PERFMON, LVT_LINT0, LVT_LINT1, LVT_ERROR = range(6)
LVT_NAMES = ("timer", "thermal", "perfmon", "LINT0", "LINT1", "error")
LVT_MASKED, LVT_LEVEL, LVT_REMOTE_IRR, LVT_ACTIVE_LOW = 1 << 16, 1 << 15, 1 << 14, 1 << 13
_LVT_MODE_BITS = 0x700
LVT_WRITABLE = (
    0xFF | LVT_MASKED | (3 << 17),  # timer: vector, mask, timer mode
    0xFF | _LVT_MODE_BITS | LVT_MASKED,  # thermal
    0xFF | _LVT_MODE_BITS | LVT_MASKED,  # perfmon
    0xFF | _LVT_MODE_BITS | LVT_ACTIVE_LOW | LVT_LEVEL | LVT_MASKED,  # LINT0
    0xFF | _LVT_MODE_BITS | LVT_ACTIVE_LOW | LVT_LEVEL | LVT_MASKED,  # LINT1
    0xFF | LVT_MASKED,  # error
)

# delivery modes (LVT, ICR, I/O APIC)
DM_FIXED, DM_LOWEST, DM_SMI, DM_NMI, DM_INIT, DM_STARTUP, DM_EXTINT = 0, 1, 2, 4, 5, 6, 7
DM_NAMES = {0: "fixed", 1: "lowest", 2: "SMI", 4: "NMI", 5: "INIT", 6: "SIPI", 7: "ExtINT"}

TIMER_ONESHOT, TIMER_PERIODIC, TIMER_TSC_DEADLINE = 0, 1, 2
TIMER_MODE_NAMES = ("one-shot", "periodic", "TSC-deadline", "reserved")

SVR_ENABLE = 1 << 8
SVR_WRITABLE = 0x3FF  # vector, APIC enable, focus checking disabled (no EOI suppression)

ICR_LOW_WRITABLE = 0x000CCFFF  # vector, mode, dest mode, level, trigger, shorthand (not bit 12)
X2APIC_ICR_RESERVED = (0xFFF << 20) | (3 << 16) | (1 << 13)
SHORTHAND_NONE, SHORTHAND_SELF, SHORTHAND_ALL, SHORTHAND_OTHERS = 0, 1, 2, 3

ESR_SEND_ILLEGAL, ESR_RECV_ILLEGAL = 1 << 5, 1 << 6

_NS = 1_000_000_000


class ApicMsrFault(Exception):
    """A RDMSR/WRMSR the local APIC refuses: the machine injects #GP(0)."""


def timer_divisor(dcr: int) -> int:
    """The divide configuration register's divisor: bits 0, 1 and 3 (0b1011 is 1, else 2..128)."""
    code = (dcr & 3) | ((dcr >> 1) & 4)
    return 1 << ((code + 1) & 7)


def _bits(mask: int) -> str:
    vectors = [f"{v:#04x}" for v in range(256) if mask >> v & 1]
    return " ".join(vectors) if vectors else "none"


@dataclass
class _Effects:
    """Callbacks gathered under the lock and made after it is released."""

    notify: bool = False
    tpr: int | None = None
    eois: list[int] = field(default_factory=list)
    ipis: list[tuple[int, int, int, int]] = field(default_factory=list)


class LocalApic:
    """One vCPU's local APIC (see the module docstring)."""

    def __init__(
        self,
        *,
        apic_id: int,
        clock: Callable[[], int],
        tsc: Callable[[], int],
        tsc_hz: int,
        bus_hz: int = 1_000_000_000,
        get_tpr: Callable[[], int],
        set_tpr: Callable[[int], None],
        on_eoi: Callable[[int], None],
        notify: Callable[[], None],
        send_ipi: Callable[[int, int, int, int], None] | None = None,
        bsp: bool = True,
    ) -> None:
        if tsc_hz <= 0 or bus_hz <= 0:
            raise ValueError("tsc_hz and bus_hz must be positive")
        self._initial_id = apic_id
        self._clock = clock
        self._tsc = tsc
        self._tsc_hz = tsc_hz
        self._bus_hz = bus_hz
        self._get_tpr = get_tpr
        self._set_tpr = set_tpr
        self._on_eoi = on_eoi
        self._notify = notify
        self._send_ipi = send_ipi
        self.bsp = bsp
        self._lock = threading.Lock()
        self._base_msr = APIC_DEFAULT_BASE | BASE_EN | (BASE_BSP if bsp else 0)
        self._xapic_id = apic_id & 0xFF
        self._lint_level = [False, False]
        self._init_registers()

    # --- state helpers (lock held) --------------------------------------------------------------

    def _init_registers(self) -> None:
        """Every register as INIT leaves it, except the ID and IA32_APIC_BASE (not the TPR)."""
        self._irr = self._isr = self._tmr = 0
        self._ldr = 0
        self._dfr = 0xFFFFFFFF
        self._svr = 0xFF
        self._esr = self._esr_pending = 0
        self._icr_low = self._icr_high = 0
        self._lvt = [LVT_MASKED] * 6
        if self.bsp:
            self._lvt[LVT_LINT0] = DM_EXTINT << 8  # the BIOS's virtual wire (KVM, QEMU)
        self._timer_initial = 0
        self._timer_dcr = 0
        self._timer_armed = False
        self._timer_base_ns = 0
        self._timer_base_count = 0
        self._tsc_deadline = 0
        self._nmi_pending = False

    def _hw_enabled(self) -> bool:
        return bool(self._base_msr & BASE_EN)

    def _x2apic(self) -> bool:
        return bool(self._base_msr & BASE_EXTD)

    def _sw_enabled(self) -> bool:
        return bool(self._svr & SVR_ENABLE)

    def _id_locked(self) -> int:
        return self._initial_id if self._x2apic() else self._xapic_id

    def _logical_locked(self) -> int:
        if self._x2apic():
            ident = self._initial_id
            return ((ident >> 4) << 16) | (1 << (ident & 0xF))
        return self._ldr >> 24

    def _ppr_locked(self) -> int:
        tpr = self._get_tpr() & 0xFF
        isrv = self._isr.bit_length() - 1 if self._isr else 0
        return tpr if (tpr & 0xF0) >= (isrv & 0xF0) else isrv & 0xF0

    def _timer_mode(self) -> int:
        return (self._lvt[LVT_TIMER] >> 17) & 3

    def _ticks_to_ns(self, ticks: int) -> int:
        return -(-ticks * timer_divisor(self._timer_dcr) * _NS // self._bus_hz)

    def _ns_to_ticks(self, ns: int) -> int:
        return ns * self._bus_hz // (timer_divisor(self._timer_dcr) * _NS)

    def _timer_expiry(self) -> int | None:
        """Virtual time of the next one-shot/periodic expiry, or None."""
        if not self._timer_armed or self._timer_mode() == TIMER_TSC_DEADLINE:
            return None
        return self._timer_base_ns + self._ticks_to_ns(self._timer_base_count)

    def _current_count(self, now: int) -> int:
        if not self._timer_armed or self._timer_mode() == TIMER_TSC_DEADLINE:
            return 0
        ticks = self._ns_to_ticks(max(0, now - self._timer_base_ns))
        if ticks < self._timer_base_count:
            return self._timer_base_count - ticks
        if self._timer_mode() == TIMER_PERIODIC:
            return self._timer_initial - (ticks - self._timer_base_count) % self._timer_initial
        return 0

    def _timer_update(self, now: int, fx: _Effects) -> None:
        """Fire (or, when masked, silently consume) whatever timer expiry is due at ``now``."""
        masked = bool(self._lvt[LVT_TIMER] & LVT_MASKED)
        if self._timer_mode() == TIMER_TSC_DEADLINE:
            if self._tsc_deadline and self._tsc() >= self._tsc_deadline:
                self._tsc_deadline = 0
                if not masked:
                    self._fire_lvt(LVT_TIMER, fx)
            return
        expiry = self._timer_expiry()
        if expiry is None or now < expiry:
            return
        if self._timer_mode() != TIMER_PERIODIC:
            self._timer_armed = False
            if not masked:
                self._fire_lvt(LVT_TIMER, fx)
            return
        period = self._ticks_to_ns(self._timer_initial)
        if masked:  # stay in phase: the latest expiry at or before now
            base = expiry + (now - expiry) // period * period
        else:
            self._fire_lvt(LVT_TIMER, fx)
            base = expiry if now < expiry + period else now  # late by a period: re-arm from now
        self._timer_base_ns = base
        self._timer_base_count = self._timer_initial

    def _rebase_timer(self, now: int) -> None:
        """Restart counting from the current count at ``now`` (before a divider change)."""
        if self._timer_armed and self._timer_mode() != TIMER_TSC_DEADLINE:
            count = self._current_count(now)
            self._timer_base_ns = now
            self._timer_base_count = count

    def _accept(self, vector: int, level: bool, fx: _Effects) -> None:
        if not (self._hw_enabled() and self._sw_enabled()):
            return
        if vector < 16:
            self._error(ESR_RECV_ILLEGAL, fx)
            return
        bit = 1 << vector
        self._irr |= bit
        if level:
            self._tmr |= bit
        else:
            self._tmr &= ~bit
        fx.notify = True

    def _nmi(self, fx: _Effects) -> None:
        if self._hw_enabled():
            self._nmi_pending = True
            fx.notify = True

    def _error(self, bits: int, fx: _Effects) -> None:
        self._esr_pending |= bits
        lvt = self._lvt[LVT_ERROR]
        if not lvt & LVT_MASKED and (lvt & 0xFF) >= 16:
            self._accept(lvt & 0xFF, False, fx)

    def _fire_lvt(self, index: int, fx: _Effects) -> None:
        """An LVT's source fired (the caller checked the mask where it matters)."""
        lvt = self._lvt[index]
        if lvt & LVT_MASKED:
            return
        mode = (lvt >> 8) & 7 if index not in (LVT_TIMER, LVT_ERROR) else DM_FIXED
        if mode == DM_FIXED:
            self._accept(lvt & 0xFF, bool(lvt & LVT_LEVEL), fx)
        elif mode == DM_NMI:
            self._nmi(fx)
        elif mode == DM_EXTINT:
            fx.notify = True  # the machine looks at the PIC
        else:
            log.debug("local APIC: LVT %s delivery mode %d ignored", LVT_NAMES[index], mode)

    def _lint_changed(self, pin: int, rising: bool, fx: _Effects) -> None:
        """LINT``pin`` moved (``rising``: its active edge) or its LVT was rewritten."""
        index = LVT_LINT0 + pin
        lvt = self._lvt[index]
        if lvt & LVT_MASKED or not self._hw_enabled():
            return
        asserted = self._lint_level[pin] != bool(lvt & LVT_ACTIVE_LOW)
        mode = (lvt >> 8) & 7
        if mode == DM_FIXED and lvt & LVT_LEVEL:
            if asserted and not lvt & LVT_REMOTE_IRR:
                self._lvt[index] |= LVT_REMOTE_IRR
                self._accept(lvt & 0xFF, True, fx)
        elif mode == DM_EXTINT:
            if asserted:
                fx.notify = True
        elif rising:
            self._fire_lvt(index, fx)

    def _eoi(self, fx: _Effects) -> None:
        if not self._isr:
            return
        vector = self._isr.bit_length() - 1
        self._isr &= ~(1 << vector)
        if not self._tmr >> vector & 1:
            return
        fx.eois.append(vector)
        for pin in (0, 1):
            lvt = self._lvt[LVT_LINT0 + pin]
            if lvt & LVT_REMOTE_IRR and lvt & 0xFF == vector:
                self._lvt[LVT_LINT0 + pin] &= ~LVT_REMOTE_IRR
                self._lint_changed(pin, False, fx)

    def _logical_match(self, dest: int) -> bool:
        if self._x2apic():
            ldr = self._logical_locked()
            return dest == 0xFFFFFFFF or (dest >> 16 == ldr >> 16 and bool(dest & ldr & 0xFFFF))
        dest &= 0xFF
        ldr = self._ldr >> 24
        if dest == 0xFF:
            return True
        if self._dfr >> 28 == 0xF:  # flat model
            return bool(dest & ldr)
        return dest >> 4 == ldr >> 4 and bool(dest & ldr & 0xF)  # cluster model

    def _send_icr(self, low: int, dest: int, fx: _Effects) -> None:
        vector, mode = low & 0xFF, (low >> 8) & 7
        logical, shorthand = bool(low & (1 << 11)), (low >> 18) & 3
        if mode == DM_INIT and low & (1 << 15) and not low & (1 << 14):
            return  # INIT level de-assert: ignored since the Pentium 4
        if mode in (DM_FIXED, DM_LOWEST) and vector < 16:
            self._error(ESR_SEND_ILLEGAL, fx)
            return
        if shorthand == SHORTHAND_SELF:
            to_self, to_others = True, False
        elif shorthand == SHORTHAND_ALL:
            to_self, to_others = True, True
        elif shorthand == SHORTHAND_OTHERS:
            to_self, to_others = False, True
        elif logical:
            to_self, to_others = self._logical_match(dest), True
        elif dest == (0xFFFFFFFF if self._x2apic() else 0xFF):
            to_self, to_others = True, True
        else:
            to_self = dest == self._id_locked()
            to_others = not to_self
        if to_self:
            if mode in (DM_FIXED, DM_LOWEST):
                self._accept(vector, False, fx)
            elif mode == DM_NMI:
                self._nmi(fx)
            else:
                log.debug("local APIC: %s IPI to itself ignored", DM_NAMES.get(mode, mode))
        if to_others and self._send_ipi is not None:
            fx.ipis.append((dest, vector, mode, shorthand))

    def _finish(self, fx: _Effects) -> None:
        """Make the gathered callbacks (lock released)."""
        if fx.tpr is not None:
            self._set_tpr(fx.tpr)
        for vector in fx.eois:
            self._on_eoi(vector)
        if fx.ipis and self._send_ipi is not None:
            for ipi in fx.ipis:
                self._send_ipi(*ipi)
        if fx.notify:
            self._notify()

    # --- registers, shared by MMIO and MSRs (lock held) -------------------------------------------

    def _read_reg(self, reg: int, fx: _Effects) -> int:
        """A register by its xAPIC offset (x2APIC differences are handled by the callers)."""
        if reg == REG_ID:
            return self._initial_id if self._x2apic() else self._xapic_id << 24
        if reg == REG_VERSION:
            return VERSION_VALUE
        if reg == REG_TPR:
            return self._get_tpr() & 0xFF
        if reg == REG_PPR:
            return self._ppr_locked()
        if reg == REG_LDR:
            return self._logical_locked() if self._x2apic() else self._ldr
        if reg == REG_DFR:
            return self._dfr
        if reg == REG_SVR:
            return self._svr
        for base, bitmap in ((REG_ISR, self._isr), (REG_TMR, self._tmr), (REG_IRR, self._irr)):
            if base <= reg < base + 0x80:
                return (bitmap >> (32 * ((reg - base) >> 4))) & 0xFFFFFFFF
        if reg == REG_ESR:
            return self._esr
        if reg == REG_ICR_LOW:
            return self._icr_low
        if reg == REG_ICR_HIGH:
            return self._icr_high
        if REG_LVT_TIMER <= reg <= REG_LVT_ERROR:
            return self._lvt[(reg - REG_LVT_TIMER) >> 4]
        if reg == REG_TIMER_INITIAL:
            return self._timer_initial
        if reg == REG_TIMER_CURRENT:
            now = self._clock()
            self._timer_update(now, fx)
            return self._current_count(now)
        if reg == REG_TIMER_DIVIDE:
            return self._timer_dcr
        return 0  # APR, EOI, reserved

    def _write_reg(self, reg: int, value: int, fx: _Effects) -> None:
        value &= 0xFFFFFFFF
        if reg == REG_ID:
            if not self._x2apic():
                self._xapic_id = value >> 24
        elif reg == REG_TPR:
            fx.tpr = value & 0xFF
        elif reg == REG_EOI:
            self._eoi(fx)
        elif reg == REG_LDR:
            if not self._x2apic():
                self._ldr = value & 0xFF000000
        elif reg == REG_DFR:
            self._dfr = value | 0x0FFFFFFF
        elif reg == REG_SVR:
            self._svr = value & SVR_WRITABLE
            if not self._sw_enabled():
                self._timer_update(self._clock(), fx)
                self._lvt = [lvt | LVT_MASKED for lvt in self._lvt]
        elif reg == REG_ESR:
            self._esr, self._esr_pending = self._esr_pending, 0
        elif reg == REG_ICR_LOW:
            self._icr_low = value & ICR_LOW_WRITABLE
            self._send_icr(self._icr_low, self._icr_high >> 24, fx)
        elif reg == REG_ICR_HIGH:
            self._icr_high = value & 0xFF000000
        elif REG_LVT_TIMER <= reg <= REG_LVT_ERROR:
            self._write_lvt((reg - REG_LVT_TIMER) >> 4, value, fx)
        elif reg == REG_TIMER_INITIAL:
            now = self._clock()
            self._timer_update(now, fx)
            if self._timer_mode() == TIMER_TSC_DEADLINE:
                return  # ignored in TSC-deadline mode
            self._timer_initial = value
            self._timer_armed = value != 0
            self._timer_base_ns = now
            self._timer_base_count = value
        elif reg == REG_TIMER_DIVIDE:
            now = self._clock()
            self._timer_update(now, fx)
            self._rebase_timer(now)
            self._timer_dcr = value & 0xB
        elif reg == REG_SELF_IPI and self._x2apic():
            self._send_icr((SHORTHAND_SELF << 18) | (value & 0xFF), 0, fx)
        # version, PPR, ISR/TMR/IRR, current count, APR, reserved: read-only or nothing

    def _write_lvt(self, index: int, value: int, fx: _Effects) -> None:
        old = self._lvt[index]
        if index == LVT_TIMER:
            self._timer_update(self._clock(), fx)  # consume expiries under the old mask
        new = value & LVT_WRITABLE[index]
        if not self._sw_enabled():
            new |= LVT_MASKED
        new |= old & LVT_REMOTE_IRR
        if index in (LVT_LINT0, LVT_LINT1) and not new & LVT_LEVEL:
            new &= ~LVT_REMOTE_IRR
        self._lvt[index] = new
        if index == LVT_TIMER:
            was_deadline = (old >> 17) & 3 == TIMER_TSC_DEADLINE
            if was_deadline != (self._timer_mode() == TIMER_TSC_DEADLINE):
                self._timer_armed = False  # switching to or from TSC-deadline disarms
                self._timer_initial = 0
                self._tsc_deadline = 0
        elif index in (LVT_LINT0, LVT_LINT1):
            self._lint_changed(index - LVT_LINT0, False, fx)

    # --- xAPIC MMIO -------------------------------------------------------------------------------

    def mmio_read(self, offset: int, size: int) -> int:
        """A guest load from the APIC page (all ones when the MMIO page is not decoded)."""
        fx = _Effects()
        with self._lock:
            if not self._hw_enabled() or self._x2apic():
                return (1 << (8 * size)) - 1
            if size != 4 or offset & 0xF or not 0 <= offset < 0x1000:
                return 0
            value = self._read_reg(offset, fx)
        self._finish(fx)
        return value

    def mmio_write(self, offset: int, size: int, value: int) -> None:
        """A guest store to the APIC page (ignored when the page is not decoded)."""
        fx = _Effects()
        with self._lock:
            if not self._hw_enabled() or self._x2apic():
                return
            if size != 4 or offset & 0xF or not 0 <= offset < 0x1000:
                return
            self._write_reg(offset, value, fx)
        self._finish(fx)

    # --- MSRs ----------------------------------------------------------------------------------

    @staticmethod
    def owns_msr(msr: int) -> bool:
        """Whether ``msr`` is one :meth:`msr_read`/:meth:`msr_write` handle."""
        return (
            msr in (MSR_APIC_BASE, MSR_TSC_DEADLINE) or MSR_X2APIC_FIRST <= msr <= MSR_X2APIC_LAST
        )

    def msr_read(self, msr: int) -> int:
        """RDMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register (ApicMsrFault: #GP)."""
        fx = _Effects()
        with self._lock:
            if msr == MSR_APIC_BASE:
                value = self._base_msr
            elif msr == MSR_TSC_DEADLINE:
                value = 0
                if self._hw_enabled() and self._timer_mode() == TIMER_TSC_DEADLINE:
                    self._timer_update(self._clock(), fx)
                    value = self._tsc_deadline
            elif MSR_X2APIC_FIRST <= msr <= MSR_X2APIC_LAST:
                reg = (msr - MSR_X2APIC_FIRST) << 4
                if not self._x2apic() or reg not in _X2APIC_READABLE:
                    raise ApicMsrFault(f"RDMSR {msr:#x}")
                value = self._read_reg(reg, fx)
                if reg == REG_ICR_LOW:
                    value |= self._icr_high << 32
            else:
                raise ApicMsrFault(f"RDMSR {msr:#x}: not a local APIC MSR")
        self._finish(fx)
        return value

    def msr_write(self, msr: int, value: int) -> None:
        """WRMSR of IA32_APIC_BASE, IA32_TSC_DEADLINE or an x2APIC register (ApicMsrFault: #GP)."""
        value &= (1 << 64) - 1
        fx = _Effects()
        with self._lock:
            if msr == MSR_APIC_BASE:
                self._write_base(value)
            elif msr == MSR_TSC_DEADLINE:
                if self._hw_enabled() and self._timer_mode() == TIMER_TSC_DEADLINE:
                    self._tsc_deadline = value
                    self._timer_update(self._clock(), fx)  # a deadline already past fires now
            elif MSR_X2APIC_FIRST <= msr <= MSR_X2APIC_LAST:
                self._x2apic_write((msr - MSR_X2APIC_FIRST) << 4, value, fx)
            else:
                raise ApicMsrFault(f"WRMSR {msr:#x}: not a local APIC MSR")
        self._finish(fx)

    def _x2apic_write(self, reg: int, value: int, fx: _Effects) -> None:
        if not self._x2apic() or reg not in _X2APIC_WRITABLE:
            raise ApicMsrFault(f"WRMSR {MSR_X2APIC_FIRST + (reg >> 4):#x}")
        if reg == REG_ICR_LOW:
            if value & X2APIC_ICR_RESERVED:
                raise ApicMsrFault(f"WRMSR ICR {value:#x}: reserved bits")
            self._icr_low = value & ICR_LOW_WRITABLE
            self._icr_high = value >> 32
            self._send_icr(self._icr_low, self._icr_high, fx)
            return
        if value & ~_X2APIC_VALID_BITS.get(reg, 0xFFFFFFFF):
            raise ApicMsrFault(f"WRMSR {MSR_X2APIC_FIRST + (reg >> 4):#x} {value:#x}: reserved")
        self._write_reg(reg, value, fx)

    def _write_base(self, value: int) -> None:
        if value & BASE_RESERVED:
            raise ApicMsrFault(f"IA32_APIC_BASE {value:#x}: reserved bits")
        en, extd = bool(value & BASE_EN), bool(value & BASE_EXTD)
        old_en, old_extd = self._hw_enabled(), self._x2apic()
        if extd and not en:
            raise ApicMsrFault("IA32_APIC_BASE: EXTD without EN is invalid")
        if old_extd and en and not extd:
            raise ApicMsrFault("IA32_APIC_BASE: x2APIC to xAPIC must go through disabled")
        if not old_en and extd:
            raise ApicMsrFault("IA32_APIC_BASE: disabled to x2APIC must go through xAPIC")
        if old_en and not en:
            self._init_registers()  # the IDs survive; nothing else does
        self._base_msr = (value & ~BASE_BSP) | (self._base_msr & BASE_BSP)

    # --- the machine's side ----------------------------------------------------------------------

    @property
    def apic_id(self) -> int:
        """The current APIC ID (8-bit xAPIC ID register, or the 32-bit x2APIC ID)."""
        with self._lock:
            return self._id_locked()

    @property
    def base_address(self) -> int:
        """Where the MMIO page is (IA32_APIC_BASE[51:12]); the machine registers 0xFEE00000."""
        with self._lock:
            return self._base_msr & ~0xFFF & ((1 << PHYS_ADDR_BITS) - 1)

    @property
    def x2apic_mode(self) -> bool:
        """Whether the APIC is in x2APIC mode (its registers are MSRs)."""
        with self._lock:
            return self._x2apic()

    def logical_id(self) -> int:
        """The logical ID: LDR[31:24] in xAPIC mode, the derived 32-bit LDR in x2APIC mode."""
        with self._lock:
            return self._logical_locked()

    def matches_destination(self, dest: int, logical: bool) -> bool:
        """Whether an interrupt message to ``dest`` (physical or logical) reaches this APIC."""
        with self._lock:
            if logical:
                return self._logical_match(dest)
            return dest in (self._id_locked(), 0xFFFFFFFF if self._x2apic() else 0xFF)

    def accept(self, vector: int, level_triggered: bool = False) -> None:
        """A fixed interrupt arrives (I/O APIC, IPI): IRR, and TMR when level-triggered."""
        fx = _Effects()
        with self._lock:
            self._accept(vector & 0xFF, level_triggered, fx)
        self._finish(fx)

    def deliver_nmi(self) -> None:
        """An NMI arrives (latched until :meth:`take_nmi`)."""
        fx = _Effects()
        with self._lock:
            self._nmi(fx)
        self._finish(fx)

    def set_lint0(self, level: bool) -> None:
        """The LINT0 pin's electrical level (the 8259's INTR on the BSP)."""
        self._set_lint(0, level)

    def set_lint1(self, level: bool) -> None:
        """The LINT1 pin's electrical level (the NMI line on a PC)."""
        self._set_lint(1, level)

    def _set_lint(self, pin: int, level: bool) -> None:
        fx = _Effects()
        with self._lock:
            active_low = bool(self._lvt[LVT_LINT0 + pin] & LVT_ACTIVE_LOW)
            was = self._lint_level[pin] != active_low
            self._lint_level[pin] = level
            now = level != active_low
            if now != was:
                self._lint_changed(pin, now, fx)
        self._finish(fx)

    def extint_enabled(self) -> bool:
        """Whether the 8259's INTR reaches the CPU: APIC globally disabled, or LINT0 ExtINT."""
        with self._lock:
            if not self._hw_enabled():
                return True
            lint0 = self._lvt[LVT_LINT0]
            return not lint0 & LVT_MASKED and (lint0 >> 8) & 7 == DM_EXTINT

    def pending_vector(self) -> int | None:
        """The vector the CPU would take now (highest IRR above PPR's class), or None."""
        with self._lock:
            irr = self._irr & ~0xFFFF
            if not irr or not self._hw_enabled():
                return None
            vector = irr.bit_length() - 1
            if (vector & 0xF0) <= (self._ppr_locked() & 0xF0):
                return None
            return vector

    def acknowledge(self, vector: int) -> None:
        """The CPU takes ``vector`` (from :meth:`pending_vector`): IRR -> ISR."""
        with self._lock:
            bit = 1 << (vector & 0xFF)
            if self._irr & bit:
                self._irr &= ~bit
                self._isr |= bit

    def take_nmi(self) -> bool:
        """Whether an NMI is pending; it is consumed."""
        with self._lock:
            pending, self._nmi_pending = self._nmi_pending, False
            return pending

    def next_deadline_ns(self) -> int | None:
        """Virtual time at which the timer next needs :meth:`poll` (None: unarmed or masked)."""
        with self._lock:
            if not self._hw_enabled() or self._lvt[LVT_TIMER] & LVT_MASKED:
                return None
            if self._timer_mode() != TIMER_TSC_DEADLINE:
                return self._timer_expiry()
            if not self._tsc_deadline:
                return None
            ahead = max(0, self._tsc_deadline - self._tsc())
            return self._clock() + -(-ahead * _NS // self._tsc_hz)

    def poll(self, now_ns: int) -> None:
        """Fire the timer if it is due at ``now_ns`` (at most once; a late periodic re-arms)."""
        fx = _Effects()
        with self._lock:
            if self._hw_enabled():
                self._timer_update(now_ns, fx)
        self._finish(fx)

    def reset(self, *, power_on: bool = False) -> None:
        """INIT: every register to its initial value except the ID and IA32_APIC_BASE.

        ``power_on`` also restores IA32_APIC_BASE (xAPIC mode at 0xFEE00000) and the ID. The
        TPR is the vCPU's register: the machine clears it with the rest of the vCPU.
        """
        with self._lock:
            if power_on:
                self._base_msr = APIC_DEFAULT_BASE | BASE_EN | (BASE_BSP if self.bsp else 0)
                self._xapic_id = self._initial_id & 0xFF
            self._init_registers()

    def describe(self) -> str:
        """A few lines of state for ``monitor info irq`` / ``monitor info timers``."""
        with self._lock:
            now = self._clock()
            mode = "disabled" if not self._hw_enabled() else "x2APIC" if self._x2apic() else "xAPIC"
            sw = "enabled" if self._sw_enabled() else "software-disabled"
            lines = [
                f"APIC id {self._id_locked()} {mode}{' BSP' if self.bsp else ''}"
                f" base {self._base_msr & ~0xFFF:#x} SVR {self._svr:#x} ({sw})"
                f" TPR {self._get_tpr() & 0xFF:#04x} PPR {self._ppr_locked():#04x}"
                + (" NMI pending" if self._nmi_pending else ""),
                f"  IRR {_bits(self._irr)}; ISR {_bits(self._isr)}; TMR {_bits(self._tmr)}",
                "  LVT " + ", ".join(self._describe_lvt(i) for i in range(6)),
            ]
            tmode = self._timer_mode()
            if tmode == TIMER_TSC_DEADLINE:
                deadline = f"{self._tsc_deadline:#x}" if self._tsc_deadline else "disarmed"
                lines.append(f"  timer TSC-deadline: deadline {deadline}, TSC {self._tsc():#x}")
            else:
                expiry = self._timer_expiry()
                due = f", expires at {expiry} ns (now {now})" if expiry is not None else ""
                lines.append(
                    f"  timer {TIMER_MODE_NAMES[tmode]}: initial {self._timer_initial}"
                    f" current {self._current_count(now)}"
                    f" divide {timer_divisor(self._timer_dcr)}{due}"
                )
            return "\n".join(lines)

    def _describe_lvt(self, index: int) -> str:
        lvt = self._lvt[index]
        what = "masked" if lvt & LVT_MASKED else f"vector {lvt & 0xFF:#04x}"
        if index in (LVT_THERMAL, LVT_PERFMON, LVT_LINT0, LVT_LINT1):
            mode = (lvt >> 8) & 7
            if mode != DM_FIXED:
                what += f" {DM_NAMES.get(mode, str(mode))}"
        if index in (LVT_LINT0, LVT_LINT1):
            what += " level" if lvt & LVT_LEVEL else ""
            what += " remote-IRR" if lvt & LVT_REMOTE_IRR else ""
        return f"{LVT_NAMES[index]} {lvt:#x} ({what})"


_LVT_REGS = range(REG_LVT_TIMER, REG_LVT_ERROR + 0x10, 0x10)
_X2APIC_WRITABLE = frozenset(
    (REG_TPR, REG_EOI, REG_SVR, REG_ESR, REG_ICR_LOW, REG_TIMER_INITIAL, REG_TIMER_DIVIDE)
).union(_LVT_REGS, (REG_SELF_IPI,))
_X2APIC_READABLE = frozenset(
    (REG_ID, REG_VERSION, REG_TPR, REG_PPR, REG_LDR, REG_SVR, REG_ESR, REG_ICR_LOW)
).union(_LVT_REGS, (REG_TIMER_INITIAL, REG_TIMER_CURRENT, REG_TIMER_DIVIDE))
_X2APIC_READABLE |= frozenset(range(REG_ISR, REG_IRR + 0x80, 0x10))  # ISR, TMR, IRR
# bits a WRMSR may set (others are reserved: #GP); LVTs drop unwritable bits silently
_X2APIC_VALID_BITS = {
    REG_TPR: 0xFF,
    REG_EOI: 0,
    REG_SVR: SVR_WRITABLE,
    REG_ESR: 0,
    REG_TIMER_DIVIDE: 0xB,
    REG_SELF_IPI: 0xFF,
}
